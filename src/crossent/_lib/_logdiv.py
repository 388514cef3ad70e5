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
cancels). :func:`jsd_and_grad_from_log` adds the gradient with respect to the
logits of :math:`Q` (the student's, in distillation): with :math:`r_k = \log Q_k
- \log M_k` (:math:`\log Q_k - \log P_k` for :math:`\beta = 1`),

.. math::

    \frac{\partial L_\beta}{\partial s_k} = c_\beta\, Q_k \big(r_k - \mathrm{KL}(Q\|M)\big),
    \quad c_\beta = 1 - \beta \ (1 \text{ at } \beta = 1), \qquad
    \frac{\partial L_0}{\partial s_k} = Q_k - P_k,

since :math:`\partial L_\beta / \partial Q_k = (1-\beta)(\log Q_k - \log M_k)` (the
:math:`\log M` terms of the two KL divergences cancel through
:math:`\sum_k \partial M_k = 0`) and :math:`\sum_j Q_j r_j = \mathrm{KL}(Q\|M)`.

The gradient is formed from :math:`r` shifted by its value at the student's most
probable class :math:`*`, :math:`r' = r - r_*`: :math:`r_k - \mathrm{KL} = r'_k - \sum_j
Q_j r'_j`. Unshifted, a peaked student (:math:`Q_* \to 1`) far from the teacher
cancels: :math:`r_* - \mathrm{KL}` is a difference of two numbers of the size of the
KL, rounded at it, whose exact value is :math:`(1 - Q_*)` times smaller (float32
gradients were off by up to 48 % of the row's norm, PyTorch's own autograd of the
formula similarly). Shifted, :math:`r'_* = 0` and :math:`\sum_j Q_j r'_j` is a sum of
terms of weight :math:`Q_j`, :math:`j \ne *`: accurate to float32 rounding (2e-6).

For :math:`0 < \beta < 1` the gradient's :math:`r_k` is formed as
:math:`-\operatorname{log1p}(\beta (P_k / Q_k - 1))`, whose rounding error is a few units of
the dtype's epsilon in absolute terms (:math:`M_k \ge \beta P_k` and :math:`\ge (1-\beta) Q_k`),
not as :math:`\log Q_k - \log M_k`, rounded at the size of the logs: at a small
:math:`\beta` (:math:`M` close to :math:`Q`, :math:`r` of the size of :math:`\beta`) float32
gradients were off by 2e-2 of their norm at :math:`\beta = 10^{-6}`, 1e-3 at :math:`10^{-4}`,
9e-6 at :math:`10^{-2}`. Where :math:`Q_k` underflows (below the smallest normal number in the
array-API form) :math:`P_k / Q_k` is taken as the largest float: its term is multiplied by
:math:`Q_k`.

Two implementations of these formulas, one per kind of caller: the array-API
one (every backend, differentiable by autodiff with finite gradients wherever
the value is finite) and, for PyTorch tensors that autograd does not track (the
fused chunk loop, ``value_and_grad``, ``info`` under ``no_grad``), an in-place
one with a few preallocated temporaries (:func:`_jsd_torch`; for ``info``'s float32
and narrower inputs on the CPU evaluated in float64, :func:`jsd_in_float64`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from crossent._lib._xp import (
    Array,
    _torch_namespace,
    array_namespace,
    device,
    difference,
    forward_ad_active,
    is_torch_namespace,
    quiet,
    stop_gradient,
    take_along_axis,
    torch_tracing,
)

__all__ = [
    "cross_entropy_of_logits",
    "expm1_plus",
    "generalized_jsd_from_log",
    "in_place",
    "jsd_and_grad_from_log",
    "jsd_in_float64",
    "log_mixture",
    "log_ratio_from_logits",
    "log_softmax",
    "mixture_log_ratios",
    "mixture_terms",
    "refine_close_rows",
    "rel_entr_from_log",
    "rel_entr_terms",
    "value_from",
    "xlogy_of_probabilities",
]


def _untracked_torch(xp: Any, *arrays: Array) -> bool:
    """Whether `arrays` are PyTorch tensors autograd does not track (the in-place path).

    Not while traced: ``torch.compile``, nor ``torch.func`` (``vmap`` has no batching rule
    for the ``out=`` operations of the in-place path).
    """
    if not is_torch_namespace(xp):
        return False
    import torch

    if torch.is_grad_enabled() and any(a.requires_grad for a in arrays):
        return False
    # compiled, exported or a torch.func transform (vmap: no out=), or forward-mode AD
    return not torch_tracing() and not forward_ad_active()


def log_softmax(
    z: Array, *, axis: int, xp: Any, overwrite: bool = False, exact_peak: bool = False
) -> Array:
    r""":math:`\log p = z - \operatorname{lse}(z)` along `axis` (a row of :math:`-\infty`: NaN).

    Formed relative to the row's most probable class :math:`*` (its argmax):
    with :math:`u = z - z_*`,

    .. math:: \log p_k = u_k - \operatorname{log1p}\Bigl(\sum_{j \ne *} e^{u_j}\Bigr),

    so :math:`\log p_* = -\operatorname{log1p}(\cdot)` keeps full relative accuracy
    however close :math:`p_*` is to 1 (:math:`\log p_* \approx -(1 - p_*)`; a kernel
    that forms :math:`\log(1 + \cdot)` rounds it at 1: 4.6e-3 relative error of a
    float32 entropy at :math:`1 - p_* = 10^{-6}`). :math:`z_*` is differentiable and
    :math:`u_* = 0` exactly, so autodiff reaches :math:`z_*` only through the other
    classes: :math:`\partial/\partial z_* = -\sum_{j \ne *} \partial/\partial z_j`,
    a sum of terms of weight :math:`p_j`, not :math:`g_* - p_* \sum_k g_k`, a difference
    of numbers of size 1 whose exact value is :math:`1 - p_*` times smaller (float32
    gradients of a peaked row's entropy and cross-entropy were off by up to 9e-1 of their
    norm at :math:`1 - p_* = 10^{-6}`).

    PyTorch uses its fused kernel (which rounds :math:`\log p_*` at 1) unless
    `exact_peak`; with `overwrite` (an untracked tensor the caller owns) the result
    replaces `z` in place.
    """
    if is_torch_namespace(xp) and not exact_peak:
        import torch

        if overwrite and _untracked_torch(xp, z):
            return torch._log_softmax(z, axis, False, out=z)
        return torch.log_softmax(z, dim=axis)
    if z.shape[axis] == 0:
        return z
    if is_torch_namespace(xp) and not torch_tracing():
        return _log_softmax_torch(z, axis)
    star = xp.argmax(z, axis=axis, keepdims=True)
    top = _is_index(star, z.shape[axis], axis=axis, xp=xp)
    z_top = take_along_axis(z, star, axis=axis, xp=xp)
    # u_* = 0 as a constant: z_* - z_* would carry the large derivative of log p_* into z_*
    # twice, +g_* and then -g_* within the sum that the gather's derivative forms
    zero = xp.zeros_like(z)
    u = xp.where(top, zero, difference(z, z_top, xp=xp))
    others = xp.sum(xp.where(top, zero, xp.exp(u)), axis=axis, keepdims=True)
    # + (z_* - z_*): NaN where the max is NaN or +inf (no softmax), 0 with a 0 derivative
    return difference(u, xp.log1p(others) + difference(z_top, z_top, xp=xp), xp=xp)


def _log_softmax_torch(z: Any, axis: int) -> Any:
    """:func:`log_softmax`'s formula in PyTorch's own operations (eager): the max and its
    index in one pass, the top class's entries set by index (a write per row, not a
    ``where`` over the array). Tracked (not under forward-mode AD), one autograd node,
    :func:`_peak_log_softmax`, with the same derivatives in closed form."""
    import torch

    if torch.is_grad_enabled() and z.requires_grad and not forward_ad_active():
        return _peak_log_softmax().apply(z, axis)
    return _log_softmax_in_place(z, axis)[0]


def _log_softmax_in_place(z: Any, axis: int) -> tuple[Any, Any]:
    """:func:`_log_softmax_torch`'s operations (recorded by autograd where `z` is tracked) and
    the index of each row's most probable class."""
    z_top, u, log_s, star = _peak_statistics(z, axis)
    lse = log_s + (z_top - z_top)
    return (u - lse if u.requires_grad else u.sub_(lse)), star


def _peak_statistics(z: Any, axis: int) -> tuple[Any, Any, Any, Any]:
    r"""Of PyTorch logits `z` along `axis`: each row's maximum :math:`z_*`, :math:`u = z - z_*`
    (:math:`u_* = 0` set), :math:`\log S = \operatorname{log1p}(\sum_{j \ne *} e^{u_j})` and the
    index :math:`*` (recorded by autograd where `z` is tracked), so that :math:`\log p = u -
    \log S` (:func:`log_softmax`)."""
    z_top, star = z.max(dim=axis, keepdim=True)
    u = (z - z_top).scatter_(axis, star, 0.0)  # z - z_top keeps no tensor for autograd
    e = u.exp()
    e = e.scatter(axis, star, 0.0) if e.requires_grad else e.scatter_(axis, star, 0.0)
    return z_top, u, e.sum(dim=axis, keepdim=True).log1p_(), star


@functools.cache
def _peak_log_softmax() -> Any:
    r"""The ``autograd.Function`` of :func:`_log_softmax_torch` for a tracked `z` (defined on
    first use: this module imports without PyTorch).

    The value by the untracked operations; the gradient
    :math:`\bar z_k = g_k - p_k \sum_j g_j` for :math:`k \ne *` and
    :math:`\bar z_* = -\sum_{k \ne *} \bar z_k`, the derivatives that autograd forms
    through :func:`log_softmax`'s formula (there :math:`z_*` enters only through
    :math:`u_k = z_k - z_*`), in three passes over the array instead of autograd's twelve
    (scatter, max and exp backward: 2.6x the time of an entropy's backward at 1024 x
    1000). The backward is recorded under ``create_graph`` (its :math:`p` read from the
    saved output), so second derivatives are those of the formula.
    """
    import torch

    class PeakLogSoftmax(torch.autograd.Function):
        """Log-softmax relative to the row's most probable class."""

        @staticmethod
        def forward(ctx: Any, z: Any, axis: int) -> Any:
            out, star = _log_softmax_in_place(z.detach(), axis)
            ctx.save_for_backward(out, star)
            ctx.axis = axis
            return out

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, None]:
            log_p, star = ctx.saved_tensors
            axis = ctx.axis
            total = g.sum(dim=axis, keepdim=True)
            grad = g - log_p.exp() * total
            # the top class: minus the others (its own g_* - p_* sum g is rounded at 1); plus
            # (sum g - sum g), as the formula's z_* - z_* gives it: NaN for an infinite sum
            # (an infinite measure's gradient, NaN as PyTorch's log_softmax gives it there)
            return _top_balanced(grad, star, axis, plus=total - total), None

    return PeakLogSoftmax


def _is_index(index: Array, n: int, *, axis: int, xp: Any) -> Array:
    """The mask of the positions `index` (size 1 along `axis`) among `n` along `axis`."""
    shape = [1] * index.ndim
    shape[axis] = n
    classes = xp.reshape(xp.arange(n, dtype=index.dtype, device=device(index)), tuple(shape))
    return classes == index


def rel_entr_from_log(log_a: Array, log_b: Array, *, xp: Any, d: Array | None = None) -> Array:
    r"""The terms :math:`a \log(a/b) - a + b` from :math:`\log a` and :math:`\log b`.

    Summed over a pair of distributions (:math:`\sum a = \sum b = 1`) they
    give :math:`D(a \,\|\, b)`, and each term is :math:`\ge 0`, so the sum is
    non-negative in floating point too (a plain :math:`\sum a \log(a/b)` is
    not). With :math:`d = \log a - \log b` the term is
    :math:`a\,(d + \operatorname{expm1}(-d))` for :math:`d \ge -1` and
    :math:`a(d - 1) + b` below, where :math:`e^{-d}` could overflow
    (:func:`rel_entr_terms`). `d` is rounded at the magnitude of the logs, so a term of
    nearly equal :math:`a` and :math:`b` (:math:`a d^2/2`) has a relative error of about
    :math:`2\epsilon |\log a| / |d|`; the cancellation of the direct form adds about
    :math:`4\epsilon / |d|`, so its series (:func:`expm1_plus`, slower) is used only with
    a more accurate `d` given.
    :math:`a = 0` (:math:`\log a = -\infty`) gives :math:`b`, and mass on
    :math:`b = 0` gives :math:`+\infty`; an underflowed :math:`a` or :math:`b`
    with finite logs keeps the value and the gradient finite. NaN propagates.

    The :math:`+\infty` term is :math:`\max(a, \text{tiny}) (\log a - \log b)`, so
    that autodiff gives its derivatives, :math:`-a` for :math:`\log b` (the limit as
    :math:`b \to 0`; after the softmax of :math:`\log b`'s logits the gradient of
    :math:`D(a\|b)` is :math:`b - a`, as the closed form and PyTorch's ``kl_div``
    give) and :math:`+\infty` for :math:`\log a`. (A constant :math:`+\infty` gave both
    0: a forward KL with a student's masked class gave the student a gradient of about 0
    where ``value_and_grad`` and ``kl_div`` give :math:`Q - P`.)

    `d`, when given, is :math:`\log a - \log b` formed more accurately by the caller
    (:func:`log_ratio_from_logits`; read where both logs are finite): then :math:`\psi` is
    summed by its series, and nearly equal :math:`a`, :math:`b` keep a few ulps.
    """
    a_zero = log_a == -math.inf
    b_zero = log_b == -math.inf
    on_zero = b_zero & ~a_zero  # mass on an impossible class: +inf
    zero = xp.zeros_like(log_a)
    log_a = xp.where(a_zero, zero, log_a)
    log_b_finite = xp.where(a_zero | b_zero, zero, log_b)
    given = d is not None
    d = log_a - log_b_finite if d is None else xp.where(a_zero | b_zero, zero, d)
    a = xp.exp(log_a)
    # b from its own log, not as e^(log a - d): d is rounded at the magnitude of log a
    b = xp.exp(xp.where(d < -1.0, log_b_finite, zero))
    out_finite = rel_entr_terms(a, b, d, series=given, xp=xp)  # else d's rounding dominates
    # +inf where on_zero (a kept above 0: an underflowed a times inf would be NaN), 0 elsewhere
    tiny = xp.full_like(a, xp.finfo(a.dtype).smallest_normal)
    a_on = xp.where(on_zero, xp.maximum(a, tiny), zero)
    at_zero = a_on * (log_a - xp.where(on_zero, log_b, zero))
    out = xp.where(b_zero, at_zero, out_finite)
    return xp.where(a_zero, xp.exp(log_b), out)


_NEAR_ROWS = 0.5
r""":func:`log_ratio_from_logits` forms `d` from the logits' differences where
:math:`|\sum_k q_k \operatorname{expm1}(\delta'_k)| \le` this (rows close to each other)."""


def log_ratio_from_logits(
    z_a: Array, z_b: Array, log_a: Array, log_b: Array, *, axis: int, xp: Any, inv_t: float = 1.0
) -> Array:
    r""":math:`d = \log a - \log b` of two log-softmaxes, to a few ulps of `d` where the rows
    are close (same shape; `z_a`, `z_b` their logits).

    A difference of the logs is rounded at their magnitude, :math:`\epsilon|\log a|`: the
    relative error of a divergence of nearly equal rows (second order in `d`) is then about
    :math:`2\epsilon|\log a|/|d|` (float32 KL from logits :math:`10^{-6}` apart: 0.4).
    With :math:`\delta = z_a - z_b` (held exactly as a sum of two floats, TwoSum) and
    :math:`\delta' = \delta - \delta_*` at `b`'s most probable class,

    .. math:: d_k = \delta'_k - \operatorname{log1p}\Bigl(\sum_j b_j
              \operatorname{expm1}(\delta'_j)\Bigr),

    since :math:`\operatorname{lse}(z_a) - \operatorname{lse}(z_b) = \log \sum_j b_j
    e^{\delta_j}` (the rounding of :math:`b_j` only weighs small terms). Used where that sum
    lies in :math:`[-1/2, 1/2]` and no :math:`\delta'_j` exceeds 30 (with no NaN and no
    mass of `a` where `b` has none); elsewhere, and on rows far apart, the difference of
    the logs. Classes that both rule out count as :math:`\delta = 0`. The value is this
    `d`, the derivatives those of :math:`\log a - \log b` (:func:`value_from`).

    `inv_t`: the log-softmaxes are those of the logits times `inv_t` (over a temperature),
    and :math:`\delta'` is formed from the logits themselves, then multiplied: each product
    rounds at its size, :math:`\epsilon |z\,/T|`, which swamps a difference of :math:`10^{-5}`
    unless :math:`T` is a power of two (a distillation loss 2e-2 off at :math:`T = 3`).
    """
    plain = difference(log_a, log_b, xp=xp)
    if plain.shape[axis] == 0:  # no outcomes: nothing to refine (argmax has no maximum)
        return plain
    zero = xp.zeros_like(plain)
    both_out = (z_a == -math.inf) & (z_b == -math.inf)
    hi = xp.where(both_out, zero, difference(z_a, z_b, xp=xp))
    # the rounding error of z_a - z_b, exactly (Knuth's TwoSum): logits of equal rows
    # shifted by a constant differ by more than a factor 2, so hi alone is rounded
    with quiet(xp, "invalid", "over"):  # inf - inf where a logit is infinite: lo is 0
        back = hi - z_a
        lo = (z_a - (hi - back)) - (z_b + back)
    lo = xp.where(xp.isfinite(lo), lo, zero)
    star = xp.argmax(log_b, axis=axis, keepdims=True)
    at = lambda x: take_along_axis(x, star, axis=axis, xp=xp)  # noqa: E731
    # hi_k - hi_* is exact for close values (Sterbenz), the lo part is tiny
    delta = difference(hi, at(hi), xp=xp) + (lo - at(lo))
    if inv_t != 1.0:
        with quiet(xp, "over"):  # beyond the range: +inf, not usable below
            delta = delta * inv_t
    usable = delta <= 30.0  # False for NaN and +inf (mass of a where b has none)
    delta = xp.where(usable, delta, zero)
    s = xp.sum(xp.exp(log_b) * xp.expm1(delta), axis=axis, keepdims=True)
    near = xp.all(usable, axis=axis, keepdims=True) & (xp.abs(s) <= _NEAR_ROWS)
    better = xp.where(near, delta - xp.log1p(xp.where(near, s, xp.zeros_like(s))), plain)
    return value_from(better, plain, xp=xp)


def value_from(better: Array, plain: Array, *, xp: Any) -> Array:
    """`better`'s value with `plain`'s derivatives: ``plain + stop_gradient(better - plain)``
    where both are finite (`plain` elsewhere).

    For values formed more accurately than the formula whose derivatives autodiff should
    take (:func:`log_ratio_from_logits`: the gradient of a peaked row keeps its structure,
    :func:`log_softmax`).
    """
    both = xp.isfinite(better) & xp.isfinite(plain)
    zero = xp.zeros_like(plain)
    step = xp.where(both, better - xp.where(both, plain, zero), zero)
    return plain + stop_gradient(step, xp=xp)


def mixture_log_ratios(d: Array, *, beta: float = 0.5, xp: Any) -> tuple[Array, Array]:
    r""":math:`(\log(a/m), \log(b/m))`, :math:`m = \beta a + (1-\beta) b` (:math:`0 < \beta < 1`),
    from :math:`d = \log(a/b)`.

    For :math:`\beta = 1/2`: :math:`\log(a/m) = \min(d, 0) - g(|d|)` and :math:`\log(b/m) =
    \min(-d, 0) - g(|d|)`, :math:`g(x) = \operatorname{log1p}(\operatorname{expm1}(-x)/2)`.
    Otherwise :math:`\log(a/m) = -\operatorname{log1p}((1-\beta)\operatorname{expm1}(-d))`
    and :math:`\log(b/m) = -\operatorname{log1p}(\beta\operatorname{expm1}(d))`, each with its
    asymptote beyond :math:`|d| = 80` (:math:`d - \log(1-\beta)`, :math:`-d - \log\beta`: the
    neglected term is below :math:`e^{-80}` relative), where the exponential could overflow.
    Both forms are accurate to a few ulps of the result for any `d` (:math:`\approx (1-\beta)
    d` and :math:`-\beta d` near 0, where :math:`\log a - \log m` rounds at the size of the
    logs), no overflow; :math:`\pm\infty` give :math:`-\log\beta` and :math:`-\infty`
    (:math:`-\infty` and :math:`-\log(1-\beta)` for :math:`-\infty`).
    """
    zero = xp.zeros_like(d)
    if beta == 0.5:
        g = xp.log1p(xp.expm1(-xp.abs(d)) / 2)
        return xp.minimum(d, zero) - g, xp.minimum(-d, zero) - g
    low, high = d < -_MIXTURE_ASYMPTOTE, d > _MIXTURE_ASYMPTOTE
    with quiet(xp, "invalid"):  # inf - inf of the unused asymptote at d = +-inf
        a_far = d - math.log1p(-beta)
        b_far = -d - math.log(beta)
    return (
        xp.where(low, a_far, _log_mixture_ratio(-xp.where(low, zero, d), 1.0 - beta, beta, xp=xp)),
        xp.where(high, b_far, _log_mixture_ratio(xp.where(high, zero, d), beta, 1.0 - beta, xp=xp)),
    )


def _log_mixture_ratio(x: Array, w: float, rest: float, *, xp: Any) -> Array:
    r""":math:`-\log(1 + w\,(e^x - 1))` for :math:`x \le 80` (`rest` is :math:`1 - w`, given:
    formed from a rounded :math:`w` it loses the digits of a tiny one): ``-log1p(w expm1(x))``,
    and where the argument is below -1/2 (a sum near 0: its rounding, and that of :math:`w` in
    the array's dtype, would weigh) :math:`-\log(\text{rest} + w e^x)`, two positive terms."""
    y = w * xp.expm1(x)
    cut = y < -0.5  # then e^x < 1/2: no overflow below
    direct = -xp.log(rest + w * xp.exp(xp.where(cut, x, xp.zeros_like(x))))
    return xp.where(cut, direct, -xp.log1p(xp.where(cut, xp.zeros_like(y), y)))


_MIXTURE_ASYMPTOTE = 80.0
""":func:`mixture_log_ratios` takes the asymptotes beyond this :math:`|d|` (float32's
:math:`e^{88}` overflows)."""


def rel_entr_terms(a: Array, b: Array, d: Array, *, series: bool = True, xp: Any) -> Array:
    r""":math:`a \log(a/b) - a + b` from :math:`a`, :math:`b` and a finite :math:`d = \log(a/b)`.

    :math:`a\,\psi(d)` with :math:`\psi(d) = d + \operatorname{expm1}(-d)` for :math:`d \ge
    -1` and :math:`a(d - 1) + b` below, where :math:`e^{-d}` could overflow (`b` is read
    only there). Each term is :math:`\ge 0`. With `series` :math:`\psi` is
    :func:`expm1_plus`, so the term keeps the relative accuracy of `d` also where
    :math:`a \approx b` (it is then :math:`a d^2 / 2`, second order in :math:`d`); without,
    the direct form (relative error about :math:`4\epsilon/|d|`), for callers whose `d`
    is no more accurate than that (a difference of logs) and which are hot paths.
    """
    zero = xp.zeros_like(d)
    low = d < -1.0
    d_hi = xp.where(low, zero, d)
    hi = a * (expm1_plus(d_hi, xp=xp) if series else d_hi + xp.expm1(-d_hi))
    lo = a * (xp.where(low, d, zero - 2.0) - 1.0) + b
    return xp.where(low, lo, hi)


def half_mixture_log_ratio(a: Array, b: Array, *, xp: Any, derivatives: bool = True) -> Array:
    r""":math:`\log(2a/(a + b))`, the log ratio of a probability :math:`a` to its mixture with
    :math:`b`, whose derivatives of every order autodiff takes exactly (Jensen–Shannon's
    terms and gradient factors); 0 where :math:`a = b = 0`, :math:`-\infty` where
    :math:`a = 0 < b`.

    With :math:`v = (a - b)/(a + b)`: :math:`\operatorname{log1p}(v)` for :math:`|v| \le 1/2`
    (close masses: the value keeps its relative accuracy), else, with no ratio above 1,
    :math:`\log 2 - \operatorname{log1p}(b/a)` for :math:`a > b` (one ``log1p`` serves both)
    and :math:`\log(2\rho/(1 + \rho))`, :math:`\rho = a/b < 1/3`, for :math:`a < b`. Their
    derivatives :math:`b/(a(a + b))` and :math:`1/\rho - 1/(1 + \rho)` (the larger term at
    least 3 times the other) are exact where autodiff of :math:`\log(2a/(a + b))` cancels in
    :math:`1/a - 1/(a + b)` at :math:`b \ll a` (its rounding :math:`\epsilon/a` was 80 times
    the second derivative at :math:`a = 3 \cdot 10^{-25}`, :math:`b = 3 \cdot 10^{-43}`). Two
    transcendental passes, as :math:`\log(2a/(a + b))` with the close form took. Each
    branch's inputs are replaced where it is not taken (no 0/0, no overflow behind a
    ``where``). Without `derivatives` (no autodiff: NumPy, untracked PyTorch tensors) the far
    masses take :math:`\log(2a/(a + b))` itself, the same values to rounding in fewer passes
    (the exact-derivative form took ``js_divergence`` of NumPy probabilities at 2000 x 1000
    from 0.35 to 0.41 s).
    """
    one, zero = xp.ones_like(a), xp.zeros_like(a)
    s = a + b
    none = s == 0
    v = (a - b) / xp.where(none, one, s)
    near = (xp.abs(v) <= 0.5) | none
    if not derivatives:
        ratio = xp.where(near, one, 2 * a / xp.where(none, one, s))  # in (0, 2]
        return xp.where(near, xp.log1p(xp.where(near, v, zero)), xp.log(ratio))
    above = ~near & (a > b)
    below = ~near & ~above
    t = xp.where(above, b, zero) / xp.where(above, a, one)
    r = xp.log1p(xp.where(near, v, t))
    rho = xp.where(below, a, one) / xp.where(below, b, one)
    r_below = xp.log(2 * rho / (1 + rho))
    return xp.where(near, r, xp.where(above, math.log(2.0) - r, r_below))


_PSI_SMALL = 0.5
"""Below this :math:`|d|`, :func:`expm1_plus` sums its Taylor series."""


def expm1_plus(d: Array, *, xp: Any) -> Array:
    r""":math:`\psi(d) = e^{-d} - 1 + d \ge 0` to a few units of the dtype's epsilon, relative.

    Formed as :math:`d + \operatorname{expm1}(-d)` the two first-order terms cancel, leaving
    :math:`d^2/2` with a relative error of about :math:`4\epsilon / |d|` (float32 KL
    divergences of nearly equal distributions, :math:`d \approx 10^{-6}`, were 40 % off).
    For :math:`|d| < 1/2` the series :math:`\sum_{n \ge 2} (-d)^n / n!` is summed instead
    (Horner; to :math:`n = 9` in float32, 16 in float64: the first omitted term is below
    :math:`\epsilon\,\psi(d)`); above, the direct form's error is at most :math:`8\epsilon`.
    Measured against mpmath: 2.2 (float32) and 1.6 (float64) units of epsilon.
    """
    small = xp.abs(d) < _PSI_SMALL
    x = xp.where(small, -d, xp.zeros_like(d))
    top = 9 if xp.finfo(d.dtype).eps > 1e-10 else 16
    series = xp.full_like(d, 1.0 / math.factorial(top))
    for n in range(top - 1, 1, -1):
        series = series * x + 1.0 / math.factorial(n)
    direct = d + xp.expm1(-xp.where(small, xp.zeros_like(d), d))
    return xp.where(small, series * (x * x), direct)


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
    log_p: Array,
    log_q: Array,
    *,
    beta: float,
    axis: int,
    xp: Any,
    work: Array | None = None,
    d: Array | None = None,
) -> Array:
    r""":math:`L_\beta(P, Q)` (the module's formula) summed along `axis`, from log-probabilities.

    ``beta=0`` is :math:`\mathrm{KL}(P\|Q)`, ``beta=1`` :math:`\mathrm{KL}(Q\|P)`,
    ``beta=0.5`` the Jensen–Shannon divergence. `log_p` and `log_q` broadcast.
    `work`: see :func:`jsd_and_grad_from_log`. `d`: an accurate :math:`\log P - \log Q`
    (:func:`log_ratio_from_logits`), for the array-API formulas (:func:`mixture_terms`).
    """
    if d is None and _untracked_torch(xp, log_p, log_q):
        return _jsd_torch(log_p, log_q, beta=beta, axis=axis, grad=False, work=work)[0]
    return _jsd_generic(log_p, log_q, beta=beta, axis=axis, grad=False, xp=xp, d=d)[0]


