"""``torch.nn.Module`` wrappers over crossent's losses.

Every module checks its arguments in ``__init__`` and its ``forward`` is one
call into the array-API implementation (no math here), so a module and the
function it wraps can never disagree. Class weights live in buffers named as
in :mod:`torch.nn` (``weight``, ``pos_weight``) and follow ``.to()`` /
``.double()`` and ``state_dict`` like torch's.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any, Literal, NoReturn, cast

import torch
from torch import Tensor

from crossent._backends import _torch as torch_exec
from crossent._lib._checks import (
    ProbabilityRangeError,
    check_chunk_size,
    check_ignore_index,
    check_nonnegative,
    check_nonnegative_scalar,
    check_reduction,
    check_unit_interval_scalar,
)
from crossent._lib._config import dynamo_tracing
from crossent._lib._xp import array_namespace, check_same_device, refuse_jit_trace
from crossent._losses._binary import binary_cross_entropy
from crossent._losses._categorical import categorical_cross_entropy
from crossent._losses._options import CEOptions, make_options
from crossent._losses._sparse import _nll_loss, sparse_categorical_cross_entropy

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "BinaryFocalLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LinearCrossEntropyLoss",
    "NLLLoss",
]

Reduction = Literal["mean", "sum", "none"]

_LEGACY_WARNING = (
    "size_average and reduce args will be deprecated, please use reduction='{}' instead."
)


# ----------------------------------------------------------------------------
# argument checks (run once, in __init__)
# ----------------------------------------------------------------------------


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """PyTorch's rule for the deprecated `size_average` / `reduce` pair.

    Both default to True; "mean" if both are true, "sum" if only `reduce` is,
    "none" if `reduce` is false. Warns exactly as torch does (a UserWarning
    with torch's text), pointing at the caller's constructor call.
    """
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        reduction = "mean"
    elif reduce:
        reduction = "sum"
    else:
        reduction = "none"
    warnings.warn(_LEGACY_WARNING.format(reduction), UserWarning, stacklevel=_caller_stacklevel())
    return reduction


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this module (the user's constructor call)."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    return level


def _check_tensor(weight: object, *, name: str, per_class: bool) -> Tensor | None:
    """`weight` is None or a non-negative floating tensor (1-D when `per_class`)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        msg = (
            f"`{name}` must be a torch.Tensor or None; got {type(weight).__name__}. "
            f"Wrap it, e.g. torch.tensor([...])."
        )
        raise TypeError(msg)
    if not weight.is_floating_point():
        msg = (
            f"`{name}` must have a floating dtype; got {weight.dtype}. "
            f"Cast it, e.g. `{name}.float()`."
        )
        raise TypeError(msg)
    if per_class and weight.ndim != 1:
        msg = (
            f"`{name}` must be a 1-D tensor with one weight per class (length C); "
            f"got shape {tuple(weight.shape)}."
        )
        raise ValueError(msg)
    if weight.device.type != "meta":
        check_nonnegative(weight, name=name, xp=array_namespace(weight))
    return weight


def _check_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    value = check_nonnegative_scalar(softcap, name="softcap")
    if value == 0:
        msg = "`softcap` must be None (no capping) or a positive number such as 30.0; got 0."
        raise ValueError(msg)
    return value


def _check_alpha(alpha: object) -> float | None:
    return None if alpha is None else check_unit_interval_scalar(alpha, name="alpha")


def _class_axis(input: Tensor) -> int:
    """PyTorch's class dimension: 1, or 0 for one unbatched example of shape (C,)."""
    try:
        return 1 if input.ndim > 1 else 0
    except AttributeError:  # None, a list, a Python number: no `ndim`
        msg = (
            f"`input` must be a tensor (or another array) with classes on dim 1; got "
            f"{type(input).__name__}. Convert it first, e.g. `torch.as_tensor(input)`."
        )
        raise TypeError(msg) from None


def _cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, opts: CEOptions) -> Tensor:
    """Cross-entropy from logits on dim 1: class indices -> sparse, probabilities -> categorical.

    `opts` were checked when the module was built (or its options last set);
    class indices go straight to the PyTorch executor.
    """
    refuse_jit_trace(torch)  # before the shapes are compared (a trace warns there)
    axis = _class_axis(input)
    if not isinstance(target, Tensor) or not target.is_floating_point():
        if isinstance(input, Tensor) and not dynamo_tracing():  # traced: the loss's graph node
            try:
                out = torch_exec.sparse(input, target, weight, axis, opts)
            except RuntimeError:  # PyTorch's device error: crossent's, naming the argument
                check_same_device(input=input, target=target, weight=weight)
                raise
            if out is not None:
                return out
        return sparse_categorical_cross_entropy(
            input,
            target,
            from_logits=True,
            axis=axis,
            weight=weight,
            ignore_index=opts.ignore_index,
            label_smoothing=opts.label_smoothing,
            gamma=opts.gamma,
            z_loss=opts.z_loss,
            softcap=opts.softcap,
            reduction=opts.reduction,
        )
    if tuple(target.shape) != tuple(input.shape):
        msg = (
            f"floating `target` of shape {tuple(target.shape)} is read as class probabilities "
            f"and must have the input's shape {tuple(input.shape)}; for class indices pass "
            "an integer tensor (e.g. `target.long()`)."
        )
        raise ValueError(msg)
    ignore_index = opts.ignore_index
    if ignore_index is not None and ignore_index >= 0:  # torch: "not supported for floating"
        msg = (
            f"`ignore_index`={ignore_index} is not supported for floating (class-probability) "
            "targets, as in PyTorch; use a negative ignore_index (the default -100), or "
            "integer class indices to ignore a class."
        )
        raise ValueError(msg)
    if opts.z_loss != 0 or opts.softcap is not None:
        msg = (
            "`z_loss` and `softcap` need class-index targets; got floating (probability) "
            f"targets of shape {tuple(target.shape)}. Pass integer class indices, or set "
            "z_loss=0.0 and softcap=None."
        )
        raise ValueError(msg)
    return categorical_cross_entropy(
        input,
        target,
        from_logits=True,
        axis=axis,
        weight=weight,
        label_smoothing=opts.label_smoothing,
        gamma=opts.gamma,
        reduction=opts.reduction,
    )


