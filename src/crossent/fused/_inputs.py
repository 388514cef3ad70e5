"""Argument checks and the causal shift shared by the fused and vocab-parallel functions.

Dtypes: `hidden`, `weight` and `bias` may have different floating dtypes (a
bfloat16 activation with a float32 master weight, as under autocast); the
matrix products run in their promoted dtype (:func:`crossent.fused._chunked.product_dtype`).
"""

from __future__ import annotations

import functools
import math
import sys
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback

from crossent._lib._checks import (
    check_chunk_size,
    check_ignore_index,
    check_integer_labels,
    check_label_range,
    check_nonnegative,
    check_nonnegative_scalar,
    check_reduction,
    check_softcap,
    check_unit_interval_scalar,
    guard_label_range,
)
from crossent._lib._xp import (
    array_namespace,
    check_same_device,
    int64_labels,
    refuse_jit_trace,
    torch_tracing,
)
from crossent.fused._function import LinearCEOptions

__all__ = [
    "check_chunk_size",
    "check_constant_class_weight",
    "check_fused_ignore_index",
    "check_head",
    "check_labels",
    "check_shift",
    "check_values",
    "clears_skip_mark",
    "flat",
    "rows_2d",
    "scored_labels",
    "shift_target",
    "unshift",
]

P = ParamSpec("P")
R = TypeVar("R")


def _unskip(*codes: Any) -> None:
    """Clear Dynamo's "skip" mark from `codes` (the default strategy: compile when called)."""
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # pragma: no cover - another PyTorch's internals: the mark stays
        return
    for code in codes:
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))


