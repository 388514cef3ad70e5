"""Focal losses and the cross-entropy extras, written out in float64 PyTorch (loops are fine).

Written in torch rather than NumPy so the same formula gives the reference
gradient through autograd. Inputs are float64 and moderate, where the naive
``log(softmax)`` / ``log(sigmoid)`` forms are accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy_with_extras",
    "sigmoid_focal_per_term",
    "sigmoid_focal_torchvision",
    "softmax_focal",
]


def _reduce(per_item: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    return total / denominator if float(denominator) != 0 else total * 0.0


def softmax_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017), logits (N, C), class indices (N,).

    loss_i = (1-ε)·w_y·(1-p_y)^γ·(-log p_y) + (ε/C)·Σ_k w_k·(1-p_k)^γ·(-log p_k);
    "mean" divides by Σ w_{y_i} over counted items (PyTorch's class-weight rule).
    """
    n, c = logits.shape
    p = torch.softmax(logits, dim=1)
    w = torch.ones(c, dtype=logits.dtype) if weight is None else weight.to(logits.dtype)
    eps = label_smoothing
    per_item = []
    denominator = torch.zeros((), dtype=logits.dtype)
    for i in range(n):
        y = int(target[i])
        if y == ignore_index:
            per_item.append(torch.zeros((), dtype=logits.dtype))
            continue

        def term(k: int, i: int = i) -> torch.Tensor:
            return w[k] * (1 - p[i, k]) ** gamma * -torch.log(p[i, k])

        loss = (1 - eps) * term(y) + (eps / c) * sum(term(k) for k in range(c))
        per_item.append(loss)
        denominator = denominator + w[y]
    return _reduce(torch.stack(per_item), denominator, reduction)


def sigmoid_focal_torchvision(
    inputs: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, line by line (reduction="none"; alpha < 0 disables)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def sigmoid_focal_per_term(
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    gamma: float,
    alpha: float | None = None,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary focal cross-entropy with the focal factor on each of the two terms.

    t ← t(1-ε) + ε/2;  loss = -w·[α·pw·t·(1-p)^γ·log p + (1-α)·(1-t)·p^γ·log(1-p)],
    α = 1 and 1-α = 1 when alpha is None. Equals torchvision's formula for hard targets.
    """
    t = t * (1 - label_smoothing) + label_smoothing / 2
    p = torch.sigmoid(x)
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    pw = 1.0 if pos_weight is None else pos_weight
    loss = -(
        a_pos * pw * t * (1 - p) ** gamma * torch.log(p)
        + a_neg * (1 - t) * p**gamma * torch.log(1 - p)
    )
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, torch.tensor(float(loss.numel()), dtype=x.dtype), reduction)


def cross_entropy_with_extras(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy of soft-capped logits plus z_loss·lse² per counted target (dim 1)."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    counted = target != ignore_index
    lse = torch.logsumexp(logits, dim=1)
    per_item = torch.where(counted, ce + z_loss * lse**2, torch.zeros_like(ce))
    return _reduce(per_item, counted.sum().to(logits.dtype), reduction)
