"""Differential review of the non-torch paths: NumPy's lean executor, the generic formula on
array-api-strict and JAX, ``value_and_grad``'s closed forms and ``jax.grad``, against the float64
references of :mod:`tests._reference`, on masked classes, ignored rows and extreme logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as ce
from tests._reference import binary as RB
from tests._reference import categorical as R
from tests._reference import info as RI
from tests.conftest import to_numpy, to_xp

_INF = float("inf")


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_smoothing": 0.1},
        {"z_loss": 0.1, "softcap": 5.0},
        {"gamma": 2.0},
        {"weight": np.array([1.0, 2.0, 0.5])},
    ],
    ids=["plain", "smoothing", "z_loss-softcap", "focal", "weight"],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_ignored_row_on_a_masked_class_gives_no_warning(
    xp: Any, opts: dict[str, Any], reduction: str
) -> None:
    """The stand-in label of an ignored row (0) on a -inf class made -log p_y = inf times the
    target weight 0: NumPy warned (an error under ``-W error``) before masking the NaN."""
    conv = to_xp(xp)
    x = np.array([[-_INF, 1.0, 2.0], [-_INF, 1.0, 2.0], [0.5, -_INF, 3.0]])
    t = np.array([-100, 2, -100])
    kw = {key: conv(v) if isinstance(v, np.ndarray) else v for key, v in opts.items()}
    kw |= {"from_logits": True, "ignore_index": -100, "reduction": reduction}
    loss = ce.sparse_categorical_cross_entropy(conv(x), conv(t), **kw)
    value, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, conv(x), conv(t), **kw)
    ref_kw = {**opts, "from_logits": True, "reduction": reduction}
    ref = ce.sparse_categorical_cross_entropy(x[1:2], t[1:2], **ref_kw)
    ref_value, ref_grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x[1:2], t[1:2], **ref_kw
    )
    got, got_value, g = to_numpy(loss), to_numpy(value), to_numpy(grad)
    if reduction == "none":
        np.testing.assert_array_equal(got[[0, 2]], 0.0)
        np.testing.assert_array_equal(got_value[[0, 2]], 0.0)
        got, got_value = got[1:2], got_value[1:2]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(got_value, ref_value, rtol=1e-12)
    np.testing.assert_array_equal(g[[0, 2]], 0.0)
    np.testing.assert_allclose(g[1:2], ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("gamma", "z_loss"), [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (0.0, 0.1), (2.0, 0.1)]
)
def test_focal_gradient_of_an_ignored_row_on_a_masked_class_is_zero_under_autograd(
    gamma: float, z_loss: float
) -> None:
    """PyTorch's executor reads -log p_y from ``log_softmax`` (inf at a masked stand-in label):
    the focal slope's p log p was 0 * -inf = NaN, and the z-loss's log-sum-exp z_y - log p_y
    was -inf - (-inf) = NaN: a NaN gradient row for an ignored row."""
    torch = pytest.importorskip("torch")
    x = torch.tensor([[-_INF, 1.0, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([-100, 2])
    opts = {"from_logits": True, "ignore_index": -100, "gamma": gamma, "z_loss": z_loss}
    leaf = x.clone().requires_grad_(True)
    ce.sparse_categorical_cross_entropy(leaf, t, **opts).backward()
    _, ref_grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x[1:].numpy(), t[1:].numpy(), **opts
    )
    assert leaf.grad is not None
    g = leaf.grad.numpy()
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_allclose(g[1:], ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_focal_slope_at_a_zero_probability_is_its_limit(gamma: float) -> None:
    """The slope f (1 + γ q), q = p (-log p) / (1 - p), at p = 0 is 1 (0 · log 0 = 0), not NaN."""
    from crossent._losses._rows import focal_terms

    nll = np.array([np.inf, 800.0, np.nan])
    for autodiff in (True, False):
        _, slope = focal_terms(nll, 1.0, gamma, autodiff=autodiff, xp=np)
        np.testing.assert_array_equal(slope, [1.0, 1.0, np.nan])


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_focal_gradient_of_an_ignored_row_on_a_masked_class_is_zero(
    xp: Any, gamma: float, z_loss: float
) -> None:
    """An ignored row reads its stand-in label 0; with that class masked (-inf), p = 0 and the
    focal slope's p log p was 0 * -inf = NaN: a NaN gradient row from a row that is ignored."""
    conv = to_xp(xp)
    x = np.array([[-_INF, 1.0, 2.0], [0.0, 1.0, 2.0]])
    t = np.array([-100, 2])
    opts = {"from_logits": True, "ignore_index": -100, "gamma": gamma, "z_loss": z_loss}
    loss, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, conv(x), conv(t), **opts)
    # the counted row alone gives the same loss and gradient
    ref_loss, ref_grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x[1:], t[1:], **opts
    )
    g = to_numpy(grad)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_allclose(g[1:], ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(to_numpy(loss)), float(ref_loss), rtol=1e-12)


