r"""Information measures of discrete distributions: surprisal, entropy, cross-entropy, KL, JS.

Distributions lie along `axis` (default the last). Every function takes any
array-API array (NumPy, PyTorch, JAX, ...) and returns the same kind of array
on the same device; float16 and bfloat16 are computed in float32 and returned
in their own dtype (float32 under ``torch.autocast``, as PyTorch's losses).
``base=None`` gives nats, ``base=2`` bits, any positive base other than 1 its
own unit: the value in nats divided by :math:`\ln b`.

Conventions, the same everywhere:

* :math:`0 \log 0 = 0` and :math:`0 \log(0/q) = 0`: mass 0 contributes 0, with
  a finite value and a finite (NaN-free) gradient.
* Positive mass on an impossible event (:math:`p > 0`, :math:`q = 0`) gives
  :math:`+\infty` for cross-entropy and KL divergence.
* Inputs must be probabilities in [0, 1] (checked while
  :func:`crossent.get_validation` is on). They are taken as given, not
  renormalized: pass distributions that sum to 1 (``scipy.stats.entropy``
  renormalizes, these functions do not).
* With ``from_logits=True`` (:func:`entropy`, :func:`cross_entropy`,
  :func:`kl_divergence`, :func:`js_divergence`) every distribution argument is
  given as logits, unnormalized log-probabilities along `axis`; a logit of
  :math:`-\infty` is an impossible outcome. The measure is then computed from
  :math:`\log p = z - \operatorname{lse}(z)` and never from a probability that
  may have underflowed, so the value and its gradient are finite wherever the
  true value is finite, whatever the logit gaps. :math:`\log p` is formed
  relative to the most probable outcome :math:`*`, :math:`\log p_k = (z_k - z_*)
  - \operatorname{log1p}(\sum_{j \ne *} e^{z_j - z_*})`, on every backend: a
  peaked distribution keeps :math:`\log p_* \approx -(1 - p_*)` to full
  relative accuracy, and autodiff reaches :math:`z_*` only through the other
  outcomes, so the gradient of a peaked row is accurate too.
* `p` and `q` broadcast against each other (one true distribution against a
  batch of predictions, say), but their lengths along `axis` must be equal.
* NaN propagates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crossent._lib._checks import (
    assert_on_device,
    check_array,
    check_axis,
    check_base,
    check_floating,
    checked_on_device,
    outside_unit_interval,
    read_beneath,
    values_checked,
)
from crossent._lib._logdiv import (
    cross_entropy_of_logits,
    half_mixture_log_ratio,
    in_place,
    jsd_in_float64,
    log_ratio_from_logits,
    log_softmax,
    mixture_terms,
    rel_entr_terms,
    xlogy_of_probabilities,
)
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    compute_dtype,
    is_numpy_namespace,
    is_torch_namespace,
    known_true,
    number_for,
    numpy_array,
    output_dtype,
    quiet,
    size,
    stop_gradient,
    torch_tracing,
    xlogy,
)

__all__ = ["cross_entropy", "entropy", "js_divergence", "kl_divergence", "surprisal"]


# ----------------------------------------------------------------------------
# Checks and conversions
# ----------------------------------------------------------------------------


def _check_from_logits(from_logits: object) -> bool:
    if not isinstance(from_logits, bool):
        msg = f"`from_logits` must be True or False; got {from_logits!r}."
        raise TypeError(msg)
    return from_logits


def _check_distribution(x: Array, *, name: str, logits: bool = False, xp: Any) -> None:
    """`x` is a floating array of probabilities in [0, 1] (any real values if `logits`)."""
    check_array(x, name=name)
    check_floating(x, name=name, xp=xp)
    if logits or size(x) == 0:
        return
    if not values_checked(x):
        if checked_on_device(x):  # torch.compile / torch.export
            assert_on_device((x < 0) | (x > 1), _distribution_message(name, ""))
        else:  # torch.func transforms run eagerly
            read_beneath(x, _distribution_read, name=name, xp=xp)
        return
    _distribution_read(x, name=name, xp=xp)


def _distribution_read(
    x: Array, *, name: str, xp: Any, known: Callable[[Array], bool] = known_true
) -> None:
    """:func:`_check_distribution` of readable values (`known`: :func:`known_true`, or ``bool``
    beneath ``torch.func`` transforms, where every tensor counts as lazy)."""
    got = outside_unit_interval(x, xp=xp, known=known)
    if got is not None:
        msg = _distribution_message(name, f"; got values in [{got[0]:.6g}, {got[1]:.6g}]")
        raise ValueError(msg)


def _distribution_message(name: str, got: str) -> str:
    return (
        f"`{name}` must hold probabilities in [0, 1]{got}. Pass probabilities (e.g. a softmax "
        "of logits), or pass from_logits=True if these are logits."
    )


def _broadcast_axis(p: Array, q: Array, axis: object) -> int:
    """Check that `p` and `q` broadcast with equal lengths along `axis`; the axis, normalized."""
    ndim = max(p.ndim, q.ndim)
    sp = (1,) * (ndim - p.ndim) + tuple(p.shape)
    sq = (1,) * (ndim - q.ndim) + tuple(q.shape)
    ax = check_axis(axis, ndim, name="p")
    if sp[ax] != sq[ax]:
        msg = (
            f"`p` and `q` must have the same length along `axis`={axis} (the distribution "
            f"axis); got {sp[ax]} and {sq[ax]} (shapes {tuple(p.shape)} and {tuple(q.shape)})."
        )
        raise ValueError(msg)
    if any(a != b and 1 not in (a, b) for a, b in zip(sp, sq, strict=True)):
        msg = (
            f"`p` of shape {tuple(p.shape)} and `q` of shape {tuple(q.shape)} do not broadcast; "
            "give them the same shape."
        )
        raise ValueError(msg)
    return ax


def _in_base(x: Array, base: float | None, *, xp: Any) -> Array:
    """Nats in `base`: a value beyond the largest float after the division is rightly
    infinite (bits of 2.97e38 nats in float32), without NumPy's overflow warning."""
    if base is None:
        return x
    with quiet(xp, "over"):
        return x / number_for(math.log(base), x)


