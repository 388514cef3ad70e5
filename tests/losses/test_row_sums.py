"""Probability predictions must sum to 1 along the class axis, up to their dtype's rounding."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import crossent as ce
from crossent._lib._checks import row_sum_tolerance
from tests.conftest import to_numpy, to_xp

BAD = np.array([[0.2, 0.3, 0.5], [0.5, 0.89, 0.6], [0.1, 0.1, 0.8]])
LABELS = np.array([0, 1, 2])


def _targets(loss: Any, conv: Any) -> Any:
    if loss is ce.sparse_categorical_cross_entropy:
        return conv(LABELS)
    return conv(np.eye(3)[LABELS])


LOSSES = [ce.sparse_categorical_cross_entropy, ce.categorical_cross_entropy]


@pytest.mark.parametrize("loss", LOSSES, ids=["sparse", "categorical"])
def test_row_not_summing_to_one_is_rejected(xp: Any, loss: Any) -> None:
    conv = to_xp(xp)
    message = re.escape("`input` holds probabilities whose rows must sum to 1 along axis 1; row 1")
    with pytest.raises(ValueError, match=message) as info:
        loss(conv(BAD), _targets(loss, conv))
    text = str(info.value)
    assert "sums to 1.99" in text
    assert "softmax" in text
    assert "from_logits=True" in text
    with pytest.raises(ValueError, match=re.escape("row 1 sums to 1.99")):
        ce.value_and_grad(loss, conv(BAD), _targets(loss, conv))


def test_first_bad_row_of_an_nd_input_is_named_by_its_index() -> None:
    """Classes on axis 1 of (N, C, d): the row is named by its (n, d) index."""
    p = np.full((2, 3, 4), 1 / 3)
    p[1, :, 2] = [0.7, 0.7, 0.7]
    with pytest.raises(ValueError, match=re.escape("row (1, 2) sums to 2.1")):
        ce.sparse_categorical_cross_entropy(p, np.zeros((2, 4), dtype=int), axis=1)


def test_sigmoid_outputs_are_rejected_softmax_outputs_pass() -> None:
    z = np.random.default_rng(0).normal(size=(5, 4))
    sigmoid = 1 / (1 + np.exp(-z))
    softmax = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = np.array([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="must sum to 1"):
        ce.sparse_categorical_cross_entropy(sigmoid, labels)
    want = -np.mean(np.log(softmax[np.arange(5), labels]))
    got = ce.sparse_categorical_cross_entropy(softmax, labels)
    np.testing.assert_allclose(float(got), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("num_classes", [2, 32768])
def test_softmax_of_many_classes_passes_in_every_dtype(dtype: str, num_classes: int) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, num_classes, generator=gen, dtype=torch.float64) * 4
    for p in (
        torch.softmax(z.to(getattr(torch, dtype)), dim=-1),  # softmax in the dtype
        torch.softmax(z.float(), dim=-1).to(getattr(torch, dtype))  # rounded to the dtype
        if dtype != "float64"
        else torch.softmax(z, dim=-1),
    ):
        labels = torch.randint(0, num_classes, (16,), generator=gen)
        loss = ce.sparse_categorical_cross_entropy(p, labels)
        assert torch.isfinite(loss)
        onehot = torch.nn.functional.one_hot(labels, num_classes).to(p.dtype)
        assert torch.isfinite(ce.categorical_cross_entropy(p, onehot))


def test_numpy_float32_softmax_of_32k_classes_passes() -> None:
    z = np.random.default_rng(1).normal(size=(8, 32768)).astype(np.float32) * 4
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    assert np.isfinite(ce.sparse_categorical_cross_entropy(p, np.zeros(8, dtype=int)))


def test_tolerance_values() -> None:
    """The documented bound eps(dtype) + C·eps(summing dtype)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp_torch

    f32, f64 = np.finfo(np.float32).eps, np.finfo(np.float64).eps
    assert row_sum_tolerance(torch.float32, 32768, xp=xp_torch) == pytest.approx(32769 * f32)
    assert row_sum_tolerance(torch.bfloat16, 32768, xp=xp_torch) == pytest.approx(
        2.0**-7 + 32768 * f32
    )
    assert row_sum_tolerance(torch.float64, 3, xp=xp_torch) == pytest.approx(4 * f64)


def test_off_by_more_than_the_tolerance_fails_within_passes() -> None:
    tol = 4 * np.finfo(np.float64).eps
    inside = np.array([[0.5, 0.25, 0.25 + tol / 2]])
    outside = np.array([[0.5, 0.25, 0.25 + 4 * tol]])
    ce.sparse_categorical_cross_entropy(inside, np.array([0]))
    with pytest.raises(ValueError, match="must sum to 1"):
        ce.sparse_categorical_cross_entropy(outside, np.array([0]))


