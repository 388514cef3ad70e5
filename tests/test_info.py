"""crossent.info: SciPy parity, the laws of information theory, edges and errors."""

from __future__ import annotations

import functools
import math
from typing import Any

import mpmath
import numpy as np
import pytest
from array_api_extra.testing import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import special, stats
from scipy.spatial import distance

import crossent as ce
from crossent import info
from tests._reference import info as ref
from tests.conftest import to_numpy, to_xp

PAIR_MEASURES = ("cross_entropy", "kl_divergence", "js_divergence")
LN2 = math.log(2.0)


def _dists(rng: np.random.Generator, shape: tuple[int, ...], zeros: bool = True) -> np.ndarray:
    """Random distributions along the last axis, some with exact zeros."""
    a = rng.random(shape)
    if zeros:
        a[rng.random(shape) < 0.2] = 0.0
        a[..., 0] += 0.1  # never an all-zero row
    return a / a.sum(axis=-1, keepdims=True)


def _check(got: Any, want: np.ndarray, xp: Any, *, rtol: float = 1e-12, atol: float = 0.0) -> None:
    """`got` is an `xp` float64 array of `want`'s shape, close to `want`."""
    assert_close(got, to_xp(xp)(np.asarray(want, dtype=np.float64)), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# SciPy parity and the float64 reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("base", [None, 2, 10])
def test_entropy_matches_scipy(xp: Any, base: float | None) -> None:
    p = _dists(np.random.default_rng(0), (4, 5))
    got = info.entropy(to_xp(xp)(p), base=base)
    _check(got, stats.entropy(p, axis=-1, base=base), xp)
    _check(got, ref.entropy(p, base=base), xp)


@pytest.mark.parametrize("base", [None, 2])
def test_kl_matches_scipy_rel_entr(xp: Any, base: float | None) -> None:
    rng = np.random.default_rng(1)
    p, q = _dists(rng, (3, 6)), _dists(rng, (3, 6), zeros=False)
    got = info.kl_divergence(to_xp(xp)(p), to_xp(xp)(q), base=base)
    scale = 1.0 if base is None else math.log(base)
    _check(got, special.rel_entr(p, q).sum(axis=-1) / scale, xp)
    _check(got, stats.entropy(p, q, axis=-1, base=base), xp)
    _check(got, ref.kl_divergence(p, q, base=base), xp)


def test_cross_entropy_matches_scipy(xp: Any) -> None:
    rng = np.random.default_rng(2)
    p, q = _dists(rng, (3, 6)), _dists(rng, (3, 6), zeros=False)
    got = info.cross_entropy(to_xp(xp)(p), to_xp(xp)(q))
    _check(got, stats.entropy(p, axis=-1) + stats.entropy(p, q, axis=-1), xp)
    _check(got, ref.cross_entropy(p, q), xp)


@pytest.mark.parametrize("base", [None, 2])
def test_js_matches_scipy_jensenshannon_squared(xp: Any, base: float | None) -> None:
    rng = np.random.default_rng(3)
    p, q = _dists(rng, (4, 5)), _dists(rng, (4, 5))
    got = info.js_divergence(to_xp(xp)(p), to_xp(xp)(q), base=base)
    # SciPy returns the Jensen–Shannon *distance*, the square root of the divergence.
    _check(got, distance.jensenshannon(p, q, axis=-1, base=base) ** 2, xp, rtol=1e-10)
    _check(got, ref.js_divergence(p, q, base=base), xp)


def test_surprisal_matches_reference(xp: Any) -> None:
    p = np.array([[1.0, 0.5, 1e-300], [0.0, 0.25, 0.9]])
    for base in (None, 2, 0.5):
        _check(info.surprisal(to_xp(xp)(p), base=base), ref.surprisal(p, base=base), xp)


@pytest.mark.parametrize("axis", [0, 1, -3])
def test_axis_moves_the_distribution(xp: Any, axis: int) -> None:
    rng = np.random.default_rng(4)
    p = np.moveaxis(_dists(rng, (2, 3, 4)), -1, axis)
    q = np.moveaxis(_dists(rng, (2, 3, 4), zeros=False), -1, axis)
    x, y = to_xp(xp)(p), to_xp(xp)(q)
    _check(info.entropy(x, axis=axis), ref.entropy(p, axis=axis), xp)
    for name in PAIR_MEASURES:
        got = getattr(info, name)(x, y, axis=axis)
        _check(got, getattr(ref, name)(p, q, axis=axis), xp)


def test_p_and_q_broadcast(xp: Any) -> None:
    rng = np.random.default_rng(5)
    p, q = _dists(rng, (5,)), _dists(rng, (3, 5), zeros=False)
    for name in PAIR_MEASURES:
        got = getattr(info, name)(to_xp(xp)(p), to_xp(xp)(q))
        _check(got, getattr(ref, name)(np.broadcast_to(p, q.shape), q), xp)


def test_kl_of_nearly_equal_distributions_is_accurate(xp: Any) -> None:
    p = np.array([0.5, 0.5])
    q = np.array([0.5 + 1e-9, 0.5 - 1e-9])
    with mpmath.workdps(50):
        mp, mq = [mpmath.mpf(v) for v in p], [mpmath.mpf(v) for v in q]
        want = float(mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(mp, mq, strict=True)))
    got = float(to_numpy(info.kl_divergence(to_xp(xp)(p), to_xp(xp)(q))))
    assert got == pytest.approx(want, rel=1e-6)  # a difference of logs loses ~all digits here


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_with_subnormal_q_does_not_overflow(xp: Any, dtype: str) -> None:
    """A softmax output that underflowed to a subnormal: p / q overflows, the KL does not."""
    np_dtype = np.dtype(dtype)
    q_tiny = float(np.finfo(np_dtype).smallest_subnormal) * 7
    p = np.array([0.01, 0.99], np_dtype)
    q = np.array([q_tiny, 1.0], np_dtype)
    x = to_xp(xp)
    probe = x(np.array([q_tiny], np_dtype))
    if not bool(to_numpy(probe * 1 > 0)[0]):
        pytest.skip("this backend flushes subnormals to zero (XLA on CPU)")
    with mpmath.workdps(50):
        want = float(
            mpmath.fsum(
                mpmath.mpf(float(a)) * mpmath.log(mpmath.mpf(float(a)) / mpmath.mpf(float(b)))
                for a, b in zip(p, q, strict=True)
            )
        )
    got = info.kl_divergence(x(p), x(q))
    assert float(to_numpy(got)) == pytest.approx(want, rel=8 * float(np.finfo(np_dtype).eps))
    h = info.cross_entropy(x(p), x(q)) - info.entropy(x(p))
    assert float(to_numpy(h)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------
# 0 · log 0 = 0, impossible events, NaN
# ----------------------------------------------------------------------------


def test_zero_mass_contributes_zero_and_impossible_events_are_infinite(xp: Any) -> None:
    x = to_xp(xp)
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    q = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    _check(info.entropy(x(p)), [0.0, LN2], xp)
    _check(info.cross_entropy(x(p), x(q)), [LN2, np.inf], xp)
    _check(info.kl_divergence(x(p), x(q)), [LN2, np.inf], xp)
    _check(info.js_divergence(x(p), x(q)), ref.js_divergence(p, q), xp)
    assert np.isfinite(to_numpy(info.js_divergence(x(p), x(q)))).all()
    got = to_numpy(info.surprisal(x(np.array([0.0, 1.0]))))
    assert got[0] == np.inf
    assert got[1] == 0.0
    assert not np.signbit(got[1])


def test_js_with_subnormal_mass_is_finite(xp: Any) -> None:
    p = np.array([5e-324, 1.0 - 5e-324])
    q = np.array([0.0, 1.0])
    got = float(to_numpy(info.js_divergence(to_xp(xp)(p), to_xp(xp)(q))))
    assert 0.0 <= got < 1e-300  # m = (p + q) / 2 underflows; p / m = 2p / (p + q) does not


def test_zero_mass_gradients_are_finite() -> None:
    torch = pytest.importorskip("torch")
    p = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    for fn in (
        info.entropy,
        lambda a: info.cross_entropy(a, q),
        lambda a: info.kl_divergence(a, q),
    ):
        (grad,) = torch.autograd.grad(fn(p).sum(), p)
        assert torch.isfinite(grad).all()
    (gp, gq) = torch.autograd.grad(info.js_divergence(p, q).sum(), (p, q))
    assert torch.isfinite(gp).all()
    assert torch.isfinite(gq).all()
    # d/dq of KL where both are 0 is 0; d/dq_k = -p_k / q_k elsewhere.
    (gq,) = torch.autograd.grad(info.kl_divergence(p, q).sum(), q)
    want = torch.where(p == 0, torch.zeros_like(q), -p / torch.where(q == 0, 1.0, q))
    torch.testing.assert_close(gq, want)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_cross_entropy_gradient_for_p_is_minus_log_q_also_at_zero_mass(backend: str) -> None:
    """H(p, q) = -sum p log q is linear in p: dH/dp_k = -log q_k wherever q_k > 0, also where
    p_k = 0 (a one-hot or sparse `p`); only q_k = 0 (an infinite derivative) gives the
    convention 0. (It was 0 wherever p_k = 0: 0 instead of 0.916 for q_k = 0.4.)"""
    p = np.array([[0.0, 1.0, 0.0], [0.0, 0.25, 0.75]])
    q = np.array([[0.4, 0.6, 0.0], [0.1, 0.2, 0.7]])
    want = np.where(q == 0, 0.0, -np.log(np.where(q == 0, 1.0, q))) / LN2
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tp = torch.tensor(p, requires_grad=True)
        (got,) = torch.autograd.grad(info.cross_entropy(tp, torch.tensor(q), base=2).sum(), tp)
        got = got.numpy()
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        qj = jnp.asarray(q, dtype=jnp.float32)
        fn = lambda a: info.cross_entropy(a, qj, base=2).sum()  # noqa: E731
        got = np.asarray(jax.grad(fn)(jnp.asarray(p, dtype=jnp.float32)), dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-12 if backend == "torch" else 1e-6, atol=0.0)


def test_nan_in_q_propagates_also_where_p_is_zero(xp: Any) -> None:
    """0 · log NaN is NaN: a NaN prediction is never hidden by zero mass (it gave 0.693...)."""
    x = to_xp(xp)
    p = np.array([[1.0, 0.0], [1.0, 0.0]])
    q = np.array([[0.5, np.nan], [0.5, 0.5]])
    for fn in (info.cross_entropy, info.kl_divergence, info.js_divergence):
        values = to_numpy(fn(x(p), x(q)))
        assert np.isnan(values[0]), fn.__name__
        assert np.isfinite(values[1]), fn.__name__


def test_nan_propagates(xp: Any) -> None:
    p = np.array([[0.5, np.nan], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.5, 0.5]])
    x = to_xp(xp)
    for got in (
        info.entropy(x(p)),
        info.cross_entropy(x(p), x(q)),
        info.kl_divergence(x(p), x(q)),
        info.js_divergence(x(p), x(q)),
        info.cross_entropy(x(q), x(p)),
    ):
        values = to_numpy(got)
        assert np.isnan(values[0])
        assert np.isfinite(values[1])
    assert np.isnan(to_numpy(info.surprisal(x(np.array([np.nan]))))[0])


