r"""Pure update / compute / merge functions behind :mod:`crossent.metrics`.

A metric state is a ``dict`` of int64 count arrays and exact sums
(:class:`~crossent.metrics._exact.ExactSum`: the exact value of a sum of
float64 per-row terms, kept as integer digits), nothing else. Every
statistic is a sum over rows, so two states merge by adding them element by
element, exactly, and the merged state is the single-pass state bit for bit,
whatever the sharding and the merge order; each sum is rounded to float64
once, when a figure is computed. ``torch.distributed.all_reduce(SUM)`` of
the integer arrays gives the state of the whole data set, exactly too.

The work is split in two:

* :func:`_row_stats` computes the per-row quantities (−log p of the label,
  the top-label confidence and prediction, the Brier term, and, when a
  calibration state needs them, the full probability matrix) on the caller's
  backend, in its compute dtype (float16/bfloat16 in float32), then copies
  them to the host as float64 through :func:`crossent._lib._xp.to_numpy`;
* the ``_*_update`` functions add one batch of row statistics to a state
  (exact sums, ``np.bincount`` counts), and the ``_*_compute`` functions turn
  a state into numbers.

The per-row terms are computed row by row, so with NumPy and PyTorch on the
CPU they do not depend on the batching either (for a given dtype), nor on the
memory layout of a batch: NumPy sums over the classes in one order whatever
the layout (:func:`_numpy_row_sum`), and torch gets contiguous rows. JAX
(XLA) and GPU kernels may pick a reduction order by the batch's shape: their
per-row terms can be an ulp apart between batchings.

Calibration states keep two histograms of the confidences: ``B`` equal-width
bins (``bin = min(floor(conf·B), B−1)``, so a confidence of exactly 1.0 lands
in the last bin), and a fine histogram of ``FINE_BINS`` bins that are equal
in width on the log-odds scale, which :func:`_calibration_compute` groups into
``B`` bins of (nearly) equal mass. Equal-mass (quantile) bins need the
distribution of all confidences, which a streaming, mergeable state cannot
store exactly; the fine histogram resolves confidences to 1 part in
``FINE_BINS / (2 · FINE_LOGIT_RANGE)`` of a log-odds unit (about 0.2 % of the
odds) from 1e-8 to 1 − 1e-8, so the equal-mass bins are the exact quantile
bins up to that resolution, and the per-bin sums stay exact.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, cast

import numpy as np

from crossent._lib import _checks
from crossent._lib._xp import (
    Array,
    compute_dtype,
    device,
    is_numpy_namespace,
    is_torch_namespace,
    logsumexp,
    moveaxis,
    one_hot,
    shift_by_max,
    size,
    take_along_axis,
    to_numpy,
)
from crossent.metrics._exact import (
    Counted,
    ExactSum,
    Runs,
    add_counted,
    counted_lanes,
    work_array,
)

__all__ = [
    "FINE_BINS",
    "FINE_LOGIT_RANGE",
    "INPUT_KINDS",
    "LOG_P_FLOOR",
    "BadRowError",
    "State",
]

State = dict[str, Any]  # name -> int64 np.ndarray or ExactSum
InputKind = Literal["probs", "logits", "log_probs"]

INPUT_KINDS = ("probs", "logits", "log_probs")
CALIBRATION_KINDS = ("top_label", "classwise", "positive")
BINNINGS = ("width", "mass")
#: log p of a probability input is clamped here (PyTorch's rule, as in the losses).
LOG_P_FLOOR = -100.0
#: rows whose probabilities sum this far from 1 are not distributions.
SUM_TOLERANCE = 1e-3
#: roundings to its dtype a log-softmax computed in that dtype puts on each log-probability
#: (see :func:`_log_prob_slack`).
LOG_P_ROUNDINGS = 3
#: fine bins of the equal-mass calibration histogram, and their log-odds range.
FINE_BINS = 4096
FINE_LOGIT_RANGE = 18.420680743952367  # log((1 - 1e-8) / 1e-8)


class BadRowError(ValueError):
    """A row of the input that is not a valid prediction (`row` counts from 0 in the batch)."""

    def __init__(self, message: str, *, row: int, reason: str) -> None:
        super().__init__(message)
        self.row = row
        self.reason = reason


# ---------------------------------------------------------------- arguments


def _check_input_kind(input_kind: object) -> str:
    if input_kind not in INPUT_KINDS:
        msg = (
            f'`input_kind` must be "probs", "logits" or "log_probs" (say what the input holds; '
            f"it is never guessed from the values); got {input_kind!r}."
        )
        raise ValueError(msg)
    return str(input_kind)


def _check_positive_int(value: object, *, name: str) -> int:
    if not _checks.is_integer_scalar(value):
        msg = f"`{name}` must be a positive int; got {type(value).__name__}."
        raise TypeError(msg)
    number = int(value)
    if number < 1:
        msg = f"`{name}` must be at least 1; got {number}."
        raise ValueError(msg)
    return number


def _check_choice(value: object, choices: tuple[str, ...], *, name: str) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        msg = f"`{name}` must be one of {options}; got {value!r}."
        raise ValueError(msg)
    return str(value)


def _log_base(base: float | None) -> float:
    """The divisor that turns nats into units of `base` (1 for nats)."""
    base = _checks.check_base(base)
    return 1.0 if base is None else math.log(base)


# ---------------------------------------------------------------- per-row statistics


def _flatten(input: Array, target: Array, *, axis: int, xp: Any) -> tuple[Array, Array]:
    """`input` as (rows, classes) and `target` as (rows,)."""
    axis = _checks.check_axis(axis, input.ndim)
    _checks.check_floating(input, name="input", xp=xp)
    _checks.check_integer_labels(target, xp=xp)
    expected = tuple(s for i, s in enumerate(input.shape) if i != axis)
    if tuple(target.shape) != expected:
        msg = (
            f"`target` must have the shape of `input` without the class axis, {expected}; "
            f"got {tuple(target.shape)}."
        )
        raise ValueError(msg)
    if axis != input.ndim - 1:
        input = moveaxis(input, axis, -1, xp=xp)
    num_classes = input.shape[-1]
    if num_classes == 0:
        msg = (
            f"`input` has no classes along axis {axis} (shape {tuple(input.shape)}); "
            "give one prediction per class, or pass the class axis as `axis`."
        )
        raise ValueError(msg)
    rows = size(target)
    return xp.reshape(input, (rows, num_classes)), xp.reshape(target, (rows,))


def _first_bad_row(bad: Array) -> int | None:
    flags = to_numpy(bad, dtype=np.bool_)
    hits = np.flatnonzero(flags)
    return int(hits[0]) if hits.size else None


def _sum_tolerance(dtype: Any, num_classes: int, *, xp: Any) -> float:
    """How far from 1 a row may sum: ``SUM_TOLERANCE`` or the losses' dtype rule if larger.

    The floor admits probabilities written to a file with a few digits; the
    losses' ``row_sum_tolerance`` (``_lib._checks``) admits a softmax
    of many classes in a low precision (bfloat16, 32768 classes: 0.0117).
    """
    return max(SUM_TOLERANCE, _checks.row_sum_tolerance(dtype, num_classes, xp=xp))


def _log_prob_slack(wide: Array, dtype: Any, *, xp: Any) -> Array | float:
    r"""Per row, how much further from 1 the exponentials of log-probabilities of `dtype`
    (`wide`: widened to the compute dtype) may sum than probabilities of `dtype` would.

    A probability rounded to `dtype` is off by at most its unit roundoff u,
    relatively; a log-probability :math:`l_k` is off by up to :math:`u\,|l_k|`,
    absolutely, so its exponential by a factor up to :math:`e^{u|l_k|}`, in the
    same direction for every class when the classes share a value (the uniform
    distribution over 700 classes: :math:`-\log 700 = -6.551` is :math:`-6.5625`
    in bfloat16, every probability 1.2 % too small; tolerance 0.0078). A
    log-softmax computed in `dtype` (``torch.log_softmax`` of bfloat16 logits)
    rounds three times, ``LOG_P_ROUNDINGS``: the shifted logit
    :math:`z_k - m`, the log-sum and the result, each by at most
    :math:`u\,|l_k|` (:math:`|z_k - m|` and the log-sum are at most
    :math:`|l_k|`). With :math:`\hat p_k = e^{\hat l_k} = p_k e^{\delta_k}`,
    :math:`|\delta_k| \le 3u|\hat l_k|` to first order,

    .. math:: \Bigl|\sum_k \hat p_k - 1\Bigr|
              = \Bigl|\sum_k \hat p_k (1 - e^{-\delta_k})\Bigr|
              \le \sum_k \hat p_k \bigl(e^{3u|\hat l_k|} - 1\bigr)

    (about 3u times the row's entropy). 0 for float32 and wider, where it is at
    most about 3 · 2⁻²⁴ · log C (2.5e-6 for a million classes), 0.25 % of
    ``SUM_TOLERANCE``, for any row that is a distribution.
    """
    u = float(xp.finfo(dtype).eps) / 2
    if u < 2.0**-20:
        return 0.0
    p = xp.exp(wide)
    # a class of log-probability -inf (p = 0) adds nothing: its |l| is read as 0, not inf
    # (0 · inf was NaN, dropped afterwards, but NumPy warned of it: an error where warnings are)
    l_abs = xp.abs(xp.where(p > 0, wide, xp.zeros_like(wide)))
    return xp.sum(p * xp.expm1((LOG_P_ROUNDINGS * u) * l_abs), axis=-1)


def _check_distributions(x: Array, *, input_kind: str, xp: Any) -> None:
    """Rows of probabilities (or log-probabilities) must be distributions.

    Values must lie in [0, 1] (log-probabilities in [-inf, 0]) and each row
    must sum to 1 within :func:`_sum_tolerance` (summed in float32 or wider),
    log-probabilities within that plus their rounding, :func:`_log_prob_slack`;
    NaN passes (it propagates). Raises :class:`BadRowError` naming the first bad row.
    """
    if input_kind == "logits" or size(x) == 0 or not _checks.values_checked(x):
        return
    tol: Any = _sum_tolerance(x.dtype, x.shape[-1], xp=xp)
    wide = xp.astype(x, compute_dtype(x.dtype, xp=xp))
    if input_kind == "probs":
        outside = xp.any((wide < 0) | (wide > 1), axis=-1)
        total = xp.sum(wide, axis=-1)
    else:
        outside = xp.any(wide > tol, axis=-1)
        total = xp.exp(logsumexp(wide, axis=-1, xp=xp))
        tol = tol + _log_prob_slack(wide, x.dtype, xp=xp)  # per row
    off = xp.abs(total - 1) > tol
    row = _first_bad_row(outside | off)
    if row is None:
        return
    if not isinstance(tol, float):
        tol = float(to_numpy(tol[row], dtype=np.float64))
    _raise_bad_distribution(x, total, outside, row, input_kind=input_kind, tol=tol)


def _raise_bad_distribution(
    x: Array, total: Array, outside: Array, row: int, *, input_kind: str, tol: float
) -> None:
    """Raise the BadRowError of row `row`: a value out of range (`outside`) or a bad sum."""
    values = to_numpy(x[row, ...], dtype=np.float64)
    row_sum = float(to_numpy(total[row], dtype=np.float64))
    hint = "logits" if input_kind == "probs" else "logits (or probabilities)"
    kind = "probabilities" if input_kind == "probs" else "log-probabilities"
    if bool(to_numpy(outside[row], dtype=np.bool_)):
        bound = "[0, 1]" if input_kind == "probs" else "[-inf, 0]"
        bad = values[(values < 0) | (values > 1)] if input_kind == "probs" else values[values > 0]
        reason = f"has a value {_checks.shown_value(float(bad[0]))} outside {bound}"
    else:
        shown = _checks.shown_value(row_sum)
        reason = f"sums to {shown}, not 1 (tolerance {tol:.3g})"
        if input_kind == "log_probs":
            reason = f"has exp(values) summing to {shown}, not 1 (tolerance {tol:.3g})"
    msg = (
        f"`input` row {row} is not a distribution of {kind}: it {reason}. "
        f"Pass input_kind={'logits'!r} if these are {hint}, or normalise the rows."
    )
    raise BadRowError(msg, row=row, reason=reason)


def _check_labels(labels: np.ndarray, num_classes: int, *, ignore_index: int | None) -> None:
    """Labels (on the host) must lie in [0, C) unless they equal `ignore_index`."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    hits = np.flatnonzero(bad)
    if hits.size:
        row = int(hits[0])
        reason = f"has label {int(labels[row])}, outside [0, {num_classes})"
        hint = "" if ignore_index is None else f" and not ignore_index={ignore_index}"
        msg = (
            f"`target` row {row} {reason}{hint}. Check the number of classes, "
            "or set `ignore_index` for padding labels."
        )
        raise BadRowError(msg, row=row, reason=reason)


def _row_stats(
    input: Array,
    target: Array,
    *,
    input_kind: str,
    axis: int,
    ignore_index: int | None,
    need_probs: bool,
    xp: Any,
) -> dict[str, np.ndarray]:
    """Per-row statistics of one batch, as float64 / int64 / bool NumPy arrays.

    Keys: ``label``, ``nll`` (−log p of the label in nats), ``clamped`` (the
    label's probability was below e^−100 and its log was clamped), ``pred``
    (argmax), ``conf`` (top-label probability), ``brier`` (Σ_k (p_k − 1[k=y])²),
    ``nan`` (the row holds NaN), and ``probs`` (rows × classes) when
    `need_probs`. Rows whose label equals `ignore_index` are dropped.
    """
    x, y = _flatten(input, target, axis=axis, xp=xp)
    num_classes = x.shape[-1]
    labels = to_numpy(y, dtype=np.int64)
    if str(y.dtype).endswith("uint64"):
        # labels of 2**63 and more wrapped to negative int64 values (2**64 - 100 to an
        # ignore_index of -100: the row was dropped silently): checked as uint64 (named by
        # their value), then int64's largest value, outside every class range
        _check_labels(labels.view(np.uint64), num_classes, ignore_index=ignore_index)
        labels[labels < 0] = np.iinfo(np.int64).max
        y = xp.astype(y, xp.int64)  # (PyTorch cannot index with, or take rows of, uint64)
    _check_labels(labels, num_classes, ignore_index=ignore_index)
    kept = None
    if ignore_index is not None and np.any(labels == ignore_index):
        # drop ignored rows first: padding rows may hold anything, they are never checked
        kept = np.flatnonzero(labels != ignore_index)
        rows = xp.asarray(kept, device=device(x))
        x, y, labels = xp.take(x, rows, axis=0), xp.take(y, rows, axis=0), labels[kept]
    dtype = compute_dtype(x.dtype, xp=xp)
    fast = input_kind == "probs" and is_numpy_namespace(xp)
    try:
        if fast:  # NumPy probabilities: checked inside, in the same passes
            tol = _sum_tolerance(x.dtype, num_classes, xp=xp)
            wide = x if x.dtype == dtype else xp.astype(x, dtype)
            out = _numpy_prob_rows(wide, labels, tol=tol, need_probs=need_probs)
            out["num_classes"] = np.asarray(num_classes)
            return out
        _check_distributions(x, input_kind=input_kind, xp=xp)
    except BadRowError as exc:
        if kept is None:
            raise
        row = int(kept[exc.row])  # the row's index in the caller's batch
        msg = str(exc).replace(f"row {exc.row} ", f"row {row} ", 1)
        raise BadRowError(msg, row=row, reason=exc.reason) from None
    x = xp.astype(x, dtype) if x.dtype != dtype else x
    y_safe = xp.astype(y, xp.int64) if y.dtype != xp.int64 else y
    index = xp.expand_dims(y_safe, axis=-1)
    row_sum = None
    if is_numpy_namespace(xp):  # in the layout that _numpy_row_sum sums without a copy
        x = np.asarray(x, order="F" if num_classes <= COLUMN_CLASSES else "C")
        row_sum = _numpy_row_sum
    elif is_torch_namespace(xp) and not x.is_contiguous():
        x = x.contiguous()  # torch reduces contiguous rows one by one, other layouts not

    if input_kind == "logits" and row_sum is not None:
        fast_rows = _numpy_logit_rows(x, labels, need_probs=need_probs)
        if fast_rows is not None:
            fast_rows["num_classes"] = np.asarray(num_classes)
            return fast_rows
    if input_kind == "logits":
        with np.errstate(invalid="ignore"):  # a logit of +inf: inf - inf, a NaN row (below)
            shifted, _ = shift_by_max(x, xp=xp)  # log p accurate for large logits
            lse = logsumexp(shifted, axis=-1, keepdims=True, xp=xp, row_sum=row_sum)
            log_p = shifted - lse
        log_p_y = xp.squeeze(take_along_axis(log_p, index, axis=-1, xp=xp), axis=-1)
        probs = xp.exp(log_p)
        clamped = xp.zeros_like(log_p_y, dtype=xp.bool)
    elif input_kind == "log_probs":
        log_p_y = xp.squeeze(take_along_axis(x, index, axis=-1, xp=xp), axis=-1)
        probs = xp.exp(x)
        clamped = xp.zeros_like(log_p_y, dtype=xp.bool)
    else:
        probs = x
        p_y = xp.squeeze(take_along_axis(x, index, axis=-1, xp=xp), axis=-1)
        positive = p_y > 0
        log_safe = xp.log(xp.where(positive, p_y, xp.ones_like(p_y)))
        log_raw = xp.where(positive, log_safe, xp.full_like(p_y, -math.inf))
        clamped = log_raw < LOG_P_FLOOR
        log_p_y = xp.where(clamped, xp.full_like(log_raw, LOG_P_FLOOR), log_raw)

    conf = xp.max(probs, axis=-1)
    pred = xp.argmax(x, axis=-1)
    if row_sum is None:
        hot = one_hot(y_safe, num_classes, dtype=probs.dtype, xp=xp)
        brier = xp.sum((probs - hot) ** 2, axis=-1)
    else:
        brier = _numpy_brier(probs, labels)
    # NaN in the row, or made from it (a logit of +inf: inf - inf); max propagates NaN
    nan = xp.any(xp.isnan(x), axis=-1) | xp.isnan(conf)
    # its -log p is NaN too (logits get that from the lse; probabilities and
    # log-probabilities read the label's column only)
    nan_host = to_numpy(nan, dtype=np.bool_)
    nll = to_numpy(-log_p_y, dtype=np.float64)
    clamped_host = to_numpy(clamped, dtype=np.bool_)
    if nan_host.any():  # (new arrays: the host copies of JAX arrays are read-only)
        nll = np.where(nan_host, np.nan, nll)
        clamped_host = clamped_host & ~nan_host

    out = {
        "label": labels,
        "nll": nll,
        "clamped": clamped_host,
        "pred": to_numpy(pred, dtype=np.int64),
        "conf": to_numpy(conf, dtype=np.float64),
        "brier": to_numpy(brier, dtype=np.float64),
        "nan": nan_host,
    }
    if need_probs:
        out["probs"] = to_numpy(probs, dtype=np.float64)
        # exp of anything, or checked probabilities: none below 0 nor above its row's `conf`
        bounded = input_kind != "probs" or _checks.values_checked(x)
        out["probs_bounded"] = np.asarray(bounded)
    out["num_classes"] = np.asarray(num_classes)
    return out


#: up to this many classes, NumPy probabilities are reduced column by column (see below)
COLUMN_CLASSES = 64


def _numpy_prob_rows(
    x: np.ndarray, labels: np.ndarray, *, tol: float, need_probs: bool
) -> dict[str, np.ndarray]:
    """:func:`_row_stats` of NumPy probabilities: the same statistics, fewer passes over x.

    The distribution check (row min, max and sum) is done here instead of in
    :func:`_check_distributions`. Up to ``COLUMN_CLASSES`` classes the matrix
    is held in column-major order (a copy unless it already is, as
    ``crossent eval`` builds it) and the row sums and the argmax are loops
    over the columns, each step a vectorised operation on one contiguous
    column (NumPy reduces a short row axis element by element, 10-20x
    slower); the row sums (of p, and of (p − 1[k = y])² for Brier) add the
    columns in class order, so a row's value depends neither on the layout of
    the input nor on the other rows of the batch. More classes are reduced
    along the rows of a row-major copy.
    """
    n, c = x.shape
    columns = c <= COLUMN_CLASSES
    order: Literal["F", "C"] = "F" if columns else "C"
    x = np.asarray(x, order=order)
    checked = _checks.values_checked(x)
    conf = x.max(axis=1)
    total = _column_sum(x) if columns else x.sum(axis=1)
    if checked and n:
        outside = conf > 1
        if np.fmin.reduce(x.ravel(order=order)) < 0:  # (NaN ignored) then find the rows
            outside |= x.min(axis=1) < 0
        holes = np.flatnonzero(np.isnan(total))
        if holes.size:  # a NaN made their max and min NaN: read them without it
            rows = x[holes]
            outside[holes] = (np.fmax.reduce(rows, axis=1) > 1) | (np.fmin.reduce(rows, axis=1) < 0)
        hits = np.flatnonzero(outside | (np.abs(total - 1) > tol))
        if hits.size:
            _raise_bad_distribution(x, total, outside, int(hits[0]), input_kind="probs", tol=tol)
    # a row sum of values in [0, 1] is NaN exactly when the row holds NaN (+inf is > 1)
    nan = np.isnan(total) if checked else np.isnan(x).any(axis=1)
    rows = np.arange(n)
    at = labels * n + rows if columns else rows * c + labels  # the label's entry in memory
    p_y = x.ravel(order=order)[at]
    with np.errstate(divide="ignore"):
        log_p_y = np.log(p_y)
    if nan.any():  # a NaN anywhere in the row, not only at the label, propagates
        log_p_y[nan] = np.nan
    clamped = log_p_y < LOG_P_FLOOR
    log_p_y[clamped] = LOG_P_FLOOR
    out = {
        "label": labels,
        "nll": np.asarray(-log_p_y, dtype=np.float64),
        "clamped": clamped,
        "pred": _column_argmax(x, conf, nan) if columns else x.argmax(axis=1).astype(np.int64),
        "conf": np.asarray(conf, dtype=np.float64),
        "brier": _numpy_brier(x, labels, p_y),
        "nan": nan,
    }
    if need_probs:
        out["probs"] = np.asarray(x, dtype=np.float64, order="K")
        out["probs_bounded"] = np.asarray(checked)  # checked: each in [0, its row's max]
    return out


def _numpy_logit_rows(
    x: np.ndarray, labels: np.ndarray, *, need_probs: bool
) -> dict[str, np.ndarray] | None:
    r""":func:`_row_stats` of NumPy logits in :func:`_numpy_row_sum`'s layout (column-major
    up to ``COLUMN_CLASSES`` classes, else row-major), the same bits in fewer passes; None
    when a row's maximum is not finite (NaN, +inf or all -inf: the general path gives those
    rows their NaN or infinite terms).

    With :math:`m` the row maximum (finite), the general path's steps reduce to
    :math:`s_k = z_k - m` (0 exactly at the maximum), :math:`\operatorname{lse} =
    \log1p(\sum_{s_k \ne 0} e^{s_k} + n_{\max} - 1)`, :math:`\log p_k = s_k -
    \operatorname{lse}`, :math:`p_k = e^{\log p_k}`: each done once here, in place where
    the result is not kept, with the sums of :func:`_numpy_row_sum` and, column-major, the
    argmax of :func:`_column_argmax` (from the row maximum, which no NaN row can hold here).
    """
    n, c = x.shape
    order: Literal["F", "C"] = "F" if c <= COLUMN_CLASSES else "C"
    if n == 0:
        return None
    m = x.max(axis=1)
    if not np.isfinite(m).all():
        return None
    log_p = np.subtract(x, m[:, None], order=order)  # the shifted logits, then log p in place
    at_max = work_array("logit maxima", (n, c), np.bool_, order)  # used up before this returns
    np.equal(log_p, 0.0, out=at_max)
    e = np.exp(log_p, order=order)
    e[at_max] = 0.0  # the maxima are the log1p's 1 (and n_max − 1 more ones)
    maxima = np.count_nonzero(at_max, axis=1).astype(np.float64)[:, None]
    lse = np.log1p(_numpy_row_sum(e) + (maxima - 1))
    log_p -= lse
    rows = np.arange(n)
    log_p_y = log_p[rows, labels]
    probs = np.exp(log_p, out=e)  # e is used up
    conf = probs.max(axis=1)
    nan = np.zeros(n, dtype=np.bool_)
    out = {
        "label": labels,
        "nll": -log_p_y,
        "clamped": np.zeros(n, dtype=np.bool_),
        "pred": _column_argmax(x, m, nan) if order == "F" else x.argmax(axis=1),
        "conf": conf,
        "brier": _numpy_brier(probs, labels),
        "nan": nan,
    }
    if need_probs:
        out["probs"] = probs
        out["probs_bounded"] = np.asarray(True)  # exponentials: each in [0, its row's max]
    return out


def _numpy_brier(
    probs: np.ndarray, labels: np.ndarray, p_y: np.ndarray | None = None
) -> np.ndarray:
    """Brier terms Σ_k (p_k − 1[k = y])² of NumPy rows in :func:`_numpy_row_sum`'s layout:
    p² into the thread's work array "floats" (used up before this returns), the labels'
    entries (`p_y`, when given, holds them) replaced, rows summed by :func:`_numpy_row_sum`."""
    n, c = probs.shape
    order: Literal["F", "C"] = "F" if c <= COLUMN_CLASSES else "C"
    sq = work_array("floats", (n, c), probs.dtype, order)
    np.square(probs, out=sq)
    rows = np.arange(n)
    sq[rows, labels] = np.square((probs[rows, labels] if p_y is None else p_y) - 1)
    return _numpy_row_sum(sq)[:, 0]


def _numpy_row_sum(x: np.ndarray) -> np.ndarray:
    """Row sums (rows, 1) of a (rows, classes) matrix that depend on each row alone.

    ``x.sum(axis=1)`` adds a contiguous row pairwise but a column-major matrix
    column by column, so its bits would depend on the layout of the batch and
    on its number of rows (one row is contiguous in either layout). The sums
    are made as :func:`_numpy_prob_rows` makes them: column by column in class
    order up to ``COLUMN_CLASSES`` classes, else along the rows of a row-major
    copy.
    """
    n, c = x.shape
    if c > COLUMN_CLASSES:
        return np.ascontiguousarray(x).sum(axis=1, keepdims=True)
    if c == 0:
        return np.zeros((n, 1), dtype=x.dtype)
    return _column_sum(np.asfortranarray(x))[:, None]


def _column_sum(x: np.ndarray) -> np.ndarray:
    """Row sums of a column-major matrix, adding its columns in class order."""
    total = x[:, 0].copy()
    for k in range(1, x.shape[1]):
        total += x[:, k]
    return total


def _column_argmax(x: np.ndarray, row_max: np.ndarray, nan: np.ndarray) -> np.ndarray:
    """``x.argmax(axis=1)`` of a column-major matrix, from its row max: the first class
    that holds it (a tie goes to the first) is the number of columns before it, counted
    column by column in the narrowest unsigned integers that hold it (bytes up to 256
    columns: 5x faster than setting the class under a mask); a NaN row's is its first NaN."""
    n, c = x.shape
    before = np.zeros(n, dtype=np.min_scalar_type(max(c - 1, 0)))  # columns passed
    looking = np.ones(n, dtype=np.bool_)
    hit = np.empty(n, dtype=np.bool_)
    for k in range(c - 1):  # a row whose max is in no earlier column: the last
        np.not_equal(x[:, k], row_max, out=hit)
        np.logical_and(looking, hit, out=looking)
        np.add(before, looking.view(np.uint8), out=before)
    pred = before.astype(np.int64)
    if nan.any():  # the max of a NaN row is NaN, equal to nothing
        pred[nan] = x[nan].argmax(axis=1)
    return pred


# ---------------------------------------------------------------- merge


def _merge(a: State, b: State) -> State:
    """The state of the union of the rows of `a` and `b` (element-wise exact sums)."""
    if not a:
        return {k: v.copy() for k, v in b.items()}
    if not b:
        return {k: v.copy() for k, v in a.items()}
    if a.keys() != b.keys():
        msg = f"cannot merge metric states with different fields: {sorted(a)} and {sorted(b)}."
        raise ValueError(msg)
    out: State = {}
    for key, value in a.items():
        other = b[key]
        if value.shape != other.shape:
            msg = (
                f"cannot merge metric states: `{key}` has shape {value.shape} in one and "
                f"{other.shape} in the other (different number of classes or bins?)."
            )
            raise ValueError(msg)
        out[key] = value.merge(other) if isinstance(value, ExactSum) else value + other
    return out


class _Terms(NamedTuple):
    """Float64 values of one batch to add to an exact sum: to its one element, or to the
    elements `at` (flat indices), counted.

    `counts` names the batch's int64 counts that an add to elements gives
    (``np.bincount(at)``, by :func:`~crossent.metrics._exact.add_counted`): the
    batch holds None under that name, and :func:`_add_batch` replaces the name by
    the new state's array. `runs`, when given, says that the values come in
    groups, each with a most common element (see
    :class:`~crossent.metrics._exact.Runs`).
    """

    values: np.ndarray
    at: np.ndarray | None = None
    counts: str | np.ndarray | None = None  # the counts this add gives (see above)
    runs: Runs | None = None
    bounds: tuple[float, float] | None = None  # certain finite (low, high) of the values


Deferred = list[tuple[ExactSum, _Terms]]


def _add_batch(state: State, batch: dict[str, Any], defer: Deferred | None = None) -> State:
    """`state` plus one batch: int64 counts add, `_Terms` go into copies of the exact sums.

    With `defer`, the terms are appended to it instead (with the copies they
    go into), for :func:`_add_terms` to add together with other parts' terms.
    """
    out: State = {}
    adds: Deferred = []
    for key, value in state.items():
        more = batch[key]
        if isinstance(more, _Terms):
            out[key] = value.copy()
            adds.append((out[key], more))
        elif more is None:  # counted by the add of a `_Terms` (its `counts`)
            out[key] = value.copy()
        else:
            out[key] = value + more
    adds = [
        (target, terms._replace(counts=out[terms.counts]))
        if isinstance(terms.counts, str)
        else (target, terms)
        for target, terms in adds
    ]
    if defer is None:
        _add_terms(adds)
    else:
        defer.extend(adds)
    return out


def _add_terms(adds: Deferred) -> None:
    """Add each `_Terms` to its exact sum with
    :func:`~crossent.metrics._exact.add_counted`; terms of the same values array share
    one split (the per-row losses of the log loss and of the per-class figures, the
    confidences of the equal-width and the fine calibration bins)."""
    shared: dict[int, list[tuple[ExactSum, _Terms]]] = {}
    for target, terms in adds:  # alive in `adds`: no id is reused while grouping
        shared.setdefault(id(terms.values), []).append((target, terms))
    for group in shared.values():
        counted: list[Counted] = [
            (target, terms.at, cast("np.ndarray", terms.counts), terms.runs)
            for target, terms in group
            if terms.at is not None
        ]
        scalars = tuple(target for target, terms in group if terms.at is None)
        add_counted(group[0][1].values, counted, bounds=group[0][1].bounds, totals=scalars)


def _count(values: np.ndarray) -> np.ndarray:
    return np.asarray(np.count_nonzero(values), dtype=np.int64)


def _zero_float() -> ExactSum:
    return ExactSum.zeros()


def _zero_int() -> np.ndarray:
    return np.zeros((), dtype=np.int64)


def _ratio(num: Any, den: Any) -> float:
    """num / den, NaN when there are no rows yet (den = 0)."""
    return float(num) / float(den) if den else math.nan


# ---------------------------------------------------------------- log loss


def _log_loss_init() -> State:
    return {"nll_sum": _zero_float(), "count": _zero_int(), "clamped": _zero_int()}


def _log_loss_update(
    state: State, rows: dict[str, np.ndarray], *, defer: Deferred | None = None
) -> State:
    return _add_batch(
        state,
        {
            "nll_sum": _Terms(rows["nll"]),
            "count": np.asarray(rows["nll"].size, dtype=np.int64),
            "clamped": _count(rows["clamped"]),
        },
        defer,
    )


def _log_loss_compute(state: State, *, base: float | None = None) -> float:
    """Mean −log p of the labels, in units of `base` (nats for None)."""
    return _ratio(state["nll_sum"], state["count"]) / _log_base(base)


def _perplexity_compute(state: State) -> float:
    """exp of the mean negative log-likelihood in nats."""
    mean = _log_loss_compute(state)
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 709.78 else math.inf  # exp overflows float64 beyond


# ---------------------------------------------------------------- accuracy / Brier


def _accuracy_init() -> State:
    return {"correct": _zero_int(), "count": _zero_int(), "nan": _zero_int()}


def _accuracy_update(
    state: State, rows: dict[str, np.ndarray], *, defer: Deferred | None = None
) -> State:
    valid = ~rows["nan"]
    return _add_batch(
        state,
        {
            "correct": _count(valid & (rows["pred"] == rows["label"])),
            "count": np.asarray(rows["label"].size, dtype=np.int64),
            "nan": _count(rows["nan"]),
        },
        defer,
    )


def _accuracy_compute(state: State) -> float:
    """Fraction of rows whose argmax is the label; NaN if any row held NaN."""
    if state["nan"]:
        return math.nan
    return _ratio(state["correct"], state["count"])


def _brier_init() -> State:
    return {"brier_sum": _zero_float(), "count": _zero_int()}


def _brier_update(
    state: State, rows: dict[str, np.ndarray], *, defer: Deferred | None = None
) -> State:
    return _add_batch(
        state,
        {
            "brier_sum": _Terms(rows["brier"]),
            "count": np.asarray(rows["brier"].size, dtype=np.int64),
        },
        defer,
    )


def _brier_compute(state: State) -> float:
    """Mean over rows of Σ_k (p_k − 1[k = y])² (the multiclass Brier score)."""
    return _ratio(state["brier_sum"], state["count"])


# ---------------------------------------------------------------- per class


def _per_class_init(num_classes: int) -> State:
    return {
        "class_nll": ExactSum.zeros((num_classes,)),
        "class_count": np.zeros(num_classes, dtype=np.int64),
        "class_correct": np.zeros(num_classes, dtype=np.int64),
        "class_predicted": np.zeros(num_classes, dtype=np.int64),
        "class_nan": np.zeros(num_classes, dtype=np.int64),  # rows holding NaN, by label
    }


def _per_class_update(
    state: State, rows: dict[str, np.ndarray], *, defer: Deferred | None = None
) -> State:
    num_classes = state["class_count"].size
    labels, valid = rows["label"], ~rows["nan"]
    every_row = bool(valid.all())
    hit = rows["pred"] == labels
    if not every_row:
        hit &= valid
    return _add_batch(
        state,
        {
            "class_nll": _Terms(rows["nll"], labels, "class_count"),
            "class_count": None,  # counted by the exact sum
            # np.compress: a boolean subscript of a random mask is 10x slower
            "class_correct": np.bincount(np.compress(hit, labels), minlength=num_classes).astype(
                np.int64
            ),
            "class_predicted": np.bincount(
                rows["pred"] if every_row else np.compress(valid, rows["pred"]),
                minlength=num_classes,
            ).astype(np.int64),
            "class_nan": (
                np.zeros(num_classes, dtype=np.int64)
                if every_row
                else np.bincount(np.compress(~valid, labels), minlength=num_classes).astype(
                    np.int64
                )
            ),
        },
        defer,
    )


def _per_class_compute(state: State, *, base: float | None = None) -> dict[str, np.ndarray]:
    """Per-class mean cross-entropy (NaN for unseen classes), counts, recall and precision.

    A row holding NaN has no prediction: the recall of its class is NaN, and so
    is every precision (the row may have been predicted as any class), as the
    accuracy is NaN.
    """
    count = state["class_count"]
    seen = count > 0
    denom = np.where(seen, count, 1)
    ce = np.where(seen, state["class_nll"].value() / denom, np.nan) / _log_base(base)
    nan = state["class_nan"]
    recall = np.where(seen & (nan == 0), state["class_correct"] / denom, np.nan)
    predicted = state["class_predicted"]
    known = (predicted > 0) & (not nan.any())
    precision = np.where(
        known, state["class_correct"] / np.where(predicted > 0, predicted, 1), np.nan
    )
    return {"cross_entropy": ce, "count": count.copy(), "recall": recall, "precision": precision}


# ---------------------------------------------------------------- calibration


def _calibration_init(groups: int, bins: int, *, fine: bool = True) -> State:
    """Equal-width bins, plus the fine histogram for equal-mass bins when `fine`."""
    state = {
        "width_count": np.zeros((groups, bins), dtype=np.int64),
        "width_conf": ExactSum.zeros((groups, bins)),
        "width_hit": np.zeros((groups, bins), dtype=np.int64),
        "count": _zero_int(),
        "nan": _zero_int(),
    }
    if fine:
        state["fine_count"] = np.zeros((groups, FINE_BINS), dtype=np.int64)
        state["fine_conf"] = ExactSum.zeros((groups, FINE_BINS))
        state["fine_hit"] = np.zeros((groups, FINE_BINS), dtype=np.int64)
    return state


def _width_bin(
    conf: np.ndarray, bins: int, *, order: Literal["C", "F"] = "C", work: str | None = None
) -> np.ndarray:
    """Equal-width bin of each confidence: min(floor(conf·B), B−1); 1.0 is in the last bin.

    A value below 0 (only when value checks are off) is in the first bin, as
    one above 1 is in the last. The result is laid out in `order`; with
    `work`, it is a work array of that name (see :func:`.work_array`), and the
    products are computed in the thread's float work array "floats" (which
    holds nothing between calls).
    """
    shape: tuple[int, ...] = np.shape(conf)
    if work is None:
        t, out = np.empty(shape, order=order), np.empty(shape, dtype=np.int64, order=order)
    else:
        t = work_array("floats", shape, np.float64, order)  # used up before this returns
        out = work_array(work, shape, np.int64, order)
    np.multiply(conf, bins, out=t)
    np.clip(t, 0, bins - 1, out=t)
    np.copyto(out, t, casting="unsafe")  # truncation: floor of values >= 0
    return out


def _fine_bin(conf: np.ndarray) -> np.ndarray:
    """Fine bin of each confidence, equal-width in log-odds over ±FINE_LOGIT_RANGE.

    ``floor((clip(log c − log1p(−c), ±R) + R) / 2R · FINE_BINS)`` up to
    ``FINE_BINS − 1``, c = clip(conf, 0, 1), each step in place (the floor is
    the truncation of a value >= 0).
    """
    r = FINE_LOGIT_RANGE
    t = np.clip(conf, 0.0, 1.0)
    rest = np.negative(t)
    with np.errstate(divide="ignore"):
        np.log1p(rest, out=rest)
        np.log(t, out=t)
    np.subtract(t, rest, out=t)  # the log-odds
    np.clip(t, -r, r, out=t)
    t += r
    t /= 2 * r
    t *= FINE_BINS
    out = t.astype(np.int64)
    np.minimum(out, FINE_BINS - 1, out=out)
    return out


def _calibration_pairs(
    rows: dict[str, np.ndarray], kind: str
) -> tuple[np.ndarray, Literal["C", "F"], np.ndarray]:
    """Confidences (rows, groups) of the rows without NaN, their memory order, and the hits.

    The hits are given as flat indices into ``confidence.ravel(order)``, the
    confidences in memory order (for classwise calibration, exactly one per
    row: its label's column), so no (rows × classes) mask is ever built and
    no column-major matrix is copied to rows.
    """
    valid = ~rows["nan"]
    every_row = bool(valid.all())

    def kept(a: np.ndarray) -> np.ndarray:
        return a if every_row else a[valid]

    labels = kept(rows["label"])
    if kind == "top_label":
        return kept(rows["conf"])[:, None], "C", np.flatnonzero(kept(rows["pred"]) == labels)
    probs = kept(rows["probs"])
    if kind == "positive":
        if probs.shape[1] != 2:
            msg = (
                'calibration kind="positive" is for two classes (the positive class is class 1); '
                f'got {probs.shape[1]} classes. Use kind="top_label" or "classwise".'
            )
            raise ValueError(msg)
        return probs[:, 1:], "C", np.flatnonzero(labels == 1)
    n, c = probs.shape
    rows_at = np.arange(n, dtype=np.int64)
    if probs.flags.f_contiguous and not probs.flags.c_contiguous:
        return probs, "F", labels * n + rows_at
    return probs, "C", rows_at * c + labels


def _calibration_update(
    state: State, rows: dict[str, np.ndarray], *, kind: str, defer: Deferred | None = None
) -> State:
    groups, bins = state["width_count"].shape
    conf, order, hits = _calibration_pairs(rows, kind)
    flat_conf = conf.ravel(order=order)
    bounds = None
    if kind == "classwise" and bool(rows.get("probs_bounded", False)) and conf.size:
        # certain bounds of the probabilities (each in [0, its row's max]), so the exact
        # sums skip a min and a max over all of them
        top = rows["conf"] if bool(np.all(~rows["nan"])) else rows["conf"][~rows["nan"]]
        bounds = (0.0, float(top.max()))

    def hist(bin_of: np.ndarray, name: str) -> tuple[Any, ...]:
        # bin_of: (rows, groups) bin of each confidence, laid out as conf; group g's bins
        # are g*width + bin. The confidences' sums are counted by the exact add.
        width = state[f"{name}_count"].shape[1]
        idx = bin_of
        if groups > 1:
            idx += np.arange(groups, dtype=np.int64) * width
        idx = idx.ravel(order=order)
        length, shape = groups * width, (groups, width)
        hit = np.bincount(idx[hits], minlength=length).reshape(shape).astype(np.int64)
        runs = (  # classwise: runs of each class's values
            _counted_runs(state[f"{name}_count"], conf.shape[0], order)
            if kind == "classwise"
            else None
        )
        return None, _Terms(flat_conf, idx, f"{name}_count", runs, bounds), hit

    w_count, w_conf, w_hit = hist(_width_bin(conf, bins, order=order, work=kind), "width")
    batch = {
        "width_count": w_count,
        "width_conf": w_conf,
        "width_hit": w_hit,
        "count": np.asarray(rows["label"].size, dtype=np.int64),
        "nan": _count(rows["nan"]),
    }
    if "fine_count" in state:
        f_count, f_conf, f_hit = hist(_fine_bin(conf), "fine")
        batch |= {"fine_count": f_count, "fine_conf": f_conf, "fine_hit": f_hit}
    return _add_batch(state, batch, defer)


#: classwise bins, counted (see :func:`~crossent.metrics._exact.add_counted`): the runs
#: path when at most this share of the values seen so far left their class's most common bin
COUNTED_RUNS_SHARE = 0.1


def _counted_runs(seen: np.ndarray, rows: int, order: Literal["C", "F"]) -> Runs | None:
    """The runs of a counted classwise add, from the counts `seen` (groups, bins) so far:
    each class's most common bin (bin 0 before any), when the values that left it were few
    or the bins too many to scatter every value (with lanes; see
    :func:`~crossent.metrics._exact.counted_lanes`)."""
    groups, width = seen.shape
    mode = seen.argmax(axis=1)
    total = int(seen.sum())
    others = total - int(seen[np.arange(groups), mode].sum())
    few = total > 0 and others <= COUNTED_RUNS_SHARE * total
    if groups < 2 or not (few or counted_lanes(seen.size) < 4):
        return None
    return Runs(order, rows, np.arange(groups, dtype=np.int64) * width + mode)


def _mass_groups(fine_count: np.ndarray, bins: int) -> np.ndarray:
    """Equal-mass bin of each fine bin: the bin holding the fine bin's median rank."""
    total = fine_count.sum(axis=-1, keepdims=True)
    middle = np.cumsum(fine_count, axis=-1) - fine_count / 2
    frac = middle / np.where(total > 0, total, 1)
    return np.minimum(np.floor(frac * bins).astype(np.int64), bins - 1)


def _calibration_bins(state: State, *, binning: str) -> tuple[np.ndarray, ...]:
    """Per-bin (count, confidence sum, hit count), shape (groups, bins)."""
    groups, bins = state["width_count"].shape
    if binning == "width":
        return state["width_count"], state["width_conf"].value(), state["width_hit"]
    if "fine_count" not in state:
        msg = 'this calibration state keeps equal-width bins only; binning="mass" needs fine=True.'
        raise ValueError(msg)
    assign = _mass_groups(state["fine_count"], bins)
    rows = (np.arange(groups)[:, None] * bins + assign).ravel()

    def regroup(counts: np.ndarray) -> np.ndarray:  # integer counts, exact in float64
        summed = np.bincount(rows, weights=counts.ravel(), minlength=groups * bins)
        return summed.astype(np.int64).reshape(groups, bins)

    return (
        regroup(state["fine_count"]),
        state["fine_conf"].regroup(assign, bins).value(),
        regroup(state["fine_hit"]),
    )


def _calibration_compute(state: State, *, binning: str = "width", norm: str = "l1") -> float:
    r"""Expected (``norm="l1"``) or maximum (``norm="max"``) calibration error.

    ECE = Σ_b (n_b / N) |acc_b − conf_b| per group, averaged over the groups
    (one group for top-label and positive-class, one per class for classwise);
    MCE = max over non-empty bins and groups of |acc_b − conf_b|.
    """
    if state["nan"]:
        return math.nan
    count, conf, hit = _calibration_bins(state, binning=binning)
    total = float(state["count"])
    if total == 0:
        return math.nan
    gap = np.abs(hit - conf)  # per-bin |Σ hit − Σ conf| = n_b · |acc_b − conf_b|
    if norm == "l1":
        return float(np.mean(np.sum(gap, axis=-1) / total))
    nonempty = count > 0
    per_bin = gap[nonempty] / count[nonempty]
    return float(per_bin.max()) if per_bin.size else math.nan


def _reliability(state: State, *, binning: str = "width") -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and accuracy of group 0 (NaN for empty bins), and
    ``nan``: the rows holding NaN, which no bin holds (the calibration error is NaN then)."""
    count, conf, hit = (a[0] for a in _calibration_bins(state, binning=binning))
    nonempty = count > 0
    denom = np.where(nonempty, count, 1)
    return {
        "count": np.asarray(count, dtype=np.int64),
        "confidence": np.where(nonempty, conf / denom, np.nan),
        "accuracy": np.where(nonempty, hit / denom, np.nan),
        "nan": np.asarray(state["nan"], dtype=np.int64),
    }
