"""binary_cross_entropy: PyTorch / torchvision / Keras parity, accuracy, laws, closed form."""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import pytest
from array_api_extra.testing import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent as ce
from crossent._losses._binary import _binary_value_and_grad
from tests._reference import binary as ref
from tests.conftest import to_numpy, to_xp

REDUCTIONS = ("mean", "sum", "none")
SHAPE = (3, 4)
TOL = {"float32": (2e-6, 1e-7), "float64": (1e-12, 1e-14)}  # (rtol, atol)


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.uniform(size=SHAPE)
    target[0] = (target[0] > 0.5).astype(np.float64)  # hard and soft targets together
    target[1, :2] = [0.0, 1.0]
    return {
        "logits": rng.normal(size=SHAPE) * 3.0,
        "probs": rng.uniform(0.02, 0.98, size=SHAPE),
        "target": target,
        "weight": rng.uniform(0.0, 2.0, size=SHAPE),
        "weight_row": rng.uniform(0.5, 2.0, size=(SHAPE[0], 1)),
        "pos_weight": rng.uniform(0.5, 3.0, size=(SHAPE[1],)),
    }


def _options(kind: str, data: dict[str, np.ndarray], conv: Any) -> dict[str, Any]:
    """Named option sets; arrays converted by `conv`."""
    sets: dict[str, dict[str, Any]] = {
        "plain": {},
        "weight": {"weight": data["weight"]},
        "weight_row": {"weight": data["weight_row"]},
        "pos_weight": {"pos_weight": data["pos_weight"]},
        "both": {"weight": data["weight"], "pos_weight": data["pos_weight"]},
        "smoothing": {"label_smoothing": 0.1},
        "focal": {"gamma": 2.0},
        "focal_half_alpha": {"gamma": 0.5, "alpha": 0.25},
        "alpha": {"alpha": 0.75},
        "everything": {
            "gamma": 1.5,
            "alpha": 0.4,
            "label_smoothing": 0.2,
            "weight": data["weight"],
            "pos_weight": data["pos_weight"],
        },
    }
    return {k: (conv(v) if isinstance(v, np.ndarray) else v) for k, v in sets[kind].items()}


def _input(data: dict[str, np.ndarray], from_logits: bool) -> np.ndarray:
    return data["logits"] if from_logits else data["probs"]


def _xp_dtype(xp: Any, name: str) -> Any:
    return getattr(xp, name)


# ----------------------------------------------------------------------------
# PyTorch parity: values and autograd gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("from_logits", "kind"),
    [
        (True, "plain"),
        (True, "weight"),
        (True, "weight_row"),
        (True, "pos_weight"),
        (True, "both"),
        (False, "plain"),
        (False, "weight"),
        (False, "weight_row"),
    ],
)
def test_matches_torch(xp: Any, dtype: str, reduction: str, from_logits: bool, kind: str) -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    data = _data()
    tdt = getattr(torch, dtype)
    x_t = torch.tensor(_input(data, from_logits), dtype=tdt, requires_grad=True)
    t_t = torch.tensor(data["target"], dtype=tdt)
    opts_t = _options(kind, data, lambda a: torch.tensor(a, dtype=tdt))
    if from_logits:
        want = F.binary_cross_entropy_with_logits(x_t, t_t, reduction=reduction, **opts_t)
    else:
        want = F.binary_cross_entropy(x_t, t_t, reduction=reduction, **opts_t)
    upstream = torch.tensor(np.random.default_rng(1).normal(size=want.shape), dtype=tdt)
    (want_grad,) = torch.autograd.grad(want, x_t, upstream)

    conv = to_xp(xp)
    x = conv(_input(data, from_logits), _xp_dtype(xp, dtype))
    t = conv(data["target"], _xp_dtype(xp, dtype))
    opts = _options(kind, data, lambda a: conv(a, _xp_dtype(xp, dtype)))
    got = ce.binary_cross_entropy(x, t, from_logits=from_logits, reduction=reduction, **opts)
    value, grad = _binary_value_and_grad(x, t, from_logits=from_logits, reduction=reduction, **opts)
    rtol, atol = TOL[dtype]
    want_np = want.detach().numpy()
    assert_close(got, conv(want_np), rtol=rtol, atol=atol)
    assert_close(value, conv(want_np), rtol=rtol, atol=atol)
    up = conv(upstream.numpy())
    assert_close(up * grad, conv(want_grad.numpy()), rtol=rtol, atol=atol)

    if xp.__name__.endswith("torch"):  # autograd of our own forward agrees too
        x_ours = x.detach().clone().requires_grad_(True)
        ours = ce.binary_cross_entropy(
            x_ours, t, from_logits=from_logits, reduction=reduction, **opts
        )
        (ours_grad,) = torch.autograd.grad(ours, x_ours, upstream)
        torch.testing.assert_close(ours_grad, want_grad, rtol=rtol, atol=atol)


