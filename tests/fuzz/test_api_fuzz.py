"""A bounded fuzz of the public API: random shapes, dtypes, options and extreme values.

Every generated call must give either the float64 reference's value (to the
dtype's rounding) or a clear error: a ``ValueError``/``TypeError`` whose
message names the offending argument in backticks. Any other exception, a
wrong number, or a missing error fails. Values include ±1e4, ±inf, NaN,
exact 0 and 1 and subnormals; the profile is fixed (derandomized, bounded
``max_examples``) so the suite runs in seconds in CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from tests._reference import binary as ref_binary
from tests._reference import categorical as ref_cat
from tests._reference import info as ref_info
from tests.fuzz._settings import fuzz

torch = pytest.importorskip("torch")

FUZZ = fuzz(200)

INF = math.inf
SPECIAL_LOGITS = [0.0, 1.0, -1.0, 1e4, -1e4, 5e-324, -5e-324, 1e-310, 2.2250738585072014e-308]
LOSSES = ("sparse", "categorical", "binary", "listnet", "info_ce", "info_kl", "info_entropy")
BACKENDS = ("numpy", "torch", "array_api_strict")


# --------------------------------------------------------------------------- cases


@dataclass
class Call:
    """One generated call: the loss, NumPy float64/int data, options, backend and dtype."""

    loss: str
    x: np.ndarray
    t: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "numpy"
    dtype: str = "float64"
    grad: bool = False

    def convert(self, a: Any, *, floating: bool = True) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        if self.backend == "torch":
            out = torch.as_tensor(a)
            return out.to(getattr(torch, self.dtype)) if floating else out
        if self.backend == "array_api_strict":
            xp = pytest.importorskip("array_api_strict")
            out = xp.asarray(a)
            return xp.astype(out, getattr(xp, self.dtype)) if floating else out
        return a.astype(self.dtype) if floating else a

    def rounded(self, a: np.ndarray) -> np.ndarray:
        """`a` as the backend sees it, back in float64 (the reference's input)."""
        return np.asarray(a, dtype=self.dtype).astype(np.float64)


def _function(loss: str) -> Callable[..., Any]:
    return {
        "sparse": ce.sparse_categorical_cross_entropy,
        "categorical": ce.categorical_cross_entropy,
        "binary": ce.binary_cross_entropy,
        "listnet": ce.listnet_loss,
        "info_ce": ce.info.cross_entropy,
        "info_kl": ce.info.kl_divergence,
        "info_entropy": lambda p, _q, **o: ce.info.entropy(p, **o),
    }[loss]


def _reference(call: Call) -> np.ndarray:
    x = call.rounded(call.x)
    o = dict(call.options)
    with np.errstate(all="ignore"):
        if call.loss == "sparse":
            return ref_cat.sparse_ce(x, call.t, **o)
        if call.loss == "categorical":
            return ref_cat.categorical_ce(x, call.rounded(call.t), **o)
        if call.loss == "binary":
            return ref_binary.binary_cross_entropy(x, call.rounded(call.t), **o)
        if call.loss == "listnet":
            return ref_cat.listnet(x, call.rounded(call.t), **o)
        if call.loss == "info_ce":
            return ref_info.cross_entropy(x, call.rounded(call.t), **o)
        if call.loss == "info_kl":
            return ref_info.kl_divergence(x, call.rounded(call.t), **o)
        return ref_info.entropy(x, **o)


def _softmax(z: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- strategies


def _logit() -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=True),
        st.sampled_from(SPECIAL_LOGITS),
    )


