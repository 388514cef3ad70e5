"""PyTorch transforms: double backward, autocast, label widths, compile, export, torch.func."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
import crossent.nn as cnn  # noqa: E402
from tests._compiled import eager_and_compiled  # noqa: E402

N, C = 6, 5


def _data(dtype: Any = torch.float64, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    probs = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1).to(dtype)
    w = torch.rand(C, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return x, y, probs, w


def _losses() -> dict[str, Callable[[Any], Any]]:
    """name -> loss of logits `x` (float64), every family and option mix."""
    _x, y, probs, w = _data()
    hard = torch.where(y < 0, 0, y)
    binary_t = (probs > 0.2).double()
    sparse = functools.partial(
        ce.sparse_categorical_cross_entropy, target=y, from_logits=True, ignore_index=-100
    )
    return {
        "sparse": lambda v: sparse(v, weight=w, label_smoothing=0.1),
        "sparse-none": lambda v: sparse(v, reduction="none"),
        "sparse-sum": lambda v: sparse(v, weight=w, reduction="sum"),
        "sparse-focal": lambda v: sparse(v, gamma=2.0, weight=w),
        "sparse-focal-smooth": lambda v: sparse(v, gamma=1.5, label_smoothing=0.2),
        "sparse-zloss-softcap": lambda v: sparse(v, z_loss=0.1, softcap=3.0, label_smoothing=0.1),
        "sparse-probs": lambda v: ce.sparse_categorical_cross_entropy(torch.softmax(v, -1), hard),
        "categorical": lambda v: ce.categorical_cross_entropy(
            v, probs, from_logits=True, weight=w, label_smoothing=0.1
        ),
        "categorical-focal": lambda v: ce.categorical_cross_entropy(
            v, probs, from_logits=True, gamma=2.0
        ),
        "binary": lambda v: ce.binary_cross_entropy(
            v, binary_t, from_logits=True, pos_weight=w, weight=w
        ),
        "binary-focal": lambda v: ce.binary_cross_entropy(
            v, binary_t, from_logits=True, gamma=2.0, alpha=0.25, label_smoothing=0.1
        ),
        "binary-probs": lambda v: ce.binary_cross_entropy(torch.sigmoid(v), binary_t),
        "listnet": lambda v: ce.listnet_loss(v, probs * 3),
        "nn-cross-entropy": lambda v: cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(v, y),
        "nn-focal": lambda v: cnn.FocalLoss(weight=w)(v, y),
        "nn-nll": lambda v: cnn.NLLLoss(weight=w)(torch.log_softmax(v, 1), y),
        "nn-bce-with-logits": lambda v: cnn.BCEWithLogitsLoss(pos_weight=w)(v, binary_t),
        "nn-binary-focal": lambda v: cnn.BinaryFocalLoss(alpha=0.25)(v, binary_t),
    }


LOSSES = list(_losses())


# --------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("name", LOSSES)
def test_gradgradcheck(name: str) -> None:
    """Second derivatives are exact (finite differences of the gradient, float64)."""
    loss = _losses()[name]
    x = _data()[0].requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"ignore_index": 1}, {"reduction": "sum"}],
    ids=["plain", "smoothing", "ignore", "sum"],
)
def test_gradient_penalty_matches_torch(options: dict[str, Any]) -> None:
    """The issue's example: a gradient penalty's parameter gradients equal PyTorch's."""
    x, y, _, w = _data()
    y = torch.where(y < 0, 0, y)
    weights = []
    for fn in (F.cross_entropy, cnn.CrossEntropyLoss(weight=w, **options)):
        lin = torch.nn.Linear(C, C, dtype=torch.float64)
        torch.nn.init.constant_(lin.weight, 0.3)
        torch.nn.init.constant_(lin.bias, 0.1)
        inp = x.clone().requires_grad_(True)
        logits = lin(inp)
        loss = (
            fn(logits, y, weight=w, **options) if fn is F.cross_entropy else fn(logits, y)  # type: ignore[operator]
        )
        (g,) = torch.autograd.grad(loss, inp, create_graph=True)
        (g.pow(2).sum() + loss).backward()
        weights.append(lin.weight.grad.clone())
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "name", ["sparse", "sparse-focal", "categorical", "binary", "listnet", "nn-cross-entropy"]
)
def test_autocast_computes_and_returns_float32(name: str) -> None:
    loss = _losses()[name]
    x = _data()[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(x.to(torch.bfloat16).double()).float())
    assert loss(x.to(torch.bfloat16)).dtype == torch.bfloat16  # outside autocast: input's dtype


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8], ids=str
)
@pytest.mark.parametrize("options", [{}, {"gamma": 2.0, "z_loss": 0.1}], ids=["plain", "focal"])
def test_every_integer_label_width(dtype: Any, options: dict[str, Any]) -> None:
    x, y, _, w = _data()
    y = torch.where(y < 0, 3, y)
    x.requires_grad_(True)
    expected = ce.sparse_categorical_cross_entropy(x, y, from_logits=True, weight=w, **options)
    (g_expected,) = torch.autograd.grad(expected, x)
    got = ce.sparse_categorical_cross_entropy(x, y.to(dtype), from_logits=True, weight=w, **options)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)
    nll = cnn.NLLLoss(weight=w)(torch.log_softmax(x, 1), y.to(dtype))
    torch.testing.assert_close(nll, cnn.NLLLoss(weight=w)(torch.log_softmax(x, 1), y))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64], ids=str)
@pytest.mark.parametrize("options", [{}, {"gamma": 2.0}], ids=["plain", "focal"])
def test_bad_labels_raise_the_clear_error_eagerly(dtype: Any, options: dict[str, Any]) -> None:
    x = _data()[0]
    y = torch.tensor([0, 1, 2, 3, 4, 7], dtype=dtype)
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 5\).*max=7"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True, **options)
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 5\)"):
        cnn.CrossEntropyLoss(**options)(x, y)


