r"""Vocabulary-parallel cross-entropy on logits that are split over the ranks of a group.

Rank ``r`` holds the logits of classes ``[s_r, s_r + V_r)``, the slices laid
end to end in rank order (``V_r`` may differ between ranks). The forward pass
needs two all-reduces of one value per row, plus a few more packed into the
second one; the backward pass needs none, since the softmax of the local slice
is rebuilt from the saved row statistics. It is the chunk core of the fused
loss (:mod:`crossent.fused._chunked`) fed with a slice of logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from crossent._lib._checks import values_checked
from crossent._lib._xp import output_dtype, safe_divide
from crossent._losses import _rows
from crossent._losses._common import mean_class_weight
from crossent._losses._logprob import softcap_backward, softcap_logits
from crossent.distributed._comm import (
    Layout,
    Options,
    agree,
    check_options,
    group_of,
    row_reducers,
)
from crossent.fused._chunked import (
    SliceSpec,
    VocabShard,
    chunk_losses,
    logits_grad_,
    row_options,
    slice_statistics,
)
from crossent.fused._function import (
    refuse_double_backward,
    refuse_dual,
    refuse_func_transforms,
)

__all__ = ["vocab_parallel_cross_entropy"]

_CALLER = "vocab_parallel_cross_entropy"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; other floating dtypes stay."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _check_tensors(
    local_logits: object, target: object, weight: object, *, target_name: str = "target"
) -> None:
    """Local checks of one rank's tensors (shapes and dtypes; value checks happen collectively)."""
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        msg = "`local_logits` and `target` must be torch.Tensor objects."
        raise TypeError(msg)
    if not local_logits.is_floating_point():
        msg = f"`local_logits` must have a floating dtype; got {local_logits.dtype}."
        raise TypeError(msg)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        msg = (
            f"`{target_name}` must hold integer class indices; got dtype {target.dtype}. "
            "Cast it with `.long()`."
        )
        raise TypeError(msg)
    if local_logits.ndim == 0 or local_logits.shape[-1] == 0:
        msg = (
            "`local_logits` must have this rank's vocabulary slice on its last axis, with at "
            f"least one class; got shape {tuple(local_logits.shape)}."
        )
        raise ValueError(msg)
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        msg = (
            f"`{target_name}` must have the shape of `local_logits` without its last (vocabulary) "
            f"axis, {tuple(local_logits.shape[:-1])}; got {tuple(target.shape)}."
        )
        raise ValueError(msg)
    check_class_weight(weight)


def check_class_weight(weight: object) -> None:
    """Class weights: a 1-d floating tensor of constants, non-negative (when values are checked)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 1:
        got = type(weight).__name__
        if isinstance(weight, torch.Tensor):
            got = f"{weight.dtype} of shape {tuple(weight.shape)}"
        msg = (
            "`weight` (class weights) must be a 1-d floating torch.Tensor, the whole vocabulary "
            f"or this rank's slice; got {got}."
        )
        raise TypeError(msg)
    if weight.requires_grad:
        msg = (
            "`weight` (class weights) requires grad, but class weights are constants here and "
            "would get no gradient; pass `weight.detach()`."
        )
        raise ValueError(msg)
    if values_checked(weight) and bool((weight < 0).any()):
        msg = f"`weight` must be non-negative; got a minimum of {float(weight.min()):.6g}."
        raise ValueError(msg)


def local_class_weight(
    weight: torch.Tensor | None, layout: Layout, *, dtype: torch.dtype
) -> torch.Tensor | None:
    """This rank's slice of the class weights (given whole or already sliced), in `dtype`."""
    if weight is None:
        return None
    if weight.shape[0] != layout.local_vocab:
        weight = weight[layout.vocab_start : layout.vocab_start + layout.local_vocab]
    return weight.to(dtype)


def refuse_transforms(caller: str) -> None:
    """Raise a clear error under ``torch.compile`` / ``torch.export`` and ``torch.func``.

    The call exchanges a header with ``all_gather`` and reads it on the host, and its
    autograd Functions have no ``setup_context``: neither traces. Without this, Dynamo
    reported "does not know how to trace the builtin zlib.crc32" (``fullgraph=True``) and
    ``torch.func.grad`` "must override the setup_context staticmethod". Without
    ``fullgraph=True`` the error is a graph break: the call then runs eagerly, correctly.
    """
    if torch.compiler.is_compiling():
        msg = (
            f"{caller} cannot be traced by torch.compile(fullgraph=True) or torch.export: it "
            "exchanges a header between the ranks and checks it on the host. Call it outside "
            "the compiled function, or compile without fullgraph=True (it then runs eagerly "
            "at a graph break)."
        )
        raise RuntimeError(msg)
    refuse_func_transforms(caller)


