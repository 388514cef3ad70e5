"""What a compiled crossent loss costs per call: dynamo guards, and the traced binary formula.

Every guard dynamo installs is checked before each call of the compiled function;
at 32 × 10 a hundred of them are a tenth of the call. The scalar options are
checked once at trace time as a constant (no guards on the checks' globals), and
the traced binary loss is its own short formula instead of the generic one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
from tests._compiled import eager_and_compiled  # noqa: E402

N, C = 8, 5


def _data() -> tuple[Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    probs = torch.softmax(torch.randn(N, C, generator=g), -1)
    bt = (torch.rand(N, C, generator=g) > 0.5).float()
    return x, y, probs, bt


def _guard_count(loss: Callable[[Any], Any], x: Any) -> int:
    """Guards dynamo installs for one compiled call of `loss` (``backend="eager"``: no inductor)."""
    torch._dynamo.reset()
    seen: list[Any] = []

    def keep_all(entries: list[Any]) -> list[bool]:
        seen.extend(entries)
        return [True] * len(entries)

    compiled = torch.compile(loss, backend="eager", options={"guard_filter_fn": keep_all})
    with torch.no_grad():
        compiled(x)
    return len(seen)


# Each loss is one node of dynamo's graph (crossent._backends._node): dynamo guards the call's
# prologue (options, validation switch, the node), not the executor's dispatch and formula.
# Traced through, they installed 64, 94, 72 and 106 guards, and 204 and 202 for crossent's own
# options (z-loss + softcap, focal), 228 for distillation_loss and 156 for listnet_loss; torch's
# own losses: 11. The bounds leave room for a few more,
# not for the dispatch traced again.
BOUNDS = {
    "sparse": 60,
    "categorical": 60,
    "binary": 60,
    "binary weight": 60,
    "z-loss + softcap": 70,
    "focal": 70,
    "distillation": 65,
    "listnet": 55,
}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_compiled_loss_installs_few_guards(name: str) -> None:
    x, y, probs, bt = _data()
    loss = {
        "sparse": lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True),
        "categorical": lambda v: ce.categorical_cross_entropy(v, probs, from_logits=True),
        "binary": lambda v: ce.binary_cross_entropy(v, bt, from_logits=True),
        "binary weight": lambda v: ce.binary_cross_entropy(
            v, bt, from_logits=True, weight=probs, pos_weight=probs[0]
        ),
        "z-loss + softcap": lambda v: ce.sparse_categorical_cross_entropy(
            v, y, from_logits=True, z_loss=1e-4, softcap=30.0
        ),
        "focal": lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True, gamma=2.0),
        "distillation": lambda v: ce.distillation_loss(v, probs, beta=0.3, temperature=2.0),
        "listnet": lambda v: ce.listnet_loss(v, probs),
    }[name]
    reference = _guard_count(lambda v: F.cross_entropy(v, y), x)
    count = _guard_count(loss, x)
    assert reference < 20
    assert count <= BOUNDS[name], count


def test_bad_option_under_compile_raises_its_own_error() -> None:
    """The constant option check gives way to the traced checks, which raise the ValueError."""
    torch._dynamo.reset()
    x, y, _, _ = _data()
    compiled = torch.compile(
        lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True, reduction="avg"),
        backend="eager",
    )
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        compiled(x)


def test_compiled_options_are_the_call_s_own() -> None:
    """Options are constants of one compiled call: other values recompile, never reuse."""
    torch._dynamo.reset()
    x, y, _, _ = _data()

    def loss(v: Any, eps: float) -> Any:
        return ce.sparse_categorical_cross_entropy(v, y, from_logits=True, label_smoothing=eps)

    compiled = torch.compile(loss, backend="eager")
    for eps in (0.0, 0.2, 0.0):
        torch.testing.assert_close(compiled(x, eps), F.cross_entropy(x, y, label_smoothing=eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traced_binary_equals_eager_at_zero_and_infinite_logits(dtype: Any, reduction: str) -> None:
    """The traced formula: value and gradient as eagerly (exact there), σ(0) - t at x = 0."""
    torch._dynamo.reset()
    x = torch.tensor(
        [[0.0, 0.0, 0.0, math.inf, -math.inf], [60.0, -60.0, 1e-3, -30.0, 2.5]], dtype=torch.float64
    ).to(dtype)
    t = torch.tensor([[0.0, 1.0, 0.3, 1.0, 0.0], [1.0, 0.0, 0.7, 0.0, 0.25]], dtype=torch.float64)
    t = t.to(dtype)

    def loss(v: Any) -> Any:
        return ce.binary_cross_entropy(v, t, from_logits=True, reduction=reduction)

    results = eager_and_compiled(loss, x)
    exact = {"rtol": 2e-15, "atol": 0.0} if dtype == torch.float64 else {}
    torch.testing.assert_close(results[1][0], results[0][0], **exact)
    torch.testing.assert_close(results[1][1], results[0][1], **exact)
    grad = results[1][1].double() * (x.numel() if reduction == "mean" else 1)
    torch.testing.assert_close(grad[0, :3], 0.5 - t[0, :3].double(), rtol=1e-2, atol=1e-3)
    # exact small losses where torch's formula cancels (x = -30, t = 0: 9.4e-14 in float32)
    if reduction == "none" and dtype != torch.bfloat16:
        expected = math.log1p(math.exp(-30.0))
        assert results[1][0][1, 3].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"weight": "w"}, {"pos_weight": "w"}, {"alpha": 0.25}, {"weight": 2.0, "pos_weight": 3.0}],
    ids=["weight", "pos_weight", "alpha", "numbers"],
)
def test_traced_binary_keeps_weights_and_alpha(options: dict[str, Any]) -> None:
    # the short traced formula has no weights: a weighted call must not take it
    x, _, _, bt = _data()
    w = torch.linspace(0.5, 2.0, C)
    kw = {k: (w if v == "w" else v) for k, v in options.items()}
    torch._dynamo.reset()
    (eager, compiled) = eager_and_compiled(
        lambda v: ce.binary_cross_entropy(v, bt, from_logits=True, **kw), x
    )
    torch.testing.assert_close(compiled, eager)
    torch_kw = {k: torch.as_tensor(v) for k, v in kw.items() if k != "alpha"}
    if "alpha" not in kw:
        ref = F.binary_cross_entropy_with_logits(x, bt, **torch_kw)
        torch.testing.assert_close(eager[0], ref)


def test_first_compiled_call_compiles_once() -> None:
    """A fresh interpreter whose first crossent call is compiled: one graph per loss. The lazily
    imported PyTorch executor used to be assigned inside the trace, which failed dynamo's
    guard on it at the next call: every loss compiled twice (twice the compile time)."""
    code = """