_NARROW = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]


@pytest.mark.parametrize("dtype", _NARROW)
@pytest.mark.parametrize("ignore_index", [None, -100, 255, 1])
def test_labels_of_every_integer_width_on_every_backend(
    xp: Any, dtype: str, ignore_index: int | None
) -> None:
    """array-api-strict refused to compare uint8 labels with -100 (OverflowError) and to one-hot
    uint64 labels against int64 classes (TypeError): the sparse loss and its closed form raised."""
    name = xp.__name__
    if (dtype == "uint64" and name.startswith("jax")) or (
        dtype in ("uint16", "uint32", "uint64") and "torch" in name
    ):
        pytest.skip(f"{dtype} labels are not an index type of {name}")
    conv = to_xp(xp)
    x = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.5, -0.5]])
    t = np.array([0, 2, 1])
    opts = {"from_logits": True, "ignore_index": ignore_index, "reduction": "none"}
    labels = conv(t, getattr(xp, dtype))
    loss = ce.sparse_categorical_cross_entropy(conv(x), labels, **opts)
    value, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, conv(x), labels, **opts)
    ref_loss, ref_grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, t, **opts)
    np.testing.assert_allclose(to_numpy(loss), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(value), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-12, atol=1e-15)
    counted = t != (ignore_index if ignore_index is not None else -1)
    teacher = x[::-1].copy()
    distill = ce.distillation_loss(
        conv(x), conv(teacher), target=labels, ignore_index=ignore_index, reduction="none"
    )
    ref = ce.distillation_loss(x, teacher, reduction="none") * counted
    np.testing.assert_allclose(to_numpy(distill), ref, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="`target`"):
        ce.sparse_categorical_cross_entropy(
            conv(x), conv(np.array([0, 5, 1]), getattr(xp, dtype)), **opts
        )


# --------------------------------------------------------------------------- the harness
# Cheap differential property tests: NumPy (its lean executor where it applies), the generic
# formula on array-api-strict and on JAX, value_and_grad's closed forms and jax.grad, against
# the float64 references of tests._reference, on extreme data (±1e4, -inf masked classes,
# subnormals, exact 0/1 probabilities), with NumPy's warnings as errors.

_EXTREME = st.sampled_from([1.0, 5.0, 1e4, 1e-310])


