r"""The PyTorch executor: PyTorch's own kernels wherever they have crossent's semantics.

``F.cross_entropy`` and ``F.nll_loss`` compute class weights, ``ignore_index``,
label smoothing and the reductions exactly as crossent defines them (crossent
follows PyTorch there), and they come with everything a PyTorch user expects:
exact double backward, ``torch.compile`` / ``torch.export`` without graph breaks,
``torch.func`` transforms (``vmap(grad(...))``), autocast (float32 compute
and result). This module calls them and adds only crossent's documented
differences, each at the cost of a scalar test:

- a ``"mean"`` over no counted target is 0 with a zero gradient (PyTorch: NaN);
- integer targets of any width (PyTorch wants int64);
- float16 / bfloat16 logits are computed in float32 (PyTorch's float16 mean
  overflows at 8192 × 32000, its bfloat16 gradient is 3× above rounding); eagerly
  on CPU by row chunks through reused float32 buffers (:class:`_LowPrecisionCE`),
  so that nothing larger than the input is kept for backward;
- a ``-inf`` logit with target 0 contributes 0 to a probability-target loss (an
  unguarded product first, the guarded one only after a NaN result);
- out-of-range labels raise crossent's message (eagerly: PyTorch's own kernel
  check is turned into it; on accelerators an asynchronous device assert).

Binary cross-entropy with logits has its own exact formula (:func:`binary`:
``F.binary_cross_entropy_with_logits`` loses all relative accuracy of small
losses, e.g. 0 instead of 9.4e-14 at x = -30, t = 0 in float32) in as many
fused kernels as PyTorch's, with a chunked closed-form backward. crossent's own
options (z-loss, softcap, focal) read the loss off :mod:`crossent._losses._rows`
statistics made by PyTorch's kernels (:func:`_sparse_rows`).

Each function returns ``None`` when the generic array-API formula must run
(probabilities, focal loss with smoothing, binary weights or focal options,
eager binary calls on accelerators); that path is made of differentiable
PyTorch operations, so it has the same transforms. Traced binary calls
(``torch.compile``, ``torch.export``, ``torch.func``) have a short formula of
their own (:func:`_binary_traced`), exact at infinite logits without reading
values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from crossent._backends import _triton_sparse
from crossent._lib._checks import check_in_unit_interval, values_checked
from crossent._lib._xp import _torch_namespace, array_namespace, output_dtype, torch_tracing
from crossent._losses import _rows
from crossent._losses._options import CEOptions

__all__ = ["categorical", "index_target", "nll", "sparse"]

_NO_IGNORE = -(2**63)
"""``ignore_index`` handed to PyTorch when nothing is ignored: no int64 label equals it
in range, and PyTorch's bound check still rejects it as a label."""

# frozensets: under torch.compile a membership test is two dynamo guards whatever the dtype
# (a tuple's is its length and one per element compared)
_LOW = frozenset((torch.float16, torch.bfloat16))
_FLOATS = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16))
_INTEGERS = frozenset(
    d
    for d in (
        torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
        getattr(torch, "uint16", None), getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    )
    if d is not None
)  # fmt: skip


def index_target(target: Tensor) -> Tensor:
    """Integer labels of any width as int64 (what gathers and PyTorch's kernels index with)."""
    return target if target.dtype == torch.int64 else target.long()


def _compute(x: Tensor) -> Tensor:
    """`x` in the compute dtype: float16/bfloat16 accumulate in float32."""
    return x.float() if x.dtype in _LOW else x


def _host_readable(x: Tensor) -> bool:
    """Whether a scalar may be read back now: CPU, eager (no compile, export or torch.func)."""
    return x.is_cpu and not torch_tracing()


def _may_hold_neg_inf(x: Tensor) -> bool:
    """Whether `x` may hold ``-inf`` (masked classes): one reduction eagerly, else assumed."""
    if not _host_readable(x) or x.numel() == 0:
        return True
    return not x.detach().min().item() > -math.inf  # NaN: keep the guarded form too


def _finish(out: Tensor, x: Tensor) -> Tensor:
    if out.dtype is x.dtype:  # float32 / float64: autocast leaves them alone
        return out
    dtype = output_dtype(x, xp=torch)
    return out if out.dtype == dtype else out.to(dtype)