import sys
import torch
import crossent as ce

x, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
t = torch.rand(4, 3)
ce.sparse_categorical_cross_entropy(x, y, from_logits=True)  # eager: dynamo stays unloaded
print(int("torch._dynamo" in sys.modules))
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
losses = [
    lambda: ce.sparse_categorical_cross_entropy(x, y, from_logits=True),
    lambda: ce.categorical_cross_entropy(x, torch.softmax(t, 1), from_logits=True),
    lambda: ce.binary_cross_entropy(x, t, from_logits=True),
]
for loss in losses:
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    for _ in range(3):
        compiled()
    print(len(_debug_get_cache_entry_list(loss.__code__)))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "1", "1", "1"], done.stdout + done.stderr


def test_compiled_loss_is_one_graph_node() -> None:
    """Dynamo's graph holds the loss as one call, which AOTAutograd traces into ATen operations:
    the same values and gradients as eagerly, crossent's own options included."""
    torch._dynamo.reset()
    x, y, _, _ = _data()
    graphs: list[Any] = []

    def keep(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v, y, from_logits=True, z_loss=1e-3, gamma=2.0)

    compiled = torch.compile(loss, backend=keep, fullgraph=True)
    v = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(compiled(v), v)
    (want,) = torch.autograd.grad(loss(v), v)
    torch.testing.assert_close(got, want)
    calls = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert [getattr(c, "__name__", "") for c in calls] == ["graph_node"], calls


