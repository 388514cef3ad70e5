"""The fused functions as ``torch.library`` custom ops, for ``torch.compile``.

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

``crossent::linear_log_probs`` (with ``crossent::linear_log_probs_backward``, which
reads both upstream gradients) and ``crossent::linear_distill`` (built as
``crossent::linear_ce``) serve :func:`~crossent.fused.linear_log_probs` and
:func:`~crossent.fused.linear_distillation_loss` the same way.

Under ``torch.func`` transforms the three functions go through autograd
Functions with ``setup_context`` over the same ops (the ops' own autograd is not
usable there), and the ops batch under ``vmap`` by looping over the vmapped
dimension; see the section at the end.

This module has no ``from __future__ import annotations``: ``custom_op`` reads
the schema from real annotations.
"""

import ast
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from crossent.fused._chunked import (
    RowScaled,
    WideBlocks,
    _compute_dtype,
    product_dtype,
    result_dtype,
)
from crossent.fused._distill import DistillOptions, _chunked_distill
from crossent.fused._function import (
    LinearCEOptions,
    _core,
    grad_needs,
    no_autocast,
    no_second_derivative,
    refuse_double_backward,
)
from crossent.fused._inputs import check_labels, check_values
from crossent.fused._logprobs import LogProbOptions, _chunked_log_probs

__all__ = ["linear_ce_compiled", "linear_distill_compiled", "linear_log_probs_compiled"]

OptionsT = TypeVar("OptionsT", LinearCEOptions, LogProbOptions, DistillOptions)


def _encode(opts: Any) -> str:
    """Checked options (a frozen dataclass) as the ``repr`` of a tuple (floats round-trip
    exactly); Dynamo folds it."""
    return repr(dataclasses.astuple(opts))


@functools.lru_cache(maxsize=64)
def _decode(kind: type[OptionsT], options: str) -> OptionsT:
    return kind(*ast.literal_eval(options))


def _wanted(reduction: str, row_scale: Any, needs: list[bool]) -> list[bool]:
    """The gradients an op forms: forward's for ``"mean"``/``"sum"``, backward's for ``"none"``."""
    if row_scale is None and reduction == "none":
        return [False, False, False]
    return needs


def _needs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[bool]:
    """Which of (hidden, weight, bias) need a gradient in this call."""
    if not torch.is_grad_enabled():
        return [False, False, False]
    return [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]


def _grad_dtypes(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, formed: bool
) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
    """The (hidden, weight, bias) gradients' dtypes: the parameters', or with `formed` (formed
    in forward, to be scaled by the upstream gradient in backward) the dtypes the chunk loop
    forms them in (the product dtype for `hidden`, float32 for half-precision products'
    weight and bias), so that :func:`_scaled` rounds each to its parameter's dtype once. The
    hidden gradient of float16 products is float32 too: formed with lifted rows (a
    ``RowScaled``), it would lose them to float16's subnormals before the upstream scaling."""
    if not formed:
        return hidden.dtype, weight.dtype, None if bias is None else bias.dtype
    wide = product_dtype(hidden, weight, bias)
    acc = _compute_dtype(wide)
    return (acc if wide == torch.float16 else wide), acc, None if bias is None else acc


