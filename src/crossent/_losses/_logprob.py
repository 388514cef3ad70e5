r"""Per-class pieces shared by the categorical loss family.

Every categorical loss here is a sum of per-class terms

.. math:: \ell = \sum_k c_k \, (1 - p_k)^\gamma \, (-\log p_k)

with a coefficient :math:`c_k` (target probability times class weight, after
label smoothing) and the focal factor :math:`(1-p_k)^\gamma`. The functions
below compute those terms and their closed-form derivatives from three kinds
of input, with the class axis last:

``"logits"``
    :math:`\log p_k = z_k - \operatorname{lse}(z)`, never ``log(softmax)``.
``"probs"``
    :math:`\log p_k` computed exactly and clamped at ``-100`` (PyTorch's rule),
    so a probability of 0 gives a finite term.
``"log_probs"``
    the input is :math:`\log p` itself (``nll_loss``), taken as is.

Derivatives (``h`` is the "effective coefficient" of the softmax gradient):

.. math::
    \frac{\partial \ell}{\partial z_j} = H p_j - h_j, \quad
    h_k = c_k f_k \Bigl(1 + \gamma\, p_k \frac{-\log p_k}{1 - p_k}\Bigr), \quad H = \sum_k h_k

for logits, and for probabilities (``m_k`` is 1 where the clamp is inactive)

.. math::
    \frac{\partial \ell}{\partial p_j} = -c_j \Bigl(\frac{f_j m_j}{p_j}
        - \gamma \frac{f_j}{1 - p_j} \log p_j\Bigr).

Every division and every ``0 · inf`` is guarded with the double-``where``
trick so that a term with ``c_k = 0`` is exactly 0 in value and gradient, for
closed forms and for autodiff through these functions alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from crossent._lib._checks import check_floating, check_nonnegative
from crossent._lib._config import dynamo_tracing
from crossent._lib._xp import (
    Array,
    difference,
    differentiated,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    one_hot,
    quiet,
    stop_gradient,
)
from crossent._losses._common import LOG_CLAMP, clamped_log, focal_factor, log1mexp, log_prob

__all__ = [
    "LOG_CLAMP",
    "ClassTerms",
    "SoftcapForm",
    "add_at_index",
    "check_class_weight",
    "class_terms",
    "propagate_nan",
    "softcap_backward",
    "softcap_form",
    "softcap_guarded",
    "softcap_logits",
    "softcap_ratio",
    "softcap_slope",
    "softcap_slope_",
    "softcap_tanh",
    "tanh_exact_slope",
    "term_grad",
    "term_value",
]

"""Lower clamp of ``log p`` for probability inputs (PyTorch's ``binary_cross_entropy`` rule)."""


def check_class_weight(weight: Array | None, num_classes: int, *, xp: Any) -> None:
    """A per-class `weight` must be a non-negative 1-d array of length C."""
    if weight is None:
        return
    if not hasattr(weight, "shape") or tuple(weight.shape) != (num_classes,):
        got = tuple(weight.shape) if hasattr(weight, "shape") else type(weight).__name__
        msg = f"`weight` must be a 1-d array of length C={num_classes} (one per class); got {got}."
        raise ValueError(msg)
    check_floating(weight, name="weight", xp=xp)
    check_nonnegative(weight, name="weight", xp=xp)


@dataclass(frozen=True)
class SoftcapForm:
    r"""How :math:`z = c \tanh(x / c)` is formed in one floating dtype (:func:`softcap_form`).

    The plain :math:`c \tanh(x / c)` loses at most an absolute
    :math:`c \cdot \mathrm{smallest\_normal}` of a logit (the digits of a subnormal
    :math:`x / c`, which XLA and GPU kernels flush to 0), at most :math:`\varepsilon`
    unless :math:`c \cdot \mathrm{smallest\_normal} > \varepsilon` (float32:
    :math:`c > 10^{31}`). Beyond that the cap is `guarded`: :math:`z = x` where
    :math:`|x| <` `below` :math:`= c\sqrt{\varepsilon}` (:math:`\tanh(u) = u` to rounding
    there), else :math:`z = c' \tanh(u)` with :math:`u = (x / s) / c'`, :math:`c = s c'`,
    :math:`s` a power of two that keeps :math:`1 / c'` normal (XLA divides by multiplying
    by the reciprocal, which was flushed to 0 for :math:`c > 8.5 \cdot 10^{37}` in float32);
    with :math:`s \ne 1` it is :math:`z = x \tanh(u) / u`, so that neither :math:`c` (inf
    beyond the dtype's range: NaN from :math:`\infty \cdot 0`) nor autodiff's
    :math:`g \cdot c` is ever formed. Executors take their plain form (no extra pass)
    unless `guarded`."""

    cap: float
    """:math:`c'`, with a normal reciprocal in the dtype (:math:`c` itself unless `scale` is 1)."""
    scale: float
    """:math:`s`: a power of two, 1 unless :math:`1 / c` is subnormal in the dtype."""
    below: float
    r"""Logits of :math:`|x|` below this are their own soft cap: :math:`c\sqrt{\varepsilon}`."""
    guarded: bool
    """Whether the plain :math:`c \tanh(x / c)` may lose a logit's digits (see above)."""


def _softcap_form(cap: float, eps: float, tiny: float, big: float) -> SoftcapForm | None:
    below = cap * math.sqrt(eps)
    if below > big:  # every finite x is below: the cap is the identity to rounding
        return None
    over = math.frexp(cap)[1] - math.frexp(1.0 / tiny)[1] + 1  # c / 2^over < 1 / tiny
    scale = 2.0**over if over > 0 else 1.0
    return SoftcapForm(cap=cap / scale, scale=scale, below=below, guarded=cap * tiny > eps)


def softcap_form(cap: float | None, dtype: Any, *, xp: Any) -> SoftcapForm | None:
    r"""The soft cap `cap` as computed in `dtype`: None without a cap, or where
    :math:`c \tanh(x/c) = x` to rounding for every finite logit of `dtype`
    (:math:`c\sqrt{\varepsilon} >` the dtype's largest value; float32: :math:`c > 10^{42}`):
    there the loss is the loss without cap (``-inf`` stays ``-inf``, NaN stays NaN).

    The one rule every executor (array API, PyTorch, fused chunks, Triton, vocabulary
    parallel) reads, a Python computation (cached per cap and dtype): no pass over the logits."""
    if cap is None:
        return None
    key = (cap, type(dtype), dtype)  # the type first: no == across libraries' dtypes
    if key in _FORMS:
        return _FORMS[key]
    fi = xp.finfo(dtype)
    form = _softcap_form(float(cap), float(fi.eps), float(fi.smallest_normal), float(fi.max))
    if not dynamo_tracing():  # (a traced call computes it: constants to dynamo)
        if len(_FORMS) >= 256:
            _FORMS.clear()
        _FORMS[key] = form
    return form


_FORMS: dict[tuple[float, type, Any], SoftcapForm | None] = {}
"""The forms made, per (cap, dtype): a look-up is 0.1 µs, making one 1.4 µs."""


def softcap_ratio(x: Array, form: SoftcapForm, *, xp: Any) -> Array:
    r""":math:`u = x / c` by the divisions of :class:`SoftcapForm` (each by a number with a normal
    reciprocal; under JAX a barrier keeps XLA from folding the two into one by :math:`c`)."""
    if form.scale == 1.0:
        with quiet(xp, "over"):  # a tiny cap: x / c is +-inf, tanh(x / c) = +-1 (no warning)
            return x / form.cap
    scaled = x / form.scale
    if is_jax_namespace(xp):
        from jax.lax import optimization_barrier

        scaled = optimization_barrier(scaled)
    return scaled / form.cap


def softcap_tanh(x: Array, form: SoftcapForm, *, xp: Any) -> Array:
    r""":math:`\tanh(x / c)` (:func:`softcap_ratio`): the chain rule's :math:`1 - \tanh^2`."""
    return xp.tanh(softcap_ratio(x, form, xp=xp))


def softcap_guarded(x: Array, form: SoftcapForm, *, xp: Any) -> tuple[Array, Array]:
    r"""The guarded :math:`(z, 1 - \tanh^2(x / c))` of :class:`SoftcapForm`: :math:`z = x`
    below ``form.below``, ``-inf`` kept ``-inf``; the second is the slope (exact as ``1 - t *
    t``: :math:`x/c` is tiny for such caps), a constant for autodiff.

    Differentiable by autodiff with the derivative :math:`1 - \tanh^2(x/c)` itself
    (:math:`z = x\,d + (z - x\,d)` with :math:`d = 1 - \tanh^2` and the bracket held
    constant): autodiff through :math:`c \tanh(x / c)` multiplies the upstream gradient by
    :math:`c` and then by :math:`1 / c`, an overflow or a subnormal (flushed to 0 by XLA)
    for such caps. The curvature :math:`-2 t (1 - t^2) / c` this leaves out is below
    :math:`10^{-31}` for every guarded cap (it is a second derivative of 0 to rounding)."""
    x0 = stop_gradient(x, xp=xp)
    t = xp.tanh(softcap_ratio(x0, form, xp=xp))
    zero = xp.zeros_like(x0)
    infinite = xp.isinf(x0)
    edge = xp.where(x0 == -float("inf"), xp.full_like(x0, -float("inf")), zero)
    if form.scale == 1.0:
        value = form.cap * t
    else:  # c beyond 1 / smallest_normal, perhaps beyond the range: c tanh(±inf / c) = ±inf
        value = (form.cap * xp.where(infinite, zero, t)) * form.scale
        edge = xp.where(x0 == float("inf"), xp.full_like(x0, float("inf")), edge)
    slope = 1 - t * t
    w = xp.where(infinite, zero, x) * slope
    z = xp.where(xp.abs(x0) < form.below, x, w + (value - stop_gradient(w, xp=xp)))
    return z + edge, slope


def softcap_logits(x: Array, cap: float | None, *, xp: Any, masked: bool = True) -> Array:
    r"""Gemma-2 soft-capping :math:`z = c \tanh(x / c)`; ``-inf`` stays ``-inf`` (masking): its
    derivative is :math:`1 - \tanh^2(-\infty) = 0`, as in the fused and Triton kernels and
    PyTorch's eager executor (a label on a masked class gets no gradient there).

    ``-inf`` is added to the capped :math:`-c` rather than selected: autodiff then multiplies
    the gradient by that 0 as the closed forms do, so a NaN gradient (a row holding NaN)
    stays NaN there instead of being replaced by 0.

    A huge cap is guarded (:class:`SoftcapForm`: :math:`z = x` where
    :math:`\tanh(x/c) = x/c` to rounding, a cap whose reciprocal is subnormal divided in two
    steps), the identity beyond the dtype's range; others take the plain form. A huge cap
    (1e38 in float32) made :math:`x/c` subnormal, which XLA on CPU flushes to 0 (every logit
    0: log C instead of the loss), and a cap above float32's range became
    :math:`\infty \cdot 0` = NaN.

    Where autodiff may differentiate `x` (:func:`~crossent._lib._xp.differentiated`) the
    plain form's tanh is :func:`tanh_exact_slope` (the same values, derivatives exact where
    the tanh saturates). `masked=False` says that `x` holds no ``-inf`` (the caller has
    looked): no ``where`` for it."""
    form = softcap_form(cap, x.dtype, xp=xp)
    if form is None:
        return x
    if form.guarded:  # (where a row holding NaN gives a 0, not NaN, gradient at an inf logit)
        return softcap_guarded(x, form, xp=xp)[0]
    # the plain form, as every executor's: x / c is subnormal only where |x| < c ·
    # smallest_normal <= eps (else the form is guarded), and its second derivative is exact
    # (a branch z = x below c sqrt(eps) made it 0: float32 Hessians 3.5e-4 off)
    with quiet(xp, "over"):  # a tiny cap: x / c is +-inf, tanh(x / c) = +-1 (no warning)
        u = x / form.cap
        t = tanh_exact_slope(u, xp=xp) if differentiated(x, xp=xp) else xp.tanh(u)
    capped = form.cap * t
    if not masked:
        return capped
    return capped + xp.where(x == -float("inf"), xp.full_like(x, -float("inf")), xp.zeros_like(x))


#: From this :math:`|u|` on, :func:`tanh_exact_slope` differentiates :math:`(1 - e)/(1 + e)`.
_SATURATING = 0.5


def tanh_exact_slope(u: Array, *, xp: Any) -> Array:
    r""":math:`\tanh u`, the same values as ``tanh``, whose autodiff derivatives of every order
    stay exact where it saturates.

    Autodiff through ``tanh`` forms the slope as :math:`1 - t^2`, which cancels where
    :math:`|t|` is near 1: its rounding times :math:`1/(1 - t^2)`, 6e-4 relative at
    :math:`|u| = 5` in float32 (the gradients of a soft cap's saturated logits under
    ``create_graph``, ``torch.func``, ``torch.compile`` and ``jax.grad`` were 2.5e-5 and
    6.6e-5 of their norm off in float32, where the closed forms are at 1e-7). From
    :math:`|u| = 1/2` on, the derivatives are those of
    :math:`\pm(1 - e)/(1 + e)` (the sign of :math:`u`), :math:`e = e^{-2|u|} \le e^{-1}`,
    whose autodiff slope is the sum of two positive terms
    :math:`2e/(1 + e) + 2e(1 - e)/(1 + e)^2 = 4e/(1+e)^2` (and whose curvature cancels
    only mildly, :math:`e \le e^{-1}`); it enters as :math:`r - \operatorname{stop}(r)`,
    0 in value, beside the held tanh. Below :math:`1/2`, ``tanh``'s own (:math:`t^2 < 0.22`:
    no cancellation, and the slope 1 at 0, where :math:`|u|` has none)."""
    t = xp.tanh(u)
    a = xp.abs(u)
    e = xp.exp(-2 * a)
    q = (1 - e) / (1 + e)
    r = xp.where(u < 0, -q, q)  # (not sign(u) * q: array-api-compat's sign masks NaN by index)
    far = stop_gradient(a, xp=xp) >= _SATURATING
    return xp.where(far, stop_gradient(t, xp=xp) + (r - stop_gradient(r, xp=xp)), t)


def softcap_slope(x: Array, form: SoftcapForm, *, xp: Any) -> Array:
    r"""The soft cap's slope :math:`dz/dx = 1 - \tanh^2(u)`, :math:`u = x/c`; 0 at ±inf.

    As :math:`4e/(1 + e)^2` with :math:`e = e^{-2|u|} \le 1`, exact to a few ulps: ``1 - t *
    t`` cancels where the tanh is near ±1, its rounding times :math:`1/(1 - t^2)` (6e-4
    relative at :math:`|u| = 5` in float32; autodiff through ``tanh`` forms it so, not through
    :func:`tanh_exact_slope`). The
    in-place PyTorch executors form the same as :math:`4s(1 - s)`, :math:`s = \sigma(-2|u|)
    = e/(1 + e)` (:func:`softcap_slope_`), the Triton kernel from its tanh's own :math:`e`.
    A guarded form (a huge cap) has :math:`u` tiny, where ``1 - t * t`` is exact."""
    if form.guarded:
        t = softcap_tanh(x, form, xp=xp)
        return 1 - t * t
    with quiet(xp, "over"):  # a tiny cap: -2 |u| is -inf, e = 0 (no warning)
        e = xp.exp(-2 * xp.abs(softcap_ratio(x, form, xp=xp)))
    return 4 * e / ((1 + e) * (1 + e))


def softcap_slope_(u: Any, *, out: Any = None) -> Any:
    r""":func:`softcap_slope` of PyTorch's :math:`u = x/c` in place (or into `out`):
    :math:`4s(1 - s)` with :math:`s = \sigma(-2|u|)`, four vectorized passes (``cosh``, not
    vectorized on the CPU, took 6 times an ``exp``)."""
    import torch

    s = torch.abs(u, out=u if out is None else out).mul_(-2.0).sigmoid_()
    return s.addcmul_(s, s, value=-1.0).mul_(4.0)


def softcap_backward(x: Array, cap: float | None, grad_z: Array, *, xp: Any) -> Array:
    r"""Chain rule through :func:`softcap_logits`: times :func:`softcap_slope` (0 at -inf)."""
    form = softcap_form(cap, x.dtype, xp=xp)
    if form is None:
        return grad_z
    return grad_z * softcap_slope(x, form, xp=xp)


@dataclass
class ClassTerms:
    """Per-class quantities of one kind of input (any shape, class axis last)."""

    nlp: Array
    """``-log p`` (clamped for probabilities)."""
    p: Array | None = None
    """``p`` (``exp(log p)`` for logits, the input for probabilities); only when needed."""
    log1m_p: Array | None = None
    """``log(1 - p)``; only with focal loss."""
    mask: Array | None = None
    """Probabilities: True where the -100 clamp is inactive."""


def class_terms(x: Array, lse: Array | None, *, kind: str, gamma: float, xp: Any) -> ClassTerms:
    """The :class:`ClassTerms` of `x` (`lse` broadcast against `x` for logits)."""
    if kind == "logits":
        log_p = difference(x, lse, xp=xp)  # a non-finite row max: NaN, without a warning
        if gamma == 0:
            return ClassTerms(nlp=-log_p)
        return ClassTerms(nlp=-log_p, p=xp.exp(log_p), log1m_p=log1mexp(log_p, xp=xp))
    if kind == "probs":
        log_p, at_clamp = clamped_log(x, xp=xp)
        mask = ~at_clamp
        log1m_p = log_prob(x, complement=True, xp=xp) if gamma != 0 else None
        return ClassTerms(nlp=-log_p, p=x, log1m_p=log1m_p, mask=mask)
    return ClassTerms(nlp=-x)


def propagate_nan(row: Array, x: Array, *, kind: str, xp: Any) -> Array:
    """`row` (one loss per row), NaN where the row of probabilities `x` holds a NaN.

    A probability row's loss reads only the classes with a positive
    coefficient, so a NaN elsewhere in the row would vanish; logits reach
    every class through ``lse`` and need nothing. Class axis last.
    """
    if kind != "probs":
        return row
    has_nan = xp.any(xp.isnan(x), axis=-1)
    return xp.where(has_nan, xp.full_like(row, float("nan")), row)


def _focal(terms: ClassTerms, gamma: float, *, nll: Array | None = None, xp: Any) -> Array | None:
    if gamma == 0:
        return None
    return focal_factor(terms.log1m_p, gamma, nll=nll, xp=xp)


def term_value(c: Array, terms: ClassTerms, gamma: float, *, xp: Any) -> Array:
    r"""The per-class loss :math:`c_k (1-p_k)^\gamma (-\log p_k)`, exactly 0 where ``c_k = 0``.

    Only ``0 · ±inf`` (a masked class with target 0; an infinite probability in a row under
    ``ignore_index``, which the checks do not read) is replaced by 0; ``0 · NaN`` stays NaN,
    so NaN logits propagate also through a zero class weight.
    """
    nlp = xp.where(
        (c == 0) & (xp.abs(terms.nlp) == float("inf")), xp.zeros_like(terms.nlp), terms.nlp
    )
    # logits and log-probabilities: the factor's derivative holds p (probabilities: not)
    f = _focal(terms, gamma, nll=terms.nlp if terms.mask is None else None, xp=xp)
    return c * nlp if f is None else c * f * nlp


def term_grad(c: Array, terms: ClassTerms, gamma: float, *, kind: str, xp: Any) -> Array:
    """The closed-form derivative piece of :func:`term_value` (see the module notes).

    For ``"logits"`` it is the effective coefficient ``h`` (the full gradient
    also needs ``H p``); for ``"probs"`` and ``"log_probs"`` it is the
    derivative with respect to the input itself. Without focal loss the
    result may be `c` itself (or ``-c``), to be broadcast by the caller.
    """
    if kind == "log_probs":
        return -c
    f = _focal(terms, gamma, xp=xp)
    if kind == "logits":
        if f is None:
            return c
        p = terms.p
        one_m = xp.exp(terms.log1m_p)
        certain = one_m == 0
        masked = p == 0
        ratio = xp.where(masked, xp.zeros_like(terms.nlp), terms.nlp) / xp.where(
            certain, xp.ones_like(one_m), one_m
        )
        q = xp.where(certain | masked, xp.zeros_like(ratio), p * ratio)
        return c * f * (1 + gamma * q)
    p = terms.p
    mask = terms.mask
    # c / p, not c · (1/p): 1/p overflows for a subnormal p (float32 1e-40), and 0 · inf is
    # NaN where the coefficient is 0; the clamped classes get 0 (c · 0: a NaN c stays NaN)
    p_safe = xp.where(mask, p, xp.ones_like(p))
    clamped = -c * xp.zeros_like(p)
    with quiet(xp, "over"):  # c / p beyond the dtype (a subnormal p): -inf, as it is
        if f is None:
            return xp.where(mask, -c / p_safe, clamped)
        one_m = xp.exp(terms.log1m_p)
        certain = f == 0
        focal_part = xp.where(
            certain,
            xp.zeros_like(f),
            f * terms.nlp / xp.where(certain, xp.ones_like(one_m), one_m),
        )
        return xp.where(mask, -(c * f) / p_safe, clamped) - c * (gamma * focal_part)


def add_at_index(g: Array, index: Array, values: Array, *, xp: Any) -> Array:
    """``g[..., index] += values`` row by row (class axis last); in place on PyTorch.

    `g` must be a fresh array owned by the caller (PyTorch updates it in place).
    """
    if is_torch_namespace(xp):
        return g.scatter_add_(-1, xp.expand_dims(index, axis=-1), xp.expand_dims(values, axis=-1))
    num = g.shape[-1]
    if is_numpy_namespace(xp) or is_jax_namespace(xp):  # one entry per row: no dense one-hot
        rows = xp.reshape(g, (-1, num))
        at = (xp.arange(rows.shape[0]), xp.reshape(index, (-1,)))
        flat = xp.reshape(values, (-1,))
        if is_numpy_namespace(xp):
            rows[at] += flat  # in place on the caller's fresh array (a view when contiguous)
            return xp.reshape(rows, g.shape)
        return xp.reshape(rows.at[at].add(flat), g.shape)
    # where, not a product with a one-hot: 0 · NaN (or 0 · inf) would reach every class
    hot = one_hot(index, num, dtype=xp.bool, xp=xp)
    return g + xp.where(hot, xp.expand_dims(values, axis=-1), xp.zeros_like(g))
