"""Probability inputs of exactly 0 and 1 with the focal factor: finite, exact gradients, no warning.

The reference is the derivative of the clamped focal term written out in
float64 Python (issue 11, item 1): at p = 1 the focal factor (1 - p)^γ and its
contribution to the gradient are exactly 0, for every γ > 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

torch = pytest.importorskip("torch")

PROBS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
LABELS = np.array([0, 0, 2])
GAMMAS = (0.5, 1.0, 2.0)


def _clamped_log(x: float) -> tuple[float, float]:
    """max(log x, -100) and its derivative (0 where the clamp is on)."""
    if x <= math.exp(-100.0):
        return -100.0, 0.0
    return math.log(x), 1.0 / x


def _times_pow(base: float, power: float, factor: float) -> float:
    """base**power * factor with the limit 0 where `factor` is 0 (0^(γ-1) · 0 = 0)."""
    return 0.0 if factor == 0 else base**power * factor


def _class_term_grad(p: float, c: float, gamma: float) -> tuple[float, float]:
    """c (1-p)^γ (-L(p)) and its derivative in p."""
    log_p, d_log_p = _clamped_log(p)
    value = -c * (1 - p) ** gamma * log_p
    grad = c * (gamma * _times_pow(1 - p, gamma - 1, log_p) - (1 - p) ** gamma * d_log_p)
    return value, grad


def _categorical_ref(x: np.ndarray, coef: np.ndarray, gamma: float) -> tuple[float, np.ndarray]:
    """Mean over rows of Σ_k c_k (1-p_k)^γ (-L(p_k)) and its gradient."""
    total, grad = 0.0, np.zeros_like(x)
    for i, j in np.ndindex(*x.shape):
        v, g = _class_term_grad(float(x[i, j]), float(coef[i, j]), gamma)
        total += v
        grad[i, j] = g / x.shape[0]
    return total / x.shape[0], grad


def _binary_ref(x: np.ndarray, t: np.ndarray, gamma: float) -> tuple[float, np.ndarray]:
    """Mean of -[t (1-p)^γ L(p) + (1-t) p^γ L(1-p)] and its gradient."""
    total, grad = 0.0, np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        p, pos = float(x[idx]), float(t[idx])
        v_pos, g_pos = _class_term_grad(p, pos, gamma)
        v_neg, g_neg = _class_term_grad(1 - p, 1 - pos, gamma)
        total += v_pos + v_neg
        grad[idx] = (g_pos - g_neg) / x.size
    return total / x.size, grad


def _smoothed(onehot: np.ndarray, eps: float) -> np.ndarray:
    return (1 - eps) * onehot + eps / onehot.shape[-1]


def _torch_grad(loss: Any, x: np.ndarray, target: Any, **options: Any) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss(xt, target, **options).backward()
    assert xt.grad is not None
    return xt.grad.numpy()


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sparse_and_categorical_probs_at_0_and_1(gamma: float, eps: float, xp: Any) -> None:
    coef = _smoothed(np.eye(3)[LABELS], eps)
    want_value, want_grad = _categorical_ref(PROBS, coef, gamma)
    conv = to_xp(xp)
    cases = [
        (ce.sparse_categorical_cross_entropy, conv(LABELS)),
        (ce.categorical_cross_entropy, conv(np.eye(3)[LABELS])),
    ]
    for loss, target in cases:
        value, grad = ce.value_and_grad(loss, conv(PROBS), target, gamma=gamma, label_smoothing=eps)
        np.testing.assert_allclose(float(to_numpy(value)), want_value, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=1e-12, atol=1e-300)
        forward = loss(conv(PROBS), target, gamma=gamma, label_smoothing=eps)
        np.testing.assert_allclose(float(to_numpy(forward)), want_value, rtol=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_autodiff_probs_at_0_and_1(gamma: float, eps: float) -> None:
    """The issue's example: torch autograd gave NaN at p = 1 (and -10 beside it with ε=0.1)."""
    _, want = _categorical_ref(PROBS, _smoothed(np.eye(3)[LABELS], eps), gamma)
    options = {"gamma": gamma, "label_smoothing": eps}
    sparse = _torch_grad(
        ce.sparse_categorical_cross_entropy, PROBS, torch.tensor(LABELS), **options
    )
    onehot = torch.tensor(np.eye(3)[LABELS])
    categorical = _torch_grad(ce.categorical_cross_entropy, PROBS, onehot, **options)
    np.testing.assert_allclose(sparse, want, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(categorical, want, rtol=1e-12, atol=1e-300)


def test_issue_example_exact() -> None:
    x = np.array([[1.0, 0.0]])
    y = torch.tensor([0])
    loss = ce.sparse_categorical_cross_entropy
    assert _torch_grad(loss, x, y, gamma=2.0).tolist() == [[0.0, 0.0]]
    assert _torch_grad(loss, x, y, gamma=2.0, label_smoothing=0.1).tolist() == [[0.0, -10.0]]


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_binary_probs_at_0_and_1(gamma: float, eps: float, xp: Any) -> None:
    """The focal factors are exactly 0 at p = 1 (resp. 0): no e^(-100γ) leftover."""
    x = np.array([1.0, 0.0, 1.0, 0.0, 0.3])
    t = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    want_value, want_grad = _binary_ref(x, t * (1 - eps) + eps / 2, gamma)
    conv = to_xp(xp)
    options = {"gamma": gamma, "label_smoothing": eps}
    value, grad = ce.value_and_grad(ce.binary_cross_entropy, conv(x), conv(t), **options)
    np.testing.assert_allclose(float(to_numpy(value)), want_value, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=1e-12, atol=1e-300)
    autodiff = _torch_grad(ce.binary_cross_entropy, x, torch.tensor(t), **options)
    np.testing.assert_allclose(autodiff, want_grad, rtol=1e-12, atol=1e-300)
