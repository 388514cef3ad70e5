"""``crossent::assert_true``: a device-side assertion that ``torch.func.vmap`` can batch.

Under ``torch.compile`` the value checks are ``torch._assert_async`` calls
(:func:`crossent._lib._checks.assert_on_device`). ``_assert_async`` has no batching rule,
so a compiled ``vmap`` (``torch.compile(vmap(loss))``, ``torch.compile(vmap(grad(loss)))``,
a ``vmap`` inside a compiled function) could not trace it, and the checks were left out
there: a negative weight, targets or probabilities outside [0, 1] and probability rows that
do not sum to 1 gave a silently computed loss and gradient, a bad label PyTorch's own
``index 5 is out of bounds for dimension 2 with size 5``. Under ``torch.func`` transforms
traced by the compiler the assertion is this op instead: its ``vmap`` rule asserts on every
sample at once (the condition of each sample is its own; all must hold), and it is marked
as having a side effect (``torch.fx.node.has_side_effect``), so neither AOTAutograd nor
Inductor removes it for having no output. Outside transforms ``_assert_async`` stays (Inductor
lowers it into its generated kernels; the op would be a call of its own).

This module has no ``from __future__ import annotations``: ``custom_op`` reads the schema
from real annotations.
"""

from typing import Any

import torch

__all__ = ["assert_true"]


@torch.library.custom_op("crossent::assert_true", mutates_args=())
def _assert_true_op(ok: torch.Tensor, message: str) -> None:
    """Fail with `message` unless every element of the boolean tensor `ok` is True
    (``torch._assert_async``: a ``RuntimeError``, a device-side assertion on CUDA)."""
    torch._assert_async(ok.all(), message)


@_assert_true_op.register_fake
def _(ok: torch.Tensor, message: str) -> None:
    return None


def _every_sample(info: Any, in_dims: tuple[Any, ...], ok: torch.Tensor, message: str) -> Any:
    """``vmap`` rule: the condition of every sample (and every level beneath) must hold."""
    _assert_true_op(ok, message)
    return None, None


torch.library.register_vmap(_assert_true_op, _every_sample)
torch.fx.node.has_side_effect(torch.ops.crossent.assert_true.default)


def assert_true(ok: torch.Tensor, message: str) -> None:
    """Fail with `message` unless the 0-d boolean `ok` is True: ``torch._assert_async``, or
    under ``torch.func`` transforms (traced by ``torch.compile``) the op above."""
    if torch._C._are_functorch_transforms_active():
        _assert_true_op(ok, message)
    else:
        torch._assert_async(ok, message)
