r"""Pure-PyTorch chunked linear cross-entropy: the CPU path, the fallback, and the shared core.

:func:`_chunked_linear_ce` walks the counted (non-ignored) tokens in chunks. For
each chunk it computes the logits into one preallocated buffer, reduces each row
to a few statistics (running max, sum of exponentials, target logit, smoothing
sum), turns the buffer into :math:`\partial L / \partial z` in place and feeds it
to two matrix products that fill ``grad_hidden`` and accumulate ``grad_weight``.
Only one chunk of logits is ever alive.

The same loop serves the vocabulary-parallel loss (:mod:`crossent.distributed`):
``weight`` may be a contiguous slice of the vocabulary, and two hooks combine the
per-row statistics of all slices before the loss and the gradient are formed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = [
    "_ChunkedResult",
    "_auto_chunk_size",
    "_chunked_linear_ce",
    "clear_workspace",
    "product_dtype",
    "result_dtype",
]

Hook = Callable[["torch.Tensor"], "torch.Tensor | None"]

#: Budget for the per-chunk work buffers when ``chunk_size=None`` (bytes). 64 MiB keeps the
#: extra memory below torch's chunked ``F.linear_cross_entropy`` (N=2048, d=512, V=32000) and
#: is no slower on CPU than 256 MiB (benchmarks/fused.py).
CHUNK_BUDGET_BYTES = 64 * 2**20
#: The same budget on GPUs. Each chunk costs a few kernel launches per matrix product and
#: row pass, so small chunks leave an H200 idle: at N=8192, d=4096, V=128256 in bfloat16 a
#: 64 MiB budget took 554 ms per step against 56 ms for 1 GiB (Liger Kernel: 55 ms);
#: ``python -m benchmarks.gpu_check`` measures it.
CUDA_CHUNK_BUDGET_BYTES = 256 * 2**20


def chunk_budget(device: torch.device) -> int:
    """The automatic chunk's buffer budget in bytes on `device` (CPU or GPU)."""
    return CHUNK_BUDGET_BYTES if device.type == "cpu" else CUDA_CHUNK_BUDGET_BYTES


#: Smallest automatic chunk, so the matrix products stay efficient.
MIN_AUTO_CHUNK = 16


class _ChunkedResult(NamedTuple):
    """What :func:`_chunked_linear_ce` returns.

    loss
        Compute dtype (float32 for float16/bfloat16 inputs, else the input dtype):
        0-d for ``"mean"``/``"sum"``, shape ``(N,)`` for ``"none"`` (0 at ignored rows).
    grad_hidden
        ``(N, d)`` in ``hidden.dtype``, or None. On a vocabulary slice this is the
        slice's contribution only; the caller sums it over ranks.
    grad_weight
        ``(V_local, d)``: float32 when ``weight`` is float16/bfloat16 (accumulated in
        float32), else ``weight.dtype``; or None.
    grad_bias
        ``(V_local,)`` with the same dtype rule, or None.
    lse
        ``(N,)`` per-row log-sum-exp of the (soft-capped) logits over the whole
        vocabulary, compute dtype; 0 at ignored rows.
    """

    loss: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    lse: torch.Tensor


def _apply_hook(hook: Hook | None, x: torch.Tensor) -> torch.Tensor:
    """Run an all-reduce hook that works in place or returns its result."""
    if hook is None:
        return x
    out = hook(x)
    return x if out is None else out


_WORKSPACE = threading.local()