# --------------------------------------------------------------------------- class indices


def _class_last_to_dim1(x: Tensor, axis: int) -> Tensor:
    """PyTorch's layout: classes on dim 1 (or dim 0 for one unbatched row)."""
    if x.ndim == 1 or axis == 1:
        return x
    return x.movedim(axis, 1)


def _counted_weight(t: Tensor, w: Tensor | None, ignore: int) -> Tensor:
    r"""The mean's denominator :math:`\sum_i w_{y_i}` over counted targets
    (their count without weights)."""
    valid = t != ignore
    if w is None:
        return valid.sum()
    return torch.where(valid, w[torch.where(valid, t, 0)], 0).sum()


def _mean_of(call: Any, t: Tensor, w: Tensor | None, ignore: int, eager: bool) -> Tensor:
    """PyTorch's ``"mean"`` with crossent's rule: 0 (and a zero gradient) over no counted target.

    Eagerly on CPU one scalar test decides (PyTorch's mean is NaN only for
    0/0 or a NaN input); elsewhere the sum is divided by a denominator that is
    1 where it would be 0, without reading anything back.
    """
    if t.numel() == 0:
        return call("sum")
    if eager:
        out = call("mean")
        if math.isnan(out.item()) and float(_counted_weight(t, w, ignore)) == 0:
            return call("sum")
        return out
    total = call("sum")
    den = _counted_weight(t, w, ignore)
    return total / torch.where(den == 0, torch.ones_like(den), den)