@st.composite
def valid_calls(draw: st.DrawFn) -> Call:
    """Inputs that are valid by construction (masked -inf logits and exact 0/1 included)."""
    loss = draw(st.sampled_from(LOSSES))
    n = draw(st.integers(0, 4))
    c = draw(st.integers(1, 5))
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    z = np.array(draw(st.lists(_logit(), min_size=n * c, max_size=n * c))).reshape(n, c)
    options: dict[str, Any] = {}
    from_logits = draw(st.booleans())
    if loss in ("sparse", "categorical", "binary", "listnet"):
        options["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    if loss in ("sparse", "categorical", "binary"):
        options["from_logits"] = from_logits
        options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
        options["gamma"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    if from_logits and loss in ("sparse", "categorical") and c > 1 and n > 0:
        mask = np.array(draw(st.lists(st.booleans(), min_size=n * c, max_size=n * c)))
        z = np.where(mask.reshape(n, c) & (np.arange(c) > 0), -INF, z)  # class 0 stays finite
    x = z
    if loss in ("sparse", "categorical") and not from_logits:
        x = _softmax(z)
        if draw(st.booleans()) and n > 0:  # exact one-hot rows: probabilities 0 and 1
            x[0] = np.eye(c)[draw(st.integers(0, c - 1))]
        x = x.astype(dtype).astype(np.float64)
    if loss == "binary" and not from_logits:
        x = 1 / (1 + np.exp(-np.clip(z, -700, 700)))
        x = np.where(z == 1e4, 1.0, np.where(z == -1e4, 0.0, x))
    if loss.startswith("info"):
        x = _softmax(z)
    if dtype == "float32" and not from_logits and loss in ("sparse", "categorical", "binary"):
        # 1/p overflows float32 below 2.9e-39: the gradient there is ±inf (documented)
        x = np.where(x < np.finfo(np.float32).tiny, 0.0, x)
    weight = None
    if loss in ("sparse", "categorical") and draw(st.booleans()):
        weight = np.array(
            draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=c, max_size=c))
        )
        options["weight"] = weight
    if loss == "sparse":
        t = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=np.int64)
        if draw(st.booleans()):
            options["ignore_index"] = -100
            if n > 0 and draw(st.booleans()):
                t[0] = -100
        if from_logits:
            options["z_loss"] = draw(st.sampled_from([0.0, 1e-4]))
            options["softcap"] = draw(st.sampled_from([None, 30.0]))
    elif loss == "binary":
        t = np.array(
            draw(st.lists(st.sampled_from([0.0, 1.0, 0.3]), min_size=n * c, max_size=n * c))
        )
        t = t.reshape(n, c)
    elif loss == "listnet":
        t = np.array(draw(st.lists(_logit(), min_size=n * c, max_size=n * c))).reshape(n, c)
    else:  # categorical and info: a distribution per row (one-hot or soft)
        t = _softmax(
            np.array(draw(st.lists(_logit(), min_size=n * c, max_size=n * c))).reshape(n, c)
        )
    if loss in ("categorical", "binary", "listnet") or loss.startswith("info"):
        t = t.astype(dtype).astype(np.float64)
    if loss.startswith("info"):
        options["base"] = draw(st.sampled_from([None, 2.0]))
    grad = loss in ("sparse", "categorical", "binary", "listnet") and draw(st.booleans())
    plain = not options.get("gamma") and not options.get("z_loss") and not options.get("softcap")
    if backend == "torch" and weight is not None and from_logits and plain:
        # a class of weight 0 masked by -inf: PyTorch's kernel (the plain options) forms
        # 0 · inf = NaN, as F.cross_entropy does (the differences page); here a nonzero weight
        options["weight"] = np.where((weight == 0) & np.isinf(x).any(axis=0), 0.5, weight)
    return Call(loss, x, t, options, backend, dtype, grad)


def _converted(call: Call) -> tuple[Any, Any, dict[str, Any]]:
    x = call.convert(call.x)
    t = call.convert(call.t, floating=call.loss != "sparse")
    options = {k: call.convert(v) for k, v in call.options.items()}
    return x, t, options


def _to_float64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().double().numpy()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a._array, dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


def _tolerance(call: Call) -> tuple[float, float]:
    """Relative to the result: every loss is a sum of non-negative terms, so no cancellation."""
    eps = float(np.finfo(call.dtype).eps)
    count = max(call.x.size, 1)
    return 64 * eps, 64 * eps * count


# --------------------------------------------------------------------------- valid inputs


@FUZZ
@given(call=valid_calls())
def test_valid_inputs_match_the_float64_reference(call: Call) -> None:
    x, t, options = _converted(call)
    fn = _function(call.loss)
    got = _to_float64(fn(x, t, **options))
    want = np.asarray(_reference(call), dtype=np.float64)
    rtol, atol = _tolerance(call)
    assert got.shape == want.shape, call
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=str(call))
    if call.grad:
        value, g = ce.value_and_grad(fn, x, t, **options)
        np.testing.assert_allclose(_to_float64(value), got, rtol=rtol, atol=atol, equal_nan=True)
        assert tuple(g.shape) == tuple(x.shape)
        finite_rows = np.isfinite(want).all() and np.isfinite(call.rounded(call.x)).all()
        if finite_rows and call.loss != "sparse":
            assert np.isfinite(_to_float64(g)).all(), call