def test_clamp_value_matches_torch() -> None:
    """Probabilities of exactly 0 and 1 give PyTorch's finite clamped loss of 100."""
    torch = pytest.importorskip("torch")
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-45, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.25], dtype=torch.float64)
    for reduction in REDUCTIONS:
        want = torch.nn.functional.binary_cross_entropy(p, t, reduction=reduction)
        got = ce.binary_cross_entropy(p, t, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------
# Every option: float64 reference and the closed form against autograd
# ----------------------------------------------------------------------------

ALL_KINDS = (
    "plain",
    "weight",
    "pos_weight",
    "smoothing",
    "focal",
    "focal_half_alpha",
    "alpha",
    "everything",
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_all_options_match_reference_and_autograd(
    xp: Any, kind: str, from_logits: bool, reduction: str
) -> None:
    torch = pytest.importorskip("torch")
    data = _data(2)
    x_np = _input(data, from_logits).copy()
    if not from_logits:
        x_np[2, :3] = [0.0, 1.0, 1e-300]  # the clamp: PyTorch's finite loss, zero gradient
    conv = to_xp(xp)
    opts_np = _options(kind, data, lambda a: a)
    want = ref.binary_cross_entropy(
        x_np, data["target"], from_logits=from_logits, reduction=reduction, **opts_np
    )
    opts = _options(kind, data, conv)
    x, t = conv(x_np), conv(data["target"])
    got = ce.binary_cross_entropy(x, t, from_logits=from_logits, reduction=reduction, **opts)
    assert_close(got, conv(want), rtol=1e-12, atol=1e-14)

    # the closed form on this backend == torch autograd of the forward pass
    x_t = torch.tensor(x_np, requires_grad=True)
    opts_t = _options(kind, data, torch.tensor)
    loss_t = ce.binary_cross_entropy(
        x_t, torch.tensor(data["target"]), from_logits=from_logits, reduction=reduction, **opts_t
    )
    upstream = torch.ones_like(loss_t)
    (auto,) = torch.autograd.grad(loss_t, x_t, upstream)
    value, grad = _binary_value_and_grad(x, t, from_logits=from_logits, reduction=reduction, **opts)
    assert_close(value, conv(want), rtol=1e-12, atol=1e-14)
    assert_close(grad, conv(auto.numpy()), rtol=1e-12, atol=1e-14)
    assert np.isfinite(to_numpy(grad)).all()


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("kind", ["plain", "everything", "focal_half_alpha"])
def test_closed_form_matches_finite_differences(kind: str, from_logits: bool) -> None:
    data = _data(3)
    x = _input(data, from_logits).copy()
    opts = _options(kind, data, lambda a: a)
    _, grad = _binary_value_and_grad(x, data["target"], from_logits=from_logits, **opts)
    h = 1e-6
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += h
        lo[idx] -= h
        f_hi = ce.binary_cross_entropy(hi, data["target"], from_logits=from_logits, **opts)
        f_lo = ce.binary_cross_entropy(lo, data["target"], from_logits=from_logits, **opts)
        fd[idx] = (f_hi - f_lo) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# Focal loss: torchvision's and Keras' formulas, written out
# ----------------------------------------------------------------------------


def _torchvision_sigmoid_focal_loss(
    inputs: Any, targets: Any, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Any:
    """torchvision.ops.sigmoid_focal_loss, verbatim (torchvision is not installable here)."""
    import torch

    p = torch.sigmoid(inputs)
    ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        inputs, targets, reduction="none"
    )
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (0.5, -1.0), (3.0, 0.6), (0.0, 0.25)])
def test_focal_matches_torchvision(gamma: float, alpha: float, reduction: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(5, 3)) * 3, requires_grad=True)
    t = torch.tensor((rng.uniform(size=(5, 3)) > 0.6).astype(np.float64))
    want = _torchvision_sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    a = None if alpha < 0 else alpha
    got = ce.binary_cross_entropy(x, t, from_logits=True, gamma=gamma, alpha=a, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    upstream = torch.tensor(rng.normal(size=want.shape))
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)
    _, closed = _binary_value_and_grad(
        x.detach(), t, from_logits=True, gamma=gamma, alpha=a, reduction=reduction
    )
    torch.testing.assert_close(upstream * closed, want_grad, rtol=1e-10, atol=1e-14)