def setup(
    *,
    caller: str,
    group: Any,
    local_vocab: int | None,
    target: Any,
    weight: Any,
    checks: Callable[[], Any],
    signature: dict[str, object],
    weight_global_only: bool = False,
) -> tuple[Layout, Any]:
    """Local checks (`checks()` raises on bad arguments, returns the options), then the handshake.

    A local error does not raise at once: it travels in the handshake, so that
    every rank stops (see :func:`crossent.distributed._comm.agree`).
    """
    refuse_transforms(caller)
    group = group_of(group, caller=caller)
    error: Exception | None = None
    opts: Any = None
    try:
        opts = checks()
    except (TypeError, ValueError) as exc:
        error = exc
    layout = agree(
        caller=caller,
        group=group,
        local_error=error,
        local_vocab=local_vocab or 0,
        batch_shape=tuple(target.shape) if error is None else (),
        weight_len=-1 if weight is None or error is not None else int(weight.shape[0]),
        target=target if error is None else None,
        options=opts,
        signature=signature,
        weight_global_only=weight_global_only,
        weight=weight if error is None else None,
    )
    return layout, opts


def _slice_spec(
    layout: Layout, opts: Options, weight: torch.Tensor | None
) -> tuple[SliceSpec, VocabShard]:
    """This rank's slice for the chunk core (the soft cap is applied before: -inf stays)."""
    shard = VocabShard(layout.vocab_start, layout.vocab_size, *row_reducers(layout.group))
    row_opts = row_options(opts.label_smoothing, opts.z_loss, None, opts.reduction)
    spec = SliceSpec(row_opts, weight, layout.vocab_size, layout.vocab_start, None, shard, None)
    return spec, shard


def _logits(
    local_logits: torch.Tensor, layout: Layout, opts: Options, dtype: torch.dtype
) -> torch.Tensor:
    """A fresh contiguous ``(N, V_r)`` buffer of the (soft-capped) logits in `dtype`, for the
    core (whose in-place passes assume the layout of its own buffers), whatever the strides
    of `local_logits` (a transposed or sliced view)."""
    x = local_logits.reshape(-1, layout.local_vocab)
    if opts.softcap is not None:
        return softcap_logits(x.to(dtype).contiguous(), opts.softcap, xp=torch)
    return x.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _labels(target: torch.Tensor, opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """(counted, label): ignored rows get label 0 (their rows are masked by `counted`)."""
    if opts.ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool), target
    counted = target != opts.ignore_index
    return counted, torch.where(counted, target, torch.zeros_like(target))


def _row_scale(
    grad_output: torch.Tensor, reduction: str, denominator: torch.Tensor, n: int
) -> torch.Tensor:
    """d(reduced loss)/d(row loss) times the upstream gradient, one value per row."""
    g = grad_output.to(denominator.dtype)
    if reduction == "mean":
        g = safe_divide(g, denominator, xp=torch)  # NaN weights propagate; 0 only at 0
    return g.reshape(-1).expand(n) if reduction != "none" else g.reshape(-1)


