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
