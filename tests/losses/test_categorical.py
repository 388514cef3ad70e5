"""categorical_cross_entropy (soft targets) and ListNet: parity, references, closed-form grads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import crossent as ce
from crossent._losses._categorical import _categorical_value_and_grad
from tests._reference import categorical as ref
from tests.conftest import to_numpy, to_xp

torch = pytest.importorskip("torch")
F = torch.nn.functional
W = np.array([0.5, 2.0, 1.0, 1.5])


def _soft(seed: int, shape: tuple[int, ...], axis: int = -1) -> np.ndarray:
    e = np.exp(np.random.default_rng(seed).normal(size=shape))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("layout", ["2d", "4d"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_target_parity_with_torch(
    layout: str, weighted: bool, eps: float, reduction: str
) -> None:
    shape, axis = ((5, 4), -1) if layout == "2d" else ((2, 4, 3, 2), 1)
    x = torch.tensor(np.random.default_rng(0).normal(size=shape), requires_grad=True)
    t = _soft(1, shape, axis)
    w = torch.tensor(W) if weighted else None
    expected = F.cross_entropy(
        x, torch.tensor(t), weight=w, label_smoothing=eps, reduction=reduction
    )
    got = ce.categorical_cross_entropy(
        x,
        torch.tensor(t),
        from_logits=True,
        axis=axis,
        weight=w,
        label_smoothing=eps,
        reduction=reduction,
    )
    up = torch.rand(expected.shape, dtype=torch.float64)
    (ge,) = torch.autograd.grad(expected, x, up)
    (gg,) = torch.autograd.grad(got, x, up)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(gg), to_numpy(ge), rtol=1e-10, atol=1e-14)
    v, g = _categorical_value_and_grad(
        x.detach().numpy(), t, from_logits=True, axis=axis, weight=None if w is None else W,
        label_smoothing=eps, reduction=reduction, grad_output=up.numpy(),
    )  # fmt: skip
    np.testing.assert_allclose(v, to_numpy(expected), rtol=1e-12)
    np.testing.assert_allclose(g, to_numpy(ge), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "options",
    [{"from_logits": True}, {"from_logits": True, "gamma": 2.0, "weight": W, "label_smoothing": 0.1},
     {}, {"gamma": 0.5, "label_smoothing": 0.2, "reduction": "none"}],
)  # fmt: skip
def test_reference_and_finite_differences(xp: Any, options: dict[str, Any]) -> None:
    conv = to_xp(xp)
    logits = options.get("from_logits", False)
    x = (
        np.random.default_rng(2).normal(size=(3, 4))
        if logits
        else np.clip(_soft(2, (3, 4)), 0.02, 0.98)
    )
    t = _soft(3, (3, 4))
    expected = ref.categorical_ce(x, t, **options)
    xo = {k: conv(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    got = ce.categorical_cross_entropy(conv(x), conv(t), **xo)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-10)
    up = np.random.default_rng(4).uniform(0.5, 1.5, size=np.shape(expected))
    _, grad = _categorical_value_and_grad(conv(x), conv(t), grad_output=conv(up), **xo)
    numeric = ref.numerical_grad(lambda v: np.sum(up * ref.categorical_ce(v, t, **options)), x)
    np.testing.assert_allclose(to_numpy(grad), numeric, rtol=1e-6, atol=1e-8)


def test_masked_class_with_zero_target() -> None:
    x = np.array([[0.0, -np.inf, 1.0]])
    t = np.array([[0.3, 0.0, 0.7]])
    v, g = _categorical_value_and_grad(x, t, from_logits=True, gamma=1.0)
    assert np.isfinite(v)
    assert np.all(np.isfinite(g))
    assert g[0, 1] == 0
    xt = torch.tensor(x, requires_grad=True)
    ce.categorical_cross_entropy(xt, torch.tensor(t), from_logits=True, gamma=1.0).backward()
    np.testing.assert_allclose(xt.grad.numpy(), g, rtol=1e-12)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [({"target": np.ones((3, 5))}, ValueError, "same shape"),
     ({"weight": np.ones(3)}, ValueError, "length C=4"),
     ({"target": np.full((3, 4), 2.0)}, ValueError, r"\[0, 1\]"),
     ({"from_logits": False, "input": np.full((3, 4), 3.0)}, ValueError, "from_logits=True"),
     ({"reduction": "avg"}, ValueError, "reduction")],
)  # fmt: skip
def test_categorical_errors(change: dict[str, Any], exc: type[Exception], match: str) -> None:
    kw = {"input": np.zeros((3, 4)), "target": _soft(5, (3, 4)), "from_logits": True, **change}
    with pytest.raises(exc, match=match):
        ce.categorical_cross_entropy(kw.pop("input"), kw.pop("target"), **kw)


def test_listnet(xp: Any) -> None:
    conv = to_xp(xp)
    s = np.random.default_rng(6).normal(size=(3, 5))
    r = np.random.default_rng(7).integers(0, 4, size=(3, 5)).astype(float)
    np.testing.assert_allclose(
        to_numpy(ce.listnet_loss(conv(s), conv(r))), ref.listnet(s, r), rtol=1e-10
    )
    _, g = ce.value_and_grad(ce.listnet_loss, conv(s), conv(r), reduction="sum")
    q = np.exp(r) / np.exp(r).sum(-1, keepdims=True)
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(g), p - q, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="same shape"):
        ce.listnet_loss(conv(s), conv(r[:, :4]))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_subnormal_probability_gradient_is_c_over_p(xp: Any, gamma: float) -> None:
    """The closed-form probability gradient is c/p, not c · (1/p): for a float32 subnormal
    p = 1e-40, 1/p overflows, so a class with target 0 got 0 · inf = NaN (autograd: 0), and
    a smoothed target c = ε/C got -inf where c/p = -3.3e38 fits float32. (JAX on CPU
    flushes subnormals to 0, a clamped class: gradient 0, loss 100·c.)"""
    conv = to_xp(xp)
    tiny = 1e-40
    p = np.array([[tiny, 1 - tiny, 0.0]], dtype=np.float32)
    y = np.array([1])
    _, grad = ce.value_and_grad(
        ce.categorical_cross_entropy, conv(p), conv(np.eye(3, dtype=np.float32)[y]), gamma=gamma
    )
    g = to_numpy(grad)
    assert np.all(np.isfinite(g)), g
    np.testing.assert_array_equal(g[0, 0], 0.0)
    if gamma == 0:
        np.testing.assert_allclose(g[0, 1], -1.0, rtol=1e-6)
    _, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, conv(p), conv(y), label_smoothing=0.1
    )
    g = to_numpy(grad)
    flushed = g[0, 0] == 0  # JAX's CPU backend: p = 0, clamped
    want = -0.1 / 3 / np.float64(np.float32(tiny))
    assert flushed or g[0, 0] == pytest.approx(want, rel=1e-5), g
