r"""Sparse categorical cross-entropy (integer class labels) and PyTorch's ``nll_loss``.

Layout of the module:

- :func:`_row_losses` / :func:`_row_grads`: the per-row loss and its
  closed-form gradient, class axis last, in the compute dtype. From logits
  they read both off the row statistics of :mod:`._rows` (the one statement
  of the formula); probabilities, log-probabilities and focal loss with
  smoothing go class by class (:func:`_sparse_rows` / :func:`_sparse_rows_grad`,
  built on :mod:`._logprob`).
- :func:`sparse_categorical_cross_entropy`: the options (:mod:`._options`),
  then PyTorch's own kernels where they apply (:mod:`crossent._backends._torch`)
  or the generic array-API path (differentiable by the backend's autodiff).
- :func:`_nll_loss`: PyTorch's ``nll_loss`` semantics on log-probabilities,
  for :class:`crossent.nn.NLLLoss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, cast

from crossent._backends import _numpy as _numpy_exec
from crossent._backends import torch_executor
from crossent._backends._node import graph_node, in_graph, torch_operands
from crossent._lib._checks import (
    check_axis,
    check_floating,
    check_ignore_index,
    check_integer_labels,
    check_label_range,
    check_probability_rows,
    guard_uint64_labels,
    poison_unread_labels,
)
from crossent._lib._config import dynamo_tracing, get_validation
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    check_same_device,
    compute_dtype,
    device,
    difference,
    dim_size,
    is_torch_namespace,
    is_torch_tensor,
    logsumexp,
    moveaxis,
    number_for,
    numpy_array,
    output_dtype,
    quiet,
    representable,
    safe_divide,
    shift_by_max,
    size,
    take_along_axis,
)
from crossent._losses import _rows
from crossent._losses._common import mean_class_weight, nan_rows, reduce_loss
from crossent._losses._logprob import (
    add_at_index,
    check_class_weight,
    class_terms,
    propagate_nan,
    softcap_backward,
    softcap_logits,
    term_grad,
    term_value,
)
from crossent._losses._options import CEOptions, make_options

__all__ = ["sparse_categorical_cross_entropy"]

_LOGITS_OPTIONS = {r: make_options(from_logits=True, reduction=r) for r in ("mean", "sum", "none")}
"""The options of a call from logits with every other option at its default, by reduction."""


def plain_logits_options(
    from_logits: object, reduction: object, *zeros: object
) -> CEOptions | None:
    """The options of a call from logits whose other options, `zeros`, are the float 0.0 (what
    :func:`make_options` returns for it, without building and hashing its key: a tenth of a
    32 × 10 loss); None for any other call (a bool, an int or a tensor option included: those
    :func:`make_options` checks)."""
    # traced, not a constant's argument: torch.compile(dynamic=True) makes float defaults
    # symbolic; ``__class__``, not ``type()``: dynamo cannot guard the type of a value from a
    # trace-time constant (an nn module's options: InternalTorchDynamoError)
    for value in zeros:
        if value.__class__ is not float or value != 0.0:
            return None
    return _plain_options(from_logits, reduction)


def _plain_options(from_logits: object, reduction: object) -> CEOptions | None:
    """:func:`plain_logits_options` once its float options are known to be 0."""
    if from_logits is not True or type(reduction) is not str:
        return None
    return _LOGITS_OPTIONS.get(reduction)


# torch.compile calls it once at trace time and keeps the result, a constant (as
# make_options' _traced_options): the options are constants guarded where the caller passed them,
# and the tests above would leave a guard each
_plain_options._dynamo_marked_constant = True  # type: ignore[attr-defined]


_CHUNK_ELEMENTS = 1 << 20
"""Rows per chunk of the PyTorch fast path: about this many logits (4 MiB in float32)."""


# --------------------------------------------------------------------------- validation


def _check_labels(
    input: Array,
    target: Array,
    *,
    axis: object,
    weight: Array | None,
    ignore_index: object,
    xp: Any,
) -> tuple[int, Array]:
    """Shapes, dtypes and values of `input`, `target`, `weight`; returns the class axis and
    the labels to index with (:func:`check_label_range`)."""
    if not hasattr(input, "shape") or not hasattr(target, "shape"):
        msg = "`input` and `target` must be arrays (NumPy, PyTorch, JAX, ...)."
        raise TypeError(msg)
    axis = check_axis(axis, input.ndim)
    check_floating(input, name="input", xp=xp)
    check_integer_labels(target, xp=xp)
    ignore_index = check_ignore_index(ignore_index, allow_none=True)
    num_classes = dim_size(input.shape[axis])
    expected = tuple(input.shape[:axis]) + tuple(input.shape[axis + 1 :])
    if tuple(target.shape) != expected:
        squeeze = (
            " Drop its trailing axis of size 1 first (e.g. `target.reshape(-1)`)."
            if tuple(target.shape) == (*expected, 1)
            else ""
        )
        msg = (
            f"`target` must have the shape of `input` without the class axis {axis}, "
            f"{expected}; got {tuple(target.shape)}.{squeeze} For one-hot or soft targets use "
            "categorical_cross_entropy."
        )
        raise ValueError(msg)
    check_class_weight(weight, num_classes, xp=xp)
    target = check_label_range(target, num_classes, ignore_index=ignore_index, xp=xp)
    return axis, poison_unread_labels(target, num_classes, ignore_index=ignore_index, xp=xp)


# --------------------------------------------------------------------------- the row core


def _labels(target: Array, ignore_index: int | None, *, xp: Any) -> tuple[Array, Array]:
    """(counted, safe label): ignored labels become 0 so that gathers stay in range."""
    if ignore_index is None or not representable(ignore_index, target.dtype, xp=xp):
        return xp.ones(target.shape, dtype=xp.bool, device=device(target)), target
    valid = target != ignore_index
    return valid, xp.where(valid, target, xp.zeros_like(target))


def _target_weight(
    weight: Array | None, label: Array, valid: Array, *, dtype: Any, xp: Any
) -> Array:
    """w_y for counted targets, 0 for ignored ones."""
    if weight is None:
        return xp.astype(valid, dtype)
    w_y = xp.reshape(xp.take(weight, xp.reshape(label, (-1,)), axis=0), label.shape)
    return xp.where(valid, w_y, xp.zeros_like(w_y))


def _smoothing_coef(
    weight: Array | None, eps: float, num_classes: int, *, like: Array, xp: Any
) -> Array:
    """ε/C · w_k (a 0-d array ε/C without weights)."""
    if weight is None:
        return xp.asarray(eps / num_classes, dtype=like.dtype, device=device(like))
    return (eps / num_classes) * weight


def _gather(x: Array, label: Array, *, xp: Any) -> Array:
    return xp.squeeze(take_along_axis(x, xp.expand_dims(label, axis=-1), axis=-1, xp=xp), axis=-1)


def _sparse_rows(
    z: Array,
    target: Array,
    lse: Array,
    *,
    kind: str,
    weight: Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    gamma: float,
    z_loss: float,
    lse_shift: Array | None = None,
    xp: Any,
) -> tuple[Array, Array]:
    r"""Per-row loss and target weight w_y (0 where ignored); class axis last.

    loss = (1-ε) w_y f_y (-log p_y) + (ε/C) Σ_k w_k f_k (-log p_k) + z_loss · lse².
    `z` may be shifted by its row max `lse_shift` (:func:`~crossent._lib._xp.shift_by_max`),
    `lse` being then that of the shifted logits; the z-loss adds it back.
    """
    eps = label_smoothing
    valid, label = _labels(target, ignore_index, xp=xp)
    w_y = _target_weight(weight, label, valid, dtype=z.dtype, xp=xp)
    if kind == "logits" and ignore_index is not None:
        # ignored rows read zeros: their terms are dropped below, and autodiff's zero cotangent
        # must not meet the infinite term of a masked class (0 * inf = NaN in jax.grad); but
        # a row shifted by NaN (holding NaN or +inf: shift_by_max) keeps its NaN, so that its
        # gradient is NaN throughout, as PyTorch's (not the 0 that where would give)
        keep = valid if lse_shift is None else valid | xp.isnan(lse_shift)
        z = xp.where(xp.expand_dims(keep, axis=-1), z, xp.zeros_like(z))
        lse = xp.where(keep, lse, xp.zeros_like(lse))
        lse_shift = None if lse_shift is None else xp.where(valid, lse_shift, xp.zeros_like(lse))
    terms_y = class_terms(_gather(z, label, xp=xp), lse, kind=kind, gamma=gamma, xp=xp)
    row = term_value(number_for(1 - eps, w_y) * w_y, terms_y, gamma, xp=xp)
    if eps > 0:
        c_s = _smoothing_coef(weight, eps, z.shape[-1], like=z, xp=xp)
        lse_col = None if lse is None else xp.expand_dims(lse, axis=-1)
        terms = class_terms(z, lse_col, kind=kind, gamma=gamma, xp=xp)
        row = row + xp.sum(term_value(c_s, terms, gamma, xp=xp), axis=-1)
    if z_loss > 0:
        full = lse if lse_shift is None else lse + lse_shift
        row = row + number_for(z_loss, full) * (full * full)
    row = propagate_nan(row, z, kind=kind, xp=xp)
    return xp.where(valid, row, xp.zeros_like(row)), w_y


def _sparse_rows_grad(
    z: Array,
    target: Array,
    lse: Array,
    scale: Array,
    *,
    kind: str,
    weight: Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    gamma: float,
    z_loss: float,
    lse_shift: Array | None = None,
    xp: Any,
) -> Array:
    r"""Closed-form d(Σ_i scale_i · loss_i)/dz, class axis last (see :mod:`._logprob`).

    Ignored rows get an all-zero gradient row (their ``lse`` is taken as +inf
    so that the softmax row is 0 without an extra pass).
    """
    eps = label_smoothing
    valid, label = _labels(target, ignore_index, xp=xp)
    w_y = _target_weight(weight, label, valid, dtype=z.dtype, xp=xp)
    s = xp.where(valid, scale, xp.zeros_like(scale))
    s_col = xp.expand_dims(s, axis=-1)
    if kind == "logits":
        full = lse if lse_shift is None else lse + lse_shift
        lse = xp.where(valid, lse, xp.full_like(lse, float("inf")))
    lse_col = None if lse is None else xp.expand_dims(lse, axis=-1)
    terms_y = class_terms(_gather(z, label, xp=xp), lse, kind=kind, gamma=gamma, xp=xp)
    h_y = term_grad((1 - eps) * w_y, terms_y, gamma, kind=kind, xp=xp)
    h_dense = None
    if eps > 0:
        c_s = _smoothing_coef(weight, eps, z.shape[-1], like=z, xp=xp)
        terms = class_terms(z, lse_col, kind=kind, gamma=gamma, xp=xp)
        h_dense = term_grad(c_s, terms, gamma, kind=kind, xp=xp)
    if kind != "logits":
        g = xp.zeros_like(z) if h_dense is None else s_col * h_dense + xp.zeros_like(z)
        return add_at_index(g, label, s * h_y, xp=xp)
    total = h_y
    if h_dense is not None:
        if gamma == 0:  # h_dense is ε/C·w (or ε/C): its row sum needs no N×C pass
            c_sum = xp.sum(h_dense) if weight is not None else eps * xp.ones_like(h_dense)
            total = total + xp.where(valid, c_sum * xp.ones_like(total), xp.zeros_like(total))
        else:
            total = total + xp.sum(h_dense, axis=-1)
    if z_loss > 0:
        total = total + (2 * z_loss) * xp.where(valid, full, xp.zeros_like(full))
    g = xp.expand_dims(total * s, axis=-1) * xp.exp(difference(z, lse_col, xp=xp))  # -inf rows: NaN
    if h_dense is not None:
        g = g - s_col * h_dense
    return add_at_index(g, label, -s * h_y, xp=xp)


def _row_scale(
    grad_output: Array | None,
    reduction: str,
    denominator: Array,
    shape: tuple[int, ...],
    *,
    xp: Any,
) -> Array:
    """d(reduced loss)/d(row loss) times the upstream gradient, one value per row."""
    if grad_output is None:
        g = xp.ones((), dtype=denominator.dtype, device=device(denominator))
    else:
        g = xp.astype(grad_output, denominator.dtype)
    if reduction == "mean":
        g = safe_divide(g, denominator, xp=xp)
    return xp.broadcast_to(g, shape)


@contextlib.contextmanager
def _no_autograd(xp: Any) -> Iterator[None]:
    """Closed forms need no graph: turn PyTorch's autograd off inside."""
    if is_torch_namespace(xp):
        import torch

        with torch.no_grad():
            yield
    else:
        yield