# --------------------------------------------------------------------------- bad inputs

# Each corruption: (name, losses it applies to, argument the error must name, mutate(call))
Mutation = Callable[[Call, Any], Call | tuple[Any, Any, dict[str, Any]]]


def _set(**options: Any) -> Mutation:
    def mutate(call: Call, _draw: Any) -> Call:
        call.options.update(options)
        return call

    return mutate


def _bad_label(call: Call, draw: Any) -> Call:
    c = call.x.shape[-1]
    call.t = call.t.copy()
    call.t[0] = draw(st.sampled_from([c, c + 5, -1, -7]))
    call.options.pop("ignore_index", None)
    return call


def _prob_outside(call: Call, draw: Any) -> Call:
    call.x = call.x.copy()
    call.x.flat[0] = draw(st.sampled_from([1.5, -0.25, INF, -INF]))
    _count_first_row(call)
    return call


def _count_first_row(call: Call) -> None:
    """A row under ignore_index is not read, so not checked (PyTorch's nll_loss): the first
    row, which a mutation makes bad, is counted."""
    ignore = call.options.get("ignore_index")
    if call.loss == "sparse" and ignore is not None and call.t.size and call.t.flat[0] == ignore:
        call.t = call.t.copy()
        call.t.flat[0] = 0


def _row_off(call: Call, draw: Any) -> Call:
    call.x = call.x * draw(st.sampled_from([0.5, 0.9, 1.1]))
    _count_first_row(call)
    return call


def _target_outside(call: Call, draw: Any) -> Call:
    call.t = call.t.copy()
    call.t.flat[0] = draw(st.sampled_from([1.5, -0.5, INF]))
    return call


def _as_list(which: str) -> Mutation:
    def mutate(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]]:
        x, t, options = _converted(call)
        if which == "input":
            return call.x.tolist(), t, options
        return x, call.t.tolist(), options

    return mutate


def _mixed(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]]:
    call.backend = "torch"
    x, _, options = _converted(call)
    return x, call.t, options


def _int_input(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]]:
    _, t, options = _converted(call)
    return (
        call.convert(np.nan_to_num(call.x, posinf=9, neginf=-9).astype(np.int64), floating=False),
        t,
        options,
    )


def _float_labels(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]]:
    x, _, options = _converted(call)
    return x, call.convert(call.t.astype(np.float64)), options


def _labels_n1(call: Call, _draw: Any) -> Call:
    call.t = call.t[:, None]
    return call


def _int_target(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]]:
    x, _, options = _converted(call)
    return (
        x,
        call.convert(
            np.round(np.nan_to_num(call.t, posinf=9, neginf=-9)).astype(np.int64), floating=False
        ),
        options,
    )


def _wrong_shape(call: Call, _draw: Any) -> Call:
    call.t = np.concatenate([call.t, call.t[:1]], axis=0)
    return call


def _weight(kind: str) -> Mutation:
    def mutate(call: Call, _draw: Any) -> tuple[Any, Any, dict[str, Any]] | Call:
        c = call.x.shape[-1]
        if kind == "negative":
            call.options["weight"] = np.full(c, -0.5)
        elif kind == "length":
            call.options["weight"] = np.ones(c + 1)
        else:
            x, t, options = _converted(call)
            options["weight"] = call.convert(np.ones(c, dtype=np.int64), floating=False)
            return x, t, options
        return call

    return mutate