def _grads_out(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grads: tuple[
        torch.Tensor | RowScaled | None, torch.Tensor | WideBlocks | None, torch.Tensor | None
    ],
    *,
    formed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients in :func:`_grad_dtypes`; where none is formed, distinct empty tensors
    (outputs must not alias each other). A row-scaled hidden gradient and a blocked float32
    weight gradient come out wide (exact): scaled and rounded in backward, they are the eager
    ones bit for bit."""
    dtypes = _grad_dtypes(hidden, weight, bias, formed=formed)
    out = [
        hidden.new_empty(0)
        if g is None or dt is None
        else (g.wide() if isinstance(g, (RowScaled, WideBlocks)) else g).to(dt)
        for g, dt in zip(grads, dtypes, strict=True)
    ]
    return out[0], out[1], out[2]


def _fake_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    want: list[bool],
    *,
    formed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_grads_out`'s shapes and dtypes."""
    dh, dw, db = _grad_dtypes(hidden, weight, bias, formed=formed)
    return (
        torch.empty_like(hidden, dtype=dh) if want[0] else hidden.new_empty(0),
        torch.empty_like(weight, dtype=dw) if want[1] else hidden.new_empty(0),
        torch.empty_like(bias, dtype=db) if want[2] and bias is not None else hidden.new_empty(0),
    )


def _input_grads(needs: list[bool], grads: tuple[Any, Any, Any], n_other: int) -> tuple[Any, ...]:
    """Backward's result: the wanted (hidden, weight, bias) gradients, None for the rest."""
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),) + (
        None,
    ) * n_other


