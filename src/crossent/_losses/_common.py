"""Pieces every loss family shares: reductions and the focal modulating factor."""

from __future__ import annotations

import math
from typing import Any

from crossent._lib._xp import (
    Array,
    device,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    number_for,
    quiet,
    safe_divide,
    size_array,
    stop_gradient,
)

__all__ = [
    "LOG_CLAMP",
    "broadcastable",
    "clamp_floor",
    "clamped_log",
    "focal_factor",
    "log1mexp",
    "log_prob",
    "mean_class_weight",
    "nan_rows",
    "reduce_loss",
    "smoothed_target",
    "times_log",
    "weight_factor",
]

LOG_CLAMP = -100.0
"""Lower bound of log p for probability inputs (PyTorch's BCE / NLL rule)."""


HUGE_WEIGHT = 2.0**64
"""Class weights above this are scaled by its reciprocal for a weighted mean, and weights all
below its reciprocal by it (``mean_class_weight``)."""


def mean_class_weight(
    w: Array | None, reduction: str, z_loss: float, *, xp: Any, factor: float | None = None
) -> Array | None:
    r"""Class weights `w` for a ``"mean"``: scaled by :math:`2^{-64}` if any exceeds
    :math:`2^{64}`, by :math:`2^{64}` if all lie below :math:`2^{-64}`, `w` itself otherwise.

    The weighted mean :math:`\sum_i w_{y_i} \ell_i / \sum_i w_{y_i}` does not change when
    every weight is multiplied by the same power of two (every product and sum is scaled
    exactly), but its two sums overflow for huge weights: float32 weights of 3e38 made both
    inf and the mean NaN where it is about 1.3. Subnormal weights lose their digits in the
    products :math:`w_{y_i} \ell_i` (float32 weights of 1e-44: 0.857 for 0.862), and the fused
    losses' :math:`1 / \sum_i w_{y_i}` overflowed (inf). No weight anyone trains with lies
    beyond :math:`2^{\pm 64}`, so the common call is unchanged bit for bit: on NumPy one host
    ``max`` decides, elsewhere a factor of exactly 1 (:math:`O(C)`, no pass over the logits,
    no host read). Not for ``"sum"``/``"none"``, whose values scale with the weights, nor
    with a z-loss, which the weights do not multiply but the mean divides by their sum.

    `factor`, when given, is the factor decided by the caller (:func:`weight_factor` of the
    largest weight of the whole vector): the vocabulary-parallel losses, whose `w` may be one
    rank's slice while every rank must scale alike (they learn it from their handshake).
    """
    if w is None or reduction != "mean" or z_loss != 0 or w.shape[0] == 0:
        return w
    if factor is not None:
        return w * factor if factor != 1.0 else w
    if is_numpy_namespace(xp):
        f = weight_factor(float(w.max()))
        return w * f if f != 1.0 else w
    top = xp.max(w)
    one, small, big = (
        xp.asarray(v, dtype=w.dtype, device=device(w)) for v in (1.0, 1 / HUGE_WEIGHT, HUGE_WEIGHT)
    )
    return w * xp.where(top > HUGE_WEIGHT, small, xp.where(top < 1 / HUGE_WEIGHT, big, one))


def weight_factor(top: float) -> float:
    """The power of two :func:`mean_class_weight` scales weights by, for their largest, `top`
    (NaN: 1)."""
    if top > HUGE_WEIGHT:
        return 1 / HUGE_WEIGHT
    return HUGE_WEIGHT if top < 1 / HUGE_WEIGHT else 1.0


def broadcastable(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    """Whether an array of `shape` broadcasts to `to` without changing it.

    Each size is compared with ``==``: under ``torch.compile(dynamic=True)`` sizes are
    symbolic and dynamo answers ``s in (1, d)`` False for equal symbolic sizes.
    """
    if len(shape) == 1 and to:  # the common per-label vector
        return shape[0] == 1 or shape[0] == to[-1]
    if len(shape) > len(to):
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(shape), reversed(to), strict=False))


def reduce_loss(loss: Array, reduction: str, *, denominator: Array | None = None, xp: Any) -> Array:
    """Apply `reduction` to per-item losses.

    ``"mean"`` divides the sum by `denominator` (the element count when
    ``None``); a zero denominator gives 0 with a zero gradient instead of NaN.
    """
    if reduction == "none":
        return loss
    total = xp.sum(loss)
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = size_array(loss, dtype=loss.dtype, xp=xp)
    return safe_divide(total, denominator, xp=xp)


