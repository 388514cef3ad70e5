r"""The NumPy executor: sparse cross-entropy from logits, value and gradient, in place.

The generic array-API formula runs on NumPy through array-api-compat's
wrappers, builds masks and guards for every corner case on every call and
allocates a new array per operation; on small batches that costs seven times
a hand-written ``scipy.special.log_softmax`` loss. This executor computes the
same loss for plain ``numpy.ndarray`` inputs the way SciPy does, with NumPy
itself (the namespace is the module, fetched once at import):

1. ``m = max_k z_k`` (one pass), ``z - m`` into a new buffer (one pass), the
   target logit gathered row by row (no dense one-hot);
2. ``exp`` in place on the buffer and its row sum ``s`` (two passes): the
   statistics :class:`crossent._losses._rows.RowStats`, with ``finite=True``
   after one test that every row maximum is finite;
3. the loss and the gradient coefficients ``(a, b, e)`` from
   :func:`crossent._losses._rows.row_loss` and
   :func:`crossent._losses._rows.grad_coefficients` (the one statement of the
   formula: nothing is restated here);
4. the gradient ``a p - b [k=y] - e w`` written into the same buffer: one
   in-place scaling pass, one scattered update per row.

Validation stays on and cheap: shapes and dtypes are compared directly, the
labels' range is one ``min`` and one ``max`` (crossent's full check and its
message run only when they fail), class weights get the shared check. Inputs
outside this lean case — another array type or dtype, a non-finite row
maximum, an empty batch, focal loss with smoothing, an upstream
gradient — return ``None`` and take the generic path, which raises crossent's
errors and handles every corner.

Losses from probabilities (the log clamped at -100) have lean forms too: the sparse
loss gathers the target probabilities and takes :math:`n` logs (its gradient one
scattered row), the categorical and binary losses one vectorized log pass per term
(:func:`categorical_probabilities`, :func:`binary_probabilities`); their checks are
``min``, ``max`` and the row sums, and NaN, bad values and the options that read
every class (smoothing and focal loss of the sparse loss) take the generic path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crossent._lib._checks import (
    check_axis,
    check_label_range,
    numpy_in_unit_interval,
    sum_tolerance,
    values_checked,
)
from crossent._lib._xp import quiet
from crossent._losses import _rows
from crossent._losses._common import LOG_CLAMP, clamp_floor, mean_class_weight, smoothed_target
from crossent._losses._logprob import check_class_weight, softcap_backward, softcap_logits
from crossent._losses._options import CEOptions

__all__ = [
    "binary_probabilities",
    "categorical_probabilities",
    "sparse",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_SPAN = {dt: float(np.finfo(dt).max * np.finfo(dt).eps / 8) for dt in _FLOATS}
"""Row maxima (in magnitude) from which ``z - m`` can exceed the largest float for some finite
``z`` (a quarter of the last ulp of the largest float)."""


def _fits(input: object, target: object, weight: object, opts: CEOptions) -> bool:
    """Whether the lean path applies (plain NumPy arrays of the dtypes it computes in)."""
    if type(input) is not np.ndarray or type(target) is not np.ndarray:
        return False
    if input.dtype not in _FLOATS or target.dtype.kind not in "iu" or input.size == 0:
        return False
    if weight is not None and not (type(weight) is np.ndarray and weight.dtype.kind == "f"):
        return False
    if opts.kind == "probs":  # smoothing and focal loss read every class: the generic path
        return opts.label_smoothing == 0 and opts.gamma == 0
    return opts.kind == "logits" and _rows.applies(opts)


def _labels(
    target: np.ndarray, num_classes: int, opts: CEOptions
) -> tuple[np.ndarray, np.ndarray | None]:
    """(label, counted): ignored labels read as 0; the range checked with one min and one max."""
    valid = None if opts.ignore_index is None else target != opts.ignore_index
    label = target if valid is None else np.where(valid, target, 0)
    if values_checked(target) and (label.min() < 0 or label.max() >= num_classes):
        check_label_range(target, num_classes, ignore_index=opts.ignore_index, xp=np)
    return label, valid


def sparse(
    input: Any,
    target: Any,
    weight: Any,
    axis: object,
    opts: CEOptions,
    *,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    r"""(loss, gradient or None) of the sparse loss from logits; None for the generic path.

    The gradient is that of the reduced loss (``"none"``: of the sum of the
    row losses). Same values, dtypes and errors as the generic path.
    """
    if not _fits(input, target, weight, opts):
        return None
    setup = _setup(input, target, weight, axis, opts)
    if setup is None:
        return None
    if opts.kind == "probs":
        return _sparse_probabilities(input, target.shape, setup, opts, with_grad=with_grad)
    axis_, num_classes, x, w, label, valid = setup
    dtype = input.dtype
    z = softcap_logits(x, opts.softcap, xp=np)
    m = z.max(axis=-1)
    if not np.abs(m).max() < _SPAN[dtype]:  # as cheap as isfinite(m).all()
        # -inf / +inf / NaN rows: the generic path's guards decide; so it does for a row max
        # beyond which z - m may overflow (to -inf, whose exp is the right 0, with a warning)
        return None
    rows = np.arange(z.shape[0])
    buf = z - m[:, None]
    if opts.label_smoothing == 0:
        wd: Any = 0.0
    elif w is None:
        wd = -buf.sum(axis=-1)
    else:
        wd = np.sum(w * np.where(w == 0, 0, -buf), axis=-1)  # as _rows.row_stats: no 0 * inf
    np.exp(buf, out=buf)
    stats = _rows.RowStats(
        m=m, s=buf.sum(axis=-1), wd=wd, wsum=float(num_classes) if w is None else w.sum(),
        z_y=z[rows, label], finite=True,
    )  # fmt: skip
    if valid is not None:
        stats = _rows.stand_in_ignored(stats, valid, xp=np)
    if w is None:
        w_y: Any = 1.0 if valid is None else valid.astype(dtype)
    else:
        w_y = w[label] if valid is None else np.where(valid, w[label], 0)
    # a counted label of weight 0 on a masked class meets 0 * inf (its term is 0: _rows'
    # _target_term), without NumPy's "invalid value" warning (which a program that turns
    # warnings into errors dies of); so does label_smoothing=1 (no target term)
    zero_coef = opts.label_smoothing == 1 or (w is not None and not w.all())
    with quiet(np, "invalid", when=zero_coef):
        row, _ = _rows.row_loss(stats, w_y, stats.wsum, num_classes, opts, xp=np)
    if valid is not None:
        row = np.where(valid, row, 0)
    loss, scale = _reduced(row, w_y, target.shape, dtype, opts.reduction)
    if not with_grad:
        return loss, None
    if valid is not None:
        scale = np.where(valid, scale, 0).astype(dtype)
    with quiet(np, "invalid", when=zero_coef):
        a, b, e = _rows.grad_coefficients(stats, w_y, stats.wsum, num_classes, opts, xp=np)
    buf *= ((a * scale) / stats.s)[:, None]  # a p, with p = exp(z - m) / s
    buf[rows, label] -= b * scale
    if e != 0:
        col = np.reshape(e * scale, (-1, 1))
        buf -= col if w is None else col * w
    grad = softcap_backward(x, opts.softcap, buf, xp=np)
    return loss, _input_layout(grad, input.shape, axis_).astype(dtype, copy=False)


_Setup = tuple[int, int, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]
"""(class axis, C, the input as ``(n, C)``, class weights, labels, counted rows)."""


def _setup(
    input: np.ndarray, target: np.ndarray, weight: Any, axis: object, opts: CEOptions
) -> _Setup | None:
    """(class axis, C, `input` as ``(n, C)``, the class weights (checked; scaled for a mean
    if huge), the labels (ignored ones read as 0), the counted rows or None); None where the
    shapes differ (the generic path names them)."""
    axis_ = check_axis(axis, input.ndim)
    num_classes = input.shape[axis_]
    if target.shape != input.shape[:axis_] + input.shape[axis_ + 1 :]:
        return None
    x = input if axis_ == input.ndim - 1 else np.moveaxis(input, axis_, -1)
    x = x.reshape(-1, num_classes)
    w = None
    if weight is not None:
        check_class_weight(weight, num_classes, xp=np)
        w = weight.astype(input.dtype, copy=False)
        w = mean_class_weight(w, opts.reduction, opts.z_loss, xp=np)
    label, valid = _labels(target.reshape(-1), num_classes, opts)
    return axis_, num_classes, x, w, label, valid


def _reduced(
    row: np.ndarray, w_y: Any, shape: tuple[int, ...], dtype: Any, reduction: str
) -> tuple[np.ndarray, Any]:
    """(the loss of the per-row losses `row`, d(loss)/d(row)): the mean over the counted
    weight `w_y` (None or a number: the row count); 0, with a zero gradient, over none (the
    sum over +inf, as ``safe_divide``: a NaN sum stays NaN)."""
    if reduction == "none":
        return row.reshape(shape).astype(dtype, copy=False), 1.0
    total = row.sum()
    if reduction == "sum":
        return np.asarray(total, dtype=dtype), 1.0
    den = row.shape[0] if w_y is None or isinstance(w_y, float) else w_y.sum()
    if den == 0:
        with quiet(np, "invalid"):
            return np.asarray(total / np.inf, dtype=dtype), 0.0
    return np.asarray(total / den, dtype=dtype), 1.0 / den


def _input_layout(grad: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """A gradient of ``(n, C)`` in the input's `shape` (classes back on `axis`)."""
    grad = grad.reshape(shape[:axis] + shape[axis + 1 :] + (shape[axis],))
    return grad if axis == len(shape) - 1 else np.moveaxis(grad, -1, axis)


