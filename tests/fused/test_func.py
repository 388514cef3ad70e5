"""The fused functions under torch.func: grad, grad_and_value, vmap (per-sample gradients), jacrev.

Every transform is checked against eager autograd on the same fused function (a
Python loop over the samples for vmap), which the other tests check against the
float64 references; a second derivative under torch.func must raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
func = torch.func

from crossent.fused import (  # noqa: E402
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)

B, N, D, V, DT = 3, 6, 5, 11, 4  # samples, tokens per sample, hidden, vocabulary, teacher hidden


def _data(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    target = torch.randint(0, V, (B, N), generator=gen)
    target[0, ::3] = -100  # some ignored rows
    target[2] = -100  # a sample with none counted: a mean of 0, zero gradients
    return {
        "weight": torch.randn(V, D, generator=gen, dtype=f64) * 0.7,
        "bias": torch.randn(V, generator=gen, dtype=f64) * 0.3,
        "hidden": torch.randn(B, N, D, generator=gen, dtype=f64),
        "target": target,
        "t_weight": torch.randn(V, DT, generator=gen, dtype=f64) * 0.7,
        "t_hidden": torch.randn(B, N, DT, generator=gen, dtype=f64),
        "g_lp": torch.randn(N, generator=gen, dtype=f64),
        "g_ent": torch.randn(N, generator=gen, dtype=f64),
        "class_weight": torch.rand(V, generator=gen, dtype=f64) + 0.5,
    }


# loss(weight, bias, hidden, target, t_hidden, extra): a scalar of one sample's inputs
Loss = Callable[..., Any]


def _ce(**opts: Any) -> Loss:
    def loss(w: Any, b: Any, h: Any, y: Any, th: Any, extra: dict[str, Any]) -> Any:
        cw = extra["class_weight"] if opts.get("class_weight") else None
        kw = {k: v for k, v in opts.items() if k != "class_weight"}
        out = linear_cross_entropy(h, w, y, bias=b, class_weight=cw, **kw)
        if out.ndim:  # "none": weight the rows by a fixed upstream gradient
            out = (out * extra["g_lp"][: out.shape[0]]).sum()
        return out

    return loss


def _log_probs(**opts: Any) -> Loss:
    def loss(w: Any, b: Any, h: Any, y: Any, th: Any, extra: dict[str, Any]) -> Any:
        out = linear_log_probs(h, w, y, bias=b, **opts)
        lp, ent = out if opts.get("return_entropy") else (out, None)
        total = (lp * extra["g_lp"][: lp.shape[0]]).sum()
        if ent is not None:  # both outputs used
            total = total + (ent * extra["g_ent"][: ent.shape[0]]).sum()
        return total

    return loss


def _distill(**opts: Any) -> Loss:
    def loss(w: Any, b: Any, h: Any, y: Any, th: Any, extra: dict[str, Any]) -> Any:
        out = linear_distillation_loss(h, w, th, extra["t_weight"], y, bias=b, **opts)
        if out.ndim:
            out = (out * extra["g_lp"][: out.shape[0]]).sum()
        return out

    return loss


CASES: dict[str, Loss] = {
    "ce": _ce(),
    "ce-smoothing-zloss": _ce(label_smoothing=0.1, z_loss=1e-2),
    "ce-sum-softcap-class-weight": _ce(reduction="sum", softcap=2.0, class_weight=True),
    "ce-none-shift": _ce(reduction="none", shift=True),
    "ce-chunked": _ce(chunk_size=2, label_smoothing=0.2),
    "log-probs": _log_probs(),
    "log-probs-temperature-entropy": _log_probs(temperature=0.7, return_entropy=True),
    "log-probs-softcap-shift-entropy": _log_probs(softcap=2.0, shift=True, return_entropy=True),
    "distill": _distill(),
    "distill-beta-temperature": _distill(beta=0.3, temperature=2.0, chunk_size=2),
    "distill-none": _distill(beta=1.0, reduction="none"),
}


def _eager(loss: Loss, data: dict[str, Any], i: int) -> tuple[Any, ...]:
    """(loss, grads of weight, bias, hidden) of sample `i` by eager autograd."""
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    h = data["hidden"][i].clone().requires_grad_()
    out = loss(w, b, h, data["target"][i], data["t_hidden"][i], data)
    return (out.detach(), *torch.autograd.grad(out, [w, b, h]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmap_grad_per_sample_gradients_equal_a_loop(case: str) -> None:
    loss, data = CASES[case], _data()
    per_sample = func.vmap(
        func.grad_and_value(loss, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0, 0, None)
    )(data["weight"], data["bias"], data["hidden"], data["target"], data["t_hidden"], data)
    (g_w, g_b, g_h), value = per_sample
    for i in range(B):
        want = _eager(loss, data, i)
        for got, ref in zip((value[i], g_w[i], g_b[i], g_h[i]), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert not g_w[2].any()  # sample 2 counts no row
    assert not g_h[2].any()


@pytest.mark.parametrize("case", ["ce-smoothing-zloss", "log-probs-temperature-entropy", "distill"])
def test_grad_equals_autograd(case: str) -> None:
    """torch.func.grad (one transform, no vmap) w.r.t. a subset of the inputs."""
    loss, data = CASES[case], _data(1)
    args = (data["weight"], data["bias"], data["hidden"][0], data["target"][0])
    g_w, g_h = func.grad(loss, argnums=(0, 2))(*args, data["t_hidden"][0], data)
    _, want_w, _, want_h = _eager(loss, data, 0)
    torch.testing.assert_close(g_w, want_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_h, want_h, rtol=1e-12, atol=1e-14)


ROWS: dict[str, Callable[..., Any]] = {
    "ce": lambda h, w, y, th, tw: linear_cross_entropy(h, w, y, reduction="none", z_loss=0.1),
    "log-probs": lambda h, w, y, th, tw: torch.stack(
        linear_log_probs(h, w, y, temperature=0.8, return_entropy=True)
    ),
    "distill": lambda h, w, y, th, tw: linear_distillation_loss(
        h, w, th, tw, y, beta=0.4, reduction="none"
    ),
}


@pytest.mark.parametrize("case", sorted(ROWS))
def test_jacrev_of_per_row_losses_equals_autograd_rows(case: str) -> None:
    data = _data(2)
    w, h, y = data["weight"], data["hidden"][0], data["target"][0]
    const = (y, data["t_hidden"][0], data["t_weight"])
    jac = func.jacrev(lambda h: ROWS[case](h, w, *const))(h)
    hr = h.clone().requires_grad_()
    rows = ROWS[case](hr, w, *const).reshape(-1)
    want = [torch.autograd.grad(rows[r], hr, retain_graph=True)[0] for r in range(rows.numel())]
    torch.testing.assert_close(jac.reshape(-1, N, D), torch.stack(want), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "case", ["ce", "ce-none-shift", "log-probs-temperature-entropy", "distill"]
)
def test_second_derivative_under_torch_func_raises(case: str) -> None:
    loss, data = CASES[case], _data()
    args = (data["weight"], data["bias"], data["hidden"][0], data["target"][0])
    rest = (data["t_hidden"][0], data)

    def grad_norm(w: Any, b: Any, h: Any, y: Any, th: Any, extra: Any) -> Any:
        return func.grad(loss, argnums=2)(w, b, h, y, th, extra).square().sum()

    with pytest.raises(RuntimeError, match="no second derivative"):
        func.grad(grad_norm)(*args, *rest)
    with pytest.raises(RuntimeError, match="no second derivative"):
        func.jacrev(func.grad(loss, argnums=2), argnums=2)(*args, *rest)


# torch's forward-mode AD loads its decompositions with torch.jit.script once (deprecated)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("case", ["ce", "log-probs-temperature-entropy", "distill"])
def test_forward_mode_raises(case: str) -> None:
    loss, data = CASES[case], _data()
    args = (data["weight"], data["bias"], data["hidden"][0], data["target"][0])
    rest = (data["t_hidden"][0], data)
    with pytest.raises(RuntimeError, match="has no forward-mode derivative"):
        func.jacfwd(loss, argnums=2)(*args, *rest)
    with pytest.raises(RuntimeError, match=r"crossent\.fused\.linear_\w+ has no"):
        func.hessian(loss, argnums=2)(*args, *rest)


def test_parameters_per_sample_then_backward_raises() -> None:
    """A weight that requires grad (an nn.Parameter): exact per-sample gradients, no second."""
    data = _data(3)
    w = torch.nn.Parameter(data["weight"].clone())
    h, y = data["hidden"], data["target"]
    per_sample = func.vmap(
        func.grad(lambda w, h, y: linear_cross_entropy(h, w, y)), in_dims=(None, 0, 0)
    )(w, h, y)
    loop = [torch.autograd.grad(linear_cross_entropy(h[i], w, y[i]), w)[0] for i in range(B)]
    torch.testing.assert_close(per_sample.detach(), torch.stack(loop), rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="no second derivative"):
        per_sample.square().sum().backward()


def test_vmap_without_grad_equals_a_loop() -> None:
    data = _data(4)
    w, h, y = data["weight"], data["hidden"], data["target"]
    lp, ent = func.vmap(
        lambda h, y: linear_log_probs(h, w, y, temperature=1.5, return_entropy=True),
        in_dims=(1, 1),
    )(h, y)
    for j in range(N):
        want_lp, want_ent = linear_log_probs(
            h[:, j], w, y[:, j], temperature=1.5, return_entropy=True
        )
        torch.testing.assert_close(lp[j], want_lp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ent[j], want_ent, rtol=1e-12, atol=1e-14)


def test_vocabulary_slices_refuse_torch_func() -> None:
    """The vocabulary-parallel paths (a VocabShard; one process here) raise a clear error."""
    from crossent.fused._chunked import LinearCEOptions, VocabShard
    from crossent.fused._function import run_linear_ce
    from crossent.fused._logprobs import LogProbOptions, run_log_probs

    data = _data()
    w, h, y = data["weight"], data["hidden"][0], data["target"][0]
    shard = VocabShard(0, V, lambda t: t, lambda t: t)
    ce_opts = LinearCEOptions(-100, 0.0, 0.0, None, "mean", None)
    lp_opts = LogProbOptions(-100, 1.0, None, False, None)
    assert float(run_linear_ce(h, w, y, None, None, ce_opts, shard)) > 0  # eagerly: works
    calls = [
        lambda w: run_linear_ce(h, w, y, None, None, ce_opts, shard),
        lambda w: run_log_probs(h, w, y, None, lp_opts, shard)[0].sum(),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"does not support torch\.func\.grad \(nor any"):
            func.grad(call)(w)
        with pytest.raises(RuntimeError, match=r"does not support torch\.func\.vmap \(nor any"):
            func.vmap(call)(w[None])


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmap_grad_over_no_samples_gives_empty_per_sample_results(case: str) -> None:
    """A batch of 0 samples gives empty per-sample values and gradients (it raised
    torch's "cannot reshape tensor of 0 elements into shape [0, -1, 5]")."""
    loss, data = CASES[case], _data()
    (g_w, g_b, g_h), value = func.vmap(
        func.grad_and_value(loss, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0, 0, None)
    )(
        data["weight"],
        data["bias"],
        data["hidden"][:0],
        data["target"][:0],
        data["t_hidden"][:0],
        data,
    )
    assert value.shape == (0,)
    assert g_w.shape == (0, V, D)
    assert g_b.shape == (0, V)
    assert g_h.shape == (0, N, D)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "case", ["ce", "ce-sum-softcap-class-weight", "log-probs-temperature-entropy", "distill"]
)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dual", ["hidden", "weight", "bias"])
def test_dual_tensors_raise_the_forward_mode_error(
    case: str, requires_grad: bool, dual: str
) -> None:
    """``torch.autograd.forward_ad`` dual tensors, eagerly: the chunk loop's ``out=`` products
    have no forward derivative ('Trying to use forward AD with mm_out that does not support
    it because it is an out= function'), and with a gradient wanted the autograd Function has
    no jvp ('You must implement the jvp function'); now torch.func's message, naming the
    function."""
    import torch.autograd.forward_ad as fwad

    loss, data = CASES[case], _data()
    with fwad.dual_level():
        tensors = {
            "weight": data["weight"].clone().requires_grad_(requires_grad),
            "bias": data["bias"].clone().requires_grad_(requires_grad),
            "hidden": data["hidden"][0].clone().requires_grad_(requires_grad),
        }
        tensors[dual] = fwad.make_dual(tensors[dual], torch.ones_like(tensors[dual]))
        args = (tensors["weight"], tensors["bias"], tensors["hidden"], data["target"][0])
        with pytest.raises(RuntimeError, match=r"crossent\.fused\.linear_\w+ has no forward-mode"):
            loss(*args, data["t_hidden"][0], data)


