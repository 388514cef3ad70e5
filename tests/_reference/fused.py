"""Float64 NumPy reference for the fused linear cross-entropy: loss and all gradients.

Written the obvious way, one token at a time, from the definitions:
z = softcap·tanh((W h + b)/softcap), p = softmax(z),
L_i = (1-ε)·w_y·(lse - z_y) + (ε/C)·Σ_k w_k·(lse - z_k) + ζ·lse²,
"mean" divides by Σ w_{y_i} over counted tokens (0 when that is 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["linear_cross_entropy_ref", "linear_log_probs_ref"]


def linear_cross_entropy_ref(
    hidden: Any,
    weight: Any,
    target: Any,
    *,
    bias: Any = None,
    class_weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    grad_output: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(loss, d/d hidden, d/d weight, d/d bias)`` in float64 for 2-d hidden, 1-d target.

    `grad_output` is the upstream gradient (scalar, or per token for "none"); 1 by default.
    """
    h = np.asarray(hidden, dtype=np.float64)
    w_mat = np.asarray(weight, dtype=np.float64)
    y = np.asarray(target)
    n, _ = h.shape
    c = w_mat.shape[0]
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    cw = np.ones(c) if class_weight is None else np.asarray(class_weight, dtype=np.float64)
    eps = float(label_smoothing)
    up = np.ones(n) if grad_output is None else np.broadcast_to(np.asarray(grad_output), (n,))

    losses = np.zeros(n)
    g_logits = np.zeros((n, c))
    denom = 0.0
    for i in range(n):
        if y[i] == ignore_index:
            continue
        x = w_mat @ h[i] + b
        z = x if softcap is None else softcap * np.tanh(x / softcap)
        m = z.max()
        lse = m + np.log(np.sum(np.exp(z - m)))
        p = np.exp(z - lse)
        t = int(y[i])
        losses[i] = (
            (1 - eps) * cw[t] * (lse - z[t]) + eps / c * np.sum(cw * (lse - z)) + z_loss * lse**2
        )
        onehot = np.zeros(c)
        onehot[t] = 1.0
        dz = (1 - eps) * cw[t] * (p - onehot) + eps / c * (np.sum(cw) * p - cw)
        dz += 2 * z_loss * lse * p
        if softcap is not None:
            dz = dz * (1 - np.tanh(x / softcap) ** 2)
        g_logits[i] = dz
        denom += cw[t]

    if reduction == "none":
        loss = losses
        scale = up
    elif reduction == "sum":
        loss = np.asarray(losses.sum())
        scale = up
    else:
        loss = np.asarray(losses.sum() / denom if denom > 0 else 0.0)
        scale = up / denom if denom > 0 else np.zeros(n)
    g_logits = g_logits * scale[:, None]
    return loss, g_logits @ w_mat, g_logits.T @ h, g_logits.sum(axis=0)


def linear_log_probs_ref(
    hidden: Any,
    weight: Any,
    target: Any,
    *,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    grad_log_probs: Any = None,
    grad_entropy: Any = None,
) -> tuple[np.ndarray, ...]:
    """``(log_probs, entropy, d/d hidden, d/d weight, d/d bias)`` in float64, 2-d hidden.

    Per token: u = softcap(W h + b) / T, p = softmax(u), log p_y and H = -Σ p log p; the
    gradients are those of Σ_i g_i log p_{y_i} + e_i H_i (upstream `grad_log_probs` g and
    `grad_entropy` e, zeros by default). Ignored tokens give 0 and no gradient.
    """
    h = np.asarray(hidden, dtype=np.float64)
    w_mat = np.asarray(weight, dtype=np.float64)
    y = np.asarray(target)
    n = h.shape[0]
    c = w_mat.shape[0]
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    g_lp = np.zeros(n) if grad_log_probs is None else np.asarray(grad_log_probs, np.float64)
    g_h = np.zeros(n) if grad_entropy is None else np.asarray(grad_entropy, np.float64)
    lps, ents = np.zeros(n), np.zeros(n)
    g_logits = np.zeros((n, c))
    for i in range(n):
        if y[i] == ignore_index:
            continue
        x = w_mat @ h[i] + b
        z = x if softcap is None else softcap * np.tanh(x / softcap)
        u = z / temperature
        # relative to the most probable class, whose log p = -log1p(sum of the others):
        # log(1 + q) and the lse's rounding at |max| were 1e-4 to 1e-2 relative at q = 1e-12
        star = int(np.argmax(u))
        others = np.exp(u - u[star])
        others[star] = 0.0
        log_p = (u - u[star]) - np.log1p(others.sum())
        p = np.exp(log_p)
        t = int(y[i])
        lps[i] = log_p[t]
        ents[i] = -np.sum(p * log_p)
        onehot = np.zeros(c)
        onehot[t] = 1.0
        du = g_lp[i] * (onehot - p) - g_h[i] * p * (log_p + ents[i])
        du[t] += g_lp[i] * ((-np.expm1(log_p[t])) - (1.0 - p[t]))  # 1 - p_t without cancelling
        dx = du / temperature
        if softcap is not None:
            dx = dx * (1 - np.tanh(x / softcap) ** 2)
        g_logits[i] = dx
    return lps, ents, g_logits @ w_mat, g_logits.T @ h, g_logits.sum(axis=0)
