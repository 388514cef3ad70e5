"""value_and_grad: closed-form gradients against torch autograd and finite differences."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from array_api_extra.testing import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as ce
from tests.conftest import to_numpy, to_xp

LOSSES = (
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "listnet_loss",
    "sparse_categorical_cross_entropy",
)


@dataclass(frozen=True)
class Case:
    """A loss, its float64 NumPy inputs and options (arrays in `options` move to the backend)."""

    id: str
    loss: str
    input: np.ndarray
    target: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _cases() -> list[Case]:
    r = _rng(0)
    logits34 = r.normal(size=(3, 4)) * 2.0
    binary_t = (r.uniform(size=(3, 4)) > 0.5).astype(np.float64)
    soft_t = r.uniform(size=(3, 4))
    probs = r.uniform(0.05, 0.95, size=(3, 4))
    elem_w = r.uniform(0.5, 2.0, size=(4,))
    pos_w = r.uniform(0.5, 3.0, size=(4,))
    class_w = r.uniform(0.5, 2.0, size=(4,))
    cat_t = _softmax(r.normal(size=(3, 4)))
    onehot = np.eye(4)[[0, 3, 1]]
    cat_p = _softmax(r.normal(size=(3, 4)))
    labels = np.array([0, 3, 1], dtype=np.int64)
    labels_ign = np.array([2, -100, 1], dtype=np.int64)
    logits3d = r.normal(size=(2, 4, 3))
    labels3d = np.array([[0, 3, 2], [1, 1, 0]], dtype=np.int64)
    scores = r.normal(size=(3, 5))
    relevance = r.integers(0, 4, size=(3, 5)).astype(np.float64)
    bce, cat, sparse, listnet = LOSSES[0], LOSSES[1], LOSSES[3], LOSSES[2]
    return [
        # binary
        Case("bce-logits", bce, logits34, binary_t, {"from_logits": True}),
        Case(
            "bce-logits-weight-pos_weight-sum",
            bce,
            logits34,
            soft_t,
            {"from_logits": True, "weight": elem_w, "pos_weight": pos_w, "reduction": "sum"},
        ),
        Case(
            "bce-logits-smoothing-focal-alpha",
            bce,
            logits34,
            binary_t,
            {"from_logits": True, "label_smoothing": 0.1, "gamma": 2.0, "alpha": 0.25},
        ),
        Case("bce-probs", bce, probs, soft_t, {}),
        Case(
            "bce-probs-focal-none",
            bce,
            probs,
            binary_t,
            {"gamma": 1.5, "alpha": 0.3, "reduction": "none", "weight": elem_w},
        ),
        # categorical
        Case("cat-logits-soft", cat, logits34, cat_t, {"from_logits": True}),
        Case(
            "cat-logits-weight-smoothing",
            cat,
            logits34,
            onehot,
            {"from_logits": True, "weight": class_w, "label_smoothing": 0.2},
        ),
        Case(
            "cat-logits-focal-axis0-sum",
            cat,
            logits34.T.copy(),
            cat_t.T.copy(),
            {"from_logits": True, "axis": 0, "gamma": 2.0, "reduction": "sum"},
        ),
        Case("cat-probs", cat, cat_p, cat_t, {}),
        Case("cat-probs-focal-none", cat, cat_p, onehot, {"gamma": 2.0, "reduction": "none"}),
        # sparse
        Case("sparse-logits", sparse, logits34, labels, {"from_logits": True}),
        Case(
            "sparse-weight-ignore-smoothing",
            sparse,
            logits34,
            labels_ign,
            {
                "from_logits": True,
                "weight": class_w,
                "ignore_index": -100,
                "label_smoothing": 0.1,
            },
        ),
        Case(
            "sparse-focal-weight-none",
            sparse,
            logits34,
            labels,
            {"from_logits": True, "gamma": 2.0, "weight": class_w, "reduction": "none"},
        ),
        Case(
            "sparse-zloss-softcap",
            sparse,
            logits34 * 3.0,
            labels_ign,
            {"from_logits": True, "z_loss": 1e-2, "softcap": 4.0, "ignore_index": -100},
        ),
        Case(
            "sparse-axis1-3d-sum",
            sparse,
            logits3d,
            labels3d,
            {"from_logits": True, "axis": 1, "reduction": "sum", "label_smoothing": 0.05},
        ),
        Case("sparse-probs-focal", sparse, cat_p, labels, {"gamma": 1.0}),
        # listnet
        Case("listnet", listnet, scores, relevance, {}),
        Case("listnet-axis0-sum", listnet, scores.T.copy(), relevance.T.copy(), {"axis": 0}),
        Case("listnet-none", listnet, scores, relevance, {"reduction": "none"}),
    ]


CASES = _cases()
CASE_IDS = [c.id for c in CASES]


def _on(xp: Any, case: Case) -> tuple[Any, Any, dict[str, Any]]:
    conv = to_xp(xp)
    opts = {k: conv(v) if isinstance(v, np.ndarray) else v for k, v in case.options.items()}
    return conv(case.input), conv(case.target), opts


def _loss_fn(name: str) -> Any:
    return getattr(ce, name)


def _total(value: Any) -> float:
    """The scalar that the gradient is of: the loss, or the sum of per-item losses."""
    return float(np.sum(to_numpy(value)))


@functools.cache
def _torch_autograd(case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Value and d(sum of loss)/d(input) by torch autograd of the crossent function itself."""
    torch = pytest.importorskip("torch")
    case = next(c for c in CASES if c.id == case_id)
    import array_api_compat.torch as xp_torch

    x, t, opts = _on(xp_torch, case)
    x = x.clone().requires_grad_(True)
    value = _loss_fn(case.loss)(x, t, **opts)
    torch.sum(value).backward()
    assert x.grad is not None
    return to_numpy(value), to_numpy(x.grad)