def smoothed_target(t: Array, eps: float, num_classes: Any) -> Array:
    r"""The label-smoothed target :math:`(1-\varepsilon)\,t + \varepsilon/C` (`t` itself for
    :math:`\varepsilon = 0`): PyTorch's categorical smoothing over `num_classes` classes, and
    with ``num_classes=2`` the binary one, :math:`t(1-\varepsilon) + \varepsilon/2` (Keras's).
    A number beside a 0-d PyTorch tensor enters as a 0-d tensor of its dtype
    (:func:`~crossent._lib._xp.number_for`: ``torch.func.jvp`` keeps the tangent's dtype)."""
    if eps == 0:
        return t
    return t * number_for(1 - eps, t) + number_for(eps / num_classes, t)


def nan_rows(scale: Array, bad: Array, *, xp: Any) -> Array:
    """The per-row gradient scale `scale`, NaN in the rows `bad` (a NaN loss row, or a
    row of logits with NaN or ``+inf``, whose autodiff gradient is NaN throughout).

    A closed-form gradient is a sum of terms, some of which read only part of a row (the
    target class, a probability), so such a row gave a gradient that is NaN in some
    entries only (categorical CE of logits ``[+inf, 0]`` and target ``[0, 1]``: loss NaN,
    gradient ``[NaN, -1]``) where autodiff and PyTorch give a NaN row. Scaling the row's
    gradient by NaN makes the whole row NaN: NaN propagates, one operation per row.
    """
    return xp.where(bad, xp.full_like(scale, float("nan")), scale)


def log1mexp(log_p: Array, *, xp: Any) -> Array:
    r"""log(1 − e^u) for u ≤ 0, accurate everywhere [1]_; u = 0 gives −inf.

    Notes
    -----
    .. math:: \log(1-e^u) = \begin{cases} \log(-\operatorname{expm1}(u)) & u > -\ln 2 \\
              \operatorname{log1p}(-e^u) & u \le -\ln 2 \end{cases}

    References
    ----------
    .. [1] Mächler, "Accurately computing log(1 − exp(−|a|))", Rmpfr vignette, 2012.
    """
    is_zero = log_p == 0
    near_zero = (log_p > -0.6931471805599453) & ~is_zero
    minus_one = xp.full_like(log_p, -1.0)
    u_hi = xp.where(near_zero, log_p, minus_one)
    # u = -inf (p = 0, a masked class) is read as a constant 0, whose derivative, 0, is the
    # limit: autodiff would multiply e^u = 0 by an infinite upstream gradient (the focal
    # term of a masked class has -log p = inf), NaN instead of the closed form's 0
    outside = near_zero | is_zero | (log_p == -float("inf"))
    u_lo = xp.where(outside, minus_one, log_p)
    out = xp.where(near_zero, xp.log(-xp.expm1(u_hi)), xp.log1p(-xp.exp(u_lo)))
    out = xp.where(log_p == -float("inf"), xp.zeros_like(out), out)
    return xp.where(is_zero, xp.full_like(out, -float("inf")), out)


def focal_factor(
    base: Array, gamma: float, *, log: bool = True, nll: Array | None = None, xp: Any
) -> Array:
    r"""The focal modulating factor :math:`(1 - p)^\gamma`, from :math:`\log(1-p)` or from
    :math:`1 - p` (`log` False): the one statement of the factor and of its rule at
    :math:`p = 1`.

    Computed as :math:`e^{\gamma \log(1-p)}` (from the log: binary and probability
    inputs have :math:`\log(1-p)` exactly, and one exponential is cheaper than a
    power) or as :math:`(1-p)^\gamma` (the row formula of
    :mod:`crossent._losses._rows` has :math:`1 - p = -\operatorname{expm1}(\log p)`).
    Where :math:`1 - p` is exactly 0 the factor is 0 with a zero gradient, which is
    the limit of the focal loss term's derivative for every γ > 0 (torchvision gives
    NaN there for γ < 1): the pole is replaced before the power, so that autodiff
    sees no :math:`\gamma\,0^{\gamma-1}`. ``gamma=0`` gives ones.

    `nll` is the :math:`-\log p` the factor multiplies in the loss (for autodiff
    backends). Where :math:`p = e^{-\mathrm{nll}}` is 0 in the dtype the factor's
    derivative :math:`-\gamma\,p\,(1-p)^{\gamma-1}` (per :math:`\log p`) is exactly 0,
    but autodiff forms :math:`(\mathrm{nll} \cdot \gamma) \cdot p`: a finite logit beyond
    about :math:`1.7 \cdot 10^{38} / \gamma` in float32 made :math:`\mathrm{nll} \cdot \gamma`
    inf and the gradient :math:`\infty \cdot 0` = NaN. There the factor is held constant
    (its derivative 0, exactly what it is to rounding).
    """
    if gamma == 0:
        return xp.ones_like(base)
    is_certain = base == (-float("inf") if log else 0.0)
    safe = xp.where(is_certain, xp.zeros_like(base) if log else xp.ones_like(base), base)
    raised = xp.exp(number_for(gamma, safe) * safe) if log else safe**gamma
    out = xp.where(is_certain, xp.zeros_like(raised), raised)
    if nll is not None and (is_jax_namespace(xp) or is_torch_namespace(xp)):
        fi = xp.finfo(nll.dtype)
        vanished = nll > -math.log(float(fi.smallest_normal) * float(fi.eps))  # e^-nll = 0
        out = xp.where(vanished, stop_gradient(out, xp=xp), out)
    return out


