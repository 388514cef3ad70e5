"""The README's claims that no build runs: its quick tour, its command lines, its copied output.

The documentation build runs the ``pycon`` blocks of the prose pages; the
README's ``python`` blocks and commands are shown only, so these tests hold
them to today's code: the self-contained quick tour runs and prints what its
comments say, every ``crossent eval`` line parses, and the torchrun output
copied into the README is the one ``docs/distributed.md`` checks at build time.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import crossent as ce

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
DISTRIBUTED = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_the_quick_tour_runs_and_its_comments_hold() -> None:
    (tour,) = [b for b in _blocks("python") if b.startswith("import numpy as np")]
    namespace: dict[str, Any] = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    # "# 1.0 bit"
    assert float(ce.info.entropy(np.array([0.5, 0.5]), base=2)) == 1.0
    # "MRI: 70% benign, truth malignant": -log(1 - 0.7)
    bce = ce.binary_cross_entropy(np.array([0.7]), np.array([0.0]))
    assert float(bce) == pytest.approx(-math.log(0.3), rel=1e-15)
    loss, grad = namespace["loss"], namespace["grad"]
    logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert float(loss) == pytest.approx(-np.log(p[[0, 1], [0, 2]]).mean(), rel=1e-14)
    np.testing.assert_allclose(grad, (p - np.eye(3)[[0, 2]]) / 2, rtol=1e-13)


def test_every_eval_command_line_parses() -> None:
    from crossent.cli import build_parser

    lines = [
        line.split("#")[0].strip()
        for block in _blocks("bash")
        for line in block.splitlines()
        if line.startswith(".venv/bin/crossent eval")
    ]
    assert len(lines) >= 4
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])  # exits 2 on an unknown flag


def test_the_copied_torchrun_output_is_the_checked_one() -> None:
    """The README repeats the output that docs/distributed.md runs at build time."""

    def figures(text: str) -> list[str]:
        return re.findall(r"^(?:ranks: 2.*|\w[\w.]*:\s+\d+\.\d+)$", text, flags=re.MULTILINE)

    assert figures(README) == figures(DISTRIBUTED)
    assert len(figures(README)) == 5