# --------------------------------------------------------------------------- public API


def sparse_categorical_cross_entropy(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""Cross-entropy between class scores and integer class labels.

    Parameters
    ----------
    input : array
        Probabilities, or logits if `from_logits` is True; classes lie along `axis`.
        Each row of probabilities must sum to 1 up to rounding,
        :math:`|\sum_k p_k - 1| \le \epsilon_{\text{in}} + C\,\epsilon_{\text{sum}}`
        (machine epsilons of the input's dtype and of the summing dtype,
        float32 for float16/bfloat16): a softmax output passes, a sigmoid
        output or unnormalized scores raise.
    target : array of int
        Class indices in ``[0, C)`` (or `ignore_index`); the shape of `input` without `axis`.
    from_logits : bool, default False
        Whether `input` holds logits (any real numbers, ``-inf`` masks a class)
        rather than probabilities.
    axis : int, default -1
        The class axis of `input` (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).
    weight : array, optional
        Per-class weights, shape ``(C,)``, floating, non-negative.
    ignore_index : int, optional
        Targets equal to it contribute nothing to the loss, the gradient or the
        mean's denominator.
    label_smoothing : float, default 0.0
        ε in [0, 1]: the target becomes :math:`(1-\varepsilon)\,e_y + \varepsilon/C`.
    gamma : float, default 0.0
        Focal-loss focusing parameter; each class term gets :math:`(1-p_k)^\gamma`.
    z_loss : float, default 0.0
        Adds ``z_loss * lse(logits)**2`` per counted target (PaLM). Needs logits.
    softcap : float, optional
        Replaces logits by ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        Needs logits.
        A logit of ``-inf`` (a masked class) stays ``-inf``, with gradient 0, rather than
        becoming ``-softcap``. A positive, finite number (None: no cap); a cap so large
        that ``logits / softcap`` is below the dtype's rounding leaves the logits as they
        are.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed weight :math:`\sum_i w_{y_i}` of the
        counted targets (the count without weights); a mean over no counted
        target is 0 with a zero gradient.

    Returns
    -------
    array
        0-d for ``"mean"`` and ``"sum"``; the shape of `target` for ``"none"``
        (0 at ignored targets). Same array type, device and dtype as `input`.

    Raises
    ------
    TypeError
        Float (or boolean) labels, an integer `input`, non-numeric options.
    ValueError
        Wrong shapes, labels outside ``[0, C)`` that are not `ignore_index`,
        a `weight` of the wrong length or with negative entries, probabilities
        outside [0, 1] or rows of them that do not sum to 1, `z_loss`/`softcap`
        without ``from_logits=True``, a bad `axis` or `reduction`.

    See Also
    --------
    categorical_cross_entropy : one-hot or soft targets.

    Notes
    -----
    With :math:`\log p_k = z_k - \operatorname{lse}(z)` (logits) or
    :math:`\max(\log p_k, -100)` (probabilities) and
    :math:`f_k = (1-p_k)^\gamma`, the loss of one counted target is

    .. math::
        \ell = (1-\varepsilon)\, w_y f_y (-\log p_y)
             + \frac{\varepsilon}{C}\sum_k w_k f_k (-\log p_k)
             + \lambda_z \operatorname{lse}(z)^2 ,

    PyTorch's composition of label smoothing with class weights [1]_; the
    z-loss term is not weighted. ``lse`` is computed as
    :math:`m + \log\sum_k e^{z_k - m}`, :math:`m = \max_k z_k` [2]_, so no
    finite logit overflows. float16/bfloat16 inputs are computed in float32
    and the result is cast back. One limit, shared with PyTorch: the smoothing
    sum :math:`\sum_k w_k (\operatorname{lse}(z) - z_k)` is formed in that
    dtype, so a row whose logits span more than about its largest value over
    :math:`C` (float32: :math:`|z| \gtrsim 10^{38}/C`) gives ``+inf`` where the
    smoothed loss is finite (see the differences page).

    A class with a ``-inf`` logit (or probability 0) and target 0 contributes
    exactly 0 to the value and the gradient. With label smoothing every class
    has a positive target, so a ``-inf`` logit makes the loss ``+inf``, which
    is the mathematically right value (a probability-0 class then gives the
    clamped ``100`` instead).

    On PyTorch tensors with ``from_logits=True`` PyTorch's own
    ``F.cross_entropy`` computes the loss where it has the options (float16
    and bfloat16 are computed in float32); crossent's own options go through
    ``log_softmax`` and a gather, eagerly with a closed-form gradient
    (differentiable operations under ``torch.compile`` and ``torch.func``). Double
    backward (``create_graph=True``), ``torch.compile``, ``torch.export`` and
    ``torch.func`` work, and under ``torch.autocast`` the result is float32.
    Differences from ``torch.nn.functional.cross_entropy``: the class axis
    defaults to -1, and a mean over no counted target is 0 instead of NaN.

    References
    ----------
    .. [1] PyTorch, ``torch.nn.functional.cross_entropy`` (``label_smoothing``).
    .. [2] Blanchard, Higham, Higham, "Accurately computing the log-sum-exp
       and softmax functions", IMA J. Numer. Anal., 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    >>> loss = ce.sparse_categorical_cross_entropy(logits[:1], np.array([0]), from_logits=True)
    >>> print(float(loss))
    0.12692801104297...
    >>> ce.sparse_categorical_cross_entropy(logits, np.array([0, -100]), from_logits=True,
    ...                                     ignore_index=-100, reduction="none")
    array([0.12692801, 0.        ])
    >>> probs = np.array([[0.9, 0.1], [0.0, 1.0]])
    >>> print(float(ce.sparse_categorical_cross_entropy(probs, np.array([0, 1]), reduction="sum")))
    0.10536051565782...
    """
    opts = None
    if softcap is None and ignore_index is None:
        opts = plain_logits_options(from_logits, reduction, label_smoothing, gamma, z_loss)
    if opts is None:
        opts = make_options(
            from_logits=from_logits, label_smoothing=label_smoothing, gamma=gamma,
            z_loss=z_loss, softcap=softcap, ignore_index=ignore_index, reduction=reduction,
        )  # fmt: skip
    if is_torch_tensor(input):
        if dynamo_tracing() and in_graph() and torch_operands(axis, target, weight):
            return graph_node(  # one opaque node: few guards (crossent._backends._node)
                "sparse_categorical_cross_entropy", input, target, checked=get_validation(),
                from_logits=from_logits, axis=axis, weight=weight, ignore_index=opts.ignore_index,
                label_smoothing=opts.label_smoothing, gamma=opts.gamma, z_loss=opts.z_loss,
                softcap=opts.softcap, reduction=opts.reduction,
            )  # fmt: skip
        ndim = input.ndim
        # the default class axis without a call (check_axis names a bad one)
        axis_ = axis + ndim if type(axis) is int and -ndim <= axis < 0 else check_axis(axis, ndim)
        if weight is not None:
            check_class_weight(
                weight, dim_size(input.shape[axis_]), xp=array_namespace(weight=weight)
            )
        try:
            out = torch_executor().sparse(input, target, weight, axis_, opts)
        except RuntimeError:  # PyTorch's device error: crossent's, naming the argument
            check_same_device(input=input, target=target, weight=weight)
            raise
        if out is not None:
            return out
    lean = _numpy_exec.sparse(input, target, weight, axis, opts, with_grad=False)
    if lean is not None:
        return numpy_array(lean[0])
    xp = array_namespace(input=input, target=target, weight=weight)
    axis_, target = _check_arrays(input, target, weight=weight, axis=axis, opts=opts, xp=xp)
    if is_torch_tensor(input) and opts.kind == "logits":  # autograd: no NaN from ignored rows
        input = torch_executor().mask_ignored_rows(
            input, target, opts.ignore_index, axis_, accelerator=True
        )
    return numpy_array(_forward(input, target, weight=weight, axis=axis_, opts=opts, xp=xp))


def _check_arrays(
    input: Array, target: Array, *, weight: Array | None, axis: object, opts: CEOptions, xp: Any
) -> tuple[int, Array]:
    """Shapes, dtypes and values of the arrays; returns class axis and target to index with."""
    axis_, target = _check_labels(
        input, target, axis=axis, weight=weight, ignore_index=opts.ignore_index, xp=xp
    )
    if is_torch_namespace(xp):
        from crossent._backends._torch import index_target

        # validation off: a uint64 label of 2**63 or more by its value, not by the int64
        # largest that index_target makes of it (which PyTorch's gathers then named)
        guard_uint64_labels(target, dim_size(input.shape[axis_]), ignore_index=opts.ignore_index)

        target = index_target(target)
    if opts.kind == "probs":
        check_probability_rows(_counted_rows(input, target, axis_, opts, xp=xp), axis=axis_, xp=xp)
    return axis_, target


def _counted_rows(input: Array, target: Array, axis: int, opts: CEOptions, *, xp: Any) -> Array:
    """`input` with every row whose label is ``ignore_index`` replaced by the one-hot row of
    class 0, for the probability checks: an ignored row is not read (PyTorch's ``nll_loss``
    reads no input there), so padding rows of zeros, or of anything else, are not checked
    for [0, 1] or a row sum of 1. NaN there passes either way (the checks let NaN through);
    its gradient stays NaN, as that of NaN in an ignored row of logits."""
    if opts.ignore_index is None or size(input) == 0 or not get_validation():
        return input
    valid, _ = _labels(target, opts.ignore_index, xp=xp)
    classes = xp.arange(dim_size(input.shape[axis]), device=device(input))
    shape = [1] * input.ndim
    shape[axis] = -1
    one_hot = xp.astype(xp.reshape(classes == 0, tuple(shape)), input.dtype)
    return xp.where(xp.expand_dims(valid, axis=axis), input, one_hot)


def _rows_options(opts: CEOptions) -> dict[str, Any]:
    return {
        "ignore_index": opts.ignore_index,
        "label_smoothing": opts.label_smoothing,
        "gamma": opts.gamma,
        "z_loss": opts.z_loss,
    }


def _prepare(
    input: Array, *, axis: int, weight: Array | None, opts: CEOptions, xp: Any
) -> tuple[Array, Array, Array | None, Array | None, Array | None]:
    """(x, z, lse, w, m): input in the compute dtype with classes last, capped logits, lse, weight.

    ``lse`` is computed only for the class-by-class formula (the row statistics
    carry their own); there `z` is shifted by its row max `m`
    (:func:`~crossent._lib._xp.shift_by_max`), so that log p = (z - m) - lse(z - m) stays accurate.
    """
    cdt = compute_dtype(input.dtype, xp=xp)
    w = None if weight is None else astype(weight, cdt, xp=xp)
    w = mean_class_weight(w, opts.reduction, opts.z_loss, xp=xp)  # no overflow of the sums
    x = moveaxis(astype(input, cdt, xp=xp), axis, -1, xp=xp)
    z = softcap_logits(x, opts.softcap, xp=xp)
    if opts.kind != "logits" or _rows.applies(opts):
        return x, z, None, w, None
    # focal loss with smoothing, whose every class term reads log p: a row holding NaN or
    # +inf has a NaN loss, and a NaN gradient throughout (ignored rows too, as PyTorch's)
    z, m = shift_by_max(z, nan_rows=True, xp=xp)
    return x, z, logsumexp(z, axis=-1, xp=xp), w, m


def _statistics(
    z: Array, target: Array, w: Array | None, opts: CEOptions, *, xp: Any
) -> tuple[_rows.RowStats, Array, Array, Array | float]:
    """(stats, counted, w_y, W): the row statistics of whole rows, the mask of counted rows,
    the target weights (0 where ignored) and the total class weight."""
    valid, label = _labels(target, opts.ignore_index, xp=xp)
    w_y = _target_weight(w, label, valid, dtype=z.dtype, xp=xp)
    counted = None if opts.ignore_index is None else valid
    stats = _rows.row_stats(
        z, label, w, with_wz=opts.label_smoothing != 0, whole=True, counted=counted, xp=xp
    )
    if opts.ignore_index is not None:
        stats = _rows.stand_in_ignored(stats, valid, xp=xp)
    total = z.shape[-1] * 1.0 if w is None else xp.sum(w)  # a symbolic size stays symbolic
    return stats, valid, w_y, total


_Statistics = tuple[_rows.RowStats, Array, Array, Array | float]


def _row_losses(
    z: Array,
    target: Array,
    lse: Array | None,
    w: Array | None,
    opts: CEOptions,
    shift: Array | None,
    *,
    xp: Any,
) -> tuple[Array, Array, _Statistics | None]:
    """Per-row loss (0 where ignored), target weight w_y, and the statistics (for the gradient)."""
    if not _rows.applies(opts):
        row, w_y = _sparse_rows(
            z, target, lse, kind=opts.kind, weight=w, **_rows_options(opts), lse_shift=shift, xp=xp
        )
        return row, w_y, None
    statistics = _statistics(z, target, w, opts, xp=xp)
    stats, valid, w_y, total = statistics
    with quiet(xp, "invalid"):  # 0 * inf: a target of weight 0 on a masked class (its term: 0)
        row, _ = _rows.row_loss(stats, w_y, total, z.shape[-1], opts, xp=xp)
    return xp.where(valid, row, xp.zeros_like(row)), w_y, statistics


def _row_grads(
    z: Array,
    target: Array,
    lse: Array | None,
    w: Array | None,
    scale: Array,
    opts: CEOptions,
    statistics: _Statistics | None,
    shift: Array | None,
    *,
    xp: Any,
) -> Array:
    r""":math:`\partial(\sum_i s_i \ell_i)/\partial z = s\,(a p - b[k=y] - e w)` in closed form."""
    if statistics is None:
        return _sparse_rows_grad(
            z, target, lse, scale, kind=opts.kind, weight=w, **_rows_options(opts),
            lse_shift=shift, xp=xp,
        )  # fmt: skip
    stats, valid, w_y, total = statistics
    with quiet(xp, "invalid"):
        a, b, e = _rows.grad_coefficients(stats, w_y, total, z.shape[-1], opts, xp=xp)
    # ignored rows scale by 0, except that a row holding NaN or +inf (its max, which
    # stand_in_ignored keeps) scales by NaN, counted or not: NaN throughout, as autodiff's
    s = nan_rows(xp.where(valid, scale, xp.zeros_like(scale)), ~(stats.m < float("inf")), xp=xp)
    # p = exp((z - m) - log s): the large parts cancel first (ignored rows: p = 0)
    m_safe = xp.where(xp.isfinite(stats.m), stats.m, xp.zeros_like(stats.m))
    log_s = _rows.log_s(stats, _rows.log_terms(stats, xp=xp), xp=xp)
    shift = xp.where(valid, log_s, xp.full_like(s, float("inf")))
    z_m = difference(z, xp.expand_dims(m_safe, axis=-1), xp=xp)
    g = xp.expand_dims(a * s, axis=-1) * xp.exp(
        difference(z_m, xp.expand_dims(shift, axis=-1), xp=xp)  # a +inf row: NaN (nan_rows)
    )
    if e != 0:
        w_row = xp.ones_like(z[..., :1]) if w is None else w
        g = g - (e * xp.expand_dims(s, axis=-1)) * w_row
    _, label = _labels(target, opts.ignore_index, xp=xp)
    return add_at_index(g, label, -(b * s), xp=xp)


def _forward(
    input: Array, target: Array, *, weight: Array | None, axis: int, opts: CEOptions, xp: Any
) -> Array:
    """The generic (autodiff-friendly) path on any backend."""
    _, z, lse, w, m = _prepare(input, axis=axis, weight=weight, opts=opts, xp=xp)
    row, w_y, _ = _row_losses(z, target, lse, w, opts, m, xp=xp)
    loss = reduce_loss(row, opts.reduction, denominator=xp.sum(w_y), xp=xp)
    return astype(loss, output_dtype(input, xp=xp), xp=xp)


def _sparse_value_and_grad(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    grad_output: Array | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    """The loss and d(loss)/d(input) in closed form, on every backend, no autodiff.

    For ``reduction="none"`` the gradient is that of ``sum(grad_output * loss)``
    (``grad_output`` defaults to ones); otherwise ``grad_output`` (0-d) scales it.
    """
    opts = make_options(
        from_logits=from_logits, label_smoothing=label_smoothing, gamma=gamma, z_loss=z_loss,
        softcap=softcap, ignore_index=ignore_index, reduction=reduction,
    )  # fmt: skip
    if grad_output is None:
        lean = _numpy_exec.sparse(input, target, weight, axis, opts, with_grad=True)
        if lean is not None:
            return lean[0], cast(Array, lean[1])
    if xp is None:
        xp = array_namespace(input=input, target=target, weight=weight)
    axis_, target = _check_arrays(input, target, weight=weight, axis=axis, opts=opts, xp=xp)
    with _no_autograd(xp):
        x, z, lse, w, m = _prepare(input, axis=axis_, weight=weight, opts=opts, xp=xp)
        row, w_y, statistics = _row_losses(z, target, lse, w, opts, m, xp=xp)
        denominator = xp.sum(w_y)
        loss = reduce_loss(row, opts.reduction, denominator=denominator, xp=xp)
        scale = _row_scale(grad_output, opts.reduction, denominator, tuple(row.shape), xp=xp)
        # a row holding NaN or +inf: NaN throughout, as autodiff's (the log-sum-exp of the
        # class-by-class form is NaN or +inf there; _row_grads reads the statistics' max)
        if lse is not None:
            scale = nan_rows(scale, ~(lse < float("inf")), xp=xp)
        # a NaN loss row whose logits are not NaN (a label past the end on a JAX tracer,
        # crossent._lib._checks.poison_unread_labels): NaN too, as a NaN loss row's gradient
        scale = nan_rows(scale, xp.isnan(row), xp=xp)
        g = _row_grads(z, target, lse, w, scale, opts, statistics, m, xp=xp)
        g = softcap_backward(x, opts.softcap, g, xp=xp)
        grad = moveaxis(g, -1, axis_, xp=xp)
    return astype(loss, input.dtype, xp=xp), astype(grad, input.dtype, xp=xp)


def _nll_loss(
    log_probs: Array,
    target: Array,
    *,
    axis: int = 1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    xp: Any = None,
) -> Array:
    r"""PyTorch's ``nll_loss``: :math:`-w_y x_y` per counted target, no normalisation, no clamp.

    ``"mean"`` divides by :math:`\sum_i w_{y_i}` over counted targets (0 when
    there are none). Differentiable by the backend's autodiff.
    """
    opts = make_options(ignore_index=ignore_index, reduction=reduction, kind="log_probs")
    if is_torch_tensor(log_probs):
        if dynamo_tracing() and in_graph() and torch_operands(axis, target, weight):
            return graph_node(  # one opaque node, as the public losses (crossent._backends._node)
                f"{__name__}._nll_loss", log_probs, target, checked=get_validation(), axis=axis,
                weight=weight, ignore_index=opts.ignore_index, reduction=opts.reduction,
            )  # fmt: skip
        from crossent._backends._torch import nll as torch_nll

        axis_ = check_axis(axis, log_probs.ndim)
        if weight is not None:
            check_class_weight(
                weight, dim_size(log_probs.shape[axis_]), xp=array_namespace(weight=weight)
            )
        try:
            out = torch_nll(log_probs, target, weight, axis_, opts)
        except RuntimeError:  # PyTorch's device error: crossent's, naming the argument
            check_same_device(input=log_probs, target=target, weight=weight)
            raise
        if out is not None:
            return out
    if xp is None:
        xp = array_namespace(input=log_probs, target=target, weight=weight)
    axis_, target = _check_arrays(log_probs, target, weight=weight, axis=axis, opts=opts, xp=xp)
    return _forward(log_probs, target, weight=weight, axis=axis_, opts=opts, xp=xp)
