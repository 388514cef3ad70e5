"""The Triton kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).

The variable must be set when the kernels are decorated: it is set here, at
import, ``crossent.fused._kernels`` is (re)loaded under it, so the kernels run in
the interpreter whatever was imported before, and the previous value is restored
once everything is decorated; each test sets it again while it runs (Triton
reads it at launch as well). Sizes are tiny (the interpreter
runs each program in NumPy) and the tiles small, so every kernel walks several
vocabulary tiles with a ragged last one.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import os
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

if "crossent.fused._kernels" in sys.modules:  # decorated without the interpreter: redo it
    importlib.reload(sys.modules["crossent.fused._kernels"])

import triton.language as tl  # noqa: E402

import crossent as ce  # noqa: E402
from crossent._lib._xp import array_namespace  # noqa: E402
from crossent._losses import _rows  # noqa: E402
from crossent.fused import _kernels, _launch  # noqa: E402
from crossent.fused._chunked import (  # noqa: E402
    LinearCEOptions,
    WideBlocks,
    _chunked_linear_ce,
    softmax_stats_,
)

BLOCK = 16


def _plain(grads: Any) -> list[Any]:
    """The results of ``_chunked_linear_ce`` with a blocked float32 weight gradient (a
    half-precision head's) as one float32 tensor."""
    return [g.rounded(None, torch.float32) if isinstance(g, WideBlocks) else g for g in grads]


@pytest.fixture(autouse=True)
def _interpreter_and_small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton reads it again at launch
    monkeypatch.setattr(_launch, "BLOCK_V", BLOCK)
    # Triton decorates its own language functions (tl.max, tl.sum, ...) when it is first
    # imported: imported before this module set the variable (torch's compile stack does,
    # e.g. tests/losses/test_compiled_validation.py first in the same process), they are
    # compiled-kernel functions the interpreter cannot call ("Cannot call @triton.jit'd
    # outside of the scope of a kernel": 79 failures). The interpreter's own, for the test.
    for name, member in vars(tl).items():
        if isinstance(member, triton.runtime.JITFunction):
            monkeypatch.setattr(tl, name, _interpreted(member.fn))


def _interpreted(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _triton_and_pytorch(
    h: Any, w: Any, y: Any, opts: LinearCEOptions, kw: dict[str, Any]
) -> list[tuple[Any, Any]]:
    """The results of ``_chunked_linear_ce`` with the Triton kernels and on the PyTorch path,
    paired, where the PyTorch path has one (then so must Triton, in the same dtype)."""
    ref = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=False), **kw)
    got = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=True), **kw)
    pairs = []
    for g, r in itertools.zip_longest(_plain(got), _plain(ref)):
        if r is None:
            assert g is None
            continue
        assert g is not None
        assert g.dtype == r.dtype
        pairs.append((g, r))
    return pairs


def _tol(dtype: Any) -> dict[str, float]:
    return (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    )