SPARSE_CAT = ("sparse", "categorical")
PROB_LOSSES = ("sparse", "categorical", "binary")
ALL_LOSSES = ("sparse", "categorical", "binary", "listnet")
PAIRS = (*ALL_LOSSES, "info_ce", "info_kl")
CORRUPTIONS: list[tuple[str, tuple[str, ...], str, Mutation]] = [
    ("reduction", ALL_LOSSES, "reduction", _set(reduction="avg")),
    ("smoothing-range", PROB_LOSSES, "label_smoothing", _set(label_smoothing=1.5)),
    ("smoothing-nan", PROB_LOSSES, "label_smoothing", _set(label_smoothing=math.nan)),
    ("smoothing-type", PROB_LOSSES, "label_smoothing", _set(label_smoothing="0.1")),
    ("gamma", PROB_LOSSES, "gamma", _set(gamma=-1.0)),
    ("gamma-inf", PROB_LOSSES, "gamma", _set(gamma=INF)),
    ("from_logits", PROB_LOSSES, "from_logits", _set(from_logits="yes")),
    ("axis-range", (*SPARSE_CAT, "listnet"), "axis", _set(axis=5)),
    ("axis-type", (*SPARSE_CAT, "listnet"), "axis", _set(axis=1.0)),
    ("z_loss-probs", ("sparse",), "z_loss", _set(from_logits=False, z_loss=0.1, softcap=None)),
    ("softcap", ("sparse",), "softcap", _set(from_logits=True, softcap=-1.0)),
    ("label-range", ("sparse",), "target", _bad_label),
    ("labels-float", ("sparse",), "target", _float_labels),
    ("labels-n1", ("sparse",), "target", _labels_n1),
    ("prob-outside", PROB_LOSSES, "input", _prob_outside),
    ("row-sum", SPARSE_CAT, "input", _row_off),
    ("target-outside", ("categorical", "binary"), "target", _target_outside),
    ("target-int", ("categorical", "binary"), "target", _int_target),
    ("shape", ("categorical", "binary", "listnet"), "target", _wrong_shape),
    ("input-list", (*PAIRS, "info_entropy"), "input", _as_list("input")),
    ("target-list", PAIRS, "target", _as_list("target")),
    ("mixed-libraries", PAIRS, "target", _mixed),
    ("input-int", (*PAIRS, "info_entropy"), "input", _int_input),
    ("info-axis", ("info_ce", "info_kl", "info_entropy"), "axis", _set(axis=3)),
    ("info-base", ("info_ce", "info_kl", "info_entropy"), "base", _set(base=1.0)),
    ("weight-negative", SPARSE_CAT, "weight", _weight("negative")),
    ("weight-length", SPARSE_CAT, "weight", _weight("length")),
    ("weight-int", SPARSE_CAT, "weight", _weight("int")),
]
NAMES = {
    "listnet": {"input": "scores", "target": "relevance"},
    "info_ce": {"input": "p", "target": "q"},
    "info_kl": {"input": "p", "target": "q"},
    "info_entropy": {"input": "p"},
}


@st.composite
def bad_calls(draw: st.DrawFn) -> tuple[str, Any, Any, Any, dict[str, Any], str]:
    name, losses, argument, mutate = draw(st.sampled_from(CORRUPTIONS))
    call = draw(valid_calls().filter(lambda c: c.loss in losses and c.x.shape[0] > 0))
    if name in ("prob-outside", "row-sum") or name == "z_loss-probs":
        call.options["from_logits"] = False
        call.options.pop("z_loss", None)
        call.options.pop("softcap", None)
        if call.loss in SPARSE_CAT:
            call.x = _softmax(call.x if np.isfinite(call.x).any() else np.zeros_like(call.x))
        elif call.loss == "binary":
            call.x = np.full_like(call.x, 0.5)
    if name == "row-sum":
        call.x = call.x.astype(np.float64)
        call.dtype = "float64"
    if name == "labels-n1" and call.backend == "array_api_strict":
        call.backend = "numpy"
    mutated = mutate(call, draw)
    x, t, options = _converted(mutated) if isinstance(mutated, Call) else mutated
    argument = NAMES.get(call.loss, {}).get(argument, argument)
    return name, _function(call.loss), x, t, options, argument


@FUZZ
@given(case=bad_calls())
def test_bad_inputs_raise_a_clear_error_naming_the_argument(
    case: tuple[str, Any, Any, Any, dict[str, Any], str],
) -> None:
    name, fn, x, t, options, argument = case
    with pytest.raises((ValueError, TypeError)) as info:
        fn(x, t, **options)
    message = str(info.value)
    assert f"`{argument}`" in message, (name, message)
    assert not isinstance(info.value, IndexError | KeyError | AttributeError), (name, message)


# --------------------------------------------------------------------------- NaN propagates


