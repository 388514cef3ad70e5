r"""Losses from probabilities on eager CPU PyTorch: the clamped log, taken where it counts.

A loss from probabilities :math:`p` is a sum of terms
:math:`-c_k \max(\log p_k, -100)` (PyTorch's clamp, crossent's documented rule: a
probability of exactly 0 costs 100, not infinity), whose derivative is
:math:`-c_k / p_k` where the clamp is off and 0 where it is on. This module computes
them with PyTorch's kernels, each term read once:

- **sparse** (:func:`sparse`): only the target class has :math:`c_k \ne 0`, so one
  gather of :math:`p_y`, :math:`n` logs, and a gradient that is one scatter into zeros.
  PyTorch's reference, ``F.nll_loss(p.log().clamp_min(-100), y)``, takes the log of every
  probability and its backward divides every one (and is NaN at :math:`p = 0`: the
  clamp's zero times the log's infinite derivative);
- **categorical** (:func:`categorical`): every class, one log pass written in place, the
  gradient :math:`-c / p` (0 where clamped) in one expression;
- **binary** (:func:`binary`): :math:`\log p` and :math:`\log(1-p)` (``log1p``), one
  vectorized pass each, where ``F.binary_cross_entropy`` runs scalar code (13 ms for a
  million float32 probabilities against about 4).

:func:`clamped_log` and :func:`log_derivative` (its derivative times a coefficient) state
the rule for these PyTorch kernels; the array-API formulas
(:func:`crossent._losses._common.clamped_log`, its mask, ``where`` at the pole) state it
for every other backend and for traced calls; the tests hold the two equal to float64
rounding. The clamp is on where :math:`\log p < -100`, that is below
:func:`~crossent._losses._common.clamp_floor`, the smallest probability of the dtype whose
log is not below -100 (a comparison instead of a second log pass for the gradient).

The checks read values (eager CPU only): with validation on, every probability in
[0, 1] (one ``aminmax``) and every row summing to 1 within
:func:`~crossent._lib._checks.row_sum_tolerance` (one sum, one ``aminmax``); NaN anywhere
(with validation off one sum finds it) returns None, as does anything the checks
refuse: the generic array-API path then raises crossent's message, skips ignored rows
(which it does not check: padding rows of zeros), or propagates the NaN of a row's
other classes. A reduced loss's gradient is formed during the forward pass, while the
input is in cache, and returned by the first backward (:func:`_start`,
:func:`_backward`); with ``create_graph=True`` backward records it by differentiable
operations, so second derivatives are exact.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from crossent._backends._torch import (
    _FLOATS,
    _LOW,
    Coef,
    _binary_coefs,
    _binary_parts,
    _half_result,
    _in_unit_interval,
    _is_one,
    _label_error,
    _low_chunks,
    _masses,
    _mean_denominator,
    _own_eager,
    _scalar,
    _smoothed,
    _smoothed_into,
    _soft_chunked_from,
    _soft_coefficients,
    _valid_label,
    _weight_needs_grad,
    _Workspace,
    index_target,
)
from crossent._lib._checks import sum_tolerance
from crossent._lib._config import get_validation
from crossent._lib._xp import _torch_namespace, number_for, torch_autocast
from crossent._losses._common import LOG_CLAMP, clamp_floor, mean_class_weight
from crossent._losses._options import CEOptions

__all__ = ["binary", "categorical", "clamped_log", "log_derivative", "sparse"]


def clamped_log(p: Tensor, *, out: Tensor | None = None) -> Tensor:
    r""":math:`\max(\log p, -100)` (NaN stays NaN): a new tensor, or written into `out`."""
    return (
        torch.log(p, out=out).clamp_min_(LOG_CLAMP)
        if out is not None
        else p.log().clamp_min_(LOG_CLAMP)
    )


def log_derivative(p: Tensor, c: Tensor | float, *, out: Tensor | None = None) -> Tensor:
    r""":math:`\partial_p\,(c \max(\log p, -100)) = c/p` where :math:`p` is at least
    :func:`~crossent._losses._common.clamp_floor`, 0 below (NaN stays NaN; three passes):
    differentiable operations, or with `out` (which may be `c`) written there. The
    differentiable form divides by 1 where clamped, so that its own derivative is 0 there
    too (``where`` routes a zero into the other branch, whose :math:`c/p^2` at :math:`p = 0`
    would make it NaN)."""
    floor = clamp_floor(p.dtype, xp=torch)
    if out is not None:
        return torch.div(c, p, out=out).masked_fill_(p < floor, 0.0)
    clamped = p < floor
    return torch.where(clamped, 0.0, c / torch.where(clamped, 1.0, p))


def _rows_fit(x: Tensor, axis: int, counted: Tensor | None = None) -> bool:
    """Whether this module may serve `x` (probabilities, classes on `axis`): with validation on,
    all in [0, 1] and every row summing to 1 (the generic check's tolerance; only the rows
    `counted`, when given: padding rows of zeros under ``ignore_index``); no NaN."""
    x = x.detach()
    if not get_validation():
        return not math.isnan(x.sum().item())
    if not _in_unit_interval(x):  # NaN too
        return False
    sums = x.sum(axis, dtype=torch.float32) if x.dtype in _LOW else x.sum(axis)
    if counted is not None:
        sums = torch.where(counted, sums, 1.0)
    lo, hi = torch.aminmax(sums)
    tol = sum_tolerance(x.dtype, x.shape[axis], xp=_torch_namespace())
    # 1 - lo and hi - 1 are exact (Sterbenz) where they could pass: the generic |s - 1| > tol
    return 1 - lo.item() <= tol and hi.item() - 1 <= tol


def _elsewhere(x: Tensor, *others: Tensor | None) -> bool:
    """Whether one of `others` lies on another device than `x` (the generic path names it:
    a gather of CPU probabilities by labels on ``meta`` raised nothing)."""
    return any(o is not None and o.device != x.device for o in others)


def _need_grad(*others: Tensor | None) -> bool:
    """Whether one of `others` (targets, weights) needs a gradient, which the closed forms
    do not give."""
    return torch.is_grad_enabled() and any(o is not None and o.requires_grad for o in others)


# --------------------------------------------------------------------------- sparse


def sparse(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    r"""Sparse cross-entropy of probabilities, :math:`\ell_i = -w_{y_i} \max(\log p_{i y_i}, -100)`,
    reduced with crossent's mean (over the counted target weight; 0 over none); None for the
    generic path (label smoothing and focal loss, which read every class; see the module
    notes for the rest). The caller has checked `axis`, the shapes and `weight`'s values."""
    if (
        opts.label_smoothing != 0
        or opts.gamma != 0
        or x.numel() == 0
        or _elsewhere(x, target, weight)
        or _weight_needs_grad(weight)
    ):
        return None
    t = index_target(target)
    valid, label = _valid_label(t, opts.ignore_index)
    if not _rows_fit(x, axis, valid):
        return None
    index = label.unsqueeze(axis)
    dtype = torch.float32 if x.dtype in _LOW else x.dtype
    try:
        w_y: Tensor | None = None
        if weight is not None:  # (huge weights scaled: no overflow of the mean's sums)
            w = mean_class_weight(weight.detach().to(dtype), opts.reduction, 0.0, xp=torch)
            w_y = None if w is None else w[label]
        if valid is not None:
            w_y = valid.to(dtype) if w_y is None else torch.where(valid, w_y, 0.0)
        reduction = opts.reduction
        den = _mean_denominator(w_y, None, t.numel(), dtype) if reduction == "mean" else 1.0
        if x.requires_grad and torch.is_grad_enabled():
            out = _SPARSE_APPLY(x, index, w_y, valid, den, (axis, reduction))
        else:
            out = _sparse_value(x.gather(axis, index).squeeze(axis), w_y, valid, den, reduction)
    except (IndexError, RuntimeError) as exc:  # a label outside [0, C): crossent's message
        _label_error(exc, target, x.shape[axis], opts.ignore_index)
        raise  # pragma: no cover - _label_error always raises
    return _half_result(out, x) if x.dtype in _LOW else out


