"""The fused functions under torch.compile(fullgraph=True): one opaque op, no unrolled chunk loop."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from crossent.fused import (  # noqa: E402
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)
from tests._reference.fused import linear_cross_entropy_ref  # noqa: E402

N, D, V = 37, 6, 53


def _data() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, V, (N,), generator=gen)
    target[::5] = -100
    return {
        "hidden": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "weight": torch.randn(V, D, generator=gen, dtype=torch.float64),
        "bias": torch.randn(V, generator=gen, dtype=torch.float64),
        "target": target,
        "up": torch.randn(N, generator=gen, dtype=torch.float64),
    }


class _Recorder:
    """A torch.compile backend that keeps the FX graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs: list[Any] = []

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_compile_equals_reference_without_unrolling(reduction: str) -> None:
    data = _data()
    rec = _Recorder()

    def loss_fn(h: Any, w: Any, b: Any, y: Any) -> Any:
        loss = linear_cross_entropy(
            h, w, y, bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=4
        )
        return loss.sum() if reduction != "none" else (loss * data["up"]).sum()

    compiled = torch.compile(loss_fn, backend=rec, fullgraph=True)
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    out = compiled(h, w, b, data["target"])
    out.backward()
    up = data["up"].numpy() if reduction == "none" else None
    want = linear_cross_entropy_ref(
        data["hidden"].numpy(),
        data["weight"].numpy(),
        data["target"].numpy(),
        bias=data["bias"].numpy(),
        label_smoothing=0.1,
        reduction=reduction,
        grad_output=up,
    )
    want_loss = float((want[0] * up).sum()) if up is not None else float(want[0])
    torch.testing.assert_close(out.detach(), torch.tensor(want_loss, dtype=torch.float64))
    for got, ref in zip((h.grad, w.grad, b.grad), want[1:], strict=True):
        torch.testing.assert_close(got, torch.from_numpy(ref), rtol=1e-10, atol=1e-12)
    assert len(rec.graphs) == 1
    code = rec.graphs[0].code
    assert "crossent.linear_ce" in code
    assert "nonzero" not in code
    # 10 chunks of 4 counted rows would be 10+ matrix products if the loop were unrolled
    assert "mm" not in code.replace("crossent", "")


def test_compiled_bad_labels_still_raise() -> None:
    data = _data()
    y = data["target"].clone()
    y[0] = V + 3
    compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match="`target`"):
        compiled(data["hidden"], data["weight"], y)


def _one_opaque_op(rec: _Recorder, names: tuple[str, ...]) -> None:
    """Forward (and backward) graphs hold the ops, no nonzero and no unrolled products."""
    assert len(rec.graphs) == 1
    code = rec.graphs[0].code
    for name in names:
        assert f"crossent.{name}" in code
    assert "nonzero" not in code
    assert "mm" not in code.replace("crossent", "")


