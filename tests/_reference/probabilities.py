"""Float64 references for the losses from probabilities, whole arrays at a time.

Written from the documented rule: :math:`\\log p` clamped at -100 (a probability of 0
costs 100), its derivative :math:`1/p` where the clamp is off and 0 where it is on; the
binary masses :math:`P = w\\,\\alpha\\,p_w\\,t` and :math:`N = w\\,(1-\\alpha)(1-t)` of the
smoothed target :math:`t(1-\\varepsilon) + \\varepsilon/2`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st


def clamped_log(p: Any, *, complement: bool = False) -> np.ndarray:
    """``max(log p, -100)`` (or of ``log1p(-p)``) in float64."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log1p(-p) if complement else np.log(p), -100.0)


def log_derivative(p: Any) -> np.ndarray:
    """d max(log p, -100) / dp in float64: 1/p where log p >= -100, else 0 (the computed
    log, as :func:`clamped_log` and PyTorch clamp it: ``p < exp(-100)`` rounded differs by
    a few ulps at the edge)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(np.log(p) < -100.0, 0.0, 1 / np.where(p == 0, 1.0, p))


def reduce(row: np.ndarray, reduction: str, den: float) -> np.ndarray:
    """`reduction` of the per-row losses; the mean over `den`, 0 over none."""
    if reduction == "none":
        return row
    if reduction == "sum":
        return np.asarray(row.sum())
    return np.asarray(row.sum() / den if den else 0.0)


def binary_masses(
    t: Any, weight: Any, pos_weight: Any, smoothing: float, alpha: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(P, N) in float64; numbers or arrays broadcast to `t`."""
    ts = np.asarray(t, dtype=np.float64) * (1 - smoothing) + smoothing / 2
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    w = np.asarray(weight, dtype=np.float64)
    return w * a_pos * np.asarray(pos_weight, dtype=np.float64) * ts, w * a_neg * (1 - ts)


def binary_loss(p: Any, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The element losses ``-(P max(log p, -100) + N max(log(1 - p), -100))``."""
    return -(pos * clamped_log(p) + neg * clamped_log(p, complement=True))


def binary_gradient(p: Any, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """d binary_loss / dp: N/(1 - p) - P/p, each 0 where its log is clamped."""
    p = np.asarray(p, dtype=np.float64)
    d_not_p = np.where(p == 1, 0.0, neg / np.where(p == 1, 0.5, 1 - p))
    return d_not_p - pos * log_derivative(p)


BINARY_DRAWS = {
    "shape": st.sampled_from([(7,), (3, 4), (2, 3, 2)]),
    "seed": st.integers(0, 2**16),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "smoothing": st.sampled_from([0.0, 0.1]),
    "alpha": st.sampled_from([None, 0.25]),
}
"""The binary tests' draws (hypothesis), besides their weights."""