# ----------------------------------------------------------------------------
# Laws (hypothesis)
# ----------------------------------------------------------------------------


def _dist_strategy(k: int) -> st.SearchStrategy[np.ndarray]:
    elems = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))
    raw = hnp.arrays(np.float64, (k,), elements=elems).filter(lambda a: a.sum() > 0)
    return raw.map(lambda a: a / a.sum())


@st.composite
def _pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    k = draw(st.integers(1, 6))
    return draw(_dist_strategy(k)), draw(_dist_strategy(k))


@settings(max_examples=25)
@given(pq=_pair())
def test_information_laws(xp: Any, pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    x, y = to_xp(xp)(p), to_xp(xp)(q)
    h = float(to_numpy(info.entropy(x)))
    hpq = float(to_numpy(info.cross_entropy(x, y)))
    kl = float(to_numpy(info.kl_divergence(x, y)))
    js = float(to_numpy(info.js_divergence(x, y)))
    tol = 1e-12
    # sum(p) - sum(q), kept for inputs taken as given, is a rounding residue here (-1.4e-16
    # under some test orders on JAX): the terms themselves are never negative
    assert kl >= -tol
    assert hpq >= h - tol  # Gibbs' inequality
    if math.isfinite(hpq):
        assert hpq == pytest.approx(h + kl, rel=1e-9, abs=tol)
    else:
        assert kl == math.inf
    assert float(to_numpy(info.kl_divergence(x, x))) == 0.0
    assert -tol <= js <= LN2 + tol
    assert js == pytest.approx(float(to_numpy(info.js_divergence(y, x))), abs=tol)
    for name, nats in (("entropy", h), ("kl_divergence", kl), ("js_divergence", js)):
        args = (x,) if name == "entropy" else (x, y)
        bits = float(to_numpy(getattr(info, name)(*args, base=2)))
        assert bits == pytest.approx(nats / LN2, rel=1e-12, abs=tol)


# ----------------------------------------------------------------------------
# dtypes, devices, backends
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_low_precision_returns_input_dtype(dtype_name: str) -> None:
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(6)
    p64, q64 = _dists(rng, (3, 8)), _dists(rng, (3, 8), zeros=False)
    p, q = torch.tensor(p64).to(dtype), torch.tensor(q64).to(dtype)
    # references on the rounded inputs, in float64
    pr, qr = p.double().numpy(), q.double().numpy()
    rtol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6}[dtype_name]
    cases = [
        (info.entropy(p), ref.entropy(pr)),
        (info.cross_entropy(p, q), ref.cross_entropy(pr, qr)),
        (info.kl_divergence(p, q), ref.kl_divergence(pr, qr)),
        (info.js_divergence(p, q), ref.js_divergence(pr, qr)),
        (info.surprisal(q), ref.surprisal(qr)),
    ]
    for got, want in cases:
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * 1e-2)


def test_jax_jit() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    p = jnp.asarray(_dists(np.random.default_rng(7), (2, 4)))
    q = jnp.asarray(_dists(np.random.default_rng(8), (2, 4), zeros=False))
    got = jax.jit(lambda a, b: info.kl_divergence(a, b, base=2))(p, q)
    np.testing.assert_allclose(np.asarray(got), ref.kl_divergence(p, q, base=2), rtol=1e-12)
    grad = jax.grad(lambda a: info.entropy(a).sum())(p)
    assert np.isfinite(np.asarray(grad)).all()


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_value_errors_name_the_argument(xp: Any) -> None:
    x = to_xp(xp)
    p = x(np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"`p` must hold probabilities in \[0, 1\]"):
        info.entropy(x(np.array([1.5, -0.5])))
    with pytest.raises(ValueError, match=r"`q` must hold probabilities"):
        info.kl_divergence(p, x(np.array([[2.0, -1.0]])))
    with pytest.raises(ValueError, match=r"`p` must hold probabilities"):
        info.surprisal(x(np.array([1.5])))


def test_type_and_shape_errors_name_the_argument(xp: Any) -> None:
    x = to_xp(xp)
    p = x(np.array([[0.5, 0.5]]))
    with pytest.raises(TypeError, match=r"`p` must have a floating dtype"):
        info.entropy(x(np.array([1, 0])))
    with pytest.raises(TypeError, match=r"`q` must have a floating dtype"):
        info.cross_entropy(p, x(np.array([[1, 0]])))
    with pytest.raises(ValueError, match=r"`axis`=2 is out of range for `p`"):
        info.entropy(p, axis=2)
    with pytest.raises(TypeError, match=r"`axis` must be an int"):
        info.js_divergence(p, p, axis=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"same length along `axis`"):
        info.kl_divergence(p, x(np.array([[0.2, 0.3, 0.5]])))
    with pytest.raises(ValueError, match=r"do not broadcast"):
        info.cross_entropy(x(np.full((2, 2), 0.5)), x(np.full((3, 2), 0.5)))
    for base in (0, 1, -2.0, math.inf, math.nan):  # base inf gave 0 for every value
        with pytest.raises(ValueError, match=r"`base` must be positive, finite and not 1"):
            info.entropy(p, base=base)
    with pytest.raises(TypeError, match=r"`base` must be None"):
        info.entropy(p, base="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`p` must be an array .*; got builtins.list"):
        info.cross_entropy([0.5, 0.5], p)  # type: ignore[arg-type]


def test_validation_off_skips_value_checks_not_shape_checks(xp: Any) -> None:
    x = to_xp(xp)
    with ce.validation(False):
        info.entropy(x(np.array([1.5, 0.25])))  # no error: values are not checked
        with pytest.raises(ValueError, match="same length along"):
            info.kl_divergence(x(np.array([0.5, 0.5])), x(np.array([1.0])))
        with pytest.raises(TypeError, match="floating dtype"):
            info.entropy(x(np.array([1, 0])))


# ----------------------------------------------------------------------------
# from_logits=True: log-space measures
# ----------------------------------------------------------------------------

MEASURES = ("entropy", *PAIR_MEASURES)


def _call(name: str, zp: Any, zq: Any, **kwargs: Any) -> Any:
    fn = getattr(info, name)
    return fn(zp, **kwargs) if name == "entropy" else fn(zp, zq, **kwargs)


def _reference_from_logits(name: str, zp: np.ndarray, zq: np.ndarray, **kwargs: Any) -> np.ndarray:
    fn = getattr(ref, f"{name}_from_logits")
    return fn(zp, **kwargs) if name == "entropy" else fn(zp, zq, **kwargs)


