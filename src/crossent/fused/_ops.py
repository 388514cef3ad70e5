"""The fused functions as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` (``fullgraph=True`` included) the chunk loop must not be
traced: its row selection (``nonzero``), chunk count and label checks depend on
values. The ops below are opaque to the compiler — their fake implementations give
only shapes and dtypes — so the loop runs eagerly inside the compiled graph,
once per call, and is never unrolled into it. Eager calls keep using the
autograd Functions of :mod:`crossent.fused._function`; the ops' backward is theirs
(``fused_backward``), so compiled and eager give the same numbers and hold the same memory.

``crossent::linear_ce`` runs the chunk core and returns the loss and a token: for
``"mean"``/``"sum"`` the gradients formed in the same pass are kept under it, not
returned (see "Gradients formed in forward"). ``crossent::linear_ce_backward`` takes
them back and scales them in place, or, with none kept (``"none"``, a second backward,
``torch.func``), recomputes them with the incoming row gradients. The checked options
travel as one string (:func:`_encode`, the ``repr`` of a tuple), so the ops' schemas do
not restate them. Value checks of the labels run inside the op, on concrete values.

``crossent::linear_log_probs`` (with ``crossent::linear_log_probs_backward``, which
reads both upstream gradients) and ``crossent::linear_distill`` with
``crossent::linear_distill_backward`` (built as ``crossent::linear_ce``) serve
:func:`~crossent.fused.linear_log_probs` and
:func:`~crossent.fused.linear_distillation_loss` the same way.

Under ``torch.func`` transforms the three functions go through autograd
Functions with ``setup_context`` over the same ops (the ops' own autograd is not
usable there), and the ops batch under ``vmap`` by looping over the vmapped
dimension; see the section at the end. Inside ``torch.compile`` a differentiating
transform runs those Functions eagerly, at a graph break (:func:`_through_func`); ``vmap``
alone traces the op.

This module has no ``from __future__ import annotations``: ``custom_op`` reads
the schema from real annotations.
"""

import ast
import dataclasses
import functools
import itertools
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from crossent._lib._checks import eager_transforms
from crossent._losses._options import _specialized
from crossent.fused._chunked import result_dtype
from crossent.fused._distill import DistillOptions, _chunked_distill
from crossent.fused._function import (
    Formed,
    LinearCEOptions,
    _core,
    fused_backward,
    grad_needs,
    no_autocast,
    no_forward_derivative,
    no_second_derivative,
    refuse_double_backward,
)
from crossent.fused._inputs import check_labels, check_values
from crossent.fused._logprobs import LogProbOptions, _chunked_log_probs

__all__ = ["linear_ce_compiled", "linear_distill_compiled", "linear_log_probs_compiled"]

OptionsT = TypeVar("OptionsT", LinearCEOptions, LogProbOptions, DistillOptions)


def _encode(opts: Any) -> str:
    """Checked options (a frozen dataclass) as the ``repr`` of a tuple (floats round-trip
    exactly); Dynamo folds it. Numbers are specialised first: ``torch.compile(dynamic=True)``
    makes an option given as a default or an argument symbolic, which Dynamo cannot write
    (``repr``: a graph break, an error with ``fullgraph=True``); specialised, it guards the
    value and recompiles for another one."""
    return repr(tuple(map(_specialized, dataclasses.astuple(opts))))


@functools.lru_cache(maxsize=64)
def _decode(kind: type[OptionsT], options: str) -> OptionsT:
    return kind(*ast.literal_eval(options))


def _needs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[bool]:
    """Which of (hidden, weight, bias) need a gradient in this call."""
    if not torch.is_grad_enabled():
        return [False, False, False]
    return [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]


# ----------------------------------------------------------------------------
# Gradients formed in forward, kept for backward under a token
# ----------------------------------------------------------------------------
#
# A loss op forms its gradients in forward for "mean"/"sum", as the eager autograd Functions
# do, but does not return them: an output of the op is a tensor of the traced graph, which
# backward could only scale out of place — a second copy of every gradient, and for
# half-precision hidden states with a float32 head a float32 hidden gradient (N x d x 4
# bytes), where the chunk loop keeps it in hidden's dtype (``RowScaled``). The op keeps them
# here and returns a token, a one-element int64 CPU tensor holding their key (0: none kept);
# its backward op takes them back and runs the eager backward, ``fused_backward``: scaled in
# place and rounded to the parameters' dtypes, the same numbers and the same memory as eager.
# The entry lives as long as the token: a graph freed without a backward frees the
# gradients. Without an entry (consumed by a first backward through a retained graph; no
# gradient formed in forward: "none", torch.func) the backward op recomputes, as eager does.

