"""Extreme inputs found by the API fuzz: large logits, NaN through zero weights and NaN rows."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.conftest import to_numpy, to_xp

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("magnitude", [1024.0, 1e4, 3e4])
def test_float32_logits_of_large_magnitude_give_accurate_losses(xp: Any, magnitude: float) -> None:
    """log p = (z - m) - lse(z - m): lse(z) rounded at 1e4 turned log 2 into 0.69336."""
    conv = to_xp(xp)
    z = conv(np.array([[magnitude, magnitude]], dtype=np.float32))
    log2 = math.log(2.0)
    sparse = ce.sparse_categorical_cross_entropy(z, conv(np.array([0])), from_logits=True)
    onehot = conv(np.array([[1.0, 0.0]], dtype=np.float32))
    categorical = ce.categorical_cross_entropy(z, onehot, from_logits=True)
    listnet = ce.listnet_loss(conv(np.zeros((1, 2), dtype=np.float32)), z)
    for got in (sparse, categorical, listnet):
        assert abs(float(to_numpy(got)) - log2) <= 4 * np.finfo(np.float32).eps


def test_float32_large_logits_gradient_matches_torch() -> None:
    x = torch.tensor([[1e4, 1e4 + 1.0, 1e4 - 3.0]], requires_grad=True)
    y = torch.tensor([0])
    ce.sparse_categorical_cross_entropy(x, y, from_logits=True).backward()
    ref = x.detach().double().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref, y).backward()
    assert x.grad is not None
    assert ref.grad is not None
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=4e-7, atol=4e-7)
    _, closed = ce.value_and_grad(
        "sparse_categorical_cross_entropy", x.detach().numpy(), y.numpy(), from_logits=True
    )
    np.testing.assert_allclose(closed, ref.grad.numpy(), rtol=4e-7, atol=4e-7)


def test_z_loss_still_uses_the_unshifted_lse() -> None:
    x = torch.tensor([[1e3, 1e3 + 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    got = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, z_loss=1e-4)
    want = torch.nn.functional.cross_entropy(x, y) + 1e-4 * torch.logsumexp(x, dim=1)[0] ** 2
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0.0)


def test_nan_logits_propagate_through_a_zero_class_weight() -> None:
    """As in torch: 0 · NaN is NaN; only 0 · inf (a masked class) is 0."""
    x = np.array([[np.nan, 1.0], [0.5, -np.inf]])
    w = np.array([0.0, 1.0])
    got = ce.sparse_categorical_cross_entropy(
        x, np.array([0, 0]), from_logits=True, weight=w, reduction="none"
    )
    want = torch.nn.functional.cross_entropy(
        torch.tensor(x), torch.tensor([0, 0]), weight=torch.tensor(w), reduction="none"
    )
    assert np.isnan(got[0])
    assert torch.isnan(want[0])
    assert got[1] == 0.0


def test_nan_row_with_large_logits_warns_about_nothing() -> None:
    """logsumexp of a row whose max is NaN exponentiated the other entries unshifted."""
    x = np.array([[np.nan, 710.0], [0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ce.listnet_loss(x, np.zeros((2, 2)), reduction="none")
    assert np.isnan(got[0])
    assert np.isfinite(got[1])


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.01}, {"gamma": 2.0}, {"softcap": 3.0}]
)
def test_nan_logits_of_counted_targets_of_weight_0_make_the_mean_nan(
    xp: Any, options: dict[str, float]
) -> None:
    """Every counted target has weight 0 (the mean's denominator is 0) and a row holds NaN: the
    mean is NaN on every backend, as PyTorch's kernels give; the generic formula's mean was 0
    (its safe division hid the NaN). Without the NaN the mean is 0 (crossent's rule)."""
    conv = to_xp(xp)
    x = np.array([[np.nan, 1.0, 0.0], [0.5, -1.0, 0.0]])
    y, w = np.array([0, 0]), np.array([0.0, 1.0, 1.0])

    def mean(logits: np.ndarray) -> float:
        out = ce.sparse_categorical_cross_entropy(
            conv(logits), conv(y), weight=conv(w), from_logits=True, **options
        )
        return float(to_numpy(out))

    assert math.isnan(mean(x))
    assert mean(np.nan_to_num(x)) == 0.0
    value, _ = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, conv(x), conv(y), weight=conv(w), from_logits=True,
        **options,
    )  # fmt: skip
    assert math.isnan(float(to_numpy(value)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_label_smoothing_of_a_label_masked_by_minus_inf_is_inf_not_nan(
    xp: Any, reduction: str
) -> None:
    """ε = 1: the label's own term has coefficient 1 - ε = 0 and the smoothing term reaches its
    -inf logit, so the row's loss is +inf. PyTorch's kernel, which crossent ran for these
    options, forms 0 · inf = NaN there (found by a long random run of the API fuzz)."""
    x = np.zeros((4, 4))
    x[2, 1] = -np.inf
    y = np.array([0, 0, 1, 0])
    conv = to_xp(xp)
    out = to_numpy(
        ce.sparse_categorical_cross_entropy(
            conv(x), conv(y), from_logits=True, label_smoothing=1.0, reduction=reduction
        )
    )
    want = np.array([math.log(4), math.log(4), np.inf, math.log(4)])
    want = {"none": want, "sum": np.inf, "mean": np.inf}[reduction]
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_full_label_smoothing_of_a_masked_label_through_torchs_paths() -> None:
    x = torch.zeros(4, 4)
    x[2, 1] = -math.inf
    y = torch.tensor([0, 0, 1, 0])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        loss = ce.sparse_categorical_cross_entropy(
            x.to(dtype), y, from_logits=True, label_smoothing=1.0
        )
        assert loss.item() == math.inf, dtype
    assert ce.nn.CrossEntropyLoss(label_smoothing=1.0)(x, y).item() == math.inf
    assert ce.nn.CrossEntropyLoss(label_smoothing=1.0, ignore_index=3)(x, y).item() == math.inf
    # the rows that now serve ε = 1 give exact first and second derivatives (finite logits)
    z = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return ce.sparse_categorical_cross_entropy(
            z, y, from_logits=True, label_smoothing=1.0, weight=w, ignore_index=3
        )

    z.requires_grad_()
    assert torch.autograd.gradcheck(loss, (z,))
    assert torch.autograd.gradgradcheck(loss, (z,))


def test_an_infinite_smoothing_sum_over_no_counted_weight_is_nan_without_a_warning(
    xp: Any,
) -> None:
    """The one counted label has weight 0 (the mean's denominator is 0) and label smoothing
    reaches a class of weight 0.5 masked by -inf: the row's loss is +inf and the mean
    inf / inf = NaN, as a NaN row's (the differences page). The generic formula's division
    warned "invalid value encountered in divide" on NumPy and array-api-strict, an error where
    warnings are (found by a long random run of the API fuzz)."""
    conv = to_xp(xp)
    x, y, w = np.array([[0.0, -np.inf]]), np.array([0]), np.array([0.0, 0.5])
    out = ce.sparse_categorical_cross_entropy(
        conv(x), conv(y), weight=conv(w), from_logits=True, label_smoothing=0.1
    )
    assert math.isnan(float(to_numpy(out)))
    w_finite = np.array([0.0, 0.0])  # the masked class of weight 0 too: a finite sum, mean 0
    out = ce.sparse_categorical_cross_entropy(
        conv(x), conv(y), weight=conv(w_finite), from_logits=True, label_smoothing=0.1
    )
    # (PyTorch's kernel forms 0 · inf = NaN for a masked class of weight 0: the differences page)
    torch_kernel = isinstance(out, torch.Tensor)
    assert float(to_numpy(out)) == 0.0 or (math.isnan(float(to_numpy(out))) and torch_kernel)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_spanning_more_than_the_largest_float_warn_about_nothing(
    xp: Any, dtype: str
) -> None:
    """z - max(z) beyond the largest float is -inf, whose exponential is the right 0: NumPy
    warned "overflow encountered in subtract" (an error under -W error) in the NumPy executor,
    the generic log-sum-exp, log-softmax and row statistics. The values are the float64
    formula's: the row max's class has p = 1."""
    big = float(np.finfo(dtype).max) * 0.6  # z - m = -1.2 max: overflows
    conv = to_xp(xp)
    z = conv(np.array([[big, -big, 0.0], [1.0, 2.0, 0.5]], dtype=dtype))
    y = conv(np.array([0, 1]))
    p_row0 = conv(np.array([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]], dtype=dtype))
    sparse = ce.sparse_categorical_cross_entropy(z, y, from_logits=True, reduction="none")
    want = [0.0, float(np.log(np.exp([1.0, 2.0, 0.5]).sum()) - 2.0)]
    np.testing.assert_allclose(to_numpy(sparse).astype(float), want, rtol=1e-6, atol=0)
    _, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, z, y, from_logits=True)
    assert to_numpy(grad)[0].tolist() == [0.0, 0.0, 0.0]
    smooth = ce.categorical_cross_entropy(z, p_row0, from_logits=True, reduction="none")
    assert float(to_numpy(smooth)[0]) == np.inf  # mass on p = 0: +inf, no warning
    entropy = ce.info.entropy(z, from_logits=True)
    assert float(to_numpy(entropy)[0]) == 0.0
    kl = ce.info.kl_divergence(z, z, from_logits=True)
    assert to_numpy(kl).tolist() == [0.0, 0.0]
    assert math.isfinite(float(to_numpy(ce.distillation_loss(z, z))))
    # log p of the smallest logit is -inf here although p log p is finite (about 1e308):
    # ListNet and soft targets then give +inf (as PyTorch's log_softmax); without a warning
    ce.listnet_loss(z, p_row0 + 0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_target_at_the_low_end_of_a_row_spanning_more_than_the_largest_float(
    xp: Any, dtype: str
) -> None:
    """The sibling of the test above with the label on the smallest logit: -log p_y = m - z_y
    is beyond the largest float, +inf (as PyTorch's), but NumPy and array-api-strict warned
    "overflow encountered in subtract" (an error under -W error) in the row formula's target
    term, for the loss and value_and_grad; the gradient is p - e_y as for any row."""
    big = float(np.finfo(dtype).max)
    conv = to_xp(xp)
    z = np.array([[big, -big, 0.0], [1.0, 2.0, 0.5]], dtype=dtype)
    y = np.array([1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ce.sparse_categorical_cross_entropy(
            conv(z), conv(y), from_logits=True, reduction="none"
        )
        _, grad = ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, conv(z), conv(y), from_logits=True
        )
    got = to_numpy(loss).astype(float)
    assert got[0] == np.inf
    assert got[1] == pytest.approx(float(np.log(np.exp([1.0, 2.0, 0.5]).sum()) - 2.0), rel=1e-6)
    assert to_numpy(grad)[0].tolist() == [0.5, -0.5, 0.0]


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1}])
def test_non_finite_row_maxima_warn_about_nothing(xp: Any, options: dict[str, Any]) -> None:
    """A +inf logit and an all -inf row: NaN where inf - inf is formed, +inf for a finite target
    under a +inf logit (NaN with smoothing, whose sum meets inf - inf), finite rows exact; no
    NumPy warning on the way (the row formula forms inf - inf in NumPy's quiet state)."""
    conv = to_xp(xp)
    x = np.array([[np.inf, 0.0], [-np.inf, -np.inf], [np.inf, 1.0], [1.0, 2.0]])
    y = np.array([0, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_numpy(
            ce.sparse_categorical_cross_entropy(
                conv(x), conv(y), from_logits=True, reduction="none", **options
            )
        )
    assert np.isnan(got[0])
    assert np.isnan(got[1])
    assert np.isnan(got[2]) or (got[2] == np.inf and not options.get("label_smoothing"))
    lse = np.logaddexp(1.0, 2.0)
    eps, zeta = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0)
    want = (1 - eps) * (lse - 2.0) + eps / 2 * ((lse - 1.0) + (lse - 2.0)) + zeta * lse**2
    assert got[3] == pytest.approx(want, rel=1e-12)


_NONE = {"reduction": "none"}
_SOFT_CALLS = {
    "categorical": lambda x, t: ce.categorical_cross_entropy(x, t, from_logits=True, **_NONE),
    "categorical-focal": lambda x, t: ce.categorical_cross_entropy(
        x, t, from_logits=True, gamma=2.0, **_NONE
    ),
    "categorical-grad": lambda x, t: ce.value_and_grad(
        ce.categorical_cross_entropy, x, t, from_logits=True, **_NONE
    )[1],
    "listnet-scores": lambda x, t: ce.listnet_loss(x, t, **_NONE),
    "listnet-relevance": lambda x, t: ce.listnet_loss(t, x, **_NONE),
    "listnet-grad": lambda x, t: ce.value_and_grad(ce.listnet_loss, x, t, **_NONE)[1],
    "distillation-student": lambda x, t: ce.distillation_loss(x, t, **_NONE),
    "distillation-teacher": lambda x, t: ce.distillation_loss(t, x, **_NONE),
    "distillation-grad": lambda x, t: ce.value_and_grad(ce.distillation_loss, x, t, **_NONE)[1],
    "entropy": lambda x, t: ce.info.entropy(x, from_logits=True),
    "kl": lambda x, t: ce.info.kl_divergence(t, x, from_logits=True),
    "js": lambda x, t: ce.info.js_divergence(x, t, from_logits=True),
}


@pytest.mark.parametrize("call", list(_SOFT_CALLS.values()), ids=list(_SOFT_CALLS))
def test_non_finite_row_maxima_of_soft_targets_and_measures_warn_about_nothing(
    xp: Any, call: Any
) -> None:
    """The sibling of the sparse test above: log p = z - lse of a +inf logit or an all -inf
    row is inf - inf, NaN, as on PyTorch and JAX; NumPy and array-api-strict warned "invalid
    value encountered in subtract" (an error under -W error) in the soft-target losses and
    their closed-form gradients, ListNet, distillation and ``crossent.info`` from logits.
    Those rows hold NaN; the finite row is the same as on its own."""
    conv = to_xp(xp)
    x = np.array([[np.inf, 0.0], [-np.inf, -np.inf], [np.inf, np.inf], [1.0, 2.0]])
    t = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_row = to_numpy(call(conv(x), conv(t))).reshape(4, -1)
        alone = to_numpy(call(conv(x[3:]), conv(t[3:]))).reshape(1, -1)
    assert np.isnan(per_row[:3]).any(axis=-1).all()
    assert np.all(np.isfinite(alone))
    np.testing.assert_allclose(per_row[3:], alone, rtol=1e-12)


def test_numpy_overflow_to_a_right_infinity_gives_no_warning() -> None:
    """NumPy warned "overflow encountered in cast" for a float32 loss above float16's largest
    number (its float16 value is inf, as PyTorch rounds it), "overflow encountered in exp" for
    a row holding +inf next to large logits (its log-sum-exp is +inf whatever the sum) and
    "invalid value encountered in subtract" in value_and_grad's gradient of such a row (NaN
    throughout): each an error where warnings are errors (as in this suite). The values are
    the float64 formulas' rounded to the input's dtype."""
    z16 = np.array([[6e4, 0.0, -6e4, 1.0], [0.5, 1.0, -1.0, 2.0]], dtype=np.float16)
    y = np.array([1, 3])
    got = ce.sparse_categorical_cross_entropy(
        z16, y, from_logits=True, z_loss=0.1, reduction="none"
    )
    z = z16.astype(np.float64)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    with np.errstate(over="ignore"):  # the reference rounds to inf as well
        want = (lse - z[[0, 1], y] + 0.1 * lse**2).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)  # [inf, 0.74 + 0.1 * 2.6^2]
    assert np.isinf(got[0])
    for dtype in (np.float16, np.float32):
        z = np.array([[0.0, np.inf, 100.0, 3.0], [0.5, 1.0, -1.0, 2.0]], dtype=dtype)
        row = ce.sparse_categorical_cross_entropy(z, y - 1, from_logits=True, reduction="none")
        assert row[0] == np.inf
        assert np.isfinite(row[1])
        _, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, z, y - 1, from_logits=True)
        assert np.isnan(grad[0]).all()
        assert np.isfinite(grad[1]).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float16_mean_whose_sum_exceeds_float16_range(backend: str) -> None:
    """20000 x 3 float16 losses: their sum (about 7e4, 11e4 for the binary elements) is above
    float16's largest number (65504), the mean is not; every loss accumulates in float32 and
    gives the float64 mean to float16 rounding (a sum kept in float16 would be inf)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20000, 3)) * 4).astype(np.float16)
    y = rng.integers(0, 3, 20000)
    soft = rng.random((20000, 3))
    soft = (soft / soft.sum(1, keepdims=True)).astype(np.float16)
    unit = rng.random((20000, 3)).astype(np.float16)
    calls = [
        (ce.sparse_categorical_cross_entropy, y, {"from_logits": True}),
        (ce.sparse_categorical_cross_entropy, y, {"from_logits": True, "z_loss": 1e-3}),
        (ce.sparse_categorical_cross_entropy, y, {"from_logits": True, "label_smoothing": 0.1}),
        (ce.categorical_cross_entropy, soft, {"from_logits": True}),
        (ce.binary_cross_entropy, unit, {"from_logits": True}),
        (ce.listnet_loss, unit, {}),
    ]
    conv = (lambda a: a) if backend == "numpy" else torch.from_numpy
    for loss, target, opts in calls:
        got = loss(conv(x), conv(target), **opts)
        want = loss(
            x.astype(np.float64),
            target.astype(np.float64) if target.dtype != y.dtype else y,
            **opts,
        )
        value = float(got)
        assert abs(value - float(want)) <= 2**-10 * abs(float(want)), (loss.__name__, opts)


@pytest.mark.parametrize("cap", [1e36, 1e38])
def test_a_huge_softcap_is_the_identity_to_rounding(xp: Any, cap: float) -> None:
    """c tanh(x / c) = x where x / c is below sqrt(eps): with c = 1e38 in float32 x / c is
    subnormal, which XLA on CPU flushes to 0, so JAX scored every logit as 0 (log 5 = 1.609
    instead of 4.041); the other backends kept x / c's few subnormal digits."""
    conv = to_xp(xp)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 5)) * 3).astype(np.float32)
    x[0, 0] = 1e-3  # x / 1e38 = 1e-41: three digits as a subnormal
    y = np.array([0, 4, 2, 1])
    plain = ce.sparse_categorical_cross_entropy(
        conv(x), conv(y), from_logits=True, reduction="none"
    )
    capped = ce.sparse_categorical_cross_entropy(
        conv(x), conv(y), from_logits=True, softcap=cap, reduction="none"
    )
    np.testing.assert_allclose(to_numpy(capped), to_numpy(plain), rtol=1e-6, atol=0.0)