# --------------------------------------------------------------------------- probabilities


def _probability_rows_fit(x: np.ndarray, counted: np.ndarray | None) -> bool:
    """Whether the probabilities `x` (``(n, C)``) may take the lean path: with validation on,
    all in [0, 1] and every row that counts summing to 1 (the generic check's tolerance, in
    the sums' dtype); no NaN. Anything else returns to the generic path, which raises its
    message (or lets a NaN through, propagated)."""
    if not values_checked(x):
        with quiet(np, "invalid"):
            return not np.isnan(x.sum())
    if not numpy_in_unit_interval(x):  # NaN too
        return False
    sums = x.sum(axis=-1)
    if counted is not None:  # ignored rows (padding) are not checked
        sums = np.where(counted, sums, 1)
    tol = sum_tolerance(x.dtype, x.shape[-1], xp=np)
    # 1 - min and max - 1 are exact (Sterbenz) where they could pass: the generic |s - 1| > tol
    return bool(1 - sums.min() <= tol and sums.max() - 1 <= tol)


def _clamped_log(p: np.ndarray, *, complement: bool = False) -> np.ndarray:
    r""":math:`\max(\log p, -100)` (with `complement`, of :math:`\log(1-p)` as ``log1p(-p)``), a
    new array (the rule of :func:`crossent._losses._common.clamped_log`, without its masks; NaN
    for a value outside [0, 1], quietly, as there: with validation off, or in a row under
    ``ignore_index``, masked after)."""
    with quiet(np, "divide", "invalid"):
        out = np.log1p(-p) if complement else np.log(p)
    return np.maximum(out, LOG_CLAMP, out=out)


