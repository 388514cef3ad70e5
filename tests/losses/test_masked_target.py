"""A label on a masked class (logit -inf): the loss is +inf and every executor gives the same
finite gradient, the closed form's ``a p - b [k=y] - e w`` (a holds z-loss's 2 λ L, the
logsumexp of the row; a soft-capped masked logit is a constant, derivative 0)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import crossent as ce

torch = pytest.importorskip("torch")

Z = np.array([[1.0, 2.0, -np.inf, 0.5], [0.5, -1.0, 0.0, 2.0]])
Y = np.array([2, 0])

OPTIONS = {
    "z_loss": {"z_loss": 0.1},
    "z_loss-smooth": {"z_loss": 0.1, "label_smoothing": 0.1},
    "focal": {"gamma": 2.0},
    "focal-half": {"gamma": 0.5},
    "focal-smooth": {"gamma": 2.0, "label_smoothing": 0.1},
    "focal-z_loss": {"gamma": 2.0, "z_loss": 0.1},
    "softcap": {"softcap": 3.0},
    "softcap-z_loss-smooth": {"softcap": 3.0, "z_loss": 0.1, "label_smoothing": 0.1},
}


def _reference(opts: dict[str, float]) -> np.ndarray:
    """The gradient of the summed loss in float64, written out: row 0's label is masked."""
    eps, lam, gamma, cap = (
        opts.get(k, 0.0) for k in ("label_smoothing", "z_loss", "gamma", "softcap")
    )
    grads = []
    for x, y in zip(Z, Y, strict=True):
        z = np.where(np.isinf(x), x, cap * np.tanh(x / cap)) if cap else x
        m = z.max()
        big_l = m + np.log(np.exp(z - m).sum())
        p = np.exp(z - big_l)
        num = z.size
        # no smoothing: focal b = f (1 + gamma p_y (L - z_y) / (1 - p_y)), 1 where p_y = 0
        p_y = p[y]
        nll = big_l - z[y]
        f = (1 - p_y) ** gamma
        b = (1 - eps) * (f * (1 + gamma * p_y * nll / (1 - p_y)) if p_y > 0 else 1.0)
        if gamma and eps:  # focal with smoothing: every class's term, by autodiff-free sums
            pytest.skip("focal with smoothing: compared between executors only")
        a = b + eps + 2 * lam * big_l
        g = a * p - eps / num
        g[y] -= b
        dz = np.where(np.isinf(x), 0.0, 1 - np.tanh(x / cap) ** 2) if cap else 1.0
        grads.append(g * dz)
    return np.array(grads)


def _executors(opts: dict[str, float]) -> dict[str, np.ndarray]:
    y_t = torch.tensor(Y)

    def loss(x: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            x, y_t, from_logits=True, reduction="sum", **opts
        )

    out = {}
    out["numpy"] = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, Z, Y, from_logits=True, reduction="sum", **opts
    )[1]
    x = torch.tensor(Z, requires_grad=True)
    value = loss(x)
    assert value.item() == np.inf
    value.backward()
    out["torch eager"] = x.grad.numpy()
    x = torch.tensor(Z, requires_grad=True)
    (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
    out["torch create_graph"] = g.detach().numpy()
    out["torch.func.grad"] = torch.func.grad(loss)(torch.tensor(Z)).numpy()
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dev dependency
        return out
    jax.config.update("jax_enable_x64", True)
    y_j = jax.numpy.asarray(Y)
    out["jax.grad"] = np.asarray(
        jax.grad(
            lambda x: ce.sparse_categorical_cross_entropy(
                x, y_j, from_logits=True, reduction="sum", **opts
            )
        )(jax.numpy.asarray(Z))
    )
    return out


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gradient_of_a_label_on_a_masked_class(name: str) -> None:
    opts = OPTIONS[name]
    got = _executors(opts)
    expected = got["numpy"] if "gamma" in opts and "label_smoothing" in opts else _reference(opts)
    assert np.all(np.isfinite(expected))
    for executor, grad in got.items():
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15, err_msg=executor)


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict"])
@pytest.mark.parametrize(
    "options",
    [
        {"weight": [1.0, 1.0, 0.0, 1.0]},
        {"weight": [1.0, 1.0, 0.0, 1.0], "gamma": 2.0, "z_loss": 0.1},
        {"label_smoothing": 1.0},
    ],
    ids=["weight", "weight-focal-z_loss", "smoothing-1"],
)
def test_zero_target_coefficient_on_a_masked_class_does_not_warn(
    backend: str, options: dict[str, Any]
) -> None:
    """A counted label of weight 0 on a masked class adds nothing (its 0 * inf was NaN, as
    PyTorch's kernel still gives: test_zero_weight_label_on_a_masked_class). NumPy formed it
    with 'invalid value encountered in multiply' (the test suite, like any program run with
    warnings as errors, died of it); label_smoothing=1 multiplied the masked label's
    infinite term by 0 before dropping it, with the same warning."""
    xp = np if backend == "numpy" else pytest.importorskip("array_api_strict")
    opts = {k: xp.asarray(v) if k == "weight" else v for k, v in options.items()}
    x, y = xp.asarray(Z), xp.asarray(Y)
    loss = ce.sparse_categorical_cross_entropy
    row = np.asarray(loss(x, y, from_logits=True, reduction="none", **opts))
    value, grad = ce.value_and_grad(loss, x, y, from_logits=True, reduction="none", **opts)
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(Z[1:]),
        torch.tensor(Y[1:]),
        weight=torch.tensor(options["weight"], dtype=torch.float64)
        if "weight" in options
        else None,
        label_smoothing=options.get("label_smoothing", 0.0),
    )
    if "weight" in options:
        # the target term is 0 (weight 0); z-loss (unweighted) stays: 0.1 * lse(row 0)^2
        lse = np.log(np.exp(Z[0][np.isfinite(Z[0])]).sum())
        np.testing.assert_allclose(row[0], options.get("z_loss", 0.0) * lse**2, rtol=1e-12)
    else:
        assert row[0] == np.inf  # the smoothing term of the masked class
    if len(options) == 1:  # the second row as PyTorch
        np.testing.assert_allclose(row[1], expected.item(), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(value), row)
    assert np.isfinite(np.asarray(grad)[1]).all()