def _focal_reference(kind: str, x: np.ndarray, gamma: float) -> tuple[float, np.ndarray]:
    """Summed focal loss and its gradient in float64 (PyTorch autograd of the formula)."""
    v = torch.tensor(x.astype(np.float64), requires_grad=True)
    if kind == "binary":
        t = torch.tensor(_FOCAL_BINARY_TARGET)
        log_p, log_q = torch.nn.functional.logsigmoid(v), torch.nn.functional.logsigmoid(-v)
        # (1 - p)^γ = e^(γ log(1 - p)): no 0^γ (an infinite derivative for γ < 1) formed
        loss = -(t * (gamma * log_q).exp() * log_p + (1 - t) * (gamma * log_p).exp() * log_q)
        loss = loss.sum()
    else:
        lp = torch.log_softmax(v, -1).gather(1, torch.tensor(_FOCAL_LABELS)[:, None])
        loss = -((gamma * torch.log1p(-lp.exp())).exp() * lp).sum()
    (g,) = torch.autograd.grad(loss, v)
    return float(loss.detach()), g.numpy()


_FOCAL_LABELS = np.array([1, 0])
_FOCAL_BINARY_TARGET = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])


@pytest.mark.parametrize("kind", ["sparse", "categorical", "binary"])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 4.0])
def test_focal_gradient_of_finite_logits_beyond_max_over_gamma(kind: str, gamma: float) -> None:
    """A logit of 1e38 with γ = 4 (float32): autodiff multiplied the loss term's -log p = 1e38
    by γ (inf) before by p = 0, so JAX's gradient was NaN where the loss (1e38) and the
    gradient (±1) are finite; value_and_grad and PyTorch's closed forms were right."""
    x = np.array([[1e38, 0.0, -1e37], [0.5, 1.0, -1.0]], dtype=np.float32)
    want, want_g = _focal_reference(kind, x, gamma)
    assert math.isfinite(want)

    def loss(a: Any, xp: Any) -> Any:
        if kind == "binary":
            t = xp.asarray(_FOCAL_BINARY_TARGET.astype(np.float32))
            return ce.binary_cross_entropy(a, t, from_logits=True, gamma=gamma, reduction="sum")
        if kind == "categorical":
            t = xp.asarray(np.eye(3, dtype=np.float32)[_FOCAL_LABELS])
            return ce.categorical_cross_entropy(
                a, t, from_logits=True, gamma=gamma, reduction="sum"
            )
        y = xp.asarray(_FOCAL_LABELS)
        return ce.sparse_categorical_cross_entropy(
            a, y, from_logits=True, gamma=gamma, reduction="sum"
        )

    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    results = {"jax": jax.value_and_grad(lambda a: loss(a, jax.numpy))(jax.numpy.asarray(x))}
    jitted = jax.jit(jax.value_and_grad(lambda a: loss(a, jax.numpy)))
    results["jax-jit"] = jitted(jax.numpy.asarray(x))
    t = torch.tensor(x, requires_grad=True)
    value = loss(t, torch)
    results["torch"] = (value.detach(), torch.autograd.grad(value, t)[0])
    for name, (value, g) in results.items():
        assert float(value) == pytest.approx(want, rel=1e-6), name
        np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-6, err_msg=name)