def _log_derivative(p: np.ndarray, c: Any) -> np.ndarray:
    """``c / p`` where `p` is at least :func:`~crossent._losses._common.clamp_floor`, else 0."""
    with quiet(np, "divide", "invalid", "over"):
        d = np.divide(c, p)
    d[p < clamp_floor(p.dtype, xp=np)] = 0
    return d


def _sparse_probabilities(
    input: np.ndarray,
    shape: tuple[int, ...],
    setup: _Setup,
    opts: CEOptions,
    *,
    with_grad: bool,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    r""":func:`sparse` of probabilities (`shape`: the labels'; `setup`: :func:`_setup`'s),
    :math:`\ell_i = -w_{y_i} \max(\log p_{i y_i}, -100)`: one gather, :math:`n` logs, the
    gradient one scattered row of :math:`-s\,w_{y_i} / p_{i y_i}`; None for the generic path
    (what :func:`_probability_rows_fit` refuses, labels out of range with validation off)."""
    axis_, num_classes, x, w, label, valid = setup
    dtype = input.dtype
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        return None  # validation off: the generic path's guard names them
    if not _probability_rows_fit(x, valid):
        return None
    rows = np.arange(x.shape[0])
    p = x[rows, label]
    w_y: Any = None if w is None else w[label]
    if valid is not None:
        w_y = valid.astype(dtype) if w_y is None else np.where(valid, w_y, 0).astype(dtype)
    log_p = _clamped_log(p)
    with quiet(np, "invalid"):  # 0 * inf of an ignored row (validation off): masked below
        row = -log_p if w_y is None else -(log_p * w_y)
    if valid is not None:  # an ignored row reads class 0, which may be anything
        row = np.where(valid, row, 0).astype(dtype, copy=False)
    loss, scale = _reduced(row, w_y, shape, dtype, opts.reduction)
    if not with_grad:
        return loss, None
    coef = -scale if w_y is None else w_y * -scale
    grad = np.zeros_like(x)
    grad[rows, label] = _log_derivative(p, coef)
    return loss, _input_layout(grad, input.shape, axis_)


def _same_shape_probabilities(input: Any, target: Any, opts: CEOptions) -> bool:
    """Whether the categorical or binary lean path may serve: NumPy arrays of one floating
    dtype and shape, not empty, probabilities, no focal factor."""
    return (
        type(input) is np.ndarray
        and type(target) is np.ndarray
        and input.dtype in _FLOATS
        and target.dtype == input.dtype
        and input.shape == target.shape
        and input.size > 0
        and opts.kind == "probs"
        and opts.gamma == 0
    )


def categorical_probabilities(
    input: Any, target: Any, weight: Any, axis: object, opts: CEOptions
) -> np.ndarray | None:
    r"""The categorical loss of probabilities, :math:`\ell_i = -\sum_k c_{ik} \max(\log p_{ik},
    -100)`, :math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`, the mean over rows: one
    log pass into a new array, the products and sums in place; None for the generic path
    (focal loss, other array types, what the checks refuse)."""
    if not (
        _same_shape_probabilities(input, target, opts)
        and (weight is None or (type(weight) is np.ndarray and weight.dtype.kind == "f"))
    ):
        return None
    axis_ = check_axis(axis, input.ndim)
    num_classes = input.shape[axis_]
    if weight is not None:
        check_class_weight(weight, num_classes, xp=np)
    x = np.moveaxis(input, axis_, -1)
    t = np.moveaxis(target, axis_, -1)
    if values_checked(t) and not numpy_in_unit_interval(t):
        return None  # the generic check's message (NaN: its propagation)
    if not _probability_rows_fit(x.reshape(-1, num_classes), None):
        return None
    eps = opts.label_smoothing
    c = smoothed_target(t, eps, num_classes)
    if weight is not None:
        c = c * weight.astype(input.dtype, copy=False)
    terms = _clamped_log(x)
    terms *= c
    row = -terms.sum(axis=-1)
    if opts.reduction == "none":
        return row
    total = row.sum()
    return np.asarray(total if opts.reduction == "sum" else total / row.size, dtype=input.dtype)


def _binary_mass(w: Any, x: np.ndarray) -> Any:
    """`weight` / `pos_weight` as a number or an array of `x`'s dtype; None for the generic
    path (another type, a shape that does not broadcast to `x`'s, a negative or NaN value
    with validation on: its message or its propagation)."""
    if w is None:
        return 1.0
    if type(w) is np.ndarray:
        if w.dtype.kind != "f" or w.ndim > x.ndim:
            return None
        if any(a not in (1, b) for a, b in zip(w.shape[::-1], x.shape[::-1], strict=False)):
            return None  # the generic path names the shapes
        if values_checked(w) and w.size and not w.min() >= 0:
            return None
        return w.astype(x.dtype, copy=False)
    if isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0:
        return float(w)
    return None


def binary_probabilities(
    input: Any, target: Any, weight: Any, pos_weight: Any, opts: CEOptions
) -> np.ndarray | None:
    r"""Binary cross-entropy of probabilities, :math:`\ell = -(P \max(\log p, -100) + N
    \max(\log(1-p), -100))` with :math:`P = w\,\alpha\,p_w\,t` and :math:`N =
    w\,(1-\alpha)(1-t)` (:math:`t` after smoothing), formed as the generic formulas form them;
    None for the generic path (focal loss, other types, what the checks refuse)."""
    if not (_same_shape_probabilities(input, target, opts) and input.ndim):  # (0-d: scalars)
        return None
    w, pw = _binary_mass(weight, input), _binary_mass(pos_weight, input)
    if w is None or pw is None:
        return None
    if values_checked(input) and not (
        numpy_in_unit_interval(input) and numpy_in_unit_interval(target)
    ):
        return None  # the generic checks' messages (NaN: their propagation)
    eps = opts.label_smoothing
    t = smoothed_target(target, eps, 2)
    pos, neg = t, 1 - t
    if opts.alpha is not None:
        pos, neg = opts.alpha * pos, (1 - opts.alpha) * neg
    if not (isinstance(pw, float) and pw == 1.0):
        pos = pos * pw
    if not (isinstance(w, float) and w == 1.0):
        pos, neg = pos * w, neg * w
    loss = pos * _clamped_log(input)
    loss += neg * _clamped_log(input, complement=True)
    np.negative(loss, out=loss)
    if opts.reduction == "none":
        return loss
    total = loss.sum()
    return np.asarray(total if opts.reduction == "sum" else total / loss.size, dtype=input.dtype)
