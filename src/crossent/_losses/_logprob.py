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
from crossent._lib._xp import (
    Array,
    difference,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    one_hot,
)
from crossent._losses._common import LOG_CLAMP, clamped_log, focal_factor, log1mexp, log_prob

__all__ = [
    "LOG_CLAMP",
    "ClassTerms",
    "add_at_index",
    "check_class_weight",
    "class_terms",
    "propagate_nan",
    "softcap_backward",
    "softcap_logits",
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


def softcap_logits(x: Array, cap: float | None, *, xp: Any) -> Array:
    r"""Gemma-2 soft-capping :math:`z = c \tanh(x / c)`; ``-inf`` stays ``-inf`` (masking): its
    derivative is :math:`1 - \tanh^2(-\infty) = 0`, as in the fused and Triton kernels and
    PyTorch's eager executor (a label on a masked class gets no gradient there).

    ``-inf`` is added to the capped :math:`-c` rather than selected: autodiff then multiplies
    the gradient by that 0 as the closed forms do, so a NaN gradient (a row holding NaN)
    stays NaN there instead of being replaced by 0."""
    if cap is None:
        return x
    u = x / cap
    # where tanh(u) = u to rounding, z = x (1 - u²/3), tanh's leading terms: a huge cap (1e38
    # in float32) makes u subnormal, which XLA on CPU flushes to 0 (every logit 0: log C
    # instead of the loss). The u²/3 term is below rounding in the value but carries the
    # second derivative, -2x/c² (x alone made it 0: float32 Hessians 3.5e-4 off). u is
    # zeroed outside that range, so that no overflowing u² meets where's zero gradient (NaN).
    small = xp.abs(u) < math.sqrt(xp.finfo(x.dtype).eps)
    u_small = xp.where(small, u, xp.zeros_like(u))
    capped = xp.where(small, x * (1 - u_small * u_small / 3), cap * xp.tanh(u))
    return capped + xp.where(x == -float("inf"), xp.full_like(x, -float("inf")), xp.zeros_like(x))


def softcap_backward(x: Array, cap: float | None, grad_z: Array, *, xp: Any) -> Array:
    r"""Chain rule through :func:`softcap_logits`: :math:`dz/dx = 1 - \tanh^2(x/c)`, 0 at -inf."""
    if cap is None:
        return grad_z
    t = xp.tanh(x / cap)
    return grad_z * (1 - t * t)


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


def _focal(terms: ClassTerms, gamma: float, *, xp: Any) -> Array | None:
    if gamma == 0:
        return None
    return focal_factor(terms.log1m_p, gamma, xp=xp)


def term_value(c: Array, terms: ClassTerms, gamma: float, *, xp: Any) -> Array:
    r"""The per-class loss :math:`c_k (1-p_k)^\gamma (-\log p_k)`, exactly 0 where ``c_k = 0``.

    Only ``0 · inf`` (a masked class with target 0) is replaced by 0; ``0 · NaN``
    stays NaN, so NaN logits propagate also through a zero class weight.
    """
    nlp = xp.where((c == 0) & (terms.nlp == float("inf")), xp.zeros_like(terms.nlp), terms.nlp)
    f = _focal(terms, gamma, xp=xp)
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
    inv_p = xp.where(mask, 1 / xp.where(mask, p, xp.ones_like(p)), xp.zeros_like(p))
    if f is None:
        return -c * inv_p
    one_m = xp.exp(terms.log1m_p)
    certain = f == 0
    focal_part = xp.where(
        certain, xp.zeros_like(f), f * terms.nlp / xp.where(certain, xp.ones_like(one_m), one_m)
    )
    return -c * (f * inv_p + gamma * focal_part)


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
    return g + one_hot(index, g.shape[-1], dtype=g.dtype, xp=xp) * xp.expand_dims(values, axis=-1)
