"""Tensors on different devices: crossent's ValueError naming the argument on the other device
(PyTorch's "Tensor on device meta is not on the expected device cpu!" named none), for every
loss, module and executor; the ``meta`` device stands in for an accelerator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import crossent as ce

torch = pytest.importorskip("torch")

_X = torch.randn(4, 5, dtype=torch.float64)
_Y = torch.tensor([0, 1, 2, 3])
_W = torch.ones(5, dtype=torch.float64)
_T = torch.rand(4, 5, dtype=torch.float64)
_P = torch.softmax(_X, 1)
_EYE = torch.eye(5, dtype=torch.float64)


def _meta(x: Any) -> Any:
    return x.to("meta")


# name -> (call, the argument on the meta device)
CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "sparse weight": (
        lambda: ce.sparse_categorical_cross_entropy(_X, _Y, from_logits=True, weight=_meta(_W)),
        "weight",
    ),
    "sparse target": (
        lambda: ce.sparse_categorical_cross_entropy(_X, _meta(_Y), from_logits=True),
        "target",
    ),
    "sparse target, smoothing": (
        lambda: ce.sparse_categorical_cross_entropy(
            _X, _meta(_Y), from_logits=True, label_smoothing=0.1
        ),
        "target",
    ),
    "sparse weight, z-loss": (
        lambda: ce.sparse_categorical_cross_entropy(
            _X, _Y, from_logits=True, weight=_meta(_W), z_loss=0.1
        ),
        "weight",
    ),
    "sparse probabilities": (
        lambda: ce.sparse_categorical_cross_entropy(_P, _meta(_Y)),
        "target",
    ),
    "categorical target": (
        lambda: ce.categorical_cross_entropy(_X, _meta(_P), from_logits=True),
        "target",
    ),
    "categorical weight": (
        lambda: ce.categorical_cross_entropy(_X, _P, from_logits=True, weight=_meta(_W)),
        "weight",
    ),
    "binary target": (lambda: ce.binary_cross_entropy(_X, _meta(_T), from_logits=True), "target"),
    "binary pos_weight": (
        lambda: ce.binary_cross_entropy(_X, _T, from_logits=True, pos_weight=_meta(_W)),
        "pos_weight",
    ),
    "listnet": (lambda: ce.listnet_loss(_X, _meta(_T)), "relevance"),
    "distillation": (lambda: ce.distillation_loss(_X, _meta(_X)), "teacher_logits"),
    "value_and_grad": (
        lambda: ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, _X, _Y, from_logits=True, weight=_meta(_W)
        ),
        "weight",
    ),
    "nn.CrossEntropyLoss": (lambda: ce.nn.CrossEntropyLoss()(_X, _meta(_Y)), "target"),
    "nn.NLLLoss": (lambda: ce.nn.NLLLoss()(_X.log_softmax(1), _meta(_Y)), "target"),
    "info.cross_entropy": (lambda: ce.info.cross_entropy(_P, _meta(_P)), "q"),
    "fused teacher": (
        lambda: ce.fused.linear_distillation_loss(_X, _EYE, _meta(_X), _meta(_EYE)),
        "teacher_hidden",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_tensor_on_another_device_is_named(name: str) -> None:
    call, argument = CASES[name]
    with pytest.raises(ValueError, match=rf"`{argument}` is on meta but `\w+` is on cpu"):
        call()


@pytest.mark.parametrize(
    "options",
    [{"pos_weight": "s"}, {"weight": "s"}, {"weight": "s", "pos_weight": "s", "alpha": 0.3}],
    ids=["pos_weight", "weight", "both-alpha"],
)
def test_a_zero_d_cpu_weight_goes_with_any_device(options: dict[str, Any]) -> None:
    """PyTorch's operations take a 0-d CPU tensor beside tensors on any device
    (``F.binary_cross_entropy_with_logits(x_cuda, t_cuda, pos_weight=torch.tensor(2.0))``);
    the same-device check refused it ('`pos_weight` is on cpu but `input` is on meta')."""
    x, t, s = _meta(_X), _meta(_T), torch.tensor(2.0, dtype=torch.float64)
    kw = {k: (s if v == "s" else v) for k, v in options.items()}
    for call in (
        lambda: ce.binary_cross_entropy(x, t, from_logits=True, **kw),
        lambda: ce.binary_cross_entropy(torch.sigmoid(x), t, weight=s),
        lambda: ce.value_and_grad(ce.binary_cross_entropy, x, t, from_logits=True, **kw)[1],
    ):
        out = call()
        assert out.is_meta
    torch_out = torch.nn.functional.binary_cross_entropy_with_logits(x, t, pos_weight=s)
    assert ce.nn.BCEWithLogitsLoss(pos_weight=s)(x, t).shape == torch_out.shape
    with pytest.raises(ValueError, match=r"`pos_weight` is on cpu but `input` is on meta"):
        ce.binary_cross_entropy(x, t, from_logits=True, pos_weight=s[None])
