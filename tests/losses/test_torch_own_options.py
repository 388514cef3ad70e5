"""crossent's own options on eager PyTorch (:mod:`crossent._backends._torch_rows`).

z-loss, softcap and the focal factor (with and without label smoothing) are
computed from ``log_softmax`` row terms with a closed-form, chunked gradient.
References: the float64 class-by-class loss of ``tests/_reference`` (values),
finite differences (``gradcheck`` / ``gradgradcheck``: the closed-form gradient
and double backward), and the generic differentiable statistics (gradients,
masked classes, chunking).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
from crossent._backends import _torch as torch_exec  # noqa: E402
from crossent._backends import _torch_rows  # noqa: E402
from crossent._lib._xp import array_namespace  # noqa: E402
from crossent._losses._options import make_options  # noqa: E402
from crossent._losses._sparse import _forward  # noqa: E402
from tests._reference import categorical as ref  # noqa: E402

N, C = 7, 6

OPTIONS = {
    "zloss-softcap": {"z_loss": 0.05, "softcap": 3.0},
    "focal": {"gamma": 2.0},
    "focal-half": {"gamma": 0.5, "z_loss": 0.1},
    "focal-3-weight-ignore": {"gamma": 3.0, "weight": True, "ignore_index": 1},
    "zloss-smooth-weight": {"z_loss": 0.1, "label_smoothing": 0.2, "weight": True},
    "softcap-smooth-ignore": {"softcap": 2.0, "label_smoothing": 0.1, "ignore_index": 0},
    "focal-smooth": {"gamma": 2.0, "label_smoothing": 0.1},
    "focal-smooth-all": {
        "gamma": 1.5, "label_smoothing": 0.3, "z_loss": 0.1, "softcap": 4.0,
        "weight": True, "ignore_index": 2,
    },
}  # fmt: skip


def _case(name: str, seed: int = 0, n: int = N, c: int = C) -> tuple[Any, Any, Any, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    options = dict(OPTIONS[name])
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    w = (
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        if options.pop("weight", False)
        else None
    )
    if "ignore_index" in options:
        y[1] = options["ignore_index"]
        y[3] = options["ignore_index"]
    return x, y, w, options


def _loss(x: Any, y: Any, w: Any, options: dict[str, Any], reduction: str = "mean") -> Any:
    return ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, weight=w, reduction=reduction, **options
    )


def _generic(x: Any, y: Any, w: Any, options: dict[str, Any], reduction: str = "mean") -> Any:
    """The generic array-API loss (differentiable by autograd): the gradient reference."""
    opts = make_options(from_logits=True, reduction=reduction, **options)
    return _forward(x, y, weight=w, axis=1, opts=opts, xp=array_namespace(x))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_value_matches_the_float64_reference(name: str, reduction: str) -> None:
    x, y, w, options = _case(name)
    expected = ref.sparse_ce(
        x.numpy(), y.numpy(), from_logits=True, axis=1,
        weight=None if w is None else w.numpy(), reduction=reduction, **options,
    )  # fmt: skip
    for grad in (False, True):
        xx = x.clone().requires_grad_(grad)
        out = _loss(xx, y, w, options, reduction)
        assert out.dtype == torch.float64
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_gradient_matches_autodiff_of_the_generic_formula(name: str, reduction: str) -> None:
    x, y, w, options = _case(name, seed=1)
    upstream = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    grads = []
    for fn in (_loss, _generic):
        xx = x.clone().requires_grad_(True)
        (fn(xx, y, w, options, reduction) * upstream.double()).sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["zloss-softcap", "focal-half", "focal-smooth-all"])
def test_gradcheck_and_gradgradcheck(name: str) -> None:
    """The closed-form backward and its double backward against finite differences."""
    x, y, w, options = _case(name, seed=2)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _loss(v, y, w, options), (x,))
    assert torch.autograd.gradgradcheck(lambda v: _loss(v, y, w, options), (x,))
    assert torch.autograd.gradcheck(lambda v: _loss(v, y, w, options, "none"), (x,))


@pytest.mark.parametrize(
    "name", ["zloss-softcap", "focal", "focal-smooth-all", "zloss-smooth-weight"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunks_give_the_single_chunk_result(
    name: str, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row chunks (and the backward-kernel gradient of large chunks) change nothing."""
    x, y, w, options = _case(name, seed=3, n=40, c=9)
    upstream = torch.randn(40, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    results = []
    for chunk, kernel_grad in ((1 << 18, 1 << 14), (4 * 9, 1)):
        monkeypatch.setattr(_torch_rows, "_CHUNK", chunk)
        monkeypatch.setattr(_torch_rows, "_CHUNK_LOSS", chunk)
        monkeypatch.setattr(_torch_rows, "_KERNEL_GRAD", kernel_grad)
        xx = x.clone().requires_grad_(True)
        out = _loss(xx, y, w, options, reduction)
        (out * upstream.double()).sum().backward()
        with torch.no_grad():
            forward_only = _loss(x, y, w, options, reduction)
        results.append((out.detach(), forward_only, xx.grad))
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_upstream_gradient_and_a_second_backward() -> None:
    """A scalar upstream gradient scales the early gradient; retain_graph recomputes it."""
    x, y, w, options = _case("focal-3-weight-ignore", seed=4)
    xx = x.clone().requires_grad_(True)
    loss = _loss(xx, y, w, options)
    (g1,) = torch.autograd.grad(loss * 0.25, xx, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xx)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(_generic(xr, y, w, options), xr)
    torch.testing.assert_close(g2, gr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, 0.25 * gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["zloss-softcap", "focal", "focal-smooth-all"])
def test_low_precision_is_computed_in_float32(dtype: Any, name: str, reduction: str) -> None:
    """float32 / bfloat16 logits: the float64 result of the same logits, rounded once-ish; the
    result in the input's dtype (float32 under autocast), the upstream gradient in it too."""
    x, y, w, options = _case(name, seed=5, n=33, c=50)
    xl = x.to(dtype)
    wl = None if w is None else w.float()
    up = torch.randn(33, generator=torch.Generator().manual_seed(1)).to(dtype)
    up = up if reduction == "none" else up[0]
    xr = xl.double().requires_grad_(True)
    exact = _generic(xr, y, None if w is None else wl.double(), options, reduction)
    exact.backward(up.double())
    xx = xl.clone().requires_grad_(True)
    out = _loss(xx, y, wl, options, reduction)
    out.backward(up)
    assert out.dtype == dtype
    assert xx.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), exact.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xx.grad.double(), xr.grad.to(dtype).double(), rtol=tol, atol=tol)
    xa = x.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _loss(xa, y, wl, options, reduction)
    assert auto.dtype == torch.float32
    auto.backward(up.float())
    assert xa.grad.dtype == torch.bfloat16