_FLOORS: dict[tuple[str, Any], float] = {}


def clamp_floor(dtype: Any, *, xp: Any) -> float:
    r"""The smallest `dtype` value :math:`p` with :math:`\log p \ge -100` by `xp`'s ``log`` (a
    module with ``asarray``, ``log`` and ``nextafter``: NumPy's, PyTorch's): the clamp of
    :func:`clamped_log` is on exactly below it, so that a comparison with it replaces a log
    pass. float32: a subnormal near :math:`e^{-100} \approx 3.7 \cdot 10^{-44}`, where
    neighbouring logs lie 0.04 apart, so no rounding of the log decides it."""
    key = (xp.__name__, dtype)
    floor = _FLOORS.get(key)
    if floor is None:
        v = xp.asarray(math.exp(LOG_CLAMP), dtype=dtype)
        zero, one = xp.asarray(0.0, dtype=dtype), xp.asarray(1.0, dtype=dtype)
        while float(xp.log(v)) >= LOG_CLAMP:  # down to the largest value clamped
            v = xp.nextafter(v, zero)
        while float(xp.log(v)) < LOG_CLAMP:  # up to the smallest value not clamped
            v = xp.nextafter(v, one)
        floor = _FLOORS[key] = float(v)
    return floor


def log_prob(x: Array, *, complement: bool = False, xp: Any) -> Array:
    """``log x`` (or ``log1p(-x)``) of a probability, exact, ``-inf`` at the pole.

    The argument at the pole (0, or 1 for the complement) is replaced before
    the log, so NumPy warns about nothing and autodiff sees a finite
    derivative there, which a ``where`` downstream (the -100 clamp, the focal
    factor) turns into an exact 0 instead of ``0 * inf = NaN``. NaN propagates; a value
    outside [0, 1] gives NaN without NumPy's warning (one the checks let through: in a row
    under ``ignore_index``, which they do not read, and whose loss is then masked).
    """
    pole = 1.0 if complement else 0.0
    at_pole = x == pole
    safe = xp.where(at_pole, xp.full_like(x, 1.0 - pole), x)
    with quiet(xp, "invalid"):
        raw = xp.log1p(-safe) if complement else xp.log(safe)
    return xp.where(at_pole, xp.full_like(raw, -float("inf")), raw)


def clamped_log(x: Array, *, complement: bool = False, xp: Any) -> tuple[Array, Array]:
    """``max(log x, -100)`` (or of ``log1p(-x)``) and the mask where the clamp is on.

    PyTorch's rule for probability inputs: a probability of exactly 0 or 1
    gives a finite loss. Built on :func:`log_prob`, so there is no warning
    and autodiff sees a zero gradient at the clamp. NaN propagates (the mask
    is False there).
    """
    raw = log_prob(x, complement=complement, xp=xp)
    clamped = raw < LOG_CLAMP
    return xp.where(clamped, xp.full_like(raw, LOG_CLAMP), raw), clamped


def times_log(c: Array, log: Array, pole: Array, *, xp: Any) -> Array:
    """``c · log`` with ``0 · (−inf) = 0`` (0 · log 0), NaN-free in value and gradient.

    `pole` marks where `log` may be −inf (for logits read off the input, so that a
    compiled backward need not recompute the log for the mask). Only the log is
    guarded, and only there: where the mass `c` is 0 the product is 0 and its
    derivative for `c` is the log (a soft target or a weight may carry a gradient),
    0 at a pole; a NaN log stays NaN.
    """
    zero_mass = (c == 0) & pole
    return c * xp.where(zero_mass, xp.zeros_like(log), log)