@triton.jit
def _tanh_sech2_probe(X, T, S, n, BLOCK_V: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < n
    t, s2 = _kernels._tanh_sech2(tl.load(X + offs, mask=mask))
    tl.store(T + offs, t, mask=mask)
    tl.store(S + offs, s2, mask=mask)


def _tanh_sech2(x: Any) -> tuple[Any, Any]:
    """The kernels' ``_tanh_sech2`` of `x`, elementwise: (tanh x, 1 - tanh² x)."""
    t, s2 = torch.empty_like(x), torch.empty_like(x)
    _tanh_sech2_probe[(triton.cdiv(x.numel(), 64),)](x, t, s2, x.numel(), BLOCK_V=64)
    return t, s2


# Everything is decorated now; leave the environment as it was for other test modules.
if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_is_accurate_near_zero_and_saturates(dtype: Any) -> None:
    x = torch.cat(
        [
            torch.linspace(-3, 3, 601, dtype=dtype),
            torch.tensor(
                [0.0, 1e-30, -1e-8, 0.1249, 0.1251, -0.125, 20.0, -20.0, 1e4], dtype=dtype
            ),
        ]
    )
    y, _ = _tanh_sech2(x)
    want = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps
    err = ((y.double() - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny)).max()
    assert err <= 4 * ulp
    assert torch.equal(y[-1], torch.tensor(1.0, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_slope_is_accurate_where_tanh_saturates(dtype: Any) -> None:
    """1 - tanh^2 (the soft cap's slope): ``1 - t * t`` lost 1e-3 relative at |u| = 5 in
    float32; 4 e / (1 + e)^2 keeps a few ulps up to where it underflows."""
    x = torch.cat([torch.linspace(-12, 12, 961, dtype=dtype), torch.tensor([0.0, 0.1251, 40.0])])
    _, y = _tanh_sech2(x)
    want = 1 / torch.cosh(x.double()) ** 2
    err = ((y.double() - want).abs() / want).max()
    assert err <= 8 * torch.finfo(dtype).eps, err


@pytest.mark.parametrize(
    ("dtype", "cap", "weighted"),
    [(torch.float32, None, False), (torch.float64, 2.0, True), (torch.float32, 5.0, True)],
)
def test_row_stats_kernel_gives_the_row_statistics(
    dtype: Any, cap: float | None, weighted: bool
) -> None:
    """The kernel's (m, s, Σ w (m - z), z_y) are the fields of ``_rows.row_stats``, and
    so are those of the PyTorch path's in-place producer (``softmax_stats_``)."""
    gen = torch.Generator().manual_seed(1)
    n, v = 6, 53
    x = torch.randn(n, v, generator=gen, dtype=dtype) * 4
    x[2, 40] = 1e3  # peak in a late tile
    y = torch.randint(0, v, (n,), generator=gen)
    cw = torch.rand(v, generator=gen, dtype=dtype) if weighted else None
    before = x.clone()
    got = _launch.row_stats(x, y, cw, softcap=cap, smoothing=True)
    assert torch.equal(x, before)  # the statistics kernel only reads
    z = x if cap is None else cap * torch.tanh(x / cap)
    want = _rows.row_stats(z, y, cw, xp=array_namespace(z))
    for g, w in zip(got, (want.m, want.s, want.wd, want.z_y), strict=True):
        torch.testing.assert_close(g, w, **_tol(dtype))
    work = z.clone()
    eager = softmax_stats_(work, y, cw, offset=0, with_wz=True)
    for field in ("m", "s", "wd", "z_y", "w_y"):
        a, b = getattr(eager, field), getattr(want, field)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **_tol(dtype))
    torch.testing.assert_close(work, torch.softmax(z, dim=1), **_tol(dtype))


@pytest.mark.parametrize(
    ("cap", "weighted", "eps", "zeta"), [(None, False, 0.1, 0.0), (3.0, True, 0.2, 1e-2)]
)
def test_logits_grad_kernel_matches_formula(
    cap: float | None, weighted: bool, eps: float, zeta: float
) -> None:
    gen = torch.Generator().manual_seed(2)
    n, v, num_classes = 5, 37, 50  # a slice of a 50-class vocabulary
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=gen)
    y[[1, 4]] = torch.tensor([-3, v + 2])  # labels in other slices: no target term
    owned = (y >= 0) & (y < v)
    cw = torch.rand(v, generator=gen, dtype=torch.float64) if weighted else None
    w_y, scale = (torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(2))
    total = 7.5
    z = x if cap is None else cap * torch.tanh(x / cap)
    lse = torch.logsumexp(z, 1) + 0.25  # the whole vocabulary's lse is above the slice's
    p = torch.exp(z - lse[:, None])
    onehot = torch.nn.functional.one_hot(y.clamp(0, v - 1), v).double() * owned[:, None]
    w = cw if cw is not None else torch.ones(v, dtype=torch.float64)
    b = (1 - eps) * w_y
    a = b + eps / num_classes * total + 2 * zeta * lse
    e = eps / num_classes
    want = (a[:, None] * p - b[:, None] * onehot - e * w) * scale[:, None]
    if cap is not None:
        want = want * (1 - torch.tanh(x / cap) ** 2)
    _launch.logits_grad_(
        x, y, cw, lse, w_y, scale, total,
        label_smoothing=eps, num_classes=num_classes, z_loss=zeta, softcap=cap,
    )  # fmt: skip
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-13)


COMBOS = [
    # bias, class_weight, eps, z_loss, softcap, reduction, dtype
    (False, False, 0.0, 0.0, None, "mean", torch.float32),
    (True, True, 0.2, 1e-2, 2.0, "none", torch.float64),
    (True, False, 0.1, 0.0, 3.0, "sum", torch.float32),
    (False, True, 0.0, 1e-2, None, "mean", torch.bfloat16),
]