@dataclass(frozen=True)
class _Pair:
    """Checked `p`, `q` in the compute dtype, with what the measures need around them.

    With `logs`, `p` and `q` hold log-probabilities (``from_logits=True``) and
    `logits` the logits they come from (the same number of dimensions). `wide` is the
    measure itself where :func:`~crossent._lib._logdiv.jsd_in_float64` (or, for the
    cross-entropy, :func:`~crossent._lib._logdiv.cross_entropy_of_logits`) computed it.
    """

    p: Array
    q: Array
    logs: bool
    axis: int
    base: float | None
    out_dtype: Any
    xp: Any
    logits: tuple[Array, Array] | None = None
    wide: Array | None = None

    def log_ratio(self) -> Array:
        """:math:`\\log p - \\log q` (``from_logits=True``), accurate for close rows."""
        if self.logits is None:  # pragma: no cover - only called with logits
            msg = "internal: log_ratio needs the logits."
            raise RuntimeError(msg)
        zp, zq = self.xp.broadcast_arrays(*self.logits)
        log_p, log_q = self.xp.broadcast_arrays(self.p, self.q)
        return log_ratio_from_logits(zp, zq, log_p, log_q, axis=self.axis, xp=self.xp)

    def finish(self, nats: Array) -> Array:
        """The result in the requested base and the output dtype."""
        return numpy_array(
            astype(_in_base(nats, self.base, xp=self.xp), self.out_dtype, xp=self.xp)
        )


def _pair(
    p: Array,
    q: Array,
    axis: object,
    base: object,
    from_logits: object,
    *,
    beta: float | None = None,
    cross: bool = False,
) -> _Pair:
    r"""Check `p`, `q`, `axis` and `base` (shared by every two-distribution measure).

    With `from_logits` the pair holds log-probabilities, each normalized along
    `axis` before `p` and `q` broadcast. With `beta` (a divergence :math:`L_\beta`) the
    measure is computed here where :func:`~crossent._lib._logdiv.jsd_in_float64` can; with
    `cross` (the cross-entropy) where
    :func:`~crossent._lib._logdiv.cross_entropy_of_logits` can.
    """
    xp = array_namespace(p=p, q=q)
    logits = _check_from_logits(from_logits)
    _check_distribution(p, name="p", logits=logits, xp=xp)
    _check_distribution(q, name="q", logits=logits, xp=xp)
    ax = _broadcast_axis(p, q, axis)
    checked_base = check_base(base)
    out_dtype = output_dtype(p, q, xp=xp)
    dtype = compute_dtype(out_dtype, xp=xp)
    x, y = astype(p, dtype, xp=xp), astype(q, dtype, xp=xp)
    if not logits and beta is None:
        return _Pair(x, y, False, ax, checked_base, out_dtype, xp)
    ndim = max(x.ndim, y.ndim)
    x = xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))
    y = xp.reshape(y, (1,) * (ndim - y.ndim) + tuple(y.shape))
    if cross and logits:
        wide = cross_entropy_of_logits(x, y, axis=ax)
        if wide is not None:
            return _Pair(x, y, False, ax, checked_base, out_dtype, xp, wide=wide)
    if beta is not None:
        wide = jsd_in_float64(x, y, beta=beta, axis=ax, logits=logits)
        if wide is not None or not logits:
            return _Pair(x, y, False, ax, checked_base, out_dtype, xp, wide=wide)
    log_p = log_softmax(x, axis=ax, xp=xp, exact_peak=True)
    log_q = log_softmax(y, axis=ax, xp=xp, exact_peak=True)
    return _Pair(log_p, log_q, True, ax, checked_base, out_dtype, xp, (x, y))