@pytest.mark.parametrize(
    "options",
    [{}, {"z_loss": 0.1}, {"gamma": 2.0}, {"label_smoothing": 0.1, "z_loss": 0.1}],
    ids=["plain", "z_loss", "focal", "smooth-z_loss"],
)
def test_closed_form_gradient_of_an_ignored_fully_masked_row_is_zero(
    xp: Any, options: dict[str, Any]
) -> None:
    """An ignored row whose logits are all -inf (a masked padding position): it contributes
    nothing, so its gradient is 0. value_and_grad gave NaN there with z_loss or a focal
    factor (its statistics had no finite max: the coefficients were NaN, times the row's zero
    scale), on NumPy, array-api-strict and PyTorch; now 0 as JAX's autodiff gives. The other
    rows are those of the batch without it."""
    from tests.conftest import to_numpy, to_xp

    conv = to_xp(xp)
    z = np.array([[-np.inf] * 4, [0.5, 1.0, -1.0, 2.0], [0.0, -np.inf, 3.0, 1.0]])
    y = np.array([-100, 1, 2])
    loss = ce.sparse_categorical_cross_entropy
    value, grad = ce.value_and_grad(
        loss, conv(z), conv(y), from_logits=True, ignore_index=-100, **options
    )
    expected_value, expected_grad = ce.value_and_grad(
        loss, z[1:], y[1:], from_logits=True, ignore_index=-100, **options
    )
    np.testing.assert_allclose(to_numpy(value), expected_value, rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(grad)[0], np.zeros(4))
    np.testing.assert_allclose(to_numpy(grad)[1:], expected_grad, rtol=1e-12, atol=1e-15)


_PYTORCH_OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "weight": {"weight": [1.0, 2.0, 0.5, 3.0]},
    "z_loss": {"z_loss": 0.1},
    "focal": {"gamma": 2.0},
    "softcap": {"softcap": 3.0},
    "focal-smooth": {"gamma": 2.0, "label_smoothing": 0.1},
}


