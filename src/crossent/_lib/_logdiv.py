r"""KL and (generalized) Jensen–Shannon divergences from log-probabilities.

One row formula serves :func:`crossent.info.kl_divergence` and
:func:`crossent.info.js_divergence` with ``from_logits=True`` and the
distillation losses (:func:`crossent.distillation_loss`,
:func:`crossent.fused.linear_distillation_loss`): with the mixture
:math:`M = \beta P + (1-\beta) Q`,

.. math::

    L_\beta(P, Q) = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M),
    \qquad L_0 = \mathrm{KL}(P\|Q), \quad L_1 = \mathrm{KL}(Q\|P),

:math:`L_{1/2}` being the Jensen–Shannon divergence. Each KL is summed over
the non-negative terms of :func:`rel_entr_from_log`, so the result is never
negative in floating point and nearly equal distributions keep their small
divergence accurately (a plain :math:`\sum_k p_k (\log p_k - \log q_k)`
cancels).
"""

from __future__ import annotations

import math
from typing import Any

from crossent._lib._xp import Array, logsumexp

__all__ = ["generalized_jsd_from_log", "log_mixture", "log_softmax", "rel_entr_from_log"]


def log_softmax(z: Array, *, axis: int, xp: Any) -> Array:
    r""":math:`\log p = z - \operatorname{lse}(z)` along `axis` (a row of :math:`-\infty`: NaN)."""
    return z - logsumexp(z, axis=axis, keepdims=True, xp=xp)


def rel_entr_from_log(log_a: Array, log_b: Array, *, xp: Any) -> Array:
    r"""The terms :math:`a \log(a/b) - a + b` from :math:`\log a` and :math:`\log b`.

    Summed over a pair of distributions (:math:`\sum a = \sum b = 1`) they
    give :math:`D(a \,\|\, b)`, and each term is :math:`\ge 0`, so the sum is
    non-negative in floating point too (a plain :math:`\sum a \log(a/b)` is
    not). With :math:`d = \log a - \log b` the term is
    :math:`a\,(d + \operatorname{expm1}(-d))` for :math:`d \ge -1` and
    :math:`a(d - 1) + b` below, where :math:`e^{-d}` could overflow.
    :math:`a = 0` (:math:`\log a = -\infty`) gives :math:`b`, and mass on
    :math:`b = 0` gives :math:`+\infty`; an underflowed :math:`a` or :math:`b`
    with finite logs keeps the value and the gradient finite. NaN propagates.
    """
    a_zero = log_a == -math.inf
    b_zero = log_b == -math.inf
    zero = xp.zeros_like(log_a)
    log_a = xp.where(a_zero, zero, log_a)
    d = log_a - xp.where(a_zero | b_zero, zero, log_b)  # finite unless NaN
    a = xp.exp(log_a)
    low = d < -1.0
    d_hi = xp.where(low, zero, d)
    d_lo = xp.where(low, d, zero - 2.0)
    hi = a * (d_hi + xp.expm1(-d_hi))
    lo = a * (d_lo - 1.0) + xp.exp(log_a - d_lo)
    out = xp.where(b_zero, xp.full_like(hi, math.inf), xp.where(low, lo, hi))
    return xp.where(a_zero, xp.exp(log_b), out)


def log_mixture(log_p: Array, log_q: Array, *, beta: float = 0.5, xp: Any) -> Array:
    r""":math:`\log(\beta p + (1-\beta) q)` from :math:`\log p` and :math:`\log q` (0 < β < 1).

    :math:`\max + \operatorname{log1p}(e^{\min - \max})` of the weighted logs,
    exact for any gap; where both are :math:`-\infty` it is :math:`-\infty`,
    with a finite gradient.
    """
    a = log_p if beta == 0.5 else log_p + math.log(beta)
    b = log_q if beta == 0.5 else log_q + math.log1p(-beta)
    hi = xp.maximum(a, b)
    lo = xp.minimum(a, b)
    both_zero = hi == -math.inf
    zero = xp.zeros_like(hi)
    gap = xp.where(both_zero, zero, lo) - xp.where(both_zero, zero, hi)
    out = hi + xp.log1p(xp.exp(gap))
    return out - math.log(2.0) if beta == 0.5 else out


def generalized_jsd_from_log(
    log_p: Array, log_q: Array, *, beta: float, axis: int, xp: Any, log_m: Array | None = None
) -> Array:
    r""":math:`L_\beta(P, Q)` (the module's formula) summed along `axis`, from log-probabilities.

    ``beta=0`` is :math:`\mathrm{KL}(P\|Q)`, ``beta=1`` :math:`\mathrm{KL}(Q\|P)`,
    ``beta=0.5`` the Jensen–Shannon divergence. `log_m`, if given, is
    :func:`log_mixture` of the pair (a caller that also needs it computes it once).
    """
    if beta == 0.0:
        return xp.sum(rel_entr_from_log(log_p, log_q, xp=xp), axis=axis)
    if beta == 1.0:
        return xp.sum(rel_entr_from_log(log_q, log_p, xp=xp), axis=axis)
    if log_m is None:
        log_m = log_mixture(log_p, log_q, beta=beta, xp=xp)
    kl_p = xp.sum(rel_entr_from_log(log_p, log_m, xp=xp), axis=axis)
    kl_q = xp.sum(rel_entr_from_log(log_q, log_m, xp=xp), axis=axis)
    return beta * kl_p + (1.0 - beta) * kl_q
