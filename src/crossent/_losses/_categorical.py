r"""Categorical cross-entropy with one-hot or soft targets (same shape as the input).

:func:`_soft_loss` and :func:`_soft_value_and_grad` compute
:math:`\sum_k c_k (1-p_k)^\gamma (-\log p_k)` for a coefficient array `c`
(class axis last); :func:`categorical_cross_entropy` builds
:math:`c = w \odot ((1-\varepsilon) t + \varepsilon / C)` and
:func:`crossent.listnet_loss` builds :math:`c = \operatorname{softmax}(r)`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from crossent._backends import _numpy as _numpy_exec
from crossent._backends import torch_executor
from crossent._backends._node import graph_node, in_graph, torch_operands
from crossent._lib._checks import (
    check_axis,
    check_floating,
    check_in_unit_interval,
    check_probability_rows,
    check_reduction,
    check_same_shape,
)
from crossent._lib._config import dynamo_tracing, get_validation
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    check_same_device,
    compute_dtype,
    dim_size,
    is_torch_tensor,
    logsumexp,
    moveaxis,
    numpy_array,
    output_dtype,
    shift_by_max,
    size_array,
)
from crossent._losses._common import nan_rows, reduce_loss, smoothed_target
from crossent._losses._logprob import (
    check_class_weight,
    class_terms,
    propagate_nan,
    term_grad,
    term_value,
)
from crossent._losses._options import CEOptions, make_options
from crossent._losses._sparse import _no_autograd, _row_scale, plain_logits_options

__all__ = ["categorical_cross_entropy"]


def _soft_loss(x: Array, c: Array, *, kind: str, gamma: float, reduction: str, xp: Any) -> Array:
    """Reduced loss (compute dtype), class axis last; "mean" divides by the number of rows."""
    if kind == "logits":  # accurate log p for large logits; a row without a finite max has a
        # NaN loss, and NaN-shifted, a NaN gradient throughout (autodiff too)
        x, _ = shift_by_max(x, nan_rows=True, masked_zero=False, xp=xp)
    lse = logsumexp(x, axis=-1, keepdims=True, xp=xp) if kind == "logits" else None
    terms = class_terms(x, lse, kind=kind, gamma=gamma, xp=xp)
    row = propagate_nan(xp.sum(term_value(c, terms, gamma, xp=xp), axis=-1), x, kind=kind, xp=xp)
    return reduce_loss(row, reduction, xp=xp)


def _soft_value_and_grad(
    x: Array,
    c: Array,
    *,
    kind: str,
    gamma: float,
    reduction: str,
    grad_output: Array | None,
    xp: Any,
) -> tuple[Array, Array]:
    r"""Closed form of :func:`_soft_loss` and its gradient (see :mod:`._logprob`).

    Logits: :math:`g = s\,(H p - h)` with :math:`H = \sum_k h_k`;
    probabilities: :math:`g = s\, \partial\ell/\partial p`.
    """
    if kind == "logits":  # accurate log p for large logits; a row without a finite max has a
        # NaN loss, and NaN-shifted, a NaN gradient throughout (autodiff too)
        x, _ = shift_by_max(x, nan_rows=True, masked_zero=False, xp=xp)
    lse = logsumexp(x, axis=-1, keepdims=True, xp=xp) if kind == "logits" else None
    terms = class_terms(x, lse, kind=kind, gamma=gamma, xp=xp)
    row = propagate_nan(xp.sum(term_value(c, terms, gamma, xp=xp), axis=-1), x, kind=kind, xp=xp)
    loss = reduce_loss(row, reduction, xp=xp)
    count = size_array(row, dtype=row.dtype, xp=xp)
    scale = _row_scale(grad_output, reduction, count, tuple(row.shape), xp=xp)
    scale = xp.expand_dims(nan_rows(scale, xp.isnan(row), xp=xp), axis=-1)
    h = term_grad(c, terms, gamma, kind=kind, xp=xp)
    if kind != "logits":
        return loss, scale * h
    h = h + xp.zeros_like(x)  # full shape (h may be c itself)
    total = xp.sum(h, axis=-1, keepdims=True)
    p = terms.p if terms.p is not None else xp.exp(-terms.nlp)  # exp(x - lse), formed once
    return loss, scale * (total * p - h)


def _check_soft(
    input: Array,
    target: Array,
    *,
    axis: object,
    reduction: object,
    xp: Any,
    names: tuple[str, str] = ("input", "target"),
) -> tuple[int, str]:
    if not hasattr(input, "shape") or not hasattr(target, "shape"):
        msg = f"`{names[0]}` and `{names[1]}` must be arrays (NumPy, PyTorch, JAX, ...)."
        raise TypeError(msg)
    reduction = check_reduction(reduction)
    axis = check_axis(axis, input.ndim, name=names[0])
    check_floating(input, name=names[0], xp=xp)
    hint = "; for integer class indices use sparse_categorical_cross_entropy"
    check_floating(target, name=names[1], xp=xp, hint=hint if names[1] == "target" else "")
    check_same_shape(input, target, names=names)
    return axis, reduction


def _check(
    input: Array,
    target: Array,
    *,
    from_logits: object,
    axis: object,
    weight: Array | None,
    label_smoothing: object,
    gamma: object,
    reduction: object,
    xp: Any,
) -> tuple[CEOptions, int]:
    """Check every argument once; return the options and the class axis."""
    opts = make_options(
        from_logits=from_logits, label_smoothing=label_smoothing, gamma=gamma, reduction=reduction
    )
    axis_, _ = _check_soft(input, target, axis=axis, reduction=opts.reduction, xp=xp)
    check_class_weight(weight, dim_size(input.shape[axis_]), xp=xp)
    check_in_unit_interval(target, name="target", xp=xp)
    if opts.kind == "probs":
        check_probability_rows(input, axis=axis_, xp=xp)
    return opts, axis_


def _coefficients(
    input: Array, target: Array, *, weight: Array | None, opts: CEOptions, axis: int, xp: Any
) -> tuple[Array, Array]:
    r"""(x, c), class axis last: `input` in the compute dtype and the coefficients

    :math:`c = w \odot ((1-\varepsilon)t + \varepsilon/C)`.
    """
    eps = opts.label_smoothing
    num_classes = dim_size(input.shape[axis])
    cdt = compute_dtype(input.dtype, xp=xp)
    x = moveaxis(astype(input, cdt, xp=xp), axis, -1, xp=xp)
    t = moveaxis(astype(target, cdt, xp=xp), axis, -1, xp=xp)
    c = smoothed_target(t, eps, num_classes)
    if weight is not None:
        c = c * astype(weight, cdt, xp=xp)
    return x, c


def categorical_cross_entropy(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""Cross-entropy between class scores and one-hot or soft class-probability targets.

    Parameters
    ----------
    input : array
        Probabilities, or logits if `from_logits` is True; classes lie along `axis`.
        Each row of probabilities must sum to 1 up to rounding,
        :math:`|\sum_k p_k - 1| \le \epsilon_{\text{in}} + C\,\epsilon_{\text{sum}}`
        (machine epsilons of the input's dtype and of the summing dtype,
        float32 for float16/bfloat16): a softmax output passes, a sigmoid
        output or unnormalized scores raise.
    target : array
        Class probabilities (one-hot or soft, values in [0, 1]), same shape as
        `input`, floating (an integer one-hot array must be cast first).
    from_logits : bool, default False
        Whether `input` holds logits (``-inf`` masks a class) rather than probabilities.
    axis : int, default -1
        The class axis.
    weight : array, optional
        Per-class weights, shape ``(C,)``, floating, non-negative; multiplies
        each class term.
    label_smoothing : float, default 0.0
        ε in [0, 1]: the target becomes :math:`(1-\varepsilon)\,t + \varepsilon/C`.
    gamma : float, default 0.0
        Focal-loss focusing parameter; each class term gets :math:`(1-p_k)^\gamma`.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of rows (PyTorch's rule for soft
        targets, with or without weights).

    Returns
    -------
    array
        0-d for ``"mean"`` and ``"sum"``; the shape of `input` without `axis`
        for ``"none"``. Same array type, device and dtype as `input`.

    Raises
    ------
    TypeError
        Non-floating `input`, `target` or `weight`; non-numeric options.
    ValueError
        Shapes that differ, a `weight` of the wrong length or with negative
        entries, targets or probabilities outside [0, 1], probability rows
        that do not sum to 1, a bad `axis` or
        `reduction`.

    See Also
    --------
    sparse_categorical_cross_entropy : integer class labels.

    Notes
    -----
    With :math:`\log p_k = z_k - \operatorname{lse}(z)` (logits) or
    :math:`\max(\log p_k, -100)` (probabilities) and
    :math:`\tilde t = (1-\varepsilon)\,t + \varepsilon/C`,

    .. math:: \ell = \sum_k w_k\, \tilde t_k\, (1-p_k)^\gamma\, (-\log p_k),

    as ``torch.nn.functional.cross_entropy`` does for probability targets [1]_.
    A class with target 0 and probability 0 (a ``-inf`` logit) contributes
    exactly 0, with a finite gradient; a positive target on it gives ``+inf``
    (with label smoothing every target is positive). float16/bfloat16 are
    computed in float32 and the result is cast back.

    References
    ----------
    .. [1] PyTorch, ``torch.nn.functional.cross_entropy`` (class-probability targets).

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> logits = np.array([[2.0, 0.0]])
    >>> print(float(ce.categorical_cross_entropy(logits, np.array([[1.0, 0.0]]), from_logits=True)))
    0.12692801104297...
    >>> probs = np.array([[0.5, 0.5], [0.9, 0.1]])
    >>> ce.categorical_cross_entropy(probs, np.array([[0.5, 0.5], [1.0, 0.0]]), reduction="none")
    array([0.69314718, 0.10536052])
    """
    if is_torch_tensor(input):  # checks its arrays itself (None: the checks below name it)
        opts = plain_logits_options(from_logits, reduction, label_smoothing, gamma)
        if opts is None:
            opts = make_options(
                from_logits=from_logits, label_smoothing=label_smoothing, gamma=gamma,
                reduction=reduction,
            )  # fmt: skip
        if dynamo_tracing() and in_graph() and torch_operands(axis, target, weight):
            return graph_node(  # one opaque node: few guards (crossent._backends._node)
                "categorical_cross_entropy", input, target, checked=get_validation(),
                from_logits=from_logits, axis=axis, weight=weight,
                label_smoothing=opts.label_smoothing, gamma=opts.gamma, reduction=opts.reduction,
            )  # fmt: skip
        try:
            out = torch_executor().categorical(input, target, weight, axis, opts)
        except RuntimeError:  # PyTorch's device error: crossent's, naming the argument
            check_same_device(input=input, target=target, weight=weight)
            raise
        if out is not None:
            return out
    elif type(input) is np.ndarray and from_logits is False:  # NumPy: one log pass
        opts = make_options(
            from_logits=False, label_smoothing=label_smoothing, gamma=gamma, reduction=reduction
        )
        lean = _numpy_exec.categorical_probabilities(input, target, weight, axis, opts)
        if lean is not None:
            return numpy_array(lean)
    xp = array_namespace(input=input, target=target, weight=weight)
    opts, axis_ = _check(
        input, target, from_logits=from_logits, axis=axis, weight=weight,
        label_smoothing=label_smoothing, gamma=gamma, reduction=reduction, xp=xp,
    )  # fmt: skip
    x, c = _coefficients(input, target, weight=weight, opts=opts, axis=axis_, xp=xp)
    loss = _soft_loss(x, c, kind=opts.kind, gamma=opts.gamma, reduction=opts.reduction, xp=xp)
    return numpy_array(astype(loss, output_dtype(input, xp=xp), xp=xp))


def _categorical_value_and_grad(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reduction: str = "mean",
    grad_output: Array | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    """The loss and d(loss)/d(input) in closed form, on every backend, no autodiff.

    For ``reduction="none"`` the gradient is that of ``sum(grad_output * loss)``
    (``grad_output`` defaults to ones); otherwise ``grad_output`` (0-d) scales it.
    """
    if xp is None:
        xp = array_namespace(input=input, target=target, weight=weight)
    opts, axis_ = _check(
        input, target, from_logits=from_logits, axis=axis, weight=weight,
        label_smoothing=label_smoothing, gamma=gamma, reduction=reduction, xp=xp,
    )  # fmt: skip
    with _no_autograd(xp):
        x, c = _coefficients(input, target, weight=weight, opts=opts, axis=axis_, xp=xp)
        loss, grad = _soft_value_and_grad(
            x, c, kind=opts.kind, gamma=opts.gamma, reduction=opts.reduction,
            grad_output=grad_output, xp=xp,
        )  # fmt: skip
        grad = moveaxis(grad, -1, axis_, xp=xp)
    return astype(loss, input.dtype, xp=xp), astype(grad, input.dtype, xp=xp)
