"""Differential tests of the PyTorch executor's fast paths against float64 formulas.

The public losses take many special-cased paths on PyTorch tensors (the common-call
shortcuts, half-precision chunks through a per-thread workspace, no-grad forms without an
autograd node, the guarded recompute after a NaN, the traced forms of ``torch.func``). Each
test draws inputs that steer through them (the executor's size thresholds are shrunk so that
tiny shapes take the chunked paths too) and compares the value and the gradients with a
float64 reference written here from the documented formula: within the dtype's rounding
(half precision: two units of the float64 value rounded to it, plus float32's resolution,
docs/guides/pytorch.md), and the NumPy path to float64 rounding.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
from crossent._backends import _torch as torch_exec  # noqa: E402
from crossent._backends import _torch_rows  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
EPS32 = torch.finfo(torch.float32).eps

SHRUNK = {
    torch_exec: {
        "_LOW_MIN": 1, "_LOW_MIN_FORWARD": 1, "_FLOAT32_CHUNKED": 1, "_LOW_MIN_SPARSE": 1, "_LOW_SCRATCH": 300, "_BINARY_SMALL": 16,
        "_BINARY_CHUNK": 64, "_FLOAT_RANGE_MAX": 16,
    },
    _torch_rows: {"_CHUNK": 64, "_CHUNK_LOSS": 64, "_KERNEL_GRAD": 32},
}  # fmt: skip
"""Size thresholds small enough for tiny inputs to take every chunked path."""


@contextlib.contextmanager
def _thresholds(shrunk: bool) -> Iterator[None]:
    saved = {(m, k): getattr(m, k) for m, names in SHRUNK.items() for k in names}
    try:
        if shrunk:
            for (m, k), _ in saved.items():
                setattr(m, k, SHRUNK[m][k])
        yield
    finally:
        for (m, k), v in saved.items():
            setattr(m, k, v)


@contextlib.contextmanager
def _accelerator(on: bool) -> Iterator[None]:
    """CPU tensors through the executor's accelerator path (no scalar read back), if `on`."""
    saved = torch_exec._host_readable
    try:
        if on:
            torch_exec._host_readable = lambda x: False  # type: ignore[assignment]
        yield
    finally:
        torch_exec._host_readable = saved


# --------------------------------------------------------------------------- references


def _sp(v: Any) -> Any:
    """softplus, exact in float64 and with the derivative σ(v) everywhere (0 included)."""
    return torch.where(
        v > 0, v + torch.log1p(torch.exp(-v.clamp(min=0))), torch.log1p(torch.exp(v.clamp(max=0)))
    )


def _reduce(row: Any, mag: Any, reduction: str, den: Any) -> tuple[Any, Any]:
    if reduction == "none":
        return row, mag
    if reduction == "sum":
        return row.sum(), mag.sum()
    den = torch.where(den == 0, 1.0, den)
    return row.sum() / den, mag.sum() / den


def _sparse_ref(x: Any, t: Any, axis: int, w: Any, o: dict[str, Any]) -> tuple[Any, Any]:
    """(loss, magnitude for the tolerance) of the sparse cross-entropy, float64."""
    z = x.movedim(axis, -1)
    if o["softcap"] is not None:
        cap = o["softcap"]
        z = torch.where(z == -math.inf, z, cap * torch.tanh(z / cap))
    c = z.shape[-1]
    if o["ignore_index"] is not None:  # an ignored row's -inf (a row of them: NaN log p) as 0
        z = torch.where((t == o["ignore_index"])[..., None] & (z == -math.inf), 0.0, z)
    log_p = torch.log_softmax(z, -1)
    gamma, eps = o["gamma"], o["label_smoothing"]

    def term_of(lp: Any) -> Any:
        return -lp * ((1 - lp.exp()) ** gamma if gamma else 1.0)

    valid = (
        torch.ones_like(t, dtype=torch.bool)
        if o["ignore_index"] is None
        else t != o["ignore_index"]
    )
    label = torch.where(valid, t, 0).long()
    ww = torch.ones(c, dtype=x.dtype) if w is None else w
    w_y = torch.where(valid, ww[label], 0.0)
    # the target's term from its own log p (the focal factor's derivative at a masked class
    # would meet its infinite -log p), 0 for an ignored row (whose class 0 may be masked)
    lp_y = torch.where(valid, log_p.gather(-1, label.unsqueeze(-1)).squeeze(-1), 0.0)
    row = (1 - eps) * w_y * term_of(lp_y)
    if eps:  # an ignored row's log p replaced too
        row = row + eps / c * (ww * term_of(torch.where(valid[..., None], log_p, 0.0))).sum(-1)
    lse = torch.logsumexp(z, -1)
    if o["z_loss"]:
        row = row + o["z_loss"] * lse * lse
    row = torch.where(valid, row, 0.0)
    zmax = torch.where(z.isfinite(), z.abs(), 0.0).amax(-1) if c else lse
    mag = (row.abs() + (1 + zmax) * ww.max() * (1 + 2 * o["z_loss"] * lse.abs())).detach()
    mag = torch.where(valid, mag, 0.0)
    return _reduce(row, mag, o["reduction"], w_y.sum())


