"""Value checks under ``torch.func`` transforms run eagerly: the eager messages.

``grad``, ``vjp``, ``jacrev`` and ``vmap`` hand the losses wrapped tensors whose values the
checks skipped (every tensor counted as lazy, as JAX tracers): a label outside [0, C) gave
PyTorch's own ``IndexError: Target 7 is out of bounds`` or ``RuntimeError: index 7 is out of
bounds for dimension 2 with size 5``, a negative class weight or targets outside [0, 1] a
silently computed loss. The checks now read the values beneath the wrappers
(``crossent._lib._checks.values_beneath``): the same exception and message as eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402
import crossent.nn as cnn  # noqa: E402
from crossent.fused import linear_cross_entropy, linear_log_probs  # noqa: E402

N, C = 6, 5
BAD_ROW = 2

Loss = Callable[[Any, Any], Any]


def _data() -> tuple[Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    head = torch.randn(C, C, generator=g, dtype=torch.float64)  # fused: hidden size C
    return x, y, w, head


def _module(module: Any) -> Loss:
    """`module` called through ``torch.func.functional_call`` with its own buffers."""
    buffers = dict(module.named_buffers())
    return lambda *args: torch.func.functional_call(module, buffers, args)


def _label_losses() -> dict[str, tuple[Loss, int | None]]:
    """name -> (a scalar loss of logits and labels, its ignore_index)."""
    _, _, w, head = _data()

    def sparse(**options: Any) -> Loss:
        return lambda v, t: ce.sparse_categorical_cross_entropy(v, t, from_logits=True, **options)

    return {
        "sparse": (sparse(), None),
        "sparse-sum": (sparse(reduction="sum"), None),
        "sparse-none": (lambda v, t: sparse(reduction="none")(v, t).sum(), None),
        "sparse-ignore": (sparse(ignore_index=-100), -100),
        "sparse-weight-smoothing": (sparse(weight=w, label_smoothing=0.1), None),
        "sparse-zloss": (sparse(z_loss=0.01), None),
        "sparse-focal": (sparse(gamma=2.0), None),
        "sparse-softcap-ignore": (sparse(softcap=3.0, ignore_index=-100), -100),
        "sparse-focal-smoothing": (sparse(gamma=2.0, label_smoothing=0.1), None),
        "sparse-probs": (
            lambda v, t: ce.sparse_categorical_cross_entropy(torch.softmax(v, -1), t),
            None,
        ),
        "nn-cross-entropy": (_module(cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)), -100),
        "nn-focal": (_module(cnn.FocalLoss(gamma=2.0)), -100),
        "nn-nll": (
            lambda v, t: _module(cnn.NLLLoss(weight=w))(torch.log_softmax(v, 1), t),
            -100,
        ),
        "fused": (lambda v, t: linear_cross_entropy(v, head, t, z_loss=0.01), -100),
        "fused-log-probs": (lambda v, t: linear_log_probs(v, head, t).sum(), -100),
        "nn-linear-cross-entropy": (
            lambda v, t: _module(cnn.LinearCrossEntropyLoss())(v, head, t),
            -100,
        ),
    }


def _per_sample(loss: Loss) -> Loss:
    """The loss of one row (a batch of one), for ``vmap``."""
    return lambda v, t: loss(v[None], t[None])


TRANSFORMS: dict[str, Callable[[Loss, Any, Any], Any]] = {
    "grad": lambda loss, x, y: torch.func.grad(loss)(x, y),
    "vjp": lambda loss, x, y: torch.func.vjp(lambda v: loss(v, y), x)[1](torch.tensor(1.0)),
    "jacrev": lambda loss, x, y: torch.func.jacrev(loss)(x, y),
    "vmap": lambda loss, x, y: torch.func.vmap(_per_sample(loss))(x, y),
    "vmap-grad": lambda loss, x, y: torch.func.vmap(torch.func.grad(_per_sample(loss)))(x, y),
    "jacfwd": lambda loss, x, y: torch.func.jacfwd(loss)(x, y),
    "functionalize": lambda loss, x, y: torch.func.functionalize(loss)(x, y),
}


def _eager_error(loss: Loss, x: Any, y: Any) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the eager error is the reference
        loss(x, y)
    return info.value


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(_label_losses()))
def test_bad_label_under_torch_func_gives_the_eager_message(name: str, transform: str) -> None:
    """Labels C, -3 (and ignore_index ± 1 where one is set) in one row: the eager
    ``ValueError`` and message under every transform. Before: PyTorch's ``Target 7 is out of
    bounds`` / ``index 7 is out of bounds for dimension 2 with size 5`` / ``index 7 is out of
    bounds for dimension 1 with size 5`` on every unfused loss (the fused ones, custom ops
    that run per sample, already raised the eager message)."""
    if transform == "functionalize" and (name.startswith("fused") or "linear" in name):
        pytest.skip("functionalize has no rule for the fused losses' autograd.Function (NYI)")
    loss, ignore_index = _label_losses()[name]
    x, y, _, _ = _data()
    bad_labels = [C, -3] if ignore_index is None else [C, -3, ignore_index - 1, ignore_index + 1]
    for bad in bad_labels:
        y_bad = y.clone()
        y_bad[BAD_ROW] = bad
        eager = _eager_error(loss, x, y_bad)
        assert isinstance(eager, ValueError)
        assert "`target` has labels outside [0, 5)" in str(eager)
        with pytest.raises(ValueError, match="`target` has labels outside") as info:
            TRANSFORMS[transform](loss, x, y_bad)
        assert str(info.value) == str(eager)


@pytest.mark.parametrize("name", ["sparse-ignore", "sparse-focal", "nn-cross-entropy", "fused"])
def test_valid_and_ignored_labels_still_pass_under_vmap_grad(name: str) -> None:
    """The label check reads, never refuses, valid labels and ``ignore_index``: per-sample
    gradients equal a loop of eager ``autograd.grad`` calls."""
    loss, ignore_index = _label_losses()[name]
    x, y, _, _ = _data()
    if ignore_index is not None:
        y[BAD_ROW] = ignore_index
    one = _per_sample(loss)
    per_sample = torch.func.vmap(torch.func.grad(one))(x, y)
    loop = []
    for i in range(N):
        v = x[i].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(one(v, y[i]), v)
        loop.append(g)
    torch.testing.assert_close(per_sample, torch.stack(loop), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["sparse-zloss", "sparse-focal", "sparse-softcap-ignore"])
@pytest.mark.parametrize("transform", ["grad", "vmap-grad"])
def test_bad_label_with_validation_off_gives_an_index_error(name: str, transform: str) -> None:
    """Validation off, crossent's own options (whose gather is guarded even then, as torch's
    kernels are): an ``IndexError`` naming `target` under the transforms, as eagerly
    (``nll_loss``'s ``Target 5 is out of bounds`` there). Before: the guard was skipped and
    PyTorch's gather raised ``RuntimeError: index 5 is out of bounds for dimension 1``."""
    loss, _ = _label_losses()[name]
    x, y, _, _ = _data()
    y[BAD_ROW] = C
    with ce.validation(False):
        assert isinstance(_eager_error(loss, x, y), IndexError)
        with pytest.raises(IndexError, match=r"`target` has a label outside \[0, 5\)"):
            TRANSFORMS[transform](loss, x, y)


def _value_cases() -> dict[str, tuple[Loss, Any, Any]]:
    """name -> (loss, input, target) whose one bad value raises eagerly."""
    x, y, w, _ = _data()
    p = torch.softmax(x, -1)
    t = torch.rand(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bad_t, above, half_row, neg_w = t.clone(), p.clone(), p.clone(), w.clone()
    bad_t[BAD_ROW, 1] = 1.5
    above[BAD_ROW, 1] = 1.5
    half_row[BAD_ROW] *= 0.5
    neg_w[0] = -1.0
    sparse = ce.sparse_categorical_cross_entropy
    return {
        "categorical-target": (
            lambda v, k: ce.categorical_cross_entropy(v, k, from_logits=True),
            x,
            bad_t,
        ),
        "categorical-focal-target": (
            lambda v, k: ce.categorical_cross_entropy(v, k, from_logits=True, gamma=2.0),
            x,
            bad_t,
        ),
        "categorical-rows": (lambda v, k: ce.categorical_cross_entropy(v, k), half_row, p),
        "binary-target": (lambda v, k: ce.binary_cross_entropy(v, k, from_logits=True), x, bad_t),
        "binary-probs": (lambda v, k: ce.binary_cross_entropy(v, k), above, t),
        "binary-weight": (
            lambda v, k: ce.binary_cross_entropy(v, k, from_logits=True, weight=neg_w),
            x,
            t,
        ),
        "sparse-probs-range": (lambda v, k: sparse(v, k), above, y),
        "sparse-probs-rows": (lambda v, k: sparse(v, k), half_row, y),
        "sparse-weight": (lambda v, k: sparse(v, k, from_logits=True, weight=neg_w), x, y),
        "sparse-focal-weight": (
            lambda v, k: sparse(v, k, from_logits=True, weight=neg_w, gamma=2.0),
            x,
            y,
        ),
        "nn-bce": (_module(cnn.BCELoss()), above, t),
        "nn-cross-entropy-probs-target": (_module(cnn.CrossEntropyLoss()), x, bad_t),
        "info-entropy": (lambda v, k: ce.info.entropy(v).sum(), above, t),
    }


@pytest.mark.parametrize("transform", ["grad", "vmap-grad"])
@pytest.mark.parametrize("name", list(_value_cases()))
def test_bad_values_under_torch_func_give_the_eager_message(name: str, transform: str) -> None:
    """Targets outside [0, 1], probabilities outside [0, 1] or whose rows do not sum to 1, a
    negative weight: the eager exception and message (before: a loss, computed silently,
    or ``TypeError: cannot read the values of a lazy array``). Under ``vmap`` a row of the
    row-sum message is counted over the samples first: ``row (2, 0)`` for eager ``row 2``."""
    loss, v, k = _value_cases()[name]
    eager = _eager_error(loss, v, k)
    assert isinstance(eager, ValueError)
    with pytest.raises(type(eager)) as info:
        TRANSFORMS[transform](loss, v, k)
    expected = str(eager)
    if transform == "vmap-grad" and "rows must sum" in expected:
        expected = expected.replace(f"row {BAD_ROW} ", f"row ({BAD_ROW}, 0) ")
    assert str(info.value) == expected


def test_nested_vmap_reads_every_sample_of_both_levels() -> None:
    """Two ``vmap`` levels over different dimensions: the label beneath is found whichever
    sample holds it (the batched dimensions are moved to the front, never mixed up)."""
    x, y, _, _ = _data()
    xs = x.reshape(2, 3, C).transpose(0, 1).contiguous()  # (3, 2, C): vmapped over 1 then 0
    ys = y.reshape(2, 3).T.contiguous()
    ys[1, 1] = C

    def one(v: Any, t: Any) -> Any:
        return ce.sparse_categorical_cross_entropy(v[None], t[None], from_logits=True)

    nested = torch.func.vmap(torch.func.vmap(one), in_dims=(1, 1))
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*min=5, max=5"):
        nested(xs, ys)
    ys[1, 1] = 0
    expected = torch.stack(
        [torch.stack([one(xs[b, a], ys[b, a]) for b in range(3)]) for a in range(2)]
    )
    torch.testing.assert_close(nested(xs, ys), expected, rtol=1e-12, atol=1e-14)