def jsd_and_grad_from_log(
    log_p: Array,
    log_q: Array,
    *,
    beta: float,
    xp: Any,
    scale: float | Array = 1.0,
    work: Array | None = None,
    wide: bool = False,
    d: Array | None = None,
) -> tuple[Array, Array]:
    r""":math:`L_\beta(P, Q)` along the last axis and `scale` times its gradient for Q's logits.

    `log_p` and `log_q` are log-softmaxes of the same shape; `scale` is a
    number or an array of the rows' shape (each row's gradient times it).
    `work`, for untracked PyTorch tensors the caller owns (the fused chunk
    loop), is work space of shape ``(4, *log_p.shape)``: then `log_p` and
    `log_q` are overwritten too, the gradient is returned in `log_q`'s storage,
    and nothing is allocated per call. `wide`: the log-probabilities may span more than the
    dtype's largest value (logits divided by a tiny temperature), so that
    :math:`r_k - r_*` can overflow where :math:`Q_k = 0` (0 · −inf made the reverse KL's
    gradient NaN); it is then clamped to the dtype's range (one pass; NaN stays NaN).
    `d`: as in :func:`generalized_jsd_from_log` (the gradient from it too).
    """
    if log_q.shape[-1] == 0:  # no outcomes: a loss of 0 (an empty sum), an empty gradient
        loss = generalized_jsd_from_log(log_p, log_q, beta=beta, axis=-1, xp=xp)
        return loss, xp.zeros_like(log_q)
    if d is None and _untracked_torch(xp, log_p, log_q):
        loss, g = _jsd_torch(
            log_p, log_q, beta=beta, axis=-1, grad=True, work=work, scale=scale, wide=wide
        )
    else:
        loss, g = _jsd_generic(log_p, log_q, beta=beta, axis=-1, grad=True, xp=xp, scale=scale, d=d)
    if g is None:  # pragma: no cover - grad=True always returns it
        msg = "internal: the divergence's gradient was not computed."
        raise RuntimeError(msg)
    return loss, g


