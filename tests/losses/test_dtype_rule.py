"""One dtype rule everywhere: class indices are integer, every other array is floating.

An integer or boolean array where a floating one is expected (one-hot
targets, binary targets, relevance grades, weights, distributions) is a
TypeError naming the argument, never a silent conversion; the suggested cast
gives the intended result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

P = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
LABELS = np.array([2, 0])
ONEHOT = np.eye(3, dtype=np.int64)[LABELS]
W = np.array([1, 2, 3])
BINARY_P = np.array([[0.2, 0.9], [0.6, 0.1]])
BINARY_T = np.array([[0, 1], [1, 0]])

# (id, argument named in the error, call taking (int_or_float_cast, conv))
CASES: list[tuple[str, str, Callable[[Callable[[np.ndarray], Any], Any], Any]]] = [
    (
        "categorical-target",
        "target",
        lambda c, v: ce.categorical_cross_entropy(v(P), c(ONEHOT)),
    ),
    (
        "categorical-weight",
        "weight",
        lambda c, v: ce.categorical_cross_entropy(v(P), v(ONEHOT * 1.0), weight=c(W)),
    ),
    (
        "sparse-weight",
        "weight",
        lambda c, v: ce.sparse_categorical_cross_entropy(v(P), v(LABELS), weight=c(W)),
    ),
    (
        "binary-target",
        "target",
        lambda c, v: ce.binary_cross_entropy(v(BINARY_P), c(BINARY_T)),
    ),
    (
        "binary-bool-target",
        "target",
        lambda c, v: ce.binary_cross_entropy(v(BINARY_P), c(BINARY_T.astype(bool))),
    ),
    (
        "binary-weight",
        "weight",
        lambda c, v: ce.binary_cross_entropy(v(BINARY_P), v(BINARY_T * 1.0), weight=c(W[:2])),
    ),
    (
        "binary-pos_weight",
        "pos_weight",
        lambda c, v: ce.binary_cross_entropy(v(BINARY_P), v(BINARY_T * 1.0), pos_weight=c(W[:2])),
    ),
    (
        "listnet-relevance",
        "relevance",
        lambda c, v: ce.listnet_loss(v(P), c(np.array([[0, 1, 2], [3, 0, 1]]))),
    ),
    ("info-cross_entropy-p", "p", lambda c, v: ce.info.cross_entropy(c(ONEHOT), v(P))),
    ("info-entropy-p", "p", lambda c, v: ce.info.entropy(c(ONEHOT))),
    ("info-kl-q", "q", lambda c, v: ce.info.kl_divergence(v(P), c(np.ones((2, 3), dtype=int)))),
    (
        "metrics-input",
        "input",
        lambda c, v: (
            ce.metrics.CrossEntropy(input_kind="probs").update(c(ONEHOT), v(LABELS)).compute()
        ),
    ),
    (
        # integer predictions (hard 0/1 decisions) were read as probabilities 0 and 1
        "metrics-binary-input",
        "input",
        lambda c, v: (
            ce.metrics.BinaryClassificationMetrics(input_kind="probs")
            .update(c(BINARY_T[:, 1]), v(BINARY_T[:, 1]))
            .compute()["log_loss_nats"]
        ),
    ),
    (
        "metrics-binary-bool-input",
        "input",
        lambda c, v: (
            ce.metrics.BinaryClassificationMetrics(input_kind="logits")
            .update(c(BINARY_T[:, 0].astype(bool)), v(BINARY_T[:, 1]))
            .compute()["log_loss_nats"]
        ),
    ),
]


@pytest.mark.parametrize(("case_id", "name", "call"), CASES, ids=[c[0] for c in CASES])
def test_integer_where_floating_is_expected_is_a_type_error(
    xp: Any, case_id: str, name: str, call: Any
) -> None:
    conv = to_xp(xp)
    as_is = conv
    with pytest.raises(TypeError, match=re.escape(f"`{name}` must have a floating dtype")) as info:
        call(as_is, conv)
    assert "astype(float)" in str(info.value)
    cast = call(lambda a: conv(np.asarray(a, dtype=np.float64)), conv)
    assert np.all(np.isfinite(to_numpy(cast)))


def test_categorical_integer_target_suggests_sparse() -> None:
    with pytest.raises(TypeError, match="use sparse_categorical_cross_entropy"):
        ce.categorical_cross_entropy(P, ONEHOT)


def test_cast_gives_the_float_result() -> None:
    """The suggested cast is the whole fix: same numbers as float input from the start."""
    want = -np.mean(np.log(P[np.arange(2), LABELS]) * W[LABELS]) * 2 / W[LABELS].sum()
    got = ce.sparse_categorical_cross_entropy(P, LABELS, weight=W.astype(float))
    np.testing.assert_allclose(float(got), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.bool_])
def test_class_indices_must_be_integer(dtype: Any) -> None:
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        ce.sparse_categorical_cross_entropy(P, LABELS.astype(dtype))


def test_nn_weight_must_be_floating() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="`weight` must have a floating dtype"):
        ce.nn.CrossEntropyLoss(weight=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="`pos_weight` must have a floating dtype"):
        ce.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1, 2]))
