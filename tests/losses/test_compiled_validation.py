"""Value checks under torch.compile and torch.export: device-side assertions, the switch honoured.

Eagerly a bad value raises crossent's ValueError. Compiled or exported, the values do not
exist at trace time; with validation on the checks become ``torch._assert_async`` with
crossent's message (a RuntimeError when the program runs; no graph break, no host
synchronisation), and ``crossent.validation(False)`` / ``set_validation(False)`` recompile
without them. Before, every value check was skipped under compile: a compiled loss returned
a number for inputs that raise eagerly.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch._dynamo.backends.common import aot_autograd  # noqa: E402

import crossent as ce  # noqa: E402
import crossent.nn as cnn  # noqa: E402

N, C = 6, 5


def _bad_cases() -> dict[str, tuple[Callable[[], Any], str]]:
    """name -> (a loss of one bad argument, the message compiled calls give)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    p = torch.softmax(x, 1)
    t = torch.rand(N, C, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    above = p.clone()
    above[1, 1] = 1.5
    half_row = p.clone()
    half_row[2] *= 0.5
    bad_t = t.clone()
    bad_t[0, 0] = 1.5
    neg_w = w.clone()
    neg_w[0] = -1.0
    range_ = r"`input` has values outside \[0, 1\]"
    rows = r"`input` holds probabilities whose rows must sum to 1"
    target = r"`target` must lie in \[0, 1\]"
    weight = r"`weight` must be non-negative"
    sparse = ce.sparse_categorical_cross_entropy
    return {
        "sparse-probs-range": (lambda: sparse(above, y), range_),
        "sparse-probs-rows": (lambda: sparse(half_row, y), rows),
        "sparse-weight": (lambda: sparse(x, y, from_logits=True, weight=neg_w), weight),
        "sparse-focal-weight": (
            lambda: sparse(x, y, from_logits=True, weight=neg_w, gamma=2.0),
            weight,
        ),
        "categorical-target": (
            lambda: ce.categorical_cross_entropy(x, bad_t, from_logits=True),
            target,
        ),
        "categorical-rows": (lambda: ce.categorical_cross_entropy(half_row, p), rows),
        "binary-target": (lambda: ce.binary_cross_entropy(x, bad_t, from_logits=True), target),
        "binary-probs": (lambda: ce.binary_cross_entropy(above, t), range_),
        "binary-weight": (
            lambda: ce.binary_cross_entropy(x, t, from_logits=True, weight=neg_w),
            weight,
        ),
        "nn-bce": (lambda: cnn.BCELoss()(above, t), range_),
        "nn-ce-probs-target": (lambda: cnn.CrossEntropyLoss()(x, bad_t), target),
        "info-entropy": (lambda: ce.info.entropy(above), r"`p` must hold probabilities"),
    }


CASES = list(_bad_cases())


@pytest.mark.parametrize("name", CASES)
def test_compiled_bad_values_fail_on_the_device(name: str) -> None:
    loss, message = _bad_cases()[name]
    with pytest.raises(ValueError, match=message.split("`")[1]):  # eagerly: with the values
        loss()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=message):
        torch.compile(loss, fullgraph=True, backend="aot_eager")()


@pytest.mark.parametrize("name", ["sparse-probs-rows", "binary-target", "sparse-weight"])
def test_compiled_checks_follow_the_switch(name: str) -> None:
    """One compiled function: the switch is guarded, so turning validation off (for the
    block, or process-wide) and on again recompiles with and without the assertion."""
    loss, message = _bad_cases()[name]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=message):
        compiled()
    with ce.validation(False):
        expected = loss()
        torch.testing.assert_close(compiled(), expected)
        with ce.validation(True), pytest.raises(RuntimeError, match=message):
            compiled()
    ce.set_validation(False)
    try:
        torch.testing.assert_close(compiled(), expected)
    finally:
        ce.set_validation(True)
    with pytest.raises(RuntimeError, match=message):
        compiled()


def test_compiled_checks_follow_each_thread_and_task() -> None:
    """The switch is a context variable: another thread or asyncio task with validation off
    runs the same compiled function without the check, this one with it."""
    loss, message = _bad_cases()["binary-target"]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with ce.validation(False):
        expected = loss()
    results: list[Any] = []

    def unchecked() -> None:
        with ce.validation(False):
            results.append(compiled())

    thread = threading.Thread(target=unchecked)
    thread.start()
    thread.join()
    torch.testing.assert_close(results[0], expected)

    async def task(flag: bool) -> Any:
        with ce.validation(flag):
            await asyncio.sleep(0)
            try:
                return compiled()
            except RuntimeError as exc:
                return exc

    async def both() -> list[Any]:
        return await asyncio.gather(task(False), task(True), task(False))

    off, on, off_again = asyncio.run(both())
    torch.testing.assert_close(off, expected)
    torch.testing.assert_close(off_again, expected)
    assert isinstance(on, RuntimeError)
    assert re.search(message, str(on))
    assert ce.get_validation()


