r"""Pure-PyTorch chunked linear cross-entropy: the CPU path, the fallback, and the shared core.

:func:`_chunked_linear_ce` walks the counted (non-ignored) tokens in chunks:
:func:`_plan` (counted rows, labels, the mean's scale), then for each chunk the
logits in one preallocated buffer (:func:`chunk_logits`), the row statistics of
:mod:`crossent._losses._rows` (:func:`chunk_statistics`: max, sum of
exponentials, weighted sum, target logit), the loss (:func:`chunk_losses`,
``_rows.row_loss``), :math:`\partial L / \partial z` in place
(:func:`logits_grad_`, ``_rows.coefficients``), and two matrix products that fill
``grad_hidden`` and accumulate ``grad_weight`` (:func:`_chunk_loop`). Only one
chunk of logits is ever alive. The formula is written once, in ``_rows``.

The same core serves the vocabulary-parallel losses (:mod:`crossent.distributed`):
``weight`` may be a contiguous slice of the vocabulary (a :class:`VocabShard`),
whose statistics are merged over the ranks as ``_rows.combine`` merges slices
(``_rows.all_reduce``), and ``vocab_parallel_cross_entropy`` feeds it a slice of
logits directly (:class:`SliceSpec`, :func:`slice_statistics`).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

from crossent._lib._checks import not_ignored
from crossent._lib._xp import array_namespace, isfinite
from crossent._losses import _rows
from crossent._losses._common import nan_rows
from crossent._losses._distill import HUGE_INV_TEMPERATURE, tempered, tempered_shift
from crossent._losses._logprob import softcap_form, softcap_guarded, softcap_slope_
from crossent._losses._options import CEOptions, Reduction

if TYPE_CHECKING:
    import torch

__all__ = [
    "LinearCEOptions",
    "RowScaled",
    "VocabShard",
    "WideBlocks",
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
#: The same budget on GPUs. Each chunk costs Python work and kernel launches per matrix
#: product and row pass, so small chunks leave an H200 idle. Measured there (bfloat16,
#: fwd+bwd, ``python -m benchmarks.gpu_check``, ranges over the session's runs): linear CE
#: at N=8192, d=4096, V=128256 554 / 84–122 / 50–56 ms at 64 MiB / 256 MiB / 1 GiB (Liger
#: Kernel 57 ms, materialized 49 ms); log-probs + entropy at N=4096, d=1024, V=32000
#: 43 / 12–36 / 9.6 ms; distillation ≈420 / 120–190 / 34–67 ms. The extra memory (1.3 GiB
#: at V=32000, 3.1 GiB at V=128256) stays far below the materialized logits'.
CUDA_CHUNK_BUDGET_BYTES = 2**30


def chunk_budget(device: torch.device) -> int:
    """The automatic chunk's buffer budget in bytes on `device` (CPU or GPU)."""
    return CHUNK_BUDGET_BYTES if device.type == "cpu" else CUDA_CHUNK_BUDGET_BYTES


#: Smallest automatic chunk, so the matrix products stay efficient.
MIN_AUTO_CHUNK = 16


#: What :func:`_chunk_loop` makes of a half-precision hidden gradient formed in wider products.
HiddenGrad = Literal["round", "stash"]

#: Where a stashed half-precision hidden gradient row's largest entry is put (times a power of
#: two): :math:`[2^{14}, 2^{15})`, so that float16 keeps ~2^28 of the row's range normal.
_ROW_TOP_EXPONENT = 15


class RowScaled(NamedTuple):
    """A float16/bfloat16 hidden gradient formed in forward, to be scaled by the upstream gradient.

    Formed wider (float32 products: a half-precision `hidden` with a float32 head), it is kept
    in `hidden`'s dtype, so the stash is no larger than the gradient itself, with each row
    multiplied by a power of two that puts its largest entry in ``[2**14, 2**15)``: the mean's
    ``1 / N`` cannot push a float16 row into subnormals before an upstream loss scale (AMP's
    ``GradScaler``) lifts it. `unscale` ``(N,)`` (the product dtype) holds the powers of two that
    undo it. :meth:`scaled` rounds once more: an upstream gradient of 1 or any power of two
    gives the wide gradient rounded once, another one at most one unit in the last place
    (PyTorch's own half-precision paths round more, see ``tests/fused``). On a vocabulary
    slice it is the sum of the slices' contributions (`summed`), or, in float16 products, the
    slice's own: :meth:`scaled` sums them over the ranks first.

    Formed in float16 products (float16 `hidden` and head), the rows are lifted before the
    product instead (``_lift_rows_``: the logits gradient's rows times powers of two, their
    product below float16's largest number) and `unscale` (float32) undoes that."""

    values: torch.Tensor
    unscale: torch.Tensor
    block: int
    """Rows per block of :meth:`scaled` (the chunk's)."""
    summed: bool = False
    """Whether `values` is already the sum over the ranks of a vocabulary slice (formed wide
    and summed chunk by chunk before the rounding: :func:`_chunk_loop`'s `reduce_hidden`)."""

    def scaled(self, factor: torch.Tensor | None, reduce_sum: Hook | None = None) -> torch.Tensor:
        """``values * unscale * factor`` (None: 1) in `hidden`'s dtype, in place in `values`:
        block by block in the product dtype (in the chunk loop's buffer), rounded once.
        `reduce_sum` (a vocabulary slice's) sums each unscaled block over the ranks before
        the scaling: one all-reduce per block, every rank has the same blocks."""

        values, wide = self.values, self.unscale.dtype
        f = self.unscale if factor is None or reduce_sum is not None else factor * self.unscale
        f = f.to(wide)[:, None]  # exact: unscale holds powers of two
        n, d = values.shape
        buf = _workspace("hidden", (min(self.block, n), d), wide, values.device)
        for i in range(0, n, self.block):
            rows = values[i : i + self.block]
            # widened by copy_ (a mixed-dtype product would widen `rows` into a temporary)
            out = buf[: rows.shape[0]].copy_(rows).mul_(f[i : i + self.block])
            if reduce_sum is not None:
                out = _apply_hook(reduce_sum, out)
                if factor is not None:
                    out.mul_(factor.to(wide))
            rows.copy_(out)
        return values


