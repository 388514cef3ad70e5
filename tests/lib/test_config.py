"""The validation switch: in code, as a context manager and from the environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

import crossent as ce


def test_set_validation_round_trip() -> None:
    assert ce.get_validation() is True
    ce.set_validation(False)
    try:
        assert ce.get_validation() is False
    finally:
        ce.set_validation(True)


def _fail_inside_validation_off() -> None:
    with ce.validation(False):
        assert not ce.get_validation()
        raise RuntimeError


def test_context_manager_restores_on_error() -> None:
    with pytest.raises(RuntimeError):
        _fail_inside_validation_off()
    assert ce.get_validation()


def test_set_validation_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="`enabled` must be a bool"):
        ce.set_validation("no")  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [("0", "False"), ("off", "False"), ("1", "True")])
def test_environment_variable(value: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import crossent; print(crossent.get_validation())"],
        env={"CROSSENT_VALIDATE": value, "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected
