"""The PyTorch executor's shortest paths for the common calls of sparse and categorical CE:
default options without :func:`make_options`, PyTorch's kernel without anything around it,
and the targets' range read by one ``aminmax`` (float values on small arrays, the integer
view on large ones).

Each shortcut must give what the full path gives, raise the same errors, and let through what
the full path lets through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
from crossent._backends import _torch as torch_exec  # noqa: E402
from crossent._losses import _categorical, _sparse  # noqa: E402
from crossent._losses._options import make_options  # noqa: E402


def test_plain_logits_options_only_for_float_zeros() -> None:
    """The shortcut returns make_options' object for float 0.0 options and None for everything
    make_options must see (bools, ints, tensors, other values, probabilities, odd reductions)."""
    plain = _sparse.plain_logits_options
    for reduction in ("mean", "sum", "none"):
        want = make_options(from_logits=True, reduction=reduction)
        assert plain(True, reduction, 0.0, 0.0, -0.0) == want
        assert plain(True, reduction) == want
    for args in [(False, "mean", 0.0), (1, "mean", 0.0), (True, "avg", 0.0),
                 (True, ["mean"], 0.0), (True, "mean", False), (True, "mean", 0),
                 (True, "mean", 0.1), (True, "mean", float("nan")),
                 (True, "mean", torch.tensor(0.0)), (True, "mean", None)]:  # fmt: skip
        assert plain(*args) is None, args


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_default_options_shortcut_equals_the_checked_options(
    reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    t = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)
    calls: list[Any] = []

    def counting(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return make_options(**kwargs)

    for module in (_sparse, _categorical):
        monkeypatch.setattr(module, "make_options", counting)
    fast_sparse = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, reduction=reduction)
    fast_soft = ce.categorical_cross_entropy(x, t, from_logits=True, reduction=reduction)
    assert calls == []  # the shortcut was taken
    # an int 0 takes the checks, with the same result
    slow_sparse = ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, label_smoothing=0, reduction=reduction
    )
    slow_soft = ce.categorical_cross_entropy(x, t, from_logits=True, gamma=0, reduction=reduction)
    assert len(calls) == 2
    torch.testing.assert_close(fast_sparse, slow_sparse, rtol=0, atol=0)
    torch.testing.assert_close(fast_soft, slow_soft, rtol=0, atol=0)
    torch.testing.assert_close(fast_sparse, F.cross_entropy(x, y, reduction=reduction))
    torch.testing.assert_close(fast_soft, F.cross_entropy(x, t, reduction=reduction))


def test_options_outside_the_shortcut_are_still_checked() -> None:
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    t = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="`reduction`"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True, reduction="avg")
    with pytest.raises(ValueError, match="`reduction`"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True, reduction=["mean"])
    with pytest.raises(TypeError, match="`label_smoothing`"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True, label_smoothing=False)
    with pytest.raises(ValueError, match="`reduction`"):
        ce.categorical_cross_entropy(x, t, from_logits=True, reduction="avg")
    with pytest.raises(TypeError, match="`gamma`"):
        ce.categorical_cross_entropy(x, t, from_logits=True, gamma=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sparse_common_call_is_torch_kernel(dtype: Any, axis: int, reduction: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (7,), generator=g)
    z = x if axis == -1 else x.T.contiguous()  # classes on dim 0: PyTorch's layout transposed
    xg = z.clone().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(
        xg, y, from_logits=True, axis=axis, label_smoothing=0.1, reduction=reduction
    )
    (grad,) = torch.autograd.grad(loss.sum(), xg, create_graph=True)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, label_smoothing=0.1, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64, create_graph=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    got = grad if axis == -1 else grad.T
    torch.testing.assert_close(got.double(), ref_grad.detach(), **tol)
    # double backward through PyTorch's kernel
    if dtype == torch.float64:
        (h,) = torch.autograd.grad(grad.sum(), xg)
        (h_ref,) = torch.autograd.grad(ref_grad.sum(), x64)
        torch.testing.assert_close(h if axis == -1 else h.T, h_ref)


@pytest.mark.parametrize("bad", [5, -1, -100])
def test_sparse_common_call_turns_torch_bound_check_into_the_message(bad: int) -> None:
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    y[2] = bad
    with pytest.raises(ValueError, match="`target` has labels outside \\[0, 5\\)"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True)
    with ce.validation(False), pytest.raises((IndexError, RuntimeError)):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True)  # PyTorch's own check


def test_sparse_common_call_empty_mean_is_zero() -> None:
    x = torch.empty(0, 5, requires_grad=True)
    loss = ce.sparse_categorical_cross_entropy(x, torch.empty(0, dtype=torch.int64),
                                               from_logits=True)  # fmt: skip
    assert loss.item() == 0
    loss.backward()
    assert x.grad is not None
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("n", [8, 3000])  # float values / the integer view
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_unit_interval_check_on_both_paths(n: int, dtype: Any) -> None:
    assert (n * 2 <= torch_exec._FLOAT_RANGE_MAX) == (n == 8)
    t = torch.full((n, 2), 0.5, dtype=dtype)
    assert torch_exec._in_unit_interval(t)
    for ok in (0.0, 1.0):
        t2 = t.clone()
        t2[n // 2, 1] = ok
        assert torch_exec._in_unit_interval(t2)
    for bad in (1.0 + 2 * torch.finfo(dtype).eps, -torch.finfo(dtype).tiny, -0.25, np.inf,
                -np.inf, np.nan):  # fmt: skip
        t2 = t.clone()
        t2[n // 2, 1] = bad
        assert not torch_exec._in_unit_interval(t2)
        assert not torch_exec._in_unit_interval(t2.T)  # strided
    # a target that requires a gradient is read without a graph
    assert torch_exec._in_unit_interval(t.clone().requires_grad_(True))


@pytest.mark.parametrize("n", [8, 3000])
def test_categorical_common_call_checks_targets(n: int) -> None:
    x, t = torch.zeros(n, 2), torch.full((n, 2), 0.5)
    for bad in (1.5, -0.25):
        t2 = t.clone()
        t2[n // 2, 1] = bad
        with pytest.raises(ValueError, match="`target` must lie in \\[0, 1\\]"):
            ce.categorical_cross_entropy(x, t2, from_logits=True)
        with ce.validation(False):
            ce.categorical_cross_entropy(x, t2, from_logits=True)  # switched off: no check
    # -0.0 and 1.0 are valid targets; NaN propagates
    t2 = t.clone()
    t2[0, 0], t2[0, 1] = -0.0, 1.0
    torch.testing.assert_close(
        ce.categorical_cross_entropy(x, t2, from_logits=True), F.cross_entropy(x, t2)
    )
    t2[0, 1] = np.nan
    assert torch.isnan(ce.categorical_cross_entropy(x, t2, from_logits=True))


@pytest.mark.parametrize("axis", [1.0, True])
@pytest.mark.parametrize("kind", ["sparse", "categorical"])
def test_common_call_rejects_a_non_int_axis(axis: Any, kind: str) -> None:
    # the common call compares axis == 1, which 1.0 and True pass: the generic path's
    # TypeError must still come (the categorical common call used to compute)
    x = torch.zeros(4, 3)
    target = torch.zeros(4, dtype=torch.int64) if kind == "sparse" else torch.full((4, 3), 1 / 3)
    loss = ce.sparse_categorical_cross_entropy if kind == "sparse" else ce.categorical_cross_entropy
    with pytest.raises(TypeError, match="`axis` must be an int"):
        loss(x, target, from_logits=True, axis=axis)


def _ulps(a: Any, b: Any, dtype: Any) -> float:
    """Largest difference in units of `dtype`'s rounding at the reference's magnitude."""
    a, b = a.detach().double(), b.detach().double()
    spacing = torch.finfo(dtype).eps * b.abs().clamp_min(torch.finfo(dtype).tiny)
    return float(((a - b).abs() / spacing).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sparse", "categorical"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_small_half_precision_is_float64_rounded_once(
    dtype: Any, kind: str, reduction: str, eps: float
) -> None:
    """Below the chunked path's size: one float32 copy, PyTorch's float32 kernel, one rounding
    (half-precision targets enter PyTorch's products as they are, exactly promoted; with
    smoothing, which PyTorch would compute in their dtype, converted first)."""
    g = torch.Generator().manual_seed(4)
    n, c = 40, 30
    assert n * c < torch_exec._LOW_MIN
    x = (torch.randn(n, c, generator=g) * 4).to(dtype)
    if kind == "sparse":
        t: Any = torch.randint(0, c, (n,), generator=g)
        t64 = t
        loss_fn = ce.sparse_categorical_cross_entropy
    else:
        t = torch.softmax(torch.randn(n, c, generator=g) * 2, -1).to(dtype)
        t64 = t.double()
        loss_fn = ce.categorical_cross_entropy
    xg = x.clone().requires_grad_(True)
    loss = loss_fn(xg, t, from_logits=True, label_smoothing=eps, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, t64, label_smoothing=eps, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    assert loss.dtype == dtype
    assert grad.dtype == dtype
    assert _ulps(loss, ref.to(dtype), dtype) == 0
    assert _ulps(grad, ref_grad, dtype) <= 1.0
    with torch.no_grad():
        assert _ulps(loss_fn(x, t, from_logits=True, label_smoothing=eps, reduction=reduction),
                     ref.to(dtype), dtype) == 0  # fmt: skip
    if reduction == "mean" and dtype == torch.bfloat16:
        pt = F.cross_entropy(xg, t, label_smoothing=eps)  # PyTorch's half-precision kernel
        assert _ulps(torch.autograd.grad(pt, xg)[0], ref_grad, dtype) > 1.0  # the test sees it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = loss_fn(xg, t, from_logits=True, label_smoothing=eps)
        assert auto.dtype == torch.float32
        torch.testing.assert_close(auto.double(), ref.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_sparse_chunks_log_prob_from_softmax(reduction: str) -> None:
    """The chunked path reads log p_y off the gradient's softmax: masked classes, a shifted
    row, a confident row, a label on the row's maximum and labels whose probability is
    subnormal or 0 in float32 (recomputed by log_softmax) stay float64 rounded once (value)
    and within one rounding (gradient)."""
    g = torch.Generator().manual_seed(8)
    n, c = 1100, 128
    assert n * c >= torch_exec._LOW_MIN_SPARSE
    x = torch.randn(n, c, generator=g) * 3
    x[::7, 5] = -np.inf  # masked classes, never a label
    x[1] += 1000.0  # a shifted row
    x[2, 0] = 12.0  # a confident row (its label below)
    y = torch.randint(6, c, (n,), generator=g)
    y[2] = 0
    y[3] = int(x[3].argmax())  # the label on the maximum: p_y = max p
    x[4, 0], y[4] = x[4].max() - 95.0, 0  # p_y subnormal in float32 (loss 95)
    x[5, 0], y[5] = x[5].max() - 300.0, 0  # p_y 0 in float32
    x = x.bfloat16()
    xg = x.clone().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(xg, y, from_logits=True, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    assert _ulps(loss, ref.to(torch.bfloat16), torch.bfloat16) == 0
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[::7, 5] == 0).all())
    assert _ulps(grad, ref_grad, torch.bfloat16) <= 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_sparse_chunks_ignored_nan_row_hides_no_subnormal_label(reduction: str) -> None:
    """An ignored row of NaN logits (a NaN p_y, the smallest value's test once read NaN as
    "none is small") leaves the rows whose p_y is subnormal or 0 in float32 recomputed: the
    loss is float64's rounded once, not inf."""
    g = torch.Generator().manual_seed(3)
    n, c = 1100, 128
    assert n * c >= torch_exec._LOW_MIN_SPARSE
    x = torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    x[0], y[0] = float("nan"), -100  # ignored
    x[5, 3], y[5] = x[5].max() - 95.0, 3  # p_y subnormal in float32
    x[7, 4], y[7] = x[7].max() - 300.0, 4  # p_y 0 in float32
    x = x.bfloat16()
    xg = x.clone().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(
        xg, y, from_logits=True, ignore_index=-100, reduction=reduction
    )
    ref = F.cross_entropy(x.double(), y, ignore_index=-100, reduction=reduction)
    assert _ulps(loss, ref.to(torch.bfloat16), torch.bfloat16) == 0