def _keras_binary_focal(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    gamma: float,
    alpha: float | None,
    from_logits: bool,
) -> np.ndarray:
    """keras.losses.binary_focal_crossentropy, elementwise (before its mean over the last axis)."""
    if from_logits:
        x = y_pred
        bce = np.maximum(x, 0) - x * y_true + np.log1p(np.exp(-np.abs(x)))
        p = 1 / (1 + np.exp(-x))
    else:
        p = np.clip(y_pred, 1e-7, 1 - 1e-7)  # inactive for the inputs below
        bce = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    p_t = y_true * p + (1 - y_true) * (1 - p)
    loss = (1 - p_t) ** gamma * bce
    if alpha is not None:  # apply_class_balancing=True
        loss = (y_true * alpha + (1 - y_true) * (1 - alpha)) * loss
    return loss


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, None), (2.0, 0.25), (0.7, 0.9)])
def test_focal_matches_keras(xp: Any, gamma: float, alpha: float | None, from_logits: bool) -> None:
    rng = np.random.default_rng(5)
    y_pred = rng.normal(size=(4, 3)) * 2 if from_logits else rng.uniform(0.01, 0.99, size=(4, 3))
    y_true = (rng.uniform(size=(4, 3)) > 0.5).astype(np.float64)
    want = _keras_binary_focal(y_true, y_pred, gamma=gamma, alpha=alpha, from_logits=from_logits)
    conv = to_xp(xp)
    got = ce.binary_cross_entropy(
        conv(y_pred),
        conv(y_true),
        from_logits=from_logits,
        gamma=gamma,
        alpha=alpha,
        reduction="none",
    )
    assert_close(got, conv(want), rtol=1e-12, atol=1e-15)


@settings(max_examples=30)
@given(
    t=st.floats(0.0, 1.0),
    x=st.floats(-40.0, 40.0),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
    alpha=st.sampled_from([None, 0.25]),
)
def test_soft_targets_are_the_expected_hard_target_loss(
    t: float, x: float, gamma: float, alpha: float | None
) -> None:
    """Soft target t: the focal loss of a hard label drawn with probability t (linear form)."""

    def loss(target: float) -> float:
        return float(
            ce.binary_cross_entropy(
                np.array([x]), np.array([target]), from_logits=True, gamma=gamma, alpha=alpha
            )
        )

    assert loss(t) == pytest.approx(t * loss(1.0) + (1 - t) * loss(0.0), rel=1e-12, abs=1e-300)


# ----------------------------------------------------------------------------
# Accuracy at extreme logits and probabilities (mpmath)
# ----------------------------------------------------------------------------

EXTREME_LOGITS = [-1e4, -100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0, 1e4]