# ----------------------------------------------------------------------------
# x · log(a / b), the one formula behind every measure
# ----------------------------------------------------------------------------


_SUBNORMAL_SCALE_LOG2 = 64
"""A subnormal denominator is scaled by 2**64 so that ``a / b`` cannot overflow."""


def _xlog(x: Array, a: Array, b: Array | None = None, *, xp: Any) -> Array:
    r""":math:`x \log(a/b)` (:math:`x \log a` when `b` is None), safe at the poles.

    Mass :math:`x = 0` gives 0 (:func:`~crossent._lib._xp.xlogy`); mass
    :math:`x > 0` on a pole (:math:`a = 0`, or :math:`b = 0`) gives
    :math:`-\infty` (or :math:`+\infty`). The pole is replaced by 1 before the
    log and the division, so there is no NumPy warning and no NaN gradient.
    A subnormal `b` (a softmax output that underflowed, say) is scaled by
    :math:`2^{64}` first and :math:`64 \ln 2` added back, so :math:`a/b` never
    overflows. NaN propagates. With `b`, `a` may be 0 only where `x` is.
    """
    if b is None:
        pole = a == 0
        out = xlogy(x, xp.where(pole, xp.ones_like(a), a), xp=xp)
        return xp.where(pole & (x > 0), xp.full_like(out, -float("inf")), out)
    pole = b == 0
    one = xp.ones_like(b)
    subnormal = (b < xp.finfo(b.dtype).smallest_normal) & ~pole
    den = xp.where(pole, one, b) * xp.where(subnormal, one * 2.0**_SUBNORMAL_SCALE_LOG2, one)
    out = xlogy(x, xp.where(pole, xp.ones_like(a), a) / den, xp=xp)
    shift = xp.where(subnormal, x * (_SUBNORMAL_SCALE_LOG2 * math.log(2.0)), xp.zeros_like(x))
    return xp.where(pole & (x > 0), xp.full_like(out, float("inf")), out + shift)


def _xlogy_checked(x: Array, a: Array, *, xp: Any, xlog: bool = False) -> Array:
    r""":math:`x \log a` of probabilities: where their value checks ran (validation on, eager
    PyTorch), :func:`~crossent._lib._logdiv.xlogy_of_probabilities` (PyTorch's kernel; entropy
    and cross-entropy of 1024 x 1000 float32 probabilities took 6-10x PyTorch's time through
    the ``where`` of the formulas); else ``xlogy`` (an entropy) or :func:`_xlog` (`xlog`: a
    cross-entropy, whose mass on a ruled-out outcome is a constant -inf)."""
    if is_torch_namespace(xp) and values_checked(x, a):
        out = xlogy_of_probabilities(x, a)
        if out is not None:
            return out
    return _xlog(x, a, xp=xp) if xlog else xlogy(x, a, xp=xp)


def _rel_entr(a: Array, b: Array, skip: Array, *, xp: Any) -> Array:
    r""":math:`a \log(a/b) - a + b` of positive `a`, `b` (garbage where `skip`, kept finite).

    :math:`d = \log(a/b)` is :math:`\operatorname{log1p}((a - b)/b)` where
    :math:`|a - b| \le b/2` (:math:`a - b` exact there, so :math:`d` is accurate to a few
    ulps however close :math:`a` and :math:`b`), ``_xlog``'s ratio elsewhere (a
    subnormal `b` scaled, no overflow); the term is from ``rel_entr_terms``.
    """
    one = xp.ones_like(a)
    a, b = xp.where(skip, one, a), xp.where(skip, one, b)
    near = xp.abs(a - b) <= b / 2
    t = xp.where(near, a - b, xp.zeros_like(a)) / xp.where(near, b, one)
    far = _xlog(one, xp.where(near, one, a), xp.where(near, one, b), xp=xp)
    return rel_entr_terms(a, b, xp.where(near, xp.log1p(t), far), xp=xp)


# ----------------------------------------------------------------------------
# The same measures from log-probabilities (``from_logits=True``)
# ----------------------------------------------------------------------------


