"""crossent.fused.linear_cross_entropy against the float64 reference and PyTorch's unfused loss."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
from crossent._lib._xp import array_namespace  # noqa: E402
from crossent._losses import _rows  # noqa: E402
from crossent.fused import (  # noqa: E402
    _chunked,
    linear_distillation_loss,
    linear_log_probs,
)
from crossent.fused import linear_cross_entropy as _linear_ce  # noqa: E402
from crossent.fused._chunked import (  # noqa: E402
    LinearCEOptions,
    VocabShard,
    WideBlocks,
    _auto_chunk_size,
    _chunked_linear_ce,
    softmax_stats_,
)
from tests._ranks import ThreadRanks  # noqa: E402
from tests._reference.fused import linear_cross_entropy_ref  # noqa: E402

# untyped alias: the bad-input tests pass wrong types on purpose
linear_cross_entropy: Any = _linear_ce

N, D, V = 257, 67, 1003  # odd shapes: ragged last chunk, V not a power of two


def _inputs(
    n: int = N,
    d: int = D,
    v: int = V,
    *,
    dtype: Any = None,
    ignored: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    dtype = torch.float64 if dtype is None else dtype
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2.0 / d**0.5)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    target = torch.randint(0, v, (n,), generator=gen)
    if ignored:
        target[::7] = -100
    class_weight = torch.rand(v, generator=gen, dtype=torch.float64) + 0.1
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": bias.to(dtype),
        "target": target,
        "class_weight": class_weight.to(dtype),
        "grad": grad.to(dtype),
    }


def _ours(
    data: dict[str, Any], *, bias: bool, class_weight: bool, upstream: Any, **opts: Any
) -> tuple[Any, ...]:
    """Loss and gradients of ours, through autograd, on fresh leaves."""
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_() if bias else None
    cw = data["class_weight"] if class_weight else None
    loss = linear_cross_entropy(h, w, data["target"], bias=b, class_weight=cw, **opts)
    loss.backward(upstream)
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _ref(data: dict[str, Any], *, bias: bool, class_weight: bool, upstream: Any, **opts: Any):
    opts = dict(opts)
    opts.pop("chunk_size", None)
    return linear_cross_entropy_ref(
        data["hidden"].double().numpy(),
        data["weight"].double().numpy(),
        data["target"].numpy(),
        bias=data["bias"].double().numpy() if bias else None,
        class_weight=data["class_weight"].double().numpy() if class_weight else None,
        grad_output=upstream.double().numpy(),
        **opts,
    )


def _assert_close(ours: Any, ref: Any, *, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(ours.detach().double().numpy(), ref, rtol=rtol, atol=atol)


OPTION_GRID = list(
    itertools.product(
        [False, True],  # bias
        [False, True],  # class_weight
        [0.0, 0.1],  # label_smoothing
        [0.0, 1e-3],  # z_loss
        [None, 3.0],  # softcap
        ["mean", "sum", "none"],
    )
)


@pytest.mark.parametrize(("bias", "cw", "eps", "zeta", "cap", "reduction"), OPTION_GRID)
def test_all_options_match_float64_reference(
    bias: bool, cw: bool, eps: float, zeta: float, cap: float | None, reduction: str
) -> None:
    data = _inputs()
    upstream = data["grad"] if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    opts = {
        "label_smoothing": eps,
        "z_loss": zeta,
        "softcap": cap,
        "reduction": reduction,
        "chunk_size": 64,
    }
    got = _ours(data, bias=bias, class_weight=cw, upstream=upstream, **opts)
    want = _ref(data, bias=bias, class_weight=cw, upstream=upstream, **opts)
    for g, w in zip(got, want, strict=True):
        if g is None:
            assert not bias
            continue
        _assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("bias", "cw", "eps"), [(False, False, 0.0), (True, True, 0.2)])
def test_matches_torch_unfused_autograd(reduction: str, bias: bool, cw: bool, eps: float) -> None:
    """Same value and gradients as F.cross_entropy(F.linear(...)), (..., d) hidden."""
    data = _inputs(n=60)
    h = data["hidden"].reshape(3, 20, D).clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_() if bias else None
    y = data["target"].reshape(3, 20)
    cls_w = data["class_weight"] if cw else None
    kwargs = {"reduction": reduction, "label_smoothing": eps}
    ours = linear_cross_entropy(h, w, y, bias=b, class_weight=cls_w, chunk_size=7, **kwargs)
    logits = F.linear(h, w, b).reshape(-1, V)
    theirs = F.cross_entropy(logits, y.reshape(-1), weight=cls_w, **kwargs)
    if reduction == "none":
        theirs = theirs.reshape(3, 20)
        assert ours.shape == (3, 20)
    up = data["grad"][:60].reshape(3, 20) if reduction == "none" else torch.tensor(1.3).double()
    leaves = [h, w] + ([b] if bias else [])
    g_ours = torch.autograd.grad(ours, leaves, up)
    g_theirs = torch.autograd.grad(theirs, leaves, up)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, c in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_within_float32_rounding_of_float64(reduction: str) -> None:
    data = _inputs(dtype=torch.float32)
    up = data["grad"] if reduction == "none" else torch.tensor(1.0)
    opts = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    got = _ours(data, bias=True, class_weight=True, upstream=up, chunk_size=50, **opts)
    want = _ref(data, bias=True, class_weight=True, upstream=up, **opts)
    for g, w in zip(got, want, strict=True):
        scale = float(np.max(np.abs(w)))
        assert g.dtype == torch.float32
        _assert_close(g, w, rtol=2e-5, atol=2e-6 * scale)


def _torch_unfused(
    data: dict[str, Any], upstream: Any, reduction: str
) -> tuple[Any, Any, Any, Any]:
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w, b), data["target"], reduction=reduction)
    loss.backward(upstream)
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_low_precision_no_worse_than_torch(dtype: str, reduction: str) -> None:
    """|ours − ref| against |torch − ref| (same dtype, same inputs), value and every gradient."""
    dt = getattr(torch, dtype)
    data = _inputs(dtype=dt)
    up = data["grad"] if reduction == "none" else torch.tensor(1.0, dtype=dt)
    ours = _ours(
        data, bias=True, class_weight=False, upstream=up, reduction=reduction, chunk_size=64
    )
    theirs = _torch_unfused(data, up, reduction)
    want = _ref(data, bias=True, class_weight=False, upstream=up, reduction=reduction)
    for i, (a, c, w) in enumerate(zip(ours, theirs, want, strict=True)):
        assert a.dtype == (torch.float32 if i == 0 else dt)  # the loss is float32
        err_ours = np.linalg.norm(a.double().numpy() - w)
        err_torch = np.linalg.norm(c.double().numpy() - w)
        # 1.25: the two round differently (both to the same dtype); ours keeps float32 inside
        assert err_ours <= 1.25 * err_torch + 1e-6 * np.linalg.norm(w), (err_ours, err_torch)


def test_gradcheck_float64_all_options() -> None:
    data = _inputs(n=9, d=4, v=11)
    y = data["target"]
    cw = data["class_weight"]

    def f(h: Any, w: Any, b: Any) -> Any:
        return linear_cross_entropy(
            h,
            w,
            y,
            bias=b,
            class_weight=cw,
            label_smoothing=0.2,
            z_loss=0.05,
            softcap=2.0,
            chunk_size=4,
        )

    def f_none(h: Any, w: Any, b: Any) -> Any:
        return linear_cross_entropy(h, w, y, bias=b, z_loss=0.05, reduction="none", chunk_size=3)

    args = tuple(data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(f_none, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inputs_unchanged_after_forward_and_backward(reduction: str, dtype: str) -> None:
    data = _inputs(n=40, dtype=getattr(torch, dtype))
    h = data["hidden"].requires_grad_()
    w = data["weight"].requires_grad_()
    b = data["bias"].requires_grad_()
    y, cw = data["target"], data["class_weight"]
    before = [t.detach().clone() for t in (h, w, b, y, cw)]
    versions = [t._version for t in (h, w, b, y, cw)]
    loss = linear_cross_entropy(
        h, w, y, bias=b, class_weight=cw, softcap=4.0, label_smoothing=0.1, reduction=reduction
    )
    loss.sum().backward()
    for t, old, version in zip((h, w, b, y, cw), before, versions, strict=True):
        assert torch.equal(t.detach(), old)
        assert t._version == version


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_grads(reduction: str) -> None:
    data = _inputs(n=12)
    h = data["hidden"].requires_grad_()
    w = data["weight"].requires_grad_()
    b = data["bias"].requires_grad_()
    y = torch.full((12,), -100)
    loss = linear_cross_entropy(
        h, w, y, bias=b, class_weight=data["class_weight"], reduction=reduction
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert loss.shape == ((12,) if reduction == "none" else ())
    loss.sum().backward()
    for t in (h, w, b):
        assert t.grad is not None
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("target_is_peak", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_peaked_row(target_is_peak: bool, dtype: str) -> None:
    """One logit 1e4 above the rest: finite loss, exact limits, no NaN anywhere."""
    dt = getattr(torch, dtype)
    data = _inputs(n=6, d=5, v=9, ignored=False, dtype=dt)
    h, w = data["hidden"].clone(), data["weight"].clone()
    h[0] = 0.0
    h[0, 0] = 1e4
    w[:, 0] = 0.0
    w[3, 0] = 1.0  # row 0: logit 3 is 1e4, every other logit 0
    y = data["target"].clone()
    y[0] = 3 if target_is_peak else 4
    up = data["grad"]
    opts = {"reduction": "none", "chunk_size": 4}
    d_in = {**data, "hidden": h, "weight": w, "target": y}
    got = _ours(d_in, bias=False, class_weight=False, upstream=up, **opts)
    want = _ref(d_in, bias=False, class_weight=False, upstream=up, **opts)
    assert got[0][0].item() == (0.0 if target_is_peak else 1e4)
    for g, r in zip(got, want, strict=True):
        if g is None:
            continue
        assert torch.isfinite(g).all()
        _assert_close(g, r, rtol=2e-5, atol=1e-5)


def test_nan_propagates() -> None:
    data = _inputs(n=8, ignored=False)
    h = data["hidden"].clone()
    h[2, 0] = float("nan")
    out = linear_cross_entropy(h, data["weight"], data["target"], reduction="none")
    assert torch.isnan(out[2])
    assert torch.isfinite(out[torch.arange(8) != 2]).all()


def test_no_grad_path_does_no_gradient_work(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _inputs(n=30)
    calls: list[Any] = []
    real = _chunked_linear_ce

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["compute_grad"])
        return real(*args, **kwargs)

    import crossent.fused._function as fn

    monkeypatch.setattr(fn, "_chunked_linear_ce", spy)
    h = data["hidden"].requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(h, data["weight"], data["target"])
    assert loss.grad_fn is None
    assert calls == [False]
    with_grad = linear_cross_entropy(h, data["weight"], data["target"])
    assert calls[-1] == (True, False, False)  # only hidden requires a gradient
    torch.testing.assert_close(loss, with_grad.detach())


def test_flops_are_three_matrix_products_of_counted_tokens() -> None:
    """Forward does 6·n·V·d flops (n counted tokens), backward none; "none" forward only 2·n·V·d."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d, v = 40, 16, 50
    data = _inputs(n=n, d=d, v=v, ignored=False, dtype=torch.float32)
    y = data["target"].clone()
    y[::4] = -100  # 10 ignored, 30 counted
    h = data["hidden"].requires_grad_()
    w = data["weight"].requires_grad_()
    with FlopCounterMode(display=False) as fwd:
        loss = linear_cross_entropy(h, w, y, chunk_size=8)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert fwd.get_total_flops() == 6 * 30 * v * d
    assert bwd.get_total_flops() == 0
    with FlopCounterMode(display=False) as fwd_none:
        linear_cross_entropy(h, w, y, reduction="none", chunk_size=8)
    assert fwd_none.get_total_flops() == 2 * 30 * v * d


