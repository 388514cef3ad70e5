"""Every torch entry point on ``meta`` tensors (no values: shape inference, ``FlopCounterMode``,
a model built on the ``meta`` device): the same result shape and dtype as on the CPU, and
gradients of the inputs' shapes and dtypes; value checks are skipped (there are no values).

Half precision used to fail with "unknown device type for autocast" (the autocast test named
the device), categorical losses with ".item() cannot be called on meta tensors" (a host read
of the targets' range), the fused functions with "unsupported scalarType" (``torch.autocast``
on ``meta``) and ``nonzero``'s missing meta kernel (the chunk plan reads which rows count).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import crossent as ce
from crossent import info

torch = pytest.importorskip("torch")

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(device: str, dtype: Any, *shape: int) -> Any:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device, dtype)


def _cases(device: str, dtype: Any) -> dict[str, tuple[Callable[..., Any], list[Any]]]:
    """Entry point -> (its loss of the differentiable inputs, those inputs)."""
    x = _logits(device, dtype, 6, 5)
    label = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    t = torch.softmax(_logits(device, torch.float32, 6, 5), -1).to(dtype)
    w = torch.rand(5, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    sparse = ce.sparse_categorical_cross_entropy
    calls: dict[str, tuple[Callable[..., Any], list[Any]]] = {
        "sparse": (lambda z: sparse(z, label, from_logits=True), [x]),
        "sparse none": (lambda z: sparse(z, label, from_logits=True, reduction="none"), [x]),
        "sparse weight": (lambda z: sparse(z, label, from_logits=True, weight=w), [x]),
        "sparse smoothing": (
            lambda z: sparse(z, label, from_logits=True, label_smoothing=0.1),
            [x],
        ),
        "sparse z-loss softcap": (
            lambda z: sparse(z, label, from_logits=True, z_loss=1e-4, softcap=30.0),
            [x],
        ),
        "sparse focal": (lambda z: sparse(z, label, from_logits=True, gamma=2.0), [x]),
        "sparse probs": (lambda z: sparse(torch.softmax(z, -1), label), [x]),
        "categorical": (lambda z: ce.categorical_cross_entropy(z, t, from_logits=True), [x]),
        "categorical none": (
            lambda z: ce.categorical_cross_entropy(z, t, from_logits=True, reduction="none"),
            [x],
        ),
        "categorical weight": (
            lambda z: ce.categorical_cross_entropy(z, t, from_logits=True, weight=w),
            [x],
        ),
        "categorical probs": (lambda z: ce.categorical_cross_entropy(torch.softmax(z, -1), t), [x]),
        "binary": (lambda z: ce.binary_cross_entropy(z, t, from_logits=True), [x]),
        "binary pos_weight": (
            lambda z: ce.binary_cross_entropy(z, t, from_logits=True, pos_weight=w),
            [x],
        ),
        "binary focal": (
            lambda z: ce.binary_cross_entropy(z, t, from_logits=True, gamma=2.0, alpha=0.25),
            [x],
        ),
        "binary probs": (lambda z: ce.binary_cross_entropy(torch.sigmoid(z), t), [x]),
        "distillation": (lambda z: ce.distillation_loss(z, x.detach() * 2), [x]),
        "listnet": (lambda z: ce.listnet_loss(z, t), [x]),
        "nn.CrossEntropyLoss": (lambda z: ce.nn.CrossEntropyLoss()(z.transpose(0, 0), label), [x]),
        "info.entropy": (lambda z: info.entropy(z, from_logits=True), [x]),
        "info.kl_divergence": (lambda z: info.kl_divergence(z, x.detach(), from_logits=True), [x]),
    }
    h = _logits(device, dtype, 8, 4)
    head = _logits(device, dtype, 7, 4)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100], device=device)
    fused = ce.fused
    calls |= {
        "fused linear_cross_entropy": (
            lambda a, b: fused.linear_cross_entropy(a, b, rows),
            [h, head],
        ),
        "fused linear_cross_entropy none": (
            lambda a, b: fused.linear_cross_entropy(a, b, rows, reduction="none"),
            [h, head],
        ),
        "fused linear_log_probs": (
            lambda a, b: fused.linear_log_probs(a, b, rows, return_entropy=True),
            [h, head],
        ),
        "fused linear_distillation_loss": (
            lambda a, b: fused.linear_distillation_loss(a, b, h.detach(), head.detach()),
            [h, head],
        ),
    }
    return calls


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_cases("cpu", torch.float32)))
def test_meta_result_and_gradients_match_cpu_shapes(name: str, dtype: Any) -> None:
    results = {}
    for device in ("cpu", "meta"):
        fn, inputs = _cases(device, dtype)[name]
        inputs = [i.requires_grad_() for i in inputs]
        out = fn(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        outs = [o for o in outs if o is not None]
        total = sum(o.float().sum() for o in outs)
        grads = torch.autograd.grad(total, inputs)
        results[device] = (
            [(o.shape, o.dtype) for o in outs],
            [(g.shape, g.dtype) for g in grads],
        )
        if device == "meta":
            assert all(o.is_meta for o in outs)
    assert results["meta"] == results["cpu"]


def test_accelerator_path_dispatches_torchs_operations_for_the_common_call() -> None:
    """The host-time proxy of a small CUDA loss (``benchmarks/bench_launches.py``): the common
    sparse call dispatches exactly PyTorch's operations; binary CE its own short formula
    (35 for a forward+backward, against 45 through the generic formula)."""
    from benchmarks.bench_launches import count
    from benchmarks.bench_sweep import torch_cases

    table = torch_cases(16, 7, torch.float32, device="meta")
    x, ours, ref = table["sparse"]
    for backward in (False, True):
        assert count(ours, x, backward=backward) == count(ref, x, backward=backward)
    assert count(table["binary"][1], x, backward=True) <= 35
    assert count(table["binary weight"][1], x, backward=True) <= 40
