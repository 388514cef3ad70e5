"""crossent.fused.linear_log_probs against the float64 reference and torch's log_softmax + gather."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from crossent.fused import linear_log_probs as _linear_log_probs  # noqa: E402
from tests._reference.fused import linear_log_probs_ref  # noqa: E402

# untyped alias: the bad-input tests pass wrong types on purpose
linear_log_probs: Any = _linear_log_probs

N, D, V = 37, 9, 103  # odd shapes: ragged last chunk


def _inputs(n: int = N, d: int = D, v: int = V, *, seed: int = 0, ignored: bool = True) -> Any:
    gen = torch.Generator().manual_seed(seed)
    out = {
        "hidden": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "weight": torch.randn(v, d, generator=gen, dtype=torch.float64) * (2.0 / d**0.5),
        "bias": torch.randn(v, generator=gen, dtype=torch.float64) * 0.5,
        "target": torch.randint(0, v, (n,), generator=gen),
        "g_lp": torch.randn(n, generator=gen, dtype=torch.float64),
        "g_ent": torch.randn(n, generator=gen, dtype=torch.float64),
    }
    if ignored:
        out["target"][::5] = -100
    return out


def _ours(data: Any, *, bias: bool, upstream: str, dtype: Any = None, **opts: Any) -> tuple:
    """(log_probs, entropy, grads of hidden/weight/bias) through autograd, fresh leaves."""
    dt = dtype or torch.float64
    h = data["hidden"].to(dt).clone().requires_grad_()
    w = data["weight"].to(dt).clone().requires_grad_()
    b = data["bias"].to(dt).clone().requires_grad_() if bias else None
    entropy = upstream != "log_probs"
    out = linear_log_probs(h, w, data["target"], bias=b, return_entropy=entropy, **opts)
    lp, ent = out if entropy else (out, None)
    total = (lp * data["g_lp"].to(lp.dtype)).sum() if upstream != "entropy" else 0.0
    if ent is not None:
        total = total + (ent * data["g_ent"].to(ent.dtype)).sum()
    leaves = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(total, leaves)
    return lp.detach(), None if ent is None else ent.detach(), *grads


def _ref(data: Any, *, bias: bool, upstream: str, **opts: Any) -> tuple:
    opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    lp, ent, gh, gw, gb = linear_log_probs_ref(
        data["hidden"].numpy(),
        data["weight"].numpy(),
        data["target"].numpy(),
        bias=data["bias"].numpy() if bias else None,
        grad_log_probs=None if upstream == "entropy" else data["g_lp"].numpy(),
        grad_entropy=None if upstream == "log_probs" else data["g_ent"].numpy(),
        **opts,
    )
    return lp, ent, gh, gw, gb


def _close(got: Any, want: Any, *, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=rtol, atol=atol)


GRID = list(
    itertools.product(
        [False, True],  # bias
        [1.0, 0.6],  # temperature
        [None, 3.0],  # softcap
        ["log_probs", "entropy", "both"],  # which outputs get an upstream gradient
    )
)


@pytest.mark.parametrize(("bias", "temperature", "softcap", "upstream"), GRID)
def test_values_and_grads_match_float64_reference(
    bias: bool, temperature: float, softcap: float | None, upstream: str
) -> None:
    data = _inputs()
    opts = {"temperature": temperature, "softcap": softcap, "chunk_size": 8}
    got = _ours(data, bias=bias, upstream=upstream, **opts)
    want = _ref(data, bias=bias, upstream=upstream, **opts)
    _close(got[0], want[0])
    if got[1] is not None:
        _close(got[1], want[1])
    for g, w in zip(got[2:], want[2:], strict=False):
        _close(g, w)


def test_matches_torch_log_softmax_gather_3d_with_shift() -> None:
    """shift=True on (B, T, d) == log_softmax(logits[:, :-1] / T).gather(target[:, 1:])."""
    data = _inputs(n=4 * 9)
    h = data["hidden"].reshape(4, 9, D).clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    y = data["target"].reshape(4, 9)
    lp, ent = linear_log_probs(
        h, w, y, shift=True, return_entropy=True, temperature=1.7, chunk_size=5
    )
    assert lp.shape == ent.shape == (4, 8)
    logp = torch.log_softmax(F.linear(h, w)[:, :-1] / 1.7, dim=-1)
    y_next = y[:, 1:]
    keep = y_next != -100
    ref_lp = logp.gather(-1, y_next.clamp(min=0)[..., None])[..., 0] * keep
    ref_ent = -(logp.exp() * logp).sum(-1) * keep
    torch.testing.assert_close(lp, ref_lp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-12)
    up_lp, up_ent = torch.randn(4, 8).double(), torch.randn(4, 8).double()
    g_ours = torch.autograd.grad((lp * up_lp).sum() + (ent * up_ent).sum(), [h, w])
    g_ref = torch.autograd.grad((ref_lp * up_lp).sum() + (ref_ent * up_ent).sum(), [h, w])
    for a, c in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert torch.equal(g_ours[0][:, -1], torch.zeros_like(g_ours[0][:, -1]))


def test_all_ignored_gives_zeros_and_zero_grads() -> None:
    data = _inputs(n=6)
    data["target"].fill_(-100)
    got = _ours(data, bias=True, upstream="both")
    for t in got:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_peaked_rows_finite_and_exact(dtype: str) -> None:
    """A logit 1e4 above the rest: log p = 0 or -1e4, entropy 0, finite gradients."""
    data = _inputs(n=4, d=3, v=7, ignored=False)
    data["hidden"][0] = torch.tensor([1e4, 0.0, 0.0], dtype=torch.float64)
    data["weight"][:, 0] = 0.0
    data["weight"][2, 0] = 1.0
    data["target"][0] = 2
    data["hidden"][1] = data["hidden"][0]
    data["target"][1] = 5
    got = _ours(data, bias=False, upstream="both", dtype=getattr(torch, dtype), chunk_size=3)
    want = _ref(data, bias=False, upstream="both")
    assert got[0][0].item() == 0.0
    assert got[0][1].item() == -1e4
    assert got[1][0].item() == 0.0
    for g, w in zip(got, want, strict=False):
        assert torch.isfinite(g).all()
        _close(g, w, rtol=2e-5, atol=1e-5)


def test_float32_within_float32_rounding() -> None:
    data = _inputs()
    opts = {"temperature": 0.8, "softcap": 5.0, "chunk_size": 16}
    got = _ours(data, bias=True, upstream="both", dtype=torch.float32, **opts)
    want = _ref(data, bias=True, upstream="both", **opts)
    for g, w in zip(got, want, strict=False):
        assert g.dtype == torch.float32
        _close(g, w, rtol=2e-5, atol=2e-6 * float(np.max(np.abs(w))))


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_low_precision_hidden_float32_weight(low: str) -> None:
    """float32 outputs, each gradient in its parameter's dtype, = the upcast-hidden result."""
    dt = getattr(torch, low)
    data = _inputs()
    h = data["hidden"].to(dt).requires_grad_()
    w = data["weight"].float().requires_grad_()
    lp, ent = linear_log_probs(h, w, data["target"], return_entropy=True, chunk_size=8)
    assert lp.dtype == ent.dtype == torch.float32
    gh, gw = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), [h, w])
    assert (gh.dtype, gw.dtype) == (dt, torch.float32)
    h32 = h.detach().float().requires_grad_()
    lp32, ent32 = linear_log_probs(h32, w, data["target"], return_entropy=True, chunk_size=8)
    gh32, gw32 = torch.autograd.grad(lp32.sum() + 0.1 * ent32.sum(), [h32, w])
    torch.testing.assert_close(lp, lp32)
    torch.testing.assert_close(ent, ent32)
    torch.testing.assert_close(gh, gh32.to(dt))
    torch.testing.assert_close(gw, gw32)


