r"""The sparse cross-entropy row formula, once: statistics, their combine, the loss, the gradient.

Every executor of the sparse loss from logits — the array-API formula, the
PyTorch executor's fallback, and (once they adopt it) the chunked fused loss,
the Triton kernels and the vocabulary-parallel loss — reduces a row of logits
(or a slice of it: a chunk of classes, a vocabulary tile, a rank's shard) to
:class:`RowStats`, merges slices with :func:`combine`, and reads the loss and
the gradient coefficients off the merged statistics with :func:`row_loss` and
:func:`grad_coefficients`. None of them restates the formula.

Derivation
----------
For one row with (soft-capped) logits :math:`z`, label :math:`y`, class
weights :math:`w` (all 1 without weights, :math:`W = \sum_k w_k`), label
smoothing :math:`\varepsilon`, z-loss :math:`\lambda` and
:math:`p = \operatorname{softmax}(z)`, PyTorch's composition of smoothing and
weights plus PaLM's z-loss is

.. math::
    \ell = (1-\varepsilon)\, w_y (L - z_y)
         + \frac{\varepsilon}{C} \sum_k w_k (L - z_k) + \lambda L^2
         = \Bigl((1-\varepsilon) w_y + \frac{\varepsilon}{C} W\Bigr) L
           - (1-\varepsilon) w_y z_y - \frac{\varepsilon}{C} \sum_k w_k z_k + \lambda L^2,

with :math:`L = \operatorname{lse}(z) = m + \log s`, :math:`m = \max_k z_k`,
:math:`s = \sum_k e^{z_k - m}`. So the loss needs only the statistics

.. math:: (m,\ s,\ \textstyle\sum_k w_k (m - z_k),\ \sum_k w_k,\ z_y),

and each of them merges over any split of the classes into slices:
:math:`m = \max(m_a, m_b)`, :math:`s = s_a e^{m_a - m} + s_b e^{m_b - m}`,
:math:`\sum w (m - z) = \sum_a w (m_a - z) + (m - m_a) \sum_a w + (\ldots)_b`,
the weight sums add, and :math:`z_y` is found in exactly one slice (the
others hold 0). The loss is read as
:math:`\ell = (1-\varepsilon) w_y \bigl((m - z_y) + \log s\bigr)
+ \frac{\varepsilon}{C}\bigl(\sum_k w_k (m - z_k) + W \log s\bigr) + \lambda L^2`,
so the large parts of the logits cancel before anything is rounded at their
magnitude (float32 logits [1e4, 1e4] give log 2 to the last bit).
:func:`combine` is associative (and commutative), so chunks, tiles and ranks
merge alike, in any order and grouping.

Since :math:`\partial L / \partial z_k = p_k`, the gradient is

.. math::
    \frac{\partial \ell}{\partial z_k} = a\, p_k - b\, [k = y] - e\, w_k, \qquad
    a = (1-\varepsilon) w_y + \frac{\varepsilon}{C} W + 2\lambda L,\quad
    b = (1-\varepsilon) w_y,\quad e = \frac{\varepsilon}{C}.

With the focal factor on the target term and no smoothing,
:math:`\ell = w_y f (L - z_y) + \lambda L^2`, :math:`f = (1-p_y)^\gamma`, the
same form holds with :math:`b = w_y f \bigl(1 + \gamma\, p_y (L - z_y)/(1-p_y)\bigr)`
(0 where :math:`p_y = 1`), :math:`a = b + 2\lambda L`, :math:`e = 0`. (Focal
loss *with* smoothing puts a factor :math:`(1-p_k)^\gamma` on every class term,
which no fixed set of statistics carries; that case is computed class by class
in :mod:`._logprob`.) Softcap enters by the chain rule
:math:`\partial z/\partial x = 1 - \tanh^2(x/c)`, applied by the executor.
A row whose label is ignored has loss 0 and :math:`a = b = e = 0`; the
executor multiplies :math:`a, b, e` by the upstream gradient and the mean's
:math:`1/\sum w_y`.

An executor therefore needs: a pass producing :class:`RowStats` for its slice
(max, sum of exponentials, weighted sum, the target logit if the label falls
in the slice), the combine (a loop, a tree or an all-reduce), and a second
pass writing :math:`a\,e^{z_k - L} - b[k=y] - e\,w_k` (times the softcap
derivative) — or the product of that with the hidden states, for fused losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crossent._lib._xp import Array, stop_gradient, take_along_axis
from crossent._losses._options import CEOptions

__all__ = [
    "RowStats",
    "applies",
    "combine",
    "grad_coefficients",
    "log_s",
    "lse",
    "row_loss",
    "row_stats",
]


@dataclass(frozen=True)
class RowStats:
    """The statistics of a row (or of a slice of its classes); every field has one value per row."""

    m: Array
    """Running maximum of the logits seen (``-inf`` for none)."""
    s: Array
    r"""Sum of :math:`e^{z_k - m}` over the logits seen."""
    wd: Array
    r""":math:`\sum_k w_k (m - z_k)` over the logits seen (0 where :math:`w_k = 0`): the
    weighted sum of the logits measured from the row max, so that large logits lose nothing."""
    wsum: Array | float
    r""":math:`\sum_k w_k` over the classes seen (their count without weights)."""
    z_y: Array
    """The target logit if the label fell in this slice, else 0."""
    finite: bool = False
    """Whether every row's ``m`` is known to be finite: an executor that checked it
    (one test per call) saves the guards for ``-inf`` / ``+inf`` / NaN maxima."""


def applies(opts: CEOptions) -> bool:
    """Whether the row statistics carry this loss (logits; focal only without smoothing)."""
    return opts.kind == "logits" and (opts.gamma == 0 or opts.label_smoothing == 0)


def row_stats(
    z: Array,
    label: Array,
    weight: Array | None,
    *,
    offset: int = 0,
    with_wz: bool = True,
    xp: Any,
) -> RowStats:
    """:class:`RowStats` of logits `z` (class axis last) holding classes ``offset … offset + C'``.

    `label` is the (non-ignored, in-range) label of each row; `weight` the
    slice of the class weights; `with_wz` False skips the weighted sum (no
    smoothing needs it).
    """
    num = z.shape[-1]
    m = stop_gradient(xp.max(z, axis=-1), xp=xp)  # the shift cancels in L = m + log s
    finite = xp.isfinite(m)
    m_safe = xp.where(finite, m, xp.zeros_like(m))
    s = xp.sum(xp.exp(z - xp.expand_dims(m_safe, axis=-1)), axis=-1)
    if with_wz:
        d = xp.expand_dims(m_safe, axis=-1) - z
        if weight is None:
            wd = xp.sum(d, axis=-1)
            wsum: Array | float = float(num)
        else:
            wd = xp.sum(xp.where(weight == 0, xp.zeros_like(d), weight * d), axis=-1)
            wsum = xp.sum(weight)
    else:
        wd, wsum = xp.zeros_like(m), 0.0
    local = label - offset
    inside = (local >= 0) & (local < num)
    idx = xp.where(inside, local, xp.zeros_like(local))
    z_y = xp.squeeze(take_along_axis(z, xp.expand_dims(idx, axis=-1), axis=-1, xp=xp), axis=-1)
    z_y = xp.where(inside, z_y, xp.zeros_like(z_y))
    return RowStats(m=m, s=s, wd=wd, wsum=wsum, z_y=z_y)


def combine(a: RowStats, b: RowStats, *, xp: Any) -> RowStats:
    r"""The statistics of the union of two disjoint slices (associative, commutative).

    :math:`m = \max(m_a, m_b)`, :math:`s = s_a e^{m_a - m} + s_b e^{m_b - m}`
    (a slice with :math:`m = -\infty` contributes 0), the sums add.
    """
    m = xp.maximum(a.m, b.m)
    finite = xp.isfinite(m)
    m_safe = xp.where(finite, m, xp.zeros_like(m))

    def rescale(st: RowStats) -> Array:
        empty = st.m == -float("inf")
        shift = xp.where(empty, xp.zeros_like(m_safe), st.m - m_safe)
        return xp.where(empty, xp.zeros_like(st.s), st.s * xp.exp(shift))

    s = xp.where(finite, rescale(a) + rescale(b), a.s + b.s)

    def moved(st: RowStats) -> Array:  # Σ w (m − z) measured from the merged max
        m_st = xp.where(xp.isfinite(st.m), st.m, xp.zeros_like(st.m))
        return st.wd + (m_safe - m_st) * st.wsum

    wd = moved(a) + moved(b)
    finite_both = a.finite and b.finite
    return RowStats(m=m, s=s, wd=wd, wsum=a.wsum + b.wsum, z_y=a.z_y + b.z_y, finite=finite_both)


def _log_s(stats: RowStats, finite: Array, *, xp: Any) -> Array:
    """:math:`\\log s` where the max is finite, 0 elsewhere (an all ``-inf`` row has
    :math:`s = 0`: no log of 0, so NumPy warns about nothing)."""
    return xp.log(xp.where(finite, stats.s, xp.ones_like(stats.s)))


def lse(stats: RowStats, *, xp: Any) -> Array:
    """log-sum-exp of the row, :math:`m + \\log s` (the non-finite maximum where there is one)."""
    if stats.finite:
        return stats.m + xp.log(stats.s)
    finite = xp.isfinite(stats.m)
    m_safe = xp.where(finite, stats.m, xp.zeros_like(stats.m))
    return xp.where(finite, m_safe + _log_s(stats, finite, xp=xp), stats.m)


def log_s(stats: RowStats, big_l: Array, *, xp: Any) -> Array:
    r""":math:`L - m = \log s` (:math:`L` itself where the max is not finite)."""
    if stats.finite:
        return xp.log(stats.s)
    finite = xp.isfinite(stats.m)
    return xp.where(finite, _log_s(stats, finite, xp=xp), big_l)


def _nll_target(stats: RowStats, big_l: Array, *, xp: Any) -> Array:
    r""":math:`-\log p_y = (m - z_y) + \log s`: the large parts cancel exactly, first.

    A row whose max is not finite gives :math:`L - z_y`: NaN for an all ``-inf``
    row (:math:`-\infty - (-\infty)`, formed without a warning), :math:`+\infty`
    for a finite target under a :math:`+\infty` logit.
    """
    if stats.finite:
        return (stats.m - stats.z_y) + xp.log(stats.s)
    finite = xp.isfinite(stats.m)
    m_safe = xp.where(finite, stats.m, xp.zeros_like(stats.m))
    same_inf = (stats.z_y == big_l) & ~finite  # inf - inf: NaN
    other = big_l - xp.where(same_inf, xp.zeros_like(stats.z_y), stats.z_y)
    other = xp.where(same_inf, xp.full_like(other, float("nan")), other)
    return xp.where(finite, (m_safe - stats.z_y) + _log_s(stats, finite, xp=xp), other)


def _focal(nll_y: Array, gamma: float, *, xp: Any) -> tuple[Array, Array]:
    r"""(f, q) from :math:`-\log p_y`: :math:`(1-p_y)^\gamma` and :math:`p_y (-\log p_y)/(1-p_y)`.

    Where :math:`p_y = 1` exactly, :math:`f = 0` and :math:`q` is 0 (the term's
    gradient limit for every :math:`\gamma > 0`).
    """
    from crossent._losses._common import focal_factor, log1mexp

    log1m = log1mexp(-nll_y, xp=xp)
    f = focal_factor(log1m, gamma, xp=xp)
    one_m = xp.exp(log1m)
    certain = one_m == 0
    q = xp.where(
        certain,
        xp.zeros_like(nll_y),
        xp.exp(-nll_y) * nll_y / xp.where(certain, xp.ones_like(one_m), one_m),
    )
    return f, q


def row_loss(
    stats: RowStats,
    w_y: Array,
    total_weight: Array | float,
    num_classes: int,
    opts: CEOptions,
    *,
    xp: Any,
) -> Array:
    r"""Per-row loss from the merged statistics (the module's formula for :math:`\ell`).

    `w_y` is the target's weight (1 without weights); `total_weight` is
    :math:`W = \sum_k w_k` (C without weights). Ignored rows are the caller's
    to mask (their statistics hold no label).
    """
    big_l = lse(stats, xp=xp)
    eps, gamma = opts.label_smoothing, opts.gamma
    nll_y = _nll_target(stats, big_l, xp=xp)
    if gamma != 0:
        f, _ = _focal(nll_y, gamma, xp=xp)
        row = w_y * f * nll_y
    else:
        row = (1 - eps) * w_y * nll_y if eps != 1 else xp.zeros_like(nll_y)
    if eps != 0:
        row = row + (eps / num_classes) * (stats.wd + total_weight * log_s(stats, big_l, xp=xp))
    if opts.z_loss != 0:
        row = row + opts.z_loss * (big_l * big_l)
    return row


def grad_coefficients(
    stats: RowStats,
    w_y: Array,
    total_weight: Array | float,
    num_classes: int,
    opts: CEOptions,
    *,
    xp: Any,
) -> tuple[Array, Array, float]:
    r"""(a, b, e): :math:`\partial\ell/\partial z_k = a\,p_k - b\,[k=y] - e\,w_k` (e is a scalar).

    Ignored rows must be zeroed by the caller's scale (their `w_y` is 0 but
    the smoothing and z-loss parts do not depend on it).
    """
    big_l = lse(stats, xp=xp)
    eps, gamma = opts.label_smoothing, opts.gamma
    if gamma != 0:
        nll_y = _nll_target(stats, big_l, xp=xp)
        f, q = _focal(nll_y, gamma, xp=xp)
        b = w_y * f * (1 + gamma * q)
        a = b
    else:
        b = (1 - eps) * w_y
        a = b + (eps / num_classes) * total_weight if eps != 0 else b
    if opts.z_loss != 0:
        a = a + (2 * opts.z_loss) * big_l
    return a, b, eps / num_classes
