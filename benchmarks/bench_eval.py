"""``crossent eval`` end to end: throughput, peak memory and the Dask engine.

Run: ``python -m benchmarks.bench_eval [--quick]``.

1. Throughput on N rows x 10 classes (CSV and Parquet), each contender a fresh
   process (imports included), one untimed warm-up round, then interleaved
   A, B, C over rounds, median of the rounds: ``crossent eval`` (every
   figure), a plain pyarrow read + NumPy log loss and accuracy (the floor),
   and pandas + scikit-learn (``log_loss``, ``accuracy_score``; not in
   ``--quick``); every contender's log loss and accuracy must agree. Wall
   time and process CPU time (all threads: ``crossent eval`` reads the next
   batches in a second thread while it scores). The child processes may
   cache bytecode (in a temporary ``PYTHONPYCACHEPREFIX``) even where
   ``PYTHONDONTWRITEBYTECODE`` is set, as an installed package has its
   bytecode: otherwise only the editable source tree's modules were
   compiled again in every run (40 ms), the site-packages ones never.
   Then the time of ``crossent --version``.
2. Peak memory: the resident-set high-water mark of ``crossent eval`` on a
   small and a 10x larger file (it must not grow with the file).
3. The Dask engine (4 local worker processes) against the local engine on a
   directory of Parquet shards: time and whether the figures agree.

The machine may be shared: the CPU-time columns are the steadier ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._util import REPO

CLASSES = 10
# the floor: a whole-file read, the columns viewed through their buffers as `crossent
# eval` views them (pyarrow's to_numpy and pq.read_table import pandas, 0.2 s, when it is
# installed: no part of a read)
PYARROW = """
import sys, numpy as np
path = sys.argv[1]
if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    t = pq.ParquetFile(path).read()
else:
    import pyarrow.csv as pcsv
    t = pcsv.read_csv(path)
def column(name, dtype):
    return np.concatenate([
        np.frombuffer(c.buffers()[1], dtype, len(c), c.offset * np.dtype(dtype).itemsize)
        for c in t.column(name).chunks
    ])
y = column("label", np.int64)
p = np.column_stack([column(f"c{k}", np.float64) for k in range(10)])
ll = -np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-300)))
acc = np.mean(np.argmax(p, axis=1) == y)
print(ll, acc)
"""
PANDAS = """
import sys, pandas as pd
from sklearn.metrics import accuracy_score, log_loss
path = sys.argv[1]
df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
p = df[[f"c{k}" for k in range(10)]].to_numpy()
y = df["label"].to_numpy()
print(log_loss(y, p, labels=list(range(10))), accuracy_score(y, p.argmax(axis=1)))
"""
MEASURE = """
import sys, io
from benchmarks._util import rss_mib
from crossent.cli import main
status = main(["eval", *sys.argv[1:], "--format", "json"], out=io.StringIO())
print(status, rss_mib("VmHWM"))
"""


def _table(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(rows, CLASSES))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # labels drawn from the predictions themselves (a calibrated model), by inverse CDF
    u = rng.uniform(size=(rows, 1))
    y = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), CLASSES - 1)
    return {"label": y.astype(np.int64), **{f"c{k}": p[:, k] for k in range(CLASSES)}}


def _write(folder: Path, name: str, rows: int, *, seed: int = 0, fmt: str = "parquet") -> Path:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table(_table(rows, seed))
    path = folder / f"{name}.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=131072)
    else:
        pcsv.write_csv(table, path)
    return path


#: the children's environment: bytecode cached under the benchmark's folder (see above)
_ENV: dict[str, str] = {}


def _run(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child and its threads, stdout) of one fresh process."""
    env = {**os.environ, **_ENV}
    if _ENV:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def _eval_argv(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crossent", "eval", str(path), "--format", "json", *extra]


def throughput(folder: Path, rows: int, rounds: int, *, quick: bool) -> list[dict[str, object]]:
    contenders = {
        "crossent eval": lambda p: _eval_argv(p),
        "pyarrow + NumPy": lambda p: [sys.executable, "-c", PYARROW, str(p)],
        "pandas + sklearn": lambda p: [sys.executable, "-c", PANDAS, str(p)],
    }
    if quick:  # a smoke run: pandas' import alone takes seconds
        del contenders["pandas + sklearn"]
    results = []
    for fmt in ("csv", "parquet"):
        path = _write(folder, f"through_{rows}", rows, fmt=fmt)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        figures: dict[str, str] = {}
        for argv in contenders.values():  # warm-up: page cache, bytecode
            _run(argv(path))
        for _ in range(rounds):
            for name, argv in contenders.items():
                wall, cpu, out = _run(argv(path))
                times[name].append((wall, cpu))
                figures[name] = out
        ours_figures = json.loads(figures["crossent eval"])
        for name in contenders:  # every contender computed the same figures
            if name == "crossent eval":
                continue
            ll, acc = map(float, figures[name].split()[:2])
            assert abs(ours_figures["log_loss_nats"] - ll) < 1e-9 * max(1.0, ll), (name, ll)
            assert abs(ours_figures["accuracy"] - acc) < 1e-12, (name, acc)
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for k, v in times.items()}  # fmt: skip
        ours = times["crossent eval"]
        ratios = {
            k: tuple(statistics.median(a[i] / b[i] for a, b in zip(ours, v, strict=True))
                     for i in (0, 1))
            for k, v in times.items()
        }  # fmt: skip
        for name in contenders:
            wall, cpu = med[name]
            results.append({
                "format": fmt, "contender": name, "wall_s": wall, "cpu_s": cpu,
                "rows_per_s": rows / wall, "ours_over_it_wall": ratios[name][0],
                "ours_over_it_cpu": ratios[name][1],
            })  # fmt: skip
    return results