@FUZZ
@given(call=valid_calls().filter(lambda c: c.x.size > 0), data=st.data())
def test_nan_in_the_input_propagates(call: Call, data: st.DataObject) -> None:
    """A NaN in a used entry of the input gives NaN, never an error or a finite number."""
    index = data.draw(st.integers(0, call.x.size - 1))
    call.x = call.x.copy()
    call.x.flat[index] = math.nan
    if call.loss == "sparse":
        row = index // call.x.shape[-1]
        if call.options.get("ignore_index") is not None and call.t[row] == -100:
            call.t = call.t.copy()
            call.t[row] = 0
    x, t, options = _converted(call)
    if "reduction" in options:
        options["reduction"] = "none"
    got = _to_float64(_function(call.loss)(x, t, **options))
    flat_row = index // call.x.shape[-1]
    value = got.reshape(-1)[flat_row] if call.loss != "binary" else got.reshape(-1)[index]
    assert math.isnan(value), (call, got)


# --------------------------------------------------------------------------- not arrays


def _public_calls() -> list[tuple[str, Callable[[Any, Any], Any], tuple[str, str], Any, Any]]:
    """(label, call(first, second), the two argument names, a valid first, a valid second)."""
    import crossent.metrics as metrics
    import crossent.nn as cnn
    from crossent import fused

    z, y, p = np.zeros((2, 3)), np.array([0, 1]), np.full((2, 3), 1 / 3)
    zt, yt, w = torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 3)
    io, pq = ("input", "target"), ("p", "q")
    sparse = ce.sparse_categorical_cross_entropy
    calls: list[tuple[str, Callable[[Any, Any], Any], tuple[str, str], Any, Any]] = [
        ("sparse", lambda a, b: sparse(a, b, from_logits=True), io, z, y),
        ("categorical", lambda a, b: ce.categorical_cross_entropy(a, b), io, p, p),
        ("binary", lambda a, b: ce.binary_cross_entropy(a, b), io, p, p),
        ("listnet", ce.listnet_loss, ("scores", "relevance"), z, p),
        ("distill", ce.distillation_loss, ("student_logits", "teacher_logits"), z, z),
        ("value_and_grad", lambda a, b: ce.value_and_grad(sparse, a, b), io, p, y),
        ("info.cross_entropy", ce.info.cross_entropy, pq, p, p),
        ("info.kl_divergence", ce.info.kl_divergence, pq, p, p),
        ("info.js_divergence", ce.info.js_divergence, pq, p, p),
        ("info.entropy", lambda a, _b: ce.info.entropy(a), pq, p, p),
        ("info.surprisal", lambda a, _b: ce.info.surprisal(a), pq, p, p),
        ("nn.CrossEntropyLoss", cnn.CrossEntropyLoss(), io, zt, yt),
        ("nn.NLLLoss", cnn.NLLLoss(), io, zt, yt),
        ("nn.FocalLoss", cnn.FocalLoss(), io, zt, yt),
        ("nn.BCEWithLogitsLoss", cnn.BCEWithLogitsLoss(), io, zt, zt),
        ("nn.BinaryFocalLoss", cnn.BinaryFocalLoss(), io, zt, zt),
        ("fused.linear_cross_entropy", lambda a, b: fused.linear_cross_entropy(a, w, b), ("hidden", "target"), zt, yt),
        ("fused.linear_log_probs", lambda a, b: fused.linear_log_probs(a, w, b), ("hidden", "target"), zt, yt),
        ("metrics.CrossEntropy", lambda a, b: metrics.CrossEntropy(input_kind="probs").update(a, b), io, p, y),
        ("metrics.ClassificationMetrics", lambda a, b: metrics.ClassificationMetrics(input_kind="probs").update(a, b), io, p, y),
        ("metrics.BinaryClassificationMetrics", lambda a, b: metrics.BinaryClassificationMetrics(input_kind="probs").update(a, b), io, p[:, 0], y),
    ]  # fmt: skip
    return calls


@pytest.mark.parametrize(
    "bad", [None, 0.5, "abc", [[0.5, 0.5]]], ids=["None", "float", "str", "list"]
)
@pytest.mark.parametrize("which", [0, 1])
def test_every_public_function_names_an_argument_that_is_not_an_array(which: int, bad: Any) -> None:
    """None, a Python number, a string or a list in place of an array: a TypeError naming
    the argument, from every public function (distillation_loss, the nn modules' forward
    and the metrics' update leaked AttributeError before)."""
    for label, call, names, first, second in _public_calls():
        if which == 1 and label in ("info.entropy", "info.surprisal"):
            continue
        args = [first, second]
        args[which] = bad
        with pytest.raises(TypeError) as info:
            call(*args)
        message = str(info.value)
        assert "`" in message, (label, message)
        named = f"`{names[which]}`" in message or all(f"`{n}`" in message for n in names)
        assert named, (label, message)


