"""The autograd.Function of the fused linear cross-entropy.

``"mean"`` and ``"sum"``: forward runs the three matrix products of the chunk
loop once and keeps the gradients; backward only scales them by the incoming
scalar gradient (in place, in tensors this Function owns). ``"none"``: forward
computes only the loss (one matrix product); backward recomputes the gradients
with each row scaled by its incoming gradient. A second backward through the
same graph (``retain_graph=True``) recomputes too, so it is always correct.

With a :class:`VocabShard` the same Function runs one slice of a
vocabulary-parallel head (:mod:`crossent.distributed`): the chunk loop combines
the row statistics across processes and backward sums the slices' gradients
of `hidden`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from crossent._lib._xp import forward_ad_active, torch_transform_name
from crossent.fused._chunked import (
    LinearCEOptions,
    RowScaled,
    VocabShard,
    WideBlocks,
    _chunked_linear_ce,
)

__all__ = [
    "Formed",
    "Grads",
    "LinearCEOptions",
    "VocabShard",
    "_LinearCrossEntropyFunction",
    "fused_backward",
    "run_linear_ce",
    "stash_grads",
]


def _core(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
    *,
    compute_grad: tuple[bool, bool, bool] | bool,
    row_scale: torch.Tensor | None = None,
    shard: VocabShard | None = None,
) -> Any:
    with no_autocast(hidden):
        return _chunked_linear_ce(
            hidden,
            weight,
            target,
            bias=bias,
            class_weight=class_weight,
            opts=opts,
            compute_grad=compute_grad,
            row_scale=row_scale,
            shard=shard,
        )


def grad_needs(ctx: Any, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) — the Function's first three inputs — need a gradient."""
    return (
        bool(ctx.needs_input_grad[0]),
        bool(ctx.needs_input_grad[1]),
        bias is not None and bool(ctx.needs_input_grad[2]),
    )


def scale_grads_(grads: tuple[torch.Tensor | None, ...], factor: torch.Tensor | None) -> None:
    """Scale gradients formed in forward by the scalar upstream gradient `factor` (None: 1),
    in place."""
    if factor is None:
        return
    for g in grads:
        if g is not None:
            g.mul_(factor)  # 0-d: keeps g.dtype


def _unit_skipped(grad_loss: torch.Tensor) -> torch.Tensor | None:
    """The scalar upstream gradient, or None (no products) where it is 1 on the CPU
    (``loss.backward()``); elsewhere reading it would synchronise with the device (the host
    would wait for the whole forward), so the products run (times 1: the same numbers)."""
    if grad_loss.is_cpu and bool(grad_loss == 1):
        return None
    return grad_loss


def refuse_double_backward(name: str) -> None:
    """Raise when backward runs with ``create_graph=True``: no exact second derivative here.

    The gradients are formed in place from recomputed chunks, outside autograd;
    returning them as constants would make any higher-order derivative silently
    wrong, so it is an error instead.
    """
    if torch.is_grad_enabled():
        raise no_second_derivative(name)


def sharded_name(name: str, shard: VocabShard | None) -> str:
    """The public name of fused function `name` in error messages: its vocabulary-parallel
    twin's with a vocabulary slice."""
    return name if shard is None else f"crossent.distributed.vocab_parallel_{name}"


def refuse_func_shard(shard: VocabShard | None) -> None:
    """Raise under a ``torch.func`` transform with a vocabulary slice: not supported there."""
    if shard is not None:
        refuse_func_transforms(
            "A vocabulary-parallel fused loss (crossent.distributed."
            "vocab_parallel_linear_cross_entropy / vocab_parallel_linear_log_probs)"
        )


