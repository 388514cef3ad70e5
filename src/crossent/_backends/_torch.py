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
  on CPU, from :data:`_LOW_MIN_SPARSE` (:data:`_LOW_MIN` for probability targets) logits
  up, by row chunks through reused float32 buffers (:class:`_LowPrecisionCE`,
  :class:`_LowPrecisionSoftCE`), so that nothing larger than the input is kept for backward;
  below it, one float32 copy and PyTorch's float32 kernel (the chunk loop's Python would
  cost more than the whole kernel there);
- a ``-inf`` logit with target 0 contributes 0 to a probability-target loss
  (PyTorch's kernel first, the guarded product only after a NaN result);
- out-of-range labels raise crossent's message (eagerly: PyTorch's own kernel
  check is turned into it; on accelerators an asynchronous device assert).

Binary cross-entropy with logits has its own exact formula (:func:`binary`:
``F.binary_cross_entropy_with_logits`` loses all relative accuracy of small
losses, e.g. 0 instead of 9.4e-14 at x = -30, t = 0 in float32), with `weight`,
`pos_weight` and `alpha`: one transcendental pass by cache-sized chunks and a
closed-form gradient, or a few fused kernels on small inputs. crossent's own
options (z-loss, softcap, focal) read the loss off :mod:`crossent._losses._rows`
terms made by PyTorch's kernels (:func:`_sparse_rows`): eagerly from
``log_softmax`` with a closed-form chunked gradient (:mod:`._torch_rows`), traced
from the differentiable row statistics.

