"""ExactSum: the exact sum of float64 values, rounded once, whatever the order and grouping."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction
from typing import Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossent.metrics._exact import ExactSum

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
values = st.lists(
    st.one_of(finite, st.floats(min_value=-1e-300, max_value=1e-300), st.sampled_from([5e-324])),
    max_size=40,
)


def _reference(xs: list[float]) -> float:
    """The exact sum as a Fraction, rounded once (Fraction -> float rounds correctly)."""
    total = sum((Fraction(x) for x in xs), Fraction(0))
    try:
        return float(total)
    except OverflowError:
        return math.inf if total > 0 else -math.inf


@given(xs=values, cut=st.integers(0, 40))
def test_the_sum_is_the_exact_sum_rounded_once(xs: list[float], cut: int) -> None:
    want = _reference(xs)
    got = float(ExactSum.zeros().add(np.array(xs, dtype=np.float64)))
    assert got == want or (math.isnan(got) and math.isnan(want))
    # split in two and merged either way: the same bits
    a = ExactSum.zeros().add(np.array(xs[:cut], dtype=np.float64))
    b = ExactSum.zeros().add(np.array(xs[cut:], dtype=np.float64))
    assert float(a.merge(b)) == got
    assert float(b.merge(a)) == got


def test_where_float_summation_loses_everything() -> None:
    xs = np.array([1e308, 1.0, -1e308, 2.0**-1074, 1e-300])
    assert float(ExactSum.zeros().add(xs)) == 1.0 + 1e-300  # the 1.0 is lost in np.sum
    assert np.sum(xs) != 1.0
    big = np.array([1e308, 1e308, -1e308])  # the partial sum overflows; the sum does not
    assert float(ExactSum.zeros().add(big)) == 1e308


def test_non_finite_values_behave_as_in_float_summation() -> None:
    def total(*xs: float) -> float:
        return float(ExactSum.zeros().add(np.array(xs)))

    assert total(1.0, math.inf) == math.inf
    assert total(1.0, -math.inf) == -math.inf
    assert math.isnan(total(math.inf, -math.inf))
    assert math.isnan(total(1.0, math.nan))
    assert total(1e308, 1e308) == math.inf  # beyond float64: overflows on rounding
    assert total() == 0.0


def test_element_wise_sums_regroup_and_slice() -> None:
    rng = np.random.default_rng(0)
    xs = rng.normal(size=2000) * 10.0 ** rng.integers(-20, 20, size=2000)
    index = rng.integers(0, 12, size=2000)
    s = ExactSum.zeros((3, 4)).add(xs, index)
    want = np.array([_reference(xs[index == k].tolist()) for k in range(12)]).reshape(3, 4)
    np.testing.assert_array_equal(s.value(), want)
    np.testing.assert_array_equal(s[1].value(), want[1])
    groups = np.array([[0, 1, 1, 0]] * 3)
    grouped = s.regroup(groups, 2).value()
    for r in range(3):
        for g in range(2):
            members = (index // 4 == r) & (groups[r][index % 4] == g)
            assert grouped[r, g] == _reference(xs[members].tolist())


def test_pickle_and_copy_keep_the_exact_state() -> None:
    s = ExactSum.zeros((2,)).add(np.array([0.1, 0.2, 1e-320]), np.array([0, 1, 1]))
    clone = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(clone.value(), s.value())
    clone.add(np.array([1.0]), np.array([0]))
    assert s.value()[0] == 0.1  # the original is untouched
    with pytest.raises(ValueError, match="shapes"):
        s.merge(ExactSum.zeros((3,)))


@pytest.mark.parametrize("crowded", [False, True])
def test_many_elements_and_many_values_per_element(crowded: bool) -> None:
    """One bincount per block when no element gets over 2**14 values, chunks otherwise."""
    rng = np.random.default_rng(1)
    n, size = 150_000, 3000  # more than one block of 2**17 values
    xs = rng.random(n) * 10.0 ** rng.integers(-12, 3, size=n)
    index = rng.integers(0, size, size=n)
    if crowded:
        index[:40_000] = 7  # 40,000 values into one element: over 2**14 per block
    s = ExactSum.zeros((size,)).add(xs, index)
    got = s.value()
    for k in (0, 7, 1234, size - 1):
        assert got[k] == math.fsum(xs[index == k].tolist())  # fsum rounds the exact sum once


# ---------------------------------------------------------------- adversarial inputs


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).view(np.int64)


def _exact_by_element(xs: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    return np.array([_reference(xs[index == k].tolist()) for k in range(size)])


def _adversarial(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = 3000
    if kind == "cancellation":  # huge terms that cancel to the last bit, and tiny ones
        big = rng.normal(size=n // 3) * 1e300
        return rng.permutation(np.concatenate([big, -big, rng.normal(size=n // 3) * 1e-300]))
    if kind == "subnormal":
        return rng.integers(-(2**40), 2**40, size=n) * 5e-324
    if kind == "whole_range":  # every exponent: many grids and rounds
        return rng.normal(size=n) * 2.0 ** rng.integers(-1074, 1000, size=n)
    if kind == "huge":  # beyond the extraction constant's range
        return rng.choice([1.7976931348623157e308, -1.7976931348623157e308, 2.0**1020, -3.0], n)
    # probabilities with full mantissas, from 1 down to 1e-300
    return rng.random(n) * 10.0 ** rng.integers(-300, 1, size=n)


@pytest.mark.parametrize(
    "kind", ["cancellation", "subnormal", "whole_range", "huge", "probabilities"]
)
def test_adversarial_sums_are_exact_and_independent_of_order(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    xs = _adversarial(kind, rng)
    size = 5
    index = rng.integers(0, size, size=xs.size)
    want = _exact_by_element(xs, index, size)
    got = ExactSum.zeros((size,)).add(xs, index).value()
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert float(ExactSum.zeros().add(xs)) == _reference(xs.tolist())
    # shards in a random order and merged in a random tree: the same bits
    cuts = np.sort(rng.integers(0, xs.size, size=6))
    shards = [
        ExactSum.zeros((size,)).add(xs[a:b], index[a:b])
        for a, b in zip([0, *cuts], [*cuts, xs.size], strict=True)
    ]
    while len(shards) > 1:
        i, j = sorted(rng.choice(len(shards), size=2, replace=False))
        right, left = shards.pop(j), shards.pop(i)
        shards.append(right.merge(left) if rng.random() < 0.5 else left.merge(right))
    np.testing.assert_array_equal(_bits(shards[0].value()), _bits(want))


def test_many_values_per_element_and_long_inputs_across_partial_sums() -> None:
    """Over 2**17 values into one element (partial sums go into the digits mid-call)."""
    rng = np.random.default_rng(3)
    n = 300_000
    xs = rng.random(n) * 10.0 ** rng.integers(-20, 3, size=n)
    index = np.where(rng.random(n) < 0.9, 0, rng.integers(0, 4, size=n))
    got = ExactSum.zeros((4,)).add(xs, index).value()
    for k in range(4):
        assert got[k] == math.fsum(xs[index == k].tolist())
    counts = np.bincount(index, minlength=4)
    bounded = ExactSum.zeros((4,)).add(xs, index, most=int(counts.max())).value()
    np.testing.assert_array_equal(bounded, got)
    assert float(ExactSum.zeros().add(xs)) == math.fsum(xs.tolist())


def test_partial_sums_stay_exact_when_every_value_is_near_the_largest() -> None:
    """Pieces of the full 35 bits add up to 2**52 units per partial sum, never more."""
    rng = np.random.default_rng(5)
    xs = 1.0 - rng.random(300_000) * 2.0**-12  # full mantissas just below 1
    assert float(ExactSum.zeros().add(xs)) == math.fsum(xs.tolist())
    index = (rng.random(xs.size) < 0.05).astype(np.int64)  # 95 % into element 0
    got = ExactSum.zeros((2,)).add(xs, index).value()
    assert got.tolist() == [math.fsum(xs[index == k].tolist()) for k in (0, 1)]


@pytest.mark.parametrize("per_element", [1, 3, 40, 5000])
def test_few_values_per_element_take_wider_pieces(per_element: int) -> None:
    """`most` values per element: pieces of 52 - log2(most) bits, still exact."""
    rng = np.random.default_rng(per_element)
    size = max(20_000 // per_element, 2)
    index = np.repeat(np.arange(size), per_element)
    xs = 1.0 - rng.random(index.size) * 2.0**-12  # full pieces: the partial sums at their bound
    got = ExactSum.zeros((size,)).add(xs, index, most=per_element).value()
    for k in rng.choice(size, size=min(size, 50), replace=False):
        assert got[k] == math.fsum(xs[index == k].tolist())


def test_non_finite_values_propagate_per_element() -> None:
    xs = np.array([1.0, math.inf, 2.0, math.nan, -math.inf, math.inf, 5.0, -0.0])
    index = np.array([0, 1, 2, 2, 3, 3, 4, 5])
    got = ExactSum.zeros((6,)).add(xs, index).value()
    assert got[0] == 1.0
    assert got[1] == math.inf
    assert math.isnan(got[2])  # NaN wins
    assert math.isnan(got[3])  # inf - inf
    assert got[4] == 5.0
    assert got[5] == 0.0
    # merged in either order, the non-finite counts add
    a = ExactSum.zeros((6,)).add(xs[:3], index[:3])
    b = ExactSum.zeros((6,)).add(xs[3:], index[3:])
    for merged in (a.merge(b), b.merge(a)):
        np.testing.assert_array_equal(_bits(merged.value()), _bits(got))


@pytest.mark.parametrize(
    ("xs", "want"),
    [
        ([2.0**53, 1.0], 2.0**53),  # a tie: to even
        ([2.0**53, 1.0, 2.0**-1074], 2.0**53 + 2),  # just above the tie
        ([2.0**53 + 2, 1.0], 2.0**53 + 4),  # a tie from an odd mantissa: up
        ([2.0**-1022, -(2.0**-1074)], 2.0**-1022 - 2.0**-1074),  # a subnormal result
        ([2.0**-1060, 2.0**-1074, 2.0**-1074], 2.0**-1060 + 2.0**-1073),
        ([1.7976931348623157e308, 2.0**969], 1.7976931348623157e308),  # below half an ulp
        ([1.7976931348623157e308, 2.0**970], math.inf),  # a tie past the largest float
        ([1e308, 1e308, -1e308, -1e308, 1e-300], 1e-300),
    ],
)
def test_rounding_once_at_the_end(xs: list[float], want: float) -> None:
    assert float(ExactSum.zeros().add(np.array(xs))) == want
    assert _reference(xs) == want


def _digits(integer: int, width: int) -> list[int]:
    """`integer` as `width` base-2**32 digits, the top one signed (ExactSum's layout)."""
    digits = []
    for _ in range(width - 1):
        digits.append(integer & 0xFFFFFFFF)
        integer >>= 32
    return [*digits, integer]


ties = st.builds(  # q * 2**k + 2**(k-1) (+ 0, 1 or -1): exactly or nearly half an ulp
    lambda q, k, d, negative: (-1) ** negative * (q * 2**k + 2 ** (k - 1) + d),
    st.integers(2**52, 2**53 - 1),
    st.integers(1, 200),
    st.sampled_from([0, 0, 1, -1]),
    st.booleans(),
)


@given(
    integers=st.lists(st.one_of(st.integers(-(2**300), 2**300), ties), min_size=1, max_size=40),
    extra=st.integers(0, 3),
    lo=st.integers(-1, 70),
)
def test_digits_round_like_python_int_division(integers: list[int], extra: int, lo: int) -> None:
    """value() rounds the digits of many sums at once (uint64, round to odd): exact division."""
    width = max(abs(i).bit_length() for i in integers) // 32 + 1 + extra
    limbs = np.array([_digits(i, width) for i in integers], dtype=np.int64)
    zeros = np.zeros(len(integers), dtype=np.int64)
    got = ExactSum(limbs, lo, zeros, zeros.copy(), zeros.copy()).value()
    scale = -1138 + 32 * lo
    for integer, value in zip(integers, got.tolist(), strict=True):
        try:
            want = float(Fraction(integer) * Fraction(2) ** scale)
        except OverflowError:
            want = math.inf if integer > 0 else -math.inf
        assert value == want, integer


def test_many_sums_round_once_in_the_subnormal_range() -> None:
    """Rounded to 53 bits first, (2**40 + 1.5 - 2**-60) * 2**-1074 would tie and go up."""
    near_tie = (2**40 + 1) * 2**64 + 2**63 - 2**4  # times 2**-1138
    integers = [near_tie, -near_tie, 3, 2**70 + 1, *range(2**64, 2**64 + 20)]
    width = 4
    limbs = np.array([_digits(i, width) for i in integers], dtype=np.int64)
    zeros = np.zeros(len(integers), dtype=np.int64)
    got = ExactSum(limbs, 0, zeros, zeros.copy(), zeros.copy()).value()
    want = [float(Fraction(i) * Fraction(2) ** -1138) for i in integers]
    assert got.tolist() == want
    assert got[0] == (2**40 + 1) * 5e-324


def test_carries_are_propagated_before_any_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deposits pile up in the digits between carries; every reader carries first."""
    from crossent.metrics import _exact

    rng = np.random.default_rng(4)
    parts = [rng.random(50) * 10.0 ** rng.integers(-30, 30, size=50) for _ in range(40)]
    index = [rng.integers(0, 3, size=50) for _ in range(40)]
    lazy = ExactSum.zeros((3,))
    for xs, at in zip(parts, index, strict=True):
        lazy.add(xs, at)
    assert lazy.uncarried > 0
    monkeypatch.setattr(_exact, "_CARRY_EVERY", 1)
    eager = ExactSum.zeros((3,))
    for xs, at in zip(parts, index, strict=True):
        eager.add(xs, at)
    assert eager.uncarried == 0
    everything, where = np.concatenate(parts), np.concatenate(index)
    want = _exact_by_element(everything, where, 3)
    for s in (lazy, eager):
        np.testing.assert_array_equal(_bits(s.copy().value()), _bits(want))
        np.testing.assert_array_equal(_bits(s[1:].value()), _bits(want[1:]))
        np.testing.assert_array_equal(
            s.regroup(np.array([0, 1, 0]), 2).value(),
            [_reference(everything[where != 1].tolist()), want[1]],
        )
    lazy.pad_to(*lazy.window())  # type: ignore[misc]
    assert lazy.uncarried == 0
    assert np.all((lazy.limbs[:, :-1] >= 0) & (lazy.limbs[:, :-1] < 2**32))


# ---------------------------------------------------------------- the fast paths of add()


def _tiny_among_large(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Full-mantissa values near 1 with some far below: the rests that go round again."""
    n = 20_000
    xs = 1.0 - rng.random(n) * 0.5
    if kind == "many_equal":  # one value, many times: partial sums at their bound
        return np.full(n, 1.0 - 2.0**-52)
    share = 0.5 if kind == "many_tiny" else 0.02
    tiny = rng.random(n) < share
    xs[tiny] = rng.random(int(tiny.sum())) * 10.0 ** rng.integers(-320, -5, size=int(tiny.sum()))
    if kind == "zeros":
        xs[rng.random(n) < 0.05] = 0.0
    if kind == "subnormal":
        sub = rng.random(n) < 0.02
        xs[sub] = rng.integers(1, 2**40, size=int(sub.sum())) * 5e-324
    if kind == "negative":
        xs = -xs
    if kind == "mixed":
        xs *= rng.choice([-1.0, 1.0], size=n)
    if kind == "cancel":  # each value and its negative: the sums cancel to exactly 0
        xs = np.concatenate([xs, -xs[::-1]])
    return xs


@pytest.mark.parametrize(
    "kind",
    ["few_tiny", "many_tiny", "zeros", "subnormal", "negative", "mixed", "cancel", "many_equal"],
)
@pytest.mark.parametrize("few", [0.0, 1 / 8, 1.0])
def test_rests_that_go_round_again_are_exact(
    kind: str, few: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values below 2**(low grid + 52) may have bits below the low grid: either their rests
    go round again whole (few of them) or their low pieces are cut on the low grid (many);
    both exact, for every element count (with lanes and without) and for one sum."""
    from crossent.metrics import _exact

    monkeypatch.setattr(_exact, "_FEW_SMALL", few)  # 0: always cut; 1: always round again
    rng = np.random.default_rng(sum(map(ord, kind)))
    xs = _tiny_among_large(kind, rng)
    assert float(ExactSum.zeros().add(xs)) == math.fsum(xs.tolist())
    for size in (3, 5000):  # 8 lanes per element, and one
        index = rng.integers(0, size, size=xs.size)
        if kind == "cancel":
            index[xs.size // 2 :] = index[: xs.size // 2][::-1]
        got = ExactSum.zeros((size,)).add(xs, index, most=int(np.bincount(index).max()))
        for k in (0, 1, 2, size - 1):
            want = math.fsum(xs[index == k].tolist())
            assert _bits(got.value()[k]) == _bits(want), (size, k)
        if kind == "cancel":
            assert not np.any(got.value())


def test_lanes_add_runs_into_one_element_exactly() -> None:
    """A column of probabilities in column-major order: long runs into one element, spread
    over lanes; the lanes' partial sums, each exact, add exactly at the bound."""
    rng = np.random.default_rng(8)
    n = 2**16  # the bound of 36-bit pieces: 2**16 per element
    xs = 1.0 - rng.random(3 * n) * 2.0**-20
    index = np.repeat([4, 0, 7], n)  # runs of 2**16 values into one element each
    got = ExactSum.zeros((2, 5)).add(xs, index, most=n).value().ravel()
    for k in range(10):
        assert got[k] == math.fsum(xs[index == k].tolist())
    shards = [ExactSum.zeros((2, 5)).add(xs[a::5], index[a::5]) for a in range(5)]
    merged = shards[3].merge(shards[0]).merge(shards[4].merge(shards[1])).merge(shards[2])
    np.testing.assert_array_equal(_bits(merged.value().ravel()), _bits(got))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("span", range(16, 36))
def test_blocks_near_the_whole_value_bound(span: int, below: bool, sign: float) -> None:
    """Values log-uniform over 2**-span..1: the smallest sits above or below the magnitude
    from which every value's rest is its low piece (no round again), whichever the level.
    All but the smallest are taken away again, so a lost bit shows."""
    rng = np.random.default_rng(span)
    mantissa, exponent = np.frexp(2.0 ** -(rng.random(4000) * span))
    xs = np.ldexp(np.round(np.ldexp(mantissa, 30)), exponent - 30)  # 30 bits: low bits clear
    xs[0] = 1.0 - 2.0**-53
    odd = np.array([1, 3, 5])  # the lowest bits of all, just above or below a power of 2
    xs[-3:] = 2.0**-span * (1 - odd * 2.0**-53 if below else 1 + odd * 2.0**-52)
    xs *= sign
    index = rng.integers(0, 3, size=xs.size)
    index[-3:] = [0, 1, 2]
    one, each = ExactSum.zeros(), ExactSum.zeros((3,))
    one.add(xs)
    each.add(xs, index, most=int(np.bincount(index).max()))
    one.add(-xs[:-1])
    each.add(-xs[:-3], index[:-3])
    assert float(one) == xs[-1]  # one value each: the sum is representable, every bit shows
    assert each.value().tolist() == xs[-3:].tolist()


@pytest.mark.parametrize(
    "kind", ["cancellation", "subnormal", "whole_range", "huge", "probabilities", "near_largest"]
)
def test_one_split_for_many_sums_gives_each_sum_exactly(kind: str) -> None:
    """add_to_each: the values split once (pieces as narrow as the most crowded sum needs),
    scattered into every sum by its own indices: the bits of each sum added alone."""
    from crossent.metrics._exact import add_to_each

    rng = np.random.default_rng(len(kind) + 7)
    if kind == "near_largest":  # full pieces: the crowded sum's partial sums at their bound
        xs = 1.0 - rng.random(3000) * 2.0**-12
    else:
        xs = _adversarial(kind, rng)
        xs[rng.choice(xs.size, size=3, replace=False)] = [math.inf, math.nan, -math.inf]
    crowded = np.where(rng.random(xs.size) < 0.9, 0, rng.integers(0, 3, size=xs.size))
    spread = rng.integers(0, 4000, size=xs.size)
    targets = [
        (ExactSum.zeros(), None, None),
        (ExactSum.zeros((3,)), crowded, int(np.bincount(crowded).max())),
        (ExactSum.zeros((4000,)), spread, int(np.bincount(spread).max())),
    ]
    add_to_each(xs, targets)
    for target, index, most in targets:
        alone = ExactSum.zeros(target.shape).add(xs, index, most=most)
        np.testing.assert_array_equal(_bits(target.value()), _bits(alone.value()))
    finite = np.isfinite(xs)
    one = ExactSum.zeros().add(xs[finite])
    assert float(one) == _reference(xs[finite].tolist())
    got = targets[1][0].value()
    for k in range(3):
        members = crowded == k
        if np.all(finite[members]):
            assert got[k] == _reference(xs[members].tolist())
        else:
            assert not math.isfinite(got[k])


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("rows", "groups"), [(1000, 50), (20_000, 40), (5, 3000), (300, 600)])
def test_runs_add_the_most_common_element_as_the_total_less_the_others(
    order: Literal["C", "F"], rows: int, groups: int
) -> None:
    """Classwise bins of many classes: the values of a class outside its most common bin
    are scattered, the rest added as the class's dense total less them; the same bits and
    counts as every value scattered, and the exact sums (also across blocks that cut a
    class in two)."""
    from crossent.metrics._exact import Runs, add_counted, add_to_each
    from crossent.metrics._functional import _width_bin

    rng = np.random.default_rng(rows + groups)
    z = rng.normal(scale=3.0, size=(rows, groups))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[rng.random(p.shape) < 0.01] *= 1e-200  # tiny ones: rests that go round again
    bins = 15
    index = (_width_bin(p, bins) + np.arange(groups) * bins).ravel(order=order)
    xs = p.ravel(order=order)
    count = np.bincount(index, minlength=groups * bins).reshape(groups, bins)
    runs = Runs(order, rows, np.arange(groups) * bins + count.argmax(axis=1))
    by_runs, scattered = ExactSum.zeros((groups, bins)), ExactSum.zeros((groups, bins))
    counted = np.zeros((groups, bins), dtype=np.int64)
    add_counted(xs, [(by_runs, index, counted, runs)], bounds=(0.0, 1.0))
    add_to_each(xs, [(scattered, index, int(count.max()))])
    np.testing.assert_array_equal(counted, count)
    got = by_runs.value().ravel()
    np.testing.assert_array_equal(_bits(got), _bits(scattered.value().ravel()))
    for k in {int(runs.mode[0]), int(runs.mode[-1]), 1, groups * bins - 1}:
        assert got[k] == math.fsum(xs[index == k].tolist())


def test_partial_sums_wait_in_the_sum_until_it_is_read() -> None:
    """Batches leave their partial sums pending (no deposit into the digits per batch);
    every reader (value, copy, pickle, merge, slicing, regrouping, the window of a sync)
    sees them, a copy's pending sums are its own, and a crowded batch after sparse ones
    narrows the pieces first."""
    rng = np.random.default_rng(11)
    parts = [rng.random(300) * 10.0 ** rng.integers(-8, 3, size=300) for _ in range(30)]
    index = [rng.integers(0, 4, size=300) for _ in range(30)]
    parts.append(1.0 - rng.random(70_000) * 2.0**-12)  # 2**16 and more into one element
    index.append(np.zeros(70_000, dtype=np.int64))
    lazy = ExactSum.zeros((4,))
    for i, (xs, at) in enumerate(zip(parts, index, strict=True)):
        lazy.add(xs, at, most=int(np.bincount(at).max()))
        if i == 10:
            frozen = lazy.copy()
    assert lazy.pending is not None
    assert lazy.pending.sums  # still pending
    everything, where = np.concatenate(parts), np.concatenate(index)
    want = _exact_by_element(everything, where, 4)
    head = _exact_by_element(np.concatenate(parts[:11]), np.concatenate(index[:11]), 4)
    np.testing.assert_array_equal(_bits(frozen.value()), _bits(head))  # the copy's own
    for reader in (
        lambda s: s.copy().value(),
        lambda s: pickle.loads(pickle.dumps(s)).value(),
        lambda s: s.merge(ExactSum.zeros((4,))).value(),
        lambda s: ExactSum.zeros((4,)).merge(s).value(),
        lambda s: np.concatenate([s[:2].value(), s[2:].value()]),
        lambda s: s.regroup(np.arange(4), 4).value(),
    ):
        np.testing.assert_array_equal(_bits(reader(lazy.copy())), _bits(want))
    lazy.pad_to(*lazy.window())  # type: ignore[misc]
    assert not lazy.pending.sums
    np.testing.assert_array_equal(_bits(lazy.value()), _bits(want))


@pytest.mark.parametrize("slack", [1.0, 2.0, 1e6])
def test_bounds_known_to_the_caller_give_the_same_bits(slack: float) -> None:
    """`bounds` (certain, maybe loose) stand in for each block's min and max: the grids may
    be coarser, the sums the same bits; the rests that go round again (tiny values) are
    outside the bounds' sign and get their own."""
    from crossent.metrics._exact import add_to_each

    rng = np.random.default_rng(int(slack))
    xs = _tiny_among_large("few_tiny", rng)[:5000] * 0.5
    xs[:7] = [0.0, 5e-324, 1e-300, 2.0**-1022, 1e-20, 3e-9, 0.49]
    index = rng.integers(0, 6, size=xs.size)
    plain, bounded = ExactSum.zeros((6,)), ExactSum.zeros((6,))
    add_to_each(xs, [(plain, index, None)])
    add_to_each(xs, [(bounded, index, None)], bounds=(0.0, float(xs.max()) * slack))
    got = bounded.value()
    np.testing.assert_array_equal(_bits(got), _bits(plain.value()))
    for k in range(6):
        assert got[k] == math.fsum(xs[index == k].tolist())


@pytest.mark.parametrize("seed", range(4))
def test_metric_shards_with_every_limit_shrunk_match_one_pass_and_fsum(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 64 values (classes cut across blocks, runs across blocks), a carry every 2
    deposits, partial sums full after a few values, one grid at a time, lanes up to 8
    elements: shards of a classwise-calibrated stream, merged in any order, give the
    single pass's bits, and each bin's sum is math.fsum's."""
    import itertools
    import random

    from crossent.metrics import ClassificationMetrics
    from crossent.metrics import _exact as E

    for name, value in (("_BLOCK", 64), ("_CARRY_EVERY", 2), ("_ROOM", 0), ("_SLACK", 0)):
        monkeypatch.setattr(E, name, value)
    monkeypatch.setattr(E, "_MAX_PARTIALS", 1)
    monkeypatch.setattr(E, "_LANE_ELEMENTS", 8)
    monkeypatch.setattr(E, "_OFFSETS", {})
    rng = np.random.default_rng(seed)
    n, c = 150, (3, 7, 70, 2)[seed]
    z = rng.normal(scale=4.0, size=(n, c))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[rng.random(p.shape) < 0.05] *= 1e-250  # tiny values: rests that go round again
    p = np.asfortranarray(p / p.sum(axis=1, keepdims=True))
    y = rng.integers(0, c, n)
    one = ClassificationMetrics(input_kind="probs", bins=5).update(p, y)
    cuts = [0, *sorted(rng.choice(np.arange(1, n), 5, replace=False).tolist()), n]
    shards = [
        ClassificationMetrics(input_kind="probs", bins=5, num_classes=c).update(p[a:b], y[a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    random.Random(seed).shuffle(shards)
    merged = shards[0].merge(*shards[1:])
    assert repr(merged.compute()) == repr(one.compute())
    conf = one.state["classwise"]["width_conf"].value()
    bins = np.minimum(np.floor(p * 5), 4).astype(int)
    for k in range(c):
        for b in range(5):
            assert conf[k, b] == math.fsum(p[:, k][bins[:, k] == b].tolist()), (k, b)


# ---------------------------------------------------------------- counted adds

special = st.sampled_from(
    [0.0, -0.0, 5e-324, -5e-324, 2.0**-1022, 1.0, 0.5, 1.5, 2.0**-53, 1e300, -1e300, 2.0**1006]
)
counted_values = st.lists(
    st.one_of(finite, special, st.floats(min_value=-1e-300, max_value=1e-300)), max_size=60
)


def _counted(
    xs: np.ndarray,
    index: np.ndarray,
    size: int,
    *,
    runs: object = None,
    bounds: tuple[float, float] | None = None,
) -> tuple[ExactSum, ExactSum, np.ndarray]:
    from crossent.metrics._exact import add_counted

    target, total = ExactSum.zeros((size,)), ExactSum.zeros()
    counts = np.zeros(size, dtype=np.int64)
    add_counted(xs, [(target, index, counts, runs)], bounds=bounds, totals=(total,))  # type: ignore[list-item]
    return target, total, counts


@given(xs=counted_values, seed=st.integers(0, 2**32 - 1), size=st.integers(1, 20))
def test_counted_sums_are_exact_and_count_like_bincount(
    xs: list[float], seed: int, size: int
) -> None:
    """add_counted: each element's sum is the exact sum rounded once (the bits of the
    scatter-everything path), its count is np.bincount's, the total's the whole sum;
    split in batches and merged either way, the same bits."""
    rng = np.random.default_rng(seed)
    values = np.array(xs, dtype=np.float64)
    index = rng.integers(0, size, size=values.size)
    target, total, counts = _counted(values, index, size)
    np.testing.assert_array_equal(counts, np.bincount(index, minlength=size))
    np.testing.assert_array_equal(
        _bits(target.value()), _bits(_exact_by_element(values, index, size))
    )
    assert _bits(total.value()) == _bits(np.float64(_reference(xs)))
    cut = int(rng.integers(0, values.size + 1))
    a, ta, ca = _counted(values[:cut], index[:cut], size)
    b, tb, cb = _counted(values[cut:], index[cut:], size)
    np.testing.assert_array_equal(_bits(b.merge(a).value()), _bits(target.value()))
    np.testing.assert_array_equal(ca + cb, counts)
    assert _bits(ta.merge(tb).value()) == _bits(total.value())


def test_counted_sums_propagate_non_finite_values() -> None:
    xs = np.array([1.0, math.nan, math.inf, -math.inf, math.inf, 2.0, -0.0])
    index = np.array([0, 1, 2, 3, 4, 4, 5])
    target, total, counts = _counted(xs, index, 6)
    got = target.value()
    assert got[[0, 2, 3, 4]].tolist() == [1.0, math.inf, -math.inf, math.inf]
    assert math.isnan(got[1])
    assert _bits(got[5]) == _bits(np.float64(0.0))  # -0.0 + nothing: +0.0 as np.sum gives
    assert math.isnan(float(total))
    np.testing.assert_array_equal(counts, [1, 1, 1, 1, 2, 1])


@pytest.mark.parametrize(
    "kind", ["cancellation", "subnormal", "whole_range", "huge", "probabilities"]
)
@pytest.mark.parametrize("runs", [None, "C", "F"])
def test_counted_adversarial_sums_with_and_without_runs(kind: str, runs: str | None) -> None:
    """Counted sums of adversarial values, scattered one by one or as runs (a group's
    dense total less the values that leave its mode, any mode), are exact."""
    from crossent.metrics._exact import Runs

    rng = np.random.default_rng(len(kind) + 100)
    xs = _adversarial(kind, rng)
    groups, width = 5, 3
    index = (rng.integers(0, width, size=xs.size) * (rng.random(xs.size) < 0.3)).reshape(-1, groups)
    index += np.arange(groups) * width
    order = "C" if runs is None else runs
    flat = index.ravel(order=order)
    hint = (
        None
        if runs is None
        else Runs(
            runs, xs.size // groups, np.arange(groups) * width + rng.integers(0, width, groups)
        )
    )
    target, total, counts = _counted(xs, flat, groups * width, runs=hint)
    np.testing.assert_array_equal(counts, np.bincount(flat, minlength=groups * width))
    np.testing.assert_array_equal(
        _bits(target.value()), _bits(_exact_by_element(xs, flat, groups * width))
    )
    assert float(total) == _reference(xs.tolist())


@pytest.mark.parametrize("runs", [False, True])
def test_counted_sums_decode_before_any_lane_holds_two_to_the_13_values(runs: bool) -> None:
    """Every value into one element (the count is read modulo 2**13 per lane and block):
    the count and the sum stay exact across many blocks, each lane near the bound."""
    from crossent.metrics._exact import _BLOCK, _COUNTED_LANES, _MOST_COUNTED, Runs

    assert _BLOCK / _COUNTED_LANES > _MOST_COUNTED - 500  # a lane of a block: near 2**13

    rng = np.random.default_rng(3)
    n = 3 * _BLOCK + 17
    xs = 1.0 - rng.random(n) * 2.0**-30  # full pieces: every sum at its widest
    index = np.zeros(n, dtype=np.int64)
    hint = Runs("F", n, np.array([1])) if runs else None  # a wrong mode: all picked
    target, _, counts = _counted(xs, index, 4, runs=hint, bounds=(0.0, 1.0))
    assert counts.tolist() == [n, 0, 0, 0]
    assert float(target[0]) == math.fsum(xs.tolist())


@pytest.mark.parametrize(
    ("rows", "groups", "order"), [(3000, 10, "F"), (700, 100, "C"), (2, 3, "F")]
)
def test_classwise_calibration_counted_matches_fsum_and_bincount(
    rows: int, groups: int, order: Literal["C", "F"]
) -> None:
    """The classwise bins of a metric (counted sums, runs after the first batch): each
    bin's count and confidence sum, over batches, are np.bincount's and math.fsum's."""
    from crossent.metrics import ClassificationMetrics

    rng = np.random.default_rng(rows)
    z = rng.normal(scale=4.0, size=(rows, groups))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p[rng.random(p.shape) < 0.05] *= 1e-250  # tiny ones: rests below the fine grid
    p /= p.sum(axis=1, keepdims=True)
    p = np.asarray(p, order=order)
    y = rng.integers(0, groups, rows)
    m = ClassificationMetrics(input_kind="probs", bins=15, num_classes=groups)
    for start in range(0, rows, max(rows // 3, 1)):
        m.update(p[start : start + max(rows // 3, 1)], y[start : start + max(rows // 3, 1)])
    state = m.state["classwise"]
    bins = np.minimum(np.floor(p * 15), 14).astype(int)
    conf = state["width_conf"].value()
    for k in range(groups):
        np.testing.assert_array_equal(
            state["width_count"][k], np.bincount(bins[:, k], minlength=15)
        )
        for b in range(15):
            assert conf[k, b] == math.fsum(p[:, k][bins[:, k] == b].tolist()), (k, b)
    per_class = m.state["per_class"]
    np.testing.assert_array_equal(per_class["class_count"], np.bincount(y, minlength=groups))


def test_counted_runs_dense_totals_at_their_widest() -> None:
    """A block of values whose second pieces are all near their bound (2**45 units), all
    in the mode: the group's dense total of their bits stays exact."""
    from crossent.metrics._exact import _BLOCK, Runs

    v = 0.75 + 2.0**-38 - 2.0**-53  # grid 2**-37: rounds down, the rest near 2**(g - 1)
    n = 2 * _BLOCK + 5
    xs = np.full(n, v)
    index = np.zeros(n, dtype=np.int64)
    target, total, counts = _counted(xs, index, 2, runs=Runs("F", n, np.array([0])))
    assert counts.tolist() == [n, 0]
    assert float(target[0]) == float(Fraction(v) * n)
    assert float(total) == float(Fraction(v) * n)


def test_top_label_bins_match_fsum_and_bincount() -> None:
    """Top-label calibration: the equal-width and the fine bins (one split for both), over
    batches: each bin's count and confidence sum are np.bincount's and math.fsum's."""
    from crossent.metrics import ClassificationMetrics
    from crossent.metrics._functional import FINE_BINS, _fine_bin, _width_bin

    rng = np.random.default_rng(5)
    z = rng.normal(scale=3.0, size=(3000, 7))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    m = ClassificationMetrics(input_kind="probs", bins=15)
    for start in range(0, 3000, 1000):
        m.update(p[start : start + 1000], rng.integers(0, 7, 1000))
    state = m.state["top_label"]
    conf = p.max(axis=1)
    for name, size, bins in (
        ("width", 15, _width_bin(conf[:, None], 15)[:, 0]),
        ("fine", FINE_BINS, _fine_bin(conf)),
    ):
        np.testing.assert_array_equal(state[f"{name}_count"][0], np.bincount(bins, minlength=size))
        sums = state[f"{name}_conf"].value()[0]
        for b in np.unique(bins):
            assert sums[b] == math.fsum(conf[bins == b].tolist()), (name, b)


@given(
    xs=counted_values,
    seed=st.integers(0, 2**32 - 1),
    sizes=st.tuples(st.integers(1, 20), st.sampled_from([1025, 4096, 5000])),
    bad=st.sampled_from([None, math.nan, math.inf, -math.inf]),
)
def test_counted_targets_share_one_split_and_many_elements_are_checked(
    xs: list[float], seed: int, sizes: tuple[int, int], bad: float | None
) -> None:
    """Two counted sums of the same values, by their own indices (the equal-width and the
    fine calibration bins), one of them with over 1024 elements (few lanes: whole blocks
    checked): each the exact sums (NaN and ±inf where they went) and np.bincount's
    counts, the total the whole sum."""
    from crossent.metrics._exact import add_counted

    rng = np.random.default_rng(seed)
    if bad is not None:
        xs = [*xs, bad]
    values = np.array(xs, dtype=np.float64)
    indices = [rng.integers(0, size, size=values.size) for size in sizes]
    targets = [ExactSum.zeros((size,)) for size in sizes]
    counts = [np.zeros(size, dtype=np.int64) for size in sizes]
    total = ExactSum.zeros()
    add_counted(
        values,
        [(t, i, c, None) for t, i, c in zip(targets, indices, counts, strict=True)],
        totals=(total,),
    )
    finite = values if bad is None else values[:-1]
    for target, index, count, size in zip(targets, indices, counts, sizes, strict=True):
        np.testing.assert_array_equal(count, np.bincount(index, minlength=size))
        want = _exact_by_element(finite, index[: finite.size], size)
        if bad is not None:
            want[index[-1]] = bad  # the finite values' exact sum is finite
        np.testing.assert_array_equal(_bits(target.value()), _bits(want))
    want_total = _reference(xs) if bad is None else bad
    assert _bits(total.value()) == _bits(np.float64(want_total))


@pytest.mark.parametrize("crowd", [0, 8192, 9000, 3 * 65536])
def test_checked_blocks_that_overfill_an_element_go_again_in_chunks(crowd: int) -> None:
    """4096 elements (one lane, whole blocks scattered and checked, each decoded once): an
    element that gets 2**13 values or more in a block decodes wrong, the check sees it and
    the block goes again in chunks; counts and sums stay exact, in the same and in later
    blocks."""
    from crossent.metrics._exact import _BLOCK, add_counted

    rng = np.random.default_rng(crowd)
    n = 2 * _BLOCK + 123
    xs = 1.0 - rng.random(n) * 2.0**-30  # full pieces: every sum at its widest
    index = rng.integers(0, 4096, size=n)
    index[rng.permutation(min(n, _BLOCK) if crowd < _BLOCK else n)[:crowd]] = 7  # 1st block
    target, counts = ExactSum.zeros((4096,)), np.zeros(4096, dtype=np.int64)
    add_counted(xs, [(target, index, counts, None)])
    if not crowd:  # no element overfilled: three blocks, each decoded once
        assert [terms for _, terms in target.held.values()] == [3]
    np.testing.assert_array_equal(counts, np.bincount(index, minlength=4096))
    got = target.value()
    for k in (7, int(index[0]), int(index[-1])):
        assert got[k] == math.fsum(xs[index == k].tolist()), k


def test_held_totals_go_into_the_digits_before_any_read_and_pickle_as_before() -> None:
    """Counted totals wait in the sum (held) over many adds: copies are independent, the
    pickle has the fields of a sum without held totals, and one written without them loads."""
    from crossent.metrics._exact import add_counted

    rng = np.random.default_rng(11)
    s, counts = ExactSum.zeros((3,)), np.zeros(3, dtype=np.int64)
    xs = rng.random(3000)
    index = rng.integers(0, 3, size=3000)
    for part in np.array_split(np.arange(3000), 7):
        add_counted(xs[part], [(s, index[part], counts, None)])
    assert s.held  # not yet in the digits
    twin = s.copy()
    add_counted(np.array([1.0]), [(twin, np.array([0]), counts.copy(), None)])
    want = [math.fsum(xs[index == k].tolist()) for k in range(3)]
    state = s.__getstate__()
    assert "held" not in state
    assert not s.held  # pickling settled them
    loaded = pickle.loads(pickle.dumps(s))
    assert loaded.held == {}
    np.testing.assert_array_equal(loaded.value(), want)
    np.testing.assert_array_equal(s.value(), want)
    assert twin.value()[0] == math.fsum([*xs[index == 0].tolist(), 1.0])
    old = ExactSum.__new__(ExactSum)
    old.__setstate__({k: v for k, v in state.items() if k != "held"})  # an older pickle
    np.testing.assert_array_equal(old.value(), want)


@given(
    xs=st.lists(
        st.one_of(finite, special, st.floats(min_value=-1e-300, max_value=1e-300), st.just(0.3)),
        max_size=60,
    ),
    cuts=st.lists(st.integers(0, 60), max_size=4),
    bad=st.sampled_from([None, math.nan, math.inf, -math.inf]),
)
def test_counted_sums_of_one_element_alone_are_exact(
    xs: list[float], cuts: list[int], bad: float | None
) -> None:
    """add_counted with no counted sum, only `totals` (a Brier or log-loss total): the
    exact sum rounded once, NaN and ±inf as float summation gives them, whatever the
    batches."""
    from crossent.metrics._exact import add_counted

    if bad is not None:
        xs = [*xs, bad]
    total = ExactSum.zeros()
    for part in np.split(np.array(xs, dtype=np.float64), sorted(c for c in cuts if c < len(xs))):
        add_counted(part, [], totals=(total,))
    want = _reference(xs) if bad is None else bad  # the finite values' exact sum is finite
    got = float(total)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert _bits(np.float64(got)) == _bits(np.float64(want))


def test_counted_sums_of_one_element_at_their_widest() -> None:
    """Whole blocks of values whose pieces are near their bounds (2**37 and 2**45 units),
    of either sign: the sums of their bits modulo 2**64 stay exact."""
    from crossent.metrics._exact import _BLOCK, add_counted

    v = 0.75 + 2.0**-38 - 2.0**-53  # grid 2**-37: rounds down, the rest near 2**(g - 1)
    for xs in (
        np.full(2 * _BLOCK + 5, v),
        np.full(_BLOCK, -v),
        np.full(_BLOCK + 1, 1.0 - 2.0**-53),
    ):
        total = ExactSum.zeros()
        add_counted(xs, [], totals=(total,))
        assert float(total) == float(Fraction(xs[0]) * xs.size)


def test_top_label_bins_with_a_crowded_fine_bin_match_fsum_and_bincount() -> None:
    """Half of a batch's rows with the same confidence: one fine bin gets 2**15 values in a
    block (its decoded count fails the check: the block goes again in chunks), the next
    batch too; every bin's count and confidence sum are still np.bincount's and fsum's."""
    from crossent.metrics import ClassificationMetrics
    from crossent.metrics._functional import FINE_BINS, _fine_bin

    rng = np.random.default_rng(8)
    n = 65536
    p = rng.dirichlet([1.0, 1.0, 1.0], size=2 * n)
    p[rng.random(2 * n) < 0.5] = [0.9, 0.05, 0.05]  # ties: one confidence, one fine bin
    y = rng.integers(0, 3, 2 * n)
    m = ClassificationMetrics(input_kind="probs", bins=15)
    m.update(p[:n], y[:n]).update(p[n:], y[n:])
    state = m.state["top_label"]
    conf = p.max(axis=1)
    bins = _fine_bin(conf)
    assert np.bincount(bins[:n]).max() > 2**13
    np.testing.assert_array_equal(state["fine_count"][0], np.bincount(bins, minlength=FINE_BINS))
    sums = state["fine_conf"].value()[0]
    for b in np.unique(bins):
        assert sums[b] == math.fsum(conf[bins == b].tolist()), b