@pytest.mark.parametrize(("bias", "cw", "eps", "zeta", "cap", "reduction", "dtype"), COMBOS)
def test_chunk_loop_with_triton_equals_pytorch_path(
    bias: bool, cw: bool, eps: float, zeta: float, cap: float | None, reduction: str, dtype: Any
) -> None:
    gen = torch.Generator().manual_seed(3)
    n, d, v = 19, 7, 45
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(v, d, generator=gen) * 2).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::4] = -100
    kw: dict[str, Any] = {
        "bias": torch.randn(v, generator=gen).to(dtype) if bias else None,
        "class_weight": torch.rand(v, generator=gen).to(dtype) if cw else None,
        "compute_grad": True,
        "row_scale": torch.randn(n, generator=gen).to(dtype) if reduction == "none" else None,
    }
    opts = LinearCEOptions(-100, eps, zeta, cap, reduction, 8)
    tol = _tol(torch.float32 if dtype == torch.bfloat16 else dtype)
    for g, r in _triton_and_pytorch(h, w, y, opts, kw):
        if dtype == torch.bfloat16:
            # the same float32 gradient, rounded to bfloat16 (the Triton kernels write it
            # over the bfloat16 logits, as on CUDA: the weight gradient's products read it)
            torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=1e-3)
        else:
            torch.testing.assert_close(g, r, **tol)


def test_triton_softcap_keeps_masked_classes_masked() -> None:
    """The kernels soft-capped a logit of -inf to -c (unmasking the class); the PyTorch path
    and the unfused loss keep it -inf: losses, and gradients of the finite rows, agree."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 6, 5, 37
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    bias[[2, 20, 36]] = -math.inf
    y = torch.tensor([0, 5, 19, 21, 35, 1])
    for eps, zeta in ((0.0, 0.0), (0.0, 1e-2)):
        opts = LinearCEOptions(-100, eps, zeta, 2.0, "none", 4)
        kw: dict[str, Any] = {
            "bias": bias, "class_weight": None, "compute_grad": True,
            "row_scale": torch.randn(n, generator=gen, dtype=torch.float64),
        }  # fmt: skip
        got = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=True), **kw)
        ref = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=False), **kw)
        z = h @ w.T + bias
        want = ce.sparse_categorical_cross_entropy(
            z, y, from_logits=True, softcap=2.0, z_loss=zeta, reduction="none"
        )
        torch.testing.assert_close(got[0], want, **_tol(torch.float64))
        for g, r in zip(got, ref, strict=True):
            if r is not None:
                torch.testing.assert_close(g, r, **_tol(torch.float64))


def test_triton_path_reads_a_strided_class_weight() -> None:
    """A non-contiguous `class_weight` (every other entry of a vector): the kernels read
    it with unit stride, so they used the wrong classes' weights (loss 11.34 vs 11.39)."""
    gen = torch.Generator().manual_seed(5)
    n, d, v = 7, 5, 37
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=gen)
    cw = torch.rand(2 * v, generator=gen, dtype=torch.float64)[::2]
    opts = LinearCEOptions(-100, 0.1, 1e-3, None, "mean", 3)
    kw: dict[str, Any] = {"bias": None, "class_weight": cw, "compute_grad": True}
    got = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=True), **kw)
    kw["class_weight"] = cw.contiguous()
    ref = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=False), **kw)
    for g, r in zip(got, ref, strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, **_tol(torch.float64))