def test_no_ignore_index_does_not_ignore_minus_100() -> None:
    """Without `ignore_index` a label of -100 is out of range, not silently skipped."""
    x = _data()[0]
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    with pytest.raises(ValueError, match="outside"):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True)
    with ce.validation(False), pytest.raises((IndexError, RuntimeError)):
        ce.sparse_categorical_cross_entropy(x, y, from_logits=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_mean_is_computed_in_float32(dtype: Any) -> None:
    """Large rows in half precision: value and gradient within rounding of the float64 result."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 300, generator=g) * 4).to(dtype).requires_grad_(True)
    y = torch.randint(0, 300, (64,), generator=g)
    loss = ce.sparse_categorical_cross_entropy(x, y, from_logits=True)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x64, y)
    (g64,) = torch.autograd.grad(ref, x64)
    assert loss.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert abs(loss.double() - ref) <= eps * abs(ref)
    assert ((grad.double() - g64).abs() <= eps * g64.abs() + 1e-7).all()


# --------------------------------------------------------------------------- compile and export


COMPILED = [
    "sparse",
    "sparse-none",
    "sparse-focal-smooth",
    "sparse-zloss-softcap",
    "sparse-probs",
    "categorical",
    "binary",
    "binary-probs",
    "listnet",
    "nn-cross-entropy",
    "nn-focal",
    "nn-nll",
    "nn-bce-with-logits",
]


@pytest.mark.parametrize("name", COMPILED)
def test_no_graph_break_with_validation_on(name: str) -> None:
    torch._dynamo.reset()
    loss = _losses()[name]
    assert ce.get_validation()
    explanation = torch._dynamo.explain(loss)(_data()[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "name",
    ["sparse", "sparse-focal", "categorical", "nn-cross-entropy", "binary", "binary-focal"],
)
def test_compiled_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    loss = _losses()[name]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        x = _data()[0].requires_grad_(True)
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        results.append((value, grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiled_cross_entropy_equals_eager() -> None:
    torch._dynamo.reset()
    x, y, _, w = _data(torch.float32)
    module = cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    compiled = torch.compile(module, fullgraph=True)
    xr = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    eager, got = module(xr, y), compiled(xc, y)
    eager.backward()
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(xc.grad, xr.grad)


def test_export_of_a_module_using_cross_entropy() -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(C, C, dtype=torch.float64)
            self.loss = cnn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x: Any, y: Any) -> Any:
            return self.loss(self.head(x), y)

    model = Model()
    x, y, _, _ = _data()
    program = torch.export.export(model, (x, y))
    torch.testing.assert_close(program.module()(x, y), model(x, y))


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize(
    "options",
    [{}, {"ignore_index": -100, "label_smoothing": 0.1}, {"gamma": 2.0, "z_loss": 0.01}],
    ids=["plain", "ignore-smoothing", "focal-zloss"],
)
def test_vmap_grad_per_sample_gradients_equal_a_loop(options: dict[str, Any]) -> None:
    x, y, _, w = _data()
    y = torch.where(y < 0, 0, y) if "ignore_index" not in options else y

    def sample_loss(v: Any, t: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(
            v[None], t[None], from_logits=True, weight=w, **options
        )

    per_sample = torch.func.vmap(torch.func.grad(sample_loss))(x, y)
    loop = torch.stack([torch.func.grad(sample_loss)(x[i], y[i]) for i in range(N)])
    eager = []
    for i in range(N):
        xi = x[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sample_loss(xi, y[i]), xi)
        eager.append(g)
    torch.testing.assert_close(per_sample, loop)
    torch.testing.assert_close(per_sample, torch.stack(eager))


def test_vmap_grad_of_a_module() -> None:
    x, y, _probs, _ = _data()
    y = torch.where(y < 0, 0, y)
    module = cnn.CrossEntropyLoss()

    def sample_loss(v: Any, t: Any) -> Any:
        return module(v[None], t[None])

    per_sample = torch.func.vmap(torch.func.grad(sample_loss))(x, y)
    expected = torch.softmax(x, -1) - F.one_hot(y, C)
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize("options", [{}, {"gamma": 2.0, "weight": "w"}], ids=["plain", "focal"])
def test_compiled_binary_with_infinite_logits_equals_eager(options: dict[str, Any]) -> None:
    """±inf logits with the matching hard target: loss 0 and gradient 0 there, compiled
    (shared log-sigmoid form, masks read off the logits) exactly as eagerly."""
    torch._dynamo.reset()
    x = torch.tensor([[-math.inf, math.inf, 0.5], [2.0, -3.0, -math.inf]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    kw = {
        k: (torch.full((3,), 0.5, dtype=torch.float64) if v == "w" else v)
        for k, v in options.items()
    }

    def loss(v: Any) -> Any:
        return ce.binary_cross_entropy(v, t, from_logits=True, reduction="none", **kw)

    results = eager_and_compiled(loss, x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-15, atol=0)
    value, grad = results[0]
    assert value[0, 0] == 0
    assert value[0, 1] == 0
    assert value[1, 2] == 0
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "options",
    [
        {"gamma": 2.0, "label_smoothing": 0.1},
        {"gamma": 0.5, "label_smoothing": 0.1, "weight": [1.0, 1.0, 0.0, 1.0, 1.0]},
    ],
    ids=["focal-smooth", "focal-smooth-weight"],
)
def test_compiled_focal_smoothing_with_masked_classes_equals_the_closed_form(
    options: dict[str, Any],
) -> None:
    """Focal loss with label smoothing and a masked (-inf) class, a label on a masked class in
    row 1: compiled (fullgraph) values and gradients equal eager and NumPy's closed form, the
    gradients finite (reported once: a NaN compiled gradient where eager's was finite)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x[:, 2] = -math.inf
    x[1, 4] = -math.inf
    y = torch.tensor([0, 4, 3, 1])
    kw = {
        k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v for k, v in options.items()
    }

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v, y, from_logits=True, reduction="none", **kw)

    results = eager_and_compiled(loss, x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-15)
    np_kw = {k: np.asarray(v) if k == "weight" else v for k, v in options.items()}
    value, grad = ce.value_and_grad(
        ce.sparse_categorical_cross_entropy, x.numpy(), y.numpy(), from_logits=True,
        reduction="none", **np_kw,
    )  # fmt: skip
    for got, expected in zip(results[1], (value, grad), strict=True):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert torch.isfinite(results[1][1]).all()


_VMAPPED_ROWS: dict[str, Callable[[Any, Any], Any]] = {
    # probabilities: array-api-compat's moveaxis has no vmap batching rule (movedim has)
    "sparse probs": lambda p, q: ce.sparse_categorical_cross_entropy(p, torch.argmax(q)),
    "sparse probs, axis 0": lambda p, q: ce.sparse_categorical_cross_entropy(
        p[:, None], torch.argmax(q)[None], axis=0
    ),
    "categorical probs": lambda p, q: ce.categorical_cross_entropy(p, q),
    "categorical probs, axis 0": lambda p, q: ce.categorical_cross_entropy(
        p[:, None], q[:, None], axis=0
    ),
    "listnet, axis 0": lambda p, q: ce.listnet_loss(p[:, None], q[:, None], axis=0),
    # the untracked in-place divergence path used out= operations, which have no rule either
    **{
        f"distillation beta={b}": functools.partial(
            lambda p, q, b: ce.distillation_loss(p.log(), q.log(), beta=b), b=b
        )
        for b in (0.0, 0.3, 0.5, 1.0)
    },
    "js_divergence from logits": lambda p, q: ce.info.js_divergence(
        p.log(), q.log(), from_logits=True
    ),
}


@pytest.mark.parametrize("name", sorted(_VMAPPED_ROWS))
def test_vmap_without_grad_gives_each_row_s_own_value(name: str) -> None:
    """torch.func.vmap (no grad) over rows equals the loss of each row; it raised
    "Batching rule not implemented for aten::moveaxis.int / aten::logaddexp.out"."""
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    q = torch.softmax(torch.randn(4, 5, generator=gen, dtype=torch.float64), dim=-1)
    fn = _VMAPPED_ROWS[name]
    got = torch.func.vmap(fn)(p, q)
    want = torch.stack([fn(p[i], q[i]) for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------- two-array losses


def _two_array_losses(dtype: Any) -> dict[str, Callable[[Any], Any]]:
    """name -> loss of logits `v` with a second array of `dtype` (teacher, q, targets)."""
    x, y, probs, _ = _data(seed=1)
    teacher, probs = x.flip(0).to(dtype), probs.to(dtype)
    return {
        "distillation": lambda v: ce.distillation_loss(v, teacher, beta=0.3, target=y),
        "distillation-kl": lambda v: ce.distillation_loss(v, teacher, beta=0.0, temperature=2.0),
        "info-kl": lambda v: ce.info.kl_divergence(probs, torch.softmax(v, -1)),
        "info-js-logits": lambda v: ce.info.js_divergence(v, teacher, from_logits=True),
        "info-cross-entropy": lambda v: ce.info.cross_entropy(teacher, v, from_logits=True),
        "info-entropy": lambda v: ce.info.entropy(v, from_logits=True),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["distillation", "info-kl", "info-js-logits"])
def test_compiled_half_precision_pair_equals_eager(name: str, dtype: Any) -> None:
    """bfloat16 pairs compile with fullgraph (before: array-api-compat's result_type called
    torch.result_type on empty tensors, "Unsupported torch.* op returned non-Tensor")."""
    torch._dynamo.reset()
    loss = _two_array_losses(dtype)[name]
    results = eager_and_compiled(loss, _data(seed=1)[0].to(dtype))
    assert results[1][0].dtype == dtype
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_two_array_losses(torch.float64)))
def test_autocast_distillation_and_measures_return_float32(name: str, dtype: Any) -> None:
    """Under autocast half-precision inputs give float32, as PyTorch's losses (and kl_div)."""
    loss = _two_array_losses(dtype)[name]
    x = _data(seed=1)[0].to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = loss(x)
    assert out.dtype == torch.float32  # before: the input's half-precision dtype
    assert loss(x).dtype == dtype  # outside autocast: the inputs' dtype
    torch.testing.assert_close(out, loss(x).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "name",
    [
        "sparse-focal-smooth",
        "sparse-probs",
        "categorical-focal",
        "binary-focal",
        "listnet",
        "nn-focal",
        "distillation",
        "info-js-logits",
    ],
)
def test_vmap_grad_of_the_generic_path_equals_a_loop(name: str) -> None:
    """Per-sample gradients through the array-API formula (before: torch.moveaxis has no
    batching rule, and the in-place divergence wrote with out= into batched tensors)."""
    loss = {**_losses(), **_two_array_losses(torch.float64)}[name]
    xs = torch.stack([_data(seed=s)[0] for s in range(3)])

    def total(v: Any) -> Any:
        return loss(v).sum()

    per_sample = torch.func.vmap(torch.func.grad(total))(xs)
    values = torch.func.vmap(total)(xs)
    for i in range(3):
        xi = xs[i].clone().requires_grad_(True)
        value = total(xi)
        (g,) = torch.autograd.grad(value, xi)
        torch.testing.assert_close(per_sample[i], g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(values[i], value.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_wide_unsigned_labels_on_the_array_api_path(dtype: Any) -> None:
    """Probabilities and value_and_grad check labels by comparisons PyTorch lacks for
    uint16/32/64 (before: NotImplementedError '"ge_cpu" not implemented for UInt16')."""
    x, y, _, w = _data()
    y = torch.where(y < 0, 3, y)
    probs = torch.softmax(x, 1)
    expected = ce.sparse_categorical_cross_entropy(probs, y, weight=w)
    torch.testing.assert_close(
        ce.sparse_categorical_cross_entropy(probs, y.to(dtype), weight=w), expected
    )
    got = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, y.to(dtype), from_logits=True)
    ref = ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, y, from_logits=True)
    torch.testing.assert_close(got, ref)
    bad = y.clone()
    bad[1] = 7
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\).*max=7"):
        ce.sparse_categorical_cross_entropy(probs, bad.to(dtype))


