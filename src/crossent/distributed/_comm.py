r"""The process group, the vocabulary layout, and the handshake that makes bad calls fail loudly.

Every vocabulary-parallel call starts with :func:`agree`: each rank checks its own
arguments, then the ranks exchange one small ``int64`` header with
``all_gather`` (its length is fixed, so the collective itself cannot hang on a
shape disagreement). From the gathered headers every rank derives the same
vocabulary layout and takes the same decision: go on, or raise. A rank whose
own arguments are wrong re-raises its own error; every other rank raises a
:class:`ValueError` that names the offending rank. Disagreements between ranks
(the batch shape, the options, the dtype, the target itself) and labels outside
the *global* vocabulary are found from the headers, identically everywhere.

The row statistics then travel with :func:`all_reduce`; :func:`row_reducers`
packages them as the ``reduce_max`` / ``reduce_sum`` callables the fused core
expects.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.distributed as dist

from crossent._lib._checks import (
    check_ignore_index,
    check_nonnegative_scalar,
    check_reduction,
    check_softcap,
    check_unit_interval_scalar,
    label_index_error,
    not_ignored,
    values_checked,
)
from crossent._lib._xp import int64_labels, is_lazy, label_extremes
from crossent._losses._common import HUGE_WEIGHT, weight_factor

__all__ = ["Layout", "Options", "agree", "all_reduce", "check_options", "group_of", "row_reducers"]

_FINGERPRINT_PERIOD = 1009
"""Position weights of the target fingerprint cycle through 1..1009 (catches permutations)."""

# Header fields (int64), one row per rank after the all_gather.
(
    _ERROR,
    _VLOCAL,
    _WLEN,
    _NDIM,
    _NUMEL,
    _SHAPE,
    _OPTS,
    _CHECKED,
    _TMIN,
    _TMAX,
    _TSUM,
    _WSUM,
    _WHUGE,
) = range(13)
_HEADER = 13
_NO_LABEL_MIN = 2**62
"""Sentinel minimum when a rank has no counted label (every target ignored)."""


@dataclass(frozen=True)
class Options:
    """Validated scalar options shared by both vocabulary-parallel losses."""

    ignore_index: int | None
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str


@dataclass(frozen=True)
class Layout:
    """This rank's slice: classes ``[vocab_start, vocab_start + local_vocab)`` of ``vocab_size``."""

    group: Any
    rank: int
    world_size: int
    vocab_start: int
    local_vocab: int
    vocab_size: int
    weight_factor: float = 1.0
    """What a weighted mean scales the class weights by, the same on every rank
    (``mean_class_weight``): 2^-64 where a weight of any rank exceeds ``HUGE_WEIGHT``, 2^64
    where every rank's lie below its reciprocal, else 1."""


def group_of(group: Any, *, caller: str) -> Any:
    """The process group to use (``None`` means the default group); raises if there is none."""
    if not dist.is_available() or not dist.is_initialized():
        msg = (
            f"{caller} needs an initialized torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)."
        )
        raise RuntimeError(msg)
    return dist.group.WORLD if group is None else group


def check_options(
    *,
    ignore_index: object,
    label_smoothing: object,
    z_loss: object,
    softcap: object,
    reduction: object,
) -> Options:
    """Type and range checks of the scalar options (the same rules as the single-process losses)."""
    index = check_ignore_index(ignore_index, allow_none=True)
    eps = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    z = check_nonnegative_scalar(z_loss, name="z_loss")
    cap = check_softcap(softcap)
    return Options(index, eps, z, cap, check_reduction(reduction))


def _crc(value: object) -> int:
    return zlib.crc32(repr(value).encode())


def _label_summary(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """[min, max, fingerprint] of the counted labels, computed on the target's device."""
    # uint64 labels of 2**63 and more wrapped to negative int64 (2**64 - 100 to an
    # ignore_index of -100: dropped silently); int64_labels makes them int64's largest
    t = int64_labels(target.reshape(-1))
    counted = (
        t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    )
    lo = torch.where(counted, t, torch.full_like(t, _NO_LABEL_MIN)).amin() if t.numel() else None
    hi = torch.where(counted, t, torch.full_like(t, -1)).amax() if t.numel() else None
    position = torch.arange(t.numel(), device=t.device, dtype=torch.int64) % _FINGERPRINT_PERIOD
    fingerprint = ((position + 1) * t).sum()
    if lo is None or hi is None:
        lo = torch.tensor(_NO_LABEL_MIN, device=t.device)
        hi = torch.tensor(-1, device=t.device)
    return torch.stack([lo, hi, fingerprint])


def _weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """An exact fingerprint of the class weights' bits, computed on their device: the sum of
    their bit patterns (as integers) times position weights, wrapping in int64, so it does
    not depend on the order of the reduction (the same values give the same number on every
    rank and device) and a change in any one weight, or a permutation, changes it."""
    w = weight.detach().reshape(-1).contiguous()
    bits = w.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[w.element_size()]).to(
        torch.int64
    )
    position = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % _FINGERPRINT_PERIOD
    return ((position + 1) * bits).sum()