def clears_skip_mark(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, which clears the "skip" mark a compiled ``torch.func`` transform leaves on it.

    A compiled transform that breaks its graph (the fused functions break it under a
    differentiating one) runs the transform eagerly with Dynamo's frame callback set; each
    frame it meets under the transform, `fn`'s included, is refused and marked "skip" for
    good. ``torch.compile(linear_cross_entropy, fullgraph=True)`` in the same process then
    ran the function eagerly and compiled the frames it calls one by one, the chunk loop's
    too (``Could not guard on data-dependent expression``). The mark is cleared where it is
    made (Dynamo's callback set, not tracing, a transform active), so a later compile traces
    `fn` again. Traced, the test is never reached: ``torch.compiler.is_compiling()`` is True.
    """

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if (
            not torch.compiler.is_compiling()
            and _dynamo_callback() is not None
            and torch._C._are_functorch_transforms_active()
        ):
            _unskip(*codes)
        return fn(*args, **kwargs)

    codes = (call.__code__, cast(types.FunctionType, fn).__code__)
    return functools.wraps(fn)(call)


def _check_tensor(x: object, *, name: str) -> torch.Tensor:
    refuse_jit_trace(torch)  # (every fused and vocabulary-parallel function checks its tensors)
    if not isinstance(x, torch.Tensor):
        msg = f"`{name}` must be a torch.Tensor; got {type(x).__name__}. Use torch.as_tensor first."
        raise TypeError(msg)
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        msg = (
            f"`{name}` is a DTensor (sharded by FSDP2 or tensor parallelism, placements "
            f"{tuple(x.placements)}); the fused functions take plain tensors. Call them where "
            "the module's weight is gathered (inside its forward, as "
            "crossent.integrations.transformers.patch does), or give a vocabulary shard to "
            f"the vocab_parallel_ functions as `{name}.to_local()`."
        )
        raise TypeError(msg)
    return x


def check_constant_class_weight(class_weight: torch.Tensor, *, caller: str) -> None:
    """Raise for a `class_weight` that requires a gradient: the fused losses treat it as a
    constant, and a gradient silently left out (``.grad`` None, zeros under ``torch.func.grad``)
    would be a wrong number. PyTorch's ``F.cross_entropy`` raises for such a weight too."""
    if class_weight.requires_grad and torch.is_grad_enabled():
        msg = (
            f"`class_weight` requires a gradient, which {caller} does not compute (the class "
            "weights are a constant there). Pass `class_weight.detach()`, or, for a gradient "
            "in the class weights, the unfused crossent.sparse_categorical_cross_entropy("
            "hidden @ weight.T, target, from_logits=True, weight=class_weight) (or "
            "crossent.nn.CrossEntropyLoss), which differentiates them."
        )
        raise RuntimeError(msg)


def _check_float(x: torch.Tensor, *, name: str, dtype: torch.dtype | None = None) -> None:
    if not x.is_floating_point():
        msg = (
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype}. Cast it first, e.g. `{name}.float()`."
        )
        raise TypeError(msg)
    if dtype is not None and x.dtype != dtype:
        msg = (
            f"`{name}` must have the dtype of `hidden` ({dtype}); got {x.dtype}. "
            f"Cast it, e.g. `{name}.to(hidden.dtype)`."
        )
        raise TypeError(msg)


class _TorchDtypes:
    """The one array-API query the label check needs, for torch dtypes, without array-api-compat.

    (Calling array-api-compat under ``torch.compile`` makes Dynamo warn about its caches.)
    """

    @staticmethod
    def isdtype(dtype: torch.dtype, kind: str) -> bool:
        if kind != "integral":  # pragma: no cover - only "integral" is asked
            raise NotImplementedError(kind)
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_fused_ignore_index(ignore_index: object) -> int:
    """`ignore_index` of the fused functions: an int that an int64 label can equal."""
    index = check_ignore_index(ignore_index, allow_none=False)
    if not -(2**63) <= index < 2**63:
        msg = f"`ignore_index` must fit in int64 (the labels' dtype), e.g. -100; got {index}."
        raise ValueError(msg)
    return index


def check_shift(shift: object) -> bool:
    """`shift` is a bool."""
    if not isinstance(shift, bool):
        msg = f"`shift` must be True or False; got {shift!r}."
        raise TypeError(msg)
    return shift


def _check_options(
    *,
    ignore_index: object,
    label_smoothing: object,
    z_loss: object,
    softcap: object,
    reduction: object,
    chunk_size: object,
) -> LinearCEOptions:
    index = check_fused_ignore_index(ignore_index)
    eps = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    zeta = check_nonnegative_scalar(z_loss, name="z_loss")
    cap = check_softcap(softcap)
    return LinearCEOptions(
        ignore_index=index,
        label_smoothing=eps,
        z_loss=zeta,
        softcap=cap,
        reduction=check_reduction(reduction),
        chunk_size=check_chunk_size(chunk_size),
    )


def check_head(
    hidden: object,
    weight: object,
    target: object,
    bias: object,
    *,
    shift: bool,
    names: tuple[str, str, str, str] = ("hidden", "weight", "target", "bias"),
    target_optional: bool = False,
) -> int:
    """Types, dtypes, shapes and devices of one linear head and its targets; returns V.

    `hidden` is ``(..., d)`` (``(..., T, d)`` with `shift`), `weight` ``(V, d)``,
    `target` of int with `hidden`'s shape without ``d`` (or None when
    `target_optional`), `bias` None or ``(V,)``. Floating dtypes may differ.
    """
    h_name, w_name, t_name, b_name = names
    hidden = _check_tensor(hidden, name=h_name)
    weight = _check_tensor(weight, name=w_name)
    _check_float(hidden, name=h_name)
    _check_float(weight, name=w_name)
    if hidden.ndim < (2 if shift else 1):
        want = "(..., T, d) with shift=True" if shift else "(..., d)"
        msg = f"`{h_name}` must have shape {want}; got {tuple(hidden.shape)}."
        raise ValueError(msg)
    if shift and hidden.shape[-2] == 0:
        msg = (
            f"`{h_name}` has no positions to shift (T = hidden.shape[-2] = 0); "
            "pass at least one position, or shift=False."
        )
        raise ValueError(msg)
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        msg = (
            f"`{w_name}` must have shape (V, d) with d = {h_name}.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(weight.shape)}."
        )
        raise ValueError(msg)
    n_classes = int(weight.shape[0])
    tensors: dict[str, Any] = {w_name: weight}
    if target is not None or not target_optional:
        target = _check_tensor(target, name=t_name)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            msg = (
                f"`{t_name}` must have shape {h_name}.shape[:-1] = {tuple(hidden.shape[:-1])}; "
                f"got {tuple(target.shape)}."
            )
            raise ValueError(msg)
        check_integer_labels(target, name=t_name, xp=_TorchDtypes)
        tensors[t_name] = target
    if bias is not None:
        bias = _check_tensor(bias, name=b_name)
        _check_float(bias, name=b_name)
        if tuple(bias.shape) != (n_classes,):
            msg = f"`{b_name}` must have shape (V,) = ({n_classes},); got {tuple(bias.shape)}."
            raise ValueError(msg)
        tensors[b_name] = bias
    # the head's own name for `hidden`: the teacher's tensors name `teacher_hidden`
    check_same_device(**{h_name: hidden}, **tensors)
    return n_classes


def check_labels(target: torch.Tensor, num_classes: int, *, ignore_index: int) -> None:
    """Labels in ``[0, V)`` or `ignore_index`: the clear error with validation on, and
    torch's kernel-level failure (``IndexError`` / device assert) with it off."""
    check_label_range(target, num_classes, ignore_index=ignore_index, xp=array_namespace(target))
    guard_label_range(target, num_classes, ignore_index=ignore_index)


def check_values(
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    num_classes: int,
    *,
    ignore_index: int,
) -> None:
    """The value checks of the fused cross-entropy, eager and inside the compiled op alike."""
    if class_weight is not None:
        check_nonnegative(class_weight, name="class_weight", xp=array_namespace(class_weight))
    check_labels(target, num_classes, ignore_index=ignore_index)


def shift_target(target: torch.Tensor, *, shift: bool, ignore_index: int) -> torch.Tensor:
    """The int64 label of each position: with `shift`, position t gets ``target[..., t + 1]``.

    The last position gets `ignore_index`, so it costs nothing and gets no
    gradient; `hidden` itself is never sliced or copied. Labels of every integer
    width become int64 (torch compares uint16/32/64 with nothing, and narrow ones
    with a wrapped `ignore_index` or V).
    """
    if not shift:
        return int64_labels(target)
    # a gather of t + 1 (the last position reads itself, then gets `ignore_index`), not
    # cat(target[..., 1:], pad): traced with a dynamic T, the slice of T - 1 columns made
    # torch.export guard T - 1 != 1 (its contiguity check), refusing Dim("T", min=2)
    steps = target.shape[-1]
    position = torch.arange(steps, device=target.device)
    after = torch.clamp(position + 1, max=steps - 1).expand(target.shape)
    wide = int64_labels(target).gather(-1, after)
    return torch.where(position == steps - 1, ignore_index, wide)


def scored_labels(target: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """The labels the positions are scored against, as the caller gave them (``target[...,
    1:]`` with `shift`): what the eager label check reads, so that a uint64 label is named by
    its own value, not the int64 one :func:`shift_target` holds."""
    return target[..., 1:] if shift else target


def as_one_op(hidden: torch.Tensor) -> bool:
    """Whether the fused function runs as its one opaque custom op (:mod:`crossent.fused._ops`):
    traced (``torch.compile``, ``torch.export``, ``torch.func``), or on ``meta`` tensors, which
    have no values for the chunk plan (which rows count) and take the op's fake kernel (shape
    inference, ``FlopCounterMode``, a model built on the ``meta`` device)."""
    return torch_tracing() or hidden.is_meta


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` as ``(rows, d)``, the rows counted explicitly.

    ``reshape(-1, d)`` is ambiguous for zero elements (``d = 0``, or an empty batch
    under ``vmap``, where torch reshapes ``(0, ..., d)``), and raises.
    """
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def flat(x: torch.Tensor) -> torch.Tensor:
    """`x` as 1-d, its length given explicitly (see :func:`rows_2d`)."""
    return x.reshape(math.prod(x.shape))


def unshift(out: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Per-position results without the last position when `shift` (shape ``(..., T - 1)``)."""
    return out[..., :-1] if shift else out
