r"""Vocabulary-parallel fused linear cross-entropy: :mod:`crossent.fused`'s chunked core per rank.

Rank ``r`` holds rows ``[s_r, s_r + V_r)`` of the output projection (and of the
bias). The chunk loop of :func:`crossent.fused._chunked._chunked_linear_ce` runs
on every rank over the same chunks of tokens; per chunk, two all-reduces combine
the row statistics of the slices (the hooks below). No rank ever holds more than
one chunk of its own logits. The gradient of the local weight (and bias) stays
local; the gradient of `hidden` is the sum of the slices' contributions,
all-reduced in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from crossent._lib._checks import check_integer_labels, check_nonnegative
from crossent._lib._xp import array_namespace, check_same_device
from crossent._losses._common import mean_class_weight
from crossent.distributed._comm import row_reducers
from crossent.distributed._vocab_parallel import setup
from crossent.fused._function import VocabShard, run_linear_ce
from crossent.fused._inputs import (
    _check_float,
    _check_options,
    _check_tensor,
    check_constant_class_weight,
    check_shift,
    rows_2d,
    shift_target,
    unshift,
)
from crossent.fused._logprobs import run_log_probs

__all__ = ["vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_log_probs"]

_CALLER = "vocab_parallel_linear_cross_entropy"


def _check_tensors(
    hidden: Any, local_weight: Any, target: Any, bias: Any, class_weight: Any
) -> None:
    """This rank's tensors: types, dtypes, shapes and devices (values are checked collectively)."""
    for x, name in ((hidden, "hidden"), (local_weight, "local_weight"), (target, "target")):
        _check_tensor(x, name=name)
    _check_float(hidden, name="hidden")
    _check_float(local_weight, name="local_weight")
    xp = array_namespace(hidden, target)
    check_integer_labels(target, xp=xp)
    if hidden.ndim < 1:
        msg = "`hidden` must have shape (..., d); got a 0-d tensor."
        raise ValueError(msg)
    d = hidden.shape[-1]
    if local_weight.ndim != 2 or local_weight.shape[1] != d or local_weight.shape[0] == 0:
        msg = (
            "`local_weight` must have shape (V_r, d): this rank's rows of the output projection "
            f"(at least one), d = hidden.shape[-1] = {d}; got {tuple(local_weight.shape)}."
        )
        raise ValueError(msg)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        msg = (
            f"`target` must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; "
            f"got {tuple(target.shape)}."
        )
        raise ValueError(msg)
    tensors = {"local_weight": local_weight, "target": target}
    if bias is not None:
        _check_tensor(bias, name="bias")
        _check_float(bias, name="bias")
        if tuple(bias.shape) != (local_weight.shape[0],):
            msg = (
                f"`bias` must be this rank's slice, shape (V_r,) = ({local_weight.shape[0]},); "
                f"got {tuple(bias.shape)}."
            )
            raise ValueError(msg)
        tensors["bias"] = bias
    if class_weight is not None:
        _check_tensor(class_weight, name="class_weight")
        _check_float(class_weight, name="class_weight")
        if class_weight.ndim != 1:
            msg = (
                "`class_weight` must be the whole (V,) vector of class weights; "
                f"got shape {tuple(class_weight.shape)}."
            )
            raise ValueError(msg)
        check_nonnegative(class_weight, name="class_weight", xp=xp)
        check_constant_class_weight(
            class_weight, caller="crossent.distributed.vocab_parallel_linear_cross_entropy"
        )
        tensors["class_weight"] = class_weight
    check_same_device(hidden=hidden, **tensors)


