"""Float64 references for crossent.metrics, written the obvious way (loops over rows and bins)."""

from __future__ import annotations

import math

import numpy as np


def log_probs(x: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise log-probabilities in float64 from probabilities, logits or log-probabilities."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for i, row in enumerate(x):
        if kind == "logits":
            m = max(row)
            lse = math.log(math.fsum(math.exp(v - m) for v in row))  # of z - m: exact shift
            out[i] = [(v - m) - lse for v in row]
        elif kind == "log_probs":
            out[i] = row
        else:
            out[i] = [max(math.log(v), -100.0) if v > 0 else -100.0 for v in row]
    return out


def probs(x: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise probabilities in float64."""
    if kind == "probs":
        return np.asarray(x, dtype=np.float64)
    return np.exp(log_probs(x, kind))


def log_loss(x: np.ndarray, y: np.ndarray, kind: str, base: float | None = None) -> float:
    """Mean −log p(label), log p clamped at −100 for probabilities, in units of `base`."""
    lp = log_probs(x, kind)
    total = math.fsum(-lp[i, int(label)] for i, label in enumerate(y))
    nats = total / len(y)
    return nats if base is None else nats / math.log(base)


def brier(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Mean over rows of Σ_k (p_k − [k = y])²."""
    p = probs(x, kind)
    terms = []
    for i, label in enumerate(y):
        terms.append(math.fsum((p[i, k] - (k == label)) ** 2 for k in range(p.shape[1])))
    return math.fsum(terms) / len(y)


def accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose first maximal class is the label."""
    hits = sum(int(np.argmax(row) == label) for row, label in zip(x, y, strict=True))
    return hits / len(y)


def calibration_pairs(x: np.ndarray, y: np.ndarray, kind: str, which: str) -> list[tuple]:
    """Per group, the list of (confidence, hit) pairs of the calibration kind `which`."""
    p = probs(x, kind)
    if which == "top_label":
        return [
            [(float(max(row)), int(np.argmax(row)) == int(t)) for row, t in zip(p, y, strict=True)]
        ]
    if which == "positive":
        return [[(float(row[1]), int(t) == 1) for row, t in zip(p, y, strict=True)]]
    return [
        [(float(row[k]), int(t) == k) for row, t in zip(p, y, strict=True)]
        for k in range(p.shape[1])
    ]


def _bin_gaps(pairs: list[tuple], bins: list[list[int]]) -> list[tuple[int, float]]:
    out = []
    for members in bins:
        if members:
            acc = math.fsum(pairs[i][1] for i in members) / len(members)
            conf = math.fsum(pairs[i][0] for i in members) / len(members)
            out.append((len(members), abs(acc - conf)))
    return out


def width_bins(pairs: list[tuple], n_bins: int) -> list[list[int]]:
    """Equal-width bins [k/B, (k+1)/B), the last one closed at 1."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i, (conf, _) in enumerate(pairs):
        k = min(math.floor(conf * n_bins), n_bins - 1)
        bins[k].append(i)
    return bins


def mass_bins(pairs: list[tuple], n_bins: int) -> list[list[int]]:
    """Exact equal-mass bins: sort by confidence and cut the ranks into B equal parts."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    n = len(order)
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for rank, i in enumerate(order):
        bins[min(rank * n_bins // n, n_bins - 1)].append(i)
    return bins


def ece(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    *,
    n_bins: int,
    which: str = "top_label",
    binning: str = "width",
    norm: str = "l1",
) -> float:
    """ECE (mean over groups of Σ_b n_b/N |acc_b − conf_b|) or MCE (max over bins)."""
    results = []
    for pairs in calibration_pairs(x, y, kind, which):
        bins = width_bins(pairs, n_bins) if binning == "width" else mass_bins(pairs, n_bins)
        gaps = _bin_gaps(pairs, bins)
        if norm == "l1":
            results.append(math.fsum(n * g for n, g in gaps) / len(pairs))
        else:
            results.append(max(g for _, g in gaps))
    return sum(results) / len(results) if norm == "l1" else max(results)


def per_class_log_loss(x: np.ndarray, y: np.ndarray, kind: str, num_classes: int) -> np.ndarray:
    """Mean −log p(label) over the rows of each class (NaN for a class without rows)."""
    lp = log_probs(x, kind)
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        rows = [i for i, t in enumerate(y) if t == k]
        if rows:
            out[k] = math.fsum(-lp[i, k] for i in rows) / len(rows)
    return out
