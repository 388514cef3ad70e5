"""The fused linear cross-entropy as a ``torch.library`` custom op, for ``torch.compile``.

Under ``torch.compile`` (``fullgraph=True`` included) the chunk loop must not be
traced: its row selection (``nonzero``), chunk count and label checks depend on
values. The op below is opaque to the compiler — its fake implementation gives
only shapes and dtypes — so the loop runs eagerly inside the compiled graph,
once per call, and is never unrolled into it. Eager calls keep using the
autograd Function of :mod:`crossent.fused._function` (the same core, with
in-place gradient scaling).

``crossent::linear_ce`` is the chunk core itself: it returns the loss and the
gradients it was asked for (empty tensors where none is wanted). The forward
call asks, for ``"mean"``/``"sum"``, for the gradients formed in the same pass,
and backward scales them; for ``"none"`` backward calls the same op again with
the incoming row gradients as `row_scale`. The checked options travel as one
string (:func:`_encode`, the ``repr`` of a tuple), so the op's schema does not restate them. Value
checks of the labels run inside the op, on concrete values.

This module has no ``from __future__ import annotations``: ``custom_op`` reads
the schema from real annotations.
"""

import ast
import functools
from typing import Any

import torch

from crossent.fused._chunked import result_dtype
from crossent.fused._function import LinearCEOptions, _core
from crossent.fused._inputs import check_values

__all__ = ["linear_ce_compiled"]


def _encode(opts: LinearCEOptions) -> str:
    """The options as the ``repr`` of a tuple (floats round-trip exactly); Dynamo folds it."""
    return repr(
        (
            opts.ignore_index,
            opts.label_smoothing,
            opts.z_loss,
            opts.softcap,
            opts.reduction,
            opts.chunk_size,
        )
    )


@functools.lru_cache(maxsize=64)
def _decode(options: str) -> LinearCEOptions:
    return LinearCEOptions(*ast.literal_eval(options))


def _wanted(options: str, row_scale: Any, needs: list[bool]) -> list[bool]:
    """The gradients the op forms: forward's for ``"mean"``/``"sum"``, backward's for ``"none"``."""
    if row_scale is None and _decode(options).reduction == "none":
        return [False, False, False]
    return needs


@torch.library.custom_op("crossent::linear_ce", mutates_args=())
def _linear_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _decode(options)
    check_values(target, class_weight, weight.shape[0], ignore_index=opts.ignore_index)
    want = _wanted(options, row_scale, needs)
    res = _core(
        hidden,
        weight,
        target,
        bias,
        class_weight,
        opts,
        compute_grad=(want[0], want[1], want[2]),
        row_scale=row_scale,
    )
    # distinct empty tensors where no gradient is wanted: outputs must not alias each other
    grads = (res.grad_hidden, res.grad_weight, res.grad_bias)
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    out = [
        hidden.new_empty(0) if g is None or dt is None else g.to(dt)
        for g, dt in zip(grads, dtypes, strict=True)
    ]
    return res.loss, out[0], out[1], out[2]


@_linear_ce_op.register_fake
def _(hidden, weight, bias, target, class_weight, row_scale, options, needs):
    want = _wanted(options, row_scale, needs)
    shape = (hidden.shape[0],) if _decode(options).reduction == "none" else ()
    return (
        hidden.new_empty(shape, dtype=result_dtype(hidden, weight, bias)),
        torch.empty_like(hidden) if want[0] else hidden.new_empty(0),
        torch.empty_like(weight) if want[1] else hidden.new_empty(0),
        torch.empty_like(bias) if want[2] and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hidden, weight, bias, target, class_weight, _, options, needs = inputs
    ctx.options, ctx.needs = options, needs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, *output[1:])


def _backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    hidden, weight, bias, target, class_weight, gh, gw, gb = ctx.saved_tensors
    needs = ctx.needs
    if _decode(ctx.options).reduction != "none":  # formed in forward: scale (out of place)
        gh, gw, gb = (g * grad_loss.to(g.dtype) for g in (gh, gw, gb))
    else:
        args = (hidden, weight, bias, target, class_weight, grad_loss, ctx.options, needs)
        _, gh, gw, gb = _linear_ce_op(*args)
    return (
        gh if needs[0] else None,
        gw if needs[1] else None,
        gb if needs[2] and ctx.has_bias else None,
        None, None, None, None, None,
    )  # fmt: skip


_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


def linear_ce_compiled(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
) -> torch.Tensor:
    """The loss of 2-d `hidden`, 1-d `target` through the custom op (traceable)."""
    needs = [
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    ]
    if not torch.is_grad_enabled():
        needs = [False, False, False]
    args = (hidden, weight, bias, target, class_weight, None, _encode(opts), needs)
    loss: torch.Tensor = _linear_ce_op(*args)[0]
    return loss