def test_shape_error_under_compile_carries_crossent_s_message() -> None:
    """Eagerly a ValueError; compiled, dynamo raises its TorchRuntimeError (a RuntimeError) with
    crossent's message, as for PyTorch's own losses."""
    torch._dynamo.reset()
    x, _, probs, _ = _data()

    def loss(v: Any) -> Any:
        return ce.categorical_cross_entropy(v, probs[:, :3], from_logits=True)

    with pytest.raises(ValueError, match="`target` must have"):
        loss(x)
    with pytest.raises(RuntimeError, match="`target` must have"):
        torch.compile(loss, backend="aot_eager")(x)


def test_compiled_numbers_that_dynamo_makes_dynamic() -> None:
    """A float `pos_weight` or an int `axis` that changes between calls becomes symbolic after a
    recompile; the node specializes it (a guard), so each value gets its own graph."""
    torch._dynamo.reset()
    x, y, _, bt = _data()

    def binary(v: Any, pw: float) -> Any:
        return ce.binary_cross_entropy(v, bt, from_logits=True, pos_weight=pw)

    compiled = torch.compile(binary, backend="aot_eager")
    for pw in (2.0, 3.0, 0.5, 3.0):
        torch.testing.assert_close(compiled(x, pw), binary(x, pw))

    def sparse(v: Any, axis: int) -> Any:
        return ce.sparse_categorical_cross_entropy(v, y[:, None], from_logits=True, axis=axis)

    compiled = torch.compile(sparse, backend="aot_eager")
    for axis in (1, -2, 1):
        v = x[:, :, None] if axis in (1, -2) else x
        torch.testing.assert_close(compiled(v, axis), sparse(v, axis))


@pytest.mark.parametrize("name", ["distillation", "listnet", "binary"])
def test_node_losses_equal_eager(name: str) -> None:
    """The other losses that enter the graph as one node: compiled values and gradients equal
    eager (inductor, through the node's ATen trace)."""
    torch._dynamo.reset()
    x, y, probs, bt = _data()
    y = torch.where(y == 0, -100, y)
    loss = {
        "distillation": lambda v: ce.distillation_loss(
            v, probs * 3, beta=0.3, temperature=2.0, target=y, reduction="sum"
        ),
        "listnet": lambda v: ce.listnet_loss(v, probs, reduction="none"),
        "binary": lambda v: ce.binary_cross_entropy(
            v, bt, from_logits=True, weight=probs, pos_weight=2.0, label_smoothing=0.1
        ),
    }[name]
    (eager, compiled) = eager_and_compiled(loss, x.double())
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-12, atol=1e-15)


_DYNAMIC = {
    "sparse weight": lambda x, y, p, w: ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, weight=w
    ),
    "sparse z-loss": lambda x, y, p, w: ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, z_loss=0.1
    ),
    "categorical probs": lambda x, y, p, w: ce.categorical_cross_entropy(torch.softmax(x, -1), p),
    "categorical focal": lambda x, y, p, w: ce.categorical_cross_entropy(
        x, p, from_logits=True, gamma=1.5
    ),
    "distillation target": lambda x, y, p, w: ce.distillation_loss(x, 2 * p, target=y),
}


@pytest.mark.parametrize("name", list(_DYNAMIC))
def test_node_keeps_sizes_symbolic(name: str) -> None:
    """Inside the node, ``int()`` / ``float()`` of a symbolic size specializes the graph (dynamo
    kept them symbolic while it traced the loss): sizes are taken as they are, so a loss called
    with new batch and class counts compiles twice (static, then dynamic), not once per size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    loss = _DYNAMIC[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter)
    g = torch.Generator().manual_seed(3)
    for n, c in ((4, 5), (6, 7), (8, 9), (10, 11)):
        x = torch.randn(n, c, generator=g, dtype=torch.float64)
        y = torch.randint(0, c, (n,), generator=g)
        p = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
        w = torch.rand(c, generator=g, dtype=torch.float64)
        torch.testing.assert_close(compiled(x, y, p, w), loss(x, y, p, w), rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 2, counter.frame_count