def _finite_differences(xp: Any, case: Case, h: float = 1e-6) -> np.ndarray:
    """Central differences of the (summed) loss on backend `xp`, one element at a time."""
    _, t, opts = _on(xp, case)
    fn = _loss_fn(case.loss)
    base = case.input
    grad = np.zeros_like(base)
    conv = to_xp(xp)
    with ce.validation(False):  # a perturbed probability row no longer sums to 1
        for index in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[index] += h
            down[index] -= h
            grad[index] = (_total(fn(conv(up), t, **opts)) - _total(fn(conv(down), t, **opts))) / (
                2 * h
            )
    return grad


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_value_and_grad_matches_torch_autograd(xp: Any, case: Case) -> None:
    x, t, opts = _on(xp, case)
    value, grad = ce.value_and_grad(case.loss, x, t, **opts)
    want_value, want_grad = _torch_autograd(case.id)
    conv = to_xp(xp)
    assert_close(value, conv(want_value), rtol=1e-12, atol=1e-14)
    assert_close(grad, conv(want_grad), rtol=1e-10, atol=1e-13)
    # the value is the loss itself, not something close to it
    assert_close(value, _loss_fn(case.loss)(x, t, **opts), rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_value_and_grad_matches_finite_differences(xp: Any, case: Case) -> None:
    x, t, opts = _on(xp, case)
    _, grad = ce.value_and_grad(_loss_fn(case.loss), x, t, **opts)
    want = _finite_differences(xp, case)
    np.testing.assert_allclose(to_numpy(grad), want, rtol=1e-6, atol=1e-8)


def test_gradient_descent_step_lowers_every_loss() -> None:
    for case in CASES:
        fn = _loss_fn(case.loss)
        value, grad = ce.value_and_grad(fn, case.input, case.target, **case.options)
        step = 1e-3 / max(1.0, float(np.max(np.abs(grad))))
        with ce.validation(False):  # the step leaves the probability simplex
            lower = fn(case.input - step * grad, case.target, **case.options)
        assert _total(lower) < _total(value), case.id


def test_all_ignored_gives_zero_loss_and_zero_grad(xp: Any) -> None:
    conv = to_xp(xp)
    x = conv(np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]]))
    t = conv(np.array([-100, -100], dtype=np.int64))
    value, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x, t, from_logits=True, ignore_index=-100
    )
    assert float(value) == 0.0
    assert np.all(to_numpy(grad) == 0.0)


def test_masked_logit_gets_a_finite_zero_gradient() -> None:
    x = np.array([[0.5, -np.inf, 1.0], [2.0, 0.0, -np.inf]])
    t = np.array([0, 1])
    value, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, t, from_logits=True)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert grad[0, 1] == 0.0
    assert grad[1, 2] == 0.0


def test_nan_in_input_propagates() -> None:
    x = np.array([[0.5, np.nan, 1.0], [2.0, 0.0, 1.0]])
    value, grad = ce.value_and_grad(
        "sparse_categorical_cross_entropy", x, np.array([0, 1]), from_logits=True
    )
    assert np.isnan(value)
    assert np.isnan(grad[0]).all()


