"""Value checks read tensors that require grad without autograd's warning (warnings are errors)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from crossent import info
from crossent._lib import _checks
from crossent._lib._xp import array_namespace

torch = pytest.importorskip("torch")


def _xp(x: Any) -> Any:
    return array_namespace(x)


def _leaf(*values: float) -> Any:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


CHECKS: dict[str, tuple[Callable[[Any], object], str]] = {
    "probabilities": (
        lambda x: _checks.check_probabilities(x, name="input", xp=_xp(x)),
        "min=-0.5, max=1.5",
    ),
    "probability_rows": (
        lambda x: _checks.check_probability_rows(x.abs() / 4, axis=0, name="input", xp=_xp(x)),
        "sums to 0.625",
    ),
    "unit_interval": (
        lambda x: _checks.check_in_unit_interval(x, name="target", xp=_xp(x)),
        "[-0.5, 1.5]",
    ),
    "nonnegative": (
        lambda x: _checks.check_nonnegative(x, name="weight", xp=_xp(x)),
        "minimum of -0.5",
    ),
    "info_distribution": (lambda x: info.entropy(x), "[-0.5, 1.5]"),
}


@pytest.fixture
def warn_always() -> Any:
    """torch warns about a scalar read of a tensor that requires grad once per process by default."""
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(before)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_value_check_reads_a_tensor_that_requires_grad(name: str, warn_always: Any) -> None:
    check, reported = CHECKS[name]
    x = _leaf(-0.5, 1.5, 0.5)
    with pytest.raises(ValueError, match=re.escape(reported)):
        check(x)  # filterwarnings = error: autograd's scalar-conversion warning would fail here
    assert x.grad is None


def test_device_side_messages_fit_cudas_assert_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's CUDA ``_assert_async`` raises "Message length must be smaller than 255" for a
    longer message, on every call: the deferred row-sum message of bfloat16 "predictions" was
    262 bytes. Every device-side check's message fits, for the longest names crossent checks."""
    seen: list[str] = []

    def cuda_like(ok: Any, msg: str) -> None:
        if len(msg.encode()) > _checks.DEVICE_MESSAGE_MAX:
            raise RuntimeError("Message length must be smaller than 255")
        seen.append(msg)

    monkeypatch.setattr(torch, "_assert_async", cuda_like)
    monkeypatch.setattr(_checks, "values_checked", lambda *arrays: False)
    monkeypatch.setattr(_checks, "device_assertions", lambda: True)
    p = torch.full((2, 3), 1 / 3, dtype=torch.bfloat16)
    for name in ("predictions", "teacher_logits", "class_weight"):
        _checks.check_probability_rows(p, axis=-1, name=name, xp=_xp(p))
        _checks.check_in_unit_interval(p, name=name, xp=_xp(p))
        _checks.check_nonnegative(p, name=name, xp=_xp(p))
    _checks.assert_labels_on_device(torch.tensor([0, 5]), 128256, -100)
    assert len(seen) == 3 * 4 + 1  # range and row sums, unit interval, sign; per name
    assert seen[1].startswith("`predictions` holds probabilities whose rows must sum to 1 along")


@pytest.mark.parametrize(
    ("dtype", "label", "num_classes", "ignore_index", "refused"),
    [
        ("uint8", 156, 5, -100, True),  # -100 does not fit uint8: 156 is not ignored
        ("uint8", 200, 5, 200, False),  # ignore_index fits: ignored
        ("uint8", 255, 300, None, False),  # no uint8 label reaches 300 classes
        ("uint8", 5, 5, None, True),
        ("int8", -100, 5, -100, False),
        ("int8", -56, 5, 200, True),  # 200 does not fit int8: -56 is not ignored
        ("int8", 127, 200, None, False),  # 200 does not fit int8, no label reaches it
        ("int16", -3, 5, None, True),
        ("uint16", 40000, 5, -100, True),  # wide unsigned: compared as int64
        ("int64", -100, 5, -100, False),
        ("int64", -99, 5, -100, True),
    ],
)
def test_guard_label_range_refuses_what_check_label_range_refuses(
    dtype: str, label: int, num_classes: int, ignore_index: int | None, refused: bool
) -> None:
    """Validation off, the guard (the fused and traced paths' kernel-level check) refuses
    exactly the labels the validation check refuses, in every integer width: both use
    ``_outside``, which never compares with a class count or an `ignore_index` the dtype
    cannot hold (PyTorch would wrap -100 to 156 in uint8 and ignore a real label)."""
    import crossent as ce

    torch = pytest.importorskip("torch")
    target = torch.tensor([0, label, 1], dtype=getattr(torch, dtype))
    xp = array_namespace(target)
    if refused:
        with pytest.raises(ValueError, match=rf"min={label}, max={label}"):
            _checks.check_label_range(target, num_classes, ignore_index=ignore_index, xp=xp)
        with ce.validation(False), pytest.raises(IndexError, match=rf": {label} \(checked"):
            _checks.guard_label_range(target, num_classes, ignore_index=ignore_index)
    else:
        _checks.check_label_range(target, num_classes, ignore_index=ignore_index, xp=xp)
        with ce.validation(False):
            _checks.guard_label_range(target, num_classes, ignore_index=ignore_index)
