"""Categorical losses in float64 NumPy, written the obvious way (a loop over rows).

Each row: log p from logits (z - lse, lse with the max subtracted) or from
probabilities (log p clamped at -100), the coefficient c_k of every class, and

    loss = Σ_k [c_k ≠ 0] · c_k · (1 - p_k)^γ · (-log p_k)  (+ z_loss · lse² for sparse)

Sparse: c = (1-ε)·w_y·e_y + (ε/C)·w; categorical: c = w·((1-ε)·t + ε/C);
ListNet: c = softmax(relevance). "mean": Σ w_y over counted targets (sparse),
number of rows otherwise; a zero denominator gives 0.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["categorical_ce", "listnet", "nll", "numerical_grad", "sparse_ce"]


def _rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _row_log_p(
    row: np.ndarray, *, from_logits: bool, softcap: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(log p, 1 - p, lse) of one row."""
    if not from_logits:
        with np.errstate(divide="ignore"):
            log_p = np.maximum(np.log(row), -100.0)
        return log_p, 1.0 - row, math.nan
    z = row.copy()
    if softcap is not None:
        z = np.array([v if v == -math.inf else softcap * math.tanh(v / softcap) for v in z])
    m = z.max()
    log_s = math.log(sum(math.exp(v - m) for v in z))
    log_p = (z - m) - log_s  # not z - (m + log_s): that rounds at the magnitude of z
    return log_p, -np.expm1(log_p), m + log_s


def _row_loss(c: np.ndarray, log_p: np.ndarray, one_minus_p: np.ndarray, gamma: float) -> float:
    total = 0.0
    for k in range(c.shape[0]):
        if c[k] != 0:
            total += c[k] * one_minus_p[k] ** gamma * -log_p[k]
    return total


def _reduce(per_row: np.ndarray, denominator: float, reduction: str) -> np.ndarray:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return np.asarray(total)
    if denominator == 0:  # 0 for a finite sum; NaN for a NaN or infinite one (the differences page)
        with np.errstate(invalid="ignore"):
            return np.asarray(total / np.inf)
    return np.asarray(total / denominator)


def sparse_ce(
    input: np.ndarray,
    target: np.ndarray,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: np.ndarray | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    x, shape = _rows(input, axis)
    labels = np.asarray(target).reshape(-1)
    num_classes = x.shape[1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    per_row = np.zeros(x.shape[0])
    denominator = 0.0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if ignore_index is not None and y == ignore_index:
            continue
        log_p, one_minus_p, lse = _row_log_p(x[i], from_logits=from_logits, softcap=softcap)
        c = (eps / num_classes) * w
        c[y] += (1 - eps) * w[y]
        per_row[i] = _row_loss(c, log_p, one_minus_p, gamma)
        if z_loss:
            per_row[i] += z_loss * lse**2
        denominator += w[y]
    return _reduce(per_row.reshape(shape), denominator, reduction)


def nll(
    log_probs: np.ndarray,
    target: np.ndarray,
    *,
    axis: int = 1,
    weight: np.ndarray | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """PyTorch's nll_loss: -w_y · x_y, mean over Σ w_y."""
    x, shape = _rows(log_probs, axis)
    labels = np.asarray(target).reshape(-1)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    per_row = np.zeros(x.shape[0])
    denominator = 0.0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if ignore_index is not None and y == ignore_index:
            continue
        per_row[i] = -w[y] * x[i, y]
        denominator += w[y]
    return _reduce(per_row.reshape(shape), denominator, reduction)


def categorical_ce(
    input: np.ndarray,
    target: np.ndarray,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reduction: str = "mean",
) -> np.ndarray:
    x, shape = _rows(input, axis)
    t, _ = _rows(target, axis)
    num_classes = x.shape[1]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    per_row = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        log_p, one_minus_p, _ = _row_log_p(x[i], from_logits=from_logits, softcap=None)
        c = w * ((1 - label_smoothing) * t[i] + label_smoothing / num_classes)
        per_row[i] = _row_loss(c, log_p, one_minus_p, gamma)
    return _reduce(per_row.reshape(shape), float(x.shape[0]), reduction)


def listnet(
    scores: np.ndarray, relevance: np.ndarray, *, axis: int = -1, reduction: str = "mean"
) -> np.ndarray:
    """-Σ softmax(r) log softmax(s), mean over lists."""
    s, shape = _rows(scores, axis)
    r, _ = _rows(relevance, axis)
    per_row = np.zeros(s.shape[0])
    for i in range(s.shape[0]):
        log_q, _, _ = _row_log_p(r[i], from_logits=True, softcap=None)
        log_p, one_minus_p, _ = _row_log_p(s[i], from_logits=True, softcap=None)
        per_row[i] = _row_loss(np.exp(log_q), log_p, one_minus_p, 0.0)
    return _reduce(per_row.reshape(shape), float(s.shape[0]), reduction)


def numerical_grad(f: object, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function `f` at `x` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat = grad.reshape(-1)
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = h
        e = e.reshape(x.shape)
        flat[j] = (float(f(x + e)) - float(f(x - e))) / (2 * h)  # type: ignore[operator]
    return grad