def _logits(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 4.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


# Rows with huge gaps: probabilities that underflow in float64 (e^-1000), on either side.
GAP_P = np.array([[0.0, 1000.0, 2.0, -5.0], [3.0, 1.0, 2.0, -1.0], [-800.0, 0.0, 0.5, 0.0]])
GAP_Q = np.array([[1000.0, 0.0, 2.0, 1.0], [1.0, 2.0, 3.5, 0.0], [0.0, -900.0, 0.0, 1.0]])


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("base", [None, 2, 10])
def test_from_logits_matches_float64_reference(xp: Any, name: str, base: float | None) -> None:
    rng = np.random.default_rng(10)
    x = to_xp(xp)
    for zp, zq in ((_logits(rng, (4, 7)), _logits(rng, (4, 7))), (GAP_P, GAP_Q)):
        got = _call(name, x(zp), x(zq), base=base, from_logits=True)
        _check(got, _reference_from_logits(name, zp, zq, base=base), xp, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_equals_the_measure_of_the_softmax(xp: Any, name: str) -> None:
    """Where nothing underflows, logits and their softmax give the same measure."""
    rng = np.random.default_rng(11)
    zp, zq = _logits(rng, (3, 2, 5), 2.0), _logits(rng, (3, 2, 5), 2.0)
    p, q = special.softmax(zp, axis=1), special.softmax(zq, axis=1)
    x = to_xp(xp)
    got = _call(name, x(zp), x(zq), axis=1, from_logits=True)
    want = _call(name, x(p), x(q), axis=1)
    assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_broadcasts_and_moves_axis(xp: Any, name: str) -> None:
    rng = np.random.default_rng(12)
    zp, zq = _logits(rng, (5,)), _logits(rng, (3, 5))
    x = to_xp(xp)
    if name != "entropy":
        got = _call(name, x(zp), x(zq), from_logits=True)
        _check(got, _reference_from_logits(name, np.broadcast_to(zp, zq.shape), zq), xp)
    got = _call(name, x(zq.T), x(zp[:, None]), axis=0, from_logits=True)
    _check(got, _reference_from_logits(name, zq, np.broadcast_to(zp, zq.shape)), xp)


def test_from_logits_masked_outcomes(xp: Any) -> None:
    """A logit of -inf is an impossible outcome: 0 · log 0 = 0, mass on it gives +inf."""
    x = to_xp(xp)
    inf = np.inf
    zp = np.array([[0.0, 0.0, -inf], [0.0, 0.0, -inf], [0.0, -inf, -inf]])
    zq = np.array([[0.0, -inf, -inf], [0.0, 0.0, 5.0], [-inf, 0.0, -inf]])
    _check(info.entropy(x(zp), from_logits=True), [LN2, LN2, 0.0], xp)
    ce = to_numpy(info.cross_entropy(x(zp), x(zq), from_logits=True))
    kl = to_numpy(info.kl_divergence(x(zp), x(zq), from_logits=True))
    assert ce[0] == inf
    assert kl[0] == inf
    assert ce[2] == inf
    assert kl[2] == inf
    np.testing.assert_allclose(ce[1:2], ref.cross_entropy_from_logits(zp[1:2], zq[1:2]), rtol=1e-12)
    # p puts no mass where q does: KL = sum over p's support only (and q's mass elsewhere counts)
    np.testing.assert_allclose(kl[1:2], ref.kl_divergence_from_logits(zp[1:2], zq[1:2]), rtol=1e-12)
    np.testing.assert_allclose(
        kl[1:2],
        ref.kl_divergence(special.softmax(zp[1:2], -1), special.softmax(zq[1:2], -1)),
        rtol=1e-12,
    )
    js = info.js_divergence(x(zp), x(zq), from_logits=True)
    _check(js, ref.js_divergence(special.softmax(zp, -1), special.softmax(zq, -1)), xp)
    assert to_numpy(js)[2] == pytest.approx(LN2, rel=1e-15)


def test_from_logits_nan_propagates(xp: Any) -> None:
    x = to_xp(xp)
    zp = np.array([[0.0, np.nan], [0.0, 1.0]])
    zq = np.array([[0.0, 1.0], [2.0, 0.0]])
    for name in MEASURES:
        for a, b in ((zp, zq), (zq, zp)):
            values = to_numpy(_call(name, x(a), x(b), from_logits=True))
            if name == "entropy" and a is zq:
                assert np.isfinite(values).all()
                continue
            assert np.isnan(values[0])
            assert np.isfinite(values[1])


@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_gradients_torch_with_underflow(name: str) -> None:
    """Autograd gradients equal the closed forms, finite where a probability underflows."""
    torch = pytest.importorskip("torch")
    zp = torch.tensor(GAP_P, requires_grad=True)
    zq = torch.tensor(GAP_Q, requires_grad=True)
    inputs = (zp,) if name == "entropy" else (zp, zq)
    value = _call(name, zp, zq, from_logits=True)
    assert torch.isfinite(value).all()
    grads = torch.autograd.grad(value.sum(), inputs)
    want = ref.grads_from_logits(name, GAP_P, GAP_Q)
    for g, w in zip(grads, want, strict=False):
        assert torch.isfinite(g).all()
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_gradients_jax_with_underflow(name: str) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    zp, zq = jnp.asarray(GAP_P), jnp.asarray(GAP_Q)
    argnums = (0,) if name == "entropy" else (0, 1)
    fn = jax.jit(lambda a, b: _call(name, a, b, from_logits=True).sum())
    grads = jax.grad(fn, argnums=argnums)(zp, zq)
    want = ref.grads_from_logits(name, GAP_P, GAP_Q)
    for g, w in zip(grads, want, strict=False):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-10, atol=1e-14)


def test_distillation_with_underflowed_student_has_finite_gradients() -> None:
    """The issue's case: KL(teacher‖student) with a student probability that underflows.

    Through probabilities the student's underflowed q_k = 0 gives KL = inf and a
    NaN gradient; from logits both are finite and equal the closed form q - p.
    """
    torch = pytest.importorskip("torch")
    teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    student = torch.tensor([[150.0, 0.0, -10.0, 0.0]], dtype=torch.float32, requires_grad=True)
    q = torch.softmax(student, -1)
    assert bool((q == 0).any())  # e^-150 underflows float32
    through_probs = info.kl_divergence(torch.softmax(teacher, -1), q)
    assert not torch.isfinite(through_probs).all()
    kl = info.kl_divergence(teacher, student, from_logits=True)
    (g,) = torch.autograd.grad(kl.sum(), student)
    want = ref.kl_divergence_from_logits(
        teacher.double().numpy(), student.detach().double().numpy()
    )
    np.testing.assert_allclose(kl.detach().numpy(), want, rtol=1e-6)
    gw = ref.grads_from_logits(
        "kl_divergence", teacher.double().numpy(), student.detach().double().numpy()
    )[1]
    np.testing.assert_allclose(g.numpy(), gw, rtol=1e-6, atol=1e-7)
    # second order: a double backward through the log-space form is finite too
    kl = info.kl_divergence(teacher, student, from_logits=True)
    (g2,) = torch.autograd.grad(kl.sum(), student, create_graph=True)
    (h,) = torch.autograd.grad((g2**2).sum(), student)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("requires_grad", [True, False])
def test_float32_js_and_distillation_with_huge_gaps_are_accurate(requires_grad: bool) -> None:
    """Logits 1000 apart in float32, through autograd too (the array-API path).

    A mass that the mixture holds but the distribution does not (log a ≈ -1000) was
    read back as e^(log a - d) with d = log a - log b rounded at the magnitude of
    log a (float32 spacing 6e-5 there): JS and the β = 0.3 distillation loss were
    off by up to 2e-5 relative instead of float32 rounding.
    """
    torch = pytest.importorskip("torch")
    from tests._reference.distill import distill_rows_ref

    zp = torch.tensor(GAP_P, dtype=torch.float32, requires_grad=requires_grad)
    zq = torch.tensor(GAP_Q, dtype=torch.float32)
    js = info.js_divergence(zp, zq, from_logits=True).detach().double().numpy()
    np.testing.assert_allclose(js, ref.js_divergence_from_logits(GAP_P, GAP_Q), rtol=5e-7)
    for beta in (0.3, 0.5):
        got = ce.distillation_loss(zp, zq, beta=beta, reduction="none")
        want = distill_rows_ref(GAP_P, GAP_Q, beta=beta, temperature=1.0)
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=5e-7)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_from_logits_low_precision(dtype_name: str) -> None:
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(13)
    zp, zq = (
        torch.tensor(_logits(rng, (3, 9))).to(dtype),
        torch.tensor(_logits(rng, (3, 9))).to(dtype),
    )
    zp64, zq64 = zp.double().numpy(), zq.double().numpy()
    rtol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6}[dtype_name]
    for name in MEASURES:
        got = _call(name, zp, zq, from_logits=True)
        assert got.dtype == dtype
        want = _reference_from_logits(name, zp64, zq64)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=rtol * 1e-2)


@st.composite
def _logit_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    k = draw(st.integers(1, 6))
    elems = st.one_of(st.floats(-60.0, 60.0), st.sampled_from([-1000.0, 1000.0, -np.inf]))
    rows = hnp.arrays(np.float64, (k,), elements=elems).filter(lambda z: np.isfinite(z).any())
    return draw(rows), draw(rows), draw(st.floats(-500.0, 500.0))


@settings(max_examples=25)
@given(case=_logit_pair())
def test_information_laws_from_logits(xp: Any, case: tuple[np.ndarray, np.ndarray, float]) -> None:
    zp, zq, shift = case
    x, y = to_xp(xp)(zp), to_xp(xp)(zq)

    def measure(name: str, a: Any = x, b: Any = y, **kw: Any) -> float:
        return float(to_numpy(_call(name, a, b, from_logits=True, **kw)))

    h, hpq, kl, js = (measure(n) for n in MEASURES)
    finite = not np.any(np.isfinite(zp) & (zq == -np.inf))  # p puts no mass where q has none
    scale = 1.0 + abs(h) + (abs(hpq) if finite else 0.0)
    tol = 1e-12 * scale
    assert math.isfinite(h)
    assert math.isfinite(hpq) == finite
    assert math.isfinite(kl) == finite
    assert kl >= 0.0  # exactly: the terms summed are each >= 0
    assert hpq >= h - tol  # Gibbs' inequality
    if finite:
        assert hpq == pytest.approx(h + kl, rel=1e-9, abs=tol)
    assert measure("kl_divergence", x, x) == 0.0
    assert 0.0 <= js <= LN2 * (1 + 1e-12)
    assert js == pytest.approx(measure("js_divergence", y, x), rel=1e-9, abs=1e-15)
    # shift invariance: z + c is the same distribution
    xs, ys = to_xp(xp)(zp + shift), to_xp(xp)(zq - shift)
    for name, value in zip(MEASURES, (h, hpq, kl, js), strict=True):
        assert measure(name, xs, ys) == pytest.approx(value, rel=1e-9, abs=1e-9 * scale)
        assert measure(name, base=2) == pytest.approx(value / LN2, rel=1e-12, abs=tol)
    for name, value in zip(MEASURES, (h, hpq, kl, js), strict=True):
        want = float(_reference_from_logits(name, zp, zq))
        assert value == pytest.approx(want, rel=1e-9, abs=tol)