class _OptionsCache:
    """Mixin: the module's :class:`CEOptions`, built once and rebuilt after an option changes.

    ``_option_names`` lists the attributes that enter the options; setting one
    (``loss.label_smoothing = 0.2``, as torch allows) drops the cached object.
    """

    _option_names: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._option_names:
            self.__dict__["_ce_options"] = None
        super().__setattr__(name, value)

    def _options(self) -> CEOptions:
        opts = self.__dict__.get("_ce_options")
        if opts is None:
            opts = make_options(
                from_logits=True, **{name: getattr(self, name) for name in self._option_names}
            )
            self.__dict__["_ce_options"] = opts
        return opts


# ----------------------------------------------------------------------------
# base classes
# ----------------------------------------------------------------------------


class _Loss(torch.nn.Module):
    """Holds `reduction` (with torch's legacy `size_average` / `reduce` rule) and a repr."""

    reduction: Reduction
    # (attribute, default) pairs shown by repr when they differ from the default
    _repr_fields: tuple[tuple[str, Any], ...] = (("reduction", "mean"),)

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        self.reduction = cast(Reduction, check_reduction(reduction))

    def __prepare_scriptable__(self) -> NoReturn:
        """``torch.jit.script`` calls this first (on every submodule): a clear error instead of
        TorchScript's failure deep inside crossent's Python."""
        msg = (
            f"`{type(self).__name__}` cannot be compiled by TorchScript (`torch.jit.script`, "
            "deprecated by PyTorch): its forward is Python code that TorchScript does not "
            "support. Use `torch.compile(model)` or `torch.export.export(model, args)`, or "
            "script the model without the loss and apply the loss outside it."
        )
        raise TypeError(msg)

    def extra_repr(self) -> str:
        shown = []
        for attr, default in self._repr_fields:
            value = getattr(self, attr)
            if value != default:
                shown.append(f"{attr}={value!r}")
        return ", ".join(shown)