# torch.func.hessian (forward mode) loads its decompositions with torch.jit.script once
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cap", [5.0, 1e38])
def test_softcap_second_derivative_where_it_is_the_identity(cap: float) -> None:
    """Where c tanh(x / c) is taken as x (|x / c| < sqrt(eps)) its second derivative,
    -2x / c² to leading order, was 0: float32 Hessians of a softcapped focal loss with
    smoothing (the generic formula's double backward) were 3.5e-4 off relative to their
    largest entry (plain float32 operations: 2e-7). The leading term x (1 - (x/c)² / 3) keeps
    the value (below rounding) and the derivatives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    x[:, 1] = torch.tensor([1e-3, -1.2e-3, 4e-4, -1e-4, 1.5e-3, 0.0], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 1, 3, 1])
    opts = {"from_logits": True, "softcap": cap, "gamma": 2.0, "label_smoothing": 0.1}

    def reference(v: Any) -> Any:  # float64, the plain formula
        z = cap * torch.tanh(v / cap)
        log_p = torch.log_softmax(z, -1)
        c = 0.9 * torch.nn.functional.one_hot(y, 5) + 0.1 / 5
        return (c * (1 - log_p.exp()) ** 2 * -log_p).sum() / 6

    want = torch.func.hessian(reference)(x)
    got = torch.func.hessian(lambda v: ce.sparse_categorical_cross_entropy(v, y, **opts))(x.float())
    scale = want.abs().max()
    assert float((got.double() - want).abs().max() / scale) < 2e-6
    value = ce.sparse_categorical_cross_entropy(x.float(), y, **opts)
    assert abs(float(value) - float(reference(x))) <= 1e-6 * float(reference(x))


def _overflowing_calls(xp: Any) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    conv = to_xp(xp)
    f32 = np.float32
    return [  # (loss, input, target, options): each true value or gradient beyond the dtype
        (
            "binary_cross_entropy",
            conv(np.array([1e-40, 0.5], f32)),
            conv(np.array([1, 0], f32)),
            {},
        ),
        (
            "categorical_cross_entropy",
            conv(np.array([[1e-40, 1 - 1e-7, 0.0]], f32)),
            conv(np.array([[1.0, 0.0, 0.0]], f32)),
            {},
        ),
        (
            "sparse_categorical_cross_entropy",
            conv(np.array([[1e300, 0.0]])),
            conv(np.array([0])),
            {"from_logits": True, "z_loss": 1e-4},
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_an_infinite_true_value_or_gradient_gives_inf_without_a_warning(xp: Any, case: int) -> None:
    """The gradient -1/p of a float32 probability of 1e-40 (-1e40) and the z-loss of a float64
    logit of 1e300 (1e596) lie beyond their dtype: inf, as PyTorch gives, but NumPy also
    warned ("overflow encountered in divide / multiply"), an error under ``-W error``."""
    if case < 2 and "jax" in xp.__name__:
        pytest.skip("XLA flushes float32 subnormals to 0 on the CPU: p = 1e-40 is 0 there")
    name, x, t, opts = _overflowing_calls(xp)[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, grad = ce.value_and_grad(name, x, t, **opts)
    value, grad = to_numpy(value), to_numpy(grad)
    if name == "sparse_categorical_cross_entropy":
        assert np.isposinf(value)
    else:
        assert np.isfinite(value)
        assert np.isneginf(to_numpy(grad).ravel()[0])


_HUGE_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "ignore": {"ignore_index": 1},
    "focal": {"gamma": 2.0},
    "softcap": {"softcap": 5.0},
}


@pytest.mark.parametrize("name", list(_HUGE_OPTIONS))
def test_weighted_mean_of_huge_float32_class_weights(xp: Any, name: str) -> None:
    """float32 class weights near 3e38: the weighted mean sum(w_y l) / sum(w_y) is about 1.3,
    but both sums overflowed to inf and the mean was NaN (with a zero gradient) on NumPy, JAX,
    array-api-strict and crossent's own PyTorch options (PyTorch's own kernel, which
    the plain PyTorch losses run, still gives NaN: documented). The weights of a mean are scaled by
    2**-64 where they exceed 2**64 (exactly: the mean does not change). Value and gradient
    against float64."""
    conv = to_xp(xp)
    opts = _HUGE_OPTIONS[name]
    z = np.array([[1.0, 2.0, 0.5], [0.5, 0.1, 0.3], [0.2, 0.3, 0.1], [0.0, -1.0, 4.0]])
    y = np.array([0, 1, 2, 2])
    w = np.array([3e38, 1e38, 3e38])
    loss = ce.sparse_categorical_cross_entropy
    kwargs = {"from_logits": True, **opts}
    want, want_grad = ce.value_and_grad(loss, z, y, weight=w, **kwargs)
    z32, w32 = conv(z, dtype=xp.float32), conv(w, dtype=xp.float32)
    got = to_numpy(loss(z32, conv(y), weight=w32, **kwargs))
    value, grad = ce.value_and_grad(loss, z32, conv(y), weight=w32, **kwargs)
    if "torch" in xp.__name__ and name in ("plain", "ignore"):
        assert np.isnan(got)  # F.cross_entropy's kernel: NaN, as torch's (docs/differences.md)
        # (smoothed, a NaN of the kernel is recomputed by crossent's row terms)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(value), want, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=2e-5, atol=1e-7)


def test_fused_weighted_mean_of_huge_float32_class_weights() -> None:
    """The same for crossent.fused.linear_cross_entropy's class_weight (NaN before) and
    PyTorch autograd of crossent's own options."""
    torch = pytest.importorskip("torch")
    import crossent.fused as cf

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    head = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 2, 3, 4])
    w = torch.tensor([3e38, 1e38, 3e38, 2e38, 3e38], dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(h @ head.T, y, weight=w)
    h32 = h.float().requires_grad_()
    got = cf.linear_cross_entropy(h32, head.float(), y, class_weight=w.float())
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    got.backward()
    assert torch.isfinite(h32.grad).all()
    z = (h @ head.T).float().requires_grad_()
    own = ce.sparse_categorical_cross_entropy(z, y, from_logits=True, weight=w.float(), gamma=2.0)
    ref = ce.sparse_categorical_cross_entropy(h @ head.T, y, from_logits=True, weight=w, gamma=2.0)
    torch.testing.assert_close(own.double(), ref, rtol=2e-6, atol=0)
    own.backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(_HUGE_OPTIONS))