def test_bfloat16_no_worse_than_torch_same_dtype() -> None:
    data = _inputs(n=64, d=32, v=500)
    want = _ref(data, bias=False, upstream="both")
    ours = _ours(data, bias=False, upstream="both", dtype=torch.bfloat16)
    h = data["hidden"].bfloat16().requires_grad_()
    w = data["weight"].bfloat16().requires_grad_()
    logp = torch.log_softmax(h @ w.T, dim=-1)
    keep = data["target"] != -100
    lp = logp.gather(-1, data["target"].clamp(min=0)[:, None])[:, 0] * keep
    ent = -(logp.exp() * logp).sum(-1) * keep
    total = (lp * data["g_lp"].bfloat16()).sum() + (ent * data["g_ent"].bfloat16()).sum()
    theirs = (lp.detach(), ent.detach(), *torch.autograd.grad(total, [h, w]))
    for a, c, r in zip(ours, theirs, want, strict=False):
        err_ours = np.linalg.norm(a.double().numpy() - r)
        err_torch = np.linalg.norm(c.double().numpy() - r)
        assert err_ours <= 1.25 * err_torch + 1e-6 * np.linalg.norm(r), (err_ours, err_torch)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_classes_ruled_out_by_a_minus_inf_bias(dtype: str) -> None:
    """−inf logits: the same values and gradients as the head without those classes, 0 for them."""
    data = _inputs(n=11, ignored=False)
    out = torch.zeros(V, dtype=torch.bool)
    out[[3, 40, 41, 102]] = True
    data["target"][data["target"] == 3] = 4
    data["target"][(data["target"] == 40) | (data["target"] == 41) | (data["target"] == 102)] = 5
    data["bias"][out] = -torch.inf
    got = _ours(data, bias=True, upstream="both", dtype=getattr(torch, dtype), chunk_size=4)
    kept = {**data, "weight": data["weight"][~out], "bias": data["bias"][~out]}
    remap = torch.cumsum((~out).long(), 0) - 1
    kept["target"] = remap[data["target"]]
    want = _ref(kept, bias=True, upstream="both")
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}
    for g, w in zip(got[:3], want[:3], strict=True):
        _close(g, w, **tol)
    _close(got[3][~out], want[3], **tol)
    _close(got[4][~out], want[4], **tol)
    assert torch.equal(got[3][out], torch.zeros_like(got[3][out]))
    assert torch.equal(got[4][out], torch.zeros_like(got[4][out]))


