r"""The sparse cross-entropy row formula, once: statistics, their combine, the loss, the gradient.

Every executor of the sparse loss from logits — the array-API formula, the
PyTorch executor's fallback, the chunked fused loss
(:mod:`crossent.fused._chunked`), its Triton kernels and the vocabulary-parallel
losses — reduces a row of logits (or a slice of it: a chunk of classes, a
vocabulary tile, a rank's shard) to :class:`RowStats`, merges slices with
:func:`combine` (ranks with :func:`all_reduce`, the same merge as two
collectives), and reads the loss and the gradient coefficients off the merged
statistics with :func:`row_loss` and :func:`grad_coefficients` /
:func:`coefficients` (the latter written with operators only, so that the
Triton gradient kernel compiles the very same function). None of them restates
the formula.

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
which no fixed set of statistics carries: :func:`loss_and_coefficients` then takes
the class sums :math:`\sum_k w_k f_k (-\log p_k)` and :math:`\sum_k w_k f_k (1 + \gamma q_k)`
of :func:`focal_terms` from an executor that has the log-probabilities, PyTorch's
eager one; the generic path computes it class by class in :mod:`._logprob`.)
The loss and the coefficients are read off per-row terms — :math:`L`,
:math:`-\log p_y` and the smoothing sums — by :func:`loss_and_coefficients`:
:func:`row_loss` and :func:`grad_coefficients` make those terms from
:class:`RowStats`, PyTorch's eager executor from ``log_softmax``. Softcap enters by the chain rule
:math:`\partial z/\partial x = 1 - \tanh^2(x/c)`, applied by the executor.
A row whose label is ignored has loss 0 and :math:`a = b = e = 0`; the
executor multiplies :math:`a, b, e` by the upstream gradient and the mean's
:math:`1/\sum w_y`.

An executor therefore needs: a pass producing :class:`RowStats` for its slice
(max, sum of exponentials, weighted sum, the target logit if the label falls
in the slice, and its weight), the combine (a loop, a tree or an all-reduce), and a second
pass writing :math:`a\,e^{z_k - L} - b[k=y] - e\,w_k` (times the softcap
derivative) — or the product of that with the hidden states, for fused losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crossent._lib._xp import (
    Array,
    difference,
    is_torch_namespace,
    isfinite,
    nan_shift,
    number_for,
    quiet,
    stop_gradient,
    take_along_axis,
)
from crossent._lib._xp import device as _device
from crossent._losses._common import focal_factor
from crossent._losses._options import CEOptions

__all__ = [
    "RowStats",
    "all_reduce",
    "applies",
    "coefficients",
    "combine",
    "focal_terms",
    "grad_coefficients",
    "log_s",
    "log_terms",
    "loss_and_coefficients",
    "lse",
    "rebase",
    "row_loss",
    "row_stats",
    "stand_in_ignored",
]


@dataclass(frozen=True)
class RowStats:
    """The statistics of a row (or of a slice of its classes); every field has one value per row."""

    m: Array
    """Running maximum of the logits seen (``-inf`` for none)."""
    s: Array
    r"""Sum of :math:`e^{z_k - m}` over the logits seen."""
    wd: Array
    r""":math:`\sum_k w_k (m - z_k)` over the logits seen (a masked class's
    :math:`m - z_k = \infty` under :math:`w_k = 0` adds 0): the
    weighted sum of the logits measured from the row max, so that large logits lose nothing."""
    wsum: Array | float
    r""":math:`\sum_k w_k` over the classes seen (their count without weights)."""
    z_y: Array
    """The target logit if the label fell in this slice, else 0."""
    w_y: Array | None = None
    """The target's class weight if the label fell in this slice, else 0; None without
    class weights. (Executors that see the whole weight vector read it themselves; a
    rank that holds only its slice of the weights gets it from the owner.)"""
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
    whole: bool = False,
    counted: Array | None = None,
    xp: Any,
) -> RowStats:
    """:class:`RowStats` of logits `z` (class axis last) holding classes ``offset … offset + C'``.

    `label` is the (non-ignored, in-range) label of each row; `weight` the
    slice of the class weights; `with_wz` False skips the weighted sum (no
    smoothing needs it). A label outside the slice reads a target logit and
    weight of 0 (another slice holds it), unless `whole` (`z` holds every
    class): then every label is gathered as given, so that the library's own
    bound check raises for a bad one where crossent's check does not run
    (``torch.compile``, ``torch.export``, ``torch.func``).

    The logits are shifted by their row max, which cancels in every value; for autodiff
    a row without a finite max is shifted by NaN (:func:`~crossent._lib._xp.nan_shift`),
    so that its gradient is NaN throughout, except a row of ``-inf`` only that is not
    `counted` (an ignored row; None: every row counts) or a slice (not `whole`), whose
    gradient is 0.
    """
    num = z.shape[-1]
    m = stop_gradient(xp.max(z, axis=-1), xp=xp)  # the shift cancels in L = m + log s
    zero: Array | bool = True if not whole else False if counted is None else ~counted
    m_col = xp.expand_dims(nan_shift(m, zero=zero, xp=xp), axis=-1)
    s = xp.sum(xp.exp(difference(z, m_col, xp=xp)), axis=-1)
    if with_wz:
        d = difference(m_col, z, xp=xp)
        if weight is None:
            wd = xp.sum(d, axis=-1)
            wsum: Array | float = float(num)
        else:
            # 0 where a masked class (m - z_k = inf) has w_k = 0, before the product (not 0 *
            # inf), and where its row is not `counted` (ignored, the loss masked: its inf
            # times the zero that reaches it made the weights' gradient NaN). Only there: a
            # zero weight of a finite term keeps its derivative m - z_k (dropped at every
            # w_k = 0, the weights' gradient there was 0, 82 % of it missing)
            drop = d == float("inf")
            if counted is None:
                drop = drop & (weight == 0)
            else:
                drop = drop & ((weight == 0) | ~xp.expand_dims(counted, axis=-1))
            wd = xp.sum(weight * xp.where(drop, xp.zeros_like(d), d), axis=-1)
            wsum = xp.sum(weight)
    else:
        wd, wsum = xp.zeros_like(m), 0.0
    local = label - offset
    inside = None if whole else (local >= 0) & (local < num)
    idx = local if inside is None else xp.where(inside, local, xp.zeros_like(local))
    z_y = xp.squeeze(take_along_axis(z, xp.expand_dims(idx, axis=-1), axis=-1, xp=xp), axis=-1)
    if inside is not None:
        z_y = xp.where(inside, z_y, xp.zeros_like(z_y))
    w_y = None
    if weight is not None:
        w_y = xp.reshape(xp.take(weight, xp.reshape(idx, (-1,))), idx.shape)
        if inside is not None:
            w_y = xp.where(inside, w_y, xp.zeros_like(w_y))
    return RowStats(m=m, s=s, wd=wd, wsum=wsum, z_y=z_y, w_y=w_y)


def stand_in_ignored(stats: RowStats, counted: Array, *, xp: Any) -> RowStats:
    r"""`stats` with the row max as the target logit of the rows not `counted` (ignored).

    An ignored row reads a stand-in label (0) whose logit may be ``-inf`` (a masked class):
    its :math:`-\log p_y = \infty` times its target weight 0 is NaN, masked afterwards but
    with a NumPy warning on the way. The row max gives the finite :math:`\log s` instead.

    An ignored row of ``-inf`` only (a masked padding position) has no finite statistics
    at all: its gradient coefficients were NaN, and NaN times the row's zero scale made its
    gradient NaN where it is 0. Where ``stats.finite`` does not promise finite maxima, such
    a row reads the statistics of a row of zeros (:math:`m = z_y = 0`, :math:`s = 1`). An
    ignored row holding NaN or ``+inf`` keeps its statistics: its loss is masked, its
    gradient NaN throughout (as ``F.cross_entropy``'s; NaN propagates).
    """
    z_y = xp.where(counted, stats.z_y, stats.m)
    if stats.finite:
        return dataclasses.replace(stats, z_y=z_y)
    real = counted | (stats.m != -float("inf"))
    zero = xp.zeros_like(stats.m)
    wd = stats.wd if isinstance(stats.wd, float) else xp.where(real, stats.wd, zero)
    return dataclasses.replace(
        stats,
        m=xp.where(real, stats.m, zero),
        s=xp.where(real, stats.s, xp.ones_like(stats.s)),
        wd=wd,
        z_y=xp.where(real, z_y, zero),
    )


def rebase(st: RowStats, m: Array, *, xp: Any) -> RowStats:
    r"""The same statistics measured from a reference point `m` at or above ``st.m``.

    :math:`s \leftarrow s\, e^{m_{st} - m}` (0 for a slice with :math:`m_{st} = -\infty`),
    :math:`\sum w (m - z) \leftarrow \sum w (m_{st} - z) + (m - m_{st}) \sum w`; the
    target logit and the weight sum do not move. Both parts are non-negative, so nothing
    cancels. Merging slices is rebasing them to their common maximum and adding
    (:func:`combine`, :func:`all_reduce`).
    """
    finite = isfinite(m, xp=xp)
    m_safe = xp.where(finite, m, xp.zeros_like(m))
    empty = st.m == -float("inf")
    shift = xp.where(empty, xp.zeros_like(m_safe), st.m - m_safe)
    s = xp.where(empty, xp.zeros_like(st.s), st.s * xp.exp(shift))
    s = xp.where(finite, s, st.s)
    m_st = xp.where(isfinite(st.m, xp=xp), st.m, xp.zeros_like(st.m))
    wd = st.wd + (m_safe - m_st) * st.wsum
    return RowStats(m=m, s=s, wd=wd, wsum=st.wsum, z_y=st.z_y, w_y=st.w_y)


def combine(a: RowStats, b: RowStats, *, xp: Any) -> RowStats:
    r"""The statistics of the union of two disjoint slices (associative, commutative).

    :math:`m = \max(m_a, m_b)`, :math:`s = s_a e^{m_a - m} + s_b e^{m_b - m}`
    (a slice with :math:`m = -\infty` contributes 0), the sums add: both slices
    are rebased to :math:`m` (:func:`rebase`) and added.
    """
    m = xp.maximum(a.m, b.m)
    ra, rb = rebase(a, m, xp=xp), rebase(b, m, xp=xp)
    w_y = None if a.w_y is None or b.w_y is None else a.w_y + b.w_y
    return RowStats(
        m=m,
        s=ra.s + rb.s,
        wd=ra.wd + rb.wd,
        wsum=a.wsum + b.wsum,
        z_y=a.z_y + b.z_y,
        w_y=w_y,
        finite=a.finite and b.finite,
    )


def all_reduce(
    st: RowStats,
    *,
    reduce_max: Callable[[Array], Array],
    reduce_sum: Callable[[Array], Array],
    xp: Any,
) -> RowStats:
    r""":func:`combine` over the ranks that hold the other slices of the same rows.

    The same merge as :func:`combine`, as two collectives: `reduce_max` (an
    all-reduce MAX of a ``(n,)`` array) gives the common maximum, and
    `reduce_sum` (an all-reduce SUM of one packed ``(3n + 1,)`` array,
    ``(4n + 1,)`` with class weights) adds the rebased :math:`s`,
    :math:`\sum w (m - z)`, :math:`z_y` and :math:`w_y` (from the rank that owns
    the label; the others hold 0) and the weight sums. Every rank calls it with
    the same number of rows, all with or all without class weights, in the same
    order. The reducers return their result (they may also work in place).
    """
    m = reduce_max(xp.asarray(st.m, copy=True))
    r = rebase(st, m, xp=xp)
    n = m.shape[0]
    wsum = xp.reshape(xp.asarray(st.wsum, dtype=m.dtype, device=_device(m)), (1,))
    parts = [r.s, r.wd, r.z_y, *([] if st.w_y is None else [st.w_y]), wsum]
    packed = reduce_sum(xp.concat(parts))
    return RowStats(
        m=m,
        s=packed[:n],
        wd=packed[n : 2 * n],
        wsum=packed[-1],
        z_y=packed[2 * n : 3 * n],
        w_y=None if st.w_y is None else packed[3 * n : 4 * n],
    )


def log_terms(stats: RowStats, *, xp: Any) -> tuple[Array, Array, Array | None]:
    r"""``(L, λ, finite)``: the log-sum-exp :math:`L = m + λ` of each row, with
    :math:`λ = \log s` where the max :math:`m` is finite and 0 where it is not (so that
    :math:`L = m` there: ``±inf`` or NaN), and the mask of finite maxima (None when
    ``stats.finite`` says every one is).

    A finite max has :math:`s \ge 1` (its own term is :math:`e^0`), so no log of 0 is
    formed. Four operations besides the log on PyTorch (each a kernel launch on an
    accelerator); :func:`lse`, :func:`log_s` and the target's :math:`-\log p_y` are read
    off them.
    """
    if stats.finite:
        lam = xp.log(stats.s)
        return stats.m + lam, lam, None
    finite = isfinite(stats.m, xp=xp)
    lam = xp.log(xp.where(finite, stats.s, 1.0))
    return stats.m + lam, lam, finite


def lse(stats: RowStats, *, xp: Any) -> Array:
    r"""log-sum-exp of the row, :math:`m + \log s` (the non-finite maximum where there is one)."""
    return log_terms(stats, xp=xp)[0]


def log_s(stats: RowStats, terms: tuple[Array, Array, Array | None], *, xp: Any) -> Array:
    r""":math:`L - m = \log s` (:math:`L` itself where the max is not finite), from
    :func:`log_terms`."""
    _, lam, finite = terms
    return lam if finite is None else xp.where(finite, lam, stats.m)


def _nll_target(stats: RowStats, terms: tuple[Array, Array, Array | None], *, xp: Any) -> Array:
    r""":math:`-\log p_y = (m - z_y) + \log s`: the large parts cancel exactly, first.

    From :func:`log_terms`. A row whose max is not finite gives :math:`m - z_y = L - z_y`:
    NaN for an all ``-inf`` row (:math:`-\infty - (-\infty)`), :math:`+\infty` for a
    finite target under a :math:`+\infty` logit; a row spanning more than the largest
    float gives :math:`+\infty` for a target at its low end (the loss is beyond it); each
    formed without a warning (:func:`~crossent._lib._xp.quiet`). Statistics with finite
    maxima (the NumPy executor's) have row maxima small enough that neither happens.
    """
    with quiet(xp, "invalid", "over", when=terms[2] is not None):
        return (stats.m - stats.z_y) + terms[1]


def _focal(
    nll: Array,
    gamma: float,
    *,
    slope: bool,
    autodiff: bool,
    xp: Any,
    log_p: Array | None = None,
) -> tuple[Array, Any]:
    r"""(f, s) from :math:`-\log p`: :math:`f = (1-p)^\gamma` and its term's slope
    :math:`s = f\,(1 + \gamma q)`, :math:`q = p (-\log p)/(1-p)` (None unless `slope`).

    :math:`\partial\bigl(f\,(-\log p)\bigr)/\partial(-\log p) = s`, and
    :math:`p - 1 = \operatorname{expm1}(\log p)` to relative precision at every
    :math:`p` (so is its power: no log of it is formed). Where :math:`p = 1` exactly
    :math:`f = 0` and :math:`s = 0` (the term's gradient limit for every
    :math:`\gamma > 0`; :func:`.focal_factor`, whose guard `autodiff` takes). For
    :math:`\gamma \ge 1` the slope is
    :math:`(1-p)^{\gamma-1}\bigl((1-p) - \gamma\,p \log p\bigr)`, finite without a
    guard, its two terms of one sign (nothing cancels); for :math:`\gamma = 2` both
    :math:`f` and :math:`s` are products of :math:`p - 1` (no power, no sign change),
    :math:`s = (p-1)\bigl((p-1) + 2\,p \log p\bigr)`: on PyTorch five small operations
    (``addcmul`` forms the bracket; a 32-row loss is made of such operations).
    :math:`p = e^{\log p}` is exponentiated, not formed as :math:`1 + (p - 1)`, which
    loses :math:`p` below the rounding of 1. `log_p` is :math:`\log p` if the caller
    has it (saves the negation). `autodiff` guards the powers at :math:`p = 1`, so that
    a framework's derivatives of :math:`f` are 0 there instead of
    :math:`\gamma\, 0^{\gamma-1}` (infinite for :math:`\gamma < 1`); a closed-form
    executor (`autodiff` False) needs no guard: :math:`0^\gamma = 0`.
    """
    minus = -nll if log_p is None else log_p
    em1 = xp.expm1(minus)  # p - 1
    if not autodiff and gamma >= 1:
        if gamma == 2:  # (p - 1)((p - 1) + 2 p log p)
            f = em1 * em1
            if not slope:
                return f, None
            p, log_p_safe = _p_and_log_p(minus, xp=xp)
            return f, em1 * _plus_product(em1, 2.0, p, log_p_safe, xp=xp)
        one_m = -em1
        if not slope:
            return one_m**gamma, None
        f1 = one_m ** (gamma - 1)  # (1 - p)^(gamma - 1) ((1 - p) - gamma p log p)
        p, log_p_safe = _p_and_log_p(minus, xp=xp)
        return f1 * one_m, f1 * _plus_product(one_m, -gamma, p, log_p_safe, xp=xp)
    one_m = -em1
    if autodiff:  # p = 0 (a label on a masked class): 1 - p = 1, a constant (see log1mexp)
        one_m = xp.where(minus == -float("inf"), xp.ones_like(one_m), one_m)
    f = focal_factor(one_m, gamma, log=False, nll=-minus, xp=xp) if autodiff else one_m**gamma
    if not slope:
        return f, None
    certain = one_m == 0
    safe = xp.where(certain, xp.ones_like(one_m), one_m)
    p, log_p_safe = _p_and_log_p(minus, xp=xp)
    q = xp.where(certain, xp.zeros_like(nll), p * -log_p_safe / safe)
    return f, f * (1 + gamma * q)


def _p_and_log_p(log_p: Array, *, xp: Any) -> tuple[Array, Array]:
    r"""(:math:`p`, :math:`\log p` where :math:`p > 0` and 0 where :math:`p = 0`).

    Their product is :math:`p \log p` with its limit :math:`0 \cdot \log 0 = 0`: a target
    with a ``-inf`` logit (an ignored row's stand-in label on a masked class) gets the
    finite focal slope instead of ``0 * -inf = NaN``. NaN stays NaN.
    """
    p = xp.exp(log_p)
    # -inf raised to the most negative finite number: p times it is 0 where p = 0 (one
    # operation; clip keeps NaN)
    return p, xp.clip(log_p, min=float(xp.finfo(log_p.dtype).min))


def focal_terms(
    nll: Array,
    c: Array | float,
    gamma: float,
    *,
    autodiff: bool = True,
    log_p: Array | None = None,
    xp: Any,
) -> tuple[Array, Array]:
    r"""Focal class terms :math:`c\,f\,(-\log p)` and their slopes :math:`c\,f\,(1 + \gamma q)`.

    :math:`\partial\bigl(c f (-\log p)\bigr)/\partial \log p = -c f (1 + \gamma q)`
    (:func:`_focal`). The target's term gives :math:`b` of :func:`loss_and_coefficients`
    (:math:`c = (1-\varepsilon) w_y`); with label smoothing every class has one
    (:math:`c = w_k`; the caller's sums over the classes are the `smooth` and
    `smooth_slope` of :func:`loss_and_coefficients`). `autodiff` and `log_p` as in :func:`_focal`.
    """
    f, s = _focal(nll, gamma, slope=True, autodiff=autodiff, xp=xp, log_p=log_p)
    return _times(c, f * nll), _times(c, s)


def _times(c: Any, x: Array) -> Array:
    """``c * x``, without the multiplication where `c` is the float 1."""
    return x if isinstance(c, float) and c == 1.0 else number_for(c, x) * x


def _plus_product(row: Array, c: float, u: Array, v: Array, *, xp: Any) -> Array:
    """``row + c * u * v``: one fused operation where the namespace has it (PyTorch's
    ``addcmul``: a Python number costs PyTorch as much as a small operation)."""
    addcmul = getattr(xp, "addcmul", None)
    if addcmul is not None:
        return addcmul(row, u, v, value=c)
    with quiet(xp, "over"):  # a product beyond the dtype (z-loss of lse 1e300): inf, as it is
        return row + c * (u * v)


def _target_coef(eps: float, w_y: Any) -> Any:
    r""":math:`(1-\varepsilon) w_y` (`w_y` itself without smoothing: no array operation)."""
    return w_y if eps == 0 else number_for(1 - eps, w_y) * w_y


def _target_term(c_y: Any, nll: Array, *, xp: Any) -> Array:
    r""":math:`c_y \cdot (-\log p_y)` (times the focal factor), exactly 0 where
    :math:`c_y = 0` and :math:`-\log p_y = +\infty`: a counted label of class weight 0 on a
    masked class (a logit of ``-inf``) adds nothing, as a weight of 0 removes its class
    (``0 * inf`` made the row NaN, and with it the mean and ``value_and_grad``'s gradient
    row). ``0 * NaN`` stays NaN (NaN propagates), as in
    ``_logprob.term_value``. Without class weights (`c_y` a float,
    0 only at ``label_smoothing=1``, whose caller drops the term) the plain product.
    """
    if isinstance(c_y, float):
        return _times(c_y, nll)
    with quiet(xp, "invalid"):
        product = c_y * nll
    removed = (c_y == 0) & (nll == float("inf"))
    if is_torch_namespace(xp):  # a number, not a tensor of zeros: one operation less
        return xp.where(removed, 0.0, product)
    return xp.where(removed, xp.zeros_like(product), product)


def row_loss(
    stats: RowStats,
    w_y: Array,
    total_weight: Array | float,
    num_classes: int,
    opts: CEOptions,
    *,
    xp: Any,
) -> tuple[Array, Array]:
    r"""Per-row loss from the merged statistics (the module's formula for :math:`\ell`), and
    the rows' log-sum-exp :math:`L` (which the gradient needs: no second computation).

    `w_y` is the target's weight (1 without weights); `total_weight` is
    :math:`W = \sum_k w_k` (C without weights). Ignored rows are the caller's
    to mask (their statistics hold no label). The statistics give
    :math:`L`, :math:`-\log p_y` and :math:`\sum_k w_k (L - z_k) = \sum w (m - z) + W \log s`,
    from which :func:`loss_and_coefficients` reads the loss.
    """
    terms = log_terms(stats, xp=xp)
    big_l = terms[0]
    nll_y = _nll_target(stats, terms, xp=xp)
    smooth = None
    if opts.label_smoothing != 0:
        # a +inf logit: inf - inf, a NaN row (as PyTorch's)
        with quiet(xp, "invalid", when=terms[2] is not None):
            log_s_ = log_s(stats, terms, xp=xp)
            smooth = stats.wd + number_for(total_weight, log_s_) * log_s_
    row, _ = loss_and_coefficients(big_l, nll_y, smooth, None, w_y, num_classes, opts, xp=xp)
    return row, big_l


def loss_and_coefficients(
    big_l: Any,
    nll_y: Any,
    smooth: Any,
    smooth_slope: Any,
    w_y: Array | float,
    num_classes: int,
    opts: CEOptions,
    *,
    scale: Any = None,
    loss: bool = True,
    autodiff: bool = True,
    log_p_y: Any = None,
    xp: Any,
) -> tuple[Any, Any]:
    r"""The row loss and, for a row `scale`, its gradient coefficients, from per-row terms.

    .. math::
        \ell = (1-\varepsilon)\, w_y f_y (-\log p_y) + \frac{\varepsilon}{C}\,\mathrm{smooth}
             + \lambda L^2, \qquad
        \frac{\partial \ell}{\partial z_k} = a\,p_k - b\,[k=y] - e\,w_k f_k (1 + \gamma q_k),

    :math:`b = (1-\varepsilon) w_y f_y (1 + \gamma q_y)`,
    :math:`a = b + \frac{\varepsilon}{C}\,\mathrm{smooth\_slope} + 2\lambda L`,
    :math:`e = \varepsilon / C`, all three times `scale` (the upstream gradient and the
    mean's :math:`1/\sum w_y`); :math:`f \equiv 1`, :math:`q \equiv 0` without focal
    factor (:func:`focal_terms`), where the coefficients are :func:`coefficients`.

    `big_l` is :math:`L = \operatorname{lse}(z)` (read only with z-loss), `nll_y`
    :math:`-\log p_y` (read for the loss, and for the coefficients with a focal factor),
    `smooth` :math:`\sum_k w_k f_k (-\log p_k)` (:math:`\sum_k w_k (L - z_k)` without focal
    factor) and `smooth_slope` :math:`\sum_k w_k f_k (1 + \gamma q_k)` (:math:`W` without
    focal factor), both read only with smoothing; `w_y` the target's weight (the float 1
    without weights). :func:`row_loss` and :func:`grad_coefficients` feed it from
    :class:`RowStats`; an executor that has the log-probabilities (PyTorch's
    ``log_softmax``) feeds it directly. `loss` False skips the loss (None);
    `autodiff` False (an executor that differentiates in closed form) drops the guards
    that make a framework's derivatives of the focal factor finite at :math:`p_y = 1`;
    `log_p_y` is :math:`\log p_y` where the executor has it (one negation less).
    Returns ``(loss, (a, b, e))``, None for what was not asked.
    """
    eps, gamma = opts.label_smoothing, opts.gamma
    with_grad = scale is not None
    c_y = _target_coef(eps, w_y)
    row: Any = None
    b: Any = None
    if gamma != 0:
        f, s = _focal(nll_y, gamma, slope=with_grad, autodiff=autodiff, xp=xp, log_p=log_p_y)
        if loss:
            row = _target_term(c_y, f * nll_y, xp=xp)
        b = None if s is None else _times(c_y, s)
    elif loss:
        row = _target_term(c_y, nll_y, xp=xp)
    if loss:
        if eps == 1:
            row = xp.zeros_like(nll_y)
        if eps != 0:
            row = row + number_for(eps / num_classes, smooth) * smooth
        if opts.z_loss != 0:
            row = _plus_product(row, opts.z_loss, big_l, big_l, xp=xp)
    if not with_grad:
        return row, None
    if gamma == 0:
        a, b, e = coefficients(
            w_y, big_l, scale, smooth_slope, 1 - eps, eps / num_classes, eps != 0,
            2 * opts.z_loss, opts.z_loss != 0,
        )  # fmt: skip
        return row, (a, b, e)
    a = b
    if eps != 0:
        a = a + (eps / num_classes) * smooth_slope
    if opts.z_loss != 0:
        a = a + (2 * opts.z_loss) * big_l
    b_scaled = _times(scale, b)
    a_scaled = b_scaled if a is b else _times(scale, a)
    return row, (a_scaled, b_scaled, 0.0 if eps == 0 else (eps / num_classes) * scale)


def coefficients(  # no annotations: Triton compiles this function too
    w_y,
    big_l,
    scale,
    total_weight,
    one_m_eps,
    eps_c,
    smoothing,
    z_loss_2,
    with_z_loss,
):
    r"""``(a·r, b·r, e·r)`` of the loss without focal factor: operators only.

    :math:`b = (1-\varepsilon) w_y`, :math:`a = b + \frac{\varepsilon}{C} W + 2\lambda L`,
    :math:`e = \varepsilon / C`, each times the row scale `r` (the upstream gradient
    and the mean's :math:`1/\sum w_y`; without smoothing `e` is `eps_c`, 0, unscaled:
    an operation less for the executors, which read it only with smoothing).
    `one_m_eps`, `eps_c` and `z_loss_2` are :math:`1-\varepsilon`, :math:`\varepsilon/C`
    and :math:`2\lambda`; `smoothing` and `with_z_loss` say whether those terms exist
    (compile-time constants in a kernel). Written with ``+ - *`` only and without
    annotations, so that the same function serves arrays, Python floats and — through
    ``triton.jit`` — the Triton gradient kernel (:mod:`crossent.fused._kernels`).
    """
    b = one_m_eps * w_y
    a = b
    e = eps_c  # 0 without smoothing, where no executor reads it (no product formed)
    if smoothing:
        a = a + eps_c * total_weight
        e = e * scale
    if with_z_loss:
        a = a + z_loss_2 * big_l
    return a * scale, b * scale, e


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
    the smoothing and z-loss parts do not depend on it). Without focal factor
    this is :func:`coefficients` with scale 1; :func:`loss_and_coefficients` from
    the statistics' :math:`L` and :math:`-\log p_y`.
    """
    terms = log_terms(stats, xp=xp)
    big_l = terms[0]
    nll_y = None if opts.gamma == 0 else _nll_target(stats, terms, xp=xp)
    _, coefs = loss_and_coefficients(
        big_l, nll_y, None, total_weight, w_y, num_classes, opts, scale=1.0, loss=False, xp=xp
    )
    return coefs