def test_triton_path_under_public_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autograd Function passes use_triton through (forced here on CPU)."""
    import crossent.fused._function as fn

    real = fn._chunked_linear_ce
    seen: list[Any] = []

    def forced(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["opts"].use_triton)
        kwargs["opts"] = dataclasses.replace(kwargs["opts"], use_triton=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, "_chunked_linear_ce", forced)
    from crossent.fused import linear_cross_entropy

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (10,), generator=gen)
    loss = linear_cross_entropy(h, w, y, softcap=4.0, label_smoothing=0.1)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    logits = 4.0 * torch.tanh(ref_h @ ref_w.T / 4.0)
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    ref.backward()
    assert seen == [None]
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


# ----------------------------------------------------------------- unfused 16-bit loss on CUDA


_CASES = [
    {},
    {"weight": True},
    {"label_smoothing": 0.1, "weight": True},
    {"z_loss": 1e-3, "softcap": 5.0},
    {"reduction": "none"},
    {"reduction": "sum", "label_smoothing": 0.2},
]


def _sparse_inputs(dtype: Any, seed: int) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 37, 5, generator=gen, dtype=torch.float64) * 3).to(dtype)  # classes on 1
    y = torch.randint(0, 37, (6, 5), generator=gen)
    y[0, :3] = -100
    w = (torch.rand(37, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return x, y, w


def _force_triton_sparse(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Send every 16-bit sparse loss to the Triton executor on the CPU (the interpreter); the
    returned list gets an item per call of it."""
    from crossent._backends import _triton_sparse

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    calls: list[int] = []
    real_apply = _triton_sparse.SparseRows.apply
    monkeypatch.setattr(
        _triton_sparse.SparseRows, "apply", lambda *a: calls.append(1) or real_apply(*a)
    )
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(c) or "plain")
def test_triton_sparse_matches_float64(
    dtype: Any, case: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """16-bit logits read as they are: loss and gradient at the dtype's rounding floor."""
    import crossent as ce

    calls = _force_triton_sparse(monkeypatch)
    x, y, w = _sparse_inputs(dtype, seed=5)
    kw = {k: (w if k == "weight" else v) for k, v in case.items()}
    x = x.requires_grad_()
    out = ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, axis=1, ignore_index=-100, **kw
    )
    xr = x.detach().double().requires_grad_()
    kw_ref = {k: (v.double() if k == "weight" else v) for k, v in kw.items()}
    ref = ce.sparse_categorical_cross_entropy(
        xr, y, from_logits=True, axis=1, ignore_index=-100, **kw_ref
    )
    up = (
        torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    )
    (g,) = torch.autograd.grad(out, x, up.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xr, up)
    assert calls, "the Triton executor did not run"
    assert out.dtype == dtype
    assert g.dtype == dtype
    rounding = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=rounding, atol=0)
    assert float((g.double() - gr).norm() / gr.norm()) < 2 * rounding
    assert not g[0, :, :3].any()  # ignored positions: no gradient


def test_triton_sparse_rows_return_the_target_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SparseRows.apply`` returns each row's target weight beside the row loss (0 at ignored
    rows, not differentiable), for the weighted mean: a plain output, where the weights went
    from ``loss_of`` to the mean through a one-element list the caller read afterwards."""
    from crossent._backends import _torch as torch_executor
    from crossent._backends import _triton_sparse
    from crossent._losses._options import make_options

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    x, y, w = _sparse_inputs(torch.bfloat16, seed=7)
    z = x.movedim(1, -1).reshape(-1, 37).contiguous().requires_grad_()
    t = y.reshape(-1)
    valid, label = t != -100, torch.where(t != -100, t, 0)
    opts = make_options(from_logits=True, ignore_index=-100)
    w32 = w.float()

    def loss_of(stats: Any) -> Any:
        return torch_executor._rows_loss(stats, w32, label, valid, 37, opts)

    row, w_y = _triton_sparse.SparseRows.apply(z, label, valid, w32, opts, loss_of, None)
    torch.testing.assert_close(w_y, torch.where(valid, w32[label], 0.0), rtol=0, atol=0)
    assert not w_y.requires_grad
    assert row.requires_grad


def test_triton_sparse_double_backward_and_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_graph gives the PyTorch formula's second derivative; -inf classes; all ignored."""
    import crossent as ce
    from crossent._backends import _triton_sparse

    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    x, y, _ = _sparse_inputs(torch.bfloat16, seed=6)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    second = []
    for on in (True, False):
        monkeypatch.setattr(_triton_sparse, "ON_CPU", on)
        xx = x.clone().requires_grad_()
        loss = ce.sparse_categorical_cross_entropy(
            xx, y, from_logits=True, axis=1, z_loss=1e-2, ignore_index=-100
        )
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), xx)
        second.append(h)
    torch.testing.assert_close(second[0], second[1])
    assert second[0].abs().sum() > 0

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    masked = x.clone()
    masked[:, 7] = -float("inf")  # a masked class (never a label)
    yy = torch.where(y == 7, 8, y)
    xm = masked.requires_grad_()
    loss = ce.sparse_categorical_cross_entropy(xm, yy, from_logits=True, axis=1, ignore_index=-100)
    (g,) = torch.autograd.grad(loss, xm)
    ref = torch.nn.functional.cross_entropy(masked.detach().double(), yy, ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=0)
    assert torch.isfinite(g).all()
    assert not g[:, 7].any()

    xa = x.clone().requires_grad_()
    none = torch.full_like(y, -100)
    loss = ce.sparse_categorical_cross_entropy(
        xa, none, from_logits=True, axis=1, ignore_index=-100
    )
    (g,) = torch.autograd.grad(loss, xa)
    assert float(loss.detach()) == 0
    assert not g.any()