#: The float32 weight gradient of a float16/bfloat16 head is held in blocks of rows of at least
#: this many bytes, less a row: glibc maps every allocation above 32 MiB (its largest dynamic
#: mmap threshold) on its own, so each block goes back to the system as soon as it is rounded.
#: Smaller blocks come from the heap, which keeps them: measured, 4 MiB blocks left the peak
#: of a bfloat16 call at 4.3 chunks of logits (N=4096, d=1024, V=32000), these (3 of them) 3.4.
WIDE_BLOCK_BYTES = 36 * 2**20
#: At most this many blocks.
MAX_WIDE_BLOCKS = 16


class WideBlocks(NamedTuple):
    r"""The float32 weight gradient of a float16/bfloat16 head, in blocks of vocabulary rows.

    The chunk loop accumulates :math:`\nabla_W` in float32 (``_accumulate_wide_``): a
    bfloat16 gradient rounded chunk by chunk would be less accurate than PyTorch's unfused
    one, more so the more chunks (``benchmarks/bf16_weight_grad.py``). :meth:`rounded` scales
    the blocks by the upstream gradient and rounds them once into the gradient in the head's
    dtype, freeing each block as soon as it is copied: the float32 blocks and the rounded
    gradient are never both whole, so the peak is the float32 gradient plus one block, where a
    whole float32 accumulator and its rounded copy took 4 bytes more than the gradient per
    weight (2 + 2 / blocks now). That is on the CPU, where the rounded gradient's pages are
    committed as they are written; a caching GPU allocator reserves it whole at once, so
    there the peak stays the float32 gradient and its rounded copy, as before.
    """

    blocks: list[torch.Tensor]
    """``(rows_j, d)`` float32, in vocabulary order; emptied by :meth:`rounded`."""

    @staticmethod
    def zeros(v: int, d: int, device: torch.device, *, fill: bool) -> WideBlocks:
        """Uninitialised (`fill` False: the first chunk overwrites them) or zero blocks."""
        import torch

        k = max(1, min(MAX_WIDE_BLOCKS, v, v * d * 4 // WIDE_BLOCK_BYTES))
        alloc = torch.zeros if fill else torch.empty
        # as even as can be: every block holds at least WIDE_BLOCK_BYTES less one row
        return WideBlocks([alloc((v // k + (j < v % k), d), device=device) for j in range(k)])

    def rounded(self, factor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``gradient * factor`` (None: 1) rounded once to `dtype`, in one tensor; consumes the
        blocks, each freed once copied."""
        import torch

        shape = (sum(b.shape[0] for b in self.blocks), self.blocks[0].shape[1])
        out = torch.empty(shape, dtype=dtype, device=self.blocks[0].device)
        i = 0
        while self.blocks:
            block = self.blocks.pop(0)
            if factor is not None:
                block.mul_(factor.to(block.dtype))
            out[i : i + block.shape[0]].copy_(block)
            i += block.shape[0]
            del block  # freed before the next one is copied
        return out


def _pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0**k`` exactly (`k` integer, within the normal exponents of float32 `dtype` or
    float64), built from the exponent bits: no ``pow``/``exp2`` rounding."""
    import torch

    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32).to(dtype)


def _lift_rows_(g: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
    r"""Multiply each row of the float32 logits gradient `g` by a power of two before it is
    rounded to float16 for the hidden-gradient product :math:`G W`; return the powers that undo
    it (float32, per row).

    Row :math:`i` gets :math:`r_i = 2^{15 - e_i}` with :math:`2^{e_i - 1} \le \lVert G_i
    \rVert_2 \max(c, 1) < 2^{e_i}`, where `w_norm` is :math:`c = \sqrt{V} \max |W|`
    (at least the head's largest column norm), so each entry of the lifted row and of the
    lifted product row (:math:`|(G W)_{ij}| \le \lVert G_i \rVert_2 \lVert W_{:j}
    \rVert_2`, Cauchy–Schwarz) is below :math:`2^{15}`: no overflow in float16 (largest
    65504), and a row's gradient divided by the mean's :math:`N` (or any small upstream
    gradient) is kept among float16's normal numbers instead of its subnormals or zero. The
    bounds are the cheap ones: the row's 2-norm is one vectorised pass (its 1-norm took five
    times as long on CPU), :math:`\max |W|` one pass over the head (its column norms, a
    strided reduction, cost 8% of a float16 step at N=2048, d=256, V=8000). Powers of two
    do not round (the exponent is clamped to a safe range; a row of zeros or NaN keeps its
    values)."""
    import torch

    norm = torch.linalg.vector_norm(g, 2, dim=1)
    e = torch.frexp(norm * w_norm.clamp(min=1.0)).exponent.clamp_(-100, 100)
    g.mul_(_pow2(_ROW_TOP_EXPONENT - e, g.dtype)[:, None])
    return _pow2(e - _ROW_TOP_EXPONENT, g.dtype)


def _chunk_lift(g: torch.Tensor) -> int:
    r"""The exponent :math:`k` that puts the largest entry of the float32 logits gradient `g`
    (a chunk's) in :math:`[2^{14}, 2^{15})` once multiplied by :math:`2^k`; 0 for a chunk of
    zeros, or one holding inf or NaN (they propagate).

    For the weight gradient on CUDA, a float16 product accumulated in float32, :math:`G` is
    rounded to float16 first: the mean's :math:`1/N` or a small upstream gradient would put
    most of its entries among float16's subnormals or at 0 (95 % of them at N=2048, V=8000).
    One power of two per chunk, not per row: the product sums the rows. The host reads it
    (one synchronisation per chunk, on this path only): the product's `alpha`, which undoes
    it exactly, is a number."""
    import torch

    lo, hi = torch.aminmax(g)  # one pass, no |g| temporary
    amax = max(float(hi), -float(lo))
    if amax == 0.0 or not math.isfinite(amax):
        return 0
    return min(max(_ROW_TOP_EXPONENT - math.frexp(amax)[1], -100), 100)


def _normalise_rows_(gh: torch.Tensor) -> torch.Tensor:
    """Multiply each row of `gh` (product dtype) by the power of two that puts its largest
    entry in ``[2**14, 2**15)`` (:data:`_ROW_TOP_EXPONENT`); return the powers that undo it.
    A row of zeros, inf or NaN keeps its values (its exponent is clamped to a safe range)."""
    import torch

    lo, hi = torch.aminmax(gh, dim=1)  # one pass, no |gh| temporary
    amax = torch.maximum(hi, lo.neg())
    e = torch.frexp(amax).exponent.clamp_(-100, 100)  # amax = m 2^e, m in [0.5, 1)
    gh.mul_(_pow2(_ROW_TOP_EXPONENT - e, gh.dtype)[:, None])
    return _pow2(e - _ROW_TOP_EXPONENT, gh.dtype)


class _ChunkedResult(NamedTuple):
    """What :func:`_chunked_linear_ce` returns.

    loss
        Compute dtype (float32 for float16/bfloat16 inputs, else the input dtype):
        0-d for ``"mean"``/``"sum"``, shape ``(N,)`` for ``"none"`` (0 at ignored rows).
    grad_hidden
        ``(N, d)`` in ``hidden.dtype``; a :class:`RowScaled` for float16/bfloat16 hidden
        states with a wider weight, or float16 hidden states and weight, when it is formed for
        a later scaling (``row_scale`` None, ``"mean"``/``"sum"``) or on a vocabulary slice;
        or None. On a vocabulary slice it is
        the slice's contribution only: the caller sums it over ranks.
    grad_weight
        ``(V_local, d)``: when ``weight`` is float16/bfloat16, accumulated in float32 and
        held as a :class:`WideBlocks` (blocks of rows, rounded to ``weight.dtype`` in
        backward); else ``weight.dtype``; or None.
    grad_bias
        ``(V_local,)`` with the same dtype rule, or None.
    lse
        ``(N,)`` per-row log-sum-exp of the (soft-capped) logits over the whole
        vocabulary, compute dtype; 0 at ignored rows.
    """

    loss: torch.Tensor
    grad_hidden: torch.Tensor | RowScaled | None
    grad_weight: torch.Tensor | WideBlocks | None
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
    reuses memory, so a plain ``torch.empty`` is used. A cached buffer is made outside
    inference mode: one made by a call under ``torch.inference_mode()`` would be an
    inference tensor, which no later call outside it may write to.
    """
    import torch

    numel = shape[0] * shape[1]
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache: dict[tuple[str, torch.dtype], torch.Tensor] = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = cache.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        cache.pop((slot, dtype), None)  # free the old one first
        with torch.inference_mode(False):
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


@dataclass(frozen=True)
class LinearCEOptions:
    """Checked, hashable options of one fused linear cross-entropy call."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    chunk_size: int | None
    use_triton: bool | None = None

    def row_options(self) -> CEOptions:
        """The options of the row formula (:mod:`crossent._losses._rows`)."""
        return row_options(self.label_smoothing, self.z_loss, self.softcap, self.reduction)


def row_options(eps: float, z_loss: float, softcap: float | None, reduction: str) -> CEOptions:
    """The row formula's options (:class:`~crossent._losses._options.CEOptions`), cached."""
    key = (eps, z_loss, softcap, reduction)
    opts = _ROW_OPTIONS.get(key)
    if opts is None:
        if len(_ROW_OPTIONS) >= 64:
            _ROW_OPTIONS.clear()
        opts = CEOptions(
            "logits",
            label_smoothing=eps,
            z_loss=z_loss,
            softcap=softcap,
            reduction=cast("Reduction", reduction),
        )
        _ROW_OPTIONS[key] = opts
    return opts


_ROW_OPTIONS: dict[tuple[float, float, float | None, str], CEOptions] = {}
""":func:`row_options`'s results (at most 64). Not ``functools.lru_cache``: the chunk loop runs
under ``torch.compile`` where the fused op is not used (compiled without ``fullgraph`` with a
NumPy scalar option), and dynamo warns about every call of an ``lru_cache``-wrapped function
('Dynamo detected a call to a functools.lru_cache-wrapped function'), an error where warnings
are errors."""


@dataclass(frozen=True)
class VocabShard:
    """This process's rows ``[vocab_start, vocab_start + V_local)`` of a `vocab_size` head.

    `reduce_max` and `reduce_sum` all-reduce a tensor over the processes that
    hold the other slices, in place or by returning the result (the row
    statistics' :func:`crossent._losses._rows.all_reduce`; `reduce_sum` also sums
    the gradient of `hidden` in backward).
    """

    vocab_start: int
    vocab_size: int
    reduce_max: Callable[[torch.Tensor], torch.Tensor]
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]

    def merge(self, stats: _rows.RowStats) -> _rows.RowStats:
        """The whole-vocabulary statistics of the rows, from every rank's slice."""
        import torch

        return _rows.all_reduce(
            stats,
            reduce_max=functools.partial(_apply_hook, self.reduce_max),
            reduce_sum=functools.partial(_apply_hook, self.reduce_sum),
            xp=torch,
        )


# -------------------------------------------------------- plan → statistics → loss → gradient


class SliceSpec(NamedTuple):
    """What the statistics, loss and gradient of a slice of the vocabulary need."""

    opts: CEOptions
    """The row formula's options."""
    class_weight: torch.Tensor | None
    """This slice's class weights in the compute dtype."""
    num_classes: int
    """The whole vocabulary's size (smoothing's C)."""
    vocab_start: int
    """Global index of the slice's first class."""
    softcap: float | None
    """Applied in place to the raw logits (None: the logits come capped, or uncapped)."""
    shard: VocabShard | None
    """The ranks that hold the other slices (None: a single process)."""
    triton: Any
    """The Triton launchers, or None for the PyTorch element-wise passes."""


class _Plan(NamedTuple):
    """What every chunk of one call shares (built once by :func:`_plan`)."""

    spec: SliceSpec
    rows: torch.Tensor
    """Indices of the counted rows (target not ignored)."""
    labels: torch.Tensor
    """Their global labels (int64)."""
    scale: torch.Tensor
    """0-d: the mean's 1 / (sum of w_y) (0 when that is 0), else 1."""


def _plan(
    weight: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
    shard: VocabShard | None,
) -> _Plan:
    """Counted rows, their labels, the mean's scale: everything known before any chunk.

    `weight` is the (local) head in the product dtype. `class_weight` is the
    GLOBAL vector: the mean's denominator (the sum of w_y) needs no communication.
    """
    import torch

    v_local = weight.shape[0]
    cdt = _compute_dtype(weight.dtype)
    device = weight.device
    vocab_start = 0 if shard is None else shard.vocab_start
    num_classes = v_local if shard is None else shard.vocab_size
    rows, labels = _counted_rows(target, opts.ignore_index)
    cw_local = None
    if class_weight is not None:
        cw = class_weight.to(cdt)
        cw_local = cw[vocab_start : vocab_start + v_local]
        denom = cw[labels].sum()
    else:
        # a fill on the device: torch.tensor(...) would copy from pageable host memory,
        # which synchronises the device with the host
        denom = torch.full((), float(rows.numel()), dtype=cdt, device=device)
    if opts.reduction == "mean":
        scale = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)
    else:
        scale = torch.ones((), dtype=cdt, device=device)
    spec = SliceSpec(
        opts.row_options(),
        cw_local,
        num_classes,
        vocab_start,
        opts.softcap,
        shard,
        _triton_ops(weight, opts.use_triton),
    )
    return _Plan(spec, rows, labels, scale)


def softmax_stats_(
    buf: torch.Tensor,
    labels: torch.Tensor,
    class_weight: torch.Tensor | None,
    *,
    offset: int,
    with_wz: bool,
) -> _rows.RowStats:
    r"""Row statistics of the logits in `buf`, which it overwrites with their softmax.

    `buf` holds rows of logits of the classes ``offset … offset + V'`` (a chunk
    of the vocabulary, a rank's slice); it is left holding the softmax over
    those classes, :math:`e^{z_k - m} / s`, which is what the gradient needs. The
    statistics (:class:`~crossent._losses._rows.RowStats`) are those of
    :func:`crossent._losses._rows.row_stats` measured
    from the slice's maximum :math:`m` — computed here in place, in three fused
    passes instead of a temporary per step: the maximum, the softmax, and the
    maximum of the softmax, which is :math:`e^0 / s = 1/s` exactly at the
    maximum's column. With `with_wz`, :math:`\sum_k w_k (m - z_k)` (all terms
    :math:`\ge 0`) is read between the shift and the softmax. A slice whose
    logits are all :math:`-\infty` has :math:`s = 0` and a softmax of 0.
    """
    import torch

    n, v = buf.shape
    local = labels - offset
    inside = (local >= 0) & (local < v)
    idx = torch.where(inside, local, 0)
    z_y = torch.where(inside, buf.gather(1, idx[:, None]).squeeze(1), 0.0)
    w_y = None if class_weight is None else torch.where(inside, class_weight[idx], 0.0)
    m = buf.amax(dim=1) if v else torch.full((n,), -math.inf, dtype=buf.dtype, device=buf.device)
    finite = isfinite(m, xp=torch)
    wd: torch.Tensor
    wsum: torch.Tensor | float
    if with_wz:
        buf.sub_(torch.where(finite, m, 0.0)[:, None])  # z - m <= 0
        if class_weight is not None:
            wd, wsum = _weighted_sum(buf, class_weight).neg_(), class_weight.sum()
        else:
            wd, wsum = buf.sum(dim=1).neg_(), float(v)
    else:
        wd, wsum = torch.zeros_like(m), 0.0
    softmax_(buf, log=False)
    s = buf.amax(dim=1).reciprocal_()
    # rows of -inf: s = 0 and p = 0 (not 0/0); +inf and NaN propagate. The check is a host
    # sync, free on CPU; elsewhere the fix-up runs unconditionally instead.
    if buf.device.type != "cpu" or not bool(finite.all()):
        empty = m == -math.inf
        s = torch.where(empty, 0.0, torch.where(finite, s, math.inf))
        buf.masked_fill_(empty[:, None], 0.0)
    return _rows.RowStats(m=m, s=s, wd=wd, wsum=wsum, z_y=z_y, w_y=w_y)


def _weighted_sum(d: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_k w_k d_k` per row, with :math:`0 \cdot (-\infty) = 0`: a class of weight 0
    masked by a logit of :math:`-\infty` adds nothing (:func:`crossent._losses._rows.row_stats`,
    the Triton kernel), where the product gave NaN and the loss NaN under label smoothing.

    One matrix-vector product; the guarded one (a temporary the size of `d`) only for the
    rows that came out NaN, after a host check that is free on CPU, and unconditionally
    elsewhere (the Triton kernels serve CUDA; this is the float64 path there).
    """
    import torch

    out = torch.mv(d, class_weight)
    if d.device.type == "cpu":
        bad = out.isnan()
        if not bool(bad.any()):
            return out
        rows = bad.nonzero().squeeze(1)
        out[rows] = torch.mv(torch.where(class_weight == 0, 0.0, d[rows]), class_weight)
        return out
    return torch.mv(torch.where(class_weight == 0, 0.0, d), class_weight)


def softmax_(buf: torch.Tensor, *, log: bool) -> None:
    """(log-)softmax of the rows of `buf` (dim 1), in place.

    PyTorch's kernel with ``out=buf`` is right only on a contiguous buffer: on a
    strided one (a transposed slice of logits) it reads elements it has already
    written. Those get the out-of-place kernel and a copy back.
    """
    import torch

    kernel = torch._log_softmax if log else torch._softmax
    if buf.is_contiguous():
        kernel(buf, 1, False, out=buf)
    else:
        buf.copy_(kernel(buf, 1, False))


def _softcap_(
    buf: torch.Tensor, slope_buf: torch.Tensor | None, softcap: float | None, scale: float = 1.0
) -> None:
    r"""Raw logits :math:`x` in `buf` become :math:`\mathrm{scale} \cdot c \tanh(x/c)`;
    `slope_buf` keeps the chain rule's slope :math:`dz/dx = 1 - \tanh^2(x/c)`.

    The slope is :func:`~crossent._losses._logprob.softcap_slope_`'s, exact to a few ulps:
    ``1 - t * t`` from the tanh cancels where the tanh is near ±1 (its rounding times
    :math:`1/(1 - t^2)`: 6e-4 relative at :math:`|x/c| = 5` in float32; the Triton kernel
    forms the same slope, ``_kernels._tanh_sech2``).

    A logit of :math:`-\infty` (a masked class, e.g. from a bias of −inf) stays
    :math:`-\infty`, as in the unfused losses: :math:`c \tanh(-\infty / c) = -c` would
    unmask it. On the CPU one reduction tells whether the chunk has any (a host read, free
    there); elsewhere they are looked for unconditionally.
    """
    import torch

    form = softcap_form(softcap, buf.dtype, xp=torch)
    if form is None:  # no cap, or one above float32's range times 1/sqrt(eps): the identity
        if slope_buf is not None:
            slope_buf.fill_(1.0)
        if scale != 1.0:
            buf.mul_(scale)
        return
    if form.guarded:  # a huge cap (float32: > 1e31): x where x/c is tiny, c divided in two
        z, slope = softcap_guarded(buf, form, xp=torch)
        buf.copy_(z)
        if slope_buf is not None:
            slope_buf.copy_(slope)
        if scale != 1.0:
            buf.mul_(scale)
        return
    masked = None
    if buf.numel() and (buf.device.type != "cpu" or not bool(buf.amin() > -math.inf)):
        masked = torch.isneginf(buf)
    buf.div_(form.cap)
    if slope_buf is not None:
        softcap_slope_(buf, out=slope_buf)
    buf.tanh_().mul_(form.cap * scale)
    if masked is not None:
        buf.masked_fill_(masked, -math.inf)


def slice_statistics(
    buf: torch.Tensor,
    slope_buf: torch.Tensor | None,
    labels: torch.Tensor,
    spec: SliceSpec,
) -> _rows.RowStats:
    """Row statistics of this slice of the vocabulary, from the raw logits in `buf`.

    The Triton statistics kernel leaves `buf` unchanged; the PyTorch path soft-caps
    it in place (keeping the slope of the cap in `slope_buf`) and leaves the slice's softmax
    (:func:`softmax_stats_`).
    """
    import torch

    with_wz = spec.opts.label_smoothing != 0
    cw = spec.class_weight
    if spec.triton is None:
        _softcap_(buf, slope_buf, spec.softcap)
        return softmax_stats_(buf, labels, cw, offset=spec.vocab_start, with_wz=with_wz)
    local = labels - spec.vocab_start
    m, s, wd, z_y = spec.triton.row_stats(buf, local, cw, softcap=spec.softcap, smoothing=with_wz)
    inside = (local >= 0) & (local < buf.shape[1])
    wsum: torch.Tensor | float = 0.0
    if with_wz:
        wsum = float(buf.shape[1]) if cw is None else cw.sum()
    return _rows.RowStats(
        m=m,
        s=s,
        wd=wd,
        wsum=wsum,
        z_y=torch.where(inside, z_y, 0.0),
        w_y=None if cw is None else torch.where(inside, cw[torch.where(inside, local, 0)], 0.0),
    )


def chunk_statistics(
    buf: torch.Tensor,
    slope_buf: torch.Tensor | None,
    labels: torch.Tensor,
    spec: SliceSpec,
) -> tuple[_rows.RowStats, _rows.RowStats]:
    """``(local, merged)`` row statistics of one chunk of raw logits in `buf`.

    Local: this slice's (:func:`slice_statistics`). Merged: over the whole
    vocabulary, through :func:`crossent._losses._rows.all_reduce` across the
    ranks (the same object in a single process).
    """
    local = slice_statistics(buf, slope_buf, labels, spec)
    return local, (local if spec.shard is None else spec.shard.merge(local))


def _target_weight(stats: _rows.RowStats) -> torch.Tensor:
    import torch

    return torch.ones_like(stats.s) if stats.w_y is None else stats.w_y


def chunk_losses(merged: _rows.RowStats, spec: SliceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss of the chunk and the rows' log-sum-exp
    (:func:`crossent._losses._rows.row_loss`)."""
    import torch

    return _rows.row_loss(
        merged, _target_weight(merged), merged.wsum, spec.num_classes, spec.opts, xp=torch
    )


def logits_grad_(
    buf: torch.Tensor,
    slope_buf: torch.Tensor | None,
    labels: torch.Tensor,
    local: _rows.RowStats,
    merged: _rows.RowStats,
    scale: torch.Tensor,
    spec: SliceSpec,
    big_l: torch.Tensor | None = None,
) -> None:
    r"""Overwrite `buf` with :math:`\partial L/\partial x` of the chunk, times the row `scale`.

    :math:`(a\,p_k - b\,[k=y] - e\,w_k)` with the coefficients of
    :func:`crossent._losses._rows.coefficients` (times :math:`1 - \tanh^2(x/c)`
    under a soft cap). `buf` holds what :func:`chunk_statistics` left: the
    slice's softmax on the PyTorch path (rescaled to the whole vocabulary by
    :math:`e^{\operatorname{lse}_{slice} - L}`), the raw logits for the Triton kernel.
    `big_l` is the rows' log-sum-exp :math:`L` if the caller has it (:func:`chunk_losses`).
    """
    import torch

    opts = spec.opts
    eps, zeta = opts.label_smoothing, opts.z_loss
    if big_l is None:
        big_l = _rows.lse(merged, xp=torch)
    w_y = _target_weight(merged)
    cw = spec.class_weight
    if spec.triton is not None:
        spec.triton.logits_grad_(
            buf, labels - spec.vocab_start, cw, big_l, w_y, scale, merged.wsum,
            label_smoothing=eps, num_classes=spec.num_classes, z_loss=zeta, softcap=spec.softcap,
        )  # fmt: skip
        return
    a, b, e = _rows.coefficients(
        w_y, big_l, scale, merged.wsum, 1.0 - eps, eps / spec.num_classes, eps != 0,
        2.0 * zeta, zeta != 0,
    )  # fmt: skip
    if local is not merged:  # the slice's softmax, rescaled to the whole vocabulary
        a = a * torch.exp(_rows.lse(local, xp=torch) - big_l)
    buf.mul_(a[:, None])
    local_y = labels - spec.vocab_start
    inside = (local_y >= 0) & (local_y < buf.shape[1])
    idx = torch.arange(buf.shape[0], device=buf.device)
    buf.index_put_((idx, torch.where(inside, local_y, 0)), -(b * inside), accumulate=True)
    if eps != 0:
        if cw is not None:
            buf.addr_(e, cw, alpha=-1.0)
        else:
            buf.sub_(e[:, None])
    if slope_buf is not None:
        buf.mul_(slope_buf)


def _chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    opts: LinearCEOptions,
    compute_grad: bool | tuple[bool, bool, bool],
    row_scale: torch.Tensor | None = None,
    shard: VocabShard | None = None,
) -> _ChunkedResult:
    r"""Chunked sparse cross-entropy of ``hidden @ weight.T + bias`` and its gradients.

    Private core shared by :func:`crossent.fused.linear_cross_entropy` and the
    vocabulary-parallel loss. Arguments are trusted (the public functions check
    them); nothing the caller owns is written to. The work is
    :func:`_plan` (counted rows, the mean's scale), then per chunk of counted
    rows: the logits (:func:`chunk_logits`), :func:`chunk_statistics`,
    :func:`chunk_losses`, :func:`logits_grad_` and the gradient products
    (:func:`_chunk_loop`). The formula is :mod:`crossent._losses._rows`'.

    Parameters
    ----------
    hidden : Tensor, shape (N, d)
        Float16, bfloat16, float32 or float64.
    weight : Tensor, shape (V_local, d)
        Rows hold the global classes ``[vocab_start, vocab_start + V_local)``
        (all of them without `shard`).
    target : Tensor of int, shape (N,)
        GLOBAL class indices or ``opts.ignore_index``.
    bias : Tensor, shape (V_local,), or None
        The local slice of the bias.
    class_weight : Tensor, shape (vocab_size,), or None
        The GLOBAL per-class weight vector (every rank passes the whole vector).
    opts : LinearCEOptions
        As in :func:`crossent.fused.linear_cross_entropy`.
    compute_grad : bool or (bool, bool, bool)
        Whether to compute the gradients of (hidden, weight, bias); one bool
        applies to all three. False gives the loss with a single matrix product.
    row_scale : Tensor, shape (N,), or None
        Multiplies each row's gradient (the upstream gradient of
        ``reduction="none"``, used by backward's recomputation). None means 1.
    shard : VocabShard or None
        This process's slice of a vocabulary-parallel head: the statistics of
        every chunk are merged over the ranks (two all-reduces per chunk, plus one
        up front to agree on an automatic chunk size). None: a single process.

    Returns
    -------
    _ChunkedResult
        ``(loss, grad_hidden, grad_weight, grad_bias, lse)``; see
        :class:`_ChunkedResult`. Gradients are those of the returned loss
        (already divided by the mean's denominator, and multiplied by
        `row_scale`), ready to be scaled by a scalar upstream gradient.
    """
    import torch

    want = _wanted(compute_grad, bias)
    weight, bias = _product_operands(hidden, weight, bias)
    plan = _plan(weight, target, class_weight, opts, shard)
    n_total, v_local, device = hidden.shape[0], weight.shape[0], hidden.device
    cdt = _compute_dtype(weight.dtype)
    n_counted = int(plan.rows.numel())
    loss_rows = torch.zeros((n_total,), dtype=cdt, device=device)
    lse_rows = torch.zeros((n_total,), dtype=cdt, device=device)
    has_softcap = opts.softcap is not None
    chunk = _agreed_chunk(
        opts.chunk_size,
        n_counted,
        v_local,
        buffers=1.0 + (1.0 if has_softcap else 0.0),
        low_precision=cdt != weight.dtype,
        reduce_max=None if shard is None else shard.reduce_max,
        device=device,
    )
    keep_slope = has_softcap and plan.spec.triton is None and any(want)
    slope_all = None
    if keep_slope and n_counted:
        slope_all = _workspace("slope", (chunk, v_local), cdt, device)
    row_scale_c = None if row_scale is None else row_scale.to(cdt)

    def body(buf: torch.Tensor, c: _Chunk) -> bool:
        labels = plan.labels[c.start : c.stop]
        slope_buf = slope_all[: c.stop - c.start] if slope_all is not None else None
        local, merged = chunk_statistics(buf, slope_buf, labels, plan.spec)
        row, big_l = chunk_losses(merged, plan.spec)
        loss_rows[c.rows], lse_rows[c.rows] = row, big_l
        if not any(want):
            return False
        scale = plan.scale if row_scale_c is None else plan.scale * row_scale_c[c.rows]
        n = c.stop - c.start
        # a row without a finite max (NaN, +inf, or -inf throughout: no softmax) has a NaN
        # gradient throughout, as the unfused losses' (p = 0 gave a finite one at -inf)
        scale = nan_rows(scale.expand(n), ~isfinite(merged.m, xp=torch), xp=torch)
        logits_grad_(buf, slope_buf, labels, local, merged, scale, plan.spec, big_l)
        return True

    grad_h, grad_w, grad_b = _chunk_loop(
        hidden, weight, bias, plan.rows, chunk=chunk, want=want if any(want) else None, body=body,
        low_in_place=plan.spec.triton is not None,
        hidden_grad="round" if row_scale is not None and shard is None else "stash",
        reduce_hidden=None if shard is None else shard.reduce_sum,
    )  # fmt: skip
    if opts.reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum() * plan.scale if opts.reduction == "mean" else loss_rows.sum()
    return _ChunkedResult(loss, grad_h, grad_w, grad_b, lse_rows)


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
    rows = torch.nonzero(not_ignored(target, ignore_index, xp=torch)).reshape(-1)
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
    wide: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chunk's logits ``h_c @ w_t + bias`` into `out` (compute dtype); returns ``h_c``.

    ``h_c`` (the chunk's rows of `hidden`, in `w_t`'s dtype) is returned for the
    weight gradient; when `hidden` is narrower it is copied into `wide` (a work buffer of
    the chunk's shape in `w_t`'s dtype), or a new tensor. For float16/bfloat16 products the
    product goes to `low` (the product dtype) and is then copied to `out`.
    """
    import torch

    h_c = c.take(hidden)
    if h_c.dtype != w_t.dtype:
        h_c = h_c.to(w_t.dtype) if wide is None else wide.copy_(h_c)
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
    low_in_place: bool = False,
    hidden_grad: HiddenGrad = "round",
    reduce_hidden: Hook | None = None,
) -> tuple[torch.Tensor | RowScaled | None, torch.Tensor | WideBlocks | None, torch.Tensor | None]:
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
    Returns them: `grad_hidden` ``(N, d)`` (zero at rows not in `rows_all`),
    `grad_weight` and `grad_bias` accumulated in float32 for low-precision products (the
    weight's in blocks of rows, a :class:`WideBlocks`), else in the product dtype.

    `hidden_grad` says what `grad_hidden` is when `hidden` is float16/bfloat16 and the
    products are wider (a float32 head): ``"round"`` (already scaled: each chunk's product
    rounded to `hidden`'s dtype, once) or ``"stash"`` (to be scaled by the upstream gradient,
    or summed over the ranks of a vocabulary slice, later: a :class:`RowScaled` in `hidden`'s
    dtype, no larger than the gradient). Otherwise it is in the product dtype, `hidden`'s.
    `reduce_hidden` (a vocabulary slice's all-reduce, with ``"stash"``) sums each chunk's wide
    product over the ranks before it is rounded, so that the sum is rounded once, as in one
    process: rounded on each rank first (and summed in backward), the slices' roundings
    stayed where their contributions cancel, an entry of 0.00586 for 0.00497 (18 %).

    float16 products (float16 `hidden` and head): before :math:`G` is rounded to float16 for
    :math:`G W`, each of its rows is multiplied by a power of two (``_lift_rows_``) that keeps
    the row and its product below float16's largest number and out of its subnormals, where
    the mean's :math:`1/N` or a small upstream gradient put it (an AMP loss scale applied to a
    stashed gradient could not bring the lost digits back). ``"round"`` divides the product by
    it (in float32, rounded once); ``"stash"`` keeps it in a :class:`RowScaled`. The weight
    gradient reads :math:`G` as before. bfloat16 has float32's exponent range: not lifted.

    `low_in_place` (float16/bfloat16 products, no bias gradient): `body` reads the
    product-dtype logits and writes :math:`G` over them itself (the Triton kernels,
    which widen to float32 in registers and round :math:`G` once), so the loop keeps no
    float32 copy: two conversion passes and the float32 buffer less per chunk, the same
    numbers (the float32 buffer held the rounded product, and :math:`G` was rounded to
    the product dtype for the products anyway). Not for the hidden gradient of float16
    products: its rows are lifted in float32 first.
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
    # a half-precision hidden with a wider product: rounded chunk by chunk (not held wide)
    narrow = hidden.dtype != mm_dtype
    # float16 products: G's rows lifted by powers of two before G W (_lift_rows_)
    lift = want_h and mm_dtype == torch.float16
    grad_h = unscale = None
    if want_h:
        grad_h = (torch.zeros if compact else torch.empty)(
            (n_total, d), dtype=hidden.dtype if narrow else mm_dtype, device=device
        )
        if (narrow or lift) and hidden_grad == "stash":
            unscale = torch.ones((n_total,), dtype=cdt, device=device)
    # zeros only for an empty batch: otherwise the first chunk overwrites them (no fill pass)
    alloc = torch.zeros if n_rows == 0 else torch.empty
    grad_w: torch.Tensor | WideBlocks | None = None
    if want_w and low_precision:  # float32, in blocks of rows
        grad_w = WideBlocks.zeros(v_local, d, device, fill=n_rows == 0)
    elif want_w:
        grad_w = alloc((v_local, d), dtype=acc_dtype, device=device)
    grad_b = alloc((v_local,), dtype=acc_dtype, device=device) if want_b else None
    if n_rows == 0:
        return _hidden_grad(grad_h, unscale, chunk), grad_w, grad_b

    shape = (chunk, v_local)
    # the weight gradient a low-precision product accumulated in float32 (CUDA), reading G
    # rounded to the product dtype: for float16, G scaled into its range first
    low_w = want_w and _mm_out_dtype(weight)
    scale_w = low_w and mm_dtype == torch.float16
    in_place = low_in_place and low_precision and not want_b and not lift and not scale_w
    w_norm = None  # bounds the head's column norms, and so the lifted products
    if lift:
        lo, hi = torch.aminmax(weight)  # no |W| temporary
        w_norm = torch.maximum(hi, lo.neg()).to(cdt) * math.sqrt(v_local)
    # G rounded to the product dtype before the weight gradient (which reads the float32 G
    # except on CUDA: _accumulate_wide_), and lifted G rounded after it
    round_first = low_precision and (not lift or low_w)
    if in_place:  # the product-dtype logits are the only buffer
        buf_all, lp_all = _workspace("low", shape, mm_dtype, device), None
    else:
        buf_all = _workspace("logits", shape, cdt, device)
        lp_all = _workspace("low", shape, mm_dtype, device) if low_precision else None
    w_t = weight.t()
    # the chunk's rows of a narrower hidden, in the product dtype; then its gradient's rows
    wide_all = _workspace("hidden", (chunk, d), mm_dtype, device) if narrow else None

    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        n = stop - start
        c = _Chunk(start, stop, rows_all[start:stop], compact, start == 0)
        buf = buf_all[:n]
        lp = lp_all[:n] if lp_all is not None else None
        wide = wide_all[:n] if wide_all is not None else None
        h_c = chunk_logits(hidden, w_t, bias, c, out=buf, low=lp, wide=wide)

        if not body(buf, c) or want is None:
            continue

        if grad_b is not None:
            if c.first:
                torch.sum(buf, dim=0, out=grad_b)
            else:
                grad_b += buf.sum(0)
        g = buf
        alpha = 1.0
        if lp is not None and round_first:
            if scale_w:  # G times 2**k rounded, the product times 2**-k (powers of two: exact)
                k = _chunk_lift(buf)
                g, alpha = torch.mul(buf, 2.0**k, out=lp), 2.0**-k
            else:
                g = lp.copy_(buf)
        if isinstance(grad_w, WideBlocks):
            wide_g32 = None if in_place else buf
            _accumulate_wide_(grad_w, wide_g32, g, h_c, first=c.first, alpha=alpha)
        elif grad_w is not None:
            if c.first:
                torch.mm(g.t(), h_c, out=grad_w)
            else:
                torch.addmm(grad_w, g.t(), h_c, out=grad_w)
        undo = None
        if w_norm is not None and lp is not None:  # float16 products
            undo = _lift_rows_(buf, w_norm)
            g = lp.copy_(buf)
            if unscale is not None:  # kept lifted: undone after the upstream scaling
                unscale[c.rows] = undo
                undo = None
        if grad_h is not None and narrow:  # formed wide, rounded once
            # over the chunk's wide copy of hidden, read by the weight gradient above
            gh = _apply_hook(reduce_hidden, torch.mm(g, weight, out=h_c))
            if unscale is not None:
                unscale[c.rows] = _normalise_rows_(gh)
            if compact:
                grad_h.index_copy_(0, c.rows, gh.to(grad_h.dtype))
            else:
                grad_h[start:stop].copy_(gh)
        elif grad_h is not None:
            gh = torch.mm(g, weight) if compact else torch.mm(g, weight, out=grad_h[start:stop])
            if undo is not None:
                gh.mul_(undo[:, None])  # in float32, rounded once (exact unless subnormal)
            if compact:
                grad_h.index_copy_(0, c.rows, gh)
    return (
        _hidden_grad(grad_h, unscale, chunk, narrow and reduce_hidden is not None),
        grad_w,
        grad_b,
    )


def _hidden_grad(
    grad_h: torch.Tensor | None, unscale: torch.Tensor | None, chunk: int, summed: bool = False
) -> torch.Tensor | RowScaled | None:
    if grad_h is None or unscale is None:
        return grad_h
    return RowScaled(grad_h, unscale, chunk, summed)


def _accumulate_wide_(
    grad_w: WideBlocks,
    g32: torch.Tensor | None,
    g_lp: torch.Tensor,
    h_c: torch.Tensor,
    *,
    first: bool,
    alpha: float = 1.0,
) -> None:
    """``grad_w += alpha * G.T @ h_c`` in float32 for float16/bfloat16 inputs, block by block.

    On CUDA: the low-precision operands accumulated in float32 in place
    (``torch.addmm(..., out_dtype=torch.float32, out=block)``: no temporary); `g_lp` may be
    :math:`G` scaled by ``1 / alpha`` (:func:`_chunk_lift`). Elsewhere, or on a torch without
    that overload: the float32 gradient `g32` (None: `g_lp` upcast) and the chunk of `hidden`
    upcast once (`alpha` is 1 there). `first` overwrites the blocks instead.
    """
    import torch

    if _mm_out_dtype(g_lp):  # pragma: no cover - needs a GPU
        g, h = g_lp, h_c
    else:
        g, h = (g_lp.to(torch.float32) if g32 is None else g32), h_c.to(torch.float32)
    i = 0
    for block in grad_w.blocks:
        g_t = g[:, i : i + block.shape[0]].t()
        i += block.shape[0]
        if g.dtype != torch.float32:  # pragma: no cover - needs a GPU
            if first:
                torch.mm(g_t, h, out_dtype=torch.float32, out=block)
                if alpha != 1.0:
                    block.mul_(alpha)
            else:
                torch.addmm(block, g_t, h, out_dtype=torch.float32, alpha=alpha, out=block)
        elif first:
            torch.mm(g_t, h, out=block)
        else:
            torch.addmm(block, g_t, h, out=block)


_OUT_DTYPE_MM: dict[tuple[str, torch.dtype], bool] = {}


def _mm_out_dtype(x: torch.Tensor) -> bool:
    """Whether a product of `x`'s dtype accumulated and written in float32
    (``torch.mm(..., out_dtype=torch.float32)``) runs on `x`'s device: tried once per device
    type and dtype, CUDA only (on CPU the float32 product of upcast operands is used)."""
    import torch

    device = x.device
    if device.type != "cuda":
        return False
    ok = _OUT_DTYPE_MM.get((device.type, x.dtype))
    if ok is None:  # pragma: no cover - needs a GPU
        a = torch.ones((2, 2), dtype=x.dtype, device=device)
        try:
            out = torch.empty((2, 2), dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=out)
            torch.addmm(out, a, a, out_dtype=torch.float32, alpha=0.5, out=out)
            ok = True
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no overload
            ok = False
        _OUT_DTYPE_MM[device.type, x.dtype] = ok
    return ok


def _row_stats_torch(
    buf: torch.Tensor,
    slope_buf: torch.Tensor | None,
    y_loc: torch.Tensor,
    cw_local: torch.Tensor | None,
    *,
    softcap: float | None,
    smoothing: bool,
    scale: float = 1.0,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    r"""Local row statistics; leaves the slice's log-softmax ``z - lse_loc`` in `buf`.

    The reference point of the statistics is the slice's own log-sum-exp
    ``lse_loc`` (one fused, cache-friendly ``log_softmax`` pass), so it returns
    ``(lse_loc, ref, S_loc, z_y - lse_loc)`` with ``S_loc = Σ_k w_k (z_k - lse_loc)``
    (≤ 0; 0 when not `smoothing`). ``lse_loc = max_k z_k - max_k (z_k - lse_loc)``
    is recovered at the row's maximum, where the log-softmax lies in
    :math:`[-\log V, 0]`: no cancellation. (Recovering it at the target column,
    ``z_y - (z_y - lse_loc)``, cancels when :math:`z_y` lies far below the
    maximum: a target 1e4 below it cost the combined log-probabilities' gradient
    and entropy 1e-4 relative error in float32.) A row of the slice whose logits
    are all :math:`-\infty` gets ``lse_loc`` = −inf and log-probabilities −inf
    (not NaN). Without `need_lse` (a caller that reads only the log-softmax and
    ``z_y - lse_loc``) ``lse_loc`` is not formed: NaN stands in its place. The
    logits are ``z = scale · softcap · tanh(x / softcap)`` (``scale`` is
    1 / temperature); with `slope_buf`, the cap's slope 1 - tanh²(x/c) is kept there for
    the chain rule. A huge ``scale`` (a tiny temperature) is applied after the row max
    ``ref`` of the soft-capped logits is subtracted (``_distill.tempered``): the plain
    product overflowed. Then ``lse_loc`` is that of the shifted logits, the slice's true one being
    ``scale · ref + lse_loc`` (which may overflow: slices are combined with ``ref`` apart,
    ``_logprobs``); ``ref`` is None for ordinary scales.
    """
    import torch

    ref = None
    if scale <= HUGE_INV_TEMPERATURE:
        _softcap_(buf, slope_buf, softcap, scale)
    else:
        _softcap_(buf, slope_buf, softcap)
        xp = array_namespace(buf)
        shift = tempered_shift(buf, xp=xp)
        tempered(buf, scale, xp=xp, overwrite=True, shift=shift)
        ref = shift[:, 0]
    col = y_loc[:, None]
    m = buf.amax(dim=1) if need_lse else None
    softmax_(buf, log=True)
    d_loc = buf.gather(1, col).squeeze(1)
    if m is None:
        lse_loc = torch.full_like(d_loc, math.nan)
    else:
        empty = m == -math.inf
        buf.masked_fill_(empty[:, None], -math.inf)  # log_softmax gave NaN there
        d_loc = torch.where(empty, -math.inf, d_loc)
        lse_loc = torch.where(empty, -math.inf, m - buf.amax(dim=1))
    if smoothing:
        sm_loc = torch.mv(buf, cw_local) if cw_local is not None else buf.sum(dim=1)
    else:
        sm_loc = torch.zeros_like(lse_loc)
    return lse_loc, ref, sm_loc, d_loc


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
