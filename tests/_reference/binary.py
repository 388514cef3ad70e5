"""Float64 reference for :func:`crossent.binary_cross_entropy`, one element at a time.

Written from the formula in the docstring: with the smoothed target t,
P = w·α·pw·t and N = w·(1−α)·(1−t),
loss = −[P·(1−p)^γ·log p + N·p^γ·log(1−p)], logs of probabilities clamped at −100.
"""

from __future__ import annotations

import math

import numpy as np


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _clamped(log_fn, v: float) -> float:
    try:
        return max(log_fn(v), -100.0)
    except ValueError:  # log(0) / log1p(-1)
        return -100.0


def binary_cross_entropy(
    input,
    target,
    *,
    from_logits: bool = False,
    weight=None,
    pos_weight=None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    x = np.asarray(input, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    w = np.broadcast_to(1.0 if weight is None else np.asarray(weight, np.float64), x.shape)
    pw = np.broadcast_to(1.0 if pos_weight is None else np.asarray(pos_weight, np.float64), x.shape)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        xi = float(x[idx])
        ti = float(t[idx]) * (1 - label_smoothing) + label_smoothing / 2
        if from_logits:
            log_p, log_not_p = log_sigmoid(xi), log_sigmoid(-xi)
        else:
            log_p = _clamped(math.log, xi)
            log_not_p = _clamped(lambda v: math.log1p(-v), xi)
        a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
        big_p = w[idx] * a_pos * pw[idx] * ti
        big_n = w[idx] * a_neg * (1 - ti)
        f_pos = math.exp(gamma * log_not_p)
        f_neg = math.exp(gamma * log_p)
        out[idx] = -(big_p * f_pos * log_p + big_n * f_neg * log_not_p)
    if reduction == "none":
        return out
    if reduction == "sum":
        return np.asarray(math.fsum(out.ravel()))
    return np.asarray(math.fsum(out.ravel()) / out.size if out.size else 0.0)