def jsd_in_float64(p: Array, q: Array, *, beta: float, axis: int, logits: bool) -> Array | None:
    r""":math:`L_\beta(P, Q)` along `axis` of eager float32-or-narrower PyTorch tensors on the
    CPU, evaluated in float64; None for other inputs (the array-API formulas serve them).

    `p` and `q` are logits (`logits`) or probabilities; they broadcast. From probabilities
    :math:`\beta = 0` adds :math:`\sum (p - q)` to the terms (0 for distributions), so that
    the result is :math:`\sum p \log(p/q)` of the inputs as given, as
    :func:`crossent.info.kl_divergence` defines it. The result is float64.

    In float64 the direct forms are accurate enough for a float32 result: the log ratio
    :math:`d` is rounded at :math:`\epsilon_{64}|\log p|` and :math:`\psi(d)` formed
    directly at :math:`4\epsilon_{64}/|d|`, so rows :math:`10^{-6}` apart (a KL of
    :math:`10^{-12}`) keep about :math:`10^{-9}` relative, and a peaked row's
    :math:`\log p_* \approx -(1 - p_*)` keeps its digits below float32's. It replaces the
    float32 array-API formulas (the series of :math:`\psi`, the logits' difference held as
    two floats, the top-class log-softmax: 5x the time of this form for KL from logits at
    1024 x 1000) without a gradient (the in-place form, :func:`_jsd_torch`), and with one
    for KL (:math:`\beta = 0`) and JS (:math:`\beta = 1/2`) of finite logits
    (:func:`_wide_divergence`: the closed-form gradient in float64, in place for a first
    backward of logits of one shape, by differentiable operations under ``create_graph``, so
    second derivatives are exact; forward and backward 50 ms for KL and 77 ms for JS at 1024 x
    1000, against 186 ms and 355 ms through the array-API formulas). Probabilities:
    :func:`_of_probabilities` (KL's value its own, JS's by :func:`_jsd_torch`).
    """
    import torch

    narrow = (torch.float32, torch.float16, torch.bfloat16)
    if not (
        isinstance(p, torch.Tensor)
        and isinstance(q, torch.Tensor)
        and p.dtype in narrow
        and q.dtype in narrow
        and p.is_cpu
        and q.is_cpu
    ):
        return None
    untracked = _untracked_torch(torch, p, q)
    if not logits and (beta == 0.0 or not untracked):
        return _of_probabilities(p, q, beta, axis, untracked=untracked)
    if not untracked:
        if not (
            logits
            and beta in (0.0, 0.5)
            and not torch_tracing()
            and not forward_ad_active()
            and bool(torch.isfinite(p).all() & torch.isfinite(q).all())
        ):
            return None
        out: Array = _wide_divergence().apply(p, q, beta, axis)
        return out
    if logits:
        return _logits_value64(p, q, beta, axis)
    x, y = p.to(torch.float64), q.to(torch.float64)
    return _jsd_torch(x.log(), y.log(), beta=beta, axis=axis, grad=False)[0]


