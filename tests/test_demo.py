"""`crossent demo` in its fast mode: trains, prints the table, writes the best model's report."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from crossent._demo import run_demo
from crossent.cli import main

VARIANTS = ["cross-entropy", "label smoothing 0.1", "class-weighted", "focal gamma=2"]


def test_demo_fast_mode_trains_reports_and_writes_the_report(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(fast=True, report_dir=tmp_path / "report", out=out)
    text = out.getvalue()
    assert list(result["results"]) == VARIANTS
    uniform_bits = math.log2(10)
    for name, summary in result["results"].items():
        # trained: far better than guessing, on held-out rows
        assert summary["log_loss_bits"] < 0.5 * uniform_bits, name
        assert summary["accuracy"] > 0.8, name
        assert 0 <= summary["ece"] < 0.5, name
        assert f"{summary['log_loss_bits']:.4f}" in text
    best = min(result["results"], key=lambda n: result["results"][n]["log_loss_bits"])
    assert result["best"] == best
    assert f"lowest held-out cross-entropy: {best}" in text
    assert "test CE (bits)" in text
    assert "balanced acc" in text
    report = Path(result["report"])
    assert report.is_file()
    assert best in report.read_text()
    assert (report.parent / "reliability.png").stat().st_size > 5000


def test_the_four_losses_give_different_models() -> None:
    result = run_demo(fast=True, report_dir=None, out=io.StringIO())["results"]
    bits = [result[n]["log_loss_bits"] for n in VARIANTS]
    assert len(set(np.round(bits, 6))) == 4  # four different models
    # label smoothing trains towards targets of 0.91/0.01, so it is less sure of the true
    # (hard) labels: a higher held-out cross-entropy than plain cross-entropy
    assert result["label smoothing 0.1"]["log_loss_bits"] > result["cross-entropy"]["log_loss_bits"]


def test_demo_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert main(["demo", "--fast"], out=out) == 0
    assert (tmp_path / "crossent-report" / "index.html").is_file()
    assert "report: crossent-report/index.html" in out.getvalue()


def test_demo_report_folder_that_cannot_be_made_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `crossent eval --report`: exit 2 naming --report before training (was a
    NotADirectoryError traceback, exit 1, after training)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--fast", "--report", str(blocker / "sub")]) == 2
    assert "--report" in capsys.readouterr().err
    # a negative seed: NumPy's ValueError traceback, exit 1, before
    assert main(["demo", "--fast", "--no-report", "--seed", "-1"]) == 2
    assert "--seed must be a non-negative integer; got -1" in capsys.readouterr().err
