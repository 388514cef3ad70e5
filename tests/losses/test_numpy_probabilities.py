"""The NumPy executor's losses from probabilities (``crossent._backends._numpy``): equal to
a float64 reference written here (the log clamped at -100, its derivative 0 where clamped)
and to the generic array-API formulas they replace; the same errors; no warnings at p = 0."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as ce
from crossent._backends import _numpy as numpy_exec
from tests._reference.probabilities import (
    BINARY_DRAWS,
    binary_loss,
    binary_masses,
    clamped_log,
    reduce,
)
from tests.conftest import to_numpy, to_xp


@contextlib.contextmanager
def _generic(monkeypatch: Any) -> Iterator[None]:
    """The same calls through the generic array-API formulas."""
    with monkeypatch.context() as m:
        m.setattr(numpy_exec, "_sparse_probabilities", lambda *a, **k: None)
        m.setattr(numpy_exec, "categorical_probabilities", lambda *a, **k: None)
        m.setattr(numpy_exec, "binary_probabilities", lambda *a, **k: None)
        yield


def _probabilities(shape: tuple[int, ...], axis: int, seed: int, dtype: Any) -> np.ndarray:
    """Softmax along `axis`, some classes exactly 0 (every row keeps class 0)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * 3
    z[rng.random(shape) < 0.25] = -np.inf
    z = np.moveaxis(z, axis, -1)
    z[..., 0] = np.maximum(z[..., 0], 0.0)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.moveaxis(e / e.sum(axis=-1, keepdims=True), -1, axis).astype(dtype)


SHAPES = st.sampled_from([((6, 4), -1), ((6, 4), 0), ((2, 3, 4), 1), ((5,), 0)])
DRAWS = {
    "seed": st.integers(0, 2**16),
    "dtype": st.sampled_from([np.float64, np.float32]),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
}
"""What every test below draws, besides its own options."""


@settings(max_examples=60, deadline=None)
@given(case=SHAPES, weighted=st.booleans(), ignore=st.booleans(), **DRAWS)
def test_sparse_equals_the_reference_and_the_generic_formulas(
    case: Any, seed: int, dtype: Any, reduction: str, weighted: bool, ignore: bool
) -> None:
    shape, axis = case
    rng = np.random.default_rng(seed)
    p = _probabilities(shape, axis, seed, dtype)
    classes = shape[axis]
    label_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    y = rng.integers(0, classes, label_shape)
    counted = np.ones(label_shape, bool)
    kwargs: dict[str, Any] = {"axis": axis, "reduction": reduction}
    w = np.ones(classes)
    if weighted:
        w = rng.random(classes) + 0.25
        kwargs["weight"] = w.astype(dtype)
    if ignore:
        counted = rng.random(label_shape) < 0.6
        y = np.where(counted, y, -100)
        kwargs["ignore_index"] = -100
    label = np.where(counted, y, 0)
    p_y = np.squeeze(np.take_along_axis(p, np.expand_dims(label, axis), axis), axis)
    w_y = np.where(counted, w.astype(dtype).astype(np.float64)[label], 0.0)
    row = -w_y * clamped_log(p_y)
    den = w_y.sum()
    ref = reduce(row, reduction, den)
    loss, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, p, y, **kwargs)
    value = ce.sparse_categorical_cross_entropy(p, y, **kwargs)
    tol = 1e-12 if dtype is np.float64 else 1e-5
    np.testing.assert_allclose(value, ref, rtol=tol, atol=0)
    assert value.dtype == dtype
    assert grad.dtype == dtype
    np.testing.assert_array_equal(loss, value)
    scale = 1.0 if reduction != "mean" else (1 / den if den else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(p_y.astype(np.float64) < math.exp(-100), 0.0, -scale * w_y / p_y)
    ref_grad = np.zeros(p.shape)
    np.put_along_axis(ref_grad, np.expand_dims(label, axis), np.expand_dims(d, axis), axis)
    np.testing.assert_allclose(grad, ref_grad, rtol=tol, atol=0)
    with pytest.MonkeyPatch.context() as m, _generic(m):
        generic = ce.sparse_categorical_cross_entropy(p, y, **kwargs)
        _, generic_grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, p, y, **kwargs)
    np.testing.assert_allclose(value, generic, rtol=tol, atol=0)
    np.testing.assert_allclose(grad, generic_grad, rtol=tol, atol=0)


