"""float16 hidden states with a float16 head: the hidden gradient under small upstream gradients.

The products run in float16. The logits gradient :math:`G` (formed in float32) is rounded to
float16 for :math:`G W`; with the mean's :math:`1/N` or a small upstream gradient inside it
(``reduction="none"``, log-probs), or formed in forward and scaled by an AMP loss scale
afterwards (``"mean"``), its small entries and the product fell into float16's subnormals or to
zero. Errors are normwise, ``||g - g64|| / ||g64||`` in units of float16's rounding
:math:`2^{-11}`, against float64 autograd of the materialized formula on the same (float16)
inputs; the bars are PyTorch's own float16 computation (``F.linear`` in float16, then the loss)
and one unit above the reference rounded once to float16 (the best any float16 result is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from crossent.fused import (  # noqa: E402
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)

N, D, V = 2048, 16, 8000
UNIT = 2.0**-11  # float16's unit roundoff


def _data() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(N, D, generator=gen).half(),
        # logits of spread ~3: many probabilities far below 1/V
        "weight": (torch.randn(V, D, generator=gen) * (2.0 / D**0.5)).half(),
        "t_hidden": torch.randn(N, D, generator=gen).half(),
        "t_weight": (torch.randn(V, D, generator=gen) * (2.0 / D**0.5)).half(),
        "target": torch.randint(0, V, (N,), generator=gen),
        "a": torch.linspace(-1.0, 1.0, N, dtype=torch.float64),
        "b": torch.linspace(0.5, -0.3, N, dtype=torch.float64),
    }


def _loss(fn: str, reduction: str, data: dict[str, Any], *, fused: bool) -> Callable[..., Any]:
    """The loss of (hidden, weight): crossent's fused function, or the materialized formula in
    the inputs' dtype (PyTorch's float16 path; float64: the reference)."""
    y = data["target"]

    def loss(h: Any, w: Any) -> Any:
        if fn == "linear_log_probs":  # sum_i a_i log p_{y_i} + b_i H_i
            if fused:
                lp, ent = linear_log_probs(h, w, y, return_entropy=True, chunk_size=200)
            else:
                ls = torch.log_softmax(F.linear(h, w), -1)
                lp, ent = ls.gather(1, y[:, None]).squeeze(1), -(ls.exp() * ls).sum(-1)
            return (lp * data["a"].to(lp.dtype) + ent * data["b"].to(ent.dtype)).sum()
        if fn == "linear_distillation_loss":  # beta = 0: KL(teacher || student)
            th, tw = data["t_hidden"].to(h.dtype), data["t_weight"].to(w.dtype)
            if fused:
                return linear_distillation_loss(
                    h, w, th, tw, beta=0.0, reduction=reduction, chunk_size=200
                )
            s = torch.log_softmax(F.linear(h, w), -1)
            t = torch.log_softmax(F.linear(th, tw), -1)
            rows = (t.exp() * (t - s)).sum(-1)
            return rows.mean() if reduction == "mean" else rows
        if fused:
            return linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=200)
        return F.cross_entropy(F.linear(h, w), y, reduction=reduction)

    return loss


def _grads(loss: Callable[..., Any], h: Any, w: Any, up: float) -> tuple[Any, Any]:
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = loss(h, w)
    out.backward(torch.full_like(out, up))  # up is exact in float16 and float64
    return h.grad, w.grad


def _units(got: Any, exact: Any) -> float:
    return float((got.double() - exact).norm() / exact.norm()) / UNIT


# (function, reduction, upstream gradient): a GradScaler-like scale 2**16 on a mean, the mean
# of per-row losses taken outside (1/N), a small upstream gradient
CASES = [
    ("linear_cross_entropy", "mean", 2.0**16 / N),
    ("linear_cross_entropy", "mean", 1.0),
    ("linear_cross_entropy", "none", 1.0 / N),
    ("linear_log_probs", "none", 1.0 / N),
    ("linear_log_probs", "none", 2.0**-14),
    ("linear_distillation_loss", "mean", 2.0**16 / N),
    ("linear_distillation_loss", "none", 1.0 / N),
]


@pytest.mark.parametrize(("fn", "reduction", "up"), CASES)
def test_float16_hidden_gradient_under_small_upstream_gradients(
    fn: str, reduction: str, up: float
) -> None:
    """Before the logits gradient's rows were lifted (powers of two) ahead of its rounding to
    float16, here: 10.2 units against PyTorch's 0.93 ("mean", 2**16 / N), 27.4 against 2.6 for
    the distillation loss, 28.6 / 272 for the log-probs (upstream 2**-11 / 2**-14; PyTorch
    75 / 640); now 0.52, 0.94, 0.66 / 2.05. The logits themselves are float16 (the product
    dtype), which the distillation loss's difference of probabilities magnifies: hence one unit
    above the reference's own rounding, not half."""
    data = _data()
    h, w = data["hidden"], data["weight"]
    exact_h, exact_w = _grads(_loss(fn, reduction, data, fused=False), h.double(), w.double(), up)
    got_h, got_w = _grads(_loss(fn, reduction, data, fused=True), h, w, up)
    theirs_h, theirs_w = _grads(_loss(fn, reduction, data, fused=False), h, w, up)
    assert (got_h.dtype, got_w.dtype) == (torch.float16, torch.float16)
    floor = _units(exact_h.half(), exact_h)
    ours, theirs = _units(got_h, exact_h), _units(theirs_h, exact_h)
    assert ours <= theirs, (ours, theirs, floor)
    assert ours <= floor + 1.0, (ours, theirs, floor)
    # the weight gradient reads the float32 logits gradient on the CPU (not lifted)
    assert _units(got_w, exact_w) <= _units(theirs_w, exact_w)