def test_masked_classes_and_softcap() -> None:
    """A -inf logit stays masked under softcap: probability 0, zero gradient there."""
    x, y, _, _ = _case("zloss-softcap", seed=6)
    x[:, 0] = -torch.inf
    y = torch.where(y == 0, 1, y)
    options = {"z_loss": 0.05, "softcap": 3.0, "gamma": 1.0}
    xx = x.clone().requires_grad_(True)
    out = _loss(xx, y, None, options)
    out.backward()
    expected = ref.sparse_ce(x.numpy(), y.numpy(), from_logits=True, axis=1, **options)
    np.testing.assert_allclose(out.item(), expected, rtol=1e-12)
    assert torch.all(xx.grad[:, 0] == 0)
    assert torch.isfinite(xx.grad).all()


def test_nan_and_non_finite_logits_take_the_guarded_formula() -> None:
    x, y, _, options = _case("focal-half", seed=7)
    x[2, 3] = torch.nan
    assert torch.isnan(_loss(x, y, None, options, "none")[2])
    x[2, 3] = torch.inf  # +inf at a class that is not the label: that row's loss is +inf
    y[2] = 0
    row = _loss(x, y, None, {"z_loss": 0.1}, "none")
    assert row[2] == torch.inf
    assert torch.isfinite(row[[0, 1, 3, 4, 5, 6]]).all()