# --------------------------------------------------------------------------- bad option values


def _option_calls() -> dict[str, Callable[..., Any]]:
    """One valid call per public function, taking the option under test as keywords."""
    import crossent.metrics as metrics
    import crossent.nn as cnn
    from crossent import fused

    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    h, w = torch.zeros(2, 3), torch.eye(3)
    return {
        "distillation_loss": lambda **o: ce.distillation_loss(z, z, **o),
        "linear_cross_entropy": lambda **o: fused.linear_cross_entropy(h, w, y, **o),
        "linear_log_probs": lambda **o: fused.linear_log_probs(h, w, y, **o),
        "linear_distillation_loss": lambda **o: fused.linear_distillation_loss(h, w, h, w, y, **o),
        "CrossEntropyLoss": lambda **o: cnn.CrossEntropyLoss(**o)(z, y),
        "NLLLoss": lambda **o: cnn.NLLLoss(**o)(z, y),
        "BCEWithLogitsLoss": lambda **o: cnn.BCEWithLogitsLoss(**o)(z, z),
        "FocalLoss": lambda **o: cnn.FocalLoss(**o)(z, y),
        "BinaryFocalLoss": lambda **o: cnn.BinaryFocalLoss(**o)(z, z),
        "LinearCrossEntropyLoss": lambda **o: cnn.LinearCrossEntropyLoss(**o)(h, w, y),
        "CrossEntropy": lambda **o: metrics.CrossEntropy(input_kind="logits", **o).update(z, y),
        "CalibrationError": lambda **o: metrics.CalibrationError(input_kind="logits", **o),
    }


BAD_OPTIONS: list[tuple[str, str, Any]] = [
    (fn, "reduction", value)
    for fn in ("distillation_loss", "linear_cross_entropy", "linear_distillation_loss",
               "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "FocalLoss",
               "BinaryFocalLoss", "LinearCrossEntropyLoss")
    for value in ("avg", None, 1)
] + [
    ("distillation_loss", "beta", 1.5), ("distillation_loss", "beta", math.nan),
    ("distillation_loss", "temperature", 0.0), ("distillation_loss", "temperature", math.inf),
    ("distillation_loss", "axis", 2), ("distillation_loss", "ignore_index", 1.5),
    ("linear_cross_entropy", "label_smoothing", -0.1), ("linear_cross_entropy", "z_loss", math.nan),
    ("linear_cross_entropy", "softcap", 0.0), ("linear_cross_entropy", "chunk_size", 0),
    ("linear_cross_entropy", "chunk_size", 2.0), ("linear_cross_entropy", "shift", "yes"),
    ("linear_cross_entropy", "ignore_index", None),
    ("linear_log_probs", "temperature", -1.0), ("linear_log_probs", "softcap", math.inf),
    ("linear_log_probs", "return_entropy", 1),
    ("linear_distillation_loss", "beta", -0.5), ("linear_distillation_loss", "temperature", 0.0),
    ("CrossEntropyLoss", "label_smoothing", 1.5), ("CrossEntropyLoss", "ignore_index", 1.5),
    ("CrossEntropyLoss", "z_loss", -1.0), ("CrossEntropyLoss", "softcap", -2.0),
    ("FocalLoss", "gamma", -1.0), ("FocalLoss", "gamma", "2"),
    ("BinaryFocalLoss", "alpha", 2.0), ("BinaryFocalLoss", "gamma", math.inf),
    ("LinearCrossEntropyLoss", "chunk_size", -3),
    ("CrossEntropy", "base", 1.0), ("CrossEntropy", "base", math.inf),
    ("CrossEntropy", "ignore_index", 0.5), ("CrossEntropy", "axis", "1"),
    ("CalibrationError", "bins", 0), ("CalibrationError", "binning", "quantile"),
    ("CalibrationError", "norm", "l3"), ("CalibrationError", "kind", "any"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "option", "value"), BAD_OPTIONS)
def test_bad_option_values_raise_naming_the_option(fn: str, option: str, value: Any) -> None:
    """Wrong keyword values of the fused functions, the modules, distillation and the
    metrics: a ValueError/TypeError whose message names the option in backticks."""
    with pytest.raises((ValueError, TypeError)) as info:
        _option_calls()[fn](**{option: value})
    assert f"`{option}`" in str(info.value), str(info.value)