def test_from_logits_errors(xp: Any) -> None:
    x = to_xp(xp)
    z = x(np.array([[3.0, -2.0]]))
    with pytest.raises(TypeError, match=r"`from_logits` must be True or False"):
        info.entropy(z, from_logits=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`from_logits` must be True or False"):
        info.kl_divergence(z, z, from_logits="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pass from_logits=True if these are logits"):
        info.kl_divergence(z, z)
    with pytest.raises(TypeError, match=r"`q` must have a floating dtype"):
        info.cross_entropy(z, x(np.array([[1, 0]])), from_logits=True)
    with pytest.raises(ValueError, match=r"same length along `axis`"):
        info.js_divergence(z, x(np.array([[0.2, 0.3, 0.5]])), from_logits=True)


def test_from_logits_is_a_keyword_only_option_defaulting_to_false() -> None:
    import inspect

    for name in MEASURES:
        param = inspect.signature(getattr(info, name)).parameters["from_logits"]
        assert param.kind is param.KEYWORD_ONLY
        assert param.default is False


def test_probability_error_on_a_tensor_that_requires_grad_is_clean() -> None:
    torch = pytest.importorskip("torch")
    z = torch.tensor([[3.0, -2.0]], requires_grad=True)
    with pytest.raises(ValueError, match=r"pass from_logits=True if these are logits"):
        info.entropy(z)  # the message reads the values without an autograd warning


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_logits_of_large_magnitude_keep_the_digits_of_log_p_near_0(
    xp: Any, dtype: str
) -> None:
    """log p = z - lse(z) rounded lse at the magnitude of the logits: float32 logits
    [300, 288, 200] gave log q_0 = 0, so H(p, q) from logits was 0.0 on NumPy,
    array-api-strict and JAX where it is 6.144193e-06 (the loss gives it; float64: relative
    error 2e-9). The row is shifted by its max first, whose log-sum-exp is a log1p; on
    PyTorch too (its native log_softmax forms log(1 + 6e-6) in float32, 0.9 % off; it was
    skipped there). The exact values are from mpmath at 60 digits."""
    conv = to_xp(xp)
    zp = conv(np.array([[300.0, 0.0, 0.0]], dtype=dtype))
    zq = conv(np.array([[300.0, 288.0, 200.0]], dtype=dtype))
    with mpmath.workdps(60):
        log_q = [mpmath.mpf(v) - mpmath.log(mpmath.fsum(mpmath.exp(u) for u in (300, 288, 200)))
                 for v in (300, 288, 200)]  # fmt: skip
        log_p = [mpmath.mpf(v) - mpmath.log(mpmath.exp(300) + 2) for v in (300, 0, 0)]
        h = -mpmath.fsum(mpmath.exp(a) * b for a, b in zip(log_p, log_q, strict=True))
        kl = mpmath.fsum(mpmath.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))
    rtol = 1e-6 if dtype == "float32" else 1e-11
    got_h = float(to_numpy(ce.info.cross_entropy(zp, zq, from_logits=True))[0])
    got_kl = float(to_numpy(ce.info.kl_divergence(zp, zq, from_logits=True))[0])
    assert got_h == pytest.approx(float(h), rel=rtol)
    assert got_kl == pytest.approx(float(kl), rel=rtol)


def test_base_conversion_overflow_to_a_right_infinity_gives_no_warning() -> None:
    """Bits of 2.97e38 nats in float32 are rightly +inf; NumPy warned 'overflow encountered in
    divide' (an error where warnings are errors, as in this suite)."""
    log_p = np.log(np.array([[0.1, 0.9]], dtype=np.float32))
    z = np.array([[0.0, -3.3e38]], dtype=np.float32)
    for measure in (ce.info.cross_entropy, ce.info.kl_divergence):
        assert np.isfinite(measure(log_p, z, from_logits=True))
        assert measure(log_p, z, from_logits=True, base=2) == np.inf


def test_logits_spanning_more_than_the_float_range_documented_limit() -> None:
    """float32 logits [-3e38, 3e38]: log q_0 = -6e38 is beyond float32, so cross_entropy and
    kl_divergence from p of logits [0, 0] give +inf where the value is about 3e38 (documented
    in their Notes and on the differences page); the bounded entropy and JS divergence are
    exact (float64 references: 0 and (log(4/3) + (log 2 + log(2/3)) / 2) / 2)."""
    import math

    z = np.array([-3e38, 3e38], dtype=np.float32)
    p = np.zeros(2, dtype=np.float32)
    assert float(info.cross_entropy(p, z, from_logits=True)) == math.inf
    assert float(info.kl_divergence(p, z, from_logits=True)) == math.inf
    assert float(info.entropy(z, from_logits=True)) == 0.0
    js = (math.log(4 / 3) + (math.log(2) + math.log(2 / 3)) / 2) / 2
    np.testing.assert_allclose(float(info.js_divergence(p, z, from_logits=True)), js, rtol=1e-6)
    # the direction that does not read the overflowed log-probability is exact
    np.testing.assert_allclose(float(info.cross_entropy(z, p, from_logits=True)), math.log(2))


def _peaked_logits(tail: float, rows: int = 12, k: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits whose `p` puts 1 - `tail` on class 0 and a `q` that disagrees (scale 4)."""
    rng = np.random.default_rng(14)
    zp = rng.standard_normal((rows, k)) * 2
    zp[:, 0] = np.log(np.exp(zp[:, 1:]).sum(axis=1)) - np.log(tail)
    zq = rng.standard_normal((rows, k)) * 4
    return zp.astype(np.float32), zq.astype(np.float32)


def _worst_relative_to_norm(got: np.ndarray, want: np.ndarray) -> float:
    """max over rows of max|got - want| / ||want||_2 (the error relative to each row's norm)."""
    err = np.abs(got - want).max(axis=-1) / np.linalg.norm(want, axis=-1)
    return float(err.max())


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_gradients_of_a_peaked_p_are_accurate_in_float32(
    backend: str, name: str
) -> None:
    """A peaked p (1 - p_* = 1e-6, float32): autodiff formed d/dz_* as g_* - p_* sum_k g_k,
    a difference of numbers of the size of the measure's log terms whose exact value is
    1 - p_* times smaller: the gradient for p was off by up to 1.1 (cross-entropy), 0.15
    (KL), 0.09 (JS), 5e-3 (entropy) of its norm. log p is now formed relative to the top
    class (``_logdiv.log_softmax``): d/dz_* is a sum of the other classes' terms."""
    zp, zq = _peaked_logits(1e-6)
    want = ref.grads_from_logits(name, zp.astype(np.float64), zq.astype(np.float64))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tp, tq = torch.tensor(zp, requires_grad=True), torch.tensor(zq, requires_grad=True)
        value = _call(name, tp, tq, from_logits=True)
        got = [g.double().numpy() for g in torch.autograd.grad(value.sum(), tp)]
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        fn = lambda a, b: _call(name, a, b, from_logits=True).sum()  # noqa: E731
        got = [np.asarray(jax.grad(fn)(jnp.asarray(zp), jnp.asarray(zq)), dtype=np.float64)]
    assert _worst_relative_to_norm(got[0], want[0]) < 2e-5  # it was 0.27 (torch, cross-entropy)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_gradients_with_masked_classes_are_finite_and_exact(
    backend: str, name: str
) -> None:
    """Classes masked by -inf logits (in P, and in Q where P rules them out too, so that every
    measure is finite): the gradients equal the float64 closed forms, 0 at the masked classes.
    PyTorch's entropy gave a whole NaN row (the product e^{log p} log p met 0 * -inf in its
    derivative, behind the ``where`` that fixed its value)."""
    rng = np.random.default_rng(21)
    zp, zq = rng.standard_normal((5, 6)) * 2, rng.standard_normal((5, 6)) * 2
    zp[0, 1] = zp[1, [0, 4]] = zp[3, 2] = -np.inf  # P rules classes out
    zq[1, 4] = zq[3, 2] = zp[4, 5] = zq[4, 5] = -np.inf  # Q too, where P does
    want = ref.grads_from_logits(name, zp, zq)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tp, tq = torch.tensor(zp, requires_grad=True), torch.tensor(zq, requires_grad=True)
        value = _call(name, tp, tq, from_logits=True)
        got = torch.autograd.grad(value.sum(), (tp, tq), allow_unused=True)
        got = [None if g is None else g.numpy() for g in got]
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        fn = lambda a, b: _call(name, a, b, from_logits=True).sum()  # noqa: E731
        got = [
            np.asarray(g) for g in jax.grad(fn, argnums=(0, 1))(jnp.asarray(zp), jnp.asarray(zq))
        ]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-15)
    if want[1] is not None:
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", MEASURES)
def test_from_logits_of_a_peaked_p_keep_log_p_of_the_top_class_in_float32(
    xp: Any, name: str
) -> None:
    """log p_* = -log1p(sum of the others' e^(z_k - z_*)) ≈ -(1 - p_*): PyTorch's fused
    log_softmax rounded it at 1, so the float32 entropy of a row with 1 - p_* = 1e-6 was
    4.6e-3 relative off (1.9e-3 at 1e-5; cross-entropy 1.4e-4); float64 reference."""
    zp, zq = _peaked_logits(1e-6)
    zq[:, 0] = zp[:, 0]  # cross-entropy and KL: q peaked on the same class
    got = _call(name, to_xp(xp)(zp), to_xp(xp)(zq), from_logits=True)
    want = ref.from_logits_mpmath(name, zp, zq)
    np.testing.assert_allclose(to_numpy(got).astype(np.float64), want, rtol=2e-6, atol=0)