def refuse_func_transforms(caller: str) -> None:
    """Raise a RuntimeError naming the active ``torch.func`` transform (none: nothing) for a
    vocabulary-parallel loss, `caller`, and the fixes: autograd, or the single-process loss
    for per-sample gradients.

    Making ``grad`` alone work would need the rank header exchange and its host check to run
    beneath the transform, and ``vmap`` a collective per sample; an error names what to do.
    """
    name = torch_transform_name()
    if name is None:
        return
    msg = (
        f"{caller} does not support torch.func.{name} (nor any torch.func transform): the "
        "ranks exchange and check a header on the host, which a transform cannot trace. "
        "Differentiate it with autograd (loss.backward() or torch.autograd.grad); for "
        "per-sample gradients (vmap(grad(...))) use the single-process loss on the whole "
        "vocabulary (crossent.sparse_categorical_cross_entropy, "
        "crossent.fused.linear_cross_entropy)."
    )
    raise RuntimeError(msg)


def no_second_derivative(name: str) -> RuntimeError:
    """The error of a second differentiation of ``crossent.fused.<name>`` (or of `name` itself
    when it is a dotted path)."""
    where = name if "." in name else f"crossent.fused.{name}"
    msg = (
        f"{where} has no second derivative: its backward pass forms the "
        "gradient outside autograd (chunk by chunk, or from saved row statistics). "
        "Differentiate it once (no create_graph=True / double backward, no nested "
        "torch.func.grad / jacrev of a gradient), or use the unfused, single-process loss on "
        "materialized logits for higher-order gradients."
    )
    return RuntimeError(msg)


def no_forward_derivative(name: str) -> RuntimeError:
    """The error of a forward-mode differentiation of ``crossent.fused.<name>`` (or of `name`
    itself when it is a dotted path)."""
    where = name if "." in name else f"crossent.fused.{name}"
    msg = (
        f"{where} has no forward-mode derivative (torch.func.jvp, jacfwd, "
        "hessian, torch.autograd.forward_ad dual tensors): use reverse mode "
        "(torch.func.grad, vjp, jacrev, backward), or the unfused loss on materialized logits."
    )
    return RuntimeError(msg)


def refuse_dual(name: str, *tensors: torch.Tensor | None) -> None:
    """Raise for a dual tensor of ``torch.autograd.forward_ad`` among `tensors`, eagerly.

    The chunk loop's ``out=`` products have no forward derivative ('Trying to use forward AD
    with mm_out') and its autograd Functions no ``jvp``; under ``torch.func`` the ops' own
    ``jvp`` raises the same error.
    """
    if not forward_ad_active():
        return
    from torch.autograd.forward_ad import unpack_dual

    if any(t is not None and unpack_dual(t).tangent is not None for t in tensors):
        raise no_forward_derivative(name)


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
#: Gradients formed in forward: the hidden one may be kept row-scaled (``RowScaled``), a
#: half-precision head's in float32 blocks of rows (``WideBlocks``).
Formed = tuple[
    torch.Tensor | RowScaled | None, torch.Tensor | WideBlocks | None, torch.Tensor | None
]


def stash_grads(ctx: Any, grads: Formed | None) -> None:
    """Keep the gradients formed in forward (``"mean"``/``"sum"``) for backward; None: recompute."""
    ctx.grads = grads


