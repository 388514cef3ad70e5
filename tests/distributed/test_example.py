"""examples/vocab_parallel.py under torchrun (2 ranks) prints the single-process losses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.distributed._harness import HOST, free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vocab_parallel.py"


def test_torchrun_example_matches_single_process() -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        HOST,
        "--master-port",
        str(free_port()),
        str(EXAMPLE),
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values = dict(re.findall(r"^([\w.]+):\s+([-\d.]+)$", done.stdout, flags=re.MULTILINE))
    assert set(values) == {
        "vocab_parallel_cross_entropy",
        "sparse_categorical_cross_entropy",
        "vocab_parallel_linear_cross_entropy",
        "fused.linear_cross_entropy",
    }, done.stdout
    assert values["vocab_parallel_cross_entropy"] == values["sparse_categorical_cross_entropy"]
    assert values["vocab_parallel_linear_cross_entropy"] == values["fused.linear_cross_entropy"]
    assert "vocabulary slices: [501, 500]" in done.stdout
