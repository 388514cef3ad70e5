"""crossent.fused.linear_distillation_loss against distillation_loss on materialized float64 logits."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
from crossent.fused import linear_distillation_loss as _fused  # noqa: E402
from tests._reference.distill import distill_grad_ref, distill_rows_ref  # noqa: E402

fused: Any = _fused  # untyped alias: the bad-input tests pass wrong types on purpose

N, D, DT, V = 29, 7, 11, 97  # teacher hidden size differs from the student's


def _inputs(n: int = N, *, seed: int = 0, dtype: Any = torch.float64) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Any:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    target = torch.randint(0, V, (n,), generator=gen)
    target[::4] = -100
    return {
        "hidden": randn(n, D),
        "weight": randn(V, D, scale=2.0 / D**0.5),
        "bias": randn(V, scale=0.5),
        "t_hidden": randn(n, DT),
        "t_weight": randn(V, DT, scale=2.5 / DT**0.5),
        "t_bias": randn(V, scale=0.5),
        "target": target,
        "up": randn(n),
    }


def _run(data: dict[str, Any], *, bias: bool, upstream: Any, **opts: Any) -> tuple[Any, ...]:
    """Loss and student gradients through autograd; teacher leaves require grad too."""
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_() if bias else None
    th = data["t_hidden"].clone().requires_grad_()
    tw = data["t_weight"].clone().requires_grad_()
    tb = data["t_bias"].clone().requires_grad_() if bias else None
    loss = fused(h, w, th, tw, data["target"], bias=b, teacher_bias=tb, **opts)
    loss.backward(upstream)
    assert th.grad is None
    assert tw.grad is None
    assert tb is None or tb.grad is None
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _reference(
    data: dict[str, Any], *, bias: bool, upstream: Any, beta: float, temperature: float, **kw: Any
) -> tuple[Any, ...]:
    """Float64 loss and gradients from the NumPy row reference and the chain rule."""
    h, w = data["hidden"].double().numpy(), data["weight"].double().numpy()
    s = h @ w.T + (data["bias"].double().numpy() if bias else 0.0)
    t = data["t_hidden"].double().numpy() @ data["t_weight"].double().numpy().T
    t = t + (data["t_bias"].double().numpy() if bias else 0.0)
    counted = data["target"].numpy() != -100
    rows = distill_rows_ref(s, t, beta=beta, temperature=temperature) * counted
    g = distill_grad_ref(s, t, beta=beta, temperature=temperature) * counted[:, None]
    reduction = kw.get("reduction", "mean")
    up = upstream.double().numpy()
    if reduction == "none":
        loss, g = rows, g * up[:, None]
    elif reduction == "sum":
        loss, g = rows.sum(), g * up
    else:
        loss, g = rows.sum() / counted.sum(), g * up / counted.sum()
    return loss, g @ w, g.T @ h, g.sum(0)


GRID = list(
    itertools.product(
        [0.0, 0.3, 1.0],  # beta
        [1.0, 2.0],  # temperature
        ["mean", "sum", "none"],
        [False, True],  # biases
    )
)


@pytest.mark.parametrize(("beta", "temperature", "reduction", "bias"), GRID)
def test_matches_float64_reference(beta: float, temperature: float, reduction: str, bias: bool):
    data = _inputs()
    up = data["up"] if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    opts = {"beta": beta, "temperature": temperature, "reduction": reduction}
    got = _run(data, bias=bias, upstream=up, chunk_size=6, **opts)
    want = _reference(data, bias=bias, upstream=up, **opts)
    for g, w in zip(got, want, strict=True):
        if g is None:
            continue
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-10, atol=1e-12)


def test_equals_distillation_loss_on_materialized_logits_with_shift() -> None:
    """(B, T, d) with shift=True == distillation_loss of positions 0..T-2 masked by target[:, 1:]."""
    data = _inputs(n=3 * 8)
    h = data["hidden"].reshape(3, 8, D).clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    th, tw = data["t_hidden"].reshape(3, 8, DT), data["t_weight"]
    y = data["target"].reshape(3, 8)
    for reduction in ("mean", "none"):
        ours = fused(h, w, th, tw, y, shift=True, beta=0.6, temperature=1.5, reduction=reduction)
        ref = ce.distillation_loss(
            (h @ w.T)[:, :-1],
            (th @ tw.T)[:, :-1],
            target=y[:, 1:],
            beta=0.6,
            temperature=1.5,
            reduction=reduction,
        )
        assert ours.shape == ref.shape
        up = torch.randn(ours.shape, dtype=torch.float64)
        g_ours = torch.autograd.grad(ours, [h, w], up)
        g_ref = torch.autograd.grad(ref, [h, w], up)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        for a, c in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_no_target_counts_every_position() -> None:
    data = _inputs()
    got = fused(data["hidden"], data["weight"], data["t_hidden"], data["t_weight"], beta=0.2)
    s = data["hidden"] @ data["weight"].T
    t = data["t_hidden"] @ data["t_weight"].T
    torch.testing.assert_close(got, ce.distillation_loss(s, t, beta=0.2))


def test_all_ignored_is_zero_with_zero_grads() -> None:
    data = _inputs(n=6)
    data["target"].fill_(-100)
    for reduction in ("mean", "sum", "none"):
        up = torch.ones(6, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
        got = _run(data, bias=True, upstream=up.double(), reduction=reduction)
        for x in got:
            assert torch.equal(x, torch.zeros_like(x))


def test_float32_and_mixed_precision() -> None:
    data = _inputs()
    want = _reference(data, bias=False, upstream=torch.tensor(1.0), beta=0.5, temperature=1.0)
    d32 = {k: (v.float() if v.is_floating_point() else v) for k, v in data.items()}
    got = _run(d32, bias=False, upstream=torch.tensor(1.0), chunk_size=8)
    for g, w in zip(got, want, strict=False):
        if g is None:
            continue
        assert g.dtype == torch.float32
        np.testing.assert_allclose(g.double().numpy(), w, rtol=2e-5, atol=2e-6 * np.abs(w).max())
    # bfloat16 hidden states (student and teacher) with float32 heads
    h = d32["hidden"].bfloat16().requires_grad_()
    w = d32["weight"].clone().requires_grad_()
    th = d32["t_hidden"].bfloat16()
    loss = fused(h, w, th, d32["t_weight"], d32["target"])
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert (gh.dtype, gw.dtype) == (torch.bfloat16, torch.float32)
    h32 = h.detach().float().requires_grad_()
    ref = fused(h32, w, th.float(), d32["t_weight"], d32["target"])
    gh32, gw32 = torch.autograd.grad(ref, [h32, w])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, gh32.bfloat16())
    torch.testing.assert_close(gw, gw32)


@pytest.mark.parametrize(
    ("student", "teacher"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
)
def test_student_and_teacher_of_different_dtypes(student: Any, teacher: Any) -> None:
    # The teacher's logits are computed in its own dtype and used in the student's compute
    # dtype (a float64 teacher with a float32 student used to raise inside torch.mm).
    data = _inputs()
    teacher_keys = ("t_hidden", "t_weight", "t_bias")
    cast = {k: v.to(teacher if k in teacher_keys else student) for k, v in data.items()}
    cast["target"] = data["target"]
    exact = {**cast, **{k: cast[k].double() for k in teacher_keys}}  # the teacher as rounded
    for reduction in ("mean", "none"):
        up = data["up"] if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
        want = _reference(
            exact, bias=True, upstream=up, beta=0.3, temperature=1.5, reduction=reduction
        )
        got = _run(
            cast, bias=True, upstream=up.to(student), beta=0.3, temperature=1.5,
            reduction=reduction, chunk_size=8,
        )  # fmt: skip
        assert got[0].dtype == student
        tol = 1e-5  # float32 rounding of the products
        for g, w in zip(got, want, strict=True):
            assert g.dtype == student
            np.testing.assert_allclose(g.numpy(), w, rtol=tol, atol=tol * np.abs(w).max())


def test_gradcheck_float64() -> None:
    data = _inputs(n=6)
    t_w, t_b = data["t_weight"][:13], data["t_bias"][:13]
    y = data["target"].clamp(max=12)

    def f(h: Any, w: Any, b: Any) -> Any:
        return fused(
            h,
            w,
            data["t_hidden"],
            t_w,
            y,
            bias=b,
            teacher_bias=t_b,
            beta=0.4,
            temperature=1.3,
            reduction="none",
            chunk_size=4,
        )

    leaves = (
        data["hidden"].clone().requires_grad_(),
        data["weight"][:13].clone().requires_grad_(),
        data["bias"][:13].clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(f, leaves)


def test_double_backward_raises() -> None:
    data = _inputs(n=5)
    h = data["hidden"].clone().requires_grad_()
    loss = fused(h, data["weight"], data["t_hidden"], data["t_weight"])
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, [h], create_graph=True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_teacher_changed_in_place_before_backward_is_an_error(reduction: str) -> None:
    """Backward recomputes from the teacher ("none", or a second backward of "mean"): it
    read a teacher changed since forward and gave another gradient (-0.0059 instead of
    -0.0176 for a zeroed teacher weight), where a changed student tensor raises."""
    data = _inputs(n=5)
    h = data["hidden"].clone().requires_grad_()
    for name in ("t_hidden", "t_weight", "t_bias"):
        teacher = {k: data[k].clone() for k in ("t_hidden", "t_weight", "t_bias")}
        loss = fused(
            h, data["weight"], teacher["t_hidden"], teacher["t_weight"],
            teacher_bias=teacher["t_bias"], reduction=reduction,
        )  # fmt: skip
        torch.autograd.grad(loss.sum(), [h], retain_graph=True)
        with torch.no_grad():
            teacher[name].mul_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss.sum(), [h])


def test_bad_input_messages() -> None:
    data = _inputs(n=4)
    h, w, th, tw, y = (data[k] for k in ("hidden", "weight", "t_hidden", "t_weight", "target"))
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: fused(h, w, th, tw, beta=-0.5), ValueError, "`beta`"),
        (lambda: fused(h, w, th, tw, beta=2.0), ValueError, "`beta`"),
        (lambda: fused(h, w, th, tw, temperature=0.0), ValueError, "`temperature`"),
        (lambda: fused(h, w, th, tw, temperature=-1.0), ValueError, "`temperature`"),
        (lambda: fused(h, w, th, tw[:-1]), ValueError, "vocabulary"),
        (lambda: fused(h, w, th, tw[:, :-1]), ValueError, "`teacher_weight`"),
        (lambda: fused(h, w[:, :-1], th, tw), ValueError, "`weight`"),
        (lambda: fused(h, w, th[:-1], tw), ValueError, "`teacher_hidden`"),
        (lambda: fused(h, w, th, tw, y[:-1]), ValueError, "`target`"),
        (lambda: fused(h, w, th, tw, y.double()), TypeError, "`target`"),
        (lambda: fused(h, w, th, tw, teacher_bias=w[0]), ValueError, "`teacher_bias`"),
        (lambda: fused(h, w, th, tw, reduction="avg"), ValueError, "`reduction`"),
        (lambda: fused(h[0], w, th[0], tw, shift=True), ValueError, "`hidden`"),
        (lambda: fused(h, w, th.numpy(), tw), TypeError, "`teacher_hidden`"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


@pytest.mark.parametrize(
    ("beta", "temperature"), [(0.0, 1e-20), (0.0, 1e-30), (0.5, 1e-20), (0.5, 1e-30), (1.0, 1e-10)]
)
def test_a_tiny_temperature_gives_the_float64_gradient(temperature: float, beta: float) -> None:
    """float32, T = 1e-20: the in-place divergence kept -max/4 for log(Q/M) where Q = 0 and
    multiplied it by 1/T before by Q, so 0 * -inf made the gradient NaN (the loss and the
    unfused loss's gradient, about 7e18, were right). (Cases whose float64 gradient fits
    in float32.)"""
    x = torch.tensor([[1.0, 2.0, -1.0, 0.25], [0.5, 0.5, 0.0, -3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0, 0.5], [0.0, 3.0, 0.0, 1.0]])
    eye = torch.eye(4)
    ref_x = x.double().requires_grad_(True)
    want = ce.distillation_loss(ref_x, t.double(), beta=beta, temperature=temperature)
    (want_g,) = torch.autograd.grad(want, ref_x)
    h = x.clone().requires_grad_(True)
    got = _fused(h, eye, t, eye, beta=beta, temperature=temperature)
    (g,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-6 * float(want_g.abs().max()))


def test_infinite_reverse_kl_gives_the_limit_gradient_for_the_logits() -> None:
    """β = 1, the student gives mass to a class the teacher's bias rules out (−inf): the loss
    is +inf and the logits' gradient (here the bias's, one row) the limit ±inf of
    ``value_and_grad``, never NaN; it was NaN for every class."""
    gen = torch.Generator().manual_seed(3)
    h, th = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    w, tw = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    bias = torch.tensor([0.0, 0.5, -torch.inf, 0.0, 0.0], requires_grad=True)
    for t_bias in ([0.0, -torch.inf, 0.0, 0.0, 0.0], [-torch.inf, -torch.inf, 0.0, 0.0, 0.0]):
        tb = torch.tensor(t_bias)
        bias.grad = None
        loss = fused(h, w, th, tw, bias=bias, teacher_bias=tb, beta=1.0, reduction="sum")
        loss.backward()
        _, want = ce.value_and_grad(
            ce.distillation_loss, h @ w.T + bias.detach(), th @ tw.T + tb, beta=1.0,
            reduction="sum",
        )  # fmt: skip
        assert loss.item() == torch.inf
        assert not bias.grad.isnan().any()
        torch.testing.assert_close(bias.grad, want[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [1e-6, 1e-3])
def test_float32_gradient_of_a_small_beta(beta: float) -> None:
    """float32 at a small beta: log(Q/M) is of the size of beta but was formed from two
    log-probabilities rounded at their own size; the hidden gradient was off by 1.3e-2 of
    its norm at beta=1e-6 (4.5e-5 at 1e-3), the unfused loss's autodiff by 3.5e-7."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(24, 16, generator=gen)
    w = torch.randn(300, 16, generator=gen) * 0.5
    th = torch.randn(24, 16, generator=gen)
    tw = torch.randn(300, 16, generator=gen) * 0.5
    ref_h = h.double().requires_grad_(True)
    s64, t64 = ref_h @ w.double().T, th.double() @ tw.double().T
    want = torch.from_numpy(distill_grad_ref(s64.detach().numpy(), t64.numpy(), beta=beta))
    (want_g,) = torch.autograd.grad(s64, ref_h, want / 24)
    hh = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_fused(hh, w, th, tw, beta=beta, chunk_size=7), hh)
    err = float((g.double() - want_g).norm() / want_g.norm())
    assert err < 1e-6, err


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_close_rows_with_a_row_upstream_gradient(beta: float) -> None:
    """reduction="none" with a per-row upstream gradient (the backward recomputes with each
    row's factor) and a teacher 1e-5 from the student: the rows are computed a second time
    in the block's work space as float64, their factors picked per row; the gradient within
    1e-6 of its norm of float64's (2e-2 to 1e-1 summed from the float32 log-probabilities).
    Several chunks and blocks (chunk_size=8)."""
    g = torch.Generator().manual_seed(0)
    n, v = 40, 300
    t = torch.randn(n, v, generator=g) * 3
    s = t + 1e-5 * torch.randn(n, v, generator=g)
    up = torch.rand(n, generator=g)
    ref = distill_grad_ref(s.double().numpy(), t.double().numpy(), beta=beta)
    want = ref * up.double().numpy()[:, None]
    h = s.clone().requires_grad_()
    eye = torch.eye(v)
    rows = _fused(h, eye, t, eye, beta=beta, reduction="none", chunk_size=8)
    np.testing.assert_allclose(
        rows.detach().double().numpy(), distill_rows_ref(s.double(), t.double(), beta=beta),
        rtol=1e-3,
    )  # fmt: skip
    rows.backward(up)
    assert h.grad is not None
    err = np.linalg.norm(h.grad.double().numpy() - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < 1e-6, err.max()