def _nearly_equal_pairs(dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 4 probabilities that sum to 1 exactly (halves of [a, 1 - a], a >= 1/2, exact
    in the dtype) and a `q` a few ulps to 1e-3 away: KL from ~1e-16 (float32) up."""
    rng = np.random.default_rng(15)
    ulp = float(np.finfo(dtype).eps) / 2  # the spacing in [1/2, 1)
    base = rng.uniform(0.5, 0.95, size=(24, 2)).astype(dtype)
    steps = np.round(np.geomspace(1, 1e-3 / ulp, 24))[:, None] * rng.choice([-1, 1], (24, 2))
    moved = (base + steps * ulp).astype(dtype)

    def rows(x: np.ndarray) -> np.ndarray:
        return np.stack([x[:, 0], 1 - x[:, 0], x[:, 1], 1 - x[:, 1]], axis=-1).astype(dtype) / 2

    return rows(base), rows(moved)


@pytest.mark.parametrize("name", ["kl_divergence", "js_divergence"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_divergences_of_nearly_equal_distributions_are_accurate(
    xp: Any, name: str, dtype: str
) -> None:
    """p log(p / q) summed cancels to second order in p - q: the float32 KL of rows a few
    ulps apart was off by up to 2.6e2 relative (JS 6e6), 5e1 at 1e-4 apart, 7e-2 at 1e-2
    (float64 likewise). Now the log ratio is log1p((p - q) / q) (JS: log1p(+-(p - q) /
    (p + q))), p - q exact there, and each term a psi(d), psi(d) = e^-d - 1 + d summed by
    its series for |d| < 1/2. mpmath reference on the given (exactly normalized) inputs."""
    p, q = _nearly_equal_pairs(np.dtype(dtype))
    x = to_xp(xp)
    got = to_numpy(getattr(info, name)(x(p), x(q))).astype(np.float64)
    with mpmath.workdps(60):
        want = []
        for row_p, row_q in zip(p, q, strict=True):
            mp = [mpmath.mpf(float(v)) for v in row_p]
            mq = [mpmath.mpf(float(v)) for v in row_q]
            if name == "kl_divergence":
                terms = [a * mpmath.log(a / b) for a, b in zip(mp, mq, strict=True)]
            else:
                terms = [
                    (a * mpmath.log(2 * a / (a + b)) + b * mpmath.log(2 * b / (a + b))) / 2
                    for a, b in zip(mp, mq, strict=True)
                ]
            want.append(float(mpmath.fsum(terms)))
    eps = float(np.finfo(np.dtype(dtype)).eps)
    np.testing.assert_allclose(got, want, rtol=32 * eps, atol=0)


@pytest.mark.parametrize("name", ["kl_divergence", "js_divergence"])
def test_from_logits_divergences_of_nearly_equal_rows_are_accurate_in_float32(
    xp: Any, name: str
) -> None:
    """From float32 logits 1e-6 .. 1e-2 apart (and shifted by a constant), a difference of
    log-softmaxes is rounded at eps |log p|: KL and JS were up to 0.42 relative off at
    1e-6, 6e-3 at 1e-4. d = log p - log q is now formed from the logits' differences
    (``_logdiv.log_ratio_from_logits``) and the terms by the series of psi. mpmath
    reference (a float64 one is off by 1e-4 here: its log-softmaxes sum to 1 to ~1e-16).
    Rows shifted by 3 too (z_p - z_q is then rounded in float32: it is carried exactly
    as a sum of two floats)."""
    rng = np.random.default_rng(16)
    zq = rng.standard_normal((30, 9)) * 2
    scale = np.geomspace(1e-6, 1e-2, 30)[:, None]
    zp = (
        zq
        + scale * rng.standard_normal((30, 9))
        + np.where(np.arange(30) % 3 == 0, 3.0, 0.0)[:, None]
    )
    zp, zq = zp.astype(np.float32), zq.astype(np.float32)
    got = _call(name, to_xp(xp)(zp), to_xp(xp)(zq), from_logits=True)
    want = ref.from_logits_mpmath(name, zp, zq)
    np.testing.assert_allclose(to_numpy(got).astype(np.float64), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("name", ["kl_divergence", "js_divergence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_untracked_torch_divergences_equal_the_differentiable_ones(
    name: str, from_logits: bool, dtype: str
) -> None:
    """Without a gradient, float32 and narrower CPU tensors take the in-place form evaluated
    in float64 (``_logdiv.jsd_in_float64``: 5x faster for KL from logits at 1024 x 1000);
    with one, the array-API formulas. Both give the same values, infinities and NaNs: rows
    close, far apart, peaked, with masked classes, a NaN, broadcast and along axis 0."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    zq = rng.standard_normal((8, 6)) * 3
    zp = zq + np.geomspace(1e-6, 3.0, 8)[:, None] * rng.standard_normal((8, 6))
    zp[1, 0] = zq[1, 0] = 40.0  # peaked, both
    zp[2, 3] = -np.inf  # p rules a class out
    zq[3, 2] = -np.inf  # q rules out a class p allows: KL +inf
    zp[4, 1] = zq[4, 1] = -np.inf  # both rule it out
    zp[5, 4] = np.nan
    if not from_logits:
        zp, zq = special.softmax(zp, axis=-1), special.softmax(zq, axis=-1)
    tdtype = getattr(torch, dtype)
    tp, tq = torch.tensor(zp).to(tdtype), torch.tensor(zq).to(tdtype)
    fn = getattr(info, name)
    for p, q, axis in ((tp, tq, -1), (tp[:, None], tq[None, :3], -1), (tp.T, tq.T, 0)):
        fast = fn(p, q, axis=axis, from_logits=from_logits)
        tracked = fn(p.requires_grad_(), q, axis=axis, from_logits=from_logits).detach()
        p.requires_grad_(False)
        assert fast.dtype == tracked.dtype == tdtype
        a, b = fast.double().numpy(), tracked.double().numpy()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        rtol = 1e-5 if dtype == "float32" else 8e-3
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


def _value_and_derivatives(value_of: Any, x: Any, y: Any, node: str | None) -> list[Any]:
    """``value_of(x, y)`` and the derivatives of ``sum(w * value)`` (fixed weights `w`): first
    by a first backward (in place where a node has one) and by a recorded one, second of
    ``sum(gx**2) + sum(gy**2)`` through the recorded ones; float64 copies. With `node` (the
    autograd node's name) the value goes through it, and equals the untracked value."""
    import torch

    value = value_of(x, y)
    assert (node is not None and node in _grad_fns(value)) == (node is not None)
    if node is not None:
        with torch.no_grad():
            torch.testing.assert_close(value_of(x, y), value.detach(), rtol=0, atol=0)
    w = torch.linspace(-1.0, 2.0, value.numel()).reshape(value.shape).to(value.dtype)
    fx, fy = torch.autograd.grad((value * w).sum(), (x, y), retain_graph=True)
    gx, gy = torch.autograd.grad((value * w).sum(), (x, y), create_graph=True)
    assert fx.dtype == fy.dtype == gx.dtype == gy.dtype == x.dtype
    hessian = (gx * gx).sum() + (gy * gy).sum()
    hx, hy = torch.autograd.grad(hessian, (x, y), allow_unused=True, materialize_grads=True)
    return [t.detach().double() for t in (value, fx, fy, gx, gy, hx, hy)]


def _assert_close_to_scale(got: list[Any], want: list[Any], rtol: float) -> None:
    """Each of `got` equals `want`'s to `rtol`, relative to the largest entry of `want`'s."""
    for a, b in zip(got, want, strict=True):
        scale = float(b.abs().max())
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=rtol * scale)


_NODE_SHAPES = pytest.mark.parametrize(
    ("shapes", "axis"), [(((6, 7), (6, 7)), -1), (((2, 1, 7), (3, 7)), -1), (((7, 4), (7, 1)), 0)]
)
"""Same shapes, broadcast logits and axis 0: the cases of each PyTorch node's tests."""