def _sparse_value(
    p: Tensor, w_y: Tensor | None, valid: Tensor | None, den: Tensor | float, reduction: str
) -> Tensor:
    """The reduced loss of the gathered target probabilities `p` (compute dtype: float32 for
    half precision). A reduced loss negates the sum of the logs, not each (the same bits)."""
    row = clamped_log(p.float() if p.dtype in _LOW else p)
    if w_y is not None:
        row = row.mul_(w_y)
    if reduction == "none":
        row = row.neg_()
    if valid is not None:  # an ignored row reads class 0, which may be anything (-0.5: NaN)
        row = torch.where(valid, row, 0.0)
    if reduction == "none":
        return row
    total = row.sum()
    if reduction == "sum":
        return total.neg_()
    if isinstance(den, Tensor):
        return total.div_(den).neg_()
    return total.div_(_scalar(-den, total.dtype))


def _sparse_gradient(
    x: Tensor, index: Tensor, p: Tensor, w_y: Tensor | None, s: Tensor | float, axis: int
) -> Tensor:
    r""":math:`\partial/\partial x` of :math:`\sum_i s_i \ell_i` (`s` one number or one per row;
    `p` the gathered target probabilities): :math:`-s_i w_{y_i} / p_{i y_i}` at the targets (0
    where clamped, and at ignored rows, whose :math:`w_{y_i}` is 0), 0 elsewhere. Made of
    differentiable operations (`p` gathered from `x` for a double backward)."""
    pc = p.float() if p.dtype in _LOW else p
    c = -s if w_y is None else w_y * -s
    d = log_derivative(pc, c)
    return torch.zeros_like(x).scatter_(axis, index, d.unsqueeze(axis).to(x.dtype))