def _of_probabilities(x: Any, y: Any, beta: float, axis: int, *, untracked: bool) -> Any:
    r""":func:`jsd_in_float64` of probabilities: KL (:math:`\beta = 0`) by :func:`_kl_value64`,
    JS (:math:`\beta = 1/2`) by :func:`_jsd_torch` (whose terms need the logs), both in float64;
    tracked inputs (eager, not under forward-mode AD) through one node
    (:func:`_probability_node`) with the closed-form gradients; None where the value is not
    finite (a pole, a NaN: the array-API formulas give those their values and derivatives),
    for other :math:`\beta` with a gradient, or where the call is traced."""
    if untracked:
        out = _probability_value64(x, y, beta, axis)[0]
    elif beta not in (0.0, 0.5) or torch_tracing() or forward_ad_active():
        return None
    else:
        out = _probability_node().apply(x, y, beta, axis)
    return _finite_or_none(out)


def _probability_value64(
    x: Any, y: Any, beta: float, axis: int, need: tuple[bool, bool] = (False, False)
) -> Any:
    r""":math:`L_\beta` of the probabilities `x`, `y` in float64 and the factors of its
    gradients that `need` asks for (:func:`_kl_value64`, :func:`_js_factors`)."""
    if beta == 0.0:
        return _kl_value64(x, y, axis, need)
    import torch

    p, q = x.detach().to(torch.float64), y.detach().to(torch.float64)
    value = _jsd_torch(p.log(), q.log(), beta=beta, axis=axis, grad=False)[0]
    return value, _js_factors(p, q, need, x.dtype)


def _js_factors(p: Any, q: Any, need: tuple[bool, bool], dtype: Any) -> tuple[Any, Any]:
    r"""JS's gradient factors of float64 probabilities, in `dtype`: :math:`\tfrac12 \log(p/m)`
    and :math:`\tfrac12 \log(q/m)`, :math:`m = (p + q)/2`, each 0 where the distribution's
    own mass is 0 (the formulas' convention), by :func:`_log_ratio64` of :math:`a` and
    :math:`m` (:math:`a - m` is exact where they are close)."""
    if not (need[0] or need[1]):
        return None, None
    m = (p + q).mul_(0.5)
    out = []
    for own, needed in ((p, need[0]), (q, need[1])):
        f = None
        if needed:
            f = _log_ratio64(own, m)[0].mul_(0.5).masked_fill_(own == 0, 0.0).to(dtype)
        out.append(f)
    return out[0], out[1]


def _log_ratio64(a: Any, b: Any) -> tuple[Any, Any]:
    r""":math:`\log(a/b)` of non-negative float64 tensors as :math:`\operatorname{sign}(a - b)
    \operatorname{log1p}(|a - b| / \min(a, b))` (:math:`-\log(b/a)` for :math:`a < b`): a few
    ulps however close or far (:math:`a - b` is exact for float32 inputs within
    :math:`2^{29}` of each other; a plain :math:`\operatorname{log1p}((a - b)/b)` is
    :math:`-\infty` where :math:`a/b` is below :math:`\epsilon_{64}`), and the difference
    :math:`a - b`. :math:`a = 0` gives :math:`-\infty`, :math:`b = 0 < a` :math:`+\infty`."""
    import torch

    diff = a - b
    return diff.abs().div_(torch.minimum(a, b)).log1p_().copysign_(diff), diff


def _kl_value64(x: Any, y: Any, axis: int, need: tuple[bool, bool] = (False, False)) -> Any:
    r""":math:`\mathrm{KL}(p\|q) = \sum_k p_k d_k` of the probabilities `x`, `y` (as given) in
    float64, with the factors of its gradients that `need` asks for, in the inputs' dtype.

    With :math:`r = p - q` and :math:`d = \log(p/q)` (:func:`_log_ratio64`: a few ulps however
    close or far), the sum is taken as :math:`\sum_k (p_k d_k - r_k) + \sum_k r_k`,
    whose terms :math:`p\,\psi(d) \ge 0` have relative error :math:`\approx 2\epsilon_{64}/|d|`
    (rows :math:`10^{-6}` apart keep about :math:`10^{-10}`). No mass (:math:`p_k = 0`) gives
    the term :math:`q_k`, and :math:`q_k = 0 < p_k` :math:`+\infty` (0 · ∞ read as 0 only where
    :math:`p_k = 0`). The gradient factors are :math:`\partial/\partial p = d + 1` and
    :math:`\partial/\partial q = -p/q`, both 0 where :math:`p_k = 0`. Half the time of the
    two float64 logarithms and :math:`\psi` of :func:`_jsd_torch` this replaces.
    """
    import torch

    p, q = x.detach().to(torch.float64), y.detach().to(torch.float64)
    d, r = _log_ratio64(p, q)
    grads = (
        (d + 1.0).nan_to_num_(nan=0.0, neginf=0.0).to(x.dtype) if need[0] else None,
        torch.div(x, y).nan_to_num_(nan=0.0).neg_() if need[1] else None,
    )
    terms = d.mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sub_(r)
    return terms.sum(dim=axis) + r.sum(dim=axis), grads


@functools.cache
def _probability_node() -> Any:
    """The ``autograd.Function`` of :func:`_of_probabilities` for tracked probabilities."""
    import torch

    class ProbabilityDivergence(torch.autograd.Function):
        """KL / JS of probabilities: the value and the gradient factors by
        :func:`_probability_value64` (kept for a first backward), second derivatives by
        :func:`_probability_gradients`."""

        @staticmethod
        def forward(ctx: Any, x: Any, y: Any, beta: float, axis: int) -> Any:
            need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            value, (gp, gq) = _probability_value64(x, y, beta, axis, need)
            ctx.save_for_backward(x, y)
            ctx.beta, ctx.axis, ctx.factors = beta, axis, (gp, gq)
            return value

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, ...]:
            x, y = ctx.saved_tensors
            up = g.unsqueeze(ctx.axis)
            if torch.is_grad_enabled():  # double backward: differentiable operations
                gp, gq = _probability_gradients(x, y, ctx.beta)
                up = up.to(gp.dtype)
            else:
                gp, gq = ctx.factors
                up = up.to(x.dtype)
            need = ctx.needs_input_grad
            return (
                (gp * up).sum_to_size(x.shape).to(x.dtype) if need[0] else None,
                (gq * up).sum_to_size(y.shape).to(y.dtype) if need[1] else None,
                None,
                None,
            )

    return ProbabilityDivergence


def _probability_gradients(x: Any, y: Any, beta: float) -> tuple[Any, Any]:
    r"""The gradient factors of :func:`_probability_value64` by differentiable float64
    operations (no NaN reaches a branch not taken): KL :math:`\log(p/q) + 1` and :math:`-p/q`,
    0 where :math:`p = 0`; JS :math:`\tfrac12 \log(p/m)` and :math:`\tfrac12 \log(q/m)`
    (:func:`half_mixture_log_ratio`: exact derivatives), each 0 where its own mass is 0."""
    import torch

    p, q = torch.broadcast_tensors(x.to(torch.float64), y.to(torch.float64))
    zero = torch.zeros_like(p)
    if beta == 0.0:
        mass = p > 0
        ps, qs = torch.where(mass, p, 1.0), torch.where(mass, q, 1.0)
        return torch.where(mass, ps.log() - qs.log() + 1.0, zero), torch.where(mass, -ps / qs, zero)
    xp = _torch_namespace()
    half = []
    for own, other in ((p, q), (q, p)):
        none = own == 0  # own masked there (its log ratio, -inf, had infinite derivatives)
        log_ratio = half_mixture_log_ratio(torch.where(none, other, own), other, xp=xp)
        half.append(torch.where(none, zero, 0.5 * log_ratio))
    return half[0], half[1]


def _logits_value64(x: Any, y: Any, beta: float, axis: int) -> Any:
    r""":math:`L_\beta` of the logits `x`, `y` (untracked values) by :func:`_jsd_torch` in
    float64."""
    import torch

    log_p = x.detach().to(torch.float64).log_softmax(axis)
    log_q = y.detach().to(torch.float64).log_softmax(axis)
    return _jsd_torch(log_p, log_q, beta=beta, axis=axis, grad=False)[0]


