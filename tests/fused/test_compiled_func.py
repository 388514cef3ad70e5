"""The fused functions under ``torch.compile`` of a ``torch.func`` transform.

``torch.compile(vmap(grad(loss)))`` raised ``RuntimeError when making fake tensor call ...
crossent.linear_ce.default(GradTrackingTensor(BatchedTensor(FakeTensor ...)))``: while
Dynamo traced the transform, the fused functions called their custom op directly on the
transforms' wrappers (the ``torch.func`` route was taken only when not compiling), and a
custom op's autograd has no ``torch.func`` support. Now, under a differentiating transform,
they take the eager ``torch.func`` route there too, run eagerly at a graph break: the eager
transform's values and per-sample gradients, and its errors (forward mode, a second
derivative, bad labels). With ``fullgraph=True`` Dynamo's error quotes the reason and the
fix. ``vmap`` alone still traces the op, in one graph. Each case is checked against the eager transform, which
``tests/fused/test_func.py`` checks against eager autograd and a loop over the samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
func = torch.func

from crossent.fused import (  # noqa: E402
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)
from crossent.nn import LinearCrossEntropyLoss  # noqa: E402
from tests.fused.test_func import CASES, _data  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles afresh, and leaves nothing behind: Dynamo marks the frames it met
    eagerly under a transform, at the graph break ("Calling torch.func.vmap(compiled_fn)
    function from eager mode is not supported"), as never to be compiled (crossent's fused
    functions clear their own mark: ``test_fullgraph_compile_after_a_compiled_transform``;
    the tests' closures keep theirs); PyTorch's fake tensor cache kept a forward-mode view
    from one compiled ``jvp`` for the next (an internal assertion, ``has_fw_view()``)."""
    torch._dynamo.reset()
    torch._subclasses.fake_tensor.FakeTensorMode.cache_clear()
    yield
    torch._dynamo.reset()
    torch._subclasses.fake_tensor.FakeTensorMode.cache_clear()


DIMS = (None, None, 0, 0, 0, None)  # weight, bias, hidden, target, teacher hidden, extra


def _args(data: dict[str, Any], *, batched: bool) -> tuple[Any, ...]:
    """The loss's arguments: every sample (for vmap) or the first one."""
    pick = (lambda t: t) if batched else (lambda t: t[0])
    return (
        data["weight"],
        data["bias"],
        pick(data["hidden"]),
        pick(data["target"]),
        pick(data["t_hidden"]),
        data,
    )


def _transformed(mode: str, loss: Callable[..., Any]) -> Callable[..., Any]:
    if mode == "vmap-grad":
        return func.vmap(func.grad_and_value(loss, argnums=(0, 1, 2)), in_dims=DIMS)
    if mode == "grad":
        return func.grad(loss, argnums=(0, 2))
    if mode == "jacrev":
        return func.jacrev(loss, argnums=(0, 1))
    raise AssertionError(mode)


def _assert_same(got: Any, want: Any) -> None:
    got_leaves = torch.utils._pytree.tree_leaves(got)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_vmap_grad_equals_eager(case: str) -> None:
    loss, data = CASES[case], _data()
    args = _args(data, batched=True)
    want = _transformed("vmap-grad", loss)(*args)
    compiled = torch.compile(_transformed("vmap-grad", loss), backend="aot_eager")
    _assert_same(compiled(*args), want)


# Dynamo reads `.grad` of a non-leaf while it resumes jacrev after a graph break (it does so
# for a torch.compiler.disable'd function of plain torch ops too)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("mode", ["grad", "jacrev"])
@pytest.mark.parametrize(
    "case", ["ce-sum-softcap-class-weight", "ce-none-shift", "log-probs-softcap-shift-entropy",
             "distill-none"],
)  # fmt: skip
def test_compiled_grad_and_jacrev_equal_eager(case: str, mode: str) -> None:
    loss, data = CASES[case], _data(1)
    args = _args(data, batched=False)
    want = _transformed(mode, loss)(*args)
    compiled = torch.compile(_transformed(mode, loss), backend="aot_eager")
    _assert_same(compiled(*args), want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_issue_repro_with_inductor() -> None:
    """The report's call, with the default backend: per-sample gradients of `hidden`."""
    gen = torch.Generator().manual_seed(5)
    h, w = torch.randn(4, 3, 8, generator=gen), torch.randn(11, 8, generator=gen)
    y = torch.randint(0, 11, (4, 3), generator=gen)
    g = func.vmap(func.grad(lambda h, y: linear_cross_entropy(h, w, y)))
    got = torch.compile(g)(h, y)
    for i in range(4):
        hi = h[i].clone().requires_grad_()
        (want,) = torch.autograd.grad(linear_cross_entropy(hi, w, y[i]), hi)
        torch.testing.assert_close(got[i], want)


def test_compiled_vmap_grad_of_the_module_equals_a_loop() -> None:
    """``crossent.nn.LinearCrossEntropyLoss``: per-sample gradients of a Parameter head."""
    data = _data(2)
    loss_fn = LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    w = torch.nn.Parameter(data["weight"].clone())
    h, y = data["hidden"], data["target"]
    per_sample = torch.compile(
        func.vmap(func.grad(lambda w, h, y: loss_fn(h, w, y)), in_dims=(None, 0, 0)),
        backend="aot_eager",
    )(w, h, y)
    for i in range(h.shape[0]):
        (want,) = torch.autograd.grad(loss_fn(h[i], w, y[i]), w)
        torch.testing.assert_close(per_sample[i], want, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("mode", ["vmap-grad", "grad", "jacrev"])
@pytest.mark.parametrize("case", ["ce", "log-probs-temperature-entropy", "distill"])
def test_fullgraph_names_the_reason_and_the_fix(case: str, mode: str) -> None:
    """With ``fullgraph=True`` the graph break is Dynamo's error, which quotes the reason."""
    loss, data = CASES[case], _data()
    compiled = torch.compile(_transformed(mode, loss), backend="aot_eager", fullgraph=True)
    match = r"under a differentiating torch\.func transform .* Compile without fullgraph=True"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=match):
        compiled(*_args(data, batched=mode == "vmap-grad"))


# torch's forward-mode AD loads its decompositions with torch.jit.script once (deprecated)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", ["jacfwd", "jvp"])
@pytest.mark.parametrize("case", ["ce", "log-probs-temperature-entropy", "distill"])
def test_compiled_forward_mode_raises_the_eager_error(case: str, mode: str) -> None:
    loss, data = CASES[case], _data()
    args = _args(data, batched=False)

    def forward_mode(*args: Any) -> Any:
        if mode == "jacfwd":
            return func.jacfwd(loss, argnums=2)(*args)
        w, b, h, *rest = args
        return func.jvp(lambda h: loss(w, b, h, *rest), (h,), (torch.ones_like(h),))

    with pytest.raises(RuntimeError, match=r"crossent\.fused\.linear_\w+ has no forward-mode"):
        torch.compile(forward_mode, backend="aot_eager")(*args)


def test_compiled_vmap_grad_bad_label_gives_crossents_message() -> None:
    data = _data()
    target = data["target"].clone()
    target[1, 2] = data["weight"].shape[0]  # V: outside [0, V)
    args = (data["weight"], data["bias"], data["hidden"], target, data["t_hidden"], data)
    compiled = torch.compile(_transformed("vmap-grad", CASES["ce"]), backend="aot_eager")
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 11\)"):
        compiled(*args)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("mode", ["grad-of-grad", "jacrev-of-grad", "hessian"])
