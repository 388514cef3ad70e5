"""crossent.nn: parity with torch.nn (values and gradients), state_dict, repr, argument checks."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

import crossent as ce
import crossent.nn as cnn
from tests._reference import focal as ref

TORCH_PAIRS = ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss")
REDUCTIONS = ("mean", "sum", "none")
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_parity(
    ours: Callable[..., Any],
    theirs: Callable[..., Any],
    inputs: list[torch.Tensor],
    target: torch.Tensor,
    *,
    dtype: torch.dtype,
    tol: dict[str, float] | None = None,
) -> None:
    """Same value and same gradients (for every floating input) under a random upstream grad."""
    tol = tol or TOL[dtype]
    ours_in = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    theirs_in = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    got = ours(*ours_in, target)
    want = theirs(*theirs_in, target)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"])
    upstream = torch.randn(want.shape, generator=_gen(99), dtype=torch.float64).to(dtype)
    got.backward(upstream)
    want.backward(upstream)
    for a, b in zip(ours_in, theirs_in, strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=tol["rtol"], atol=tol["atol"])


# ----------------------------------------------------------------------------
# parity with torch.nn
# ----------------------------------------------------------------------------

SHAPES = {"NC": (5, 4), "NCd1d2": (2, 4, 3, 2), "C": (4,)}


def _class_indices(shape: tuple[int, ...], seed: int, *, ignore: int | None = None) -> torch.Tensor:
    c = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, c, target_shape, generator=_gen(seed))
    if ignore is not None and target.ndim > 0:
        target.view(-1)[::3] = ignore
    elif ignore is not None and int(target) == ignore:
        target = (target + 1) % c  # one unbatched item: keep it counted
    return target


CE_OPTIONS = {
    "plain": {},
    "weight": {"weight": torch.tensor([0.5, 2.0, 1.0, 1.5])},
    "ignore_index": {"ignore_index": 1},
    "smoothing": {"label_smoothing": 0.15},
    "all": {
        "weight": torch.tensor([0.5, 2.0, 1.0, 1.5]),
        "ignore_index": 2,
        "label_smoothing": 0.1,
    },
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("options", list(CE_OPTIONS.values()), ids=list(CE_OPTIONS))
def test_cross_entropy_class_indices_matches_torch(
    options: dict[str, Any], shape: tuple[int, ...], reduction: str, dtype: torch.dtype
) -> None:
    kwargs = {**options, "reduction": reduction}
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    ignore = kwargs.get("ignore_index")
    logits = torch.randn(shape, generator=_gen(1), dtype=torch.float64) * 2
    target = _class_indices(shape, 2, ignore=ignore)
    _check_parity(
        cnn.CrossEntropyLoss(**kwargs),
        torch.nn.CrossEntropyLoss(**kwargs),
        [logits],
        target,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3, 2)], ids=["NC", "NCd1d2"])
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": torch.tensor([0.5, 2.0, 1.0, 1.5]), "label_smoothing": 0.2}],
    ids=["plain", "weight-smoothing"],
)
def test_cross_entropy_probability_targets_matches_torch(
    options: dict[str, Any], shape: tuple[int, ...], reduction: str, dtype: torch.dtype
) -> None:
    kwargs = {**options, "reduction": reduction}
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    logits = torch.randn(shape, generator=_gen(3), dtype=torch.float64)
    target = torch.softmax(torch.randn(shape, generator=_gen(4), dtype=torch.float64), 1)
    _check_parity(
        cnn.CrossEntropyLoss(**kwargs),
        torch.nn.CrossEntropyLoss(**kwargs),
        [logits],
        target.to(dtype),
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": torch.tensor([0.5, 2.0, 1.0, 1.5]), "ignore_index": 0}],
    ids=["plain", "weight-ignore"],
)
def test_nll_loss_matches_torch(
    options: dict[str, Any], shape: tuple[int, ...], reduction: str, dtype: torch.dtype
) -> None:
    kwargs = {**options, "reduction": reduction}
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    dim = 0 if len(shape) == 1 else 1
    log_probs = torch.log_softmax(torch.randn(shape, generator=_gen(5), dtype=torch.float64), dim)
    target = _class_indices(shape, 6, ignore=kwargs.get("ignore_index"))
    _check_parity(
        cnn.NLLLoss(**kwargs), torch.nn.NLLLoss(**kwargs), [log_probs], target, dtype=dtype
    )


BINARY_OPTIONS = {
    "plain": {},
    "weight": {"weight": torch.tensor([0.5, 2.0, 1.0])},
    "weight-2d": {"weight": torch.rand(4, 3, generator=_gen(7)) + 0.5},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", list(BINARY_OPTIONS.values()), ids=list(BINARY_OPTIONS))
def test_bce_matches_torch(options: dict[str, Any], reduction: str, dtype: torch.dtype) -> None:
    kwargs = {**{k: v.to(dtype) for k, v in options.items()}, "reduction": reduction}
    probs = torch.rand(4, 3, generator=_gen(8), dtype=torch.float64) * 0.98 + 0.01
    target = torch.rand(4, 3, generator=_gen(9), dtype=torch.float64).to(dtype)
    target[0] = torch.tensor([0.0, 1.0, 1.0])  # hard labels too
    _check_parity(cnn.BCELoss(**kwargs), torch.nn.BCELoss(**kwargs), [probs], target, dtype=dtype)


def test_bce_saturated_probabilities_match_torch_clamp() -> None:
    probs = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    got = cnn.BCELoss(reduction="none")(probs, target)
    want = torch.nn.BCELoss(reduction="none")(probs, target)
    torch.testing.assert_close(got, want)
    assert float(got[0]) == 100.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight": torch.tensor([0.5, 2.0, 1.0])},
        {"pos_weight": torch.tensor([3.0, 0.5, 1.0])},
        {"weight": torch.rand(4, 3, generator=_gen(10)) + 0.5, "pos_weight": torch.tensor([2.0])},
    ],
    ids=["plain", "weight", "pos_weight", "both"],
)
def test_bce_with_logits_matches_torch(
    options: dict[str, Any], reduction: str, dtype: torch.dtype
) -> None:
    kwargs = {**{k: v.to(dtype) for k, v in options.items()}, "reduction": reduction}
    logits = torch.randn(4, 3, generator=_gen(11), dtype=torch.float64) * 3
    target = torch.rand(4, 3, generator=_gen(12), dtype=torch.float64).to(dtype)
    target[1] = torch.tensor([1.0, 0.0, 1.0])
    _check_parity(
        cnn.BCEWithLogitsLoss(**kwargs),
        torch.nn.BCEWithLogitsLoss(**kwargs),
        [logits],
        target,
        dtype=dtype,
    )


def test_bce_with_logits_extreme_logits_match_torch() -> None:
    logits = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float32)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    got = cnn.BCEWithLogitsLoss(reduction="none")(logits, target)
    want = torch.nn.BCEWithLogitsLoss(reduction="none")(logits, target)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_bfloat16_matches_torch_and_keeps_dtype() -> None:
    logits = torch.randn(6, 5, generator=_gen(13)).to(torch.bfloat16)
    target = torch.randint(0, 5, (6,), generator=_gen(14))
    _check_parity(
        cnn.CrossEntropyLoss(),
        torch.nn.CrossEntropyLoss(),
        [logits],
        target,
        dtype=torch.bfloat16,
        tol={"rtol": 2e-2, "atol": 2e-2},
    )


# ----------------------------------------------------------------------------
# the documented difference, and crossent's extras
# ----------------------------------------------------------------------------


def test_mean_over_only_ignored_targets_is_zero_not_nan() -> None:
    logits = torch.randn(3, 4, generator=_gen(15), requires_grad=True)
    target = torch.full((3,), -100)
    loss = cnn.CrossEntropyLoss()(logits, target)
    assert torch.isnan(torch.nn.CrossEntropyLoss()(logits, target))  # PyTorch's NaN
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "extras",
    [{"z_loss": 1e-3}, {"softcap": 3.0}, {"z_loss": 0.05, "softcap": 2.0}],
    ids=["z_loss", "softcap", "both"],
)
def test_cross_entropy_z_loss_and_softcap_match_written_out(
    extras: dict[str, Any], reduction: str
) -> None:
    logits = torch.randn(2, 5, 3, generator=_gen(16), dtype=torch.float64) * 4
    target = _class_indices((2, 5, 3), 17, ignore=-100)
    _check_parity(
        cnn.CrossEntropyLoss(reduction=reduction, **extras),
        lambda x, t: ref.cross_entropy_with_extras(x, t, reduction=reduction, **extras),
        [logits],
        target,
        dtype=torch.float64,
    )


def test_float_class_indices_get_a_hint() -> None:
    logits = torch.randn(3, 4, generator=_gen(42))
    with pytest.raises(ValueError, match=r"class probabilities.*target\.long\(\)"):
        cnn.CrossEntropyLoss()(logits, torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="class probabilities"):
        cnn.FocalLoss()(logits, torch.tensor([0.0, 2.0, 1.0]))


def test_z_loss_and_softcap_need_class_indices() -> None:
    logits = torch.randn(3, 4, generator=_gen(18))
    probs = torch.softmax(torch.randn(3, 4, generator=_gen(19)), 1)
    with pytest.raises(ValueError, match="`z_loss` and `softcap` need class-index targets"):
        cnn.CrossEntropyLoss(z_loss=1e-4)(logits, probs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options",
    [
        {"gamma": 2.0},
        {"gamma": 0.5, "weight": torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64)},
        {"gamma": 2.0, "ignore_index": 3, "label_smoothing": 0.1},
        {
            "gamma": 1.0,
            "weight": torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64),
            "ignore_index": 0,
            "label_smoothing": 0.2,
        },
    ],
    ids=["gamma2", "gamma-half-weight", "ignore-smoothing", "all"],
)
def test_focal_loss_matches_written_out_formula(options: dict[str, Any], reduction: str) -> None:
    logits = torch.randn(6, 4, generator=_gen(20), dtype=torch.float64) * 2
    target = torch.tensor([0, 3, 1, 2, 3, 0])
    gamma = options["gamma"]
    rest = {k: v for k, v in options.items() if k != "gamma"}
    _check_parity(
        cnn.FocalLoss(gamma, reduction=reduction, **rest),
        lambda x, t: ref.softmax_focal(x, t, gamma=gamma, reduction=reduction, **rest),
        [logits],
        target,
        dtype=torch.float64,
    )


def test_focal_loss_is_cross_entropy_with_gamma() -> None:
    logits = torch.randn(2, 4, 3, generator=_gen(21), dtype=torch.float64)
    target = _class_indices((2, 4, 3), 22)
    _check_parity(
        cnn.FocalLoss(0.0), torch.nn.CrossEntropyLoss(), [logits], target, dtype=torch.float64
    )
    _check_parity(
        cnn.FocalLoss(), cnn.CrossEntropyLoss(gamma=2.0), [logits], target, dtype=torch.float64
    )


def test_focal_loss_takes_probability_targets() -> None:
    logits = torch.randn(5, 4, generator=_gen(40), dtype=torch.float64)
    probs = torch.softmax(torch.randn(5, 4, generator=_gen(41), dtype=torch.float64), 1)
    _check_parity(
        cnn.FocalLoss(0.0), torch.nn.CrossEntropyLoss(), [logits], probs, dtype=torch.float64
    )
    one_hot = F.one_hot(torch.tensor([0, 3, 1, 2, 2]), 4).to(torch.float64)
    _check_parity(
        cnn.FocalLoss(2.0),
        lambda x, t: ref.softmax_focal(x, t.argmax(1), gamma=2.0),
        [logits],
        one_hot,
        dtype=torch.float64,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25], ids=["no-alpha", "alpha.25"])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_binary_focal_loss_matches_torchvision(
    gamma: float, alpha: float | None, reduction: str
) -> None:
    logits = torch.randn(5, 3, generator=_gen(23), dtype=torch.float64) * 3
    target = (torch.rand(5, 3, generator=_gen(24)) > 0.5).to(torch.float64)

    def torchvision(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss = ref.sigmoid_focal_torchvision(
            x, t, gamma=gamma, alpha=-1 if alpha is None else alpha
        )
        return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]

    _check_parity(
        cnn.BinaryFocalLoss(gamma, alpha=alpha, reduction=reduction),
        torchvision,
        [logits],
        target,
        dtype=torch.float64,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
        {"pos_weight": torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64), "alpha": 0.25},
        {"label_smoothing": 0.1, "alpha": 0.6},
    ],
    ids=["weight", "pos_weight-alpha", "smoothing"],
)
def test_binary_focal_loss_options_match_written_out(options: dict[str, Any]) -> None:
    logits = torch.randn(5, 3, generator=_gen(25), dtype=torch.float64) * 2
    target = (torch.rand(5, 3, generator=_gen(26)) > 0.5).to(torch.float64)
    _check_parity(
        cnn.BinaryFocalLoss(**options),
        lambda x, t: ref.sigmoid_focal_per_term(x, t, gamma=2.0, **options),
        [logits],
        target,
        dtype=torch.float64,
    )


def test_binary_focal_loss_with_gamma_zero_is_bce_with_logits() -> None:
    logits = torch.randn(4, 3, generator=_gen(27), dtype=torch.float64)
    target = torch.rand(4, 3, generator=_gen(28), dtype=torch.float64)
    pos_weight = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    _check_parity(
        cnn.BinaryFocalLoss(0.0, pos_weight=pos_weight),
        torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight),
        [logits],
        target,
        dtype=torch.float64,
    )


def test_bce_extras_equal_the_functional_loss() -> None:
    probs = torch.rand(4, 3, generator=_gen(29), dtype=torch.float64) * 0.9 + 0.05
    target = torch.rand(4, 3, generator=_gen(30), dtype=torch.float64)
    options: dict[str, Any] = {
        "pos_weight": torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64),
        "label_smoothing": 0.1,
        "gamma": 1.5,
        "alpha": 0.3,
    }
    got = cnn.BCELoss(**options)(probs, target)
    want = ce.binary_cross_entropy(probs, target, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    logits = torch.logit(probs)
    got = cnn.BCEWithLogitsLoss(**options)(logits, target)
    want = ce.binary_cross_entropy(logits, target, from_logits=True, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# LinearCrossEntropyLoss
# ----------------------------------------------------------------------------


def _fused_available() -> bool:
    try:
        from crossent.fused import linear_cross_entropy

        h = torch.zeros(1, 2)
        linear_cross_entropy(h, torch.zeros(3, 2), torch.zeros(1, dtype=torch.long))
    except (ImportError, NotImplementedError):
        return False
    return True


needs_fused = pytest.mark.skipif(
    not _fused_available(), reason="crossent.fused.linear_cross_entropy is not implemented yet"
)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"ignore_index": 5, "chunk_size": 3}],
    ids=["plain", "smoothing", "ignore-chunk"],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_cross_entropy_matches_linear_then_cross_entropy(
    with_bias: bool, options: dict[str, Any], reduction: str, dtype: torch.dtype
) -> None:
    hidden = torch.randn(7, 8, generator=_gen(31), dtype=torch.float64)
    weight = torch.randn(11, 8, generator=_gen(32), dtype=torch.float64) * 0.5
    bias = torch.randn(11, generator=_gen(33), dtype=torch.float64)
    target = torch.tensor([0, 5, 10, 3, 5, 1, 7])
    torch_options = {k: v for k, v in options.items() if k != "chunk_size"}
    inputs = [hidden, weight, bias] if with_bias else [hidden, weight]

    def ours(h: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *b, t = rest
        module = cnn.LinearCrossEntropyLoss(reduction=reduction, **options)
        return module(h, w, t, b[0] if b else None)

    def theirs(h: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *b, t = rest
        logits = F.linear(h, w, b[0] if b else None)
        return F.cross_entropy(logits, t, reduction=reduction, **torch_options)

    _check_parity(ours, theirs, inputs, target, dtype=dtype, tol={"rtol": 1e-5, "atol": 1e-5})


@needs_fused
def test_linear_cross_entropy_z_loss_softcap_match_written_out() -> None:
    hidden = torch.randn(6, 4, generator=_gen(34), dtype=torch.float64)
    weight = torch.randn(9, 4, generator=_gen(35), dtype=torch.float64)
    target = torch.tensor([0, 8, -100, 3, 4, 4])
    extras: dict[str, Any] = {"z_loss": 1e-2, "softcap": 5.0}
    _check_parity(
        lambda h, w, t: cnn.LinearCrossEntropyLoss(**extras)(h, w, t),
        lambda h, w, t: ref.cross_entropy_with_extras(F.linear(h, w), t, **extras),
        [hidden, weight],
        target,
        dtype=torch.float64,
        tol={"rtol": 1e-7, "atol": 1e-9},
    )


@needs_fused
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_class_weight_is_a_buffer_like_torchs_weight(reduction: str) -> None:
    """`class_weight` (``linear_cross_entropy``'s option, API section 4): F.cross_entropy's
    `weight`, held as a buffer that follows .to(), the state_dict, pickle and deepcopy."""
    hidden = torch.randn(6, 4, generator=_gen(40), dtype=torch.float64)
    weight = torch.randn(9, 4, generator=_gen(41), dtype=torch.float64)
    cw = (torch.rand(9, generator=_gen(42)) + 0.1).double()  # exact in float32
    target = torch.tensor([0, 8, -100, 3, 4, 4])
    module = cnn.LinearCrossEntropyLoss(class_weight=cw.float(), label_smoothing=0.1)
    module = module.to(torch.float64)
    assert module.class_weight is not None
    assert module.class_weight.dtype == torch.float64
    assert list(module.state_dict()) == ["class_weight"]
    assert list(cnn.LinearCrossEntropyLoss().state_dict()) == []
    module.reduction = reduction
    _check_parity(
        module,
        lambda h, w, t: F.cross_entropy(
            F.linear(h, w), t, weight=cw, label_smoothing=0.1, reduction=reduction
        ),
        [hidden, weight],
        target,
        dtype=torch.float64,
        tol={"rtol": 1e-7, "atol": 1e-9},
    )
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(copied(hidden, weight, target), module(hidden, weight, target))


@needs_fused
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_takes_batch_by_sequence_hidden(reduction: str) -> None:
    hidden = torch.randn(2, 5, 4, generator=_gen(38), dtype=torch.float64)
    weight = torch.randn(9, 4, generator=_gen(39), dtype=torch.float64)
    target = torch.tensor([[0, 8, -100, 3, 4], [4, 1, 2, -100, 7]])
    _check_parity(
        lambda h, w, t: cnn.LinearCrossEntropyLoss(reduction=reduction)(h, w, t),
        lambda h, w, t: F.cross_entropy(F.linear(h, w).transpose(1, 2), t, reduction=reduction),
        [hidden, weight],
        target,
        dtype=torch.float64,
        tol={"rtol": 1e-7, "atol": 1e-9},
    )


# ----------------------------------------------------------------------------
# drop-in compatibility: signatures, legacy arguments, buffers, state_dict, repr
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_PAIRS)
def test_constructor_signature_extends_torchs(name: str) -> None:
    theirs = inspect.signature(getattr(torch.nn, name)).parameters
    ours = inspect.signature(getattr(cnn, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for key, param in theirs.items():
        assert ours[key].default == param.default, key
        assert ours[key].kind == param.kind, key
    for key in list(ours)[len(theirs) :]:
        assert ours[key].kind is inspect.Parameter.KEYWORD_ONLY, key


def _legacy_pairs() -> list[tuple[bool | None, bool | None]]:
    values = (None, True, False)
    return [(s, r) for s in values for r in values if (s, r) != (None, None)]


@pytest.mark.parametrize("name", TORCH_PAIRS)
@pytest.mark.parametrize(("size_average", "reduce"), _legacy_pairs())
def test_legacy_size_average_and_reduce_follow_torch(
    name: str, size_average: bool | None, reduce: bool | None
) -> None:
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated") as w:
        ours = getattr(cnn, name)(size_average=size_average, reduce=reduce, reduction="sum")
    assert w[0].filename == __file__  # points at the caller, not at crossent
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated") as t:
        theirs = getattr(torch.nn, name)(size_average=size_average, reduce=reduce, reduction="sum")
    assert ours.reduction == theirs.reduction
    assert str(w[0].message) == str(t[0].message)


def test_legacy_arguments_change_the_result_like_torch() -> None:
    logits = torch.randn(4, 3, generator=_gen(36), dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1])
    with pytest.warns(UserWarning, match="reduction='sum'"):
        ours = cnn.CrossEntropyLoss(None, False)  # positional, as old code wrote it
    with pytest.warns(UserWarning, match="reduction='sum'"):
        theirs = torch.nn.CrossEntropyLoss(None, False)
    _check_parity(ours, theirs, [logits], target, dtype=torch.float64)


def test_no_warning_without_legacy_arguments() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in TORCH_PAIRS:
            getattr(cnn, name)()


@pytest.mark.parametrize(
    ("name", "buffers"),
    [
        ("CrossEntropyLoss", {"weight": torch.tensor([1.0, 2.0, 3.0])}),
        ("NLLLoss", {"weight": torch.tensor([1.0, 2.0, 3.0])}),
        ("BCELoss", {"weight": torch.tensor([1.0, 2.0, 3.0])}),
        (
            "BCEWithLogitsLoss",
            {"weight": torch.tensor([1.0, 2.0, 3.0]), "pos_weight": torch.tensor([4.0, 5.0, 6.0])},
        ),
    ],
)
def test_state_dict_round_trips_with_torch(name: str, buffers: dict[str, torch.Tensor]) -> None:
    theirs = getattr(torch.nn, name)(**buffers)
    blank = {k: torch.zeros_like(v) for k, v in buffers.items()}
    ours = getattr(cnn, name)(**blank)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    ours.load_state_dict(theirs.state_dict())
    for key, value in buffers.items():
        assert torch.equal(getattr(ours, key), value)
    back = getattr(torch.nn, name)(**blank)
    back.load_state_dict(ours.state_dict())
    for key, value in buffers.items():
        assert torch.equal(getattr(back, key), value)


def test_none_buffers_stay_out_of_the_state_dict_like_torch() -> None:
    assert list(cnn.CrossEntropyLoss().state_dict()) == []
    assert list(cnn.BCEWithLogitsLoss().state_dict()) == []
    assert list(cnn.BCELoss().state_dict()) == []  # its extra pos_weight buffer too
    cnn.BCELoss().load_state_dict(torch.nn.BCELoss().state_dict())


def test_buffers_follow_module_dtype_moves() -> None:
    module = cnn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])).double()
    assert module.weight is not None
    assert module.weight.dtype == torch.float64
    logits = torch.randn(4, 3, generator=_gen(37), dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 1])
    want = F.cross_entropy(
        logits, target, weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    )
    torch.testing.assert_close(module(logits, target), want)


def test_modules_are_torch_modules() -> None:
    for name in (*TORCH_PAIRS, "FocalLoss", "BinaryFocalLoss", "LinearCrossEntropyLoss"):
        assert isinstance(getattr(cnn, name)(), torch.nn.Module)
    assert list(cnn.LinearCrossEntropyLoss().parameters()) == []


@pytest.mark.parametrize(
    ("module", "text"),
    [
        (cnn.CrossEntropyLoss(), "CrossEntropyLoss()"),
        (cnn.NLLLoss(), "NLLLoss()"),
        (cnn.BCELoss(), "BCELoss()"),
        (cnn.BCEWithLogitsLoss(), "BCEWithLogitsLoss()"),
        (
            cnn.CrossEntropyLoss(ignore_index=0, reduction="sum", z_loss=1e-4),
            "CrossEntropyLoss(ignore_index=0, reduction='sum', z_loss=0.0001)",
        ),
        (cnn.BCEWithLogitsLoss(alpha=0.25, gamma=2), "BCEWithLogitsLoss(gamma=2.0, alpha=0.25)"),
        (cnn.FocalLoss(), "FocalLoss()"),
        (cnn.FocalLoss(1.0, label_smoothing=0.1), "FocalLoss(gamma=1.0, label_smoothing=0.1)"),
        (cnn.BinaryFocalLoss(alpha=0.25), "BinaryFocalLoss(alpha=0.25)"),
        (
            cnn.LinearCrossEntropyLoss(softcap=30.0, chunk_size=1024),
            "LinearCrossEntropyLoss(softcap=30.0, chunk_size=1024)",
        ),
    ],
)
def test_repr_shows_non_default_options(module: torch.nn.Module, text: str) -> None:
    assert repr(module) == text


def test_default_reprs_equal_torchs() -> None:
    for name in TORCH_PAIRS:
        assert repr(getattr(cnn, name)()) == repr(getattr(torch.nn, name)())


# ----------------------------------------------------------------------------
# constructor arguments are checked in __init__
# ----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (cnn.CrossEntropyLoss, {"reduction": "avg"}, ValueError, "`reduction`"),
    (cnn.CrossEntropyLoss, {"label_smoothing": 1.5}, ValueError, "`label_smoothing`"),
    (cnn.CrossEntropyLoss, {"label_smoothing": "0.1"}, TypeError, "`label_smoothing`"),
    (cnn.CrossEntropyLoss, {"gamma": -1.0}, ValueError, "`gamma`"),
    (cnn.CrossEntropyLoss, {"z_loss": -1e-4}, ValueError, "`z_loss`"),
    (cnn.CrossEntropyLoss, {"softcap": 0.0}, ValueError, "`softcap`"),
    (cnn.CrossEntropyLoss, {"softcap": float("inf")}, ValueError, "`softcap`"),
    (cnn.CrossEntropyLoss, {"ignore_index": 1.5}, TypeError, "`ignore_index`"),
    (cnn.CrossEntropyLoss, {"weight": [1.0, 2.0]}, TypeError, "`weight` must be a torch.Tensor"),
    (cnn.CrossEntropyLoss, {"weight": torch.tensor([1, 2])}, TypeError, "floating dtype"),
    (cnn.CrossEntropyLoss, {"weight": torch.ones(2, 2)}, ValueError, "1-D"),
    (cnn.CrossEntropyLoss, {"weight": torch.tensor([1.0, -2.0])}, ValueError, "non-negative"),
    (cnn.NLLLoss, {"reduction": "mean "}, ValueError, "`reduction`"),
    (cnn.NLLLoss, {"ignore_index": True}, TypeError, "`ignore_index`"),
    (cnn.BCELoss, {"alpha": 1.5}, ValueError, "`alpha`"),
    (cnn.BCELoss, {"pos_weight": torch.tensor([-1.0])}, ValueError, "`pos_weight`"),
    (cnn.BCEWithLogitsLoss, {"pos_weight": 2.0}, TypeError, "`pos_weight`"),
    (cnn.BCEWithLogitsLoss, {"gamma": float("nan")}, ValueError, "`gamma`"),
    (cnn.FocalLoss, {"gamma": -2.0}, ValueError, "`gamma`"),
    (cnn.FocalLoss, {"weight": torch.ones(1, 3)}, ValueError, "1-D"),
    (cnn.BinaryFocalLoss, {"alpha": -0.1}, ValueError, "`alpha`"),
    (cnn.BinaryFocalLoss, {"label_smoothing": 2.0}, ValueError, "`label_smoothing`"),
    (cnn.LinearCrossEntropyLoss, {"chunk_size": 0}, ValueError, "`chunk_size`"),
    (cnn.LinearCrossEntropyLoss, {"chunk_size": 1.5}, TypeError, "`chunk_size`"),
    (cnn.LinearCrossEntropyLoss, {"class_weight": torch.ones(2, 2)}, ValueError, "1-D"),
    (cnn.LinearCrossEntropyLoss, {"class_weight": -torch.ones(3)}, ValueError, "non-negative"),
    (cnn.LinearCrossEntropyLoss, {"class_weight": [1.0]}, TypeError, "`class_weight`"),
    (cnn.LinearCrossEntropyLoss, {"reduction": None}, ValueError, "`reduction`"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD_ARGUMENTS],  # type: ignore[call-overload]
)
def test_invalid_constructor_arguments_are_rejected(
    cls: type, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_weight_values_are_not_checked_when_validation_is_off() -> None:
    with ce.validation(False):
        module = cnn.CrossEntropyLoss(weight=torch.tensor([1.0, -2.0]))
    assert module.weight is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "name", [*TORCH_PAIRS, "FocalLoss", "BinaryFocalLoss", "LinearCrossEntropyLoss"]
)
def test_torchscript_gets_a_clear_error(name: str) -> None:
    """TorchScript cannot compile the Python forward; the error says so and names the way out
    (before: 'Unknown type annotation: Tensor | None' or a failed inspect.getsource)."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 3)
            self.loss = getattr(cnn, name)()

    for target in (getattr(cnn, name)(), Model()):
        with pytest.raises(
            TypeError, match=rf"`{name}` cannot be compiled by TorchScript.*torch\.compile"
        ):
            torch.jit.script(target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_of_channels_last_log_probs_backward(reduction: str, weighted: bool) -> None:
    """(N, C, H, W) log-probabilities in a channels-last layout (a conv net's, or a permuted
    (N, H, W, C) tensor): PyTorch's ``nll_loss2d`` backward raised 'grad_input must be
    contiguous' (``F.nll_loss`` itself too). Values and gradients equal the contiguous ones."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # (N, H, W, C)
    y = torch.randint(0, 5, (2, 3, 4), generator=g)
    y[0, 0, 0] = -100
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    loss = cnn.NLLLoss(weight=weight, reduction=reduction)
    results = []
    for layout in ("contiguous", "channels_last"):
        leaf = z.clone().requires_grad_(True)
        log_probs = torch.log_softmax(leaf, -1).permute(0, 3, 1, 2)  # strides of channels_last
        if layout == "contiguous":
            log_probs = log_probs.contiguous()
        out = loss(log_probs, y)
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        results.append((out, grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-14, atol=1e-15)
