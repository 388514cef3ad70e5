"""The backend layer: one formula, every backend, exact at the edges."""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np
import pytest

from crossent._lib import _xp
from crossent._losses import _common
from tests.conftest import to_numpy, to_xp


def _lse_mpmath(row: list[float]) -> float:
    with mpmath.workdps(50):
        return float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row)))


@pytest.mark.parametrize(
    "row",
    [
        [0.0, -30.0],
        [1e4, 0.0, -1e4],
        [-1e4, -1e4 - 1.0],
        [3.0, 3.0, 3.0],
        [0.5, -0.25, 2.0, 1e-8],
    ],
)
def test_logsumexp_matches_mpmath(xp: Any, row: list[float]) -> None:
    x = to_xp(xp)(np.array([row], dtype=np.float64))
    got = float(to_numpy(_xp.logsumexp(x, axis=-1, xp=xp))[0])
    want = _lse_mpmath(row)
    eps = np.finfo(np.float64).eps
    if _xp.is_torch_namespace(xp):
        # torch's native kernel has no log1p for the tail terms: within an ulp of the max.
        assert abs(got - want) <= 2 * eps * max(1.0, abs(max(row)))
    else:
        assert got == pytest.approx(want, rel=4 * eps, abs=1e-300)


def test_logsumexp_non_finite_rows(xp: Any) -> None:
    inf = np.inf
    x = to_xp(xp)(np.array([[-inf, -inf], [inf, 0.0], [np.nan, 0.0], [-inf, 0.0]]))
    got = to_numpy(_xp.logsumexp(x, axis=-1, xp=xp))
    assert got[0] == -inf
    assert got[1] == inf
    assert np.isnan(got[2])
    assert got[3] == 0.0


