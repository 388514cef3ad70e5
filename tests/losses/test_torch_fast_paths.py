"""The PyTorch executor's own fast paths: exact BCE with logits, half-precision sparse CE,
categorical CE with its masked-class fallback, the option cache.

References are mpmath (50 digits) or float64 evaluated on the very inputs the fast
path sees; parity with PyTorch's kernels where they are exact.
"""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
from crossent._backends import _torch as torch_exec  # noqa: E402
from crossent._losses._options import make_options  # noqa: E402

# --------------------------------------------------------------------------- binary

LOGITS = [-100.0, -40.0, -30.0, -20.0, -5.0, -1.0, -1e-3, -0.0, 0.0, 1e-3, 1.0, 5.0, 20.0, 30.0,
          40.0, 100.0]  # fmt: skip
TARGETS = [0.0, 1.0, 0.25, 0.75, 1e-10, 1 - 2.0**-20]


def _grid(dtype: Any) -> tuple[Any, Any]:
    x, t = np.meshgrid(np.array(LOGITS), np.array(TARGETS), indexing="ij")
    return torch.tensor(x.ravel(), dtype=dtype), torch.tensor(t.ravel(), dtype=dtype)


def _mp_bce(x: float, t: float) -> tuple[float, float, float]:
    """(loss, gradient, scale of the gradient's two terms) at 50 digits."""
    with mpmath.workdps(50):
        mx, mt = mpmath.mpf(x), mpmath.mpf(t)
        sp_pos = mpmath.log1p(mpmath.exp(mx))  # -log(1 - p)
        sp_neg = mpmath.log1p(mpmath.exp(-mx))  # -log p
        s_pos, s_neg = 1 / (1 + mpmath.exp(-mx)), 1 / (1 + mpmath.exp(mx))
        loss = (1 - mt) * sp_pos + mt * sp_neg
        grad = (1 - mt) * s_pos - mt * s_neg
        return float(loss), float(grad), float(max((1 - mt) * s_pos, mt * s_neg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("copies", [1, 700])  # one chunk (autograd) / the chunked closed form
def test_binary_with_logits_is_exact_in_the_tails(dtype: Any, copies: int) -> None:
    x1, t1 = _grid(dtype)
    x, t = x1.repeat(copies), t1.repeat(copies)
    assert (x.numel() > torch_exec._BINARY_CHUNK) == (copies > 1)
    assert torch_exec.binary(x, t, None, None, 0.0, make_options(from_logits=True)) is not None
    xg = x.clone().requires_grad_(True)
    loss = ce.binary_cross_entropy(xg, t, from_logits=True, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    loss = loss.detach()
    eps = torch.finfo(dtype).eps
    # below the smallest normal number PyTorch's sigmoid (the chunked path's one
    # transcendental) flushes to 0: e^-100 in float32
    tiny = torch.finfo(dtype).tiny
    refs = [_mp_bce(xi, ti) for xi, ti in zip(x1.tolist(), t1.tolist(), strict=True)] * copies
    want = torch.tensor([r[0] for r in refs], dtype=torch.float64)
    want_g = torch.tensor([r[1] for r in refs], dtype=torch.float64)
    g_scale = torch.tensor([r[2] for r in refs], dtype=torch.float64)
    err = (loss.double() - want).abs()
    assert (err <= 4 * eps * want.abs() + tiny).all(), x[err.argmax()]
    # the gradient's two terms may cancel (soft targets): error relative to the terms;
    # PyTorch's sigmoid flushes results below the smallest normal number to 0
    err_g = (grad.double() - want_g).abs()
    assert (err_g <= 4 * eps * g_scale + torch.finfo(dtype).tiny).all(), x[err_g.argmax()]


def test_binary_small_losses_keep_their_value() -> None:
    """x = -30, t = 0 in float32: 9.4e-14 (PyTorch's kernel rounds it to 0)."""
    x, t = torch.tensor([-30.0, 30.0]), torch.tensor([0.0, 1.0])
    got = ce.binary_cross_entropy(x, t, from_logits=True, reduction="none")
    np.testing.assert_allclose(got.numpy(), [9.357623e-14, 9.357623e-14], rtol=1e-6)
    assert float(F.binary_cross_entropy_with_logits(x[:1], t[:1])) == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("rows", [7, 2000, 30000])  # small path / one chunk / several, one partial
def test_binary_with_logits_matches_torch(reduction: str, smoothing: float, rows: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.rand(rows, 5, generator=g, dtype=torch.float64)
    t[0] = (t[0] > 0.5).double()
    t.requires_grad_(True)
    up = torch.rand(rows, 5, generator=g, dtype=torch.float64) if reduction == "none" else 0.7
    ours = ce.binary_cross_entropy(
        x, t, from_logits=True, label_smoothing=smoothing, reduction=reduction
    )
    ref = F.binary_cross_entropy_with_logits(
        x, t * (1 - smoothing) + smoothing / 2, reduction=reduction
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    g_ours = torch.autograd.grad((ours * up).sum(), (x, t), create_graph=True)
    g_ref = torch.autograd.grad((ref * up).sum(), (x, t), create_graph=True)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)
    # second derivatives (the backward's differentiable form)
    v = torch.rand(rows, 5, generator=g, dtype=torch.float64)
    h_ours = torch.autograd.grad((g_ours[0] * v).sum(), x)
    h_ref = torch.autograd.grad((g_ref[0] * v).sum(), x)
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-10, atol=1e-14)
    plain = torch.autograd.grad(
        (ce.binary_cross_entropy(x, t, from_logits=True, label_smoothing=smoothing,
                                 reduction=reduction) * up).sum(), x,
    )  # fmt: skip
    torch.testing.assert_close(plain[0], g_ref[0], rtol=1e-12, atol=1e-14)


def test_binary_half_precision_is_float64_rounded_once() -> None:
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(300, 300, generator=g) * 4).bfloat16().requires_grad_(True)
    t = (torch.rand(300, 300, generator=g) > 0.5).bfloat16()
    loss = ce.binary_cross_entropy(x, t, from_logits=True, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(x64, t.double(), reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    assert _ulps(loss, ref.to(torch.bfloat16), torch.bfloat16) == 0
    assert _ulps(grad, ref_grad.to(torch.bfloat16), torch.bfloat16) == 0


def test_binary_double_backward() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b: ce.binary_cross_entropy(a, b, from_logits=True), (x, t)
    )


def test_binary_infinite_logits_and_nan() -> None:
    x = torch.tensor([-np.inf, np.inf, -np.inf, 1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    loss = ce.binary_cross_entropy(x, t, from_logits=True, reduction="none")
    assert loss[:2].tolist() == [0.0, 0.0]
    assert loss[2] == np.inf
    (grad,) = torch.autograd.grad(loss[:2].sum() + loss[3], x)
    assert torch.isfinite(grad).all()
    nan = ce.binary_cross_entropy(torch.tensor([np.nan, 0.0]), torch.tensor([1.0, 0.0]),
                                  from_logits=True)  # fmt: skip
    assert torch.isnan(nan)


def test_binary_target_check_names_the_argument() -> None:
    with pytest.raises(ValueError, match="`target` must lie in \\[0, 1\\]"):
        ce.binary_cross_entropy(torch.zeros(3), torch.tensor([0.0, 1.5, 1.0]), from_logits=True)
    # NaN targets are not an error: they propagate
    out = ce.binary_cross_entropy(torch.zeros(2), torch.tensor([np.nan, 1.0]), from_logits=True)
    assert torch.isnan(out)


# weights, pos_weight and alpha enter the exact paths as the masses P = w·α·pw·t and
# N = w·(1-α)·(1-t): loss P·sp(-x) + N·sp(x), gradient N·σ(x) - P·σ(-x)

W_COLS = [0.5, 1.0, 2.0, 0.0]
PW_COLS = [3.0, 0.25, 1.0, 0.0]


def _mp_weighted(x: float, t: float, w: float, pw: float, alpha: float | None) -> tuple[float, ...]:
    """(loss, gradient, scale of the gradient's two terms) at 50 digits."""
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    with mpmath.workdps(50):
        mx, mt = mpmath.mpf(x), mpmath.mpf(t)
        big_p, big_n = w * a_pos * pw * mt, w * a_neg * (1 - mt)
        sp_pos, sp_neg = mpmath.log1p(mpmath.exp(mx)), mpmath.log1p(mpmath.exp(-mx))
        s_pos, s_neg = 1 / (1 + mpmath.exp(-mx)), 1 / (1 + mpmath.exp(mx))
        loss = big_p * sp_neg + big_n * sp_pos
        grad = big_n * s_pos - big_p * s_neg
        return float(loss), float(grad), float(max(big_n * s_pos, big_p * s_neg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("copies", [1, 700])  # autograd of softplus / the chunked closed form
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_binary_weighted_is_exact_in_the_tails(dtype: Any, copies: int, alpha: Any) -> None:
    x1, t1 = _grid(dtype)
    x1, t1 = x1.reshape(-1, 4), t1.reshape(-1, 4)
    x, t = x1.repeat(copies, 1), t1.repeat(copies, 1)
    w, pw = torch.tensor(W_COLS, dtype=dtype), torch.tensor(PW_COLS, dtype=dtype)
    opts = make_options(from_logits=True, alpha=alpha)
    assert torch_exec.binary(x, t, w, pw, 0.0, opts) is not None  # no generic fallback
    xg = x.clone().requires_grad_(True)
    loss = ce.binary_cross_entropy(
        xg, t, from_logits=True, weight=w, pos_weight=pw, alpha=alpha, reduction="none"
    )
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    flat = zip(x1.reshape(-1).tolist(), t1.reshape(-1).tolist(), strict=True)
    refs = [
        _mp_weighted(xi, ti, W_COLS[j % 4], PW_COLS[j % 4], alpha)
        for j, (xi, ti) in enumerate(flat)
    ] * copies
    want = torch.tensor([r[0] for r in refs], dtype=torch.float64).reshape(x.shape)
    want_g = torch.tensor([r[1] for r in refs], dtype=torch.float64).reshape(x.shape)
    g_scale = torch.tensor([r[2] for r in refs], dtype=torch.float64).reshape(x.shape)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    err = (loss.detach().double() - want).abs()
    assert (err <= 8 * eps * want + 4 * tiny).all(), (x[err == err.max()], err.max())
    err_g = (grad.double() - want_g).abs()
    assert (err_g <= 8 * eps * g_scale + 4 * tiny).all(), x[err_g == err_g.max()]


def test_binary_extreme_logits_with_weights() -> None:
    """|x| = 1e4 (sp(x) = x exactly), ±inf through the guarded generic formula."""
    x = torch.tensor([1e4, -1e4, 1e4, -1e4, np.inf, -np.inf, np.inf, -np.inf], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.25])
    pw = torch.tensor(2.0)
    loss = ce.binary_cross_entropy(x, t, from_logits=True, pos_weight=pw, reduction="none")
    assert loss.tolist() == [1e4, 2e4, 0.0, 0.0, 0.0, 0.0, np.inf, np.inf]
    (grad,) = torch.autograd.grad(loss[:6].sum(), x)
    assert grad.tolist() == [1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


_WEIGHT_SHAPES = {
    "per-label": lambda n, c: (torch.rand(c) + 0.5, torch.rand(c) * 3),
    "per-row": lambda n, c: (torch.rand(n, 1) + 0.5, torch.rand(n, 1) * 3),
    "full": lambda n, c: (torch.rand(n, c) + 0.5, torch.rand(n, c) * 3),
    "numbers": lambda n, c: (0.7, 2.5),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ["per-label", "per-row", "full", "numbers"])
@pytest.mark.parametrize("rows", [7, 2000, 20000])  # small path / one chunk / two, one partial
def test_binary_weighted_matches_torch(reduction: str, shape: str, rows: int) -> None:
    torch.manual_seed(4)
    w, pw = _WEIGHT_SHAPES[shape](rows, 5)
    w64 = w.double() if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.float64)
    pw64 = pw.double() if isinstance(pw, torch.Tensor) else torch.tensor(pw, dtype=torch.float64)
    x = (torch.randn(rows, 5, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.rand(rows, 5, dtype=torch.float64)
    t[0] = (t[0] > 0.5).double()
    t.requires_grad_(True)
    up = torch.rand(rows, 5, dtype=torch.float64) if reduction == "none" else 0.7
    weight = w64 if isinstance(w, torch.Tensor) else w
    pos_weight = pw64 if isinstance(pw, torch.Tensor) else pw
    ours = ce.binary_cross_entropy(
        x, t, from_logits=True, weight=weight, pos_weight=pos_weight, reduction=reduction
    )
    ref = F.binary_cross_entropy_with_logits(x, t, weight=w64, pos_weight=pw64, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    g_ours = torch.autograd.grad((ours * up).sum(), (x, t), create_graph=True)
    g_ref = torch.autograd.grad((ref * up).sum(), (x, t), create_graph=True)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-11, atol=1e-14)
    v = torch.rand(rows, 5, dtype=torch.float64)
    h_ours = torch.autograd.grad((g_ours[0] * v).sum(), x)
    h_ref = torch.autograd.grad((g_ref[0] * v).sum(), x)
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-10, atol=1e-14)
    # the first-order backward (the forward's early gradient for reduced losses)
    plain = ce.binary_cross_entropy(
        x, t.detach(), from_logits=True, weight=weight, pos_weight=pos_weight,
        reduction=reduction,
    )  # fmt: skip
    (g_plain,) = torch.autograd.grad((plain * up).sum(), x)
    torch.testing.assert_close(g_plain, g_ref[0], rtol=1e-12, atol=1e-14)
    # a second backward through the same graph recomputes it
    plain = ce.binary_cross_entropy(x, t.detach(), from_logits=True, weight=weight,
                                    pos_weight=pos_weight, reduction=reduction)  # fmt: skip
    first = torch.autograd.grad((plain * up).sum(), x, retain_graph=True)[0]
    again = torch.autograd.grad((plain * up).sum() * 2, x)[0]
    torch.testing.assert_close(again, 2 * first, rtol=1e-12, atol=1e-14)


def test_binary_weighted_double_backward() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    pw = torch.rand(3, generator=g, dtype=torch.float64) * 3
    assert torch.autograd.gradgradcheck(
        lambda a, b: ce.binary_cross_entropy(
            a, b, from_logits=True, weight=w, pos_weight=pw, alpha=0.3, label_smoothing=0.1
        ),
        (x, t),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": 0.7}, {"pos_weight": "tensor"}, {"alpha": 0.3, "label_smoothing": 0.1}],
)
def test_binary_small_path_double_backward(reduction: str, options: dict[str, Any]) -> None:
    """The one-node small path (targets without a gradient): exact second derivatives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 3, generator=g, dtype=torch.float64)
    t[0] = (t[0] > 0.5).double()
    if options.get("pos_weight") == "tensor":
        options = {"pos_weight": torch.rand(3, generator=g, dtype=torch.float64) * 3}
    assert x.numel() <= torch_exec._BINARY_SMALL
    fn = lambda a: ce.binary_cross_entropy(  # noqa: E731
        a, t, from_logits=True, reduction=reduction, **options
    )
    assert type(fn(x).grad_fn).__name__ == "_BinarySmallBackward"
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def _aten_ops(fn: Any) -> list[str]:
    """The aten operations `fn` runs (forward and backward), in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", ["", "weight", "pos_weight", "both", "alpha"])
def test_binary_small_path_bits_and_kernels(dtype: Any, reduction: str, weighted: str) -> None:
    r"""The small path computes :math:`\operatorname{lerp}(n\,\mathrm{sp}(x), p\,\mathrm{sp}(-x),
    t)` from ``softplus`` of x and of -x (the negation shared with the gradient's
    :math:`\sigma(-x)`): the bits of the formula written out in float64-free torch operations,
    values and gradients, and one kernel fewer than the negated form it replaced (11 with the
    gradient, 12 before)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 7, generator=g, dtype=torch.float64) * 20).to(dtype)
    x[0, :3] = torch.tensor([-120.0, 120.0, 0.0], dtype=dtype)  # underflowing softplus, exact 0
    t = torch.rand(9, 7, generator=g, dtype=torch.float64).to(dtype)
    t[1] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 1.0], dtype=dtype)
    w = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    kw: dict[str, Any] = {
        "": {}, "weight": {"weight": w}, "pos_weight": {"pos_weight": w},
        "both": {"weight": w, "pos_weight": w.flip(0)}, "alpha": {"alpha": 0.3},
    }[weighted]  # fmt: skip
    xc = x.float() if dtype == torch.bfloat16 else x
    tc = t.float() if dtype == torch.bfloat16 else t
    wc = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    one = torch.ones((), dtype=xc.dtype)
    pw, ww, a = wc.get("pos_weight", one), wc.get("weight", one), wc.get("alpha")
    pos, neg = ww * pw * (a if a is not None else 1.0), ww * (1.0 - a if a is not None else 1.0)
    sp = torch.nn.functional.softplus
    ell = torch.lerp(neg * sp(xc, 1, 40.0), pos * sp(-xc, 1, 40.0), tc)
    want = {"none": ell, "sum": ell.sum(), "mean": ell.sum() / ell.numel()}[reduction]
    sig = torch.lerp(neg * torch.sigmoid(xc), -(pos * torch.sigmoid(-xc)), tc)
    want_grad = sig / sig.numel() if reduction == "mean" else sig
    xg = x.clone().requires_grad_(True)
    out = ce.binary_cross_entropy(xg, t, from_logits=True, reduction=reduction, **kw)
    if weighted in ("", "alpha"):  # (products of factors in another order: a rounding apart)
        assert torch.equal(out.detach(), want.to(dtype))
    else:
        torch.testing.assert_close(out.detach(), want.to(dtype), rtol=2e-7, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), xg)
    if weighted in ("", "alpha") and reduction != "none":
        assert torch.equal(grad, want_grad.to(dtype))
    else:
        torch.testing.assert_close(grad, want_grad.to(dtype), rtol=4e-7, atol=0)
    if weighted == "" and reduction == "mean" and dtype == torch.float32:
        xg = x.clone().requires_grad_(True)
        ops = _aten_ops(lambda: ce.binary_cross_entropy(xg, t, from_logits=True).backward())
        math_ops = [o for o in ops if o not in ("aminmax", "_local_scalar_dense", "ones_like",
                                                "detach", "empty", "fill_")]  # fmt: skip
        assert math_ops == ["neg", "softplus", "softplus", "lerp_", "sum", "div_", "sigmoid",
                            "sigmoid", "neg_", "lerp_", "div_"], ops  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_binary_empty_input(reduction: str, grad: bool) -> None:
    """No element: 0 for "mean" and "sum" (no division by zero), an empty "none"."""
    x = torch.empty(0, 3, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        loss = ce.binary_cross_entropy(x, torch.empty(0, 3), from_logits=True, reduction=reduction)
    assert loss.shape == ((0, 3) if reduction == "none" else ())
    assert loss.sum().item() == 0.0
    if grad:
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == (0, 3)


def test_binary_small_path_accepts_negative_zero_targets() -> None:
    """-0.0 is a target of 0 (the small path's float range check lets it through)."""
    x = torch.tensor([[-3.0, 2.0, 0.5]])
    t = torch.tensor([[-0.0, 1.0, 0.0]])
    opts = make_options(from_logits=True)
    got = torch_exec.binary(x, t, None, None, 0.0, opts)
    assert got is not None
    assert float(got) == float(ce.binary_cross_entropy(x, t.abs(), from_logits=True))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [20, 40, 300])  # _BinarySmall / one chunk / several chunks
def test_binary_half_precision_weighted_rounded_once(weighted: bool, n: int) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(n, 300, generator=g) * 4).bfloat16().requires_grad_(True)
    t = (torch.rand(n, 300, generator=g) > 0.5).bfloat16()
    w = (torch.rand(300, generator=g) + 0.5).bfloat16() if weighted else None
    pw = (torch.rand(300, generator=g) * 3).bfloat16() if weighted else None
    loss = ce.binary_cross_entropy(x, t, from_logits=True, weight=w, pos_weight=pw,
                                   reduction="none")  # fmt: skip
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(
        x64, t.double(), reduction="none",
        weight=None if w is None else w.double(), pos_weight=None if pw is None else pw.double(),
    )  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    # float32 arithmetic, one rounding to bfloat16: at most one unit where the float64 value
    # lies within float32 rounding of a bfloat16 tie (never without weights)
    limit = 1.0 if weighted else 0.0
    assert _ulps(loss, ref.to(torch.bfloat16), torch.bfloat16) <= limit
    assert _ulps(grad, ref_grad.to(torch.bfloat16), torch.bfloat16) <= limit
    mean = ce.binary_cross_entropy(x, t, from_logits=True, weight=w, pos_weight=pw)
    assert mean.dtype == torch.bfloat16
    assert _ulps(mean, ref.mean().to(torch.bfloat16), torch.bfloat16) <= 1.0


def test_binary_large_rows_and_broadcast_weights() -> None:
    """Rows longer than a chunk are split again; weights broadcast from any dimension."""
    g = torch.Generator().manual_seed(8)
    c = torch_exec._BINARY_CHUNK + 3000
    x = (torch.randn(2, 3, c, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    t = torch.rand(2, 3, c, generator=g, dtype=torch.float64)
    w = torch.rand(2, 1, 1, generator=g, dtype=torch.float64) + 0.5
    pw = torch.rand(3, c, generator=g, dtype=torch.float64) * 2
    for reduction in ("mean", "none"):
        ours = ce.binary_cross_entropy(x, t, from_logits=True, weight=w, pos_weight=pw,
                                       reduction=reduction)  # fmt: skip
        ref = F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw,
                                                 reduction=reduction)  # fmt: skip
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
        up = torch.rand_like(x) if reduction == "none" else 1.0
        torch.testing.assert_close(
            torch.autograd.grad((ours * up).sum(), x)[0],
            torch.autograd.grad((ref * up).sum(), x)[0], rtol=1e-12, atol=1e-15,
        )  # fmt: skip


@pytest.mark.parametrize("n", [10, 30000])
def test_binary_target_check_on_every_path(n: int) -> None:
    x, t = torch.zeros(n, 3), torch.full((n, 3), 0.5)
    for bad in (1.5, -0.25):
        t2 = t.clone()
        t2[n // 2, 1] = bad
        with pytest.raises(ValueError, match="`target` must lie in \\[0, 1\\]"):
            ce.binary_cross_entropy(x, t2, from_logits=True, pos_weight=torch.ones(3))
    # -0.0 is a valid target (the fast check hands it to the generic one); 1.0 too
    t2 = t.clone()
    t2[0, 0], t2[0, 1] = -0.0, 1.0
    ref = F.binary_cross_entropy_with_logits(x, t2)
    torch.testing.assert_close(ce.binary_cross_entropy(x, t2, from_logits=True), ref)
    with pytest.raises(ValueError, match="`pos_weight` must be non-negative"):
        ce.binary_cross_entropy(x, t, from_logits=True, pos_weight=-torch.ones(3))
    with pytest.raises(ValueError, match="`weight` must be non-negative"):
        ce.binary_cross_entropy(x, t, from_logits=True, weight=-1.0)


def test_binary_weights_requiring_grad_take_autograd() -> None:
    x = torch.randn(50, 4, dtype=torch.float64)
    t = torch.rand(50, 4, dtype=torch.float64)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    pw = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    ours = ce.binary_cross_entropy(x, t, from_logits=True, weight=w, pos_weight=pw)
    # PyTorch's kernel does not differentiate its weights: the formula in float64
    ref = (w * (pw * t * -F.logsigmoid(x) + (1 - t) * -F.logsigmoid(-x))).mean()
    torch.testing.assert_close(
        torch.autograd.grad(ours, (w, pw)), torch.autograd.grad(ref, (w, pw)), rtol=1e-12, atol=0
    )


def test_binary_workspace_in_and_out_of_inference_mode() -> None:
    """The chunk buffers made in inference mode serve later calls outside it."""
    import threading

    x = torch.randn(3 * torch_exec._BINARY_CHUNK // 2 + 7, dtype=torch.float64)
    t = torch.rand(x.shape, dtype=torch.float64)
    ref = F.binary_cross_entropy_with_logits(x, t)
    got = []

    def run() -> None:  # a fresh thread: its first call makes its buffers
        with torch.inference_mode():
            got.append(ce.binary_cross_entropy(x, t, from_logits=True))
        xg = x.clone().requires_grad_(True)
        loss = ce.binary_cross_entropy(xg, t, from_logits=True, reduction="none")
        loss.sum().backward()
        got.append(loss.mean())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(got) == 2
    for value in got:
        torch.testing.assert_close(value, ref, rtol=1e-13, atol=0)


def test_binary_workspace_is_per_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(9)
    cases = [(torch.randn(3 * torch_exec._BINARY_CHUNK // 2, generator=g),
              torch.rand(3 * torch_exec._BINARY_CHUNK // 2, generator=g)) for _ in range(4)]  # fmt: skip

    def run(case: tuple[Any, Any]) -> Any:
        return ce.binary_cross_entropy(*case, from_logits=True, reduction="none")

    want = [run(c) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, ref in zip(pool.map(run, cases), want, strict=True):
                torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_binary_many_ragged_chunks_then_the_default_chunk(monkeypatch: Any) -> None:
    """Chunks of 1000 elements (a ragged last one, weights by rows and columns) against the
    float64 formula, then the default chunk in the same thread: its workspace is keyed by
    the chunk size read at the call (a workspace made for small chunks once served the
    default one: a traceback)."""
    import threading

    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 250, generator=g, dtype=torch.float64) * 8
    t = torch.rand(37, 250, generator=g, dtype=torch.float64)
    w = torch.rand(37, 1, generator=g, dtype=torch.float64) + 0.5
    pw = torch.rand(250, generator=g, dtype=torch.float64) + 0.5
    sp = torch.nn.functional.softplus
    ref = (w * (pw * t * -F.logsigmoid(x) + (1 - t) * sp(x, threshold=40))).mean()
    ref_grad = w * ((1 - t) * torch.sigmoid(x) - pw * t * torch.sigmoid(-x)) / x.numel()
    big = torch.randn(2 * 65536 + 5, generator=g, dtype=torch.float64)
    got: list[Any] = []

    def run() -> None:
        monkeypatch.setattr(torch_exec, "_BINARY_CHUNK", 1000)
        xg = x.clone().requires_grad_(True)
        loss = ce.binary_cross_entropy(xg, t, weight=w, pos_weight=pw, from_logits=True)
        got.extend((loss, torch.autograd.grad(loss, xg)[0]))
        monkeypatch.undo()
        got.append(ce.binary_cross_entropy(big, torch.ones_like(big), from_logits=True))

    thread = threading.Thread(target=run)  # a thread of its own: a fresh workspace
    thread.start()
    thread.join()
    assert len(got) == 3
    torch.testing.assert_close(got[0], ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], ref_grad, rtol=1e-12, atol=1e-20)
    torch.testing.assert_close(got[2], -F.logsigmoid(big).mean(), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- half precision sparse


def _half_case(dtype: Any, n: int = 2100, c: int = 64, seed: int = 3) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 4).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[::9] = -100
    return x, y


def _ulps(a: Any, b: Any, dtype: Any) -> float:
    """Largest difference in units of `dtype`'s rounding at the reference's magnitude."""
    a, b = a.detach().double(), b.detach().double()
    spacing = torch.finfo(dtype).eps * b.abs().clamp_min(torch.finfo(dtype).tiny)
    return float(((a - b).abs() / spacing).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", [1.0, 0.3])
@pytest.mark.parametrize("scratch", [None, 64 * 90])  # one chunk / 23 of 90 rows and one of 30
def test_half_sparse_is_float64_rounded_once(
    dtype: Any, reduction: str, upstream: float, scratch: int | None, monkeypatch: Any
) -> None:
    if scratch:
        monkeypatch.setattr(torch_exec, "_LOW_SCRATCH", scratch)
    x, y = _half_case(dtype)
    assert x.numel() >= torch_exec._LOW_MIN_SPARSE  # the chunked path
    xg = x.clone().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(
        xg, y, from_logits=True, ignore_index=-100, reduction=reduction
    )
    (grad,) = torch.autograd.grad(loss.sum() * upstream, xg)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, ignore_index=-100, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum() * upstream, x64)
    assert loss.dtype == dtype
    assert grad.dtype == dtype
    # the loss: float64's value rounded once (half an ulp; ties may round either way)
    assert _ulps(loss, ref.to(dtype).double(), dtype) == 0
    # the gradient: within one rounding of float64's (PyTorch's own half-precision kernel is
    # off by |log p| roundings)
    assert _ulps(grad, ref_grad, dtype) <= 1.0
    pt = torch.autograd.grad(F.cross_entropy(xg, y, ignore_index=-100, reduction=reduction).sum()
                             * upstream, xg)[0]  # fmt: skip
    assert _ulps(pt, ref_grad, dtype) > 1.0  # the test sees the difference


def test_half_sparse_second_backward_after_an_in_place_change_of_grad() -> None:
    """The gradient computed with the forward is handed out once, never reused."""
    x, y = _half_case(torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(xg, y, from_logits=True, ignore_index=-100)
    loss.backward(retain_graph=True)
    first = xg.grad.clone()
    xg.grad.mul_(100.0)  # e.g. in-place clipping or scaling between the two calls
    xg.grad = None
    loss.backward()
    torch.testing.assert_close(xg.grad, first, rtol=0, atol=0)


def test_binary_half_precision_under_autocast_is_float32() -> None:
    x = torch.randn(300, 300).bfloat16()
    t = (torch.rand(300, 300) > 0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ce.binary_cross_entropy(x, t, from_logits=True)
    assert out.dtype == torch.float32
    assert ce.binary_cross_entropy(x, t, from_logits=True).dtype == torch.bfloat16


def test_half_sparse_double_backward() -> None:
    x, y = _half_case(torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    loss = ce.sparse_categorical_cross_entropy(xg, y, from_logits=True, ignore_index=-100)
    (grad,) = torch.autograd.grad(loss, xg, create_graph=True)
    (hv,) = torch.autograd.grad((grad.float() * v).sum(), xg)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, ignore_index=-100)
    (g64,) = torch.autograd.grad(ref, x64, create_graph=True)
    (hv64,) = torch.autograd.grad((g64 * v.double()).sum(), x64)
    torch.testing.assert_close(hv.double(), hv64, rtol=0.02, atol=2e-5)


def test_half_sparse_labels_and_empty_mean() -> None:
    x, y = _half_case(torch.bfloat16)
    bad = y.clone()
    bad[5] = 64
    with pytest.raises(ValueError, match="`target` has labels outside \\[0, 64\\)"):
        ce.sparse_categorical_cross_entropy(x, bad, from_logits=True, ignore_index=-100)
    xg = x.clone().requires_grad_(True)
    none = torch.full_like(y, -100)
    loss = ce.sparse_categorical_cross_entropy(xg, none, from_logits=True, ignore_index=-100)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert not xg.grad.any()
    short = ce.sparse_categorical_cross_entropy(x, y.to(torch.int16), from_logits=True,
                                                ignore_index=-100)  # fmt: skip
    assert short == ce.sparse_categorical_cross_entropy(x, y, from_logits=True, ignore_index=-100)


# --------------------------------------------------------------------------- categorical


def test_categorical_masked_class_falls_back_to_the_guarded_product() -> None:
    x = torch.tensor([[0.0, -np.inf, 1.0], [2.0, 0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]], dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        loss = ce.categorical_cross_entropy(xg, t, from_logits=True, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        keep = torch.isfinite(x)
        ref_rows = -(t * torch.where(keep, torch.log_softmax(x, -1), 0.0)).sum(-1)
        want = {"none": ref_rows, "sum": ref_rows.sum(), "mean": ref_rows.mean()}[reduction]
        torch.testing.assert_close(loss, want)
        assert torch.isfinite(grad).all()
        assert grad[0, 1] == 0
    nan = ce.categorical_cross_entropy(torch.tensor([[np.nan, 0.0]]), torch.tensor([[0.5, 0.5]]),
                                       from_logits=True)  # fmt: skip
    assert torch.isnan(nan)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_categorical_matches_torch(requires_grad: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    t = torch.softmax(torch.randn(9, 6, generator=g, dtype=torch.float64), -1)
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    for kwargs in ({}, {"label_smoothing": 0.1}, {"weight": w}):
        ours = ce.categorical_cross_entropy(x, t, from_logits=True, **kwargs)
        torch.testing.assert_close(ours, F.cross_entropy(x, t, **kwargs))


# --------------------------------------------------------------------------- options


def test_option_cache_does_not_take_a_bool_for_a_number() -> None:
    make_options(from_logits=True, gamma=1)
    with pytest.raises(TypeError, match="`gamma`"):
        make_options(from_logits=True, gamma=True)
    assert make_options(from_logits=True).plain
    assert not make_options(from_logits=True, z_loss=1e-4).plain
    assert not make_options(from_logits=True, gamma=2.0).plain


@pytest.mark.parametrize("changed", ["weight", "pos_weight"])
def test_binary_weights_changed_in_place_before_backward_are_an_error(changed: str) -> None:
    """The small BCE path kept the weight / pos_weight tensors outside the saved tensors and
    backward of "none" recomputes from them: one changed since forward gave another gradient;
    F.binary_cross_entropy_with_logits raises, as a changed input does."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, 5, generator=g, dtype=torch.float64)
    coef = {changed: torch.rand(5, generator=g, dtype=torch.float64) + 0.5}
    loss = ce.binary_cross_entropy(x, t, from_logits=True, reduction="none", **coef)
    with torch.no_grad():
        coef[changed].mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss.sum(), [x])
