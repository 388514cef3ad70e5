"""Float64 references for :mod:`crossent.info`, one outcome at a time."""

from __future__ import annotations

import math

import numpy as np


def _rows(p: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(p, dtype=np.float64), axis, -1)


def _plogq(p: float, q: float) -> float:
    """p · log q with 0 · log q = 0 and p · log 0 = -inf."""
    if p == 0:
        return 0.0
    if q == 0:
        return -math.inf
    return p * math.log(q)


def _plogratio(p: float, q: float) -> float:
    """p · log(p / q) with 0 · log(0 / q) = 0 and p · log(p / 0) = +inf."""
    if p == 0:
        return 0.0
    if q == 0:
        return math.inf
    return p * (math.log(p) - math.log(q))  # p / q overflows for a subnormal q


def _reduce(fn, p: np.ndarray, q: np.ndarray | None, axis: int, base: float | None) -> np.ndarray:
    if q is None:
        rows_p = _rows(p, axis)
        rows_q = rows_p
    else:
        rows_p, rows_q = np.broadcast_arrays(_rows(p, axis), _rows(q, axis))
    out = np.empty(rows_p.shape[:-1])
    for idx in np.ndindex(out.shape):
        out[idx] = math.fsum(fn(a, b) for a, b in zip(rows_p[idx], rows_q[idx], strict=True))
    scale = 1.0 if base is None else math.log(base)
    return out / scale


def surprisal(p: np.ndarray, base: float | None = None) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    out = np.array([math.inf if v == 0 else -math.log(v) for v in p.ravel()]).reshape(p.shape)
    return out if base is None else out / math.log(base)


def entropy(p: np.ndarray, axis: int = -1, base: float | None = None) -> np.ndarray:
    return _reduce(lambda a, _: -_plogq(a, a), p, None, axis, base)


def cross_entropy(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float | None = None):
    return _reduce(lambda a, b: -_plogq(a, b), p, q, axis, base)


def kl_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float | None = None):
    return _reduce(_plogratio, p, q, axis, base)


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float | None = None):
    def term(a: float, b: float) -> float:
        m = (a + b) / 2
        return (_plogratio(a, m) + _plogratio(b, m)) / 2

    return _reduce(term, p, q, axis, base)


