"""Cost of exact metric sums: ``crossent eval`` and ``ClassificationMetrics.update`` throughput.

Run: ``python -m benchmarks.bench_metrics [--quick]``.

The metric states keep exact sums (:class:`crossent.metrics._exact.ExactSum`),
so merged shards give the single-pass figures bit for bit. The reference in
the same run is the same code with the exact sums swapped for plain float64
sums of the same terms: pairwise ``np.sum`` for one sum, and per element
counts and sums by ``np.add.at`` (faster than ``np.bincount`` in NumPy 2)
over lanes (:func:`~crossent.metrics._exact.laned`: runs of values into one
element, such as a column-major probability column, add in independent
chains), in blocks of the same size; so the ratio is the price of exactness
alone. Rows per second of
``crossent eval`` (reading the file included: CSV and Parquet), of
``ClassificationMetrics.update`` (every figure ``crossent eval`` reports)
and of ``CrossEntropy.update`` on in-memory NumPy logits; process CPU time, contenders
interleaved A, B, A, B over rounds, median ratio reported, and the median
ratio of user time alone (system time, mostly page faults of the large
arrays both contenders allocate, varies most on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from crossent.metrics import ClassificationMetrics, CrossEntropy
from crossent.metrics import _functional as F
from crossent.metrics._exact import _BLOCK as BLOCK
from crossent.metrics._exact import laned, lanes_for


class _FloatSum:
    """The old state: float64 sums, rounded at every addition (same interface as ExactSum)."""

    def __init__(self, total: np.ndarray) -> None:
        self.total = total

    @classmethod
    def zeros(cls, shape: tuple[int, ...] = ()) -> _FloatSum:
        return cls(np.zeros(shape, dtype=np.float64))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.total.shape)

    @property
    def ndim(self) -> int:
        return self.total.ndim

    def add(
        self,
        values: np.ndarray,
        index: np.ndarray | None = None,
        *,
        spread: np.ndarray | None = None,
    ) -> _FloatSum:
        if index is None:
            self.total = self.total + np.sum(values, dtype=np.float64)
            return self
        # np.add.at (faster than np.bincount in NumPy 2) over lanes (the caller's laned
        # indices when it has them: those of its counts)
        size = self.total.size
        lanes = lanes_for(size)
        summed = np.zeros(lanes * size)
        for start in range(0, values.size, BLOCK):
            part = slice(start, start + BLOCK)
            where = laned(index[part], size, lanes) if spread is None else spread[part]
            np.add.at(summed, where, values[part])
        self.total = self.total + summed.reshape(lanes, size).sum(axis=0).reshape(self.shape)
        return self

    def merge(self, other: _FloatSum) -> _FloatSum:
        return _FloatSum(self.total + other.total)

    def copy(self) -> _FloatSum:
        return _FloatSum(self.total.copy())

    def regroup(self, groups: np.ndarray, count: int) -> _FloatSum:
        rows = self.total.shape[0]
        target = (np.arange(rows)[:, None] * count + groups).ravel()
        summed = np.bincount(target, weights=self.total.ravel(), minlength=rows * count)
        return _FloatSum(summed.reshape(rows, count))

    def value(self) -> np.ndarray:
        return self.total

    def __float__(self) -> float:
        return float(self.total)

    def __getitem__(self, key: Any) -> _FloatSum:
        return _FloatSum(np.asarray(self.total[key]))


def _laned_index(index: np.ndarray, size: int) -> np.ndarray:
    """`index` spread over ``lanes_for(size)`` copies of the `size` elements (value i in
    copy ``i % lanes``, block by block: :func:`~crossent.metrics._exact.laned`)."""
    lanes = lanes_for(size)
    if lanes == 1:
        return index
    out = np.empty(index.size, np.int64)
    for start in range(0, index.size, BLOCK):
        part = slice(start, start + BLOCK)
        laned(index[part], size, lanes, out=out[part])
    return out


def _add_counted(
    values: np.ndarray,
    targets: list[tuple[_FloatSum, np.ndarray, np.ndarray, Any]],
    *,
    bounds: Any = None,
    totals: tuple[_FloatSum, ...] = (),
) -> None:
    """The float64 counterpart of ``add_counted``: for each target, the counts (``np.add.at``
    of ones into int64 counters over laned indices: half the time of ``np.bincount``, which
    also finds the min and max first, at 65536 x 10 into 150 bins), then every value
    scattered over the same laned indices; and the pairwise sum of all of them added to
    each of `totals`."""
    for target, index, counts, _ in targets:
        size = target.total.size
        lanes = lanes_for(size)
        spread = _laned_index(index, size)
        count = np.zeros(lanes * size, dtype=np.int64)
        for start in range(0, spread.size, BLOCK):
            np.add.at(count, spread[start : start + BLOCK], 1)
        counts += count.reshape(lanes, size).sum(axis=0).reshape(counts.shape)
        target.add(values, index, spread=spread if lanes > 1 else None)
    for total in totals:
        total.add(values)


@contextlib.contextmanager
def _float_sums() -> Iterator[None]:
    exact, counted = F.ExactSum, F.add_counted
    F.ExactSum = _FloatSum  # type: ignore[misc, assignment, unused-ignore]
    F.add_counted = _add_counted  # type: ignore[assignment]
    try:
        yield
    finally:
        F.ExactSum, F.add_counted = exact, counted


def _cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """Process CPU time (user + system) and user time alone of one call."""
    start, user = time.process_time(), _user_time()
    fn()
    return time.process_time() - start, _user_time() - user


def _user_time() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: no user/system split
        return time.process_time()
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _ab(exact: Callable[[], object], plain: Callable[[], object], rounds: int) -> tuple[float, ...]:
    """(exact seconds, plain seconds, median ratio exact/plain, median ratio of user time),
    interleaved."""
    exact()  # warm up both
    with _float_sums():
        plain()
    a_times, b_times, ratios, user_ratios = [], [], [], []
    for _ in range(rounds):
        a, a_user = _cpu(exact)
        with _float_sums():
            b, b_user = _cpu(plain)
        a_times.append(a)
        b_times.append(b)
        ratios.append(a / b)
        user_ratios.append(a_user / b_user if b_user else math.nan)
    return (
        statistics.median(a_times),
        statistics.median(b_times),
        statistics.median(ratios),
        statistics.median(user_ratios),
    )


def _logits(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(scale=2.0, size=(n, c)), rng.integers(0, c, size=n)


def _files(tmp: Path, n: int, c: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    z, y = _logits(n, c, seed=1)
    table = pa.table({"label": y, **{f"c{k}": z[:, k] for k in range(c)}})
    pq.write_table(table, tmp / "p.parquet")
    pcsv.write_csv(table, tmp / "p.csv")
    return {"parquet": tmp / "p.parquet", "csv": tmp / "p.csv"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3 quick, 15 full)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)  # a shared machine: many rounds, median
    print(
        "| case | rows | classes | exact rows/s | float rows/s | exact / float time "
        "| exact / float user time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    sizes = [(20_000, 10)] if args.quick else [(200_000, 10), (200_000, 100), (20_000, 1000)]
    for n, c in sizes:
        z, y = _logits(n, c)

        for name, metric_type in (
            ("update", ClassificationMetrics),
            ("CrossEntropy", CrossEntropy),
        ):

            def update(z: np.ndarray = z, y: np.ndarray = y, kind: Any = metric_type) -> None:
                metric = kind(input_kind="logits")
                for start in range(0, len(y), 65536):
                    metric.update(z[start : start + 65536], y[start : start + 65536])
                metric.compute()

            a, b, ratio, user = _ab(update, update, rounds)
            print(
                f"| {name} | {n:,} | {c} | {n / a:,.0f} | {n / b:,.0f} | {ratio:.3f} | {user:.3f} |"
            )
    from crossent._eval import evaluate

    file_sizes = [(20_000, 10)] if args.quick else [(500_000, 10), (100_000, 100)]
    with tempfile.TemporaryDirectory() as tmp:
        for n, c in file_sizes:
            for fmt, path in _files(Path(tmp), n, c).items():

                def run(path: Path = path) -> None:
                    evaluate(path, input_kind="logits")

                a, b, ratio, user = _ab(run, run, rounds)
                print(
                    f"| eval {fmt} | {n:,} | {c} | {n / a:,.0f} | {n / b:,.0f} | {ratio:.3f} "
                    f"| {user:.3f} |"
                )


if __name__ == "__main__":
    main()
