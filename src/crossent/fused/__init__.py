r"""Fused linear cross-entropy for large vocabularies (PyTorch, CPU and CUDA).

:func:`linear_cross_entropy` computes ``cross_entropy(hidden @ weight.T + bias,
target)`` and its gradients while holding only one chunk of the logits at a
time. On CUDA with Triton installed, the row statistics and the in-place logits
gradient run as Triton kernels over vocabulary tiles; elsewhere a pure-PyTorch
chunked loop does the same work.
"""

from __future__ import annotations

from typing import Literal

import torch

from crossent._lib._checks import check_label_range, check_nonnegative
from crossent._lib._xp import array_namespace
from crossent.fused._function import run_linear_ce
from crossent.fused._inputs import (
    _check_devices,
    _check_float,
    _check_options,
    _check_tensor,
    check_head,
    check_shift,
    shift_target,
    unshift,
)

__all__ = ["linear_cross_entropy"]


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
    shift: bool = False,
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
        The output projection (one row per class), on `hidden`'s device. Its
        floating dtype may differ from `hidden`'s (a float32 master weight with
        bfloat16 activations, as under autocast): the products then run in the
        promoted dtype.
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
    shift : bool, default False
        Causal-LM convention (Hugging Face's): `hidden` is ``(..., T, d)``, the
        logits at position t are scored against ``target[..., t + 1]`` and the
        last position is dropped; ``"none"`` returns shape ``(..., T - 1)``.
        Nothing is copied: the last position is simply not counted.

    Returns
    -------
    Tensor
        float32 (float64 when an operand is float64, as Hugging Face's loss):
        0-d for ``"mean"`` and ``"sum"``, the shape of `target` for ``"none"``.
        Gradients come back in each parameter's own dtype.

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
    dtype (as PyTorch's unfused loss does; mixed dtypes in the promoted one); the
    row statistics, the loss and
    :math:`G` are float32; the weight and bias gradients are accumulated in float32
    (on CPU, where no low-precision product with float32 output exists, the weight
    gradient product itself runs in float32 — accurate, but slower than a
    bfloat16 product) and returned in the parameter's dtype. An enclosing
    ``torch.autocast`` region does not change the products' dtypes.

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
    opts = _check_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    shift = check_shift(shift)
    n_classes = check_head(hidden, weight, target, bias, shift=shift)
    xp = array_namespace(hidden, target)
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
        _check_devices(hidden, {"class_weight": class_weight})
    target = shift_target(target, shift=shift, ignore_index=opts.ignore_index)
    check_label_range(target, n_classes, ignore_index=opts.ignore_index, xp=xp)

    d = hidden.shape[-1]
    loss = run_linear_ce(
        hidden.reshape(-1, d), weight, target.reshape(-1), bias, class_weight, opts
    )
    if opts.reduction == "none":
        loss = unshift(loss.reshape(target.shape), shift=shift)
    return loss