def _xlog_from_log(log_x: Array, log_y: Array, *, xp: Any) -> Array:
    r""":math:`x \log y` from :math:`\log x` and :math:`\log y`.

    No mass (:math:`\log x = -\infty`) gives 0 in value and gradient; mass on
    :math:`\log y = -\infty` gives :math:`-\infty`, even when :math:`x` itself
    underflowed to 0 (its log says it is positive).

    Eager PyTorch on the CPU forms :math:`e^{\log x} \log y` and corrects the
    entries only where :math:`\log y = -\infty` occurs (one test of the array): elsewhere
    no mass already gives :math:`0 \cdot \log y = 0`, and its derivatives 0 (the
    four ``where`` over the array were 60 % of a 1024 x 1000 cross-entropy).
    """
    if is_torch_namespace(xp) and log_y.is_cpu and not torch_tracing():
        ruled_out = log_y == -math.inf
        if not bool(ruled_out.any()):
            return xp.exp(log_x) * log_y
        import torch

        # log y = 0 there before the product, so that no 0 * -inf reaches its derivatives
        # (an entropy with a masked class had a NaN gradient row); pole (mass on a ruled-out
        # outcome): -inf; no mass there: 0; both constant
        out = xp.exp(log_x) * torch.where(ruled_out, 0.0, log_y)
        fix = torch.where(log_x == -math.inf, 0.0, -math.inf).to(out.dtype)
        return torch.where(ruled_out, fix, out)
    no_mass = log_x == -math.inf
    pole = (log_y == -math.inf) & ~no_mass
    zero = xp.zeros_like(log_y)
    x = xp.exp(xp.where(no_mass, zero, log_x))
    out = x * xp.where(no_mass | pole, zero, log_y)
    return xp.where(pole, xp.full_like(out, -math.inf), xp.where(no_mass, zero, out))


# ----------------------------------------------------------------------------
# Public measures
# ----------------------------------------------------------------------------


def surprisal(p: Array, *, base: float | None = None) -> Array:
    r"""Surprisal (self-information) of events with probability `p`, elementwise.

    Parameters
    ----------
    p : array
        Probabilities in [0, 1], any shape.
    base : float, optional
        Logarithm base: None for nats, 2 for bits; any positive number but 1.

    Returns
    -------
    array
        :math:`-\log_b p`, the shape of `p`; :math:`+\infty` where ``p == 0``.

    Raises
    ------
    TypeError
        If `p` is not a floating array or `base` is not a number.
    ValueError
        If `p` lies outside [0, 1] (while validation is on) or `base` is not
        positive or is 1.

    See Also
    --------
    entropy : the expected surprisal.

    Notes
    -----
    .. math:: I(p) = -\log_b p = -\frac{\ln p}{\ln b}

    Examples
    --------
    >>> import numpy as np
    >>> from crossent import info
    >>> info.surprisal(np.array([1.0, 0.5, 0.125, 0.0]), base=2)
    array([ 0.,  1.,  3., inf])
    """
    xp = array_namespace(p=p)
    _check_distribution(p, name="p", xp=xp)
    base = check_base(base)
    x = astype(p, compute_dtype(p.dtype, xp=xp), xp=xp)
    is_zero = x == 0
    out = 0.0 - xp.log(xp.where(is_zero, xp.ones_like(x), x))  # 0 - 0 = +0, not -0
    out = xp.where(is_zero, xp.full_like(out, float("inf")), out)
    return numpy_array(astype(_in_base(out, base, xp=xp), output_dtype(p, xp=xp), xp=xp))