@pytest.mark.parametrize(
    "name", ["sparse-probs-rows", "categorical-target", "binary-probs", "nn-ce-probs-target"]
)
def test_no_graph_break_and_eager_values_for_valid_inputs(name: str) -> None:
    """Valid inputs: the checks are in the one graph and the values equal eager.

    ``nn.CrossEntropyLoss`` with probability targets failed to trace at all
    (InternalTorchDynamoError: NotImplementedError): its options come from a trace-time
    constant, and ``type(option) is float`` asked dynamo for a guard on a constant's type."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    p, t = torch.softmax(x, 1), torch.rand(N, C, generator=g, dtype=torch.float64)
    loss = {
        "sparse-probs-rows": lambda: ce.sparse_categorical_cross_entropy(p, y),
        "categorical-target": lambda: ce.categorical_cross_entropy(x, t, from_logits=True),
        "binary-probs": lambda: ce.binary_cross_entropy(torch.sigmoid(x), t),
        "nn-ce-probs-target": lambda: cnn.CrossEntropyLoss(label_smoothing=0.1)(x, t),
    }[name]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    graphs: list[Any] = []  # the ATen graph AOTAutograd traces (dynamo's holds the loss's node)

    def keep(gm: Any, _: Any) -> Any:
        graphs.append(gm)
        return gm

    torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=keep))()
    assert any("_assert_async" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(got, loss(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("validate", [True, False])
def test_exported_module_checks_values_as_exported(validate: bool) -> None:
    """torch.export keeps the assertion when exported with validation on, and leaves it out
    when exported with validation off (the program is what was traced)."""
    module = cnn.BCELoss()
    g = torch.Generator().manual_seed(2)
    p = torch.rand(N, C, generator=g, dtype=torch.float64)
    t = torch.rand(N, C, generator=g, dtype=torch.float64)
    with ce.validation(validate):
        program = torch.export.export(module, (p, t))
    torch.testing.assert_close(program.module()(p, t), module(p, t))
    above = p.clone()
    above[0, 0] = 2.0
    if validate:
        with pytest.raises(RuntimeError, match=r"`input` has values outside \[0, 1\]"):
            program.module()(above, t)
    else:  # what the eager loss gives with validation off (undefined: NaN here)
        with ce.validation(False):
            expected = module(above, t)
        torch.testing.assert_close(program.module()(above, t), expected, equal_nan=True)


def test_row_sum_check_with_dynamic_shapes() -> None:
    """``dynamic=True``: the class count, so the row-sum tolerance, is symbolic; before, the
    check's message formatted it ('Unknown format code 'g' for object of type 'str'')."""
    g = torch.Generator().manual_seed(4)

    def loss(p: Any, y: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(p, y)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=True)
    for n, c in [(6, 5), (4, 7)]:
        p = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1)
        y = torch.randint(0, c, (n,), generator=g)
        torch.testing.assert_close(compiled(p, y), loss(p, y), rtol=1e-12, atol=0)
        p[0] *= 0.9
        with pytest.raises(RuntimeError, match=r"rows must sum to 1 along axis 1"):
            compiled(p, y)


