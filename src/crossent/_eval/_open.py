"""Open a predictions file by its extension."""

from __future__ import annotations

import importlib
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from crossent._eval._errors import CLIError
from crossent._eval._prefetch import prefetched
from crossent._eval._sources import COMPRESSIBLE, COMPRESSIONS, data_suffix, open_input
from crossent._eval._table import Batch, Table

__all__ = ["FORMATS", "open_table", "read_batches"]

#: file extension -> format
FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".npy": "npy",
    ".npz": "npz",
}

#: format -> (module, function) of its opener, imported when a file of that format is read
_OPENERS = {
    "csv": ("_csv", "open_csv"),
    "parquet": ("_parquet", "open_parquet"),
    "jsonl": ("_jsonl", "open_jsonl"),
    "npy": ("_numpy", "open_npy"),
    "npz": ("_numpy", "open_npz"),
}


def _opener(fmt: str) -> Callable[..., Table]:
    module, name = _OPENERS[fmt]
    opener: Callable[..., Table] = getattr(
        importlib.import_module(f"crossent._eval.{module}"), name
    )
    return opener


def _not_a_file(path: Path) -> str | None:
    """Why `path` cannot be a predictions file, or None if it is a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file."
    except OSError as exc:
        return f"cannot open it: {exc.strerror}."
    kinds = [
        (stat.S_ISDIR, "is a directory, not a file; name a predictions file in it"),
        (stat.S_ISCHR, "is a character device (like /dev/null), not a file"),
        (stat.S_ISBLK, "is a block device, not a file"),
        (stat.S_ISFIFO, "is a named pipe, not a file (it cannot be read twice)"),
        (stat.S_ISSOCK, "is a socket, not a file"),
    ]
    for test, words in kinds:
        if test(mode):
            return words + "."
    if not stat.S_ISREG(mode):  # pragma: no cover - every kind of file is listed above
        return "is not a regular file."
    if path.stat().st_size == 0:
        return "is empty (0 bytes)."
    return None


def open_table(
    path: Path,
    *,
    batch_size: int,
    label_column: str,
    row_groups: tuple[int, int] | None = None,
    group_by: str | None = None,
) -> Table:
    """Open a predictions file for streaming, by its extension.

    `row_groups` [start, stop) opens only those row groups of a Parquet file;
    the `group_by` column of a CSV file (of JSON strings in a JSONL file) is read as text.
    """
    problem = _not_a_file(path)
    if problem is not None:
        msg = f"{path}: {problem}"
        raise CLIError(msg)
    suffix, compression = data_suffix(path)
    fmt = FORMATS.get(suffix)
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        msg = (
            f"{path}: unknown file type {suffix!r}; use one of {known} "
            f"(CSV, TSV and JSONL may be compressed: {', '.join(COMPRESSIONS)})."
        )
        raise CLIError(msg)
    if compression is not None and suffix not in COMPRESSIBLE:
        open_input(path)  # raises: says which formats may be compressed
    try:
        if row_groups is not None and fmt == "parquet":
            return _opener(fmt)(path, batch_size, label_column, row_groups)
        if group_by is not None and fmt in ("csv", "jsonl"):
            return _opener(fmt)(path, batch_size, label_column, group_by)
        return _opener(fmt)(path, batch_size, label_column)
    except CLIError:
        raise
    except Exception as exc:  # pyarrow / numpy parse errors: report them as a bad file
        msg = f"{path}: cannot read it as {fmt}: {exc}"
        raise CLIError(msg) from exc


def _import_metrics() -> None:
    """Import the metrics that will score the batches and the summary of their figures,
    while the first batch is read."""
    importlib.import_module("crossent.metrics")
    importlib.import_module("crossent._report")


def read_batches(table: Table) -> Iterator[Batch]:
    """The table's batches, checked: every row read, the file unchanged at the end.

    A parse error half-way through the file becomes a :class:`CLIError`; so
    does a file that was truncated or rewritten while it was read (its size
    or modification time changed, or fewer rows came than its metadata says).
    The batches are read by a background thread, ahead of the caller
    (:func:`.prefetched`); the checks at the end run in the caller's thread,
    after its last batch.
    """
    rows = 0
    try:
        for batch in prefetched(table.batches, meanwhile=_import_metrics):
            rows += batch.data.num_rows
            yield batch
    except CLIError:
        raise
    except Exception as exc:
        table.check_unchanged()
        msg = f"{table.path}: cannot read it as {table.format}: {exc}"
        raise CLIError(msg) from exc
    table.check_unchanged()
    if table.total_rows is not None and rows != table.total_rows:
        msg = (
            f"{table.path}: its metadata says {table.total_rows:,} rows, but {rows:,} could "
            "be read: the file is truncated or damaged."
        )
        raise CLIError(msg)
