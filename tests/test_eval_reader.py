"""``crossent eval``'s reading: batches read ahead by a background thread, and CSV labels
read as integers while they are integers (text from the first block where one is not).

Either way the figures and the error messages (row and line of a bad cell) are those
of a serial read with text labels.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._evaldata import assert_same_figures, error, run_json, write

pytest.importorskip("pyarrow")

from crossent._eval import _csv, _memory, _prefetch

ROWS = 3000  # about 200 KB of CSV: several of the reader's 64 KiB blocks
BATCH = ["--batch-size", "700"]


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(ROWS, 3))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return {"p": p / p.sum(axis=1, keepdims=True), "y": rng.integers(0, 3, ROWS)}


def _csv_text(table: dict[str, Any], labels: list[str], header: str = "a,b,c") -> str:
    lines = [f"label,{header}"]
    lines += [
        ",".join([label, *(f"{v:.17g}" for v in row)])
        for label, row in zip(labels, table["p"], strict=True)
    ]
    return "\n".join(lines) + "\n"


def _indices(table: dict[str, Any]) -> list[str]:
    return [str(int(t)) for t in table["y"]]


@pytest.fixture
def serial(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a command the old way: no reader thread, labels always read as text."""

    def run(fn: Any, *args: Any) -> Any:
        with monkeypatch.context() as m:
            m.setattr(_prefetch, "DEPTH", 0)
            m.setattr(_csv, "_int_labels", lambda schema, label: False)
            return fn(*args)

    return run


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader thread runs wherever these tests run (it is skipped on one CPU)."""
    monkeypatch.setattr(_prefetch, "_cpus", lambda: 2)


# ------------------------------------------------------------------ the reader thread


def test_prefetched_yields_every_item_in_order_then_the_readers_error() -> None:
    def items() -> Any:
        yield from range(50)
        raise ValueError("bad block")

    got: list[int] = []

    def consume() -> None:
        got.extend(_prefetch.prefetched(items, depth=2))

    with pytest.raises(ValueError, match="bad block"):
        consume()
    assert got == list(range(50))


def test_closing_early_stops_the_reader_and_closes_its_source() -> None:
    closed = threading.Event()

    def items() -> Any:
        try:
            yield from range(10_000)
        finally:
            closed.set()

    before = set(threading.enumerate())  # another test's reader may wait to be collected
    stream = _prefetch.prefetched(items, depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    started = [t for t in threading.enumerate() if t not in before]
    assert [t.name for t in started] == ["crossent-eval-reader"]
    stream.close()  # type: ignore[attr-defined]
    assert closed.is_set()
    assert not started[0].is_alive()


def test_the_reader_stays_at_most_depth_items_ahead() -> None:
    made: list[int] = []

    def items() -> Any:
        for i in range(100):
            made.append(i)
            yield i

    stream = _prefetch.prefetched(items, depth=2)
    next(stream)
    threading.Event().wait(0.2)  # time for the reader to run ahead
    # one handed out, `depth` waiting, one made and blocked on the full queue
    assert len(made) <= 1 + 2 + 1
    stream.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("depth", [0, 2])
def test_meanwhile_runs_once_in_the_callers_thread_while_the_first_item_is_read(
    depth: int,
) -> None:
    # with a reader thread, `meanwhile` overlaps the first read (the reader is already
    # inside it); without one, it runs before the first item is made
    events: list[tuple[str, str]] = []
    reading = threading.Event()

    def items() -> Any:
        events.append(("read", threading.current_thread().name))
        reading.set()
        yield from range(3)

    def meanwhile() -> None:
        if depth:
            assert reading.wait(5)
        events.append(("meanwhile", threading.current_thread().name))

    got = list(_prefetch.prefetched(items, depth=depth, meanwhile=meanwhile))
    assert got == [0, 1, 2]
    here = threading.current_thread().name
    if depth:
        assert events == [("read", "crossent-eval-reader"), ("meanwhile", here)]
    else:
        assert events == [("meanwhile", here), ("read", here)]


# ------------------------------------------------------------------ same figures, same errors


@pytest.mark.parametrize("late", [None, "b", "2.0", " 1"])
def test_integer_labels_and_the_reader_thread_give_the_serial_figures(
    tmp_path: Path, table: dict[str, Any], serial: Any, late: str | None
) -> None:
    """Integer labels, and (`late`) a label far into the file that is a class name or an
    integer pyarrow does not read as an int64: the rest of the file is read as text."""
    labels = _indices(table)
    if late is not None:
        labels[ROWS - 5] = late
    path = write(tmp_path / "p.csv", _csv_text(table, labels))
    fast = run_json("eval", str(path), *BATCH)
    slow = serial(run_json, "eval", str(path), *BATCH)
    assert_same_figures(fast, slow)
    expected = np.array([int(v) for v in _indices(table)])
    if late is not None:
        expected[ROWS - 5] = {"b": 1, "2.0": 2, " 1": 1}[late]
    counts = [c["count"] for c in fast["per_class"]]
    assert counts == np.bincount(expected, minlength=3).tolist()


def test_integer_labels_match_integer_class_names_by_value(
    tmp_path: Path, table: dict[str, Any], serial: Any
) -> None:
    labels = [f"0{v}" if i % 2 else v for i, v in enumerate(_indices(table))]  # 01 is 1
    path = write(tmp_path / "p.csv", _csv_text(table, labels, header="0,1,2"))
    assert_same_figures(run_json("eval", str(path)), serial(run_json, "eval", str(path)))


def test_column_names_with_one_integer_value_keep_labels_text() -> None:
    pa = pytest.importorskip("pyarrow")
    schema = pa.schema([("label", pa.int64()), ("1", pa.float64()), ("01", pa.float64())])
    assert not _csv._int_labels(schema, "label")
    schema = pa.schema([("label", pa.int64()), ("1", pa.float64()), ("2", pa.float64())])
    assert _csv._int_labels(schema, "label")
    assert not _csv._int_labels(pa.schema([("label", pa.string())]), "label")
    assert not _csv._int_labels(pa.schema([("p", pa.float64())]), "label")
    repeated = pa.schema([("label", pa.int64()), ("a", pa.float64()), ("label", pa.int64())])
    assert not _csv._int_labels(repeated, "label")


def test_a_repeated_integer_label_column_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "p.csv", "label,a,label,b\n1,0.5,1,0.5\n0,0.5,0,0.5\n")
    assert "has duplicate column names ('label' is columns 1, 3)" in error(
        capsys, "eval", str(path)
    )


@pytest.mark.parametrize(
    ("where", "cell"),
    [
        ("label", ""),  # a missing label, far into the file
        ("label", "zebra"),  # not a class
        ("label", "7"),  # an index out of range
        ("a", "oops"),  # a bad class cell: found by the text re-read's diagnosis
        ("a", ""),  # a missing class cell
    ],
)
def test_bad_cells_far_into_the_file_name_the_same_row_and_line(
    tmp_path: Path,
    table: dict[str, Any],
    serial: Any,
    capsys: pytest.CaptureFixture[str],
    where: str,
    cell: str,
) -> None:
    row = ROWS - 40
    labels = _indices(table)
    text = _csv_text(table, labels).splitlines()
    cells = text[row + 1].split(",")
    cells[0 if where == "label" else 1] = cell
    text[row + 1] = ",".join(cells)
    text.insert(5, "")  # a blank line: lines and rows differ by two from here
    path = write(tmp_path / "p.csv", "\n".join(text) + "\n")
    fast = error(capsys, "eval", str(path), *BATCH)
    slow = serial(error, capsys, "eval", str(path), *BATCH)
    assert fast == slow
    assert f"row {row + 1} (line {row + 3})" in fast, fast


# ------------------------------------------------------------------ memory between batches

_BATCHES = """
import resource, sys
import numpy as np
if sys.argv[1] == "reuse":
    from crossent._eval._memory import reuse_freed_memory
    assert reuse_freed_memory()