def _categorical_ref(x: Any, t: Any, axis: int, w: Any, o: dict[str, Any]) -> tuple[Any, Any]:
    z, tt = x.movedim(axis, -1), t.movedim(axis, -1)
    c_num = z.shape[-1]
    eps = o["label_smoothing"]
    c = (1 - eps) * tt + eps / c_num
    if w is not None:
        c = c * w
    log_p = torch.log_softmax(z, -1)
    none = (c == 0) & (log_p == -math.inf)  # 0 · log 0 = 0, log p replaced there (no 0 · inf
    log_p = torch.where(none, 0.0, log_p)  # in the derivatives of the branch not taken)
    factor = (1 - log_p.exp()) ** o["gamma"] if o["gamma"] else 1.0
    term = torch.where(none, 0.0, c * factor * -log_p)
    row = term.sum(-1)
    zmax = torch.where(z.isfinite(), z.abs(), 0.0).amax(-1)
    mag = (row.abs() + (1 + zmax) * c.abs().sum(-1)).detach()
    return _reduce(row, mag, o["reduction"], torch.tensor(float(row.numel()), dtype=x.dtype))


def _binary_ref(x: Any, t: Any, w: Any, pw: Any, o: dict[str, Any]) -> tuple[Any, Any]:
    eps, gamma, alpha = o["label_smoothing"], o["gamma"], o["alpha"]
    ts = t * (1 - eps) + eps / 2
    big_p, big_n = ts, 1 - ts
    if w is not None:
        big_p, big_n = big_p * w, big_n * w
    if pw is not None:
        big_p = big_p * pw
    if alpha is not None:
        big_p, big_n = big_p * alpha, big_n * (1 - alpha)
    sp_neg, sp_pos = _sp(-x), _sp(x)  # -log p, -log(1 - p)
    if gamma:
        p = torch.sigmoid(x)
        sp_neg, sp_pos = sp_neg * (1 - p) ** gamma, sp_pos * p**gamma
    pos = torch.where((big_p == 0) & sp_neg.isinf(), 0.0, big_p * sp_neg)
    neg = torch.where((big_n == 0) & sp_pos.isinf(), 0.0, big_n * sp_pos)
    loss = pos + neg
    mag = (loss.abs() + (1 + x.abs().nan_to_num(0.0, 0.0, 0.0)) * (big_p + big_n)).detach()
    return _reduce(loss, mag, o["reduction"], torch.tensor(float(loss.numel()), dtype=x.dtype))


# --------------------------------------------------------------------------- comparison


def _ulp(ref: Any, dtype: Any) -> Any:
    fi = torch.finfo(dtype)
    return torch.maximum(ref.abs(), torch.tensor(fi.tiny, dtype=torch.float64)) * fi.eps


def _assert_value(got: Any, ref: Any, mag: Any, dtype: Any, what: str) -> None:
    assert got.dtype == dtype, what
    assert got.shape == ref.shape, what
    got, ref = got.detach().double(), ref.detach().double()
    compute = torch.float32 if dtype in HALF else dtype
    tol = 16 * torch.finfo(compute).eps * mag + torch.finfo(compute).tiny
    if dtype in HALF:  # rounded once to the half-precision type
        tol = tol + 2 * _ulp(ref.to(dtype).double(), dtype)
    same = (got == ref) | (got.isnan() & ref.isnan()) | ((got - ref).abs() <= tol)
    bad = (~same).nonzero()
    assert not len(bad), f"{what}: {got.reshape(-1)[:8]} vs {ref.reshape(-1)[:8]} at {bad[:4]}"


