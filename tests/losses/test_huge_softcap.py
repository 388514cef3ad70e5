"""A soft cap beyond what the compute dtype holds, or so large that x / c is subnormal.

The float64 reference is :math:`c \\tanh(x / c)` of the logits as given (rounded to
their dtype), with ``-inf`` kept ``-inf``: for every cap here float64 holds :math:`c`,
:math:`x / c` and the result. With c = 1e39 and float32 logits the cap itself overflowed
to inf and :math:`\\infty \\cdot \\tanh(x / \\infty) = \\infty \\cdot 0` made every loss
NaN on every PyTorch path (and on NumPy / JAX in a row holding a masked ``-inf`` class);
with c = 1e36 a logit of 1e-3 gives a subnormal x / c, which XLA and GPU kernels flush
to 0. Logits of 3e37 and 2e37 make the cap bend them (by 0.1 % at c = 1e39), so that
the identity for every logit would fail too.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

torch = pytest.importorskip("torch")

CAPS = (30.0, 1e31, 1e36, 1e38, 3.5e38, 1e39, 1e41, 1e42, 1e300)
"""Ordinary; at float32's guard; x / c subnormal; beyond float32; the identity (1e42, 1e300)."""

LABELS = np.array([0, 4, 3, 1])  # none on column 2, which the fused tests mask in every row


def _logits(cap: float, top: float = 3e37) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)) * 3
    x[0, 0] = 1e-3  # x / 1e38 = 1e-41: three digits as a float32 subnormal
    x[1, 2] = -math.inf  # a masked class
    # the cap bends these (label 1: the loss is z_0 - z_1); at most 0.3 c, where the loss
    # is well conditioned (c (tanh(30) - tanh(20)) is below z's rounding); float16 holds
    # at most 65504
    x[3, :2] = [min(0.3 * cap, top), min(0.2 * cap, top * 2 / 3)]
    return x


