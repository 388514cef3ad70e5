"""distillation_loss (every backend) and its closed form in value_and_grad, against float64 references."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from tests._reference.distill import (
    distill_grad_ref,
    distill_rows_close_ref,
    distill_rows_ref,
    kl_ref,
)
from tests.conftest import to_numpy, to_xp


def _logits(shape: tuple[int, ...], *, seed: int = 0, scale: float = 2.0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * scale, rng.normal(size=shape) * scale


def _reduce(rows: np.ndarray, counted: np.ndarray, reduction: str) -> np.ndarray:
    rows = np.where(counted, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return np.asarray(total)
    n = counted.sum()
    return np.asarray(total / n if n else 0.0)


@pytest.mark.parametrize(
    ("beta", "temperature", "reduction"),
    list(itertools.product([0.0, 0.3, 0.5, 1.0], [1.0, 2.5], ["mean", "sum", "none"])),
)
def test_value_and_grad_match_float64_reference(
    xp: Any, beta: float, temperature: float, reduction: str
) -> None:
    s, t = _logits((7, 11))
    target = np.arange(7)
    target[[1, 4]] = -100
    counted = target != -100
    conv = to_xp(xp)
    opts = {"beta": beta, "temperature": temperature, "reduction": reduction}
    got = ce.distillation_loss(conv(s), conv(t), target=conv(target), **opts)
    value, grad = ce.value_and_grad(
        ce.distillation_loss, conv(s), conv(t), target=conv(target), **opts
    )
    rows = distill_rows_ref(s, t, beta=beta, temperature=temperature)
    want = _reduce(rows, counted, reduction)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(value), want, rtol=1e-12, atol=1e-14)
    g_rows = distill_grad_ref(s, t, beta=beta, temperature=temperature) * counted[:, None]
    if reduction == "mean":
        g_rows = g_rows / counted.sum()
    np.testing.assert_allclose(to_numpy(grad), g_rows, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_ends_are_exactly_the_kl_divergences(xp: Any, beta: float) -> None:
    """β = 0: KL(teacher||student); β = 1: KL(student||teacher), per row, to float64 rounding."""
    s, t = _logits((5, 9), seed=3)
    conv = to_xp(xp)
    got = to_numpy(ce.distillation_loss(conv(s), conv(t), beta=beta, reduction="none"))
    p = np.exp(t - np.log(np.exp(t).sum(-1, keepdims=True)))
    q = np.exp(s - np.log(np.exp(s).sum(-1, keepdims=True)))
    want = [kl_ref(p[i], q[i]) if beta == 0 else kl_ref(q[i], p[i]) for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_kl_ends_match_torch_kl_div() -> None:
    torch = pytest.importorskip("torch")
    s, t = (torch.from_numpy(a) for a in _logits((6, 13), seed=5))
    log_q, log_p = torch.log_softmax(s / 1.5, -1), torch.log_softmax(t / 1.5, -1)
    forward = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    reverse = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    torch.testing.assert_close(ce.distillation_loss(s, t, beta=0.0, temperature=1.5), forward)
    torch.testing.assert_close(ce.distillation_loss(s, t, beta=1.0, temperature=1.5), reverse)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_grad_reference_agrees_with_finite_differences(beta: float) -> None:
    s, t = _logits((1, 6), seed=7)
    g = distill_grad_ref(s, t, beta=beta, temperature=1.3)[0]
    h = 1e-6
    fd = []
    for k in range(6):
        e = np.zeros_like(s)
        e[0, k] = h
        up = distill_rows_ref(s + e, t, beta=beta, temperature=1.3)[0]
        down = distill_rows_ref(s - e, t, beta=beta, temperature=1.3)[0]
        fd.append((up - down) / (2 * h))
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_torch_autograd_gives_the_closed_form_and_no_teacher_gradient() -> None:
    torch = pytest.importorskip("torch")
    s_np, t_np = _logits((4, 3, 5), seed=11)
    s = torch.from_numpy(s_np).requires_grad_()
    t = torch.from_numpy(t_np).requires_grad_()
    loss = ce.distillation_loss(s, t, beta=0.3, temperature=0.7, axis=1)
    loss.backward()
    assert t.grad is None
    _, grad = ce.value_and_grad(
        "distillation_loss", s.detach(), t.detach(), beta=0.3, temperature=0.7, axis=1
    )
    torch.testing.assert_close(s.grad, grad, rtol=1e-10, atol=1e-13)
    rows = distill_rows_ref(
        np.moveaxis(s_np, 1, -1), np.moveaxis(t_np, 1, -1), beta=0.3, temperature=0.7
    )
    np.testing.assert_allclose(loss.item(), rows.mean(), rtol=1e-12)


def test_jax_teacher_gets_no_gradient() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    s, t = (jnp.asarray(a) for a in _logits((3, 4), seed=2))
    g_teacher = jax.grad(lambda tt: ce.distillation_loss(s, tt, beta=0.5))(t)
    assert float(jnp.abs(g_teacher).max()) == 0.0


def test_masked_classes_peaked_rows_and_all_ignored() -> None:
    """−inf logits in both models, a 1e4 spike, an all-ignored batch: finite, exact limits."""
    s = np.array([[0.0, 1.0, -np.inf], [1e4, 0.0, 0.0]])
    t = np.array([[0.5, -1.0, -np.inf], [1e4, 0.0, 1.0]])
    for beta in (0.0, 0.5, 1.0):
        value, grad = ce.value_and_grad(ce.distillation_loss, s, t, beta=beta, reduction="none")
        assert np.isfinite(value).all()
        assert np.isfinite(grad).all()
        assert grad[0, 2] == 0.0
        finite = np.array([[0.0, 1.0], [1e4, 0.0]]), np.array([[0.5, -1.0], [1e4, 0.0]])
        want = distill_rows_ref(finite[0][:1], finite[1][:1], beta=beta)
        np.testing.assert_allclose(value[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(value[1], 0.0, atol=1e-300)  # both rows put all mass on 0
    target = np.array([-100, -100])
    value, grad = ce.value_and_grad(ce.distillation_loss, s, t, target=target)
    assert value == 0.0
    assert not grad.any()


def test_forward_kl_with_a_masked_student_class_has_the_limit_gradient_on_every_path() -> None:
    """The student rules out (−inf) a class the teacher gives mass: the forward KL (β = 0) is
    +inf and its gradient is the limit Q − P, as ``value_and_grad`` and PyTorch's
    ``kl_div`` give. Torch autograd and ``jax.grad`` gave about 0 for the row (the +inf term
    was a constant); the other rows are unchanged."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    s = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, -0.3]])
    t = np.array([[0.0, 1.0, 1.0], [0.1, 0.2, 0.3]])
    q, p = (np.exp(a - a.max(1, keepdims=True)) for a in (s, t))
    want = q / q.sum(1, keepdims=True) - p / p.sum(1, keepdims=True)
    value, grad = ce.value_and_grad(ce.distillation_loss, s, t, beta=0.0, reduction="sum")
    assert value == np.inf
    np.testing.assert_allclose(grad, want, rtol=1e-12)
    s_t = torch.tensor(s, requires_grad=True)
    ce.distillation_loss(s_t, torch.tensor(t), beta=0.0, reduction="sum").backward()
    np.testing.assert_allclose(s_t.grad.numpy(), want, rtol=1e-12)
    t_j = jax.numpy.asarray(t)
    g_j = jax.grad(lambda x: ce.distillation_loss(x, t_j, beta=0.0, reduction="sum"))(s)
    np.testing.assert_allclose(np.asarray(g_j), want, rtol=1e-12)
    # crossent.info.kl_divergence(P, Q) from logits: the gradients of PyTorch's kl_div
    p_t, q_t = torch.tensor(t, requires_grad=True), torch.tensor(s, requires_grad=True)
    ce.info.kl_divergence(p_t, q_t, from_logits=True).sum().backward()
    p_r, q_r = torch.tensor(t, requires_grad=True), torch.tensor(s, requires_grad=True)
    torch.nn.functional.kl_div(
        torch.log_softmax(q_r, -1), torch.log_softmax(p_r, -1), log_target=True, reduction="sum"
    ).backward()
    torch.testing.assert_close(q_t.grad, q_r.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(p_t.grad, p_r.grad, rtol=1e-12, atol=1e-15, equal_nan=True)


def test_nan_propagates() -> None:
    s, t = _logits((3, 4))
    s[1, 2] = np.nan
    with np.errstate(invalid="ignore"):  # NumPy warns on NaN in logaddexp
        out = ce.distillation_loss(s, t, reduction="none")
    assert np.isnan(out[1])
    assert np.isfinite(out[[0, 2]]).all()


def test_low_precision_computes_in_float32() -> None:
    torch = pytest.importorskip("torch")
    s, t = (torch.from_numpy(a) for a in _logits((8, 50), seed=4))
    want = ce.distillation_loss(s, t, beta=0.2)
    got = ce.distillation_loss(s.bfloat16(), t.bfloat16(), beta=0.2)
    assert got.dtype == torch.bfloat16
    exact_bf16_inputs = ce.distillation_loss(s.bfloat16().double(), t.bfloat16().double(), beta=0.2)
    torch.testing.assert_close(got.double(), exact_bf16_inputs, rtol=8e-3, atol=1e-4)
    assert abs(float(got) - float(want)) < 0.05


def test_autocast_returns_float32_as_every_loss() -> None:
    """Under torch.autocast half-precision logits give a float32 loss (API.md section 2);
    it returned bfloat16 (3 significant digits of the float32 value)."""
    torch = pytest.importorskip("torch")
    s, t = (torch.from_numpy(a).bfloat16() for a in _logits((8, 50), seed=4))
    want = ce.distillation_loss(s.float(), t.float(), beta=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ce.distillation_loss(s, t, beta=0.2)
        value, grad = ce.value_and_grad(ce.distillation_loss, s, t, beta=0.2)
    assert got.dtype == value.dtype == torch.float32
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(value, want, rtol=1e-6, atol=0.0)


@given(
    beta=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 1000),
)
def test_laws_nonnegative_zero_on_equal_and_symmetric_at_half(
    beta: float, temperature: float, seed: int
) -> None:
    s, t = _logits((3, 6), seed=seed)
    loss = ce.distillation_loss(s, t, beta=beta, temperature=temperature, reduction="none")
    assert (loss >= -1e-15).all()
    same = ce.distillation_loss(s, s, beta=beta, temperature=temperature, reduction="none")
    np.testing.assert_allclose(same, 0.0, atol=1e-14)
    a = ce.distillation_loss(s, t, beta=0.5, temperature=temperature, reduction="none")
    b = ce.distillation_loss(t, s, beta=0.5, temperature=temperature, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_bad_input_messages() -> None:
    s, t = _logits((3, 4))
    bad: Any = ce.distillation_loss
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: bad(s, t, beta=-0.1), ValueError, "`beta`"),
        (lambda: bad(s, t, beta=1.5), ValueError, "`beta`"),
        (lambda: bad(s, t, beta="0.5"), TypeError, "`beta`"),
        (lambda: bad(s, t, temperature=0.0), ValueError, "`temperature`"),
        (lambda: bad(s, t, temperature=-2.0), ValueError, "`temperature`"),
        (lambda: bad(s, t, temperature=None), TypeError, "`temperature`"),
        (lambda: bad(s, t[:, :3]), ValueError, "teacher_logits"),
        (lambda: bad(s.astype(int), t), TypeError, "`student_logits`"),
        (lambda: bad(s, t, target=np.zeros(2, dtype=int)), ValueError, "`target`"),
        (lambda: bad(s, t, target=np.zeros(3)), TypeError, "`target`"),
        (lambda: bad(s, t, reduction="avg"), ValueError, "`reduction`"),
        (lambda: bad(s, t, axis=3), ValueError, "`axis`"),
        # None, Python scalars, lists and another library's target: a TypeError naming
        # the argument (they raised AttributeError or NumPy's dtype TypeError before)
        (lambda: bad(None, t), TypeError, "`student_logits`"),
        (lambda: bad(s, 1.0), TypeError, "`teacher_logits`"),
        (lambda: bad(s.tolist(), t), TypeError, "`student_logits`"),
        (lambda: bad(s, t, target=[0, 1, 2]), TypeError, "`target`"),
        # a Python number as `target` (it raised AttributeError: 'int' object has no
        # attribute 'dtype')
        (lambda: bad(s, t, target=3), TypeError, "`target` must be an array"),
        (lambda: bad(s, t, target=-100.0), TypeError, "`target` must be an array"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


def test_value_and_grad_with_default_options() -> None:
    s, t = _logits((4, 6), seed=9)
    value, grad = ce.value_and_grad("distillation_loss", s, t)
    np.testing.assert_allclose(value, distill_rows_ref(s, t, beta=0.5).mean(), rtol=1e-12)
    np.testing.assert_allclose(grad, distill_grad_ref(s, t, beta=0.5) / 4, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_nearly_equal_models_keep_their_small_divergence_in_float32(xp: Any, beta: float) -> None:
    # Summed as Σ p (log p - log m), the float32 rounding of the log-probabilities is as large
    # as the divergence itself (off by up to 4x, even negative); the non-negative terms
    # a (d + expm1(-d)) shared with crossent.info keep it to a relative 1e-4.
    rng = np.random.default_rng(3)
    t = (rng.normal(size=(16, 1000)) * 3).astype(np.float32)
    s = (t + rng.normal(size=t.shape) * 1e-3).astype(np.float32)
    got = to_numpy(ce.distillation_loss(to_xp(xp)(s), to_xp(xp)(t), beta=beta, reduction="none"))
    want = distill_rows_ref(s, t, beta=beta)
    assert got.dtype == np.float32
    assert np.all(got >= 0)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_target_from_another_library_is_named() -> None:
    """A torch `target` beside NumPy logits: TypeError naming `target`, not NumPy's dtype error."""
    torch = pytest.importorskip("torch")
    s, t = _logits((3, 4))
    with pytest.raises(TypeError, match="`target`"):
        ce.distillation_loss(s, t, target=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_float32_gradient_of_a_peaked_student_far_from_the_teacher(xp: Any, beta: float) -> None:
    """value_and_grad in float32 of a peaked student (one class near probability 1) far from
    the teacher: the gradient r - KL cancelled at the dominant class (a difference of two
    numbers of the size of the KL), so float32 gradients were off by up to 5e2 times the row's
    norm (NumPy, beta=1; 8e2 at beta=0.5). Formed from r - r_* (r at the student's most
    probable class), each row is within float32 rounding of the float64 formula."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 300)) * 2
    s[:, 0] += [8.0, 12.0, 16.0, 20.0]
    t = rng.normal(size=(4, 300)) * 2
    conv = to_xp(xp)
    _, got = ce.value_and_grad(
        ce.distillation_loss,
        conv(s.astype(np.float32)),
        conv(t.astype(np.float32)),
        beta=beta,
        reduction="sum",
    )
    s32, t32 = s.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)
    _, want = ce.value_and_grad(ce.distillation_loss, s32, t32, beta=beta, reduction="sum")
    err = np.linalg.norm(to_numpy(got) - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < 2e-5, err


def test_a_temperature_whose_reciprocal_overflows_the_compute_dtype_is_refused() -> None:
    """temperature = 1e-40 with float32 logits: 1 / T overflows float32 and every loss,
    log-probability and gradient was NaN (distillation_loss on every backend,
    value_and_grad, linear_log_probs, linear_distillation_loss), where float64 gives the
    finite one-hot answer. Now a ValueError naming `temperature`; float64 computes it."""
    import torch

    from crossent.fused import linear_distillation_loss, linear_log_probs

    x = np.array([[1.0, 2.0, -1.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    xt, eye, y = torch.tensor(x), torch.eye(3), torch.tensor([1, 0])
    calls = [
        lambda: ce.distillation_loss(x, x[::-1].copy(), temperature=1e-40),
        lambda: ce.distillation_loss(xt, xt.flip(0), temperature=1e-40),
        lambda: ce.value_and_grad("distillation_loss", x, x[::-1].copy(), temperature=1e-40),
        lambda: linear_log_probs(xt, eye, y, temperature=1e-40),
        lambda: linear_distillation_loss(xt, eye, xt.flip(0), eye, temperature=1e-40),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"`temperature` must be at least .*float64"):
            call()
    # float64 holds 1 / 1e-40: the softmax is the argmax one-hot (a tie splits it)
    lp = linear_log_probs(xt.double(), eye.double(), y, temperature=1e-40)
    np.testing.assert_allclose(lp.numpy(), [0.0, -np.log(2.0)], rtol=1e-15)
    # 1 / T finite in float32, logits / T too: computed
    ok = ce.distillation_loss(xt, xt.flip(0), temperature=1e-38, reduction="none")
    assert torch.isfinite(ok).all()


def _reverse_kl_limit(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d KL(Q||P) / d s as the teacher's zeros P_k = e^c vanish (c -> -inf), in float64."""
    q = np.exp(s - s.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    off = (t == -np.inf) & (q > 0)
    inside = ((q > 0) & ~off).any(1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_q = np.where(q > 0, np.log(q), 0.0)
    finite = q * (log_q - (q * log_q).sum(1, keepdims=True))  # disjoint supports: c cancels
    signed = np.where(off, np.inf, np.where(q > 0, -np.inf, 0.0))
    return np.where(inside & off.any(1, keepdims=True), signed, finite)


def test_infinite_reverse_kl_has_the_limit_gradient_not_nan(xp: Any) -> None:
    """β = 1 and the student gives mass to a class the teacher rules out (−inf): the loss is
    +inf and its gradient the limit as that teacher probability vanishes: +inf on the class,
    −inf on the student's other classes, 0 where the student is −inf; with disjoint supports
    the finite limit. The closed form gave NaN for the whole row (∞ − ∞ in r − KL)."""
    s = np.array([[0.0, 1.0, 2.0, -np.inf], [0.0, -np.inf, 1.0, 0.5], [0.5, 1.0, -1.0, 0.0]])
    t = np.array([[0.0, 1.0, -np.inf, 0.0], [-np.inf, 0.0, -np.inf, -np.inf], [0.1, 0.2, 0.3, 0.4]])
    want = _reverse_kl_limit(s, t)
    want[2] = distill_grad_ref(s[2:], t[2:], beta=1.0)[0]
    value, grad = ce.value_and_grad(
        ce.distillation_loss, to_xp(xp)(s), to_xp(xp)(t), beta=1.0, reduction="none"
    )
    value, grad = to_numpy(value), to_numpy(grad)
    assert value[0] == value[1] == np.inf
    assert not np.isnan(grad).any()
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-15)
    if xp == "torch":  # PyTorch's eager autograd: the same closed form (it gave NaN there)
        import torch

        x = torch.tensor(s, requires_grad=True)
        ce.distillation_loss(x, torch.tensor(t), beta=1.0, reduction="sum").backward()
        assert x.grad is not None
        np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [1e-6, 1e-4, 1e-3, 1e-2])
def test_float32_gradient_of_a_small_beta(xp: Any, beta: float) -> None:
    """value_and_grad in float32 at a small beta (a mixture M close to the student's Q): the
    closed form's r = log Q - log M is of the size of beta, but was formed as a difference of
    two log-probabilities rounded at their own size, so the gradient was off by 2.3e-2 of its
    norm at beta=1e-6, 1e-3 at 1e-4, 7e-5 at 1e-3, 9e-6 at 1e-2 (autodiff of the loss: 1e-7).
    Formed as -log1p(beta (P - Q) / Q) where that is small, it is within float32 rounding.
    Classes masked in both models and a student probability that underflows take the
    other form, without a division by zero (NumPy warns)."""
    s, t = _logits((16, 400), seed=5)
    s[0, :3] = t[0, :3] = -np.inf
    s[1, 5] -= 200.0
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    conv = to_xp(xp)
    _, got = ce.value_and_grad(
        ce.distillation_loss, conv(s32), conv(t32), beta=beta, reduction="sum"
    )
    want = distill_grad_ref(s32.astype(np.float64), t32.astype(np.float64), beta=beta)
    err = np.linalg.norm(to_numpy(got) - want) / np.linalg.norm(want)
    assert err < 1e-6, err


def test_tiny_temperature_is_not_an_overflow() -> None:
    """A float32 temperature of 3e-39 (allowed: 1 / T is finite) divided ordinary logits
    into inf (2 / 3e-39 = 6.7e38): distillation_loss was NaN (NumPy, PyTorch and its
    gradient) and linear_log_probs NaN with a NaN gradient, where the values are finite
    (float64: KL 3.33e38, log-probabilities 0 and -1 / T). The row max is subtracted
    before the division for such temperatures."""
    import torch

    import crossent.fused as cf

    T = 3e-39
    s = np.array([[2.0, 1.0, 0.5], [0.1, 0.3, -1.0]])
    t = np.array([[1.0, 2.0, 0.5], [0.1, 0.3, -1.0]])
    for beta in (0.0, 0.5, 1.0):
        want = ce.distillation_loss(s, t, temperature=T, beta=beta, reduction="none")
        assert np.isfinite(want).all()
        got = ce.distillation_loss(
            s.astype(np.float32), t.astype(np.float32), temperature=T, beta=beta, reduction="none"
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)
        st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
        out = ce.distillation_loss(
            st, torch.tensor(t, dtype=torch.float32), temperature=T, beta=beta
        )
        np.testing.assert_allclose(out.item(), want.mean(), rtol=1e-6)
        out.backward()
        assert torch.isfinite(st.grad).all()
        for conv in (np.float32, torch.float32):
            args = [np.asarray(a, dtype=np.float32) for a in (s, t)]
            if conv is torch.float32:
                args = [torch.tensor(a) for a in args]
            value, grad = ce.value_and_grad(ce.distillation_loss, *args, temperature=T, beta=beta)
            np.testing.assert_allclose(float(value), want.mean(), rtol=1e-6)
            assert np.isfinite(np.asarray(grad)).all()  # reverse KL: NaN (0 * -inf) before
    h = torch.eye(3)[:2].clone().requires_grad_()
    head = torch.cat([torch.tensor(s, dtype=torch.float32), torch.zeros(1, 3)]).T.contiguous()
    y = torch.tensor([0, 0])  # row 1's label lies 0.2 below its max: log p = -0.2 / T
    lp, ent = cf.linear_log_probs(h, head, y, temperature=T, return_entropy=True)
    torch.testing.assert_close(lp, torch.tensor([0.0, -0.2 / T]), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ent, torch.zeros(2), rtol=0.0, atol=0.0)
    (lp[0] + ent.sum()).backward()
    assert torch.isfinite(h.grad).all()
    teacher = torch.cat([torch.tensor(t, dtype=torch.float32), torch.zeros(1, 3)]).T.contiguous()
    for beta in (0.0, 1.0):
        h.grad = None
        want = ce.distillation_loss(s, t, temperature=T, beta=beta)
        got = cf.linear_distillation_loss(
            h, head, torch.eye(3)[:2], teacher, temperature=T, beta=beta
        )
        np.testing.assert_allclose(got.item(), want, rtol=1e-6)
        got.backward()
        assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_float32_autodiff_gradient_of_a_peaked_student(backend: str, beta: float) -> None:
    """Autodiff (not value_and_grad) of a peaked student (1 - Q_* = 1e-6) in float32: the
    student's log-softmax passed d/ds_* as g_* - Q_* sum_k g_k, numbers of size 1 whose exact
    difference is 1e-6 times smaller: torch autograd was off by 3.9e-2 (beta = 0.5) and 0.2
    (beta = 1) of the row's norm. The student's log p is now formed relative to its top
    class on PyTorch too (JAX had it from the generic form). Float64 closed form as reference."""
    rng = np.random.default_rng(4)
    s = rng.standard_normal((40, 8)) * 2
    s[:, 0] = np.log(np.exp(s[:, 1:]).sum(axis=1)) + np.log(1e6)
    t = rng.standard_normal((40, 8)) * 4
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    _, want = ce.value_and_grad(
        ce.distillation_loss, s32.astype(np.float64), t32.astype(np.float64), beta=beta,
        reduction="sum",
    )  # fmt: skip
    if backend == "torch":
        torch = pytest.importorskip("torch")
        x = torch.tensor(s32, requires_grad=True)
        loss = ce.distillation_loss(x, torch.tensor(t32), beta=beta, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        got = g.double().numpy()
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        fn = lambda a: ce.distillation_loss(a, jnp.asarray(t32), beta=beta, reduction="sum")  # noqa: E731
        got = np.asarray(jax.grad(fn)(jnp.asarray(s32)), dtype=np.float64)
    err = np.abs(got - want).max(axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < 2e-5, err.max()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_value_and_grad_over_no_classes_is_zero(xp: Any, beta: float) -> None:
    """Logits with no classes: a loss of 0 and an empty gradient. For beta > 0 the closed
    form's gradient looked for the student's most probable class (an argmax error on an
    empty axis), where the loss alone and autodiff already gave 0."""
    empty = to_xp(xp)(np.zeros((4, 0)))
    value, grad = ce.value_and_grad(ce.distillation_loss, empty, empty, beta=beta)
    assert float(to_numpy(value)) == 0.0
    assert tuple(grad.shape) == (4, 0)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 3)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_torch_autograd_over_no_rows_is_zero(shape: tuple[int, ...], beta: float) -> None:
    """An empty batch (a causal shift of one-token sequences) through PyTorch's autograd: for
    beta = 1 the node's forward asked for the teacher's smallest log-probability, a reduction
    PyTorch refuses on an empty tensor (a RuntimeError, where every other path gave 0)."""
    torch = pytest.importorskip("torch")
    student = torch.zeros(shape, requires_grad=True)
    loss = ce.distillation_loss(student, torch.zeros(shape), beta=beta)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0
    assert grad.shape == shape


def test_float32_closed_form_gradient_of_rows_peaked_on_the_same_class(xp: Any) -> None:
    """beta = 0: the gradient Q - P of rows that both put 1 - 6e-6 on the same class. At that
    class it is a difference of two numbers near 1, rounded at 1 in float32 (6e-8) where its
    exact value is about 1e-7: 0.12 to 0.89 of the row's norm off (by backend). It is now
    minus the sum of the other entries, each accurate to its own size: 2e-5, the rounding of
    float32 log-probabilities. float64 reference."""
    rng = np.random.default_rng(19)
    teacher = rng.standard_normal((16, 8))
    teacher[:, 0] = 14.0
    student = teacher + 0.05 * rng.standard_normal((16, 8))
    teacher, student = teacher.astype(np.float32), student.astype(np.float32)
    x = to_xp(xp)
    _, grad = ce.value_and_grad(ce.distillation_loss, x(student), x(teacher), beta=0.0)
    got = to_numpy(grad).astype(np.float64)
    want = distill_grad_ref(student, teacher, beta=0.0) / 16  # the mean over 16 rows
    err = np.abs(got - want).max(axis=-1) / np.linalg.norm(want, axis=-1)
    assert err.max() < 1e-4


def _close_models(gap: float, *, shift: float = 0.0, peak: float = 0.0) -> tuple[Any, Any]:
    """float32 teacher logits and a student `gap` away (plus a constant `shift`: logits are
    defined up to one), as float64 arrays of the float32 values (the references' inputs)."""
    rng = np.random.default_rng(29)
    t = rng.normal(size=(6, 700)) * 3
    t[:, 0] += peak
    s = t + shift + gap * rng.normal(size=t.shape)
    return s.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)


def _close_paths(xp: str, s: Any, t: Any, beta: float) -> dict[str, tuple[Any, Any]]:
    """(row losses, gradient of their sum or None) of float32 `s`, `t` by every path on `xp`."""
    conv = to_xp(xp)
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    opts = {"beta": beta, "reduction": "none"}
    out = {
        "value": (ce.distillation_loss(conv(s32), conv(t32), **opts), None),
        "value_and_grad": ce.value_and_grad(
            ce.distillation_loss, conv(s32), conv(t32), beta=beta, reduction="sum"
        ),
    }
    out["value_and_grad"] = (None, out["value_and_grad"][1])
    if xp == "torch":
        import torch

        from crossent.fused import linear_distillation_loss

        x = torch.tensor(s32, requires_grad=True)
        rows = ce.distillation_loss(x, torch.tensor(t32), **opts)
        rows.sum().backward()
        out["autograd"] = (rows.detach(), x.grad)
        h = torch.tensor(s32, requires_grad=True)
        eye = torch.eye(s.shape[1])
        fused = linear_distillation_loss(h, eye, torch.tensor(t32), eye, **opts)
        fused.sum().backward()
        out["fused"] = (fused.detach(), h.grad)
    if xp == "jax":
        import jax
        import jax.numpy as jnp

        fn = lambda a: ce.distillation_loss(a, jnp.asarray(t32), beta=beta, reduction="sum")  # noqa: E731
        out["jax.grad"] = (None, jax.grad(fn)(jnp.asarray(s32)))
    return out


@pytest.mark.parametrize(
    ("gap", "shift", "peak"),
    [(1e-5, 0.0, 0.0), (1e-3, 0.0, 0.0), (1e-4, 7.0, 0.0), (3e-2, 0.0, 14.0)],
    ids=["1e-5 apart", "1e-3 apart", "1e-4 apart, shifted", "peaked, 3e-2 apart"],
)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_close_models_keep_a_few_ulps_on_every_path(
    xp: str, beta: float, gap: float, shift: float, peak: float
) -> None:
    """float32 models close to each other: each row's loss within 1e-5 of the float64
    reference and the gradient within 1e-5 of its norm, on every path (the loss, the closed
    form, PyTorch's autograd, the fused loss, jax.grad). Summed from the differences of the
    float32 log-probabilities, which round at their size (:math:`\\epsilon|\\log P|`, against
    log ratios of 1e-5), losses were up to 5e-3 off and gradients 3e-2 to 1e-1 of their norm
    (1e-3 apart: 3e-5 and 1e-3; peaked rows: 2e-3 of the gradient)."""
    s, t = _close_models(gap, shift=shift, peak=peak)
    want = distill_rows_close_ref(s, t, beta=beta)
    want_grad = distill_grad_ref(s, t, beta=beta)
    for path, (rows, grad) in _close_paths(xp, s, t, beta).items():
        if rows is not None:
            got = to_numpy(rows).astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=path)
        if grad is not None:
            g = to_numpy(grad).astype(np.float64)
            err = np.linalg.norm(g - want_grad, axis=1) / np.linalg.norm(want_grad, axis=1)
            assert err.max() < 1e-5, (path, err.max())


@pytest.mark.parametrize("beta", [1e-12, 1e-6, 0.1, 0.5, 0.999, 1 - 1e-9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mixture_log_ratios_are_accurate_for_every_beta(beta: float, dtype: Any) -> None:
    """log(a/m) and log(b/m), m = beta a + (1 - beta) b, from d = log(a/b), to a few ulps
    against mpmath, for every d (the asymptotes beyond 80, where e^d overflows float32) and
    beta (1 - beta formed from a rounded beta lost a tiny beta's digits: 1e-4 relative in
    float64 at beta = 1e-12; a sum near 0, 1e-3 in float32 at beta = 1e-6)."""
    import array_api_compat.numpy as xnp
    import mpmath

    from crossent._lib._logdiv import mixture_log_ratios

    d = np.concatenate(
        [[-1e4, -100.0, -81.0, -79.0, 79.0, 81.0, 100.0, 1e4], np.linspace(-20, 20, 161)]
    )
    d = np.concatenate([d, [-1e-3, 1e-3, -1e-7, 1e-7, 0.0]]).astype(dtype)
    a_m, b_m = mixture_log_ratios(d, beta=beta, xp=xnp)
    eps = np.finfo(dtype).eps
    with mpmath.workdps(50):
        b = mpmath.mpf(beta)
        for di, got_a, got_b in zip(d.tolist(), a_m.tolist(), b_m.tolist(), strict=True):
            x = mpmath.mpf(di)
            for got, want in (
                (got_a, -mpmath.log(b + (1 - b) * mpmath.exp(-x))),
                (got_b, -mpmath.log(b * mpmath.exp(x) + (1 - b))),
            ):
                assert abs(got - want) <= 4 * eps * abs(want), (di, got, float(want))
    inf = np.array([np.inf, -np.inf], dtype)
    a_inf, b_inf = mixture_log_ratios(inf, beta=beta, xp=xnp)
    np.testing.assert_allclose(a_inf, [-np.log(beta), -np.inf], rtol=4 * eps)
    np.testing.assert_allclose(b_inf, [-np.inf, -np.log1p(-beta)], rtol=4 * eps)


def test_torch_autograd_node_double_backward_and_a_second_backward() -> None:
    """PyTorch's autograd of distillation_loss runs one node with the closed form: under
    ``create_graph`` backward records the closed form (gradgradcheck), a second backward of a
    retained graph gives the same gradient, ignored rows get 0 and a NaN row NaN."""
    import torch

    gen = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, -100, 2, 3, 4])
    for beta in (0.0, 0.3, 1.0):

        def fn(v: Any, beta: float = beta) -> Any:
            return ce.distillation_loss(v, t, beta=beta, temperature=1.5, target=target)

        assert torch.autograd.gradgradcheck(fn, (s,))
        loss = fn(s)
        (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, s)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        assert (g1[1] == 0).all()
        want = distill_grad_ref(s.detach().numpy(), t.numpy(), beta=beta, temperature=1.5) / 4
        want[1] = 0.0
        np.testing.assert_allclose(g1.numpy(), want, rtol=1e-10, atol=1e-15)
    bad = s.detach().clone()
    bad[2, 0] = float("nan")
    bad.requires_grad_(True)
    ce.distillation_loss(bad, t, reduction="sum").backward()
    assert bad.grad is not None
    assert torch.isnan(bad.grad[2]).all()
    assert torch.isfinite(bad.grad[[0, 1, 3, 4]]).all()


def test_double_backward_with_a_vanishing_student_probability() -> None:
    """float32, 0 < beta < 1, a student class of probability 1e-23 (logits 50 apart): the
    recorded closed form formed P / Q there before taking log Q - log M from the difference of
    the logits instead, and P / Q's derivative -P / Q² overflowed to inf, which the ``where``'s
    zero made NaN; second derivatives equal float64's."""
    import torch

    s = torch.tensor([[30.8199, -5.8686, -43.5758, 11.3686, -21.6904]])
    t = torch.tensor([[0.0368, -0.1699, 0.1119, -0.2676, -0.4527]])
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0]])
    hvp = []
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(
            ce.distillation_loss(x, t.to(dtype), beta=0.5), x, create_graph=True
        )
        hvp.append(torch.autograd.grad((g * v.to(dtype)).sum(), x)[0])
    assert hvp[0].isfinite().all()
    torch.testing.assert_close(hvp[0].double(), hvp[1], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_double_backward_with_a_class_both_models_rule_out(beta: float) -> None:
    """A class whose logit is -inf in both models (a constrained vocabulary) has d = log P -
    log Q = NaN; the recorded closed form took the mixture's log ratio from d only where it
    was finite, but formed it everywhere, and the NaN's derivatives made every second
    derivative of the row NaN (0 < beta < 1). The Hessian equals that of the same loss over
    the other classes, and is 0 for the ruled-out one."""
    import torch

    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    s[:, 2] = t[:, 2] = -float("inf")
    keep = [0, 1, 3, 4]

    def hessian(student: Any, teacher: Any) -> Any:
        def loss(v: Any) -> Any:
            return ce.distillation_loss(v, teacher, beta=beta, temperature=1.5)

        x = student.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
        rows = [
            torch.autograd.grad(g.reshape(-1)[k], x, retain_graph=True)[0] for k in range(g.numel())
        ]
        return torch.stack(rows).reshape(*student.shape, *student.shape)

    got = hessian(s, t)
    want = hessian(s[:, keep], t[:, keep])
    torch.testing.assert_close(got[:, keep][:, :, :, keep], want, rtol=1e-10, atol=1e-15)
    assert (got[:, 2] == 0).all()
    assert (got[:, :, :, 2] == 0).all()
