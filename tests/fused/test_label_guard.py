"""With validation off the fused loss is as safe as torch's own kernels: a bad label never gives a number."""

from __future__ import annotations

import re

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
