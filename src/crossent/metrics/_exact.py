r"""Exact sums of float64 values: integer fixed-point limbs, one rounding at the end.

Every finite float64 is an integer times a power of two,
:math:`x = M\,2^{E}` with :math:`|M| < 2^{53}` and :math:`E \ge -1126`, so a
sum of float64 values is an integer multiple of :math:`2^{B}`,
:math:`B = -1138`. :class:`ExactSum` keeps that integer in base
:math:`2^{32}`: ``limbs[..., j]`` is digit ``lo + j``, worth
:math:`2^{B + 32(lo + j)}`, in an int64 (so 31 bits of headroom absorb the
carries of a whole batch). Adding a batch splits each value's mantissa into
three digits and adds them with ``np.bincount`` (float64 weights below
:math:`2^{53}`, so every count is exact), then propagates the carries; the
window ``[lo, lo + L)`` of digits grows only as far as the values seen need
(a few digits for losses and probabilities; 70 cover the whole float64
range). NaN and ±inf are counted apart and give NaN / ±inf as float
summation would.

Because the state is the exact sum, it does not depend on the order of the
rows, on how they were split into batches or shards, or on the order in
which shards merge; :meth:`ExactSum.value` rounds it to the nearest float64
once (ties to even, Python's correctly rounded int division). Merging two
states, and ``all_reduce(SUM)`` of states padded to a common window (digits
in [0, 2³²) summed over fewer than 2³¹ ranks), add integers and are exact.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ExactSum"]

_BASE = -1138  # exponent of digit 0's lowest bit: below 2**-1126, the lowest mantissa bit
_DIGIT = 32
_MASK = (1 << _DIGIT) - 1
_HEADROOM = 2  # digits above the highest one written, for carries
_LEVEL = 38  # bits extracted per pass over the values: two passes cover 76 bits
_CHUNK = 1 << 14  # values per float64 sum: 2**14 multiples of up to 2**38 units stay below 2**53
_BLOCK = 1 << 17  # values extracted at a time (two 1 MiB work arrays)
_MIN_GRID = -1074  # every float64 is a multiple of 2**-1074
_MAX_GRID = 1022 - 52  # the largest grid whose extraction constant 1.5 * 2**(g+52) is finite


@dataclass
class ExactSum:
    """Element-wise exact sums of float64 values over an array of shape `shape`.

    ``limbs`` has shape ``shape + (L,)``; after :meth:`_normalize` every digit
    but the last is in ``[0, 2**32)`` and the last is signed. ``nan``,
    ``pos_inf`` and ``neg_inf`` count the non-finite values added.
    """

    limbs: np.ndarray
    lo: int
    nan: np.ndarray
    pos_inf: np.ndarray
    neg_inf: np.ndarray

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
            self.limbs.copy(), self.lo, self.nan.copy(), self.pos_inf.copy(), self.neg_inf.copy()
        )

    def __getitem__(self, key: Any) -> ExactSum:
        """The sums of some elements (indexing the leading axes)."""
        return ExactSum(
            np.asarray(self.limbs[key]),
            self.lo,
            np.asarray(self.nan[key]),
            np.asarray(self.pos_inf[key]),
            np.asarray(self.neg_inf[key]),
        )

    # ---------------------------------------------------------------- adding

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
        pad = [(0, 0)] * self.ndim + [(self.lo - new_lo, new_hi - self.lo - size)]
        self.limbs = np.pad(self.limbs, pad)
        self.lo = new_lo

    def _normalize(self) -> None:
        """Carry every digit but the last into [0, 2**32)."""
        limbs = self.limbs
        for j in range(limbs.shape[-1] - 1):
            carry = limbs[..., j] >> _DIGIT  # floor division: negative digits borrow
            limbs[..., j] -= carry << _DIGIT
            limbs[..., j + 1] += carry

    def add(self, values: np.ndarray, index: np.ndarray | None = None) -> ExactSum:
        """Add `values` (float64) to the elements `index` (flat indices; element 0 if None).

        Returns ``self``. Long inputs go in blocks of ``_BLOCK`` values, so the
        work arrays stay small (and in cache).
        """
        values = np.asarray(values, dtype=np.float64).ravel()
        flat_index = None if index is None else np.asarray(index, dtype=np.int64).ravel()
        for start in range(0, values.size, _BLOCK):
            part = slice(start, start + _BLOCK)
            self._add_block(values[part], None if flat_index is None else flat_index[part])
        return self

    def _add_block(self, values: np.ndarray, flat_index: np.ndarray | None) -> None:
        size = int(np.prod(self.shape, dtype=np.int64))
        amax = max(float(np.max(values)), -float(np.min(values)))  # NaN or inf if any is
        if not math.isfinite(amax):
            where = np.zeros(values.size, dtype=np.int64) if flat_index is None else flat_index
            for counts, hit in (
                (self.nan, np.isnan(values)),
                (self.pos_inf, values == np.inf),
                (self.neg_inf, values == -np.inf),
            ):
                counts += np.bincount(where[hit], minlength=size).reshape(self.shape)
            finite = np.isfinite(values)
            values = values[finite]
            flat_index = None if flat_index is None else flat_index[finite]
            amax = float(np.max(np.abs(values))) if values.size else 0.0
        if amax == 0:
            return
        top = math.frexp(amax)[1]  # every |value| < 2**top
        if top - _LEVEL > _MAX_GRID:
            where = np.zeros(values.size, dtype=np.int64) if flat_index is None else flat_index
            self._add_split(values, where, size)
            return
        self._widen(*self._digits(top - 1))
        chunk = _CHUNK
        if flat_index is not None:  # one exact bincount per pass if no element gets too many
            most = int(np.bincount(flat_index, minlength=size).max())
            chunk = values.size if most <= _CHUNK else _CHUNK
        q, rest = _scratch(values.size)
        np.copyto(rest, values)
        grid = max(top - _LEVEL, _MIN_GRID)
        while True:
            # error-free extraction (Rump, Ogita & Oishi's ExtractScalar): sigma + rest lies in
            # [2**(g+52), 2**(g+53)), where floats are 2**g apart, so q is rest rounded to a
            # multiple of 2**g and rest - q is exact; |q| <= 2**(g+38) (|rest| << 2**(g+51))
            sigma = math.ldexp(1.5, grid + 52)
            np.add(rest, sigma, out=q)
            q -= sigma
            rest -= q
            self._add_multiples(q, flat_index, grid, size, chunk=chunk)
            if grid == _MIN_GRID:
                break
            left = int(np.count_nonzero(rest))
            if left == 0:
                break
            if 2 * left < rest.size:  # the next passes see only what is left
                live = np.flatnonzero(rest)
                rest, q = rest[live], q[:left]
                flat_index = None if flat_index is None else flat_index[live]
            grid = max(grid - _LEVEL, _MIN_GRID)
        self._normalize()

    @staticmethod
    def _digits(bit: int) -> tuple[int, int]:
        """The digit window [lo, hi) that holds a value whose top bit is 2**`bit`, and carries."""
        digit = (bit - _BASE) // _DIGIT
        return digit, digit + 1 + _HEADROOM

    def _add_multiples(
        self,
        q: np.ndarray,
        index: np.ndarray | None,
        grid: int,
        size: int,
        *,
        units: bool = False,
        chunk: int = _CHUNK,
    ) -> None:
        """Add `q` (float64 multiples of 2**`grid`, |q| <= 2**(grid+38)) to elements `index`.

        With `units`, `q` holds the integers q / 2**`grid` instead (for grids
        below the float64 range).

        Sums of at most ``_CHUNK`` of them per element are exact in float64
        (below 2**52 units of 2**`grid`, in any order); `chunk` values go in
        one ``bincount`` (the caller may pass more than ``_CHUNK`` when no
        element gets more than ``_CHUNK`` of them). Each sum is an integer T,
        added into the digits as T·2**(grid−B), split at the digit boundaries.
        """
        position = grid - _BASE
        digit, shift = position // _DIGIT, position % _DIGIT
        self._widen(digit, digit + 3)
        limbs = self.limbs.reshape(size, self.limbs.shape[-1])  # a view
        at = digit - self.lo
        for start in range(0, q.size, chunk):
            if start:
                self._normalize()  # room for the next chunk's sums
            part = slice(start, start + chunk)
            if index is None:
                total = np.sum(q[part], keepdims=True)
            else:
                total = np.bincount(index[part], weights=q[part], minlength=size)
            t = (total if units else np.ldexp(total, -grid)).astype(np.int64)  # |t| < 2**52
            low = (t & _MASK) << shift  # < 2**63
            high = (t >> _DIGIT) << shift  # |.| < 2**52
            limbs[:, at] += low & _MASK
            limbs[:, at + 1] += (low >> _DIGIT) + (high & _MASK)
            limbs[:, at + 2] += high >> _DIGIT

    def _add_split(self, values: np.ndarray, flat_index: np.ndarray, size: int) -> None:
        """Add values of any magnitude: each mantissa split into three integer digits.

        The path for values from 2**974 up, whose extraction constant would overflow.
        """
        nonzero = values != 0
        values, flat_index = values[nonzero], flat_index[nonzero]
        mantissa, exponent = np.frexp(values)
        m = (mantissa * 2.0**53).astype(np.int64)  # exact: |mantissa| < 1
        position = exponent.astype(np.int64) - 53 - _BASE  # >= 12 for the smallest subnormal
        digit = position >> 5
        shift = position & (_DIGIT - 1)
        self._widen(int(digit.min()), int(digit.max()) + 3 + _HEADROOM)
        sign = np.where(m < 0, -1, 1)
        a = np.abs(m)
        low = (a & _MASK) << shift  # < 2**63
        high = (a >> _DIGIT) << shift  # < 2**52
        parts = (
            sign * (low & _MASK),
            sign * ((low >> _DIGIT) + (high & _MASK)),
            sign * (high >> _DIGIT),
        )
        for offset, part in enumerate(parts):
            for level in np.unique(digit):
                chosen = digit == level
                grid = _BASE + _DIGIT * (int(level) + offset)
                units = part[chosen].astype(np.float64)  # integers below 2**33
                self._add_multiples(units, flat_index[chosen], grid, size, units=True)
        self._normalize()

    def merge(self, other: ExactSum) -> ExactSum:
        """The exact sum of both (a new object)."""
        if other.shape != self.shape:
            msg = f"cannot add exact sums of shapes {self.shape} and {other.shape}."
            raise ValueError(msg)
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
        out = np.zeros(self.shape, dtype=np.float64)
        flat = out.reshape(-1)
        width = self.limbs.shape[-1]
        if width:
            limbs = self.limbs.reshape(-1, width)
            scale = _BASE + _DIGIT * self.lo
            for i in np.flatnonzero(np.any(limbs != 0, axis=-1)):
                digits = limbs[i]
                low = int.from_bytes(digits[:-1].astype("<u4").tobytes(), "little")
                integer = low + (int(digits[-1]) << (_DIGIT * (width - 1)))
                flat[i] = _to_float(integer, scale)
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
        if self.limbs.shape[-1] == 0:
            self.lo = lo
            self.limbs = np.zeros((*self.shape, hi - lo), dtype=np.int64)
        else:
            self._widen(lo, hi)

    def window(self) -> tuple[int, int] | None:
        """Digits [lo, hi) in use, None when no finite non-zero value was added."""
        width = self.limbs.shape[-1]
        return None if width == 0 else (self.lo, self.lo + width)


_SCRATCH = threading.local()


def _scratch(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 work arrays of `size` (at most ``_BLOCK``), reused by the thread."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.shape[1] < size:
        buffer = np.empty((2, size), dtype=np.float64)
        _SCRATCH.buffer = buffer
    return buffer[0, :size], buffer[1, :size]


def _to_float(integer: int, scale: int) -> float:
    """integer · 2**scale rounded to the nearest float64 (±inf beyond the range)."""
    try:
        if scale >= 0:
            return float(integer << scale)
        return integer / (1 << -scale)  # Python's int division rounds correctly
    except OverflowError:
        return float("inf") if integer > 0 else float("-inf")