def _mp_terms(x: float, t: float, gamma: float, *, from_logits: bool) -> tuple[Any, ...]:
    """(loss, |positive term|, |negative term|, log p, log(1-p)) at 60 digits."""
    u = mpmath.mpf(x)
    if from_logits:
        lp, lnp = -mpmath.log1p(mpmath.exp(-u)), -mpmath.log1p(mpmath.exp(u))
    else:
        lp, lnp = mpmath.log(u), mpmath.log1p(-u)
    t = mpmath.mpf(t)
    pos = -t * mpmath.exp(gamma * lnp) * lp
    neg = -(1 - t) * mpmath.exp(gamma * lp) * lnp
    return pos + neg, abs(pos), abs(neg), lp, lnp


def _mp_grad(x: float, t: float, gamma: float) -> tuple[float, float]:
    """d loss / d logit and the sum of its terms' magnitudes (its condition scale)."""
    u, t = mpmath.mpf(x), mpmath.mpf(t)
    lp, lnp = -mpmath.log1p(mpmath.exp(-u)), -mpmath.log1p(mpmath.exp(u))
    s_neg, s_pos = mpmath.exp(lnp), mpmath.exp(lp)  # σ(−x), σ(x)
    f_pos, f_neg = mpmath.exp(gamma * lnp), mpmath.exp(gamma * lp)
    terms = [
        -t * f_pos * s_neg,  # from log p
        t * gamma * f_pos * lp * s_pos,  # from (1 − p)^γ
        (1 - t) * f_neg * s_pos,  # from log(1 − p)
        -(1 - t) * gamma * f_neg * lnp * s_neg,  # from p^γ
    ]
    return float(mpmath.fsum(terms)), float(mpmath.fsum(abs(v) for v in terms))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_extreme_logits_within_a_few_ulps_of_mpmath(xp: Any, dtype: str, gamma: float) -> None:
    np_dtype = np.dtype(dtype)
    # subnormal results may flush to zero (XLA on CPU flushes denormals): absolute floor
    eps, tiny = float(np.finfo(np_dtype).eps), float(np.finfo(np_dtype).smallest_normal)
    xs, ts = np.meshgrid(np.array(EXTREME_LOGITS, np_dtype), np.array([0.0, 1.0, 0.3], np_dtype))
    conv = to_xp(xp)
    x, t = conv(xs.ravel()), conv(ts.ravel())
    got = to_numpy(
        ce.binary_cross_entropy(x, t, from_logits=True, gamma=gamma, reduction="none")
    ).astype(np.float64)
    _, grad = _binary_value_and_grad(x, t, from_logits=True, gamma=gamma, reduction="none")
    grad = to_numpy(grad).astype(np.float64)
    with mpmath.workdps(60):
        for i, (xi, ti) in enumerate(zip(xs.ravel(), ts.ravel(), strict=True)):
            want, pos, neg, lp, lnp = _mp_terms(float(xi), float(ti), gamma, from_logits=True)
            # exp(γ·log σ(∓x)) carries the error of γ·log σ(∓x), |γ log σ| ulps: the
            # focal terms are allowed that condition number; plain BCE gets 4 ulps.
            scale = pos * (1 + gamma * abs(lnp)) + neg * (1 + gamma * abs(lp))
            tol = 4 * eps * float(scale) + tiny
            assert abs(got[i] - float(want)) <= tol, (xi, ti, got[i], float(want))
            g_want, g_scale = _mp_grad(float(xi), float(ti), gamma)
            cond = 1 + gamma * float(abs(lp) + abs(lnp))
            g_tol = 4 * eps * g_scale * cond + tiny
            assert abs(grad[i] - g_want) <= g_tol, (xi, ti, grad[i], g_want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probabilities_within_a_few_ulps_of_mpmath(xp: Any, dtype: str) -> None:
    np_dtype = np.dtype(dtype)
    eps = float(np.finfo(np_dtype).eps)
    one_minus = np.nextafter(np_dtype.type(1), np_dtype.type(0))
    probs = np.array([1e-30, 1e-8, 0.3, 0.5, 0.9, one_minus], np_dtype)
    ps, ts = np.meshgrid(probs, np.array([0.0, 1.0, 0.3], np_dtype))
    conv = to_xp(xp)
    got = to_numpy(
        ce.binary_cross_entropy(conv(ps.ravel()), conv(ts.ravel()), reduction="none")
    ).astype(np.float64)
    with mpmath.workdps(60):
        for i, (pi, ti) in enumerate(zip(ps.ravel(), ts.ravel(), strict=True)):
            want, pos, neg, _, _ = _mp_terms(float(pi), float(ti), 0.0, from_logits=False)
            assert abs(got[i] - float(want)) <= 4 * eps * float(pos + neg), (pi, ti)


# ----------------------------------------------------------------------------
# Edges: 0 · log 0, infinite logits, saturated focal gradients, NaN, empty
# ----------------------------------------------------------------------------


def test_zero_log_zero_value_and_gradient_are_finite(xp: Any) -> None:
    conv = to_xp(xp)
    for gamma in (0.0, 0.5):
        probs, t = conv(np.array([0.0, 1.0])), conv(np.array([0.0, 1.0]))
        value, grad = _binary_value_and_grad(probs, t, gamma=gamma, reduction="sum")
        assert float(to_numpy(value)) == 0.0
        assert np.isfinite(to_numpy(grad)).all()
        logits = conv(np.array([-np.inf, np.inf, 3.0]))
        t3 = conv(np.array([0.0, 1.0, 1.0]))
        value, grad = _binary_value_and_grad(
            logits, t3, from_logits=True, gamma=gamma, reduction="none"
        )
        assert to_numpy(value)[:2].tolist() == [0.0, 0.0]
        assert to_numpy(grad)[:2].tolist() == [0.0, 0.0]
        # a positive target on an impossible event costs +inf
        bad = ce.binary_cross_entropy(
            conv(np.array([-np.inf])), conv(np.array([1.0])), from_logits=True, gamma=gamma
        )
        assert float(to_numpy(bad)) == np.inf


def test_autograd_finite_at_the_edges() -> None:
    torch = pytest.importorskip("torch")
    p = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    for gamma in (0.0, 0.5, 2.0):
        (g,) = torch.autograd.grad(ce.binary_cross_entropy(p, t, gamma=gamma), p)
        assert torch.isfinite(g).all()
        _, closed = _binary_value_and_grad(p.detach(), t, gamma=gamma)
        torch.testing.assert_close(closed, g, rtol=0, atol=0)
    x = torch.tensor([-np.inf, np.inf], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ce.binary_cross_entropy(x, t[:2], from_logits=True, gamma=0.5), x)
    assert g.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saturated_focal_gradients_are_finite(xp: Any, dtype: str) -> None:
    """Logits ±100, ±1e4 with gamma < 1: torchvision's ``(1 - p_t) ** gamma`` gives NaN here."""
    conv = to_xp(xp)
    xs = np.array([-1e4, -100.0, 100.0, 1e4] * 2)
    ts = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    x, t = conv(xs, _xp_dtype(xp, dtype)), conv(ts, _xp_dtype(xp, dtype))
    for reduction in REDUCTIONS:
        value, grad = _binary_value_and_grad(
            x, t, from_logits=True, gamma=0.5, alpha=0.25, reduction=reduction
        )
        assert np.isfinite(to_numpy(value)).all()
        assert np.isfinite(to_numpy(grad)).all()
    torch = pytest.importorskip("torch")
    xt = torch.tensor(xs, dtype=getattr(torch, dtype), requires_grad=True)
    tt = torch.tensor(ts, dtype=getattr(torch, dtype))
    loss = ce.binary_cross_entropy(xt, tt, from_logits=True, gamma=0.5, alpha=0.25)
    (g,) = torch.autograd.grad(loss, xt)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "options",
    [{"gamma": 2.0}, {"gamma": 0.5, "label_smoothing": 0.1}, {"gamma": 1.0, "alpha": 0.7}],
    ids=["focal", "focal-smooth", "focal-alpha"],
)
def test_focal_gradient_at_an_infinite_logit_is_the_limit(xp: Any, options: dict[str, Any]) -> None:
    """A positive target at a logit of -inf (a negative one at +inf): the loss is +inf, the
    gradient the finite limit -c_pos (c_neg at +inf). The focal factor's derivative there,
    -γ f p, met the infinite log p (0 · inf): NaN from value_and_grad and from autodiff
    (PyTorch, JAX, torch.func) for every γ > 0, where plain BCE gives the limit."""
    xs = np.array([-np.inf, np.inf, -np.inf, np.inf, 0.5])
    ts = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    eps, gamma = options.get("label_smoothing", 0.0), options["gamma"]
    t_eps = ts * (1 - eps) + eps / 2
    alpha = options.get("alpha")
    c_pos = t_eps if alpha is None else alpha * t_eps
    c_neg = 1 - t_eps if alpha is None else (1 - alpha) * (1 - t_eps)
    p = 1 / (1 + np.exp(-xs[4]))
    fp, fn = (1 - p) ** gamma, p**gamma
    expected = np.array(
        [
            -c_pos[0],
            c_neg[1],
            -c_pos[2],
            c_neg[3],
            -c_pos[4] * (fp * (1 - p) - gamma * fp * p * np.log(p))
            + c_neg[4] * (fn * p - gamma * fn * (1 - p) * np.log1p(-p)),
        ]
    )
    conv = to_xp(xp)
    x, t = conv(xs), conv(ts)
    value, grad = _binary_value_and_grad(x, t, from_logits=True, reduction="none", **options)
    losses = to_numpy(value)
    assert np.isinf(losses[:2]).all()
    np.testing.assert_allclose(to_numpy(grad), expected, rtol=1e-12, atol=1e-15)
    torch = pytest.importorskip("torch")
    xt = torch.tensor(xs, requires_grad=True)
    loss = ce.binary_cross_entropy(
        xt, torch.tensor(ts), from_logits=True, reduction="sum", **options
    )
    (g,) = torch.autograd.grad(loss, xt)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_nan_propagates(xp: Any) -> None:
    conv = to_xp(xp)
    x = conv(np.array([0.5, np.nan, 0.25]))
    t = conv(np.array([1.0, 0.0, 0.0]))
    w = conv(np.array([1.0, 0.0, 1.0]))  # a zero weight does not hide the NaN
    for from_logits in (True, False):
        per = to_numpy(
            ce.binary_cross_entropy(x, t, from_logits=from_logits, weight=w, reduction="none")
        )
        assert np.isnan(per[1])
        assert np.isfinite(per[[0, 2]]).all()
        assert np.isnan(to_numpy(ce.binary_cross_entropy(x, t, from_logits=from_logits)))
    t_nan = conv(np.array([1.0, np.nan, 0.0]))
    per = to_numpy(ce.binary_cross_entropy(t, t_nan, reduction="none"))
    assert np.isnan(per[1])