def _huge_uint64_label_calls() -> dict[str, Callable[[Any], Any]]:
    """name -> a loss of (3,) uint64 labels over 4 classes, every entry point that takes them."""
    import crossent.fused as cf

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    head = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    sparse = functools.partial(ce.sparse_categorical_cross_entropy, x, from_logits=True)
    return {
        "native": lambda y: sparse(y, ignore_index=-100),
        "no-ignore": lambda y: sparse(y),
        "z-loss": lambda y: sparse(y, ignore_index=-100, z_loss=0.1),
        "nn": lambda y: cnn.CrossEntropyLoss()(x, y),
        "nll": lambda y: cnn.NLLLoss()(torch.log_softmax(x, 1), y),
        "focal": lambda y: cnn.FocalLoss()(x, y),
        "weight": lambda y: sparse(y, weight=torch.ones(4, dtype=torch.float64)),
        "probs": lambda y: ce.sparse_categorical_cross_entropy(x.softmax(1), y),
        "closed-form": lambda y: ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, x, y, from_logits=True, label_smoothing=0.1
        )[0],
        "fused": lambda y: cf.linear_cross_entropy(h, head, y),
        "log-probs": lambda y: cf.linear_log_probs(h, head, y),
        "shift": lambda y: cf.linear_cross_entropy(h[None], head, y[None], shift=True),
    }