def test_half_categorical_chunks_loss_from_softmax() -> None:
    """The chunked path reads the loss off the gradient's softmax,
    sum_k c_k (z_k - max z) + S log max p: a shifted row, a one-hot target on the row's
    maximum and smoothed, weighted targets stay float64 rounded once."""
    g = torch.Generator().manual_seed(9)
    n, c = 600, 128
    assert n * c >= torch_exec._LOW_MIN
    x = torch.randn(n, c, generator=g) * 3
    x[1] += 1000.0
    t = torch.softmax(torch.randn(n, c, generator=g) * 2, -1)
    t[3] = 0.0
    t[3, int(x[3].argmax())] = 1.0
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    x, t = x.bfloat16(), t.bfloat16()
    for kwargs in ({}, {"label_smoothing": 0.1, "weight": w.float()}):
        xg = x.clone().requires_grad_(True)
        loss = ce.categorical_cross_entropy(xg, t, from_logits=True, **kwargs)
        (grad,) = torch.autograd.grad(loss, xg)
        x64 = x.double().requires_grad_(True)
        ref_kwargs = {k: v.double() if k == "weight" else v for k, v in kwargs.items()}
        ref = F.cross_entropy(x64, t.double(), **ref_kwargs)
        (ref_grad,) = torch.autograd.grad(ref, x64)
        assert _ulps(loss, ref.to(torch.bfloat16), torch.bfloat16) == 0
        err = (grad.double() - ref_grad).abs()
        bound = torch.finfo(torch.bfloat16).eps * ref_grad.abs() + 1e-9
        assert bool((err <= bound).all())