def peak_memory(folder: Path, small: int, fmt: str) -> tuple[float, float]:
    """VmHWM (MiB) of ``crossent eval`` on `small` rows and on 10x as many."""
    peaks = []
    for rows in (small, 10 * small):
        path = _write(folder, f"mem_{rows}", rows, fmt=fmt)
        _, _, out = _run([sys.executable, "-c", MEASURE, str(path)])
        status, peak = out.split()[-2:]
        assert status == "0", out
        peaks.append(float(peak))
    return peaks[0], peaks[1]


def dask_vs_local(folder: Path, rows: int, shards: int, workers: int) -> dict[str, float]:
    shard_dir = folder / "shards"
    shard_dir.mkdir()
    for i in range(shards):
        _write(shard_dir, f"part-{i:03d}", rows // shards, seed=i)
    local_wall, _, local_out = _run(_eval_argv(shard_dir))
    dask_wall, _, dask_out = _run(
        _eval_argv(shard_dir, "--engine", "dask", "--workers", str(workers))
    )
    local, dask = json.loads(local_out), json.loads(dask_out)
    keys = ("log_loss_nats", "accuracy", "brier", "ece", "ece_equal_mass", "classwise_ece")
    worst = max(abs(local[k] - dask[k]) / max(abs(local[k]), 1e-300) for k in keys)
    return {
        "rows": rows, "shards": shards, "workers": workers,
        "local_wall_s": local_wall, "dask_wall_s": dask_wall,
        "speedup": local_wall / dask_wall, "worst_rel_diff": worst,
        "identical": all(local[k] == dask[k] for k in keys),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds")
    parser.add_argument("--skip-dask", action="store_true", help="no Dask comparison")
    args = parser.parse_args()
    rows = 20_000 if args.quick else 1_000_000
    rounds = args.rounds or (1 if args.quick else 3)
    folder = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    _ENV["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    try:
        print(f"throughput, {rows:,} rows x {CLASSES} classes, median of {rounds} interleaved "
              f"rounds, fresh processes ({os.cpu_count()} CPUs, possibly shared)")  # fmt: skip
        print(f"{'format':<8} {'contender':<18} {'wall s':>7} {'CPU s':>7} {'rows/s':>10} "
              f"{'ours/it wall':>12} {'ours/it CPU':>11}")  # fmt: skip
        for r in throughput(folder, rows, rounds, quick=args.quick):
            print(f"{r['format']:<8} {r['contender']:<18} {r['wall_s']:>7.3f} {r['cpu_s']:>7.3f} "
                  f"{r['rows_per_s']:>10,.0f} {r['ours_over_it_wall']:>12.2f} "
                  f"{r['ours_over_it_cpu']:>11.2f}")  # fmt: skip
        version = [sys.executable, "-m", "crossent", "--version"]
        _run(version)
        times = [_run(version) for _ in range(rounds)]
        wall, cpu = (statistics.median(t[i] for t in times) for i in (0, 1))
        print(f"\ncrossent --version: {wall:.3f} s wall, {cpu:.3f} s CPU (median of {rounds})")
        small = 10_000 if args.quick else 300_000
        print(f"\npeak RSS of crossent eval (VmHWM, MiB): {small:,} vs {10 * small:,} rows")
        for fmt in ("csv",) if args.quick else ("csv", "parquet"):
            lo, hi = peak_memory(folder, small, fmt)
            print(f"{fmt:<8} {lo:8.1f} {hi:8.1f}   growth {hi - lo:+.1f} MiB")
        if args.quick:
            print("(--quick files are smaller than pyarrow's read-ahead, so they differ; "
                  "the full run compares 300k and 3M rows)")  # fmt: skip
        if not args.skip_dask:
            try:
                import distributed  # noqa: F401
            except ImportError:
                print("\ndask: not installed (pip install 'crossent[dask]'); skipped")
                return
            big, shards = (40_000, 4) if args.quick else (10_000_000, 20)
            r = dask_vs_local(folder, big, shards, workers=2 if args.quick else 4)
            print(f"\nDask engine ({r['workers']} local worker processes) vs local engine, "
                  f"{r['rows']:,} rows in {r['shards']} Parquet shards")  # fmt: skip
            print(f"local {r['local_wall_s']:.2f} s   dask {r['dask_wall_s']:.2f} s   "
                  f"speed-up {r['speedup']:.2f}x   figures identical: {r['identical']} "
                  f"(worst relative difference {r['worst_rel_diff']:.1e})")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