def _wide_gradients(
    x: Any, y: Any, beta: float, axis: int, g: Any, need: tuple[bool, bool]
) -> tuple[Any, Any]:
    r"""`g` times the gradients of :math:`L_\beta` (:math:`\beta` 0 or 1/2) for the logits
    `x` (of P) and `y` (of Q), in float64, by differentiable operations; each only where
    `need` asks for it (None otherwise: a teacher's logits need none).

    Both are the closed form of :func:`_jsd_gradient` for the second distribution's logits:
    for `y` directly, for `x` with the roles swapped (:math:`\mathrm{KL}(P\|Q) = L_1(Q,
    P)`, JS symmetric): :math:`Q - P` and :math:`P (d' - \sum_k P_k d'_k)`, :math:`d' =
    d - d_*` shifted at P's most probable class (so that a peaked row's entry there, whose
    exact value is :math:`1 - P_*` times smaller than the terms, is a sum of the others'
    terms: at :math:`1 - P_* = 10^{-21}` the direct :math:`P_*(d_* - \mathrm{KL})` came out 0
    where it is :math:`-5 \cdot 10^{-20}`, 0.9 of the row's norm, even in float64).
    """
    import torch

    lp = x.to(torch.float64).log_softmax(axis)
    lq = y.to(torch.float64).log_softmax(axis)
    lp, lq = (torch.movedim(t, axis, -1) for t in torch.broadcast_tensors(lp, lq))
    xp = array_namespace(lp)

    def grad_of(student: Any, teacher: Any, b: float, like: Any) -> Any:
        """The gradient for `student`'s logits, summed to `like`'s shape."""
        if student.shape[-1] == 0:  # no outcomes (argmax has no maximum)
            return torch.zeros_like(like)
        out = _jsd_gradient(teacher, student, beta=b, axis=-1, xp=xp, scale=g)
        return torch.movedim(out, -1, axis).sum_to_size(like.shape)

    gx = grad_of(lp, lq, 1.0 - beta, x) if need[0] else None
    gy = grad_of(lq, lp, beta, y) if need[1] else None
    return gx, gy


def _logit_gradients_in_place(
    x: Any, y: Any, beta: float, axis: int, g: Any, need: tuple[bool, bool]
) -> tuple[Any, Any]:
    r""":func:`_wide_gradients` for logits of one shape, in place in float64 (a first
    backward), the same closed forms as the array-API :func:`_jsd_gradient` (whose infinite
    cases finite float64 log-softmaxes do not meet) in a third to a sixth of its time at 1024 x
    1000: no ``where`` over the array, and the top classes from the float32 logits' ``max``
    (``argmax`` of float64 was 3.4 ms a call).

    KL (:math:`\beta = 0`): :math:`Q - P`, its entry at Q's most probable class from the
    others (:func:`_top_balanced`), and :math:`P (d' - \sum_k P_k d'_k)`, :math:`d = \log P -
    \log Q`. JS (:math:`\beta = 1/2`): :math:`\tfrac12 Q (r' - \sum_k Q_k r'_k)` with
    :math:`r = -\operatorname{log1p}(\tfrac12 \operatorname{expm1}(d))` (exact however
    close the rows; :math:`d` capped at 700, where :math:`Q \le e^{-700}` makes the term
    vanish), and the same for P with :math:`-d`. Primes: shifted by the value at the
    distribution's most probable class (whose entry is then a sum of the others' terms).
    """
    import torch

    up = g.unsqueeze(axis).to(torch.float64)
    lp = x.detach().to(torch.float64).log_softmax(axis)
    lq = y.detach().to(torch.float64).log_softmax(axis)
    p = lp.exp()
    star_q = y.detach().max(dim=axis, keepdim=True)[1] if need[1] else None
    star_p = x.detach().max(dim=axis, keepdim=True)[1] if need[0] else None

    def centred(r: Any, s: Any, star: Any, factor: Any) -> Any:
        r""":math:`s (r' - \sum_k s_k r'_k)` times `factor`, in `r`."""
        r.sub_(r.gather(axis, star))
        return r.sub_((s * r).sum(dim=axis, keepdim=True)).mul_(s).mul_(factor)

    gx = gy = None
    if beta == 0.0:
        if star_q is not None:
            gy = _top_balanced(lq.exp().sub_(p), star_q, axis, out=True).mul_(up)
        if star_p is not None:
            gx = centred(lp.sub_(lq), p, star_p, up)
    else:  # 1/2
        d = lp.sub_(lq)
        half = up * 0.5
        if star_q is not None:
            r = d.clamp(max=700.0).expm1_().mul_(0.5).log1p_().neg_()
            gy = centred(r, lq.exp(), star_q, half)
        if star_p is not None:
            r = d.neg_().clamp_(max=700.0).expm1_().mul_(0.5).log1p_().neg_()
            gx = centred(r, p, star_p, half)
    return (None if gx is None else gx.to(x.dtype)), (None if gy is None else gy.to(y.dtype))


@functools.cache
def _wide_divergence() -> Any:
    """The ``autograd.Function`` of :func:`jsd_in_float64`'s tracked path (defined once, on
    first use: this module imports without PyTorch)."""
    import torch

    class WideDivergence(torch.autograd.Function):
        """KL / JS of finite float32-or-narrower logits: the value by :func:`_jsd_torch` in
        float64, the gradient by :func:`_wide_gradients` (recorded under ``create_graph``)."""

        @staticmethod
        def forward(ctx: Any, x: Any, y: Any, beta: float, axis: int) -> Any:
            ctx.save_for_backward(x, y)
            ctx.beta, ctx.axis = beta, axis
            return _logits_value64(x, y, beta, axis)

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, ...]:
            x, y = ctx.saved_tensors
            need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if x.shape == y.shape and x.shape[ctx.axis] and not torch.is_grad_enabled():
                gx, gy = _logit_gradients_in_place(x, y, ctx.beta, ctx.axis, g, need)
            else:  # broadcast logits, a double backward: differentiable operations
                gx, gy = _wide_gradients(x, y, ctx.beta, ctx.axis, g, need)
            gx = None if gx is None else gx.to(x.dtype)
            return gx, None if gy is None else gy.to(y.dtype), None, None

    return WideDivergence


def cross_entropy_of_logits(x: Array, y: Array, *, axis: int) -> Array | None:
    r""":math:`H(P, Q) = -\sum_k P_k \log Q_k` of the PyTorch logits `x` (of P) and `y` (of
    Q) along `axis`, eager on the CPU; None for other inputs and where the result is not
    finite (a class Q rules out, a NaN: the array-API formulas give those their values).

    With :math:`u = y - y_*` relative to Q's most probable class (:math:`u_* = 0`, the
    others negative),

    .. math:: H(P, Q) = \operatorname{log1p}\Bigl(\sum_{j \ne *} e^{u_j}\Bigr)
              - \sum_k P_k u_k,

    a sum of two non-negative terms (no cancellation: a peaked pair keeps its small
    cross-entropy), from one exponential pass per distribution and an unnormalized
    :math:`\sum_k e^{x_k - x_\star} u_k` divided per row, where the array-API formulas form
    two log-softmaxes, :math:`e^{\log P}` and a product with its ``where`` corrections.
    Tracked inputs get one autograd node (:func:`_cross_entropy_node`) with the gradients in
    closed form. At 1024 x 1000 (1 thread): 1.5x PyTorch's
    ``-(softmax(x) * log_softmax(y)).sum(-1)`` without a gradient, 1.3x with both (3.0x and
    3.2x through the formulas).
    """
    import torch

    if not (
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and x.is_cpu
        and y.is_cpu
        and x.shape[axis] > 0
        and not torch_tracing()
        and not forward_ad_active()
    ):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        out = _cross_entropy_node().apply(x, y, axis)
    else:
        out = _cross_entropy_value(x, y, axis)[0]
    return _finite_or_none(out)


def _finite_or_none(out: Any) -> Any:
    """`out`, or None where an entry is not finite (the array-API formulas then give the
    values and derivatives); one sum read back (a sum that overflows: the formulas too)."""
    return out if math.isfinite(out.detach().sum().item()) else None


def _cross_entropy_value(x: Any, y: Any, axis: int, *, keep: bool = False) -> Any:
    """:func:`cross_entropy_of_logits`' value, untracked (in place on its own temporaries);
    with `keep` also what :func:`_cross_entropy_backward` reads (logits of one shape)."""
    import torch

    x, y = x.detach(), y.detach()
    y_top, u, log_s, star_q = _peak_statistics(y, axis)
    log_s += y_top - y_top  # NaN where Q is no distribution (a row of -inf, or +inf)
    if keep:  # the max with its index: 2.5x amax, still a third of argmax
        x_top, star_p = x.max(dim=axis, keepdim=True)
    else:
        x_top, star_p = x.amax(dim=axis, keepdim=True), None
    v = (x - x_top).exp_()  # P times its row's normalizer, `mass`
    mass = v.sum(dim=axis, keepdim=True)
    pu = torch.mul(v, u) if keep or v.shape != u.shape else v.mul_(u)
    mean_u = pu.sum(dim=axis, keepdim=True).div_(mass)  # sum_k P_k u_k
    value = (log_s - mean_u).squeeze(axis)
    return value, ((u, v, mass, log_s, mean_u, star_q, star_p) if keep else None)


def _cross_entropy_backward(parts: tuple[Any, ...], g: Any, axis: int) -> tuple[Any, Any]:
    r"""`g` times both gradients of :func:`cross_entropy_of_logits` from the forward's saved
    parts, in place (a first backward; :func:`_cross_entropy_gradients` is the differentiable
    form): :math:`Q - P = e^{u - \log S} - v / m` and :math:`P (\bar u - u)`, with
    :math:`v = e^{x - x_*}`, :math:`m = \sum v`, :math:`S = \sum e^u`, :math:`\bar u = \sum P u`,
    each row's entry at its most probable class from the others (:func:`_top_balanced`)."""
    u, v, mass, log_s, mean_u, star_q, star_p = parts
    up = g.unsqueeze(axis)
    per_p = up / mass
    gy = u.exp().mul_(up * (-log_s).exp_()).addcmul_(v, per_p, value=-1.0)
    gx = (mean_u - u).mul_(v).mul_(per_p)
    return _top_balanced(gx, star_p, axis, out=True), _top_balanced(gy, star_q, axis, out=True)