def test_empty_input(xp: Any) -> None:
    conv = to_xp(xp)
    x = conv(np.zeros((0, 3)))
    value, grad = _binary_value_and_grad(x, x, from_logits=True)
    assert float(to_numpy(value)) == 0.0
    assert tuple(grad.shape) == (0, 3)
    assert tuple(ce.binary_cross_entropy(x, x, reduction="none").shape) == (0, 3)


# ----------------------------------------------------------------------------
# Laws (hypothesis)
# ----------------------------------------------------------------------------


@st.composite
def _problem(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    floats = st.floats(-50.0, 50.0)
    return {
        "x": np.array(draw(st.lists(floats, min_size=n, max_size=n))),
        "t": np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))),
        "gamma": draw(st.sampled_from([0.0, 0.5, 2.0])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "alpha": draw(st.sampled_from([None, 0.5])),
    }


@settings(max_examples=20)
@given(problem=_problem())
def test_laws(xp: Any, problem: dict[str, Any]) -> None:
    conv = to_xp(xp)
    opts = {k: problem[k] for k in ("gamma", "label_smoothing", "alpha")}
    x, t = problem["x"], problem["t"]

    def loss(xv: np.ndarray, tv: np.ndarray, **kw: Any) -> np.ndarray:
        return to_numpy(ce.binary_cross_entropy(conv(xv), conv(tv), **{**opts, **kw}))

    per = loss(x, t, from_logits=True, reduction="none")
    assert (per >= 0).all()
    # (x, t) -> (-x, 1 - t) swaps the positive and the negative term (alpha 1/2 is symmetric)
    swapped = loss(-x, 1 - t, from_logits=True, reduction="none")
    np.testing.assert_allclose(swapped, per, rtol=1e-12, atol=1e-300)
    total = loss(x, t, from_logits=True, reduction="sum")
    mean = loss(x, t, from_logits=True, reduction="mean")
    np.testing.assert_allclose(mean, total / x.size, rtol=1e-12)
    p = 1 / (1 + np.exp(-x))
    assert (loss(p, t, reduction="none") >= 0).all()


