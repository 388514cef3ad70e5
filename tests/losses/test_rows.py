"""The row statistics: combine is associative, and any split of the classes gives the whole-row loss.

These laws are what lets every executor (chunks, vocabulary tiles, ranks)
share one formula; the reference is the float64 class-by-class loss of
``tests/_reference``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossent._losses import _rows
from crossent._losses._options import make_options
from tests._ranks import ThreadRanks
from tests._reference import categorical as ref


@st.composite
def problems(draw: Any) -> tuple[np.ndarray, int, np.ndarray | None, list[int], dict[str, Any]]:
    """A row of logits (some masked), its label, optional weights, a split and options."""
    num = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    z = rng.normal(0, draw(st.sampled_from([0.5, 3.0, 30.0])), size=num)
    label = draw(st.integers(0, num - 1))
    if draw(st.booleans()):  # mask a class other than the label
        z[(label + 1) % num] = -np.inf
    weight = rng.uniform(0.2, 2.0, size=num) if draw(st.booleans()) else None
    cuts = sorted(draw(st.sets(st.integers(1, num - 1), max_size=num - 1)))
    options = draw(
        st.sampled_from(
            [
                {},
                {"label_smoothing": 0.1},
                {"z_loss": 0.01},
                {"gamma": 2.0},
                {"gamma": 0.5, "z_loss": 0.1},
            ]
        )
    )
    if options.get("label_smoothing"):
        z = np.where(np.isinf(z), -5.0, z)  # smoothing over a masked class is +inf
    return z, label, weight, cuts, options


def _slices(z: np.ndarray, label: int, weight: np.ndarray | None, cuts: list[int]) -> list[Any]:
    bounds = [0, *cuts, z.shape[-1]]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        w = None if weight is None else weight[lo:hi]
        out.append(_rows.row_stats(z[None, lo:hi], np.array([label]), w, offset=lo, xp=xp))
    return out


def _reference(z: np.ndarray, label: int, weight: np.ndarray | None, opts: Any) -> float:
    return float(
        ref.sparse_ce(
            z[None],
            np.array([label]),
            from_logits=True,
            weight=weight,
            label_smoothing=opts.label_smoothing,
            gamma=opts.gamma,
            z_loss=opts.z_loss,
            reduction="sum",
        )
    )


@given(problems())
def test_any_split_gives_the_whole_row_loss(problem: Any) -> None:
    z, label, weight, cuts, options = problem
    opts = make_options(from_logits=True, **options)
    parts = _slices(z, label, weight, cuts)
    merged = parts[0]
    for part in parts[1:]:
        merged = _rows.combine(merged, part, xp=xp)
    w_y = np.array([1.0 if weight is None else weight[label]])
    total = float(z.shape[-1]) if weight is None else float(weight.sum())
    loss = _rows.row_loss(merged, w_y, total, z.shape[-1], opts, xp=xp)
    np.testing.assert_allclose(loss[0], _reference(z, label, weight, opts), rtol=1e-10, atol=1e-12)


@given(problems())
def test_combine_is_associative_and_commutative(problem: Any) -> None:
    z, label, weight, cuts, _ = problem
    parts = _slices(z, label, weight, cuts)
    if len(parts) < 3:
        parts = _slices(z, label, weight, [1, 2] if z.shape[-1] > 2 else [1])
    if len(parts) < 3:
        return
    a, b, c = parts[0], parts[1], parts[2]
    for rest in parts[3:]:
        c = _rows.combine(c, rest, xp=xp)
    left = _rows.combine(_rows.combine(a, b, xp=xp), c, xp=xp)
    right = _rows.combine(a, _rows.combine(b, c, xp=xp), xp=xp)
    swapped = _rows.combine(c, _rows.combine(b, a, xp=xp), xp=xp)
    for one, other in ((left, right), (left, swapped)):
        np.testing.assert_array_equal(one.m, other.m)
        np.testing.assert_allclose(_rows.lse(one, xp=xp), _rows.lse(other, xp=xp), rtol=1e-14)
        np.testing.assert_allclose(one.wd, other.wd, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(one.z_y, other.z_y)


@given(problems())
def test_gradient_coefficients_give_the_gradient(problem: Any) -> None:
    """a·p − b·[k=y] − e·w equals the finite-difference gradient of the reference."""
    z, label, weight, _, options = problem
    if np.isinf(z).any():
        z = np.where(np.isinf(z), -8.0, z)
    opts = make_options(from_logits=True, **options)
    stats = _rows.row_stats(z[None], np.array([label]), weight, xp=xp)
    w_y = np.array([1.0 if weight is None else weight[label]])
    total = float(z.shape[-1]) if weight is None else float(weight.sum())
    a, b, e = _rows.grad_coefficients(stats, w_y, total, z.shape[-1], opts, xp=xp)
    p = np.exp(z - _rows.lse(stats, xp=xp)[0])
    grad = a[0] * p - e * (np.ones_like(z) if weight is None else weight)
    grad[label] -= b[0]
    numeric = ref.numerical_grad(lambda v: _reference(v, label, weight, opts), z)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@given(problems())
def test_all_reduce_over_ranks_is_combine(problem: Any) -> None:
    """Ranks holding the slices merge to what combine gives (max, s, Σw(m−z), z_y, w_y, W)."""
    z, label, weight, cuts, _ = problem
    parts = _slices(z, label, weight, cuts)
    want = functools.reduce(lambda a, b: _rows.combine(a, b, xp=xp), parts)
    ranks = ThreadRanks(len(parts))
    got: list[Any] = [None] * len(parts)

    def run(rank: int) -> None:
        got[rank] = _rows.all_reduce(
            parts[rank],
            reduce_max=ranks.reducer(rank, lambda xs: np.max(xs, axis=0)),
            reduce_sum=ranks.reducer(rank, lambda xs: np.sum(xs, axis=0)),
            xp=xp,
        )

    ranks.run(run)
    for merged in got:
        np.testing.assert_array_equal(merged.m, want.m)
        np.testing.assert_allclose(merged.s, want.s, rtol=1e-13)
        np.testing.assert_allclose(merged.wd, want.wd, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(merged.wsum, want.wsum, rtol=1e-13)
        np.testing.assert_array_equal(merged.z_y, want.z_y)
        if weight is None:
            assert merged.w_y is None
        else:
            np.testing.assert_array_equal(merged.w_y, [weight[label]])


def test_coefficients_are_the_gradient_formula_with_operators_only() -> None:
    """The helper Triton compiles: plain floats in, (a·r, b·r, e·r) out."""
    a, b, e = _rows.coefficients(2.0, 3.0, 0.5, 10.0, 0.9, 0.1 / 7, True, 0.02, True)
    assert b == pytest.approx(0.9 * 2.0 * 0.5)
    assert a == pytest.approx((0.9 * 2.0 + 0.1 / 7 * 10.0 + 0.02 * 3.0) * 0.5)
    assert e == pytest.approx(0.1 / 7 * 0.5)
    a0, b0, _ = _rows.coefficients(2.0, float("inf"), 1.0, 10.0, 1.0, 0.0, False, 0.0, False)
    assert (a0, b0) == (2.0, 2.0)  # switched-off terms are not evaluated (no 0 · inf)


def test_an_empty_slice_is_the_identity() -> None:
    z = np.array([[1.0, -np.inf, 3.0]])
    whole = _rows.row_stats(z, np.array([0]), None, xp=xp)
    masked = _rows.row_stats(z[:, 1:2], np.array([0]), None, offset=1, xp=xp)
    merged = _rows.combine(masked, _rows.row_stats(z, np.array([0]), None, xp=xp), xp=xp)
    assert masked.m[0] == -np.inf
    assert masked.s[0] == 0
    np.testing.assert_allclose(_rows.lse(merged, xp=xp), _rows.lse(whole, xp=xp))


@pytest.mark.parametrize("options", [{"gamma": 2.0, "label_smoothing": 0.1}, {}])
def test_applies_only_where_the_statistics_carry_the_loss(options: dict[str, Any]) -> None:
    opts = make_options(from_logits=True, **options)
    assert _rows.applies(opts) == (not options)
    assert not _rows.applies(make_options(from_logits=False))


def _focal_exact(log_p: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 focal term c f (-log p) and slope f (1 + gamma q) (c = 1), from 1 - p = -expm1."""
    one_m = -np.expm1(log_p)
    f = one_m**gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(one_m == 0, 0.0, np.exp(log_p) * -log_p / one_m)
    return f * -log_p, f * (1 + gamma * q)


@pytest.mark.parametrize("autodiff", [False, True])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_focal_terms_are_accurate_at_every_probability(
    lib: str, gamma: float, autodiff: bool
) -> None:
    """float32 focal terms and slopes to a few ulps of the float64 values, from p = e^-80 to
    p = 1 - 1e-7 and p = 1 (0, not NaN): the closed forms (PyTorch's addcmul, the plain
    operators elsewhere; gamma = 2 as products of p - 1) and the guarded autodiff form."""
    log_p = np.concatenate([-np.logspace(-7, np.log10(80.0), 300), [0.0]]).astype(np.float32)
    value_ref, slope_ref = _focal_exact(log_p.astype(np.float64), gamma)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        lp: Any = torch.from_numpy(log_p)
        ns: Any = torch
    else:
        lp, ns = log_p, xp
    value, slope = _rows.focal_terms(-lp, 1.0, gamma, autodiff=autodiff, log_p=lp, xp=ns)
    for got, want in ((value, value_ref), (slope, slope_ref)):
        got = np.asarray(got)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=4e-6, atol=0)
    assert value[-1] == 0
    assert slope[-1] == 0