def _top_balanced(g: Any, star: Any, axis: int, *, out: bool = False, plus: Any = None) -> Any:
    """`g` with its entry at `star` (one per row) replaced by minus the sum of the row's other
    entries (`plus` that): the exact value of a gradient whose rows sum to 0, where that entry's
    own formula is a difference of numbers near 1. PyTorch's differentiable operations; with
    `out`, in place. The array-API twin is in :func:`_jsd_gradient`."""
    shape = list(g.shape)
    shape[axis] = 1
    if list(star.shape) != shape:  # `g` broadcast beyond the distribution `star` indexes
        star = star.expand(shape)
    others = g.scatter_(axis, star, 0.0) if out else g.scatter(axis, star, 0.0)
    top = others.sum(dim=axis, keepdim=True).neg_()
    top = top if plus is None else plus + top
    return others.scatter_(axis, star, top) if out else others.scatter(axis, star, top)


def _cross_entropy_gradients(
    x: Any, y: Any, axis: int, g: Any, need: tuple[bool, bool]
) -> tuple[Any, Any]:
    r"""`g` times the gradients of :func:`cross_entropy_of_logits` for `x` and `y` (where
    `need` asks), by differentiable operations (recorded under ``create_graph``: second
    derivatives of the closed form):

    .. math:: \frac{\partial H}{\partial y} = Q - P, \qquad
              \frac{\partial H}{\partial x_k} = -P_k \Bigl(u_k - \sum_j P_j u_j\Bigr),

    each row's entry at its distribution's most probable class formed as minus the sum of
    the others (:func:`_top_balanced`; the rows sum to 0)."""
    import torch

    up = g.unsqueeze(axis)
    p = torch.softmax(x, dim=axis)
    gx = gy = None
    if need[1]:
        d = torch.softmax(y, dim=axis) - p
        star = y.argmax(dim=axis, keepdim=True)
        gy = (_top_balanced(d, star, axis) * up).sum_to_size(y.shape)
    if need[0]:
        u = y - y.amax(dim=axis, keepdim=True)
        centred = u - (p * u).sum(dim=axis, keepdim=True)
        star = x.argmax(dim=axis, keepdim=True)
        gx = (_top_balanced(-(p * centred), star, axis) * up).sum_to_size(x.shape)
    return gx, gy


@functools.cache
def _cross_entropy_node() -> Any:
    """The ``autograd.Function`` of :func:`cross_entropy_of_logits` for tracked logits
    (defined once, on first use: this module imports without PyTorch)."""
    import torch

    class CrossEntropyOfLogits(torch.autograd.Function):
        """H(P, Q) of logits: the value untracked, the gradients by
        :func:`_cross_entropy_gradients`."""

        @staticmethod
        def forward(ctx: Any, x: Any, y: Any, axis: int) -> Any:
            keep = x.shape == y.shape
            value, parts = _cross_entropy_value(x, y, axis, keep=keep)
            ctx.save_for_backward(x, y, *(parts or ()))
            ctx.axis = axis
            return value

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, ...]:
            x, y, *parts = ctx.saved_tensors
            need = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if parts and not torch.is_grad_enabled():  # a first backward: in place
                gx, gy = _cross_entropy_backward(tuple(parts), g, ctx.axis)
                return (gx if need[0] else None), (gy if need[1] else None), None
            gx, gy = _cross_entropy_gradients(x, y, ctx.axis, g, need)
            return gx, gy, None

    return CrossEntropyOfLogits


def xlogy_of_probabilities(x: Array, a: Array) -> Array | None:
    r""":math:`x \log a` of checked probabilities (both in [0, 1]: the caller's value checks
    ran) as PyTorch tensors, eager: PyTorch's ``xlogy`` kernel (0 where :math:`x = 0`,
    :math:`-\infty` where only :math:`a = 0`, NaN propagating: the values of the array-API
    ``xlogy`` and ``info._xlog`` on such inputs, in one pass instead of about ten), with a
    gradient through one node (:func:`_xlogy_node`): :math:`\log a` and :math:`x / a`, both 0
    where :math:`a = 0` (those formulas' conventions there: a mass on an impossible outcome
    has an infinite, constant term; no mass has a zero one). None for other inputs (traced,
    forward-mode AD, not tensors). `x` and `a` may be one tensor (an entropy) or broadcast.
    """
    import torch

    if not (
        isinstance(x, torch.Tensor)
        and isinstance(a, torch.Tensor)
        and not torch_tracing()
        and not forward_ad_active()
    ):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        out: Array = _xlogy_node().apply(x, a)
        return out
    return torch.xlogy(x, a)


@functools.cache
def _xlogy_node() -> Any:
    """The ``autograd.Function`` of :func:`xlogy_of_probabilities` (defined on first use)."""
    import torch

    class XLogY(torch.autograd.Function):
        """x log a: PyTorch's kernel for the value, the derivatives of the formulas."""

        @staticmethod
        def forward(ctx: Any, x: Any, a: Any) -> Any:
            ctx.save_for_backward(x, a)
            return torch.xlogy(x, a)

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, Any]:
            x, a = ctx.saved_tensors
            # a = 0 replaced before the log and the division (also for a double backward:
            # no 0 / 0 behind the where); NaN propagates
            zero = a == 0
            safe = torch.where(zero, 1.0, a)
            gx = gy = None
            if ctx.needs_input_grad[0]:  # log 1 = 0 where a = 0
                gx = (g * safe.log()).sum_to_size(x.shape)
            if ctx.needs_input_grad[1]:
                gy = (g * torch.where(zero, 0.0, x / safe)).sum_to_size(a.shape)
            return gx, gy

    return XLogY


# ----------------------------------------------------------------------------
# The array-API implementation (every backend, autodiff)
# ----------------------------------------------------------------------------


def _jsd_generic(
    log_p: Array,
    log_q: Array,
    *,
    beta: float,
    axis: int,
    grad: bool,
    xp: Any,
    scale: float | Array = 1.0,
    d: Array | None = None,
) -> tuple[Array, Array | None]:
    r"""The loss along `axis` and, with `grad`, `scale` times its gradient for Q's logits
    (:func:`_jsd_gradient`). `d`, when given, is :math:`\log P - \log Q` formed more
    accurately than the difference of the logs (:func:`log_ratio_from_logits`): the terms
    are then summed from it (:func:`mixture_terms`), and so is the gradient."""
    log_m = None
    if d is not None:
        loss = xp.sum(mixture_terms(log_p, log_q, d, beta=beta, xp=xp), axis=axis)
    elif beta == 0.0:
        loss = xp.sum(rel_entr_from_log(log_p, log_q, xp=xp), axis=axis)
    else:
        log_m = log_p if beta == 1.0 else log_mixture(log_p, log_q, beta=beta, xp=xp)
        kl_q = xp.sum(rel_entr_from_log(log_q, log_m, xp=xp), axis=axis)
        if beta == 1.0:
            loss = kl_q
        else:
            kl_p = xp.sum(rel_entr_from_log(log_p, log_m, xp=xp), axis=axis)
            loss = beta * kl_p + (1.0 - beta) * kl_q
    if not grad:
        return loss, None
    g = _jsd_gradient(log_p, log_q, beta=beta, axis=axis, xp=xp, scale=scale, log_m=log_m, d=d)
    return loss, g


def mixture_terms(log_p: Array, log_q: Array, d: Array, *, beta: float, xp: Any) -> Array:
    r"""The terms of :math:`L_\beta(P, Q)` per outcome, from the log-probabilities and an
    accurate :math:`d = \log P - \log Q` (:func:`log_ratio_from_logits`): summed, the loss.

    :math:`\beta = 0`: :func:`rel_entr_from_log` of :math:`(P, Q)` with `d`; :math:`\beta = 1`:
    of :math:`(Q, P)` with :math:`-d`; in between :math:`\beta` times that of :math:`(P, M)`
    plus :math:`1-\beta` times that of :math:`(Q, M)`, their log ratios from `d` by
    :func:`mixture_log_ratios` (to a few ulps; :math:`\log P - \log M` rounds at the size of
    the logs), with the derivatives of the differences of the logs (:func:`value_from`: their
    :math:`\log M` terms cancel, as in a peaked row's gradient). Each term keeps the relative
    accuracy of `d` (:func:`expm1_plus`), so rows :math:`10^{-5}` apart keep a float32 loss
    to a few ulps (it was 0.5 % off, summed from the differences of the logs).
    """
    if beta == 0.0:
        return rel_entr_from_log(log_p, log_q, d=d, xp=xp)
    if beta == 1.0:
        return rel_entr_from_log(log_q, log_p, d=-d, xp=xp)
    log_m = log_mixture(log_p, log_q, beta=beta, xp=xp)
    r, s = mixture_log_ratios(d, beta=beta, xp=xp)
    lp, lq, lm = xp.broadcast_arrays(log_p, log_q, log_m)
    r = value_from(r, difference(lp, lm, xp=xp), xp=xp)
    s = value_from(s, difference(lq, lm, xp=xp), xp=xp)
    terms_p = rel_entr_from_log(log_p, log_m, d=r, xp=xp)
    terms_q = rel_entr_from_log(log_q, log_m, d=s, xp=xp)
    if beta == 0.5:
        return (terms_p + terms_q) / 2
    return beta * terms_p + (1.0 - beta) * terms_q