def entropy(
    p: Array, *, axis: int = -1, base: float | None = None, from_logits: bool = False
) -> Array:
    r"""Shannon entropy of the distributions along `axis`.

    Parameters
    ----------
    p : array
        Probabilities in [0, 1]; each slice along `axis` is one distribution
        (taken as given: not renormalized).
    axis : int, default -1
        The axis that holds the outcomes.
    base : float, optional
        Logarithm base: None for nats, 2 for bits; any positive number but 1.
    from_logits : bool, default False
        If True, `p` is given as logits (unnormalized log-probabilities along
        `axis`; :math:`-\infty` marks an impossible outcome) and the measure is
        computed in log space from :math:`\log p = z - \operatorname{lse}(z)`.

    Returns
    -------
    array
        :math:`H(p)`, the shape of `p` without `axis`.

    Raises
    ------
    TypeError
        If `p` is not a floating array, or `axis` / `base` has a wrong type.
    ValueError
        If `p` lies outside [0, 1] (while validation is on), `axis` is out of
        range, or `base` is not positive or is 1.

    See Also
    --------
    cross_entropy, kl_divergence

    Notes
    -----
    .. math:: H(p) = -\sum_k p_k \log_b p_k, \qquad 0 \log 0 = 0

    Value and gradient are finite at :math:`p_k = 0` (the gradient of the
    term is taken as 0 there; PyTorch tensors whose values were checked take PyTorch's
    ``xlogy`` kernel, with these derivatives). From logits, :math:`H = -\sum_k p_k \log p_k`
    with :math:`\log p_k = u_k - \operatorname{log1p}(\sum_{j \ne *} e^{u_j})`,
    :math:`u = z - z_*` relative to the most probable outcome :math:`*`; an outcome
    whose probability underflows contributes 0 and a finite gradient. For a peaked
    row :math:`\log p_* \approx -(1 - p_*)` keeps its relative accuracy (a
    :math:`\log(1 + \cdot)` rounded at 1, as in PyTorch's ``log_softmax``, made a
    float32 entropy 4.6e-3 relative off at :math:`1 - p_* = 10^{-6}`), and the
    gradient with respect to :math:`z_*` is summed from the other outcomes' terms
    (formed as :math:`g_* - p_* \sum_k g_k`, a difference of numbers of size 1, it
    was off by up to 5e-3 of the gradient's norm there).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent import info
    >>> info.entropy(np.array([[0.5, 0.5], [1.0, 0.0]]), base=2)
    array([1., 0.])
    >>> print(round(float(info.entropy(np.array([0.25, 0.25, 0.5]))), 6))
    1.039721
    >>> info.entropy(np.array([[3.0, 3.0], [0.0, -np.inf]]), base=2, from_logits=True)
    array([1., 0.])
    """
    xp = array_namespace(p=p)
    logits = _check_from_logits(from_logits)
    _check_distribution(p, name="p", logits=logits, xp=xp)
    ax = check_axis(axis, p.ndim, name="p")
    base = check_base(base)
    x = astype(p, compute_dtype(p.dtype, xp=xp), xp=xp)
    if logits:
        log_p = log_softmax(x, axis=ax, xp=xp, exact_peak=True)
        terms = _xlog_from_log(log_p, log_p, xp=xp)
    else:
        terms = _xlogy_checked(x, x, xp=xp)
    out = 0.0 - xp.sum(terms, axis=ax)  # a certain outcome gives +0, not -0
    return numpy_array(astype(_in_base(out, base, xp=xp), output_dtype(p, xp=xp), xp=xp))


def cross_entropy(
    p: Array, q: Array, *, axis: int = -1, base: float | None = None, from_logits: bool = False
) -> Array:
    r"""Cross-entropy of the predicted distribution `q` relative to the true `p`.

    Parameters
    ----------
    p : array
        True distributions (probabilities in [0, 1]) along `axis`.
    q : array
        Predicted distributions along `axis`; broadcasts against `p`, with
        the same length along `axis`.
    axis : int, default -1
        The axis that holds the outcomes.
    base : float, optional
        Logarithm base: None for nats, 2 for bits; any positive number but 1.
    from_logits : bool, default False
        If True, `p` and `q` are given as logits (unnormalized log-probabilities
        along `axis`; :math:`-\infty` marks an impossible outcome) and the measure is
        computed in log space from :math:`\log p = z - \operatorname{lse}(z)`.

    Returns
    -------
    array
        :math:`H(p, q)`, the broadcast shape without `axis`; :math:`+\infty`
        where `p` puts mass on an outcome that `q` rules out.

    Raises
    ------
    TypeError
        If `p` or `q` is not a floating array, or `axis` / `base` has a wrong
        type.
    ValueError
        If `p` or `q` lies outside [0, 1] (probabilities, while validation is
        on), the shapes do not broadcast or differ along `axis`, `axis` is out
        of range, or `base` is not positive or is 1.

    See Also
    --------
    entropy, kl_divergence
    crossent.categorical_cross_entropy : the loss, from logits or probabilities.

    Notes
    -----
    .. math:: H(p, q) = -\sum_k p_k \log_b q_k = H(p) + D_{\mathrm{KL}}(p \,\|\, q)

    with :math:`0 \log q = 0` for every :math:`q`, including 0. From logits
    :math:`\log q_k = z^q_k - \operatorname{lse}(z^q)` is used as is, so a
    predicted probability that underflows (a logit far below the others)
    gives the large finite value it should, not :math:`+\infty`, and the
    gradient :math:`\partial H / \partial z^q = q - p` stays finite. PyTorch tensors on
    the CPU (eager) take the same value as
    :math:`\operatorname{log1p}(\sum_{j \ne *} e^{u_j}) - \sum_k p_k u_k`,
    :math:`u = z^q - z^q_*` relative to :math:`q`'s most probable outcome (two terms
    :math:`\ge 0`), with the gradients :math:`q - p` and :math:`-p \odot (u - \sum_k p_k
    u_k)` in closed form (second derivatives through them); rows that are not finite there
    take the general formulas.

    One limit: a log-probability beyond the dtype's range is :math:`-\infty`.
    Logits of `q` spanning more than the largest float (float32 or bfloat16:
    ``[-3e38, 3e38]``, whose :math:`\log q_0 \approx -6 \cdot 10^{38}`) give
    :math:`+\infty` wherever `p` puts mass on such a class, also where the
    value is finite (``p`` of logits ``[0, 0]``: about :math:`3 \cdot 10^{38}`
    in float32). Log-probabilities at half scale would hold it, at the cost of
    more operations on every call, for logits no model produces. Float64 logits
    span up to :math:`1.8 \cdot 10^{308}`.

    Examples
    --------
    >>> import numpy as np
    >>> from crossent import info
    >>> p = np.array([1.0, 0.0])
    >>> q = np.array([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]])
    >>> info.cross_entropy(p, q, base=2)
    array([ 1.,  2., inf])
    >>> info.cross_entropy(np.array([0.0, -np.inf]), np.array([-1000.0, 0.0]), from_logits=True)
    array(1000.)
    """
    d = _pair(p, q, axis, base, from_logits, cross=True)
    if d.wide is not None:
        return d.finish(d.wide)
    if d.logs:
        terms = _xlog_from_log(d.p, d.q, xp=d.xp)
    else:
        terms = _xlogy_checked(d.p, d.q, xp=d.xp, xlog=True)
    return d.finish(0.0 - d.xp.sum(terms, axis=d.axis))


