"""Shared data and runners for the tests of ``crossent eval``'s inputs, groups and engines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_cli import run, run_json

__all__ = [
    "DAYS",
    "FIGURES",
    "NAMES",
    "assert_same_figures",
    "csv_text",
    "error",
    "rows",
    "run",
    "run_json",
    "write",
]

NAMES = ["cat", "dog", "bird"]
DAYS = ["2024-05-01", "2024-05-02", "2024-05-03"]
#: figures compared between two ways of scoring the same rows
FIGURES = (
    "log_loss_nats",
    "log_loss_bits",
    "perplexity",
    "accuracy",
    "brier",
    "ece",
    "mce",
    "ece_equal_mass",
    "classwise_ece",
)


def rows(n: int = 60, seed: int = 0) -> dict[str, Any]:
    """`n` rows: a class-name label, 3 class probabilities, an id and a day."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, 3))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, n)
    return {
        "p": p,
        "y": y,
        "id": np.arange(100, 100 + n),
        "day": [DAYS[i % 3] for i in range(n)],
    }


def csv_text(
    data: dict[str, Any], lo: int = 0, hi: int | None = None, *, extra: bool = True
) -> str:
    """CSV of rows lo..hi: label (class names), the classes, and id/day when `extra`."""
    hi = len(data["y"]) if hi is None else hi
    header = ["label", *NAMES] + (["id", "day"] if extra else [])
    lines = [",".join(header)]
    for i in range(lo, hi):
        cells = [NAMES[data["y"][i]], *(f"{v:.17g}" for v in data["p"][i])]
        if extra:
            cells += [str(data["id"][i]), data["day"][i]]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The message of a command that must exit 2."""
    status, out = run(*args)
    err = capsys.readouterr().err
    assert status == 2, out
    assert err.startswith("crossent eval: error: "), err
    return err


def assert_same_figures(a: dict[str, Any], b: dict[str, Any], *, rtol: float = 0.0) -> None:
    """Two summaries of the same rows: counts equal, figures bit for bit (the metric sums
    are exact, so neither the batching nor the merge order changes a bit), or to `rtol`."""
    assert a["rows"] == b["rows"]
    assert [c["count"] for c in a["per_class"]] == [c["count"] for c in b["per_class"]]
    for key in FIGURES:
        if key not in a and key not in b:
            continue
        x, y = a[key], b[key]
        assert (x is None) == (y is None), key
        if x is not None:
            if rtol == 0:
                assert x == y, (key, x, y)
            else:
                assert math.isclose(x, y, rel_tol=rtol, abs_tol=1e-15), (key, x, y)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