def _prepare(
    *,
    caller: str,
    group: Any,
    tensors: tuple[Any, Any, Any, Any, Any],
    shift: bool,
    options: Callable[[], Any],
) -> tuple[Any, VocabShard, torch.Tensor, torch.Tensor, float]:
    """Checks and handshake of a fused vocab-parallel call;
    ``(opts, shard, hidden_2d, target, weight_factor)``.

    `tensors` is ``(hidden, local_weight, target, bias, class_weight)``; `options()`
    checks and returns the call's options. The returned target is shifted
    (when `shift`), with `hidden`'s batch shape; `weight_factor` is the handshake's
    ``Layout.weight_factor`` (what a weighted mean scales the class weights by, the same on
    every rank).
    """
    hidden, local_weight, target, bias, class_weight = tensors

    def checks() -> Any:
        opts = options()
        _check_tensors(hidden, local_weight, target, bias, class_weight)
        if check_shift(shift) and hidden.ndim < 2:
            shape = tuple(hidden.shape)
            msg = f"`hidden` must have shape (..., T, d) with shift=True; got {shape}."
            raise ValueError(msg)
        return opts

    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (hidden, local_weight, bias)
    )
    hidden_grad = needs_grad and isinstance(hidden, torch.Tensor) and hidden.requires_grad
    layout, opts = setup(
        caller=caller,
        group=group,
        local_vocab=local_weight.shape[0]
        if isinstance(local_weight, torch.Tensor) and local_weight.ndim
        else None,
        target=target,
        weight=class_weight,
        checks=checks,
        # What decides the collectives must agree: dtypes, d, bias, shift, hidden's gradient
        # (backward's all-reduce), whether a gradient is taken at all.
        signature={
            "the dtypes of `hidden`, `local_weight` and `bias` (or its absence)": (
                str(getattr(hidden, "dtype", None)),
                str(getattr(local_weight, "dtype", None)),
                str(getattr(bias, "dtype", None)),
            ),
            "the hidden size": tuple(getattr(hidden, "shape", ()))[-1:],
            "`shift`": shift,
            "whether a gradient is taken, and for `hidden`": (
                needs_grad,
                hidden_grad,
            ),
        },
        weight_global_only=True,
    )
    target = shift_target(target, shift=shift, ignore_index=opts.ignore_index)
    reduce_max, reduce_sum = row_reducers(layout.group)
    shard = VocabShard(layout.vocab_start, layout.vocab_size, reduce_max, reduce_sum)
    return opts, shard, rows_2d(hidden), target, layout.weight_factor


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
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
    r"""Fused linear cross-entropy when the output projection is split by vocabulary over ranks.

    Every rank passes the same `hidden` and `target` (the whole batch) and its
    own rows of the projection; the loss, identical on every rank, equals
    :func:`crossent.fused.linear_cross_entropy` with the whole projection, and
    so do the gradients: `hidden`'s in full on every rank, `local_weight`'s and
    `bias`'s for the rank's own rows. No rank holds more than one chunk of its
    own logits.

    Parameters
    ----------
    hidden : torch.Tensor, shape (..., d)
        Hidden states, the same on every rank; float32, float64, float16 or bfloat16.
    local_weight : torch.Tensor, shape (V_r, d)
        This rank's rows of the output projection: rank ``r`` of `group` holds
        classes ``[V_0 + ... + V_{r-1}, V_0 + ... + V_r)`` (lengths may differ).
    target : torch.Tensor of int, shape (...)
        Global class indices in ``[0, V)`` or `ignore_index`; `hidden`'s shape
        without its last axis; the same on every rank.
    group : ProcessGroup, optional
        The tensor-parallel group (default: the whole world).
    bias : torch.Tensor, shape (V_r,), optional
        This rank's slice of the bias.
    ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size
        As in :func:`crossent.fused.linear_cross_entropy`; smoothing runs over
        the whole vocabulary ``V``. All ranks must pass the same values.
    class_weight : torch.Tensor, shape (V,), optional
        Per-class weights for the *whole* vocabulary, on every rank (the mean's
        denominator then needs no communication). Constants.
    shift : bool, default False
        Score position t against ``target[..., t + 1]`` (causal LM), as in
        :func:`crossent.fused.linear_cross_entropy`.

    Returns
    -------
    torch.Tensor
        float32 (float64 for float64 operands): 0-d for ``"mean"``/``"sum"``,
        the shape of `target` (``(..., T - 1)`` with `shift`) for ``"none"``;
        identical on every rank.

    Raises
    ------
    RuntimeError
        If torch.distributed has no initialized process group.
    TypeError, ValueError
        On a bad call, on **every** rank, as for :func:`vocab_parallel_cross_entropy`
        (the rank at fault raises its own error, the others name it).
    IndexError
        With validation off, a label outside ``[0, V)``, on every rank (as
        for :func:`vocab_parallel_cross_entropy`).

    Notes
    -----
    Per chunk of tokens, each rank reduces its slice of the chunk's logits to
    the row statistics of ``crossent._losses._rows`` (its slice's row max
    :math:`m_r`, :math:`s_r = \sum_{k \in r} e^{z_k - m_r}`, the smoothing sum
    :math:`\sum_{k \in r} w_k (m_r - z_k)` and, on the rank that owns the label,
    :math:`z_y`); the ranks merge them as ``combine`` merges slices: one
    all-reduce (MAX) of :math:`m_r` gives :math:`m`, a second (SUM) of the
    statistics rebased to :math:`m` gives the whole-vocabulary ones;
    every rank then forms the loss and the logits gradient :math:`G` of its
    slice in place, and :math:`G^\top h` (its weight gradient) and :math:`G W_r`
    (its part of `hidden`'s gradient) with no further communication. The
    backward pass all-reduces `hidden`'s gradient (one ``(N, d)`` SUM); for
    ``"none"`` it first recomputes the chunks (with their per-chunk
    all-reduces) under the incoming row gradients. A float16/bfloat16 `hidden`
    with a float32 head sums each chunk's float32 part of that gradient instead
    (one ``(chunk, d)`` SUM per chunk) and rounds the sum once, as one process
    does. The formulas are those of :func:`crossent.fused.linear_cross_entropy`.

    Examples
    --------
    A group of one (``examples/vocab_parallel.py`` runs under
    ``torchrun --nproc-per-node 2``):

    >>> import socket, torch, torch.distributed as dist
    >>> from crossent.distributed import vocab_parallel_linear_cross_entropy
    >>> from crossent.fused import linear_cross_entropy
    >>> with socket.socket() as s:
    ...     s.bind(("127.0.0.1", 0))
    ...     port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    >>> target = torch.tensor([0, 2])
    >>> loss = vocab_parallel_linear_cross_entropy(hidden, weight, target, z_loss=1e-3)
    >>> single = linear_cross_entropy(hidden, weight, target, z_loss=1e-3)
    >>> print(f"{loss.item():.6f} {single.item():.6f}")
    0.815848 0.815848
    >>> dist.destroy_process_group()
    """

    opts, shard, h2, target, weight_factor = _prepare(
        caller=_CALLER,
        group=group,
        tensors=(hidden, local_weight, target, bias, class_weight),
        shift=shift,
        options=lambda: _check_options(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            chunk_size=chunk_size,
        ),
    )
    t1 = target.reshape(-1)
    # a weighted mean of huge or tiny class weights (float32 near 3e38, subnormal): scaled on
    # every rank alike
    class_weight = mean_class_weight(
        class_weight, opts.reduction, opts.z_loss, xp=torch, factor=weight_factor
    )
    loss = run_linear_ce(h2, local_weight, t1, bias, class_weight, opts, shard)
    if opts.reduction == "none":
        return unshift(loss.reshape(target.shape), shift=shift)
    return loss