def kl_divergence(
    p: Array, q: Array, *, axis: int = -1, base: float | None = None, from_logits: bool = False
) -> Array:
    r"""Kullback–Leibler divergence of `q` from `p` (relative entropy).

    Parameters
    ----------
    p : array
        True distributions (probabilities in [0, 1]) along `axis`.
    q : array
        Approximating distributions along `axis`; broadcasts against `p`,
        with the same length along `axis`.
    axis : int, default -1
        The axis that holds the outcomes.
    base : float, optional
        Logarithm base: None for nats, 2 for bits; any positive number but 1.
    from_logits : bool, default False
        If True, `p` and `q` are given as logits (unnormalized log-probabilities
        along `axis`; :math:`-\infty` marks an impossible outcome) and the measure is
        computed in log space from :math:`\log p = z - \operatorname{lse}(z)`.

    Returns
    -------
    array
        :math:`D(p \,\|\, q) \ge 0`, the broadcast shape without `axis`;
        :math:`+\infty` where `p` puts mass on an outcome that `q` rules out.

    Raises
    ------
    TypeError
        If `p` or `q` is not a floating array, or `axis` / `base` has a wrong
        type.
    ValueError
        If `p` or `q` lies outside [0, 1] (probabilities, while validation is
        on), the shapes do not broadcast or differ along `axis`, `axis` is out
        of range, or `base` is not positive or is 1.

    See Also
    --------
    cross_entropy, js_divergence

    Notes
    -----
    .. math:: D(p \,\|\, q) = \sum_k p_k \log_b \frac{p_k}{q_k}

    With :math:`d_k = \log(p_k / q_k)` it is summed as

    .. math:: D(p \,\|\, q) = \sum_k p_k\,\psi(d_k) + \sum_k (p_k - q_k), \qquad
              \psi(d) = e^{-d} - 1 + d \ge 0,

    the second sum 0 for distributions (it is kept: the inputs are taken as
    given). :math:`p_k \psi(d_k) = p_k d_k - p_k + q_k` is second order in
    :math:`p_k - q_k`; it is formed without cancellation (the series of
    :math:`\psi` for :math:`|d| < 1/2`, :math:`p_k (d_k - 1) + q_k` for
    :math:`d_k < -1`), and :math:`d_k = \operatorname{log1p}((p_k - q_k)/q_k)`
    where :math:`|p_k - q_k| \le q_k / 2` (the difference is exact there), so
    nearly equal distributions keep their small divergence to a few ulps (as a
    plain :math:`\sum_k p_k \log(p_k/q_k)`, SciPy's ``rel_entr``, does not:
    float32 rows a few ulps apart came out 2.6e2 relative off, 1e-4 apart 5e1)
    and :math:`D(p \,\|\, p)` is exactly 0.

    From logits the sum is taken over the terms :math:`p_k \psi(d_k)` alone (the
    added :math:`q_k - p_k` sum to 0), each :math:`\ge 0`, so the result is never
    negative, even in floating point. A difference of log-softmaxes is rounded at
    :math:`\epsilon |\log p_k|`, too coarse for close rows (float32 logits
    :math:`10^{-6}` apart gave 0.42 relative error); there :math:`d_k = \delta'_k -
    \operatorname{log1p}(\sum_j q_j \operatorname{expm1}(\delta'_j))`, with
    :math:`\delta = z^p - z^q` held exactly (a sum of two floats) and
    :math:`\delta' = \delta - \delta_*` at :math:`q`'s most probable class, which
    keeps a few ulps also for logits shifted by a constant (autodiff takes the
    derivatives of :math:`\log p - \log q`). An underflowed :math:`q_k` (a student's
    probability in distillation, say) leaves the value and its gradient
    :math:`\partial D / \partial z^q = q - p` finite. As for :func:`cross_entropy`,
    logits of `q` spanning more than the largest float (float32: ``[-3e38, 3e38]``)
    give :math:`+\infty` where `p` puts mass on the class whose log-probability
    overflows, also where the divergence is finite (about :math:`3 \cdot 10^{38}`
    from ``p`` of logits ``[0, 0]``). The bounded measures, :func:`entropy` and
    :func:`js_divergence`, are exact there.

    PyTorch tensors of float32 or narrower on the CPU, eager, are evaluated in float64,
    where the plain :math:`d_k` is accurate enough for a float32 result (5x faster here and
    for :func:`js_divergence`); finite logits that require a gradient get it in closed
    form, :math:`p \odot (d - D)` and :math:`q - p`, in float64 by differentiable
    operations (second derivatives exact; a first backward in place), the most probable
    class's entry formed from the others' terms (value and gradient 3.7x faster than autodiff
    of the formulas above at 1024 × 1000). Probabilities there: :math:`d_k =
    \operatorname{sign}(r_k)\operatorname{log1p}(|r_k| / \min(p_k, q_k))` with
    :math:`r = p - q` in float64 and :math:`D = \sum_k (p_k d_k - r_k) + \sum_k r_k`, the
    gradients :math:`d + 1` and :math:`-p/q` (0 where :math:`p_k = 0`) in closed form.

    Examples
    --------
    >>> import numpy as np
    >>> from crossent import info
    >>> p = np.array([0.5, 0.5, 0.0])
    >>> info.kl_divergence(p, np.array([0.25, 0.25, 0.5]), base=2)
    array(1.)
    >>> info.kl_divergence(p, p)
    array(0.)
    >>> info.kl_divergence(np.array([0.0, 0.0]), np.array([0.0, -1000.0]), from_logits=True)
    array(499.30685282)
    """
    d = _pair(p, q, axis, base, from_logits, beta=0.0)
    xp = d.xp
    if d.wide is not None:
        return d.finish(d.wide)
    if d.logs:
        terms = mixture_terms(d.p, d.q, d.log_ratio(), beta=0.0, xp=xp)
        return d.finish(xp.sum(terms, axis=d.axis))
    a, b = d.p, d.q
    no_mass = a == 0
    pole = (b == 0) & (a > 0)
    terms = xp.where(no_mass, b, _rel_entr(a, b, no_mass | (b == 0), xp=xp))
    terms = xp.where(pole, xp.full_like(terms, math.inf), terms)
    # + sum (p - q): the inputs as given (0 for distributions); -q where p = 0 (derivative 0)
    excess = xp.where(no_mass, xp.zeros_like(a) - b, a - b)
    return d.finish(xp.sum(terms, axis=d.axis) + xp.sum(excess, axis=d.axis))