def _jsd_gradient(
    log_p: Array,
    log_q: Array,
    *,
    beta: float,
    axis: int,
    xp: Any,
    scale: float | Array = 1.0,
    log_m: Array | None = None,
    d: Array | None = None,
) -> Array:
    r"""`scale` times the gradient of :math:`L_\beta` for Q's logits, without the loss (the
    closed-form backward of :func:`_wide_divergence` needs only this: forming the loss too
    made its backward 3x slower); `log_m`, the mixture's log, when the caller has it.

    With `d` (:func:`_jsd_generic`) the log ratio :math:`r` comes from it: :math:`-d`
    (:math:`\beta = 1`), :func:`mixture_log_ratios` (in between), and :math:`Q - P` is
    :math:`-Q \operatorname{expm1}(d)` where :math:`|d| \le 1`: each accurate to a few ulps
    where the rows are close (the differences of the probabilities or of their logs round at
    their size: float32 gradients of rows :math:`10^{-5}` apart were 2–10 % off)."""
    if beta == 0.0:
        # Q - P, the entry at Q's most probable class as minus the sum of the others: a
        # difference of two numbers near 1 where both rows peak there, rounded at 1
        q = xp.exp(log_q)
        g = q - xp.exp(log_p)
        if d is not None:
            close = xp.abs(d) <= 1.0  # not NaN nor infinite
            g = xp.where(close, -q * xp.expm1(xp.where(close, d, xp.zeros_like(d))), g)
        star = xp.argmax(log_q, axis=axis, keepdims=True)
        top = _is_index(star, g.shape[axis], axis=axis, xp=xp)
        others = xp.where(top, xp.zeros_like(g), g)
        g = xp.where(top, -xp.sum(others, axis=axis, keepdims=True), others)
        return g * _row_factor(scale, axis, xp=xp)
    if log_m is None:
        log_m = log_p if beta == 1.0 else log_mixture(log_p, log_q, beta=beta, xp=xp)
    coef = 1.0 if beta == 1.0 else 1.0 - beta
    q = xp.exp(log_q)
    off = None
    if beta == 1.0:
        # r = 0 where Q = 0 (Q r = 0 there), also where Q underflowed from a finite log Q
        # (a tiny temperature): r - r_* overflowed there, and 0 * -inf made the gradient NaN
        zero = q == 0
        # log M = log P, -inf on a class the teacher rules out (the only -inf of M)
        off = (log_m == -math.inf) & ~zero
        cut = zero | off  # r_k = log Q_k there: P_k = e^c, c = 0
        r = xp.where(zero, xp.zeros_like(log_q), log_q - xp.where(cut, xp.zeros_like(log_m), log_m))
        if d is not None:
            r = xp.where(cut | ~xp.isfinite(d), r, -d)
    else:  # r = -log1p(beta (P / Q - 1)) (module docstring), as _jsd_torch forms it
        p = xp.exp(log_p)
        # P / Q where its derivative -P / Q² (recorded for a double backward) stays finite;
        # for a smaller, nonzero Q, e^(log P - log Q) (its derivative is itself): the zero a
        # where passes to -P / Q² = -inf made a float32 JS's second derivatives NaN where a
        # probability is below e^-354 (logits 400 apart), as rounding's 0 they are
        normal = q >= math.sqrt(float(xp.finfo(q.dtype).smallest_normal))
        small = (q > 0) & ~normal
        if d is not None:  # r from d below, but where Q = 0: P / Q is not formed there at
            # all (for a double backward, as above)
            normal = normal & ~(d < math.inf)
            small = small & (d < math.inf)
        y = beta * (p / xp.where(normal, q, xp.ones_like(q))) - beta
        big = xp.full_like(y, xp.finfo(y.dtype).max)  # Q = 0 < P: a finite r, times Q = 0
        with quiet(xp, "over", "invalid"):  # beyond the range: big, as Q = 0 (-inf - -inf:
            # a class both rule out, not small)
            tiny_q = beta * xp.expm1(xp.where(small, log_p - log_q, xp.zeros_like(y)))
        tiny_q = xp.where(tiny_q < big, tiny_q, big)
        y = xp.where(normal, y, xp.where(small, tiny_q, xp.where(p > 0, big, xp.zeros_like(y))))
        r = -xp.log1p(xp.where(xp.isnan(y), xp.zeros_like(y), y))
        if d is not None:  # log Q - log M from d, but where Q = 0 (d = +inf) or NaN (a class
            # both rule out: d = -inf - -inf), d replaced there (recorded for a double backward,
            # the derivatives at NaN are NaN, and the where's zero does not cancel them)
            finite = d < math.inf
            ratio = mixture_log_ratios(xp.where(finite, d, xp.zeros_like(d)), beta=beta, xp=xp)
            r = xp.where(finite, ratio[1], r)
    star = xp.argmax(log_q, axis=axis, keepdims=True)
    r = r - take_along_axis(r, star, axis=axis, xp=xp)  # r' = r - r_* (module docstring)
    g = q * (r - xp.sum(q * r, axis=axis, keepdims=True))
    if off is not None:
        g = _infinite_limit(g, off, zero, axis=axis, xp=xp)
    return g * (coef * _row_factor(scale, axis, xp=xp))


def _infinite_limit(
    g: Array, off: Array, zero: Array, *, axis: int, xp: Any, factor: Any = None
) -> Array:
    r"""The gradient of a reverse KL that is :math:`+\infty` (`off`: :math:`Q_k > 0 = P_k`).

    It is the limit as the teacher's zeros :math:`P_k = e^c` (:math:`c \to -\infty`, the
    same for each) vanish: :math:`Q_k (r_k - \sum_j Q_j r_j)` has the term
    :math:`-c\,Q_k([k \in Z] - Q_Z)`, :math:`Z` the classes in `off`. Where the student
    also has mass on classes the teacher allows (:math:`Q_Z < 1`) it is :math:`+\infty`
    on :math:`Z`, :math:`-\infty` on the others with :math:`Q_k > 0` and 0 where
    :math:`Q_k = 0` — the direction that lowers the loss; where it has not (disjoint
    supports) the :math:`c` terms cancel and `g`, formed with :math:`\log P_k = 0` on
    :math:`Z`, is the finite limit. (PyTorch's autograd of ``kl_div`` gives
    :math:`\infty - \infty =` NaN on :math:`Z`.) `factor`, when given, multiplies the
    infinities (`g` already has it).
    """
    inside = xp.any(~off & ~zero, axis=axis, keepdims=True)  # Q_Z < 1
    mixed = inside & xp.any(off, axis=axis, keepdims=True)
    inf = xp.full_like(g, math.inf)
    signed = xp.where(off, inf, xp.where(zero, xp.zeros_like(g), -inf))
    if factor is not None:
        signed = signed * factor
    return xp.where(mixed, signed, g)


def _row_factor(scale: float | Array, axis: int, *, xp: Any) -> float | Array:
    """`scale` broadcastable against the class axis (a number stays a number)."""
    if isinstance(scale, int | float):
        return float(scale)
    return xp.expand_dims(scale, axis=axis)


# ----------------------------------------------------------------------------
# The in-place PyTorch implementation (tensors autograd does not track)
# ----------------------------------------------------------------------------


_CLOSE_ROWS = 0.05
r""":func:`refine_close_rows` recomputes the rows whose :math:`L_\beta` is below this, times
:math:`\beta(1-\beta)` for :math:`0 < \beta < 1` (near :math:`d = 0`, :math:`L_\beta \approx
\tfrac12 \beta(1-\beta) \sum_k P_k d_k^2` and the KL :math:`\tfrac12 \sum_k P_k d_k^2`).
Above it the differences of the logs are accurate enough: their rounding,
:math:`\epsilon|\log P_k|`, against :math:`|d_k|` of the size of :math:`\sqrt{2\,\mathrm{KL}}`."""


