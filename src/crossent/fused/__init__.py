r"""Fused linear losses for large vocabularies (PyTorch, CPU and CUDA).

:func:`linear_cross_entropy` computes ``cross_entropy(hidden @ weight.T + bias,
target)`` and its gradients while holding only one chunk of the logits at a
time; :func:`linear_log_probs` the per-token log-probabilities and entropy
(policy-gradient training); :func:`linear_distillation_loss` the generalized
JSD between a student and a teacher head. All share one chunk loop. On CUDA with Triton
installed, the row statistics and the in-place logits gradient of the
cross-entropy run as Triton kernels over vocabulary tiles; elsewhere a pure-PyTorch
chunked loop does the same work.
"""

from __future__ import annotations

from typing import Literal

import torch

from crossent._lib._checks import check_softcap
from crossent._lib._xp import check_same_device
from crossent._losses._common import mean_class_weight
from crossent._losses._distill import check_temperature
from crossent.fused._distill import linear_distillation_loss
from crossent.fused._function import run_linear_ce
from crossent.fused._inputs import (
    _check_float,
    _check_options,
    _check_tensor,
    as_one_op,
    check_chunk_size,
    check_constant_class_weight,
    check_fused_ignore_index,
    check_head,
    check_labels,
    check_shift,
    check_values,
    clears_skip_mark,
    flat,
    rows_2d,
    scored_labels,
    shift_target,
    unshift,
)
from crossent.fused._logprobs import LogProbOptions, run_log_probs

__all__ = ["linear_cross_entropy", "linear_distillation_loss", "linear_log_probs"]