def test_changing_the_returned_entropy_does_not_change_the_gradients() -> None:
    """backward uses the forward's entropy (not recomputed), from its own copy."""
    data = _inputs()
    h = data["hidden"].clone().requires_grad_()
    lp, ent = linear_log_probs(h, data["weight"], data["target"], return_entropy=True)
    total = (lp * data["g_lp"]).sum() + (ent * data["g_ent"]).sum()
    ent.mul_(0.0).add_(1e3)  # sum's and mul's backward do not need `ent`
    (grad,) = torch.autograd.grad(total, [h])
    _close(grad, _ref(data, bias=False, upstream="both")[2])


def test_gradcheck_float64() -> None:
    data = _inputs(n=7, d=3, v=6)
    y = data["target"]

    def f(h: Any, w: Any, b: Any) -> Any:
        lp, ent = linear_log_probs(
            h, w, y, bias=b, temperature=0.7, softcap=2.0, return_entropy=True, chunk_size=3
        )
        return lp, ent

    args = tuple(data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(f, args)


def test_no_grad_and_entropy_off() -> None:
    data = _inputs()
    with torch.no_grad():
        lp = linear_log_probs(
            data["hidden"].clone().requires_grad_(), data["weight"], data["target"]
        )
    assert lp.grad_fn is None
    assert isinstance(lp, torch.Tensor)
    want = _ref(data, bias=False, upstream="log_probs")
    _close(lp, want[0])


def test_double_backward_raises() -> None:
    data = _inputs(n=5)
    h = data["hidden"].clone().requires_grad_()
    lp = linear_log_probs(h, data["weight"], data["target"])
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(lp.sum(), [h], create_graph=True)


def test_bad_input_messages() -> None:
    data = _inputs(n=4, d=3, v=5)
    h, w, y = data["hidden"], data["weight"], data["target"]
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: linear_log_probs(h, w, y, temperature=0.0), ValueError, "`temperature`"),
        (lambda: linear_log_probs(h, w, y, temperature=-1.0), ValueError, "`temperature`"),
        (lambda: linear_log_probs(h, w, y, temperature="1"), TypeError, "`temperature`"),
        (lambda: linear_log_probs(h, w, y, softcap=-1.0), ValueError, "`softcap`"),
        (lambda: linear_log_probs(h, w, y, return_entropy=1), TypeError, "`return_entropy`"),
        (lambda: linear_log_probs(h[0], w, y[0], shift=True), ValueError, "`hidden`"),
        (lambda: linear_log_probs(h, w[:, :2], y), ValueError, "`weight`"),
        (lambda: linear_log_probs(h, w, y[:2]), ValueError, "`target`"),
        (lambda: linear_log_probs(h, w, y + 7), ValueError, "`target`"),
        (lambda: linear_log_probs(h, w, y, bias=w[0]), ValueError, "`bias`"),
        (lambda: linear_log_probs(h, w, y, chunk_size=0), ValueError, "`chunk_size`"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


@pytest.mark.parametrize("temperature", [1e-9, 1e-11, 1e-36])
def test_entropy_gradient_at_a_tiny_temperature_equals_float64(temperature: float) -> None:
    """float32, T = 1e-36: the entropy's gradient p (a + b log p) floored log p at -1e4 and
    multiplied it by g_H / T (inf) before by p = 0: NaN for every hidden state, where the
    float64 gradient is finite (5e35 for a tied row)."""
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([1, 0])
    v = x.double().requires_grad_(True)
    lp = torch.log_softmax(v / temperature, -1)
    want_lp = lp.gather(1, y[:, None]).squeeze(1)
    want_ent = -(lp.exp() * lp).nan_to_num().sum(-1)
    (want_g,) = torch.autograd.grad((want_lp + 0.5 * want_ent).sum(), v)
    h = x.clone().requires_grad_(True)
    got_lp, got_ent = linear_log_probs(
        h, torch.eye(3), y, temperature=temperature, return_entropy=True
    )
    (g,) = torch.autograd.grad((got_lp + 0.5 * got_ent).sum(), h)
    torch.testing.assert_close(got_lp.double(), want_lp.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_ent.double(), want_ent.detach(), rtol=1e-6, atol=1e-6)
    scale = float(want_g.abs().max())
    torch.testing.assert_close(g.double(), want_g, rtol=1e-5, atol=1e-6 * scale)


def _confident(n: int = 24, d: int = 64, v: int = 300, *, seed: int = 3) -> Any:
    """Float64 data of float32 values whose rows put 1 - p_* from 1e-1 down to 1e-10 on one
    class: the target in most rows, another class in every fourth."""
    data = _inputs(n, d, v, seed=seed, ignored=False)
    w = data["weight"]
    top = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    boost = torch.linspace(4.0, 50.0, n, dtype=torch.float64)
    data["hidden"] += boost[:, None] * w[top] / (w[top] ** 2).sum(dim=1, keepdim=True)
    data["target"] = torch.where(torch.arange(n) % 4 == 3, (top + 1) % v, top)
    data["target"][5] = -100
    for k in ("hidden", "weight", "bias"):  # the float32 inputs exactly, in float64
        data[k] = data[k].float().double()
    return data


@pytest.mark.parametrize(
    ("temperature", "softcap", "upstream"),
    [(1.0, None, "both"), (0.7, None, "log_probs"), (1.3, 100.0, "entropy"), (1.0, 60.0, "both")],
)
def test_confident_rows_keep_float32_rounding(
    temperature: float, softcap: float | None, upstream: str
) -> None:
    """A row whose most probable class has p_* near 1 (RL's sampled tokens): log p_* is
    about -(1 - p_*), which log_softmax rounds at 1 (1 % off at 1 - p_* = 1e-5 in float32,
    0 below 6e-8), and the entropy and the gradient entry g (1 - p_*) with it (up to 4e-2
    of the row's gradient norm). Each row within 3e-5 of the float64 reference, relative to
    its own size: the float32 product's own rounding (logits near 50 from 64 terms) moves
    the gaps between logits, which 1 - p_* = e^(gap) turns into relative error, by 1e-5."""
    data = _confident()
    opts = {"temperature": temperature, "softcap": softcap, "chunk_size": 8}
    got = _ours(data, bias=True, upstream=upstream, dtype=torch.float32, **opts)
    want = _ref(data, bias=True, upstream=upstream, **opts)
    lp = got[0].double().numpy()
    q = -np.expm1(want[0][data["target"].numpy() >= 0])  # 1 - p_y
    assert q.min() < 1e-6  # the rows reach below float32's resolution of log p
    np.testing.assert_allclose(lp, want[0], rtol=3e-5, atol=0)
    if got[1] is not None:
        np.testing.assert_allclose(got[1].double().numpy(), want[1], rtol=3e-5, atol=0)
    g_h = got[2].double().numpy()  # row i of d/d hidden is row i's logit gradient times W
    err = np.linalg.norm(g_h - want[2], axis=1)
    assert (err <= 3e-5 * np.linalg.norm(want[2], axis=1)).all(), err / np.linalg.norm(want[2])
    for g, w in zip(got[3:], want[3:], strict=True):
        assert np.linalg.norm(g.double().numpy() - w) <= 3e-5 * np.linalg.norm(w)
