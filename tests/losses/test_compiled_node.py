"""Adversarial checks of the losses as one graph node under torch.compile (crossent._backends._node):
the shapes, options and transforms where the node (or the traced code inside it) differed from
eager crossent."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402

C = 3


def test_unbatched_focal_weighted_sparse_compiles_and_vmaps() -> None:
    """One example of shape (C,) with a 0-d label, class weights and focal gamma: ``w[label]``
    with a 0-d label tensor reads the label on the host (``.item()``), which dynamo's AOT trace
    refused ('data-dependent expression', even without fullgraph: inside the node) and
    ``vmap(grad)`` of per-example losses refused too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 2])
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5

    def loss(v: Any, t: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v, t, from_logits=True, gamma=2.0, weight=w)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = []
    for i in range(2):
        v = x[i].clone().requires_grad_(True)
        want = loss(v, y[i])
        (want_grad,) = torch.autograd.grad(want, v)
        eager_grads.append(want_grad)
        v = x[i].clone().requires_grad_(True)
        got = compiled(v, y[i])
        (got_grad,) = torch.autograd.grad(got, v)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    per_example = torch.func.vmap(torch.func.grad(loss))(x, y)
    torch.testing.assert_close(per_example, torch.stack(eager_grads), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_compiled_mean_over_ignored_rows_keeps_float32_under_a_float64_default(
    label_smoothing: float,
) -> None:
    """The traced mean with `ignore_index` divides by the count of counted rows: an int64 count
    made +inf-safe by ``torch.where(count == 0, inf, count)`` became a tensor of the *default*
    dtype, so with ``torch.set_default_dtype(torch.float64)`` float32 logits gave a float64
    loss compiled (float32 eagerly), and bfloat16 logits under autocast a float64 one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, C, generator=g)
    y = torch.tensor([0, 2, -100, 1])

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            v, y, from_logits=True, ignore_index=-100, label_smoothing=label_smoothing
        )

    def autocast_loss(v: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss(v.bfloat16())

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for fn in (loss, autocast_loss):
            torch._dynamo.reset()
            want = fn(x)
            got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
            assert want.dtype == torch.float32
            assert got.dtype == torch.float32, got.dtype
            torch.testing.assert_close(got, want)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("options", [{}, {"z_loss": 0.1}], ids=["plain", "z-loss"])
def test_inference_mode_inside_compiled_loss_with_ignore_index(options: dict[str, Any]) -> None:
    """``with torch.inference_mode():`` inside the compiled function, `ignore_index` set: the
    traced mask of ignored rows of -inf detached the logits, and AOTAutograd's trace of the
    node failed ('Cannot set version_counter for inference tensor'; F.cross_entropy compiles).
    Without grad mode the mask reads the logits without a detach; with it, an ignored row of
    -inf still has a zero gradient compiled."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, C, generator=g, dtype=torch.float64)
    x[0] = -torch.inf
    y = torch.tensor([-100, 2, 1, 0])

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            v, y, from_logits=True, ignore_index=-100, **options
        )

    def inference(v: Any) -> Any:
        with torch.inference_mode():
            return loss(v)

    torch._dynamo.reset()
    with torch.no_grad():
        want = loss(x)
    torch.testing.assert_close(
        torch.compile(inference, backend="aot_eager", fullgraph=True)(x), want
    )
    v = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(v), v)
    assert grad[0].eq(0).all(), grad
    assert grad.isfinite().all(), grad


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "z-loss + softcap", "FocalLoss"])
def test_nn_class_index_losses_are_one_graph_node(name: str) -> None:
    """crossent.nn's cross-entropy modules with class-index targets called the PyTorch executor
    directly, so dynamo traced crossent's dispatch and formula: 99 guards for
    ``CrossEntropyLoss()``, 240 with z-loss and softcap, 235 for ``FocalLoss()`` (the
    functional loss: about 55), each checked before every compiled call. Traced, they hand
    the call to the functional loss and its graph node; values and gradients as eagerly."""
    import crossent.nn as cnn

    module = {
        "CrossEntropyLoss": lambda: cnn.CrossEntropyLoss(ignore_index=-100),
        "z-loss + softcap": lambda: cnn.CrossEntropyLoss(z_loss=1e-3, softcap=30.0),
        "FocalLoss": lambda: cnn.FocalLoss(gamma=2.0, label_smoothing=0.1),
    }[name]()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (8,), generator=g)
    y[1] = -100
    graphs: list[Any] = []
    guards: list[Any] = []

    def keep(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm

    def keep_guards(entries: list[Any]) -> list[bool]:
        guards.extend(entries)
        return [True] * len(entries)

    torch._dynamo.reset()
    compiled = torch.compile(
        module, backend=keep, fullgraph=True, options={"guard_filter_fn": keep_guards}
    )
    v = x.clone().requires_grad_(True)
    got = compiled(v, y)
    (got_grad,) = torch.autograd.grad(got, v)
    w = x.clone().requires_grad_(True)
    want = module(w, y)
    (want_grad,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    calls = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert [getattr(c, "__name__", "") for c in calls] == ["graph_node"], calls
    assert len(guards) <= 90, len(guards)
