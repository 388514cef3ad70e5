r"""Binary cross-entropy (multi-label, soft targets, focal) and its closed-form gradient.

Every element is one independent two-class problem. With :math:`\log p` and
:math:`\log(1-p)` of the input, a target :math:`t` after label smoothing and
constant coefficients

.. math:: P = w\,\alpha\,p_w\,t, \qquad N = w\,(1-\alpha)\,(1-t),

(:math:`\alpha` and :math:`1-\alpha` read as 1 without `alpha`), the loss of one element is

.. math:: \ell = -\bigl[P\,(1-p)^\gamma \log p + N\,p^\gamma \log(1-p)\bigr]

and its derivative, written with the focal factors
:math:`f_+ = (1-p)^\gamma = e^{\gamma\log(1-p)}` and :math:`f_- = p^\gamma = e^{\gamma\log p}`,

.. math:: \frac{\partial\ell}{\partial u} =
          -\Bigl[\bigl(P f_+ + \gamma f_- N\log(1-p)\bigr)\frac{\partial\log p}{\partial u}
          + \bigl(N f_- + \gamma f_+ P\log p\bigr)\frac{\partial\log(1-p)}{\partial u}\Bigr].

The forward pass and :func:`_binary_value_and_grad` share every piece
(:func:`_prepare`, :func:`_log_probs`, :func:`_terms`), so the closed form is
the derivative of exactly the function the forward pass computes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from crossent._backends import _numpy as _numpy_exec
from crossent._backends._node import graph_node, in_graph, torch_operands
from crossent._lib._checks import (
    check_array,
    check_floating,
    check_in_unit_interval,
    check_nonnegative,
    check_nonnegative_scalar,
    check_probabilities,
    check_reduction,
    check_same_shape,
    check_unit_interval_scalar,
    is_real_scalar,
)
from crossent._lib._config import dynamo_tracing, get_validation
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    check_same_device,
    compute_dtype,
    device,
    is_array,
    is_jax_namespace,
    is_torch_namespace,
    is_torch_tensor,
    log_sigmoid_pair,
    number_for,
    numpy_array,
    output_dtype,
    quiet,
    size,
    stop_gradient,
)
from crossent._losses._common import (
    broadcastable,
    clamped_log,
    focal_factor,
    log_prob,
    reduce_loss,
    smoothed_target,
    times_log,
)
from crossent._losses._options import make_options
from crossent._losses._sparse import plain_logits_options

__all__ = ["binary_cross_entropy"]

"""Lower clamp of ``log p`` and ``log(1 - p)`` for probability inputs (PyTorch's rule)."""


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binary:
    """Checked arguments, cast to the compute dtype; targets already smoothed."""

    xp: Any
    input: Array
    target: Array
    weight: Array | None
    pos_weight: Array | None
    from_logits: bool
    gamma: float
    alpha: float | None
    reduction: str
    out_dtype: Any


def _as_number(w: Any) -> Any:
    """A NumPy scalar `weight` / `pos_weight` (``np.float32(2.0)``, ``np.int64(2)``) as the Python
    number it is, crossent's one rule for scalars; anything else as it is. (On the torch path a
    NumPy scalar was taken for an array of another library and refused; ``np.float64``, a float
    subclass, passed.)"""
    return float(w) if not isinstance(w, int | float) and is_real_scalar(w) else w


def _check_weight_type(w: object, *, name: str) -> None:
    if w is not None and (isinstance(w, bool) or not (isinstance(w, int | float) or is_array(w))):
        msg = f"`{name}` must be None, a number or an array; got {type(w).__name__}."
        raise TypeError(msg)


def _elementwise_weight(
    w: Array | float | None, *, name: str, input: Array, dtype: Any, xp: Any
) -> Array | None:
    """`weight` / `pos_weight`: None, a number or an array broadcastable to `input`."""
    if w is None:
        return None
    _check_weight_type(w, name=name)
    # a number first: array-api-compat's array test breaks a torch.compile graph on a float
    number = isinstance(w, int | float)
    arr: Array = xp.asarray(float(w), dtype=dtype, device=device(input)) if number else w
    check_floating(arr, name=name, xp=xp)
    shape, to = tuple(arr.shape), tuple(input.shape)
    if not broadcastable(shape, to):
        fix = (  # a 0-d input (one binary problem) takes a number or a 0-d array only
            f"the shape of `input` or of its trailing dimensions (e.g. ({to[-1]},))"
            if to
            else "a number or a 0-d array (`input` is one binary problem)"
        )
        msg = (
            f"`{name}` of shape {shape} does not broadcast to `input` of shape {to}; give it {fix}."
        )
        raise ValueError(msg)
    check_nonnegative(arr, name=name, xp=xp)
    return astype(arr, dtype, xp=xp)


def _prepare(
    input: Array,
    target: Array,
    *,
    from_logits: bool,
    weight: Array | float | None,
    pos_weight: Array | float | None,
    label_smoothing: float,
    gamma: float,
    alpha: float | None,
    reduction: str,
    xp: Any,
) -> _Binary:
    """Check every argument once, for the loss and its closed-form gradient alike."""
    weight, pos_weight = _as_number(weight), _as_number(pos_weight)
    _check_weight_type(weight, name="weight")
    _check_weight_type(pos_weight, name="pos_weight")
    if xp is None:
        xp = array_namespace(input=input, target=target, weight=weight, pos_weight=pos_weight)
    if not isinstance(from_logits, bool):
        msg = f"`from_logits` must be a bool (True or False); got {from_logits!r}."
        raise TypeError(msg)
    reduction = check_reduction(reduction)
    gamma = check_nonnegative_scalar(gamma, name="gamma")
    label_smoothing = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    alpha = None if alpha is None else check_unit_interval_scalar(alpha, name="alpha")
    for arr, name in ((input, "input"), (target, "target")):
        check_array(arr, name=name)
        check_floating(arr, name=name, xp=xp)
    check_same_shape(input, target)
    dtype = compute_dtype(input.dtype, xp=xp)
    weight = _elementwise_weight(weight, name="weight", input=input, dtype=dtype, xp=xp)
    pos_weight = _elementwise_weight(pos_weight, name="pos_weight", input=input, dtype=dtype, xp=xp)
    if not from_logits:
        check_probabilities(input, name="input", xp=xp)
    check_in_unit_interval(target, name="target", xp=xp)
    t = astype(target, dtype, xp=xp)
    t = smoothed_target(t, label_smoothing, 2)
    return _Binary(
        xp=xp,
        input=astype(input, dtype, xp=xp),
        target=t,
        weight=weight,
        pos_weight=pos_weight,
        from_logits=from_logits,
        gamma=gamma,
        alpha=alpha,
        reduction=reduction,
        out_dtype=output_dtype(input, xp=xp),
    )


# ----------------------------------------------------------------------------
# log p, log(1 - p) and their derivatives
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _LogProbs:
    """``log p`` and ``log(1 - p)`` of the input, and the chain rule through them."""

    log_p: Array
    log_not_p: Array
    x: Array
    clamped_p: Array | None = None
    clamped_not_p: Array | None = None

    def neg_chain(self, c_p: Array, c_not_p: Array, *, xp: Any) -> Array:
        r""":math:`-\bigl(c_p\,\partial_u \log p + c_{\bar p}\,\partial_u \log(1-p)\bigr)`.

        Logits: :math:`\partial_x\log\sigma(x) = \sigma(-x)` and
        :math:`\partial_x\log\sigma(-x) = -\sigma(x)` (:func:`_sigmoids`).
        Probabilities: :math:`1/p` and :math:`-1/(1-p)`, zero where the clamp is
        on (the derivative of the clamped value).
        """
        x = self.x
        if self.clamped_p is None or self.clamped_not_p is None:
            sig, sig_neg = _sigmoids(x, xp=xp)
            return c_not_p * sig - c_p * sig_neg
        cp, cn = self.clamped_p, self.clamped_not_p
        zero = xp.zeros_like(x)
        with quiet(xp, "over"):  # 1/p beyond the dtype (a subnormal p): -inf, as it is
            d_p = xp.where(cp, zero, c_p / xp.where(cp, xp.ones_like(x), x))
            d_not_p = xp.where(cn, zero, c_not_p / (1 - xp.where(cn, zero, x)))
        return d_not_p - d_p


def _sigmoids(x: Array, *, xp: Any) -> tuple[Array, Array]:
    r""":math:`\sigma(x)` and :math:`\sigma(-x)`, each within two ulps, no overflow.

    Native kernels on PyTorch and JAX; elsewhere from :math:`z = e^{-|x|}` as
    :math:`1/(1+z)` and :math:`z/(1+z)`. (``exp(log σ)`` would lose
    :math:`|\log\sigma|` ulps.)
    """
    if is_torch_namespace(xp):
        import torch

        return torch.sigmoid(x), torch.sigmoid(-x)
    if is_jax_namespace(xp):
        import jax

        return jax.nn.sigmoid(x), jax.nn.sigmoid(-x)
    z = xp.exp(-xp.abs(x))
    r = 1 / (1 + z)
    zr = z * r
    nonneg = x >= 0
    return xp.where(nonneg, r, zr), xp.where(nonneg, zr, r)


def _log_probs(x: Array, *, from_logits: bool, xp: Any) -> _LogProbs:
    """log p and log(1 − p): log-sigmoid forms for logits, clamped logs for probabilities."""
    if from_logits:
        return _LogProbs(*log_sigmoid_pair(x, xp=xp), x)
    log_p, clamped_p = clamped_log(x, complement=False, xp=xp)
    log_not_p, clamped_not_p = clamped_log(x, complement=True, xp=xp)
    return _LogProbs(log_p, log_not_p, x, clamped_p, clamped_not_p)


# ----------------------------------------------------------------------------
# The per-element terms, shared by the loss and the gradient
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Terms:
    """The pieces named in the module notes (``f_pos``/``f_neg`` are None without focal)."""

    logs: _LogProbs
    coef_pos: Array
    coef_neg: Array
    pos: Array
    neg: Array
    f_pos: Array | None
    f_neg: Array | None
    infinite: tuple[Array, Array] | None = None
    """Logits with a focal factor: where the logit is -inf and where it is +inf."""


def _terms(b: _Binary) -> _Terms:
    xp = b.xp
    logs = _log_probs(b.input, from_logits=b.from_logits, xp=xp)
    coef_pos, coef_neg = b.target, 1 - b.target
    if b.alpha is not None:
        alpha = number_for(b.alpha, coef_pos)
        coef_pos, coef_neg = alpha * coef_pos, (1 - alpha) * coef_neg
    if b.pos_weight is not None:
        coef_pos = coef_pos * b.pos_weight
    if b.weight is not None:
        coef_pos, coef_neg = coef_pos * b.weight, coef_neg * b.weight
    # Only logits reach log p = -inf (an infinite logit); clamped logs are finite.
    if b.from_logits:
        at_neg_inf, at_pos_inf = b.input == -float("inf"), b.input == float("inf")
        pos = times_log(coef_pos, logs.log_p, at_neg_inf, xp=xp)
        neg = times_log(coef_neg, logs.log_not_p, at_pos_inf, xp=xp)
    else:
        pos, neg = coef_pos * logs.log_p, coef_neg * logs.log_not_p
    f_pos = f_neg = None
    infinite = None
    if b.gamma != 0:
        # The focal factors (1-p)^γ and p^γ come from the exact logs: 0 at p = 1 (or 0),
        # not e^(-100γ) from the clamped ones.
        exact = b.from_logits
        log_not_p = logs.log_not_p if exact else log_prob(b.input, complement=True, xp=xp)
        log_p = logs.log_p if exact else log_prob(b.input, xp=xp)
        # from logits the factor's derivative holds p (1 - p): constant where that is 0
        # (probabilities: d/dp of (1 - p)^γ is not 0 at p = 0, and the logs are clamped)
        f_pos = focal_factor(log_not_p, b.gamma, nll=-log_p if exact else None, xp=xp)
        f_neg = focal_factor(log_p, b.gamma, nll=-log_not_p if exact else None, xp=xp)
        if b.from_logits:
            # a logit of -inf: log p = -inf (an infinite loss for a positive target), f_pos = 1
            # and f_pos' = -γ f_pos p = 0, so f_pos' log p is the limit of p log p, 0, not
            # autodiff's 0 · inf = NaN: the factor is a constant there (+inf: f_neg alike)
            f_pos = xp.where(at_neg_inf, stop_gradient(f_pos, xp=xp), f_pos)
            f_neg = xp.where(at_pos_inf, stop_gradient(f_neg, xp=xp), f_neg)
            infinite = (at_neg_inf, at_pos_inf)
    return _Terms(
        logs=logs,
        coef_pos=coef_pos,
        coef_neg=coef_neg,
        pos=pos,
        neg=neg,
        f_pos=f_pos,
        f_neg=f_neg,
        infinite=infinite,
    )


def _elementwise_loss(terms: _Terms) -> Array:
    if terms.f_pos is None or terms.f_neg is None:
        return -(terms.pos + terms.neg)
    return -(terms.f_pos * terms.pos + terms.f_neg * terms.neg)


def _elementwise_grad(terms: _Terms, gamma: float, *, xp: Any) -> Array:
    if terms.f_pos is None or terms.f_neg is None:
        c_p, c_not_p = terms.coef_pos, terms.coef_neg
    else:
        pos, neg = terms.pos, terms.neg
        if terms.infinite is not None:  # γ f log p times p (0 at p = 0): 0, not 0 · inf
            at_neg_inf, at_pos_inf = terms.infinite
            pos = xp.where(at_neg_inf, xp.zeros_like(pos), pos)
            neg = xp.where(at_pos_inf, xp.zeros_like(neg), neg)
        c_p = terms.coef_pos * terms.f_pos + gamma * terms.f_neg * neg
        c_not_p = terms.coef_neg * terms.f_neg + gamma * terms.f_pos * pos
    return terms.logs.neg_chain(c_p, c_not_p, xp=xp)


def _finish(loss: Array, b: _Binary) -> Array:
    """Reduce in the compute dtype and return the input's dtype."""
    xp = b.xp
    out = reduce_loss(loss, b.reduction, xp=xp)
    return astype(out, b.out_dtype, xp=xp)


# ----------------------------------------------------------------------------
# Public function and closed form
# ----------------------------------------------------------------------------


_TORCH_BINARY: list[Any] = []
"""The PyTorch executor's :func:`~crossent._backends._torch.binary`, imported on first use (an
import statement on every call would cost a tenth of a small loss)."""


def _torch_binary() -> Any:
    from crossent._backends._torch import binary

    _TORCH_BINARY.append(binary)
    return binary


if "torch" in sys.modules:  # loaded now, outside any traced call (see crossent._backends)
    _torch_binary()


def binary_cross_entropy(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""Binary cross-entropy of independent two-class problems (multi-label, focal).

    Parameters
    ----------
    input : array
        Probabilities in [0, 1], or logits (any real value) if `from_logits`
        is True. Any shape; every element is its own binary problem.
    target : array
        Floating targets in [0, 1] with the shape of `input`: hard 0/1 labels
        or soft targets.
    from_logits : bool, default False
        Whether `input` holds logits :math:`x` with :math:`p = \sigma(x)`.
    weight : array or float, optional
        Per-element rescaling of the loss, broadcast to `input` (PyTorch's
        `weight`). Must be non-negative; an array must be floating.
    pos_weight : array or float, optional
        Multiplies the positive term (PyTorch's `pos_weight`), broadcast to
        `input`; for ``(N, C)`` multi-label input a shape ``(C,)`` gives one
        weight per label. Unlike PyTorch it also works with probabilities.
    label_smoothing : float, default 0.0
        :math:`\varepsilon \in [0, 1]`; targets become
        :math:`t(1-\varepsilon) + \varepsilon/2` (Keras).
    gamma : float, default 0.0
        Focal focusing parameter :math:`\gamma \ge 0`; 0 is plain
        cross-entropy.
    alpha : float, optional
        Weighs the positive term by :math:`\alpha` and the negative term by
        :math:`1-\alpha` (torchvision / Keras focal loss). None weighs both 1.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides the sum by the number of elements (also with
        `weight`, PyTorch's rule; 0 for an empty input); ``"none"`` returns
        the per-element losses.

    Returns
    -------
    array
        0-d for ``"mean"`` and ``"sum"``, the shape of `input` for ``"none"``;
        the dtype and device of `input`. float16 and bfloat16 are computed in
        float32.

    Raises
    ------
    TypeError
        If `input` or `target` is not floating, or an option has a wrong type.
    ValueError
        If `target`'s shape differs from `input`'s or a weight does not
        broadcast to it; if `target` lies outside [0, 1]; if probability
        `input` lies outside [0, 1] ("pass from_logits=True if these are
        logits"); for negative weights, an unknown `reduction`, ``gamma < 0``
        or `alpha` / `label_smoothing` outside [0, 1]. Value checks obey
        :func:`crossent.set_validation`.

    See Also
    --------
    categorical_cross_entropy : one distribution over C exclusive classes.
    value_and_grad : the loss and its gradient in closed form.

    Notes
    -----
    With :math:`P = w\,\alpha\,p_w\,t` and :math:`N = w\,(1-\alpha)(1-t)`
    (:math:`\alpha` and :math:`1-\alpha` read as 1 when `alpha` is None,
    :math:`t` after smoothing):

    .. math:: \ell = -\bigl[P\,(1-p)^\gamma \log p + N\,p^\gamma \log(1-p)\bigr]

    * Logits: :math:`\log p = \log\sigma(x)` and
      :math:`\log(1-p) = \log\sigma(-x)`, both computed as log-sigmoid, so
      the loss is accurate and finite for every finite logit, and the focal
      factor :math:`(1-p)^\gamma = e^{\gamma\log\sigma(-x)}` has a finite
      gradient for every :math:`\gamma`, also :math:`\gamma < 1` (where
      ``(1 - p_t) ** gamma`` gives NaN gradients at saturated logits).
      An infinite logit is allowed: with a target that agrees the loss is 0.
    * Probabilities: :math:`\log p` and :math:`\log(1-p) = \operatorname{log1p}(-p)`
      are computed exactly and each clamped at −100 (PyTorch's rule), so 0
      and 1 give finite losses. The clamped value has a zero derivative;
      PyTorch's hand-written backward instead uses
      :math:`(p-t)/\max(p(1-p), 10^{-12})`, which agrees everywhere except
      within :math:`10^{-12}` of 0 and 1.
    * Soft targets (and label smoothing) enter linearly: the loss is the
      expected focal loss of a hard label drawn with probability :math:`t`.
      For hard targets without smoothing this is exactly torchvision's
      ``sigmoid_focal_loss`` and Keras' ``BinaryFocalCrossentropy``; those
      put soft targets inside ``p_t`` instead.
    * PyTorch logits without `gamma` (eagerly, on the CPU) take a fast path with
      the same exactness: with :math:`s = \operatorname{log1p}(e^{-|x|})`,
      :math:`\ell = (P+N)\,s + P\operatorname{relu}(-x) + N\operatorname{relu}(x)`
      (one transcendental pass, terms of one sign) and the gradient
      :math:`N\sigma(x) - P\sigma(-x)` in closed form. Below the smallest
      normal number a loss may be flushed to 0 there (PyTorch's ``sigmoid``).
    * A target of 0 against :math:`p = 0` (logit :math:`-\infty`) contributes
      0 (:math:`0 \log 0 = 0`), with no NaN in value or gradient. NaN in the
      input or the target propagates.

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> logits = np.array([[2.0, -1.0, 0.0], [-3.0, 4.0, 1.0]])
    >>> labels = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    >>> print(round(float(ce.binary_cross_entropy(logits, labels, from_logits=True)), 6))
    0.418889
    >>> probs = 1 / (1 + np.exp(-logits))
    >>> print(round(float(ce.binary_cross_entropy(probs, labels)), 6))
    0.418889

    Focal loss with one positive weight per label, kept per element:

    >>> ce.binary_cross_entropy(
    ...     logits, labels, from_logits=True, gamma=2.0, alpha=0.25,
    ...     pos_weight=np.array([1.0, 2.0, 3.0]), reduction="none",
    ... ).round(4).tolist()
    [[0.0005, 0.017, 0.13], [0.0001, 0.0, 0.5264]]
    """
    if is_torch_tensor(input):
        opts = (  # the plain call's options without building their key
            plain_logits_options(from_logits, reduction, label_smoothing, gamma)
            if alpha is None
            else None
        )
        if opts is None:
            opts = make_options(
                from_logits=from_logits, label_smoothing=label_smoothing, gamma=gamma,
                reduction=reduction, alpha=alpha,
            )  # fmt: skip
        if dynamo_tracing() and in_graph() and torch_operands(-1, target, weight, pos_weight):
            return graph_node(  # one opaque node: few guards (crossent._backends._node)
                "binary_cross_entropy", input, target, checked=get_validation(),
                from_logits=from_logits, weight=weight, pos_weight=pos_weight,
                label_smoothing=opts.label_smoothing, gamma=opts.gamma, alpha=opts.alpha,
                reduction=opts.reduction,
            )  # fmt: skip
        torch_binary = _TORCH_BINARY[0] if _TORCH_BINARY else _torch_binary()
        try:
            out = torch_binary(input, target, weight, pos_weight, opts.label_smoothing, opts)
        except RuntimeError:  # PyTorch's device error: crossent's, naming the argument
            check_same_device(input=input, target=target, weight=weight, pos_weight=pos_weight)
            raise
        if out is not None:
            return out
    elif type(input) is np.ndarray and from_logits is False:  # NumPy: the logs vectorized
        opts = make_options(
            from_logits=False, label_smoothing=label_smoothing, gamma=gamma,
            reduction=reduction, alpha=alpha,
        )  # fmt: skip
        lean = _numpy_exec.binary_probabilities(input, target, weight, pos_weight, opts)
        if lean is not None:
            return numpy_array(lean)
    b = _prepare(
        input,
        target,
        from_logits=from_logits,
        weight=weight,
        pos_weight=pos_weight,
        label_smoothing=label_smoothing,
        gamma=gamma,
        alpha=alpha,
        reduction=reduction,
        xp=None,
    )
    return numpy_array(_finish(_elementwise_loss(_terms(b)), b))


def _binary_value_and_grad(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float | None = None,
    reduction: str = "mean",
    xp: Any = None,
) -> tuple[Array, Array]:
    """:func:`binary_cross_entropy` and its gradient with respect to `input`, no autodiff.

    Equals autodiff of the forward pass (the clamp and the focal factors
    included). For ``"none"`` the gradient is that of the sum of the
    per-element losses, i.e. each element's own derivative.
    """
    b = _prepare(
        input,
        target,
        from_logits=from_logits,
        weight=weight,
        pos_weight=pos_weight,
        label_smoothing=label_smoothing,
        gamma=gamma,
        alpha=alpha,
        reduction=reduction,
        xp=xp,
    )
    xp = b.xp
    terms = _terms(b)
    grad = _elementwise_grad(terms, b.gamma, xp=xp)
    if b.reduction == "mean" and size(grad) > 0:
        grad = grad / size(grad)
    return _finish(_elementwise_loss(terms), b), astype(grad, b.out_dtype, xp=xp)