class _WeightedLoss(_Loss):
    """Adds the `weight` buffer (None is allowed and stays out of the state_dict, as in torch)."""

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        per_class: bool,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", _check_tensor(weight, name="weight", per_class=per_class))
        self._note_weight_checked()

    def __getstate__(self) -> dict[str, Any]:
        """The module's state for pickling, without the weak reference to the checked weight
        (unpicklable; a copy checks its weight on first use)."""
        state = dict(self.__dict__)
        state.pop("_weight_checked", None)
        return state

    def _note_weight_checked(self) -> None:
        w = self.weight
        self.__dict__["_weight_checked"] = None if w is None else (weakref.ref(w), w._version)

    def _checked_weight(self) -> Tensor | None:
        """`weight`, its values checked again if it changed since they last were: replaced
        (``loss.weight = ...``), or changed in place (``load_state_dict``, ``weight[1] = -1``:
        its version counter moves). The class-index path reads it unchecked (the module
        checked it), and a negative weight came out as a silent number (weights summing to
        0: a loss of 0). Traced, the functional path checks it."""
        w = self.weight
        if w is None or dynamo_tracing():
            return w
        seen = self.__dict__.get("_weight_checked")
        if seen is None or seen[0]() is not w or seen[1] != w._version:
            _check_tensor(w, name="weight", per_class=True)
            self._note_weight_checked()
        return w


# ----------------------------------------------------------------------------
# torch.nn replacements
# ----------------------------------------------------------------------------


