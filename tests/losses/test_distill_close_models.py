"""Close student and teacher at a temperature that is not a power of two, against mpmath.

``distillation_loss`` and ``linear_distillation_loss`` keep a few ulps however close the two
models are. At T = 1 or 2 they did; at T = 3, 0.7, 1.3 or 4.816 the logits were divided by T
one model at a time, each quotient rounded at its size (:math:`\\epsilon|s/T|`) against a
difference of 1e-5: float32 losses were 2e-2 to 5e-2 off and gradients 3e-2 to 4e-2 of
their norm, on every path (float64 rows 1e-11 apart: 5e-5; two float32 classes a few ulps
apart at T = 4.816: a loss 2.6 times the exact one).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

TEMPERATURES = [3.0, 0.7, 1.3, 4.816]
BETAS = [0.0, 0.5, 1.0]


def _mp_row(s: np.ndarray, t: np.ndarray, beta: float, temperature: float) -> tuple[Any, Any]:
    """One row's loss and gradient for the student's logits, at 50 digits from the exact
    values of the float inputs (classes of -inf in both rows skipped: they add nothing).

    The gradient is the closed form :math:`c_\\beta Q_k (r_k - \\mathrm{KL}(Q\\|M)) / T`,
    :math:`r = \\log Q - \\log M` (:math:`(Q - P)/T` at :math:`\\beta = 0`), which
    tests/losses/test_distill.py holds to finite differences.
    """
    import mpmath

    with mpmath.workdps(50):
        keep = ~((s == -np.inf) & (t == -np.inf))
        inv_t = 1 / mpmath.mpf(temperature)

        def log_softmax(z: np.ndarray) -> list[Any]:
            x = [mpmath.mpf(float(v)) * inv_t for v in z[keep]]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in x))
            return [v - lse for v in x]

        log_p, log_q = log_softmax(t), log_softmax(s)
        p, q = [mpmath.exp(v) for v in log_p], [mpmath.exp(v) for v in log_q]
        if beta == 0.0:
            loss = mpmath.fsum(a * (x - y) for a, x, y in zip(p, log_p, log_q, strict=True))
            grad = [(b - a) * inv_t for a, b in zip(p, q, strict=True)]
        else:
            b = mpmath.mpf(beta)
            log_m = (
                log_p
                if beta == 1.0
                else [mpmath.log(b * x + (1 - b) * y) for x, y in zip(p, q, strict=True)]
            )
            r = [x - y for x, y in zip(log_q, log_m, strict=True)]
            kl_q = mpmath.fsum(a * x for a, x in zip(q, r, strict=True))
            kl_p = mpmath.fsum(a * (x - y) for a, x, y in zip(p, log_p, log_m, strict=True))
            loss = kl_q if beta == 1.0 else b * kl_p + (1 - b) * kl_q
            c = 1 if beta == 1.0 else 1 - b
            grad = [c * a * (x - kl_q) * inv_t for a, x in zip(q, r, strict=True)]
        full = np.zeros(s.shape)
        full[keep] = [float(v) for v in grad]
        return float(loss), full


@functools.cache
def _case(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Student and teacher logits (float32 or float64 values, as float64 arrays) and their
    dtype: rows 1e-5 apart (float32), shifted by a constant (logits are defined up to one)
    with a class both models rule out, and float64 rows 1e-11 apart."""
    rng = np.random.default_rng(11)
    s = rng.normal(size=(4, 8)) * 3
    if name == "float32, 1e-5 apart":
        t, dtype = s + 1e-5 * rng.normal(size=s.shape), "float32"
    elif name.startswith("float32, 1e-4 apart, shifted"):
        t, dtype = s + 7.0 + 1e-4 * rng.normal(size=s.shape), "float32"
        if name.endswith("masked"):
            s[:, 2] = t[:, 2] = -np.inf
    else:
        t, dtype = s + 1e-11 * rng.normal(size=s.shape), "float64"
    return s.astype(dtype).astype(np.float64), t.astype(dtype).astype(np.float64), dtype


