"""A bounded fuzz of `distillation_loss` on every backend against a float64 log-space reference.

Logits include ±1e4, -inf (a class one model or both rule out), subnormals and rows
of one class; β from 0 (forward KL) to 1 (reverse KL), temperatures, ignored rows,
every reduction, float32 and float64, NumPy, PyTorch, JAX and array-api-strict, the loss
and `value_and_grad` (and PyTorch's autograd). Every value must equal the reference
to the rounding of the dtype at the logits' size, +inf where the reference is
(mass on a class the other model rules out), NaN where it is NaN; every gradient
must be finite where the loss is, and equal the reference's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from tests.fuzz._settings import fuzz

FUZZ = fuzz(50)

INF = math.inf
LOGITS = [0.0, 1.0, -1.0, 3.5, 1e4, -1e4, 5e-324, -INF]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # rows of -inf only: NaN
        u = z - m
    return u - np.log(np.sum(np.exp(u), axis=-1, keepdims=True))


def _kl_terms(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """KL(a || b) of log-probabilities, summed from non-negative terms a(d + e^-d - 1), or
    a(d - 1) + b below d = -1 (e^-d would overflow); a = 0 gives b, mass on b = 0 gives +inf."""
    a, b = np.exp(la), np.exp(lb)
    with np.errstate(invalid="ignore", over="ignore"):
        d = la - lb
        term = np.where(d >= -1, a * (d + np.expm1(-d)), a * (d - 1) + b)
    term = np.where(la == -INF, b, term)
    term = np.where((lb == -INF) & (la > -INF), INF, term)
    return np.sum(term, axis=-1)


def reference(student: np.ndarray, teacher: np.ndarray, beta: float, temperature: float) -> Any:
    """Per-row float64 generalized JSD of the (already rounded) logits, in log space."""
    lq = _log_softmax(student / temperature)
    lp = _log_softmax(teacher / temperature)
    if beta == 0.0:
        return _kl_terms(lp, lq)
    if beta == 1.0:
        return _kl_terms(lq, lp)
    with np.errstate(divide="ignore"):
        lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
    return beta * _kl_terms(lp, lm) + (1 - beta) * _kl_terms(lq, lm)


def _convert(a: np.ndarray, backend: str, dtype: str, *, grad: bool = False) -> Any:
    if backend == "torch":
        import torch

        return torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=grad)
    if backend == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return xp.asarray(a, dtype=getattr(xp, dtype))
    if backend == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(a, dtype=getattr(jnp, dtype))
    return a.astype(dtype)


def _float64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().double().numpy()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a._array, dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 4))
    c = draw(st.integers(1, 5))
    logit = st.one_of(st.floats(-30, 30), st.sampled_from(LOGITS))
    s = np.array(draw(st.lists(logit, min_size=n * c, max_size=n * c))).reshape(n, c)
    t = np.array(draw(st.lists(logit, min_size=n * c, max_size=n * c))).reshape(n, c)
    s[:, 0] = np.where(s[:, 0] == -INF, 0.0, s[:, 0])  # no row of -inf only
    t[:, 0] = np.where(t[:, 0] == -INF, 0.0, t[:, 0])
    if n and draw(st.booleans()):  # a close pair of rows
        t[0] = s[0] + draw(st.sampled_from([1e-6, 1e-3])) * np.arange(c)
    dtype = draw(st.sampled_from(["float64", "float32"]))
    s, t = s.astype(dtype).astype(np.float64), t.astype(dtype).astype(np.float64)
    target = None
    if draw(st.booleans()):
        target = np.array(draw(st.lists(st.sampled_from([0, 1, -100]), min_size=n, max_size=n)))
    return {
        "student": s,
        "teacher": t,
        "beta": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "temperature": draw(st.sampled_from([1.0, 2.0, 0.5])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "target": target,
        "dtype": dtype,
        "backend": draw(st.sampled_from(["numpy", "torch", "array_api_strict", "jax"])),
        "autograd": draw(st.booleans()),
    }


@FUZZ
@given(call=calls())
def test_distillation_loss_matches_the_log_space_reference(call: dict[str, Any]) -> None:
    s, t, beta, temp = call["student"], call["teacher"], call["beta"], call["temperature"]
    backend, dtype, reduction = call["backend"], call["dtype"], call["reduction"]
    rows = reference(s, t, beta, temp)
    counted = np.ones(rows.shape, dtype=bool)
    opts: dict[str, Any] = {"beta": beta, "temperature": temp, "reduction": reduction}
    if call["target"] is not None:
        counted = call["target"] != -100
        opts["target"] = _convert(call["target"], backend, "int64")
    rows = np.where(counted, rows, 0.0)
    want = rows if reduction == "none" else np.sum(rows)
    if reduction == "mean":
        want = want / counted.sum() if counted.sum() else 0.0
    finite = s[np.isfinite(s)]
    size = max(float(np.abs(finite).max()) if finite.size else 0.0, 1.0) / temp
    # the logits' rounding at their size moves each log-probability by about that much
    tol = 64 * float(np.finfo(dtype).eps) * size
    x, y = _convert(s, backend, dtype), _convert(t, backend, dtype)
    got = _float64(ce.distillation_loss(x, y, **opts))
    np.testing.assert_allclose(
        got, want, rtol=tol, atol=tol * 1e-3, equal_nan=True, err_msg=str(call)
    )
    value, grad = ce.value_and_grad(ce.distillation_loss, x, y, **opts)
    np.testing.assert_allclose(_float64(value), got, rtol=tol, atol=tol * 1e-3, equal_nan=True)
    g = _float64(grad)
    assert g.shape == s.shape
    live = counted & np.isfinite(reference(s, t, beta, temp))
    assert np.isfinite(g[live]).all(), (call, g)
    assert (g[~counted] == 0).all(), (call, g)
    if backend == "torch" and call["autograd"]:
        xs = _convert(s, backend, dtype, grad=True)
        (g2,) = __import__("torch").autograd.grad(ce.distillation_loss(xs, y, **opts).sum(), xs)
        np.testing.assert_allclose(_float64(g2), g, rtol=tol, atol=tol * 1e-3, equal_nan=True)