def _grad_fns(t: Any) -> set[str]:
    """The names of the autograd nodes that `t`'s graph reaches."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("name", ["kl_divergence", "js_divergence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@_NODE_SHAPES
def test_tracked_float32_divergences_from_logits_take_exact_float64_derivatives(
    name: str, dtype: str, shapes: tuple[tuple[int, ...], ...], axis: int
) -> None:
    """Finite float32 / bfloat16 logits that require a gradient: KL and JS are one node whose
    value comes from the float64 in-place form and whose closed-form gradient, P (d - KL) and
    Q - P (KL), 1/2 P (r - sum P r) (JS), is formed in float64 by differentiable operations
    (a first backward in place for logits of one shape; 3.7x / 4.6x faster than autograd
    through the array-API formulas at 1024 x 1000). Values, first derivatives (both backwards) and second derivatives
    (a peaked row, rows 1e-6 apart, broadcast inputs, axis 0) equal autograd of the float64
    array-API formulas on the same inputs."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(18)
    a, b = torch.randn(*shapes[0], generator=g) * 3, torch.randn(*shapes[1], generator=g) * 3
    if shapes[0] == shapes[1]:
        a[0, 0] = 50.0  # a peaked row: 1 - P_* = 1e-21, below float64 resolution
        b[1] = a[1] + 1e-6 * torch.randn(shapes[0][1], generator=g)  # nearly equal rows
        a[2, 1], b[2, 1] = 40.0, 42.0  # both peaked at one class: Q_* - P_* is rounded at 1
    tdtype = getattr(torch, dtype)
    a, b = a.to(tdtype).float(), b.to(tdtype).float()  # values the dtype holds exactly
    fn = getattr(info, name)
    results = []
    for wide in (True, False):
        x = (a if wide else a.double()).to(tdtype if wide else torch.float64).requires_grad_()
        y = (b if wide else b.double()).to(tdtype if wide else torch.float64).requires_grad_()
        measure = functools.partial(fn, axis=axis, from_logits=True)
        node = "WideDivergenceBackward" if wide else None
        results.append(_value_and_derivatives(measure, x, y, node))
    rtol = 2e-6 if dtype == "float32" else 8e-3
    _assert_close_to_scale(*results, rtol)
    if shapes[0] == shapes[1]:  # row by row: the peaked row's gradient is about 5e-20
        for got, want in zip(results[0][1:5], results[1][1:5], strict=True):
            rows = np.linalg.norm(want.numpy(), axis=-1) > 0  # bfloat16: row 1 is equal
            assert _worst_relative_to_norm(got.numpy()[rows], want.numpy()[rows]) < rtol  # 0.9


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@_NODE_SHAPES
def test_cross_entropy_of_torch_logits_equals_the_array_api_formulas(
    monkeypatch: pytest.MonkeyPatch, dtype: str, shapes: tuple[tuple[int, ...], ...], axis: int
) -> None:
    """Eager PyTorch logits on the CPU: H(P, Q) = log1p(sum_{j != *} e^{u_j}) - sum P u
    (u = z^q - z^q_*) and one node with the closed-form gradients Q - P and -P (u - sum P u),
    each row's entry at its most probable class formed from the others. Values, first and
    second derivatives (a peaked pair, rows 1e-6 apart, a class P rules out, broadcast inputs,
    axis 0) equal autograd of the float64 array-API formulas; untracked values equal tracked
    ones."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(19)
    a, b = torch.randn(*shapes[0], generator=g) * 3, torch.randn(*shapes[1], generator=g) * 3
    if shapes[0] == shapes[1]:
        a[0, 0] = b[0, 0] = 20.0  # a peaked pair: H = 5e-8, its gradient about 2e-8
        b[1] = a[1] + 1e-6 * torch.randn(shapes[0][1], generator=g)  # nearly equal rows
        a[2, 3] = -math.inf  # P rules a class out: its terms and derivatives are 0
    tdtype = getattr(torch, dtype)
    results = []
    for node in (True, False):
        if not node:  # the array-API formulas, in float64
            monkeypatch.setattr(info, "cross_entropy_of_logits", lambda *a, **k: None)
        x = a.to(tdtype if node else torch.float64).requires_grad_()
        y = b.to(tdtype if node else torch.float64).requires_grad_()
        measure = functools.partial(info.cross_entropy, axis=axis, from_logits=True)
        name = "CrossEntropyOfLogitsBackward" if node else None
        results.append(_value_and_derivatives(measure, x, y, name))
    rtol = 4e-6 if dtype == "float32" else 1e-12
    _assert_close_to_scale(*results, rtol)
    if shapes[0] == shapes[1]:  # row by row: the peaked pair's value and gradients are small
        np.testing.assert_allclose(results[0][0].numpy(), results[1][0].numpy(), rtol=rtol)
        # but Q - P of rows 1e-6 apart: each softmax is rounded at eps Q, about 1e6 eps of the
        # difference's norm (0.1 in float32; so are the array-API formulas' own derivatives)
        rows = [0, 2, 3, 4, 5]
        for got, want in zip(results[0][1:5], results[1][1:5], strict=True):
            assert _worst_relative_to_norm(got.numpy()[rows], want.numpy()[rows]) < rtol


def test_cross_entropy_of_torch_logits_leaves_infinite_and_nan_rows_to_the_formulas() -> None:
    """A class Q rules out (+inf where P has mass, 0 where it has none), a NaN, +inf logits
    and rows of -inf (no distribution: NaN; Q's gave 0 from a fuzz against NumPy, its maximum's
    u = 0 set by index): the node's value is not finite, so the array-API formulas give the
    value and gradient (equal to their float64 values)."""
    torch = pytest.importorskip("torch")
    inf = math.inf
    zp = torch.tensor(
        [
            [0.0, 1.0, 2.0],
            [0.0, -inf, 2.0],
            [0.0, math.nan, 1.0],
            [1.0, 2, 3],
            [1, 2, 3],
            [-inf] * 3,
        ]
    )
    zq = torch.tensor(
        [[0.0, -inf, 2.0], [0.0, -inf, 2.0], [0.0, 1.0, 1.0], [0, 0, inf], [-inf] * 3, [1, 2, 3]]
    )
    x, y = zp.clone().requires_grad_(), zq.clone().requires_grad_()
    value = info.cross_entropy(x, y, from_logits=True)
    assert "CrossEntropyOfLogitsBackward" not in _grad_fns(value)
    want = [math.inf, None, math.nan, math.nan, math.nan, math.nan]  # no Q, no P: NaN
    want[1] = float(
        ref.cross_entropy_from_logits(zp[1:2].double().numpy(), zq[1:2].double().numpy())[0]
    )
    np.testing.assert_allclose(value.detach().numpy(), want, rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(
            info.cross_entropy(zp, zq, from_logits=True).numpy(), want, rtol=1e-6
        )
    # one class: Q of a -inf logit is no distribution (NaN), a finite one certain (0)
    for one_p, one_q, want_one in (
        ([0.5, 0.5], [-inf, 2.0], [math.nan, 0.0]),
        ([-inf], [2.0], [math.nan]),
    ):
        for tracked in (False, True):
            zp1 = torch.tensor(one_p)[:, None].requires_grad_(tracked)
            got = info.cross_entropy(zp1, torch.tensor(one_q)[:, None], from_logits=True)
            np.testing.assert_array_equal(got.detach().numpy(), want_one)
    (gy,) = torch.autograd.grad(value[1], y)
    p = torch.softmax(zp[1].double(), -1)
    want_gy = torch.softmax(zq[1].double(), -1) - p
    np.testing.assert_allclose(gy[1].double().numpy(), want_gy.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@_NODE_SHAPES
@pytest.mark.parametrize("measure_name", ["kl_divergence", "js_divergence"])
def test_divergences_of_torch_probabilities_equal_the_array_api_formulas(
    monkeypatch: pytest.MonkeyPatch,
    measure_name: str,
    dtype: str,
    shapes: tuple[tuple[int, ...], ...],
    axis: int,
) -> None:
    """Eager PyTorch probabilities on the CPU: KL = sum (p d - r) + sum r in float64 (r = p - q,
    d = sign(r) log1p(|r| / min(p, q))), JS by the float64 in-place form; one node whose
    gradients are d + 1 and -p / q (KL), 1/2 log1p(+-(p - q)/(p + q)) (JS), 0 where the
    distribution's own mass is 0. Values, first derivatives (kept from the forward), recorded
    ones and second derivatives (rows 1e-6 apart, ratios of 1e-30, no mass, zeros in both,
    broadcast inputs, axis 0) equal autograd of the float64 array-API formulas; untracked
    values equal tracked ones."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(20)
    a, b = torch.rand(*shapes[0], generator=g), torch.rand(*shapes[1], generator=g) * 0.9 + 0.1
    if shapes[0] == shapes[1]:
        b[1] = a[1] * (1 + 1e-6 * torch.randn(shapes[0][1], generator=g))  # nearly equal rows
        a[2, :2] = torch.tensor([1e-30, 3e-31])  # far below q: d = -69, -70
        a[3, 1] = 0.0  # no mass: the term is q, its derivatives 0
        a[4, 2] = b[4, 2] = 0.0  # zero in both
    tdtype = getattr(torch, dtype)
    a, b = a.to(tdtype), b.to(tdtype)  # probabilities as given: KL is sum p log(p / q)
    results = []
    for node in (True, False):
        if not node:  # the array-API formulas, in float64
            monkeypatch.setattr(info, "jsd_in_float64", lambda *a, **k: None)
        x = (a if node else a.double()).clone().requires_grad_()
        y = (b if node else b.double()).clone().requires_grad_()
        measure = functools.partial(getattr(info, measure_name), axis=axis)
        name = "ProbabilityDivergenceBackward" if node else None
        results.append(_value_and_derivatives(measure, x, y, name))
    rtol = 2e-6 if dtype == "float32" else 8e-3
    _assert_close_to_scale(*results, rtol)
    # entry by entry against the closed form (the formulas' derivative for q is -p/q + 1 - 1,
    # rounded at 1: 0 where p = 1e-30)
    p, q = torch.broadcast_tensors(a.double(), b.double())
    w = torch.linspace(-1.0, 2.0, results[0][0].numel()).reshape(results[0][0].shape)
    w = w.to(tdtype).double().unsqueeze(axis)
    if measure_name == "kl_divergence":
        want_x = torch.where(p > 0, (p / q).log() + 1, 0.0) * w
        want_y = torch.where(p > 0, -p / q, 0.0) * w
    else:  # 1/2 log(p / m), 1/2 log(q / m)
        want_x = torch.where(p > 0, 0.5 * (2 * p / (p + q)).log(), 0.0) * w
        want_y = torch.where(q > 0, 0.5 * (2 * q / (p + q)).log(), 0.0) * w
    for got, want in ((results[0][1], want_x), (results[0][2], want_y)):
        np.testing.assert_allclose(got.numpy(), want.sum_to_size(got.shape).numpy(), rtol=rtol)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_js_gradient_is_zero_where_a_distribution_has_no_mass(backend: str) -> None:
    """JS of probabilities: the derivative for p_k is 1/2 log(p_k / m_k), taken as 0 where
    p_k = 0, also where q_k = 0 too (the formulas gave 1/2 there: their terms' limit m had a
    derivative), on every backend and path."""
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]])
    q = np.array([[0.25, 0.25, 0.5], [0.2, 0.0, 0.8]])
    m = (p + q) / 2
    want = [
        np.where(a == 0, 0.0, 0.5 * np.log(np.where(a == 0, 1.0, a / np.where(m == 0, 1.0, m))))
        for a in (p, q)
    ]
    if backend == "torch":
        torch = pytest.importorskip("torch")
        for dtype in (torch.float32, torch.float64):  # the node; the formulas
            x = torch.tensor(p, dtype=dtype, requires_grad=True)
            y = torch.tensor(q, dtype=dtype, requires_grad=True)
            got = torch.autograd.grad(info.js_divergence(x, y).sum(), (x, y))
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g.double().numpy(), w, rtol=1e-6, atol=0)
    else:
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        fn = lambda a, b: info.js_divergence(a, b).sum()  # noqa: E731
        got = jax.grad(fn, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=0)


