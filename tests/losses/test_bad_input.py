"""A plain list, arrays of two libraries, a NumPy target for a torch module: a TypeError naming the argument."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import crossent as ce

torch = pytest.importorskip("torch")

P = [[0.2, 0.8], [0.6, 0.4]]
LABELS = [1, 0]

# (loss, its input, its target as NumPy arrays, argument names)
CALLS: list[tuple[Any, np.ndarray, np.ndarray, tuple[str, str]]] = [
    (ce.sparse_categorical_cross_entropy, np.array(P), np.array(LABELS), ("input", "target")),
    (ce.categorical_cross_entropy, np.array(P), np.eye(2)[LABELS], ("input", "target")),
    (ce.binary_cross_entropy, np.array(P), np.array(P), ("input", "target")),
    (ce.listnet_loss, np.array(P), np.array(P), ("scores", "relevance")),
    (ce.info.cross_entropy, np.array(P), np.array(P), ("p", "q")),
    (ce.info.kl_divergence, np.array(P), np.array(P), ("p", "q")),
]
IDS = ["sparse", "categorical", "binary", "listnet", "info.cross_entropy", "info.kl_divergence"]


@pytest.mark.parametrize(("fn", "x", "t", "names"), CALLS, ids=IDS)
@pytest.mark.parametrize("position", [0, 1])
def test_plain_list_names_the_argument(
    fn: Any, x: np.ndarray, t: np.ndarray, names: tuple[str, str], position: int
) -> None:
    args = [x, t]
    args[position] = args[position].tolist()
    name = names[position]
    want = f"`{name}` must be an array (NumPy, PyTorch, JAX, ...); got builtins.list"
    with pytest.raises(TypeError, match=re.escape(want)) as info:
        fn(*args)
    assert f"np.asarray({name})" in str(info.value)


@pytest.mark.parametrize(("fn", "x", "t", "names"), CALLS, ids=IDS)
def test_numpy_mixed_with_torch_names_both_and_the_conversion(
    fn: Any, x: np.ndarray, t: np.ndarray, names: tuple[str, str]
) -> None:
    first, second = names
    want = (
        f"`{first}` is a torch.Tensor but `{second}` is a numpy.ndarray. Convert it first, "
        f"e.g. `torch.as_tensor({second})`"
    )
    with pytest.raises(TypeError, match=re.escape(want)):
        fn(torch.as_tensor(x), t)


def test_list_weight_and_value_and_grad_name_the_argument() -> None:
    with pytest.raises(TypeError, match=re.escape("`weight` must be an array")):
        ce.sparse_categorical_cross_entropy(np.array(P), np.array(LABELS), weight=[1.0, 2.0])
    with pytest.raises(TypeError, match=re.escape("e.g. `torch.as_tensor(relevance)`")):
        ce.value_and_grad("listnet_loss", torch.tensor(P), P)


def test_only_python_scalars() -> None:
    with pytest.raises(
        TypeError, match=re.escape("`input`, `target`: expected at least one array")
    ):
        ce.binary_cross_entropy(0.5, 1.0)  # type: ignore[arg-type]


def test_nn_module_with_a_numpy_target_names_it() -> None:
    """Was an AttributeError ('numpy.ndarray' object has no attribute 'is_floating_point')."""
    with pytest.raises(TypeError, match=re.escape("e.g. `torch.as_tensor(target)`")):
        ce.nn.CrossEntropyLoss()(torch.tensor(P), np.array(LABELS))


def test_bce_loss_suggests_bce_with_logits_not_a_missing_argument() -> None:
    logits = torch.tensor([2.0, -1.0])
    target = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="use BCEWithLogitsLoss") as info:
        ce.nn.BCELoss()(logits, target)
    assert "from_logits" not in str(info.value)
    with pytest.raises(ValueError, match=re.escape("pass from_logits=True")):
        ce.binary_cross_entropy(logits, target)


def test_labels_of_shape_n_by_1_suggest_dropping_the_axis() -> None:
    with pytest.raises(ValueError, match=re.escape("got (2, 1). Drop its trailing axis")):
        ce.sparse_categorical_cross_entropy(np.array(P), np.array(LABELS)[:, None])
