r"""Exact sums of float64 values: integer fixed-point digits, one rounding at the end.

Every finite float64 is an integer times a power of two,
:math:`x = M\,2^{E}` with :math:`|M| < 2^{53}` and :math:`E \ge -1126`, so a
sum of float64 values is an integer multiple of :math:`2^{B}`,
:math:`B = -1138`. :class:`ExactSum` keeps that integer in base
:math:`2^{32}`: ``limbs[..., j]`` is digit ``lo + j``, worth
:math:`2^{B + 32(lo + j)}`, in an int64 (so 31 bits of headroom absorb the
carries of many additions before they are propagated). The window
``[lo, lo + L)`` of digits grows only as far as the values seen need (a few
digits for losses and probabilities; 70 cover the whole float64 range).
NaN and ±inf are counted apart and give NaN / ±inf as float summation would.

Adding a batch costs a few passes over it, in blocks that stay in cache:
each value splits without error into two pieces on the grids :math:`2^{g}`
and :math:`2^{g-L}` (Rump, Ogita and Oishi's extraction, :math:`g` set by
the block's largest magnitude), and the pieces go into float64 partial sums
per element (``np.add.at``, over eight lanes per element when there are few
elements, so that runs of values into one element add in independent
chains), which are exact: each holds at most :math:`2^{52-L}` pieces of at
most :math:`L` bits on its grid (:math:`L` from 36 up, the fewer values an
element gets, the more). The partial sums wait in the sum
(:attr:`ExactSum.pending`, over many batches) and go into the digits as
integers when they are full (every :math:`2^{52-L}` values per element) or
the sum is read, merged, pickled or synced; carries are propagated lazily,
before the digits are read. A value
of magnitude at least :math:`2^{g-L+52}` is a multiple of :math:`2^{g-L}`:
what is left of it after the first piece is its second piece, so a block whose
smallest magnitude is that large costs three passes and two scatters. Smaller
values (tiny next to the block's largest) may have bits below the second
grid: when they are few, what is left of them after the first piece goes
round again, alone, on a finer grid; when they are many, their second piece
is cut on the grid :math:`2^{g-L}` and only the bits below it go round again.
:func:`add_to_each` adds the same values to several sums (by their own
indices) with one split of each block.

The metrics' sums take :func:`add_counted`: sums whose values are also
counted per element (calibration bins, per-class sums; several of them may
share the values' split) get each value's two pieces as the bits of two
float64 numbers, read as int64, in two int64 scatters that give the count with
the sums, so the exact sum costs no scatter more than a count and a float64
sum; sums of one element (the log loss, the Brier score) get the bits summed.
The integer totals wait in the sum (:attr:`ExactSum.held`) until it is read.
Values that come in runs, each mostly into one element (:class:`Runs`:
classwise bins of many classes), are scattered only where they go elsewhere;
the rest adds as each run's dense total less those.

Because the state is the exact sum, it does not depend on the order of the
rows, on how they were split into batches or shards, or on the order in
which shards merge; :meth:`ExactSum.value` rounds it to the nearest float64
once (ties to even). Merging two states, and ``all_reduce(SUM)`` of states
padded to a common window (digits in [0, 2³²) summed over fewer than 2³¹
ranks), add integers and are exact.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "ExactSum",
    "Runs",
    "add_counted",
    "add_to_each",
    "counted_lanes",
    "laned",
    "lanes_for",
    "work_array",
]

_BASE = -1138  # exponent of digit 0's lowest bit: below 2**-1126, the lowest mantissa bit
_DIGIT = 32
_MASK = (1 << _DIGIT) - 1
_HEADROOM = 2  # digits above the highest one written, for carries
_MIN_LEVEL = 36  # bits per piece at the least: two pieces hold 72 bits of each value
_MAX_LEVEL = 51  # at the most (the extraction needs |value| < 2**(grid + 51))
_BLOCK = 1 << 17  # values split at a time (work arrays of 1.6 MiB)
_SLACK = 3  # a block may use partial sums on a grid up to 2**_SLACK coarser (< _MIN_LEVEL)
_MAX_PARTIALS = 8  # partial sums (one per grid) kept at a time
_ROOM = 6  # bits of the pieces given up so that partial sums take 2**6 batches like the first
_CARRY_EVERY = 1 << 20  # deposits between carries: each adds less than 2**33 to a digit
_MIN_GRID = -1074  # every float64 is a multiple of 2**-1074
_MAX_GRID = 1022 - 52  # the largest grid whose extraction constant 1.5 * 2**(g+52) is finite
_LANES = 8  # partial sums per element, each taking every 8th value: independent additions
_LANE_ELEMENTS = 2048  # up to this many elements (long runs into one element are likely)
_MAX_OFFSETS = 16  # lane offset arrays kept (one per number of elements)
_FEW_SMALL = 1 / 8  # fraction of a block whose rests go round again whole (their low piece not cut)
_FEW_RUNS = 16  # groups in a block up to which runs are compared one by one
_FEW_ROWS = 16  # value() rounds up to this many sums one by one with Python ints
_EMPTY = np.empty(0, dtype=np.float64)
_HELD_TERMS = 1 << 30  # numbers below 2**32 summed into held digits' units before a deposit
_MAX_HELD = 4  # sets of held units (one per set of grids) kept at a time


@dataclass
class ExactSum:
    """Element-wise exact sums of float64 values over an array of shape `shape`.

    ``limbs`` has shape ``shape + (L,)``; after :meth:`_normalize` every digit
    but the last is in ``[0, 2**32)`` and the last is signed (``uncarried``
    counts the deposits since, 0 when normalized). ``nan``, ``pos_inf`` and
    ``neg_inf`` count the non-finite values added. ``pending`` holds float64
    partial sums not yet in the digits (exact too), ``held`` the int64 totals
    of counted adds (:func:`add_counted`) not yet in them, by their grids
    (as :meth:`_deposit` takes them), each with how many numbers below
    2**32 in magnitude its entries sum at most; every method that reads or
    combines the digits moves both in first.
    """

    limbs: np.ndarray
    lo: int
    nan: np.ndarray
    pos_inf: np.ndarray
    neg_inf: np.ndarray
    uncarried: int = 0
    pending: _Pending | None = field(default=None, repr=False, compare=False)
    held: dict[tuple[int, ...], tuple[np.ndarray, int]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def zeros(cls, shape: tuple[int, ...] = ()) -> ExactSum:
        """The sum of no values."""
        counts = np.zeros(shape, dtype=np.int64)
        return cls(np.zeros((*shape, 0), dtype=np.int64), 0, counts, counts.copy(), counts.copy())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.nan.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def copy(self) -> ExactSum:
        return ExactSum(
            self.limbs.copy(),
            self.lo,
            self.nan.copy(),
            self.pos_inf.copy(),
            self.neg_inf.copy(),
            self.uncarried,
            None if self.pending is None else self.pending.copy(),
            {grids: (units.copy(), terms) for grids, (units, terms) in self.held.items()},
        )

    def _settle(self) -> None:
        """Move the partial sums still pending and the held totals into the digits (before
        the digits are read)."""
        if self.pending is not None:
            self.pending.deposit_all(self)
        held, self.held = self.held, {}
        for grids, (units, _) in held.items():
            self._deposit(units, grids)

    def _hold(self, units: np.ndarray, grids: tuple[int, ...], terms: int) -> None:
        """Add int64 `units` (rows, size) on `grids`, as :meth:`_deposit` takes them, each
        entry the sum of at most `terms` numbers below 2**32 in magnitude, to the held
        totals (`units` is taken, not copied): into the digits when the sum is read, or
        sooner when there are too many."""
        kept, before = self.held.pop(grids, (None, 0))
        if kept is not None and before + terms > _HELD_TERMS:
            self._deposit(kept, grids)
            kept, before = None, 0
        if kept is None and len(self.held) >= _MAX_HELD:
            self._settle()
        if kept is None:
            kept = units
        else:
            kept += units
        self.held[grids] = (kept, before + terms)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and deep-copied) with the partial sums and held totals in the digits
        (the pickle's fields are those of a sum without held totals)."""
        self._settle()
        state = {**self.__dict__, "pending": None}
        del state["held"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.held = {}

    def __getitem__(self, key: Any) -> ExactSum:
        """The sums of some elements (indexing the leading axes)."""
        self._settle()
        self._normalize()
        return ExactSum(
            np.asarray(self.limbs[key]),
            self.lo,
            np.asarray(self.nan[key]),
            np.asarray(self.pos_inf[key]),
            np.asarray(self.neg_inf[key]),
        )

    # ---------------------------------------------------------------- digits

    def _widen(self, lo: int, hi: int) -> None:
        """Make the window cover digits [lo, hi) (it only grows)."""
        size = self.limbs.shape[-1]
        if size == 0:
            self.lo = lo
            self.limbs = np.zeros((*self.shape, hi - lo), dtype=np.int64)
            return
        new_lo, new_hi = min(lo, self.lo), max(hi, self.lo + size)
        if (new_lo, new_hi) == (self.lo, self.lo + size):
            return
        limbs = np.zeros((*self.shape, new_hi - new_lo), dtype=np.int64)
        limbs[..., self.lo - new_lo : self.lo - new_lo + size] = self.limbs
        self.limbs, self.lo = limbs, new_lo

    def _normalize(self) -> None:
        """Carry every digit but the last into [0, 2**32)."""
        limbs = self.limbs
        for j in range(limbs.shape[-1] - 1):
            carry = limbs[..., j] >> _DIGIT  # floor division: negative digits borrow
            limbs[..., j] -= carry << _DIGIT
            limbs[..., j + 1] += carry
        self.uncarried = 0

    def _deposit(
        self, units: np.ndarray, grids: tuple[int, ...], elements: np.ndarray | None = None
    ) -> None:
        """Add ``units[r] * 2**grids[r]`` into the digits (int64 `units`, shape (rows, size)),
        or into the distinct flat `elements` only (`units` of shape (rows, elements)).

        Split as u = u0 + 2**32 u1 (u0 in [0, 2**32), |u1| < 2**31) and
        shifted to the digit boundaries, each row adds less than 2**33 to
        three digits, so many deposits fit in the int64 digits between carries.
        """
        self._widen(*_window(min(grids), max(grids)))
        if not self.limbs.flags.c_contiguous:
            self.limbs = np.ascontiguousarray(self.limbs)
        limbs = self.limbs.reshape(-1, self.limbs.shape[-1])  # a view
        position = np.array(grids, dtype=np.int64)[:, None] - _BASE
        low = (units & _MASK) << (position % _DIGIT)  # < 2**63
        high = (units >> _DIGIT) << (position % _DIGIT)  # |.| < 2**62
        parts = (low & _MASK, (low >> _DIGIT) + (high & _MASK), high >> _DIGIT)
        for row, grid in enumerate(grids):
            at = (grid - _BASE) // _DIGIT - self.lo
            for offset, part in enumerate(parts):
                if elements is None:
                    limbs[:, at + offset] += part[row]
                else:
                    limbs[elements, at + offset] += part[row]
        self.uncarried += len(grids)
        if self.uncarried >= _CARRY_EVERY:
            self._normalize()

    # ---------------------------------------------------------------- adding

    def add(
        self, values: np.ndarray, index: np.ndarray | None = None, *, most: int | None = None
    ) -> ExactSum:
        """Add `values` (float64) to the elements `index` (flat indices; element 0 if None).

        `most`, when given, bounds how many of the values go to any one
        element (the largest count of ``np.bincount(index)``, which the
        metric updates compute anyway): the fewer, the more bits each piece
        holds (its partial sums stay exact), the fewer values need a second
        round. Returns ``self``.
        """
        add_to_each(values, [(self, index, most)])
        return self

    def _count_non_finite(self, values: np.ndarray, where: np.ndarray | None) -> None:
        """Count the NaN and ±inf of `values` into their elements (`where`; element 0 if None)."""
        size = self.nan.size
        flat = np.zeros(values.size, dtype=np.int64) if where is None else where
        for counts, hit in (
            (self.nan, np.isnan(values)),
            (self.pos_inf, values == np.inf),
            (self.neg_inf, values == -np.inf),
        ):
            counts += np.bincount(flat[hit], minlength=size).reshape(self.shape)

    def _add_huge(self, values: np.ndarray, flat_index: np.ndarray) -> None:
        """Add values of any magnitude: each mantissa split into three integer digits.

        The path for blocks with values from 2**1006 up, whose extraction
        constant would overflow: exact integer arithmetic, one ``np.add.at``
        per digit.
        """
        nonzero = values != 0
        values, flat_index = values[nonzero], flat_index[nonzero]
        mantissa, exponent = np.frexp(values)
        m = (mantissa * 2.0**53).astype(np.int64)  # exact: |mantissa| < 1
        position = exponent.astype(np.int64) - 53 - _BASE  # >= 12 for the smallest subnormal
        digit = position >> 5
        shift = position & (_DIGIT - 1)
        self._widen(int(digit.min()), int(digit.max()) + 3 + _HEADROOM)
        if not self.limbs.flags.c_contiguous:
            self.limbs = np.ascontiguousarray(self.limbs)
        width = self.limbs.shape[-1]
        limbs = self.limbs.reshape(-1)  # a view
        at = flat_index * width + (digit - self.lo)
        low = (m & _MASK) << shift  # < 2**63
        high = (m >> _DIGIT) << shift  # |.| < 2**52
        np.add.at(limbs, at, low & _MASK)
        np.add.at(limbs, at + 1, (low >> _DIGIT) + (high & _MASK))
        np.add.at(limbs, at + 2, high >> _DIGIT)
        self._normalize()  # each value added less than 2**33 to a digit

    # ---------------------------------------------------------------- combining

    def merge(self, other: ExactSum) -> ExactSum:
        """The exact sum of both (a new object)."""
        if other.shape != self.shape:
            msg = f"cannot add exact sums of shapes {self.shape} and {other.shape}."
            raise ValueError(msg)
        self._settle()
        other._settle()
        out = self.copy()
        out.nan += other.nan
        out.pos_inf += other.pos_inf
        out.neg_inf += other.neg_inf
        if other.limbs.shape[-1]:
            out._widen(other.lo, other.lo + other.limbs.shape[-1])
            start = other.lo - out.lo
            out.limbs[..., start : start + other.limbs.shape[-1]] += other.limbs
            out._normalize()
        return out

    def regroup(self, groups: np.ndarray, count: int) -> ExactSum:
        """Exact sums by group along the last axis: ``out[..., g]`` adds ``self[..., i]``.

        Element i goes to group ``groups[..., i]``.

        `groups` has this sum's shape; the result has its shape with the last
        axis of length `count`.
        """
        self._settle()
        self._normalize()
        lead = self.shape[:-1]
        rows = int(np.prod(lead, dtype=np.int64))
        target = (np.arange(rows)[:, None] * count + groups.reshape(rows, -1)).ravel()
        out = ExactSum.zeros((*lead, count))
        for name in ("nan", "pos_inf", "neg_inf"):
            summed = np.bincount(
                target, weights=getattr(self, name).ravel(), minlength=rows * count
            )
            setattr(out, name, summed.astype(np.int64).reshape(*lead, count))
        width = self.limbs.shape[-1]
        if width:
            flat = self.limbs.reshape(-1, width)  # digits < 2**32: sums of < 2**21 are exact
            summed = np.stack(
                [
                    np.bincount(target, weights=flat[:, j], minlength=rows * count)
                    for j in range(width)
                ],
                axis=-1,
            )
            out.limbs = summed.astype(np.int64).reshape(*lead, count, width)
            out.lo = self.lo
            out._normalize()
        return out

    # ---------------------------------------------------------------- reading

    def value(self) -> np.ndarray:
        """The sums rounded once to the nearest float64 (ties to even)."""
        self._settle()
        out = np.zeros(self.shape, dtype=np.float64)
        width = self.limbs.shape[-1]
        if width:
            self._normalize()
            out.reshape(-1)[:] = _round(self.limbs.reshape(-1, width), _BASE + _DIGIT * self.lo)
        nan = (self.nan > 0) | ((self.pos_inf > 0) & (self.neg_inf > 0))
        out[self.pos_inf > 0] = np.inf
        out[self.neg_inf > 0] = -np.inf
        out[nan] = np.nan
        return out

    def __float__(self) -> float:
        return float(self.value())

    # ---------------------------------------------------------------- torch.distributed

    def pad_to(self, lo: int, hi: int) -> None:
        """Widen the window to digits [lo, hi) (before an all_reduce of the limbs)."""
        self._settle()
        self._normalize()  # digits in [0, 2**32): their sum over ranks cannot overflow
        if self.limbs.shape[-1] == 0:
            self.lo = lo
            self.limbs = np.zeros((*self.shape, hi - lo), dtype=np.int64)
        else:
            self._widen(lo, hi)

    def window(self) -> tuple[int, int] | None:
        """Digits [lo, hi) in use, None when no finite non-zero value was added."""
        self._settle()
        width = self.limbs.shape[-1]
        return None if width == 0 else (self.lo, self.lo + width)


@dataclass(frozen=True)
class Runs:
    """How the values of an element-wise sum come in groups, each with a most common element.

    The values are a (rows, groups) matrix, flattened in `order` ("F": each
    group's `rows` values one after the other; "C": row after row), and
    ``mode[g]`` is the element that most of group g's values go to (likely:
    any element of the group gives the same sums). Then :func:`add_counted`
    scatters only the values that go elsewhere and adds the rest at once, as
    the group's total less those: for classwise calibration bins of many
    classes, where nearly every probability is in the first bin.
    """

    order: str
    rows: int
    mode: np.ndarray  # int64 (groups,): flat element index

    @property
    def groups(self) -> int:
        return int(self.mode.size)


Target = tuple[ExactSum, np.ndarray | None, int | None]  # (sum, flat indices, most)


def add_to_each(
    values: np.ndarray, targets: list[Target], *, bounds: tuple[float, float] | None = None
) -> None:
    """Add the same `values` to each of `targets`: (sum, flat indices or None, `most`).

    `bounds`, when the caller knows them for certain, are finite ``(low, high)``
    with every value in [low, high] (NaN excluded): the blocks then skip their
    own min and max.

    What :meth:`ExactSum.add` does for one sum, with one split of each
    block for all of them (the pieces as narrow as the most crowded target
    needs): each target gets the pieces scattered into its own partial sums,
    by its own indices. The partial sums stay with their sums, pending, until
    they are full or the sums are read, so that a stream of small batches
    does not pay a deposit into the digits per batch.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    wheres: list[np.ndarray | None] = []
    pendings: list[_Pending] = []
    mosts: list[int] = []
    block = _BLOCK
    for target, index, most in targets:
        flat_index = None if index is None else np.asarray(index, dtype=np.int64).ravel()
        if flat_index is not None and flat_index.size != values.size:
            msg = f"`index` has {flat_index.size} entries for {values.size} values."
            raise ValueError(msg)
        wheres.append(flat_index)
        bound = values.size if most is None else min(most, values.size)
        pendings.append(_Pending.of(target, bound, lanes=1 if flat_index is None else None))
        mosts.append(bound)
    # one split for all: pieces as narrow as the narrowest partial sums take (a pending
    # set of partial sums takes pieces of its level or narrower)
    level = min((pending.level for pending in pendings), default=_MAX_LEVEL)
    sums = [target[0] for target in targets]
    while values.size:  # each round adds 2L bits of every value; few have more left
        for pending, bound in zip(pendings, mosts, strict=True):
            pending.begin(bound)  # a round may bring each element `bound` more pieces
        left: list[np.ndarray] = []
        left_index: list[list[np.ndarray]] = [[] for _ in targets]
        for start in range(0, values.size, block):
            part = slice(start, start + block)
            each = [
                (target, pending, None if where is None else where[part])
                for target, pending, where in zip(sums, pendings, wheres, strict=True)
            ]
            rest, rest_index = _add_block(values[part], each, level, bounds)
            if rest.size:
                left.append(rest)
                for kept, where in zip(left_index, rest_index, strict=True):
                    if where is not None:
                        kept.append(where)
        values = np.concatenate(left) if left else _EMPTY
        wheres = [np.concatenate(kept) if kept else None for kept in left_index]
        bounds = None  # what goes round again is not within the bounds (either sign)


def _add_block(
    values: np.ndarray,
    each: list[tuple[ExactSum, _Pending, np.ndarray | None]],
    level: int,
    bounds: tuple[float, float] | None = None,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Add the top bits of each of `values` (at most ``_BLOCK``) to every (sum, pending,
    indices) of `each`; return what is left, with its indices for each.

    Each value splits error-free into two pieces on the grids 2**g and
    2**(g − L), L = `level` (at most each pending's), g set by the block's largest
    magnitude, and the pieces go into float64 partial sums, exact on those
    grids. What is left (values with bits below the second grid: tiny next
    to the block's largest) comes back for another round.
    """
    nothing: list[np.ndarray | None] = [None] * len(each)
    if bounds is not None and math.isfinite(bounds[0]) and math.isfinite(bounds[1]):
        smallest, largest = bounds  # the block's own are inside: its grid may be coarser
    else:
        largest, smallest = float(values.max()), float(values.min())  # NaN if any is
    if not (math.isfinite(largest) and math.isfinite(smallest)):
        finite = np.isfinite(values)
        for target, _, where in each:
            target._count_non_finite(values, where)
        values = values[finite]
        each = [(t, p, None if w is None else w[finite]) for t, p, w in each]
        if not values.size:
            return _EMPTY, nothing
        largest, smallest = float(values.max()), float(values.min())
    amax = max(largest, -smallest)
    if amax == 0:
        return _EMPTY, nothing
    top = math.frexp(amax)[1]  # every |value| < 2**top
    if top - level > _MAX_GRID:
        for target, _, where in each:
            target._add_huge(
                values, np.zeros(values.size, dtype=np.int64) if where is None else where
            )
        return _EMPTY, nothing
    grid = max(top - level, _MIN_GRID)
    grid, partial = each[0][1].partial_sums(each[0][0], grid, values.size)
    chosen = [(grid, partial)] + [
        p.partial_sums(t, grid, values.size, slack=0) for t, p, _ in each[1:]
    ]
    low_grid = max(grid - level, _MIN_GRID)
    high, low, rest, left = _scratch(values.size)
    # error-free extraction (Rump, Ogita & Oishi's ExtractScalar): sigma + x lies in
    # [2**(g+52), 2**(g+53)), where floats are 2**g apart, so (x + sigma) - sigma is x
    # rounded to a multiple of 2**g and x minus it is exact; |high| <= 2**(g + L)
    sigma = math.ldexp(1.5, grid + 52)
    np.add(values, sigma, out=high)
    high -= sigma
    np.subtract(values, high, out=rest)  # |rest| <= 2**(g-1)

    def scatter(low_piece: np.ndarray) -> None:
        for (_, pending, where), (_, partial) in zip(each, chosen, strict=True):
            pending.scatter(partial, where, high, low_piece)

    # a value of magnitude >= 2**(low_grid + 52) is a multiple of 2**low_grid, and so is
    # its rest: that rest is its low piece, nothing is left
    whole = math.ldexp(1.0, low_grid + 52)
    if low_grid == _MIN_GRID or smallest >= whole or largest <= -whole:
        scatter(rest)
        return _EMPTY, nothing
    if smallest >= 0:
        np.less(values, whole, out=left)
    elif largest <= 0:
        np.greater(values, -whole, out=left)
    else:
        np.less(np.abs(values, out=low), whole, out=left)
    small = np.flatnonzero(left)  # the values that may have bits below the low grid
    if small.size <= values.size * _FEW_SMALL:
        # few: their rests go round again, alone (on a finer grid, set by the largest)
        tail = rest[small]
        rest[small] = 0
        scatter(rest)
        return tail, [None if where is None else where[small] for _, _, where in each]
    # many: the rest rounded to the low grid is the low piece; below it goes round again
    sigma = math.ldexp(1.5, low_grid + 52)
    np.add(rest, sigma, out=low)
    low -= sigma  # |low| <= 2**(g-1) = 2**(low_grid + L - 1)
    scatter(low)
    tail = rest[small] - low[small]  # exact
    keep = np.flatnonzero(tail)
    live = small[keep]
    return tail[keep], [None if where is None else where[live] for _, _, where in each]


class _Pending:
    """Float64 partial sums of the pieces, one pair per grid, on their way into a sum's digits.

    The partial sums on grid 2**g hold the high pieces (row 0) and the low
    pieces on 2**(g − `level`) (row 1) of each element (of each lane of
    it). A partial sum of ``span = 2**(52 − level)`` pieces of at most
    `level` bits is exact (of twice as many too: the bound is 2**(53 − level));
    so are pieces from a split at a lower level (narrower, on coarser grids).
    `bound[g]` bounds the pieces any element got in the partial sums on grid
    g: what earlier rounds and calls brought (`base`), plus, in this round,
    ``min(most, values taken)``. Before a block would pass `span`, the
    partial sums go into the digits, as int64 integers; the rest wait there,
    in the sum (:attr:`ExactSum.pending`), until the sum is read, merged,
    copied to another process or pickled. `level` is as large as the first
    `most` and the number of values allow, less ``_ROOM`` bits so that many
    more batches fit before a deposit, from ``_MIN_LEVEL`` up.
    """

    def __init__(self, size: int, most: int, *, lanes: int) -> None:
        self.size = size
        self.lanes = lanes
        self.level = _level(most, room=_ROOM)
        self.span = 1 << (52 - self.level)
        self.most = 0
        self.sums: dict[int, np.ndarray] = {}  # grid -> partial sums (2, lanes * size)
        self.base: dict[int, int] = {}  # grid -> pieces per element before this round
        self.taken: dict[int, int] = {}  # grid -> values taken in this round

    @classmethod
    def of(cls, target: ExactSum, most: int, *, lanes: int | None) -> _Pending:
        """`target`'s pending partial sums, ready for pieces for `most` values per element."""
        size = target.nan.size
        lanes = lanes_for(size) if lanes is None else lanes
        pending = target.pending
        if pending is None or pending.lanes != lanes:
            if pending is not None:
                pending.deposit_all(target)
            pending = target.pending = cls(size, most, lanes=lanes)
        elif _level(most, room=0) < pending.level:  # wider than this call allows: narrower
            pending.deposit_all(target)
            pending.level = _level(most, room=_ROOM)
            pending.span = 1 << (52 - pending.level)
        return pending

    def copy(self) -> _Pending:
        out = copy.copy(self)
        out.sums = {grid: sums.copy() for grid, sums in self.sums.items()}
        out.base, out.taken = dict(self.base), dict(self.taken)
        return out

    def begin(self, most: int) -> None:
        """A new round of values, at most `most` per element."""
        for grid in self.sums:
            self.base[grid] += min(self.most, self.taken[grid])
            self.taken[grid] = 0
        self.most = most

    def partial_sums(
        self, target: ExactSum, grid: int, count: int, *, slack: int = _SLACK
    ) -> tuple[int, np.ndarray]:
        """A grid in [`grid`, `grid` + `slack`] and its partial sums, room for `count` values."""
        for coarse in range(grid, grid + slack + 1):
            if coarse in self.sums:
                grid = coarse
                break
        else:
            if len(self.sums) >= _MAX_PARTIALS:
                self.deposit_all(target)
            self.sums[grid] = np.zeros((2, self.lanes * self.size), dtype=np.float64)
            self.base[grid] = self.taken[grid] = 0
        sums, taken = self.sums[grid], self.taken[grid] + count
        if self.base[grid] + min(self.most, taken) > self.span:
            self._deposit(target, grid, sums)
            sums[...] = 0
            self.base[grid], taken = 0, count
        self.taken[grid] = taken
        return grid, sums

    def scatter(
        self, sums: np.ndarray, where: np.ndarray | None, high: np.ndarray, low: np.ndarray
    ) -> None:
        """Add the pieces `high` and `low` to the partial sums `sums` of the elements `where`.

        Every partial sum is exact, so the order of the additions does not
        matter: a value goes to lane ``i % lanes`` of its element, so that
        runs of values into one element (a column of probabilities, most of
        them in the first bin) add in independent chains.
        """
        if where is None:
            sums[0, 0] += high.sum()
            sums[1, 0] += low.sum()
            return
        lanes = work_array("exact lanes", (where.size,), np.int64)
        where = laned(where, self.size, self.lanes, out=lanes)
        np.add.at(sums[0], where, high)
        np.add.at(sums[1], where, low)

    def _deposit(self, target: ExactSum, grid: int, sums: np.ndarray) -> None:
        if self.lanes > 1:  # exact: the lanes of an element hold `span` pieces at most in all
            sums = sums.reshape(2, self.lanes, self.size).sum(axis=1)
        grids = (grid, max(grid - self.level, _MIN_GRID))
        scale = -np.array(grids)[:, None]
        target._deposit(np.ldexp(sums, scale).astype(np.int64), grids)  # |.| <= 2**53

    def deposit_all(self, target: ExactSum) -> None:
        if not self.sums:
            return
        grids = sorted(self.sums)  # one widening for all: digits from the lowest grid's up
        target._widen(*_window(max(grids[0] - self.level, _MIN_GRID), grids[-1]))
        for grid in grids:
            self._deposit(target, grid, self.sums[grid])
        self.sums.clear()
        self.base.clear()
        self.taken.clear()


def _level(most: int, *, room: int = 0) -> int:
    """Bits per piece for partial sums of `most` pieces per element (less `room` bits)."""
    fewest_bits = 52 - _MIN_LEVEL
    level = 52 - (min(most, 1 << fewest_bits) - 1).bit_length() - room
    return max(min(level, _MAX_LEVEL), _MIN_LEVEL)


def _window(low_grid: int, grid: int) -> tuple[int, int]:
    """Digits [lo, hi) for integers below 2**63 on grids from 2**`low_grid` to 2**`grid`.

    A deposit on grid 2**g writes three digits from the one that holds bit
    g; ``_HEADROOM`` more above take the carries of many deposits.
    """
    return (low_grid - _BASE) // _DIGIT, (grid - _BASE) // _DIGIT + 3 + _HEADROOM


def lanes_for(size: int) -> int:
    """Partial sums per element for a scatter into `size` elements (see :func:`laned`)."""
    return _LANES if size <= _LANE_ELEMENTS else 1


_OFFSETS: dict[tuple[int, int], np.ndarray] = {}


def laned(where: np.ndarray, size: int, lanes: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Flat indices into ``lanes`` copies of `size` elements: value i goes to copy ``i % lanes``.

    ``np.add.at`` adds the values of one element one after the other, each
    addition waiting for the one before; a run of values into one element
    (a column of probabilities, most of them in the first calibration bin)
    is three times slower than values spread over elements. Spread over
    lanes, the additions of one element form independent chains. For at
    most ``_BLOCK`` values; written into `out` (int64, as many) when given,
    such as a :func:`work_array`.
    """
    if lanes == 1:
        return where
    offsets = _OFFSETS.get((size, lanes))
    if offsets is None:
        if len(_OFFSETS) >= _MAX_OFFSETS:
            _OFFSETS.clear()
        offsets = np.arange(_BLOCK, dtype=np.int64) % lanes * size
        _OFFSETS[size, lanes] = offsets
    return np.add(where, offsets[: where.size], out=out)


#: work arrays are kept per thread up to this many elements
WORK_ELEMENTS = 1 << 20
_WORK = threading.local()


def work_array(
    name: str, shape: tuple[int, ...], dtype: Any, order: Literal["C", "F"] = "C"
) -> np.ndarray:
    """An uninitialised work array, kept in this thread for the next call with this name.

    An update allocating its large temporaries again for each batch pays
    for fresh pages each time the allocator has handed them back to the
    system; kept, they are touched once. The array is valid until the next
    call with the same name in this thread: no longer than one update.
    """
    size = math.prod(shape)
    key = (name, np.dtype(dtype).str)
    held: dict[tuple[str, str], np.ndarray] = _WORK.__dict__.setdefault("arrays", {})
    flat = held.get(key)
    if flat is None or flat.size < size:
        flat = np.empty(size, dtype=dtype)
        if size <= WORK_ELEMENTS:
            held[key] = flat
    return flat[:size].reshape(shape, order=order)


def _scratch(size: int) -> tuple[np.ndarray, ...]:
    """Three float64 and one bool work arrays of `size` (at most ``_BLOCK``), kept per thread
    (:func:`work_array`)."""
    floats = work_array("exact split", (3, size), np.float64)
    return floats[0], floats[1], floats[2], work_array("exact left", (size,), np.bool_)


def _round(limbs: np.ndarray, scale: int) -> np.ndarray:
    """Each row of normalized digits, as an integer times 2**`scale`, rounded to float64.

    Few rows go through Python's correctly rounded int division. Many go
    at once: the top 64 bits of each magnitude, with the lowest one set if
    any bit below is (rounding to odd), round to 53 bits as the exact
    integer would (64 >= 53 + 2), so one conversion from uint64 rounds
    correctly; only results in the subnormal range, where ``ldexp`` would
    round a second time, take the int division.
    """
    rows, width = limbs.shape
    if rows <= _FEW_ROWS:
        return np.array([_row_to_float(row, scale) for row in limbs], dtype=np.float64)
    sign = np.where(limbs[:, -1] < 0, -1, 1)
    # digit j of each row in digits[j]: two zero digits below (every number has three
    # digits from its top) and one above
    digits = np.zeros((width + 3, rows), dtype=np.int64)
    np.multiply(limbs.T, sign, out=digits[2:-1])
    for j in range(width + 2):  # magnitudes: every digit in [0, 2**32)
        carry = digits[j] >> _DIGIT
        digits[j] -= carry << _DIGIT
        digits[j + 1] += carry
    nonzero = digits != 0
    found = nonzero.any(axis=0)
    top = np.where(found, width + 2 - np.argmax(nonzero[::-1], axis=0), 2)  # highest nonzero
    at = np.arange(rows)
    high = digits[top, at].astype(np.uint64)
    bits = np.frexp(high.astype(np.float64))[1].astype(np.uint64)  # its bit length, 1..32
    bits[~found] = 1
    middle = digits[top - 1, at].astype(np.uint64)
    low = digits[top - 2, at].astype(np.uint64)
    head = (high << (np.uint64(64) - bits)) | (middle << (np.uint64(32) - bits)) | (low >> bits)
    below = (nonzero & (np.arange(width + 3)[:, None] < top - 2)).any(axis=0)
    head |= (((low & ((np.uint64(1) << bits) - np.uint64(1))) != 0) | below).astype(np.uint64)
    exponent = scale + _DIGIT * (top - 4) + bits.astype(np.int64)
    with np.errstate(over="ignore"):
        out = np.ldexp(head.astype(np.float64), exponent) * sign
    for i in np.flatnonzero(found & (np.abs(out) < 2.0**-1021)):  # subnormal: round once
        out[i] = _row_to_float(limbs[i], scale)
    return out


def _row_to_float(digits: np.ndarray, scale: int) -> float:
    """One row of normalized digits (integer times 2**`scale`) rounded to float64."""
    low = int.from_bytes(digits[:-1].astype("<u4").tobytes(), "little")
    return _to_float(low + (int(digits[-1]) << (_DIGIT * (digits.size - 1))), scale)


def _to_float(integer: int, scale: int) -> float:
    """integer · 2**scale rounded to the nearest float64 (±inf beyond the range)."""
    try:
        if scale >= 0:
            return float(integer << scale)
        return integer / (1 << -scale)  # Python's int division rounds correctly
    except OverflowError:
        return float("inf") if integer > 0 else float("-inf")


# ---------------------------------------------------------------- counted adds

_COUNT_BITS = 13  # a counted add recovers each element's count modulo 2**13
_MOST_COUNTED = (1 << _COUNT_BITS) - 1  # values per element (of a lane) between decodes
_FIRST_BITS = 37  # |first piece| <= 2**37 units of its grid
_SECOND_STEP = 46  # the second grid is 2**46 finer: |second piece| <= 2**45 units of it
_COUNTED_CELLS = 4096  # lanes * elements of the int64 sums at most
_COUNTED_LANES = -(-_BLOCK // _MOST_COUNTED)  # the fewest lanes that take a whole block (17)
_COUNTED_ELEMENTS = 1 << 14  # elements at most (each block decodes every element)
_CHECKED_LANES = 4  # with fewer lanes, a whole block is scattered at once and checked

#: a counted sum: (sum, flat indices of the values, its counts to increment, runs or None)
Counted = tuple[ExactSum, np.ndarray, np.ndarray, Runs | None]


@dataclass(frozen=True)
class _Grids:
    """The two grids of a counted add, 2**`grid` and 2**`fine`."""

    grid: int
    fine: int

    @property
    def sigmas(self) -> tuple[float, float]:
        """The extraction constants 1.5 * 2**(grid + 52) and 1.5 * 2**(fine + 52)."""
        return math.ldexp(1.5, self.grid + 52), math.ldexp(1.5, self.fine + 52)

    def bits(self) -> tuple[int, int, int]:
        """The constants' bits as int64, and the inverse modulo 2**13 of the first's odd
        part (the bits of 1.5 * 2**e are 2**51 times an odd number)."""
        first, second = (int(np.float64(s).view(np.int64)) for s in self.sigmas)
        return first, second, pow(first >> 51, -1, 1 << _COUNT_BITS)

    def deposit(self) -> tuple[int, int, int, int]:
        """The grids of the counted totals: high and low halves of each piece's sums."""
        return self.grid + _DIGIT, self.grid, self.fine + _DIGIT, self.fine


def counted_lanes(size: int) -> int:
    """Lanes of the int64 sums of :func:`add_counted` into `size` elements (0 when a
    lane of every element does not fit in its int64 sums, from 4097 elements)."""
    return min(_COUNTED_LANES, _COUNTED_CELLS // max(size, 1))


def add_counted(
    values: np.ndarray,
    targets: list[Counted],
    *,
    bounds: tuple[float, float] | None = None,
    totals: tuple[ExactSum, ...] = (),
) -> None:
    r"""Add `values` to the elements `index` of each `target` and count them into its
    `counts`, in two int64 scatters per target: as many as a count and a plain float64
    sum take; and add their total to each sum of `totals` (of one element: the log loss
    beside the per-class sums).

    `targets` holds ``(target, index, counts, runs)`` (see :data:`Counted`):
    `counts` (int64, ``target``'s shape) is incremented in place by
    ``np.bincount(index)``. The values are split once for every target (the
    equal-width and the fine calibration bins of the same confidences). With
    :math:`|v| < 2^{t}` for every value, the grids :math:`2^{g}`, :math:`g = t
    - 37`, and :math:`2^{f}`, :math:`f = g - 46`, and the extraction constants
    :math:`\sigma_g = 1.5 \cdot 2^{g+52}` and :math:`\sigma_f`: :math:`\tau = v +
    \sigma_g` rounds v to the grid :math:`2^g`, :math:`\tau = \sigma_g + c\,2^g`,
    :math:`|c| \le 2^{37}`, and within the binade of :math:`\sigma_g` the bits of
    :math:`\tau` read as an integer are :math:`S_g + c`; the rest :math:`r = v -
    c\,2^g` gives likewise the bits :math:`S_f + d` of :math:`r + \sigma_f` (one
    rounding of :math:`v + (\sigma_f + \sigma_g - \tau)`, whose bracket is
    exact), :math:`d` the rest rounded to the grid :math:`2^f`, :math:`|d| \le
    2^{45}`. Each element sums those bits modulo :math:`2^{64}`: :math:`A = n S_g
    + \sum c`, :math:`B = n S_f + \sum d`. :math:`S_g` is :math:`2^{51}` times an
    odd number, so :math:`A` holds n times it modulo :math:`2^{13}` above
    :math:`\sum c` (:math:`|\sum c| < 2^{50}` for :math:`n < 2^{13}`): the count
    n comes out, then :math:`\sum c` and :math:`\sum d`, exactly, as long as no
    element (of a lane) gets :math:`2^{13}` values between two decodes. With
    four lanes or more per element, the values are decoded in chunks that no
    element can fill; with fewer (over 1024 elements: the 4096 fine calibration
    bins), a whole block is scattered and decoded at once, and checked: an
    element that got :math:`n \ge 2^{13}` values decodes to a count in
    :math:`[0, 2^{13})`, below n, and no element decodes above its n, so the
    decoded counts sum to the block's size only when every one is right;
    otherwise the block goes again in chunks that no element can fill (and so
    do the later blocks). Without targets, the `totals` get the bits of each
    block's pieces summed modulo :math:`2^{64}`, less the block's size times
    :math:`S_g` and :math:`S_f`. The totals wait in the sums
    (:meth:`ExactSum._hold`). A value below :math:`2^{f+52}` in magnitude may
    have bits below the grid :math:`2^f`: what is left of it goes through
    :func:`add_to_each`.

    With `runs` (the values a (rows, groups) matrix in `runs.order`, the
    elements laid out group after group, ``target.size / groups`` each, and
    ``runs.mode[g]`` an element of group g, the likelier the better), only the
    values not going to their group's mode are scattered; the mode gets the
    group's dense total less those (with one target only; others ignore their
    runs). `bounds`, when certain, spare a min and a max. Non-finite values,
    magnitudes from :math:`2^{1007}` up, and more than 16384 elements take
    ``np.bincount`` and :func:`add_to_each`.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return
    targets = [
        (target, np.asarray(index, dtype=np.int64).ravel(), counts, runs)
        for target, index, counts, runs in targets
    ]
    if bounds is None or not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])):
        bounds = (float(values.min()), float(values.max()))  # NaN if any is
    low, high = bounds
    finite = math.isfinite(low) and math.isfinite(high)
    top = math.frexp(max(high, -low))[1] if finite else 0
    many = max((target.nan.size for target, *_ in targets), default=0) > _COUNTED_ELEMENTS
    if not finite or top - _FIRST_BITS > _MAX_GRID or many:
        each: list[Target] = []
        for target, index, counts, _ in targets:
            count = np.bincount(index, minlength=target.nan.size)
            counts.reshape(-1)[:] += count
            each.append((target, index, int(count.max())))
        add_to_each(values, [*each, *((total, None, None) for total in totals)], bounds=bounds)
        return
    grid = max(top - _FIRST_BITS, _MIN_GRID)
    grids = _Grids(grid, max(grid - _SECOND_STEP, _MIN_GRID))
    one = len(targets) == 1
    counters = [
        _Counted(target.nan.size, grids, _usable(runs, values.size, target) if one else None, i)
        for i, (target, _, _, runs) in enumerate(targets)
    ]
    adders: list[_Counted | _Total] = [*counters] or [_Total(grids)]  # no target: totals alone
    step = min(adder.step for adder in adders)
    sigma, sigma_fine = grids.sigmas
    tails: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for start in range(0, values.size, step):
        part = slice(start, start + step)
        v = values[part]
        wheres = [index[part] for _, index, _, _ in targets] or [_NO_POSITIONS]
        t = work_array("exact split", (v.size,), np.float64)
        bits = t.view(np.int64)
        np.add(v, sigma, out=t)  # bits: S_g + c
        for adder, where in zip(adders, wheres, strict=True):
            adder.first(bits, where, start)
        # r + sigma_f in one rounding, as v + (sigma_f - c 2**g): sigma_f + sigma (a multiple
        # of 2**(g+5) below 2**(g+53)) less tau is sigma_f - c 2**g, exact (|.| < 2**(g+39))
        np.subtract(sigma + sigma_fine, t, out=t)
        t += v  # bits: S_f + d
        for adder, where in zip(adders, wheres, strict=True):
            adder.second(bits, where, v)
        rest, small = _tails(v, grids, bounds)
        if rest.size:
            tails.append((rest, [index[part][small] for _, index, _, _ in targets]))
    for counter, (target, _, counts, _) in zip(counters, targets, strict=True):
        counts.reshape(-1)[:] += counter.count
        target._hold(counter.totals, grids.deposit(), counter.takes)
    first = adders[0]
    for total in totals:  # every element's: exact integers
        total._hold(
            first.totals.sum(axis=1, keepdims=True), grids.deposit(), first.takes * first.size
        )
    if tails:
        rests = np.concatenate([rest for rest, _ in tails])
        wheres = [np.concatenate([at[i] for _, at in tails]) for i in range(len(targets))]
        add_to_each(
            rests,
            [
                *(
                    (target, where, None)
                    for (target, *_), where in zip(targets, wheres, strict=True)
                ),
                *((total, None, None) for total in totals),
            ],
        )


def _usable(runs: Runs | None, size: int, target: ExactSum) -> Runs | None:
    """`runs` if they fit `size` values into `target`'s elements (see :class:`Runs`)."""
    if runs is None or runs.rows * runs.groups != size or target.nan.size % runs.groups:
        return None
    return None if runs.groups > _BLOCK else runs


def _tails(
    values: np.ndarray, grids: _Grids, bounds: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """What is left below the fine grid of the values under 2**(fine + 52) (non-zero
    only), and their positions."""
    fine = grids.fine
    if fine == _MIN_GRID:  # every float64 is a multiple of 2**-1074
        return _EMPTY, _NO_POSITIONS
    whole = math.ldexp(1.0, fine + 52)
    low, high = bounds
    if low >= whole or high <= -whole:
        return _EMPTY, _NO_POSITIONS
    if low >= 0:
        if float(values.min()) >= whole:
            return _EMPTY, _NO_POSITIONS
        small = np.flatnonzero(values < whole)
    elif high <= 0:
        if float(values.max()) <= -whole:
            return _EMPTY, _NO_POSITIONS
        small = np.flatnonzero(values > -whole)
    else:
        small = np.flatnonzero(np.abs(values) < whole)
    sigma, sigma_fine = grids.sigmas
    v = values[small]
    rest = v - ((v + sigma) - sigma)
    rest -= (rest + sigma_fine) - sigma_fine
    keep = np.flatnonzero(rest)
    return rest[keep], small[keep]


_NO_POSITIONS = np.empty(0, dtype=np.int64)


class _Total:
    """The int64 sums of :func:`add_counted` without counted targets (a sum of one element,
    `totals` alone): the bits of each block's pieces are summed (modulo 2**64), less the
    block's size times the constants' bits; with the interface of :class:`_Counted`."""

    size = 1

    def __init__(self, grids: _Grids) -> None:
        self.first_bits, self.second_bits, _ = grids.bits()
        self.totals = np.zeros((4, 1), dtype=np.int64)
        self.takes = 0  # numbers below 2**32 in magnitude summed into each of `totals`
        self.first_sum = 0  # the block's first pieces' bits, summed modulo 2**64

    @property
    def step(self) -> int:
        """Values per block: at most 2**17, so that the sums of their pieces stay below
        2**63 in magnitude."""
        return min(_BLOCK, 1 << 17)

    def first(self, bits: np.ndarray, where: np.ndarray, start: int) -> None:
        self.first_sum = int(np.add.reduce(bits))

    def second(self, bits: np.ndarray, where: np.ndarray, values: np.ndarray) -> None:
        n = bits.size  # |sum of c| <= 2**(17 + 37), |sum of d| <= 2**(17 + 45)
        sums = (
            self.first_sum - n * self.first_bits,
            int(np.add.reduce(bits)) - n * self.second_bits,
        )
        self.takes += 1
        for row, total in enumerate(sums):
            total = (total + (1 << 63)) % (1 << 64) - (1 << 63)  # the sum modulo 2**64, signed
            self.totals[2 * row, 0] += total >> _DIGIT
            self.totals[2 * row + 1, 0] += total & _MASK


class _Counted:
    """The int64 sums of one counted target of :func:`add_counted`, decoded into exact
    totals.

    `sums` (2, lanes * size) takes the bits of the two pieces of each value
    (the i-th value of a scatter in lane ``i % lanes``). Decoded, they give
    each element's count, added to `count`, and the sums of its pieces, split
    into 32-bit halves (a decode adds less than 2**32 to a low half) and added
    to `totals`: high and low halves of the first pieces' sums, then of the
    second's, on the grids of :meth:`_Grids.deposit`. A block's first pieces
    come (:meth:`first`) before its second (:meth:`second`), which reuse their
    lanes; with fewer than four lanes (many elements), whole blocks are
    scattered and checked (`checked`) until one fails the check. The
    `position` of the target names its work array of laned indices.
    """

    def __init__(self, size: int, grids: _Grids, runs: Runs | None, position: int) -> None:
        lanes = max(counted_lanes(size), 1)
        self.size, self.lanes, self.grids, self.runs = size, lanes, grids, runs
        self.checked = lanes < _CHECKED_LANES
        self.capacity = min(lanes * _MOST_COUNTED, _BLOCK)  # `laned` takes _BLOCK at most
        self.work = f"exact lanes {position}"
        self.sums = np.zeros((2, lanes * size), dtype=np.int64)
        self.count = np.zeros(size, dtype=np.int64)
        self.totals = np.zeros((4, size), dtype=np.int64)
        self.takes = 0  # numbers below 2**32 in magnitude summed into each of `totals`
        self.first_bits, self.second_bits, self.inverse = grids.bits()
        self.spread = _NO_POSITIONS  # the block's laned indices, between its two pieces
        self.saved: np.ndarray | None = None  # or its first pieces, to go in chunks
        self.picks: tuple[np.ndarray, ...] = ()  # with runs: the block's picks, its first
        # pieces' dense sums by group and the picked values' first pieces

    @property
    def step(self) -> int:
        """Values per block: whole rows with "C" runs, a chunk that no element can fill
        without a check, else ``_BLOCK``."""
        runs = self.runs
        if runs is not None:
            return max(_BLOCK // runs.groups, 1) * runs.groups if runs.order == "C" else _BLOCK
        return _BLOCK if self.checked else self.capacity

    def first(self, bits: np.ndarray, where: np.ndarray, start: int) -> None:
        """The bits of a block's first pieces (a block from position `start` of the values),
        to go with its second pieces."""
        runs = self.runs
        if runs is not None:
            picked, groups, cuts, lengths = _picks(where, runs, start)
            self.picks = (
                picked,
                groups,
                cuts,
                lengths,
                _group_sums(bits, runs, cuts),
                bits[picked],
            )
            return
        if not self.checked and where.size > self.capacity:  # a check failed: chunks
            self.saved = bits.copy()
            return
        self.spread = laned(
            where, self.size, self.lanes, out=work_array(self.work, where.shape, np.int64)
        )
        np.add.at(self.sums[0], self.spread, bits)

    def second(self, bits: np.ndarray, where: np.ndarray, values: np.ndarray) -> None:
        """The bits of the block's second pieces: its totals are taken (`values`: the block's
        values, should a checked block go again in chunks)."""
        runs = self.runs
        if runs is not None:
            picked, groups, cuts, lengths, dense, taken = self.picks
            self.picks = ()
            self._take(
                *self._modes(
                    where[picked],
                    [taken, bits[picked]],
                    [dense, _group_sums(bits, runs, cuts)],
                    runs,
                    groups,
                    lengths,
                )
            )
            return
        if self.saved is not None:
            self._chunks(where, self.saved, bits)
            self.saved = None
            return
        np.add.at(self.sums[1], self.spread, bits)
        n, sums = self._decode()
        if self.checked and int(n.sum()) != where.size:
            # an element got 2**13 values or more: the block again, and later ones, in chunks
            self.checked = False
            first = work_array("exact again", values.shape, np.float64)
            np.add(values, self.grids.sigmas[0], out=first)  # the first pieces again
            self._chunks(where, first.view(np.int64), bits)
            return
        self._take(n, sums)

    def _chunks(self, where: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
        """Scatter and take the pieces' bits in chunks of `capacity`."""
        for start in range(0, where.size, self.capacity):
            part = slice(start, start + self.capacity)
            self._chunk(where[part], first[part], second[part])
            self._take(*self._decode())

    def _chunk(self, where: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
        """np.add.at of both pieces' bits over the lanes of the elements `where`."""
        spread = laned(
            where, self.size, self.lanes, out=work_array(self.work, where.shape, np.int64)
        )
        np.add.at(self.sums[0], spread, first)
        np.add.at(self.sums[1], spread, second)

    def _modes(
        self,
        where: np.ndarray,
        taken: list[np.ndarray],
        dense: list[np.ndarray],
        runs: Runs,
        groups: np.ndarray,
        length: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A block's totals with runs: the picked values scattered, and each group's mode
        given the group's dense total less them (modulo 2**64: every total is below 2**63)."""
        n, sums = self._picked(where, taken[0], taken[1])
        mode = runs.mode[groups]
        width = self.size // runs.groups
        for total, group_sums, constant in (
            (sums[0], dense[0], self.first_bits),
            (sums[1], dense[1], self.second_bits),
        ):
            others = total.reshape(runs.groups, width).sum(axis=1)[groups]
            total[mode] += group_sums - length * np.int64(constant) - others
        n[mode] += length - n.reshape(runs.groups, width).sum(axis=1)[groups]
        return n, sums

    def _picked(
        self, where: np.ndarray, first: np.ndarray, second: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scatter the picked values' bits in chunks of `capacity`, decoding each."""
        n, sums = np.zeros(self.size, dtype=np.int64), np.zeros((2, self.size), dtype=np.int64)
        for start in range(0, where.size, self.capacity):
            part = slice(start, start + self.capacity)
            self._chunk(where[part], first[part], second[part])
            more, more_sums = self._decode()
            n += more
            sums += more_sums
        return n, sums

    def _decode(self) -> tuple[np.ndarray, np.ndarray]:
        """Each element's count, and the sums of its first and of its second pieces
        (integers, shape (2, size)); the int64 sums are emptied."""
        a, b = self.sums
        q = (a.view(np.uint64) + np.uint64(1 << 50)) >> np.uint64(51)  # n * odd mod 2**13
        n = ((q * np.uint64(self.inverse)) & np.uint64(_MOST_COUNTED)).view(np.int64)
        a -= (q << np.uint64(51)).view(np.int64)  # the first pieces' sums: |.| < 2**50
        b -= n * np.int64(self.second_bits)  # the second's, modulo 2**64: |.| < 2**58
        if self.lanes == 1:
            sums = self.sums.copy()
        else:
            n = n.reshape(self.lanes, self.size).sum(axis=0)
            sums = self.sums.reshape(2, self.lanes, self.size).sum(axis=1)
        self.sums[...] = 0
        return n, sums

    def _take(self, n: np.ndarray, sums: np.ndarray) -> None:
        """Add a block's counts and sums of pieces (each below 2**63 in magnitude): the high
        and low halves of both into the rows of `totals`."""
        self.takes += 1
        self.count += n
        halves = self.totals.reshape(2, 2, self.size)  # (piece, half, element): a view
        halves[:, 0] += sums >> _DIGIT
        halves[:, 1] += sums & _MASK


def _picks(
    where: np.ndarray, runs: Runs, start: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The positions of a block (from position `start` of the runs' values) whose element is
    not their group's mode; the groups in the block, where each starts and how many values
    it has there."""
    groups = runs.groups
    mask = work_array("exact left", where.shape, np.bool_)
    if runs.order == "C":  # whole rows: value i of the block is in group i % groups
        rows = where.size // groups
        np.not_equal(where.reshape(rows, groups), runs.mode, out=mask.reshape(rows, groups))
        every = np.arange(groups)
        return np.flatnonzero(mask), every, np.zeros_like(every), np.full(groups, rows)
    first = np.arange(start // runs.rows, (start + where.size - 1) // runs.rows + 1)
    cuts = np.maximum(first * runs.rows - start, 0)
    lengths = np.diff(np.append(cuts, where.size))
    if first.size <= _FEW_RUNS:
        for g, a, b in zip(first.tolist(), cuts.tolist(), (cuts + lengths).tolist(), strict=True):
            np.not_equal(where[a:b], runs.mode[g], out=mask[a:b])
    else:
        np.not_equal(where, np.repeat(runs.mode[first], lengths), out=mask)
    return np.flatnonzero(mask), first, cuts, lengths


def _group_sums(bits: np.ndarray, runs: Runs, cuts: np.ndarray) -> np.ndarray:
    """The int64 sums (modulo 2**64) of a block's bits by group (see :func:`_picks`)."""
    if runs.order == "C":
        return bits.reshape(-1, runs.groups).sum(axis=0)
    return np.add.reduceat(bits, cuts)