def _workspace(
    slot: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A work buffer of `shape`; on CPU reused across calls (one per slot and thread).

    PyTorch's CPU allocator does not cache: every fresh buffer of this size is
    new pages from the OS, whose first-touch faults and release cost as much as
    several element-wise passes. The per-thread buffers are released by
    :func:`clear_workspace`. On other devices PyTorch's caching allocator already
    reuses memory, so a plain ``torch.empty`` is used.
    """
    import torch

    numel = shape[0] * shape[1]
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache: dict[tuple[str, torch.dtype], torch.Tensor] = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = cache.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        cache.pop((slot, dtype), None)  # free the old one first
        buf = torch.empty(numel, dtype=dtype, device=device)
        cache[(slot, dtype)] = buf
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Release this thread's cached CPU work buffers (see :func:`_workspace`)."""
    _WORKSPACE.__dict__.pop("bufs", None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _auto_chunk_size(
    n_rows: int,
    v_local: int,
    *,
    low_precision: bool,
    softcap: bool = False,
    buffers: float = 1.0,
    budget: int | None = None,
) -> int:
    """Rows per chunk so the chunk's work buffers fit in :data:`CHUNK_BUDGET_BYTES`.

    The buffers are `buffers` float32 (or float64) ``(chunk, V_local)`` buffers
    (the logits, plus whatever else the function keeps per chunk), a second one
    when `softcap` is set (for the tanh), and a half-size copy in the input dtype
    for float16/bfloat16 matrix products. The chunk is at least
    :data:`MIN_AUTO_CHUNK` rows and at most `n_rows`.
    """
    budget = CHUNK_BUDGET_BYTES if budget is None else budget
    extra = (1.0 if softcap else 0.0) + (0.5 if low_precision else 0.0)
    per_row = 4.0 * v_local * (buffers + extra)
    rows = int(budget // max(per_row, 1.0))
    return max(1, min(n_rows, max(rows, MIN_AUTO_CHUNK)))


def _chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    chunk_size: int | None,
    compute_grad: bool | tuple[bool, bool, bool],
    vocab_start: int = 0,
    vocab_size: int | None = None,
    reduce_max: Hook | None = None,
    reduce_sum: Hook | None = None,
    row_scale: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> _ChunkedResult:
    r"""Chunked sparse cross-entropy of ``hidden @ weight.T + bias`` and its gradients.

    Private core shared by :func:`crossent.fused.linear_cross_entropy` and the
    vocabulary-parallel loss. Arguments are trusted (the public functions check
    them); nothing the caller owns is written to.

    Parameters
    ----------
    hidden : Tensor, shape (N, d)
        Float16, bfloat16, float32 or float64.
    weight : Tensor, shape (V_local, d)
        Same dtype as `hidden`. Rows hold the global classes
        ``[vocab_start, vocab_start + V_local)``.
    target : Tensor of int, shape (N,)
        GLOBAL class indices in ``[0, vocab_size)`` or `ignore_index`.
    bias : Tensor, shape (V_local,), or None
        The local slice of the bias, same dtype as `weight`.
    class_weight : Tensor, shape (vocab_size,), or None
        The GLOBAL per-class weight vector (every rank passes the whole vector;
        the core slices ``[vocab_start, vocab_start + V_local)`` itself, and reads
        ``class_weight[target]`` locally, so the mean's denominator needs no
        communication).
    ignore_index, label_smoothing, z_loss, softcap, reduction
        As in :func:`crossent.fused.linear_cross_entropy`.
    chunk_size : int or None
        Counted rows per chunk; None picks one from a memory budget
        (:func:`_auto_chunk_size`). With hooks, the automatic choice is made the
        same on every rank (the smallest over ranks, through `reduce_max`).
    compute_grad : bool or (bool, bool, bool)
        Whether to compute the gradients of (hidden, weight, bias); one bool
        applies to all three. False gives the loss with a single matrix product.
    vocab_start : int
        Global index of ``weight[0]``.
    vocab_size : int or None
        The GLOBAL number of classes C (label smoothing's ε/C and the smoothing
        sum run over all C classes); None means ``V_local`` (single process).
    reduce_max, reduce_sum : callable or None
        All-reduce a small float tensor across the ranks that hold the other
        vocabulary slices (max, sum), in place or by returning the result.
        Called once each per chunk, in the same order on every rank; the tensors
        have shape ``(n,)`` (max) and ``(n, 3)`` (sum) for a chunk of n rows, plus
        one ``(1,)`` call to `reduce_max` up front when `chunk_size` is None.
        None means a single process.
    row_scale : Tensor, shape (N,), or None
        Multiplies each row's gradient (the upstream gradient of
        ``reduction="none"``, used by backward's recomputation). None means 1.
    use_triton : bool or None
        Use the Triton kernels for the row statistics and the in-place gradient;
        None means "when the tensors are on CUDA, not float64, and Triton imports".

    Returns
    -------
    _ChunkedResult
        ``(loss, grad_hidden, grad_weight, grad_bias, lse)``; see
        :class:`_ChunkedResult` for shapes and dtypes. Gradients are those of the
        returned loss (already divided by the mean's denominator, and multiplied
        by `row_scale`), ready to be scaled by a scalar upstream gradient.

    Notes
    -----
    For a counted row with logits :math:`z` (soft-capped, :math:`z = c\tanh(x/c)`),
    target :math:`y`, class weights :math:`w` (ones when None),
    :math:`W = \sum_k w_k`, smoothing :math:`\varepsilon` over :math:`C` classes
    and :math:`\ell = \operatorname{lse}(z) = m + \log s`,
    :math:`s = \sum_k e^{z_k - m}`:

    .. math::

        L = (1-\varepsilon) w_y (\log s + m - z_y)
            + \tfrac{\varepsilon}{C}\Big(W \log s - \sum_k w_k (z_k - m)\Big)
            + \zeta \ell^2

    (every term a sum of non-negative parts: no cancellation), and

    .. math::

        \frac{\partial L}{\partial z_k} = a\,p_k - (1-\varepsilon) w_y [k = y]
            - \tfrac{\varepsilon}{C} w_k,
        \qquad a = (1-\varepsilon) w_y + \tfrac{\varepsilon}{C} W + 2\zeta\ell,

    times :math:`1 - \tanh^2(x_k/c)` under a soft cap. ``"mean"`` divides by
    :math:`D = \sum_i w_{y_i}` over counted rows (0 when :math:`D = 0`).

    Across vocabulary slices each rank reduces its slice to
    :math:`(m_r, s_r, S_r = \sum_{k\in r} w_k(z_k - m_r), z_y - m_r)` about a
    per-row reference point :math:`m_r` (the slice's max in the Triton kernel, its
    log-sum-exp on the PyTorch path, where :math:`s_r = 1`); with
    :math:`m = \max_r m_r`, :math:`\delta_r = m_r - m \le 0`:
    :math:`s = \sum_r s_r e^{\delta_r}`, :math:`S = \sum_r (S_r + W_r\delta_r)`
    (both parts :math:`\le 0`) and the owner's :math:`z_y - m = (z_y - m_r) + \delta_r`.
    """
    import torch

    n_total = hidden.shape[0]
    v_local = weight.shape[0]
    n_classes = v_local if vocab_size is None else int(vocab_size)
    want = _wanted(compute_grad, bias)
    any_grad = any(want)

    weight, bias = _product_operands(hidden, weight, bias)
    device = hidden.device
    cdt = _compute_dtype(weight.dtype)
    eps = float(label_smoothing)
    zeta = float(z_loss)
    has_softcap = softcap is not None
    distributed = reduce_max is not None or reduce_sum is not None

    # Which rows count, and the mean's denominator (known before any chunk).
    rows_all, y_all = _counted_rows(target, ignore_index)
    n_counted = int(rows_all.numel())

    if class_weight is not None:
        cw_global = class_weight.to(cdt)
        cw_local = cw_global[vocab_start : vocab_start + v_local]
        w_sum = cw_global.sum()
        wy_all = cw_global[y_all]
        denom = wy_all.sum()
    else:
        cw_local = None
        w_sum = torch.tensor(float(n_classes), dtype=cdt, device=device)
        wy_all = None
        denom = torch.tensor(float(n_counted), dtype=cdt, device=device)
    if reduction == "mean":
        inv_denom = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)
    else:
        inv_denom = torch.ones((), dtype=cdt, device=device)

    loss_rows = torch.zeros((n_total,), dtype=cdt, device=device) if reduction == "none" else None
    loss_total = torch.zeros((), dtype=cdt, device=device)
    lse_rows = torch.zeros((n_total,), dtype=cdt, device=device)

    chunk = _agreed_chunk(
        chunk_size,
        n_counted,
        v_local,
        buffers=1.0 + (1.0 if has_softcap else 0.0),
        low_precision=cdt != weight.dtype,
        reduce_max=reduce_max,
        device=device,
    )
    triton_ops = _triton_ops(weight, use_triton)
    tanh_all = (
        _workspace("tanh", (chunk, v_local), cdt, device)
        if has_softcap and triton_ops is None and n_counted
        else None
    )

    def body(buf: torch.Tensor, c: _Chunk) -> bool:
        nonlocal loss_total
        n = c.stop - c.start
        y = y_all[c.start : c.stop]
        y_loc = y - vocab_start
        owned = (y_loc >= 0) & (y_loc < v_local)
        y_loc = torch.where(owned, y_loc, 0)

        # local row statistics relative to the local max
        if triton_ops is not None:
            m_loc, s_loc, sm_loc, d_loc = triton_ops.row_stats(
                buf, y_loc, cw_local, softcap=softcap, smoothing=eps > 0
            )
        else:
            tanh_buf = tanh_all[:n] if tanh_all is not None else None
            m_loc, s_loc, sm_loc, d_loc = _row_stats_torch(
                buf, tanh_buf, y_loc, cw_local, softcap=softcap, smoothing=eps > 0
            )
        d_loc = torch.where(owned, d_loc, 0.0)

        # combine the slices (single process: nothing to do)
        if distributed:
            m = _apply_hook(reduce_max, m_loc.clone())
            delta = m_loc - m
            w_loc_sum = cw_local.sum() if cw_local is not None else float(v_local)
            packed = torch.stack(
                (
                    s_loc * torch.exp(delta),
                    sm_loc + w_loc_sum * delta,
                    torch.where(owned, d_loc + delta, 0.0),
                ),
                dim=1,
            )
            packed = _apply_hook(reduce_sum, packed)
            s, sm, d_y = packed[:, 0], packed[:, 1], packed[:, 2]
        else:
            m, delta, s, sm, d_y = m_loc, None, s_loc, sm_loc, d_loc

        log_s = torch.log(s)
        lse = m + log_s
        lse_rows[c.rows] = lse
        wy = wy_all[c.start : c.stop] if wy_all is not None else None
        ce = log_s - d_y
        loss = (1.0 - eps) * (ce * wy if wy is not None else ce)
        if eps > 0:
            loss = loss + (eps / n_classes) * (w_sum * log_s - sm)
        if zeta > 0:
            loss = loss + zeta * lse * lse
        if loss_rows is not None:
            loss_rows[c.rows] = loss
        loss_total += loss.sum()

        if not any_grad:
            return False

        # d loss / d z, in place in buf
        r = inv_denom.expand(n)
        if row_scale is not None:
            r = r * row_scale[c.rows].to(cdt)
        b = (1.0 - eps) * (wy if wy is not None else torch.ones_like(lse))
        a = b + (eps / n_classes) * w_sum
        if zeta > 0:
            a = a + 2.0 * zeta * lse
        if triton_ops is not None:
            triton_ops.logits_grad_(
                buf,
                y_loc,
                owned,
                cw_local,
                lse,
                r * a,
                r * b,
                r * (eps / n_classes),
                softcap=softcap,
                smoothing=eps > 0,
            )
            return True
        buf.exp_()  # slice softmax
        coef = r * a / s
        if delta is not None:
            coef = coef * torch.exp(delta)
        buf.mul_(coef[:, None])
        idx = torch.arange(n, device=device)
        buf.index_put_((idx, y_loc), -(r * b * owned), accumulate=True)
        if eps > 0:
            if cw_local is not None:
                buf.addr_(r, cw_local, alpha=-(eps / n_classes))
            else:
                buf.sub_((r * (eps / n_classes))[:, None])
        if tanh_all is not None:
            t = tanh_all[:n]
            t.square_().neg_().add_(1.0)
            buf.mul_(t)
        return True

    grad_h, grad_w, grad_b = _chunk_loop(
        hidden, weight, bias, rows_all, chunk=chunk, want=want if any_grad else None, body=body
    )
    if loss_rows is not None:
        loss_out = loss_rows
    else:
        loss_out = loss_total * inv_denom if reduction == "mean" else loss_total
    return _ChunkedResult(loss_out, grad_h, grad_w, grad_b, lse_rows)


class _Chunk(NamedTuple):
    """One chunk of counted rows: positions ``[start, stop)`` of the counted rows.

    rows
        Their indices among all ``N`` rows (to scatter per-row results).
    compact
        Whether some rows are skipped (then `take` gathers, else it slices).
    first
        Whether this is the first chunk (accumulators are overwritten, not added to).
    """

    start: int
    stop: int
    rows: torch.Tensor
    compact: bool
    first: bool

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This chunk's rows of a per-row tensor `x` (shape ``(N, ...)``)."""
        return x.index_select(0, self.rows) if self.compact else x[self.start : self.stop]


def _wanted(compute_grad: bool | tuple[bool, bool, bool], bias: Any) -> tuple[bool, bool, bool]:
    """``(hidden, weight, bias)`` gradient flags; no bias gradient without a bias."""
    if isinstance(compute_grad, bool):
        want_h = want_w = want_b = compute_grad
    else:
        want_h, want_w, want_b = (bool(g) for g in compute_grad)
    return want_h, want_w, want_b and bias is not None


def product_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the matrix products run in: the promotion of the operands' dtypes.

    A float32 head with bfloat16 hidden states (a float32 master weight under
    autocast) gives float32 products: more accurate than autocast's bfloat16
    product, and it needs no copy of the weight, only of each chunk of hidden rows.
    """
    import torch

    present = [t.dtype for t in tensors if t is not None]
    out = present[0]
    for dt in present[1:]:
        out = torch.promote_types(out, dt)
    return out


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype of values the fused functions return: float32, or float64 for float64 operands."""
    return _compute_dtype(product_dtype(*tensors))


def _product_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight` and `bias` in the product dtype (hidden rows are cast chunk by chunk)."""
    dt = product_dtype(hidden, weight, bias)
    return weight.to(dt), (None if bias is None else bias.to(dt))


def _counted_rows(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the rows whose target is not `ignore_index`, and their (int64) targets."""
    import torch

    target = target.reshape(-1)
    rows = torch.nonzero(target != ignore_index).reshape(-1)
    return rows, target[rows].long()


def _agreed_chunk(
    chunk_size: int | None,
    n_rows: int,
    v_local: int,
    *,
    buffers: float,
    low_precision: bool,
    reduce_max: Hook | None,
    device: torch.device,
) -> int:
    """Rows per chunk: `chunk_size`, or the budget's choice (the smallest over ranks)."""
    import torch

    if chunk_size is not None:
        return max(1, min(int(chunk_size), n_rows))
    if n_rows == 0:
        return 1
    chunk = _auto_chunk_size(
        n_rows,
        v_local,
        low_precision=low_precision,
        softcap=False,
        buffers=buffers,
        budget=chunk_budget(device),
    )
    if reduce_max is not None:
        agreed = torch.tensor([-float(chunk)], dtype=torch.float32, device=device)
        chunk = int(-_apply_hook(reduce_max, agreed).item())
    return chunk


def chunk_logits(
    hidden: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    c: _Chunk,
    *,
    out: torch.Tensor,
    low: torch.Tensor | None,
) -> torch.Tensor:
    """The chunk's logits ``h_c @ w_t + bias`` into `out` (compute dtype); returns ``h_c``.

    ``h_c`` (the chunk's rows of `hidden`, in `w_t`'s dtype) is returned for the
    weight gradient. For float16/bfloat16 products the product goes to `low`
    (the product dtype) and is then copied to `out`.
    """
    import torch

    h_c = c.take(hidden)
    if h_c.dtype != w_t.dtype:
        h_c = h_c.to(w_t.dtype)
    dest = low if low is not None else out
    if bias is not None:
        torch.addmm(bias, h_c, w_t, out=dest)
    else:
        torch.mm(h_c, w_t, out=dest)
    if low is not None:
        out.copy_(low)
    return h_c


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows_all: torch.Tensor,
    *,
    chunk: int,
    want: tuple[bool, bool, bool] | None,
    body: Callable[[torch.Tensor, _Chunk], bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    r"""The one chunk loop of every fused function: logits in, gradient products out.

    For each chunk of the counted rows `rows_all` it computes the logits
    ``h_c @ weight.T + bias`` into a work buffer in the compute dtype (float32 for
    float16/bfloat16 products) and calls ``body(buf, chunk)``, which reads the
    logits, records its per-row values, and — when it returns True — has left
    :math:`G = \partial L / \partial z` (already scaled) in `buf`. The loop then
    forms :math:`\nabla_b \mathrel{+}= \sum_i G_i`, :math:`\nabla_h = G W` and
    :math:`\nabla_W \mathrel{+}= G^\top h_c`.

    `weight` and `bias` must already be in the product dtype
    (:func:`_product_operands`); rows of `hidden` are cast to it chunk by chunk.
    `want` gives the (hidden, weight, bias) gradients to form (None: none).
    Returns them: `grad_hidden` ``(N, d)`` in `hidden`'s dtype (zero at rows not
    in `rows_all`), `grad_weight` and `grad_bias` float32 for low-precision
    products (accumulated in float32), else in the product dtype.
    """
    import torch

    n_total, d = hidden.shape
    v_local = weight.shape[0]
    n_rows = int(rows_all.numel())
    compact = n_rows != n_total
    device = hidden.device
    mm_dtype = weight.dtype
    cdt = _compute_dtype(mm_dtype)
    low_precision = cdt != mm_dtype
    want_h, want_w, want_b = want if want is not None else (False, False, False)
    want_b = want_b and bias is not None

    acc_dtype = torch.float32 if low_precision else mm_dtype
    grad_h = None
    if want_h:
        grad_h = (torch.zeros if compact else torch.empty)(
            (n_total, d), dtype=hidden.dtype, device=device
        )
    # zeros only for an empty batch: otherwise the first chunk overwrites them (no fill pass)
    alloc = torch.zeros if n_rows == 0 else torch.empty
    grad_w = alloc((v_local, d), dtype=acc_dtype, device=device) if want_w else None
    grad_b = alloc((v_local,), dtype=acc_dtype, device=device) if want_b else None
    if n_rows == 0:
        return grad_h, grad_w, grad_b

    shape = (chunk, v_local)
    buf_all = _workspace("logits", shape, cdt, device)
    lp_all = _workspace("low", shape, mm_dtype, device) if low_precision else None
    w_t = weight.t()
    # vocabulary block for the float32-accumulated weight gradient of low precision inputs
    v_block = max(1, min(v_local, (chunk * v_local) // max(4 * d, 1))) if low_precision else 0

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        n = stop - start
        c = _Chunk(start, stop, rows_all[start:stop], compact, start == 0)
        buf = buf_all[:n]
        lp = lp_all[:n] if lp_all is not None else None
        h_c = chunk_logits(hidden, w_t, bias, c, out=buf, low=lp)

        if not body(buf, c) or want is None:
            continue

        if grad_b is not None:
            if c.first:
                torch.sum(buf, dim=0, out=grad_b)
            else:
                grad_b += buf.sum(0)
        g = buf
        if lp is not None:
            lp.copy_(buf)
            g = lp
        if grad_h is not None:
            if compact or grad_h.dtype != mm_dtype:
                gh = torch.mm(g, weight)
                if compact:
                    grad_h.index_copy_(0, c.rows, gh.to(grad_h.dtype))
                else:
                    grad_h[start:stop].copy_(gh)
            else:
                torch.mm(g, weight, out=grad_h[start:stop])
        if grad_w is not None:
            if lp is None:
                if c.first:
                    torch.mm(g.t(), h_c, out=grad_w)
                else:
                    torch.addmm(grad_w, g.t(), h_c, out=grad_w)
            else:
                _accumulate_weight_grad_f32(grad_w, buf, g, h_c, v_block=v_block, first=c.first)
    return grad_h, grad_w, grad_b


def _accumulate_weight_grad_f32(
    grad_w: torch.Tensor,
    g32: torch.Tensor,
    g_lp: torch.Tensor,
    h_c: torch.Tensor,
    *,
    v_block: int,
    first: bool,
) -> None:
    """``grad_w += G.T @ h_c`` in float32 for float16/bfloat16 inputs.

    On CUDA: one low-precision matrix product accumulated in float32 in place
    (``torch.addmm(..., out_dtype=torch.float32, out=grad_w)``); on a torch
    without that overload, products with float32 output in vocabulary blocks
    (`v_block` rows) so the temporary stays small. Elsewhere (no such kernel on
    CPU): a float32 product of the float32 gradient buffer and the upcast chunk
    of `hidden`, accumulated in place (`first` overwrites `grad_w` instead).
    Rounding each chunk's partial sum to the input dtype would make the weight
    gradient less accurate than PyTorch's unfused one.
    """
    import torch

    if g_lp.device.type == "cuda":  # pragma: no cover - needs a GPU
        try:  # one low-precision product accumulated in float32 in place: no temporary
            if first:
                torch.mm(g_lp.t(), h_c, out_dtype=torch.float32, out=grad_w)
            else:
                torch.addmm(grad_w, g_lp.t(), h_c, out_dtype=torch.float32, out=grad_w)
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: blocks
            if first:
                grad_w.zero_()
            try:
                for v0 in range(0, grad_w.shape[0], v_block):
                    v1 = min(v0 + v_block, grad_w.shape[0])
                    grad_w[v0:v1] += torch.mm(g_lp[:, v0:v1].t(), h_c, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # no kernel at all
                pass
            else:
                return
        else:
            return
    h32 = h_c.to(torch.float32)
    if first:
        torch.mm(g32.t(), h32, out=grad_w)
    else:
        torch.addmm(grad_w, g32.t(), h32, out=grad_w)


def _row_stats_torch(
    buf: torch.Tensor,
    tanh_buf: torch.Tensor | None,
    y_loc: torch.Tensor,
    cw_local: torch.Tensor | None,
    *,
    softcap: float | None,
    smoothing: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local row statistics; leaves the slice's log-softmax ``z - lse_loc`` in `buf`.

    The reference point of the statistics is the slice's own log-sum-exp
    ``lse_loc`` (one fused, cache-friendly ``log_softmax`` pass), so it returns
    ``(lse_loc, 1, S_loc, z_y - lse_loc)`` with ``S_loc = Σ_k w_k (z_k - lse_loc)``
    (≤ 0; 0 when not `smoothing`). ``lse_loc = z_j - (z_j - lse_loc)`` is recovered
    at the target column (any column would do; the caller masks targets owned by
    other slices). The logits are ``z = scale · softcap · tanh(x / softcap)``
    (``scale`` is 1 / temperature); with `tanh_buf`, tanh(x/c) is kept there for
    the chain rule.
    """
    import torch

    if softcap is not None:
        buf.div_(softcap).tanh_()
        if tanh_buf is not None:
            tanh_buf.copy_(buf)
        buf.mul_(softcap * scale)
    elif scale != 1.0:
        buf.mul_(scale)
    col = y_loc[:, None]
    z_y = buf.gather(1, col).squeeze(1)
    torch._log_softmax(buf, 1, False, out=buf)
    d_loc = buf.gather(1, col).squeeze(1)
    lse_loc = z_y - d_loc
    if smoothing:
        sm_loc = torch.mv(buf, cw_local) if cw_local is not None else buf.sum(dim=1)
    else:
        sm_loc = torch.zeros_like(lse_loc)
    return lse_loc, torch.ones_like(lse_loc), sm_loc, d_loc


def _triton_ops(operand: torch.Tensor, use_triton: bool | None) -> Any:
    """The Triton row-statistics / gradient ops, or None for the pure-PyTorch path.

    `operand` is a tensor in the product dtype, on the device of the computation.
    """
    import torch

    if use_triton is False:
        return None
    if use_triton is None and (operand.device.type != "cuda" or operand.dtype == torch.float64):
        # float64 stays on the PyTorch path: Triton rounds float literals (the tanh
        # series' coefficients) to float32, which would cost float64 accuracy.
        return None
    try:
        import crossent.fused._launch as _launch
    except ImportError:  # pragma: no cover - triton missing
        if use_triton:
            raise
        return None
    if not _launch.triton_available():
        if use_triton:
            msg = "`use_triton=True` but Triton cannot be imported; install crossent[triton]."
            raise ImportError(msg)
        return None
    return _launch