@settings(max_examples=60, deadline=None)
@given(case=SHAPES, weighted=st.booleans(), smoothing=st.sampled_from([0.0, 0.2]), **DRAWS)
def test_categorical_equals_the_reference_and_the_generic_formulas(
    case: Any, seed: int, dtype: Any, reduction: str, weighted: bool, smoothing: float
) -> None:
    shape, axis = case
    rng = np.random.default_rng(seed)
    p = _probabilities(shape, axis, seed, dtype)
    t = _probabilities(shape, axis, seed + 1, dtype)
    classes = shape[axis]
    kwargs: dict[str, Any] = {"axis": axis, "reduction": reduction, "label_smoothing": smoothing}
    w = np.ones(classes)
    if weighted:
        w = (rng.random(classes) + 0.25).astype(dtype)
        kwargs["weight"] = w
    wshape = [1] * len(shape)
    wshape[axis] = -1
    c = w.reshape(wshape) * ((1 - smoothing) * t.astype(np.float64) + smoothing / classes)
    row = -(c * clamped_log(p)).sum(axis=axis)
    ref = reduce(row, reduction, row.size)
    value = ce.categorical_cross_entropy(p, t, **kwargs)
    tol = 1e-12 if dtype is np.float64 else 2e-5
    np.testing.assert_allclose(value, ref, rtol=tol, atol=0)
    assert value.dtype == dtype
    with pytest.MonkeyPatch.context() as m, _generic(m):
        generic = ce.categorical_cross_entropy(p, t, **kwargs)
    np.testing.assert_allclose(value, generic, rtol=tol, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    weighted=st.sampled_from(["none", "weight", "pos_weight", "both", "numbers"]),
    dtype=DRAWS["dtype"],
    **BINARY_DRAWS,
)
def test_binary_equals_the_reference_and_the_generic_formulas(
    shape: tuple[int, ...],
    seed: int,
    dtype: Any,
    reduction: str,
    weighted: str,
    smoothing: float,
    alpha: Any,
) -> None:
    rng = np.random.default_rng(seed)
    p = rng.random(shape).astype(dtype)
    p.flat[:: max(1, p.size // 3)] = rng.choice([0.0, 1.0])
    t = rng.random(shape).astype(dtype)
    kwargs: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing, "alpha": alpha}
    w: Any = 1.0
    pw: Any = 1.0
    if weighted in ("weight", "both"):
        w = kwargs["weight"] = (rng.random(shape[-1]) + 0.25).astype(dtype)
    if weighted in ("pos_weight", "both"):
        pw = kwargs["pos_weight"] = (rng.random(shape[-1]) + 0.25).astype(dtype)
    if weighted == "numbers":
        w, pw = kwargs["weight"], kwargs["pos_weight"] = 0.5, 3
    pos, neg = binary_masses(t, w, pw, smoothing, alpha)
    ref = reduce(binary_loss(p, pos, neg), reduction, p.size)
    value = ce.binary_cross_entropy(p, t, **kwargs)
    tol = 1e-12 if dtype is np.float64 else 2e-5
    np.testing.assert_allclose(value, ref, rtol=tol, atol=1e-300)
    assert value.dtype == dtype
    with pytest.MonkeyPatch.context() as m, _generic(m):
        generic = ce.binary_cross_entropy(p, t, **kwargs)
    np.testing.assert_allclose(value, generic, rtol=tol, atol=0)


def test_the_generic_path_decides_nan_bad_rows_and_bad_labels() -> None:
    """NaN in another class propagates; padding rows of zeros under ``ignore_index`` pass; a
    row that does not sum to 1, a probability outside [0, 1] and a bad label raise
    crossent's messages, with validation on; a bad label also with it off."""
    p = np.array([[0.5, 0.5, np.nan], [0.2, 0.3, 0.5]])
    out = ce.sparse_categorical_cross_entropy(p, np.array([0, 1]), reduction="none")
    assert math.isnan(out[0])
    assert out[1] == pytest.approx(-math.log(0.3))
    assert math.isnan(ce.categorical_cross_entropy(p, np.full((2, 3), 1 / 3)))
    padded = np.array([[0.2, 0.8], [0.0, 0.0]])
    out = ce.sparse_categorical_cross_entropy(padded, np.array([1, -100]), ignore_index=-100)
    assert out == pytest.approx(-math.log(0.8))
    with pytest.raises(ValueError, match="row 0 sums to"):
        ce.sparse_categorical_cross_entropy(np.array([[0.5, 0.6]]), np.array([0]))
    with pytest.raises(ValueError, match="row 0 sums to"):
        ce.categorical_cross_entropy(np.array([[0.5, 0.6]]), np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 1\]"):
        ce.categorical_cross_entropy(np.array([[0.5, 0.5]]), np.array([[1.5, -0.5]]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ce.categorical_cross_entropy(np.array([[1.5, -0.5]]), np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="target"):
        ce.sparse_categorical_cross_entropy(np.array([[0.5, 0.5]]), np.array([2]))
    with ce.validation(False), pytest.raises((ValueError, IndexError)):
        ce.sparse_categorical_cross_entropy(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="input"):
        ce.binary_cross_entropy(np.array([1.5]), np.array([1.0]))
    with pytest.raises(ValueError, match="target"):
        ce.binary_cross_entropy(np.array([0.5]), np.array([2.0]))
    with pytest.raises(ValueError, match="pos_weight"):
        ce.binary_cross_entropy(np.array([0.5]), np.array([1.0]), pos_weight=np.array([-1.0]))
    assert math.isnan(ce.binary_cross_entropy(np.array([0.5, np.nan]), np.array([1.0, 0.0])))


def test_probability_zero_costs_100_without_a_warning() -> None:
    """(The tests run with warnings as errors: ``log(0)`` would raise.)"""
    p = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    loss, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, p, np.array([0, 0]))
    assert loss == pytest.approx(50.0)
    np.testing.assert_array_equal(grad, np.array([[0.0, 0.0], [-0.5, 0.0]], np.float32))
    assert ce.categorical_cross_entropy(p, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)) == 100


@pytest.mark.parametrize("bad", [1.5, -0.25, math.inf])
def test_an_ignored_row_is_not_read_nor_warned_about(xp: Any, bad: float) -> None:
    """A row under ``ignore_index`` is not read (PyTorch's ``nll_loss``), so a value outside
    [0, 1] there is neither refused nor counted: the loss of the other rows, in value and
    gradient. NumPy warned "invalid value encountered in log" for -0.25 (an error in these
    tests) where the generic formula took the log of the whole array; the fuzz of bad calls
    found it (it expected an error there; a counted row with such a value raises)."""
    conv = to_xp(xp)
    p = np.full((4, 3), 1 / 3)
    p[0, 0] = bad
    labels = np.array([-100, 0, 1, 2])
    for checked in (True, False):  # validation off: NumPy's lean path warned for -0.25
        with ce.validation(checked):
            got = ce.sparse_categorical_cross_entropy(conv(p), conv(labels), ignore_index=-100)
        np.testing.assert_allclose(float(to_numpy(got)), math.log(3), rtol=1e-12)
    with pytest.raises(ValueError, match="input"):
        ce.sparse_categorical_cross_entropy(conv(p), conv(np.array([0, 0, 1, 2])))
