r"""Fused linear cross-entropy for large vocabularies (PyTorch, CPU and CUDA).

:func:`linear_cross_entropy` computes ``cross_entropy(hidden @ weight.T + bias,
target)`` and its gradients while holding only one chunk of the logits at a
time. On CUDA with Triton installed, the row statistics and the in-place logits
gradient run as Triton kernels over vocabulary tiles; elsewhere a pure-PyTorch
chunked loop does the same work.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from crossent._lib._checks import (
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
from crossent._lib._xp import array_namespace
from crossent.fused._function import LinearCEOptions, run_linear_ce

__all__ = ["linear_cross_entropy"]


def _check_tensor(x: object, *, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        msg = f"`{name}` must be a torch.Tensor; got {type(x).__name__}. Use torch.as_tensor first."
        raise TypeError(msg)
    return x


def _check_devices(hidden: torch.Tensor, tensors: dict[str, Any]) -> None:
    """Every tensor in `tensors` must be on `hidden`'s device."""
    for name, t in tensors.items():
        if t.device != hidden.device:
            msg = (
                f"`{name}` is on {t.device} but `hidden` is on {hidden.device}; move it with .to()."
            )
            raise ValueError(msg)


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


def _check_options(
    *,
    ignore_index: object,
    label_smoothing: object,
    z_loss: object,
    softcap: object,
    reduction: object,
    chunk_size: object,
) -> LinearCEOptions:
    index = check_ignore_index(ignore_index, allow_none=False)
    eps = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    zeta = check_nonnegative_scalar(z_loss, name="z_loss")
    cap = check_softcap(softcap)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            msg = f"`chunk_size` must be None or a positive int; got {chunk_size!r}."
            raise TypeError(msg)
        if chunk_size < 1:
            msg = f"`chunk_size` must be >= 1 (or None to pick one from memory); got {chunk_size}."
            raise ValueError(msg)
    return LinearCEOptions(
        ignore_index=index,
        label_smoothing=eps,
        z_loss=zeta,
        softcap=cap,
        reduction=check_reduction(reduction),
        chunk_size=chunk_size,
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    chunk_size: int | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sparse cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Equals ``sparse_categorical_cross_entropy(hidden @ weight.T + bias, target,
    from_logits=True, weight=class_weight, ...)`` (and PyTorch's
    ``F.cross_entropy(F.linear(hidden, weight, bias), target, ...)`` for the
    options PyTorch has), values and gradients, but holds only one chunk of
    ``chunk_size`` tokens × vocabulary logits at a time. Gradients for `hidden`,
    `weight` and `bias` are computed in the forward pass (three matrix products
    in all), so backward only scales them.

    Parameters
    ----------
    hidden : Tensor, shape (..., d)
        Hidden states; float32, float64, float16 or bfloat16.
    weight : Tensor, shape (V, d)
        The output projection (one row per class), same dtype and device as `hidden`.
    target : Tensor of int, shape (...)
        Class indices in ``[0, V)`` or `ignore_index`; `hidden`'s shape without its last axis.
    bias : Tensor, shape (V,), optional
        Added to the logits.
    ignore_index : int, default -100
        Tokens with this target add nothing to the loss, the mean's denominator or
        any gradient, and cost no matrix-product work (they are skipped).
    label_smoothing : float, default 0.0
        ε in [0, 1]: the target becomes (1 − ε)·one-hot + ε/V (PyTorch's rule,
        composed with `class_weight` as PyTorch does).
    z_loss : float, default 0.0
        Adds ``z_loss · lse(logits)²`` per counted token (PaLM), unweighted by `class_weight`.
    softcap : float, optional
        Replaces the logits by ``softcap · tanh(logits / softcap)`` first (Gemma 2).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed class weight of the counted tokens (their
        number without `class_weight`); a mean over no counted token is 0 with a
        zero gradient (PyTorch gives NaN). ``"none"`` returns one loss per token
        (0 for ignored tokens), shape of `target`.
    chunk_size : int, optional
        Tokens per chunk. None picks the largest chunk whose work buffers
        (a float32 ``(chunk, V)`` logits buffer, plus a second one with `softcap`,
        plus a half-size copy for float16/bfloat16 inputs) fit in 256 MiB, at
        least 16 tokens.
    class_weight : Tensor, shape (V,), optional
        Non-negative per-class weights (``weight=`` of ``F.cross_entropy``; here
        `weight` is the projection matrix). Treated as a constant (no gradient).

    Returns
    -------
    Tensor
        In `hidden`'s dtype: 0-d for ``"mean"`` and ``"sum"``, the shape of `target` for ``"none"``.

    Raises
    ------
    TypeError
        Non-tensor arguments, non-floating `hidden`/`weight`/`bias`/`class_weight`,
        mismatched dtypes, non-integer `target`, bad option types.
    ValueError
        Mismatched shapes or devices, labels outside ``[0, V)`` that are not
        `ignore_index`, negative `class_weight`, options out of range.

    Notes
    -----
    For token :math:`i` with logits :math:`z = W h_i + b` (soft-capped first when
    requested), :math:`\ell_i = \operatorname{lse}(z)`, class weights :math:`w`
    (ones by default) and smoothing ε over :math:`V` classes,

    .. math::

        L_i = (1-\varepsilon)\, w_{y_i} (\ell_i - z_{y_i})
              + \frac{\varepsilon}{V} \sum_k w_k (\ell_i - z_k) + \zeta\, \ell_i^2,
        \qquad
        L = \frac{\sum_i L_i}{\sum_i w_{y_i}} \ \text{("mean")}.

    The gradient of the logits, :math:`G_{ik} = a_i p_{ik} - (1-\varepsilon) w_{y_i}[k = y_i]
    - \tfrac{\varepsilon}{V} w_k` with :math:`a_i = (1-\varepsilon)w_{y_i} +
    \tfrac{\varepsilon}{V}\sum_k w_k + 2\zeta\ell_i` (times :math:`1-\tanh^2` under a
    soft cap), is formed in place in the chunk's buffer; then
    :math:`\nabla_h = G W` and :math:`\nabla_W \mathrel{+}= G^\top h` — three
    matrix products in all, :math:`6 N V d` flops over the counted tokens only
    [1]_ [2]_. Each row's log-sum-exp is :math:`m + \log \sum_k e^{z_k - m}` with
    :math:`m = \max_k z_k` (a fused ``log_softmax`` on the PyTorch path, an online
    running-max pass over vocabulary tiles in the Triton kernel on CUDA).

    float16/bfloat16: the logits and :math:`\nabla_h` products run in the input
    dtype (as PyTorch's unfused loss does); the row statistics, the loss and
    :math:`G` are float32; the weight and bias gradients are accumulated in float32
    (on CPU, where no low-precision product with float32 output exists, the weight
    gradient product itself runs in float32 — accurate, but slower than a
    bfloat16 product) and returned in the input dtype.

    With ``reduction="none"`` the forward pass computes only the loss and backward
    recomputes the logits (four matrix products in all), so any upstream gradient
    is handled exactly; a second backward through the same graph also recomputes.
    The caller's tensors are never written to. Higher-order gradients are not
    supported. On CPU the chunk's work buffers are kept per thread between calls
    (fresh ones cost page faults); ``crossent.fused._chunked.clear_workspace()``
    releases them.

    References
    ----------
    .. [1] Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024.
    .. [2] Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024.

    Examples
    --------
    >>> import torch
    >>> from crossent.fused import linear_cross_entropy
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    >>> target = torch.tensor([0, 2])
    >>> loss = linear_cross_entropy(hidden, weight, target)
    >>> print(f"{loss.item():.6f}")
    0.810309
    >>> ref = torch.nn.functional.cross_entropy(hidden @ weight.T, target)
    >>> bool(torch.allclose(loss, ref))
    True
    >>> loss.backward()
    >>> hidden.grad.shape, weight.grad.shape
    (torch.Size([2, 2]), torch.Size([3, 2]))
    """
    hidden = _check_tensor(hidden, name="hidden")
    weight = _check_tensor(weight, name="weight")
    target = _check_tensor(target, name="target")
    opts = _check_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    _check_float(hidden, name="hidden")
    _check_float(weight, name="weight", dtype=hidden.dtype)
    if hidden.ndim < 1:
        msg = "`hidden` must have shape (..., d); got a 0-d tensor."
        raise ValueError(msg)
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        msg = (
            f"`weight` must have shape (V, d) with d = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"got {tuple(weight.shape)}."
        )
        raise ValueError(msg)
    n_classes = int(weight.shape[0])
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        msg = (
            f"`target` must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
            f"got {tuple(target.shape)}."
        )
        raise ValueError(msg)
    xp = array_namespace(hidden, target)
    check_integer_labels(target, xp=xp)
    tensors: dict[str, Any] = {"weight": weight, "target": target}
    if bias is not None:
        bias = _check_tensor(bias, name="bias")
        _check_float(bias, name="bias", dtype=hidden.dtype)
        if tuple(bias.shape) != (n_classes,):
            msg = f"`bias` must have shape (V,) = ({n_classes},); got {tuple(bias.shape)}."
            raise ValueError(msg)
        tensors["bias"] = bias
    if class_weight is not None:
        class_weight = _check_tensor(class_weight, name="class_weight")
        _check_float(class_weight, name="class_weight")
        if tuple(class_weight.shape) != (n_classes,):
            msg = (
                f"`class_weight` must have shape (V,) = ({n_classes},) (one weight per class); "
                f"got {tuple(class_weight.shape)}."
            )
            raise ValueError(msg)
        check_nonnegative(class_weight, name="class_weight", xp=xp)
        tensors["class_weight"] = class_weight
    _check_devices(hidden, tensors)
    check_label_range(target, n_classes, ignore_index=opts.ignore_index, xp=xp)
    guard_label_range(target, n_classes, ignore_index=opts.ignore_index)

    d = hidden.shape[-1]
    loss = run_linear_ce(
        hidden.reshape(-1, d), weight, target.reshape(-1), bias, class_weight, opts
    )
    if opts.reduction == "none":
        loss = loss.reshape(target.shape)
    return loss
