"""NumPy in, ``np.ndarray`` out: every loss, reduction and path, 0-d inputs too."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import crossent as ce

P = np.array([[0.3, 0.7], [0.6, 0.4]])
Y = np.array([1, 0])


def _calls() -> dict[str, tuple[Any, tuple[Any, Any], dict[str, Any]]]:
    """name -> (loss, (input, target), options), 0-d and batched, logits and probabilities."""
    return {
        "binary-0d": (ce.binary_cross_entropy, (np.array(0.3), np.array(1.0)), {}),
        "binary-0d-logits": (
            ce.binary_cross_entropy, (np.array(0.3), np.array(1.0)), {"from_logits": True}
        ),
        "binary": (ce.binary_cross_entropy, (P, P), {}),
        "binary-float32": (ce.binary_cross_entropy, (P.astype(np.float32), P.astype(np.float32)), {}),
        "categorical": (ce.categorical_cross_entropy, (P, P), {}),
        "categorical-logits": (ce.categorical_cross_entropy, (P, P), {"from_logits": True}),
        "categorical-1d": (ce.categorical_cross_entropy, (P[0], P[0]), {}),
        "sparse": (ce.sparse_categorical_cross_entropy, (P, Y), {}),
        "sparse-logits": (ce.sparse_categorical_cross_entropy, (P, Y), {"from_logits": True}),
        "sparse-1d": (ce.sparse_categorical_cross_entropy, (P[0], Y[0]), {}),
        "listnet": (ce.listnet_loss, (P, P), {}),
        "listnet-1d": (ce.listnet_loss, (P[0], P[0]), {}),
        "distillation": (ce.distillation_loss, (P, P[::-1]), {}),
        "distillation-1d": (ce.distillation_loss, (P[0], P[1]), {}),
    }  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(_calls()))
def test_numpy_losses_return_ndarrays(name: str, reduction: str) -> None:
    """``binary_cross_entropy`` of 0-d arrays returned a 0-d ndarray for ``"mean"`` and an
    ``np.float64`` for ``"sum"`` and ``"none"`` (NumPy's ufuncs and reductions return
    scalars), and the other losses mixed the two by reduction and path (the probability
    sparse loss's ``"sum"``, ``listnet_loss`` and ``distillation_loss``'s ``"sum"``, their
    0-d ``"none"``, and ``value_and_grad``'s gradient of 0-d inputs). Now every one is an
    ``np.ndarray`` of the input's dtype: 0-d for a reduction, the target's shape for
    ``"none"``."""
    loss, arrays, options = _calls()[name]
    options = {**options, "reduction": reduction}
    value = loss(*arrays, **options)
    closed, grad = ce.value_and_grad(loss, *arrays, **options)
    for got in (value, closed, grad):
        assert type(got) is np.ndarray, type(got)
        assert got.dtype == arrays[0].dtype
    assert value.ndim == closed.ndim
    if reduction != "none":
        assert value.shape == ()
    assert grad.shape == arrays[0].shape
    np.testing.assert_allclose(closed, value, rtol=1e-6)