@clears_skip_mark
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
        A logit of ``-inf`` (a masked class: a bias entry of ``-inf``) stays ``-inf``, with
        gradient 0, rather than becoming ``-softcap``. A positive, finite number (None:
        no cap); a cap so large that ``logits / softcap`` is below the dtype's rounding
        leaves the logits as they are.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed class weight of the counted tokens (their
        number without `class_weight`); a mean over no counted token is 0 with a
        zero gradient (PyTorch gives NaN). ``"none"`` returns one loss per token
        (0 for ignored tokens), shape of `target`.
    chunk_size : int, optional
        Tokens per chunk. None picks the largest chunk whose work buffers
        (a float32 ``(chunk, V)`` logits buffer, plus a second one with `softcap`,
        plus a half-size copy for float16/bfloat16 inputs) fit in 64 MiB on the
        CPU and 1 GiB on a GPU, at least 16 tokens.
    class_weight : Tensor, shape (V,), optional
        Non-negative per-class weights (``weight=`` of ``F.cross_entropy``; here
        `weight` is the projection matrix). A constant: one that requires a gradient
        raises a RuntimeError, as in PyTorch (detach it).
    shift : bool, default False
        Causal-LM convention (Hugging Face's): `hidden` is ``(..., T, d)``, the
        logits at position t are scored against ``target[..., t + 1]`` and the
        last position is dropped; ``"none"`` returns shape ``(..., T - 1)``.
        Nothing is copied: the last position is simply not counted. Under
        ``torch.export`` with a dynamic T, ``"mean"`` and ``"sum"`` export from
        ``Dim("T", min=2)``; ``"none"`` needs ``min=3``, as PyTorch's own
        ``x[..., :-1]`` does (export specializes a size T - 1 of 1). T = 1 has
        no position to score: 0 for ``"mean"`` and ``"sum"``, as an all-ignored batch.

    Returns
    -------
    Tensor
        float32, as Hugging Face's loss, or float64 when an operand is float64
        (Hugging Face's loss rounds that one to float32): 0-d for ``"mean"`` and
        ``"sum"``, the shape of `target` for ``"none"``.
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
    ``torch.autocast`` region does not change the products' dtypes. float16/bfloat16
    `hidden` with a float32 `weight`: :math:`\nabla_h` is formed in float32 and kept
    in `hidden`'s dtype (no float32 copy of it is held), each row times a power of
    two, so that float16 keeps the digits an upstream loss scale brings back. An
    upstream gradient of 1 or a power of two gives it rounded once; another one
    (``loss * 0.37``) rounds it once more, within one unit in the last place
    (PyTorch's own bfloat16 logits are further off). float16 `hidden` and `weight`: each
    row of :math:`G` is multiplied by a power of two before it is rounded to float16 for
    :math:`G W` (the largest its product row can reach stays below :math:`2^{15}`), and
    divided out after, so the mean's :math:`1/N`, a small upstream gradient or a loss scale
    applied later does not lose the gradient to float16's subnormals.

    With ``reduction="none"`` the forward pass computes only the loss and backward
    recomputes the logits (four matrix products in all), so any upstream gradient
    is handled exactly; a second backward through the same graph also recomputes.
    The caller's tensors are never written to. Higher-order gradients are not
    supported: a backward with ``create_graph=True`` raises. Under ``torch.func`` transforms
    (``grad``, ``vmap`` for per-sample gradients, ``jacrev``) the gradients are
    recomputed in backward, as for ``"none"``, and ``vmap`` runs one chunked
    call per sample. On CPU the chunk's work buffers are kept per thread between calls
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
    if class_weight is not None:
        class_weight = _check_tensor(class_weight, name="class_weight")
        _check_float(class_weight, name="class_weight")
        if tuple(class_weight.shape) != (n_classes,):
            msg = (
                f"`class_weight` must have shape (V,) = ({n_classes},) (one weight per class); "
                f"got {tuple(class_weight.shape)}."
            )
            raise ValueError(msg)
        check_same_device(hidden=hidden, class_weight=class_weight)
        check_constant_class_weight(class_weight, caller="crossent.fused.linear_cross_entropy")
        # a weighted mean of huge weights: scaled, so that its sums do not overflow
        class_weight = mean_class_weight(class_weight, opts.reduction, opts.z_loss, xp=torch)
    given, target = target, shift_target(target, shift=shift, ignore_index=opts.ignore_index)
    if as_one_op(hidden):  # traced or meta: value checks run inside the op, on concrete values
        from crossent.fused._ops import linear_ce_compiled

        loss = linear_ce_compiled(rows_2d(hidden), weight, flat(target), bias, class_weight, opts)
    else:  # the labels as given are checked (uint64 ones named by their value)
        scored = scored_labels(given, shift=shift)
        check_values(scored, class_weight, n_classes, ignore_index=opts.ignore_index)
        loss = run_linear_ce(rows_2d(hidden), weight, flat(target), bias, class_weight, opts)
    if opts.reduction == "none":
        loss = unshift(loss.reshape(target.shape), shift=shift)
    return loss


def _log_prob_options(
    *,
    temperature: object,
    softcap: object,
    ignore_index: object,
    shift: object,
    return_entropy: object,
    chunk_size: object,
) -> tuple[LogProbOptions, bool]:
    """The checked options of the log-probability functions, and `shift`."""
    if not isinstance(return_entropy, bool):
        msg = f"`return_entropy` must be True or False; got {return_entropy!r}."
        raise TypeError(msg)
    opts = LogProbOptions(
        ignore_index=check_fused_ignore_index(ignore_index),
        temperature=check_temperature(temperature),
        softcap=check_softcap(softcap),
        entropy=return_entropy,
        chunk_size=check_chunk_size(chunk_size),
    )
    return opts, check_shift(shift)


@clears_skip_mark
def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token log-probability of `target` (and entropy) under softmax(logits / T).

    The logits are ``hidden @ weight.T + bias``.

    The policy log-probabilities and the entropy bonus of policy-gradient
    training (PPO, GRPO, REINFORCE), without ever holding the whole
    (tokens × vocabulary) logits: the forward pass keeps one chunk of logits at
    a time, and the backward pass recomputes each chunk and forms its gradient
    for whatever upstream gradients the two outputs receive.

    Parameters
    ----------
    hidden : Tensor, shape (..., d)
        Hidden states (``(..., T, d)`` with `shift`); float32, float64, float16 or bfloat16.
    weight : Tensor, shape (V, d)
        The output projection; its floating dtype may differ from `hidden`'s
        (the products run in the promoted dtype).
    target : Tensor of int, shape (...)
        The tokens whose log-probability is wanted, `hidden`'s shape without ``d``.
    bias : Tensor, shape (V,), optional
        Added to the logits.
    temperature : float, default 1.0
        The logits are divided by it (after the soft cap); positive.
    softcap : float, optional
        Replaces the logits by ``softcap · tanh(logits / softcap)`` first (Gemma 2).
        A logit of ``-inf`` (a masked class: a bias entry of ``-inf``) stays ``-inf``, with
        gradient 0, rather than becoming ``-softcap``. A positive, finite number (None:
        no cap); a cap so large that ``logits / softcap`` is below the dtype's rounding
        leaves the logits as they are.
    ignore_index : int, default -100
        Positions with this target give 0 in both outputs and no gradient.
    shift : bool, default False
        Position t is scored against ``target[..., t + 1]``; the last position
        is dropped, so the outputs have shape ``(..., T - 1)`` (under
        ``torch.export`` with a dynamic T: ``Dim("T", min=3)``, as for
        PyTorch's own ``x[..., :-1]``).
    return_entropy : bool, default False
        Also return the entropy of each position's softmax.
    chunk_size : int, optional
        Tokens per chunk; None picks one from a budget of 64 MiB on the CPU,
        1 GiB on a GPU.

    Returns
    -------
    log_probs : Tensor
        Shape of `target` (after the shift); float32, or float64 for float64 operands.
    entropy : Tensor
        Only with ``return_entropy=True``; same shape and dtype, in nats.

    Raises
    ------
    TypeError
        Non-tensor or non-floating arguments, non-integer `target`, bad option types.
    ValueError
        Mismatched shapes or devices, labels outside ``[0, V)`` that are not
        `ignore_index`, ``temperature <= 0``, ``softcap <= 0``.

    Notes
    -----
    With :math:`u = \operatorname{softcap}(x)/T` and :math:`p = \operatorname{softmax}(u)`:

    .. math::

        \log p_y = u_y - \operatorname{lse}(u), \qquad
        H = -\sum_k p_k \log p_k = \operatorname{lse}(u) - \sum_k p_k u_k,

        \frac{\partial}{\partial u_k}\big(g_y \log p_y + g_H H\big)
            = g_y([k = y] - p_k) - g_H\, p_k (\log p_k + H).

    A confident token's :math:`\log p_* \approx -(1 - p_*)` is formed as
    :math:`\operatorname{log1p}(-\sum_{k \ne *} p_k)` wherever :math:`p_* > 1/2`, and its
    gradient entry :math:`g_y(1 - p_*)` from it: ``log_softmax`` rounds it at 1 (off by up to
    6e-8 in float32: 0 for :math:`1 - p_* < 6 \cdot 10^{-8}`), so both outputs and the
    gradients keep the dtype's rounding relative to their own size (the RL guide, "Confident
    tokens").

    The forward pass does one matrix product per chunk; backward recomputes the
    chunk's logits and does the two gradient products (four in all, the cost of
    the unfused ``log_softmax`` + ``gather`` with autograd, at a fraction of
    its memory). Extra memory: one ``(chunk, V)`` float32 buffer, a second with
    `softcap` in backward, and row-blocked temporaries of 1/8 of it. Higher-order
    gradients are not supported (a backward with ``create_graph=True`` raises); ``torch.func``
    transforms (``grad``, ``vmap``, ``jacrev``) are, ``vmap`` with one chunked call
    per sample. Under ``torch.compile`` (``fullgraph=True`` too) the chunk loop runs as one opaque
    custom op (``crossent::linear_log_probs`` and its backward).

    Examples
    --------
    >>> import torch
    >>> from crossent.fused import linear_log_probs
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> target = torch.tensor([0, 2])
    >>> log_probs, entropy = linear_log_probs(hidden, weight, target, return_entropy=True)
    >>> ref = torch.log_softmax(hidden @ weight.T, dim=-1)
    >>> bool(torch.allclose(log_probs, ref[[0, 1], [0, 2]]))
    True
    >>> bool(torch.allclose(entropy, -(ref.exp() * ref).sum(-1)))
    True
    >>> (log_probs.sum() + 0.01 * entropy.sum()).backward()
    >>> hidden.grad.shape
    torch.Size([2, 2])
    """
    opts, shift = _log_prob_options(
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        shift=shift,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
    n_classes = check_head(hidden, weight, target, bias, shift=shift)
    given, target = target, shift_target(target, shift=shift, ignore_index=opts.ignore_index)
    args = (rows_2d(hidden), weight, flat(target), bias, opts)
    if as_one_op(hidden):  # one opaque op; the label check runs inside it
        from crossent.fused._ops import linear_log_probs_compiled

        lp, ent = linear_log_probs_compiled(*args)
    else:  # the labels as given are checked (uint64 ones named by their value)
        scored = scored_labels(given, shift=shift)
        check_labels(scored, n_classes, ignore_index=opts.ignore_index)
        lp, ent = run_log_probs(*args)
    return _log_prob_outputs(lp, ent, target.shape, shift=shift)


def _log_prob_outputs(
    lp: torch.Tensor, ent: torch.Tensor | None, shape: torch.Size, *, shift: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row results back to the batch shape (without the last position when `shift`)."""
    lp = unshift(lp.reshape(shape), shift=shift)
    if ent is None:
        return lp
    return lp, unshift(ent.reshape(shape), shift=shift)