def js_divergence(
    p: Array, q: Array, *, axis: int = -1, base: float | None = None, from_logits: bool = False
) -> Array:
    r"""Jensen–Shannon divergence between `p` and `q` (symmetric, bounded).

    Parameters
    ----------
    p, q : array
        Distributions (probabilities in [0, 1]) along `axis`; they broadcast
        against each other, with the same length along `axis`.
    axis : int, default -1
        The axis that holds the outcomes.
    base : float, optional
        Logarithm base: None for nats, 2 for bits; any positive number but 1.
    from_logits : bool, default False
        If True, `p` and `q` are given as logits (unnormalized log-probabilities
        along `axis`; :math:`-\infty` marks an impossible outcome) and the measure is
        computed in log space from :math:`\log p = z - \operatorname{lse}(z)`.

    Returns
    -------
    array
        :math:`\mathrm{JS}(p, q) \in [0, \log_b 2]`, the broadcast shape
        without `axis`. Always finite.

    Raises
    ------
    TypeError
        If `p` or `q` is not a floating array, or `axis` / `base` has a wrong
        type.
    ValueError
        If `p` or `q` lies outside [0, 1] (probabilities, while validation is
        on), the shapes do not broadcast or differ along `axis`, `axis` is out
        of range, or `base` is not positive or is 1.

    See Also
    --------
    kl_divergence

    Notes
    -----
    .. math:: \mathrm{JS}(p, q) = \tfrac12 D(p \,\|\, m) + \tfrac12 D(q \,\|\, m),
              \qquad m = \tfrac12 (p + q)

    It is summed as :math:`\tfrac12 \sum_k (p_k \psi(r_k) + q_k \psi(s_k))`
    with :math:`\psi(d) = e^{-d} - 1 + d` (see :func:`kl_divergence`; the
    :math:`m_k - p_k` and :math:`m_k - q_k` it adds cancel in each term) and the
    log ratios :math:`r_k = \log(p_k / m_k) = \operatorname{log1p}(v_k)`,
    :math:`s_k = \operatorname{log1p}(-v_k)`, :math:`v_k = (p_k - q_k)/(p_k + q_k)`
    (for :math:`|v_k| \le 1/2`; :math:`\log(2 p_k / (p_k + q_k))` beyond):
    accurate to a few ulps for nearly equal distributions (a float32 sum of
    :math:`p_k \log(p_k/m_k)` was off by up to 6e6 relative for rows a few ulps
    apart), and a tiny (even subnormal) :math:`p_k` never meets an underflowed
    :math:`m_k = 0`. ``scipy.spatial.distance.jensenshannon`` returns the
    square root of this value (a metric) and renormalizes its inputs.

    From logits, :math:`\log m_k = \max(\log p_k, \log q_k) + \operatorname{log1p}(
    e^{-|\log p_k - \log q_k|}) - \ln 2`, exact for any logit gap, and both
    halves are summed as non-negative terms as in :func:`kl_divergence`, with
    :math:`\log(p_k/m_k) = \min(d_k, 0) - \operatorname{log1p}(\operatorname{expm1}
    (-|d_k|)/2)` from :func:`kl_divergence`'s :math:`d_k = \log(p_k / q_k)`, so close
    rows keep a few ulps (float32 logits :math:`10^{-6}` apart were 0.5 relative off).

    The gradient for :math:`p_k` is :math:`\tfrac12 \log(p_k / m_k)`, taken as 0 where
    :math:`p_k = 0` (also where :math:`q_k = 0` too), likewise for :math:`q_k`. PyTorch
    tensors of float32 or narrower on the CPU, eager, are evaluated in float64 as for
    :func:`kl_divergence`, with the gradient in closed form (one autograd node; second
    derivatives exact).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent import info
    >>> info.js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0]), base=2)
    array(1.)
    >>> p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    >>> bool(info.js_divergence(p, q) == info.js_divergence(q, p))
    True
    >>> z = np.array([[0.0, -2000.0], [-2000.0, 0.0]])
    >>> info.js_divergence(z, z[::-1], base=2, from_logits=True)
    array([1., 1.])
    """
    d = _pair(p, q, axis, base, from_logits, beta=0.5)
    xp = d.xp
    if d.wide is not None:
        return d.finish(d.wide)
    if d.logs:
        terms = mixture_terms(d.p, d.q, d.log_ratio(), beta=0.5, xp=xp)
        return d.finish(xp.sum(terms, axis=d.axis))
    s = d.p + d.q
    none = s == 0
    m = s / 2
    terms = xp.zeros_like(s)
    # derivatives to keep: not on NumPy, nor for PyTorch tensors autograd does not track
    autodiff = not (is_numpy_namespace(xp) or in_place(xp, d.p, d.q))
    for a, b in ((d.p, d.q), (d.q, d.p)):
        no_mass = a == 0  # the term is m (rel_entr_terms' limit)
        skip = no_mass | none
        # log(a / m), exact derivatives (a masked where it has no mass: no -inf behind a where)
        r = half_mixture_log_ratio(xp.where(skip, b, a), b, xp=xp, derivatives=autodiff)
        limit = m
        if autodiff:  # a log(a / m)'s mixed derivative at a = 0, -1/b, which m alone lacks:
            # -a (log b - log b) adds it (its value and first derivatives are 0 there)
            log_b = xp.log(xp.where(b > 0, b, xp.ones_like(b)))
            limit = m - a * (log_b - stop_gradient(log_b, xp=xp))
        terms = terms + xp.where(no_mass, limit, rel_entr_terms(a, m, r, xp=xp))
    # no mass in either: a constant 0 (the limits m of the two terms had derivatives 1/2
    # each, so the gradient was 1/2 there, where each is 0 beside any q > 0)
    terms = xp.where(none, xp.zeros_like(terms), terms)
    total = xp.sum(terms, axis=d.axis)
    return d.finish(total / number_for(2.0, total))
