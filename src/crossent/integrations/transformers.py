r"""Hugging Face ``transformers``: train causal LMs with the fused loss, logits never held.

:func:`patch` makes one model instance compute its loss with
:func:`crossent.fused.linear_cross_entropy` when it is called with ``labels``
in training mode; :func:`unpatch` undoes it.

How it works, for any model built as a base model followed by an ``lm_head``
:class:`torch.nn.Linear` whose forward passes the head's logits (optionally
soft-capped, ``config.final_logit_softcapping``) to ``self.loss_function``
(``ForCausalLMLoss``) — Llama, Mistral, Qwen2, Qwen3, Gemma 2, GPT-2 and most
decoder-only models of ``transformers``:

1. The instance's ``forward`` is wrapped (the class is untouched, so other
   instances are not affected; the wrapper keeps the original signature, which
   ``generate()`` and the ``Trainer`` inspect).
2. A training call with ``labels`` runs the model's own forward without
   ``labels``; for the duration of that call the head records its input (the
   final hidden states) and returns the logits of the first position only, so
   the (tokens × vocabulary) logits are never formed.
3. The loss is :func:`~crossent.fused.linear_cross_entropy` of those hidden
   states, the head's weight (tied to the input embeddings or not) and bias,
   with the causal shift, ``ignore_index``, ``shift_labels``, the soft cap and
   ``num_items_in_batch`` handled as ``ForCausalLMLoss`` does. It is computed
   inside the head's call, and its gradient goes back through the head's output
   (``_Carry``): hooks on the head module see the loss as the head's own
   work (FSDP2 with ``fully_shard(model.lm_head)`` gathers the weight for it and
   reduce-scatters its gradient).
4. On the first such call the logits the model returned for that one position
   are compared with the head's own output (soft-capped when configured): a
   model that transforms its logits in another way (a logit scale, say) is
   refused with an error instead of being trained on a different loss.

Differences from the unpatched model, all deliberate: in training mode with
``labels`` the output's ``logits`` is None (with ``return_dict=False`` the
tuple is ``(loss, *rest)``, as ``to_tuple()`` drops None fields), and a batch
in which every label is ignored has loss 0 with zero gradients (PyTorch's
mean gives NaN). A call with ``logits_to_keep`` other than 0 runs unpatched.

Threads: :func:`patch` and :func:`unpatch` hold one module lock, so concurrent
calls patch a model once and never leave it half-patched. A patched model may be
called from several threads at once (training in one, evaluation or a second
training call in another): the head records its input only for the thread whose
fused call installed the recording, and other threads' calls of the head
compute ordinary logits; the recording is removed when the last such call ends.
Unpatching a model while one of its calls is running lets that call finish with
the fused loss.

Copies: a deep copy or a pickle round trip of a patched model is patched and runs
itself; a shallow copy (``copy.copy``) and the replicas ``nn.DataParallel`` builds
share the original's patched forward (they copy its ``__dict__``), which runs the
module being called, found by a forward pre-hook that :func:`patch` registers (a
direct call of ``model.forward(...)``, bypassing the hooks, runs the patched
instance itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from crossent.fused._inputs import check_chunk_size

__all__ = ["patch", "unpatch"]

_STATE = "_crossent_patch"
"""Attribute of a patched model holding its :class:`_PatchState`."""


class _Missing:
    """The marker for "no instance attribute": one object, kept by deep copies and pickles."""

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING: Any = _Missing()

_LOCK = threading.RLock()
"""Serializes :func:`patch`, :func:`unpatch` and the install/removal of the head's recorder."""

_THREAD = threading.local()
"""Per thread: ``captures``, a dict from ``id(recorder)`` to the stack of active captures."""

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