class _BinaryLoss(_Loss):
    """Shared state and forward of the binary modules: weights, pos_weight, smoothing, focal."""

    weight: Tensor | None
    pos_weight: Tensor | None
    _FROM_LOGITS = True

    def _set_binary_options(
        self,
        weight: Tensor | None,
        pos_weight: Tensor | None,
        label_smoothing: float,
        gamma: float,
        alpha: float | None,
    ) -> None:
        self.register_buffer("weight", _check_tensor(weight, name="weight", per_class=False))
        self.register_buffer(
            "pos_weight", _check_tensor(pos_weight, name="pos_weight", per_class=False)
        )
        self.label_smoothing = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
        self.gamma = check_nonnegative_scalar(gamma, name="gamma")
        self.alpha = _check_alpha(alpha)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of `input` (probabilities for BCELoss, else logits) vs targets in [0, 1]."""
        try:
            return binary_cross_entropy(
                input,
                target,
                from_logits=self._FROM_LOGITS,
                weight=self.weight,
                pos_weight=self.pos_weight,
                label_smoothing=self.label_smoothing,
                gamma=self.gamma,
                alpha=self.alpha,
                reduction=self.reduction,
            )
        except ProbabilityRangeError as exc:  # the modules have no `from_logits`
            fix = "for logits use BCEWithLogitsLoss (or apply torch.sigmoid first)"
            raise exc.with_fix(fix) from None


class CrossEntropyLoss(_OptionsCache, _WeightedLoss):
    r"""Cross-entropy from logits, a drop-in for :class:`torch.nn.CrossEntropyLoss`.

    Same positional arguments, defaults and results as PyTorch's, classes on
    dim 1; adds focal `gamma`, PaLM's `z_loss` and Gemma 2's logit `softcap`.
    Wraps :func:`crossent.sparse_categorical_cross_entropy` (integer class
    index targets) and :func:`crossent.categorical_cross_entropy` (floating
    class-probability targets of the input's shape), with ``from_logits=True``
    and ``axis=1``.

    Parameters
    ----------
    weight : Tensor, optional
        Per-class weights, shape ``(C,)``; a buffer, like torch's.
    size_average, reduce : bool, optional
        Deprecated, handled exactly like PyTorch: if either is given,
        `reduction` is derived from them by torch's legacy rule (both default
        to True; ``"mean"`` if both are true, ``"sum"`` if only `reduce` is,
        ``"none"`` if `reduce` is false), `reduction` is ignored, and a
        ``UserWarning`` with PyTorch's text is emitted.
    ignore_index : int, default -100
        Class-index targets equal to it count neither in the loss nor in the
        mean's denominator. With probability targets it must be negative (it
        is unused), else a ValueError, as PyTorch raises.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed class weight of the counted targets
        (by the number of items for probability targets), as PyTorch does.
    label_smoothing : float, default 0.0
        PyTorch's label smoothing ε in [0, 1].
    gamma : float, keyword-only, default 0.0
        Focal-loss focusing parameter; 0 is plain cross-entropy.
    z_loss : float, keyword-only, default 0.0
        Adds ``z_loss * logsumexp(logits)**2`` per counted target (class
        indices only).
    softcap : float, optional, keyword-only
        Replaces the logits by ``softcap * tanh(logits / softcap)`` first
        (class indices only).
        A logit of ``-inf`` (a masked class) stays ``-inf``, with gradient 0, rather than
        becoming ``-softcap``. A positive, finite number (None: no cap); a cap so large
        that ``logits / softcap`` is below the dtype's rounding leaves the logits as they
        are.

    Notes
    -----
    For logits :math:`z` (one item, classes on dim 1) and a class index
    :math:`y`, with ε = 0 and γ = 0,

    .. math:: \ell(z, y) = w_y \bigl(\operatorname{lse}(z) - z_y\bigr).

    The one documented difference from PyTorch: a ``"mean"`` over zero counted
    targets (every target ignored) is 0 with a zero gradient, where PyTorch
    gives NaN.

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    >>> target = torch.tensor([0, 2])
    >>> loss = crossent.nn.CrossEntropyLoss()(logits, target)
    >>> bool(torch.allclose(loss, torch.nn.CrossEntropyLoss()(logits, target)))
    True
    >>> loss.backward()
    >>> print(f"{loss.item():.6f}")
    0.896378
    >>> crossent.nn.CrossEntropyLoss(label_smoothing=0.1, gamma=2.0)
    CrossEntropyLoss(label_smoothing=0.1, gamma=2.0)
    """

    _repr_fields = (
        ("ignore_index", -100),
        ("reduction", "mean"),
        ("label_smoothing", 0.0),
        ("gamma", 0.0),
        ("z_loss", 0.0),
        ("softcap", None),
    )
    _option_names = ("ignore_index", "label_smoothing", "gamma", "z_loss", "softcap", "reduction")

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        gamma: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, per_class=True)
        self.ignore_index = check_ignore_index(ignore_index, allow_none=False)
        self.label_smoothing = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
        self.gamma = check_nonnegative_scalar(gamma, name="gamma")
        self.z_loss = check_nonnegative_scalar(z_loss, name="z_loss")
        self.softcap = _check_softcap(softcap)
        self._options()

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of logits `input` (classes on dim 1) against `target`."""
        return _cross_entropy(input, target, self._checked_weight(), self._options())