def _scaled(
    grads: tuple[torch.Tensor, ...], grad_loss: torch.Tensor, params: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Gradients formed in forward times the scalar upstream gradient (out of place), then
    rounded to their parameters' dtypes (once: they were formed wider, :func:`_grad_dtypes`)."""
    return tuple(
        g if p is None else (g * grad_loss.to(g.dtype)).to(p.dtype)
        for g, p in zip(grads, params, strict=True)
    )


# ----------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------


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
    opts = _decode(LinearCEOptions, options)
    check_values(target, class_weight, weight.shape[0], ignore_index=opts.ignore_index)
    want = _wanted(opts.reduction, row_scale, needs)
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
    grads = _grads_out(
        hidden, weight, bias, (res.grad_hidden, res.grad_weight, res.grad_bias),
        formed=row_scale is None,
    )  # fmt: skip
    return (res.loss, *grads)


@_linear_ce_op.register_fake
def _(hidden, weight, bias, target, class_weight, row_scale, options, needs):
    reduction = _decode(LinearCEOptions, options).reduction
    shape = (hidden.shape[0],) if reduction == "none" else ()
    want = _wanted(reduction, row_scale, needs)
    return (
        hidden.new_empty(shape, dtype=result_dtype(hidden, weight, bias)),
        *_fake_grads(hidden, weight, bias, want, formed=row_scale is None),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hidden, weight, bias, target, class_weight, _, options, needs = inputs
    ctx.options, ctx.needs = options, needs
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, *output[1:])


def _loss_backward(
    ctx: Any,
    grad_loss: torch.Tensor,
    formed: tuple[torch.Tensor, ...],
    rerun: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    *,
    params: tuple[Any, ...],
    name: str,
    kind: type,
    n_other: int,
) -> tuple[Any, ...]:
    """Backward of a loss op (``crossent::linear_ce``, ``crossent::linear_distill``): the
    gradients `formed` in forward times the scalar upstream gradient (``"mean"``, ``"sum"``;
    then rounded to the dtypes of `params`, the (hidden, weight, bias) of the call),
    or the op run again with the row gradients (``"none"``: ``rerun(grad_loss)``). No second
    derivative: a backward that builds a graph raises."""
    refuse_double_backward(name)
    if _decode(kind, ctx.options).reduction != "none":
        grads = _scaled(formed, grad_loss, params)
    else:
        grads = rerun(grad_loss)[1:]
    return _input_grads(ctx.needs, (grads[0], grads[1], grads[2]), n_other)


def _backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    hidden, weight, bias, target, class_weight, *formed = ctx.saved_tensors

    def rerun(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _linear_ce_op(
            hidden, weight, bias, target, class_weight, rows, ctx.options, ctx.needs
        )

    return _loss_backward(
        ctx, grad_loss, tuple(formed), rerun, params=(hidden, weight, bias),
        name="linear_cross_entropy", kind=LinearCEOptions, n_other=5,
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
    middle = (target, class_weight)
    return _loss_through(_linear_ce_op, "linear_cross_entropy", hidden, weight, bias, middle, opts)


def _loss_through(
    op: Any,
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    middle: tuple[Any, ...],
    opts: Any,
) -> torch.Tensor:
    """The loss from a loss op (``op(hidden, weight, bias, *middle, row_scale, options,
    needs)``): under a ``torch.func`` transform through :class:`_FuncLoss`, else the op with
    its gradients formed for what requires them."""
    if _under_func():
        return _FuncLoss.apply(hidden, weight, bias, *middle, _encode(opts), name, op)
    needs = _needs(hidden, weight, bias)
    loss: torch.Tensor = op(hidden, weight, bias, *middle, None, _encode(opts), needs)[0]
    return loss


# ----------------------------------------------------------------------------
# linear_log_probs: forward op (log-probs, entropy) and backward op (the gradients)
# ----------------------------------------------------------------------------


@torch.library.custom_op("crossent::linear_log_probs", mutates_args=())
def _log_probs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    options: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy, entropy kept for backward)``; entropy 0 when not asked."""
    opts = _decode(LogProbOptions, options)
    check_labels(target, weight.shape[0], ignore_index=opts.ignore_index)
    with no_autocast(hidden):
        res = _chunked_log_probs(hidden, weight, target, bias, opts, compute_grad=False)
    ent = torch.zeros_like(res.log_probs) if res.entropy is None else res.entropy
    return res.log_probs, ent, ent.clone()  # the caller may change the returned entropy


@_log_probs_op.register_fake
def _(hidden, weight, bias, target, options):
    out = hidden.new_empty((hidden.shape[0],), dtype=result_dtype(hidden, weight, bias))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("crossent::linear_log_probs_backward", mutates_args=())
def _log_probs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor,
    grad_entropy: torch.Tensor,
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _decode(LogProbOptions, options)
    with no_autocast(hidden):
        res = _chunked_log_probs(
            hidden, weight, target, bias, opts, compute_grad=(needs[0], needs[1], needs[2]),
            grad_log_probs=grad_log_probs, grad_entropy=grad_entropy,
            entropy=entropy if opts.entropy else None,
        )  # fmt: skip
    return _grads_out(hidden, weight, bias, (res.grad_hidden, res.grad_weight, res.grad_bias))


@_log_probs_backward_op.register_fake
def _(hidden, weight, bias, target, entropy, grad_log_probs, grad_entropy, options, needs):
    return _fake_grads(hidden, weight, bias, needs)


def _log_probs_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hidden, weight, bias, target, options = inputs
    ctx.options = options
    ctx.needs = list(grad_needs(ctx, bias))
    ctx.save_for_backward(hidden, weight, bias, target, output[2])


def _log_probs_backward(ctx: Any, grad_lp: Any, grad_ent: Any, _: Any) -> tuple[Any, ...]:
    hidden, weight, bias, target, entropy = ctx.saved_tensors
    refuse_double_backward("linear_log_probs")
    grad_lp = torch.zeros_like(entropy) if grad_lp is None else grad_lp
    grad_ent = torch.zeros_like(entropy) if grad_ent is None else grad_ent
    args = (hidden, weight, bias, target, entropy, grad_lp, grad_ent, ctx.options, ctx.needs)
    return _input_grads(ctx.needs, _log_probs_backward_op(*args), 2)


_log_probs_op.register_autograd(_log_probs_backward, setup_context=_log_probs_setup_context)


def linear_log_probs_compiled(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogProbOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_probs, entropy or None)`` of 2-d `hidden`, 1-d `target` through the custom op."""
    if _under_func():
        lp, ent, _ = _FuncLogProbs.apply(hidden, weight, bias, target, _encode(opts))
    else:
        lp, ent, _ = _log_probs_op(hidden, weight, bias, target, _encode(opts))
    return lp, (ent if opts.entropy else None)


# ----------------------------------------------------------------------------
# linear_distillation_loss: one op, as crossent::linear_ce (gradients formed in forward
# for "mean"/"sum", recomputed with the row gradients for "none")
# ----------------------------------------------------------------------------


@torch.library.custom_op("crossent::linear_distill", mutates_args=())
def _distill_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    counted: torch.Tensor,
    row_scale: torch.Tensor | None,
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _decode(DistillOptions, options)
    want = _wanted(opts.reduction, row_scale, needs)
    res = _chunked_distill(
        hidden, weight, bias, (teacher_hidden, teacher_weight, teacher_bias), counted, opts,
        compute_grad=(want[0], want[1], want[2]), row_scale=row_scale,
    )  # fmt: skip
    grads = _grads_out(
        hidden, weight, bias, (res.grad_hidden, res.grad_weight, res.grad_bias),
        formed=row_scale is None,
    )  # fmt: skip
    return (res.loss, *grads)


@_distill_op.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, counted, row_scale,
      options, needs):  # fmt: skip
    reduction = _decode(DistillOptions, options).reduction
    shape = (hidden.shape[0],) if reduction == "none" else ()
    dtype = _compute_dtype(product_dtype(hidden, weight, bias))
    want = _wanted(reduction, row_scale, needs)
    fakes = _fake_grads(hidden, weight, bias, want, formed=row_scale is None)
    return (hidden.new_empty(shape, dtype=dtype), *fakes)


def _distill_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.options, ctx.needs = inputs[8], inputs[9]
    ctx.save_for_backward(*inputs[:7], *output[1:])  # student, teacher, counted, gradients


def _distill_backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    saved = ctx.saved_tensors
    hidden, weight, bias, *teacher_counted = saved[:7]
    formed = saved[7:]

    def rerun(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _distill_op(hidden, weight, bias, *teacher_counted, rows, ctx.options, ctx.needs)

    return _loss_backward(
        ctx, grad_loss, tuple(formed), rerun, params=(hidden, weight, bias),
        name="linear_distillation_loss", kind=DistillOptions, n_other=7,
    )  # fmt: skip


_distill_op.register_autograd(_distill_backward, setup_context=_distill_setup_context)


def linear_distill_compiled(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    counted: torch.Tensor,
    opts: DistillOptions,
) -> torch.Tensor:
    """The distillation loss of 2-d `hidden` through the custom op (traceable)."""
    middle = (*teacher, counted)
    name = "linear_distillation_loss"
    return _loss_through(_distill_op, name, hidden, weight, bias, middle, opts)


# ----------------------------------------------------------------------------
# torch.func (grad, vmap, jacrev): autograd Functions with setup_context over the same ops
# ----------------------------------------------------------------------------
#
# The ops' own autograd (register_autograd) is not usable under torch.func transforms
# (its generated Function has no setup_context). Under a transform the three functions
# go through the Functions below instead: forward asks the op for the loss alone (the
# gradients cannot be chosen in forward, which has no ctx there), backward asks it for
# the wanted gradients with each row scaled by its upstream gradient — the recompute
# path of "none", exact for every reduction. The ops batch by looping over the vmapped
# dimension (_loop_vmap), so vmap(grad(...)) gives per-sample gradients, and backward
# forms its gradients in _FirstOrderGrads, whose own backward raises: a second
# derivative (grad of grad, jacrev of grad) is an error, never a wrong number.


def _under_func() -> bool:
    """Whether a ``torch.func`` transform is active (and not under ``torch.compile``)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _loop_vmap(op: Any) -> None:
    """Batch `op` by calling it once per index of the vmapped dimension (exact, like a loop)."""

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        def sample(i: int) -> Any:
            return op(*(
                a.select(d, i) if isinstance(a, torch.Tensor) and isinstance(d, int) else a
                for a, d in zip(args, in_dims, strict=True)
            ))  # fmt: skip

        if info.batch_size == 0:
            return _no_samples(op, args, in_dims)
        outs = [sample(i) for i in range(info.batch_size)]
        stacked = tuple(torch.stack(col) for col in zip(*outs, strict=True))
        return stacked, (0,) * len(stacked)

    torch.library.register_vmap(op, rule)


for _op in (_linear_ce_op, _log_probs_op, _log_probs_backward_op, _distill_op):
    _loop_vmap(_op)


def _no_samples(op: Any, args: tuple[Any, ...], in_dims: tuple[Any, ...]) -> tuple[Any, Any]:
    """`op` vmapped over 0 samples: empty outputs, their per-sample shapes and dtypes from
    the op's fake implementation (run on meta tensors: no sample to run it on)."""

    def meta(a: Any, d: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        if not isinstance(d, int):
            return a.to("meta")
        shape = a.shape[:d] + a.shape[d + 1 :]
        return torch.empty(shape, dtype=a.dtype, device="meta")

    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    outs = op(*(meta(a, d) for a, d in zip(args, in_dims, strict=True)))
    empty = tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in outs)
    return empty, (0,) * len(empty)


class _FirstOrderGrads(torch.autograd.Function):
    """``(hidden, weight, bias)`` gradients from one of the ops (its last three outputs).

    Differentiating them raises :func:`no_second_derivative`'s error.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(name: str, op: Any, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(op(*args)[-3:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx: Any, *_: Any) -> Any:
        raise no_second_derivative(ctx.name)

    @staticmethod
    def jvp(ctx: Any, *_: Any) -> Any:
        raise no_second_derivative(ctx.name)


class _FuncFunction(torch.autograd.Function):
    """Base of the two Functions below: vmap by the ops' rules, no forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx: Any, *_: Any) -> Any:
        msg = (
            f"crossent.fused.{ctx.name} has no forward-mode derivative (torch.func.jvp, "
            "jacfwd, hessian): use reverse mode (torch.func.grad, vjp, jacrev), or the "
            "unfused loss on materialized logits."
        )
        raise RuntimeError(msg)


def _row_scale(grad_loss: torch.Tensor, rows: int) -> torch.Tensor:
    """The upstream gradient per row (a scalar one expanded)."""
    return grad_loss.expand(rows) if grad_loss.ndim == 0 else grad_loss


class _FuncLoss(_FuncFunction):
    """The loss of ``crossent::linear_ce`` or ``crossent::linear_distill`` (`op`).

    Inputs: ``hidden, weight, bias, *constants, options, name, op`` — the op's
    arguments before its ``row_scale``, then the public function's name.
    """

    @staticmethod
    def forward(hidden: Any, weight: Any, bias: Any, *rest: Any) -> torch.Tensor:
        *constants, options, _, op = rest
        loss: torch.Tensor = op(hidden, weight, bias, *constants, None, options, [False] * 3)[0]
        return loss

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.options, ctx.name, ctx.op = inputs[-3:]
        ctx.save_for_backward(*inputs[:-3])

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, *constants = ctx.saved_tensors
        needs = list(grad_needs(ctx, bias))
        args = (hidden, weight, bias, *constants,
                _row_scale(grad_loss, hidden.shape[0]), ctx.options, needs)  # fmt: skip
        grads = _FirstOrderGrads.apply(ctx.name, ctx.op, *args)
        return _input_grads(needs, grads, len(constants) + 3)


class _FuncLogProbs(_FuncFunction):
    @staticmethod
    def forward(hidden: Any, weight: Any, bias: Any, target: Any,
                options: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        lp, ent, kept = _log_probs_op(hidden, weight, bias, target, options)
        return lp, ent, kept

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.name, ctx.options = "linear_log_probs", inputs[4]
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(*inputs[:4], output[2])

    @staticmethod
    def backward(ctx: Any, grad_lp: Any, grad_ent: Any, _: Any) -> tuple[Any, ...]:
        hidden, weight, bias, target, entropy = ctx.saved_tensors
        needs = list(grad_needs(ctx, bias))
        args = (hidden, weight, bias, target, entropy, grad_lp, grad_ent, ctx.options, needs)
        grads = _FirstOrderGrads.apply("linear_log_probs", _log_probs_backward_op, *args)
        return _input_grads(needs, grads, 2)
