r"""crossent's own options on eager CPU PyTorch: ``log_softmax`` row terms, closed-form gradient.

Sparse cross-entropy from logits with z-loss, softcap and the focal factor
(with or without label smoothing), which PyTorch's kernels do not have. The
loss and its gradient coefficients are :func:`crossent._losses._rows.loss_from`
and :func:`crossent._losses._rows.coefficients_from` (the one statement of the
formula); this module only feeds them per-row terms made by PyTorch's fused
kernels, row chunk by row chunk:

- :math:`\log p = \operatorname{log\_softmax}(z)` (one fused kernel), from which
  :math:`-\log p_y` is a gather, :math:`L = z_y - \log p_y`, and the smoothing
  sums are :math:`\sum_k w_k f_k (-\log p_k)` (:func:`crossent._losses._rows.focal_terms`,
  :math:`f \equiv 1` without focal factor);
- :math:`z = c \tanh(x / c)` for a softcap :math:`c` (``-inf`` logits stay
  ``-inf``: masked classes), and the chain rule's :math:`1 - \tanh^2(x/c)`;
- the gradient :math:`a\,p - b\,[k = y] - e\,w_k f_k (1 + \gamma q_k)`, written
  in place over the chunk's :math:`\log p` (:class:`_OwnRows`).

For a reduced loss the gradient for an upstream gradient of 1 is written during
the forward pass, while the chunk is in cache (as :class:`._torch._LowPrecisionCE`
does); backward returns it (scaled by a float32/float64 upstream gradient) or
recomputes the chunks. Nothing of size N × C but that gradient is kept: the
reference written in PyTorch operations keeps the log-probabilities and scatters
a dense gradient of the gather. With ``create_graph=True`` backward differentiates
the generic statistics of :func:`._torch._sparse_rows_generic` instead (exact
double backward).

The eager path runs only where values may be read (CPU, no ``torch.compile`` or
``torch.func``); :func:`own_rows` returns None for the generic path otherwise, and
for a result that is NaN (a non-finite logit, which ``log_softmax`` does not
guard, or a NaN input: the generic statistics then give crossent's values), or
+inf with z-loss (a label on a masked class, whose gradient needs the row's
log-sum-exp, which ``z_y - log p_y`` does not give there).
Bad labels raise from PyTorch's own gather, turned into crossent's message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from crossent._backends._torch import (
    _LOW,
    _NO_IGNORE,
    _early_gradient,
    _holds_nan,
    _label_error,
    _mean_denominator,
    _row_scale,
    _scalar,
    _valid_label,
    index_target,
)
from crossent._lib._xp import output_dtype
from crossent._losses import _rows
from crossent._losses._logprob import softcap_form, softcap_guarded, softcap_slope_
from crossent._losses._options import CEOptions

__all__ = ["own_rows"]

_NLL: Any = torch._C._nn.cross_entropy_loss
"""``F.cross_entropy``'s kernel: ``-log p_y`` per row (``reduction=0``), labels bound-checked:
one call where ``log_softmax``, a gather and a negation are three (as fast at every size)."""

_CHUNK = 1 << 18
"""Elements per row chunk with a gradient (1 MiB in float32): its temporaries stay in cache."""

_CHUNK_LOSS = 1 << 20
"""Elements per row chunk of the loss alone: one call per 4 MiB of float32 logits bounds
the log-probabilities kept at once at little Python per chunk."""


def own_rows(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    axis: int,
    opts: CEOptions,
    generic: Callable[[Tensor, Tensor, Tensor | None, CEOptions], Tensor],
) -> Tensor | None:
    """The loss in the result dtype (the input's; float32 for half precision under autocast),
    or None for the generic path. Half-precision results are rounded inside the autograd
    function: a conversion node of its own would cost a small loss a fifth of its time.

    `generic(z2, t, w, opts)` is the differentiable generic loss of ``(n, C)``
    logits `z2` (class axis last) and flat labels `t`, for double backward.
    """
    if x.numel() == 0 or (weight is not None and weight.requires_grad):
        return None
    z = x if axis == x.ndim - 1 else x.movedim(axis, -1)
    num_classes = z.shape[-1]
    z2 = z if z.ndim == 2 else z.reshape(-1, num_classes)
    t = target if target.dtype is torch.int64 else index_target(target)
    t = t if t.ndim == 1 else t.reshape(-1)
    valid, label = (None, t) if opts.ignore_index is None else _valid_label(t, opts.ignore_index)
    half = x.dtype in _LOW
    cdt = torch.float32 if half else x.dtype
    dtype = output_dtype(x, xp=torch) if half else cdt
    w = None if weight is None else weight.to(cdt)
    mask = False
    if opts.softcap is not None:  # masked classes (-inf) stay -inf: one reduction tells
        low = (z2.detach() if z2.requires_grad else z2).min().item()
        mask = not low > -math.inf  # NaN: keep the guarded form too
    try:
        w_y: Tensor | None = None
        if w is not None:
            w_y = w[label]
            if valid is not None:
                w_y = torch.where(valid, w_y, 0.0)
        den: Tensor | float = 1.0
        if opts.reduction == "mean":
            den = _mean_denominator(w_y, valid, z2.shape[0], cdt)
        if torch.is_grad_enabled() and x.requires_grad:
            plan = _Plan(label, valid, w, w_y, den, mask, opts, dtype, t, generic)
            out = _OwnRows.apply(z2, plan)
        else:
            out = _reduce(_pass(z2, label, valid, w, w_y, mask, opts, None)[0], den, opts, dtype)
    except (IndexError, RuntimeError) as exc:
        _label_error(exc, target, num_classes, opts.ignore_index)  # uint64: its values
        raise  # pragma: no cover - _label_error always raises
    if _holds_nan(out, opts.reduction, inf=opts.z_loss != 0):
        return None
    return (
        out if opts.reduction != "none" or out.shape == target.shape else out.reshape(target.shape)
    )


def _reduce(row: Tensor, den: Tensor | float, opts: CEOptions, dtype: torch.dtype) -> Tensor:
    """`opts.reduction` of the row losses (ignored rows hold 0) in `dtype`; the mean divides by
    `den` (the row count, a float, where every row counts with weight 1: a cached 0-d tensor,
    which PyTorch divides by faster than by a number or than it takes a mean)."""
    if opts.reduction == "none":
        out = row
    elif opts.reduction == "sum":
        out = row.sum()
    else:
        out = row.sum() / (_scalar(den, row.dtype) if isinstance(den, float) else den)
    return out if out.dtype is dtype else _ROUND[dtype](out)


_ROUND: dict[torch.dtype, Callable[[Tensor], Tensor]] = {
    torch.bfloat16: Tensor.bfloat16,
    torch.float16: Tensor.half,
}
"""Rounding to half precision (a third cheaper than ``.to(dtype)``'s argument parsing)."""


def _pass(
    z2: Tensor,
    label: Tensor,
    valid: Tensor | None,
    w: Tensor | None,
    w_y: Tensor | None,
    mask: bool,
    opts: CEOptions,
    scale: Tensor | float | None,
) -> tuple[Tensor, Tensor | None]:
    """Row losses (0 at ignored rows; ``(n,)``, or ``(n, 1)`` for a sum) and, for a `scale`, the
    gradient (`z2`'s dtype)."""
    n, num_classes = z2.shape
    rows = max(1, (_CHUNK if scale is not None else _CHUNK_LOSS) // num_classes)
    if n <= rows:
        row, g = _chunk(z2, label, w, w_y, mask, opts, scale, None)
    else:
        g = None if scale is None else torch.empty_like(z2, memory_format=torch.contiguous_format)
        parts = []
        splits = [z2.split(rows), label.split(rows)]
        for extra in (w_y, scale, g):
            per_row = isinstance(extra, Tensor) and extra.ndim
            splits.append(extra.split(rows) if per_row else [extra] * len(splits[0]))  # type: ignore[union-attr]
        for z_, c_, wy_, s_, g_ in zip(*splits, strict=True):
            parts.append(_chunk(z_, c_, w, wy_, mask, opts, s_, g_)[0])
        row = torch.cat(parts)
    if row.ndim == 2 and (valid is not None or opts.reduction == "none"):
        row = row.view(-1)
    if valid is not None:
        row = torch.where(valid, row, 0.0)
    return row, g


def _lse(z: Tensor) -> Tensor:
    """The rows' log-sum-exp ``(n, 1)`` (the z-loss's L): ``torch.logsumexp`` (several
    kernels on the CPU: :func:`_lse_of` and :func:`_lse_of_nll` avoid it where they can).

    Not z_y + (−log p_y), which cancels where the target logit lies far below the row max
    (a label on a class masked by -1e9: float32 logits [2, 0.5, -1e9] gave L = 0 instead of
    2.2, a z-loss gradient 4 % off), nor NaN where the column read is a masked class (an
    ignored row's stand-in label). A row holding NaN has a NaN L: its loss and gradient stay
    NaN (and :func:`own_rows` leaves a NaN result to the generic statistics).
    """
    return torch.logsumexp(z, 1, keepdim=True)


_LSE_DIRECT = 1 << 12
"""Up to this many logits :func:`_lse_of_nll` takes ``torch.logsumexp`` directly: one call
against the gather, the add and the check's six operations and host read (one thread: 7.9
against 12.9 µs at 32 × 10; 20.5 against 13.0 µs at 256 × 100)."""


def _lse_of_nll(z: Tensor, label: Tensor, nll_y: Tensor) -> Tensor:
    """:func:`_lse` ``(n,)`` from the rows' ``-log p_y`` as ``z_y + (-log p_y)`` (a gather and
    an add) where that is exact: ``-log p_y`` at most 4 (1 + |L|), so that its rounding is a
    few ulps of L. Else (a label far below the row max, where the sum cancels, or NaN) one
    host read sends the chunk to ``torch.logsumexp``, as it does a small chunk
    (:data:`_LSE_DIRECT`) at once."""
    if z.numel() <= _LSE_DIRECT:
        return _lse(z).view(-1)
    fast = z.gather(1, label.unsqueeze(1)).view(-1).add_(nll_y)
    bound = fast.abs().add_(1).mul_(4)
    if bool((nll_y <= bound).all()):  # False for NaN
        return fast
    return _lse(z).view(-1)


def _lse_of(z: Tensor, lp: Tensor) -> Tensor:
    """:func:`_lse` from the rows' log-softmax `lp` too: ``max z - max lp`` (two ``amax``
    passes and a subtraction). At the row max the log-softmax is
    ``-log Σ_k exp(z_k - max z)``, in [-log C, 0], so the difference does not cancel; a row
    holding NaN, or without a finite max, gives NaN (its gradient is NaN throughout)."""
    return z.amax(1, keepdim=True).sub_(lp.amax(1, keepdim=True))


def _chunk(
    x: Tensor,
    label: Tensor,
    w: Tensor | None,
    w_y: Tensor | None,
    mask: bool,
    opts: CEOptions,
    scale: Tensor | float | None,
    out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    r"""Row losses of a chunk of rows and, for a `scale` (a number or a column), their gradient.

    The gradient goes into `out` if given, else into a new tensor of `x`'s dtype.
    """
    z = x.float() if x.dtype in _LOW else x
    num_classes = z.shape[1]
    cap_slope = u = None  # the slope dz/dx of a guarded cap; x / c of the others
    form = softcap_form(opts.softcap, z.dtype, xp=torch)
    if form is not None and form.guarded:  # a huge cap (float32: > 1e31): x where x/c is tiny
        z, cap_slope = softcap_guarded(z, form, xp=torch)
    elif form is not None:
        cap = form.cap
        u = torch.mul(z, _scalar(1.0 / cap, z.dtype))
        capped = torch.tanh(u).mul_(_scalar(cap, z.dtype))
        z = torch.where(z == -math.inf, z, capped) if mask else capped
    eps, gamma = opts.label_smoothing, opts.gamma
    if scale is None and eps == 0:  # the loss only: -log p_y from F.cross_entropy's kernel
        nll_y = _NLL(z, label, None, 0, _NO_IGNORE, 0.0)
        big_l = _lse_of_nll(z, label, nll_y) if opts.z_loss else None
        wy0: Any = 1.0 if w_y is None else w_y
        row, _ = _rows.loss_and_coefficients(
            big_l, nll_y, None, None, wy0, num_classes, opts, autodiff=False, xp=torch
        )
        return row, None
    col = label.unsqueeze(1)
    lp = torch.log_softmax(z, 1)
    lp_y = lp.gather(1, col)  # (n, 1): the columns the gradient is written with
    nll_y = lp_y.neg()
    big_l = _lse_of(z, lp) if opts.z_loss != 0 else None
    w_row = None if w is None else w.unsqueeze(0)
    smooth: Any = None
    slope: Any = None
    slopes = None
    if eps != 0:
        if gamma != 0:
            c = 1.0 if w_row is None else w_row
            values, slopes = _rows.focal_terms(
                lp.neg(), c, gamma, autodiff=False, log_p=lp, xp=torch
            )
            smooth, slope = values.sum(1, keepdim=True), slopes.sum(1, keepdim=True)
        else:
            smooth = lp.sum(1, keepdim=True) if w_row is None else (lp * w_row).sum(1, keepdim=True)
            smooth = smooth.neg_()
            slope = num_classes * 1.0 if w is None else w.sum()  # symbolic stays symbolic
    wy: Any = 1.0 if w_y is None else w_y.unsqueeze(1)
    row, coefs = _rows.loss_and_coefficients(
        big_l, nll_y, smooth, slope, wy, num_classes, opts,
        scale=scale, autodiff=False, log_p_y=lp_y, xp=torch,
    )  # fmt: skip
    if coefs is None:
        return row, None
    a, b, e = coefs
    same = out is not None and out.dtype is lp.dtype
    g = _target_part(lp, col, a, b, out if same else None)
    if eps != 0:
        dense = slopes if slopes is not None else w_row
        if dense is None:
            g.sub_(e)
        elif isinstance(e, Tensor):
            g.addcmul_(e, dense, value=-1)
        else:
            g.add_(dense, alpha=-e)
    # the chain rule: dz/dx = 1 - tanh²(x/c), 0 at a masked -inf logit (softcap_slope: not
    # 1 - t * t, which cancels near saturation, except for a guarded cap, where x / c is tiny)
    if cap_slope is not None:
        g.mul_(cap_slope)
    elif u is not None:
        g.mul_(softcap_slope_(u))
    if out is not None:
        if g.data_ptr() != out.data_ptr():
            out.copy_(g)
        return row, out
    return row, g if g.dtype is x.dtype else g.to(x.dtype)


_KERNEL_GRAD = 1 << 14
"""From this many logits per chunk :func:`_target_part` uses ``log_softmax``'s backward kernel."""


def _target_part(lp: Tensor, col: Tensor, a: Any, b: Any, out: Tensor | None) -> Tensor:
    r""":math:`a\,p - b\,[k = y]` from the log-probabilities `lp` (consumed) and the target
    columns `col`; `a` and `b` are numbers or columns. Large chunks write into `out`
    if given (of `lp`'s dtype).

    Large chunks take ``log_softmax``'s backward kernel, :math:`g - p \sum_k g_k` for
    :math:`g = -a` at the target (one fused pass; PyTorch's ``exp`` of the
    log-probabilities is a slower one), then add :math:`a - b` at the target; small
    ones exponentiate in place (fewer operations).
    """
    if lp.numel() < _KERNEL_GRAD:  # in place of log p (read for the last time by the caller)
        if a is b:  # (p - [k = y]) b: no negated copy of b
            minus_one = _scalar(-1.0, lp.dtype).expand(col.shape)
            return lp.exp_().scatter_add_(1, col, minus_one).mul_(a)
        g = lp.exp_().mul_(a)
        if isinstance(b, Tensor):
            nb = b.neg()
            return g.scatter_add_(1, col, nb if nb.shape == col.shape else nb.expand(col.shape))
        return g.scatter_add_(1, col, torch.full(col.shape, -b, dtype=g.dtype))
    a_col = a if isinstance(a, Tensor) else torch.full(col.shape, a, dtype=lp.dtype)
    onto = torch.zeros_like(lp).scatter_(1, col, a_col.neg().expand(col.shape))
    if out is None:
        g = torch._log_softmax_backward_data(onto, lp, 1, lp.dtype)
    else:
        g = torch._log_softmax_backward_data(onto, lp, 1, lp.dtype, out=out)
    if a is not b:
        g.scatter_add_(1, col, (a_col - b).expand(col.shape))
    return g


class _Plan:
    """What :class:`_OwnRows` needs besides the logits: the labels (0 at ignored rows), the
    counted rows, the class weights, the target weights, the mean's denominator, whether
    ``-inf`` logits may be masked, the options, the result dtype, and for double backward
    the flat labels and the differentiable generic loss. One argument of
    ``Function.apply``: each argument costs its Python wrapper a pass."""

    __slots__ = ("den", "dtype", "generic", "label", "mask", "opts", "t", "valid", "w", "w_y")

    def __init__(
        self,
        label: Tensor,
        valid: Tensor | None,
        w: Tensor | None,
        w_y: Tensor | None,
        den: Tensor | float,
        mask: bool,
        opts: CEOptions,
        dtype: torch.dtype,
        t: Tensor,
        generic: Callable[[Tensor, Tensor, Tensor | None, CEOptions], Tensor],
    ) -> None:
        self.label, self.valid, self.w, self.w_y, self.den = label, valid, w, w_y, den
        self.mask, self.opts, self.dtype, self.t, self.generic = mask, opts, dtype, t, generic


class _OwnRows(torch.autograd.Function):
    """The reduced (or per-row) loss of ``(n, C)`` logits; closed-form backward (see module)."""

    @staticmethod
    def forward(ctx: Any, z2: Tensor, plan: _Plan) -> Tensor:
        opts = plan.opts
        cdt = torch.float32 if z2.dtype in _LOW else z2.dtype
        scale = None
        if opts.reduction != "none" and ctx.needs_input_grad[0]:
            scale = _row_scale(plan.valid, plan.den, 1.0, opts.reduction, cdt)
        row, g = _pass(z2, plan.label, plan.valid, plan.w, plan.w_y, plan.mask, opts, scale)
        # the labels and class weights too (the caller's tensors, or views of them): backward
        # reads them again, and one changed in place since must be an error, not another gradient
        ctx.save_for_backward(z2, plan.label, plan.t, plan.w)
        # held outside the saved tensors and dropped once returned: autograd may make it the
        # leaf's .grad, which the caller may change in place before a second backward
        ctx.early = g
        ctx.plan = plan
        return _reduce(row, plan.den, opts, plan.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        z2, *_ = ctx.saved_tensors
        plan: _Plan = ctx.plan
        early = _early_gradient(ctx, grad, z2)
        if early is not None:
            return early, None
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient, exact 2nd order
            with torch.enable_grad():
                out = plan.generic(z2, plan.t, plan.w, plan.opts)
            (g,) = torch.autograd.grad(out, z2, grad.to(out.dtype), create_graph=True)
            return g, None
        opts = plan.opts
        cdt = torch.float32 if z2.dtype in _LOW else z2.dtype
        scale = _row_scale(plan.valid, plan.den, grad, opts.reduction, cdt)
        _, g = _pass(z2, plan.label, plan.valid, plan.w, plan.w_y, plan.mask, opts, scale)
        return g, None