def fused_backward(
    ctx: Any,
    name: str,
    grad_loss: torch.Tensor,
    recompute: Callable[[torch.Tensor | None], Formed],
    *,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    shard: VocabShard | None = None,
) -> Grads:
    """The backward pass of every fused autograd Function: (hidden, weight, bias) gradients.

    Gradients stashed by forward (:func:`stash_grads`) are consumed and scaled in
    place by the scalar `grad_loss`; otherwise ``recompute(row_scale)`` forms them
    again, with each row scaled by its upstream gradient (`grad_loss` expanded to
    the rows, or None when `recompute` reads the upstream gradients itself). A
    second backward through the same graph recomputes too. The gradients
    come back in their parameters' dtypes (half-precision `hidden` with a float32 `weight`:
    recomputed, `hidden`'s is rounded once, after the scaling; stashed, it was kept in
    `hidden`'s dtype, :class:`~crossent.fused._chunked.RowScaled`); with a `shard`, the
    slices' contributions to the gradient of `hidden` are summed over the ranks, then rounded.
    A half-precision head's gradient, accumulated in float32 in blocks of rows
    (:class:`~crossent.fused._chunked.WideBlocks`), is scaled and rounded once, block by block.
    `hidden`, `weight` and `bias` are the tensors the caller unpacked from
    ``ctx.saved_tensors``: unpacking them again here would fail under non-reentrant
    activation checkpointing, which allows one unpack per saved tensor.
    """
    # a vocabulary slice: the function called was crossent.distributed.vocab_parallel_<name>
    refuse_double_backward(sharded_name(name, shard))
    stashed = getattr(ctx, "grads", None)
    reduce_sum = None if shard is None else shard.reduce_sum  # every slice contributes
    factor = None  # recomputed gradients are scaled already
    if stashed is not None:
        ctx.grads = None  # consumed: a second backward recomputes
        grad_h, grad_w, grad_b = stashed
        factor = _unit_skipped(grad_loss)  # read once
        scale_grads_((None if isinstance(grad_w, WideBlocks) else grad_w, grad_b), factor)
    else:
        rows = hidden.shape[0]
        row_scale = grad_loss.expand(rows) if grad_loss.ndim == 0 else grad_loss
        grad_h, grad_w, grad_b = recompute(row_scale)
    if isinstance(grad_h, RowScaled):  # rounded to hidden's dtype once more, block by block
        grad_h = grad_h.scaled(factor, None if grad_h.summed else reduce_sum)
    elif grad_h is not None:
        scale_grads_((grad_h,), factor)
        if reduce_sum is not None:
            grad_h = reduce_sum(grad_h)
        grad_h = grad_h.to(hidden.dtype)
    if isinstance(grad_w, WideBlocks):  # float32 blocks: scaled, rounded once, each freed
        grad_w = grad_w.rounded(factor, weight.dtype)
    elif grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    grad_b = None if grad_b is None or bias is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def no_autocast(x: torch.Tensor) -> Any:
    """A context in which an enclosing ``torch.autocast`` does not recast the products (none on
    a device without autocast, such as ``meta``)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = CE(hidden @ weight.T + bias, target); hidden is 2-d, target 1-d."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        class_weight: torch.Tensor | None,
        opts: LinearCEOptions,
        shard: VocabShard | None,
    ) -> torch.Tensor:
        needs = grad_needs(ctx, bias)
        eager = opts.reduction != "none"
        args = (hidden, weight, target, bias, class_weight, opts)
        res = _core(*args, compute_grad=needs if eager else False, shard=shard)
        ctx.opts, ctx.shard, ctx.needs = opts, shard, needs
        stash_grads(ctx, (res.grad_hidden, res.grad_weight, res.grad_bias) if eager else None)
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
        loss: torch.Tensor = res.loss
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, target, class_weight = ctx.saved_tensors

        def recompute(row_scale: torch.Tensor | None) -> Formed:
            args = (hidden, weight, target, bias, class_weight, ctx.opts)
            res = _core(*args, compute_grad=ctx.needs, row_scale=row_scale, shard=ctx.shard)
            return res.grad_hidden, res.grad_weight, res.grad_bias

        grads = fused_backward(
            ctx, "linear_cross_entropy", grad_loss, recompute,
            hidden=hidden, weight=weight, bias=bias, shard=ctx.shard,
        )  # fmt: skip
        return *grads, None, None, None, None


def run_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
    shard: VocabShard | None = None,
) -> torch.Tensor:
    """The loss of 2-d `hidden` and 1-d `target`: through autograd when a gradient is needed.

    Under ``torch.no_grad()`` or with no input requiring a gradient, only the
    loss is computed (one matrix product per chunk, no gradient buffers).
    """
    refuse_func_shard(shard)
    refuse_dual(sharded_name("linear_cross_entropy", shard), hidden, weight, bias, class_weight)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        with torch.no_grad():
            res = _core(
                hidden, weight, target, bias, class_weight, opts, compute_grad=False, shard=shard
            )
        loss: torch.Tensor = res.loss
        return loss
    out: torch.Tensor = _LinearCrossEntropyFunction.apply(
        hidden, weight, bias, target, class_weight, opts, shard
    )
    return out