def test_float16_lifted_rows_do_not_overflow() -> None:
    """The lift is bounded through the head's column norms: a head with entries up to
    ~100 (a lift bounded by the row of G alone overflows its products to inf here) and large
    gradients stay finite, and no less accurate than PyTorch's float16 path (the float16
    logits of such a head carry most of the error)."""
    data = _data()
    h = data["hidden"][:64]
    w = data["weight"] * 30.0
    y = data["target"][:64]
    for reduction, up in (("mean", 2.0**16 / 64), ("none", 2.0**4), ("sum", 2.0**4)):

        def loss(a: Any, b: Any, reduction: str = reduction) -> Any:
            return linear_cross_entropy(a, b, y, reduction=reduction, chunk_size=24)

        def ref(a: Any, b: Any, reduction: str = reduction) -> Any:
            return F.cross_entropy(F.linear(a, b), y, reduction=reduction)

        got, _ = _grads(loss, h, w, up)
        exact, _ = _grads(ref, h.double(), w.double(), up)
        theirs, _ = _grads(ref, h, w, up)
        assert float(exact.abs().max()) > 2.0**10
        assert bool(got.isfinite().all())
        assert _units(got, exact) <= _units(theirs, exact) + 0.1


def test_float16_products_compiled_equal_eager() -> None:
    """Under torch.compile the gradient formed in forward comes out of the op in float32 (the
    lifted rows widened, exact), so the compiled gradient equals the eager one bit for bit."""
    data = _data()
    h, w, y = data["hidden"][:256], data["weight"], data["target"][:256]

    def loss(a: Any, b: Any) -> Any:
        return linear_cross_entropy(a, b, y, chunk_size=100)

    up = 2.0**16 / 256
    eager = _grads(loss, h, w, up)
    compiled = _grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), h, w, up)
    assert torch.equal(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])


def test_float16_vocabulary_slices_keep_the_lifted_rows() -> None:
    """On a vocabulary split over ranks (threads standing in for torch.distributed) each slice's
    contribution is formed lifted and kept so (a ``RowScaled``): widened, summed over the ranks
    and scaled before its one rounding. It was a float16 tensor scaled and summed in float16:
    10.3 units against float64 here ("mean", 2**16 / N), now within one of the reference's
    own rounding."""
    from crossent.fused._chunked import LinearCEOptions, RowScaled, VocabShard, _chunked_linear_ce
    from tests._ranks import ThreadRanks

    data = _data()
    h, w, y = data["hidden"], data["weight"], data["target"]
    opts = LinearCEOptions(-100, 0.0, 0.0, None, "mean", 300)
    splits = (0, 3000, V)
    up = torch.tensor(2.0**16 / N)
    ranks = ThreadRanks(2)
    outs: list[Any] = [None, None]

    def run(rank: int) -> None:
        lo, hi = splits[rank], splits[rank + 1]
        reduce_max = ranks.reducer(rank, lambda xs: torch.stack(xs).amax(0), in_place=True)
        reduce_sum = ranks.reducer(rank, lambda xs: torch.stack(xs).sum(0), in_place=True)
        shard = VocabShard(lo, V, reduce_max, reduce_sum)
        res = _chunked_linear_ce(
            h, w[lo:hi], y, bias=None, class_weight=None, opts=opts,
            compute_grad=(True, False, False), shard=shard,
        )  # fmt: skip
        g = res.grad_hidden
        # as crossent.fused._function.fused_backward does with either form
        if isinstance(g, RowScaled):
            outs[rank] = g.scaled(up, reduce_sum)
        else:
            assert g is not None
            g.mul_(up)
            reduce_sum(g)
            outs[rank] = g

    ranks.run(run)
    h64 = h.double().requires_grad_()
    F.cross_entropy(h64 @ w.double().T, y).backward(up.double())
    exact = h64.grad
    assert torch.equal(outs[0], outs[1])
    assert outs[0].dtype == torch.float16
    assert _units(outs[0], exact) <= _units(exact.half(), exact) + 1.0