def _start(ctx: Any, reduction: str, den: Tensor | float, gradient: Any) -> None:
    """Keep in `ctx` what :func:`_backward` needs; for a reduced loss, the gradient for an
    upstream gradient of 1 (``ctx.early``), formed now, while the input is in cache."""
    ctx.reduction, ctx.den, ctx.early = reduction, den, None
    ctx.one = 1.0 if reduction != "mean" else 1 / den
    if reduction != "none":
        ctx.early = gradient(ctx.one)


def _backward(ctx: Any, grad: Tensor, x: Tensor, gradient: Any) -> Tensor:
    """The input's gradient: ``gradient(s)`` for the upstream gradient `s` (over the mean's
    denominator).

    A reduced loss outside a double backward starts from the gradient for an upstream
    gradient of 1: the forward's (``ctx.early``, once), or formed again as the forward formed
    it, so that a second backward gives the same bits (reentrant); scaled by any other
    upstream gradient, except in half precision (rounded once, below) and where it holds an
    infinity: a subnormal probability's :math:`c/p` may overflow at 1 and not at the actual
    scale (-inf against -3.3e38 for 0.455 / 9.7e-41 times 0.07), nor does 0 times it give
    the 0 it should. Otherwise (``"none"``, ``create_graph=True``, those) the upstream
    gradient enters the formula, by differentiable operations.
    """
    early, ctx.early = ctx.early, None
    if ctx.reduction != "none" and not torch.is_grad_enabled():
        up = grad.item()
        if up == 1.0:
            return early if early is not None else gradient(ctx.one)
        if x.dtype not in _LOW:
            unit = early if early is not None else gradient(ctx.one)
            if not unit.isinf().any().item():
                return unit.mul_(up)
    s = grad.to(torch.float32 if x.dtype in _LOW else x.dtype)
    return gradient(s / ctx.den if ctx.reduction == "mean" else s)


