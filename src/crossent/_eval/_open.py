"""Open a predictions file by its extension."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from crossent._eval._csv import open_csv
from crossent._eval._errors import CLIError
from crossent._eval._jsonl import open_jsonl
from crossent._eval._numpy import open_npy, open_npz
from crossent._eval._parquet import open_parquet
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

_OPENERS: dict[str, Callable[[Path, int, str], Table]] = {
    "csv": open_csv,
    "parquet": open_parquet,
    "jsonl": open_jsonl,
    "npy": open_npy,
    "npz": open_npz,
}


def open_table(path: Path, *, batch_size: int, label_column: str) -> Table:
    """Open a predictions file for streaming, by its extension."""
    if not path.is_file():
        msg = f"{path}: no such file."
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
        return _OPENERS[fmt](path, batch_size, label_column)
    except CLIError:
        raise
    except Exception as exc:  # pyarrow / numpy parse errors: report them as a bad file
        msg = f"{path}: cannot read it as {fmt}: {exc}"
        raise CLIError(msg) from exc


def read_batches(table: Table) -> Iterator[Batch]:
    """The table's batches; a parse error half-way through the file becomes a CLIError."""
    try:
        yield from table.batches()
    except CLIError:
        raise
    except Exception as exc:
        msg = f"{table.path}: cannot read it as {table.format}: {exc}"
        raise CLIError(msg) from exc