@pytest.mark.parametrize(
    ("mode", "reduction", "options"),
    [
        pytest.param(mode, reduction, options, id=f"{mode}-{reduction}-{name}")
        for mode in ["eager", "bfloat16", "accelerator", "compiled", "func"]
        for reduction in ["mean", "none"]
        for name, options in _PYTORCH_OPTIONS.items()
        # compiling is slow: one reduction of the three kinds of executor
        if mode != "compiled"
        or (reduction == "mean" and name in {"plain", "z_loss", "focal-smooth"})
    ],
)
def test_autograd_gradient_of_an_ignored_fully_masked_row_is_zero(
    mode: str, reduction: str, options: dict[str, Any]
) -> None:
    """An ignored row whose logits are all -inf under PyTorch's autograd: its gradient is 0,
    as value_and_grad's and JAX's. It was NaN NaN NaN NaN on every path (F.cross_entropy's
    log_softmax of the row is NaN, times its zero upstream gradient), and NaN 0 0 0 for the
    focal loss on an accelerator. An accelerator's native kernels (no option of crossent's
    own) keep F.cross_entropy's NaN (no pass over the logits for it: documented)."""
    from tests.losses.test_torch_differential import _accelerator

    z = torch.tensor([[-np.inf] * 4, [0.5, 1.0, -1.0, 2.0], [0.0, -np.inf, 3.0, 1.0]])
    y = torch.tensor([-100, 1, 2])
    opts = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in options.items()}
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float64

    def loss(v: Any) -> Any:
        out = ce.sparse_categorical_cross_entropy(
            v, y[-v.shape[0] :], from_logits=True, ignore_index=-100, reduction=reduction, **opts
        )
        return out.sum()

    def grad_of(v: Any) -> Any:
        if mode == "func":
            return torch.func.grad(loss)(v)
        fn = (
            torch.compile(loss, fullgraph=True, backend="aot_eager") if mode == "compiled" else loss
        )
        v = v.clone().requires_grad_(True)
        with _accelerator(mode == "accelerator"):
            (g,) = torch.autograd.grad(fn(v), v)
        return g

    if "weight" in opts:
        opts["weight"] = opts["weight"].to(torch.float32 if mode == "bfloat16" else dtype)
    if mode == "compiled":
        torch._dynamo.reset()  # one code object, compiled for every parameter
    grad = grad_of(z.to(dtype)).double()
    expected = grad_of(z[1:].to(dtype)).double()
    if mode == "accelerator" and set(options) <= {"label_smoothing", "weight"}:
        assert grad[0].isnan().all()  # F.cross_entropy's, documented
    else:
        torch.testing.assert_close(grad[0], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(grad[1:], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"gamma": 2.0}, {"gamma": 2.0, "label_smoothing": 0.1},
     {"z_loss": 0.1}, {"ignore_index": 1}],
    ids=["plain", "smooth", "focal", "focal-smooth", "z_loss", "ignore"],
)  # fmt: skip
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_weight_label_on_a_masked_class(
    xp: Any, options: dict[str, Any], reduction: str
) -> None:
    """A counted label whose class has weight 0 and a logit of -inf: the row adds nothing
    but its smoothing and z-loss terms (a weight of 0 removes the class). The loss was
    NaN (0 * inf) on every backend and path, and JAX's value_and_grad gave the row a NaN
    gradient where the others gave 0. Now the value is that of the other rows plus those
    terms, the gradient that of the row without its target term, on NumPy, JAX,
    array-api-strict, value_and_grad and PyTorch's own options; the plain PyTorch losses
    (F.cross_entropy's kernel) keep its NaN value (docs/differences.md), gradient 0, except
    under smoothing, where a NaN of the kernel is recomputed by crossent's row terms."""
    from tests.conftest import to_numpy, to_xp

    conv = to_xp(xp)
    z = np.array([[1.0, 2.0, -np.inf], [0.5, 0.1, 0.3], [0.2, -0.4, 1.0]])
    y = np.array([2, 0, 2])
    w = np.array([1.0, 0.5, 0.0])
    kw = {"from_logits": True, "reduction": reduction, **options}
    loss = ce.sparse_categorical_cross_entropy
    # the reference: the masked logit as -1e300, a finite -log p_y of 1e300 times weight 0
    # (the same probabilities, exactly 0 on that class, and the same smoothing sum)
    z_ref = np.where(np.isinf(z), -1e300, z)
    ref_value, ref_grad = ce.value_and_grad(loss, z_ref, y, weight=w, **kw)
    value, grad = ce.value_and_grad(loss, conv(z), conv(y), weight=conv(w), **kw)
    np.testing.assert_allclose(to_numpy(value), ref_value, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-12, atol=1e-15)
    got = to_numpy(loss(conv(z), conv(y), weight=conv(w), **kw))
    native = "torch" in xp.__name__ and not {"gamma", "z_loss", "label_smoothing"} & set(options)
    if native:  # F.cross_entropy's kernel: 0 * inf, NaN as torch's (smoothed: recomputed)
        assert np.isnan(got).any()
    else:
        np.testing.assert_allclose(got, ref_value, rtol=1e-12)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1}, {"softcap": 3.0}],
    ids=["plain", "smooth", "z_loss", "softcap"],
)  # fmt: skip
def test_fused_zero_weight_label_on_a_masked_class(options: dict[str, Any]) -> None:
    """The fused loss with a class_weight of 0 on a class masked by a bias of -inf, a
    label on it: the value and the hidden gradient of value_and_grad on the logits."""
    import crossent.fused as cf

    h = torch.tensor(
        [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.3, 0.2, 1.0]], dtype=torch.float64
    ).requires_grad_()
    head = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.1, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, -np.inf], dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    w = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    value = cf.linear_cross_entropy(h, head, y, bias=bias, class_weight=w, **options)
    value.backward()
    z = (h @ head.T + bias).detach().numpy()
    want, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, z, y.numpy(), from_logits=True, weight=w.numpy(),
        **options,
    )  # fmt: skip
    assert np.isfinite(want)
    np.testing.assert_allclose(value.item(), want, rtol=1e-12)
    np.testing.assert_allclose(h.grad.numpy(), grad @ head.numpy(), rtol=1e-12, atol=1e-15)