_KEPT: dict[int, Formed] = {}
_KEYS = itertools.count(1)


def _keep(grads: Formed) -> torch.Tensor:
    """A token for `grads` (none kept when no gradient was formed)."""
    if all(g is None for g in grads):
        return _no_token()
    key = next(_KEYS)
    _KEPT[key] = grads
    token = torch.tensor([key], dtype=torch.int64)
    weakref.finalize(token, _KEPT.pop, key, None).atexit = False
    return token


def _no_token() -> torch.Tensor:
    """The token of no kept gradients."""
    return torch.zeros(1, dtype=torch.int64)


def _fake_token() -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64, device="cpu")


def _backward_grads(
    token: torch.Tensor,
    name: str,
    grad_loss: torch.Tensor,
    recompute: Callable[[torch.Tensor | None], Formed],
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (hidden, weight, bias) gradients of a backward op, by the eager autograd
    Functions' backward (``fused_backward``): the gradients kept under `token` scaled by
    `grad_loss`, or ``recompute(row_scale)``; distinct empty tensors where none is wanted
    (outputs are tensors and must not alias each other)."""
    hidden, weight, bias = params
    kept = _KEPT.pop(int(token.item()), None)
    ctx = types.SimpleNamespace(grads=kept)
    with torch.no_grad():
        grads = fused_backward(
            ctx, name, grad_loss, recompute, hidden=hidden, weight=weight, bias=bias
        )
    gh, gw, gb = (hidden.new_empty(0) if g is None else g for g in grads)
    return gh, gw, gb


def _fake_grads(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_grads`'s shapes and dtypes (the parameters')."""
    return (
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
        torch.empty_like(bias) if needs[2] and bias is not None else hidden.new_empty(0),
    )


def _input_grads(needs: list[bool], grads: tuple[Any, ...], n_other: int) -> tuple[Any, ...]:
    """Backward's result: the wanted (hidden, weight, bias) gradients, None for the rest."""
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),) + (
        None,
    ) * n_other


def _loss_shape(hidden: torch.Tensor, reduction: str) -> tuple[int, ...]:
    return (hidden.shape[0],) if reduction == "none" else ()


def _loss_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """A loss op's ``(hidden, weight, bias, *middle, options, needs)`` and its token."""
    *tensors, ctx.options, ctx.needs = inputs
    ctx.save_for_backward(*tensors, output[1])