# ----------------------------------------------------------------------------
# dtypes and backends
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_low_precision_returns_input_dtype(dtype_name: str, from_logits: bool) -> None:
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    data = _data(6)
    raw = np.concatenate([_input(data, from_logits).ravel(), [1e4, -1e4] if from_logits else []])
    tgt = np.concatenate([data["target"].ravel(), [1.0, 0.0] if from_logits else []])
    x, t = torch.tensor(raw).to(dtype), torch.tensor(tgt).to(dtype)
    opts = {"gamma": 0.5, "pos_weight": 2.0, "label_smoothing": 0.05}
    rtol = {"float16": 1e-3, "bfloat16": 8e-3}[dtype_name]
    want = ref.binary_cross_entropy(
        x.double().numpy(), t.double().numpy(), from_logits=from_logits, reduction="none", **opts
    )
    got = ce.binary_cross_entropy(x, t, from_logits=from_logits, reduction="none", **opts)
    assert got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=1e-6)
    value, grad = _binary_value_and_grad(x, t, from_logits=from_logits, **opts)
    assert value.dtype == dtype
    assert grad.dtype == dtype
    x64 = x.double().requires_grad_(True)
    loss64 = ce.binary_cross_entropy(x64, t.double(), from_logits=from_logits, **opts)
    (g64,) = torch.autograd.grad(loss64, x64)
    np.testing.assert_allclose(grad.double().numpy(), g64.numpy(), rtol=rtol, atol=1e-5)


