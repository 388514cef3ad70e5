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