@pytest.mark.parametrize("name", list(_huge_uint64_label_calls()))
@pytest.mark.parametrize("label", [2**64 - 100, 2**63], ids=["wraps-to-ignore-index", "2**63"])
def test_uint64_labels_beyond_int64_are_refused(name: str, label: int) -> None:
    """uint64 labels of 2**63 and more wrapped to negative int64 values: 2**64 - 100 became
    -100, the default `ignore_index`, and 2**63 the sentinel of none, so the row scored 0
    silently (every torch entry point). Now they are labels outside [0, C), named by their
    own value (the message named int64's largest, 9223372036854775807, for both), with
    validation off too (the unfused losses raised PyTorch's error naming that number)."""
    call = _huge_uint64_label_calls()[name]
    y = torch.tensor([1, label, 2], dtype=torch.uint64)
    with pytest.raises(ValueError, match=rf"labels outside \[0, 4\).*min={label}, max={label}\."):
        call(y)
    with ce.validation(False), pytest.raises(IndexError) as caught:
        call(y)  # off, the label still fails as in torch's kernels, named by its own value
    assert f": {label} (checked" in str(caught.value)  # PyTorch's named 9223372036854775807
    fine = call(torch.tensor([1, 3, 2], dtype=torch.uint64))  # valid uint64 labels still score
    torch.testing.assert_close(fine, call(torch.tensor([1, 3, 2])))


@pytest.mark.parametrize(
    "options",
    [{"gamma": 2.0}, {"z_loss": 0.1}, {"softcap": 3.0, "weight": "w"}],
    ids=["focal", "zloss", "softcap-weight"],
)
@pytest.mark.parametrize("label", [7, -3])
def test_bad_labels_raise_when_traced(options: dict[str, Any], label: int) -> None:
    """Compiled, crossent's device-side assertion (or PyTorch's gather check) raises; under
    torch.func crossent's eager check, which reads the labels beneath the transforms
    (tests/losses/test_func_checks.py). Before, crossent's own options read a target logit
    of 0 for a label outside [0, C) and returned a finite wrong loss (focal: 1.0929 for
    labels 7 and -3 alike)."""
    x, _, _, w = _data()
    y = torch.tensor([0, 1, label, 2, 3, 4])
    kw = {k: (w if v == "w" else v) for k, v in options.items()}

    def loss(v: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v, y, from_logits=True, **kw)

    def per_sample(v: Any, t: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v[None], t[None], from_logits=True, **kw)

    torch._dynamo.reset()
    bound = r"out of bounds|outside"
    with pytest.raises((IndexError, RuntimeError), match=bound):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    eager = r"`target` has labels outside \[0, 5\)"
    with pytest.raises(ValueError, match=eager):
        torch.func.grad(loss)(x)
    with pytest.raises(ValueError, match=eager):
        torch.func.vmap(torch.func.grad(per_sample))(x, y)


