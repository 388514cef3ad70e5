"""Per-sample gradients of the unfused losses under ``torch.compile(vmap(grad(loss)))``.

With ``fullgraph=True`` (no graph break) the compiled per-sample losses and gradients equal a
loop of eager autograd over the samples, for every option PyTorch users take per-sample
gradients with: class weight, ignore_index (a sample with every row ignored: a mean of 0 and
a zero gradient), label smoothing, z-loss, softcap, focal, probability inputs, categorical
and binary targets (pos_weight, smoothing, focal with alpha) and the ``crossent.nn`` modules.
A guard (these pass on the branch they were added to); the fused functions' counterpart is
``tests/fused/test_compiled_func.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
import crossent.nn as cnn  # noqa: E402

B, N, C = 3, 4, 5


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    labels = torch.randint(0, C, (B, N), generator=g)
    ignored = labels.clone()
    ignored[0, 1] = -100
    ignored[2] = -100  # a sample whose rows are all ignored
    return {
        "x": torch.randn(B, N, C, generator=g, dtype=f64),
        "labels": labels,
        "ignored": ignored,
        "probs": torch.softmax(torch.randn(B, N, C, generator=g, dtype=f64), -1),
        "binary": torch.rand(B, N, C, generator=g, dtype=f64),
        "w": torch.rand(C, generator=g, dtype=f64) + 0.5,
    }


def _cases() -> dict[str, tuple[Callable[[Any, Any], Any], str]]:
    """name -> (loss of one sample's (input, target), the target's name in :func:`_data`)."""
    w = _data()["w"]
    sparse, cat, binary = (
        ce.sparse_categorical_cross_entropy,
        ce.categorical_cross_entropy,
        ce.binary_cross_entropy,
    )
    return {
        "sparse": (lambda v, k: sparse(v, k, from_logits=True), "labels"),
        "sparse-weight-ignore": (
            lambda v, k: sparse(v, k, from_logits=True, weight=w, ignore_index=-100), "ignored"
        ),
        "sparse-smoothing": (
            lambda v, k: sparse(v, k, from_logits=True, label_smoothing=0.1, ignore_index=-100),
            "ignored",
        ),
        "sparse-z-loss": (lambda v, k: sparse(v, k, from_logits=True, z_loss=0.01), "labels"),
        "sparse-softcap": (lambda v, k: sparse(v, k, from_logits=True, softcap=2.0), "labels"),
        "sparse-focal-weight": (
            lambda v, k: sparse(v, k, from_logits=True, gamma=2.0, weight=w), "labels"
        ),
        "sparse-every-option-sum": (
            lambda v, k: sparse(
                v, k, from_logits=True, weight=w, ignore_index=-100, label_smoothing=0.1,
                z_loss=0.01, softcap=3.0, reduction="sum",
            ),
            "ignored",
        ),
        "sparse-probs": (lambda v, k: sparse(torch.softmax(v, -1), k), "labels"),
        "categorical": (lambda v, k: cat(v, k, from_logits=True), "probs"),
        "categorical-weight-smoothing-focal": (
            lambda v, k: cat(v, k, from_logits=True, weight=w, label_smoothing=0.1, gamma=1.5),
            "probs",
        ),
        "binary": (lambda v, k: binary(v, k, from_logits=True), "binary"),
        "binary-pos-weight-smoothing-focal": (
            lambda v, k: binary(
                v, k, from_logits=True, pos_weight=w, label_smoothing=0.1, gamma=2.0, alpha=0.25
            ),
            "binary",
        ),
        "nn-cross-entropy": (
            lambda v, k: cnn.CrossEntropyLoss(weight=w, ignore_index=-100, label_smoothing=0.1)(
                v, k
            ),
            "ignored",
        ),
        "nn-cross-entropy-z-loss-softcap": (
            lambda v, k: cnn.CrossEntropyLoss(z_loss=0.01, softcap=2.0)(v, k), "labels"
        ),
        "nn-focal": (lambda v, k: cnn.FocalLoss(gamma=2.0)(v, k), "labels"),
        "nn-bce-with-logits": (lambda v, k: cnn.BCEWithLogitsLoss(pos_weight=w)(v, k), "binary"),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_cases()))
def test_compiled_vmap_grad_equals_a_loop(name: str) -> None:
    loss, target = _cases()[name]
    d = _data()
    x, k = d["x"], d[target]
    compiled = torch.compile(
        torch.func.vmap(torch.func.grad_and_value(loss)), backend="aot_eager", fullgraph=True
    )
    grads, values = compiled(x, k)
    for i in range(B):
        xi = x[i].clone().requires_grad_()
        value = loss(xi, k[i])
        (grad,) = torch.autograd.grad(value, xi)
        torch.testing.assert_close(values[i], value.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads[i], grad, rtol=1e-12, atol=1e-14)
    if target == "ignored" and name != "sparse-every-option-sum":
        assert values[2] == 0
        assert not grads[2].any()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_vmap_grad_with_every_option_equals_a_loop() -> None:
    loss, target = _cases()["sparse-every-option-sum"]
    d = _data()
    x, k = d["x"], d[target]
    grads = torch.compile(torch.func.vmap(torch.func.grad(loss)), fullgraph=True)(x, k)
    for i in range(B):
        xi = x[i].clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(xi, k[i]), xi)
        torch.testing.assert_close(grads[i], grad, rtol=1e-12, atol=1e-14)