# ----------------------------------------------------------------------------
# From logits (``from_logits=True``): log-softmax rows, then the same sums in log space
# ----------------------------------------------------------------------------


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log p = z - lse(z), row by row with an exactly summed log-sum-exp."""
    rows = _rows(z, axis)
    out = np.empty_like(rows)
    for idx in np.ndindex(rows.shape[:-1]):
        row = rows[idx]
        m = max(row)
        lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
        out[idx] = row - lse
    return np.moveaxis(out, -1, axis)


def _xlog_from_log(log_p: float, log_q: float) -> float:
    """p · log q from the logs: no mass gives 0; mass (however small) on log q = -inf gives -inf."""
    if log_p == -math.inf:
        return 0.0
    if log_q == -math.inf:
        return -math.inf
    return math.exp(log_p) * log_q


def _reduce_logits(fn, zp: np.ndarray, zq: np.ndarray | None, axis: int, base: float | None):
    lp = _rows(log_softmax(zp, axis), axis)
    lq = lp if zq is None else _rows(log_softmax(zq, axis), axis)
    lp, lq = np.broadcast_arrays(lp, lq)
    out = np.empty(lp.shape[:-1])
    for idx in np.ndindex(out.shape):
        out[idx] = math.fsum(fn(a, b) for a, b in zip(lp[idx], lq[idx], strict=True))
    scale = 1.0 if base is None else math.log(base)
    return out / scale


def entropy_from_logits(z: np.ndarray, axis: int = -1, base: float | None = None) -> np.ndarray:
    return _reduce_logits(lambda a, _: -_xlog_from_log(a, a), z, None, axis, base)


def cross_entropy_from_logits(zp, zq, axis: int = -1, base: float | None = None) -> np.ndarray:
    return _reduce_logits(lambda a, b: -_xlog_from_log(a, b), zp, zq, axis, base)


def kl_divergence_from_logits(zp, zq, axis: int = -1, base: float | None = None) -> np.ndarray:
    def term(a: float, b: float) -> float:
        if a == -math.inf:
            return 0.0
        return math.inf if b == -math.inf else math.exp(a) * (a - b)

    return _reduce_logits(term, zp, zq, axis, base)


def _log_mix(a: float, b: float) -> float:
    """log((e^a + e^b) / 2)."""
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return -math.inf
    return hi + math.log1p(math.exp(lo - hi)) - math.log(2.0)


def js_divergence_from_logits(zp, zq, axis: int = -1, base: float | None = None) -> np.ndarray:
    def term(a: float, b: float) -> float:
        m = _log_mix(a, b)
        left = 0.0 if a == -math.inf else math.exp(a) * (a - m)
        right = 0.0 if b == -math.inf else math.exp(b) * (b - m)
        return (left + right) / 2

    return _reduce_logits(term, zp, zq, axis, base)


def grads_from_logits(name: str, zp: np.ndarray, zq: np.ndarray | None = None):
    """d(sum of the measure over rows) / d logits, last axis, nats: ``p * (g - <p, g>)``.

    ``g`` is the derivative with respect to the probabilities; for `zq` of
    cross-entropy and KL the result is ``q - p``. Returns ``(d/dzp, d/dzq)``
    (``d/dzq`` is None for the entropy). Rows must be finite-valued.
    """
    lp = log_softmax(zp)
    p = np.exp(lp)

    def through_softmax(prob: np.ndarray, g: np.ndarray) -> np.ndarray:
        g = np.where(prob == 0, 0.0, g)
        mean = np.array([math.fsum(r) for r in (prob * g).reshape(-1, g.shape[-1])])
        return prob * (g - mean.reshape((*g.shape[:-1], 1)))

    if name == "entropy":
        return through_softmax(p, -lp), None
    lq = log_softmax(zq)
    q = np.exp(lq)
    with np.errstate(invalid="ignore"):  # -inf - -inf on impossible outcomes, masked above
        if name == "cross_entropy":
            return through_softmax(p, -lq), q - p
        if name == "kl_divergence":
            return through_softmax(p, lp - lq), q - p
        if name == "js_divergence":
            lm = np.logaddexp(lp, lq) - math.log(2.0)
            return through_softmax(p, (lp - lm) / 2), through_softmax(q, (lq - lm) / 2)
    raise ValueError(name)


def from_logits_mpmath(name: str, zp: np.ndarray, zq: np.ndarray, digits: int = 60) -> np.ndarray:
    """The measure `name` from logits (last axis, finite) in `digits`-digit arithmetic.

    For values that cancel in float64 too: the KL of rows 1e-6 apart is ~1e-13, where
    float64 log-softmaxes that sum to 1 only to ~1e-16 move it by ~1e-4 relative.
    """
    import mpmath

    out = np.empty(np.broadcast_shapes(zp.shape, zq.shape)[:-1])
    rows_p, rows_q = np.broadcast_arrays(np.asarray(zp, np.float64), np.asarray(zq, np.float64))
    with mpmath.workdps(digits):
        for idx in np.ndindex(out.shape):

            def log_softmax_mp(row: np.ndarray) -> list:
                z = [mpmath.mpf(float(v)) for v in row]
                lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z))
                return [v - lse for v in z]

            lp, lq = log_softmax_mp(rows_p[idx]), log_softmax_mp(rows_q[idx])
            p, q = [mpmath.exp(v) for v in lp], [mpmath.exp(v) for v in lq]
            if name == "entropy":
                value = -mpmath.fsum(a * b for a, b in zip(p, lp, strict=True))
            elif name == "cross_entropy":
                value = -mpmath.fsum(a * b for a, b in zip(p, lq, strict=True))
            elif name == "kl_divergence":
                value = mpmath.fsum(a * (x - y) for a, x, y in zip(p, lp, lq, strict=True))
            elif name == "js_divergence":
                lm = [mpmath.log((a + b) / 2) for a, b in zip(p, q, strict=True)]
                value = mpmath.fsum(
                    (a * (x - m) + b * (y - m)) / 2
                    for a, b, x, y, m in zip(p, q, lp, lq, lm, strict=True)
                )
            else:
                raise ValueError(name)
            out[idx] = float(value)
    return out