def test_weighted_mean_of_subnormal_float32_class_weights(xp: Any, name: str) -> None:
    """float32 class weights of 1e-44 (subnormal): the products w_y l kept a digit or two
    (0.857 for 0.862 on NumPy, JAX and array-api-strict). The weights of a mean are scaled by
    2**64 where all lie below 2**-64 (exactly: the mean does not change). PyTorch's own kernel,
    which the plain PyTorch losses run, keeps its rounding (documented)."""
    if "jax" in xp.__name__:
        pytest.skip("XLA on the CPU flushes subnormal inputs to 0: every weight reads 0")
    conv = to_xp(xp)
    opts = _HUGE_OPTIONS[name]
    z = np.array([[1.0, 2.0, 0.5], [0.5, 0.1, 0.3], [0.2, 0.3, 0.1], [0.0, -1.0, 4.0]])
    y = np.array([0, 1, 2, 2])
    w32 = np.array([1e-44, 3e-44, 1e-44], dtype=np.float32)  # subnormal: 7, 21, 7 x 2**-149
    loss = ce.sparse_categorical_cross_entropy
    kwargs = {"from_logits": True, **opts}
    want, want_grad = ce.value_and_grad(loss, z, y, weight=w32.astype(np.float64), **kwargs)
    z32 = conv(z, dtype=xp.float32)
    got = to_numpy(loss(z32, conv(y), weight=conv(w32), **kwargs))
    value, grad = ce.value_and_grad(loss, z32, conv(y), weight=conv(w32), **kwargs)
    if not ("torch" in xp.__name__ and name in ("plain", "smoothing", "ignore")):
        np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(value), want, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(grad), want_grad, rtol=2e-5, atol=1e-7)


def test_fused_weighted_mean_of_subnormal_float32_class_weights() -> None:
    """crossent.fused.linear_cross_entropy's class_weight of 1e-40: 1 / sum(w_y) overflowed
    float32, the loss was inf and the gradient not finite."""
    torch = pytest.importorskip("torch")
    import crossent.fused as cf

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    head = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 2, 3, 4])
    w = torch.tensor([1e-40, 3e-40, 1e-40, 2e-40, 1e-40]).double()  # float32 subnormals
    want = torch.nn.functional.cross_entropy(
        h.float().double() @ head.float().double().T, y, weight=w
    )
    h32 = h.float().requires_grad_()
    got = cf.linear_cross_entropy(h32, head.float(), y, class_weight=w.float())
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    got.backward()
    assert torch.isfinite(h32.grad).all()