def test_logsumexp_axis_and_keepdims(xp: Any) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 5))
    x = to_xp(xp)(a)
    for axis in (0, 1, -1):
        got = to_numpy(_xp.logsumexp(x, axis=axis, keepdims=True, xp=xp))
        want = np.log(np.sum(np.exp(a), axis=axis, keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_log_sigmoid_exact_at_extremes(xp: Any) -> None:
    values = [-1e4, -100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0, 1e4]
    got = to_numpy(_xp.log_sigmoid(to_xp(xp)(np.array(values)), xp=xp))
    with mpmath.workdps(60):
        want = [float(-mpmath.log1p(mpmath.exp(-mpmath.mpf(v)))) for v in values]
    np.testing.assert_allclose(got, want, rtol=4e-16, atol=0)


def test_xlogy_zero_times_log_zero_value_and_grad() -> None:
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    p = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64, requires_grad=True)
    out = _xp.xlogy(p, q, xp=xp)
    assert out[0].item() == 0.0
    assert out[2].item() == -np.inf  # a positive mass on an impossible event
    out[:2].sum().backward()
    assert torch.isfinite(p.grad[:2]).all()
    assert torch.isfinite(q.grad[:2]).all()
    assert p.grad[0].item() == 0.0


def test_safe_divide_zero_denominator(xp: Any) -> None:
    conv = to_xp(xp)
    got = to_numpy(_xp.safe_divide(conv(np.array([1.0, 3.0])), conv(np.array([0.0, 2.0])), xp=xp))
    np.testing.assert_array_equal(got, [0.0, 1.5])


def test_one_hot_and_take_along_axis(xp: Any) -> None:
    conv = to_xp(xp)
    labels = conv(np.array([[0, 2], [1, 5]]))
    oh = to_numpy(_xp.one_hot(labels, 3, dtype=xp.float64, axis=1, xp=xp))
    assert oh.shape == (2, 3, 2)
    np.testing.assert_array_equal(oh[:, :, 0], [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(oh[:, :, 1], [[0, 0, 1], [0, 0, 0]])  # 5 is out of range
    x = conv(np.arange(6.0).reshape(2, 3))
    idx = conv(np.array([[2], [0]]))
    np.testing.assert_array_equal(
        to_numpy(_xp.take_along_axis(x, idx, axis=1, xp=xp)), [[2.0], [3.0]]
    )


def test_compute_dtype_upcasts_low_precision() -> None:
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    assert _xp.compute_dtype(torch.bfloat16, xp=xp) == torch.float32
    assert _xp.compute_dtype(torch.float16, torch.float64, xp=xp) == torch.float64
    assert _xp.compute_dtype(torch.int64, xp=xp) == torch.float32
    assert _xp.compute_dtype(torch.float64, xp=xp) == torch.float64


def test_array_namespace_rejects_mixed_libraries() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one array library"):
        _xp.array_namespace(np.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match="at least one array"):
        _xp.array_namespace(1.0, None)


def test_mixed_libraries_under_jax_grad_name_the_foreign_argument() -> None:
    """Under ``jax.grad`` the differentiated logits are a tracer (``jax.LinearizeTracer``) and
    the teacher a concrete JAX array (``jaxlib.ArrayImpl``): their types' modules differ, and
    the message named the teacher, not the PyTorch `target` that is foreign."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    import crossent as ce

    teacher, target = jnp.ones((3, 5)), torch.tensor([1, 2, -100])
    with pytest.raises(TypeError, match=r"but `target` is a torch\.Tensor.*jnp\.asarray\(target\)"):
        jax.grad(lambda s: ce.distillation_loss(s, teacher, target=target))(jnp.zeros((3, 5)))


def test_log1mexp_accurate_and_edges(xp: Any) -> None:
    u = np.array([-1e-20, -1e-8, -0.5, -0.7, -1.0, -40.0, 0.0, -np.inf])
    got = to_numpy(_common.log1mexp(to_xp(xp)(u), xp=xp))
    with mpmath.workdps(60):
        want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in u[:6]]
    # JAX's float64 log1p/expm1 are a few ulps less accurate than NumPy's.
    np.testing.assert_allclose(got[:6], want, rtol=8 * np.finfo(np.float64).eps)
    assert got[6] == -np.inf
    assert got[7] == 0.0


def test_focal_factor_zero_where_certain() -> None:
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    log_1mp = torch.tensor([-np.inf, np.log(0.25)], dtype=torch.float64, requires_grad=True)
    f = _common.focal_factor(log_1mp, 0.5, xp=xp)
    np.testing.assert_allclose(f.detach().numpy(), [0.0, 0.5])
    f.sum().backward()
    assert torch.isfinite(log_1mp.grad).all()
    np.testing.assert_allclose(log_1mp.grad.numpy(), [0.0, 0.25])


def test_reduce_loss(xp: Any) -> None:
    conv = to_xp(xp)
    loss = conv(np.array([1.0, 2.0, 6.0]))
    assert float(to_numpy(_common.reduce_loss(loss, "sum", xp=xp))) == 9.0
    assert float(to_numpy(_common.reduce_loss(loss, "mean", xp=xp))) == 3.0
    den = conv(np.array(0.0))
    assert float(to_numpy(_common.reduce_loss(loss, "mean", denominator=den, xp=xp))) == 0.0
    np.testing.assert_array_equal(to_numpy(_common.reduce_loss(loss, "none", xp=xp)), [1, 2, 6])


def test_is_lazy_only_for_jax_tracers() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    assert not _xp.is_lazy(jnp.ones(3))
    assert not _xp.is_lazy(np.ones(3))
    seen: list[bool] = []

    def f(x: Any) -> Any:
        seen.append(_xp.is_lazy(x))
        return x

    jax.jit(f)(jnp.ones(3))
    assert seen == [True]


_PAIR_POINTS = [-1e4, -88.0, -30.0, -1.0, -1e-8, 0.0, 1e-8, 0.5, 30.0, 104.0, 1e4]


def _log_sigmoid_ref(v: float) -> float:
    with mpmath.workdps(60):
        return float(-mpmath.log1p(mpmath.exp(-mpmath.mpf(v))))


def test_log_sigmoid_pair_matches_mpmath(xp: Any) -> None:
    """Both halves of the shared form within 2 ulps of mpmath; ±inf and NaN exact."""
    x = np.array([*_PAIR_POINTS, np.inf, -np.inf, np.nan])
    pos, neg = (to_numpy(a) for a in _xp.log_sigmoid_pair(to_xp(xp)(x), xp=xp))
    for got, sign in ((pos, 1.0), (neg, -1.0)):
        want = np.array([_log_sigmoid_ref(sign * v) for v in _PAIR_POINTS])
        np.testing.assert_allclose(got[: len(_PAIR_POINTS)], want, rtol=4e-16, atol=0)
    np.testing.assert_array_equal(pos[-3:], [0.0, -np.inf, np.nan])
    np.testing.assert_array_equal(neg[-3:], [-np.inf, 0.0, np.nan])


def test_log_sigmoid_pair_traced_equals_eager() -> None:
    """torch.compile takes the shared form, eager PyTorch its fused kernel: same values
    and gradients (float64), so compiled binary losses equal eager ones."""
    torch = pytest.importorskip("torch")
    x = torch.tensor([*_PAIR_POINTS, -np.inf, np.inf], dtype=torch.float64)

    def f(v: Any) -> Any:
        a, b = _xp.log_sigmoid_pair(v, xp=torch)
        return torch.stack([a, b])

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        v = x.clone().requires_grad_(True)
        out = fn(v)
        (g,) = torch.autograd.grad(out[:, :-2].sum() + (out[:, -2:] * 0.5).sum(), v)
        results.append((out.detach(), g))
    torch.testing.assert_close(results[1], results[0], rtol=4e-16, atol=0)


def test_shift_by_max_along_any_axis(xp: Any) -> None:
    """``(z - m, m)`` with the max along `axis`, 0 for a row without a finite max (one function
    for the losses' shift and log_softmax's, which each wrote it)."""
    conv = to_xp(xp)
    z = np.array([[1.0, -np.inf, 3.0], [-np.inf, -np.inf, -np.inf], [2.0, 0.5, 7.0]])
    for axis in (-1, 0):
        shifted, m = _xp.shift_by_max(conv(z.T if axis == 0 else z), axis=axis, xp=xp)
        want_m = np.array([3.0, 0.0, 7.0])
        np.testing.assert_array_equal(to_numpy(m), want_m)
        want = z - want_m[:, None]
        np.testing.assert_array_equal(to_numpy(shifted), want.T if axis == 0 else want)


def test_take_along_axis_without_a_native_one_ignores_the_other_entries() -> None:
    """A namespace without ``take_along_axis`` gathers through a one-hot mask: another
    entry's NaN or -inf (a masked class) made the gathered value NaN (0 · -inf)."""
    import array_api_strict as strict

    class _NoTakeAlongAxis:
        def __getattr__(self, name: str) -> Any:
            if name == "take_along_axis":
                raise AttributeError(name)
            return getattr(strict, name)

    xp = _NoTakeAlongAxis()
    x = strict.asarray([[-np.inf, 2.0, np.nan], [1.0, -np.inf, 3.0]])
    idx = strict.asarray([[1], [2]])
    got = _xp.take_along_axis(x, idx, axis=1, xp=xp)
    np.testing.assert_array_equal(np.asarray(got), [[2.0], [3.0]])