def test_torch_grad_keeps_dtype_and_needs_no_autograd() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 5, dtype=torch.float32)
    t = torch.tensor([0, 4, 2, 1])
    with torch.no_grad():
        value, grad = ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, x, t, from_logits=True, label_smoothing=0.1
        )
    assert grad.dtype == torch.float32
    assert grad.shape == x.shape
    assert not grad.requires_grad
    xd = x.double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(xd, t, label_smoothing=0.1)
    want.backward()
    assert xd.grad is not None
    torch.testing.assert_close(grad, xd.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, want.detach().float(), rtol=1e-5, atol=1e-6)


def test_partial_binds_options() -> None:
    x = np.array([[1.0, -2.0], [0.5, 0.0]])
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    bound = functools.partial(ce.binary_cross_entropy, from_logits=True)
    got = ce.value_and_grad(bound, x, t, gamma=2.0)
    want = ce.value_and_grad(ce.binary_cross_entropy, x, t, from_logits=True, gamma=2.0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_unknown_loss_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="sparse_categorical_cross_entropy") as info:
        ce.value_and_grad("cross_entropy", np.zeros((2, 3)), np.array([0, 1]))
    for name in LOSSES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 'listnet_loss'"):
        ce.value_and_grad("listnet", np.zeros((2, 3)), np.zeros((2, 3)))


def test_unknown_loss_function_is_rejected() -> None:
    with pytest.raises(ValueError, match="binary_cross_entropy, categorical_cross_entropy"):
        ce.value_and_grad(ce.info.cross_entropy, np.ones((2, 3)) / 3, np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="autodiff"):
        ce.value_and_grad(lambda a, b: a, np.zeros(2), np.zeros(2))
    with pytest.raises(TypeError, match="`loss` must be a crossent loss function or its name"):
        ce.value_and_grad(3, np.zeros(2), np.zeros(2))
    with pytest.raises(TypeError, match="keyword only"):
        ce.value_and_grad(functools.partial(ce.listnet_loss, np.zeros(2)), np.zeros(2), np.zeros(2))


def test_unknown_option_is_named_with_the_valid_ones() -> None:
    x, t = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(TypeError, match="`from_logit`") as info:
        ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, t, from_logit=True)
    message = str(info.value)
    assert "did you mean `from_logits`" in message
    for option in ("from_logits", "axis", "ignore_index", "z_loss", "softcap", "reduction"):
        assert option in message
    with pytest.raises(TypeError, match=r"`ignore_index`.*listnet_loss takes axis, reduction"):
        ce.value_and_grad("listnet_loss", x, x, ignore_index=0)
    # `xp` is an internal argument of the closed-form functions, not a loss option
    with pytest.raises(TypeError, match="`xp`"):
        ce.value_and_grad("binary_cross_entropy", x, x, xp=np)


def test_errors_of_the_loss_itself_come_through() -> None:
    with pytest.raises(ValueError, match="reduction"):
        ce.value_and_grad("binary_cross_entropy", np.zeros(3), np.zeros(3), reduction="avg")
    with pytest.raises(ValueError, match="from_logits=True"):
        ce.value_and_grad("binary_cross_entropy", np.array([2.0, -1.0]), np.array([1.0, 0.0]))


def test_value_and_grad_runs_under_jax_jit() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = jnp.asarray(CASES[11].input)
    t = jnp.asarray(CASES[11].target)
    options = {**CASES[11].options, "weight": jnp.asarray(CASES[11].options["weight"])}

    @jax.jit
    def step(z: Any) -> Any:
        return ce.value_and_grad("sparse_categorical_cross_entropy", z, t, **options)

    value, grad = step(x)
    want_value, want_grad = ce.value_and_grad("sparse_categorical_cross_entropy", x, t, **options)
    np.testing.assert_allclose(np.asarray(value), np.asarray(want_value), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-12, atol=1e-15)