def test_retain_graph_second_backward_recomputes() -> None:
    data = _inputs(n=20)
    h = data["hidden"].requires_grad_()
    w = data["weight"].requires_grad_()
    loss = linear_cross_entropy(h, w, data["target"], label_smoothing=0.1)
    g1 = torch.autograd.grad(loss, [h, w], retain_graph=True)
    g2 = torch.autograd.grad(loss, [h, w], torch.tensor(2.0, dtype=torch.float64))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(2 * a, b)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ce", "ce-none", "log-probs-entropy", "distill", "distill-none"])
def test_non_reentrant_activation_checkpoint(case: str, hidden_dtype: Any) -> None:
    """Under ``torch.utils.checkpoint(..., use_reentrant=False)`` (activation checkpointing
    of a block that ends in the loss) the gradients equal those without it. Backward
    unpacked the saved `hidden` twice, which the checkpoint refuses (CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(9, 6, generator=gen)
    a0 = torch.randn(6, 6, generator=gen)
    w0 = torch.randn(13, 6, generator=gen)
    y = torch.randint(0, 13, (9,), generator=gen)
    y[::4] = -100

    def block(x: Any, a: Any, w: Any) -> Any:
        h = torch.tanh(x @ a).to(hidden_dtype)  # the block's own work, then the loss
        if case.startswith("ce"):
            reduction = "none" if case == "ce-none" else "mean"
            return linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=4).sum()
        if case == "log-probs-entropy":
            lp, ent = linear_log_probs(h, w, y, return_entropy=True, chunk_size=4)
            return (lp + 0.1 * ent).sum()
        reduction = "none" if case == "distill-none" else "mean"
        t = (x @ a).detach().to(hidden_dtype)
        out = linear_distillation_loss(h, w, t, w.detach(), y, reduction=reduction, chunk_size=4)
        return out.sum()

    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x0, a0, w0)]
        loss = checkpoint(block, *leaves, use_reentrant=False) if checkpointed else block(*leaves)
        grads.append(torch.autograd.grad(loss, leaves))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_non_contiguous_inputs() -> None:
    data = _inputs(n=30)
    h = data["hidden"].t().contiguous().t()  # column-major storage
    w = data["weight"].t().contiguous().t()
    assert not h.is_contiguous()
    assert not w.is_contiguous()
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, data["target"], chunk_size=8)
    loss.backward()
    want = _ref(data, bias=False, class_weight=False, upstream=torch.tensor(1.0))
    _assert_close(loss, want[0], rtol=1e-10, atol=1e-12)
    _assert_close(h.grad, want[1], rtol=1e-10, atol=1e-12)
    _assert_close(w.grad, want[2], rtol=1e-10, atol=1e-12)


@given(
    n=st.integers(1, 12),
    v=st.integers(2, 9),
    chunk=st.one_of(st.none(), st.integers(1, 13)),
    shift=st.floats(-50, 50),
)
def test_chunking_and_bias_shift_do_not_change_result(
    n: int, v: int, chunk: int | None, shift: float
) -> None:
    """Any chunk size gives the reference; adding a constant to all logits changes nothing."""
    data = _inputs(n=n, d=3, v=v, seed=n * 31 + v)
    y = data["target"]
    b = data["bias"]
    ref = linear_cross_entropy(
        data["hidden"], data["weight"], y, bias=b, reduction="none", chunk_size=1
    )
    got = linear_cross_entropy(
        data["hidden"], data["weight"], y, bias=b + shift, reduction="none", chunk_size=chunk
    )
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_auto_chunk_size_respects_budget() -> None:
    assert _auto_chunk_size(10_000, 32_000, low_precision=False, softcap=False) == (
        _chunked.CHUNK_BUDGET_BYTES // (4 * 32_000)
    )
    assert _auto_chunk_size(10_000, 32_000, low_precision=True, softcap=True) == int(
        _chunked.CHUNK_BUDGET_BYTES // (4 * 32_000 * 2.5)
    )
    assert _auto_chunk_size(5, 32_000, low_precision=False, softcap=False) == 5
    assert _auto_chunk_size(10_000, 10**9, low_precision=False, softcap=False) == 16
    # GPUs get the larger budget (small chunks leave them idle); the CPU keeps its own
    assert _chunked.chunk_budget(torch.device("cpu")) == _chunked.CHUNK_BUDGET_BYTES
    assert _chunked.chunk_budget(torch.device("cuda")) == _chunked.CUDA_CHUNK_BUDGET_BYTES
    assert _chunked.CUDA_CHUNK_BUDGET_BYTES > _chunked.CHUNK_BUDGET_BYTES
    data = _inputs(n=50)
    auto = linear_cross_entropy(data["hidden"], data["weight"], data["target"])
    one = linear_cross_entropy(data["hidden"], data["weight"], data["target"], chunk_size=1)
    torch.testing.assert_close(auto, one)


# ----------------------------------------------------------------- vocabulary slices (core API)


@pytest.mark.parametrize(
    ("cw", "eps", "zeta", "cap", "reduction", "chunk"),
    [
        (False, 0.0, 0.0, None, "mean", 5),
        (True, 0.2, 1e-2, 2.0, "none", 4),
        (True, 0.1, 0.0, None, "sum", None),
    ],
)
def test_vocab_slices_with_hooks_equal_single_process(
    cw: bool, eps: float, zeta: float, cap: float | None, reduction: str, chunk: int | None
) -> None:
    data = _inputs(n=29, d=7, v=20)
    h, w, b, y = data["hidden"], data["weight"] * 3, data["bias"], data["target"]
    kw: dict[str, Any] = {
        "class_weight": data["class_weight"] if cw else None,
        "opts": LinearCEOptions(-100, eps, zeta, cap, reduction, chunk),
        "compute_grad": True,
        "row_scale": data["grad"] if reduction == "none" else None,
    }
    full = _chunked_linear_ce(h, w, y, bias=b, **kw)
    splits = [0, 6, 13, 20]  # uneven slices
    ranks = ThreadRanks(3)
    outs: list[Any] = [None] * 3

    def run(rank: int) -> None:
        lo, hi = splits[rank], splits[rank + 1]
        reduce_max = ranks.reducer(rank, lambda xs: torch.stack(xs).amax(0), in_place=True)
        reduce_sum = ranks.reducer(rank, lambda xs: torch.stack(xs).sum(0), in_place=True)
        outs[rank] = _chunked_linear_ce(
            h,
            w[lo:hi],
            y,
            bias=b[lo:hi],
            shard=VocabShard(lo, 20, reduce_max, reduce_sum),
            **kw,
        )

    ranks.run(run)
    for o in outs:
        torch.testing.assert_close(o.loss, full.loss)
        torch.testing.assert_close(o.lse, full.lse)
    torch.testing.assert_close(sum(o.grad_hidden for o in outs), full.grad_hidden)
    torch.testing.assert_close(torch.cat([o.grad_weight for o in outs]), full.grad_weight)
    torch.testing.assert_close(torch.cat([o.grad_bias for o in outs]), full.grad_bias)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_messages() -> None:
    data = _inputs(n=4, d=3, v=5)
    h, w, y = data["hidden"], data["weight"], data["target"]
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: linear_cross_entropy(h.numpy(), w, y), TypeError, "`hidden`"),
        (lambda: linear_cross_entropy(h, w.long(), y), TypeError, "`weight`"),
        (lambda: linear_cross_entropy(h.long(), w.long(), y), TypeError, "`hidden`"),
        (lambda: linear_cross_entropy(h, w[:, :2], y), ValueError, "`weight`"),
        (lambda: linear_cross_entropy(h, w, y[:3]), ValueError, "`target`"),
        (lambda: linear_cross_entropy(h, w, y.double()), TypeError, "`target`"),
        (lambda: linear_cross_entropy(h, w, y + 5), ValueError, "`target`"),
        (lambda: linear_cross_entropy(h, w, y, bias=w[0]), ValueError, "`bias`"),
        (lambda: linear_cross_entropy(h, w, y, bias=data["bias"].long()), TypeError, "`bias`"),
        (lambda: linear_cross_entropy(h, w, y, shift=1), TypeError, "`shift`"),
        (lambda: linear_cross_entropy(h[0], w, y[0], shift=True), ValueError, "`hidden`"),
        (
            lambda: linear_cross_entropy(h, w, y, class_weight=-data["class_weight"]),
            ValueError,
            "`class_weight`",
        ),
        (lambda: linear_cross_entropy(h, w, y, class_weight=w[0]), ValueError, "`class_weight`"),
        (lambda: linear_cross_entropy(h, w, y, reduction="avg"), ValueError, "`reduction`"),
        (
            lambda: linear_cross_entropy(h, w, y, label_smoothing=1.5),
            ValueError,
            "`label_smoothing`",
        ),
        (lambda: linear_cross_entropy(h, w, y, z_loss=-1.0), ValueError, "`z_loss`"),
        (lambda: linear_cross_entropy(h, w, y, softcap=0.0), ValueError, "`softcap`"),
        (lambda: linear_cross_entropy(h, w, y, softcap="30"), TypeError, "`softcap`"),
        (lambda: linear_cross_entropy(h, w, y, chunk_size=0), ValueError, "`chunk_size`"),
        (lambda: linear_cross_entropy(h, w, y, chunk_size=2.0), TypeError, "`chunk_size`"),
        (lambda: linear_cross_entropy(h, w, y, ignore_index=None), TypeError, "`ignore_index`"),
        # an ignore_index no int64 label can equal (with shift=True it raised a bare
        # OverflowError, "int too big to convert")
        (
            lambda: linear_cross_entropy(h[None], w, y[None], ignore_index=2**63, shift=True),
            ValueError,
            "`ignore_index` must fit in int64",
        ),
        (
            lambda: linear_log_probs(h[None], w, y[None], ignore_index=-(2**63) - 1, shift=True),
            ValueError,
            "`ignore_index` must fit in int64",
        ),
        (
            lambda: linear_distillation_loss(h, w, h, w, y, ignore_index=2**70),
            ValueError,
            "`ignore_index` must fit in int64",
        ),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


def test_label_range_check_obeys_validation_switch() -> None:
    import crossent

    data = _inputs(n=4, d=3, v=5)
    y = data["target"].clone()
    y[0] = -1  # not ignore_index
    with pytest.raises(ValueError, match="ignore_index"):
        linear_cross_entropy(data["hidden"], data["weight"], y)
    y[0] = 3
    with crossent.validation(False):
        out = linear_cross_entropy(data["hidden"], data["weight"], y, ignore_index=3)
    assert torch.isfinite(out)


# ------------------------------------------------------------------------- shapes, workspace


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_token_and_empty_batch(reduction: str) -> None:
    data = _inputs(n=1, ignored=False)
    h = data["hidden"][0].clone().requires_grad_()  # (d,) with a 0-d target
    y = data["target"][0]
    out = linear_cross_entropy(h, data["weight"], y, reduction=reduction)
    assert out.shape == ()
    out.backward()
    want = _ref(data, bias=False, class_weight=False, upstream=torch.tensor(1.0))
    _assert_close(out, np.reshape(want[0], ()), rtol=1e-10, atol=1e-12)
    _assert_close(h.grad, want[1][0], rtol=1e-10, atol=1e-12)

    empty = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    out = linear_cross_entropy(
        empty, data["weight"], torch.zeros(0, dtype=torch.long), reduction=reduction
    )
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert empty.grad is not None
    assert empty.grad.shape == (0, D)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_hidden_size_scores_the_bias(reduction: str) -> None:
    """d = 0: the logits are the bias (reshape(-1, 0) used to raise "ambiguous")."""
    data = _inputs(n=6, d=1, v=5)
    data["hidden"], data["weight"] = data["hidden"][:, :0], data["weight"][:, :0]
    up = data["grad"] if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    opts = {"bias": True, "class_weight": True, "label_smoothing": 0.1}
    ours = _ours(data, upstream=up, reduction=reduction, **opts)
    want = _ref(data, upstream=up, reduction=reduction, **opts)
    _assert_close(ours[0], want[0], rtol=1e-12, atol=1e-12)
    _assert_close(ours[3], want[3], rtol=1e-12, atol=1e-12)
    assert ours[1].shape == (6, 0)
    assert ours[2].shape == (5, 0)
    batched = linear_cross_entropy(
        data["hidden"].reshape(2, 3, 0), data["weight"], data["target"].reshape(2, 3),
        reduction="none",
    )  # fmt: skip
    torch.testing.assert_close(
        batched,
        torch.full((2, 3), math.log(5), dtype=torch.float64)
        * (data["target"].reshape(2, 3) != -100),
    )


def test_only_weight_requires_grad() -> None:
    data = _inputs(n=30)
    w = data["weight"].clone().requires_grad_()
    loss = linear_cross_entropy(data["hidden"], w, data["target"], chunk_size=9)
    loss.backward()
    want = _ref(data, bias=False, class_weight=False, upstream=torch.tensor(1.0))
    _assert_close(w.grad, want[2], rtol=1e-10, atol=1e-12)


def test_cpu_workspace_is_reused_and_released() -> None:
    data = _inputs(n=20)
    _chunked.clear_workspace()
    args = (data["hidden"], data["weight"], data["target"])
    first = linear_cross_entropy(*args, chunk_size=8)
    bufs = dict(_chunked._WORKSPACE.bufs)
    assert set(bufs) == {("logits", torch.float64)}
    ptr = bufs["logits", torch.float64].data_ptr()
    second = linear_cross_entropy(*args, chunk_size=5)  # smaller: same buffer
    assert _chunked._WORKSPACE.bufs["logits", torch.float64].data_ptr() == ptr
    torch.testing.assert_close(first, second, rtol=1e-14, atol=0)
    _chunked.clear_workspace()
    assert not hasattr(_chunked._WORKSPACE, "bufs")


def test_cpu_path_does_not_import_triton() -> None:
    """Triton is optional: the CPU path never imports it (nor the kernels module)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from crossent.fused import linear_cross_entropy\n"
        "h = torch.randn(5, 3, requires_grad=True)\n"
        "linear_cross_entropy(h, torch.randn(7, 3), torch.tensor([0, 1, 2, 3, 6])).backward()\n"
        "print('triton' in sys.modules, 'crossent.fused._kernels' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ causal shift, mixed precision


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_equals_hugging_face_convention(reduction: str) -> None:
    """shift=True == the loss of logits[..., :-1, :] against target[..., 1:], values and grads."""
    data = _inputs(n=3 * 17, d=D, v=V)
    h = data["hidden"].reshape(3, 17, D).clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    y = data["target"].reshape(3, 17)
    ours = linear_cross_entropy(
        h, w, y, bias=b, shift=True, reduction=reduction, label_smoothing=0.1, chunk_size=5
    )
    logits = F.linear(h, w, b)[:, :-1, :]
    theirs = F.cross_entropy(
        logits.reshape(-1, V), y[:, 1:].reshape(-1), reduction=reduction, label_smoothing=0.1
    )
    if reduction == "none":
        theirs = theirs.reshape(3, 16)
        assert ours.shape == (3, 16)
    up = torch.randn(ours.shape, dtype=torch.float64)
    leaves = [h, w, b]
    g_ours = torch.autograd.grad(ours, leaves, up)
    g_theirs = torch.autograd.grad(theirs, leaves, up)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, c in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert torch.equal(g_ours[0][:, -1], torch.zeros_like(g_ours[0][:, -1]))