@functools.cache
def _reference(name: str, beta: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    s, t, _ = _case(name)
    rows = [_mp_row(a, b, beta, temperature) for a, b in zip(s, t, strict=True)]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


CASES = ["float32, 1e-5 apart", "float32, 1e-4 apart, shifted, masked", "float64, 1e-11 apart"]
FUSED_CASES = ["float32, 1e-5 apart", "float32, 1e-4 apart, shifted", "float64, 1e-11 apart"]
"""(-inf in a hidden state is NaN through the product)"""


def _check(name: str, rows: Any, grad: Any, want: np.ndarray, want_grad: np.ndarray) -> None:
    """Each row's loss to `tol` relative, each row's gradient to `tol` of its norm."""
    tol = 1e-5 if _case(name)[2] == "float32" else 1e-12
    if rows is not None:
        got = to_numpy(rows).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=tol, atol=0.0)
    if grad is not None:
        g = to_numpy(grad).astype(np.float64)
        err = np.linalg.norm(g - want_grad, axis=-1) / np.linalg.norm(want_grad, axis=-1)
        assert err.max() < tol, err.max()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_close_models_at_an_inexact_temperature_keep_a_few_ulps(
    xp: Any, name: str, temperature: float, beta: float
) -> None:
    """The loss, ``value_and_grad``'s closed form and autodiff (PyTorch's autograd,
    ``jax.grad``) on every backend, row by row against mpmath."""
    s, t, dtype = _case(name)
    want, want_grad = _reference(name, beta, temperature)
    conv = to_xp(xp)
    s_x, t_x = conv(s.astype(dtype)), conv(t.astype(dtype))
    opts = {"beta": beta, "temperature": temperature}
    rows = ce.distillation_loss(s_x, t_x, reduction="none", **opts)
    _check(name, rows, None, want, want_grad)
    value, grad = ce.value_and_grad(ce.distillation_loss, s_x, t_x, reduction="sum", **opts)
    np.testing.assert_allclose(float(value), want.sum(), rtol=1e-5 if dtype == "float32" else 1e-12)
    _check(name, None, grad, want, want_grad)
    if xp.__name__.endswith("torch"):
        import torch

        x = torch.tensor(s.astype(dtype), requires_grad=True)
        out = ce.distillation_loss(x, torch.tensor(t.astype(dtype)), reduction="none", **opts)
        out.sum().backward()
        _check(name, out.detach(), x.grad, want, want_grad)
    if xp.__name__.startswith("jax"):
        import jax

        fn = lambda a: ce.distillation_loss(a, t_x, reduction="sum", **opts)  # noqa: E731
        _check(name, None, jax.grad(fn)(s_x), want, want_grad)


@pytest.mark.parametrize("name", FUSED_CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_fused_close_models_at_an_inexact_temperature_keep_a_few_ulps(
    name: str, temperature: float, beta: float
) -> None:
    """``linear_distillation_loss`` (identity heads: its logits are the hidden states), the
    rows and the student's gradient, in more than one chunk."""
    torch = pytest.importorskip("torch")
    from crossent.fused import linear_distillation_loss

    s, t, dtype = _case(name)
    want, want_grad = _reference(name, beta, temperature)
    dt = getattr(torch, dtype)
    h = torch.tensor(s, dtype=dt, requires_grad=True)
    eye = torch.eye(s.shape[1], dtype=dt)
    rows = linear_distillation_loss(
        h, eye, torch.tensor(t, dtype=dt), eye, beta=beta, temperature=temperature,
        reduction="none", chunk_size=2,
    )  # fmt: skip
    rows.sum().backward()
    _check(name, rows.detach(), h.grad, want, want_grad)


@pytest.mark.parametrize("beta", BETAS)
def test_two_classes_a_few_ulps_apart(beta: float) -> None:
    """Two float32 classes a few ulps apart at T = 4.816, where the loss was 2.6 times the exact
    one and the gradient 60 % off (NumPy, PyTorch's autograd, the fused loss)."""
    torch = pytest.importorskip("torch")
    from crossent.fused import linear_distillation_loss

    s = np.array([[1.5, -0.25]], dtype=np.float32)
    t = np.array([[np.nextafter(np.nextafter(s[0, 0], 9), 9), np.nextafter(s[0, 1], -9)]])
    t = t.astype(np.float32)
    want, want_grad = _mp_row(s[0], t[0], beta, 4.816)
    opts = {"beta": beta, "temperature": 4.816, "reduction": "sum"}
    value, grad = ce.value_and_grad(ce.distillation_loss, s, t, **opts)
    x = torch.tensor(s, requires_grad=True)
    auto = ce.distillation_loss(x, torch.tensor(t), **opts)
    auto.backward()
    h = torch.tensor(s, requires_grad=True)
    fused = linear_distillation_loss(h, torch.eye(2), torch.tensor(t), torch.eye(2), **opts)
    fused.backward()
    for path, v, g in [
        ("numpy", value, grad),
        ("autograd", auto.detach(), x.grad),
        ("fused", fused.detach(), h.grad),
    ]:
        np.testing.assert_allclose(float(v), want, rtol=1e-5, err_msg=path)
        err = np.linalg.norm(to_numpy(g)[0] - want_grad) / np.linalg.norm(want_grad)
        assert err < 1e-5, (path, err)