@settings(max_examples=25)
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    classes=st.integers(2, 5),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    smoothing=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_closed_form_equals_torch_autodiff(
    data: st.DataObject, rows: int, classes: int, gamma: float, smoothing: float, reduction: str
) -> None:
    """Hypothesis: sparse and binary closed forms (NumPy) == autograd of the written-out formulas.

    The references (tests/_reference/focal.py) are plain float64 torch loops, independent
    of crossent's code paths (crossent's torch sparse path is itself a closed-form Function).
    """
    torch = pytest.importorskip("torch")
    from tests._reference import focal as ref

    finite = st.floats(-8.0, 8.0, allow_nan=False, width=64)
    z = np.array(data.draw(st.lists(finite, min_size=rows * classes, max_size=rows * classes)))
    z = z.reshape(rows, classes)
    labels = np.array(
        data.draw(st.lists(st.integers(0, classes - 1), min_size=rows, max_size=rows))
    )
    hard = (np.arange(rows * classes).reshape(rows, classes) % 2).astype(np.float64)
    common = {"gamma": gamma, "label_smoothing": smoothing, "reduction": reduction}
    references: list[tuple[str, np.ndarray, dict[str, Any], Callable[..., Any]]] = [
        ("sparse_categorical_cross_entropy", labels, {}, ref.softmax_focal),
        ("binary_cross_entropy", hard, {"alpha": 0.25}, ref.sigmoid_focal_per_term),
    ]
    for name, target, extra, reference in references:
        _, grad = ce.value_and_grad(name, z, target, from_logits=True, **common, **extra)
        zt = torch.tensor(z, requires_grad=True)
        torch.sum(reference(zt, torch.as_tensor(target), **common, **extra)).backward()
        assert zt.grad is not None
        np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_input_and_target_by_keyword_as_in_the_contract() -> None:
    # API.md spells it value_and_grad(loss, input, target, **options): the keyword form works too
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 2])
    want = ce.value_and_grad(ce.sparse_categorical_cross_entropy, logits, labels, from_logits=True)
    for got in (
        ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, input=logits, target=labels, from_logits=True
        ),
        ce.value_and_grad(
            "sparse_categorical_cross_entropy", logits, target=labels, from_logits=True
        ),
    ):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_distillation_arrays_must_be_positional() -> None:
    # its `target=` is the row mask, never the teacher's logits
    student = np.array([[1.0, 0.0], [0.0, 2.0]])
    mask = np.array([0, -100])
    with pytest.raises(TypeError, match="student's and the teacher's logits"):
        ce.value_and_grad(ce.distillation_loss, student, target=mask)
    _, grad = ce.value_and_grad(ce.distillation_loss, student, student[::-1], target=mask)
    assert grad.shape == student.shape
    assert np.all(grad[1] == 0)


_INF = np.inf
_NAN_ROW_CASES = [
    # (loss, logits, target, options): row 0's loss is NaN (an infinite or NaN logit); row 1
    # is finite. The closed forms gave gradients finite in part of row 0 (shown)
    ("categorical_cross_entropy", [[_INF, 0.0], [0.5, -1.0]], [[0.0, 1.0], [0.3, 0.7]], {}),  # nan -1
    ("listnet_loss", [[_INF, 0.2], [0.5, -1.0]], [[1.0, 0.0], [2.0, 1.0]], {}),  # nan -0.27
    ("sparse_categorical_cross_entropy", [[1.0, _INF, -_INF], [0.5, -1.0, 0.2]], [1, 2], {}),  # 0 nan 0
    (
        "sparse_categorical_cross_entropy",
        [[_INF, 0.2, -4.0], [0.5, -1.0, 0.2]],
        [2, 0],
        {"label_smoothing": 0.1},
    ),  # nan -0.03 -0.93
    ("distillation_loss", [[0.3, -1.6, 1.1], [0.5, -1.0, 0.2]], [[_INF, -0.3, 1.6], [0.0] * 3],
     {"beta": 0.0}),  # nan 0.04 0.65
]  # fmt: skip


@pytest.mark.parametrize(("name", "logits", "target", "options"), _NAN_ROW_CASES)
def test_a_nan_loss_row_has_a_nan_gradient_row(
    xp: Any, name: str, logits: Any, target: Any, options: dict[str, Any]
) -> None:
    """value_and_grad: a row whose loss is NaN (from an infinite or NaN logit) has a gradient
    that is NaN throughout, as autodiff and PyTorch give (NaN propagates), on every backend;
    the other rows are those of the batch without it."""
    import warnings

    conv = to_xp(xp)
    loss = getattr(ce, name)
    if name != "listnet_loss" and name != "distillation_loss":
        options = {**options, "from_logits": True}
    z, t = np.asarray(logits), np.asarray(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's inf - inf
        value, grad = ce.value_and_grad(loss, conv(z), conv(t), reduction="none", **options)
    _, want = ce.value_and_grad(loss, z[1:], t[1:], reduction="none", **options)
    assert np.isnan(to_numpy(value)[0])
    assert np.isnan(to_numpy(grad)[0]).all(), to_numpy(grad)[0]
    np.testing.assert_allclose(to_numpy(grad)[1:], want, rtol=1e-12, atol=1e-15)