def test_jax_jit_and_grad() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    data = _data(7)
    x, t = jnp.asarray(data["logits"]), jnp.asarray(data["target"])
    pw = jnp.asarray(data["pos_weight"])

    def f(a: Any) -> Any:
        return ce.binary_cross_entropy(a, t, from_logits=True, gamma=0.5, pos_weight=pw)

    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(f(x)), rtol=1e-14)
    _, closed = _binary_value_and_grad(x, t, from_logits=True, gamma=0.5, pos_weight=pw)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), np.asarray(closed), rtol=1e-12)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

FUNCTIONS = [ce.binary_cross_entropy, _binary_value_and_grad]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=["loss", "closed_form"])
def test_option_and_shape_errors(xp: Any, fn: Any) -> None:
    conv = to_xp(xp)
    x, t = conv(np.full(SHAPE, 0.5)), conv(np.full(SHAPE, 1.0))
    cases: list[tuple[type[Exception], str, Any, Any, dict[str, Any]]] = [
        (ValueError, r"`target` must have the same shape as `input`", x, t[0, ...], {}),
        (ValueError, r"`reduction` must be one of", x, t, {"reduction": "avg"}),
        (ValueError, r"`gamma` must be finite and >= 0", x, t, {"gamma": -1.0}),
        (TypeError, r"`gamma` must be a number", x, t, {"gamma": "2"}),
        (ValueError, r"`alpha` must lie in \[0, 1\]", x, t, {"alpha": 1.5}),
        (ValueError, r"`alpha` must be finite and >= 0", x, t, {"alpha": -0.1}),
        (ValueError, r"`label_smoothing` must lie in \[0, 1\]", x, t, {"label_smoothing": 2}),
        (TypeError, r"`from_logits` must be a bool", x, t, {"from_logits": 1}),
        (TypeError, r"`input` must have a floating dtype", conv(np.ones(SHAPE, int)), t, {}),
        (TypeError, r"`target` must have a floating dtype", x, conv(np.ones(SHAPE, int)), {}),
        (
            ValueError,
            r"`weight` of shape \(2,\) does not broadcast",
            x,
            t,
            {"weight": conv(np.ones(2))},
        ),
        (
            ValueError,
            r"`pos_weight` of shape \(1, 3, 4\) does not broadcast",
            x,
            t,
            {"pos_weight": conv(np.ones((1, 3, 4)))},
        ),
        (TypeError, r"`weight` must be None, a number or an array", x, t, {"weight": "1"}),
        (  # one binary problem: the fix is a number, not the (1,) it was given
            ValueError,
            r"`weight` of shape \(1,\) does not broadcast to `input` of shape \(\); give it "
            r"a number or a 0-d array",
            conv(np.asarray(0.5)),
            conv(np.asarray(1.0)),
            {"weight": conv(np.ones(1))},
        ),
    ]
    for exc, pattern, a, b, opts in cases:
        with pytest.raises(exc, match=pattern):
            fn(a, b, **opts)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=["loss", "closed_form"])
