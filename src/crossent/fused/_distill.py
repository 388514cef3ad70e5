r"""Fused knowledge distillation: the generalized JSD of two linear heads, chunk by chunk.

For each chunk of counted tokens the chunk loop of :mod:`crossent.fused._chunked`
computes the student's logits; the body computes the teacher's logits for the
same tokens (no gradient) and calls
:func:`crossent._losses._distill.distill_rows` — the same row formula as
:func:`crossent.distillation_loss` — on blocks of rows, leaving the student's
logits gradient in the chunk buffer for the loop's gradient products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from crossent._lib._checks import check_reduction, not_ignored
from crossent._lib._xp import array_namespace, check_same_device
from crossent._losses._distill import (
    check_beta,
    check_temperature,
    check_temperature_range,
    distill_rows,
)
from crossent.fused._chunked import (
    RowScaled,
    WideBlocks,
    _agreed_chunk,
    _Chunk,
    _chunk_loop,
    _compute_dtype,
    _product_operands,
    _wanted,
    _workspace,
    chunk_logits,
)
from crossent.fused._function import (
    Formed,
    fused_backward,
    grad_needs,
    no_autocast,
    refuse_dual,
    stash_grads,
)
from crossent.fused._inputs import (
    as_one_op,
    check_chunk_size,
    check_fused_ignore_index,
    check_head,
    check_shift,
    clears_skip_mark,
    flat,
    rows_2d,
    unshift,
)

__all__ = ["linear_distillation_loss"]

#: Row blocks per chunk for :func:`distill_rows`' temporaries (four arrays per block).
_SUB_BLOCKS = 16
#: Work arrays :func:`distill_rows` takes per row block (it works in place in the chunk): four
#: for its formulas, two for the logits its close rows are computed again from.
_BLOCK_TEMPS = 6


@dataclass(frozen=True)
class DistillOptions:
    """Checked, hashable options of one :func:`linear_distillation_loss` call."""

    beta: float
    temperature: float
    reduction: str
    chunk_size: int | None


class _DistillResult(NamedTuple):
    loss: torch.Tensor
    grad_hidden: torch.Tensor | RowScaled | None
    grad_weight: torch.Tensor | WideBlocks | None
    grad_bias: torch.Tensor | None


def _chunked_distill(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    counted: torch.Tensor,
    opts: DistillOptions,
    *,
    compute_grad: bool | tuple[bool, bool, bool],
    row_scale: torch.Tensor | None = None,
) -> _DistillResult:
    """Loss (reduced, or per row for ``"none"``) and the student's gradients, 2-d inputs.

    `teacher` is ``(teacher_hidden, teacher_weight, teacher_bias)``, constants;
    `counted` ``(N,)`` bool marks the rows that count. Gradients are those of the
    returned loss, each row times `row_scale` (backward of ``"none"``).
    """
    n_total = hidden.shape[0]
    v = weight.shape[0]
    want = _wanted(compute_grad, bias)
    any_grad = any(want)
    weight, bias = _product_operands(hidden, weight, bias)
    t_hidden, t_weight, t_bias = teacher
    t_weight, t_bias = _product_operands(t_hidden, t_weight, t_bias)
    cdt = _compute_dtype(weight.dtype)
    check_temperature_range(opts.temperature, cdt, xp=torch)
    # the teacher's product runs in its own dtype; its logits are copied to the student's
    # compute dtype when they differ (bfloat16 teacher, or a float64 one and a float32 student)
    t_low = t_weight.dtype != cdt
    device = hidden.device
    rows_all = torch.nonzero(counted).reshape(-1)
    n_counted = int(rows_all.numel())
    inv_denom = 1.0
    if opts.reduction == "mean":
        inv_denom = 1.0 / n_counted if n_counted else 0.0
    loss_rows = torch.zeros((n_total,), dtype=cdt, device=device)
    chunk = _agreed_chunk(
        opts.chunk_size,
        n_counted,
        v,
        buffers=2.0 + (t_weight.itemsize / 4 if t_low else 0.0) + _BLOCK_TEMPS / _SUB_BLOCKS,
        low_precision=cdt != weight.dtype,
        reduce_max=None,
        device=device,
    )
    t_buf_all = _workspace("teacher", (chunk, v), cdt, device) if n_counted else None
    t_low_all = (
        _workspace("teacher_low", (chunk, v), t_weight.dtype, device)
        if t_low and n_counted
        else None
    )
    t_w_t = t_weight.t()
    xp = array_namespace(loss_rows)
    step = max(1, -(-chunk // _SUB_BLOCKS))  # rows per block
    work_all = (
        _workspace("distill_rows", (_BLOCK_TEMPS * step, v), cdt, device) if n_counted else None
    )

    def body(buf: torch.Tensor, c: _Chunk) -> bool:
        n = c.stop - c.start
        assert t_buf_all is not None
        t_buf = t_buf_all[:n]
        chunk_logits(
            t_hidden,
            t_w_t,
            t_bias,
            c,
            out=t_buf,
            low=t_low_all[:n] if t_low_all is not None else None,
        )
        r: float | torch.Tensor = inv_denom  # each row's gradient factor
        if any_grad and row_scale is not None:
            r = row_scale[c.rows].to(cdt) * inv_denom
        assert work_all is not None
        for i in range(0, n, step):
            j = min(i + step, n)
            block = buf[i:j]
            loss, g = distill_rows(
                block,
                t_buf[i:j],
                beta=opts.beta,
                temperature=opts.temperature,
                grad=any_grad,
                xp=xp,
                scale=r if isinstance(r, float) else r[i:j],
                work=work_all[: _BLOCK_TEMPS * (j - i)].view(_BLOCK_TEMPS, j - i, v),
                # the gradient is left in `block` ...
            )
            loss_rows[c.rows[i:j]] = loss
            if g is not None and g.data_ptr() != block.data_ptr():
                block.copy_(g)  # ... unless the array-API path ran (under tracing)
        return any_grad

    with no_autocast(hidden):
        grad_h, grad_w, grad_b = _chunk_loop(
            hidden, weight, bias, rows_all, chunk=chunk, want=want if any_grad else None,
            body=body, hidden_grad="round" if row_scale is not None else "stash",
        )  # fmt: skip
    loss = loss_rows if opts.reduction == "none" else loss_rows.sum() * inv_denom
    return _DistillResult(loss, grad_h, grad_w, grad_b)


class _LinearDistillFunction(torch.autograd.Function):
    """The student's loss; gradients formed in forward (``"mean"``/``"sum"``) or backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        counted: torch.Tensor,
        opts: DistillOptions,
    ) -> torch.Tensor:
        needs = grad_needs(ctx, bias)
        eager = opts.reduction != "none"
        res = _chunked_distill(
            hidden, weight, bias, teacher, counted, opts, compute_grad=needs if eager else False
        )
        ctx.opts, ctx.needs = opts, needs
        stash_grads(ctx, (res.grad_hidden, res.grad_weight, res.grad_bias) if eager else None)
        # the teacher too: backward may recompute with it, and a teacher changed in place
        # since (an EMA update, a reused buffer) must be an error, not another gradient
        ctx.save_for_backward(hidden, weight, bias, counted, *teacher)
        return res.loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, counted, t_hidden, t_weight, t_bias = ctx.saved_tensors

        def recompute(row_scale: torch.Tensor | None) -> Formed:
            res = _chunked_distill(
                hidden, weight, bias, (t_hidden, t_weight, t_bias), counted, ctx.opts,
                compute_grad=ctx.needs, row_scale=row_scale,
            )  # fmt: skip
            return res.grad_hidden, res.grad_weight, res.grad_bias

        grads = fused_backward(
            ctx,
            "linear_distillation_loss",
            grad_loss,
            recompute,
            hidden=hidden,
            weight=weight,
            bias=bias,
        )
        return *grads, None, None, None