def _loss_autograd(backward_op: Any, name: str) -> Callable[..., tuple[Any, ...]]:
    """The registered backward of a loss op: `backward_op` on the saved inputs and token."""

    def backward(ctx: Any, grad_loss: torch.Tensor, _: Any) -> tuple[Any, ...]:
        refuse_double_backward(name)  # a backward that builds a graph raises
        *tensors, token = ctx.saved_tensors
        grads = backward_op(token, grad_loss, *tensors, ctx.options, ctx.needs)
        return _input_grads(ctx.needs, grads, len(tensors) - 1)

    return backward


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
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, token)``: for ``"mean"``/``"sum"`` the `needs` gradients are formed and kept."""
    opts = _decode(LinearCEOptions, options)
    check_values(target, class_weight, weight.shape[0], ignore_index=opts.ignore_index)
    formed = opts.reduction != "none" and any(needs)
    grad = (needs[0], needs[1], needs[2]) if formed else False
    res = _core(hidden, weight, target, bias, class_weight, opts, compute_grad=grad)
    token = _keep((res.grad_hidden, res.grad_weight, res.grad_bias))
    return res.loss, token


@_linear_ce_op.register_fake
def _(hidden, weight, bias, target, class_weight, options, needs):
    shape = _loss_shape(hidden, _decode(LinearCEOptions, options).reduction)
    return hidden.new_empty(shape, dtype=result_dtype(hidden, weight, bias)), _fake_token()


@torch.library.custom_op("crossent::linear_ce_backward", mutates_args=())
def _linear_ce_backward_op(
    token: torch.Tensor,
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _decode(LinearCEOptions, options)

    def recompute(row_scale: torch.Tensor | None) -> Formed:
        args = (hidden, weight, target, bias, class_weight, opts)
        res = _core(*args, compute_grad=(needs[0], needs[1], needs[2]), row_scale=row_scale)
        return res.grad_hidden, res.grad_weight, res.grad_bias

    name = "linear_cross_entropy"
    return _backward_grads(token, name, grad_loss, recompute, (hidden, weight, bias))


@_linear_ce_backward_op.register_fake
def _(token, grad_loss, hidden, weight, bias, target, class_weight, options, needs):
    return _fake_grads(hidden, weight, bias, needs)


_linear_ce_op.register_autograd(
    _loss_autograd(_linear_ce_backward_op, "linear_cross_entropy"),
    setup_context=_loss_setup_context,
)


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
    ops = (_linear_ce_op, _linear_ce_backward_op)
    return _loss_through(ops, "linear_cross_entropy", hidden, weight, bias, middle, opts)


def _loss_through(
    ops: tuple[Any, Any],
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    middle: tuple[Any, ...],
    opts: Any,
) -> torch.Tensor:
    """The loss from a loss op and its backward op (`ops`; ``op(hidden, weight, bias,
    *middle, options, needs)``): through :class:`_FuncLoss` where :func:`_through_func`
    says so, else the op with its gradients formed for what requires them."""
    if _through_func():
        options = _encode(opts)
        return _apply(_FuncLoss, hidden, weight, bias, *middle, options, name, ops)
    needs = _needs(hidden, weight, bias)
    loss: torch.Tensor = ops[0](hidden, weight, bias, *middle, _encode(opts), needs)[0]
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

    def recompute(_: torch.Tensor | None) -> Formed:  # reads both upstream gradients
        with no_autocast(hidden):
            res = _chunked_log_probs(
                hidden, weight, target, bias, opts, compute_grad=(needs[0], needs[1], needs[2]),
                grad_log_probs=grad_log_probs, grad_entropy=grad_entropy,
                entropy=entropy if opts.entropy else None,
            )  # fmt: skip
        return res.grad_hidden, res.grad_weight, res.grad_bias

    name = "linear_log_probs"
    return _backward_grads(_no_token(), name, grad_log_probs, recompute, (hidden, weight, bias))


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
    if _through_func():
        lp, ent, _ = _apply(_FuncLogProbs, hidden, weight, bias, target, _encode(opts))
    else:
        lp, ent, _ = _log_probs_op(hidden, weight, bias, target, _encode(opts))
    return lp, (ent if opts.entropy else None)


# ----------------------------------------------------------------------------
# linear_distillation_loss: a loss op and its backward op, as crossent::linear_ce
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
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, token)``, as ``crossent::linear_ce``."""
    opts = _decode(DistillOptions, options)
    formed = opts.reduction != "none" and any(needs)
    res = _chunked_distill(
        hidden, weight, bias, (teacher_hidden, teacher_weight, teacher_bias), counted, opts,
        compute_grad=(needs[0], needs[1], needs[2]) if formed else False,
    )  # fmt: skip
    return res.loss, _keep((res.grad_hidden, res.grad_weight, res.grad_bias))


@_distill_op.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, counted, options,
      needs):  # fmt: skip
    shape = _loss_shape(hidden, _decode(DistillOptions, options).reduction)
    return hidden.new_empty(shape, dtype=result_dtype(hidden, weight, bias)), _fake_token()


@torch.library.custom_op("crossent::linear_distill_backward", mutates_args=())
def _distill_backward_op(
    token: torch.Tensor,
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    counted: torch.Tensor,
    options: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = _decode(DistillOptions, options)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)

    def recompute(row_scale: torch.Tensor | None) -> Formed:
        res = _chunked_distill(
            hidden, weight, bias, teacher, counted, opts,
            compute_grad=(needs[0], needs[1], needs[2]), row_scale=row_scale,
        )  # fmt: skip
        return res.grad_hidden, res.grad_weight, res.grad_bias

    name = "linear_distillation_loss"
    return _backward_grads(token, name, grad_loss, recompute, (hidden, weight, bias))


@_distill_backward_op.register_fake
def _(token, grad_loss, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
      counted, options, needs):  # fmt: skip
    return _fake_grads(hidden, weight, bias, needs)


_distill_op.register_autograd(
    _loss_autograd(_distill_backward_op, "linear_distillation_loss"),
    setup_context=_loss_setup_context,
)


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
    ops = (_distill_op, _distill_backward_op)
    return _loss_through(ops, "linear_distillation_loss", hidden, weight, bias, middle, opts)