def _header_device(group: Any) -> torch.device:
    """Where the header must live for the group's backend (NCCL only moves CUDA tensors)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: Fields of the options dataclasses under another name in the public signatures (None: none).
_PUBLIC_NAMES: dict[str, str | None] = {"entropy": "return_entropy", "use_triton": None}


def _option_names(options: Any) -> str:
    """The keywords whose values `options` (a dataclass of one call's options) holds."""
    if not is_dataclass(options):
        return "the options"
    names = (_PUBLIC_NAMES.get(f.name, f.name) for f in fields(options))
    return ", ".join(f"`{n}`" for n in names if n is not None)


def agree(
    *,
    caller: str,
    group: Any,
    local_error: Exception | None,
    local_vocab: int,
    batch_shape: Sequence[int],
    weight_len: int,
    target: torch.Tensor | None,
    options: Any,
    signature: dict[str, object],
    weight_global_only: bool = False,
    weight: torch.Tensor | None = None,
) -> Layout:
    """Exchange the headers; return this rank's :class:`Layout`, or raise on every rank alike.

    `signature` maps what else must match on every rank, in words (dtypes, the hidden size,
    whether a bias is present, ...), to its value on this rank (compared by ``repr``); the
    words complete the options' names in the error.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    where = _header_device(group)
    header = torch.zeros(_HEADER, dtype=torch.int64, device=where)
    if local_error is not None:
        header[_ERROR] = 1
    elif target is not None and options is not None:
        checked = values_checked(target)
        header[_VLOCAL] = local_vocab
        header[_WLEN] = weight_len
        header[_NDIM] = len(batch_shape)
        header[_NUMEL] = int(torch.Size(batch_shape).numel())
        header[_SHAPE] = _crc(tuple(batch_shape))
        header[_OPTS] = _crc((options, signature))
        header[_CHECKED] = int(checked)
        header[_TMIN] = _NO_LABEL_MIN
        header[_TMAX] = -1
        if not is_lazy(target):  # the header is read on the host anyway: no extra sync
            header[_TMIN : _TSUM + 1] = _label_summary(target, options.ignore_index).to(where)
        if checked and weight is not None and not is_lazy(weight):
            header[_WSUM] = _weight_fingerprint(weight).to(where)
        if weight is not None and weight.numel() and not is_lazy(weight):
            # one decision for every rank: whether a weighted mean scales the weights (1: a
            # weight above HUGE_WEIGHT, -1: all below its reciprocal)
            top = weight.detach().amax()
            header[_WHUGE] = ((top > HUGE_WEIGHT).long() - (top < 1 / HUGE_WEIGHT).long()).to(where)
    rows_t = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(rows_t, header, group=group)
    rows: list[list[int]] = torch.stack(rows_t).tolist()

    rejected = [r for r, row in enumerate(rows) if row[_ERROR]]
    if rejected:
        if local_error is not None:
            raise local_error
        msg = (
            f"{caller}: rank(s) {rejected} of the process group rejected their arguments "
            f"(see the error raised there); this rank (rank {rank}) stops too, so that no rank "
            "waits forever in a collective."
        )
        raise ValueError(msg)

    def column(field: int) -> list[int]:
        return [row[field] for row in rows]

    if len(set(column(_NDIM))) > 1 or len(set(column(_SHAPE))) > 1:
        msg = (
            f"{caller}: `target` (and the batch dimensions of the input) must have the same "
            f"shape on every rank; the ranks have {column(_NDIM)} dimension(s) and "
            f"{column(_NUMEL)} element(s) (rank order). Every rank passes the whole batch; only "
            "the vocabulary is split."
        )
        raise ValueError(msg)
    if len(set(column(_OPTS))) > 1:
        msg = (
            f"{caller}: the ranks were called with different options or dtypes "
            f"({', '.join([_option_names(options), *signature])}); pass the same ones on "
            "every rank."
        )
        raise ValueError(msg)
    wlens = column(_WLEN)
    wname = "class_weight" if weight_global_only else "weight"
    if len({w < 0 for w in wlens}) > 1:
        msg = (
            f"{caller}: `{wname}` (class weights) was given on some ranks but not on others "
            f"(ranks without: {[r for r, w in enumerate(wlens) if w < 0]}); give it on every rank."
        )
        raise ValueError(msg)
    sizes = column(_VLOCAL)
    vocab_size = sum(sizes)
    if weight_global_only:
        bad_w = [r for r, w in enumerate(wlens) if w >= 0 and w != vocab_size]
        if bad_w:
            msg = (
                f"{caller}: `{wname}` must hold the whole vocabulary ({vocab_size} classes) "
                f"on every rank; rank(s) {bad_w} passed {[wlens[r] for r in bad_w]} values."
            )
            raise ValueError(msg)
    bad_w = [r for r, w in enumerate(wlens) if w >= 0 and w not in (sizes[r], vocab_size)]
    if bad_w:
        msg = (
            f"{caller}: `weight` must hold either the whole vocabulary ({vocab_size} classes) or "
            f"the rank's own slice; rank(s) {bad_w} passed {[wlens[r] for r in bad_w]} values "
            f"for slices of {[sizes[r] for r in bad_w]}."
        )
        raise ValueError(msg)
    checked_rows = [row for row in rows if row[_CHECKED]]
    # class weights of the whole vocabulary must be the same on every rank (slices differ)
    whole = [r for r, row in enumerate(rows) if row[_CHECKED] and row[_WLEN] == vocab_size]
    if len({rows[r][_WSUM] for r in whole}) > 1:
        msg = (
            f"{caller}: the ranks hold different `{wname}` values (ranks {whole} pass the whole "
            f"vocabulary's {vocab_size} class weights); every rank must pass the same vector."
        )
        raise ValueError(msg)
    if len({row[_TSUM] for row in checked_rows}) > 1:
        msg = (
            f"{caller}: the ranks hold different `target` tensors; every rank must pass the same "
            "labels (the whole batch), since only the vocabulary is split."
        )
        raise ValueError(msg)
    # The label range is checked even with validation off (as torch's kernels do), from every
    # rank's labels, so that every rank raises alike even if their targets differ.
    lo = min(column(_TMIN))
    hi = max(column(_TMAX))
    if lo != _NO_LABEL_MIN and (lo < 0 or hi >= vocab_size):
        if target is not None and not is_lazy(target) and str(target.dtype).endswith("uint64"):
            # the same labels on every rank (the fingerprints agree): named by their value
            wide = int64_labels(target)
            ignore = options.ignore_index if options is not None else None
            lo, hi = label_extremes(target, not_ignored(wide, ignore, xp=torch))
        if not checked_rows:
            raise label_index_error(vocab_size, f"min={lo}, max={hi}")
        ignore = options.ignore_index if options is not None else None
        msg = (
            f"{caller}: `target` has labels outside the global vocabulary [0, {vocab_size}) "
            f"that are not `ignore_index` (ignore_index={ignore}): min={lo}, max={hi}. Labels are "
            f"global class indices; the slices per rank are {sizes}."
        )
        raise ValueError(msg)
    return Layout(
        group=group,
        rank=rank,
        world_size=world_size,
        vocab_start=sum(sizes[:rank]),
        local_vocab=sizes[rank],
        vocab_size=vocab_size,
        weight_factor=_weight_factor(column(_WHUGE)),
    )


def _weight_factor(codes: list[int]) -> float:
    """:attr:`Layout.weight_factor` from every rank's code (1: a weight above ``HUGE_WEIGHT``,
    -1: every weight below its reciprocal, 0: neither, or no weights)."""
    if any(c == 1 for c in codes):
        return weight_factor(2 * HUGE_WEIGHT)
    return weight_factor(0.0) if codes and all(c == -1 for c in codes) else 1.0


def all_reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    """In-place all-reduce of `x` over `group`; returns `x` (no-op for a group of one)."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def row_reducers(
    group: Any,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(reduce_max, reduce_sum)``: all-reduce a small per-row tensor over `group`."""

    def reduce_max(x: torch.Tensor) -> torch.Tensor:
        return all_reduce(x, dist.ReduceOp.MAX, group)

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        return all_reduce(x, dist.ReduceOp.SUM, group)

    return reduce_max, reduce_sum