@pytest.mark.parametrize("case", ["ce", "log-probs-temperature-entropy", "distill"])
def test_compiled_second_derivative_raises_the_eager_error(case: str, mode: str) -> None:
    """Never a silently wrong (zero) second derivative under compile: the eager errors."""
    loss, data = CASES[case], _data()
    w, b, h, y, th, extra = _args(data, batched=False)

    def first(h: Any) -> Any:
        return loss(w, b, h, y, th, extra)

    fn = {
        "grad-of-grad": func.grad(lambda h: func.grad(first)(h).square().sum()),
        "jacrev-of-grad": func.jacrev(func.grad(first)),
        "hessian": func.hessian(first),
    }[mode]
    match = "has no forward-mode" if mode == "hessian" else "has no second derivative"
    with pytest.raises(RuntimeError, match=rf"crossent\.fused\.linear_\w+ {match}"):
        torch.compile(fn, backend="aot_eager")(h)


@pytest.mark.parametrize(
    "case", ["ce", "ce-none-shift", "log-probs-softcap-shift-entropy", "distill-none"]
)
def test_compiled_vmap_alone_stays_one_graph(case: str) -> None:
    """``vmap`` without differentiation traces the op (its vmap rule loops over the samples):
    ``fullgraph=True`` equals the eager ``vmap``, which equals a loop (``test_func.py``)."""
    loss, data = CASES[case], _data(3)

    def per_sample(h: Any, y: Any, th: Any) -> Any:
        return loss(data["weight"], data["bias"], h, y, th, data)

    batched = func.vmap(per_sample)
    args = (data["hidden"], data["target"], data["t_hidden"])
    got = torch.compile(batched, backend="aot_eager", fullgraph=True)(*args)
    _assert_same(got, batched(*args))


_DIRECT: dict[str, tuple[Callable[..., Any], Callable[[dict[str, Any]], tuple[Any, ...]]]] = {
    "ce": (linear_cross_entropy, lambda d: (d["hidden"][0], d["weight"], d["target"][0])),
    "log-probs": (linear_log_probs, lambda d: (d["hidden"][0], d["weight"], d["target"][0])),
    "distill": (
        linear_distillation_loss,
        lambda d: (d["hidden"][0], d["weight"], d["t_hidden"][0], d["t_weight"], d["target"][0]),
    ),
    "module": (
        LinearCrossEntropyLoss(label_smoothing=0.1),
        lambda d: (d["hidden"][0], d["weight"], d["target"][0]),
    ),
}


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("case", sorted(_DIRECT))
def test_fullgraph_compile_after_a_compiled_transform(case: str) -> None:
    """A compiled differentiating transform leaves Dynamo's "skip" mark on the code of the
    frames it met eagerly under the transform (at the graph break), the fused function's
    among them. A later ``torch.compile(fn, fullgraph=True)`` of that function ran its frame
    eagerly but compiled the inner frames one by one, the chunk loop's too: ``Could not
    guard on data-dependent expression Eq(u0, 0)``. Now the skipped frame runs eagerly as a
    whole: the eager values and gradients."""
    fn, make_args = _DIRECT[case]
    data = _data(4)

    def per_sample(h: Any, y: Any, th: Any) -> Any:
        d = {**data, "hidden": h[None], "target": y[None], "t_hidden": th[None]}
        out = fn(*make_args(d))
        return sum(o.sum() for o in torch.utils._pytree.tree_leaves(out))

    transform = func.vmap(func.grad(per_sample))
    torch.compile(transform, backend="aot_eager")(data["hidden"], data["target"], data["t_hidden"])
    leaves = {k: data[k].clone().requires_grad_() for k in ("hidden", "weight")}
    args = make_args({**data, **leaves})
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    want = fn(*args)
    _assert_same(got, want)
    grads = [
        torch.autograd.grad(
            sum(o.sum() for o in torch.utils._pytree.tree_leaves(out)), list(leaves.values())
        )
        for out in (got, want)
    ]
    _assert_same(*grads)
