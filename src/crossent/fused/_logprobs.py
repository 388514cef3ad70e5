r"""Fused per-token log-probabilities and entropy of ``hidden @ weight.T + bias`` (RL, PPO, GRPO).

The chunk loop of :mod:`crossent.fused._chunked` computes each chunk's logits;
the row statistics here turn them into :math:`\log p_y` and the entropy, and —
in the backward pass, which recomputes the chunk — into the logits gradient for
any upstream gradients of both outputs. With a
:class:`~crossent.fused._function.VocabShard` the same code runs one slice of a
vocabulary-parallel head.

For a row with logits :math:`x` (soft-capped :math:`c\tanh(x/c)` first when
asked), :math:`u = x'/T`, :math:`\ell = \operatorname{lse}(u)`, :math:`p = e^{u - \ell}`:

.. math::

    \log p_y = u_y - \ell, \qquad H = \ell - \sum_k p_k u_k = -\sum_k p_k \log p_k,

    \frac{\partial (g_y \log p_y + g_H H)}{\partial u_k}
        = g_y([k = y] - p_k) - g_H\, p_k (\log p_k + H),

times :math:`(1 - \tanh^2(x_k/c)) / T`. Across vocabulary slices (or within one,
:math:`m_r = \ell_r`, the slice's own log-sum-exp) each slice sends
:math:`(e^{\delta_r},\ [y \in r](u_y - m_r + \delta_r),\ e^{\delta_r}(t_r + \delta_r))`
with :math:`\delta_r = \ell_r - \max_r \ell_r \le 0` and
:math:`t_r = \sum_{k \in r} e^{u_k - \ell_r}(u_k - \ell_r) \le 0`; their sums
:math:`s, d, \tau` give :math:`\ell = m + \log s`, :math:`\log p_y = d - \log s`
and :math:`H = \log s - \tau / s` — both terms :math:`\ge 0`, no cancellation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from crossent._losses._distill import check_temperature_range
from crossent.fused._chunked import (
    RowScaled,
    WideBlocks,
    _agreed_chunk,
    _Chunk,
    _chunk_loop,
    _compute_dtype,
    _counted_rows,
    _product_operands,
    _row_stats_torch,
    _wanted,
    _workspace,
)
from crossent.fused._function import (
    Formed,
    VocabShard,
    fused_backward,
    grad_needs,
    no_autocast,
    refuse_dual,
    refuse_func_shard,
    sharded_name,
)

__all__ = ["LogProbOptions", "run_log_probs"]

#: Row blocks per chunk for the element-wise passes (one work buffer of one block).
_SUB_BLOCKS = 8


@dataclass(frozen=True)
class LogProbOptions:
    """Checked, hashable options of one :func:`crossent.fused.linear_log_probs` call."""

    ignore_index: int
    temperature: float
    softcap: float | None
    entropy: bool
    chunk_size: int | None


class _LogProbResult(NamedTuple):
    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    grad_hidden: torch.Tensor | RowScaled | None
    grad_weight: torch.Tensor | WideBlocks | None
    grad_bias: torch.Tensor | None


#: Log-probabilities below this are raised to it before the element-wise products: their
#: probability is 0 in every float format (float64's smallest is e^-745), so nothing changes
#: but 0 · (−inf) (a class ruled out with a −inf logit), which becomes 0 instead of NaN.
_LOG_FLOOR = -1.0e4

_HUGE_INV_T = 1e10
"""Above this 1 / temperature the entropy's gradient forms p log p before scaling it: the
floor -1e4 times g_H / T overflowed for T below about 3e-35 (float32), and times p = 0 it
was NaN (the true term is 0). Below it, that takes an upstream entropy gradient above
3e24."""


_LN2 = math.log(2.0)

_CACHE_BLOCK = 1 << 18
"""Elements a block of :func:`_exact_top_` reads at most (1 MiB of float32): its
probabilities stay in cache for the sums that follow."""


class _Top(NamedTuple):
    """Rows whose most probable class has :math:`p_* > 1/2`, that class, its exact log p."""

    rows: torch.Tensor
    star: torch.Tensor
    log_p: torch.Tensor


def _exact_top_(
    buf: torch.Tensor,
    work: torch.Tensor,
    candidates: torch.Tensor | None,
    p_log_p: torch.Tensor | None = None,
    column: torch.Tensor | None = None,
) -> _Top:
    r""":math:`\log p_*` of each row's most probable class made exact in `buf`.

    `buf` holds log-probabilities from PyTorch's ``log_softmax``, which forms
    :math:`\log p_* = -\log s` from the rounded :math:`s = 1 + \sum_{k \ne *} e^{u_k - u_*}`:
    an absolute error of :math:`\epsilon/2`, so that a confident row's
    :math:`\log p_* \approx -(1 - p_*)` was 1 % off at :math:`1 - p_* = 10^{-5}` in
    float32 (0 below :math:`6 \cdot 10^{-8}`), and its entropy and gradient with it.
    Here :math:`\log p_* = \operatorname{log1p}(-q)` with :math:`q = \sum_{k \ne *} p_k`, a
    sum of the row's other probabilities (each exact to its own rounding), where
    :math:`p_* > 1/2`; below, where :math:`|\log p_*| > \log 2`, PyTorch's value is
    already exact to a few ulps (and :math:`1 - q` would cancel), and NaN and −inf rows
    keep theirs. `buf` is read by blocks of `work`'s rows (the probabilities); on the CPU a
    block without `candidates` (a boolean mask holding every row that needs it; None: the
    rows whose largest log-probability exceeds :math:`-\log 2`, one ``amax`` per block) is
    skipped. With `p_log_p`, that gets :math:`\sum_k p_k \log p_k` per row in the same
    pass, `buf` raised to :data:`_LOG_FLOOR` first (0 · −inf). With `column` (one class per
    row, the target) the most probable class is not looked for: that column is made exact
    where its :math:`p > 1/2` (then it is the most probable), which is all that the target's
    log-probability and gradient need.
    """
    n = buf.shape[0]
    step = min(work.shape[0], max(1, _CACHE_BLOCK // max(1, buf.shape[1])))
    tops: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i in range(0, n, step):
        b = buf[i : i + step]
        if p_log_p is not None:
            b.clamp_(min=_LOG_FLOOR)
        if buf.is_cpu:  # a host read per block: free there
            wanted = b.amax(dim=1) > -_LN2 if candidates is None else candidates[i : i + step]
            if not bool(wanted.any()):
                if p_log_p is not None:
                    w = torch.exp(b, out=work[: b.shape[0]])
                    torch.sum(w.mul_(b), dim=1, out=p_log_p[i : i + step])
                continue
        s = _argmax_rows(b) if column is None else column[i : i + step, None]
        w = torch.exp(b, out=work[: b.shape[0]]).scatter_(1, s, 0.0)
        t = b.gather(1, s)
        # NaN and -inf rows (an empty slice) keep their value: the comparison is False
        t = torch.where(t > -_LN2, torch.log1p(w.sum(dim=1, keepdim=True).neg_()), t)
        b.scatter_(1, s, t)
        tops.append((i, s[:, 0], t[:, 0]))
        if p_log_p is not None:
            w.scatter_(1, s, t.exp())
            torch.sum(w.mul_(b), dim=1, out=p_log_p[i : i + step])
    if not tops:
        empty = torch.empty((0,), dtype=torch.long, device=buf.device)
        return _Top(empty, empty, buf.new_empty((0,)))
    rows = torch.cat([torch.arange(i, i + len(s), device=buf.device) for i, s, _ in tops])
    return _Top(rows, torch.cat([s for _, s, _ in tops]), torch.cat([t for _, _, t in tops]))


def _argmax_rows(b: torch.Tensor) -> torch.Tensor:
    """Each row's index of its maximum, shape ``(n, 1)``; NumPy's vectorized ``argmax`` on the
    CPU (0.2 ns an element, against 1.3 for PyTorch's ``max`` with indices)."""
    if b.is_cpu:
        return torch.from_numpy(b.numpy().argmax(axis=1)[:, None])
    return b.argmax(dim=1, keepdim=True)


def _exact_top_entry(
    grad: torch.Tensor,
    top: _Top,
    log_p: torch.Tensor,
    target_is_top: torch.Tensor,
    g_y: torch.Tensor,
    g_h: torch.Tensor | None,
    ent: torch.Tensor | None,
    inv_t: float,
) -> None:
    r"""Writes the gradient's entry of the most probable class of `top`'s rows in closed form.

    :math:`g_y([* = y] - p_*) - g_H p_* (\log p_* + H)`, times `inv_t`, with
    :math:`1 - p_* = -\operatorname{expm1}(\log p_*)` (`log_p`, per row of `top`): the
    element-wise pass forms :math:`g_y - g_y p_*`, which cancels for a confident row whose
    target is :math:`*` (the entropy's :math:`\log p_* + H` is a sum of terms of one size:
    exact once :math:`\log p_*` is, :func:`_exact_top_`). `g_y`, `g_h`, `ent` are per row
    of the chunk.
    """
    rows = top.rows
    p = log_p.exp()
    g = g_y[rows]
    term = g * torch.where(target_is_top, torch.expm1(log_p).neg_(), p.neg())
    if g_h is not None and ent is not None:
        term = term - g_h[rows] * p * (log_p.clamp(min=_LOG_FLOOR) + ent[rows])
    grad.index_put_((rows, top.star), term.mul_(inv_t))


def _chunked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogProbOptions,
    *,
    compute_grad: bool | tuple[bool, bool, bool],
    grad_log_probs: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    shard: VocabShard | None = None,
) -> _LogProbResult:
    """Log-probabilities (and entropy) of 2-d `hidden`, 1-d `target`; gradients when asked.

    The gradients are those of ``Σ_i grad_log_probs_i log p_i + grad_entropy_i H_i``
    (the upstream gradients, shape ``(N,)``; None means 0). Ignored rows give 0.
    `entropy`, the ``(N,)`` entropy a forward pass returned, spares the backward
    pass its recomputation (it is then returned as given).
    """
    n_total = hidden.shape[0]
    v_local = weight.shape[0]
    want = _wanted(compute_grad, bias)
    any_grad = any(want)
    weight, bias = _product_operands(hidden, weight, bias)
    cdt = _compute_dtype(weight.dtype)
    check_temperature_range(opts.temperature, cdt, xp=torch)
    device = hidden.device
    rows_all, y_all = _counted_rows(target, opts.ignore_index)
    vocab_start = 0 if shard is None else shard.vocab_start
    lp_rows = torch.zeros((n_total,), dtype=cdt, device=device)
    ent_rows = None
    if opts.entropy:
        ent_rows = torch.zeros((n_total,), dtype=cdt, device=device) if entropy is None else entropy
    keep_slope = opts.softcap is not None and any_grad
    chunk = _agreed_chunk(
        opts.chunk_size,
        int(rows_all.numel()),
        v_local,
        buffers=1.0 + (1.0 if keep_slope else 0.0) + 1.0 / _SUB_BLOCKS,
        low_precision=cdt != weight.dtype,
        reduce_max=None if shard is None else shard.reduce_max,
        device=device,
    )
    slope_all = (
        _workspace("slope", (chunk, v_local), cdt, device)
        if keep_slope and rows_all.numel()
        else None
    )
    step = max(1, -(-chunk // _SUB_BLOCKS))  # rows per block of the element-wise passes
    work_all = _workspace("log_probs_rows", (step, v_local), cdt, device)
    inv_t = 1.0 / opts.temperature
    g_lp_all = None if grad_log_probs is None else grad_log_probs.to(cdt)
    g_h_all = None if (grad_entropy is None or not opts.entropy) else grad_entropy.to(cdt)

    def body(buf: torch.Tensor, c: _Chunk) -> bool:
        n = c.stop - c.start
        y_loc = y_all[c.start : c.stop] - vocab_start
        owned = (y_loc >= 0) & (y_loc < v_local)
        y_loc = torch.where(owned, y_loc, 0)
        slope_buf = slope_all[:n] if slope_all is not None else None
        lse_loc, ref, _, d_loc = _row_stats_torch(
            buf, slope_buf, y_loc, None, softcap=opts.softcap, smoothing=False, scale=inv_t,
            need_lse=shard is not None,
        )  # fmt: skip
        t_loc = None  # sum_k p_k log p_k over the slice (not needed when the entropy is given)
        if opts.entropy and entropy is None:
            t_loc = torch.empty_like(lse_loc)
        # the rows whose p_* > 1/2 matters: any, where the entropy or its gradient is formed;
        # else those whose target has it (the others' log p_y and gradient are exact)
        candidates = column = None
        if t_loc is None and not (any_grad and g_h_all is not None):
            candidates, column = owned & (d_loc > -_LN2), y_loc
        top = _exact_top_(buf, work_all, candidates, p_log_p=t_loc, column=column)
        hit = owned[top.rows] & (y_loc[top.rows] == top.star)
        d_loc[top.rows] = torch.where(hit, top.log_p, d_loc[top.rows])
        d_loc = torch.where(owned, d_loc, 0.0)
        shift = None  # m_r - lse per row (0 in a single process)
        if shard is not None:
            if ref is None:
                delta = lse_loc - shard.reduce_max(lse_loc.clone())
            else:  # tiny T: lse_r = ref_r / T + lse_loc overflows; relative to max_r ref_r / T
                # (a slice of -inf logits holds no mass: its stand-in ref of 0 must not be the
                # maximum; it was, where every logit of the row is negative: log p = +inf)
                ref = torch.where(lse_loc == -math.inf, -math.inf, ref)
                delta = (ref - shard.reduce_max(ref.clone())).mul_(inv_t).add_(lse_loc)
            e = torch.exp(delta)
            peak = delta == 0  # the slices of the row's largest log-sum-exp: e = 1
            cols = [
                torch.where(peak, 0.0, e),
                peak.to(e.dtype),
                torch.where(owned, d_loc + delta, 0),
            ]
            if t_loc is not None:  # 0 for a slice of -inf logits (e = 0, delta = -inf)
                cols.append(torch.where(e > 0, e * (t_loc + delta), 0.0))
            packed = shard.reduce_sum(torch.stack(cols, dim=1))
            rest, count = packed[:, 0], packed[:, 1]
            # log s = log1p(s - 1), s - 1 = rest + (count - 1) exact: log(s) rounded a confident
            # row's log p_* at 1, as log_softmax does (see _exact_top_); count is 0 only at a
            # tiny temperature, where delta is relative to the slices' largest raw logit
            log_s = torch.where(count > 0, torch.log1p(rest + (count - 1.0)), torch.log(rest))
            log_p_y = packed[:, 2] - log_s
            ent = log_s - packed[:, 3] / (rest + count) if t_loc is not None else None
            shift = delta - log_s
        else:
            log_p_y = d_loc
            ent = -t_loc if t_loc is not None else None
        lp_rows[c.rows] = log_p_y
        if ent is not None and ent_rows is not None:
            ent_rows[c.rows] = ent
        elif ent_rows is not None:
            ent = ent_rows[c.rows]
        if not any_grad:
            return False

        # inv_t · d/du of g_y log p_y + g_H H, in place: buf holds u - lse_r
        g_y = g_lp_all[c.rows] if g_lp_all is not None else torch.zeros_like(log_p_y)
        if shift is not None:
            buf.add_(shift[:, None])  # log p
        g_h = None
        if g_h_all is not None and ent is not None:
            # -inv_t p (g_y + g_H (log p + H)) = p * (a + b log p), a and b per row
            g_h = g_h_all[c.rows]
            a = (g_y + g_h * ent).mul_(-inv_t)[:, None]
            b_coef = (g_h * -inv_t)[:, None]
            for i in range(0, n, step):
                b = buf[i : i + step].clamp_(min=_LOG_FLOOR)
                p = torch.exp(b, out=work_all[: b.shape[0]])
                if inv_t > _HUGE_INV_T:  # p log p first (one pass more; see _HUGE_INV_T)
                    b.mul_(p).mul_(b_coef[i : i + step]).addcmul_(a[i : i + step], p)
                else:
                    torch.addcmul(a[i : i + step], b, b_coef[i : i + step], out=b).mul_(p)
        else:
            buf.exp_().mul_((g_y * -inv_t)[:, None])
        idx = torch.arange(n, device=device)
        buf.index_put_((idx, y_loc), g_y * owned * inv_t, accumulate=True)
        lp_top = top.log_p if shift is None else top.log_p + shift[top.rows]
        _exact_top_entry(buf, top, lp_top, hit, g_y, g_h, ent, inv_t)
        if slope_buf is not None:
            buf.mul_(slope_buf)
        return True

    with no_autocast(hidden):
        grad_h, grad_w, grad_b = _chunk_loop(
            hidden, weight, bias, rows_all, chunk=chunk, want=want if any_grad else None,
            body=body, hidden_grad="round" if shard is None else "stash",
            reduce_hidden=None if shard is None else shard.reduce_sum,
        )  # fmt: skip
    return _LogProbResult(lp_rows, ent_rows, grad_h, grad_w, grad_b)


class _LinearLogProbsFunction(torch.autograd.Function):
    """(log_probs, entropy) of 2-d hidden and 1-d target; backward recomputes the chunks."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        opts: LogProbOptions,
        shard: VocabShard | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        res = _chunked_log_probs(
            hidden, weight, target, bias, opts, compute_grad=False, shard=shard
        )
        ctx.opts, ctx.shard = opts, shard
        ctx.needs = grad_needs(ctx, bias)
        ctx.save_for_backward(hidden, weight, bias, target)
        ent = res.entropy
        # a copy: backward then need not recompute it, and the caller may change the output
        ctx.entropy = None if ent is None else ent.detach().clone()
        if ent is None:
            ent = torch.zeros_like(res.log_probs)
            ctx.mark_non_differentiable(ent)
        return res.log_probs, ent

    @staticmethod
    def backward(ctx: Any, grad_lp: torch.Tensor, grad_ent: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, target = ctx.saved_tensors

        def recompute(_: torch.Tensor | None) -> Formed:  # reads both upstream gradients
            res = _chunked_log_probs(
                hidden, weight, target, bias, ctx.opts, compute_grad=ctx.needs,
                grad_log_probs=grad_lp, grad_entropy=grad_ent, entropy=ctx.entropy,
                shard=ctx.shard,
            )  # fmt: skip
            return res.grad_hidden, res.grad_weight, res.grad_bias

        grads = fused_backward(
            ctx,
            "linear_log_probs",
            grad_lp,
            recompute,
            hidden=hidden,
            weight=weight,
            bias=bias,
            shard=ctx.shard,
        )
        return *grads, None, None, None


def run_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogProbOptions,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_probs, entropy or None)`` of 2-d `hidden`, 1-d `target` (autograd when needed)."""
    refuse_func_shard(shard)
    refuse_dual(sharded_name("linear_log_probs", shard), hidden, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        with torch.no_grad():
            res = _chunked_log_probs(
                hidden, weight, target, bias, opts, compute_grad=False, shard=shard
            )
        return res.log_probs, res.entropy
    lp, ent = _LinearLogProbsFunction.apply(hidden, weight, bias, target, opts, shard)
    return lp, (ent if opts.entropy else None)
