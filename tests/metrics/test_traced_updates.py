"""Metric updates under ``torch.compile`` and ``torch.func`` transforms.

A metric's state is exact sums on the host, so an update reads its batch. Before:
``torch.compile`` traced the host copy into NumPy and a valid batch crashed ("RuntimeError
when making fake tensor call"); ``fullgraph=True`` gave dynamo's "Observed exception";
``vmap`` / ``grad`` "cannot read the values of a lazy array (a JAX tracer inside `jit`)".
No figure was ever computed from unchecked values (bad rows and labels raised the eager
``BadRowError`` under a default compile, an error elsewhere): the decision is to run the
update eagerly at a graph break under ``torch.compile`` (checked, the eager figures), and to
refuse it under ``torch.func`` transforms with a message that names the transform and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent.metrics as M  # noqa: E402

N, C = 6, 5


def _batch() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    return p, torch.randint(0, C, (N,), generator=g)


METRICS: dict[str, Callable[[], Any]] = {
    "cross-entropy": lambda: M.CrossEntropy(input_kind="probs"),
    "calibration": lambda: M.CalibrationError(input_kind="probs"),
    "summary": lambda: M.ClassificationMetrics(input_kind="probs"),
}


@pytest.mark.parametrize("name", list(METRICS))
def test_compiled_update_runs_eagerly_with_the_eager_figures(name: str) -> None:
    """A valid batch crashed the default compile; now the state equals the eager one."""
    p, y = _batch()
    eager, compiled_metric = METRICS[name](), METRICS[name]()
    eager.update(p, y)

    def step(a: Any, b: Any) -> Any:
        compiled_metric.update(a, b)
        return a.sum()

    torch._dynamo.reset()
    out = torch.compile(step, backend="aot_eager")(p, y)
    torch.testing.assert_close(out, p.sum())
    got, expected = compiled_metric.compute(), eager.compute()
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert repr(got[key]) == repr(expected[key]), key
    else:
        assert got == expected


def test_compiled_update_still_checks_the_batch() -> None:
    p, y = _batch()
    p[2] *= 0.5
    metric = M.CrossEntropy(input_kind="probs")

    def step(a: Any, b: Any) -> Any:
        metric.update(a, b)
        return a.sum()

    torch._dynamo.reset()
    with pytest.raises(M.BadRowError, match="`input` row 2 is not a distribution"):
        torch.compile(step, backend="aot_eager")(p, y)


def test_fullgraph_update_names_the_fix() -> None:
    """``fullgraph=True`` cannot hold a host update: dynamo's error carries crossent's reason
    (before: "Observed exception" with no word about metrics)."""
    p, y = _batch()
    metric = M.BinaryClassificationMetrics(input_kind="probs")

    def step(a: Any, b: Any) -> Any:
        metric.update(a, b)
        return a.sum()

    torch._dynamo.reset()
    with pytest.raises(Exception, match="compile without fullgraph=True") as info:
        torch.compile(step, backend="aot_eager", fullgraph=True)(p[:, 0], (y > 2).double())
    assert "crossent.metrics adds a batch's values to exact sums on the host" in str(info.value)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_update_under_a_transform_names_it(transform: str) -> None:
    """Before: "cannot read the values of a lazy array (a JAX tracer inside `jit`)"."""
    p, y = _batch()
    metric = M.CrossEntropy(input_kind="probs")

    def step(a: Any, b: Any) -> Any:
        metric.update(a[None] if transform == "vmap" else a, b[None] if transform == "vmap" else b)
        return a.sum()

    fn = torch.func.vmap(step) if transform == "vmap" else torch.func.grad(step)
    with pytest.raises(TypeError, match=rf"cannot update under torch\.func\.{transform}: "):
        fn(p, y)
    assert metric.num_classes is None  # nothing was added


EVERY_METRIC: dict[str, Callable[[], Any]] = {
    "cross-entropy": lambda: M.CrossEntropy(input_kind="probs", base=2),
    "perplexity": lambda: M.Perplexity(input_kind="probs"),
    "bits-per-token": lambda: M.BitsPerToken(input_kind="probs"),
    "accuracy": lambda: M.Accuracy(input_kind="probs"),
    "brier": lambda: M.BrierScore(input_kind="probs"),
    "calibration": lambda: M.CalibrationError(input_kind="probs"),
    "per-class": lambda: M.PerClassCrossEntropy(input_kind="probs"),
    "summary": lambda: M.ClassificationMetrics(input_kind="probs"),
    "binary": lambda: M.BinaryClassificationMetrics(input_kind="probs"),
}


def _updated(name: str) -> Any:
    p, y = _batch()
    metric = EVERY_METRIC[name]()
    if name == "binary":
        return metric.update(p[:, 0], (y > 2).long())
    return metric.update(p, y)


def _same(got: Any, expected: Any) -> None:
    """Equal figures, bit for bit (``repr`` of floats and of NumPy arrays, NaN included)."""
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert repr(got[key]) == repr(expected[key]), key
    else:
        assert repr(got) == repr(expected)


@pytest.mark.parametrize("name", list(EVERY_METRIC))
def test_compiled_compute_runs_eagerly_with_the_eager_figures(name: str) -> None:
    """``compute()`` inside a compiled function: dynamo traced its host arithmetic ("RuntimeError
    when making fake tensor call" for a valid state; the accuracy's ratio only by luck, at a
    backend failure); now it runs eagerly at a graph break, as ``update`` does."""
    metric = _updated(name)
    expected = metric.compute()

    def step(x: Any) -> Any:
        return x * 2, metric.compute()

    torch._dynamo.reset()
    x = torch.arange(3.0)
    out, got = torch.compile(step, backend="aot_eager")(x)
    torch.testing.assert_close(out, x * 2)
    _same(got, expected)


def test_compiled_update_then_compute_equals_eager() -> None:
    """One compiled step that updates and computes: the eager figures, batch after batch."""
    p, y = _batch()
    eager, traced = (
        M.ClassificationMetrics(input_kind="probs"),
        M.ClassificationMetrics(input_kind="probs"),
    )

    def step(a: Any, b: Any) -> Any:
        traced.update(a, b)
        return traced.compute()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for lo, hi in ((0, 4), (4, 6)):
        _same(compiled(p[lo:hi], y[lo:hi]), eager.update(p[lo:hi], y[lo:hi]).compute())


@pytest.mark.parametrize("name", ["cross-entropy", "per-class", "binary"])
def test_fullgraph_compute_names_the_fix(name: str) -> None:
    """``fullgraph=True``: dynamo's error carries crossent's reason (before: "Data-dependent
    branching" or a fake-tensor error, with no word about metrics)."""
    metric = _updated(name)

    def step(x: Any) -> Any:
        return x * 2, metric.compute()

    torch._dynamo.reset()
    with pytest.raises(Exception, match="compile without fullgraph=True") as info:
        torch.compile(step, backend="aot_eager", fullgraph=True)(torch.arange(3.0))
    assert "crossent.metrics computes its figures from exact sums on the host" in str(info.value)