def test_all_ignored_mean_is_zero_with_a_zero_gradient() -> None:
    x, _, _, _ = _case("focal", seed=8)
    y = torch.full((N,), -100)
    for options in ({"gamma": 2.0}, {"z_loss": 0.1, "softcap": 2.0, "label_smoothing": 0.1}):
        xx = x.clone().requires_grad_(True)
        out = _loss(xx, y, None, {**options, "ignore_index": -100})
        out.backward()
        assert out.item() == 0.0
        assert torch.all(xx.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_mean_over_counted_targets_of_weight_zero_is_zero(dtype: Any, compiled: bool) -> None:
    """Counted targets whose class weights are all 0: the weighted mean's denominator is 0
    while smoothing and the z-loss make the numerator nonzero. The PyTorch executor returned
    the sum (0.0822 with label_smoothing=0.1, 0.0777 with z_loss=0.01) where NumPy, JAX and
    the fused and vocabulary-parallel losses give 0 with a zero gradient."""
    x = torch.tensor([[1.0, 2.0, 0.5], [0.3, 0.2, 0.1]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for options in (
        {"label_smoothing": 0.1},
        {"z_loss": 0.01},
        {"softcap": 3.0, "label_smoothing": 0.1},
        {"gamma": 2.0, "label_smoothing": 0.1},
        {"ignore_index": 1, "label_smoothing": 0.1},
    ):
        want = ce.sparse_categorical_cross_entropy(
            x.numpy(), y.numpy(), from_logits=True, weight=w.numpy(), **options
        )
        assert float(want) == 0.0
        xx = x.to(dtype, copy=True).requires_grad_(True)

        def loss(z: Any, options: dict[str, Any] = options) -> Any:
            return ce.sparse_categorical_cross_entropy(
                z, y, from_logits=True, weight=w.to(dtype), **options
            )

        if compiled:
            torch._dynamo.reset()  # one compilation per option set, not recompilations
        out = (torch.compile(loss, backend="eager", fullgraph=True) if compiled else loss)(xx)
        (grad,) = torch.autograd.grad(out, xx)
        assert out.detach().item() == 0.0, options
        assert torch.all(grad == 0), options


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("options", [{"gamma": 2.0}, {"z_loss": 0.1, "label_smoothing": 0.1}])
def test_bad_labels_raise_crossents_message(grad: bool, options: dict[str, Any]) -> None:
    x = torch.randn(4, 5, requires_grad=grad)
    for bad in (7, -3):
        y = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 5\)"):
            _loss(x, y, None, options)
    y = torch.tensor([0, 1, -100, 2])
    assert torch.isfinite(_loss(x, y, None, {**options, "ignore_index": -100}))


def test_class_axis_and_batch_shapes() -> None:
    """Class axis 1 of (N, C, d) logits: the flat result, reshaped like the target."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 4), generator=g)
    options = {"gamma": 2.0, "z_loss": 0.1}
    out = ce.sparse_categorical_cross_entropy(
        x, y, from_logits=True, axis=1, reduction="none", **options
    )
    expected = ref.sparse_ce(
        x.numpy(), y.numpy(), from_logits=True, axis=1, reduction="none", **options
    )
    assert out.shape == y.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_traced_calls_take_the_differentiable_formula() -> None:
    """Under torch.func the eager executor stands aside (values cannot be read)."""
    x, y, w, options = _case("focal-3-weight-ignore", seed=10)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda v, t: _loss(v[None], t[None], w, options, "sum"))
    )(x, y)
    loop = torch.stack(
        [
            torch.func.grad(lambda v, t=t: _loss(v[None], t[None], w, options, "sum"))(v)
            for v, t in zip(x, y, strict=True)
        ]
    )
    torch.testing.assert_close(per_sample, loop)
    assert torch_exec._host_readable(x)


@pytest.mark.parametrize(
    "options",
    [{"z_loss": 1e-3}, {"softcap": 5.0}, {"gamma": 2.0}, {"z_loss": 1e-3, "ignore_index": -1}],
)
def test_compiled_own_options_refuse_a_label_outside_the_classes(options: dict[str, Any]) -> None:
    """Compiled, crossent's own options (z-loss, softcap, focal) gave a number for a label
    of C (1.2251 for 4 x 5 logits and labels 0, 1, 2, 9), although the loss is never a number
    for such a label, eagerly or with validation off: the traced row statistics skipped the
    check and gathered no logit. Now a device-side assertion fails, as torch's own kernels'."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=gen)
    fn = torch.compile(
        lambda z, y: ce.sparse_categorical_cross_entropy(z, y, from_logits=True, **options),
        fullgraph=True,
        backend="aot_eager",  # "eager" runs the graph's loss node eagerly: its ValueError
    )
    good = torch.tensor([0, 1, -1 if "ignore_index" in options else 2, 3])
    torch.testing.assert_close(
        fn(z, good), ce.sparse_categorical_cross_entropy(z, good, from_logits=True, **options)
    )
    # compiled: C unnamed (a symbolic class count would specialise the graph)
    with pytest.raises(RuntimeError, match=r"`target` has labels outside \[0, C\)"):
        fn(z, torch.tensor([0, 1, 2, 9]))


@pytest.mark.parametrize("changed", ["target", "weight"])
@pytest.mark.parametrize("name", ["zloss-softcap", "focal", "focal-smooth-all"])
def test_a_target_or_weight_changed_in_place_before_backward_is_an_error(
    name: str, changed: str
) -> None:
    """Backward of "none" recomputes the row terms from the labels and class weights: it read
    a target changed since forward (z-loss: d/dz[0] = [0.0132, ..., -0.4814] instead of
    [-0.5988, ..., 0.1306]); PyTorch's own losses raise, as a changed input does."""
    x, y, w, options = _case(name)
    w = torch.rand(C, dtype=torch.float64) + 0.5 if w is None else w
    x.requires_grad_(True)
    loss = _loss(x, y, w, options, reduction="none")
    with torch.no_grad():
        if changed == "target":
            y[0] = (y[0] + 1) % C
        else:
            w.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss.sum(), [x])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"gamma": 2.0}])
