"""Shared benchmark helpers: best-of-k wall time, and peak RSS of a case run in a fresh subprocess.

Peak memory is measured honestly as the resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of a fresh Python process that
builds the inputs, records its RSS, runs forward+backward once and records the
high-water mark again; the difference is the case's extra peak memory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # benchmarks run as modules from the repository root


def interleaved_cpu_times(
    fns: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    """Median per-call process CPU time of each function (seconds), the contenders
    interleaved round by round (A, B, A, B, ...) after a warm-up of a tenth of the calls."""
    for fn in fns.values():
        for _ in range(calls // 10 + 1):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def rss_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: "VmRSS" (now) or "VmHWM" (high-water mark).

    VmHWM belongs to this process image; ``ru_maxrss`` would not do, as Linux
    carries it over from the parent across fork and exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs); return the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mib("VmRSS")