@pytest.mark.parametrize(
    "name",
    [
        "sparse-plain", "categorical-plain", "binary", "nn-bce-with-logits", "sparse",
        "sparse-focal-smooth", "sparse-zloss-softcap", "categorical-focal", "binary-focal",
        "nn-focal", "nn-binary-focal",
    ],
)  # fmt: skip
def test_compile_with_dynamic_shapes(name: str) -> None:
    """``torch.compile(dynamic=True)`` makes float defaults and options symbolic; before, a
    call failed with fullgraph ('Cannot convert argument of type LazyConstantVariable to a
    Python constant for function plain_logits_options', and for every loss with
    label_smoothing, z_loss, softcap, gamma or alpha: 'assume_constant_result argument
    conversion failed' in make_options)."""
    torch._dynamo.reset()
    _x, y, probs, _ = _data()
    plain = {
        "sparse-plain": lambda v: ce.sparse_categorical_cross_entropy(
            v, y.abs() % C, from_logits=True
        ),
        "categorical-plain": lambda v: ce.categorical_cross_entropy(v, probs, from_logits=True),
    }
    loss = {**_losses(), **plain}[name]
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="eager", dynamic=True)):
        x = _data()[0].requires_grad_(True)
        value = fn(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        results.append((value, grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)


def test_dynamic_compile_recompiles_for_other_option_values() -> None:
    """Options passed as arguments are symbolic under ``dynamic=True`` (and after a second
    value under automatic dynamic): each set of values must give its own loss, never the
    first one's."""
    x, y, _, _ = _data()
    y, t = y.abs() % C, torch.sigmoid(x)

    def loss(v: Any, eps: float, gamma: float, z: float, cap: float, ignore: int) -> Any:
        sparse = ce.sparse_categorical_cross_entropy(
            v, y, from_logits=True, label_smoothing=eps, gamma=gamma, z_loss=z, softcap=cap,
            ignore_index=ignore,
        )  # fmt: skip
        binary = ce.binary_cross_entropy(
            v, t, from_logits=True, label_smoothing=eps, gamma=gamma, alpha=z
        )
        return sparse + binary

    for dynamic in (True, None):
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend="eager", dynamic=dynamic)
        for args in [(0.1, 2.0, 0.1, 3.0, -100), (0.3, 0.5, 0.2, 5.0, 1), (0.0, 0.0, 0.7, 2.0, 4)]:
            torch.testing.assert_close(compiled(x, *args), loss(x, *args), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "name", ["bce-with-logits", "bce", "focal-smooth", "binary-focal-weight", "cross-entropy"]
)
def test_modules_compile_with_dynamic_shapes(name: str) -> None:
    """A module compiled with ``dynamic=True``: its weights' sizes and the input's are
    symbolic. Before, BCEWithLogitsLoss(pos_weight=w) and BCELoss(weight=w) raised
    '`pos_weight` of shape (5,) does not broadcast to `input` of shape (s31, 5)' (dynamo
    answers ``5 in (1, s)`` False) with fullgraph, and broke the graph without."""
    x, y, probs, w = _data()
    t = (probs > 0.2).double()
    module, target, probabilities = {
        "bce-with-logits": (cnn.BCEWithLogitsLoss(pos_weight=w), t, False),
        "bce": (cnn.BCELoss(weight=w), t, True),
        "focal-smooth": (cnn.FocalLoss(label_smoothing=0.1), y, False),
        "binary-focal-weight": (cnn.BinaryFocalLoss(weight=w, alpha=0.25), t, False),
        "cross-entropy": (cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1), y, False),
    }[name]
    x = torch.sigmoid(x) if probabilities else x
    torch._dynamo.reset()
    results = []
    for fn in (module, torch.compile(module, fullgraph=True, backend="eager", dynamic=True)):
        v = x.clone().requires_grad_(True)
        value = fn(v, target)
        (grad,) = torch.autograd.grad(value, v)
        results.append((value, grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)


def test_torch_tracing_is_true_while_dynamo_traces_without_the_compile_session_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch < 2.13 (2.11 on a GPU machine) does not hold ``torch.compiler.is_compiling()``
    true during a compile (no ``_compile_session_context``), and ``torch_tracing``, which
    dynamo calls for real at trace time, returned False: the value checks then read the
    validation switch and fullgraph failed ('Dynamo does not know how to trace method `get`
    of class `ContextVar`'). Simulated here by making that context a no-op."""
    import contextlib

    from crossent._lib._xp import torch_tracing

    monkeypatch.setattr(torch.compiler, "_compile_session_context", contextlib.nullcontext)
    torch._dynamo.reset()
    seen = []

    def probe(v: Any) -> Any:
        seen.append(torch_tracing())
        return v * 2

    torch.compile(probe, fullgraph=True, backend="eager")(torch.ones(2))
    assert seen == [True]
    assert not torch_tracing()
    x, y, probs, w = _data()
    for loss in (
        lambda v: cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(v, y),
        lambda v: ce.sparse_categorical_cross_entropy(torch.softmax(v, -1), y.abs() % C),
        lambda v: ce.binary_cross_entropy(torch.sigmoid(v), probs, weight=w),
    ):
        torch._dynamo.reset()
        got = torch.compile(loss, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, loss(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["focal", "binary-focal", "bce-pos-weight", "categorical-focal"])
def test_a_new_batch_size_does_not_specialise_the_graph(name: str) -> None:
    """``size()`` returned ``int(numel)`` and the generic mean divided by ``float(size)``:
    traced with a dynamic batch, both specialised it, so ``torch.export`` with a dynamic
    batch failed ('You marked n as dynamic but your code specialized it to be a constant
    (6)') for FocalLoss, BinaryFocalLoss and BCEWithLogitsLoss(pos_weight=w), and
    ``torch.compile`` recompiled for every batch size (fullgraph then fails at the
    recompile limit)."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    module = {
        "focal": cnn.FocalLoss(gamma=1.0),
        "binary-focal": cnn.BinaryFocalLoss(alpha=0.3),
        "bce-pos-weight": cnn.BCEWithLogitsLoss(pos_weight=w),
        "categorical-focal": cnn.FocalLoss(gamma=2.0),
    }[name]

    def data(n: int) -> tuple[Any, Any]:
        x = torch.randn(n, C, generator=g, dtype=torch.float64)
        if name == "focal":
            return x, torch.randint(0, C, (n,), generator=g)
        if name == "categorical-focal":
            return x, torch.softmax(torch.randn(n, C, generator=g, dtype=torch.float64), 1)
        return x, torch.rand(n, C, generator=g, dtype=torch.float64)

    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(module, data(6), dynamic_shapes=({0: batch}, {0: batch}))
    graphs = []

    def counting(gm: Any, _inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=counting)
    for n in (3, 4, 7, 9, 11):
        x, t = data(n)
        expected = module(x, t)
        torch.testing.assert_close(program.module()(x, t), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(compiled(x, t), expected, rtol=1e-12, atol=0)
    assert len(graphs) <= 2  # the first shape, then one dynamic graph


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "name", ["binary-large", "categorical-bfloat16-large", "distillation", "kl", "js"]
)
def test_forward_mode_ad_equals_the_directional_derivative(name: str) -> None:
    """``torch.autograd.forward_ad``: dual tensors need no ``requires_grad``, and the paths
    chosen for "no gradient wanted" ran ``out=`` operations, which have no forward
    derivative ('NotImplementedError: Trying to use forward AD with abs_out', with
    ``_log_softmax_out``, ``logaddexp_out``, ``sub_out``)."""
    import torch.autograd.forward_ad as fwad

    g = torch.Generator().manual_seed(6)
    n, c = 3000, 40
    x = torch.randn(n, c, generator=g)
    other = torch.randn(n, c, generator=g)
    t = torch.rand(n, c, generator=g)
    loss = {
        "binary-large": lambda v: ce.binary_cross_entropy(v, t, from_logits=True),
        "categorical-bfloat16-large": lambda v: ce.categorical_cross_entropy(
            v.bfloat16(), torch.softmax(other, 1).bfloat16(), from_logits=True
        ),
        "distillation": lambda v: ce.distillation_loss(v, other, beta=0.3),
        "kl": lambda v: ce.info.kl_divergence(other, v, from_logits=True).sum(),
        "js": lambda v: ce.info.js_divergence(other, v, from_logits=True).sum(),
    }[name]
    tangent = torch.randn(n, c, generator=g)
    with fwad.dual_level():
        got = fwad.unpack_dual(loss(fwad.make_dual(x, tangent))).tangent
    v = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(v), v)
    expected = (grad.double() * tangent.double()).sum()
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-4)


def test_compiled_value_and_grad_equals_eager() -> None:
    """``value_and_grad`` under ``torch.compile``: its option lookup was ``functools.cache``d,
    and dynamo warns about every call of an ``lru_cache``-wrapped function ('Dynamo detected
    a call to a functools.lru_cache-wrapped function'), an error where warnings are errors."""
    x, y, probs, _ = _data()
    y = y.abs() % C

    def both(v: Any) -> Any:
        sparse = ce.value_and_grad(
            ce.sparse_categorical_cross_entropy, v, y, from_logits=True, gamma=2.0
        )
        return sparse, ce.value_and_grad(ce.categorical_cross_entropy, v, probs, from_logits=True)

    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), both(x), rtol=1e-12, atol=1e-14)


_DUAL_SHAPES = {"small": (6, 5), "large": (3000, 60)}


def _dual_losses(n: int, c: int) -> dict[str, Callable[[Any], Any]]:
    """name -> loss of logits (n, c), one per eager path with an autograd Function of its own."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, c, (n,), generator=g)
    t = torch.rand(n, c, generator=g)
    p = torch.softmax(torch.randn(n, c, generator=g), 1)
    w = torch.rand(c, generator=g) + 0.5
    sparse = functools.partial(ce.sparse_categorical_cross_entropy, target=y, from_logits=True)
    return {
        "sparse-focal": lambda v: sparse(v, gamma=2.0),
        "sparse-focal-smoothing": lambda v: sparse(v, gamma=2.0, label_smoothing=0.1),
        "sparse-zloss-softcap": lambda v: sparse(v, z_loss=0.1, softcap=3.0, weight=w),
        "sparse-bfloat16": lambda v: sparse(v.bfloat16()),
        "categorical-bfloat16": lambda v: ce.categorical_cross_entropy(
            v.bfloat16(), p.bfloat16(), from_logits=True
        ),
        "binary": lambda v: ce.binary_cross_entropy(v, t, from_logits=True),
        "binary-pos-weight-alpha": lambda v: ce.binary_cross_entropy(
            v, t, from_logits=True, pos_weight=w, alpha=0.3
        ),
        "binary-bfloat16": lambda v: ce.binary_cross_entropy(
            v.bfloat16(), t.bfloat16(), from_logits=True
        ),
        "nn-focal": lambda v: cnn.FocalLoss()(v, y),
        "nn-bce-with-logits": lambda v: cnn.BCEWithLogitsLoss(pos_weight=w)(v, t),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("size", list(_DUAL_SHAPES))
@pytest.mark.parametrize("name", list(_dual_losses(2, 2)))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_dual_tensors_that_require_grad(name: str, size: str, requires_grad: bool) -> None:
    """``torch.autograd.forward_ad`` on logits that also require a gradient (a model's output:
    its parameters require one): the eager paths' own autograd Functions have no ``jvp``
    ('You must implement the jvp function for custom autograd.Function'), and the
    half-precision sparse path's no-gradient form ran ``_log_softmax_out``. The tangent is
    the directional derivative, and forward-over-reverse (the tangent of the gradient) the
    Hessian-vector product of double backward."""
    import torch.autograd.forward_ad as fwad

    n, c = _DUAL_SHAPES[size]
    loss = _dual_losses(n, c)[name]
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, c, generator=g)
    tangent = torch.randn(n, c, generator=g)
    v = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(v), v, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * tangent).sum(), v)
    with fwad.dual_level():
        primal = x.clone().requires_grad_(requires_grad)
        out = loss(fwad.make_dual(primal, tangent))
        got = fwad.unpack_dual(out).tangent
        if requires_grad:
            (dual_grad,) = torch.autograd.grad(out, primal)
            got_hvp = fwad.unpack_dual(dual_grad).tangent
    expected = (grad.double() * tangent.double()).sum()
    rtol = 1e-2 if "bfloat16" in name else 2e-3  # a bfloat16 loss has a bfloat16 tangent
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=1e-4)
    if requires_grad:
        torch.testing.assert_close(got_hvp, hvp, rtol=rtol, atol=1e-5)


def _class_weight_losses() -> dict[str, Callable[[Any], Any]]:
    """name -> loss of a class weight `w` (float64, fixed logits and labels)."""
    x, y, _, _ = _data(seed=3)
    sparse = functools.partial(
        ce.sparse_categorical_cross_entropy, x, y, from_logits=True, ignore_index=-100
    )
    return {
        "sparse-sum": lambda w: sparse(weight=w, reduction="sum"),
        "sparse-mean": lambda w: sparse(weight=w),
        "sparse-none": lambda w: sparse(weight=w, reduction="none"),
        "sparse-smoothing": lambda w: sparse(weight=w, label_smoothing=0.2),
        "nn-cross-entropy": lambda w: cnn.CrossEntropyLoss(weight=w)(x, y),
        "nn-nll": lambda w: cnn.NLLLoss(weight=w, reduction="sum")(torch.log_softmax(x, 1), y),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(_class_weight_losses()))
@pytest.mark.parametrize("mode", ["dual", "jvp", "jacfwd", "compiled-jvp"])
def test_forward_mode_derivative_in_the_class_weight(name: str, mode: str) -> None:
    """A tangent on the class weight: PyTorch's ``nll_loss`` has no derivative formula for its
    weight and drops the tangent silently (0, or the mean's denominator alone: 13x off), so a
    weight that carries one takes the generic formula, as one that requires a gradient does.
    The reference is reverse mode (that weight gradient was already exact). Under
    ``torch.compile`` too (``fullgraph=True``): the check once skipped the traced transform,
    and the compiled tangent was a wrong number (1.28 where it is -0.079)."""
    import torch.autograd.forward_ad as fwad

    loss = _class_weight_losses()[name]
    _, _, _, w = _data(seed=3)
    tangent = torch.randn(C, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = torch.func.jacrev(loss)(w) @ tangent
    if mode == "dual":
        with fwad.dual_level():
            got = fwad.unpack_dual(loss(fwad.make_dual(w, tangent))).tangent
    elif mode == "jvp":
        got = torch.func.jvp(loss, (w,), (tangent,))[1]
    elif mode == "compiled-jvp":
        torch._dynamo.reset()
        jvp = torch.compile(
            lambda w, t: torch.func.jvp(loss, (w,), (t,))[1], backend="aot_eager", fullgraph=True
        )
        got = jvp(w, tangent)
    else:
        got = torch.func.jacfwd(loss)(w) @ tangent
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _unbatched_losses() -> dict[str, Callable[[Any], Any]]:
    """name -> loss of one unbatched example, logits (C,) and a 0-d label, with class weights."""
    _, _, _, w = _data()
    y = torch.tensor(3, dtype=torch.int8)
    return {
        "sparse": lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True, weight=w),
        "sparse-ignore-index": lambda v: ce.sparse_categorical_cross_entropy(
            v, y, from_logits=True, weight=w, ignore_index=-100, label_smoothing=0.3
        ),
        "nn-cross-entropy": lambda v: cnn.CrossEntropyLoss(weight=w)(v, y),
        "nn-nll": lambda v: cnn.NLLLoss(weight=w, ignore_index=1)(torch.log_softmax(v, 0), y),
    }


@pytest.mark.parametrize("name", list(_unbatched_losses()))
def test_compiled_unbatched_mean_with_class_weight(name: str) -> None:
    """A 0-d label indexing the class weight for the mean's denominator (``w[label]``) is read
    on the host: ``torch.compile(fullgraph=True)`` failed with 'Could not extract specialized
    integer from data-dependent expression u0' (PyTorch's own loss compiles)."""
    torch._dynamo.reset()
    x = _data()[0][0]
    eager, compiled = eager_and_compiled(_unbatched_losses()[name], x)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_wide_unsigned_labels_with_a_gradient(dtype: Any, ignore_index: int) -> None:
    """uint16/32/64 labels with logits that need a gradient and an ignore_index (the default
    -100 of CrossEntropyLoss): the check for ignored rows of -inf only took the labels'
    minimum, which PyTorch lacks for these dtypes (before: NotImplementedError '"min_all"
    not implemented for UInt16')."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 4, 1, 2, 3])
    ref = torch.nn.functional.cross_entropy(x, y, ignore_index=ignore_index)
    (ref_grad,) = torch.autograd.grad(ref, x)
    calls = {
        "nn": lambda t: cnn.CrossEntropyLoss(ignore_index=ignore_index)(x, t),
        "function": lambda t: ce.sparse_categorical_cross_entropy(
            x, t, from_logits=True, ignore_index=ignore_index
        ),
        "z-loss": lambda t: ce.sparse_categorical_cross_entropy(
            x, t, from_logits=True, ignore_index=ignore_index, z_loss=0.0, gamma=0.5
        ),
    }
    for name, call in calls.items():
        got = call(y.to(dtype))
        (grad,) = torch.autograd.grad(got, x)
        want = call(y)
        (want_grad,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(got, want, msg=name)
        torch.testing.assert_close(grad, want_grad, msg=name)
        if name != "z-loss":
            torch.testing.assert_close(got, ref, msg=name)
            torch.testing.assert_close(grad, ref_grad, msg=name)


@pytest.mark.parametrize(
    ("dtype", "label", "ignore_index"),
    [(torch.uint8, 156, -100), (torch.uint8, 44, 300), (torch.int8, 44, 300)],
    ids=["uint8-156-vs--100", "uint8-44-vs-300", "int8-44-vs-300"],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_counted_row_of_minus_inf_is_not_masked_by_a_wrapped_ignore_index(
    dtype: Any, label: int, ignore_index: int, compiled: bool
) -> None:
    """A row of -inf only whose label counts keeps its NaN (NaN propagates), whatever the labels'
    width. The check for ignored rows of -inf compared the labels with `ignore_index` in their
    own dtype, which wraps one that does not fit (PyTorch compares uint8 156 equal to -100, and
    44 equal to 300): the counted row was taken for an ignored one and zeroed, a finite loss
    (log C = 5.2983 for C = 200) and gradient where F.cross_entropy gives NaN."""
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[0] = -math.inf
    x.requires_grad_(True)
    y = torch.tensor([label, 3, 7])
    expected = torch.nn.functional.cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
    assert expected[0].isnan()

    def loss(v: Any, t: Any) -> Any:
        return cnn.CrossEntropyLoss(ignore_index=ignore_index, reduction="none")(v, t)

    call = torch.compile(loss, backend="aot_eager") if compiled else loss
    got = call(x, y.to(dtype))
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert grad[0].isnan().all()
    assert grad[1:].isfinite().all()


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("how", ["func", "compiled"])
def test_binary_second_derivative_at_a_logit_of_exactly_zero(how: str, gamma: float) -> None:
    """Traced, log σ(±x) share log1p(e^{-|x|}), whose derivatives autodiff took as 0 at
    x = 0 (|x| has none there): the focal loss's second derivative came out 0.4233 where it
    is 0.3991 (6 % off) at a logit of exactly 0, as a zero-initialized head gives. Both
    targets, against the smooth formula's autograd (the value: mpmath's)."""
    x = torch.zeros(2, dtype=torch.float64)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def loss(v: Any) -> Any:
        return ce.binary_cross_entropy(v, t, from_logits=True, gamma=gamma, reduction="sum")

    def second(v: Any) -> Any:
        return torch.func.grad(lambda u: torch.func.grad(loss)(u).sum())(v)

    if how == "compiled":
        second = torch.compile(second, backend="aot_eager", fullgraph=True)
    want = 0.3991433975699931636771540151822720710094 if gamma else 0.25
    torch.testing.assert_close(second(x), torch.full((2,), want, dtype=torch.float64))


def _tangent_losses(shape: tuple[int, ...]) -> dict[str, Callable[[Any], Any]]:
    """name -> float32 loss of logits of `shape` (classes last), one per formula whose
    ``torch.func.jvp`` tangent came back in float64."""
    g = torch.Generator().manual_seed(11)
    c = shape[-1]
    y = torch.randint(0, c, shape[:-1], generator=g)
    p = torch.softmax(torch.randn(shape, generator=g), -1)
    sparse = functools.partial(ce.sparse_categorical_cross_entropy, target=y, from_logits=True)
    return {
        "sparse-focal": lambda v: sparse(v, gamma=2.0),
        "sparse-z-loss": lambda v: sparse(v, z_loss=1e-2),
        "sparse-softcap": lambda v: sparse(v, softcap=5.0),
        "sparse-smoothing-focal-none": lambda v: sparse(
            v, ignore_index=-100, label_smoothing=0.1, gamma=2.0, reduction="none"
        ),
        "sparse-smoothing-focal-z-loss": lambda v: sparse(
            v, label_smoothing=0.1, gamma=2.0, z_loss=1e-2
        ),
        "sparse-probabilities-focal": lambda v: ce.sparse_categorical_cross_entropy(
            torch.softmax(v, -1), y, gamma=2.0
        ),
        "entropy-bits": lambda v: ce.info.entropy(v, from_logits=True, base=2.0),
        "js-bits": lambda v: ce.info.js_divergence(v, p.log(), from_logits=True, base=2.0),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("shape", [(6,), (3, 6)], ids=str)
@pytest.mark.parametrize("name", list(_tangent_losses((2, 2))))
def test_jvp_tangent_has_the_loss_dtype(name: str, shape: tuple[int, ...]) -> None:
    """``torch.func.jvp`` gives ``x * 2.0`` (and ``/ + -``) of a 0-d float32 `x` a float64
    tangent (PyTorch 2.13; dual tensors of ``torch.autograd.forward_ad`` do not): a reduced
    loss divided by its row count, a focal exponent, a base's log, and every row quantity of
    an unbatched input (0-d rows) made the tangent of a float32 loss float64. Its value is
    the float64 directional derivative."""
    loss = _tangent_losses(shape)[name]
    g = torch.Generator().manual_seed(12)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out, tangent = torch.func.jvp(loss, (x,), (v,))
    assert out.dtype == tangent.dtype == torch.float32
    expected = torch.func.jvp(lambda u: loss(u.float()).double(), (x.double(),), (v.double(),))
    torch.testing.assert_close(tangent.double(), expected[1], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["sparse-probabilities-focal", "sparse-focal", "entropy-bits"])
def test_vmap_of_per_example_hessian_vector_products(name: str) -> None:
    """Per-example Hessian-vector products, ``vmap`` of ``jvp`` of ``grad`` (forward over
    reverse; each example's logits 1-d, its rows 0-d): the float64 tangent of a 0-d row
    (see above) met the float32 one of the gather's backward, 'scatter(): Expected self.dtype
    to be equal to src.dtype'. Equal to double backward example by example."""
    n, c = 4, 6
    g = torch.Generator().manual_seed(13)
    x, v = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    loss = {
        "sparse-probabilities-focal": lambda u, t: ce.sparse_categorical_cross_entropy(
            torch.softmax(u, -1), t, gamma=2.0
        ),
        "sparse-focal": lambda u, t: ce.sparse_categorical_cross_entropy(
            u, t, from_logits=True, gamma=2.0
        ),
        "entropy-bits": lambda u, t: ce.info.entropy(u, from_logits=True, base=2.0),
    }[name]

    def hvp(u: Any, t: Any, w: Any) -> Any:
        return torch.func.jvp(torch.func.grad(lambda z: loss(z, t)), (u,), (w,))[1]

    got = torch.func.vmap(hvp)(x, y, v)
    for i in range(n):
        u = x[i].clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(loss(u, y[i]), u, create_graph=True)
        (want,) = torch.autograd.grad((gx * v[i]).sum(), u)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["js", "kl", "entropy"])
def test_compiled_measures_of_probabilities_equal_eager(name: str) -> None:
    """The measures of probabilities under ``torch.compile(fullgraph=True)``, warnings being
    errors: ``js_divergence`` asked array-api-compat's ``is_numpy_namespace``, an
    ``lru_cache``-wrapped function, and dynamo warns at every traced call of one ('Dynamo
    detected a call to a functools.lru_cache-wrapped function')."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(14)
    p = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), 1)
    measure = {
        "js": lambda a: ce.info.js_divergence(a, q),
        "kl": lambda a: ce.info.kl_divergence(a, q),
        "entropy": lambda a: ce.info.entropy(a),
    }[name]
    eager, compiled = eager_and_compiled(measure, p)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


def _option_sweep() -> list[tuple[str, dict[str, Any]]]:
    """(loss, options): every subset of each loss's options, for one-example inputs."""
    import itertools

    w = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.25, 1.0])
    families = {
        "sparse": {
            "label_smoothing": 0.1, "weight": w, "gamma": 2.0, "z_loss": 1e-2, "softcap": 5.0,
            "ignore_index": -100,
        },
        "sparse_p": {"label_smoothing": 0.1, "weight": w, "gamma": 2.0, "ignore_index": -100},
        "categorical": {"label_smoothing": 0.1, "weight": w, "gamma": 2.0},
        "categorical_p": {"label_smoothing": 0.1, "weight": w, "gamma": 2.0},
        "binary": {
            "label_smoothing": 0.1, "weight": 0.5, "pos_weight": 2.0, "gamma": 2.0, "alpha": 0.25,
        },
        "binary_p": {
            "label_smoothing": 0.1, "weight": 0.5, "pos_weight": 2.0, "gamma": 2.0, "alpha": 0.25,
        },
        "distill": {"beta": 0.3, "temperature": 2.0, "target": torch.tensor(2)},
        "listnet": {},
    }  # fmt: skip
    sweep = []
    for loss, options in families.items():
        for r in range(len(options) + 1):
            for names in itertools.combinations(options, r):
                for reduction in ("mean", "sum", "none"):
                    sweep.append((loss, {**{k: options[k] for k in names}, "reduction": reduction}))
    for measure in ("entropy", "cross_entropy", "kl_divergence", "js_divergence"):
        for from_logits in (True, False):
            for base in (None, 2.0):
                sweep.append((measure, {"from_logits": from_logits, "base": base}))
    return sweep


def _one_example_loss(loss: str, options: dict[str, Any]) -> Callable[[Any], Any]:
    """The loss of one example's logits (6,) (binary: one logit, 0-d), float32."""
    g = torch.Generator().manual_seed(15)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    y = torch.tensor(2)
    o = dict(options)
    if loss in ("entropy", "cross_entropy", "kl_divergence", "js_divergence"):
        measure = getattr(ce.info, loss)
        other = () if loss == "entropy" else ((p.log() if o["from_logits"] else p),)
        return lambda v: measure(v if o["from_logits"] else torch.softmax(v, 0), *other, **o)
    if loss == "distill":
        return lambda v: ce.distillation_loss(v, p.log() * 2, **o)
    if loss == "listnet":
        return lambda v: ce.listnet_loss(v, p, **o)
    if loss.startswith("binary"):
        logits = loss == "binary"
        t = torch.tensor(0.7)
        return lambda v: ce.binary_cross_entropy(
            v[0] if logits else torch.sigmoid(v[0]), t, from_logits=logits, **o
        )
    probs = loss.endswith("_p")
    fn = (
        ce.sparse_categorical_cross_entropy
        if loss.startswith("sparse")
        else (ce.categorical_cross_entropy)
    )
    target = y if loss.startswith("sparse") else p
    return lambda v: fn(torch.softmax(v, 0) if probs else v, target, from_logits=not probs, **o)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jvp_of_one_example_keeps_float32_for_every_option_subset() -> None:
    """Every subset of every loss's options on one example (0-d rows, as under ``vmap`` of a
    per-example loss): ``torch.func.jvp``'s tangent is float32 as the loss is, and ``jvp`` of
    ``grad`` (a Hessian-vector product) runs and is float32. PyTorch's ``jvp`` promotes the
    tangent of a 0-d tensor combined with a Python number to float64 (see
    :func:`crossent._lib._xp.number_for`): label smoothing with focal and z-loss together
    still did (the z-loss term), which the bounded fuzzers had not drawn."""
    x = torch.randn(6, generator=torch.Generator().manual_seed(16))
    v = torch.ones(6)
    wrong = []
    for loss, options in _option_sweep():
        fn = _one_example_loss(loss, options)
        out, tangent = torch.func.jvp(fn, (x,), (v,))
        if tangent.dtype != out.dtype:
            wrong.append((loss, options, "tangent", tangent.dtype))
        if out.ndim == 0:
            hvp = torch.func.jvp(torch.func.grad(fn), (x,), (v,))[1]
            if hvp.dtype != torch.float32:
                wrong.append((loss, options, "hvp", hvp.dtype))
    assert not wrong, wrong[:5]