def _assert_grad(
    got: Any, ref: Any, scale: float, dtype: Any, what: str, compute: Any = None
) -> None:
    """Gradient within two units of `dtype` and the `compute` dtype's resolution at `scale`
    (`compute`: float32 for half precision, else `dtype`)."""
    assert got is not None, what
    assert got.dtype == dtype, what
    assert got.shape == ref.shape, what
    got, ref = got.double(), ref.double()
    if compute is None:
        compute = torch.float32 if dtype in HALF else dtype
    tol = 2 * _ulp(ref, dtype) + 64 * torch.finfo(compute).eps * scale
    known = ref.isfinite()  # the reference's own derivative is undefined elsewhere
    bad = (known & ~((got - ref).abs() <= tol)).nonzero()
    assert not len(bad), f"{what}: {got[tuple(bad[0])]} vs {ref[tuple(bad[0])]} at {bad[:4]}"


def _z_scale(x: Any) -> float:
    """1 + the largest finite logit magnitude: the scale of the rounding of log p and of p."""
    x = x.detach()
    return float(torch.where(x.isfinite(), x.abs(), 0.0).max()) + 1 if x.numel() else 1.0


def _finite_max(g: Any) -> float:
    g = g.detach()
    g = g[g.isfinite()]
    return float(g.abs().max()) if g.numel() else 0.0


# --------------------------------------------------------------------------- drawing


