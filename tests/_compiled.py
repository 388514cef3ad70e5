"""Shared by the torch.compile tests: a loss run eagerly and compiled, values and gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def eager_and_compiled(loss: Callable[[Any], Any], x: Any) -> list[tuple[Any, Any]]:
    """[(value, gradient of its sum), eagerly and with ``torch.compile(fullgraph=True)``]."""
    import torch

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        v = x.clone().requires_grad_(True)
        out = fn(v)
        (g,) = torch.autograd.grad(out.sum(), v)
        results.append((out.detach(), g))
    return results