# ----------------------------------------------------------------------------
# torch.func (grad, vmap, jacrev): autograd Functions with setup_context over the same ops
# ----------------------------------------------------------------------------
#
# The ops' own autograd (register_autograd) is not usable under torch.func transforms
# (its generated Function has no setup_context). Under a transform the three functions
# go through the Functions below instead: forward asks the loss op for the loss alone (the
# gradients cannot be chosen in forward, which has no ctx there), backward asks the backward
# op, with no kept gradients, for the wanted gradients recomputed with each row scaled by its
# upstream gradient — the path of "none", exact for every reduction. The ops batch by
# looping over the vmapped dimension (_loop_vmap), so vmap(grad(...)) gives per-sample
# gradients, and backward forms its gradients in _FirstOrderGrads, whose own backward
# raises: a second derivative (grad of grad, jacrev of grad) is an error, never a wrong
# number.


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


for _op in (
    _linear_ce_op,
    _linear_ce_backward_op,
    _log_probs_op,
    _log_probs_backward_op,
    _distill_op,
    _distill_backward_op,
):
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


_EAGER_UNDER_TRANSFORMS = (
    "crossent's fused losses (crossent.fused.linear_cross_entropy, linear_log_probs, "
    "linear_distillation_loss, crossent.nn.LinearCrossEntropyLoss) under a differentiating "
    "torch.func transform (grad, vjp, jacrev, jvp, jacfwd; vmap of one of them) run eagerly "
    "inside torch.compile, at a graph break: "
    "PyTorch 2.13 cannot trace them there (a custom op's autograd has no torch.func "
    "support; Dynamo traces no autograd.Function with a jvp rule, and gives one it traces no "
    "vmap rule). Compile without fullgraph=True, or apply the transform outside the "
    "compiled function."
)
"""Why the fused functions run eagerly under ``torch.func`` transforms inside
``torch.compile``; Dynamo's error with ``fullgraph=True`` quotes it."""


def _through_func() -> bool:
    """Whether the fused functions go through the ``torch.func`` Functions (:class:`_FuncLoss`,
    :class:`_FuncLogProbs`): under any transform run eagerly, and under a differentiating one
    traced by ``torch.compile``; there the op called on the transforms' wrappers raised
    Dynamo's fake-tensor error, and ``jacfwd`` of ``linear_log_probs`` gave a zero Jacobian.
    ``vmap`` alone, compiled, keeps the op (its vmap rule loops over the samples; traced,
    ``fullgraph=True`` included)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    return eager_transforms() or _differentiating()


def _differentiating() -> bool:
    """Whether a differentiating ``torch.func`` transform is active: ``grad``, ``vjp``,
    ``jacrev`` (``Grad``) or ``jvp``, ``jacfwd`` (``Jvp``), at any level."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return any(level.key() in kinds for level in stack)


# torch.compile calls it at trace time, where Dynamo's transforms are on the stack, and keeps
# the result (torch._dynamo.assume_constant_result)
_differentiating._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _apply(function: Any, *args: Any) -> Any:
    """``function.apply(*args)``: eagerly as it is, inside ``torch.compile`` at a graph break."""
    if eager_transforms():
        return function.apply(*args)
    return _eagerly(function, *args)


@torch.compiler.disable(reason=_EAGER_UNDER_TRANSFORMS)
def _eagerly(function: Any, *args: Any) -> Any:
    """``function.apply(*args)`` under ``torch.func`` transforms, run eagerly even inside
    ``torch.compile``: the eager transform's values, per-sample gradients and errors (forward
    mode, a second derivative, bad labels), at a graph break; with ``fullgraph=True``
    Dynamo's error, which quotes ``_EAGER_UNDER_TRANSFORMS``."""
    return function.apply(*args)


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
        raise no_forward_derivative(ctx.name)


class _FuncLoss(_FuncFunction):
    """The loss of ``crossent::linear_ce`` or ``crossent::linear_distill``.

    Inputs: ``hidden, weight, bias, *constants, options, name, ops`` — the loss op's
    arguments before its `needs`, the public function's name, then ``(loss op, its
    backward op)``.
    """

    @staticmethod
    def forward(hidden: Any, weight: Any, bias: Any, *rest: Any) -> torch.Tensor:
        *constants, options, _, ops = rest
        loss: torch.Tensor = ops[0](hidden, weight, bias, *constants, options, [False] * 3)[0]
        return loss

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.options, ctx.name, ctx.ops = inputs[-3:]
        ctx.save_for_backward(*inputs[:-3])

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        tensors = ctx.saved_tensors
        needs = list(grad_needs(ctx, tensors[2]))
        args = (_no_token(), grad_loss, *tensors, ctx.options, needs)  # nothing kept: recompute
        grads = _FirstOrderGrads.apply(ctx.name, ctx.ops[1], *args)
        return _input_grads(needs, grads, len(tensors))


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