@st.composite
def _logits(draw: Any, *, masked: bool = True) -> tuple[np.ndarray, int]:
    """Logits of 1 to 3 dimensions, a class axis (possibly negative), some classes masked."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * draw(_EXTREME)
    if masked and draw(st.booleans()):  # mask classes, never a whole row
        top = x == x.max(axis=axis, keepdims=True)
        x = np.where((rng.random(shape) < 0.4) & ~top, -np.inf, x)
    return x, axis


def _softmax(x: np.ndarray, axis: int, *, certain: bool) -> np.ndarray:
    z = np.moveaxis(x, axis, -1)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    if certain:  # exact 0 / 1 probabilities
        p = (p == p.max(axis=-1, keepdims=True)).astype(np.float64)
        p = p / p.sum(axis=-1, keepdims=True)
    return np.moveaxis(p, -1, axis)


def _backends() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    strict = pytest.importorskip("array_api_strict")
    out.append(("array_api_strict", strict))
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    out.append(("jax", jax.numpy))
    return out


def _agree(loss: Any, x: np.ndarray, t: np.ndarray, opts: dict[str, Any], ref: Any) -> None:
    """NumPy value and closed-form gradient equal the reference; the other backends equal NumPy;
    jax.grad of the loss equals the closed form wherever the loss is finite."""
    value = loss(x, t, **opts)
    v2, grad = ce.value_and_grad(loss, x, t, **opts)
    np.testing.assert_allclose(value, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v2, value, rtol=1e-12, atol=1e-15)
    assert grad.shape == x.shape
    assert grad.dtype == x.dtype
    for name, xp in _backends():
        conv = to_xp(xp)
        o = {k: conv(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
        got, (got_v, got_g) = (
            loss(conv(x), conv(t), **o),
            ce.value_and_grad(loss, conv(x), conv(t), **o),
        )
        np.testing.assert_allclose(to_numpy(got), value, rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(to_numpy(got_v), value, rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(to_numpy(got_g), grad, rtol=1e-9, atol=1e-12, err_msg=name)
        if name == "jax" and np.all(np.isfinite(value)):
            import jax

            auto = jax.grad(lambda a: xp.sum(loss(a, conv(t), **o)))(conv(x))  # noqa: B023
            np.testing.assert_allclose(np.asarray(auto), grad, rtol=1e-7, atol=1e-10)


@settings(max_examples=8)
@given(
    data=_logits(),
    from_logits=st.booleans(),
    certain=st.booleans(),
    label_dtype=st.sampled_from(["int8", "uint8", "int32", "int64"]),
    ignore=st.sampled_from([None, "some", "all"]),
    weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 5.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_sparse_agrees_everywhere(
    data: tuple[np.ndarray, int],
    from_logits: bool,
    certain: bool,
    label_dtype: str,
    ignore: str | None,
    weight: bool,
    label_smoothing: float,
    gamma: float,
    z_loss: float,
    softcap: float | None,
    reduction: str,
    seed: int,
) -> None:
    x, axis = data
    rng = np.random.default_rng(seed)
    num = x.shape[axis]
    t = rng.integers(0, num, size=x.shape[: axis % x.ndim] + x.shape[axis % x.ndim + 1 :])
    opts: dict[str, Any] = {"from_logits": from_logits, "axis": axis, "reduction": reduction}
    if from_logits:
        opts |= {"z_loss": z_loss, "softcap": softcap}
    else:
        x = _softmax(x, axis, certain=certain)
    if ignore is not None:
        index = 255 if label_dtype == "uint8" else -100
        drop = rng.random(t.shape) < 0.5 if ignore == "some" else np.ones(t.shape, bool)
        t = np.where(drop, index, t)
        opts["ignore_index"] = index
    if weight:
        opts["weight"] = rng.choice([0.0, 0.5, 2.0], size=num)
    opts |= {"label_smoothing": label_smoothing, "gamma": gamma}
    t = t.astype(label_dtype)
    ref = R.sparse_ce(x, t, **opts)
    if not np.all(np.isfinite(ref)):  # a masked class under smoothing: +inf, checked elsewhere
        return
    _agree(ce.sparse_categorical_cross_entropy, x, t, opts, ref)


@settings(max_examples=8)
@given(
    data=_logits(),
    from_logits=st.booleans(),
    certain=st.booleans(),
    weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_categorical_agrees_everywhere(
    data: tuple[np.ndarray, int],
    from_logits: bool,
    certain: bool,
    weight: bool,
    label_smoothing: float,
    gamma: float,
    reduction: str,
    seed: int,
) -> None:
    x, axis = data
    rng = np.random.default_rng(seed)
    # soft targets with 0 exactly on masked classes (0 · log 0 = 0), sometimes one-hot
    t = _softmax(np.where(np.isinf(x), -np.inf, rng.normal(size=x.shape)), axis, certain=certain)
    if not from_logits:
        x = _softmax(x, axis, certain=certain)
    opts: dict[str, Any] = {"from_logits": from_logits, "axis": axis, "reduction": reduction}
    if weight:
        opts["weight"] = rng.choice([0.0, 0.5, 2.0], size=x.shape[axis])
    opts |= {"label_smoothing": label_smoothing, "gamma": gamma}
    ref = R.categorical_ce(x, t, **opts)
    if not np.all(np.isfinite(ref)):
        return
    _agree(ce.categorical_cross_entropy, x, t, opts, ref)


@settings(max_examples=12)
@given(
    data=_logits(masked=False),
    from_logits=st.booleans(),
    weight=st.booleans(),
    pos_weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    alpha=st.sampled_from([None, 0.25]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_binary_agrees_everywhere(
    data: tuple[np.ndarray, int],
    from_logits: bool,
    weight: bool,
    pos_weight: bool,
    label_smoothing: float,
    gamma: float,
    alpha: float | None,
    reduction: str,
    seed: int,
) -> None:
    x, _ = data
    rng = np.random.default_rng(seed)
    if not from_logits:  # exact 0 / 1 among them
        x = np.where(rng.random(x.shape) < 0.3, x > 0, 0.5 * (1 + np.tanh(x / 2)))
        x = x.astype(np.float64)
    t = rng.choice([0.0, 1.0, 0.3], size=x.shape)
    opts: dict[str, Any] = {"from_logits": from_logits, "reduction": reduction, "alpha": alpha}
    if weight:
        opts["weight"] = rng.choice([0.0, 0.5, 2.0], size=x.shape[-1:])
    if pos_weight:
        opts["pos_weight"] = rng.choice([0.0, 3.0], size=x.shape[-1:])
    opts |= {"label_smoothing": label_smoothing, "gamma": gamma}
    _agree(ce.binary_cross_entropy, x, t, opts, RB.binary_cross_entropy(x, t, **opts))


_MEASURES = ["entropy", "cross_entropy", "kl_divergence", "js_divergence"]


@settings(max_examples=15)
@given(
    p_data=_logits(),
    seed=st.integers(0, 2**16),
    from_logits=st.booleans(),
    certain=st.booleans(),
    base=st.sampled_from([None, 2, 10, 0.5]),
)
def test_information_measures_agree_everywhere(
    p_data: tuple[np.ndarray, int], seed: int, from_logits: bool, certain: bool, base: Any
) -> None:
    """Every measure: NumPy equals the reference, strict and JAX equal NumPy; from logits
    jax.grad is finite wherever the value is; the laws H(p, q) >= H(p), KL >= 0 and JS >= 0
    (in a base above 1) and shift invariance of logits hold on the extremes."""
    zp, axis = p_data
    rng = np.random.default_rng(seed)
    zq = np.where(np.isinf(zp), -np.inf, rng.normal(size=zp.shape) * 30)
    p, q = (
        (zp, zq)
        if from_logits
        else (
            _softmax(zp, axis, certain=certain),
            _softmax(zq, axis, certain=False),
        )
    )
    refs = RI if not from_logits else None
    out = {}
    for name in _MEASURES:
        fn = getattr(ce.info, name)
        args = (p,) if name == "entropy" else (p, q)
        kw = {"axis": axis, "base": base, "from_logits": from_logits}
        value = fn(*args, **kw)
        out[name] = value
        if refs is not None:
            ref = getattr(RI, name)(*args, axis, base)
        else:
            ref = getattr(RI, f"{name}_from_logits")(*args, axis, base)
        np.testing.assert_allclose(value, ref, rtol=1e-9, atol=1e-12, err_msg=name)
        if from_logits:
            shifted = fn(*(a + 3.0 for a in args), **kw)
            np.testing.assert_allclose(shifted, value, rtol=1e-9, atol=1e-9, err_msg=name)
        for xp_name, xp in _backends():
            conv = to_xp(xp)
            got = fn(*(conv(a) for a in args), **kw)
            np.testing.assert_allclose(
                to_numpy(got), value, rtol=1e-12, atol=1e-15, err_msg=f"{name} {xp_name}"
            )
            if xp_name == "jax" and from_logits and np.all(np.isfinite(value)):
                import jax

                rest = [conv(a) for a in args[1:]]
                g = jax.grad(lambda a: xp.sum(fn(a, *rest, **kw)))(conv(args[0]))  # noqa: B023
                assert np.all(np.isfinite(np.asarray(g))), name
    if base is None or base > 1:
        tol = 1e-9 * (1 + np.abs(out["entropy"]))
        assert np.all(out["cross_entropy"] >= out["entropy"] - tol)
        assert np.all(out["kl_divergence"] >= -1e-12)
        assert np.all(out["js_divergence"] >= -1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_smoothing_over_a_zero_weight_masked_class_gives_no_warning(
    xp: Any, dtype: str, reduction: str
) -> None:
    """The smoothing sum Σ_k w_k (m - z_k) formed 0 · inf on a zero-weight class with a -inf
    logit (NumPy warned before the ``where`` dropped it); such a class contributes 0.

    PyTorch's executor gave ``F.cross_entropy``'s NaN there (its 0 · inf), silently: a NaN
    result of the kernel under weighted smoothing now takes crossent's row terms."""
    conv = to_xp(xp)
    x = np.array([[-_INF, 1.0, 2.0], [0.5, -1.0, -_INF]])
    t = np.array([1, 0])
    w = np.array([0.0, 1.0, 0.0])
    opts = {"from_logits": True, "label_smoothing": 0.2, "reduction": reduction}
    ref = R.sparse_ce(x, t, weight=w, **opts)
    np_dtype = getattr(np, dtype)
    xx, ww = conv(x, getattr(xp, dtype)), conv(w, getattr(xp, dtype))
    loss = ce.sparse_categorical_cross_entropy(xx, conv(t), weight=ww, **opts)
    value, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, xx, conv(t), weight=ww, **opts
    )
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_numpy(loss), ref.astype(np_dtype), rtol=tol)
    np.testing.assert_allclose(to_numpy(value), ref.astype(np_dtype), rtol=tol)
    g = to_numpy(grad)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[0, 0], 0.0)
    np.testing.assert_array_equal(g[1, 2], 0.0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_autodiff_of_an_ignored_row_with_a_masked_class_under_focal_smoothing(gamma: float) -> None:
    """Focal loss with smoothing goes class by class: an ignored row's smoothing term on a
    masked class is inf, dropped by a ``where`` whose zero cotangent met the infinite
    derivative: jax.grad gave a NaN gradient row for an ignored row."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x = np.array([[0.5, -_INF, 1.0], [0.0, 1.0, 2.0]])
    t = np.array([-100, 2])
    opts = {"from_logits": True, "ignore_index": -100, "label_smoothing": 0.1, "gamma": gamma}

    def loss(a: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(a, jnp.asarray(t), **opts)

    g = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    _, ref = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, t, **opts)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.1}, {"gamma": 2.0}, {"gamma": 2.0, "label_smoothing": 0.1}]
)
@pytest.mark.parametrize("how", ["torch", "torch_double", "torch_func", "jax"])
def test_class_weight_gradient_beside_an_ignored_row_with_masked_classes(
    how: str, opts: dict[str, Any]
) -> None:
    """Class weights that take a gradient (learned class weights) and an ignored row holding
    masked classes: its -inf logits gave the smoothing sum w_k (m - z_k) = inf, and its stand-in
    label 0 (a masked class) an infinite -log p_y times the target weight 0; the row's loss is
    masked, and the zero gradient that reached those products made the weights' gradient NaN
    (autograd, its double backward, torch.func and JAX alike). It equals the gradient without
    the ignored row."""
    x = np.array([[-_INF, 0.5, -_INF, 0.2], [0.1, 0.2, 0.3, 0.4], [1.0, -0.5, 0.0, 2.0]])
    t = np.array([-100, 1, 3])
    w = np.array([0.8, 0.9, 1.2, 1.5])
    kw = {"from_logits": True, "ignore_index": -100, **opts}
    if how == "jax":
        jax = pytest.importorskip("jax")
        jnp = jax.numpy

        def jloss(xx: Any, ww: Any, rows: slice) -> Any:
            return ce.sparse_categorical_cross_entropy(
                xx[rows], jnp.asarray(t[rows]), weight=ww, **kw
            )

        got = jax.grad(jloss, argnums=1)(jnp.asarray(x), jnp.asarray(w), slice(None))
        want = jax.grad(jloss, argnums=1)(jnp.asarray(x), jnp.asarray(w), slice(1, None))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-15)
        return
    torch = pytest.importorskip("torch")

    def loss(xx: Any, ww: Any, rows: slice) -> Any:
        return ce.sparse_categorical_cross_entropy(xx[rows], torch.tensor(t[rows]), weight=ww, **kw)

    def weight_grad(rows: slice) -> Any:
        xx, ww = torch.tensor(x), torch.tensor(w)
        if how == "torch_func":
            return torch.func.grad(loss, argnums=1)(xx, ww, rows)
        ww.requires_grad_(True)
        xx.requires_grad_(how == "torch_double")
        if how == "torch":
            return torch.autograd.grad(loss(xx, ww, rows), ww)[0]
        (gx,) = torch.autograd.grad(loss(xx, ww, rows), xx, create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), ww)[0]  # a gradient penalty's

    got, want = weight_grad(slice(None)), weight_grad(slice(1, None))
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["categorical", "listnet", "sparse", "entropy", "kl"])
def test_jax_hessian_where_the_largest_logit_is_tied(name: str) -> None:
    """JAX's Hessians equal those of ``jax.nn.log_softmax``'s formula where the row max is
    shared by several classes (equal logits: a freshly initialized classifier). The log-sum-exp
    held the maxima's terms at 1 and took their derivative from the max's own, which JAX
    splits between the tied classes: right in the first derivative, wrong in the second
    (0 at equal logits) for the categorical loss and ListNet."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    t = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 5))), axis=-1)
    y = jnp.array([1, 3, 0])

    def log_softmax(v: Any) -> Any:
        return jax.nn.log_softmax(v, axis=-1)

    ours, ref = {
        "categorical": (
            lambda v: ce.categorical_cross_entropy(v, t, from_logits=True),
            lambda v: -jnp.mean(jnp.sum(t * log_softmax(v), axis=-1)),
        ),
        "listnet": (
            lambda v: ce.listnet_loss(v, jnp.log(t)),
            lambda v: -jnp.mean(jnp.sum(t * log_softmax(v), axis=-1)),
        ),
        "sparse": (
            lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True),
            lambda v: -jnp.mean(jnp.take_along_axis(log_softmax(v), y[:, None], axis=-1)),
        ),
        "entropy": (
            lambda v: jnp.sum(ce.info.entropy(v, from_logits=True)),
            lambda v: -jnp.sum(jax.nn.softmax(v, axis=-1) * log_softmax(v)),
        ),
        "kl": (
            lambda v: jnp.sum(ce.info.kl_divergence(jnp.log(t), v, from_logits=True)),
            lambda v: jnp.sum(t * (jnp.log(t) - log_softmax(v))),
        ),
    }[name]
    for x in (
        jnp.zeros((3, 5)),
        jnp.array(
            [[1.0, 1.0, 0.0, -1.0, 1.0], [2.0, -1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0, 5.0]]
        ),
    ):
        np.testing.assert_allclose(
            np.asarray(jax.hessian(ours)(x)),
            np.asarray(jax.hessian(ref)(x)),
            rtol=1e-12,
            atol=1e-15,
        )