def test_kl_of_torch_probabilities_leaves_poles_and_nan_to_the_formulas() -> None:
    """Mass where q is 0 (+inf) and a NaN: the node's value is not finite, so the array-API
    formulas give the value and gradient; rows that are finite equal the node's."""
    torch = pytest.importorskip("torch")
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.5, math.nan, 0.5]])
    q = torch.tensor([[0.5, 0.0, 0.5], [0.3, 0.3, 0.4], [0.2, 0.3, 0.5]])
    x, y = p.clone().requires_grad_(), q.clone().requires_grad_()
    value = info.kl_divergence(x, y)
    assert "ProbabilityDivergenceBackward" not in _grad_fns(value)
    with torch.no_grad():
        untracked = info.kl_divergence(p, q)
    np.testing.assert_array_equal(untracked.numpy(), value.detach().numpy())
    got = value.detach()
    assert got[0] == math.inf
    assert math.isnan(got[2])
    (gx,) = torch.autograd.grad(value[1], x)
    want = (p[1].double() / q[1].double()).log() + 1
    np.testing.assert_allclose(gx[1].double().numpy(), want.numpy(), rtol=1e-6)
    alone = info.kl_divergence(p[1].requires_grad_(), q[1])
    assert "ProbabilityDivergenceBackward" in _grad_fns(alone)
    assert float(alone.detach()) == pytest.approx(float(got[1]), rel=1e-7)


