"""The fused linear cross-entropy as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` (``fullgraph=True`` included) the chunk loop must not be
traced: its row selection (``nonzero``), chunk count and label checks depend on
values. The two ops below are opaque to the compiler — their fake
implementations give only shapes and dtypes — so the loop runs eagerly inside
the compiled graph, once per call, and is never unrolled into it. Eager calls
keep using the autograd Function of :mod:`crossent.fused._function` (the same
core, with in-place gradient scaling).

``crossent::linear_ce`` returns the loss and, for ``"mean"``/``"sum"``, the
gradients formed in the forward pass (empty tensors where none is wanted);
backward scales them. For ``"none"``, backward calls ``crossent::linear_ce_backward``,
which recomputes the chunks under the incoming row gradients. Value checks of
the labels run inside the op, on concrete values.

This module has no ``from __future__ import annotations``: ``custom_op`` reads
the schema from real annotations.
"""

from typing import Any

import torch

from crossent.fused._chunked import result_dtype
from crossent.fused._function import LinearCEOptions, _core
from crossent.fused._inputs import check_values

__all__ = ["linear_ce_compiled"]


def _run_core(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
    needs: list[bool],
    row_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_values(target, class_weight, weight.shape[0], ignore_index=opts.ignore_index)
    res = _core(
        hidden,
        weight,
        target,
        bias,
        class_weight,
        opts,
        compute_grad=(needs[0], needs[1], needs[2]),
        row_scale=row_scale,
    )
    # distinct empty tensors where no gradient is wanted: outputs must not alias each other
    grad_h = hidden.new_empty(0) if res.grad_hidden is None else res.grad_hidden
    grad_w = hidden.new_empty(0) if res.grad_weight is None else res.grad_weight.to(weight.dtype)
    grad_b = (
        hidden.new_empty(0)
        if res.grad_bias is None or bias is None
        else res.grad_bias.to(bias.dtype)
    )
    return res.loss, grad_h, grad_w, grad_b


def _options(
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    chunk_size: int | None,
) -> LinearCEOptions:
    return LinearCEOptions(ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size)


@torch.library.custom_op("crossent::linear_ce", mutates_args=())
def _linear_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    chunk_size: int | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _options(ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size)
    eager = needs if reduction != "none" else [False, False, False]
    loss, gh, gw, gb = _run_core(hidden, weight, bias, target, class_weight, opts, eager, None)
    return loss, gh, gw, gb


def _grad_shapes(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
        torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0),
    )


@_linear_ce_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    class_weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_size,
    needs,
):
    dt = result_dtype(hidden, weight, bias)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=dt)
    eager = needs if reduction != "none" else [False, False, False]
    return (loss, *_grad_shapes(hidden, weight, bias, eager))


@torch.library.custom_op("crossent::linear_ce_backward", mutates_args=())
def _linear_ce_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    row_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _options(ignore_index, label_smoothing, z_loss, softcap, "none", chunk_size)
    _, gh, gw, gb = _run_core(hidden, weight, bias, target, class_weight, opts, needs, row_scale)
    return gh, gw, gb


@_linear_ce_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    class_weight,
    row_scale,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    needs,
):
    return _grad_shapes(hidden, weight, bias, needs)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hidden, weight, bias, target, class_weight, *opts, needs = inputs
    ctx.opts, ctx.needs = opts, needs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(
        hidden, weight, bias, target, class_weight, output[1], output[2], output[3]
    )


def _backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    hidden, weight, bias, target, class_weight, gh, gw, gb = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size = ctx.opts
    needs = ctx.needs
    if reduction != "none":
        scale = grad_loss
        gh, gw, gb = (g * scale.to(g.dtype) for g in (gh, gw, gb))
    else:
        gh, gw, gb = _linear_ce_backward_op(
            hidden,
            weight,
            bias,
            target,
            class_weight,
            grad_loss,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            chunk_size,
            needs,
        )
    return (
        gh if needs[0] else None,
        gw if needs[1] else None,
        gb if needs[2] and ctx.has_bias else None,
        None, None, None, None, None, None, None, None, None,
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
    loss: torch.Tensor = _linear_ce_op(
        hidden, weight, bias, target, class_weight, opts.ignore_index, opts.label_smoothing,
        opts.z_loss, opts.softcap, opts.reduction, opts.chunk_size, needs,
    )[0]  # fmt: skip
    return loss
