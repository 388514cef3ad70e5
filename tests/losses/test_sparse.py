"""sparse_categorical_cross_entropy, nll_loss and their closed-form gradients."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crossent as ce
from crossent._losses._options import make_options
from crossent._losses._sparse import _forward, _nll_loss, _sparse_value_and_grad
from tests._reference import categorical as ref
from tests.conftest import to_numpy, to_xp

torch = pytest.importorskip("torch")
F = torch.nn.functional

C = 4
W = np.array([0.5, 2.0, 1.0, 1.5])


def _data(
    seed: int, shape: tuple[int, ...] = (3, C), *, axis: int = -1, probs: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2.0
    if probs:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        x = e / e.sum(axis=axis, keepdims=True)
        x = np.clip(x, 0.02, 0.98)  # keeps central differences away from 0 and 1
        x = x / x.sum(axis=axis, keepdims=True)  # rows of probabilities sum to 1
    label_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    y = rng.integers(0, shape[axis], size=label_shape)
    return x, y


def _tol(dtype: Any) -> dict[str, float]:
    return (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )


# --------------------------------------------------------------------------- PyTorch parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["2d", "4d"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("ignore", [False, True], ids=["", "ignore"])
@pytest.mark.parametrize("eps", [0.0, 0.2], ids=["", "smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_parity(
    dtype: Any, layout: str, weighted: bool, ignore: bool, eps: float, reduction: str
) -> None:
    shape, axis = ((5, C), -1) if layout == "2d" else ((2, C, 3, 2), 1)
    x_np, y_np = _data(1, shape, axis=axis)
    if ignore:
        y_np.reshape(-1)[[1, 3]] = -100
    w_np = W if weighted else None
    x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
    y = torch.tensor(y_np)
    w = None if w_np is None else torch.tensor(w_np, dtype=dtype)
    options = {"weight": w, "label_smoothing": eps, "reduction": reduction}
    expected = F.cross_entropy(x, y, ignore_index=-100, **options)
    got = ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, axis=axis, ignore_index=-100 if ignore else None, **options
    )
    assert got.dtype == dtype
    assert got.shape == expected.shape
    upstream = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    (g_expected,) = torch.autograd.grad(expected, x, upstream)
    (g_got,) = torch.autograd.grad(got, x, upstream)
    tol = _tol(dtype)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), **tol)
    np.testing.assert_allclose(to_numpy(g_got), to_numpy(g_expected), **tol)
    # the closed form on NumPy gives the same value and gradient
    value, grad = _sparse_value_and_grad(
        x_np.astype(to_numpy(x).dtype), y_np, from_logits=True, axis=axis, weight=w_np,
        ignore_index=-100 if ignore else None, label_smoothing=eps, reduction=reduction,
        grad_output=to_numpy(upstream),
    )  # fmt: skip
    np.testing.assert_allclose(value, to_numpy(expected), **tol)
    np.testing.assert_allclose(grad, to_numpy(g_expected), **tol)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("layout", ["2d", "4d"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probabilities_match_nll_of_clamped_log(
    weighted: bool, layout: str, reduction: str
) -> None:
    shape, axis = ((5, C), -1) if layout == "2d" else ((2, C, 3), 1)
    p_np, y_np = _data(2, shape, axis=axis, probs=True)
    y_np.reshape(-1)[0] = -100
    p = torch.tensor(p_np, requires_grad=True)
    y = torch.tensor(y_np)
    w = torch.tensor(W) if weighted else None
    expected = F.nll_loss(torch.log(p).clamp(min=-100), y, weight=w, reduction=reduction)
    got = ce.sparse_categorical_cross_entropy(
        p, y, axis=axis, weight=w, ignore_index=-100, reduction=reduction
    )
    upstream = torch.rand(expected.shape, dtype=torch.float64)
    (g_expected,) = torch.autograd.grad(expected, p, upstream)
    (g_got,) = torch.autograd.grad(got, p, upstream)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(g_got), to_numpy(g_expected), rtol=1e-12)
    _, grad = _sparse_value_and_grad(
        p_np, y_np, axis=axis, weight=None if w is None else W, ignore_index=-100,
        reduction=reduction, grad_output=to_numpy(upstream),
    )  # fmt: skip
    np.testing.assert_allclose(grad, to_numpy(g_expected), rtol=1e-12)


def test_probability_zero_is_clamped_at_100() -> None:
    p = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 2])
    loss = ce.sparse_categorical_cross_entropy(p, y, reduction="none")
    np.testing.assert_allclose(loss, [100.0, 100.0])
    value, grad = _sparse_value_and_grad(p, y, reduction="sum")
    assert value == 200.0
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, np.zeros_like(p))  # clamped: no gradient (torch: NaN)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("layout", ["2d", "4d"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_parity(weighted: bool, layout: str, reduction: str) -> None:
    shape = (5, C) if layout == "2d" else (2, C, 3, 2)
    x_np, y_np = _data(3, shape, axis=1)
    y_np.reshape(-1)[1] = -100
    log_p = torch.log_softmax(torch.tensor(x_np), dim=1).detach().requires_grad_(True)
    y = torch.tensor(y_np)
    w = torch.tensor(W) if weighted else None
    expected = F.nll_loss(log_p, y, weight=w, reduction=reduction)
    got = _nll_loss(log_p, y, axis=1, weight=w, ignore_index=-100, reduction=reduction)
    upstream = torch.rand(expected.shape, dtype=torch.float64)
    (g_expected,) = torch.autograd.grad(expected, log_p, upstream)
    (g_got,) = torch.autograd.grad(got, log_p, upstream)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(g_got), to_numpy(g_expected), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        to_numpy(got),
        ref.nll(log_p.detach().numpy(), y_np, weight=None if w is None else W, ignore_index=-100,
                reduction=reduction),
        rtol=1e-12,
    )  # fmt: skip


# --------------------------------------------------------------------------- every backend

W_OPT = "W"  # placeholder replaced by the backend's weight array
CASES: dict[str, tuple[tuple[int, ...], int, bool, dict[str, Any]]] = {
    "logits": ((3, C), -1, False, {"from_logits": True}),
    "weight-ignore-smooth": (
        (4, C), -1, True,
        {"from_logits": True, "weight": W_OPT, "ignore_index": -100, "label_smoothing": 0.1},
    ),
    "focal-smooth-weight-sum": (
        (3, C), -1, False,
        {"from_logits": True, "gamma": 2.0, "label_smoothing": 0.2, "weight": W_OPT,
         "reduction": "sum"},
    ),
    "focal-half": ((3, C), -1, False, {"from_logits": True, "gamma": 0.5}),
    "zloss-softcap-ignore": (
        (4, C), -1, True,
        {"from_logits": True, "z_loss": 0.05, "softcap": 2.5, "ignore_index": -100,
         "label_smoothing": 0.1},
    ),
    "probs": ((3, C), -1, False, {}),
    "probs-focal-smooth-weight": (
        (4, C), -1, True,
        {"gamma": 1.5, "label_smoothing": 0.1, "weight": W_OPT, "ignore_index": -100},
    ),
    "axis1-3d-none": ((2, C, 3), 1, False, {"from_logits": True, "gamma": 1.0, "reduction": "none"}),
    "axis0-probs-none": ((C, 3), 0, False, {"reduction": "none", "label_smoothing": 0.3}),
}  # fmt: skip


def _case(name: str, xp: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    shape, axis, ignore, options = CASES[name]
    x, y = _data(7, shape, axis=axis, probs=not options.get("from_logits", False))
    if ignore:
        y.reshape(-1)[1] = -100
    np_options = {**options, "axis": axis}
    xp_options = dict(np_options)
    if options.get("weight") is W_OPT:
        np_options["weight"] = W
        xp_options["weight"] = to_xp(xp)(W)
    return x, y, np_options, xp_options


@pytest.mark.parametrize("name", list(CASES))
def test_value_and_closed_form_grad_vs_reference(xp: Any, name: str) -> None:
    x, y, np_options, xp_options = _case(name, xp)
    conv = to_xp(xp)
    expected = ref.sparse_ce(x, y, **np_options)
    got = ce.sparse_categorical_cross_entropy(conv(x), conv(y), **xp_options)
    assert type(got).__module__.split(".")[0] == type(conv(x)).__module__.split(".")[0]
    assert got.dtype == conv(x).dtype
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-10, atol=1e-12)

    upstream = np.random.default_rng(0).uniform(0.5, 1.5, size=np.shape(expected))
    value, grad = _sparse_value_and_grad(conv(x), conv(y), grad_output=conv(upstream), **xp_options)
    np.testing.assert_allclose(to_numpy(value), expected, rtol=1e-10, atol=1e-12)
    numeric = ref.numerical_grad(lambda v: np.sum(upstream * ref.sparse_ce(v, y, **np_options)), x)
    assert grad.shape == conv(x).shape
    np.testing.assert_allclose(to_numpy(grad), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_grad_equals_autodiff(name: str) -> None:
    """Autodiff of the generic path (torch and JAX) and the torch Function == closed form."""
    x, y, np_options, _ = _case(name, np)
    upstream = np.random.default_rng(1).uniform(
        0.5, 1.5, size=np.shape(ref.sparse_ce(x, y, **np_options))
    )
    _, closed = _sparse_value_and_grad(x, y, grad_output=upstream, **np_options)

    options = {**np_options, "weight": None if "weight" not in np_options else torch.tensor(W)}
    xt = torch.tensor(x, requires_grad=True)
    public = ce.sparse_categorical_cross_entropy(xt, torch.tensor(y), **options)
    (g_public,) = torch.autograd.grad(public, xt, torch.tensor(upstream))
    np.testing.assert_allclose(g_public.numpy(), closed, rtol=1e-10, atol=1e-12)

    opts = make_options(**{k: v for k, v in np_options.items() if k not in ("weight", "axis")})
    axis = np_options.get("axis", -1) % x.ndim
    generic = _forward(
        xt, torch.tensor(y), weight=options["weight"], axis=axis, opts=opts, xp=_torch_xp()
    )
    (g_generic,) = torch.autograd.grad(generic, xt, torch.tensor(upstream))
    np.testing.assert_allclose(g_generic.numpy(), closed, rtol=1e-10, atol=1e-12)

    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jax_options = {**np_options, "weight": None if "weight" not in np_options else jnp.asarray(W)}

    def jax_loss(v: Any) -> Any:
        return jnp.sum(
            jnp.asarray(upstream)
            * ce.sparse_categorical_cross_entropy(v, jnp.asarray(y), **jax_options)
        )

    np.testing.assert_allclose(
        np.asarray(jax.grad(jax_loss)(jnp.asarray(x))), closed, rtol=1e-10, atol=1e-12
    )


@functools.cache
def _torch_xp() -> Any:
    import array_api_compat.torch as xp_torch

    return xp_torch


# --------------------------------------------------------------------------- focal, z-loss, softcap


def test_focal_matches_direct_formula() -> None:
    x_np, y_np = _data(4, (6, 5))
    gamma = 2.0
    x = torch.tensor(x_np, requires_grad=True)
    y = torch.tensor(y_np)
    p_y = torch.softmax(x, dim=1).gather(1, y[:, None])[:, 0]
    expected = (-((1 - p_y) ** gamma) * torch.log(p_y)).mean()
    got = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, gamma=gamma)
    (g_expected,) = torch.autograd.grad(expected, x)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_focal_is_finite_at_extreme_logits(xp: Any, label_smoothing: float) -> None:
    x = np.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0], [100.0, -100.0, -100.0]])
    y = np.array([0, 0, 1])
    conv = to_xp(xp)
    options = {"from_logits": True, "gamma": 0.5, "label_smoothing": label_smoothing}
    value, grad = _sparse_value_and_grad(conv(x), conv(y), **options)
    assert np.isfinite(to_numpy(value))
    assert np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(to_numpy(value), ref.sparse_ce(x, y, **options), rtol=1e-12)
    # the near-certain row (1 - p_y = e^-100) contributes only its exact, tiny gradient
    # without smoothing: (1 - p_y)^1.5 ~ e^-150, derivatives of order e^-150
    if label_smoothing == 0:
        assert np.all(np.abs(to_numpy(grad)[0]) <= 1e-60)
    xt = torch.tensor(x, requires_grad=True)
    ce.sparse_categorical_cross_entropy(xt, torch.tensor(y), **options).backward()
    assert torch.isfinite(xt.grad).all()
    # torch.logsumexp rounds log(1 + e^-100) to 0 where crossent's keeps it: |diff| ~ e^-150
    np.testing.assert_allclose(xt.grad.numpy(), to_numpy(grad), rtol=1e-10, atol=1e-60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zloss_and_softcap_match_direct_formula(dtype: Any, reduction: str) -> None:
    x_np, y_np = _data(5, (6, 5))
    y_np[2] = -100
    x = torch.tensor(x_np * 5, dtype=dtype, requires_grad=True)
    y = torch.tensor(y_np)
    cap, z_loss = 4.0, 1e-2
    z = cap * torch.tanh(x / cap)
    per_item = F.cross_entropy(z, y, reduction="none") + z_loss * torch.logsumexp(z, 1) ** 2
    per_item = torch.where(y != -100, per_item, torch.zeros_like(per_item))
    expected = per_item if reduction == "none" else per_item.sum() / (y != -100).sum()
    got = ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, ignore_index=-100, z_loss=z_loss, softcap=cap, reduction=reduction
    )
    upstream = torch.rand(expected.shape, dtype=dtype)
    (g_expected,) = torch.autograd.grad(expected, x, upstream)
    (g_got,) = torch.autograd.grad(got, x, upstream)
    tol = _tol(dtype)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(g_got, g_expected, **tol)


# --------------------------------------------------------------------------- masking, ignore


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_masked_logits_give_finite_value_and_grad(xp: Any, gamma: float) -> None:
    inf = np.inf
    x = np.array([[0.5, -inf, 1.0, -inf], [-inf, 2.0, -inf, 0.0]])
    y = np.array([2, 1])
    conv = to_xp(xp)
    options = {"from_logits": True, "gamma": gamma, "weight": conv(W)}
    value, grad = _sparse_value_and_grad(conv(x), conv(y), **options)
    g = to_numpy(grad)
    assert np.isfinite(to_numpy(value))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[np.isinf(x)], 0.0)
    np.testing.assert_allclose(
        to_numpy(value), ref.sparse_ce(x, y, from_logits=True, gamma=gamma, weight=W), rtol=1e-12
    )
    forward = ce.sparse_categorical_cross_entropy(conv(x), conv(y), **options)
    np.testing.assert_allclose(to_numpy(forward), to_numpy(value), rtol=1e-12)
    if xp.__name__.startswith(("torch", "array_api_compat.torch")):
        xt = conv(x).requires_grad_(True)
        ce.sparse_categorical_cross_entropy(xt, conv(y), **options).backward()
        np.testing.assert_allclose(xt.grad.numpy(), g, rtol=1e-12)


def test_masked_logit_with_label_smoothing_is_infinite() -> None:
    x = np.array([[0.0, -np.inf, 1.0]])
    loss = ce.sparse_categorical_cross_entropy(
        x, np.array([0]), from_logits=True, label_smoothing=0.1
    )
    assert loss == np.inf
    torch_loss = ce.sparse_categorical_cross_entropy(
        torch.tensor(x), torch.tensor([0]), from_logits=True, label_smoothing=0.1
    )
    assert torch_loss.item() == np.inf
    # and a softcapped -inf logit stays masked
    capped = ce.sparse_categorical_cross_entropy(x, np.array([0]), from_logits=True, softcap=5.0)
    np.testing.assert_allclose(
        capped, ref.sparse_ce(x, np.array([0]), from_logits=True, softcap=5.0)
    )


def test_zero_probability_on_non_target_gives_no_nan(xp: Any) -> None:
    p = np.array([[0.0, 0.3, 0.7], [0.5, 0.0, 0.5]])
    y = np.array([2, 0])
    conv = to_xp(xp)
    for gamma in (0.0, 0.5):
        value, grad = _sparse_value_and_grad(conv(p), conv(y), gamma=gamma)
        assert np.isfinite(to_numpy(value))
        g = to_numpy(grad)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[p == 0], 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_grad(xp: Any, reduction: str) -> None:
    x, _ = _data(8, (3, C))
    y = np.full(3, -1)
    conv = to_xp(xp)
    options = {"from_logits": True, "ignore_index": -1, "z_loss": 0.1, "label_smoothing": 0.1,
               "reduction": reduction}  # fmt: skip
    value, grad = _sparse_value_and_grad(conv(x), conv(y), **options)
    np.testing.assert_array_equal(to_numpy(value), np.zeros(() if reduction != "none" else 3))
    np.testing.assert_array_equal(to_numpy(grad), np.zeros_like(x))
    xt = torch.tensor(x, requires_grad=True)
    loss = ce.sparse_categorical_cross_entropy(xt, torch.tensor(y), **options)
    loss.sum().backward()
    assert float(loss.detach().sum()) == 0.0
    assert torch.count_nonzero(xt.grad) == 0


# --------------------------------------------------------------------------- properties

_logits = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 4), st.integers(2, 5)),
    elements=st.floats(-30, 30, allow_nan=False),
)  # fmt: skip


@st.composite
def _problems(draw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = draw(_logits)
    y = draw(hnp.arrays(np.int64, x.shape[:1], elements=st.integers(0, x.shape[1] - 1)))
    w = draw(hnp.arrays(np.float64, x.shape[1:], elements=st.floats(0.1, 3.0)))
    return x, y, w


_options = st.fixed_dictionaries(
    {
        "label_smoothing": st.sampled_from([0.0, 0.3]),
        "gamma": st.sampled_from([0.0, 0.5, 2.0]),
        "weighted": st.booleans(),
    }
)


@given(_problems(), _options, st.floats(-50, 50))
def test_shift_invariance(problem: Any, options: dict[str, Any], shift: float) -> None:
    x, y, w = problem
    kw = {"from_logits": True, "label_smoothing": options["label_smoothing"],
          "gamma": options["gamma"], "weight": w if options["weighted"] else None}  # fmt: skip
    a = ce.sparse_categorical_cross_entropy(x, y, **kw)
    b = ce.sparse_categorical_cross_entropy(x + shift, y, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@given(_problems(), _options)
def test_grad_rows_sum_to_zero_and_loss_nonnegative(problem: Any, options: dict[str, Any]) -> None:
    x, y, w = problem
    kw = {"from_logits": True, "label_smoothing": options["label_smoothing"],
          "gamma": options["gamma"], "weight": w if options["weighted"] else None}  # fmt: skip
    value, grad = _sparse_value_and_grad(x, y, reduction="none", **kw)
    assert np.all(value >= 0)
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-12)


@given(_problems(), _options, st.booleans())
def test_sparse_equals_categorical_of_one_hot(
    problem: Any, options: dict[str, Any], logits: bool
) -> None:
    x, y, w = problem
    if not logits:
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        x = x / x.sum(axis=-1, keepdims=True)
    kw = {"from_logits": logits, "label_smoothing": options["label_smoothing"],
          "gamma": options["gamma"], "weight": w if options["weighted"] else None,
          "reduction": "none"}  # fmt: skip
    one_hot = np.eye(x.shape[1])[y]
    sparse_v, sparse_g = _sparse_value_and_grad(x, y, **kw)
    cat_v, cat_g = ce.value_and_grad(ce.categorical_cross_entropy, x, one_hot, **kw)
    np.testing.assert_allclose(sparse_v, cat_v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sparse_g, cat_g, rtol=1e-8, atol=1e-10)


@given(_problems(), st.booleans(), st.booleans())
def test_mean_is_sum_over_count(problem: Any, weighted: bool, ignore: bool) -> None:
    x, y, w = problem
    if ignore:
        y = y.copy()
        y[0] = -100
    kw = {"from_logits": True, "weight": w if weighted else None, "ignore_index": -100}
    mean = ce.sparse_categorical_cross_entropy(x, y, **kw)
    total = ce.sparse_categorical_cross_entropy(x, y, reduction="sum", **kw)
    counted = y != -100
    count = (w[y[counted]] if weighted else np.ones(counted.sum())).sum()
    np.testing.assert_allclose(mean, total / count if count else 0.0, rtol=1e-12)


# --------------------------------------------------------------------------- bad input


def _bad(kind: str) -> tuple[Any, dict[str, Any], type[Exception], str]:
    x, y = _data(9, (3, C))
    p = np.full((3, C), 1 / C)
    base = {"input": x, "target": y, "from_logits": True}
    table: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
        "label-too-big": ({"target": np.array([0, 4, 1])}, ValueError, r"outside \[0, 4\).*max=4"),
        "label-negative": ({"target": np.array([0, -1, 1])}, ValueError, r"outside \[0, 4\)"),
        "label-not-ignored": (
            {"target": np.array([0, -5, 1]), "ignore_index": -100}, ValueError, "ignore_index=-100",
        ),
        "float-labels": ({"target": y.astype(float)}, TypeError, "integer class indices"),
        "bool-labels": ({"target": y > 0}, TypeError, "integer class indices"),
        "target-shape": ({"target": y[:2]}, ValueError, r"shape of `input` without the class axis"),
        "weight-length": ({"weight": np.ones(3)}, ValueError, "length C=4"),
        "weight-2d": ({"weight": np.ones((1, 4))}, ValueError, "length C=4"),
        "negative-weight": ({"weight": np.array([1.0, -1.0, 1.0, 1.0])}, ValueError, "non-negative"),
        "probs-are-logits": ({"from_logits": False}, ValueError, "from_logits=True"),
        "z_loss-needs-logits": ({"input": p, "from_logits": False, "z_loss": 0.1}, ValueError, "`z_loss` needs logits"),
        "softcap-needs-logits": ({"input": p, "from_logits": False, "softcap": 30.0}, ValueError, "`softcap` needs logits"),
        "bad-axis": ({"axis": 2}, ValueError, r"`axis`=2 is out of range"),
        "float-axis": ({"axis": 1.0}, TypeError, "`axis` must be an int"),
        "reduction": ({"reduction": "avg"}, ValueError, "`reduction` must be one of"),
        "smoothing": ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        "gamma": ({"gamma": -1.0}, ValueError, "gamma"),
        "softcap-zero": ({"softcap": 0.0}, ValueError, "`softcap` must be positive"),
        "ignore-float": ({"ignore_index": -1.0}, TypeError, "`ignore_index` must be None or an int"),
        "int-input": ({"input": np.ones((3, C), dtype=np.int64)}, TypeError, "`input` must have a floating dtype"),
        "from_logits-str": ({"from_logits": "yes"}, TypeError, "`from_logits` must be a bool"),
    }  # fmt: skip
    change, exc, match = table[kind]
    return None, {**base, **change}, exc, match


@pytest.mark.parametrize(
    "kind",
    [
        "label-too-big", "label-negative", "label-not-ignored", "float-labels", "bool-labels",
        "target-shape", "weight-length", "weight-2d", "negative-weight", "probs-are-logits",
        "z_loss-needs-logits", "softcap-needs-logits", "bad-axis", "float-axis", "reduction",
        "smoothing", "gamma", "softcap-zero", "ignore-float", "int-input", "from_logits-str",
    ],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bad_input_raises_clear_error(kind: str, backend: str) -> None:
    _, kw, exc, match = _bad(kind)
    if backend == "torch":
        kw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    args = (kw.pop("input"), kw.pop("target"))
    with pytest.raises(exc, match=match):
        ce.sparse_categorical_cross_entropy(*args, **kw)
    with pytest.raises(exc, match=match):
        _sparse_value_and_grad(*args, **kw)


def test_validation_switch_skips_value_checks_only() -> None:
    x, y = _data(9, (3, C))
    p = np.full((3, C), 2.0)  # not probabilities: only a value check catches it
    with ce.validation(False):
        ce.sparse_categorical_cross_entropy(p, y)  # no error
        with pytest.raises(TypeError, match="integer class indices"):
            ce.sparse_categorical_cross_entropy(x, y.astype(float), from_logits=True)


def test_nan_propagates() -> None:
    x, y = _data(10, (3, C))
    x[1, 2] = np.nan
    assert np.isnan(ce.sparse_categorical_cross_entropy(x, y, from_logits=True))
    loss = ce.sparse_categorical_cross_entropy(torch.tensor(x), torch.tensor(y), from_logits=True)
    assert torch.isnan(loss)


# --------------------------------------------------------------------------- the torch executor


def test_layouts_and_input_unchanged() -> None:
    """axis=0, a non-contiguous view, every option: same results, input unchanged after backward."""
    x_np, y_np = _data(11, (C, 7), axis=0)
    y_np[3] = -100
    options = {"from_logits": True, "axis": 0, "weight": W, "ignore_index": -100,
               "label_smoothing": 0.1, "gamma": 1.0, "z_loss": 0.01, "softcap": 3.0}  # fmt: skip
    for extra in ({}, {"gamma": 0.0, "z_loss": 0.0, "softcap": None}):
        opts = {**options, **extra}
        expected, g_expected = _sparse_value_and_grad(x_np, y_np, **opts)
        for x in (torch.tensor(x_np), torch.tensor(np.ascontiguousarray(x_np.T)).T):
            x = x.requires_grad_(True) if x.is_leaf else x.detach().requires_grad_(True)
            before = x.detach().clone()
            loss = ce.sparse_categorical_cross_entropy(
                x, torch.tensor(y_np), **{**opts, "weight": torch.tensor(W)}
            )
            loss.backward()
            np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)
            np.testing.assert_allclose(x.grad.numpy(), g_expected, rtol=1e-10, atol=1e-14)
            assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_function_low_precision(dtype: Any) -> None:
    x_np, y_np = _data(12, (16, 40))
    x_np = x_np * 4
    x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
    options = {"from_logits": True, "label_smoothing": 0.1, "z_loss": 1e-3}
    loss = ce.sparse_categorical_cross_entropy(x, torch.tensor(y_np), **options)
    loss.backward()
    assert loss.dtype == dtype
    assert x.grad.dtype == dtype
    x64 = x.detach().double().numpy()  # the same (rounded) inputs in float64
    expected, g_expected = _sparse_value_and_grad(x64, y_np, **options)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    np.testing.assert_allclose(loss.double().item(), expected, rtol=rtol)
    np.testing.assert_allclose(x.grad.double().numpy(), g_expected, rtol=rtol, atol=rtol / 40 / 16)
    with torch.no_grad():
        assert ce.sparse_categorical_cross_entropy(x, torch.tensor(y_np), **options).dtype == dtype


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_a_nan_label_term_leaves_the_other_classes_gradient_zero(xp: Any, gamma: float) -> None:
    """The target's gradient term is added at its class only: a NaN (or infinite) term there
    left NaN in every class of the row on backends without a scatter (array-api-strict:
    ``g + one_hot * value`` forms 0 · NaN), where autodiff and NumPy give 0."""
    conv = to_xp(xp)
    p = np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]])
    y = np.array([0, 1])
    _, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, conv(p), conv(y), gamma=gamma, reduction="none"
    )
    g = to_numpy(grad)
    assert np.isnan(g[0, 0])
    np.testing.assert_array_equal(g[0, 1:], 0.0)
    q = 0.3
    want = -((1 - q) ** gamma) / q + gamma * (1 - q) ** (gamma - 1) * np.log(q)  # d/dq
    np.testing.assert_allclose(g[1], [0.0, want, 0.0], rtol=1e-12)