Losses from probabilities (PyTorch's rule: the log clamped at -100) run eagerly on the
CPU through :mod:`._torch_probs`: the sparse loss reads only the target class's
probability, the categorical and binary losses one vectorized log pass per term, each
with a closed-form gradient that is 0 where the clamp is on.

Each function returns ``None`` when the generic array-API formula must run
(probabilities off the CPU or traced, traced focal loss with smoothing, binary focal
`gamma`, weights that require gradients, eager binary calls on accelerators); that path is made of
differentiable PyTorch operations, so it has the same transforms. Traced binary calls
(``torch.compile``, ``torch.export``, ``torch.func``) have a short formula of
their own (:func:`_binary_traced`), exact at infinite logits without reading
values.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from crossent._backends import _triton_sparse
from crossent._lib import _assert_op  # noqa: F401 - the op registered before any tracing
from crossent._lib._checks import (
    assert_labels_inside,
    assert_labels_on_device,
    assert_on_device,
    check_in_unit_interval,
    check_label_range,
    check_nonnegative,
    checked_on_device,
    device_assertions,
    eager_transforms,
    guard_label_range,
    guard_uint64_labels,
    is_real_scalar,
    unit_interval_message,
    values_checked,
)
from crossent._lib._config import get_validation
from crossent._lib._xp import (
    _torch_namespace,
    array_namespace,
    forward_ad_active,
    int64_labels,
    number_for,
    output_dtype,
    refuse_jit_trace,
    representable,
    softplus_of_neg_abs,
    torch_autocast,
    torch_tracing,
)
from crossent._losses import _rows
from crossent._losses._common import (
    broadcastable,
    mean_class_weight,
    smoothed_target,
    times_log,
)
from crossent._losses._logprob import check_class_weight, softcap_form, softcap_logits
from crossent._losses._options import CEOptions

__all__ = ["categorical", "index_target", "nll", "sparse"]

_NO_IGNORE = -(2**63)
"""``ignore_index`` handed to PyTorch when nothing is ignored: no int64 label equals it
in range, and PyTorch's bound check still rejects it as a label."""

# frozensets: under torch.compile a membership test is two dynamo guards whatever the dtype
# (a tuple's is its length and one per element compared)
_LOW = frozenset((torch.float16, torch.bfloat16))
_HIGH = frozenset((torch.float32, torch.float64))
_INT64 = torch.int64
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
    return int64_labels(target)


def _compute(x: Tensor) -> Tensor:
    """`x` in the compute dtype: float16/bfloat16 accumulate in float32."""
    return x.float() if x.dtype in _LOW else x


def _to_low(out: Tensor, x: Tensor) -> Tensor:
    """`out` in `x`'s half-precision dtype (``.bfloat16()`` / ``.half()``: a third cheaper than
    ``.to(dtype)``'s argument parsing on a 0-d result)."""
    return out.bfloat16() if x.dtype is torch.bfloat16 else out.half()


def _half_result(out: Tensor, x: Tensor) -> Tensor:
    """A loss of half-precision `x` computed in float32: rounded once to `x`'s dtype, or kept
    in float32 under autocast (PyTorch's rule)."""
    autocast = torch_autocast(x)
    return out if autocast else _to_low(out, x)


def _host_readable(x: Tensor) -> bool:
    """Whether a scalar may be read back now: CPU, eager (no compile, export or torch.func)."""
    return x.is_cpu and not torch_tracing()


def _own_eager(x: Tensor) -> bool:
    """Whether crossent's own eager CPU forms may serve `x`: :func:`_host_readable` and no
    forward-mode AD level open (``torch.autograd.forward_ad``). Their autograd Functions have
    no ``jvp`` ('You must implement the jvp function', for dual logits that also require a
    gradient: a model's output) and their no-gradient forms run ``out=`` operations, which have
    no forward derivative; under forward mode the differentiable operations serve instead."""
    return _host_readable(x) and not forward_ad_active()


def _may_hold_neg_inf(x: Tensor) -> bool:
    """Whether `x` may hold ``-inf`` (masked classes): one reduction eagerly, else assumed."""
    if not _host_readable(x) or x.numel() == 0:
        return True
    return not x.detach().min().item() > -math.inf  # NaN: keep the guarded form too


_PROBE_WHOLE = 4096
"""Up to this many logits :func:`mask_ignored_rows` reads the smallest of them all (as fast
as a strided view of one class, which costs its own microsecond)."""


def mask_ignored_rows(
    x: Tensor, target: Tensor, ignore_index: int | None, axis: int, *, accelerator: bool = False
) -> Tensor:
    r"""`x` (logits, classes on `axis`) with zeros in the rows whose target is `ignore_index`
    and whose logits are all ``-inf``.

    An ignored row contributes nothing, so its gradient is 0. A row of ``-inf`` only (a
    masked padding position) has a NaN ``log_softmax`` (no finite maximum to shift by), and
    its zero upstream gradient times that NaN made the row's gradient NaN (as
    ``F.cross_entropy`` does). Zeros there change no loss (the row is masked) and give the
    row a zero gradient through ``where``, as the closed forms of ``value_and_grad`` and
    JAX's autodiff have it. A NaN or ``+inf`` logit in an ignored row keeps its NaN gradient
    there as everywhere (NaN propagates).

    Eagerly on CPU scalar reads decide, without a pass over the logits: the smallest label
    (a negative `ignore_index`, the usual -100) or a comparison (a non-negative one) tells
    whether a row is ignored, the smallest logit of class 0 (of all, for a small input)
    whether any row may be all
    ``-inf``; only then the maxima of the ignored rows are read, and only a masked ignored
    row costs the copy. Traced (``torch.compile``, export, ``torch.func``) the mask is
    computed on the device (the compiler fuses it with the loss's own row maximum). Eagerly
    on an accelerator nothing is read back: the rows are masked with `accelerator` (the
    generic formulas, several passes already), and otherwise not: PyTorch's kernels there
    keep ``F.cross_entropy``'s NaN gradient for such a row (documented), rather than pay a
    pass over the logits on every call with ``ignore_index``.
    """
    if ignore_index is None or x.numel() == 0:
        return x
    if not representable(ignore_index, target.dtype, xp=torch):
        return x  # no label equals it; compared in the labels' dtype it would wrap (uint8: 156)
    if _host_readable(x):
        if not (x.requires_grad and torch.is_grad_enabled()):  # no gradient: nothing to mask
            return x
        if ignore_index < 0:
            if not target.min().item() < 0:  # signed labels here (unsigned: not representable)
                return x
        elif not (target == ignore_index).any().item():
            return x
        probe = x.detach()  # class 0 of every row; a small input whole (one operation less)
        probe = probe if probe.numel() <= _PROBE_WHOLE else probe.select(axis, 0)
        if probe.min().item() > -math.inf:  # no row of -inf only
            return x
        ignored = target == ignore_index
        rows = x.detach().movedim(axis, -1)[ignored]
        if rows.numel() == 0 or not (rows.amax(-1) == -math.inf).any().item():
            return x
    elif not (accelerator or torch_tracing()):
        return x
    # no detach without grad mode: inference_mode tensors have no version counter for it
    probe = x.detach() if torch.is_grad_enabled() else x
    masked = (target == ignore_index) & (probe.amax(axis) == -math.inf)
    return torch.where(masked.unsqueeze(axis), 0.0, x)


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
    # a 1-d index, as in _rows_loss: w[label] of a 0-d label reads it on the host (compiled:
    # 'Could not extract specialized integer from data-dependent expression')
    flat = valid.reshape(-1)
    return torch.where(flat, w[torch.where(flat, t.reshape(-1), 0)], 0).sum()


def _mean_denominator(
    w_y: Tensor | None, valid: Tensor | None, n: int, dtype: torch.dtype
) -> Tensor | float:
    r"""The ``"mean"``'s denominator over `n` rows: the counted target weight :math:`\sum_i w_{y_i}`
    (`w_y`, 0 at ignored rows), else the count of `valid` rows (in `dtype`), else `n`; +inf
    where it would be 0, so that a mean over no counted target, or over counted targets of
    weight 0, is 0 with a zero gradient (the generic formulas' safe division) even where the
    numerator is not 0 (label smoothing and the z-loss count other classes' weights)."""
    if w_y is not None:
        den = w_y.sum()
    elif valid is not None:
        den = valid.sum().to(dtype)
    else:
        return max(n, 1) * 1.0  # float(): a symbolic size would be specialized
    return torch.where(den == 0, math.inf, den)


def _mean_of(
    kernel: Any, args: tuple[Tensor, Tensor, Tensor | None], extra: tuple[Any, ...], ignore: int
) -> Tensor:
    """PyTorch's ``"mean"`` with crossent's rule: 0 (and a zero gradient) over no counted target
    or counted targets of weight 0 (whose smoothing terms make the sum nonzero).

    ``kernel(*args, reduction, ignore, *extra)``; `args` is (logits, int64 labels, weight).
    Eagerly on CPU one scalar test decides (PyTorch's mean is NaN only for
    0/0 or a NaN input); elsewhere the sum is divided by a denominator that is
    +inf where it would be 0 (a finite sum gives 0, a NaN stays NaN), without
    reading anything back.
    """
    x, t, w = args
    if t.numel() == 0:
        return kernel(*args, _REDUCTION_ENUM["sum"], ignore, *extra)
    if x.is_cpu and not torch_tracing():
        out = kernel(*args, _REDUCTION_ENUM["mean"], ignore, *extra)
        if math.isnan(out.item()) and float(_counted_weight(t, w, ignore)) == 0:
            return kernel(*args, _REDUCTION_ENUM["sum"], ignore, *extra) / math.inf
        return out
    total = kernel(*args, _REDUCTION_ENUM["sum"], ignore, *extra)
    den = _counted_weight(t, w, ignore).to(total.dtype)  # a count: not the default dtype
    return total / torch.where(den == 0, math.inf, den)


def _label_error(exc: Exception, t: Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Turn PyTorch's bound-check error into crossent's message (re-raise it otherwise, and
    always where the labels cannot be read: off the CPU, or compiled). Under ``torch.func``
    transforms run eagerly :func:`~crossent._lib._checks.check_label_range` reads the labels
    beneath them: ``vmap``'s gather had raised "index 7 is out of bounds for dimension 2 with
    size 5", ``grad``'s kernel "Target 7 is out of bounds"."""
    if not (eager_transforms() if torch_tracing() else t.is_cpu):
        raise exc
    with torch.no_grad():
        check_label_range(t, num_classes, ignore_index=ignore_index, xp=array_namespace(t))
        guard_uint64_labels(t, num_classes, ignore_index=ignore_index)  # validation off
    raise exc


_CROSS_ENTROPY: Any = torch._C._nn.cross_entropy_loss
_NLL: Any = torch._C._nn.nll_loss_nd
"""PyTorch's loss kernels, looked up once."""

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
    Written for the smallest inputs, where the Python around the kernel is the cost: the
    common call (a mean without weight or ``ignore_index``) reads no flag and builds no
    closure, and a bad label costs nothing until PyTorch's own bound check raises.
    """
    low = x.dtype in _LOW
    xc = x.float() if low else x
    if axis != 1 and x.ndim != 1:
        xc = xc.movedim(axis, 1)
    t = int64_labels(target)
    w = weight if weight is None or weight.dtype is xc.dtype else weight.to(xc.dtype)
    ignore = _NO_IGNORE if opts.ignore_index is None else opts.ignore_index
    reduction = opts.reduction
    if not x.is_cpu and t.numel():  # the kernel's failure is a device assertion there
        if values_checked(t):
            assert_labels_on_device(t, x.shape[axis], opts.ignore_index)
        elif eager_transforms():  # read beneath the torch.func transforms, as on the CPU
            check_label_range(
                t, x.shape[axis], ignore_index=opts.ignore_index, xp=array_namespace(t)
            )
    try:
        if reduction == "mean" and (w is not None or ignore != _NO_IGNORE or not t.numel()):
            out = _mean_of(kernel, (xc, t, w), extra, ignore)
        else:
            out = kernel(xc, t, w, _REDUCTION_ENUM[reduction], ignore, *extra)
    except (IndexError, RuntimeError) as exc:
        _label_error(exc, target, x.shape[axis], opts.ignore_index)  # uint64: its values
        raise  # pragma: no cover - _label_error always raises
    return _half_result(out, x) if low else out  # float32 / float64: autocast leaves them alone


_FUNCTORCH_ACTIVE = torch._C._are_functorch_transforms_active
"""Whether a ``torch.func`` transform is active (the C function: a tenth of
:func:`crossent._lib._checks.eager_transforms`'s cost, asked first)."""


def _maybe_traced(target: object) -> bool:
    """Whether `target` may be a traced tensor, whose labels :func:`traced_labels` checks: a
    tracer's tensor subclass (compile, export), or any tensor under ``torch.func`` transforms
    (their wrappers are plain ``torch.Tensor`` objects; ``torch.compile(vmap(loss))`` traced
    none: PyTorch's ``index 5 is out of bounds for dimension 2 with size 5``, not crossent's
    message). Two checks of 25 ns on the eager hot path."""
    return type(target) is not Tensor or _FUNCTORCH_ACTIVE()


def traced_labels(x: Tensor, target: object, axis: int, ignore_index: int | None) -> Any:
    """Under ``torch.compile`` / ``torch.export`` with validation on: the device-side label
    check, and the labels with every one it refuses replaced by 0
    (:func:`crossent._lib._checks.assert_labels_on_device`), so that the assertion with
    crossent's message is what fails, not a kernel's own bound check (inductor's
    ``index out of bounds: 0 <= tmp21 < 5L``, ``nll_loss``'s ``Target 7 is out of
    bounds``). `target` otherwise (eagerly, with validation off, not a tensor)."""
    if (
        isinstance(target, Tensor)
        and target.dtype in _INTEGERS
        and target.numel()
        and checked_on_device(target)
        and 0 <= axis < x.ndim
    ):
        return assert_labels_on_device(target, x.shape[axis], ignore_index)
    return target


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
    softcap, focal) through :func:`_sparse_rows`; float16/bfloat16 logits on CUDA through the
    Triton kernels of :mod:`crossent._backends._triton_sparse`. `axis` is
    already a valid non-negative class axis; `weight`'s values are checked by
    the caller. Traced, the labels are checked once, by the path taken: PyTorch's kernels
    after :func:`traced_labels`, the others by their own label check (before, the executor's
    check ran first and the rows path and the generic path traced a second one).
    """
    refuse_jit_trace(torch)  # (every PyTorch loss passes one of sparse, categorical, binary)
    dtype = input.dtype
    if (  # the common call: PyTorch's kernel, nothing else (its bound check raises)
        weight is None
        and opts.plain
        and opts.label_smoothing != 1.0
        and opts.ignore_index is None
        and opts.kind == "logits"
        and dtype in _FLOATS
        and input.is_cpu
        and isinstance(target, Tensor)
        and target.dtype is _INT64
        and target.ndim == 1
        and input.ndim == 2
        and target.shape[0] == input.shape[1 - axis]
        and target.shape[0]
        and (dtype in _HIGH or input.numel() < _LOW_MIN_SPARSE)  # half: one float32 copy
    ):
        x = input if axis == 1 else input.t()
        if _maybe_traced(target):
            target = traced_labels(input, target, axis, None)
        try:
            out = _CROSS_ENTROPY(
                x if dtype in _HIGH else x.float(), target, None,
                _REDUCTION_ENUM[opts.reduction], _NO_IGNORE, opts.label_smoothing,
            )  # fmt: skip
        except (IndexError, RuntimeError) as exc:
            _label_error(exc, target, input.shape[axis], None)
            raise  # pragma: no cover - _label_error always raises
        return out if dtype in _HIGH else _half_result(out, input)
    if opts.kind == "probs":  # eagerly on the CPU: the clamped log of the target class only
        if (
            dtype in _FLOATS
            and _own_eager(input)
            and _sparse_shapes_fit(input, target, weight, axis)
        ):
            return _probabilities().sparse(input, target, weight, axis, opts)
        return None
    if opts.kind != "logits" or dtype not in _FLOATS:
        return None
    if not (  # the common call without a call; _sparse_shapes_fit for every other
        weight is None
        and isinstance(target, Tensor)
        and target.ndim == 1
        and input.ndim == 2
        and target.dtype in _INTEGERS
        and target.shape[0] == input.shape[1 - axis]
    ) and not _sparse_shapes_fit(input, target, weight, axis):
        return None
    if weight is not None and opts.plain and _weight_needs_grad(weight):
        return None  # PyTorch's kernels (and the Triton ones) give no weight gradient
    if dtype in _LOW and _triton_sparse.usable(input, opts):  # an accelerator's
        return _sparse_triton(input, target, weight, axis, opts)
    # PyTorch's kernel forms 0 · inf = NaN for a class masked by -inf under smoothing: where ε
    # = 1 ((1 - ε) · (-log p_y) of a masked label, where the loss is the smoothing term's +inf)
    # and where that class's weight is 0 (w_k · (-log p_k), where crossent's term is 0)
    weighted_smoothing = weight is not None and opts.label_smoothing != 0
    if (
        not opts.plain
        or opts.label_smoothing == 1.0
        or (weighted_smoothing and not _host_readable(input))  # nothing to read back
    ):
        return _sparse_rows(input, target, weight, axis, opts)
    if _maybe_traced(target):
        target = traced_labels(input, target, axis, opts.ignore_index)
    masked = mask_ignored_rows(input, target, opts.ignore_index, axis)
    if dtype in _LOW and weight is None and opts.label_smoothing == 0:
        out = _sparse_low(masked, target, axis, opts)
        if out is not None:
            return out
    out = _native_indices(_CROSS_ENTROPY, masked, target, weight, axis, opts, opts.label_smoothing)
    if weighted_smoothing and _holds_nan(out, opts.reduction):  # one read; then the row terms
        return _sparse_rows(input, target, weight, axis, opts)
    return out


def _sparse_rows(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    r"""crossent's own options: eagerly :func:`._torch_rows.own_rows` (``log_softmax`` row
    terms, closed-form gradient), else :func:`_sparse_rows_generic`; None (the generic
    array-API path) for focal loss with smoothing, which no row statistics carry."""
    weight = mean_class_weight(weight, opts.reduction, opts.z_loss, xp=torch)  # huge weights
    stats = _rows.applies(opts)
    if _own_eager(x):  # (_sparse_rows_generic masks its ignored rows itself)
        own_rows = _OWN_ROWS[0] if _OWN_ROWS else _load_own_rows()
        masked = mask_ignored_rows(x, target, opts.ignore_index, axis)
        out = own_rows(masked, target, weight, axis, opts, _rows_of_2d if stats else _generic_of_2d)
        if out is not None:
            return _finish(out, x)
    return _finish(_sparse_rows_generic(x, target, weight, axis, opts), x) if stats else None


def _probabilities() -> Any:
    """:mod:`._torch_probs` (losses from probabilities), imported on first use (it imports
    this module)."""
    from crossent._backends import _torch_probs

    return _torch_probs


_OWN_ROWS: list[Any] = []
""":func:`._torch_rows.own_rows`, imported on first use (it imports this module): an import
statement on every call costs half a microsecond, a tenth of a small loss's Python."""


def _load_own_rows() -> Any:
    from crossent._backends._torch_rows import own_rows

    _OWN_ROWS.append(own_rows)
    return own_rows


def _rows_of_2d(z2: Tensor, t: Tensor, w: Tensor | None, opts: CEOptions) -> Tensor:
    """:func:`_sparse_rows_generic` of ``(n, C)`` logits and flat labels (double backward)."""
    return _sparse_rows_generic(z2, t, w, 1, opts)


def _generic_of_2d(z2: Tensor, t: Tensor, w: Tensor | None, opts: CEOptions) -> Tensor:
    """The generic array-API loss of ``(n, C)`` logits and flat labels (double backward of
    focal loss with smoothing)."""
    from crossent._losses._sparse import _forward

    return _forward(z2, t, weight=w, axis=1, opts=opts, xp=array_namespace(z2))


def _sparse_rows_generic(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor:
    r"""The loss (compute dtype) from :func:`_rows.row_stats`, by differentiable PyTorch operations.

    The statistics are :func:`_rows.row_stats` (row max, sum of exponentials,
    a gather for the target logit, the weighted sum for smoothing), guarded
    for non-finite logits. Everything is a differentiable PyTorch operation,
    so double backward, ``torch.compile`` and ``torch.func`` see plain autograd.
    """
    xc = _compute(x)
    z = xc if axis == x.ndim - 1 else xc.movedim(axis, -1)
    num_classes = z.shape[-1]
    t = index_target(target)
    z = mask_ignored_rows(z, t, opts.ignore_index, z.ndim - 1, accelerator=True)
    form = softcap_form(opts.softcap, z.dtype, xp=torch)
    if form is not None:  # -inf stays -inf, derivative 0: one read tells whether z holds it
        z = softcap_logits(z, opts.softcap, xp=torch, masked=form.guarded or _may_hold_neg_inf(z))
    # eagerly read; compiled the assertion, and the labels it refuses replaced by 0 (indexed
    # with, only the assertion fails); under torch.func read beneath the transforms
    t = check_label_range(t, num_classes, ignore_index=opts.ignore_index, xp=array_namespace(t))
    # validation off, compiled or on an accelerator: row_stats's gather would not fail
    guard_label_range(t, num_classes, ignore_index=opts.ignore_index)
    w = None if weight is None else weight.to(z.dtype)
    valid, label = _valid_label(t, opts.ignore_index)
    smooth = opts.label_smoothing != 0
    # every row counts for the shift (a NaN gradient without a finite max): the ignored rows
    # of -inf only, whose gradient is 0, read zeros (mask_ignored_rows above)
    stats = _rows.row_stats(
        z, label, w, with_wz=smooth, whole=True, counted=valid, xp=array_namespace(z)
    )
    if valid is not None:  # as the array-API formulas' (_sparse._statistics): the ignored
        # rows' stand-in target logit (label 0 on a masked class had an infinite -log p_y,
        # whose product with a zero target weight made the class weights' gradient NaN)
        stats = _rows.stand_in_ignored(stats, valid, xp=torch)
    return _rows_reduce(stats, w, label, valid, num_classes, opts)


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
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row loss from the row statistics (:func:`_rows.row_loss`), each row's target
    weight (None without class weights: 1 at counted rows), both 0 at ignored rows, and the
    rows' log-sum-exp."""
    # a 1-d index: w[label] of a 0-d label reads it on the host (.item()), which compiled
    # graphs and vmap refuse
    w_y = None if w is None else w[label.reshape(-1)].reshape(label.shape)
    total = num_classes * 1.0 if w is None else w.sum()  # a symbolic size stays symbolic
    row, big_l = _rows.row_loss(stats, 1.0 if w_y is None else w_y, total, num_classes, opts,
                                xp=torch)  # fmt: skip
    if valid is not None:
        row = torch.where(valid, row, 0.0)
        w_y = None if w_y is None else torch.where(valid, w_y, 0.0)
    return row, w_y, big_l


def _weighted_reduce(
    row: Tensor, w_y: Tensor | None, valid: Tensor | None, reduction: str
) -> Tensor:
    """`reduction` of the per-row loss; the mean divides by the counted target weight
    `w_y` (without class weights: the count of `valid` rows, else of all rows), and is 0
    over no counted target."""
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    total = row.sum()
    den = _mean_denominator(w_y, valid, row.numel(), row.dtype)
    if isinstance(den, float):  # a 0-d tensor: torch.func.jvp of `total / number` (number_for)
        den = torch.full_like(total, den) if torch_tracing() else _constant(den, total)
    return total / den


def _rows_reduce(
    stats: _rows.RowStats,
    w: Tensor | None,
    label: Tensor,
    valid: Tensor | None,
    num_classes: int,
    opts: CEOptions,
) -> Tensor:
    """The reduced loss from the row statistics, ignored rows masked."""
    row, w_y, _ = _rows_loss(stats, w, label, valid, num_classes, opts)
    return _weighted_reduce(row, w_y, valid, opts.reduction)


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
    valid, label = _valid_label(t, opts.ignore_index)
    if t.numel():  # also with validation off: the kernels read the target logit unchecked
        assert_labels_inside(label, num_classes, opts.ignore_index)
    w = None if weight is None else weight.to(torch.float32).contiguous()

    def loss_of(stats: _rows.RowStats) -> tuple[Tensor, Tensor | None, Tensor]:
        return _rows_loss(stats, w, label, valid, num_classes, opts)

    def recompute(xx: Tensor) -> Tensor:  # double backward: the differentiable formula
        return _sparse_rows_generic(xx, t, w, 1, dataclasses.replace(opts, reduction="none"))

    row, w_y = _triton_sparse.SparseRows.apply(z2, label, valid, w, opts, loss_of, recompute)
    row = row.reshape(z.shape[:-1])
    return _finish(_weighted_reduce(row, w_y, valid, opts.reduction), x)


def nll(
    input: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    """PyTorch's ``nll_loss`` on log-probabilities, with crossent's mean rule; None for generic."""
    if input.dtype not in _FLOATS or not _sparse_shapes_fit(input, target, weight, axis):
        return None
    if _weight_needs_grad(weight):
        return None  # PyTorch's nll_loss gives no weight gradient: the generic formula does
    if _maybe_traced(target):
        target = traced_labels(input, target, axis, opts.ignore_index)
    if input.ndim == 4:  # nll_loss2d's backward: 'grad_input must be contiguous' (channels-last)
        input, axis = input.movedim(axis, 1).contiguous(), 1
    return _native_indices(_NLL, input, target, weight, axis, opts)


def _weight_needs_grad(weight: Tensor | None) -> bool:
    """Whether a class weight takes part in differentiation, so that the generic formula, which
    differentiates it, must serve: it requires a gradient (PyTorch's ``nll_loss`` kernel raises
    for it, the Triton kernels would drop it), or it carries a forward-mode tangent, as a dual
    tensor (``torch.autograd.forward_ad``) or an input of a ``torch.func`` transform
    (``jvp``, ``jacfwd``, ``hessian``; eager, or traced by ``torch.compile``, where the
    tangent came back 1.28 for -0.079), which ``nll_loss`` drops silently (its weight has no
    derivative formula: the tangent came back 0)."""
    if weight is None:
        return False
    if weight.requires_grad and torch.is_grad_enabled():
        return True
    if forward_ad_active() and _unpack_dual(weight).tangent is not None:
        return True
    return _FUNCTORCH_ACTIVE() and _is_wrapped(weight)


def _unpack_dual(x: Tensor) -> Any:
    from torch.autograd.forward_ad import unpack_dual

    return unpack_dual(x)


def _is_wrapped(x: Tensor) -> bool:
    """Whether `x` is a ``torch.func`` transform's tensor (an input of the transformed function,
    not a tensor it closes over)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


# --------------------------------------------------------------------------- probability targets


def categorical(
    input: Tensor, target: object, weight: object, axis: object, opts: CEOptions
) -> Tensor | None:
    r"""Probability-target cross-entropy from logits: PyTorch's kernel and one scalar test.

    :math:`\ell = -\sum_k c_k \log p_k` with :math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`,
    the mean dividing by the number of rows: PyTorch's ``cross_entropy`` for probability
    targets computes exactly this. crossent's differences: a term with :math:`c_k = 0` is 0
    even where :math:`\log p_k = -\infty` (a masked class, where PyTorch's product is NaN:
    a NaN result is recomputed by :func:`_soft_guarded` eagerly; traced calls take the
    guarded form directly), a mean over no rows is 0, and float16/bfloat16 are computed in
    float32 (large inputs by row chunks, :class:`_LowPrecisionSoftCE`).

    The arrays are checked here, `axis` too (None for anything unusual: the generic path
    checks again and raises the message), so that the common call makes no array-API call;
    the targets' range costs one ``aminmax`` (:func:`_in_unit_interval`).
    """
    refuse_jit_trace(torch)
    if (  # the common call: 2-d logits and targets on the CPU, eager, no weight
        not torch_tracing()  # first: traced, no condition below leaves a guard
        and weight is None
        and opts.plain
        and opts.kind == "logits"
        and isinstance(target, Tensor)
        and input.dtype in _FLOATS
        and target.dtype in _FLOATS
        and input.ndim == 2
        and type(axis) is int
        and (axis == -1 or axis == 1)
        and input.is_cpu
        and target.shape == input.shape
        and input.numel()
        and input.numel() < _soft_chunked_from(input)  # half: one float32 copy
    ):
        if get_validation() and not _in_unit_interval(target):
            check_in_unit_interval(target, name="target", xp=_torch_namespace())
        if opts.label_smoothing == 0:
            out = _soft_unsmoothed(input, target, opts)
            return out if input.dtype in _HIGH else _half_result(out, input)
        xc = input if input.dtype in _HIGH else input.float()
        out = _soft_native(xc, _soft_target(target, xc.dtype, opts), None, opts)
        return out if xc is input else _half_result(out, input)
    if not (opts.kind != "log_probs" and opts.plain and isinstance(target, Tensor)):
        return None
    dtype = input.dtype
    ndim = input.ndim
    if not (
        dtype in _FLOATS
        and target.dtype in _FLOATS
        and target.shape == input.shape
        and type(axis) is int
        and -ndim <= axis < ndim
    ):
        return None
    axis %= ndim
    if weight is not None:
        if not (isinstance(weight, Tensor) and weight.dtype in _FLOATS):
            return None
        check_class_weight(weight, input.shape[axis], xp=_torch_namespace())
    if opts.kind == "probs":  # eagerly on the CPU: one log pass, the gradient in closed form
        return (
            _probabilities().categorical(input, target, weight, axis, opts)
            if _own_eager(input)
            else None
        )
    traced = torch_tracing()
    eager = input.is_cpu and not traced
    if traced:
        _assert_unit_interval(target)
    elif target.numel() and get_validation() and not (eager and _in_unit_interval(target)):
        # the message; on other devices one device read (none on ``meta``: no values)
        check_in_unit_interval(target, name="target", xp=_torch_namespace())
    low = dtype in _LOW
    if (low or dtype is torch.float32) and not torch_autocast(input):
        chunked = _soft_low(input, target, weight, axis, opts)
        if chunked is not None:
            return chunked
    xc = input.float() if low else input
    c = _soft_target(target, xc.dtype, opts)
    w = weight if weight is None or weight.dtype is xc.dtype else weight.to(xc.dtype)
    if axis != 1 and ndim != 1:
        xc, c = xc.movedim(axis, 1), c.movedim(axis, 1)
    out = _soft_native(xc, c, w, opts) if eager and xc.numel() else _soft_guarded(xc, c, w, opts)
    return _half_result(out, input) if low else out


def _soft_target(t: Tensor, dtype: torch.dtype, opts: CEOptions) -> Tensor:
    """Targets for PyTorch's probability-target kernel computing in `dtype`: as they are where
    its products promote them exactly (`dtype` itself, or half precision without smoothing,
    which PyTorch would compute in the targets' dtype), else converted (one operation fewer:
    a fifth of a 32 × 10 loss)."""
    if t.dtype is dtype or (t.dtype in _LOW and opts.label_smoothing == 0):
        return t
    return t.to(dtype)


def _soft_native(xc: Tensor, c: Tensor, w: Tensor | None, opts: CEOptions) -> Tensor:
    """PyTorch's probability-target kernel, classes on dim 1 (dim 0 for one row), eager and
    non-empty; a NaN result (a masked class, 0 · -inf, or a NaN input) is recomputed by
    :func:`_soft_guarded`."""
    out = _CROSS_ENTROPY(xc, c, w, _REDUCTION_ENUM[opts.reduction], -100, opts.label_smoothing)
    if _holds_nan(out, opts.reduction):
        return _soft_guarded(xc, c, w, opts)
    return out


def _holds_nan(out: Tensor, reduction: str, *, inf: bool = False) -> bool:
    """Whether the loss `out` holds a NaN (or, with `inf`, is +inf), by one host read (of the
    sum of the row losses for ``"none"``: they are never -inf, so a NaN sum is a NaN row)."""
    value = (out.detach().sum() if reduction == "none" else out).item()
    return math.isnan(value) or (inf and value == math.inf)


def _soft_unsmoothed(x: Tensor, t: Tensor, opts: CEOptions) -> Tensor:
    r"""Logits (N, C) and targets without smoothing or weight: :math:`-\sum_k t_k \log p_k`
    reduced as PyTorch's probability-target kernel reduces it (``-(log_p * t).sum() / N``, as
    ``(log_p * t).sum() / -N``: the same bits, and the same gradient, :math:`1/(-N)` being
    :math:`-(1/N)` exactly), in float32 for half-precision `x` (``log_softmax(x,
    dtype=float32)``: the conversion inside it). The common call (eager, CPU): the divisor is a
    cached 0-d tensor (:func:`_scalar`).

    PyTorch's kernel makes the same operations plus a negation, a 0-d tensor of :math:`N` and
    the call layers around them; here without a gradient the product is written into the
    log-probabilities (3 % of a 256 × 100 forward, 8 % of a forward and backward, one autograd
    node fewer). A NaN result is recomputed by :func:`_soft_guarded`, as :func:`_soft_native`
    does."""
    low = x.dtype in _LOW
    log_p = x.log_softmax(1, dtype=torch.float32) if low else x.log_softmax(1)
    dtype = log_p.dtype
    # half-precision targets enter the float32 product as they are (promoted exactly)
    c = t if t.dtype is dtype else _soft_target(t, dtype, opts)
    if torch.is_grad_enabled() and (x.requires_grad or c.requires_grad):
        # half-precision targets converted once (exactly): the product and its backward run
        # one-dtype kernels, not mixed-dtype ones (each 2.2x slower at 256 x 100)
        prod = log_p * (c if c.dtype is dtype else c.to(dtype))
    else:  # in place where the product's layout is log_p's either way (the sum's order)
        prod = log_p.mul_(c) if c.is_contiguous() else log_p * c
    reduction = opts.reduction
    if reduction == "mean":  # a cached 0-d divisor: wrapping the number costs 1.5 µs
        out = prod.sum().div(_scalar(-float(x.shape[0]), dtype))
    else:
        out = -(prod.sum(1) if reduction == "none" else prod.sum())
    if _holds_nan(out, reduction):
        return _soft_guarded(x.float() if low else x, c, None, opts)
    return out


def _soft_guarded(xc: Tensor, c: Tensor, w: Tensor | None, opts: CEOptions) -> Tensor:
    r""":math:`-\sum_k c_k \log p_k` with :math:`0 \cdot (-\infty) = 0`, classes on dim 1 (dim 0
    for one row), reduced; differentiable operations (compile, torch.func, double backward)."""
    axis = 1 if xc.ndim > 1 else 0
    c = _soft_coefficients(c, w, opts.label_smoothing, axis)
    log_p = torch.log_softmax(xc, dim=axis)
    terms = times_log(c, log_p, log_p == -math.inf, xp=torch)  # a NaN row stays NaN
    return _reduced(-terms.sum(dim=axis), opts.reduction)


def _reduced(loss: Tensor, reduction: str) -> Tensor:
    """`loss` reduced: as it is, summed, or averaged (the sum, 0, for an empty mean)."""
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" or not loss.numel() else loss.mean()


# --------------------------------------------------------------------------- binary

Coef = float | Tensor
"""A mass coefficient of :func:`binary`: a number, or a tensor broadcast to the input."""

_UNIT = 1.0
"""The coefficient of an unweighted call (:func:`_is_one` tests it by identity first)."""


def binary(
    input: object,
    target: object,
    weight: object,
    pos_weight: object,
    label_smoothing: float,
    opts: CEOptions,
) -> Tensor | None:
    r"""Binary cross-entropy from logits, exact, PyTorch's speed; None for the generic path.

    With the masses :math:`P = w\,\alpha\,p_w\,t` and :math:`N = w\,(1-\alpha)(1-t)`
    (:math:`t` after smoothing; :math:`\alpha` and :math:`1-\alpha` read as 1 without
    `alpha`) the loss and its derivative are

    .. math:: \ell = P\,\operatorname{sp}(-x) + N\,\operatorname{sp}(x), \qquad
              \partial_x\ell = N\,\sigma(x) - P\,\sigma(-x),

    :math:`\operatorname{sp}(x) = \log(1 + e^x)`. PyTorch's kernel computes
    :math:`(1-t)x - \log\sigma(x)`, which cancels for :math:`x \ll 0` (0 instead of 9.4e-14
    at :math:`x = -30`, :math:`t = 0` in float32); here every sum is of terms of one sign:

    * small inputs (:func:`_binary_small`): PyTorch's ``softplus`` of :math:`x` with
      :math:`\beta = \pm 1` (:math:`\operatorname{sp}(x)` and :math:`-\operatorname{sp}(-x)`;
      exact: its threshold is raised to 40, where :math:`e^{-40}/40` is below float64's
      rounding), combined by ``lerp`` (PyTorch's ``lerp`` computes :math:`a + t(b-a)` for
      :math:`t < 1/2` and :math:`b - (b-a)(1-t)` otherwise: no cancellation between the
      two losses of one sign); the fewest kernels, and with a logit gradient one autograd
      node (:class:`_BinarySmall`) whose backward is the closed form;
    * large inputs (:class:`_BinaryCE`): one transcendental pass. With
      :math:`u = \sigma(-|x|)` and :math:`s = -\operatorname{log1p}(-u) = \operatorname{sp}(-|x|)`,
      :math:`\operatorname{sp}(\pm x) = s + \operatorname{relu}(\pm x)`, so
      :math:`\ell = \operatorname{lerp}(n\operatorname{sp}(x), p\operatorname{sp}(-x), t)` with
      the coefficients :math:`n = w(1-\alpha)`, :math:`p = w\alpha p_w` (without them
      :math:`s + \operatorname{lerp}(\operatorname{relu}(x), \operatorname{relu}(-x), t)`, where
      :math:`\operatorname{relu}(-x) - \operatorname{relu}(x) = -x` exactly), by chunks that
      stay in cache, with a closed-form gradient.

    `weight`, `pos_weight` (numbers or floating tensors broadcast to the input, not requiring
    gradients) and `alpha` enter through :math:`P` and :math:`N`; focal `gamma` takes the
    generic formula. Invalid values (targets outside [0, 1], negative weights) also take the
    generic path, whose checks raise the error. An infinite logit makes a ``lerp`` or a
    product compute 0 · ∞: a NaN result is recomputed by the guarded generic formula (one
    scalar test, eager only; traced calls: :func:`_binary_traced`).
    """
    refuse_jit_trace(torch)
    if opts.kind == "probs":  # eagerly on the CPU: vectorized clamped logs
        return _probabilities().binary(input, target, weight, pos_weight, label_smoothing, opts)
    if not (
        opts.kind == "logits"
        and opts.gamma == 0
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype in _FLOATS
        and target.dtype in _FLOATS
        and input.shape == target.shape
    ):
        return None
    if not _own_eager(input):  # traced, an accelerator, dual tensors: no scalar test of it
        return _binary_unread(input, target, weight, pos_weight, label_smoothing, opts)
    if input.dtype in _LOW and torch_autocast(input):
        return None  # the generic formula returns float32 under autocast, as PyTorch does
    checked = get_validation()  # eager, on the CPU: values can be read
    if weight is None and pos_weight is None and opts.alpha is None:
        pos: Coef = _UNIT
        neg: Coef = _UNIT
    else:
        cdt = torch.float32 if input.dtype in _LOW else input.dtype
        coefs = _binary_coefs(input, cdt, weight, pos_weight, opts.alpha, checked=checked)
        if coefs is None:
            return None
        pos, neg = coefs
    n = input.numel()
    if n == 0 or (checked and not _in_unit_interval(target)):
        return None  # empty: the generic formula's 0 for a mean; bad targets: its error
    grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    if n <= _BINARY_SMALL and not (grad and target.requires_grad):
        out = _binary_small(input, target, pos, neg, label_smoothing, opts.reduction)
    elif grad:
        out = _CHUNKED_APPLY(input, target, (pos, neg, label_smoothing, opts.reduction))
    else:
        out, _ = _binary_chunked(
            input, target, pos, neg, label_smoothing, opts.reduction, early=False
        )
    total = out.detach().sum() if opts.reduction == "none" else out
    if math.isnan(total.item()):  # NaN input, or an infinite logit: lerp's 0 · inf
        return None
    return out if out.dtype is input.dtype else out.to(input.dtype)


def _binary_unread(
    x: Tensor,
    target: Tensor,
    weight: object,
    pos_weight: object,
    label_smoothing: float,
    opts: CEOptions,
) -> Tensor | None:
    """:func:`binary` where no value is read back (traced, accelerators): the checks as
    device-side assertions (under ``torch.compile`` / ``torch.export``) or one device read
    each (eager accelerators, none on ``meta``), then :func:`_binary_traced`; None (the generic
    formula) for weights it does not take."""
    coefs = None
    if not (opts.plain and weight is None and pos_weight is None):
        cdt = torch.float32 if x.dtype in _LOW else x.dtype
        coefs = _binary_coefs(x, cdt, weight, pos_weight, opts.alpha, checked=False, traced=True)
        if coefs is None:
            return None
    # the checks' reductions need no array-API wrapper: PyTorch's own any / min / max
    if torch_tracing():
        _assert_unit_interval(target)
    elif get_validation():  # one device read (none on meta)
        check_in_unit_interval(target, name="target", xp=torch)
    if coefs is not None:
        for name, w in (("weight", weight), ("pos_weight", pos_weight)):
            if isinstance(w, Tensor):  # traced: a device-side assertion; else one device read
                check_nonnegative(w, name=name, xp=torch)
    return _binary_traced(x, target, label_smoothing, opts.reduction, coefs)


def _assert_unit_interval(t: Tensor) -> None:
    """Traced targets: :func:`check_in_unit_interval`'s device-side assertion under compile and
    export with validation on, in fewer calls (each global a traced function reads is a dynamo
    guard, checked before every call of the compiled function). Under ``torch.func`` transforms
    run eagerly the values are read beneath them, with the eager message (before, unchecked)."""
    if device_assertions():
        if get_validation():
            assert_on_device((t < 0) | (t > 1), _TARGET_RANGE)
    elif eager_transforms():
        check_in_unit_interval(t, name="target", xp=_torch_namespace())


_TARGET_RANGE = unit_interval_message("target", "")


_ONE_BITS = {
    torch.float32: (torch.int32, 0x3F800000),
    torch.float64: (torch.int64, 0x3FF0000000000000),
    torch.bfloat16: (torch.int16, 0x3F80),
    torch.float16: (torch.int16, 0x3C00),
}
"""Each float dtype's integer view and the bits of 1.0: the non-negative floats up to 1 are
exactly the bit patterns from 0 to these (integer comparisons, no NaN handling: a faster pass)."""


def _in_unit_interval(t: Tensor) -> bool:
    """Whether every value of `t` lies in [0, 1]; False for NaN, which the generic path then
    checks (and lets through), and above :data:`_FLOAT_RANGE_MAX` elements for -0.0 too (its
    sign bit makes it negative as an integer)."""
    if t.requires_grad:
        t = t.detach()
    if t.numel() <= _FLOAT_RANGE_MAX:
        lo, hi = torch.aminmax(t)
        return lo.item() >= 0 and hi.item() <= 1
    int_dtype, one = _ONE_BITS[t.dtype]
    lo, hi = torch.aminmax(t.view(int_dtype))
    return lo.item() >= 0 and hi.item() <= one


_FLOAT_RANGE_MAX = 1 << 12
"""Up to this many elements :func:`_in_unit_interval` reads the float values' ``aminmax`` (the
integer view is one more operation, 0.4 µs); above, the integer view's (a faster pass: 3.5
against 5 µs at 25 600 elements)."""


def _binary_coef(
    w: object, x: Tensor, cdt: torch.dtype, *, checked: bool, traced: bool = False
) -> Coef | None:
    """`weight` / `pos_weight` as a number or a tensor of dtype `cdt`; None if the generic
    path must check (or differentiate) it: `x` on the CPU, or with `traced` (differentiable
    operations, :func:`_binary_traced`) anywhere, a weight on its device."""
    if w is None:
        return 1.0
    if isinstance(w, Tensor):
        if (
            w.dtype not in _FLOATS
            or (w.device != x.device if traced else not w.is_cpu)  # eager: x is on the CPU
            or (w.requires_grad and torch.is_grad_enabled() and not traced)
            # traced, a size comparison of unequal ranks guards a dynamic batch size
            or not ((not traced and w.shape == x.shape) or broadcastable(w.shape, x.shape))
        ):
            return None
        if checked and w.numel() and not w.min().item() >= 0:
            return None  # negative (or NaN): the generic path raises (or propagates)
        return w if w.dtype is cdt else w.to(cdt)
    if (isinstance(w, bool) or not isinstance(w, (int, float))) and not is_real_scalar(w):
        return None  # (a NumPy scalar is the number it holds)
    number = float(w)
    return number if number >= 0 else None


def _binary_coefs(
    x: Tensor,
    cdt: torch.dtype,
    weight: object,
    pos_weight: object,
    alpha: float | None,
    *,
    checked: bool,
    traced: bool = False,
) -> tuple[Coef, Coef] | None:
    r"""The coefficients :math:`w\,\alpha\,p_w` of :math:`t` and :math:`w\,(1-\alpha)` of
    :math:`1-t` (numbers where they can be); None for the generic path."""
    w = _binary_coef(weight, x, cdt, checked=checked, traced=traced)
    pw = _binary_coef(pos_weight, x, cdt, checked=checked, traced=traced)
    if w is None or pw is None:
        return None
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    return _product(_product(w, pw), a_pos), _product(w, a_neg)


def _product(a: Coef, b: Coef) -> Coef:
    """``a * b``, skipping a factor that is the number 1 (a number beside a 0-d tensor: a
    tensor, :func:`number_for`)."""
    return a if _is_one(b) else b if _is_one(a) else number_for(a, b) * number_for(b, a)


def _unweighted(pos: Coef, neg: Coef) -> bool:
    return _is_one(pos) and _is_one(neg)


_SOFTPLUS_EXACT = 40.0
"""``softplus``'s threshold, above which it returns x: the neglected :math:`e^{-x}` is below
float64's rounding of x from 40 on (PyTorch's default, 20, is not, in float64)."""

_BINARY_SMALL = 1 << 12
"""Up to this many elements, :func:`_binary_small` (fewest kernels); above, :class:`_BinaryCE`
(one transcendental pass in cache-sized chunks)."""


def _binary_traced(
    x: Tensor, target: Tensor, eps: float, reduction: str, coefs: tuple[Coef, Coef] | None = None
) -> Tensor:
    r"""Binary cross-entropy where no scalar can be read back: traced (``torch.compile``,
    ``torch.export``, ``torch.func``) and on accelerators (about 30 kernels for a
    forward+backward, against the generic formula's 45).

    With :math:`\pi = [x > 0]`, :math:`a = |x|` taken as :math:`x` or :math:`-x` by
    :math:`\pi` and :math:`c = \pi - t`,

    .. math:: \ell = \operatorname{log1p}(e^{-a}) + c\,x
              = (1-t)\max(x, 0) + t\max(-x, 0) + \operatorname{log1p}(e^{-|x|}),

    a sum of non-negative terms (no cancellation, one exponential and one ``log1p``
    per element: one fused kernel under inductor, about as fast as PyTorch's). A term
    with :math:`c = 0` at a ``±inf`` logit (the matching hard target) is 0, read off the
    values in the graph (:func:`~crossent._losses._common.times_log`); a finite one keeps
    its target derivative :math:`-x`.
    Autograd's gradient is :math:`\sigma(x) - t` everywhere, :math:`x = 0` included
    (the kink of :math:`|x|` and the jump of :math:`c` are taken on the same side).

    With `coefs` (:func:`_binary_coefs`: weights, ``pos_weight``, ``alpha``) and the masses
    :math:`P = p\,t`, :math:`N = n\,(1-t)` of :func:`binary`, the same split of
    :math:`\operatorname{sp}(\pm x)` gives

    .. math:: \ell = (P + N)\operatorname{log1p}(e^{-|x|}) + c\,x, \qquad
              c = [x > 0]\,N - [x \le 0]\,P,

    again terms of one sign, the weights differentiable (their gradients too).
    """
    xc = _compute(x)
    t = _smoothed(target, xc.dtype, eps)
    right = xc > 0
    if torch.compiler.is_compiling():
        # sp(-|x|) from exp(-|x|): inductor's CPU kernel of exp(where(x > 0, -x, x)), the same
        # values, ran at half the speed (2.2x compiled PyTorch at 256 x 100 and 1024 x 1000),
        # and isinf is a scalar loop there. At x = 0 the derivatives of the x <= 0 side, as
        # c's jump below (softplus_of_neg_abs).
        tail = softplus_of_neg_abs(xc, xp=_torch_namespace())
        inf = xc.abs() == math.inf
    else:  # eagerly (an accelerator, torch.func) each operation is a kernel: the fewest
        tail = torch.log1p(torch.exp(torch.where(right, -xc, xc)))
        inf = xc.isinf()
    if coefs is None:
        c = torch.where(right, 1 - t, -t)
    else:  # (P + N) sp(-|x|) + [x > 0] N x - [x <= 0] P x
        big_p, big_n = _masses(t, *coefs)
        tail = (big_p + big_n) * tail
        c = torch.where(right, big_n, -big_p)
    return _finish(_reduced(tail + times_log(c, xc, inf, xp=torch), reduction), x)


_BINARY_CHUNK = 1 << 16
"""Elements per chunk of :class:`_BinaryCE`: its temporaries (256 KiB in float32) stay in cache."""


def _smoothed(t: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    t = t if t.dtype is dtype else t.float() if dtype is torch.float32 else t.to(dtype)
    return smoothed_target(t, eps, 2)


def _masses(t: Tensor, pos: Coef, neg: Coef) -> tuple[Tensor, Tensor]:
    r""":math:`P = \mathrm{pos}\cdot t` and :math:`N = \mathrm{neg}\cdot(1-t)`. On the CPU
    :math:`1-t` is ``neg(t).add_(1)`` (the same bits, a third of ``1 - t``'s cost on a small
    tensor, whose number is wrapped into a tensor per call); elsewhere one kernel."""
    not_t = torch.neg(t).add_(1) if t.is_cpu else 1 - t
    # (a number beside a 0-d tensor: a tensor, number_for)
    p = t if _is_one(pos) else t * number_for(pos, t)
    return p, (not_t if _is_one(neg) else not_t * number_for(neg, t))


_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}
_CPU = torch.device("cpu")


def _scalar(value: float, dtype: torch.dtype, device: torch.device = _CPU) -> Tensor:
    """A cached 0-d tensor of `value`: PyTorch wraps a Python number into a tensor at every
    operation (about 1 µs, as long as a small operation itself; an in-place ``mul_`` /
    ``div_`` by the cached tensor costs half of one by the number). Made outside inference
    mode, so that later calls with a gradient can use it."""
    key = (value, dtype, device)
    c = _CONSTANTS.get(key)
    if c is None:
        if len(_CONSTANTS) >= 256:
            _CONSTANTS.clear()
        with torch.inference_mode(False):
            c = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return c


def _constant(value: float, like: Tensor) -> Tensor:
    """:func:`_scalar` of `value` in `like`'s dtype and device."""
    return _scalar(value, like.dtype, like.device)


_SOFTPLUS: Any = torch._C._nn.softplus


def _small_loss(x: Tensor, nx: Tensor, t: Tensor, pos: Coef, neg: Coef, common: Coef) -> Tensor:
    r""":math:`\ell = \operatorname{lerp}(n\operatorname{sp}(x), p\operatorname{sp}(-x), t)`
    (times `common`) per element: ``softplus`` of `x` and of `nx` :math:`= -x` (the negation
    the gradient's :math:`\sigma(-x)` shares), one ``lerp``; both ends non-negative, so no
    cancellation (see :func:`binary`)."""
    a = _SOFTPLUS(x, 1, _SOFTPLUS_EXACT)  # sp(x) = -log(1 - p)
    b = _SOFTPLUS(nx, 1, _SOFTPLUS_EXACT)  # sp(-x) = -log p
    if pos is _UNIT and neg is _UNIT and common is _UNIT:  # the unweighted call
        return a.lerp_(b, t)
    if not _is_one(neg):
        a.mul_(neg)
    if not _is_one(pos):
        b.mul_(pos)
    loss = a.lerp_(b, t)
    return loss if _is_one(common) else loss.mul_(common)


def _small_reduced(loss: Tensor, reduction: str) -> Tensor:
    """:func:`_small_loss`'s losses reduced (a 0-d division by :math:`n` for ``"mean"``,
    correctly rounded as PyTorch's ``mean``; by a cached 0-d tensor: these run on the CPU)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total.div_(_scalar(float(loss.numel()), total.dtype))


def _binary_small(x: Tensor, t: Tensor, pos: Coef, neg: Coef, eps: float, reduction: str) -> Tensor:
    r"""Small inputs without a target gradient: the fewest kernels (:func:`_small_loss`);
    with a logit gradient one autograd node (:class:`_BinarySmall`), whose backward is
    :math:`N\sigma(x) - P\sigma(-x)` in five kernels."""
    if x.requires_grad and torch.is_grad_enabled():
        return _SMALL_APPLY(x, t, (pos, neg, eps, reduction))
    return _small_forward(x, t, pos, neg, eps, reduction)[0]


def _small_forward(
    x: Tensor, t: Tensor, pos: Coef, neg: Coef, eps: float, reduction: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Coef, Coef, Coef]]:
    """:func:`_binary_small`'s loss in `x`'s dtype, with what its gradient needs: the logits,
    their negation and the smoothed targets in the computing dtype, and the factored
    coefficients."""
    xc = x.float() if x.dtype in _LOW else x
    tc = t if eps == 0 and t.dtype is xc.dtype else _smoothed(t, xc.dtype, eps)
    factored = _PLAIN_FACTORS if pos is _UNIT and neg is _UNIT else _factored(pos, neg)
    nx = torch.neg(xc)
    out = _small_reduced(_small_loss(xc, nx, tc, *factored), reduction)
    return (out if out.dtype is x.dtype else _to_low(out, x)), xc, nx, tc, factored


_PLAIN_FACTORS = (_UNIT, _UNIT, _UNIT)
""":func:`_factored` of an unweighted call."""


def _small_gradient(
    xc: Tensor, nx: Tensor, tc: Tensor, factored: tuple[Coef, Coef, Coef], reduction: str
) -> Tensor:
    r""":math:`N\sigma(x) - P\sigma(-x)` (:func:`_derivative_into`; `nx` is :math:`-x`), over the
    element count for a mean: the forward's early gradient and the backward's, in one order of
    roundings."""
    d = _derivative_into(torch.sigmoid(xc), torch.sigmoid(nx), tc, *factored)
    return d.div_(_scalar(float(xc.numel()), d.dtype)) if reduction == "mean" else d


class _BinarySmall(torch.autograd.Function):
    r""":func:`_binary_small` with a logit gradient: the same forward kernels and the closed
    form :math:`\operatorname{lerp}(n\,\sigma(x), -p\,\sigma(-x), t)\cdot c` (each term exact,
    as in :func:`_derivative_into`), for a reduced loss computed during the forward pass and
    kept (:func:`_early_gradient`; the size of the gradient that backward returns), otherwise
    in backward. Half precision is computed in float32 and each result rounded once."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, options: tuple[Coef, Coef, float, str]) -> Tensor:
        pos, neg, eps, reduction = options
        out, xc, nx, tc, factored = _small_forward(x, t, pos, neg, eps, reduction)
        # the tensor coefficients (the caller's weight / pos_weight) are saved too, so that one
        # changed in place before backward is an error, not another gradient; ctx.coefs keeps
        # which is which
        ctx.save_for_backward(x, tc, *(c for c in (pos, neg) if isinstance(c, Tensor)))
        ctx.coefs, ctx.reduction, ctx.early = (pos, neg), reduction, None
        if reduction != "none":
            d = _small_gradient(xc, nx, tc, factored, reduction)
            ctx.early = d if d.dtype is x.dtype else d.to(x.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, t, *_ = ctx.saved_tensors
        early = _early_gradient(ctx, grad, x)
        if early is not None:
            return early, None, None
        pos, neg = ctx.coefs
        xc = x.float() if x.dtype in _LOW else x
        g = grad if grad.dtype is xc.dtype else grad.float()
        if torch.is_grad_enabled():  # double backward: differentiable operations
            d = _logit_derivative(xc, t, pos, neg)
            d = (d / _constant(float(x.numel()), g) if ctx.reduction == "mean" else d) * g
        else:  # the forward's early gradient, in the same order of roundings (reentrant)
            factored = _factored(pos, neg)
            d = _small_gradient(xc, torch.neg(xc), t, factored, ctx.reduction).mul_(g)
        return (d if d.dtype is x.dtype else d.to(x.dtype)), None, None


def _early_gradient(ctx: Any, grad: Tensor, x: Tensor) -> Tensor | None:
    """The logit gradient the forward pass kept in ``ctx.early`` (for an upstream gradient of 1),
    times the upstream gradient; None when backward must compute it (none kept, a second
    backward, a double backward, half precision with an upstream gradient other than 1)."""
    early, ctx.early = ctx.early, None
    if early is None or torch.is_grad_enabled():
        return None
    up = grad.item()
    if up == 1.0:
        return early
    if x.dtype not in _LOW:  # rounded twice either way; half precision recomputes
        return early.mul_(up)
    return None


_SMALL_APPLY = super(torch.autograd.Function, _BinarySmall).apply
"""``_BinarySmall.apply`` without ``Function.apply``'s Python prologue (default-argument binding
and functorch's dead-wrapper unwrapping, a third of the call): the eager CPU path it serves
never runs under a functorch transform (:func:`_own_eager`)."""


def _is_one(c: Coef) -> bool:
    return c is _UNIT or (isinstance(c, float) and c == 1.0)


def _binary_parts(x: Tensor, *others: Any) -> list[tuple[Any, ...]]:
    """Cache-sized pieces of `x` and the same pieces of `others` (tensors of `x`'s shape, or
    broadcast to it: a tensor or number that broadcasts is handed to every piece).

    Rows of dim 0 per piece (one ``split`` per tensor); a row larger than a chunk is split
    again, row by row.
    """
    shape = x.shape
    if x.numel() <= _BINARY_CHUNK:
        return [(x, *others)]
    row = math.prod(shape[1:])
    full = [isinstance(o, Tensor) and o.ndim == x.ndim and o.shape[0] == shape[0] > 1
            for o in others]  # fmt: skip
    if row <= _BINARY_CHUNK or x.ndim == 1:
        rows = max(1, _BINARY_CHUNK // max(row, 1))
        cols = [o.split(rows) if f else None for o, f in zip(others, full, strict=True)]
        return [
            (xs, *(c[i] if c is not None else o for c, o in zip(cols, others, strict=True)))
            for i, xs in enumerate(x.split(rows))
        ]
    pieces = []
    for i in range(shape[0]):
        sub = [
            o[i] if f else o[0] if isinstance(o, Tensor) and o.ndim == x.ndim else o
            for o, f in zip(others, full, strict=True)
        ]
        pieces.extend(_binary_parts(x[i], *sub))
    return pieces


class _Workspace:
    """Chunk-sized buffers of one dtype, kept per thread and reused by every call.

    A fresh 256 KiB temporary per chunk costs more in page faults than the kernel that
    writes it; so the chunk loops write into these (``out=`` and in-place kernels).
    :meth:`views` hands out views of a chunk's shape, themselves kept (a few shapes).
    """

    _local = threading.local()
    COUNT = 6
    SHAPES = 8

    def __init__(
        self, dtype: torch.dtype, device: torch.device, size: int = 0, count: int = COUNT
    ) -> None:
        """`count` buffers of `size` elements (:data:`_BINARY_CHUNK` for 0)."""
        cache: dict[tuple[Any, ...], tuple[list[Tensor], dict[Any, Any]]]
        cache = self._local.__dict__.setdefault("buffers", {})
        size = size or _BINARY_CHUNK  # the size read now: keyed by it, never a stale one
        key = (dtype, device, size, count)
        if key not in cache:
            with torch.inference_mode(False):  # usable in and outside inference mode
                buffers = [torch.empty(size, dtype=dtype, device=device)
                           for _ in range(count)]  # fmt: skip
            cache[key] = (buffers, {})
        self._buffers, self._views = cache[key]

    def views(self, shape: torch.Size) -> list[Tensor]:
        views: list[Tensor] | None = self._views.get(shape)
        if views is None:
            if len(self._views) >= self.SHAPES:
                self._views.clear()
            n = math.prod(shape)
            with torch.inference_mode(False):
                views = self._views[shape] = [b[:n].view(shape) for b in self._buffers]
        return views


def _smoothed_into(t: Tensor, dtype: torch.dtype, eps: float, buf: Tensor) -> Tensor:
    """:func:`_smoothed` written into `buf` (`t` itself if nothing changes)."""
    if eps == 0:
        return t if t.dtype is dtype else buf.copy_(t)
    return buf.copy_(t).mul_(1 - eps).add_(eps / 2)


def _factored(pos: Coef, neg: Coef) -> tuple[Coef, Coef, Coef]:
    """(pos, neg, common): a weight alone (``pos is neg``) becomes one common factor."""
    if pos is neg and not _is_one(pos):
        return _UNIT, _UNIT, pos
    return pos, neg, _UNIT


def _derivative_into(
    sig: Tensor, sig_neg: Tensor, t: Tensor, pos: Coef, neg: Coef, common: Coef
) -> Tensor:
    r""":math:`c\operatorname{lerp}(n\,\sigma(x), -p\,\sigma(-x), t) = N\sigma(x) - P\sigma(-x)`
    (`pos`, `neg`, `common`), written into `sig` (`sig_neg` is overwritten too). Each term
    exact: ``lerp`` between values of opposite signs never cancels in :math:`b - a`."""
    if not _is_one(neg):
        sig.mul_(neg)
    sig_neg.neg_()
    if not _is_one(pos):
        sig_neg.mul_(pos)
    d = sig.lerp_(sig_neg, t)
    return d if _is_one(common) else d.mul_(common)


def _binary_chunked(
    x: Tensor,
    t: Tensor,
    pos: Coef,
    neg: Coef,
    eps: float,
    reduction: str,
    *,
    early: bool,
) -> tuple[Tensor, Tensor | None]:
    """:class:`_BinaryCE`'s forward pass, by chunks (:func:`_binary_chunk`): the loss, and with
    `early` the gradient for an upstream gradient of 1."""
    cdt = torch.float32 if x.dtype in _LOW else x.dtype
    pos, neg, common = _factored(pos, neg)
    n = x.numel()
    out = torch.empty_like(x) if reduction == "none" else None
    g = torch.empty_like(x) if early else None
    scale = 1.0 / n if early and reduction == "mean" else None
    work = _Workspace(cdt, x.device)
    if n <= _BINARY_CHUNK:  # one chunk: no split, no stack (a fifth of a 256 x 100 loss)
        total = _binary_chunk(work.views(x.shape), x, t, pos, neg, common, eps, out, g, scale)
    else:
        sums = [
            _binary_chunk(work.views(x_.shape), x_, t_, p_, n_, c_, eps, o_, g_, scale)
            for x_, t_, p_, n_, c_, o_, g_ in _binary_parts(x, t, pos, neg, common, out, g)
        ]
        total = sums[0] if out is not None else torch.stack(sums).sum()
    if out is not None:
        return out, g
    return (total.div_(_constant(float(n), total)) if reduction == "mean" else total), g


def _binary_chunk(
    bufs: list[Tensor],
    x: Tensor,
    t: Tensor,
    pos: Coef,
    neg: Coef,
    common: Coef,
    eps: float,
    out: Tensor | None,
    g: Tensor | None,
    scale: float | None,
) -> Tensor:
    """One chunk of :func:`_binary_chunked` in the chunk-sized buffers `bufs`: the sum of its
    losses, or `out` with the losses written into it; with `g`, the gradient written into it
    (times `scale`)."""
    xb, tb, sb, rb, mb, sigb = bufs[:6]
    cdt = xb.dtype
    xc = x if x.dtype is cdt else xb.copy_(x)
    tc = _smoothed_into(t, cdt, eps, tb)
    if g is not None:  # the gradient first: its buffers are free for the loss's
        sig = torch.sigmoid(xc, out=g if g.dtype is cdt else sigb)
        sig_neg = torch.neg(xc, out=rb).sigmoid_()
        neg_s = torch.minimum(sig, sig_neg, out=sb).neg_().log1p_()
        coef = common  # with the mean's 1/n folded in: one product
        if scale is not None and isinstance(common, float):
            coef = _constant(scale * common, sig)
        elif scale is not None:
            coef = common * _constant(scale, sig)
        d = _derivative_into(sig, sig_neg, tc, pos, neg, coef)
        if d is not g:
            g.copy_(d)
    else:
        neg_s = torch.abs(xc, out=sb).neg_().sigmoid_().neg_().log1p_()
    relu = torch.clamp_min(xc, 0, out=rb)
    unit = _is_one(pos) and _is_one(neg)
    if unit and out is None and _is_one(common):  # the sums of s and of the lerp: one buffer fewer
        total_s = neg_s.sum()
        return relu.lerp_(torch.sub(relu, xc, out=sb), tc).sum().sub_(total_s)
    relu_neg = torch.sub(relu, xc, out=mb)
    if unit:  # s + lerp(relu(x), relu(-x), t)
        loss = relu.lerp_(relu_neg, tc).sub_(neg_s)
    else:  # lerp(neg·sp(x), pos·sp(-x), t), sp(±x) = s + relu(±x): no cancellation
        sp_pos = relu.sub_(neg_s)
        sp_neg = relu_neg.sub_(neg_s)
        loss = (sp_pos if _is_one(neg) else sp_pos.mul_(neg)).lerp_(
            sp_neg if _is_one(pos) else sp_neg.mul_(pos), tc
        )
    if not _is_one(common):
        loss.mul_(common)
    if out is None:
        return loss.sum()
    return out.copy_(loss)


class _BinaryCE(torch.autograd.Function):
    r"""Exact binary cross-entropy with logits by cache-sized chunks, closed-form gradient.

    Forward per chunk (see :func:`binary`): :math:`u = \sigma(-|x|)` (from
    :math:`\sigma(x)` and :math:`\sigma(-x)` when the gradient is wanted),
    :math:`s = -\operatorname{log1p}(-u)` and

    .. math:: \ell = s + \operatorname{lerp}(\operatorname{relu}(x), \operatorname{relu}(-x), t)
              \quad\text{or}\quad
              \operatorname{lerp}(n(s + \operatorname{relu}(x)), p(s + \operatorname{relu}(-x)), t)

    (a weight alone multiplies the first form); gradient
    :math:`\operatorname{lerp}(n\,\sigma(x), -p\,\sigma(-x), t) = N\sigma(x) - P\sigma(-x)`
    (each term exact, rounded once to the input dtype); for a reduced loss it is computed
    during the forward pass from the chunk in cache and kept (the size of the gradient that
    backward returns), otherwise recomputed by chunks. For soft targets
    :math:`\partial\ell/\partial t = (\mathrm{pos}\operatorname{sp}(-x) -
    \mathrm{neg}\operatorname{sp}(x))(1-\varepsilon)` (:math:`-x(1-\varepsilon)` without
    weights). With ``create_graph=True`` the backward is written in differentiable operations
    (double backward). Half precision is computed in float32 chunk by chunk; nothing is saved
    but the inputs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, t: Tensor, options: tuple[Coef, Coef, float, str]) -> Tensor:
        pos, neg, eps, reduction = options
        early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] and reduction != "none"
        out, g = _binary_chunked(x, t, pos, neg, eps, reduction, early=early)
        ctx.save_for_backward(x, t, *(c for c in (pos, neg) if isinstance(c, Tensor)))
        ctx.coef_is_tensor = (isinstance(pos, Tensor), isinstance(neg, Tensor))
        ctx.pos = None if isinstance(pos, Tensor) else pos
        ctx.neg = None if isinstance(neg, Tensor) else neg
        ctx.eps, ctx.reduction, ctx.early = eps, reduction, g
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, t, *coef_tensors = ctx.saved_tensors
        tensors = iter(coef_tensors)
        pos = next(tensors) if ctx.coef_is_tensor[0] else ctx.pos
        neg = next(tensors) if ctx.coef_is_tensor[1] else ctx.neg
        eps, reduction = ctx.eps, ctx.reduction
        nones = (None,)
        early = _early_gradient(ctx, grad, x)
        if early is not None:
            return (early, None, *nones)
        cdt = torch.float32 if x.dtype in _LOW else x.dtype
        scale = grad.to(cdt)
        if reduction == "mean" and x.numel():
            scale = scale / x.numel()
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = (_target_derivative(x.to(cdt), pos, neg) * ((1 - eps) * scale)).to(t.dtype)
        if not ctx.needs_input_grad[0]:
            return (None, grad_t, *nones)
        if torch.is_grad_enabled():  # double backward: differentiable operations
            g = _logit_derivative(x.to(cdt), _smoothed(t, cdt, eps), pos, neg) * scale
            return (g.to(x.dtype), grad_t, *nones)
        out = torch.empty_like(x)
        pos, neg, common = _factored(pos, neg)
        work = _Workspace(cdt, x.device)
        for x_, t_, p_, n_, c_, s_, o_ in _binary_parts(x, t, pos, neg, common, scale, out):
            xb, tb, sigb, negb = work.views(x_.shape)[:4]
            xc = x_ if x_.dtype is cdt else xb.copy_(x_)
            tc = _smoothed_into(t_, cdt, eps, tb)
            sig = torch.sigmoid(xc, out=sigb)
            d = _derivative_into(sig, torch.neg(xc, out=negb).sigmoid_(), tc, p_, n_, c_)
            if o_.dtype is cdt:
                torch.mul(d, s_, out=o_)
            else:
                o_.copy_(d.mul_(s_))
        return (out, grad_t, *nones)


_CHUNKED_APPLY = super(torch.autograd.Function, _BinaryCE).apply
"""``_BinaryCE.apply`` without the Python prologue (see :data:`_SMALL_APPLY`)."""


def _logit_derivative(x: Tensor, t: Tensor, pos: Coef, neg: Coef) -> Tensor:
    r""":math:`\partial_x\ell = N\sigma(x) - P\sigma(-x)` in differentiable operations."""
    if _unweighted(pos, neg):
        return torch.lerp(torch.sigmoid(x), -torch.sigmoid(-x), t)
    big_p, big_n = _masses(t, pos, neg)
    return big_n * torch.sigmoid(x) - big_p * torch.sigmoid(-x)


def _target_derivative(x: Tensor, pos: Coef, neg: Coef) -> Tensor:
    r""":math:`\partial_t\ell = p\,\operatorname{sp}(-x) - n\,\operatorname{sp}(x)` (`pos`, `neg`),
    before smoothing's factor (:math:`-x` without weights), in differentiable operations."""
    if _unweighted(pos, neg):
        return -x
    sp_neg = torch._C._nn.softplus(-x, 1, _SOFTPLUS_EXACT)
    sp_pos = torch._C._nn.softplus(x, 1, _SOFTPLUS_EXACT)
    return pos * sp_neg - neg * sp_pos


# --------------------------------------------------------------------------- half precision

_LOW_SCRATCH = 1 << 18
"""float32 elements of the half-precision path's chunk buffers, all of them together (1 MiB,
kept per thread by :class:`_Workspace`): a chunk of rows is this many logits with one
buffer, a third of it with three. The float32 chunk and the rows it was converted from
(1.5 MiB for bfloat16) stay in a core's L2 cache (2 MiB here) between the conversion and
the kernels that read it. Measured against 4 MiB (bfloat16, one thread, crossent / torch):
sparse forward at 1024 × 1000 1.51 → 1.22, categorical forward 1.44 → 0.93, at 256 × 32000
1.31 → 1.12 and 1.05 → 0.78; no shape slower. Half of it (128 Ki) was no faster."""

_LOW_MIN = 1 << 16
"""Below this many logits the half-precision probability-target path is one float32 copy and
PyTorch's kernel (the chunked path's Python would cost more than the kernels there), for a
call that makes a gradient; :data:`_LOW_MIN_FORWARD` for one that does not. Measured
(bfloat16, one thread, crossent / torch, chunked against copy): forward and backward
1.69 / 1.38 at 128 × 256, 1.74 / 2.22 at 256 × 256; forward only 1.62 / 1.22 at 128 × 256,
1.39 / 1.18 at 256 × 256, 1.29 / 1.35 at 512 × 256, 1.25 / 1.64 at 256 × 1000."""

_LOW_MIN_FORWARD = 3 << 15
""":data:`_LOW_MIN` of a call without a gradient, whose chunks save less (no early gradient)."""


def _low_min(x: Tensor) -> int:
    """:data:`_LOW_MIN`, or :data:`_LOW_MIN_FORWARD` where `x` makes no gradient."""
    return _LOW_MIN if x.requires_grad and torch.is_grad_enabled() else _LOW_MIN_FORWARD


_FLOAT32_CHUNKED = 3 << 18
"""float32 logits that make a gradient take the probability-target chunked path
(:class:`_LowPrecisionSoftCE`, its gradient formed with the forward pass) from this many
elements, instead of autograd through PyTorch's kernels (``log_softmax``, product, sum, and
backward through each). Measured (one thread, forward and backward, crossent / torch,
autograd against chunks): 1.14 / 1.37 at 256 × 1000, 1.13 / 1.23 at 512 × 1000, 1.18 / 1.11
at 1024 × 1000, 1.18 / 1.08 at 2048 × 1000, 1.13 / 0.85 at 1024 × 8000, 1.09 / 0.80 at
64 × 32000, 1.10 / 0.85 at 256 × 32000 (``benchmarks.bench_sweep``: 1.20–1.27 → 1.14 at
1024 × 1000, 1.17 → 0.95 at 2048 × 1000, 1.08–1.16 → 0.76–0.81 at 256 × 32000). Without
a gradient autograd's kernels serve."""


def _soft_chunked_from(x: Tensor) -> int:
    """The size from which the probability-target loss of `x` takes the chunked path
    (:func:`_soft_low`): :func:`_low_min` for half precision, :data:`_FLOAT32_CHUNKED` for
    float32 with a gradient, never otherwise."""
    dtype = x.dtype
    if dtype in _LOW:
        return _low_min(x)
    if dtype is torch.float32 and x.requires_grad and torch.is_grad_enabled():
        return _FLOAT32_CHUNKED
    return sys.maxsize


_LOW_MIN_SPARSE = 1 << 17
""":data:`_LOW_MIN` of the sparse path, whose float32 copy and PyTorch kernel stay faster
longer (forward and backward: 0.78 of the chunked path's time at 64 × 1000, 1.0 at 128 × 1000,
1.1 at 512 × 256, 2.3 at 1024 × 1000)."""

_SPLIT = torch._C.TensorBase.split
"""``Tensor.split`` without its Python wrapper (a third of the call)."""


def _low_chunks(x: Tensor, *others: Tensor, scratch: int = 0) -> Iterator[tuple[Tensor, ...]]:
    """(float32 copy of a chunk of rows, `scratch` float32 buffers of its shape, the same rows
    of `others`); the copy and the buffers are reused from chunk to chunk, and from call to
    call (:data:`_LOW_SCRATCH`; fresh buffers cost page faults once another library's large
    temporaries were freed: a twentieth of a 1024 × 1000 loss).

    A 0-d tensor of `others` is handed to every chunk as it is. One chunk is `x`'s rows and
    `others` themselves; several come from ``split`` (one call, not a slice per chunk per
    tensor).
    """
    n, c = x.shape
    k = scratch + 1
    rows = max(1, _LOW_SCRATCH // (k * max(c, 1)))
    size = torch.Size((k, min(rows, n), c))
    if size.numel() <= _LOW_SCRATCH:
        block = _Workspace(torch.float32, x.device, _LOW_SCRATCH, 1).views(size)[0]
    else:  # a row longer than the buffers
        block = torch.empty(size, dtype=torch.float32, device=x.device)
    bufs = block.unbind(0)
    if n <= rows:
        yield (bufs[0].copy_(x), *bufs[1:], *others)
        return
    parts = [_SPLIT(o, rows) if o.ndim else [o] * -(-n // rows) for o in others]
    for chunk, *rest in zip(_SPLIT(x, rows), *parts, strict=True):
        if chunk.shape[0] != size[1]:
            bufs = tuple(b[: chunk.shape[0]] for b in bufs)
        yield (bufs[0].copy_(chunk), *bufs[1:], *rest)


def _softmax_(z: Tensor) -> Tensor:
    """``softmax`` of float32 `z` along dim 1, in place (PyTorch's fused kernel reads each row
    before it writes it; the tests check the bits against the out-of-place call)."""
    return torch._softmax(z, 1, False, out=z)


def _log_softmax_(z: Tensor) -> Tensor:
    """``log_softmax`` of float32 `z` along dim 1, in place (as :func:`_softmax_`)."""
    return torch._log_softmax(z, 1, False, out=z)


def _row_scale(
    valid: Tensor | None,
    den: Tensor | float,
    grad: Tensor | float,
    reduction: str,
    dtype: torch.dtype,
) -> Tensor:
    """d(output)/d(row loss) times the upstream gradient `grad` (a number or 0-d for a reduced
    loss, one per row for ``"none"``), 0 at the rows `valid` leaves out: a 0-d tensor or an
    ``(n, 1)`` column of `dtype` (CPU). The forward's early gradient (`grad` = 1) and the
    backward call it alike, so that both give the same bits."""
    if reduction == "none":
        scale: Tensor | float = grad.to(dtype).unsqueeze(1) if isinstance(grad, Tensor) else grad
    elif isinstance(grad, Tensor):
        scale = grad.to(dtype) / den
    else:
        scale = grad / den
    if valid is None:  # a number as a cached 0-d tensor: one small operation less per use
        return _scalar(scale, dtype) if isinstance(scale, float) else scale
    col = valid.unsqueeze(1)
    if isinstance(scale, Tensor):
        return torch.where(col, scale, 0.0)
    return torch.where(col, scale, 0.0).to(dtype)


class _LowPrecisionCE(torch.autograd.Function):
    r"""Sparse cross-entropy of float16/bfloat16 logits computed in float32, lean in memory.

    Forward: :math:`\ell_i = -\log p_{i y_i}` from PyTorch's float32 ``log_softmax`` of
    row chunks converted into one reused float32 buffer, in place (no float32 copy of the
    logits, no log-probabilities kept). A reduced loss that needs a gradient makes it now
    (see below) from the chunk's ``softmax`` and takes the log of its :math:`p_{iy_i}` instead
    (:func:`_log_of_softmax`: as accurate): one fused pass per chunk instead of two. Saved
    for backward: the
    half-precision input (the caller's) and the labels. Backward recomputes
    :math:`g = \sigma_i(p - [k = y])` chunk by
    chunk with float32 ``softmax`` and rounds it once to the input dtype (PyTorch's
    half-precision ``cross_entropy`` rounds the log-probabilities first, so its gradient is
    off by :math:`|\log p|` units of rounding). With ``create_graph=True`` the backward is
    written in differentiable operations instead (double backward). The loss is returned
    in the input dtype, rounded once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, label: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
        # reduced losses: the gradient for an upstream gradient of 1 is computed now, from the
        # float32 chunk already in cache, and kept in the input dtype (the size of PyTorch's
        # saved log-probabilities)
        early = ctx.needs_input_grad[0] and reduction != "none"
        out, g, den = _sparse_low_forward(x, label, valid, reduction, early=early)
        ctx.save_for_backward(x, label, valid)
        # held outside the saved tensors and dropped once returned: autograd may make it the
        # leaf's .grad, which the caller may change in place before a second backward
        ctx.early = g
        ctx.reduction, ctx.den = reduction, den
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, label, valid = ctx.saved_tensors
        early = _early_gradient(ctx, grad, x)
        if early is not None:
            return early, None, None, None
        scale = _row_scale(valid, ctx.den, grad, ctx.reduction, torch.float32)
        if torch.is_grad_enabled():  # double backward: differentiable operations
            p = torch.softmax(x.float(), 1)
            one_hot = torch.zeros_like(p).scatter_(1, label[:, None], 1.0)
            return ((p - one_hot) * scale).to(x.dtype), None, None, None
        out = torch.empty_like(x)
        minus_one = torch.full((x.shape[0], 1), -1.0, device=x.device)
        for z, y, m_, s_, o_ in _low_chunks(x, label[:, None], minus_one, scale, out):
            _grad_from_softmax(_softmax_(z), y, m_, s_, o_)
        return out, None, None, None


def _sparse_low_forward(
    x: Tensor, label: Tensor, valid: Tensor | None, reduction: str, *, early: bool
) -> tuple[Tensor, Tensor | None, Tensor | float]:
    """(loss of :class:`_LowPrecisionCE` in `x`'s dtype, the early gradient or None, the mean's
    denominator); the whole computation without a gradient (no autograd node)."""
    n = x.shape[0]
    den = _mean_denominator(None, valid, n, torch.float32) if reduction == "mean" else 1.0
    row = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    col = label[:, None]
    g = None
    if early:
        g = torch.empty_like(x)
        scale = _row_scale(valid, den, 1.0, reduction, torch.float32)
        minus_one = torch.full((n, 1), -1.0, device=x.device)
        for z, y, row_, g_, m_, s_ in _low_chunks(x, col, row, g, minus_one, scale):
            # p_y from the softmax the gradient needs (no log_softmax pass), its log below
            p = _softmax_(z)
            torch.gather(p, 1, y, out=row_)
            _grad_from_softmax(p, y, m_, s_, g_)
        _log_of_softmax(row, x, col)
    else:
        for z, y, row_ in _low_chunks(x, col, row):
            torch.gather(_log_softmax_(z), 1, y, out=row_)
    row = row[:, 0]
    if valid is not None:
        row = torch.where(valid, row, 0.0)
    if reduction == "none":
        out = row.neg_()
    else:
        out = row.sum().neg_()
        out = out / den if reduction == "mean" else out
    return _to_low(out, x), g, den


def _log_of_softmax(row: Tensor, x: Tensor, col: Tensor) -> None:
    r"""`row`, a column of float32 ``softmax`` values :math:`p_{iy_i}` of `x` at the labels
    `col`, replaced by its log in place.

    The log of ``softmax`` is as accurate as ``log_softmax`` where :math:`p` is a normal
    float32 number: both are off by the float32 error of :math:`\sum_k e^{z_k - \max z}`
    (2e-6 at 1000 classes, against 2e-6 for ``log_softmax`` and for :math:`(z_y - \max z) +
    \log\max_k p_k`; the exponential's own error is smaller). Below the smallest normal
    number (:math:`z_y` about 87 below the row's maximum; a masked label gives 0), those rows
    are recomputed by ``log_softmax``: one test of the smallest value when none is. The test
    counts those rows, not the minimum: a NaN row (ignored, or propagating) must not hide them.
    """
    small = row[:, 0] < torch.finfo(torch.float32).smallest_normal  # NaN: False, it propagates
    if not small.any().item():
        row.log_()
        return
    tiny = small.nonzero()[:, 0]
    row.log_()
    exact = torch.log_softmax(x[tiny].float(), 1).gather(1, col[tiny])
    row.index_copy_(0, tiny, exact)


_LOW_CE_APPLY = super(torch.autograd.Function, _LowPrecisionCE).apply
"""``_LowPrecisionCE.apply`` without the Python prologue (see :data:`_SMALL_APPLY`)."""


def _grad_from_softmax(
    p: Tensor, label: Tensor, minus_one: Tensor, scale: Tensor, out: Tensor
) -> None:
    """``out = scale * (p - one_hot(label))``, rounded once to `out`'s dtype; `p` (float32
    ``softmax``) is overwritten.

    `label` and `minus_one` are columns (rows, 1); `scale` a column of row scales or 0-d.
    PyTorch's fused ``softmax`` of the float32 logits (a third faster than ``exp`` of the
    log-probabilities on this CPU: 106 against 152 µs per 256 × 1000 chunk, its ``exp`` is
    the faster vectorized one), the same in forward and backward, so that both give the same
    bits; the backward needs no ``log_softmax``. The scale is applied in float32, then one
    conversion (a float32 × float32 → half ``mul`` is slower than both).
    """
    out.copy_(p.scatter_add_(1, label, minus_one).mul_(scale))


def _sparse_low(x: Tensor, target: Tensor, axis: int, opts: CEOptions) -> Tensor | None:
    """Eager half-precision logits (N, C) with PyTorch's options and no weight or smoothing;
    a bad label raises crossent's message from ``gather``'s own bound check."""
    if x.ndim != 2 or axis != 1 or x.numel() < _LOW_MIN_SPARSE or not _own_eager(x):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    t = index_target(target)
    valid, label = _valid_label(t, opts.ignore_index)
    try:
        if x.requires_grad and torch.is_grad_enabled():
            out: Tensor = _LOW_CE_APPLY(x, label, valid, opts.reduction)
        else:  # no autograd node
            out = _sparse_low_forward(x, label, valid, opts.reduction, early=False)[0]
    except (IndexError, RuntimeError) as exc:
        _label_error(exc, target, x.shape[1], opts.ignore_index)  # uint64: its values
        raise  # pragma: no cover - _label_error always raises
    return out


def _soft_low(
    x: Tensor, target: Tensor, weight: Tensor | None, axis: int, opts: CEOptions
) -> Tensor | None:
    """Eager half-precision logits (N, C) of at least :data:`_LOW_MIN` elements on CPU (float32
    ones with a gradient from :data:`_FLOAT32_CHUNKED`: :func:`_soft_chunked_from`), targets
    and weight without gradients: :class:`_LowPrecisionSoftCE`; None for the float32 copy
    (float32: PyTorch's kernels and autograd).

    A NaN result (a masked class, 0 · -inf, or a NaN input) is None too: the caller's
    guarded form decides.
    """
    if x.ndim != 2 or axis != 1 or x.numel() < _soft_chunked_from(x) or not _own_eager(x):
        return None
    if target.requires_grad or (weight is not None and weight.requires_grad):
        return None
    w = None if weight is None else weight.detach().float()
    eps, reduction = opts.label_smoothing, opts.reduction
    if x.requires_grad and torch.is_grad_enabled():
        out: Tensor = _SOFT_CE_APPLY(x, target.detach(), w, eps, reduction)
    else:  # no autograd node
        out = _soft_low_forward(x, target, w, eps, reduction, early=False)[0]
    return None if _holds_nan(out, reduction) else out


def _soft_coefficients(
    t: Tensor, w: Tensor | None, eps: float, axis: int, out: Tensor | None = None
) -> Tensor:
    r""":math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`, classes on `axis`: in `out`
    (a buffer of `t`'s shape, in place) when given, else by differentiable operations (`t`
    itself is never written)."""
    shape = [1] * t.ndim
    shape[axis] = -1
    if out is not None:
        c = out.copy_(t)
        if eps:
            c.mul_(1 - eps).add_(eps / c.shape[axis])
        return c if w is None else c.mul_(w.reshape(shape))
    t = smoothed_target(t, eps, t.shape[axis])
    return t if w is None else t * w.reshape(shape)


class _LowPrecisionSoftCE(torch.autograd.Function):
    r"""Probability-target cross-entropy of float16/bfloat16 logits in float32, lean in memory
    (and of large float32 logits with a gradient, :data:`_FLOAT32_CHUNKED`: its gradient
    formed with the forward pass takes fewer passes than autograd's).

    :math:`\ell_i = -\sum_k c_{ik} \log p_{ik}`, :math:`c = w \odot ((1-\varepsilon)t +
    \varepsilon/C)`, by row chunks through reused float32 buffers as
    :class:`_LowPrecisionCE`: nothing larger than the input is kept (PyTorch's
    half-precision kernel keeps its rounded log-probabilities and, computed in float32
    by a copy, three float32 arrays would be). The gradient
    :math:`g_{ik} = s_i (S_i p_{ik} - c_{ik})`, :math:`S_i = \sum_k c_{ik}`, is computed with
    the forward for reduced losses (in the input dtype, rounded once), the loss then read off
    its softmax, :math:`\sum_k c_k \log p_k = \sum_k c_k (z_k - \max z) + S \log\max_k p_k`
    (terms of one sign: no ``log_softmax`` pass), and recomputed by
    chunks otherwise; with ``create_graph=True`` the backward is written in differentiable
    operations (double backward). Targets and weight carry no gradient here (the caller
    routes those to autograd). The loss is returned in the input dtype, rounded once.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, t: Tensor, w: Tensor | None, eps: float, reduction: str
    ) -> Tensor:
        early = ctx.needs_input_grad[0] and reduction != "none"
        out, g, den = _soft_low_forward(x, t, w, eps, reduction, early=early)
        ctx.save_for_backward(x, t, w)
        ctx.early = g  # dropped once returned (see _LowPrecisionCE)
        ctx.eps, ctx.reduction, ctx.den = eps, reduction, den
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        x, t, w = ctx.saved_tensors
        early = _early_gradient(ctx, grad, x)
        if early is not None:
            return early, None, None, None, None
        scale = _row_scale(None, ctx.den, grad, ctx.reduction, torch.float32)
        if torch.is_grad_enabled():  # double backward: differentiable operations
            c = _soft_coefficients(t.float(), w, ctx.eps, 1)
            p = torch.softmax(x.float(), 1)
            g = (c.sum(1, keepdim=True) * p - c) * scale
            return g.to(x.dtype), None, None, None, None
        out = torch.empty_like(x)
        for z, c, t_, s_, o_ in _low_chunks(x, t, scale, out, scratch=1):
            c = _soft_coefficients(t_, w, ctx.eps, 1, out=c)
            _soft_grad_chunk(_softmax_(z), c, c.sum(1, keepdim=True), s_, o_)  # forward's bits
        return out, None, None, None, None


def _soft_low_forward(
    x: Tensor, t: Tensor, w: Tensor | None, eps: float, reduction: str, *, early: bool
) -> tuple[Tensor, Tensor | None, float]:
    """(loss of :class:`_LowPrecisionSoftCE` in `x`'s dtype, the early gradient or None, the
    mean's denominator); the whole computation without a gradient (no autograd node)."""
    n = x.shape[0]
    den = float(max(n, 1)) if reduction == "mean" else 1.0
    row = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    g = None
    if early:
        g = torch.empty_like(x)
        scale = _row_scale(None, den, 1.0, reduction, torch.float32)
        for z, c, d, t_, row_, g_ in _low_chunks(x, t, row, g, scratch=2):
            # from the gradient's softmax (see _LowPrecisionCE), no log_softmax pass:
            # sum_k c_k log p_k = sum_k c_k (z_k - max z) + S log max p, terms of one sign
            c = _soft_coefficients(t_, w, eps, 1, out=c)
            total = c.sum(1, keepdim=True)
            shifted = torch.sub(z, torch.amax(z, 1, keepdim=True), out=d)
            torch.sum(shifted.mul_(c), 1, keepdim=True, out=row_)
            p = _softmax_(z)
            row_.addcmul_(total, torch.amax(p, 1, keepdim=True).log_())
            _soft_grad_chunk(p, c, total, scale, g_)
    else:
        for z, c, t_, row_ in _low_chunks(x, t, row, scratch=1):
            lp = _log_softmax_(z)
            torch.sum(lp.mul_(_soft_coefficients(t_, w, eps, 1, out=c)), 1, keepdim=True,
                      out=row_)  # fmt: skip
    row = row[:, 0]
    out = row.neg_() if reduction == "none" else row.sum().neg_() / den
    return (out if out.dtype is x.dtype else _to_low(out, x)), g, den


_SOFT_CE_APPLY = super(torch.autograd.Function, _LowPrecisionSoftCE).apply
"""``_LowPrecisionSoftCE.apply`` without the Python prologue (see :data:`_SMALL_APPLY`)."""


def _soft_grad_chunk(p: Tensor, c: Tensor, total: Tensor, scale: Tensor, out: Tensor) -> None:
    """``out = scale * (total * p - c)`` (`total` is ``c.sum(1)``), rounded once to `out`'s
    dtype; `p` is overwritten. A 0-d `scale` (a reduced loss) is folded into the two terms
    (two float32 passes instead of three), a column applied after the difference."""
    if scale.ndim:
        p.mul_(total).sub_(c).mul_(scale)
    else:
        p.mul_(total * scale).sub_(c, alpha=scale.item())
    out.copy_(p)