@st.composite
def _logits(draw: Any, shape: tuple[int, ...], *, pos_inf: bool = False) -> Any:
    """float64 logits with, sometimes, a few extreme values: ±1e4, -inf (a masked class),
    NaN, subnormal numbers, +inf (binary only)."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 3.0, 30.0]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    kinds = ["none", "big", "ninf", "nan", "sub"] + (["pinf"] if pos_inf else [])
    kind = draw(st.sampled_from(kinds))
    if kind != "none" and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 16),), generator=g)
        flat[idx] = {"big": 1e4, "ninf": -math.inf, "nan": math.nan, "sub": 1e-310,
                     "pinf": math.inf}[kind]  # fmt: skip
        if kind == "big":
            flat[idx[::2]] = -1e4
    return x


def _layout(x: Any, how: str) -> Any:
    """The same values laid out transposed, as a strided slice, or expanded from one row."""
    if how == "transposed" and x.ndim >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "strided":
        return torch.stack([x, torch.full_like(x, 7.0)], dim=-1)[..., 0]
    if how == "expanded" and x.ndim >= 2 and x.shape[0]:
        return x[:1].expand(x.shape)
    return x


def _call(fn: Callable[[], Any], mode: str) -> Any:
    if mode == "no_grad":
        with torch.no_grad():
            return fn()
    if mode == "inference":
        with torch.inference_mode():
            return fn()
    return fn()


SHAPES = [(3, 5), (32, 10), (1, 17), (9, 40), (2, 3, 4), (4, 1, 6), (7,), (1, 1)]
MODES = ["grad", "no_grad", "inference", "func"]
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
CASES = settings(max_examples=60, deadline=None)


def _upstream(shape: Any, seed: int, reduction: str, dtype: Any) -> Any:
    """The upstream gradient, float64 holding values of the loss's dtype (autograd hands a
    half-precision loss a half-precision gradient)."""
    if reduction != "none":
        return torch.tensor(2.5 if seed % 3 == 0 else 1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()


def _gradients(call: Callable[[Any], Any], x: Any, extra: list[Any], up: Any, mode: str) -> Any:
    """(value, gradients of sum(up · value) for x and `extra`): autograd, or torch.func."""
    if mode == "func":

        def f(xx: Any, *ee: Any) -> tuple[Any, Any]:
            out = call(xx, *ee)
            return (out.double() * up).sum(), out

        argnums = tuple(range(1 + len(extra)))
        grads, out = torch.func.grad(f, argnums=argnums, has_aux=True)(x, *extra)
        return out, list(grads)
    xs = [x.detach().requires_grad_(True), *(e.detach().requires_grad_(True) for e in extra)]
    out = call(*xs)
    return out, list(torch.autograd.grad(out, xs, up.to(out.dtype)))


def _class_case(data: Any) -> tuple[tuple[int, ...], Any, int, Any, int]:
    """(shape, dtype, class axis, float64 logits, seed) of a class-axis loss."""
    shape = data.draw(st.sampled_from(SHAPES))
    dtype = data.draw(st.sampled_from(FLOATS))
    axis = data.draw(st.sampled_from([1, -1, 0, -len(shape)]))
    axis = -1 if len(shape) == 1 else axis  # PyTorch's 1 and NumPy's -1 mostly, else the first
    return shape, dtype, axis, data.draw(_logits(shape)), data.draw(st.integers(0, 2**16))


# --------------------------------------------------------------------------- sparse


@CASES
@given(data=st.data())
def test_sparse_fast_paths_match_the_float64_formula(data: Any) -> None:
    shape, dtype, axis, x64, seed = _class_case(data)
    ax = axis % len(shape)
    c = shape[ax]
    g = torch.Generator().manual_seed(seed)
    t_dtype = data.draw(st.sampled_from(INTS))
    t = torch.randint(0, c, shape[:ax] + shape[ax + 1 :], generator=g)
    ignore = data.draw(st.sampled_from([None, None, -100, 0, "all"]))
    if ignore == "all":
        ignore, t = 0, torch.zeros_like(t)
    elif ignore == -100:
        t = torch.where(torch.rand(t.shape, generator=g) < 0.3, -100, t)
        t_dtype = torch.int64 if t_dtype == torch.uint8 else t_dtype
    t = t.to(t_dtype)
    o = {
        "ignore_index": ignore,
        "label_smoothing": data.draw(st.sampled_from([0.0, 0.0, 0.1])),
        "gamma": data.draw(st.sampled_from([0.0, 0.0, 2.0])),
        "z_loss": data.draw(st.sampled_from([0.0, 0.0, 1e-3])),
        "softcap": data.draw(st.sampled_from([None, None, 30.0])),
        "reduction": data.draw(st.sampled_from(["mean", "sum", "none"])),
    }
    w = torch.rand(c, generator=g, dtype=torch.float64) * 2 if data.draw(st.booleans()) else None
    w_dtype = data.draw(st.sampled_from([dtype, torch.float32]))
    mode = data.draw(st.sampled_from(MODES))
    w_grad = w is not None and mode == "grad" and data.draw(st.booleans())
    x = _layout(x64.to(dtype), data.draw(st.sampled_from(LAYOUTS)))
    wt = None if w is None else w.to(w_dtype)
    shrunk = data.draw(st.booleans())

    xr = x.double().clone().requires_grad_(True)
    wr = None if wt is None else wt.double().clone().requires_grad_(w_grad)
    ref, mag = _sparse_ref(xr, t, axis, wr, o)

    def call(xx: Any, *ww: Any) -> Any:
        weight = ww[0] if ww else wt
        return ce.sparse_categorical_cross_entropy(
            xx, t, from_logits=True, axis=axis, weight=weight, **o
        )

    what = (
        f"{dtype} {tuple(x.shape)} {x.stride()} axis={axis} {t_dtype} w={wt is not None} {o} {mode}"
    )
    with _thresholds(shrunk):
        if mode in ("no_grad", "inference"):
            _assert_value(_call(lambda: call(x), mode), ref, mag, dtype, what)
            return
        up = _upstream(ref.shape, seed, o["reduction"], dtype)
        extra = [wt] if w_grad else []
        out, grads = _gradients(call, x, extra, up, mode)
    _assert_value(out, ref, mag, dtype, what)
    if not ref.isfinite().all() or not ref.numel():
        return
    ref_grads = torch.autograd.grad(ref, [xr] + ([wr] if w_grad else []), up)
    # p = exp(z - lse): the rounding of the logits' magnitude
    _assert_grad(grads[0], ref_grads[0], _finite_max(ref_grads[0]) * _z_scale(xr), dtype, what)
    if w_grad:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        w_scale = _finite_max(ref_grads[1]) + _z_scale(xr) * float(up.abs().max())
        _assert_grad(grads[1], ref_grads[1], w_scale, w_dtype, what, compute)


# --------------------------------------------------------------------------- categorical


@CASES
@given(data=st.data())
def test_categorical_fast_paths_match_the_float64_formula(data: Any) -> None:
    shape, dtype, axis, x64, seed = _class_case(data)
    ax = axis % len(shape)
    c = shape[ax]
    g = torch.Generator().manual_seed(seed)
    kind = data.draw(st.sampled_from(["one_hot", "soft", "unnormalized", "zero"]))
    if kind == "one_hot":
        labels = torch.randint(0, c, shape[:ax] + shape[ax + 1 :], generator=g)
        t = torch.nn.functional.one_hot(labels, c).double().movedim(-1, ax)
    elif kind == "soft":
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), ax)
    elif kind == "unnormalized":
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        t = torch.zeros(shape, dtype=torch.float64)
    t_dtype = data.draw(st.sampled_from(FLOATS))
    t = t.to(t_dtype)
    o = {
        "label_smoothing": data.draw(st.sampled_from([0.0, 0.0, 0.1])),
        "gamma": data.draw(st.sampled_from([0.0, 0.0, 2.0])),
        "reduction": data.draw(st.sampled_from(["mean", "sum", "none"])),
    }
    w = torch.rand(c, generator=g, dtype=torch.float64) * 2 if data.draw(st.booleans()) else None
    if w is not None and data.draw(st.booleans()):
        w[0] = 0.0  # a class without weight keeps its weight gradient
    w_dtype = data.draw(st.sampled_from([dtype, torch.float64]))
    mode = data.draw(st.sampled_from(MODES))
    t_grad = mode in ("grad", "func") and data.draw(st.booleans())
    w_grad = w is not None and mode in ("grad", "func") and data.draw(st.booleans())
    x = _layout(x64.to(dtype), data.draw(st.sampled_from(LAYOUTS)))
    wt = None if w is None else w.to(w_dtype)
    shrunk = data.draw(st.booleans())

    xr = x.double().clone().requires_grad_(True)
    tr = t.double().clone().requires_grad_(t_grad)
    wr = None if wt is None else wt.double().clone().requires_grad_(w_grad)
    ref, mag = _categorical_ref(xr, tr, axis, wr, o)

    def call(xx: Any, *rest: Any) -> Any:
        it = iter(rest)
        tt = next(it) if t_grad else t
        weight = next(it) if w_grad else wt
        return ce.categorical_cross_entropy(xx, tt, from_logits=True, axis=axis, weight=weight, **o)

    what = f"{dtype} {tuple(x.shape)} {x.stride()} axis={axis} {kind} {t_dtype} w={wt is not None} {o} {mode}"
    with _thresholds(shrunk):
        if mode in ("no_grad", "inference"):
            _assert_value(_call(lambda: call(x), mode), ref, mag, dtype, what)
            _numpy_agrees(x, t, wt, axis, o, ref)
            return
        up = _upstream(ref.shape, seed, o["reduction"], dtype)
        extra = [e for e, on in ((t, t_grad), (wt, w_grad)) if on]
        out, grads = _gradients(call, x, extra, up, mode)
    _assert_value(out, ref, mag, dtype, what)
    if not ref.isfinite().all() or not ref.numel():
        return
    ins = [xr] + [r for r, on in ((tr, t_grad), (wr, w_grad)) if on]
    ref_grads = torch.autograd.grad(ref, ins, up)
    # the row's gradient S·p - c: terms as large as the row's target mass
    mass = float(tr.detach().abs().sum()) * (1 if wr is None else float(wr.detach().max()))
    scale = (_finite_max(ref_grads[0]) + mass * float(up.abs().max())) * _z_scale(xr)
    _assert_grad(grads[0], ref_grads[0], scale, dtype, what)
    for got_g, ref_g in zip(grads[1:], ref_grads[1:], strict=True):
        # -log p and its sums: the float32 error of log p (a logit's magnitude)
        g_scale = _finite_max(ref_g) + _z_scale(xr) * float(up.abs().max()) * max(1, tr.numel())
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        _assert_grad(got_g, ref_g, g_scale, got_g.dtype, what, compute)


def _numpy_agrees(x: Any, t: Any, w: Any, axis: int, o: dict[str, Any], ref: Any) -> None:
    """float64 data: the NumPy path's value equals the PyTorch path's to float64 rounding."""
    if x.dtype != torch.float64 or t.dtype != torch.float64:
        return
    w_np = None if w is None else w.double().numpy()
    want = ce.categorical_cross_entropy(x, t, from_logits=True, axis=axis, weight=w, **o)
    with np.errstate(invalid="ignore"):  # a row of -inf logits only: NaN, as PyTorch's
        got = ce.categorical_cross_entropy(
            x.numpy(), t.numpy(), from_logits=True, axis=axis, weight=w_np, **o
        )
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-13, atol=1e-300)


# --------------------------------------------------------------------------- binary


@CASES
@given(data=st.data())
def test_binary_fast_paths_match_the_float64_formula(data: Any) -> None:
    shape = data.draw(st.sampled_from([*SHAPES, (70,), (3, 30)]))
    dtype = data.draw(st.sampled_from(FLOATS))
    x64 = data.draw(_logits(shape, pos_inf=True))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = data.draw(st.sampled_from(["hard", "soft", "edge"]))
    if kind == "hard":
        t = (torch.rand(shape, generator=g) < 0.5).double()
    elif kind == "soft":
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:  # exact 0 and 1 with infinite logits that agree, and tiny masses
        t = torch.tensor([0.0, 1.0, 0.5, 2.0**-40])[torch.randint(0, 4, shape, generator=g)]
        x64 = torch.where(t == 1, x64.nan_to_num(0.0, math.inf), x64)
        x64[(t == 0) & (torch.rand(shape, generator=g) < 0.2)] = -math.inf
    t_dtype = data.draw(st.sampled_from(FLOATS))
    t = t.to(t_dtype)

    def weight_like() -> Any:
        how = data.draw(st.sampled_from([None, None, "full", "last", "one", "number"]))
        if how is None:
            return None
        if how == "number":
            return float(data.draw(st.sampled_from([0.0, 0.5, 2.0])))
        w_shape = {"full": shape, "last": shape[-1:], "one": (1,)}[how]
        return torch.rand(w_shape, generator=g, dtype=torch.float64) * 2

    w, pw = weight_like(), weight_like()
    o = {
        "label_smoothing": data.draw(st.sampled_from([0.0, 0.0, 0.1])),
        "gamma": data.draw(st.sampled_from([0.0, 0.0, 0.0, 2.0])),
        "alpha": data.draw(st.sampled_from([None, None, 0.25, 1.0])),
        "reduction": data.draw(st.sampled_from(["mean", "sum", "none"])),
    }
    w_dtype = data.draw(st.sampled_from([dtype, torch.float64]))
    wt = w.to(w_dtype) if isinstance(w, torch.Tensor) else w
    pwt = pw.to(w_dtype) if isinstance(pw, torch.Tensor) else pw
    mode = data.draw(st.sampled_from([*MODES, "device"]))
    device = mode == "device"  # an accelerator's eager path: no scalar read back
    mode = "grad" if device else mode
    t_grad = mode in ("grad", "func") and data.draw(st.booleans())
    x = _layout(x64.to(dtype), data.draw(st.sampled_from(LAYOUTS)))
    shrunk = data.draw(st.booleans())

    def as64(v: Any) -> Any:
        return v.double() if isinstance(v, torch.Tensor) else v

    xr = x.double().clone().requires_grad_(True)
    tr = t.double().clone().requires_grad_(t_grad)
    ref, mag = _binary_ref(xr, tr, as64(wt), as64(pwt), o)

    def call(xx: Any, *rest: Any) -> Any:
        tt = rest[0] if t_grad else t
        return ce.binary_cross_entropy(xx, tt, from_logits=True, weight=wt, pos_weight=pwt, **o)

    what = f"{dtype} {tuple(x.shape)} {x.stride()} {kind} {t_dtype} w={w!r:.20} pw={pw!r:.20} {o} {mode}"
    what += " device" if device else ""
    with _thresholds(shrunk), _accelerator(device):
        if mode in ("no_grad", "inference"):
            _assert_value(_call(lambda: call(x), mode), ref, mag, dtype, what)
            return
        up = _upstream(ref.shape, seed, o["reduction"], dtype)
        out, grads = _gradients(call, x, [t] if t_grad else [], up, mode)
    _assert_value(out, ref, mag, dtype, what)
    if not ref.isfinite().all() or not ref.numel():
        return
    ref_grads = torch.autograd.grad(ref, [xr, tr] if t_grad else [xr], up)
    n = x.numel() if o["reduction"] == "mean" else 1
    wmax = max(float(torch.as_tensor(v).max()) if v is not None else 1.0 for v in (wt, pwt))
    coef = float(up.abs().max()) * wmax * max(1.0, wmax) / n
    # σ(x) - t with a soft target: a difference of two float32 terms (16 units, documented)
    _assert_grad(grads[0], ref_grads[0], 16 * coef * _z_scale(xr), dtype, what)
    if t_grad:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        _assert_grad(grads[1], ref_grads[1], coef * _z_scale(xr), t_dtype, what, compute)


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [{}, {"ignore_index": 1}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"z_loss": 1e-3}],
)
def test_class_weights_requiring_grad_get_their_gradient(dtype: Any, options: Any) -> None:
    """PyTorch's ``nll_loss`` kernel has no weight gradient (it raises): such weights take the
    generic formula, for the sparse loss, ``CrossEntropyLoss`` and ``NLLLoss`` alike."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.tensor([0, 1, 2, 3, 1, 0])
    w = torch.rand(4, generator=g, dtype=torch.float64).to(dtype)
    xr, wr = x.double().requires_grad_(True), w.double().clone().requires_grad_(True)
    o = {"ignore_index": None, "label_smoothing": 0.0, "gamma": 0.0, "z_loss": 0.0,
         "softcap": None, "reduction": "mean"} | options  # fmt: skip
    ref, mag = _sparse_ref(xr, t, 1, wr, o)
    ref_grads = torch.autograd.grad(ref.sum(), [xr, wr])
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = ce.sparse_categorical_cross_entropy(xg, t, from_logits=True, weight=wg, **options)
    _assert_value(out, ref, mag, dtype, str(options))
    grads = torch.autograd.grad(out.sum(), [xg, wg])
    for got_g, ref_g in zip(grads, ref_grads, strict=True):
        _assert_grad(got_g, ref_g, _finite_max(ref_g) * _z_scale(xr), dtype, str(options))
    if options.get("reduction", "mean") == "mean" and "z_loss" not in options:
        module = ce.nn.CrossEntropyLoss(
            weight=w.clone().requires_grad_(True),
            ignore_index=options.get("ignore_index", -100),
            label_smoothing=options.get("label_smoothing", 0.0),
        )
        (w_grad,) = torch.autograd.grad(module(x, t), [module.weight])
        _assert_grad(w_grad, ref_grads[1], _finite_max(ref_grads[1]) * _z_scale(xr), dtype, "nn")
    if not options:
        log_p = torch.log_softmax(x.float(), 1).to(dtype)
        wn = w.clone().requires_grad_(True)
        (w_grad,) = torch.autograd.grad(ce.nn.NLLLoss(weight=wn)(log_p, t), [wn])
        assert w_grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.2, "ignore_index": 3},
        {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 3.0},
        {"label_smoothing": 0.1, "gamma": 2.0},
    ],
)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_zero_class_weight_keeps_its_gradient(backend: str, options: Any) -> None:
    """A summed loss is affine in the class weights (the z-loss is not weighted), so d/dw_k is
    the loss with weight e_k less the loss with weight 0. The
    smoothing sum dropped every term of a zero weight before the product (meant for a masked
    class's 0 * inf), and with it that term's derivative: 1.42 for 1.52 (sum) and up to a
    third of the weights' gradient missing (mean), on PyTorch and JAX alike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    x[1, 2] = -math.inf  # a masked class of a counted row: weight 0, its term 0 (not 0 * inf)
    t = torch.tensor([0, 0, 1, 3, 2])
    w = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    if backend == "torch":
        xp_x, xp_t, as_w = x, t, lambda v: v
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        xp_x, xp_t = jax.numpy.asarray(x.numpy()), jax.numpy.asarray(t.numpy())
        as_w = lambda v: jax.numpy.asarray(v.numpy())  # noqa: E731

    def loss(weight: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            xp_x, xp_t, from_logits=True, weight=weight, reduction="sum", **options
        )

    if backend == "torch":
        wg = w.clone().requires_grad_(True)
        got = torch.autograd.grad(loss(wg), wg)[0].numpy()
    else:
        got = np.asarray(jax.grad(loss)(as_w(w)))
    base = float(loss(as_w(torch.zeros(4, dtype=torch.float64))))
    units = torch.eye(4, dtype=torch.float64)
    want = np.array([float(loss(as_w(units[k]))) - base for k in range(4)])
    assert want[2] == math.inf  # the masked class: one-sided, its term held at 0 for w_2 = 0
    np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-12)


def _masked_batch() -> tuple[Any, Any]:
    """Row 0 plain, row 1 with a masked class (target 0 there), row 2 NaN with no target mass."""
    x = torch.tensor([[0.5, 1.0, -1.0], [0.2, -math.inf, 0.3], [math.nan, 1.0, 2.0]],
                     dtype=torch.float64)  # fmt: skip
    t = torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    return x, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("traced", [False, True])
def test_categorical_guarded_form_keeps_nan_and_zero_target_gradients(
    dtype: Any, traced: bool
) -> None:
    """The guarded product (after a NaN result, and under torch.func) zeroes only 0 · (-inf):
    a NaN row with no target mass stays NaN (as NumPy, JAX and PyTorch give), and a class
    with target (or weight) 0 keeps the derivative -log p of the loss for it."""
    x, t = _masked_batch()
    got = ce.categorical_cross_entropy(x.to(dtype), t, from_logits=True, reduction="none")
    assert got[:2].isfinite().all()
    assert got[2].isnan()
    assert np.isnan(ce.categorical_cross_entropy(x.numpy(), t.numpy(), from_logits=True,
                                                 reduction="none")[2])  # fmt: skip
    xs, ts = x[:2].to(dtype), t[:2].clone()
    w = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)

    def loss(tt: Any, ww: Any) -> Any:
        return ce.categorical_cross_entropy(xs, tt, from_logits=True, weight=ww, reduction="sum")

    if traced:
        g_t, g_w = torch.func.grad(loss, argnums=(0, 1))(ts, w)
    else:
        tg, wg = ts.clone().requires_grad_(True), w.clone().requires_grad_(True)
        g_t, g_w = torch.autograd.grad(loss(tg, wg), [tg, wg])
    nll = -torch.log_softmax(xs.double(), 1)  # the float64 value of the rounded logits
    tol = 1e-6 if dtype != torch.float64 else 1e-13
    # d/dt_ik = -w_k log p_ik (a masked class: 0, the guarded log); d/dw_k = -sum_i t_ik log p_ik
    want_t = torch.where(nll.isinf(), 0.0, w * nll)
    torch.testing.assert_close(g_t, want_t, rtol=tol, atol=0)
    want_w = torch.where(nll.isinf(), 0.0, ts * nll).sum(0)
    torch.testing.assert_close(g_w, want_w, rtol=tol, atol=0)


def test_binary_traced_target_gradient_at_hard_targets() -> None:
    """torch.func (the traced form): d loss / d t = -x also where a hard target agrees with the
    logit's sign (it was 0 there), 0 at an infinite logit; as the eager paths give."""
    x = torch.tensor([2.0, -3.0, 0.5, -0.5, 0.0, math.inf, -math.inf], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)

    def loss(tt: Any) -> Any:
        return ce.binary_cross_entropy(x, tt, from_logits=True, reduction="sum")

    traced = torch.func.grad(loss)(t)
    tg = t.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(loss(tg), [tg])
    want = torch.where(x.isinf(), 0.0, -x)
    torch.testing.assert_close(traced, want, rtol=0, atol=0)
    torch.testing.assert_close(eager, want, rtol=0, atol=0)
    assert float(loss(t)) == pytest.approx(float(_binary_ref(x, t, None, None, {
        "label_smoothing": 0.0, "gamma": 0.0, "alpha": None, "reduction": "sum"})[0]))  # fmt: skip