class _SparseProbs(torch.autograd.Function):
    r""":func:`sparse` with a gradient (:func:`_sparse_gradient`; :func:`_start`,
    :func:`_backward`)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        index: Tensor,
        w_y: Tensor | None,
        valid: Tensor | None,
        den: Tensor | float,
        options: tuple[int, str],
    ) -> Tensor:
        axis, reduction = options
        ctx.save_for_backward(x, index, w_y)
        ctx.axis = axis
        p = x.gather(axis, index).squeeze(axis)
        _start(ctx, reduction, den, lambda s: _sparse_gradient(x, index, p, w_y, s, axis))
        return _sparse_value(p, w_y, valid, den, reduction)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, index, w_y = ctx.saved_tensors
        axis = ctx.axis

        def gradient(s: Tensor | float) -> Tensor:  # p gathered again: differentiable
            return _sparse_gradient(x, index, x.gather(axis, index).squeeze(axis), w_y, s, axis)

        return _backward(ctx, grad, x, gradient), None, None, None, None, None


_SPARSE_APPLY = super(torch.autograd.Function, _SparseProbs).apply
"""``_SparseProbs.apply`` without ``Function.apply``'s Python prologue (as ``._torch``'s
``_SMALL_APPLY``): the eager CPU path it serves runs under no ``torch.func`` transform."""


# --------------------------------------------------------------------------- categorical


def categorical(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    r"""Categorical cross-entropy of probabilities, :math:`\ell_i = -\sum_k c_{ik}
    \max(\log p_{ik}, -100)` with :math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`, the
    mean over rows; None for the generic path (focal loss; targets or weights that need a
    gradient; see the module notes for the rest). The caller has checked `axis` and the
    shapes and `weight`; the targets' range is checked here. Large 2-d inputs (half
    precision; float32 with a gradient: :func:`_chunked_from`) go by row chunks through
    reused float32 buffers (:func:`_categorical_chunks`)."""
    if (
        opts.gamma != 0
        or x.numel() == 0
        or _elsewhere(x, target, weight)
        or _need_grad(target, weight)
        or not _rows_fit(x, axis)
        or (get_validation() and not _in_unit_interval(target))
    ):
        return None
    dtype = torch.float32 if x.dtype in _LOW else x.dtype
    t = target.detach()
    w = None if weight is None else weight.detach().to(dtype)
    chunked = x.ndim == 2 and axis == 1 and x.numel() >= _chunked_from(x)
    if not chunked and t.dtype is not dtype:
        t = t.to(dtype)
    options = (axis, x.numel() // x.shape[axis], opts.label_smoothing, opts.reduction, chunked)
    if x.requires_grad and torch.is_grad_enabled():
        out = _CATEGORICAL_APPLY(x, t, w, options)
    elif chunked:
        out = _reduced_rows(_categorical_chunks(x, t, w, opts.label_smoothing), options)
    else:
        c = _soft_coefficients(t, w, opts.label_smoothing, axis)
        out = _reduced_rows(_categorical_rows(x, c, axis), options)
    return _half_result(out, x) if x.dtype in _LOW else out


_FLOAT32_CHUNKED = 3 << 19
"""float32 probabilities with a gradient go by row chunks from this many elements (half
precision: ``._torch._soft_chunked_from``'s threshold). Measured (one thread, forward and
backward, chunks / whole array, interleaved): 1.13–1.20 at 256 × 1000, 0.89–1.06 at
1024 × 1000, 0.65–0.78 at 2048 × 1000, 0.56 at 256 × 32000."""


def _chunked_from(x: Tensor) -> int:
    """The size from which :func:`categorical` of `x` goes by row chunks."""
    if x.dtype is torch.float32 and x.requires_grad and torch.is_grad_enabled():
        return _FLOAT32_CHUNKED
    return _soft_chunked_from(x)


_CategoricalOptions = tuple[int, int, float, str, bool]
"""(class axis, number of rows, label smoothing, reduction, by row chunks)."""


def _categorical_rows(x: Tensor, c: Tensor, axis: int) -> Tensor:
    r"""Each row's :math:`\sum_k c_k \max(\log p_k, -100)`: the clamped logs in place, times
    `c`, summed along `axis`."""
    return clamped_log(x.float() if x.dtype in _LOW else x).mul_(c).sum(axis)


def _reduced_rows(rows: Tensor, options: _CategoricalOptions) -> Tensor:
    """The loss from :func:`_categorical_rows`: negated, reduced (a sum's negation: the same
    bits as the sum of the negations)."""
    _, count, _, reduction, _ = options
    if reduction == "none":
        return rows.neg_()
    total = rows.sum().neg_()
    return total if reduction == "sum" else total / count


def _categorical_chunks(
    x: Tensor,
    t: Tensor,
    w: Tensor | None,
    eps: float,
    *,
    s: Tensor | float | None = None,
) -> Tensor:
    """:func:`_categorical_rows` of 2-d `x` by row chunks (``._torch._low_chunks``: each chunk
    of probabilities converted into a reused float32 buffer, the coefficients formed in
    another); with `s` (a number, or one per row), :func:`_categorical_gradient`
    for it instead, rounded once to `x`'s dtype."""
    n = x.shape[0]
    if s is None:
        rows = torch.empty(n, 1, dtype=torch.float32, device=x.device)
        for z, c, t_, rows_ in _low_chunks(x, t, rows, scratch=1):
            c = _soft_coefficients(t_, w, eps, 1, out=c)
            torch.sum(clamped_log(z, out=z).mul_(c), 1, keepdim=True, out=rows_)
        return rows[:, 0]
    g = torch.empty_like(x)
    column = s.reshape(n, 1) if isinstance(s, Tensor) and s.ndim else None
    parts = (t, g) if column is None else (t, g, column)
    for z, c, t_, g_, *s_ in _low_chunks(x, *parts, scratch=1):
        c = _soft_coefficients(t_, w, eps, 1, out=c)
        g_.copy_(log_derivative(z, c.mul_(s_[0] if s_ else s).neg_(), out=c))
    return g


class _CategoricalProbs(torch.autograd.Function):
    r""":func:`categorical` with a gradient (:func:`_categorical_gradient`, or by chunks
    :func:`_categorical_chunks`; :func:`_start`, :func:`_backward`)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, t: Tensor, w: Tensor | None, options: _CategoricalOptions
    ) -> Tensor:
        axis, count, eps, reduction, chunked = options
        ctx.save_for_backward(x, t, w)
        ctx.options = options
        if chunked:
            _start(ctx, reduction, count, lambda s: _categorical_chunks(x, t, w, eps, s=s))
            return _reduced_rows(_categorical_chunks(x, t, w, eps), options)
        c = _soft_coefficients(t, w, eps, axis)
        _start(ctx, reduction, count, lambda s: _categorical_gradient(x, c, s, axis))
        return _reduced_rows(_categorical_rows(x, c, axis), options)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, t, w = ctx.saved_tensors
        axis, _, eps, _, chunked = ctx.options

        def gradient(s: Tensor | float) -> Tensor:
            if chunked and not torch.is_grad_enabled():  # the forward's bits
                return _categorical_chunks(x, t, w, eps, s=s)
            dtype = torch.float32 if x.dtype in _LOW else x.dtype  # as the forward's
            c = _soft_coefficients(t.to(dtype), w, eps, axis)
            return _categorical_gradient(x, c, s, axis)  # (recorded: a double backward)

        return _backward(ctx, grad, x, gradient), None, None, None


def _categorical_gradient(x: Tensor, c: Tensor, s: Tensor | float, axis: int) -> Tensor:
    r""":math:`-s\,c/p` (0 where clamped) in `x`'s dtype: the gradient of
    :math:`\sum_i s_i \ell_i` (`s` one number, or one per row)."""
    xc = x.float() if x.dtype in _LOW else x
    if isinstance(s, Tensor) and s.ndim:
        s = s.unsqueeze(axis)
    d = log_derivative(xc, c * -s)
    return d if d.dtype is x.dtype else d.to(x.dtype)


_CATEGORICAL_APPLY = super(torch.autograd.Function, _CategoricalProbs).apply
""":data:`_SPARSE_APPLY`'s shortcut for :class:`_CategoricalProbs`."""


# --------------------------------------------------------------------------- binary


def binary(
    x: object, target: object, weight: object, pos_weight: object, eps: float, opts: CEOptions
) -> Tensor | None:
    r"""Binary cross-entropy of probabilities,

    .. math:: \ell = -\bigl(P \max(\log p, -100) + N \max(\log(1-p), -100)\bigr),

    :math:`P = w\,\alpha\,p_w\,t` and :math:`N = w\,(1-\alpha)(1-t)` (:math:`t` after
    smoothing), :math:`\log(1-p)` as ``log1p(-p)``; None for the generic path (focal loss,
    targets or weights that need a gradient, values the checks refuse, traced calls).
    PyTorch's ``F.binary_cross_entropy`` computes the same value element by element in
    scalar code (13 ms for a million float32 elements, 1 thread); here a few vectorized
    passes, and a gradient that is 0 where a log is clamped (PyTorch's divides by
    :math:`\max(p(1-p), 10^{-12})`: -1e12 for :math:`p = 0`, :math:`t = 1`)."""
    if not (
        opts.gamma == 0
        and isinstance(x, Tensor)
        and isinstance(target, Tensor)
        and x.dtype in _FLOATS
        and target.dtype in _FLOATS
        and x.shape == target.shape
        and x.numel()
        and _own_eager(x)
        and target.device == x.device
        and not _need_grad(target)
        and not (x.dtype in _LOW and torch_autocast(x))  # the generic formula: float32 there
    ):
        return None
    checked = get_validation()
    cdt = torch.float32 if x.dtype in _LOW else x.dtype
    coefs = _binary_coefs(x, cdt, weight, pos_weight, opts.alpha, checked=checked)
    if coefs is None or (checked and not (_in_unit_interval(x) and _in_unit_interval(target))):
        return None  # the generic path's message (NaN: its propagation)
    t = target.detach()  # smoothed (and converted) per piece
    if x.requires_grad and torch.is_grad_enabled():
        out = _BINARY_APPLY(x, t, coefs, eps, opts.reduction)
    else:
        out = cast(Tensor, _binary_chunks(x, t, coefs, eps, opts.reduction)[0])
    return out if out.dtype is x.dtype else out.to(x.dtype)


def _binary_terms(p: Tensor, pos: Tensor, neg: Tensor, bufs: list[Tensor]) -> Tensor:
    """The element losses of the probabilities `p` (compute dtype): the two clamped logs,
    each times its mass, written into two of the buffers `bufs`."""
    log_not_p = torch.neg(p, out=bufs[0]).log1p_().clamp_min_(LOG_CLAMP)
    return clamped_log(p, out=bufs[1]).mul_(pos).add_(log_not_p.mul_(neg)).neg_()


def _masses_into(t: Tensor, pos: Coef, neg: Coef, bufs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`~crossent._backends._torch._masses` written into the buffers `bufs` (``t``
    itself for a unit `pos`): the same bits."""
    not_t = torch.neg(t, out=bufs[0]).add_(1)
    p = t if _is_one(pos) else torch.mul(t, number_for(pos, t), out=bufs[1])
    return p, (not_t if _is_one(neg) else not_t.mul_(number_for(neg, t)))


def _binary_chunks(
    x: Tensor,
    t: Tensor,
    coefs: tuple[Coef, Coef],
    eps: float,
    reduction: str | None,
    s: Tensor | float | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(the loss, or None without `reduction`; the gradient for `s`, or None without it) by
    cache-sized pieces (``._torch._binary_parts``), each computed in the thread's chunk-sized
    buffers (``._torch._Workspace``, as the loss from logits): nothing of the input's size
    is made but the gradient and the losses of ``"none"``, and a call allocates no more than
    ``F.binary_cross_entropy`` does. A reduced loss adds the pieces' sums (pairwise within
    each, like the sum of one array). The targets `t` are smoothed by `eps` per piece too
    (and converted to the compute dtype there): a half-precision target gets no float32
    copy of its size."""
    cdt = torch.float32 if x.dtype in _LOW else x.dtype
    losses = None
    if reduction == "none":
        losses = torch.empty(x.shape, dtype=cdt, device=x.device)
    g = None if s is None else torch.empty_like(x)
    column = s if isinstance(s, Tensor) and s.ndim else None
    work = _Workspace(cdt, x.device)
    sums = []
    for x_, t_, pos_c, neg_c, out_, g_, s_ in _binary_parts(x, t, *coefs, losses, g, column):
        # p, the two masses, two for the terms (then the gradient), the smoothed target
        bufs = work.views(x_.shape)
        p = x_ if x_.dtype is cdt else bufs[0].copy_(x_)
        pos, neg = _masses_into(_smoothed_into(t_, cdt, eps, bufs[5]), pos_c, neg_c, bufs[1:3])
        if reduction is not None:
            terms = _binary_terms(p, pos, neg, bufs[3:5])
            if out_ is None:
                sums.append(terms.sum())
            else:
                out_.copy_(terms)
        if g_ is not None:
            s_piece = cast("Tensor | float", s if s_ is None else s_)
            g_.copy_(_binary_gradient(p, pos, neg, s_piece, bufs=bufs[3:5]))
    if reduction is None or losses is not None:
        return losses, g
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return (total if reduction == "sum" else total / x.numel()), g


class _BinaryProbs(torch.autograd.Function):
    r""":func:`binary` with a gradient (:func:`_binary_gradient` by pieces; recorded, for a
    double backward, on the whole array; :func:`_start`, :func:`_backward`). The tensor
    coefficients (the caller's weights) are saved too, so that one changed in place before
    backward is an error, not another gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, t: Tensor, coefs: tuple[Coef, Coef], eps: float, reduction: str
    ) -> Tensor:
        ctx.save_for_backward(x, t, *(c for c in coefs if isinstance(c, Tensor)))
        ctx.coefs, ctx.eps = coefs, eps
        _start(ctx, reduction, x.numel(), lambda s: _binary_chunks(x, t, coefs, eps, None, s)[1])
        return cast(Tensor, _binary_chunks(x, t, coefs, eps, reduction)[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, t, *_ = ctx.saved_tensors
        coefs, eps = ctx.coefs, ctx.eps

        def gradient(s: Tensor | float) -> Tensor:
            if not torch.is_grad_enabled():  # the forward's bits
                return cast(Tensor, _binary_chunks(x, t, coefs, eps, None, s)[1])
            cdt = torch.float32 if x.dtype in _LOW else x.dtype
            pos, neg = _masses(_smoothed(t, cdt, eps), *coefs)
            return _binary_gradient(x, pos, neg, s)  # (recorded: a double backward)

        return _backward(ctx, grad, x, gradient), None, None, None, None


def _binary_gradient(
    x: Tensor, pos: Tensor, neg: Tensor, s: Tensor | float, *, bufs: list[Tensor] | None = None
) -> Tensor:
    r""":math:`s\,(N/(1-p) - P/p)` in `x`'s dtype, each term 0 where its log is clamped
    (:math:`p = 1`; below :func:`~crossent._losses._common.clamp_floor`); `s` multiplies the
    masses before the division (as autodiff's order: :math:`sP/p` of a subnormal :math:`p`
    is finite where :math:`P/p` overflows). Recorded (a double backward) by differentiable
    operations; otherwise (one piece of :func:`_binary_chunks`, `x` already in the compute
    dtype) written in place into two of the buffers `bufs`, returned there."""
    p = x.float() if x.dtype in _LOW else x
    if bufs is None:
        if not (isinstance(s, float) and s == 1.0):
            pos, neg = pos * s, neg * s
        one = p == 1  # log1p(-p) clamped: 0, and (a safe denominator) 0 derivatives
        d = torch.where(one, 0.0, neg / (1 - torch.where(one, 0.0, p))) - log_derivative(p, pos)
        return d if d.dtype is x.dtype else d.to(x.dtype)
    if isinstance(s, float):  # a cached 0-d tensor: wrapping the number costs more
        s = _scalar(s, p.dtype)
    d = torch.mul(neg, s, out=bufs[0])
    buf = torch.neg(p, out=bufs[1]).add_(1)  # 1 - p
    d.div_(buf).masked_fill_(p == 1, 0.0)
    return d.sub_(log_derivative(p, torch.mul(pos, s, out=buf), out=buf))


_BINARY_APPLY = super(torch.autograd.Function, _BinaryProbs).apply
""":data:`_SPARSE_APPLY`'s shortcut for :class:`_BinaryProbs`."""