def test_triton_sparse_not_used_for_focal_float32_or_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crossent._backends import _triton_sparse
    from crossent._losses._options import make_options

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    opts = make_options(from_logits=True)
    x16 = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert not _triton_sparse.usable(x16, opts)  # small: the PyTorch path is quicker
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 6)
    assert _triton_sparse.usable(x16, opts)
    assert not _triton_sparse.usable(x16.float(), opts)
    assert not _triton_sparse.usable(x16, make_options(from_logits=True, gamma=2.0))
    monkeypatch.setattr(_triton_sparse, "torch_tracing", lambda: True)
    assert not _triton_sparse.usable(x16, opts)


def test_smoothing_over_a_zero_weight_masked_class_triton_and_pytorch_agree() -> None:
    """A class of weight 0 masked by a bias of -inf, under label smoothing: the Triton kernels
    give the exact value (the class adds nothing); the PyTorch chunk path gave NaN (its
    Σ w_k (z_k - m) formed 0 · -inf), losses and gradients. Both now equal the float64 formula."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 6, 5, 37
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    bias[[2, 20]] = -math.inf
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    cw[[2, 20]] = 0.0
    y = torch.tensor([0, 5, 19, 21, 35, 1])
    scale = torch.randn(n, generator=gen, dtype=torch.float64)
    for zeta, cap in ((0.0, None), (1e-2, None), (0.0, 2.0)):
        got, ref = (
            _chunked_linear_ce(
                h, w, y, bias=bias, class_weight=cw, compute_grad=True, row_scale=scale,
                opts=LinearCEOptions(-100, 0.1, zeta, cap, "none", 4, use_triton=triton),
            )
            for triton in (True, False)
        )  # fmt: skip
        z = (h @ w.T + bias).numpy()
        want = ce.sparse_categorical_cross_entropy(
            z, y.numpy(), weight=cw.numpy(), from_logits=True, label_smoothing=0.1,
            z_loss=zeta, softcap=cap, reduction="none",
        )  # fmt: skip
        torch.testing.assert_close(ref[0], torch.from_numpy(want), **_tol(torch.float64))
        for g, r in zip(got, ref, strict=True):
            if r is not None:
                assert not r.isnan().any()
                torch.testing.assert_close(g, r, **_tol(torch.float64))


@pytest.mark.parametrize("check", [True, False])
def test_triton_sparse_bad_label_raises_with_validation_off(
    check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels read the target logit unclamped: a label outside [0, C) is a device-side
    assertion with or without validation (as PyTorch's own kernels), never a number."""
    import crossent as ce
    from crossent._backends import _triton_sparse

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    x, y, _ = _sparse_inputs(torch.bfloat16, seed=8)
    for bad in (37, -1):
        yy = y.clone()
        yy[0, 1] = bad
        with ce.validation(check), pytest.raises(RuntimeError, match=r"labels outside \[0, 37\)"):
            ce.sparse_categorical_cross_entropy(x, yy, from_logits=True, axis=1, ignore_index=-100)


