"""ExactSum: the exact sum of float64 values, rounded once, whatever the order and grouping."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

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