# --------------------------------------------------------------------------- workspace reuse


def _workspace_cases() -> list[Callable[[], list[Any]]]:
    """Calls through every path with a reused buffer (shrunk thresholds: chunked), each
    returning its loss and gradient."""
    g = torch.Generator().manual_seed(5)
    cases: list[Callable[[], list[Any]]] = []
    for dtype, shape, red in [
        (torch.bfloat16, (37, 11), "mean"), (torch.float16, (9, 50), "none"),
        (torch.float32, (40, 7), "sum"), (torch.bfloat16, (5, 300), "sum"),
    ]:  # fmt: skip
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        y = torch.randint(0, shape[1], (shape[0],), generator=g).to(torch.int32)
        soft = torch.softmax(torch.randn(shape, generator=g), 1).to(dtype)
        bt = torch.rand(shape, generator=g)
        pw = torch.rand(shape[1], generator=g) * 2

        def run(x: Any = x, y: Any = y, soft: Any = soft, bt: Any = bt, pw: Any = pw,
                red: str = red) -> list[Any]:  # fmt: skip
            out = []
            for fn, target, kw in [
                (ce.sparse_categorical_cross_entropy, y, {"ignore_index": 0}),
                (ce.sparse_categorical_cross_entropy, y, {"z_loss": 1e-3}),
                (ce.categorical_cross_entropy, soft, {"label_smoothing": 0.1}),
                (ce.binary_cross_entropy, bt, {"pos_weight": pw}),
            ]:
                xg = x.clone().requires_grad_(True)
                loss = fn(xg, target, from_logits=True, reduction=red, **kw)
                (grad,) = torch.autograd.grad(loss.sum(), [xg])
                with torch.no_grad():
                    out += [
                        loss.detach(),
                        grad,
                        fn(x, target, from_logits=True, reduction=red, **kw),
                    ]
            return out

        cases.append(run)
    return cases


def test_workspace_reuse_never_leaks_between_calls() -> None:
    """Calls of different shapes, dtypes and options one after another, in one thread and in
    two at once, give the bits each gives alone: the per-thread buffers carry nothing over."""
    with _thresholds(True):
        cases = _workspace_cases()
        alone = [case() for case in cases]
        for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
            for i in order:
                for got, want in zip(cases[i](), alone[i], strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        results: dict[int, list[Any]] = {}

        def worker(k: int) -> None:
            order = range(len(cases)) if k % 2 else reversed(range(len(cases)))
            results[k] = [(i, cases[i]()) for _ in range(3) for i in order]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    for k in range(2):
        for i, got_all in results[k]:
            for got, want in zip(got_all, alone[i], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
