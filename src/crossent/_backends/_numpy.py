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
maximum, an empty batch, probabilities, focal loss with smoothing, an upstream
gradient — return ``None`` and take the generic path, which raises crossent's
errors and handles every corner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crossent._lib._checks import check_axis, check_label_range, values_checked
from crossent._lib._xp import quiet
from crossent._losses import _rows
from crossent._losses._common import mean_class_weight
from crossent._losses._logprob import check_class_weight, softcap_backward, softcap_logits
from crossent._losses._options import CEOptions

__all__ = ["sparse"]

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
    axis_ = check_axis(axis, input.ndim)
    num_classes = input.shape[axis_]
    if target.shape != input.shape[:axis_] + input.shape[axis_ + 1 :]:
        return None  # the generic path names the shapes
    dtype = input.dtype
    x = input if axis_ == input.ndim - 1 else np.moveaxis(input, axis_, -1)
    x = x.reshape(-1, num_classes)
    w = None
    if weight is not None:
        check_class_weight(weight, num_classes, xp=np)
        w = mean_class_weight(weight.astype(dtype, copy=False), opts.reduction, opts.z_loss, xp=np)
    label, valid = _labels(target.reshape(-1), num_classes, opts)
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
    if opts.reduction == "none":
        loss = row.reshape(target.shape).astype(dtype, copy=False)
        scale: Any = 1.0
    elif opts.reduction == "sum":
        loss, scale = np.asarray(row.sum(), dtype=dtype), 1.0
    else:  # the mean over the counted weight; 0 (and a zero gradient) over none
        den = row.shape[0] if isinstance(w_y, float) else w_y.sum()
        total = row.sum()
        if den == 0:  # the sum over +inf, as safe_divide: 0, but a NaN sum stays NaN
            with quiet(np, "invalid"):
                total = total / np.inf
        loss = np.asarray(total / den if den != 0 else total, dtype=dtype)
        scale = 1.0 / den if den != 0 else 0.0
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
    grad = softcap_backward(x, opts.softcap, buf, xp=np).reshape(
        input.shape[:axis_] + input.shape[axis_ + 1 :] + (num_classes,)
    )
    if axis_ != input.ndim - 1:
        grad = np.moveaxis(grad, -1, axis_)
    return loss, grad.astype(dtype, copy=False)