class _VocabParallelCE(torch.autograd.Function):
    """The chunk core of the fused loss on one slice of logits: two all-reduces, backward local.

    Forward: the slice's row statistics (:func:`crossent.fused._chunked.slice_statistics`),
    merged over the ranks (:func:`crossent._losses._rows.all_reduce`), the row loss
    (:func:`crossent.fused._chunked.chunk_losses`). Backward: the slice's statistics
    again (no communication) and :func:`crossent.fused._chunked.logits_grad_` with the
    saved whole-vocabulary statistics.
    """

    @staticmethod
    def forward(
        ctx: Any,
        local_logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        layout: Layout,
        opts: Options,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        t = target.reshape(-1).to(torch.int64)
        dtype = compute_dtype(local_logits.dtype)
        w = local_class_weight(weight, layout, dtype=dtype)
        # a weighted mean of huge or tiny weights (float32 near 3e38, subnormal): scaled on
        # every rank alike
        w = mean_class_weight(w, opts.reduction, opts.z_loss, xp=torch, factor=layout.weight_factor)
        spec, shard = _slice_spec(layout, opts, w)
        counted, label = _labels(t, opts)
        z = _logits(local_logits, layout, opts, dtype)
        merged = shard.merge(slice_statistics(z, None, label, spec))
        del z
        if opts.ignore_index is not None:  # an ignored row of -inf only: a zero gradient
            merged = _rows.stand_in_ignored(merged, counted, xp=torch)
        row = torch.where(counted, chunk_losses(merged, spec)[0], 0)
        w_y = merged.w_y if merged.w_y is not None else torch.ones_like(row)
        denominator = torch.where(counted, w_y, 0).sum()
        if opts.reduction == "none":
            loss = row.reshape(target.shape)
        elif opts.reduction == "sum":
            loss = row.sum()
        else:
            loss = safe_divide(row.sum(), denominator, xp=torch)
        ctx.save_for_backward(local_logits, t, denominator)
        ctx.layout, ctx.opts, ctx.spec, ctx.merged = layout, opts, spec, merged
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        # create_graph=True: the gradient below is not traced
        refuse_double_backward(f"crossent.distributed.{_CALLER}")
        local_logits, t, denominator = ctx.saved_tensors
        layout, opts, spec, merged = ctx.layout, ctx.opts, ctx.spec, ctx.merged
        counted, label = _labels(t, opts)
        scale = torch.where(
            counted, _row_scale(grad_output, opts.reduction, denominator, t.shape[0]), 0
        )
        grad = _logits(local_logits, layout, opts, denominator.dtype)
        local = slice_statistics(grad, None, label, spec)
        logits_grad_(grad, None, label, local, merged, scale, spec)  # in place
        if opts.softcap is not None:
            x = local_logits.reshape(-1, layout.local_vocab).to(denominator.dtype)
            grad = softcap_backward(x, opts.softcap, grad, xp=torch)
        grad = grad.to(local_logits.dtype).reshape(local_logits.shape)
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    r"""Cross-entropy of integer labels when the vocabulary is split over the ranks of a group.

    Every rank calls this with the same `target` (the whole batch) and its own
    contiguous slice of the vocabulary; the result, identical on every rank,
    equals ``sparse_categorical_cross_entropy(full_logits, target,
    from_logits=True, ...)`` on the concatenated logits, and the gradient of
    `local_logits` is that call's gradient restricted to the slice.

    Parameters
    ----------
    local_logits : torch.Tensor
        Logits of this rank's classes, shape ``(..., V_r)``: the vocabulary is
        the last axis. Rank ``r`` of `group` holds classes
        ``[V_0 + ... + V_{r-1}, V_0 + ... + V_r)``; the slices may have
        different lengths (a vocabulary that is not divisible by the world size).
    target : torch.Tensor of int
        Global class indices in ``[0, V)``, ``V = Σ_r V_r``, or `ignore_index`;
        shape ``(...)``, the same on every rank.
    group : ProcessGroup, optional
        The tensor-parallel group (default: the whole world). Call
        :func:`torch.distributed.init_process_group` first.
    weight : torch.Tensor, optional
        Class weights, either the whole ``(V,)`` vector (each rank takes its
        slice) or this rank's ``(V_r,)`` slice. Constants: they get no gradient.
    ignore_index : int or None, default -100
        Targets equal to it count neither in the loss nor in the mean's denominator.
    label_smoothing : float, default 0.0
        PyTorch's smoothing, spread over the *whole* vocabulary ``V`` (not the slice).
    z_loss : float, default 0.0
        Adds ``z_loss * lse**2`` per counted target (PaLM), unweighted.
    softcap : float, optional
        Logits ``x`` become ``softcap * tanh(x / softcap)`` first (Gemma 2).
        A logit of ``-inf`` (a masked class) stays ``-inf``, with gradient 0, rather than
        becoming ``-softcap``. A positive, finite number (None: no cap); a cap so large
        that ``logits / softcap`` is below the dtype's rounding leaves the logits as they
        are.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed weight of the counted targets (their
        number without class weights); a mean over no counted target is 0.

    Returns
    -------
    torch.Tensor
        The loss in the dtype of `local_logits` (float16/bfloat16 are computed in
        float32, and returned in float32 under :func:`torch.autocast`, as the
        single-process loss): 0-d for ``"mean"`` and ``"sum"``, the shape of `target` for
        ``"none"``; identical on every rank.

    Raises
    ------
    RuntimeError
        If torch.distributed has no initialized process group; under
        ``torch.func`` transforms and ``torch.compile(fullgraph=True)`` (without
        ``fullgraph`` the call runs eagerly at a graph break); on a second
        differentiation (``create_graph=True``): the gradient is formed outside autograd.
    TypeError, ValueError
        On a bad call, raised on **every** rank (no rank is left waiting in a
        collective): the rank whose arguments are wrong raises its own error,
        the others a :class:`ValueError` naming it. Disagreements between ranks
        (target shape or values, options, dtypes) and labels outside the global
        ``[0, V)`` are detected from one small ``all_gather``. Value checks
        (label range, same labels on every rank, non-negative weights) obey
        :func:`crossent.set_validation`.
    IndexError
        With validation off, a label outside ``[0, V)`` that is not
        `ignore_index` (on any rank), raised on every rank, as torch's own
        kernels fail on such a label: never a number.

    Notes
    -----
    With :math:`z` the (soft-capped) logits and :math:`y` the label, row
    :math:`i` costs

    .. math::

        \ell = (1-\varepsilon)\, w_y (\operatorname{lse}(z) - z_y)
             + \frac{\varepsilon}{V} \sum_{k<V} w_k (\operatorname{lse}(z) - z_k)
             + \lambda_z \operatorname{lse}(z)^2 .

    Each rank reduces its slice to the row statistics of
    ``crossent._losses._rows`` (row max :math:`m_r`,
    :math:`\sum_k e^{z_k - m_r}`, :math:`\sum_k w_k (m_r - z_k)`, and the target's
    logit and weight on the rank that owns :math:`y`); the ranks merge them as
    ``combine`` merges slices: one all-reduce (MAX) of :math:`m_r` gives
    :math:`m`, one packed all-reduce (SUM) adds the statistics rebased to
    :math:`m`. Then :math:`\operatorname{lse} = m + \log \sum_k e^{z_k - m}` and
    every term is a sum of non-negative parts (no cancellation). The backward
    pass is local (the chunk core's gradient on the slice, with the saved
    statistics):

    .. math::

        \frac{\partial \ell}{\partial z_k} = p_k \Big[(1-\varepsilon) w_y
        + \frac{\varepsilon}{V} \sum_j w_j + 2 \lambda_z \operatorname{lse}\Big]
        - (1-\varepsilon) w_y [k = y] - \frac{\varepsilon}{V} w_k ,
        \qquad p_k = e^{z_k - \operatorname{lse}},

    times :math:`1 - \tanh^2(x_k / c)` under a soft cap. Megatron-LM's
    smoothing divides by the local slice and drops the other slices' logits;
    here the smoothing term runs over the whole vocabulary, so the result
    equals the single-process loss. Before any of that, the ranks exchange one
    fixed-size ``int64`` header with ``all_gather`` (slice lengths, shapes,
    options, the label range and a fingerprint of the labels), read on the
    host: the price of clear errors instead of hangs.

    Examples
    --------
    A group of one (every rank runs the same code; see
    ``examples/vocab_parallel.py`` for ``torchrun --nproc-per-node 2``):

    >>> import os, socket, torch, torch.distributed as dist
    >>> import crossent as ce
    >>> from crossent.distributed import vocab_parallel_cross_entropy
    >>> with socket.socket() as s:
    ...     s.bind(("127.0.0.1", 0))
    ...     port = s.getsockname()[1]
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], requires_grad=True)
    >>> target = torch.tensor([0, 2])
    >>> loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)
    >>> single = ce.sparse_categorical_cross_entropy(
    ...     logits, target, from_logits=True, label_smoothing=0.1)
    >>> print(f"{loss.item():.5f} {single.item():.5f}")  # float32: equal to rounding
    1.11711 1.11711
    >>> dist.destroy_process_group()
    """

    def checks() -> Options:
        opts = check_options(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
        )
        _check_tensors(local_logits, target, weight)
        return opts

    if isinstance(local_logits, torch.Tensor):  # no jvp: the error, before the handshake
        refuse_transforms(_CALLER)  # torch.func's jvp / jacfwd: that error names the transform
        refuse_dual(f"crossent.distributed.{_CALLER}", local_logits, weight)
    layout, opts = setup(
        caller=_CALLER,
        group=group,
        local_vocab=local_logits.shape[-1]
        if isinstance(local_logits, torch.Tensor) and local_logits.ndim
        else None,
        target=target,
        weight=weight,
        checks=checks,
        signature={
            "the dtype of `local_logits`": str(getattr(local_logits, "dtype", None)),
        },
    )
    # float32 for float16/bfloat16 under torch.autocast, as the single-process loss
    out_dtype = output_dtype(local_logits, xp=torch)
    out: torch.Tensor = _VocabParallelCE.apply(
        local_logits, target, weight, layout, opts, out_dtype
    )
    return out