def test_a_forward_mode_level_alone_changes_nothing() -> None:
    """Inside ``dual_level`` but on plain tensors the fused loss runs as everywhere."""
    import torch.autograd.forward_ad as fwad

    data = _data()
    h, w, y = data["hidden"][0], data["weight"], data["target"][0]
    expected = linear_cross_entropy(h, w, y)
    with fwad.dual_level():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), expected, rtol=0, atol=0)


def test_a_class_weight_that_requires_grad_is_refused() -> None:
    """`class_weight` is a constant of the fused loss: one that requires a gradient got none,
    silently (``.grad`` stayed None; ``torch.func.grad`` over it returned zeros). PyTorch's
    ``F.cross_entropy`` raises for such a weight; so does the fused loss now, eagerly, under
    torch.func and for every reduction."""
    data = _data()
    h, w, y = data["hidden"][0], data["weight"], data["target"][0]
    cw = data["class_weight"].clone().requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        with pytest.raises(RuntimeError, match="`class_weight` requires a gradient"):
            linear_cross_entropy(h, w, y, class_weight=cw, reduction=reduction)
    with pytest.raises(RuntimeError, match="`class_weight` requires a gradient"):
        func.grad(lambda c: linear_cross_entropy(h, w, y, class_weight=c))(cw.detach())
    with torch.no_grad():  # no gradient taken: the weight is only a value
        expected = linear_cross_entropy(h, w, y, class_weight=cw.detach())
        torch.testing.assert_close(
            linear_cross_entropy(h, w, y, class_weight=cw), expected, rtol=0, atol=0
        )