def vocab_parallel_linear_log_probs(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token log-probabilities (and entropy) when the output projection is split by vocabulary.

    :func:`crossent.fused.linear_log_probs` with rank ``r`` of `group` holding
    rows ``[V_0 + ... + V_{r-1}, V_0 + ... + V_r)`` of the projection (and of
    `bias`). Every rank passes the same `hidden` and `target` and gets the whole
    result, the whole gradient of `hidden`, and its own slice's gradients. No
    rank holds more than one chunk of its own logits.

    Parameters
    ----------
    hidden : torch.Tensor, shape (..., d)
        Hidden states, the same on every rank.
    local_weight : torch.Tensor, shape (V_r, d)
        This rank's rows of the output projection (lengths may differ by rank).
    target : torch.Tensor of int, shape (...)
        Global token indices in ``[0, V)`` or `ignore_index`, the same on every rank.
    group : ProcessGroup, optional
        The tensor-parallel group (default: the whole world).
    bias : torch.Tensor, shape (V_r,), optional
        This rank's slice of the bias.
    temperature, softcap, ignore_index, shift, return_entropy, chunk_size
        As in :func:`crossent.fused.linear_log_probs`; the same on every rank.

    Returns
    -------
    log_probs : torch.Tensor
        Shape of `target` (after the shift), float32 (float64 for float64
        operands), identical on every rank.
    entropy : torch.Tensor
        With ``return_entropy=True``.

    Raises
    ------
    RuntimeError
        If torch.distributed has no initialized process group.
    TypeError, ValueError
        On a bad call, on **every** rank (the rank at fault raises its own error).
    IndexError
        With validation off, a label outside ``[0, V)``, on every rank (as
        for :func:`vocab_parallel_cross_entropy`).

    Notes
    -----
    Per chunk, each rank reduces its slice to its log-sum-exp :math:`\ell_r`, the
    target's log-probability within the slice (on the owner) and
    :math:`t_r = \sum_{k \in r} e^{u_k - \ell_r}(u_k - \ell_r)`; one MAX and one
    SUM all-reduce combine them into :math:`\log p_y` and :math:`H` (see
    ``crossent.fused._logprobs``). Backward recomputes the chunks (the same
    two all-reduces per chunk) and all-reduces the gradient of `hidden` once
    (a float16/bfloat16 `hidden` with a float32 head: chunk by chunk, in float32,
    before the rounding).

    Examples
    --------
    A group of one:

    >>> import socket, torch, torch.distributed as dist
    >>> from crossent.distributed import vocab_parallel_linear_log_probs
    >>> from crossent.fused import linear_log_probs
    >>> with socket.socket() as s:
    ...     s.bind(("127.0.0.1", 0))
    ...     port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> target = torch.tensor([0, 2])
    >>> lp = vocab_parallel_linear_log_probs(hidden, weight, target, temperature=0.5)
    >>> bool(torch.allclose(lp, linear_log_probs(hidden, weight, target, temperature=0.5)))
    True
    >>> dist.destroy_process_group()
    """
    from crossent.fused import _log_prob_options, _log_prob_outputs

    opts, shard, h2, target, _ = _prepare(
        caller="vocab_parallel_linear_log_probs",
        group=group,
        tensors=(hidden, local_weight, target, bias, None),
        shift=shift,
        options=lambda: _log_prob_options(
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            shift=shift,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )[0],
    )
    lp, ent = run_log_probs(h2, local_weight, target.reshape(-1), bias, opts, shard)
    return _log_prob_outputs(lp, ent, target.shape, shift=shift)