def test_value_errors_and_the_validation_switch(xp: Any, fn: Any) -> None:
    conv = to_xp(xp)
    x, t = conv(np.full(SHAPE, 0.5)), conv(np.full(SHAPE, 1.0))
    cases: list[tuple[str, Any, Any, dict[str, Any]]] = [
        (r"`target` must lie in \[0, 1\]", x, conv(np.full(SHAPE, 2.0)), {}),
        (
            r"`input` has values outside \[0, 1\].*pass from_logits=True",
            conv(np.full(SHAPE, 3.0)),
            t,
            {},
        ),
        (r"`weight` must be non-negative", x, t, {"weight": conv(-np.ones(SHAPE))}),
        (r"`pos_weight` must be non-negative", x, t, {"pos_weight": -1.0}),
    ]
    for pattern, a, b, opts in cases:
        with pytest.raises(ValueError, match=pattern):
            fn(a, b, **opts)
    with ce.validation(False):
        for _, a, b, opts in cases:
            fn(a, b, from_logits=True, **opts)  # values are not checked (logits: no log warning)
        with pytest.raises(ValueError, match="same shape"):
            fn(x, t[0, ...])
        with pytest.raises(TypeError, match="floating dtype"):
            fn(x, conv(np.ones(SHAPE, int)))
    # logits may be any real number
    fn(conv(np.full(SHAPE, 3.0)), t, from_logits=True)


def test_pos_weight_with_probabilities_equals_logit_form() -> None:
    """pos_weight is allowed with probabilities: the same formula as with logits."""
    data = _data(8)
    p = 1 / (1 + np.exp(-data["logits"]))
    opts = {"pos_weight": data["pos_weight"], "reduction": "none"}
    from_p = ce.binary_cross_entropy(p, data["target"], **opts)
    from_x = ce.binary_cross_entropy(data["logits"], data["target"], from_logits=True, **opts)
    np.testing.assert_allclose(from_p, from_x, rtol=1e-9)


def test_math_helpers_are_consistent() -> None:
    """The reference's log-sigmoid is the exact one (a guard on the guard)."""
    for v in (-700.0, -1.0, 0.0, 2.0, 700.0):
        with mpmath.workdps(40):
            want = float(-mpmath.log1p(mpmath.exp(-mpmath.mpf(v))))
        assert ref.log_sigmoid(v) == pytest.approx(want, rel=1e-15)
    assert math.isclose(ref.log_sigmoid(0.0), -math.log(2.0))