def test_nan_row_propagates_and_validation_off_skips_the_check() -> None:
    p = np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]])
    assert np.isnan(ce.sparse_categorical_cross_entropy(p, np.array([0, 2])))
    with ce.validation(False):
        got = ce.categorical_cross_entropy(BAD, np.eye(3)[LABELS], reduction="none")
    np.testing.assert_allclose(to_numpy(got), -np.log(BAD[np.arange(3), LABELS]), rtol=1e-13)


def test_logits_and_soft_targets_are_not_checked() -> None:
    """Only probability predictions: logits are any reals, soft targets may be unnormalized."""
    x = np.array([[2.0, 0.5, -1.0]])
    assert np.isfinite(ce.sparse_categorical_cross_entropy(x, np.array([0]), from_logits=True))
    p = np.array([[0.2, 0.3, 0.5]])
    t = np.array([[0.5, 0.5, 0.5]])
    assert np.isfinite(ce.categorical_cross_entropy(p, t))


@pytest.mark.parametrize("loss", LOSSES, ids=["sparse", "categorical"])
def test_nan_in_a_non_target_class_propagates(xp: Any, loss: Any) -> None:
    """A NaN probability where the target is 0 is not hidden (as it is not with logits)."""
    conv = to_xp(xp)
    p = conv(np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]]))
    t = (
        conv(np.array([1, 2]))
        if loss is ce.sparse_categorical_cross_entropy
        else conv(np.eye(3)[[1, 2]])
    )
    got = to_numpy(loss(p, t, reduction="none"))
    assert np.isnan(got[0])
    np.testing.assert_allclose(got[1], -np.log(0.5), rtol=1e-13)
    value, _ = ce.value_and_grad(loss, p, t)
    assert np.isnan(float(to_numpy(value)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_that_fails_by_a_little_shows_why(dtype: Any) -> None:
    """The sum is printed with the digits that show it is not 1 ("sums to 1" at 6 digits)."""
    p = np.array([[0.5, 0.5 + 3e-6]], dtype=dtype)
    total = float(np.sum(p.astype(np.float64)))
    with pytest.raises(ValueError, match=re.escape(f"row 0 sums to {total!r} (tolerance")):
        ce.sparse_categorical_cross_entropy(p, np.array([0]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_are_not_checked(xp: Any, reduction: str) -> None:
    """A row whose label is ``ignore_index`` is not read, so it is not checked either: a
    padding row of zeros (or of values outside [0, 1]) was rejected ("row 1 sums to 0").
    The result is that of the counted rows alone, its gradient 0 on the ignored rows, NaN
    at a NaN entry of one (NaN propagates, as in an ignored row of logits). A counted bad
    row is still rejected, by its index in the batch."""
    conv = to_xp(xp)
    p = np.array([[0.2, 0.8], [0.0, 0.0], [3.0, -1.0], [np.nan, 0.5], [0.6, 0.4]])
    y = np.array([1, -100, -100, -100, 0])
    loss = ce.sparse_categorical_cross_entropy
    kwargs = {"ignore_index": -100, "reduction": reduction}
    value, grad = ce.value_and_grad(loss, conv(p), conv(y), **kwargs)
    counted = [0, 4]
    expected = to_numpy(loss(conv(p[counted]), conv(y[counted]), **kwargs))
    got = to_numpy(loss(conv(p), conv(y), **kwargs))
    np.testing.assert_allclose(got if reduction == "mean" else got[counted], expected, rtol=1e-12)
    if reduction == "none":
        np.testing.assert_array_equal(got[1:4], 0.0)
    np.testing.assert_allclose(to_numpy(value), got, rtol=1e-12)
    g = to_numpy(grad)
    np.testing.assert_array_equal(g[1:3], 0.0)
    assert np.isnan(g[3, 0])
    assert g[3, 1] == 0.0
    bad = p.copy()
    bad[4] = [0.6, 0.6]
    with pytest.raises(ValueError, match=re.escape("row 4 sums to 1.2")):
        loss(conv(bad), conv(y), **kwargs)


def test_ignored_rows_are_not_checked_under_autodiff() -> None:
    """The same through PyTorch's autograd and ``jax.grad``: the gradient of the ignored
    rows is 0 (NaN at a NaN entry)."""
    torch = pytest.importorskip("torch")
    p = np.array([[0.2, 0.8], [0.0, 0.0], [np.nan, 0.5]])
    y = np.array([1, -100, -100])
    pt = torch.tensor(p, requires_grad=True)
    ce.sparse_categorical_cross_entropy(pt, torch.tensor(y), ignore_index=-100).backward()
    expected = np.array([[0.0, -1.25], [0.0, 0.0], [np.nan, 0.0]])
    np.testing.assert_allclose(pt.grad.numpy(), expected, rtol=1e-12)
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def f(a: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(a, jnp.asarray(y), ignore_index=-100)

    np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(p))), expected, rtol=1e-6)
