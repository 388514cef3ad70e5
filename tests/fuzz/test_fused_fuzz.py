"""A bounded differential fuzz of the fused functions against the unfused ones in float64.

Each generated call draws the sizes (empty batches, one class, ragged chunks), the
dtypes (float32, float64, bfloat16 hidden states with a float32 head), the scale of
the logits (1e-3 to about 300), masked classes (a bias of -inf), ignored and shifted
targets, and every option of `linear_cross_entropy`, `linear_log_probs` and
`linear_distillation_loss`. The fused value and the gradients of the head's tensors
(for a random upstream gradient) must equal those of the same loss computed from the
materialized float64 logits by the unfused function (itself held to float64
references elsewhere) with PyTorch's autograd, to the rounding of the dtype: the
logits' own rounding (their size times the dtype's epsilon) allowed for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from tests.fuzz._settings import fuzz

torch = pytest.importorskip("torch")
from crossent import fused  # noqa: E402

FUZZ = fuzz(120)

EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-23}  # bfloat16: hidden only


@dataclass
class FusedCall:
    """One generated call: the function, float64 data already rounded to `dtype`, options."""

    fn: str
    dtype: str
    hidden: Any
    weight: Any
    bias: Any
    target: Any
    teacher: tuple[Any, Any, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@st.composite
def fused_calls(draw: st.DrawFn) -> FusedCall:
    fn = draw(st.sampled_from(["ce", "log_probs", "distill"]))
    dtype = draw(st.sampled_from(["float64", "float32", "bfloat16"]))
    shift = draw(st.booleans())
    batch = (
        (draw(st.integers(1, 3)), draw(st.integers(1, 7))) if shift else (draw(st.integers(0, 9)),)
    )
    d = draw(st.integers(1, 6))
    v = draw(st.integers(1, 13))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 4.0, 30.0]))
    hidden = torch.randn((*batch, d), generator=gen, dtype=torch.float64) * scale
    weight = torch.randn((v, d), generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(d))
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(v, generator=gen, dtype=torch.float64)
    target = torch.randint(0, v, batch, generator=gen)
    ignored = torch.rand(batch, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    target = torch.where(ignored, torch.full_like(target, -100), target)
    if bias is not None and v > 1 and draw(st.booleans()):  # a masked class nobody targets
        masked = int(torch.randint(0, v, (), generator=gen))
        bias[masked] = -math.inf
        target = torch.where(target == masked, (masked + 1) % v, target)
    # the float64 values the fused function sees
    h_dt = getattr(torch, dtype)
    w_dt = torch.float32 if dtype == "bfloat16" else h_dt
    hidden = hidden.to(h_dt).double()
    weight, bias = weight.to(w_dt).double(), None if bias is None else bias.to(w_dt).double()
    chunk = draw(st.sampled_from([None, 1, 2, 3, 5]))
    options: dict[str, Any] = {"chunk_size": chunk, "shift": shift}
    teacher = None
    softcap = draw(st.sampled_from([None, None, 2.5, 40.0]))
    if fn == "ce":
        cw = None
        if draw(st.booleans()):
            cw = torch.rand(v, generator=gen, dtype=torch.float64).to(w_dt).double()
            cw[0] = 0.0 if draw(st.booleans()) else cw[0]
            # not on a masked class: the unfused PyTorch loss smooths over it as
            # F.cross_entropy does, 0 * inf = NaN (a documented difference; the fused one's 0
            # is tested on its own)
            cw[torch.isinf(bias) if bias is not None else torch.zeros(v, dtype=torch.bool)] = 0.5
        options |= {
            "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
            "z_loss": draw(st.sampled_from([0.0, 0.0, 1e-3, 0.5])),
            "softcap": softcap,
            "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
            "class_weight": cw,
        }
    elif fn == "log_probs":
        options |= {
            "temperature": draw(st.sampled_from([1.0, 0.5, 3.0])),
            "softcap": softcap,
            "return_entropy": draw(st.booleans()),
        }
    else:
        d_t = draw(st.integers(1, 6))
        t_h = torch.randn((*batch, d_t), generator=gen, dtype=torch.float64) * scale
        t_w = torch.randn((v, d_t), generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(d_t))
        t_b = torch.randn(v, generator=gen, dtype=torch.float64) if bias is not None else None
        if t_b is not None:
            t_b[torch.isinf(bias)] = -math.inf  # both models rule the same class out
        teacher = (
            t_h.to(h_dt).double(),
            t_w.to(w_dt).double(),
            None if t_b is None else t_b.to(w_dt).double(),
        )
        options |= {
            "beta": draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
            "temperature": draw(st.sampled_from([1.0, 2.0])),
            "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        }
        if not draw(st.booleans()):
            target = None
    return FusedCall(fn, dtype, hidden, weight, bias, target, teacher, options)


def _logits(h: Any, w: Any, b: Any, shift: bool) -> Any:
    z = h @ w.T + (0.0 if b is None else b)
    return z[..., :-1, :] if shift else z


def _unfused(call: FusedCall, h: Any, w: Any, b: Any) -> Any:
    """The float64 loss (or log-probabilities and entropy) from materialized logits."""
    o = call.options
    shift = o["shift"]
    y = call.target
    if y is not None and shift:
        y = y[..., 1:]
    z = _logits(h, w, b, shift)
    if call.fn == "ce":
        return ce.sparse_categorical_cross_entropy(
            z, y, from_logits=True, weight=o["class_weight"], ignore_index=-100,
            label_smoothing=o["label_smoothing"],
            z_loss=o["z_loss"], softcap=o["softcap"], reduction=o["reduction"],
        )  # fmt: skip
    if call.fn == "log_probs":
        c = o["softcap"]
        if c is not None:  # a masked class (-inf) stays masked, as in every crossent loss
            z = torch.where(z == -math.inf, z, c * torch.tanh(z / c))
        u = z / o["temperature"]
        kept = y != -100
        log_p = torch.log_softmax(u, dim=-1)
        lp = torch.where(kept, log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
        if not o["return_entropy"]:
            return lp
        p = log_p.exp()
        ent = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)  # 0 log 0 = 0, a 0 gradient
        return lp, torch.where(kept, ent, 0.0)
    assert call.teacher is not None
    zt = _logits(*call.teacher, shift)
    return ce.distillation_loss(
        z, zt, beta=o["beta"], temperature=o["temperature"], target=y, reduction=o["reduction"]
    )


def _fused(call: FusedCall, h: Any, w: Any, b: Any) -> Any:
    o = {k: v for k, v in call.options.items()}
    if call.fn == "ce":
        cw = o.pop("class_weight")
        return fused.linear_cross_entropy(
            h, w, call.target, bias=b, class_weight=None if cw is None else cw.to(w.dtype), **o
        )
    if call.fn == "log_probs":
        return fused.linear_log_probs(h, w, call.target, bias=b, **o)
    assert call.teacher is not None
    t_h, t_w, t_b = call.teacher
    return fused.linear_distillation_loss(
        h, w, t_h.to(h.dtype), t_w.to(w.dtype), call.target, bias=b,
        teacher_bias=None if t_b is None else t_b.to(w.dtype), **o,
    )  # fmt: skip


def _row_scale(call: FusedCall, ups: list[Any]) -> float:
    """Sum over the rows of the largest factor the loss puts on a row's logit gradient (its
    upstream gradient, class weight, mean's divisor, 1 / T and the entropy's log p): a
    rounding error of the dtype's epsilon in each entry of a row's logit gradient is allowed
    for at this size, however small the gradient itself (a confident row's p_y - 1, which
    every cross-entropy kernel, PyTorch's too, rounds at 1)."""
    o = call.options
    y = call.target
    if y is not None and o["shift"]:
        y = y[..., 1:]
    per_row = o.get("reduction", "none") == "none"
    counted = (y != -100).double() if y is not None else None
    u = sum(up.abs() for up in ups)
    inv_t = 1.0 / o.get("temperature", 1.0)
    if call.fn == "log_probs":
        z = _logits(call.hidden, call.weight, call.bias, False)
        size = float(z[torch.isfinite(z)].abs().max()) if torch.isfinite(z).any() else 0.0
        return float(u.sum()) * inv_t * (1.0 + size * inv_t + math.log(call.weight.shape[0] + 1))
    weight = 1.0
    den = float(counted.sum()) if counted is not None else float(ups[0].numel() or 1)
    if call.fn == "ce" and o["class_weight"] is not None:
        cw = o["class_weight"]
        weight = float(cw.max())
        den = float((cw[y.clamp(min=0)] * counted).sum())
    if per_row:
        return float(u.sum()) * weight * inv_t
    if o["reduction"] == "sum":
        return float(u) * weight * inv_t * den
    return float(u) * weight * inv_t if den > 0 else 0.0


def _run(call: FusedCall, *, fused_side: bool) -> tuple[list[Any], list[Any], list[Any]]:
    """The outputs, the gradients of (hidden, weight, bias) for a fixed random upstream, and
    that upstream."""
    if fused_side:
        h_dt = getattr(torch, call.dtype)
        w_dt = torch.float32 if call.dtype == "bfloat16" else h_dt
    else:
        h_dt = w_dt = torch.float64
    h = call.hidden.to(h_dt, copy=True).requires_grad_()
    w = call.weight.to(w_dt, copy=True).requires_grad_()
    b = None if call.bias is None else call.bias.to(w_dt, copy=True).requires_grad_()
    out = (_fused if fused_side else _unfused)(call, h, w, b)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(7)
    total = torch.zeros((), dtype=torch.float64)
    ups = []
    for o in outs:
        ups.append(torch.randn(o.shape, generator=gen, dtype=torch.float64))
        total = total + (o.double() * ups[-1]).sum()
    leaves = [t for t in (h, w, b) if t is not None]
    grads = (
        torch.autograd.grad(total, leaves, allow_unused=True)
        if total.requires_grad
        else [None] * len(leaves)
    )
    return (
        [o.detach().double() for o in outs],
        [
            torch.zeros_like(t, dtype=torch.float64) if g is None else g.double()
            for t, g in zip(leaves, grads, strict=True)
        ],
        ups,
    )


@FUZZ
@given(call=fused_calls())
def test_fused_functions_equal_the_unfused_float64_loss(call: FusedCall) -> None:
    got_out, got_grads, _ = _run(call, fused_side=True)
    want_out, want_grads, ups = _run(call, fused_side=False)
    z = _logits(call.hidden, call.weight, call.bias, False)
    finite = z[torch.isfinite(z)]
    size = float(finite.abs().max()) if finite.numel() else 0.0
    t = call.options.get("temperature", 1.0)
    # the logits' own rounding (size · eps) moves each log-probability by about that much
    tol = 64 * EPS[call.dtype] * (1.0 + size / t + math.log(call.weight.shape[0] + 1))
    for got, want in zip(got_out, want_out, strict=True):
        assert got.shape == want.shape
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        fin = torch.isfinite(want)
        assert torch.equal(fin, torch.isfinite(got)), (got, want)
        err = (got[fin] - want[fin]).abs()
        bound = tol * (want[fin].abs() + 1.0)
        assert (err <= bound).all(), (call, got, want)
    rows = _row_scale(call, ups)
    sqrt_v = math.sqrt(call.weight.shape[0])
    for i, (got, want) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert torch.isfinite(got).all() == torch.isfinite(want).all(), (got, want)
        if torch.isfinite(want).all():
            # each gradient comes back in its parameter's dtype: bfloat16 hidden states too,
            # rounded twice (the forward's early gradient, then scaled by the upstream one)
            rounding = 2.0**-7 if i == 0 and call.dtype == "bfloat16" else 0.0
            err = float((got - want).norm())
            other = (call.weight, call.hidden, None)[i]  # d/d hidden = G W, d/d weight = G^T h
            natural = rows * (float(other.norm()) if other is not None else 1.0)
            bound = (tol + rounding) * float(want.norm()) + tol * natural * sqrt_v
            assert err <= bound, (call, err, float(want.norm()), natural)
