"""Differential review of the non-torch paths: NumPy's lean executor, the generic formula on
array-api-strict and JAX, ``value_and_grad``'s closed forms and ``jax.grad``, against the float64
references of :mod:`tests._reference`, on masked classes, ignored rows and extreme logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

_INF = float("inf")


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_smoothing": 0.1},
        {"z_loss": 0.1, "softcap": 5.0},
        {"gamma": 2.0},
        {"weight": np.array([1.0, 2.0, 0.5])},
    ],
    ids=["plain", "smoothing", "z_loss-softcap", "focal", "weight"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_ignored_row_on_a_masked_class_gives_no_warning(
    xp: Any, opts: dict[str, Any], reduction: str
) -> None:
    """The stand-in label of an ignored row (0) on a -inf class made -log p_y = inf times the
    target weight 0: NumPy warned (an error under ``-W error``) before masking the NaN."""
    conv = to_xp(xp)
    x = np.array([[-_INF, 1.0, 2.0], [-_INF, 1.0, 2.0], [0.5, -_INF, 3.0]])
    t = np.array([-100, 2, -100])
    kw = {key: conv(v) if isinstance(v, np.ndarray) else v for key, v in opts.items()}
    kw |= {"from_logits": True, "ignore_index": -100, "reduction": reduction}
    loss = ce.sparse_categorical_cross_entropy(conv(x), conv(t), **kw)
    value, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, conv(x), conv(t), **kw)
    ref_kw = {**opts, "from_logits": True, "reduction": reduction}
    ref = ce.sparse_categorical_cross_entropy(x[1:2], t[1:2], **ref_kw)
    ref_value, ref_grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x[1:2], t[1:2], **ref_kw
    )
    got, got_value, g = to_numpy(loss), to_numpy(value), to_numpy(grad)
    if reduction == "none":
        np.testing.assert_array_equal(got[[0, 2]], 0.0)
        np.testing.assert_array_equal(got_value[[0, 2]], 0.0)
        got, got_value = got[1:2], got_value[1:2]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(got_value, ref_value, rtol=1e-12)
    np.testing.assert_array_equal(g[[0, 2]], 0.0)
    np.testing.assert_allclose(g[1:2], ref_grad, rtol=1e-12, atol=1e-15)