def test_z_loss_of_a_label_far_below_the_row_max(dtype: Any, options: dict[str, Any]) -> None:
    """z-loss with a label on a class masked by -1e9 (eager CPU executor): the row's L was
    formed as z_y + (-log p_y) = -1e9 + (1e9 + 2.24), which cancels: float32 L came out 0,
    the gradient [0.818, 0.182, -1] against [0.854, 0.190, -1] (4 % off, silently). Now
    torch.logsumexp; value and gradient as value_and_grad's in float64."""
    z = torch.tensor([[2.0, 0.5, -1e9], [1.0, 0.0, -3.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([2, 0])
    kw = {"from_logits": True, "z_loss": 0.01, "reduction": "sum", **options}
    loss = ce.sparse_categorical_cross_entropy(z, y, **kw)
    loss.backward()
    value, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, z.detach().double().numpy(), y.numpy(), **kw
    )
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    np.testing.assert_allclose(loss.item(), value, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    np.testing.assert_allclose(z.grad.double().numpy(), grad, **tol)


@pytest.mark.parametrize("direct", [0, 1 << 12], ids=["from_nll", "logsumexp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_loss_without_a_gradient_takes_an_exact_log_sum_exp(
    dtype: Any, direct: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss alone forms the z-loss's L from the cross-entropy kernel's -log p_y (z_y +
    (-log p_y), checked, else torch.logsumexp), or for small chunks with torch.logsumexp at
    once (_LSE_DIRECT): both equal value_and_grad's float64 value, a label far below the row
    max (where z_y + (-log p_y) cancels) and a NaN row included."""
    monkeypatch.setattr(_torch_rows, "_LSE_DIRECT", direct)
    rows = [[2.0, 0.5, -1e9], [1.0, 0.0, -3.0], [30.0, -2.0, 4.0]]
    y = torch.tensor([2, 0, 1])
    kw = {"from_logits": True, "z_loss": 0.01, "reduction": "none"}
    # the masked class's weight 0 leaves the row's loss to the (unweighted) z-loss term, where
    # an L of z_y + (-log p_y) = -1e9 + (1e9 + 2.24) shows: float32 gave 0
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=dtype)
    for softcap, w in ((None, None), (None, weight), (50.0, weight)):
        z = torch.tensor(rows, dtype=dtype)
        with torch.no_grad():
            got = ce.sparse_categorical_cross_entropy(z, y, softcap=softcap, weight=w, **kw)
        want = ce.sparse_categorical_cross_entropy(
            z.double().numpy(),
            y.numpy(),
            softcap=softcap,
            weight=None if w is None else w.double().numpy(),
            **kw,
        )
        rtol = 1e-6 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol)
    z = torch.tensor([[1.0, math.nan, 0.0], [1.0, 0.0, -3.0]], dtype=dtype)
    with torch.no_grad():
        got = ce.sparse_categorical_cross_entropy(z, y[:2], **kw)
    assert math.isnan(got[0])
    assert math.isfinite(got[1])