@dataclasses.dataclass
class _PatchState:
    """What :func:`unpatch` restores and what the patched forward needs."""

    chunk_size: int | None
    own_forward: Any  # the instance's ``forward`` attribute before patching, or _MISSING
    signature: inspect.Signature
    wrapper: _PatchedForward | None = None  # the patched forward installed on the instance
    verified_softcap: list[float | None] = dataclasses.field(default_factory=list)
    # the signature read once, for a call that torch.compile traces (Signature.bind does not)
    positions: dict[str, int] = dataclasses.field(init=False)  # positional parameters' indices
    named: frozenset[str] = dataclasses.field(init=False)  # every parameter's name
    var_kw: str | None = dataclasses.field(init=False)  # the **kwargs parameter, if any

    def __post_init__(self) -> None:
        params = list(self.signature.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positions = {p.name: i for i, p in enumerate(params) if p.kind in positional}
        self.named = frozenset(p.name for p in params if p.kind is not p.VAR_KEYWORD)
        self.var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    def argument(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
        """The value of parameter `name` in a call ``forward(*args, **kwargs)``, else None."""
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        return args[i] if i is not None and i < len(args) else None

    def original(self, model: torch.nn.Module) -> Callable[..., Any]:
        """The forward that ran before patching, bound to `model`."""
        if self.own_forward is _MISSING:
            forward: Callable[..., Any] = type(model).forward.__get__(model)
            return forward
        return self.own_forward


class _PatchedForward:
    """The ``forward`` that :func:`patch` installs on one model instance.

    An object holding its model, not a closure over it: a deep copy of the model
    (a reference model, an EMA copy) or a pickle round trip gets a wrapper that
    runs the copy, whereas a closure would keep training the original. It keeps
    the original's signature (``__signature__``), which ``generate()`` and the
    ``Trainer`` inspect, its name and docstring, and ``__wrapped__`` as
    :func:`functools.wraps` would.
    """

    def __init__(self, model: torch.nn.Module, state: _PatchState) -> None:
        self.model = model
        self.state = state  # copies and pickles keep it the object of the model's _STATE
        own = type(model).forward
        self.__name__ = own.__name__
        self.__qualname__ = own.__qualname__
        self.__doc__ = own.__doc__
        self.__module__ = own.__module__

    @property
    def __signature__(self) -> inspect.Signature:
        return self.state.signature

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.state.original(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _forward(_called_module(self.state) or self.model, self.state, args, kwargs)


def _remember_called(module: torch.nn.Module, args: Any) -> None:
    """The forward pre-hook of a patched model: which module this thread is calling.

    A shallow copy (``copy.copy``) or an ``nn.DataParallel`` replica copies the instance's
    ``__dict__``, so it shares the patched forward with the original; the module being
    called is known only here (``Module.__call__`` passes it to its hooks, whose dict the
    copies share too). The patched forward then runs that module, its own head and body.
    """
    _THREAD.called = module


def _called_module(state: _PatchState) -> torch.nn.Module | None:
    """The module :func:`_remember_called` saw last in this thread if it is patched by
    `state` (the original or a copy of it); None for a direct call of ``forward``."""
    module = _THREAD.__dict__.pop("called", None)
    if module is None or module.__dict__.get(_STATE) is not state:
        return None
    return module


@dataclasses.dataclass
class _Capture:
    """A fused call's recording: the loss to compute from the head's input (`compute`), and
    what the head's call gave: that input, its one-position logits and the output carrying
    the loss (:class:`_Carry`)."""

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.compute = compute
        self.hidden: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.carrier: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None


class _Carry(torch.autograd.Function):
    """The head's output during a fused call: the values of its one-position logits, and
    the loss's way back into the head.

    The loss is computed inside the head's call, where the hooks of its module have run
    (FSDP's all-gather of a head sharded on its own); its gradient comes back through this
    output (:class:`_Delivered`), so that the hooks the module put on its output (FSDP's
    all-gather before the head's backward) run before the loss's backward, and the
    gradient of the head's input (FSDP's reduce-scatter after it) comes from the loss.
    """

    @staticmethod
    def forward(ctx: Any, probe: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return probe.to(loss.dtype, copy=True)  # the loss's dtype: its gradient exactly

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        # the loss's upstream gradient, which _Delivered spread over the output
        return None, grad[(0,) * grad.ndim] if grad.numel() else grad.sum()


class _Delivered(torch.autograd.Function):
    """The loss handed to the caller, its gradient going back through the head's output."""

    @staticmethod
    def forward(ctx: Any, carrier: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.shape = carrier.shape
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.expand(ctx.shape), None


def _causal_lm_loss() -> Callable[..., Any]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _check_head(model: torch.nn.Module) -> torch.nn.Linear:
    """`model.lm_head`, which must be a plain :class:`torch.nn.Linear`."""
    head = getattr(model, "lm_head", None)
    if head is None:
        msg = (
            f"`model` ({type(model).__name__}) has no `lm_head`; patch() needs a causal-LM "
            "model built as a base model followed by an `lm_head` linear layer (e.g. "
            "LlamaForCausalLM, GPT2LMHeadModel), not a base model such as LlamaModel."
        )
        raise ValueError(msg)
    if isinstance(getattr(head, "_fsdp_wrapped_module", None), torch.nn.Linear):
        msg = (
            "`model.lm_head` is wrapped by FullyShardedDataParallel on its own; patch() needs "
            "the torch.nn.Linear itself. Leave lm_head in the root's FSDP unit (e.g. an "
            "auto_wrap_policy of the decoder layers only), or shard it with FSDP2's "
            "fully_shard(model.lm_head), which patch() supports."
        )
        raise TypeError(msg)
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        msg = (
            f"`model.lm_head` must be a torch.nn.Linear; got {type(head).__name__}. "
            "Quantized or custom output layers are not supported by patch(); compute the "
            "loss with crossent.fused.linear_cross_entropy yourself."
        )
        raise TypeError(msg)
    return head


def _check_loss_function(model: torch.nn.Module) -> None:
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not _causal_lm_loss():
        msg = (
            f"`model.loss_function` must be transformers' ForCausalLMLoss; got {loss_function!r}. "
            "patch() replaces that loss only; unset the custom loss or leave the model unpatched."
        )
        raise ValueError(msg)


def patch(model: ModelT, *, chunk_size: int | None = None) -> ModelT:
    r"""Make `model` compute its training loss with the fused linear cross-entropy.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal-LM model with an ``lm_head`` :class:`torch.nn.Linear`
        (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
        ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM``, ``GPT2LMHeadModel``, ...).
        Only this instance is patched.
    chunk_size : int, optional
        Tokens per chunk, passed to :func:`crossent.fused.linear_cross_entropy`
        (None picks one from a memory budget).

    Returns
    -------
    model
        The same instance. Patching a patched model only updates `chunk_size`.

    Raises
    ------
    ValueError
        If `model` has no ``lm_head``, its forward takes no ``labels``, or its
        ``loss_function`` is not transformers' ``ForCausalLMLoss``.
    TypeError
        If `model` is not a :class:`torch.nn.Module`, ``lm_head`` is not a
        :class:`torch.nn.Linear`, or `chunk_size` is not an int.

    See Also
    --------
    unpatch
    crossent.fused.linear_cross_entropy

    Notes
    -----
    In training mode a call with ``labels`` returns the loss of
    ``ForCausalLMLoss`` — the mean (or, with ``num_items_in_batch``, the sum
    divided by it) over the counted positions of

    .. math:: \ell_t = \operatorname{lse}(z_t) - z_{t, y_{t+1}}, \qquad
              z_t = c \tanh\bigl((W h_t + b) / c\bigr)

    (no soft cap unless ``config.final_logit_softcapping`` = :math:`c` is set)
    — computed chunk by chunk, with ``outputs.logits`` None. Calls without
    ``labels``, evaluation mode and ``generate()`` run the model's own forward.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from crossent.integrations.transformers import patch, unpatch
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> model = patch(LlamaForCausalLM(config))
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> out = model(input_ids=ids, labels=ids)
    >>> out.logits is None, out.loss.shape
    (True, torch.Size([]))
    >>> model.eval()(input_ids=ids).logits.shape  # evaluation is unchanged
    torch.Size([2, 8, 64])
    >>> unpatch(model) is model
    True
    """
    if not isinstance(model, torch.nn.Module):
        msg = f"`model` must be a torch.nn.Module (a transformers model); got {type(model)}."
        raise TypeError(msg)
    size = check_chunk_size(chunk_size)
    with _LOCK:
        return _patch_locked(model, size)


def _patch_locked(model: ModelT, size: int | None) -> ModelT:
    """:func:`patch` once its arguments are checked, under :data:`_LOCK`."""
    _check_head(model)
    state = model.__dict__.get(_STATE)
    if isinstance(state, _PatchState):
        state.chunk_size = size
        return model
    signature = inspect.signature(model.forward)
    if "labels" not in signature.parameters:  # an instance wrapper that hides the signature
        signature = inspect.signature(type(model).forward.__get__(model))
    if "labels" not in signature.parameters:
        msg = (
            f"`model.forward` ({type(model).__name__}) takes no `labels`; patch() needs a "
            "causal-LM model whose forward computes its loss from `labels`."
        )
        raise ValueError(msg)
    _check_loss_function(model)
    own = model.__dict__.get("forward", _MISSING)
    state = _PatchState(size, own, signature)
    state.wrapper = _PatchedForward(model, state)
    model.__dict__[_STATE] = state
    model.__dict__["forward"] = state.wrapper
    model.register_forward_pre_hook(_remember_called)
    return model


def unpatch(model: ModelT) -> ModelT:
    """Undo :func:`patch`: `model` computes its loss as before.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model returned by :func:`patch`.

    Returns
    -------
    model
        The same instance, with its original ``forward``.

    Raises
    ------
    ValueError
        If `model` is not patched, or its ``forward`` was wrapped again after
        :func:`patch` (unpatching would drop that wrapper).

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from crossent.integrations.transformers import patch, unpatch
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    >>> _ = unpatch(patch(model))
    >>> "forward" in vars(model)
    False
    """
    with _LOCK:
        state = model.__dict__.get(_STATE) if isinstance(model, torch.nn.Module) else None
        if not isinstance(state, _PatchState):
            msg = "`model` is not patched by patch(); nothing to undo."
            raise ValueError(msg)
        if model.__dict__.get("forward") is not state.wrapper:
            msg = (
                "`model.forward` was replaced after patch() (by another wrapper, e.g. "
                "accelerate's autocast); unpatch() would drop that wrapper. Undo it first, "
                "then unpatch()."
            )
            raise ValueError(msg)
        del model.__dict__[_STATE]
        hooks = model._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _remember_called]:
            del hooks[key]
        if state.own_forward is _MISSING:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = state.own_forward
    return model


# ----------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------


def _forward(
    model: torch.nn.Module, state: _PatchState, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    labels = state.argument(args, kwargs, "labels")
    keep = state.argument(args, kwargs, "logits_to_keep")
    keep = 0 if keep is None else keep
    original = state.original(model)
    if labels is None or not model.training or not (isinstance(keep, int) and keep == 0):
        return original(*args, **kwargs)
    _check_loss_function(model)
    head = _check_head(model)
    named = state.named
    loss_kwargs = {k: v for k, v in kwargs.items() if k not in named} if state.var_kw else {}
    if "labels" in kwargs:
        kwargs = {**kwargs, "labels": None}
    else:
        i = state.positions["labels"]
        args = (*args[:i], None, *args[i + 1 :])
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    chunk_size = state.chunk_size
    capture = _Capture(
        lambda hidden: _fused_loss(head, hidden, labels, loss_kwargs, softcap, chunk_size)
    )
    out = _run_with_recording_head(head, capture, lambda: original(*args, **kwargs))
    if capture.carrier is None or capture.probe is None or capture.loss is None:
        msg = (
            f"{type(model).__name__}.forward did not call `lm_head`; patch() supports models "
            "whose forward computes the logits with `self.lm_head`. unpatch() this model."
        )
        raise RuntimeError(msg)
    logits = out.logits if not isinstance(out, tuple) else out[0]
    if softcap not in state.verified_softcap and _verify_head_transform(
        model, capture.probe, logits, softcap
    ):
        with _LOCK:
            if softcap not in state.verified_softcap:
                state.verified_softcap.append(softcap)
    loss = (
        capture.loss
        if capture.carrier is capture.probe
        else _Delivered.apply(capture.carrier, capture.loss.detach())
    )
    if isinstance(out, tuple):
        return (loss, *out[1:])
    return dataclasses.replace(out, loss=loss, logits=None)


class _Recorder:
    """``lm_head.forward`` while fused calls run: records for those calls' threads only.

    In a thread with an active :class:`_Capture` for this recorder the head records
    its input and returns the logits of the first position only; in any other
    thread it is the head's own forward. `users` counts the running fused calls
    (changed under :data:`_LOCK`); the last one puts `own` back.
    """

    def __init__(self, head: torch.nn.Linear, own: Any) -> None:
        self.head = head
        self.own = own  # the head's instance ``forward`` before, or _MISSING
        self.users = 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        stack = _thread_captures().get(id(self))
        if not stack:
            if self.own is not _MISSING:
                return self.own(hidden)
            return type(self.head).forward(self.head, hidden)
        capture = stack[-1]
        capture.hidden = hidden
        first = hidden.narrow(-2, 0, min(1, hidden.shape[-2])) if hidden.ndim >= 2 else hidden
        with torch.no_grad():
            capture.probe = torch.nn.functional.linear(first, self.head.weight, self.head.bias)
        # the loss, while the head's module is in its call (see _Carry); traced by
        # torch.compile, the head's output is the logits (dynamo warns tracing _Carry)
        capture.loss = capture.compute(hidden)
        capture.carrier = (
            capture.probe
            if torch.compiler.is_compiling()
            else _Carry.apply(capture.probe, capture.loss)
        )
        return capture.carrier


def _lock() -> Any:
    """:data:`_LOCK`, or no lock while ``torch.compile`` traces the call (dynamo cannot enter
    a lock; the traced program runs the recording's Python once, at trace time)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _LOCK


def _thread_captures() -> dict[int, list[_Capture]]:
    captures: dict[int, list[_Capture]] = _THREAD.__dict__.setdefault("captures", {})
    return captures


def _run_with_recording_head(
    head: torch.nn.Linear, capture: _Capture, call: Callable[[], Any]
) -> Any:
    """Run `call` while `head` records its input into `capture` (this thread only)."""
    with _lock():
        installed = head.__dict__.get("forward", _MISSING)
        recorder = installed if isinstance(installed, _Recorder) else _Recorder(head, installed)
        head.__dict__["forward"] = recorder
        recorder.users += 1
    stack = _thread_captures().setdefault(id(recorder), [])
    stack.append(capture)
    try:
        return call()
    finally:
        stack.pop()
        if not stack:
            del _thread_captures()[id(recorder)]
        with _lock():
            recorder.users -= 1
            if recorder.users == 0 and head.__dict__.get("forward") is recorder:
                if recorder.own is _MISSING:
                    del head.__dict__["forward"]
                else:
                    head.__dict__["forward"] = recorder.own


def _verify_head_transform(
    model: torch.nn.Module, probe: torch.Tensor, logits: Any, softcap: float | None
) -> bool:
    """The model's logits must be the head's output, soft-capped by `softcap` if set.

    NaN in the head's output (hidden states of a fully masked position, as a float64
    model with left padding gives) must be NaN in the logits too; the other entries
    are compared. Returns whether the check was conclusive (some entry finite).

    Under ``torch.compile`` nothing is read back: the comparison is a device-side
    assertion (no graph break; it raises when the compiled program runs) and the check
    counts as inconclusive, so that it runs again on the next traced or eager call.
    """
    want = probe if softcap is None else softcap * torch.tanh(probe / softcap)
    if not isinstance(logits, torch.Tensor) or logits.shape != want.shape:
        raise RuntimeError(_transform_message(type(model).__name__))
    dtype = torch.promote_types(torch.promote_types(want.dtype, logits.dtype), torch.float32)
    eps = 16 * max(torch.finfo(want.dtype).eps, torch.finfo(logits.dtype).eps)
    want = want.to(dtype)
    got = logits.detach().to(dtype)
    finite = torch.isfinite(want)
    scale = torch.where(finite, want.abs(), 0.0).amax()
    # torch.allclose(got, want, rtol=eps, atol=eps * scale, equal_nan=True), elementwise
    close = ((got - want).abs() <= eps * (scale + want.abs())) | (got == want)
    bad = ~(close | (got.isnan() & want.isnan()))
    if torch.compiler.is_compiling():
        from crossent._lib._checks import assert_on_device

        assert_on_device(bad, _transform_message("the model"))
        return False
    if bool(bad.any()):
        raise RuntimeError(_transform_message(type(model).__name__))
    return bool(finite.any())


def _transform_message(name: str) -> str:
    return (
        f"{name} transforms the output of `lm_head` before its loss in a way patch() does not "
        "reproduce (only `config.final_logit_softcapping`); its fused loss would differ from "
        "its own. unpatch() it."
    )


def _fused_loss(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_kwargs: dict[str, Any],
    softcap: float | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """``ForCausalLMLoss`` of ``head(hidden)``, computed by the fused linear cross-entropy."""
    from crossent.fused import linear_cross_entropy

    weight = head.weight
    hidden = hidden.to(weight.device)
    num_items = loss_kwargs.get("num_items_in_batch")
    ignore_index = loss_kwargs.get("ignore_index", -100)
    shift_labels = loss_kwargs.get("shift_labels")
    loss = linear_cross_entropy(
        hidden,
        weight,
        (labels if shift_labels is None else shift_labels).to(weight.device),
        bias=head.bias,
        ignore_index=ignore_index,
        softcap=softcap,
        reduction="mean" if num_items is None else "sum",
        chunk_size=chunk_size,
        shift=shift_labels is None,
    )
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss
