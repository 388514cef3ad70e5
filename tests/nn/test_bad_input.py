"""crossent.nn modules reject what torch.nn rejects, with messages that fit the module."""

from __future__ import annotations

import pytest

import crossent.nn

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 2])
@pytest.mark.parametrize("module", ["CrossEntropyLoss", "FocalLoss"])
def test_ignore_index_with_probability_targets_raises_as_torch(
    ignore_index: int, module: str
) -> None:
    """torch raises for ignore_index >= 0 with floating targets and ignores a negative one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.float64), dim=1)
    ours = getattr(crossent.nn, module)(ignore_index=ignore_index)
    if module == "FocalLoss":
        ours = crossent.nn.FocalLoss(0.0, ignore_index=ignore_index)
    reference = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)
    if ignore_index >= 0:
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            reference(x, t)
        with pytest.raises(ValueError, match=r"`ignore_index`=\d+ is not supported for floating"):
            ours(x, t)
    else:
        torch.testing.assert_close(ours(x, t), reference(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", ["CrossEntropyLoss", "NLLLoss", "FocalLoss"])
@pytest.mark.parametrize("given", [None, 1.0, [[0.0, 1.0]]])
def test_input_that_is_not_an_array_is_a_type_error_naming_it(module: str, given: object) -> None:
    """None, a number or a list as `input`: a TypeError naming `input` (AttributeError before)."""
    loss = getattr(crossent.nn, module)()
    with pytest.raises(TypeError, match="`input` must be a tensor"):
        loss(given, torch.tensor([0]))


def _negative_weight(how: str, loss: object) -> None:
    """Give `loss` a weight of [1, -1, 1] after construction, as `how` says."""
    bad = torch.tensor([1.0, -1.0, 1.0])
    if how == "load_state_dict":
        loss.load_state_dict({"weight": bad})  # type: ignore[attr-defined]
    elif how == "in_place":
        with torch.no_grad():
            loss.weight[1] = -1.0  # type: ignore[attr-defined]
    else:
        loss.weight = bad  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["load_state_dict", "in_place", "assigned"])
@pytest.mark.parametrize("module", ["CrossEntropyLoss", "FocalLoss"])
def test_a_weight_changed_after_construction_is_checked_again(how: str, module: str) -> None:
    """The class-index path reads the module's weight as the module checked it: a negative
    weight set later gave a silent number (here weights summing to 0: a loss of 0)."""
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    t = torch.tensor([0, 1])
    loss = getattr(crossent.nn, module)(weight=torch.ones(3))
    loss(x, t)  # checked once
    _negative_weight(how, loss)
    with pytest.raises(ValueError, match="`weight` must be non-negative"):
        loss(x, t)
    loss.weight = torch.tensor([1.0, 2.0, 1.0])
    fresh = getattr(crossent.nn, module)(weight=torch.tensor([1.0, 2.0, 1.0]))
    assert torch.equal(loss(x, t), fresh(x, t))


def _traced_calls() -> dict[str, tuple[object, tuple[object, ...]]]:
    import crossent as ce
    import crossent.fused

    idx = torch.tensor([0, 1])
    return {
        "BCEWithLogitsLoss": (
            crossent.nn.BCEWithLogitsLoss(),
            (torch.zeros(2, 3), torch.ones(2, 3)),
        ),
        "CrossEntropyLoss": (crossent.nn.CrossEntropyLoss(), (torch.zeros(2, 3), idx)),
        "CrossEntropyLoss_soft": (
            crossent.nn.CrossEntropyLoss(),
            (torch.zeros(2, 3), torch.full((2, 3), 1 / 3)),
        ),
        "FocalLoss": (crossent.nn.FocalLoss(), (torch.zeros(2, 3, requires_grad=True), idx)),
        "linear_cross_entropy": (
            crossent.fused.linear_cross_entropy,
            (torch.randn(2, 3), torch.randn(4, 3), idx),
        ),
        "kl_divergence": (
            lambda p, q: ce.info.kl_divergence(p, q, from_logits=True),
            (torch.zeros(2, 3), torch.ones(2, 3)),
        ),
    }


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.trace.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(_traced_calls()))
def test_jit_trace_is_a_clear_error(name: str) -> None:
    """torch.jit.trace keeps what a call read as constants: a BCE mean traced on 2 rows of 3
    gave a 1-row batch half its loss (0.347 for 0.693), soft-target cross-entropy alike, and
    the focal loss raised `unordered_map::at`. Now a TypeError that names the ways out."""
    fn, args = _traced_calls()[name]
    with pytest.raises(TypeError, match=r"torch\.jit\.trace.*torch\.compile"):
        torch.jit.trace(fn, args, check_trace=False)