@clears_skip_mark
def linear_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Distillation loss of a student head against a teacher head, holding neither's whole logits.

    Equals ``crossent.distillation_loss(hidden @ weight.T + bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, beta=beta,
    temperature=temperature, target=target, ...)`` — the generalized
    Jensen–Shannon divergence (β = 0: forward KL(teacher‖student), β = 1: reverse
    KL(student‖teacher)) — with gradients for the student's `hidden`, `weight`
    and `bias` only. Both models' logits are computed chunk by chunk.

    Parameters
    ----------
    hidden : Tensor, shape (..., d)
        The student's hidden states (``(..., T, d)`` with `shift`).
    weight : Tensor, shape (V, d)
        The student's output projection.
    teacher_hidden : Tensor, shape (..., d_t)
        The teacher's hidden states for the same positions (its hidden size may differ).
    teacher_weight : Tensor, shape (V, d_t)
        The teacher's output projection, over the same vocabulary. The teacher's
        dtypes may differ from the student's: its products run in its own dtype,
        the loss in the student's compute dtype.
    target : Tensor of int, shape (...), optional
        Only a mask: positions equal to `ignore_index` add nothing and do not
        count in the mean. None counts every position.
    bias, teacher_bias : Tensor, shape (V,), optional
        The heads' biases.
    beta : float, default 0.5
        Mixture weight β in [0, 1].
    temperature : float, default 1.0
        Both models' logits are divided by it (no :math:`T^2` factor); positive.
    ignore_index : int, default -100
        See `target`.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the counted positions (0 when none counts).
    shift : bool, default False
        Compare positions 0 … T−2 of both models, masked by ``target[..., 1:]``
        (causal LM); ``"none"`` then returns shape ``(..., T - 1)``.
    chunk_size : int, optional
        Tokens per chunk; None picks one from a budget (64 MiB on the CPU,
        1 GiB on a GPU) for both models' chunk buffers and the row
        formula's temporaries.

    Returns
    -------
    Tensor
        float32 (float64 for float64 student operands): 0-d, or per position for ``"none"``.

    Raises
    ------
    TypeError
        Non-tensor or non-floating arguments, non-integer `target`, bad option types.
    ValueError
        Mismatched vocabularies, hidden sizes, batch shapes or devices;
        `beta` outside [0, 1]; ``temperature <= 0``.

    Notes
    -----
    Per chunk: student logits :math:`s` (one product), teacher logits :math:`t`
    (one product, no gradient), then on blocks of rows the loss and
    :math:`\partial L/\partial s` of :func:`crossent.distillation_loss`'s row
    formula, then :math:`\nabla_h = G W` and :math:`\nabla_W \mathrel{+}= G^\top h`.
    ``"mean"``/``"sum"`` do all four products in forward; ``"none"`` does two in
    forward and recomputes in backward. The teacher's tensors are detached.
    Higher-order gradients are not supported: a backward with ``create_graph=True`` raises.
    Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``) the gradients
    are recomputed in backward, and ``vmap`` runs one chunked call per sample.
    Under ``torch.compile`` (``fullgraph=True`` too) the chunk loop runs as one
    opaque custom op (``crossent::linear_distill``).

    Examples
    --------
    >>> import torch
    >>> import crossent as ce
    >>> from crossent.fused import linear_distillation_loss
    >>> _ = torch.manual_seed(0)
    >>> h, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4)
    >>> th, tw = torch.randn(6, 8), torch.randn(10, 8)
    >>> loss = linear_distillation_loss(h, w, th, tw, beta=0.0, temperature=2.0)
    >>> ref = ce.distillation_loss(h @ w.T, th @ tw.T, beta=0.0, temperature=2.0)
    >>> bool(torch.allclose(loss, ref))
    True
    >>> loss.backward()
    >>> h.grad.shape
    torch.Size([6, 4])
    """
    opts = DistillOptions(
        beta=check_beta(beta),
        temperature=check_temperature(temperature),
        reduction=check_reduction(reduction),
        chunk_size=check_chunk_size(chunk_size),
    )
    index = check_fused_ignore_index(ignore_index)
    shift = check_shift(shift)
    n_classes = check_head(hidden, weight, target, bias, shift=shift, target_optional=True)
    t_classes = check_head(
        teacher_hidden,
        teacher_weight,
        None,
        teacher_bias,
        shift=shift,
        names=("teacher_hidden", "teacher_weight", "target", "teacher_bias"),
        target_optional=True,
    )
    if t_classes != n_classes:
        msg = (
            f"`teacher_weight` has {t_classes} classes but `weight` has {n_classes}; the "
            "student and the teacher must share the vocabulary (same rows, same order)."
        )
        raise ValueError(msg)
    batch = tuple(hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != batch:
        msg = (
            f"`teacher_hidden` must have the positions of `hidden`, shape {batch} + (d_t,); "
            f"got {tuple(teacher_hidden.shape)}."
        )
        raise ValueError(msg)
    check_same_device(hidden=hidden, teacher_hidden=teacher_hidden)
    mask = (
        torch.ones(batch, dtype=torch.bool, device=hidden.device)
        if target is None
        else not_ignored(target, index, xp=torch)
    )
    if shift:
        mask = torch.cat((mask[..., 1:], torch.zeros_like(mask[..., :1])), dim=-1)
    counted = flat(mask)
    h2 = rows_2d(hidden)
    teacher = (
        rows_2d(teacher_hidden.detach()),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    loss: torch.Tensor
    if as_one_op(hidden):  # one opaque op (the chunk loop depends on values)
        from crossent.fused._ops import linear_distill_compiled

        loss = linear_distill_compiled(h2, weight, bias, teacher, counted, opts)
    else:
        refuse_dual("linear_distillation_loss", h2, weight, bias)
        if needs_grad:
            loss = _LinearDistillFunction.apply(h2, weight, bias, teacher, counted, opts)
        else:
            with torch.no_grad():
                loss = _chunked_distill(
                    h2, weight, bias, teacher, counted, opts, compute_grad=False
                ).loss
    if opts.reduction == "none":
        loss = unshift(loss.reshape(batch), shift=shift)
    return loss
