"""A row of logits holding NaN or +inf, or -inf throughout: one NaN rule on every path.

PyTorch's ``F.cross_entropy`` gives such a row a NaN gradient throughout (its
``log_softmax`` is NaN, times any upstream gradient, 0 included), counted or ignored; an
ignored row's loss stays out of the value. crossent follows it on every path, with one
documented exception kept here: an ignored row of -inf only (a masked padding position)
has a zero gradient. (The fused and Triton paths: ``tests/fused``; vocabulary-parallel:
``tests/distributed``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import crossent as ce
from tests.losses.test_masked_target import _PYTORCH_OPTIONS

torch = pytest.importorskip("torch")

INF = float("inf")
BAD_ROWS = {
    "nan": [float("nan"), 0.5, 1.0, -1.0],
    "+inf": [INF, 0.5, 1.0, -1.0],
    "nan-and-inf": [INF, float("nan"), -INF, 1.0],
    "-inf": [-INF] * 4,
}
# the other rows are ordinary (one with a masked class); row 0 is the bad one
REST = np.array([[0.5, 1.0, -1.0, 2.0], [0.0, -INF, 3.0, 1.0]])
REST_Y = np.array([1, 2])

OPTIONS = _PYTORCH_OPTIONS  # every option of the sparse loss, for 4 classes

PATHS = [
    "numpy-vg",
    "strict-vg",
    "jax-vg",
    "jax-grad",
    "jax-jit",
    "torch-vg",
    "eager",
    "accelerator",
    "func",
    "compiled",
]


def _options(options: dict[str, Any], convert: Callable[[Any], Any]) -> dict[str, Any]:
    return {k: convert(np.array(v)) if isinstance(v, list) else v for k, v in options.items()}


def _grad(path: str, z: np.ndarray, y: np.ndarray, options: dict[str, Any]) -> tuple[Any, Any]:
    """(loss, gradient) of the summed loss of float64 logits `z`, as NumPy, on `path`."""
    from tests.losses.test_torch_differential import _accelerator

    loss = ce.sparse_categorical_cross_entropy
    kw = {"from_logits": True, "ignore_index": -100, "reduction": "sum"}
    if path in {"numpy-vg", "strict-vg", "jax-vg", "torch-vg"}:
        if path == "strict-vg":
            xs = pytest.importorskip("array_api_strict")
            conv: Callable[[Any], Any] = xs.asarray
        elif path == "jax-vg":
            conv = _jnp().asarray
        elif path == "torch-vg":
            conv = torch.asarray
        else:
            conv = np.asarray
        value, grad = ce.value_and_grad(loss, conv(z), conv(y), **kw, **_options(options, conv))
        return _np(value), _np(grad)
    if path.startswith("jax"):
        jax = pytest.importorskip("jax")
        jnp = _jnp()
        opts = _options(options, jnp.asarray)

        def f(v: Any) -> Any:
            return loss(v, jnp.asarray(y), **kw, **opts)

        g = jax.grad(f)
        g = jax.jit(g) if path == "jax-jit" else g
        return _np(f(jnp.asarray(z))), _np(g(jnp.asarray(z)))
    opts = _options(options, lambda a: torch.asarray(a, dtype=torch.float64))

    def t_loss(v: Any) -> Any:
        return loss(v, torch.asarray(y), **kw, **opts)

    x = torch.asarray(z)
    if path == "func":
        return _np(t_loss(x)), _np(torch.func.grad(t_loss)(x))
    fn = (
        torch.compile(t_loss, fullgraph=True, backend="aot_eager") if path == "compiled" else t_loss
    )
    x.requires_grad_(True)
    with _accelerator(path == "accelerator"):
        value = fn(x)
        (g,) = torch.autograd.grad(value, x)
    return _np(value), _np(g)


def _jnp() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp


def _np(a: Any) -> np.ndarray:
    from tests.conftest import to_numpy

    return np.asarray(to_numpy(a), dtype=np.float64)


def _cases(counted: bool) -> list[Any]:
    out = []
    for path in PATHS:
        for bad in BAD_ROWS:
            for name, options in OPTIONS.items():
                if path == "compiled" and name not in {"plain", "z_loss", "focal-smooth"}:
                    continue  # compiling is slow: the three kinds of executor
                if bad == "-inf" and not counted:
                    continue  # test_masked_target: a zero gradient
                out.append(pytest.param(path, bad, name, options, id=f"{path}-{bad}-{name}"))
    return out


def _check(path: str, bad: str, options: dict[str, Any], label: int) -> None:
    z = np.concatenate([np.array([BAD_ROWS[bad]]), REST])
    y = np.concatenate([[label], REST_Y])
    if path == "compiled":
        torch._dynamo.reset()
    value, grad = _grad(path, z, y, options)
    _, expected = _grad(path, REST, REST_Y, options)
    capped = "softcap" in options and bad == "+inf"  # c tanh(+inf / c) = c: a finite row
    if not capped:
        assert np.isnan(grad[0]).all(), grad[0]
    np.testing.assert_allclose(grad[1:], expected, rtol=1e-12, atol=1e-15)
    if label == -100:  # an ignored row stays out of the value
        np.testing.assert_allclose(value, _grad(path, REST, REST_Y, options)[0], rtol=1e-12)
    elif not capped:
        assert not np.isfinite(value)


@pytest.mark.parametrize(("path", "bad", "name", "options"), _cases(counted=False))
def test_an_ignored_row_holding_nan_or_inf_has_a_nan_gradient_throughout(
    path: str, bad: str, name: str, options: dict[str, Any]
) -> None:
    """An ignored row holding NaN or +inf: loss out of the value, gradient NaN throughout, as
    ``F.cross_entropy``'s. value_and_grad (NumPy, array-api-strict, JAX, PyTorch) gave NaN
    only at the NaN entry and 0 elsewhere ([nan, 0, 0, 0]: its statistics were replaced by
    a row of zeros'), and so did PyTorch's autograd with z-loss, focal or softcap under
    torch.compile, torch.func and on an accelerator, while the eager kernels gave NaN
    throughout."""
    _check(path, bad, options, -100)


@pytest.mark.parametrize(("path", "bad", "name", "options"), _cases(counted=True))
def test_a_counted_row_without_a_finite_max_has_a_nan_gradient_throughout(
    path: str, bad: str, name: str, options: dict[str, Any]
) -> None:
    """A counted row holding NaN or +inf, or of -inf only: loss NaN (or +inf), gradient NaN
    throughout, as ``F.cross_entropy``'s and value_and_grad's. PyTorch's autograd with z-loss,
    focal or softcap (and JAX's autodiff) gave a partly finite row ([nan, 0.28, 0, 0] for
    z-loss of [nan, .5, 1, -1], [0, 0, 0, 0] with softcap of a row of -inf): the generic
    formula shifted the row by 0 where its max was not finite, and a where stopped the NaN."""
    _check(path, bad, options, 0)


@pytest.mark.parametrize("path", ["numpy-vg", "torch-vg", "jax-vg", "jax-grad", "jax-jit", "eager"])
@pytest.mark.parametrize("bad", list(BAD_ROWS))
@pytest.mark.parametrize(
    ("loss", "options"),
    [
        ("categorical", {"from_logits": True}),
        ("categorical", {"from_logits": True, "gamma": 2.0}),
        ("categorical", {"from_logits": True, "label_smoothing": 0.1}),
        ("listnet", {}),
    ],
    ids=["categorical", "categorical-focal", "categorical-smooth", "listnet"],
)
def test_soft_target_row_without_a_finite_max_has_a_nan_gradient_throughout(
    path: str, bad: str, loss: str, options: dict[str, Any]
) -> None:
    """categorical_cross_entropy and listnet_loss from logits, a row holding NaN or +inf or
    of -inf only: loss NaN, gradient NaN throughout, as value_and_grad's and PyTorch's. JAX's
    autodiff gave a finite gradient for the NaN loss ([0.25, -0.3, -0.5] for logits
    [+inf, 1, 0]: the max's own derivative; under jax.jit also for a NaN row), PyTorch's
    autograd of listnet [nan, 0, 0] for a row holding +inf."""
    fn = ce.categorical_cross_entropy if loss == "categorical" else ce.listnet_loss
    z = np.concatenate([np.array([BAD_ROWS[bad]]), REST])
    t = np.array([[0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    if loss == "listnet":
        t = np.array([[2.0, 1.0, 0.0, 3.0], [1.0, 0.0, 2.0, 3.0], [0.0, -INF, 2.0, 1.0]])

    def grad(z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kw = {"reduction": "sum", **options}
        if path.endswith("-vg"):
            conv: Any = {"numpy-vg": np.asarray, "torch-vg": torch.asarray}.get(path)
            conv = conv or _jnp().asarray
            value, g = ce.value_and_grad(fn, conv(z), conv(t), **kw)
            return _np(value), _np(g)
        if path == "eager":
            x = torch.asarray(z).requires_grad_(True)
            value = fn(x, torch.asarray(t), **kw)
            (g,) = torch.autograd.grad(value, x)
            return _np(value), _np(g)
        jax = pytest.importorskip("jax")
        jnp = _jnp()

        def f(v: Any) -> Any:
            return fn(v, jnp.asarray(t), **kw)

        g_fn = jax.jit(jax.grad(f)) if path == "jax-jit" else jax.grad(f)
        return _np(f(jnp.asarray(z))), _np(g_fn(jnp.asarray(z)))

    value, g = grad(z, t)
    _, expected = grad(z[1:], t[1:])
    assert np.isnan(value)
    assert np.isnan(g[0]).all(), g[0]
    np.testing.assert_allclose(g[1:], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("label", [-1, 9])
@pytest.mark.parametrize("name", ["plain", "weight", "z_loss", "focal-smooth"])
@pytest.mark.parametrize("path", ["jax-vg", "jax-jit"])
def test_a_jax_traced_label_outside_the_classes_gives_a_nan_row(
    path: str, name: str, label: int
) -> None:
    """On JAX tracers no label check can raise. JAX's gather wrapped label -1 to the last
    class (a finite, silently wrong loss and gradient) and filled a label past the end with
    NaN but dropped its gradient (a finite gradient row). The row is now NaN in the loss and
    holds NaN in the gradient, as a NaN input's; the other rows are unchanged. (Eagerly the
    check raises; the ValueError is tested with the other bad inputs.)"""
    jax = pytest.importorskip("jax")
    jnp = _jnp()
    z = np.concatenate([np.array([[0.3, -0.2, 1.1, 0.4]]), REST])
    y = np.concatenate([[label], REST_Y])
    kw = {"from_logits": True, "ignore_index": -100, "reduction": "sum"}
    opts = _options(OPTIONS[name], jnp.asarray)

    @jax.jit  # the labels are a tracer too
    def value_and_grad(v: Any, t: Any) -> Any:
        loss = ce.sparse_categorical_cross_entropy
        if path == "jax-vg":
            return ce.value_and_grad(loss, v, t, **kw, **opts)
        return jax.value_and_grad(lambda w: loss(w, t, **kw, **opts))(v)

    value, grad = (_np(a) for a in value_and_grad(jnp.asarray(z), jnp.asarray(y)))
    _, expected = (_np(a) for a in value_and_grad(jnp.asarray(REST), jnp.asarray(REST_Y)))
    assert np.isnan(value)
    assert np.isnan(grad[0]).any(), grad[0]
    np.testing.assert_allclose(grad[1:], expected, rtol=1e-12, atol=1e-15)