def test_triton_sparse_ignored_row_of_masked_logits_gets_a_zero_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Triton sparse path (half precision on CUDA, here through the interpreter): an
    ignored row whose logits are all -inf got NaN NaN NaN NaN (its log-sum-exp L = -inf made
    p = exp(z - L) NaN, times its zero scale); now 0, the other rows unchanged."""
    from crossent._backends import _triton_sparse

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    inf = float("inf")
    z = torch.tensor([[-inf] * 4, [0.5, 1.0, -1.0, 2.0], [0.0, -inf, 3.0, 1.0]])
    y = torch.tensor([-100, 1, 2])
    grads = []
    for rows in (slice(None), slice(1, None)):
        x = z[rows].bfloat16().requires_grad_(True)
        loss = ce.sparse_categorical_cross_entropy(
            x, y[rows], from_logits=True, ignore_index=-100, reduction="sum"
        )
        loss.backward()
        grads.append(x.grad.float())
    torch.testing.assert_close(grads[0][0], torch.zeros(4), rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1:], grads[1], rtol=0, atol=0)


def test_triton_sparse_launches_few_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator every PyTorch operation is a kernel launch, which costs more host
    time than the work of a per-row operation: forward and backward around the two Triton
    kernels stay within a small, fixed number of operations (the row formula's guards for
    non-finite maxima are not re-formed for each term)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import crossent as ce
    from crossent._backends import _triton_sparse
    from crossent.fused import _launch

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            if torch.Tag.view_copy not in func.tags and not func._schema.is_mutable:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    x = torch.randn(8, 50, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50, (8,))
    y[3] = -100
    launches: list[str] = []
    real = _launch._kernels

    class Kernels:  # the kernels themselves run outside the count
        def __getattr__(self, name: str) -> Any:
            kernel = getattr(real(), name)

            class Grid:
                def __getitem__(self, grid: Any) -> Any:
                    def run(*args: Any, **kwargs: Any) -> Any:
                        launches.append(name)
                        with torch.utils._python_dispatch._disable_current_modes():
                            return kernel[grid](*args, **kwargs)

                    return run

            return Grid()

    monkeypatch.setattr(_launch, "_kernels", Kernels)
    with Count() as mode:
        loss = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, ignore_index=-100)
        loss.backward()
    assert launches == ["_row_stats_kernel", "_logits_grad_kernel"]
    host_only = ("view", "select", "expand", "detach", "empty", "scalar_tensor", "lift_fresh")
    launched = [op for op in mode.ops if not any(name in op for name in host_only)]
    # 70 before the row formula shared its guards; 28 before an ignored row's log-sum-exp
    # was made finite where it is -inf (2 operations of the rows, not the logits); 30 before
    # a counted row's without a finite max was made NaN (1 operation of the rows)
    assert len(launched) <= 31, launched


def test_triton_lookup_happens_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether Triton is installed is looked up once per process, not on every loss call (the
    lookup stats the file system: 80 µs per call, a third of a small CUDA loss's host time)."""
    import importlib.util

    from crossent._backends import _triton_sparse
    from crossent._losses._options import make_options

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    opts = make_options(from_logits=True)
    assert _triton_sparse.usable(x, opts)
    calls: list[str] = []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    for _ in range(3):
        assert _triton_sparse.usable(x, opts)
    assert calls == []