class NLLLoss(_WeightedLoss):
    r"""Negative log-likelihood of log-probabilities, a drop-in for :class:`torch.nn.NLLLoss`.

    Same arguments, defaults and results as PyTorch's, classes on dim 1:
    ``input`` holds log-probabilities (e.g. from ``log_softmax``) and the
    loss of an item is :math:`-w_y\,x_y`. PyTorch's options are all it has:
    the extra crossent options need logits, so use :class:`CrossEntropyLoss`
    for them.

    Parameters
    ----------
    weight : Tensor, optional
        Per-class weights, shape ``(C,)``; a buffer, like torch's.
    size_average, reduce : bool, optional
        Deprecated; mapped to `reduction` by PyTorch's legacy rule with
        PyTorch's warning (see :class:`CrossEntropyLoss`).
    ignore_index : int, default -100
        Targets equal to it count neither in the loss nor in the mean's
        denominator.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed weight of the counted targets.

    Notes
    -----
    .. math:: \ell(x, y) = -w_y\, x_y, \qquad
              \text{mean} = \frac{\sum_i \ell_i}{\sum_{i\ \mathrm{counted}} w_{y_i}}

    A mean over zero counted targets is 0 (PyTorch: NaN).

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> log_probs = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]), dim=1)
    >>> target = torch.tensor([0, 2])
    >>> print(f"{float(crossent.nn.NLLLoss()(log_probs, target)):.6f}")
    0.896378
    """

    _repr_fields = (("ignore_index", -100), ("reduction", "mean"))

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, per_class=True)
        self.ignore_index = check_ignore_index(ignore_index, allow_none=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of log-probabilities `input` (classes on dim 1) against class indices."""
        return _nll_loss(
            input,
            target,
            axis=_class_axis(input),
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            xp=array_namespace(input=input, target=target, weight=self.weight),
        )


class BCELoss(_BinaryLoss):
    r"""Binary cross-entropy of probabilities, a drop-in for :class:`torch.nn.BCELoss`.

    Same arguments, defaults and results as PyTorch's (log p clamped at −100,
    so probabilities of exactly 0 or 1 give a finite loss); adds, keyword-only,
    `pos_weight` (as in :class:`BCEWithLogitsLoss`), Keras label smoothing and
    the focal `gamma` / `alpha`. Wraps :func:`crossent.binary_cross_entropy`.

    Parameters
    ----------
    weight : Tensor, optional
        Per-element rescaling broadcast to the input; a buffer, like torch's.
    size_average, reduce : bool, optional
        Deprecated; mapped to `reduction` by PyTorch's legacy rule with
        PyTorch's warning (see :class:`CrossEntropyLoss`).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of elements.
    pos_weight : Tensor, optional, keyword-only
        Multiplies the positive term, broadcast to the input (PyTorch's
        formula); a buffer.
    label_smoothing : float, keyword-only, default 0.0
        Targets become :math:`t(1-ε) + ε/2`.
    gamma : float, keyword-only, default 0.0
        Focal focusing parameter.
    alpha : float, optional, keyword-only
        Weighs the positive term by α and the negative one by 1 − α.

    Notes
    -----
    .. math:: \ell(p, t) = -w\,\bigl[\,t \log p + (1 - t) \log(1 - p)\,\bigr]

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> p = torch.tensor([0.9, 0.2, 0.6])
    >>> t = torch.tensor([1.0, 0.0, 1.0])
    >>> print(f"{float(crossent.nn.BCELoss()(p, t)):.6f}")
    0.279777
    """

    _FROM_LOGITS = False
    _repr_fields = (
        ("reduction", "mean"),
        ("label_smoothing", 0.0),
        ("gamma", 0.0),
        ("alpha", None),
    )

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        alpha: float | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self._set_binary_options(weight, pos_weight, label_smoothing, gamma, alpha)


class BCEWithLogitsLoss(_BinaryLoss):
    r"""Binary cross-entropy of logits, a drop-in for :class:`torch.nn.BCEWithLogitsLoss`.

    Same arguments (in the same order), defaults and results as PyTorch's,
    computed with log-sigmoid so no finite logit overflows; adds, keyword-only,
    Keras label smoothing and the focal `gamma` / `alpha`. Wraps
    :func:`crossent.binary_cross_entropy` with ``from_logits=True``.

    Parameters
    ----------
    weight : Tensor, optional
        Per-element rescaling broadcast to the input; a buffer, like torch's.
    size_average, reduce : bool, optional
        Deprecated; mapped to `reduction` by PyTorch's legacy rule with
        PyTorch's warning (see :class:`CrossEntropyLoss`).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of elements.
    pos_weight : Tensor, optional
        Multiplies the positive term, broadcast to the input (e.g. one weight
        per class of shape ``(C,)`` for ``(N, C)`` multi-label input); a buffer.
    label_smoothing : float, keyword-only, default 0.0
        Targets become :math:`t(1-ε) + ε/2`.
    gamma : float, keyword-only, default 0.0
        Focal focusing parameter.
    alpha : float, optional, keyword-only
        Weighs the positive term by α and the negative one by 1 − α.

    Notes
    -----
    .. math:: \ell(x, t) = -w\,\bigl[\,p_w\, t \log \sigma(x) + (1 - t) \log \sigma(-x)\,\bigr]

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> x = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    >>> t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> loss = crossent.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]))(x, t)
    >>> ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]))(x, t)
    >>> bool(torch.allclose(loss, ref))
    True
    """

    weight: Tensor | None
    _repr_fields = (
        ("reduction", "mean"),
        ("label_smoothing", 0.0),
        ("gamma", 0.0),
        ("alpha", None),
    )

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        alpha: float | None = None,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self._set_binary_options(weight, pos_weight, label_smoothing, gamma, alpha)


# ----------------------------------------------------------------------------
# crossent's own modules
# ----------------------------------------------------------------------------


class FocalLoss(_OptionsCache, _WeightedLoss):
    r"""Multi-class focal loss from logits (Lin et al.), classes on dim 1.

    :class:`CrossEntropyLoss` with the focusing parameter `gamma` defaulting
    to 2.0: each class term is scaled by :math:`(1 - p_k)^\gamma`, so
    well-classified items count less. ``FocalLoss(gamma=0.0)`` is exactly
    ``CrossEntropyLoss()``. Targets are class indices (or, as in
    :class:`CrossEntropyLoss`, floating class probabilities).

    Parameters
    ----------
    gamma : float, default 2.0
        Focusing parameter γ ≥ 0.
    weight : Tensor, optional, keyword-only
        Per-class weights, shape ``(C,)`` (the multi-class α of the paper); a
        buffer.
    ignore_index : int, keyword-only, default -100
        Targets equal to it count neither in the loss nor in the mean's
        denominator.
    label_smoothing : float, keyword-only, default 0.0
        PyTorch's label smoothing ε; the focal factor applies to every
        smoothed class term.
    reduction : {"mean", "sum", "none"}, keyword-only, default "mean"
        ``"mean"`` divides by the summed class weight of the counted targets.

    Notes
    -----
    With :math:`p = \operatorname{softmax}(z)` and a class index :math:`y`,

    .. math:: \ell(z, y) = -w_y\,(1 - p_y)^\gamma \log p_y

    computed from log-softmax (never ``log(softmax)``); where :math:`p_y = 1`
    the factor and its gradient are exactly 0.

    References
    ----------
    .. [1] Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object
       Detection", ICCV 2017.

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    >>> target = torch.tensor([0, 2])
    >>> focal = crossent.nn.FocalLoss()(logits, target)
    >>> log_p = torch.log_softmax(logits, dim=1)[torch.arange(2), target]
    >>> written_out = (-(1 - log_p.exp()) ** 2 * log_p).mean()
    >>> bool(torch.allclose(focal, written_out))
    True
    """

    _repr_fields = (
        ("gamma", 2.0),
        ("ignore_index", -100),
        ("label_smoothing", 0.0),
        ("reduction", "mean"),
    )
    _option_names = ("ignore_index", "label_smoothing", "gamma", "reduction")

    def __init__(
        self,
        gamma: float = 2.0,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, None, None, reduction, per_class=True)
        self.gamma = check_nonnegative_scalar(gamma, name="gamma")
        self.ignore_index = check_ignore_index(ignore_index, allow_none=False)
        self.label_smoothing = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
        self._options()

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The focal loss of logits `input` (classes on dim 1) against `target`."""
        return _cross_entropy(input, target, self._checked_weight(), self._options())


