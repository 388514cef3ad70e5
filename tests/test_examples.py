"""The language-model examples run (short settings) and print what their docstrings promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("torch")


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_hf_finetune_patched_matches_unpatched_with_less_memory() -> None:
    pytest.importorskip("transformers")
    out = _run("hf_finetune.py", "--vocab", "4000", "--steps", "3", "--length", "64")
    rows = re.findall(r"^\s+\d+\s+([\d.]+)\s+([\d.]+)\s+", out, flags=re.MULTILINE)
    assert len(rows) == 3, out
    for plain, fused in rows:
        assert float(fused) == pytest.approx(float(plain), abs=1e-4)
    peak = re.search(r"unpatched ([\d.]+) MiB, patched ([\d.]+) MiB", out)
    assert peak is not None, out
    assert float(peak.group(2)) <= float(peak.group(1))


def test_policy_gradient_matches_the_materialized_reference() -> None:
    out = _run("policy_gradient.py", "--steps", "3")
    gaps = re.search(r"max \|d log p\| (\S+), max \|d entropy\| (\S+), max \|d grad\| (\S+)", out)
    assert gaps is not None, out
    assert max(float(g) for g in gaps.groups()) < 1e-4
    assert re.search(r"mean reward: [\d.]+ -> [\d.]+", out), out


def test_distill_matches_references_and_trains() -> None:
    out = _run("distill.py", "--steps", "3")
    gap = re.search(r"max gap to the references: (\S+)", out)
    assert gap is not None, out
    assert float(gap.group(1)) < 1e-5
    first, last = map(float, re.search(r"distillation loss: (\S+) -> (\S+)", out).groups())  # type: ignore[union-attr]
    assert last < first
