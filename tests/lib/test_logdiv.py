"""crossent._lib._logdiv: the in-place PyTorch path equals the array-API path and float64 references."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from tests._reference import info as info_ref
from tests._reference.distill import distill_grad_ref, distill_rows_ref

torch = pytest.importorskip("torch")

from crossent._lib._logdiv import (  # noqa: E402
    _jsd_generic,
    _jsd_torch,
    generalized_jsd_from_log,
    jsd_and_grad_from_log,
)
from crossent._lib._xp import array_namespace  # noqa: E402

BETAS = (0.0, 0.3, 0.5, 1.0)
INF = math.inf


def _edge_rows() -> tuple[np.ndarray, np.ndarray]:
    """(student, teacher) logits, one case per row: the ways the terms can go wrong."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(10, 7)) * 3
    t = rng.normal(size=(10, 7)) * 3
    s[1, 2] = t[1, 2] = -INF  # a class masked in both models
    s[2, 4] = -INF  # the student rules out a class the teacher allows
    t[3, 5] = -INF  # the teacher rules out a class the student allows
    s[4, 0], t[4, 6] = 1000.0, 1000.0  # huge gaps: probabilities underflow, logs do not
    s[5, 3], t[5, 3] = -200.0, 150.0
    t[6] = s[6]  # equal models: divergence 0
    t[7] = s[7] + 1e-4 * rng.normal(size=7)  # nearly equal
    s[8, 1] = np.nan  # NaN propagates to its row
    s[9, 1], t[9, 1] = -INF, -800.0  # ruled out where the other's mass underflowed: still +inf
    return s, t


def _logs(dtype: Any) -> tuple[Any, Any]:
    s, t = _edge_rows()
    log_q = torch.log_softmax(torch.tensor(s, dtype=dtype), dim=-1)
    log_p = torch.log_softmax(torch.tensor(t, dtype=dtype), dim=-1)
    return log_p, log_q


def _assert_same(got: Any, want: Any, *, rtol: float, atol: float) -> None:
    got, want = got.double().numpy(), want.double().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_place_path_equals_the_array_api_path(beta: float, dtype: str) -> None:
    dt = getattr(torch, dtype)
    log_p, log_q = _logs(dt)
    xp = array_namespace(log_p)
    want_loss, want_grad = _jsd_generic(log_p, log_q, beta=beta, axis=-1, grad=True, xp=xp)
    got_loss, got_grad = _jsd_torch(log_p, log_q, beta=beta, axis=-1, grad=True)
    # float32: the log-probabilities of the rows with logits near 1000 are off by an ulp of
    # 1000 (6e-5), and the two paths round that differently; the rest agrees to a few ulps
    tol = {"rtol": 2e-5, "atol": 1e-4} if dt == torch.float32 else {"rtol": 1e-13, "atol": 1e-12}
    _assert_same(got_loss, want_loss, **tol)
    _assert_same(got_grad, want_grad, **tol)
    # the inputs are untouched without `work`
    torch.testing.assert_close((log_p, log_q), _logs(dt), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_values_and_gradients_match_the_float64_reference(beta: float) -> None:
    s, t = _edge_rows()
    log_p, log_q = _logs(torch.float64)
    loss, grad = jsd_and_grad_from_log(log_p, log_q, beta=beta, xp=array_namespace(log_p))
    with np.errstate(all="ignore"):  # the masked, NaN and underflowed rows
        want = distill_rows_ref(s, t, beta=beta)
        want_grad = distill_grad_ref(s, t, beta=beta)
    ok = np.isfinite(want)
    ok[8] = ok[9] = False  # the reference drops NaN mass and underflowed mass
    np.testing.assert_allclose(loss.numpy()[ok], want[ok], rtol=1e-12, atol=1e-15)
    # +inf only where the truth is (mass on a class the other model rules out), NaN row NaN
    inf_rows = {0.0: [2, 9], 1.0: [3]}.get(beta, [])
    np.testing.assert_array_equal(np.flatnonzero(np.isposinf(loss.numpy())), inf_rows)
    assert np.isnan(loss.numpy()[8])
    if beta in (0.0, 0.5):  # the underflowed rows against log-space references
        fn = (
            info_ref.kl_divergence_from_logits
            if beta == 0.0
            else info_ref.js_divergence_from_logits
        )
        np.testing.assert_allclose(loss.numpy()[4:6], fn(t[4:6], s[4:6]), rtol=1e-12)
    rows = np.isfinite(want_grad).all(axis=1) & ok
    np.testing.assert_allclose(grad.numpy()[rows], want_grad[rows], rtol=1e-10, atol=1e-15)
    # finite gradient wherever the value is finite (the underflowed rows included)
    assert np.isfinite(grad.numpy()[np.isfinite(loss.numpy())]).all()


@pytest.mark.parametrize("beta", BETAS)
def test_work_space_returns_the_gradient_in_log_q_with_a_per_row_scale(beta: float) -> None:
    log_p, log_q = _logs(torch.float32)
    xp = array_namespace(log_p)
    scale = torch.linspace(0.5, 2.0, log_p.shape[0])
    want_loss, want_grad = jsd_and_grad_from_log(log_p, log_q, beta=beta, xp=xp, scale=scale)
    p_work, q_work = log_p.clone(), log_q.clone()
    work = torch.full((4, *log_p.shape), 7.0)  # stale values must not leak in
    loss, grad = jsd_and_grad_from_log(p_work, q_work, beta=beta, xp=xp, scale=scale, work=work)
    assert grad.data_ptr() == q_work.data_ptr()
    torch.testing.assert_close(loss, want_loss, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, equal_nan=True, rtol=0, atol=0)
    _, unit = jsd_and_grad_from_log(log_p, log_q, beta=beta, xp=xp)
    torch.testing.assert_close(grad, unit * scale[:, None], equal_nan=True, rtol=1e-6, atol=0)
    for space in (None, work.fill_(7.0)):
        loss_only = generalized_jsd_from_log(
            log_p.clone(), log_q.clone(), beta=beta, axis=-1, xp=xp, work=space
        )
        torch.testing.assert_close(loss_only, want_loss, equal_nan=True, rtol=0, atol=0)


def test_tracked_tensors_take_the_differentiable_path() -> None:
    """Under autograd the array-API path runs; its gradient equals the closed form."""
    log_p, log_q = _logs(torch.float64)
    z = torch.tensor(_edge_rows()[0][:8], requires_grad=True)  # no NaN row
    log_q = torch.log_softmax(z, dim=-1)
    xp = array_namespace(log_q)
    loss = generalized_jsd_from_log(log_p[:8], log_q, beta=0.5, axis=-1, xp=xp)
    assert loss.requires_grad
    loss.sum().backward()
    _, closed = jsd_and_grad_from_log(log_p[:8], log_q.detach(), beta=0.5, xp=xp)
    assert z.grad is not None
    torch.testing.assert_close(z.grad, closed, rtol=1e-12, atol=1e-15)
