"""Differential review of the non-torch paths: NumPy's lean executor, the generic formula on
array-api-strict and JAX, ``value_and_grad``'s closed forms and ``jax.grad``, against the float64
references of :mod:`tests._reference`, on masked classes, ignored rows and extreme logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import crossent as ce
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


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_focal_gradient_of_an_ignored_row_on_a_masked_class_is_zero_under_autograd(
    gamma: float,
) -> None:
    """PyTorch's executor reads -log p_y from ``log_softmax`` (inf at a masked stand-in label):
    the focal slope's p log p was 0 * -inf = NaN, a NaN gradient row for an ignored row."""
    torch = pytest.importorskip("torch")
    x = torch.tensor([[-_INF, 1.0, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([-100, 2])
    opts = {"from_logits": True, "ignore_index": -100, "gamma": gamma}
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
