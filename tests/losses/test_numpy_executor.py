"""The NumPy executor (``crossent._backends._numpy``): the lean path equals the float64
reference and the generic array-API path, raises the same errors, and steps aside
where it must."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

import crossent as ce
from crossent._backends import _numpy as numpy_exec
from crossent._losses._options import make_options
from tests._reference.categorical import numerical_grad, sparse_ce

strict = pytest.importorskip("array_api_strict")

N, C = 7, 5

OPTIONS = {
    "plain": {},
    "weight": {"weight": "w"},
    "ignore": {"ignore_index": -100},
    "smoothing": {"label_smoothing": 0.2},
    "weight-smoothing-ignore": {"weight": "w", "label_smoothing": 0.1, "ignore_index": -100},
    "zloss-softcap": {"z_loss": 0.05, "softcap": 2.0},
    "focal-weight": {"gamma": 2.0, "weight": "w", "ignore_index": -100},
    "sum": {"reduction": "sum", "weight": "w"},
    "none": {"reduction": "none", "ignore_index": -100},
}


def _data(seed: int = 0, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = (r.normal(size=(N, C)) * 3).astype(dtype)
    y = r.integers(0, C, N)
    y[3] = -100
    w = r.uniform(0.5, 2.0, C).astype(dtype)
    return x, y, w


def _options(name: str, w: np.ndarray) -> dict[str, Any]:
    return {k: (w if v == "w" else v) for k, v in OPTIONS[name].items()}


def _labels(y: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    return y if "ignore_index" in options else np.where(y < 0, 1, y)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_value_and_grad_equal_the_float64_reference(name: str) -> None:
    x, y, w = _data()
    options = _options(name, w)
    y = _labels(y, options)
    lean = numpy_exec.sparse(
        x, y, options.get("weight"), -1, make_options(from_logits=True, **_public(options)),
        with_grad=True,
    )  # fmt: skip
    assert lean is not None  # the lean path is the one under test
    loss, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x, y, from_logits=True, **options
    )
    np.testing.assert_allclose(loss, lean[0], rtol=0, atol=0)
    ref = sparse_ce(x, y, from_logits=True, **options)
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-14)
    forward = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, **options)
    np.testing.assert_allclose(forward, ref, rtol=1e-12, atol=1e-14)

    def total(v: np.ndarray) -> float:
        return float(np.sum(sparse_ce(v, y, from_logits=True, **options)))

    np.testing.assert_allclose(grad, numerical_grad(total, x), rtol=1e-6, atol=1e-8)


def _public(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "weight"}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_lean_path_equals_the_generic_path(name: str, dtype: Any) -> None:
    """array_api_strict arrays take the generic array-API formula: same values, dtype."""
    x, y, w = _data(1, dtype)
    options = _options(name, w)
    y = _labels(y, options)
    got = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, y, from_logits=True, **options)
    s_options = {k: (strict.asarray(v) if k == "weight" else v) for k, v in options.items()}
    want = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, strict.asarray(x), strict.asarray(y),
        from_logits=True, **s_options,
    )  # fmt: skip
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, np.ndarray)
        assert a.dtype == dtype
        np.testing.assert_allclose(a, np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int16, np.int32, np.int64], ids=str)
def test_class_axis_one_and_label_widths(label_dtype: Any) -> None:
    r = np.random.default_rng(2)
    x = r.normal(size=(2, C, 3))
    y = r.integers(0, C, (2, 3)).astype(label_dtype)
    fn = functools.partial(ce.sparse_categorical_cross_entropy, from_logits=True, axis=1)
    loss, grad = ce.value_and_grad(fn, x, y)
    ref = sparse_ce(x, y.astype(np.int64), from_logits=True, axis=1)
    np.testing.assert_allclose(loss, ref, rtol=1e-12)
    np.testing.assert_allclose(
        grad, numerical_grad(lambda v: sparse_ce(v, y, from_logits=True, axis=1), x), rtol=1e-6
    )
    assert grad.shape == x.shape


def test_all_ignored_mean_is_zero_with_zero_gradient() -> None:
    x, y, _ = _data()
    y[:] = -100
    loss, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x, y, from_logits=True, ignore_index=-100
    )
    assert float(loss) == 0.0
    assert not grad.any()


def test_large_logits_keep_their_accuracy() -> None:
    """float32 logits [1e4, 1e4]: log 2 to the last bit (the large parts cancel first)."""
    x = np.array([[1e4, 1e4]], dtype=np.float32)
    loss = ce.sparse_categorical_cross_entropy(x, np.array([0]), from_logits=True)
    assert loss == np.float32(np.log(2.0))


@pytest.mark.parametrize("bad", [-1, C], ids=["negative", "too-large"])
def test_bad_labels_raise_the_clear_error(bad: int) -> None:
    x, y, _ = _data()
    y[3] = bad
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 5\)"):
        ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, y, from_logits=True)
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 5\)"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True, ignore_index=-100)


def test_negative_class_weight_raises() -> None:
    x, y, w = _data()
    w[0] = -1.0
    with pytest.raises(ValueError, match="`weight`"):
        ce.sparse_categorical_cross_entropy(x, np.where(y < 0, 0, y), from_logits=True, weight=w)


@pytest.mark.parametrize(
    "case",
    ["masked-row", "nan", "float16", "probabilities", "focal-smoothing", "empty", "list"],
)
def test_steps_aside_where_the_generic_path_must_decide(case: str) -> None:
    x, y, _ = _data()
    y = np.where(y < 0, 0, y)
    opts = make_options(from_logits=True)
    if case == "masked-row":
        x[2] = -np.inf
    elif case == "nan":
        x[2, 1] = np.nan
    elif case == "float16":
        x = x.astype(np.float16)
    elif case == "probabilities":
        opts = make_options(from_logits=False)
    elif case == "focal-smoothing":
        opts = make_options(from_logits=True, gamma=2.0, label_smoothing=0.1)
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "list":
        y = y.tolist()
    assert numpy_exec.sparse(x, y, None, -1, opts, with_grad=True) is None


def test_masked_and_nan_rows_still_give_the_generic_results() -> None:
    x, y, _ = _data()
    y = np.where(y < 0, 0, y)
    x[2] = -np.inf
    x[4, 1] = np.nan
    x[5, 0] = -np.inf
    loss = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, reduction="none")
    want = ce.sparse_categorical_cross_entropy(
        strict.asarray(x), strict.asarray(y), from_logits=True, reduction="none"
    )
    np.testing.assert_array_equal(loss, np.asarray(want))
    assert np.isnan(loss[4])
    assert np.isfinite(np.delete(loss, [2, 4])).all()


def test_mean_over_zero_weight_keeps_a_nan_sum() -> None:
    """The mean over a counted weight of 0 is the sum over +inf (``safe_divide``'s rule): 0 for a
    finite sum, NaN for a NaN one. The lean path returned 0 for a NaN sum (a label of weight 0
    on a -inf class: 0 · inf), hiding it where the generic path and PyTorch give NaN. That
    label's term is 0 now (test_masked_target.py::test_zero_weight_label_on_a_masked_class);
    a NaN logit in a counted row of weight 0 makes the sum NaN."""
    masked = np.array([[-np.inf, -3.4, 0.7, 3.1], [0.5, 1.0, -1.0, 2.0]])
    nan = np.where(np.isinf(masked), np.nan, masked)
    w = np.array([0.0, 0.5, 0.0, 2.0])
    cases = ((nan, [0, 2], True), (masked, [0, 2], False), (masked, [2, 2], False))
    for x, labels, want_nan in cases:
        y = np.array(labels)
        for smoothing in (0.0, 0.1):
            opts = {"from_logits": True, "weight": w, "label_smoothing": smoothing}
            loss = ce.sparse_categorical_cross_entropy(x, y, **opts)
            generic = ce.sparse_categorical_cross_entropy(
                strict.asarray(x), strict.asarray(y), **{**opts, "weight": strict.asarray(w)}
            )
            assert bool(np.isnan(loss)) == want_nan == bool(np.isnan(np.asarray(generic)))
            if not want_nan:
                assert loss == 0.0