def refine_close_rows(
    z_p: Any,
    z_q: Any,
    loss: Any,
    g: Any,
    *,
    beta: float,
    xp: Any,
    scale: float | Array = 1.0,
    work: Any = None,
    inv_t: float = 1.0,
) -> tuple[Any, Any]:
    r"""`loss` and `g` (the gradient, or None) of the plain formulas for the logits `z_p`, `z_q`
    times `inv_t` (last axis; untracked PyTorch tensors or NumPy arrays), with the rows whose
    divergence is small computed again more accurately. The logits come undivided: their
    differences are exact where the rows are close, each quotient by a temperature that is
    not a power of two is rounded at its size (taken in float64, or the log ratio formed from
    the logits and then divided: :func:`log_ratio_from_logits`).

    The plain formulas (:func:`_jsd_torch`, :func:`_jsd_generic` without `d`) sum the terms
    from the differences of the log-probabilities, rounded at their size: rows
    :math:`10^{-5}` apart came out 0.5 % off in float32, their gradients 2–10 % (peaked
    rows of 32000 classes with a KL of 1e-3: 2e-3). Only the rows below :data:`_CLOSE_ROWS`
    need more (none, in many batches: one comparison and one host read per call): float32
    and narrower logits are taken to float64, where the same formulas are accurate enough
    for a float32 result (:func:`jsd_in_float64`'s argument; about three times the time of
    those rows in float32); float64 logits go through the array-API formulas with the log
    ratio from the logits (:func:`log_ratio_from_logits`, :func:`mixture_terms`: a few ulps,
    several times slower). `work`: a contiguous PyTorch tensor free to overwrite (the fused
    loop's work space of the row block), the float64 scratch then (:func:`_float64_space`).
    """
    n = z_q.shape[-1]
    torch_ = is_torch_namespace(xp)
    if n == 0 or (torch_ and loss.device.type == "meta"):  # no values
        return loss, g
    tau = _CLOSE_ROWS * (beta * (1.0 - beta) if 0.0 < beta < 1.0 else 1.0)
    rows = xp.nonzero(xp.reshape(loss, (-1,)) < tau)[0]
    if rows.shape[0] == 0:
        return loss, g
    if not torch_:  # NumPy: written into copies (the plain formulas' arrays may be read-only)
        loss = xp.asarray(loss, copy=True)
        g = None if g is None else xp.asarray(g, copy=True)
    flat_loss = loss.view(-1) if torch_ else xp.reshape(loss, (-1,))
    flat_g = None if g is None else g.view(-1, n) if torch_ else xp.reshape(g, (-1, n))
    space = None  # PyTorch float32 and narrower: float64 scratch for _jsd_torch's in-place form
    piece = max(1, flat_loss.shape[0] // 16)
    if torch_ and z_q.dtype is not xp.float64:
        space, piece = _float64_space(work, rows.shape[0], n, z_q.device)
    z_p, z_q = xp.reshape(z_p, (-1, n)), xp.reshape(z_q, (-1, n))
    for i in range(0, rows.shape[0], piece):
        at = rows[i : i + piece]
        part = scale if isinstance(scale, int | float) else xp.reshape(scale, (-1,))[at]
        if space is not None:
            _refined_in_place(
                z_p, z_q, at, flat_loss, flat_g, beta=beta, scale=part, space=space, inv_t=inv_t
            )
            continue
        value, grad = _refined(
            z_p[at, ...], z_q[at, ...], beta=beta, grad=g is not None, xp=xp, scale=part,
            inv_t=inv_t,
        )  # fmt: skip
        if torch_:
            flat_loss.index_copy_(0, at, value.to(flat_loss.dtype))
            if flat_g is not None:
                flat_g.index_copy_(0, at, grad.to(flat_g.dtype))
        else:
            flat_loss[at] = value
            if flat_g is not None:
                flat_g[at, ...] = grad
    return loss, g


_SPACE_BYTES = 1 << 25
"""The float64 scratch :func:`refine_close_rows` allocates when the caller gives none (32 MiB:
about 150 rows of 32000 classes at a time)."""


def _float64_space(work: Any, count: int, n: int, device: Any) -> tuple[Any, int]:
    """Float64 scratch of ``7 * piece * n`` elements for :func:`_refined_in_place`, and the
    rows per piece: the caller's `work` (a contiguous tensor it no longer needs, the fused
    loop's float32 work space of the row block: no memory beyond it) viewed as float64, or
    one allocation for the call (up to :data:`_SPACE_BYTES`)."""
    import torch

    if work is not None and work.is_contiguous() and work.numel() * work.element_size() >= 56 * n:
        flat = work.reshape(-1)
        size = flat.numel() * flat.element_size() // 8
        space = flat[: size * 8 // flat.element_size()].view(torch.float64)
        return space, max(1, min(count, size // (7 * n)))
    piece = max(1, min(count, _SPACE_BYTES // (56 * n)))
    return torch.empty(7 * piece * n, dtype=torch.float64, device=device), piece


def _refined_in_place(
    z_p: Any,
    z_q: Any,
    at: Any,
    loss: Any,
    g: Any,
    *,
    beta: float,
    scale: Any,
    space: Any,
    inv_t: float,
) -> None:
    """:func:`refine_close_rows` of the float32 rows `at` of the PyTorch logits `z_p`, `z_q`
    (2-d) times `inv_t`, written into `loss` and `g` (None: no gradient): :func:`_jsd_torch`
    in float64, every temporary in `space` (:func:`_float64_space`): the rows gathered into
    its last seventh (as float32), the log-softmaxes and the work arrays in the rest."""
    import torch

    rows, n = at.shape[0], z_q.shape[-1]
    buf = space[: 6 * rows * n].view(6, rows, n)
    gathered = space[6 * rows * n : 7 * rows * n].view(torch.float32)
    z32 = gathered[: rows * n].view(rows, n)
    for b, z in ((buf[0], z_p), (buf[1], z_q)):
        b.copy_(torch.index_select(z, 0, at, out=z32))
        torch._log_softmax(b if inv_t == 1.0 else b.mul_(inv_t), -1, False, out=b)
    log_p, log_q = buf[0], buf[1]
    value, grad = _jsd_torch(
        log_p, log_q, beta=beta, axis=-1, grad=g is not None, scale=scale, work=buf[2:]
    )
    loss.index_copy_(0, at, value.to(loss.dtype))
    if g is not None:
        g.index_copy_(0, at, z32.copy_(grad))


def _refined(
    zp: Any, zq: Any, *, beta: float, grad: bool, xp: Any, scale: Any, inv_t: float
) -> Any:
    """:func:`refine_close_rows`' formulas for the rows `zp`, `zq` (teacher, student logits,
    times `inv_t`) where :func:`_refined_in_place` does not serve: float64 logits, NumPy."""
    if zq.dtype == xp.float64:  # the log ratio from the logits (array-API formulas)
        log_q = log_softmax(_times(zq, inv_t), axis=-1, xp=xp, exact_peak=True)
        log_p = log_softmax(_times(zp, inv_t), axis=-1, xp=xp)
        d = log_ratio_from_logits(zp, zq, log_p, log_q, axis=-1, xp=xp, inv_t=inv_t)
        return _jsd_generic(log_p, log_q, beta=beta, axis=-1, grad=grad, xp=xp, scale=scale, d=d)
    # NumPy float32: the same formulas in float64, accurate enough for a float32 result
    log_q = log_softmax(_times(xp.astype(zq, xp.float64), inv_t), axis=-1, xp=xp)
    log_p = log_softmax(_times(xp.astype(zp, xp.float64), inv_t), axis=-1, xp=xp)
    return _jsd_generic(log_p, log_q, beta=beta, axis=-1, grad=grad, xp=xp, scale=scale)


def _times(z: Any, inv_t: float) -> Any:
    """`z` times `inv_t` (a new array; `z` itself for 1)."""
    return z if inv_t == 1.0 else z * inv_t


def in_place(xp: Any, *arrays: Array) -> bool:
    """Whether :func:`jsd_and_grad_from_log` and :func:`generalized_jsd_from_log` run the
    in-place PyTorch formulas on `arrays` (untracked PyTorch tensors, not traced)."""
    return _untracked_torch(xp, *arrays)


def _rel_entr_rows_torch(d: Any, a: Any, b: Any, w: Any, *, b_may_vanish: bool) -> Any:
    r"""Row sums (last axis) of :func:`rel_entr_from_log`'s terms, in a few in-place passes.

    `d` holds :math:`\log a - \log b` (NaN where both logs are :math:`-\infty`)
    and becomes the *clean* log ratio: 0 there, :math:`-\infty` (mass 0)
    replaced by a huge finite negative number, so that :math:`a \cdot d = 0`
    wherever :math:`a = 0`. `a` and `b` are the probabilities, `w` work space.
    The term is :math:`a\,(d + \operatorname{expm1}(-\max(d, -1))) + (b - e\,a)^+`:
    for :math:`d \ge -1` the second part is 0 (:math:`b = a e^{-d} \le e\,a`) and
    the first is :func:`rel_entr_from_log`'s; below, they add up to
    :math:`a(d - 1) + b`. NaN inputs reach the sum through `a` or `b`. With
    `b_may_vanish` (`b` can be 0 where `a` is not: plain KL, not a mixture) such
    a term is :math:`+\infty` even when `a` underflowed.
    """
    import torch

    d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-0.25 * torch.finfo(d.dtype).max)
    torch.clamp(d, min=-1.0, out=w)
    w.neg_().expm1_().add_(d).mul_(a)
    if b_may_vanish:
        w.masked_fill_(d == math.inf, math.inf)
    rows = w.sum(dim=-1)
    torch.add(b, a, alpha=-math.e, out=w).clamp_min_(0.0)
    return rows.add_(w.sum(dim=-1))


def _jsd_torch(
    log_p: Any,
    log_q: Any,
    *,
    beta: float,
    axis: int,
    grad: bool,
    work: Any = None,
    scale: float | Array = 1.0,
    wide: bool = False,
) -> tuple[Any, Any]:
    """:func:`_jsd_generic` for untracked PyTorch tensors: in place, four work arrays.

    With `work` (``(4, *shape)``), `log_p` and `log_q` (same shape, owned by the
    caller) are overwritten by the probabilities, the gradient is left in
    `log_q`, and the work arrays are ``work[0]`` … ``work[3]``; without it six
    arrays are allocated.
    """
    import torch

    log_p, log_q = torch.broadcast_tensors(
        torch.movedim(log_p, axis, -1), torch.movedim(log_q, axis, -1)
    )
    shape, dtype, device = log_p.shape, log_p.dtype, log_p.device

    given = iter(() if work is None else work.unbind(0))

    def empty() -> Any:
        buf = next(given, None)
        return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf

    if work is not None:
        p_buf, q_buf = log_p, log_q
    else:
        p_buf, q_buf = empty(), empty()
    d, w = empty(), empty()

    def factor(coef: float) -> Any:
        """`coef` times `scale`, broadcastable against the rows (None for 1)."""
        if isinstance(scale, int | float):
            return None if coef * scale == 1.0 else coef * float(scale)
        return (scale * coef)[..., None]

    if beta == 0.0:  # KL(P || Q): a = P, b = Q
        torch.sub(log_p, log_q, out=d)
        torch.exp(log_p, out=p_buf)
        torch.exp(log_q, out=q_buf)
        loss = _rel_entr_rows_torch(d, p_buf, q_buf, w, b_may_vanish=True)
        g = None
        if grad:  # Q - P, at Q's most probable class minus the others' sum (_jsd_generic)
            star = q_buf.argmax(-1, keepdim=True)
            g = _top_balanced(q_buf.sub_(p_buf), star, -1, out=True)
            if (f := factor(1.0)) is not None:
                g.mul_(f)
    else:
        kl_p = off = zero = log_q_off = None
        if beta == 1.0:  # KL(Q || P): a = Q, b = P
            torch.sub(log_q, log_p, out=d)
            # Q_k > 0 = P_k (an infinite loss) and Q_k = 0: _infinite_limit; on the CPU only
            # where the teacher rules a class out (one pass; as _chunked, no sync elsewhere;
            # an empty batch has none)
            if grad and (
                log_p.device.type != "cpu" or (log_p.numel() and not bool(log_p.amin() > -math.inf))
            ):
                zero = log_q == -math.inf
                off = (log_p == -math.inf) & ~zero
                log_q_off = torch.where(off, log_q, 0.0)  # log_q is overwritten below
            m_buf = torch.exp(log_p, out=p_buf)
        else:
            log_m, m_buf = empty(), empty()
            if beta == 0.5:
                torch.logaddexp(log_p, log_q, out=log_m).sub_(math.log(2.0))
            else:
                torch.add(log_p, math.log(beta), out=log_m)
                torch.add(log_q, math.log1p(-beta), out=d)
                torch.logaddexp(log_m, d, out=log_m)
            torch.exp(log_m, out=m_buf)
            torch.sub(log_p, log_m, out=d)
            torch.exp(log_p, out=p_buf)
            kl_p = _rel_entr_rows_torch(d, p_buf, m_buf, w, b_may_vanish=False)
            torch.sub(log_q, log_m, out=d)
        torch.exp(log_q, out=q_buf)
        kl_q = _rel_entr_rows_torch(d, q_buf, m_buf, w, b_may_vanish=beta == 1.0)
        loss = kl_q if kl_p is None else kl_p.mul_(beta).add_(kl_q, alpha=1.0 - beta)
        g = None
        if off is not None and log_q_off is not None:
            torch.where(off, log_q_off, d, out=d)  # r_k = log Q_k where P_k = 0 (c = 0)
        if grad:  # c Q (r' - sum Q r'), r' = r - r_* (0 where Q = 0; module docstring)
            if kl_p is not None:  # 0 < beta < 1: r = -log1p(beta (P / Q - 1))
                # P / Q is inf at Q = 0 < P (a finite r, times Q = 0) and NaN at P = Q = 0
                torch.addcdiv(d.new_full((), -beta), p_buf, q_buf, value=beta, out=d)
                d.nan_to_num_(nan=0.0, posinf=torch.finfo(dtype).max).log1p_().neg_()
            d.sub_(d.gather(-1, log_q.argmax(-1, keepdim=True)))
            if wide:  # r_k - r_* beyond the range where Q_k = 0 (jsd_and_grad_from_log)
                d.clamp_(min=torch.finfo(dtype).min)
            torch.mul(q_buf, d, out=w)
            d.sub_(w.sum(-1, keepdim=True))
            # Q times the factor first: d holds -max/4 where Q = 0 (beta = 1), which a factor
            # of 1 / T (1e20 at T = 1e-20) took to -inf, and 0 * -inf made the gradient NaN
            if (f := factor(1.0 if beta == 1.0 else 1.0 - beta)) is not None:
                q_buf.mul_(f)
            g = q_buf.mul_(d)
            if off is not None:
                g.copy_(_infinite_limit(g, off, zero, axis=-1, xp=torch, factor=f))  # in q_buf
    if g is not None:
        g = torch.movedim(g, -1, axis)
    return loss, g