@pytest.mark.parametrize("name", ["entropy", "cross_entropy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_probabilities_take_pytorchs_xlogy_with_the_formulas_derivatives(
    monkeypatch: pytest.MonkeyPatch, name: str, dtype: str
) -> None:
    """Entropy and cross-entropy of checked PyTorch probabilities: PyTorch's ``xlogy`` kernel
    (one node with a gradient): values, first derivatives, recorded ones and second derivatives
    equal the array-API formulas' in float64, zeros in p and q included, q broadcast; mass on
    an outcome q rules out: +inf, the derivatives for p as the formulas' (log q, 0 there)."""
    torch = pytest.importorskip("torch")
    import crossent.info as module

    rng = np.random.default_rng(22)
    a, b = _dists(rng, (5, 6)), _dists(rng, (1, 6))
    a[1, 2], b[0, 3], a[:, 3] = 0.0, 0.0, 0.0  # no mass; an impossible outcome, unused
    tdtype = getattr(torch, dtype)

    def value_of(x: Any, y: Any) -> Any:
        if name == "entropy":  # y enters with a zero derivative
            return info.entropy(x) + 0.0 * y.sum()
        return info.cross_entropy(x, y)

    results, poles = [], []
    for node in (True, False):
        if not node:
            monkeypatch.setattr(module, "xlogy_of_probabilities", lambda *a, **k: None)
        dt = tdtype if node else torch.float64
        x, y = torch.tensor(a).to(dt).requires_grad_(), torch.tensor(b).to(dt).requires_grad_()
        results.append(_value_and_derivatives(value_of, x, y, "XLogYBackward" if node else None))
        # mass on q's zero: +inf, and p's derivatives
        p = torch.tensor(_dists(rng, (1, 6)) + 0.01 if node else poles[0][0].numpy(), dtype=dt)
        p = p.requires_grad_()
        value = info.cross_entropy(p, y)
        gp, gq = torch.autograd.grad(value.sum(), (p, y))
        poles.append((p.detach().double(), value.detach(), gp.double(), gq.double()))
    rtol = 2e-6 if dtype == "float32" else 1e-12
    _assert_close_to_scale(*results, rtol)
    assert poles[0][1] == poles[1][1] == math.inf
    np.testing.assert_allclose(poles[0][2], poles[1][2], rtol=rtol)
    np.testing.assert_allclose(poles[0][3], poles[1][3], rtol=rtol)  # 0 at q's zero


def test_tracked_divergence_with_one_input_requiring_a_gradient() -> None:
    """Only the student's logits require a gradient (distillation): the teacher's gets none."""
    torch = pytest.importorskip("torch")
    teacher = torch.randn(5, 9)
    student = torch.randn(5, 9, requires_grad=True)
    value = info.kl_divergence(teacher, student, from_logits=True).sum()
    (grad,) = torch.autograd.grad(value, student)
    want = torch.softmax(student.detach().double(), -1) - torch.softmax(teacher.double(), -1)
    np.testing.assert_allclose(grad.double().numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    assert teacher.grad is None


@pytest.mark.parametrize("from_logits", [True, False])
def test_distributions_over_no_outcomes_measure_zero(xp: Any, from_logits: bool) -> None:
    """Rows of zero outcomes: every measure is 0 (an empty sum). KL and JS from logits raised
    ``argmax`` IndexErrors on every backend (the log ratio's refinement looked for a most
    probable class), and PyTorch's closed-form gradient likewise."""
    empty = to_xp(xp)(np.zeros((4, 0)))
    for name in MEASURES:
        got = to_numpy(_call(name, empty, empty, from_logits=from_logits))
        np.testing.assert_array_equal(got, np.zeros(4))
    torch = pytest.importorskip("torch")
    x = torch.zeros(4, 0, requires_grad=True)
    for name in ("kl_divergence", "js_divergence"):
        getattr(info, name)(x, x.detach(), from_logits=from_logits).sum().backward()
        assert x.grad is not None
        assert x.grad.shape == (4, 0)


@pytest.mark.parametrize("name", MEASURES)
def test_log_softmax_node_equals_autograd_through_its_formula(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracked PyTorch logits take the peak-relative log-softmax as one autograd node with a
    closed-form backward (``_logdiv._peak_log_softmax``: 3 passes where autograd through the
    formula's operations made 12). Values, first and second derivatives equal autograd through
    the formula (a peaked row, rows 1e-6 apart, masked classes; a class Q rules out where P has
    mass gives the same infinite value and the same NaN gradients); gradgradcheck passes."""
    torch = pytest.importorskip("torch")
    from crossent._lib import _logdiv

    g = torch.Generator().manual_seed(7)
    a = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3
    b = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3
    a[0, 0] = 40.0  # 1 - P_* = 1e-17
    b[0] = a[0] * 0.9  # peaked on the same class
    b[1] = a[1] + 1e-6 * torch.randn(7, generator=g, dtype=torch.float64)
    fn = getattr(info, name)

    def measure(x: Any, y: Any) -> Any:
        return fn(x, from_logits=True) if name == "entropy" else fn(x, y, from_logits=True)

    w = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)

    def derivatives(x0: Any, y0: Any) -> list[Any]:
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        value = measure(x, y)
        gx, gy = torch.autograd.grad(
            (value * w).sum(), (x, y), create_graph=True, allow_unused=True
        )
        gy = torch.zeros_like(y) if gy is None else gy
        if not bool(torch.isfinite(gx).all()):
            return [value.detach(), gx.detach(), gy.detach()]
        hx, hy = torch.autograd.grad((gx * gx).sum() + gy.sum(), (x, y), allow_unused=True)
        hy = torch.zeros_like(y) if hy is None else hy
        return [t.detach() for t in (value, gx, gy, hx, hy)]

    masked_a, masked_b = a.clone(), b.clone()
    masked_a[2, 3] = masked_b[2, 3] = -math.inf  # ruled out by both
    masked_a[3, 1] = -math.inf  # P gives no mass where Q does
    ruled_b = b.clone()
    ruled_b[4, int(a[4].argmax())] = -math.inf  # Q rules out P's most probable class: +inf
    cases = [(a, b), (masked_a, masked_b)] + ([] if name == "entropy" else [(a, ruled_b)])
    for x0, y0 in cases:
        node = derivatives(x0, y0)
        with monkeypatch.context() as m:  # autograd through the formula's operations
            m.setattr(_logdiv, "_peak_log_softmax", lambda: None)
            m.setattr(
                _logdiv,
                "_log_softmax_torch",
                lambda z, axis: _logdiv._log_softmax_in_place(z, axis)[0],
            )
            ops = derivatives(x0, y0)
        assert len(node) == len(ops)
        for got, want in zip(node, ops, strict=True):
            scale = float(want[torch.isfinite(want)].abs().max()) if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale, equal_nan=True)
        # the peaked row's gradient, ~1e-17, row by row (its top entry is the others' sum)
        assert _worst_relative_to_norm(node[1][:1].numpy(), ops[1][:1].numpy()) < 1e-10
    x, y = a[2:].clone().requires_grad_(), b[2:].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(measure, (x, y))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("from_logits", [False, True])
def test_numpy_measures_return_arrays_never_numpy_scalars(dtype: Any, from_logits: bool) -> None:
    """One distribution (a 0-d result) and 0-d surprisal: a 0-d ``np.ndarray`` of the input's
    dtype, as the losses return (NumPy's whole-array reductions give ``np.float64`` / ``np.float32``
    scalars: ``info`` returned those)."""
    p, q = np.array([0.25, 0.75], dtype=dtype), np.array([0.5, 0.5], dtype=dtype)
    results = [_call(name, p, q, from_logits=from_logits, base=2) for name in MEASURES]
    results.append(info.surprisal(np.asarray(0.5, dtype=dtype)))
    for got in results:
        assert type(got) is np.ndarray
        assert got.shape == ()
        assert got.dtype == dtype


@st.composite
def _torch_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, bool, str]:
    """Random pairs for the torch paths: 1-3 dimensions, any axis, `q` broadcast on other
    axes, logits with masked (-inf) classes and scales up to 40, or probabilities with zeros."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    qshape = [
        1 if i != axis % len(shape) and draw(st.booleans()) else s for i, s in enumerate(shape)
    ]
    logits = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def gen(s: list[int]) -> np.ndarray:
        if logits:
            z = rng.standard_normal(s) * rng.choice([0.1, 1.0, 5.0, 40.0])
            z[rng.random(s) < 0.15] = -np.inf
            return z
        a = rng.random(s)
        a[rng.random(s) < 0.2] = 0.0
        return a / np.maximum(a.sum(axis=axis, keepdims=True), 1e-300)

    p, q = gen(shape), gen(qshape)
    if draw(st.booleans()):
        p, q = q, p
    return p, q, axis, logits, draw(st.sampled_from(["float64", "float32"]))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=_torch_cases())
def test_torch_fast_paths_equal_the_array_api_formulas(case: Any) -> None:
    """Differential: every measure on PyTorch (its eager nodes and shortcuts:
    ``cross_entropy_of_logits``, ``jsd_in_float64``, ``_xlog_from_log``'s product) against the
    array-API formulas (those hooks turned off) in float64, values and gradients, over random
    shapes, axes, broadcasts, masked classes and zeros. A fuzz of this kind found an all-NaN
    entropy gradient row and a one-class cross-entropy of 0 where NaN is right."""
    torch = pytest.importorskip("torch")
    import crossent.info as module

    p, q, axis, logits, dtype = case
    hooks = ("cross_entropy_of_logits", "jsd_in_float64", "is_torch_namespace")
    saved = {name: getattr(module, name) for name in hooks}
    generic = {
        "cross_entropy_of_logits": lambda *a, **k: None,
        "jsd_in_float64": lambda *a, **k: None,
        "is_torch_namespace": lambda xp: False,
    }

    def run(measure: str, args: tuple[Any, ...], fast: bool) -> tuple[Any, tuple[Any, ...]]:
        for key, value in (saved if fast else generic).items():
            setattr(module, key, value)
        try:
            xs = [a.clone().requires_grad_() for a in args]
            v = getattr(info, measure)(*xs, axis=axis, from_logits=logits)
            w = torch.linspace(-1.0, 2.0, v.numel(), dtype=v.dtype).reshape(v.shape)
            return v.detach().double(), torch.autograd.grad((v * w).sum(), xs)
        finally:
            for key, value in saved.items():
                setattr(module, key, value)

    tp, tq = torch.tensor(p).to(getattr(torch, dtype)), torch.tensor(q).to(getattr(torch, dtype))
    rtol = 1e-9 if dtype == "float64" else 1e-4
    for name in MEASURES:
        args = (tp,) if name == "entropy" else (tp, tq)
        fast_value, fast_grads = run(name, args, True)
        value, grads = run(name, tuple(a.double() for a in args), False)
        np.testing.assert_allclose(fast_value, value, rtol=rtol, atol=1e-30, err_msg=name)
        if not bool(torch.isfinite(value).all()):
            continue  # infinite measures: gradients by convention
        for got, want in zip(fast_grads, grads, strict=True):
            scale = max(1.0, float(want.abs().max()))
            np.testing.assert_allclose(
                got.double(), want, rtol=10 * rtol, atol=10 * rtol * scale, err_msg=name
            )


@pytest.mark.parametrize("gap", [350.0, 400.0, 700.0])
def test_js_second_derivatives_of_logits_whose_probability_underflows(gap: float) -> None:
    """JS of float32 logits [0, gap, 1] against zeros: the float64 double backward formed P / Q
    for every normal Q, whose recorded derivative -P / Q² underflowed to -inf below Q = e^-354
    and met a where's zero: NaN second derivatives (gap 400) where they are 0 to rounding."""
    torch = pytest.importorskip("torch")
    zp = torch.tensor([[0.0, gap, 1.0]], requires_grad=True)
    zq = torch.zeros(1, 3)
    (g,) = torch.autograd.grad(
        info.js_divergence(zp, zq, from_logits=True).sum(), zp, create_graph=True
    )
    (h,) = torch.autograd.grad((g * torch.tensor([[0.3, -1.0, 2.0]])).sum(), zp)
    z64 = zp.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(
        info.js_divergence(z64, zq.double(), from_logits=True).sum(), z64, create_graph=True
    )
    (h64,) = torch.autograd.grad((g64 * torch.tensor([[0.3, -1.0, 2.0]]).double()).sum(), z64)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_js_second_derivatives_of_far_apart_probabilities(dtype: str) -> None:
    """JS of probabilities: d²/dp² = q / (2 p (p + q)), which autograd of log(2p / (p + q))
    formed as 1/(2p) - 1/(2(p + q)), rounding noise of eps/p where q << p (80 times the value
    at p = 3e-25, q = 3e-43); now exact on the array-API formulas (float64) and the float64
    node of float32 tensors, and the mixed derivative -1 / (2 (p + q)) with them."""
    torch = pytest.importorskip("torch")
    p = torch.tensor(
        [8.3e-12, 1.0e-4, 6.2e-10, 0.0446, 2.7e-25, 6.7e-16, 0.9554], dtype=torch.float64
    )
    q = torch.tensor([1.3e-16, 4.6e-18, 0.99, 1.7e-20, 2.6e-43, 5.1e-22, 0.01], dtype=torch.float64)
    tdtype = getattr(torch, dtype)
    p, q = p.to(tdtype).double(), q.to(tdtype).double()  # values the dtype holds
    x, y = p.to(tdtype).requires_grad_(), q.to(tdtype).requires_grad_()
    (gx,) = torch.autograd.grad(info.js_divergence(x, y), x, create_graph=True)
    hxx, hxy = (h.double() for h in torch.autograd.grad(gx.sum(), (x, y)))
    rtol = 1e-13 if dtype == "float64" else 2.0**-23  # the float32 gradient's own rounding
    torch.testing.assert_close(hxx, q / (2 * p * (p + q)), rtol=rtol, atol=0)
    torch.testing.assert_close(hxy, -1 / (2 * (p + q)), rtol=rtol, atol=0)


@pytest.mark.parametrize("how", ["torch64", "torch32", "jax"])
def test_js_mixed_second_derivative_where_one_distribution_is_zero(how: str) -> None:
    """d/dq of dJS/dp = 1/2 log(2p / (p + q)) is -1 / (2 (p + q)), also at q = 0 (a one-hot or
    sparse q): the array-API formulas replaced the term of an entry without mass by its
    limit m, whose mixed derivative is 0, so autograd (float64 PyTorch tensors, JAX) gave 0
    there; the float64 node of float32 tensors had it right. Now every path."""
    p = np.array([[0.3, 0.2, 0.1, 0.25, 0.15], [0.0, 0.4, 0.1, 0.3, 0.2]])
    q = np.array([[0.5, 0.0, 0.2, 0.0, 0.3], [0.2, 0.0, 0.3, 0.25, 0.25]])
    counted = p > 0  # dJS/dp is the documented 0 where p = 0 (its limit is -inf)
    want = np.where(counted, -0.5 / (p + q), 0.0)
    if how == "jax":
        jax = pytest.importorskip("jax")
        jnp = jax.numpy

        def first(y: Any) -> Any:
            return jnp.sum(jax.grad(lambda x: jnp.sum(info.js_divergence(x, y)))(jnp.asarray(p)))

        got = np.asarray(jax.grad(first)(jnp.asarray(q)))
    else:
        torch = pytest.importorskip("torch")
        dtype = torch.float64 if how == "torch64" else torch.float32
        x = torch.tensor(p, dtype=dtype, requires_grad=True)
        y = torch.tensor(q, dtype=dtype, requires_grad=True)
        (gx,) = torch.autograd.grad(info.js_divergence(x, y).sum(), x, create_graph=True)
        got = torch.autograd.grad(gx.sum(), y)[0].double().numpy()
    rtol = 1e-13 if how != "torch32" else 1e-6
    np.testing.assert_allclose(got[counted], want[counted], rtol=rtol)