def test_triton_chunk_loop_keeps_no_float32_copy_of_bfloat16_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the Triton kernels, bfloat16 logits are read and overwritten by the gradient in
    the product dtype: no float32 chunk buffer (and its two conversion passes), the same loss
    bit for bit, gradients at bfloat16 rounding of the same float32 values."""
    from crossent.fused import _chunked

    allocated: list[tuple[str, Any]] = []
    real = _chunked._workspace

    def workspace(name: str, shape: Any, dtype: Any, device: Any) -> Any:
        allocated.append((name, dtype))
        return real(name, shape, dtype, device)

    monkeypatch.setattr(_chunked, "_workspace", workspace)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(23, 8, generator=gen).bfloat16()
    w = torch.randn(61, 8, generator=gen).bfloat16()
    y = torch.randint(0, 61, (23,), generator=gen)
    opts = LinearCEOptions(-100, 0.1, 1e-3, 4.0, "mean", 8)
    kw: dict[str, Any] = {"bias": None, "class_weight": None, "compute_grad": True}
    got = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=True), **kw)
    assert allocated == [("low", torch.bfloat16)]
    ref = _chunked_linear_ce(h, w, y, opts=dataclasses.replace(opts, use_triton=False), **kw)
    assert ("logits", torch.float32) in allocated[1:]
    torch.testing.assert_close(got.loss, ref.loss, rtol=2e-6, atol=0)
    for g, r in zip(_plain(got[1:3]), _plain(ref[1:3]), strict=True):
        torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=1e-3)


_BAD_ROWS = {
    "nan": [math.nan, 0.5, 1.0, -1.0],
    "+inf": [math.inf, 0.5, 1.0, -1.0],
    "-inf": [-math.inf] * 4,
}


# the interpreter runs the kernels in NumPy, which warns of inf - inf (a +inf logit minus its
# row max +inf, rightly NaN); a GPU does not
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("label", [-100, 0], ids=["ignored", "counted"])
@pytest.mark.parametrize("bad", list(_BAD_ROWS))
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1}, {"weight": [1.0, 2.0, 0.5, 3.0]}],
    ids=["plain", "smooth", "z_loss", "weight"],
)
def test_triton_sparse_row_without_a_finite_max_has_a_nan_gradient_throughout(
    monkeypatch: pytest.MonkeyPatch, label: int, bad: str, options: dict[str, Any]
) -> None:
    """The Triton sparse path (half precision on CUDA, here through the interpreter): a row
    holding +inf got [nan, 0, 0, 0] ([nan, 0.55, 0, 0] counted: the kernel's p = exp(z - L)
    with L = +inf is 0 at every finite logit), where F.cross_entropy and every other path
    give NaN throughout; an ignored row of -inf only keeps its zero gradient. The other rows
    are those of the batch without it."""
    from crossent._backends import _triton_sparse

    monkeypatch.setattr(_triton_sparse, "ON_CPU", True)
    monkeypatch.setattr(_triton_sparse, "MIN_ELEMENTS", 0)
    z = torch.tensor([_BAD_ROWS[bad], [0.5, 1.0, -1.0, 2.0], [0.0, -math.inf, 3.0, 1.0]])
    y = torch.tensor([label, 1, 2])
    opts = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in options.items()}
    grads = []
    for rows in (slice(None), slice(1, None)):
        x = z[rows].bfloat16().requires_grad_(True)
        loss = ce.sparse_categorical_cross_entropy(
            x, y[rows], from_logits=True, ignore_index=-100, reduction="sum", **opts
        )
        loss.backward()
        grads.append(x.grad.float())
    if bad == "-inf" and label == -100:
        torch.testing.assert_close(grads[0][0], torch.zeros(4), rtol=0, atol=0)
    else:
        assert grads[0][0].isnan().all(), grads[0][0]
    torch.testing.assert_close(grads[0][1:], grads[1], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # as above
@pytest.mark.parametrize("triton", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("bad", list(_BAD_ROWS))
@pytest.mark.parametrize(
    "options",
    [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 0.1, None), (0.0, 0.0, 3.0)],
    ids=["plain", "smooth", "z_loss", "softcap"],
)
def test_fused_counted_row_without_a_finite_max_has_nan_gradients(
    triton: bool, bad: str, options: tuple[float, float, float | None]
) -> None:
    """The fused loss, a counted row whose logits (here its bias) are all -inf: its loss is
    NaN, and its gradients were finite ([0, 0.97] for the hidden state, [0, 1, 0, 0] for the
    bias: p = 0 everywhere; [0.1, 0.9, ...] with smoothing), where the unfused loss and
    F.cross_entropy give NaN throughout (and so NaN for the weight and the bias). A row
    holding NaN or +inf already was NaN throughout (a soft cap makes +inf finite)."""
    eps, zeta, cap = options
    h = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]], dtype=torch.float64)
    bias = torch.tensor(_BAD_ROWS[bad], dtype=torch.float64)
    y = torch.tensor([1, -100])
    opts = LinearCEOptions(-100, eps, zeta, cap, "sum", 1, use_triton=triton)
    kw: dict[str, Any] = {"bias": bias, "class_weight": None, "compute_grad": True}
    loss, grad_h, grad_w, grad_b, _ = _chunked_linear_ce(h, w, y, opts=opts, **kw)
    if cap is not None and bad == "+inf":
        assert torch.isfinite(grad_h).all()
        return
    assert not torch.isfinite(loss)
    assert grad_h[0].isnan().all(), grad_h
    assert grad_w.isnan().all(), grad_w
    assert grad_b.isnan().all(), grad_b
    assert (grad_h[1] == 0).all()  # ignored: never computed


# ------------------------------------------------------------------ a cap the dtype cannot hold


@pytest.mark.parametrize("cap", [30.0, 1e36, 3.5e38, 1e39, 1e42])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_huge_softcap_equals_the_float64_reference(
    cap: float, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels took the cap as a float32 argument: 1e39 became inf and every loss NaN
    (inf · tanh(x / inf) = inf · 0); 1e36 divided a logit of 1e-3 into a subnormal. Fused
    loop (forced onto the kernels) and unfused 16-bit loss, values and gradients."""
    import crossent.fused._function as fn
    from tests.losses import test_huge_softcap as huge

    real = fn._chunked_linear_ce

    def forced(*args: Any, **kwargs: Any) -> Any:
        kwargs["opts"] = dataclasses.replace(kwargs["opts"], use_triton=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, "_chunked_linear_ce", forced)
    huge.test_fused_linear_cross_entropy_equals_the_float64_reference(cap, dtype)
    if dtype == torch.float32:
        return
    calls = _force_triton_sparse(monkeypatch)
    huge.test_torch_unfused_losses_equal_the_float64_reference(cap, dtype, grad=True)
    assert calls, "the Triton executor did not run"


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(0, 6),
    d=st.integers(1, 5),
    v=st.sampled_from([1, 2, 15, 16, 17, 40]),
    dtype=st.sampled_from(["float32", "float64", "bfloat16"]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]),
    masked=st.booleans(),
    cw=st.sampled_from([None, "random", "zeros"]),
    eps=st.sampled_from([0.0, 0.2, 1.0]),
    zeta=st.sampled_from([0.0, 1e-3]),
    cap=st.sampled_from([None, 3.0, 1e39]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    chunk=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**16),
)
def test_triton_chunk_loop_fuzz_equals_pytorch_path(
    n: int, d: int, v: int, dtype: str, scale: float, masked: bool, cw: str | None,
    eps: float, zeta: float, cap: float | None, reduction: str, chunk: int, seed: int,
) -> None:  # fmt: skip
    """Random sizes (ragged and single vocabulary tiles, empty batches), logits up to 300·d,
    classes masked by a -inf bias, class weights with zeros, every option: the Triton
    kernels give the PyTorch path's loss and gradients."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen) * scale).to(dt)
    w = torch.randn(v, d, generator=gen).to(dt)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::3] = -100
    bias = torch.randn(v, generator=gen)
    if masked and v > 1:
        off = torch.rand(v, generator=gen) < 0.3
        off[0] = False
        bias[off] = -math.inf
        y = torch.where((y >= 0) & off[y.clamp(min=0)], 0, y)
    weights = None
    if cw is not None:
        weights = torch.rand(v, generator=gen) + (0.0 if cw == "random" else 0.5)
        if cw == "zeros":
            weights[::2] = 0.0
            if masked:  # smoothing over a masked class of weight 0: tested on its own
                weights[torch.isinf(bias)] = 0.5
        weights = weights.to(dt)
    kw: dict[str, Any] = {
        "bias": bias.to(dt),
        "class_weight": weights,
        "compute_grad": True,
        "row_scale": torch.randn(n, generator=gen).to(dt) if reduction == "none" else None,
    }
    opts = LinearCEOptions(-100, eps, zeta, cap, reduction, chunk)
    z = h.double() @ w.double().T + bias.double()
    size = float(z[z.isfinite()].abs().max()) if bool(z.isfinite().any()) else 0.0
    # each path rounds a row's log-sum-exp at the logits' size: p = e^(z - lse) moves by
    # about eps |z| relative (16 eps |z| apart: 2e-4 at logits of 100 in float32)
    eps_dt = torch.finfo(torch.float32 if dt == torch.bfloat16 else dt).eps
    # and a confident row's p_y - 1 at 1 (as PyTorch's kernels): an absolute eps in each
    # logit-gradient entry, whatever the gradient's own size, times what multiplies it
    rs = kw["row_scale"]
    up = 1.0 if rs is None or not rs.numel() else max(1.0, float(rs.abs().max()))
    big_w = 1.0 if weights is None else max(1.0, float(weights.abs().max()))
    big_h = float(h.abs().max()) if h.numel() else 0.0
    natural = up * big_w * (1.0 + float(w.abs().max()) + n * big_h)
    for g, r in _triton_and_pytorch(h, w, y, opts, kw):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        scale_r = (
            float(torch.where(torch.isfinite(r), r.abs(), 0).double().max()) if r.numel() else 0
        )
        low = dt == torch.bfloat16 and g.dtype == torch.bfloat16
        rtol = 1e-2 if low else 16 * eps_dt * (1.0 + size)
        # (bfloat16 too: a batch of confident rows only has gradients at that rounding, each
        # path's p_y - 1 rounded at 1 in float32: 0 against -6e-8 where it is -3.4e-8)
        atol = rtol * scale_r + 16 * eps_dt * natural + 1e-300
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol, equal_nan=True)