def test_validation_block_inside_a_compiled_function() -> None:
    """``with crossent.validation(flag):`` written inside the compiled function: one graph
    (fullgraph, 0 breaks), the losses inside the block traced with or without their checks,
    those after it with the caller's setting. Before, dynamo stopped at ``ContextVar.set``
    ('Dynamo does not know how to trace method `set` of class `ContextVar`')."""
    from crossent._lib import _config

    _, message = _bad_cases()["binary-target"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    bad = torch.full((N, C), 1.5, dtype=torch.float64)

    def off(v: Any) -> Any:
        with ce.validation(False):
            return ce.binary_cross_entropy(v, bad, from_logits=True)

    def off_then_on(v: Any) -> Any:
        with ce.validation(False):
            inner = ce.binary_cross_entropy(v, bad, from_logits=True)
        return inner + ce.binary_cross_entropy(v, bad, from_logits=True)

    def nested_on(v: Any) -> Any:
        with ce.validation(False), ce.validation(True):
            return ce.binary_cross_entropy(v, bad, from_logits=True)

    expected = off(x)  # eagerly: the context variable
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(off)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    got = torch.compile(off, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for checked in (off_then_on, nested_on):
        with pytest.raises(RuntimeError, match=message):
            torch.compile(checked, fullgraph=True, backend="aot_eager")(x)
    assert type(_config._SWITCH) is _config._Switch  # the module's switch is back
    assert ce.get_validation()
    with ce.validation(False):  # the caller's setting still reaches the code after a block
        torch._dynamo.reset()
        got = torch.compile(off_then_on, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, 2 * expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "options", [{"z_loss": 0.1}, {"gamma": 2.0}, {"softcap": 5.0}, {}], ids=str
)
def test_label_check_does_not_specialise_the_class_count(options: dict[str, Any]) -> None:
    """The device-side label check's message wrote the class count in: traced with dynamic
    shapes that specialised the graph to it, so sparse CE with z-loss, focal, softcap or
    probability inputs recompiled for every class count and ``fullgraph=True`` failed at the
    recompile limit (8) where the plain loss compiles twice. Traced, the message names C."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def loss(x: Any, y: Any) -> Any:
        if not options:  # probabilities: the same label check
            return ce.sparse_categorical_cross_entropy(torch.softmax(x, -1), y)
        return ce.sparse_categorical_cross_entropy(x, y, from_logits=True, **options)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(6)
    for c in range(5, 15):
        x = torch.randn(N, c, generator=g, dtype=torch.float64)
        y = torch.randint(0, c, (N,), generator=g)
        torch.testing.assert_close(compiled(x, y), loss(x, y), rtol=1e-12, atol=1e-14)
    assert counter.frame_count <= 2
    y[0] = c
    with pytest.raises(RuntimeError, match=r"`target` has labels outside \[0, C\), C the size"):
        compiled(x, y)


def _label_losses() -> dict[str, Callable[[Any, Any], Any]]:
    """Sparse losses on every path a label takes: PyTorch's kernel (plain, ``ignore_index``
    with a weight, smoothing), crossent's rows (z-loss, focal), probabilities, the modules."""
    sparse = ce.sparse_categorical_cross_entropy
    w = torch.rand(C, dtype=torch.float64) + 0.5
    return {
        "plain": lambda x, y: sparse(x, y, from_logits=True),
        "weight-ignore-none": lambda x, y: sparse(
            x, y, from_logits=True, weight=w, ignore_index=-100, reduction="none"
        ),
        "smoothing": lambda x, y: sparse(x, y, from_logits=True, label_smoothing=0.1),
        "z-loss": lambda x, y: sparse(x, y, from_logits=True, z_loss=0.1),
        "focal": lambda x, y: sparse(x, y, from_logits=True, gamma=2.0),
        "probs": lambda x, y: sparse(torch.softmax(x, -1), y),
        "nn-ce": lambda x, y: cnn.CrossEntropyLoss()(x, y),
        "nn-nll": lambda x, y: cnn.NLLLoss()(torch.log_softmax(x, -1), y),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(_label_losses()))
def test_compiled_bad_label_raises_crossents_message_with_inductor(name: str) -> None:
    """A label outside [0, C) under the default backend gave inductor's own bound check,
    ``RuntimeError: kernel, /tmp/torchinductor_root/.../c....main.cpp:69, index out of
    bounds: 0 <= tmp21 < 5L``, on every path (with ``aot_eager``: ``nll_loss``'s ``IndexError:
    Target 7 is out of bounds`` for PyTorch's kernel, ``NLLLoss`` not a graph node): the
    assertion ran after the kernels that index. The refused labels are now replaced by 0
    before any kernel reads them, so crossent's assertion is what fails. Valid labels: the
    eager values (the replacement changes nothing)."""
    loss = _label_losses()[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    y[0] = -100 if name in {"weight-ignore-none", "nn-ce", "nn-nll"} else y[0]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(x, y), loss(x, y), rtol=1e-12, atol=1e-15)
    for bad in (C, -3):
        y_bad = y.clone()
        y_bad[2] = bad
        with pytest.raises(RuntimeError, match=r"`target` has labels outside \[0, C\)"):
            compiled(x, y_bad)


def _every_label_path() -> dict[str, Callable[[Any, Any], Any]]:
    """:func:`_label_losses` and the other paths a compiled label takes: softcap, focal with
    smoothing (the generic formula), a class weight that requires grad (the generic formula:
    PyTorch's kernel gives it no gradient), ``FocalLoss``."""
    sparse = ce.sparse_categorical_cross_entropy
    w_grad = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    return {
        **_label_losses(),
        "softcap-ignore": lambda x, y: sparse(
            x, y, from_logits=True, softcap=3.0, ignore_index=-100
        ),
        "focal-smoothing": lambda x, y: sparse(
            x, y, from_logits=True, gamma=2.0, label_smoothing=0.1
        ),
        "weight-with-grad": lambda x, y: sparse(x, y, from_logits=True, weight=w_grad),
        "nn-focal": lambda x, y: cnn.FocalLoss(gamma=2.0)(x, y),
    }


@pytest.mark.parametrize("name", list(_every_label_path()))
def test_one_label_check_per_compiled_call(name: str) -> None:
    """One device-side label check in the traced graph, whichever path the labels take.

    The executor's check (``traced_labels``) ran before it chose a path, and the paths it then
    took checked again: z-loss, focal, softcap, focal with smoothing, probabilities, a weight
    with a gradient and ``FocalLoss`` traced two ``_assert_async`` of the label message per
    call. Each path now checks once; a bad label still fails with crossent's message."""
    from functorch.compile import make_boxed_func

    loss = _every_label_path()[name]
    graphs: list[Any] = []

    def keep(gm: Any, _: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    compiled(x, y).sum().backward()
    checks = [
        node
        for gm in graphs
        for node in gm.graph.nodes
        if "_assert" in str(node.target) and "`target` has labels" in str(node.args)
    ]
    assert len(checks) == 1, [str(node.args) for node in checks]
    y[2] = C
    with pytest.raises(RuntimeError, match=r"`target` has labels outside \[0, C\)"):
        compiled(x, y)