def _reference(x: Any, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-row losses and the gradient of their sum, float64, of the rounded logits `x`."""
    v = torch.as_tensor(np.asarray(x, dtype=np.float64)).requires_grad_(True)
    z = torch.where(v == -math.inf, -math.inf, cap * torch.tanh(v / cap))  # derivative 0 there
    row = torch.nn.functional.cross_entropy(z, torch.as_tensor(LABELS), reduction="none")
    (g,) = torch.autograd.grad(row.sum(), v)
    return row.detach().numpy(), g.numpy()


_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-12}


def _close(got: Any, want: np.ndarray, dtype: Any, what: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    rtol = _RTOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol, err_msg=what)


def _torch_logits(cap: float, dtype: Any) -> Any:
    return torch.tensor(_logits(cap, 3e4 if dtype == torch.float16 else 3e37), dtype=dtype)


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_unfused_losses_equal_the_float64_reference(
    cap: float, dtype: Any, grad: bool
) -> None:
    """Eager PyTorch: the own-rows executor with a gradient, the statistics executor without."""
    x = _torch_logits(cap, dtype)
    want, want_g = _reference(x.double(), cap)
    v = x.clone().requires_grad_(grad)
    row = ce.sparse_categorical_cross_entropy(
        v, torch.as_tensor(LABELS), from_logits=True, softcap=cap, reduction="none"
    )
    _close(row.detach().double(), want, dtype, f"loss, cap {cap}")
    if grad:
        (g,) = torch.autograd.grad(row.sum(), v)
        _close(g.double(), want_g, dtype, f"gradient, cap {cap}")


@pytest.mark.parametrize("cap", [1e36, 1e39, 1e42])
def test_torch_compiled_loss_equals_the_float64_reference(cap: float) -> None:
    from tests._compiled import eager_and_compiled

    x = _torch_logits(cap, torch.float32)
    want, want_g = _reference(x.double(), cap)

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            v, torch.as_tensor(LABELS), from_logits=True, softcap=cap, reduction="none"
        )

    for value, g in eager_and_compiled(loss, x):
        _close(value.double(), want, torch.float32, f"loss, cap {cap}")
        _close(g.double(), want_g, torch.float32, f"gradient, cap {cap}")


@pytest.mark.parametrize("cap", CAPS)
def test_array_api_losses_equal_the_float64_reference(xp: Any, cap: float) -> None:
    conv = to_xp(xp)
    x = _logits(cap).astype(np.float32)
    want, _ = _reference(x, cap)
    row = ce.sparse_categorical_cross_entropy(
        conv(x), conv(LABELS), from_logits=True, softcap=cap, reduction="none"
    )
    _close(to_numpy(row), want, torch.float32, f"cap {cap}")


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_closed_form_and_jax_gradients_equal_the_float64_reference(cap: float, dtype: Any) -> None:
    x = _logits(cap).astype(dtype)
    want, want_g = _reference(x, cap)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    value, g = ce.value_and_grad(
        "sparse_categorical_cross_entropy",
        x,
        LABELS,
        from_logits=True,
        softcap=cap,
        reduction="sum",
    )
    _close(value, want.sum(), tdt, f"value, cap {cap}")
    _close(g, want_g, tdt, f"gradient, cap {cap}")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            v, jax.numpy.asarray(LABELS), from_logits=True, softcap=cap, reduction="sum"
        )

    value, g = jax.value_and_grad(loss)(jax.numpy.asarray(x))
    _close(value, want.sum(), tdt, f"jax value, cap {cap}")
    _close(g, want_g, tdt, f"jax gradient, cap {cap}")


def _linear(cap: float, dtype: Any) -> tuple[Any, Any, np.ndarray]:
    """hidden, weight (identity: the logits are the hidden states) and the logits."""
    x = _torch_logits(cap, dtype)
    hidden = torch.where(x == -math.inf, 0.0, x)
    weight = torch.eye(5, dtype=dtype)
    return hidden, weight, x.double().numpy()


def _bias() -> Any:
    b = torch.zeros(5, dtype=torch.float64)
    b[2] = -math.inf  # row 1's masked class, as a bias of -inf masks it for every row
    return b


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_linear_cross_entropy_equals_the_float64_reference(cap: float, dtype: Any) -> None:
    from crossent.fused import linear_cross_entropy

    hidden, weight, _ = _linear(cap, dtype)
    bias = _bias().to(dtype)
    x = (hidden.double() + bias.double()).numpy()
    want, want_g = _reference(x, cap)
    h = hidden.clone().requires_grad_(True)
    row = linear_cross_entropy(
        h, weight, torch.as_tensor(LABELS), bias=bias, softcap=cap, reduction="none"
    )
    (g,) = torch.autograd.grad(row.sum(), h)
    _close(row.detach().double(), want, dtype, f"loss, cap {cap}")
    # d/dh = d/dx through the identity weight (the bias column of -inf: no gradient)
    _close(g.double(), want_g, dtype, f"gradient, cap {cap}")


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_log_probs_equal_the_float64_reference(cap: float, dtype: Any) -> None:
    from crossent.fused import linear_log_probs

    hidden, weight, _ = _linear(cap, dtype)
    bias = _bias().to(dtype)
    v = (hidden.double() + bias.double()).requires_grad_(True)
    z = torch.where(v == -math.inf, -math.inf, cap * torch.tanh(v / cap))
    lp = torch.log_softmax(z, -1)
    want_lp = lp.gather(1, torch.as_tensor(LABELS)[:, None]).squeeze(1)
    want_ent = -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)
    (want_g,) = torch.autograd.grad((want_lp + 0.5 * want_ent).sum(), v)
    h = hidden.clone().requires_grad_(True)
    got_lp, got_ent = linear_log_probs(
        h, weight, torch.as_tensor(LABELS), bias=bias, softcap=cap, return_entropy=True
    )
    (g,) = torch.autograd.grad((got_lp + 0.5 * got_ent).sum(), h)
    _close(got_lp.detach().double(), want_lp.detach().numpy(), dtype, f"log p, cap {cap}")
    _close(got_ent.detach().double(), want_ent.detach().numpy(), dtype, f"entropy, cap {cap}")
    _close(g.double(), want_g.numpy(), dtype, f"gradient, cap {cap}")


@pytest.mark.parametrize("cap", [2.0, 1e39])
def test_a_masked_class_stays_masked_under_softcap_on_every_backend(xp: Any, cap: float) -> None:
    """A logit of -inf under softcap c is a masked class, not -c: the loss equals the loss
    without that class (its column deleted), and its gradient is 0 (documented in every
    public docstring taking `softcap`)."""
    conv = to_xp(xp)
    x = np.array([[0.5, -math.inf, 1.5, -1.0], [2.0, 0.1, -math.inf, 0.3]], dtype=np.float32)
    y = np.array([2, 0])
    kept = [np.delete(row, np.flatnonzero(np.isinf(row))) for row in x]
    want = [
        float(
            ce.sparse_categorical_cross_entropy(
                k[None].astype(np.float64), np.array([int(t) - int(t > np.argmin(r))]),
                from_logits=True, softcap=cap,
            )
        )
        for k, t, r in zip(kept, y, x, strict=True)
    ]  # fmt: skip
    got = ce.sparse_categorical_cross_entropy(
        conv(x), conv(y), from_logits=True, softcap=cap, reduction="none"
    )
    np.testing.assert_allclose(to_numpy(got), want, rtol=2e-6)
    _, g = ce.value_and_grad(
        "sparse_categorical_cross_entropy", x, y, from_logits=True, softcap=cap, reduction="sum"
    )
    assert g[0, 1] == 0.0
    assert g[1, 2] == 0.0
    if xp.__name__.endswith("torch"):
        from crossent.fused import linear_cross_entropy

        v = torch.tensor(x, requires_grad=True)
        (gt,) = torch.autograd.grad(
            ce.sparse_categorical_cross_entropy(
                v, torch.as_tensor(y), from_logits=True, softcap=cap, reduction="sum"
            ),
            v,
        )
        assert gt[0, 1] == 0.0
        assert gt[1, 2] == 0.0
        bias = torch.tensor([0.0, -math.inf, 0.0, 0.0])  # masks class 1 in both rows
        h = torch.tensor(np.where(np.isinf(x), 0.0, x), dtype=torch.float32)
        fused = linear_cross_entropy(
            h, torch.eye(4), torch.as_tensor(y), bias=bias, softcap=cap, reduction="none"
        )
        ref = ce.sparse_categorical_cross_entropy(
            h + bias, torch.as_tensor(y), from_logits=True, softcap=cap, reduction="none"
        )
        torch.testing.assert_close(fused, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("cap", [3e-39, 1e-30])
def test_tiny_softcap_is_finite_without_a_warning(cap: float) -> None:
    """A cap below the logits' scale divides them into inf (float32: 2 / 3e-39): the capped
    logits are +-c, the loss log C, as in float64; NumPy warned 'overflow encountered in
    divide' on the way (a program run with warnings as errors died of it)."""
    z = np.array([[2.0, 1.0, 0.5], [0.1, -0.3, 0.4]], dtype=np.float32)
    y = np.array([0, 1])
    loss = ce.sparse_categorical_cross_entropy
    want = loss(z.astype(np.float64), y, from_logits=True, softcap=cap, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = loss(z, y, from_logits=True, softcap=cap, reduction="none")
        _, grad = ce.value_and_grad(loss, z, y, from_logits=True, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isfinite(grad).all()
