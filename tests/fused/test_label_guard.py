"""With validation off the fused loss is as safe as torch's own kernels: a bad label never gives a number."""

from __future__ import annotations

import re
from typing import Any

import pytest

import crossent as ce

torch = pytest.importorskip("torch")
fused = pytest.importorskip("crossent.fused")


@pytest.mark.parametrize("label", [9, 5, -1, -101])
def test_out_of_range_label_raises_with_validation_off(label: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, generator=gen)
    weight = torch.randn(5, 4, generator=gen)
    target = torch.tensor([0, label, 2])
    with pytest.raises(IndexError, match=r"Target .* is out of bounds"):
        torch.nn.functional.cross_entropy(hidden @ weight.T, target)
    with ce.validation(False), pytest.raises(IndexError, match=re.escape("outside [0, 5)")):
        fused.linear_cross_entropy(hidden, weight, target)
    with pytest.raises(ValueError, match=re.escape("outside [0, 5)")):
        fused.linear_cross_entropy(hidden, weight, target)


def test_valid_and_ignored_labels_pass_with_validation_off() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 4, -100, 2])
    with ce.validation(False):
        got = fused.linear_cross_entropy(hidden, weight, target)
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label", [9, -1])
def test_log_probs_out_of_range_label_raises_with_validation_off(label: int) -> None:
    # sibling of the loss: linear_log_probs indexes the logits with the labels too
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 4, generator=gen)
    weight = torch.randn(5, 4, generator=gen)
    target = torch.tensor([0, label, 2])
    with ce.validation(False), pytest.raises(IndexError, match=re.escape("outside [0, 5)")):
        fused.linear_log_probs(hidden, weight, target)
    with pytest.raises(ValueError, match=re.escape("outside [0, 5)")):
        fused.linear_log_probs(hidden, weight, target)


@pytest.mark.parametrize(
    ("dtype", "label", "ignore_index"),
    [(torch.uint8, 156, -100), (torch.int8, 1, 257), (torch.int16, 1, 2**16 + 1)],
)
def test_narrow_label_equal_to_wrapped_ignore_index_is_counted(
    dtype: Any, label: int, ignore_index: int
) -> None:
    """An `ignore_index` the label dtype cannot hold ignores nothing (uint8 156 is not -100).

    Comparing the narrow labels with it wrapped it (-100 → 156 in uint8), so the label
    156 of a 300-class head was silently dropped: loss 0 instead of its cross-entropy.
    """
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, label, 2], dtype=dtype)
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, target.long(), reduction="none")
    assert want.min() > 0
    for flag in (True, False):
        with ce.validation(flag):
            got = fused.linear_cross_entropy(
                hidden, weight, target, ignore_index=ignore_index, reduction="none"
            )
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            lp = fused.linear_log_probs(hidden, weight, target, ignore_index=ignore_index)
            torch.testing.assert_close(lp, -want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "label", "ignore_index"), [(torch.uint8, 156, -100), (torch.int8, -56, 200)]
)
def test_narrow_out_of_range_label_equal_to_wrapped_ignore_index_raises(
    dtype: Any, label: int, ignore_index: int
) -> None:
    """With validation off, such a label outside [0, V) is an error, not a silently ignored row."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, generator=gen)
    weight = torch.randn(5, 4, generator=gen)
    target = torch.tensor([0, label, 2], dtype=dtype)
    with ce.validation(False), pytest.raises(IndexError, match=re.escape("outside [0, 5)")):
        fused.linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index)
    with ce.validation(False), pytest.raises(IndexError, match=re.escape("outside [0, 5)")):
        fused.linear_log_probs(hidden, weight, target, ignore_index=ignore_index)


def test_distillation_mask_keeps_uint8_label_equal_to_wrapped_ignore_index() -> None:
    """`target` only masks the distillation loss: uint8 156 is not -100, so nothing is masked."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 156, 2], dtype=torch.uint8)
    got = fused.linear_distillation_loss(hidden, weight, teacher, weight, target, reduction="none")
    want = fused.linear_distillation_loss(hidden, weight, teacher, weight, reduction="none")
    assert want.min() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
@pytest.mark.parametrize("validate", [True, False])
def test_wide_unsigned_labels_are_accepted(dtype: str, validate: bool) -> None:
    """Labels of any integer width: with validation on, uint16/32/64 raised torch's
    NotImplementedError ('"ge_cpu" not implemented for 'UInt16'') from the range check."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    wide = target.to(getattr(torch, dtype))
    with ce.validation(validate):
        got = fused.linear_cross_entropy(hidden, weight, wide, reduction="none")
        lp = fused.linear_log_probs(hidden, weight, wide)
        with pytest.raises((ValueError, IndexError), match=re.escape("outside [0, 5)")):
            fused.linear_cross_entropy(hidden[:2], weight, torch.tensor([0, 9]).to(wide.dtype))
    want = fused.linear_cross_entropy(hidden, weight, target, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lp, -want, rtol=1e-12, atol=1e-12)
