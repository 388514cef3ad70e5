"""Value checks of ``torch.func`` transforms traced by ``torch.compile``: crossent's message.

``torch.compile(vmap(loss))``, ``torch.compile(vmap(grad(loss)))``, a ``vmap`` inside a
compiled function and ``torch.compile(grad(loss))`` traced no value check: the device-side
assertion (``torch._assert_async``) has no batching rule, so the checks were left out under
every transform. A negative weight, targets or probabilities outside [0, 1] and probability
rows that do not sum to 1 gave a silently computed loss or per-sample gradient; a label
outside [0, C) PyTorch's ``index 5 is out of bounds for dimension 2 with size 5`` (the native
sparse paths, ``CrossEntropyLoss``, ``NLLLoss``). The assertion is now an op with a ``vmap``
rule (``crossent::assert_true``): the compiled message, a ``RuntimeError`` when the program
runs, and valid inputs give the eager values and gradients with no graph break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
import crossent.nn as cnn  # noqa: E402

N, C = 6, 5
BAD_ROW = 2

Loss = Callable[[Any, Any], Any]

LABEL = r"`target` has labels outside \[0, C\)"
WEIGHT = r"`weight` must be non-negative"
TARGET = r"`target` must lie in \[0, 1\]"
RANGE = r"`input` has values outside \[0, 1\]"
ROWS = r"`input` holds probabilities whose rows must sum to 1"
INFO = r"`p` must hold probabilities in \[0, 1\]"


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    p = torch.softmax(x, 1)
    return {
        "x": x,
        "y": torch.randint(0, C, (N,), generator=g),
        "p": p,
        "t": torch.rand(N, C, generator=g, dtype=torch.float64),
        "w": torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
    }


Case = tuple[Loss, str, str, str, str]


def _cases() -> dict[str, Case]:
    """name -> (loss of a batch, its input's and target's names in :func:`_data`, the
    compiled message, what is bad: "label" (row BAD_ROW's label is C), "above" (a value 1.5
    in row BAD_ROW of the input or target, whichever the message names), "half-row" (the
    input's row BAD_ROW halved) or "weight" (a negative weight, in the loss))."""
    w = _data()["w"]
    neg_w = w.clone()
    neg_w[0] = -1.0
    sparse = ce.sparse_categorical_cross_entropy
    categorical, binary = ce.categorical_cross_entropy, ce.binary_cross_entropy
    return {
        "sparse-label": (lambda v, k: sparse(v, k, from_logits=True), "x", "y", LABEL, "label"),
        "sparse-weight-smoothing-label": (
            lambda v, k: sparse(v, k, from_logits=True, weight=w, label_smoothing=0.1),
            "x", "y", LABEL, "label",
        ),
        "sparse-zloss-label": (
            lambda v, k: sparse(v, k, from_logits=True, z_loss=0.01), "x", "y", LABEL, "label"
        ),
        "sparse-probs-label": (lambda v, k: sparse(v, k), "p", "y", LABEL, "label"),
        "sparse-weight": (
            lambda v, k: sparse(v, k, from_logits=True, weight=neg_w), "x", "y", WEIGHT, "weight"
        ),
        "sparse-focal-weight": (
            lambda v, k: sparse(v, k, from_logits=True, weight=neg_w, gamma=2.0),
            "x", "y", WEIGHT, "weight",
        ),
        "sparse-probs-range": (lambda v, k: sparse(v, k), "p", "y", RANGE, "above"),
        "sparse-probs-rows": (lambda v, k: sparse(v, k), "p", "y", ROWS, "half-row"),
        "categorical-target": (
            lambda v, k: categorical(v, k, from_logits=True), "x", "t", TARGET, "above"
        ),
        "categorical-rows": (lambda v, k: categorical(v, k), "p", "p", ROWS, "half-row"),
        "binary-target": (lambda v, k: binary(v, k, from_logits=True), "x", "t", TARGET, "above"),
        "binary-probs": (lambda v, k: binary(v, k), "p", "t", RANGE, "above"),
        "binary-pos-weight": (
            lambda v, k: binary(v, k, from_logits=True, pos_weight=neg_w),
            "x", "t", r"`pos_weight` must be non-negative", "weight",
        ),
        "nn-cross-entropy-label": (
            lambda v, k: cnn.CrossEntropyLoss(weight=w)(v, k), "x", "y", LABEL, "label"
        ),
        "nn-cross-entropy-weight": (
            lambda v, k: cnn.CrossEntropyLoss(weight=neg_w)(v, k), "x", "y", WEIGHT, "weight"
        ),
        "nn-cross-entropy-target": (
            lambda v, k: cnn.CrossEntropyLoss()(v, k), "x", "t", TARGET, "above"
        ),
        "nn-nll-label": (
            lambda v, k: cnn.NLLLoss()(torch.log_softmax(v, 1), k), "x", "y", LABEL, "label"
        ),
        "nn-focal-label": (
            lambda v, k: cnn.FocalLoss(gamma=2.0)(v, k), "x", "y", LABEL, "label"
        ),
        "nn-bce": (lambda v, k: cnn.BCELoss()(v, k), "p", "t", RANGE, "above"),
        "info-entropy": (lambda v, k: ce.info.entropy(v).sum(), "p", "t", INFO, "above"),
    }  # fmt: skip


def _one(loss: Loss) -> Loss:
    """The loss of one row (a batch of one), for ``vmap``."""
    return lambda v, k: loss(v[None], k[None])


def _transformed(mode: str, loss: Loss) -> Callable[..., Any]:
    func = torch.func
    return {
        "vmap": lambda: func.vmap(_one(loss)),
        "vmap-grad": lambda: func.vmap(func.grad(_one(loss))),
        "vmap-inside": lambda: lambda v, k: func.vmap(_one(loss))(v, k).sum(),
        "grad": lambda: func.grad(loss),
    }[mode]()


def _compiled(mode: str, loss: Loss) -> Callable[..., Any]:
    return torch.compile(_transformed(mode, loss), fullgraph=True, backend="aot_eager")


def _inputs(name: str, *, bad: bool) -> tuple[Loss, Any, Any, str]:
    """(loss, input, target, compiled message), with the case's bad value if `bad`."""
    loss, v_name, k_name, message, what = _cases()[name]
    d = _data()
    v, k = d[v_name].clone(), d[k_name].clone()
    if bad and what == "label":
        k[BAD_ROW] = C
    elif bad and what == "above":
        (v if message in (RANGE, INFO) else k)[BAD_ROW, 1] = 1.5
    elif bad and what == "half-row":
        v[BAD_ROW] *= 0.5
    return loss, v, k, message


MODES = ["vmap", "vmap-grad", "vmap-inside", "grad"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(_cases()))
def test_bad_values_fail_with_crossents_message(name: str, mode: str) -> None:
    """The eager call raises; the compiled transform gives crossent's compiled message (before:
    a loss or gradient, or PyTorch's index error for the labels)."""
    loss, v, k, message = _inputs(name, bad=True)
    with pytest.raises(ValueError):  # noqa: PT011 - the eager error is the reference
        loss(v, k)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=message):
        _compiled(mode, loss)(v, k)


VALID = [
    "sparse-weight-smoothing-label",
    "sparse-probs-rows",
    "categorical-target",
    "binary-probs",
    "nn-focal-label",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", VALID)
def test_valid_values_equal_eager_without_graph_breaks(name: str, mode: str) -> None:
    """Valid inputs, the checks traced: the eager transform's values, no graph break."""
    loss, v, k, _ = _inputs(name, bad=False)
    eager = _transformed(mode, loss)(v, k)
    torch._dynamo.reset()
    torch.testing.assert_close(_compiled(mode, loss)(v, k), eager, rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_transformed(mode, loss))(v, k)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_the_assertion_is_traced_once_per_check_under_vmap() -> None:
    """The op is in the ATen graph of a compiled ``vmap(grad)`` (not removed for having no
    output), once per check: the label check of a focal loss with a class weight, and the
    weight's."""
    from torch._dynamo.backends.common import aot_autograd

    d = _data()
    v, k, w = d["x"], d["y"], d["w"]
    graphs: list[Any] = []

    def keep(gm: Any, _: Any) -> Any:
        graphs.append(gm)
        return gm

    def focal(a: Any, b: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(a, b, from_logits=True, weight=w, gamma=2.0)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep)
    torch.compile(torch.func.vmap(torch.func.grad(_one(focal))), fullgraph=True, backend=backend)(
        v, k
    )
    messages = [
        str(node.args[1])
        for gm in graphs
        for node in gm.graph.nodes
        if node.target is torch.ops.crossent.assert_true.default
    ]
    assert len(messages) == 2, messages
    assert any("`weight`" in m for m in messages)
    assert any("`target` has labels" in m for m in messages)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_keeps_the_assertion_under_vmap_grad() -> None:
    """The op has no output: Inductor would drop it but for its side-effect mark. A negative
    weight under the default backend raises crossent's message; a valid one gives eager's
    per-sample gradients."""
    loss, v, k, message = _inputs("sparse-weight", bad=True)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=message):
        torch.compile(_transformed("vmap-grad", loss), fullgraph=True)(v, k)
    loss, v, k, _ = _inputs("sparse-weight-smoothing-label", bad=False)
    torch._dynamo.reset()
    got = torch.compile(_transformed("vmap-grad", loss), fullgraph=True)(v, k)
    torch.testing.assert_close(got, _transformed("vmap-grad", loss)(v, k), rtol=1e-12, atol=1e-14)