class BinaryFocalLoss(_BinaryLoss):
    r"""Binary (sigmoid) focal loss from logits, multi-label ready.

    torchvision's ``sigmoid_focal_loss`` / Keras's ``BinaryFocalCrossentropy``
    as a module: each element's binary cross-entropy is scaled by
    :math:`(1 - p_t)^\gamma`. ``BinaryFocalLoss(gamma=0.0)`` is exactly
    :class:`BCEWithLogitsLoss`.

    Parameters
    ----------
    gamma : float, default 2.0
        Focusing parameter γ ≥ 0.
    alpha : float, optional, keyword-only
        Class balance: positives weighted by α, negatives by 1 − α. The default
        ``None`` applies no balancing, as Keras's default
        (``apply_class_balancing=False``) and so that ``gamma=0`` is plain
        BCE; pass ``alpha=0.25`` for torchvision's ``sigmoid_focal_loss`` and
        RetinaNet's setting.
    weight : Tensor, optional, keyword-only
        Per-element rescaling broadcast to the input; a buffer.
    pos_weight : Tensor, optional, keyword-only
        Multiplies the positive term (PyTorch's BCE formula); a buffer.
    label_smoothing : float, keyword-only, default 0.0
        Targets become :math:`t(1-ε) + ε/2`.
    reduction : {"mean", "sum", "none"}, keyword-only, default "mean"
        ``"mean"`` divides by the number of elements (torchvision's function
        defaults to ``"none"``).

    Notes
    -----
    With :math:`p = \sigma(x)`, :math:`p_t = p\,t + (1-p)(1-t)` and
    :math:`\alpha_t = \alpha t + (1-\alpha)(1-t)`,

    .. math:: \ell(x, t) = -\alpha_t\,(1 - p_t)^\gamma \log p_t

    for hard targets; each of the two terms of the cross-entropy gets its own
    factor for soft ones. Computed from log-sigmoid, so no finite logit
    overflows.

    References
    ----------
    .. [1] Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object
       Detection", ICCV 2017.

    Examples
    --------
    >>> import torch
    >>> import crossent.nn
    >>> x = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    >>> t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> loss = crossent.nn.BinaryFocalLoss(alpha=0.25)(x, t)
    >>> p = torch.sigmoid(x)
    >>> p_t = p * t + (1 - p) * (1 - t)
    >>> alpha_t = 0.25 * t + 0.75 * (1 - t)
    >>> written_out = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    >>> bool(torch.allclose(loss, written_out))
    True
    """

    weight: Tensor | None
    _repr_fields = (
        ("gamma", 2.0),
        ("alpha", None),
        ("label_smoothing", 0.0),
        ("reduction", "mean"),
    )

    def __init__(
        self,
        gamma: float = 2.0,
        *,
        alpha: float | None = None,
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(None, None, reduction)
        self._set_binary_options(weight, pos_weight, label_smoothing, gamma, alpha)


class LinearCrossEntropyLoss(_Loss):
    r"""Fused ``lm_head`` + cross-entropy for large vocabularies; holds options only.

    ``LinearCrossEntropyLoss()(hidden, weight, target)`` equals
    ``CrossEntropyLoss()(hidden @ weight.T + bias, target)`` and its gradients
    for `hidden`, `weight` and `bias`, without ever holding the whole
    (tokens × vocabulary) logits (:func:`crossent.fused.linear_cross_entropy`).

    The module holds no parameters: the projection weight is passed to
    ``forward``. A language model's output head is usually owned by the model
    and often tied to the input embedding, so the loss takes
    ``model.lm_head.weight`` (or ``model.embed_tokens.weight``) at call time
    instead of keeping a copy that could fall out of sync with it.

    Parameters
    ----------
    ignore_index : int, keyword-only, default -100
        Targets equal to it (padding, prompt tokens) count neither in the loss
        nor in the mean's denominator.
    label_smoothing : float, keyword-only, default 0.0
        PyTorch's label smoothing ε.
    z_loss : float, keyword-only, default 0.0
        Adds ``z_loss * logsumexp(logits)**2`` per counted token (PaLM).
    softcap : float, optional, keyword-only
        Gemma 2's final-logit soft-capping ``softcap * tanh(logits / softcap)``.
        A logit of ``-inf`` (a masked class: a bias entry of ``-inf``) stays ``-inf``, with
        gradient 0, rather than becoming ``-softcap``. A positive, finite number (None:
        no cap); a cap so large that ``logits / softcap`` is below the dtype's rounding
        leaves the logits as they are.
    reduction : {"mean", "sum", "none"}, keyword-only, default "mean"
        ``"mean"`` divides by the number of counted tokens.
    chunk_size : int, optional, keyword-only
        Tokens per chunk (memory versus speed); ``None`` picks one.
    shift : bool, keyword-only, default False
        Next-token prediction: position t is scored against ``target[..., t + 1]``
        and the last position is dropped (Hugging Face's causal-LM loss).
    class_weight : Tensor, shape (V,), optional, keyword-only
        Non-negative per-class weights (``CrossEntropyLoss``'s `weight`; here the
        projection is the `weight` of ``forward``), kept as a buffer (it moves with
        ``.to()`` and is saved in the ``state_dict``); ``"mean"`` then divides by the
        summed weight of the counted targets.

    Notes
    -----
    ``forward(hidden, weight, target, bias=None)`` takes `hidden` of shape
    ``(..., H)`` (e.g. ``(batch, seq, H)``), the head's `weight` of shape
    ``(V, H)`` (``nn.Linear``'s layout), `target` of shape ``(...)`` and an
    optional `bias` of shape ``(V,)``; ``reduction="none"`` returns the shape
    of `target` (``(..., T - 1)`` with `shift`). The loss is float32 (float64
    for float64 inputs) whatever the dtype of `hidden`.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> import crossent.nn
    >>> _ = torch.manual_seed(0)
    >>> hidden = torch.randn(6, 8, requires_grad=True)
    >>> lm_head = torch.nn.Linear(8, 50, bias=False)
    >>> target = torch.tensor([1, 4, 49, -100, 7, 0])
    >>> loss = crossent.nn.LinearCrossEntropyLoss()(hidden, lm_head.weight, target)
    >>> ref = F.cross_entropy(lm_head(hidden), target)
    >>> bool(torch.allclose(loss, ref, atol=1e-5))
    True
    """

    class_weight: Tensor | None
    _repr_fields = (
        ("ignore_index", -100),
        ("label_smoothing", 0.0),
        ("z_loss", 0.0),
        ("softcap", None),
        ("reduction", "mean"),
        ("chunk_size", None),
        ("shift", False),
    )

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        reduction: str = "mean",
        chunk_size: int | None = None,
        shift: bool = False,
        class_weight: Tensor | None = None,
    ) -> None:
        super().__init__(None, None, reduction)
        cw = _check_tensor(class_weight, name="class_weight", per_class=True)
        self.register_buffer("class_weight", cw)
        self.ignore_index = check_ignore_index(ignore_index, allow_none=False)
        self.label_smoothing = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
        self.z_loss = check_nonnegative_scalar(z_loss, name="z_loss")
        self.softcap = _check_softcap(softcap)
        self.chunk_size = check_chunk_size(chunk_size)
        if not isinstance(shift, bool):
            msg = f"`shift` must be True or False; got {shift!r}."
            raise TypeError(msg)
        self.shift = shift

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """The loss of ``hidden @ weight.T + bias`` against class indices `target`."""
        from crossent.fused import linear_cross_entropy  # imports Triton only when used

        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            class_weight=self.class_weight,
            shift=self.shift,
        )
