"""Shared benchmark helpers: best-of-k wall time, and peak RSS of a case run in a fresh subprocess.

Peak memory is measured honestly as the resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh Python process that
builds the inputs, records its RSS, runs forward+backward once and records the
high-water mark again; the difference is the case's extra peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of `fn()` over `repeat` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_memory_mib(module: str, case: str, *args: str) -> float:
    """Extra peak RSS (MiB) of ``python -m <module> --measure <case> <args>`` (prints JSON)."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--measure", case, *args],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def rss_high_water_mib() -> float:
    """This process's RSS high-water mark in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
