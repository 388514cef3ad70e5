"""Gradients through a saturated soft cap: logits several caps above 0, where tanh(x/c) is
within 1e-3 of 1 and its slope 1 - tanh^2 is small.

``1 - t * t`` from the tanh cancels there (its rounding times 1 / (1 - t^2)), so that the
float32 gradients of logits about 4.5 caps up came out 3e-5 to 6e-5 of their norm off
(every path: the fused losses on PyTorch and in the Triton kernel, PyTorch's eager
executor, the closed forms), as autodiff through ``tanh`` gives them; the slope is now
``1 / cosh^2`` (``softcap_slope``; in the Triton kernel ``4 e / (1 + e)^2``).
The float64 reference is autograd of the same loss in float64 on the float32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import crossent as ce

torch = pytest.importorskip("torch")
from crossent.fused import linear_cross_entropy, linear_log_probs  # noqa: E402

N, D, V = 16, 8, 40


def _data() -> tuple[Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(V, D, generator=g) * 0.2).double()
    h = torch.randn(N, D, generator=g).double()
    b = torch.full((V,), 4.5, dtype=torch.float64)  # logits 4.5 +- 1 caps up
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, b, y


CALLS: dict[str, Callable[..., Any]] = {
    "fused": lambda h, w, b, y: linear_cross_entropy(h, w, y, bias=b, softcap=1.0, reduction="sum"),
    "fused_log_probs": lambda h, w, b, y: linear_log_probs(h, w, y, bias=b, softcap=1.0).sum(),
    "torch_eager": lambda h, w, b, y: ce.sparse_categorical_cross_entropy(
        h @ w.T + b, y, from_logits=True, softcap=1.0, z_loss=1e-4, reduction="sum"
    ),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_gradients_of_saturated_logits_keep_float32_rounding(name: str) -> None:
    h, w, b, y = _data()

    def grads(dtype: Any) -> list[Any]:
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (h, w, b)]
        CALLS[name](*leaves, y).backward()
        return [t.grad.double() for t in leaves]

    for got, want in zip(grads(torch.float32), grads(torch.float64), strict=True):
        err = float((got - want).norm() / want.norm())
        assert err < 2e-6, err


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_closed_form_gradient_of_saturated_logits(backend: str) -> None:
    h, w, b, y = _data()
    z = (h @ w.T + b).float().double()

    def grad(dtype: Any) -> np.ndarray:
        x = z.to(dtype) if backend == "torch" else z.numpy().astype(str(dtype).split(".")[-1])
        t = y if backend == "torch" else y.numpy()
        _, g = ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, x, t, from_logits=True, softcap=1.0
        )
        return np.asarray(g.double() if backend == "torch" else g, dtype=np.float64)

    got, want = grad(torch.float32), grad(torch.float64)
    assert np.linalg.norm(got - want) < 2e-6 * np.linalg.norm(want)