@pytest.fixture
def cuda_weight_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's weight-gradient product, emulated on the CPU: float16 operands accumulated and
    written in float32 (``torch.mm(..., out_dtype=torch.float32)``, which the CPU lacks) by the
    float32 product of the upcast operands; the chunk loop then reads the logits gradient in
    float16 for the weight gradient, as it does on a GPU."""
    from crossent.fused import _chunked

    mm, addmm = torch.mm, torch.addmm

    def mm_(a: Any, b: Any, *, out_dtype: Any = None, out: Any = None) -> Any:
        if out_dtype is not None:
            a, b = a.to(out_dtype), b.to(out_dtype)
        return mm(a, b) if out is None else mm(a, b, out=out)

    def addmm_(c: Any, a: Any, b: Any, *, out_dtype: Any = None, out: Any = None, **kw: Any) -> Any:
        if out_dtype is not None:
            a, b = a.to(out_dtype), b.to(out_dtype)
        return addmm(c, a, b, **kw) if out is None else addmm(c, a, b, out=out, **kw)

    monkeypatch.setattr(torch, "mm", mm_)
    monkeypatch.setattr(torch, "addmm", addmm_)
    monkeypatch.setattr(_chunked, "_mm_out_dtype", lambda x: x.dtype == torch.float16)


@pytest.mark.usefixtures("cuda_weight_product")
@pytest.mark.parametrize(("fn", "reduction", "up"), CASES)
@pytest.mark.parametrize("hidden_grad", [True, False])
def test_float16_weight_gradient_of_the_float16_product(
    fn: str, reduction: str, up: float, hidden_grad: bool
) -> None:
    """Where the weight gradient is a float16 product accumulated in float32 (CUDA), the
    logits gradient it reads was rounded to float16 as it was: the mean's 1/N or a small
    upstream gradient put most of its entries among float16's subnormals or at 0 (95 % of
    them here). It is scaled by a power of two per chunk first, and the product by its
    inverse. Also with the head alone requiring a gradient (no hidden gradient, no lift)."""
    data = _data()
    h, w = data["hidden"], data["weight"]
    _, exact_w = _grads(_loss(fn, reduction, data, fused=False), h.double(), w.double(), up)
    _, theirs_w = _grads(_loss(fn, reduction, data, fused=False), h, w, up)
    w_ = w.detach().clone().requires_grad_(True)
    h_ = h.detach().clone().requires_grad_(hidden_grad)
    out = _loss(fn, reduction, data, fused=True)(h_, w_)
    out.backward(torch.full_like(out, up))
    assert w_.grad is not None
    assert w_.grad.dtype == torch.float16
    ours, floor = _units(w_.grad, exact_w), _units(exact_w.half(), exact_w)
    assert ours <= _units(theirs_w, exact_w), (ours, floor)
    assert ours <= floor + 1.0, (ours, floor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("fn", "reduction", "up"), CASES[:4])
def test_float16_weight_gradient_on_cuda(fn: str, reduction: str, up: float) -> None:
    """The emulated cases above on a GPU, where the weight gradient is the float16 product
    accumulated in float32 itself (``benchmarks/gpu_check.py`` runs this file)."""
    data = {k: v.cuda() for k, v in _data().items()}
    h, w = data["hidden"], data["weight"]
    _, exact_w = _grads(_loss(fn, reduction, data, fused=False), h.double(), w.double(), up)
    _, got_w = _grads(_loss(fn, reduction, data, fused=True), h, w, up)
    assert got_w.dtype == torch.float16
    assert _units(got_w, exact_w) <= _units(exact_w.half(), exact_w) + 1.0