def batch():
    held = [np.ones(700_000) for _ in range(5)]  # five 5.6 MB temporaries of one batch
    return sum(float(h[0]) for h in held)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _BATCHES, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not _memory._glibc(), reason="glibc's malloc only")
def test_freed_batch_memory_is_reused_not_faulted_in_again() -> None:
    # glibc gives the freed temporaries back to the system and every batch faults its
    # pages in again (zeroed by the kernel): 35-50 thousand page faults in 20 batches
    reused, default = _faults("reuse"), _faults("default")
    assert reused < 500, (reused, default)
    assert default > 10 * max(reused, 100), (reused, default)


def test_reuse_freed_memory_sets_both_thresholds_or_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(_memory, "_glibc", lambda: True)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert _memory.reuse_freed_memory()
    # the mmap threshold first (M_MMAP_THRESHOLD = -3), then the trim threshold (-1)
    assert calls == [(-3, _memory.MMAP_THRESHOLD), (-1, _memory.TRIM_THRESHOLD)]
    monkeypatch.setattr(_memory, "_glibc", lambda: False)  # musl, macOS, Windows
    calls.clear()
    assert not _memory.reuse_freed_memory()
    assert calls == []


def test_eval_keeps_freed_memory_for_the_next_batch(
    tmp_path: Path, table: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[bool] = []
    monkeypatch.setattr(_memory, "reuse_freed_memory", lambda: called.append(True) or True)
    path = write(tmp_path / "p.csv", _csv_text(table, _indices(table)))
    run_json("eval", str(path))
    assert called == [True]