def _grads_equal(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_fullgraph_compile_of_log_probs_and_entropy_equals_eager() -> None:
    """Both outputs, any upstream gradients, the entropy changed in place by the caller."""
    data = _data()
    opts = {"temperature": 0.7, "softcap": 3.0, "shift": True, "chunk_size": 4}
    g_lp, g_ent = data["up"][:32].reshape(4, 8), data["up"][5:].reshape(4, 8).flip(0)

    def objective(h: Any, w: Any, b: Any, y: Any) -> Any:
        lp, ent = linear_log_probs(h, w, y, bias=b, return_entropy=True, **opts)
        ent.mul_(2.0)  # the saved entropy is a copy: backward is not affected
        return (lp * g_lp).sum() + (ent * g_ent).sum()

    def run(fn: Any) -> tuple[Any, ...]:
        hidden = data["hidden"][:36].reshape(4, 9, D)
        leaves = [x.clone().requires_grad_() for x in (hidden, data["weight"], data["bias"])]
        out = fn(*leaves, data["target"][:36].reshape(4, 9))
        out.backward()
        return (out.detach(), *(x.grad for x in leaves))

    rec = _Recorder()
    _grads_equal(run(torch.compile(objective, backend=rec, fullgraph=True)), run(objective))
    _one_opaque_op(rec, ("linear_log_probs",))
    # a wrong label still gets the clear error inside the op
    y = data["target"].clone()
    y[3] = V
    compiled = torch.compile(linear_log_probs, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match="`target`"):
        compiled(data["hidden"], data["weight"], y)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_of_distillation_equals_eager(reduction: str) -> None:
    data = _data()
    gen = torch.Generator().manual_seed(1)
    t_hidden = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    t_weight = torch.randn(V, 3, generator=gen, dtype=torch.float64)

    def objective(h: Any, w: Any, b: Any, y: Any) -> Any:
        loss = linear_distillation_loss(
            h, w, t_hidden, t_weight, y, bias=b, beta=0.3, temperature=1.5,
            reduction=reduction, chunk_size=4,
        )  # fmt: skip
        return (loss * data["up"]).sum() if reduction == "none" else loss

    def run(fn: Any) -> tuple[Any, ...]:
        leaves = [data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        out = fn(*leaves, data["target"])
        out.backward()
        return (out.detach(), *(x.grad for x in leaves))

    rec = _Recorder()
    _grads_equal(run(torch.compile(objective, backend=rec, fullgraph=True)), run(objective))
    _one_opaque_op(rec, ("linear_distill",))


# ----------------------------------------------------------------------------
# compiled equals eager bit for bit in low precision, gradients in the parameters' dtypes
# ----------------------------------------------------------------------------

_LOW = {
    "mixed": (torch.bfloat16, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16+float32": (torch.float16, torch.float32),
}


def _fused_outputs(case: str, h: Any, w: Any, y: Any, t: tuple[Any, Any]) -> tuple[Any, ...]:
    """One fused function's outputs (what backward receives its upstream gradients for)."""
    from crossent.nn import LinearCrossEntropyLoss

    if case == "ce":
        return (linear_cross_entropy(h, w, y, label_smoothing=0.1, chunk_size=8),)
    if case == "ce_sum":
        return (linear_cross_entropy(h, w, y, reduction="sum", z_loss=1e-3, chunk_size=8),)
    if case == "ce_none":
        return (linear_cross_entropy(h, w, y, reduction="none", chunk_size=8),)
    if case == "nn":
        return (LinearCrossEntropyLoss(chunk_size=8)(h, w, y),)
    if case == "log_probs":
        return tuple(linear_log_probs(h, w, y, return_entropy=True, chunk_size=8))
    return (linear_distillation_loss(h, w, *t, y, beta=0.3, chunk_size=8),)


def _low_precision_run(case: str, dtype: str, fn: Any) -> tuple[Any, ...]:
    """Outputs and (hidden, weight) gradients of `fn` (eager or compiled) for upstream
    gradients that are not powers of two (0.37, and random per-row ones)."""
    h_dt, w_dt = _LOW[dtype]
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(N, 16, generator=gen).to(h_dt).requires_grad_()
    w = (torch.randn(V, 16, generator=gen) / 4).to(w_dt).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    y[::7] = -100
    t = (torch.randn(N, 5, generator=gen).to(h_dt), torch.randn(V, 5, generator=gen).to(w_dt))
    outs = fn(h, w, y, t)
    ups = [
        torch.rand(o.shape, generator=gen, dtype=o.dtype) if o.ndim else o.new_tensor(0.37)
        for o in outs
    ]
    torch.autograd.backward(outs, ups)
    return (*(o.detach() for o in outs), h.grad, w.grad)


_CASES = ("ce", "ce_sum", "ce_none", "nn", "log_probs", "distill")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("backend", "dtype", "case"),
    [("aot_eager", dt, c) for dt in _LOW for c in _CASES]
    + [("inductor", "mixed", c) for c in ("ce", "nn", "distill")],
)
def test_compiled_equals_eager_bitwise_in_low_precision(
    backend: str, dtype: str, case: str
) -> None:
    """bfloat16 (float16) hidden states with a float32 or bfloat16 head, compiled with fullgraph: every
    output and gradient equals eager's bit for bit, each gradient in its parameter's dtype.
    Before, the compiled op returned the gradients formed in forward as outputs and its
    backward scaled them out of place; with a bfloat16 head under aot_eager the weight
    gradient of ce, nn and distill differed from eager by up to 1.5e-5."""

    def fn(h: Any, w: Any, y: Any, t: tuple[Any, Any]) -> tuple[Any, ...]:
        return _fused_outputs(case, h, w, y, t)

    torch._dynamo.reset()
    want = _low_precision_run(case, dtype, fn)
    got = _low_precision_run(case, dtype, torch.compile(fn, fullgraph=True, backend=backend))
    assert [g.dtype for g in got[-2:]] == list(_LOW[dtype])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert torch.equal(g, w), (g - w).abs().max()


def test_compiled_gradients_kept_for_backward_are_freed_with_the_graph() -> None:
    """The gradients the compiled op forms in forward are kept for its backward op under a
    token: consumed by backward, freed with a graph that is never differentiated, and a
    second backward through a retained graph recomputes them (as eager does)."""
    import torch._functorch.config

    from crossent.fused import _ops

    data = _data()
    compiled = torch.compile(
        lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=4), fullgraph=True,
        backend="aot_eager",
    )  # fmt: skip
    h = data["hidden"].clone().requires_grad_()
    before = len(_ops._KEPT)
    loss = compiled(h, data["weight"], data["target"])
    assert len(_ops._KEPT) == before + 1
    del loss
    assert len(_ops._KEPT) == before
    (first,) = torch.autograd.grad(compiled(h, data["weight"], data["target"]), h)
    assert len(_ops._KEPT) == before
    # donated buffers (torch's default) refuse retain_graph=True for compiled backward
    with torch._functorch.config.patch(donated_buffer=False):
        torch._dynamo.reset()
        loss = compiled(h, data["weight"], data["target"]) * 0.75
        (once,) = torch.autograd.grad(loss, h, retain_graph=True)
        (twice,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(once, 0.75 * first, rtol=1e-14, atol=0)
    torch.testing.assert_close(twice, once, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("case", ["ce", "ce_none", "nn", "log_probs", "distill"])
def test_dynamic_compile_traces_one_graph_for_every_batch(case: str) -> None:
    """``torch.compile(dynamic=True, fullgraph=True)``: one graph for two batch sizes, equal
    to eager. Before, the options' numbers (symbolic under dynamic=True: defaults and
    arguments) reached the op's option string, whose ``repr`` Dynamo cannot trace: an error
    with fullgraph, and without it a graph break that compiled the first call twice."""
    data = _data()

    def fn(h: Any, w: Any, y: Any, th: Any) -> tuple[Any, ...]:
        return _fused_outputs(case, h, w, y, (th, data["weight"][:, :3]))

    rec = _Recorder()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=rec)
    for rows in (N, 23):
        h, y = data["hidden"][:rows].clone(), data["target"][:rows].clone()
        args = (h, data["weight"], y, h[:, :3] * 2)
        for got, want in zip(compiled(*args), fn(*args), strict=True):
            assert torch.equal(got, want)
    assert len(rec.graphs) == 1


def test_dynamic_compile_recompiles_for_another_option_value() -> None:
    """An option passed as an argument is symbolic under ``dynamic=True``: specialised for the
    op, each value gets its own graph (a guard on the value), never another value's loss."""
    data = _data()

    def fn(h: Any, w: Any, y: Any, smoothing: float, z: float) -> Any:
        return linear_cross_entropy(h, w, y, label_smoothing=smoothing, z_loss=z, chunk_size=4)

    rec = _Recorder()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=rec)
    args = (data["hidden"], data["weight"], data["target"])
    for options in ((0.1, 1e-3), (0.2, 1e-3), (0.2, 0.0), (0.1, 1e-3)):
        assert torch.equal(compiled(*args, *options), fn(*args, *options))
    assert len(rec.graphs) == 3