def _label_error(exc: Exception, t: Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Turn PyTorch's bound-check error into crossent's message (re-raise it otherwise)."""
    from crossent._lib._checks import check_label_range

    with torch.no_grad():
        check_label_range(t, num_classes, ignore_index=ignore_index, xp=array_namespace(t))
    raise exc


def _assert_labels_async(t: Tensor, num_classes: int, ignore: int) -> None:
    """On accelerators: an asynchronous device-side check, no host synchronisation."""
    ok = ((t >= 0) & (t < num_classes)) | (t == ignore)
    msg = (
        f"`target` has labels outside [0, {num_classes}) that are not `ignore_index`; "
        "check the number of classes, or set `ignore_index`."
    )
    torch._assert_async(ok.all(), msg)


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
"""PyTorch's reduction codes (``torch.nn._reduction.get_enum``) for its ``torch._C._nn`` kernels."""


def _native_indices(
    kernel: Any,
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    axis: int,
    opts: CEOptions,
    *extra: Any,
) -> Tensor:
    """``kernel(x, t, weight, reduction, ignore_index, *extra)`` with crossent's differences.

    `kernel` is one of PyTorch's ``torch._C._nn`` loss kernels (what ``F.cross_entropy``
    and ``F.nll_loss`` call after their argument handling, which crossent has done);
    they honour ``__torch_function__`` and trace under ``torch.compile`` like the wrappers.
    Written for the smallest inputs, where the Python around the kernel is the cost.
    """
    xc = x.float() if x.dtype in _LOW else x
    if axis != 1 and x.ndim != 1:
        xc = xc.movedim(axis, 1)
    t = target if target.dtype is torch.int64 else target.long()
    w = None if weight is None else weight.to(xc.dtype)
    ignore = _NO_IGNORE if opts.ignore_index is None else opts.ignore_index
    eager = x.is_cpu and not torch_tracing()
    if not eager and not x.is_cpu and values_checked(t) and t.numel():
        _assert_labels_async(t, x.shape[axis], ignore)

    def call(reduction: str) -> Tensor:
        if not eager:
            return kernel(xc, t, w, _REDUCTION_ENUM[reduction], ignore, *extra)
        try:
            return kernel(xc, t, w, _REDUCTION_ENUM[reduction], ignore, *extra)
        except (IndexError, RuntimeError) as exc:
            _label_error(exc, t, x.shape[axis], opts.ignore_index)
            raise  # pragma: no cover - _label_error always raises

    if opts.reduction == "mean" and t.numel() and (opts.ignore_index is None and w is None):
        out = call("mean")
    elif opts.reduction == "mean":
        out = _mean_of(call, t, w, ignore, eager)
    else:
        out = call(opts.reduction)
    if out.dtype is x.dtype:  # float32 / float64: autocast leaves them alone
        return out
    return _finish(out, x)


def _sparse_shapes_fit(x: Tensor, target: object, weight: object, axis: int) -> bool:
    if not isinstance(target, Tensor) or target.dtype not in _INTEGERS:
        return False
    if weight is not None and not (
        isinstance(weight, Tensor) and weight.dtype in _FLOATS and weight.shape == (x.shape[axis],)
    ):
        return False
    ndim = x.ndim
    if target.ndim != ndim - 1:
        return False
    if ndim == 2:  # the common case, without building shapes
        return bool(target.shape[0] == x.shape[1 - axis])
    return target.shape == x.shape[:axis] + x.shape[axis + 1 :]


def sparse(
    input: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    """Sparse cross-entropy from logits; None for the generic path.

    PyTorch's ``F.cross_entropy`` for its own options; crossent's (z-loss,
    softcap, focal without smoothing) through the row statistics of
    :mod:`crossent._losses._rows`; float16/bfloat16 logits on CUDA through the
    Triton kernels of :mod:`crossent._backends._triton_sparse`. `axis` is
    already a valid non-negative class axis; `weight`'s values are checked by
    the caller.
    """
    if not (opts.kind == "logits" and input.dtype in _FLOATS):
        return None
    if not _sparse_shapes_fit(input, target, weight, axis):
        return None
    if _triton_sparse.usable(input, opts):
        return _sparse_triton(input, target, weight, axis, opts)
    if not opts.plain:
        return _sparse_rows(input, target, weight, axis, opts) if _rows.applies(opts) else None
    if input.dtype in _LOW and weight is None and opts.label_smoothing == 0 and input.numel():
        out = _sparse_low(input, target, axis, opts)
        if out is not None:
            return out
    return _native_indices(
        torch._C._nn.cross_entropy_loss, input, target, weight, axis, opts, opts.label_smoothing
    )


def _sparse_rows(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor:
    r"""crossent's own options: statistics by PyTorch kernels, loss by :func:`_rows.row_loss`.

    The statistics are :func:`_rows.row_stats` (row max, sum of exponentials,
    a gather for the target logit, the weighted sum for smoothing). Everything
    is a differentiable PyTorch operation, so double backward,
    ``torch.compile`` and ``torch.func`` see plain autograd.
    """
    xc = _compute(x)
    z = xc if axis == x.ndim - 1 else xc.movedim(axis, -1)
    num_classes = z.shape[-1]
    if opts.softcap is not None:
        cap = opts.softcap
        capped = cap * torch.tanh(z / cap)
        z = torch.where(z == -math.inf, z, capped) if _may_hold_neg_inf(z) else capped
    t = index_target(target)
    if values_checked(t):
        from crossent._lib._checks import check_label_range

        check_label_range(t, num_classes, ignore_index=opts.ignore_index, xp=array_namespace(t))
    w = None if weight is None else weight.to(z.dtype)
    valid, label = _valid_label(t, opts.ignore_index)
    if opts.label_smoothing == 0 and _host_readable(z) and not z.requires_grad:
        # forward only (its backward would scatter two dense gradients); fused statistics
        # first: a NaN result means a non-finite logit (or a NaN input), and only then are the
        # guarded generic statistics computed (one scalar test)
        out = _rows_reduce(_stats_from_log_softmax(z, label), w, label, valid, num_classes, opts)
        check = out.detach().sum() if opts.reduction == "none" else out.detach()
        if not math.isnan(check.item()):
            return _finish(out, x)
    stats = _rows.row_stats(z, label, w, with_wz=opts.label_smoothing != 0, xp=array_namespace(z))
    return _finish(_rows_reduce(stats, w, label, valid, num_classes, opts), x)


def _valid_label(t: Tensor, ignore_index: int | None) -> tuple[Tensor | None, Tensor]:
    """Which rows count (None: all of them) and their labels, 0 where ignored (gatherable)."""
    if ignore_index is None:
        return None, t
    valid = t != ignore_index
    return valid, torch.where(valid, t, 0)


def _rows_loss(
    stats: _rows.RowStats,
    w: Tensor | None,
    label: Tensor,
    valid: Tensor | None,
    num_classes: int,
    opts: CEOptions,
) -> tuple[Tensor, Tensor]:
    """Per-row loss from the row statistics (:func:`_rows.row_loss`) and each row's target
    weight, both 0 at ignored rows."""
    w_y = torch.ones_like(stats.s) if w is None else w[label]
    total = float(num_classes) if w is None else w.sum()
    row = _rows.row_loss(stats, w_y, total, num_classes, opts, xp=torch)
    if valid is not None:
        row = torch.where(valid, row, 0.0)
        w_y = torch.where(valid, w_y, 0.0)
    return row, w_y


def _weighted_reduce(row: Tensor, w_y: Tensor, reduction: str) -> Tensor:
    """`reduction` of the per-row loss; the mean divides by the counted target weight
    (0 over no counted target)."""
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    den = w_y.sum()
    return row.sum() / torch.where(den == 0, torch.ones_like(den), den)


def _rows_reduce(
    stats: _rows.RowStats,
    w: Tensor | None,
    label: Tensor,
    valid: Tensor | None,
    num_classes: int,
    opts: CEOptions,
) -> Tensor:
    """The reduced loss from the row statistics, ignored rows masked."""
    return _weighted_reduce(*_rows_loss(stats, w, label, valid, num_classes, opts), opts.reduction)


def _sparse_triton(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor:
    """Large float16/bfloat16 logits on CUDA: statistics and gradient by the Triton kernels
    (:class:`._triton_sparse.SparseRows`), the loss by :func:`_rows_loss`."""
    z = x if axis == x.ndim - 1 else x.movedim(axis, -1)
    num_classes = z.shape[-1]
    z2 = z.reshape(-1, num_classes)
    if z2.stride(1) != 1 or z2.stride(0) != num_classes:
        z2 = z2.contiguous()
    t = index_target(target).reshape(-1)
    if values_checked(t) and t.numel():
        ignore = _NO_IGNORE if opts.ignore_index is None else opts.ignore_index
        _assert_labels_async(t, num_classes, ignore)
    valid, label = _valid_label(t, opts.ignore_index)
    w = None if weight is None else weight.to(torch.float32).contiguous()
    per_row = dataclasses.replace(opts, reduction="none")

    def loss_of(stats: _rows.RowStats) -> tuple[Tensor, Tensor]:
        return _rows_loss(stats, w, label, valid, num_classes, opts)

    def recompute(xx: Tensor) -> Tensor:  # double backward: the differentiable formula
        return _sparse_rows(xx, t, w, 1, per_row)

    row, w_y = _triton_sparse.SparseRows.apply(z2, label, valid, w, opts, loss_of, recompute)
    return _finish(_weighted_reduce(row.reshape(z.shape[:-1]), w_y, opts.reduction), x)


def _stats_from_log_softmax(z: Tensor, label: Tensor) -> _rows.RowStats:
    r""":class:`_rows.RowStats` without smoothing (no weighted sum) from PyTorch's fused kernels.

    ``log_softmax`` is one fused pass where the generic statistics take a subtraction, an
    exponential and a sum: :math:`\log s = (z_y - m) - \log p_y` with :math:`m = \max_k z_k`
    (a constant for autodiff, as in :func:`_rows.row_stats`), so that
    :math:`(m - z_y) + \log s = -\log p_y` and :math:`m + \log s = \operatorname{lse}(z)`
    to rounding. Finite logits only: a non-finite one gives NaN, which the caller tests.
    """
    col = label[..., None]
    log_p_y = torch.log_softmax(z, dim=-1).gather(-1, col)[..., 0]
    z_y = z.gather(-1, col)[..., 0]
    m = z.detach().amax(dim=-1)
    return _rows.RowStats(m=m, s=torch.exp((z_y - m) - log_p_y), wd=0.0, wsum=0.0, z_y=z_y)


def nll(
    input: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    """PyTorch's ``nll_loss`` on log-probabilities, with crossent's mean rule; None for generic."""
    if input.dtype not in _FLOATS or not _sparse_shapes_fit(input, target, weight, axis):
        return None
    return _native_indices(torch._C._nn.nll_loss_nd, input, target, weight, axis, opts)


# --------------------------------------------------------------------------- probability targets


def _reduce(row: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return row
    if reduction == "sum" or row.numel() == 0:
        return row.sum()
    return row.mean()


def categorical(
    input: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    r"""Probability-target cross-entropy from logits: ``log_softmax`` and one guarded product.

    :math:`\ell = -\sum_k c_k \log p_k` with :math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`;
    a term with :math:`c_k = 0` is 0 even where :math:`\log p_k = -\infty` (a masked class).
    """
    if not (opts.kind == "logits" and opts.plain and input.dtype in _FLOATS):
        return None
    if not (isinstance(target, Tensor) and target.shape == input.shape):
        return None
    if weight is not None and not (isinstance(weight, Tensor) and weight.dtype in _FLOATS):
        return None
    xc = _compute(input)
    c = target.to(xc.dtype)
    eps = opts.label_smoothing
    if eps:
        c = c * (1 - eps) + eps / input.shape[axis]
    if weight is not None:
        shape = [1] * input.ndim
        shape[axis] = -1
        c = c * weight.to(xc.dtype).reshape(shape)
    if _host_readable(xc):
        # unguarded first: a NaN result means 0 · (-inf) at a masked class (or a NaN input),
        # and only then is the guarded product computed (one scalar test instead of a pass)
        out = _soft_reduce(_soft_terms(xc, c, axis, guard=False), axis, opts.reduction)
        check = out.detach().sum() if opts.reduction == "none" else out.detach()
        if not math.isnan(check.item()):
            return _finish(out, input)
    return _finish(_soft_reduce(_soft_terms(xc, c, axis, guard=True), axis, opts.reduction), input)


def _soft_terms(xc: Tensor, c: Tensor, axis: int, *, guard: bool) -> Tensor:
    r""":math:`c_k \log p_k` (:math:`0 \cdot (-\infty) = 0` if `guard`), in place if no autograd."""
    log_p = torch.log_softmax(xc, dim=axis)
    if guard:
        return torch.where(c == 0, 0.0, c * log_p)
    if torch.is_grad_enabled() and (xc.requires_grad or c.requires_grad):
        return c * log_p
    return log_p.mul_(c)


def _soft_reduce(terms: Tensor, axis: int, reduction: str) -> Tensor:
    """Minus the class sum of `terms`, reduced over rows ("mean" divides by the row count)."""
    if reduction == "none":
        return -terms.sum(dim=axis)
    total = -terms.sum()
    if reduction == "sum" or terms.numel() == 0:
        return total
    return total / (terms.numel() // terms.shape[axis])


# --------------------------------------------------------------------------- binary


def binary(
    input: object,
    target: object,
    weight: object,
    pos_weight: object,
    label_smoothing: float,
    opts: CEOptions,
) -> Tensor | None:
    r"""Binary cross-entropy from logits, no weights or focal options; None for the generic path.

    PyTorch's ``binary_cross_entropy_with_logits`` computes
    :math:`(1-t)x - \log\sigma(x)`, which cancels for :math:`x \ll 0`
    (0 instead of 9.4e-14 at :math:`x = -30`, :math:`t = 0` in float32). crossent computes

    .. math:: -\ell = \operatorname{lerp}(\log\sigma(-x), \log\sigma(x), t)
              = (1-t)\log(1-p) + t\log p

    with PyTorch's fused ``logsigmoid`` (:math:`\min(x,0) - \operatorname{log1p}(e^{-|x|})`,
    exact for every finite :math:`x`). PyTorch's ``lerp`` evaluates :math:`a + t(b-a)` for
    :math:`t < 1/2` and :math:`b - (b-a)(1-t)` otherwise, so a hard target returns one of the
    logs exactly and a soft one a sum of two terms of one sign, with no cancellation. Five
    fused kernels, like PyTorch's (the sign flips the reduced scalar). An infinite logit makes
    ``lerp`` compute 0 · ∞: a NaN result is recomputed by the guarded generic formula (one
    scalar test, eager only; traced calls: :func:`_binary_traced`). The gradient
    :math:`(1-t)\sigma(x) - t\sigma(-x)` comes from autograd through the same kernels
    (so double backward, ``torch.compile`` and ``torch.func`` work).
    """
    if not (
        opts.kind == "logits"
        and opts.plain
        and weight is None
        and pos_weight is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype in _FLOATS
        and target.dtype in _FLOATS
        and input.shape == target.shape
    ):
        return None
    if not _host_readable(input):  # traced: no value test; eager accelerators: the generic formula
        traced = torch_tracing()
        return _binary_traced(input, target, label_smoothing, opts.reduction) if traced else None
    if input.dtype in _LOW and torch.is_autocast_enabled(input.device.type):
        return None  # the generic formula returns float32 under autocast, as PyTorch does
    check_in_unit_interval(target, name="target", xp=_torch_namespace())
    if input.numel() > _BINARY_CHUNK:
        out = _BinaryCE.apply(input, target, label_smoothing, opts.reduction)
    else:  # one chunk: the same kernels with autograd's bookkeeping, less Python
        out = _binary_small(input, target, label_smoothing, opts.reduction)
    total = out.detach().sum() if opts.reduction == "none" else out.detach()
    if math.isnan(total.item()):  # NaN input, or an infinite logit: lerp's 0 · inf
        return None
    return out if out.dtype is input.dtype else _finish(out, input)


def _binary_traced(x: Tensor, target: Tensor, eps: float, reduction: str) -> Tensor:
    r"""Traced binary cross-entropy (``torch.compile``, ``torch.export``, ``torch.func``).

    With :math:`\pi = [x > 0]`, :math:`a = |x|` taken as :math:`x` or :math:`-x` by
    :math:`\pi` and :math:`c = \pi - t`,

    .. math:: \ell = \operatorname{log1p}(e^{-a}) + c\,x
              = (1-t)\max(x, 0) + t\max(-x, 0) + \operatorname{log1p}(e^{-|x|}),

    a sum of non-negative terms (no cancellation, one exponential and one ``log1p``
    per element: one fused kernel under inductor). A term with :math:`c = 0` is 0
    (``±inf`` logit with the matching hard target), read off the values in the graph.
    Autograd's gradient is :math:`\sigma(x) - t` everywhere, :math:`x = 0` included
    (the kink of :math:`|x|` and the jump of :math:`c` are taken on the same side).
    """
    xc = _compute(x)
    t = _smoothed(target, xc.dtype, eps)
    pos = xc > 0
    tail = torch.log1p(torch.exp(torch.where(pos, -xc, xc)))
    c = torch.where(pos, 1 - t, -t)
    loss = tail + torch.where(c == 0, 0.0, c * xc)
    if reduction != "none":
        loss = loss.sum() if reduction == "sum" or not loss.numel() else loss.mean()
    return _finish(loss, x)


_BINARY_CHUNK = 1 << 16
"""Elements per chunk of the binary path: its temporaries (256 KiB in float32) stay in cache."""


def _binary_chunks(*arrays: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The same flat chunks of equally shaped `arrays` (``split`` views, one call each)."""
    return zip(*(a.reshape(-1).split(_BINARY_CHUNK) for a in arrays), strict=True)


def _binary_small(x: Tensor, target: Tensor, eps: float, reduction: str) -> Tensor:
    """:class:`_BinaryCE`'s formula on small inputs, differentiated by autograd."""
    xc = x.float() if x.dtype in _LOW else x
    t = _smoothed(target, xc.dtype, eps)
    log_p = torch.nn.functional.logsigmoid(xc)
    log_not_p = torch.nn.functional.logsigmoid(-xc)
    if torch.is_grad_enabled() and (xc.requires_grad or t.requires_grad):
        neg_loss = torch.lerp(log_not_p, log_p, t)
    else:
        neg_loss = log_not_p.lerp_(log_p, t)
    if reduction == "none":
        return -neg_loss
    return -(neg_loss.sum() if reduction == "sum" or not t.numel() else neg_loss.mean())


def _smoothed(t: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    t = t if t.dtype is dtype else t.to(dtype)
    return t if eps == 0 else t * (1 - eps) + eps / 2


class _BinaryCE(torch.autograd.Function):
    r"""Exact binary cross-entropy with logits by flat chunks, closed-form backward.

    Forward per chunk: :math:`-\ell = \operatorname{lerp}(\log\sigma(-x), \log\sigma(x), t)`
    (see :func:`binary`); nothing is saved but the inputs. Backward per chunk:
    :math:`\partial\ell/\partial x = \operatorname{lerp}(\sigma(x), -\sigma(-x), t)
    = (1-t)\sigma(x) - t\sigma(-x)` (exact for hard targets: one of the two terms, each from
    PyTorch's ``sigmoid``), rounded once to the input dtype; for soft targets
    :math:`\partial\ell/\partial t = -x` (times :math:`1-\varepsilon` with smoothing). Half
    precision is computed in float32 chunk by chunk. With ``create_graph=True`` the backward
    is written in differentiable operations (double backward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, eps: float, reduction: str) -> Tensor:
        cdt = torch.float32 if x.dtype in _LOW else x.dtype
        if reduction == "none":
            out = torch.empty_like(x)
            parts = None
        else:
            out = None
            parts = torch.empty(-(-x.numel() // _BINARY_CHUNK), dtype=cdt, device=x.device)
        flat_out = out if out is not None else x
        for i, (x_, t_, o_) in enumerate(_binary_chunks(x, t, flat_out)):
            xc = x_ if x_.dtype is cdt else x_.to(cdt)
            neg_loss = torch.nn.functional.logsigmoid(xc.neg()).lerp_(
                torch.nn.functional.logsigmoid(xc), _smoothed(t_, cdt, eps)
            )
            if parts is None:
                o_.copy_(neg_loss.neg_())
            else:
                torch.sum(neg_loss, dim=0, out=parts[i])
        ctx.save_for_backward(x, t)
        ctx.eps, ctx.reduction = eps, reduction
        if out is not None:
            return out
        assert parts is not None
        total = -parts.sum()
        if reduction == "mean" and x.numel():
            total = total / x.numel()
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, t = ctx.saved_tensors
        eps = ctx.eps
        cdt = torch.float32 if x.dtype in _LOW else x.dtype
        scale = grad.to(cdt)
        if ctx.reduction == "mean" and x.numel():
            scale = scale / x.numel()
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = (-(1 - eps) * x.to(cdt) * scale).to(t.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_t, None, None
        if torch.is_grad_enabled():  # double backward: differentiable operations
            xc, tc = x.to(cdt), _smoothed(t, cdt, eps)
            g = torch.lerp(torch.sigmoid(xc), -torch.sigmoid(-xc), tc) * scale
            return g.to(x.dtype), grad_t, None, None
        out = torch.empty_like(x)
        scales = _binary_chunks(scale) if scale.ndim else None
        for x_, t_, o_ in _binary_chunks(x, t, out):
            xc = x_ if x_.dtype is cdt else x_.to(cdt)
            d = torch.sigmoid(xc).lerp_(xc.neg().sigmoid_().neg_(), _smoothed(t_, cdt, eps))
            torch.mul(d, scale if scales is None else next(scales)[0], out=o_)
        return out, grad_t, None, None


# --------------------------------------------------------------------------- half precision

_LOW_CHUNK = 1 << 18
"""Elements per row chunk of the half-precision path (two float32 scratch buffers of 1 MiB)."""

_LOW_MIN = 1 << 15
"""Below this many logits the half-precision path is one float32 copy and PyTorch's kernel."""


def _low_chunks(x: Tensor, *others: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """(float32 copy of a chunk of rows, scratch of its shape, the same rows of `others`).

    The chunks come from ``split`` (one call, not a slice per chunk per tensor): at
    2048 × 1000 the loop's Python is a tenth of the time otherwise.
    """
    n, c = x.shape
    rows = max(1, _LOW_CHUNK // max(c, 1))
    size = (min(rows, n), c)
    a = torch.empty(size, dtype=torch.float32, device=x.device)
    b = torch.empty(size, dtype=torch.float32, device=x.device)
    for chunk, *rest in zip(x.split(rows), *(o.split(rows) for o in others), strict=True):
        if chunk.shape[0] != size[0]:
            a, b = a[: chunk.shape[0]], b[: chunk.shape[0]]
        yield (a.copy_(chunk), b, *rest)


class _LowPrecisionCE(torch.autograd.Function):
    r"""Sparse cross-entropy of float16/bfloat16 logits computed in float32, lean in memory.

    Forward: :math:`\ell_i = -\log p_{i y_i}` from PyTorch's float32 ``log_softmax`` of
    row chunks converted into one reused float32 buffer (in cache; no float32 copy of the
    logits, no log-probabilities kept). Saved for backward: the half-precision input (the
    caller's) and the labels. Backward recomputes :math:`g = \sigma_i(p - [k = y])` chunk by
    chunk with float32 ``softmax`` and rounds it once to the input dtype (PyTorch's
    half-precision ``cross_entropy`` rounds the log-probabilities first, so its gradient is
    off by :math:`|\log p|` units of rounding). With ``create_graph=True`` the backward is
    written in differentiable operations instead (double backward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, label: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
        n = x.shape[0]
        den: Tensor | float = 1.0
        if reduction == "mean":
            den = float(n) if valid is None else valid.sum().clamp_min(1).float()
        # reduced losses: the gradient for an upstream gradient of 1 is computed now, from the
        # float32 chunk already in cache, and kept in the input dtype (the size of PyTorch's
        # saved log-probabilities)
        early = ctx.needs_input_grad[0] and reduction != "none"
        scale = torch.full((n, 1), 1.0, dtype=torch.float32, device=x.device) / den
        if valid is not None:
            scale = torch.where(valid[:, None], scale, 0.0)
        g = torch.empty_like(x) if early else x
        row = torch.empty(n, 1, dtype=torch.float32, device=x.device)
        minus_one = torch.full((n, 1), -1.0, dtype=torch.float32, device=x.device)
        col = label[:, None]
        for xf, scratch, y, row_, g_, m_, s_ in _low_chunks(x, col, row, g, minus_one, scale):
            torch._log_softmax(xf, 1, False, out=scratch)
            torch.gather(scratch, 1, y, out=row_)
            if early:
                _grad_chunk(xf, scratch, y, m_, s_, g_)
        row = row[:, 0].neg_()
        if valid is not None:
            row = torch.where(valid, row, 0.0)
        out = row if reduction == "none" else row.sum() if reduction == "sum" else row.sum() / den
        ctx.save_for_backward(x, label, valid)
        # held outside the saved tensors and dropped once returned: autograd may make it the
        # leaf's .grad, which the caller may change in place before a second backward
        ctx.early = g if early else None
        ctx.reduction, ctx.den = reduction, den
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, label, valid = ctx.saved_tensors
        early, ctx.early = ctx.early, None
        if early is not None and not torch.is_grad_enabled() and grad.item() == 1.0:
            return early, None, None, None
        scale = grad.float()
        if ctx.reduction == "mean":
            scale = scale / ctx.den
        scale = scale.expand(x.shape[0]) if scale.ndim == 0 else scale
        if valid is not None:
            scale = torch.where(valid, scale, 0.0)
        scale = scale[:, None]
        if torch.is_grad_enabled():  # double backward: differentiable operations
            p = torch.softmax(x.float(), 1)
            one_hot = torch.zeros_like(p).scatter_(1, label[:, None], 1.0)
            return ((p - one_hot) * scale).to(x.dtype), None, None, None
        out = torch.empty_like(x)
        minus_one = torch.full_like(scale, -1.0)
        for xf, scratch, y, m_, s_, o_ in _low_chunks(x, label[:, None], minus_one, scale, out):
            _grad_chunk(xf, scratch, y, m_, s_, o_)
        return out, None, None, None


def _grad_chunk(
    xf: Tensor, scratch: Tensor, label: Tensor, minus_one: Tensor, scale: Tensor, out: Tensor
) -> None:
    """``out = scale * (softmax(xf) - one_hot(label))``, rounded once to `out`'s dtype.

    `label` and `minus_one` are columns (rows, 1); `scale` a column of row scales.
    """
    torch._softmax(xf, 1, False, out=scratch)
    scratch.scatter_add_(1, label, minus_one)
    torch.mul(scratch, scale, out=out)


def _sparse_low(x: Tensor, target: Tensor, axis: int, opts: CEOptions) -> Tensor | None:
    """Eager half-precision logits (N, C) with PyTorch's options and no weight or smoothing."""
    if x.ndim != 2 or axis != 1 or x.numel() < _LOW_MIN or not x.is_cpu or torch_tracing():
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    t = index_target(target)
    valid, label = _valid_label(t, opts.ignore_index)
    if t.numel() and values_checked(t):
        lo, hi = torch.aminmax(label)
        if lo.item() < 0 or hi.item() >= x.shape[1]:
            from crossent._lib._checks import check_label_range

            check_label_range(t, x.shape[1], ignore_index=opts.ignore_index, xp=array_namespace(t))
    out = _LowPrecisionCE.apply(x, label, valid, opts.reduction)
    return out.to(x.dtype)