def test_shift_single_position_and_uint8_target() -> None:
    data = _inputs(n=4, d=5, v=9)
    h = data["hidden"].reshape(4, 1, 5).requires_grad_()
    y = data["target"].reshape(4, 1).abs().to(torch.uint8)
    assert linear_cross_entropy(h, data["weight"], y, shift=True).item() == 0.0
    out = linear_cross_entropy(h, data["weight"], y, shift=True, reduction="none")
    assert out.shape == (4, 0)
    h2 = data["hidden"].reshape(2, 2, 5)
    y2 = data["target"].reshape(2, 2).abs().to(torch.uint8)
    got = linear_cross_entropy(h2, data["weight"], y2, shift=True, reduction="none")
    want = linear_cross_entropy(h2[:, 0], data["weight"], y2[:, 1].long(), reduction="none")
    torch.testing.assert_close(got[:, 0], want)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_hidden_with_float32_weight(low: str, reduction: str) -> None:
    """bfloat16/float16 hidden + float32 weight/bias: float32 loss, each grad in its own dtype.

    The products run in float32, so the result is the float32 one of the upcast hidden.
    """
    dt = getattr(torch, low)
    data = _inputs(n=40, dtype=torch.float32)
    h = data["hidden"].to(dt).requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    up = data["grad"][:40] if reduction == "none" else torch.tensor(1.0)
    opts = {"reduction": reduction, "softcap": 4.0, "chunk_size": 16}
    loss = linear_cross_entropy(h, w, data["target"][:40], bias=b, **opts)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, [h, w, b], up)
    assert [g.dtype for g in grads] == [dt, torch.float32, torch.float32]
    h32 = h.detach().float().requires_grad_()
    ref = linear_cross_entropy(h32, w, data["target"][:40], bias=b, **opts)
    ref_grads = torch.autograd.grad(ref, [h32, w, b], up)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], ref_grads[0].to(dt))
    for a, c in zip(grads[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def _normwise(got: Any, want: Any) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_distillation_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_low_precision_hidden_gradient_kept_in_its_dtype(
    fn: str, reduction: str, compiled: bool
) -> None:
    """bfloat16 hidden + float32 weight, "mean"/"sum": the hidden gradient is formed in float32
    in forward and kept in bfloat16 (each row times a power of two) until backward scales it
    by the upstream gradient, so the stash is no larger than the gradient (it was held in
    float32: N x d x 4 bytes, 2.2 chunks of logits at N=4096, d=4096, V=32000). An upstream
    gradient of 1 or a power of two gives the float32 gradient rounded once, bit for bit;
    0.37 rounds once more: within 2**-7 of the exact value elementwise, normwise no worse
    than PyTorch's own bfloat16 logits (autocast's F.linear); compiled == eager."""
    import crossent.fused as fused

    data = _inputs(n=40, dtype=torch.float32)
    y = data["target"][:40].clone()
    y[::5] = -100  # ignored rows: the gradient's rows are scattered
    teacher = (data["hidden"][:40].flip(0), data["weight"] * 0.5)

    def loss(h: Any, w: Any = data["weight"]) -> Any:
        if fn == "linear_cross_entropy":
            return fused.linear_cross_entropy(
                h, w, y, bias=data["bias"].to(w.dtype), reduction=reduction, chunk_size=16
            )
        return fused.linear_distillation_loss(h, w, *teacher, y, reduction=reduction, chunk_size=16)

    h = data["hidden"][:40].to(torch.bfloat16).requires_grad_()
    h32 = h.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad(loss(h32), [h32])
    for up in (1.0, 0.25, 4.0):
        (got,) = torch.autograd.grad(loss(h), [h], torch.tensor(up))
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (g32 * up).to(torch.bfloat16)), up
    up = torch.tensor(0.37)
    (got,) = torch.autograd.grad(loss(h), [h], up)
    exact = g32.double() * 0.37
    assert bool(((got.double() - exact).abs() <= 2.0**-7 * exact.abs()).all())
    if fn == "linear_cross_entropy":  # PyTorch's own: bfloat16 logits (autocast's F.linear)
        h2 = h.detach().clone().requires_grad_()
        logits = F.linear(h2, data["weight"].bfloat16(), data["bias"].bfloat16())
        theirs = F.cross_entropy(logits, y, reduction=reduction)
        (g_theirs,) = torch.autograd.grad(theirs, [h2], up)
        assert _normwise(got, exact) <= _normwise(g_theirs, exact)
    if compiled:
        run = torch.compile(loss, fullgraph=True, backend="aot_eager")
        (got_c,) = torch.autograd.grad(run(h), [h], up)
        assert torch.equal(got_c, got)
        # a bfloat16 head: its gradient (accumulated in float32) rounded once, as eagerly
        w16 = data["weight"].to(torch.bfloat16).requires_grad_()
        grads = [
            torch.autograd.grad(f(h.detach(), w16, y, reduction=reduction, chunk_size=16), [w16], up)
            for f in (torch.compile(fused.linear_cross_entropy, fullgraph=True, backend="aot_eager"),
                      fused.linear_cross_entropy)
        ]  # fmt: skip
        assert torch.equal(grads[0][0], grads[1][0])


@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_distillation_loss"])
def test_float16_hidden_gradient_survives_a_loss_scale(fn: str) -> None:
    """float16 hidden + float32 weight, "mean", a loss scale of 2**16 * 0.37 (AMP's GradScaler):
    the unscaled hidden gradient is subnormal in float16 here, so a stash rounded to float16
    before the scale would lose its digits; kept row-scaled by powers of two it keeps them,
    as a bfloat16 one (within twice float16's rounding elementwise, one rounding normwise)."""
    import crossent.fused as fused

    data = _inputs(n=40, dtype=torch.float32)
    # a small head: gradients below float16's normal range, normal once scaled
    w = data["weight"] * (1e-3 if fn == "linear_cross_entropy" else 1e-2)
    y = data["target"][:40]

    def loss(h: Any, weight: Any = w) -> Any:
        if fn == "linear_cross_entropy":
            return fused.linear_cross_entropy(h, weight, y, chunk_size=16)
        return fused.linear_distillation_loss(
            h, weight, data["hidden"][:40].flip(0), weight * 0.5, y, chunk_size=16
        )

    h = data["hidden"][:40].to(torch.float16).requires_grad_()
    h64 = h.detach().double().requires_grad_()
    up = torch.tensor(2.0**16 * 0.37)
    (got,) = torch.autograd.grad(loss(h), [h], up)
    (exact,) = torch.autograd.grad(loss(h64, w.double()), [h64], up.double())
    assert float(exact.abs().max()) / float(up) < 2.0**-14  # subnormal before the scale
    assert got.dtype == torch.float16
    # twice float16's rounding (2**-11, as for bfloat16 above) and its subnormal spacing
    assert bool(((got.double() - exact).abs() <= 2.0**-10 * exact.abs() + 2.0**-24).all())
    assert _normwise(got, exact) < 2.0**-11


def test_autocast_does_not_change_the_products() -> None:
    """Under CPU autocast (bfloat16) the fused loss keeps its float32 products and dtypes."""
    data = _inputs(n=30, dtype=torch.float32)
    h = data["hidden"].to(torch.bfloat16)
    w = data["weight"].clone().requires_grad_()
    plain = linear_cross_entropy(h, w, data["target"][:30], chunk_size=7)
    (g_plain,) = torch.autograd.grad(plain, [w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = linear_cross_entropy(h, w, data["target"][:30], chunk_size=7)
    (g_auto,) = torch.autograd.grad(auto, [w])
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    assert torch.equal(g_auto, g_plain)


def test_module_shift_option() -> None:
    import crossent.nn

    data = _inputs(n=2 * 9, d=D, v=V)
    h = data["hidden"].reshape(2, 9, D)
    y = data["target"].reshape(2, 9)
    module = crossent.nn.LinearCrossEntropyLoss(shift=True, reduction="sum")
    assert "shift=True" in repr(module)
    want = F.cross_entropy(
        F.linear(h[:, :-1], data["weight"]).reshape(-1, V), y[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(module(h, data["weight"], y), want)
    with pytest.raises(TypeError, match="`shift`"):
        crossent.nn.LinearCrossEntropyLoss(shift="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises_instead_of_a_wrong_number(reduction: str) -> None:
    data = _inputs(n=10)
    h = data["hidden"].clone().requires_grad_()
    loss = linear_cross_entropy(h, data["weight"], data["target"], reduction=reduction)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss.sum(), [h], create_graph=True)


# ----------------------------------------------------------------- the statistics of a slice


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("offset", [0, 4])
def test_in_place_statistics_are_the_row_statistics(weighted: bool, offset: int) -> None:
    """softmax_stats_ gives _rows.row_stats' fields (float64) and leaves the slice's softmax."""
    gen = torch.Generator().manual_seed(5)
    n, v = 7, 11
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 5
    z[0, 3] = 1e4  # a huge logit: m - z_y must stay exact
    z[1, :] = -math.inf  # a row the slice does not hold at all
    z[2, [0, 5]] = -math.inf  # masked classes
    labels = torch.randint(0, 20, (n,), generator=gen)  # some outside [offset, offset + v)
    labels[0] = offset + 3
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    want = _rows.row_stats(z, labels, cw, offset=offset, with_wz=False, xp=array_namespace(z))
    work = z.clone()
    got = softmax_stats_(work, labels, cw, offset=offset, with_wz=False)
    for field in ("m", "s", "z_y", "w_y"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    soft = torch.softmax(z[2:], dim=1)
    torch.testing.assert_close(work[2:], soft, rtol=1e-13, atol=1e-300)
    assert torch.equal(work[1], torch.zeros(v, dtype=torch.float64))  # no 0/0
    finite = slice(2, None)  # Σ w (m - z) with smoothing: finite rows only (-inf gives +inf)
    want_wz = _rows.row_stats(z[finite], labels[finite], cw, offset=offset, xp=array_namespace(z))
    got_wz = softmax_stats_(z[finite].clone(), labels[finite], cw, offset=offset, with_wz=True)
    assert torch.isinf(got_wz.wd[0])  # a masked class under smoothing: +inf, as row_stats
    assert torch.isinf(want_wz.wd[0])
    torch.testing.assert_close(got_wz.wd[1:], want_wz.wd[1:], rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(torch.as_tensor(got_wz.wsum), torch.as_tensor(want_wz.wsum))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_softcap_keeps_masked_classes_masked(chunk_size: int | None) -> None:
    """A class masked by a bias of -inf stays masked under a soft cap, as in the unfused loss;
    c·tanh(-inf/c) = -c unmasked it: losses [0.4939, 0.8620, 2.2555] where
    sparse_categorical_cross_entropy gives [0.3832, 0.6931, inf] (also linear_log_probs)."""
    gen = torch.Generator().manual_seed(11)
    n, d, v = 7, 4, 6
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    bias[[1, 4]] = -math.inf
    y = torch.tensor([0, 2, 3, 5, 0, 2, 1])  # the last one on a masked class: +inf
    for options in ({}, {"z_loss": 1e-2}, {"label_smoothing": 0.1, "reduction": "sum"}):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        got = linear_cross_entropy(
            hh, ww, y, bias=bias, softcap=2.0, chunk_size=chunk_size,
            **{"reduction": "none", **options},
        )  # fmt: skip
        h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        want = ce.sparse_categorical_cross_entropy(
            h2 @ w2.T + bias, y, from_logits=True, softcap=2.0, **{"reduction": "none", **options}
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        keep = torch.arange(n) < n - 1  # the +inf row aside: gradients of the finite rows
        if got.ndim:
            g1 = torch.autograd.grad(got[keep].sum(), (hh, ww))
            g2 = torch.autograd.grad(want[keep].sum(), (h2, w2))
            for a, b in zip(g1, g2, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    lp, ent = linear_log_probs(
        h, w, y, bias=bias, softcap=2.0, chunk_size=chunk_size, return_entropy=True
    )
    z = 2.0 * torch.tanh((h @ w.T + bias) / 2.0)
    z[:, [1, 4]] = -math.inf
    logp = torch.log_softmax(z, dim=-1)
    torch.testing.assert_close(lp, logp.gather(1, y[:, None]).squeeze(1), rtol=1e-12, atol=0)
    p_logp = torch.where(logp > -math.inf, logp.exp() * logp, 0.0)
    torch.testing.assert_close(ent, -p_logp.sum(1), rtol=1e-12, atol=1e-14)


def test_backward_scaling_reads_no_device_value() -> None:
    """The upstream gradient of a fused loss on an accelerator is not read back (a host
    synchronisation that left the GPU idle between steps); its products run instead, times 1
    for ``loss.backward()``: the same numbers. A meta tensor stands for a device tensor
    (reading its value raises)."""
    from crossent.fused._function import _unit_skipped, scale_grads_

    def scale(grads: tuple[torch.Tensor | None, ...], grad_loss: torch.Tensor) -> None:
        scale_grads_(grads, _unit_skipped(grad_loss))  # as fused_backward does

    g = torch.ones(3, 2, device="meta")
    scale((g, None), torch.ones((), device="meta"))  # bool() of it would raise
    cpu = torch.full((3, 2), 2.5)
    scale((cpu,), torch.tensor(1.0))
    assert torch.equal(cpu, torch.full((3, 2), 2.5))
    scale((cpu,), torch.tensor(2.0))
    assert torch.equal(cpu, torch.full((3, 2), 5.0))


def test_a_call_under_inference_mode_does_not_break_later_calls() -> None:
    """The CPU work buffers are cached per thread: one first made under inference mode was an
    inference tensor, and every later call with a gradient (linear_cross_entropy,
    linear_log_probs, linear_distillation_loss, in any dtype) raised 'Inplace update to
    inference tensor outside InferenceMode is not allowed' until a larger buffer replaced it."""
    gen = torch.Generator().manual_seed(31)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (6,), generator=gen)
    t_h, t_w = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    calls = {
        "ce": lambda h: _linear_ce(h, w, y),
        "ce_bf16": lambda h: _linear_ce(h.bfloat16(), w.float(), y),
        "log_probs": lambda h: linear_log_probs(h, w, y, return_entropy=True)[1].sum(),
        "distill": lambda h: linear_distillation_loss(h.float(), w.float(), t_h, t_w),
    }
    for name, call in calls.items():
        _chunked.clear_workspace()
        with torch.inference_mode():
            call(h)
        leaf = h.clone().requires_grad_()
        (got,) = torch.autograd.grad(call(leaf), [leaf])
        _chunked.clear_workspace()
        leaf = h.clone().requires_grad_()
        (want,) = torch.autograd.grad(call(leaf), [leaf])
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (``benchmarks/bf16_weight_grad.py``'s rel)."""
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_log_probs"])
@pytest.mark.parametrize("n", [1024, 4096, 16384])
def test_bfloat16_head_gradient_no_worse_than_pytorch_over_many_chunks(fn: str, n: int) -> None:
    """bfloat16 hidden states and head: the weight gradient sums one product per chunk
    (16 to 256 chunks here). Against the float64 gradient of the same bfloat16 inputs it is
    no less accurate than PyTorch's own bfloat16 computation (bfloat16 logits, autograd), at
    every N (0.43-0.55 bfloat16 unit roundoffs against PyTorch's 0.44-0.65; 5 % slack): it is
    accumulated in float32 and rounded once. A sum held in bfloat16 instead (rounded once per
    chunk, tried by patching the accumulation) fails: 2x / 4x / 10x PyTorch's error at N =
    1024 / 4096 / 16384 (``benchmarks/bf16_weight_grad.py``)."""
    d, v = 16, 128
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(n, d, generator=gen).bfloat16()
    w = (torch.randn(v, d, generator=gen) * 2 / d**0.5).bfloat16()
    y = torch.randint(0, v, (n,), generator=gen)

    def loss_of(z: torch.Tensor) -> torch.Tensor:  # the same loss on materialized logits
        if fn == "linear_cross_entropy":
            return F.cross_entropy(z, y)
        logp = torch.log_softmax(z, -1)  # log-probs and entropy (a policy gradient's)
        ent = -(logp.exp() * logp).sum(-1)
        return logp[torch.arange(n), y].float().mean() + 0.1 * ent.float().mean()

    w64 = w.double().requires_grad_()
    (want,) = torch.autograd.grad(loss_of(h.double() @ w64.T), [w64])
    w16 = w.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(loss_of(h @ w16.T), [w16])
    w_ours = w.clone().requires_grad_()
    if fn == "linear_cross_entropy":
        ours_loss = _linear_ce(h, w_ours, y, chunk_size=64)
    else:
        lp, ent = linear_log_probs(h, w_ours, y, return_entropy=True, chunk_size=64)
        ours_loss = lp.mean() + 0.1 * ent.mean()
    (ours,) = torch.autograd.grad(ours_loss, [w_ours])
    assert ours.dtype == torch.bfloat16
    assert _rel_error(ours, want) <= 1.05 * _rel_error(theirs, want), (
        _rel_error(ours, want) / 2**-8,
        _rel_error(theirs, want) / 2**-8,
    )


def test_blocked_float32_weight_gradient_is_rounded_once_block_by_block() -> None:
    """A bfloat16 head's blocked float32 gradient (``WideBlocks``): ``rounded`` scales by the
    upstream gradient and rounds once, and consumes the blocks (each freed once copied)."""
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(10, 3, generator=gen)
    factor = torch.tensor(0.37)
    parts = WideBlocks([full[:5].clone(), full[5:].clone()])
    assert torch.equal(parts.rounded(factor, torch.bfloat16), (full * factor).bfloat16())
    assert parts.blocks == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["module", "log_probs"])
def test_export_with_shift_and_a_dynamic_sequence_of_two_or_more(which: str, reduction: str):
    """torch.export of shift=True with a dynamic T: shift_target's slice of T - 1 label
    columns made export guard T - 1 != 1 ("Not all values of T ... satisfy the generated guard
    ((-1) + L['h'].size()[1]) != 1"), so Dim("T", min=2) failed for every reduction. A loss
    (mean, sum) now exports from min=2 (T = 2 scores one position). A per-position result of
    shape (..., T - 1) ("none", linear_log_probs) needs min=3, as PyTorch's own x[:, :-1]
    does: export guards every size T - 1 against 1 (its 0/1 specialization)."""
    gen = torch.Generator().manual_seed(11)
    head = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    loss = ce.nn.LinearCrossEntropyLoss(shift=True, reduction=reduction)

    class Model(torch.nn.Module):
        def forward(self, h: Any, y: Any) -> Any:
            if which == "log_probs":
                return ce.fused.linear_log_probs(h, head, y, shift=True)
            return loss(h, head, y)

    def data(t: int) -> tuple[Any, Any]:
        h = torch.randn(2, t, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 13, (2, t), generator=gen)
        y[0, -1] = -100
        return h, y

    per_position = reduction == "none" or which == "log_probs"
    steps = torch.export.Dim("T", min=3 if per_position else 2, max=64)
    model = Model()
    program = torch.export.export(model, data(5), dynamic_shapes=({1: steps}, {1: steps}))
    for t in (3, 8) if per_position else (2, 3, 8):
        h, y = data(t)
        got, want = program.module()(h, y), model(h, y)
        if per_position:
            assert got.shape == (2, t - 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
