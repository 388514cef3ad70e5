"""benchmarks/gpu_check.py imports everywhere and skips cleanly without a CUDA device."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from benchmarks import gpu_check


def test_dry_run_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out
    assert "liger" in out


def test_without_cuda_the_checks_are_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run is benchmarks/gpu_check.py itself")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
