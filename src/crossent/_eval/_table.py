"""A predictions file opened for streaming: its columns, its batches, where a row lies.

Every format module (``_csv``, ``_jsonl``, ``_parquet``, ``_numpy``) turns a
path into a :class:`Table`: the column names and Arrow types, and a function
that yields :class:`Batch` objects (an Arrow record batch and the index of
its first row in the file). :meth:`Table.where` turns a row index into the
words an error message uses ("row 12 (line 13)").
"""

from __future__ import annotations

import collections
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossent._eval._errors import CLIError

__all__ = [
    "BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "Batch",
    "Table",
    "growing_blocks",
    "is_numeric",
    "is_numeric_list",
    "need",
    "open_growing",
    "regroup",
    "skip_rows",
    "to_numpy",
]


@dataclass(frozen=True)
class Batch:
    """One record batch of a table; `start` is the index (from 0) of its first row."""

    data: Any  # pyarrow.RecordBatch
    start: int


@dataclass
class Table:
    """A predictions file opened for streaming.

    `batches` yields the file's :class:`Batch` objects in order (each call
    reads the file again); `total_rows` is known up front for Parquet and
    NumPy files only. `line_of` maps a row index to its line in a text file
    (None for binary formats).

    The file's size and modification time are noted when the table is made:
    :meth:`check_unchanged` says whether the file changed since (truncated
    or rewritten while it was read). Column names must be unique.
    """

    path: Path
    format: str
    names: list[str]
    types: dict[str, Any]
    batches: Callable[[], Iterator[Batch]]
    total_rows: int | None
    line_of: Callable[[int], int | None] | None = None
    fingerprint: tuple[int, int, int] = field(init=False)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fingerprint = _fingerprint(self.path)
        repeated = [name for name, n in collections.Counter(self.names).items() if n > 1]
        if repeated:
            where = "; ".join(
                f"{name!r} is columns "
                + ", ".join(str(i + 1) for i, n in enumerate(self.names) if n == name)
                for name in repeated
            )
            msg = (
                f"{self.path}: has duplicate column names ({where}); every column needs its "
                "own name: rename or drop the repeated ones."
            )
            raise CLIError(msg)

    def check_unchanged(self) -> None:
        """Raise if the file's size or modification time changed since it was opened."""
        now = _fingerprint(self.path)
        if now != self.fingerprint:
            msg = (
                f"{self.path}: changed while it was read (it had {self.fingerprint[0]:,} bytes, "
                f"now {now[0]:,}): it was truncated or rewritten. Score it once it is "
                "complete, or score a copy."
            )
            raise CLIError(msg)

    def row_error(self, row: int, reason: str, hint: str = "") -> CLIError:
        """The error for a bad row: ``FILE: row N (line L) REASON. HINT``."""
        msg = f"{self.path}: {self.where(row)} {reason}." + (f" {hint}" if hint else "")
        return CLIError(msg)

    def where(self, row: int) -> str:
        """``row N`` (counting from 1), with ``(line L)`` for text files."""
        text = f"row {row + 1}"
        line = self.line_of(row) if self.line_of is not None else None
        if line is not None:
            text += f" (line {line})"
        return text


def _fingerprint(path: Path) -> tuple[int, int, int]:
    """Size, modification time and inode of `path` (all -1 once it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def checked_blocks(
    reader: Any, table: Callable[[], Table], explain: Callable[[Exception], CLIError | None]
) -> Iterator[Any]:
    """The record batches of a pyarrow streaming `reader`; a parse error is explained.

    On an error half-way through, the file is first checked for a change
    (truncated while read), then `explain` names the bad row or line; when it
    finds none, pyarrow's own error goes up.
    """
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as exc:  # pyarrow.ArrowInvalid: pyarrow is imported lazily
            table().check_unchanged()
            if _too_long(exc):  # not a bad row: :func:`growing_blocks` reads on
                raise
            error = explain(exc)
            if error is None:
                raise
            raise error from exc
        yield batch


def text_table(
    path: Path,
    format: str,
    names: list[str],
    types: dict[str, Any],
    batches: Callable[[], Iterator[Batch]],
    line_of: Callable[[int], int | None],
) -> Table:
    """A table of a text format (rows by lines), warned when its last line is unfinished."""
    table = Table(path, format, names, types, batches, None, line_of=line_of)
    table.warnings += last_line_warning(path)
    return table


def last_line_warning(path: Path) -> list[str]:
    """A warning when a text file does not end with a line break: it may be cut short.

    A file truncated in the middle of its last row still parses (``0.75``
    cut to ``0.7``), so a missing final line break is the one trace left.
    A compressed file is not checked: its codec reports a cut stream itself.
    """
    from crossent._eval._sources import data_suffix

    if data_suffix(path)[1] is not None:
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return []
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last in (b"\n", b"\r"):
        return []
    return [
        f"{path} does not end with a line break: if the file was cut short, its last row is "
        "incomplete and the figures are wrong. Check the last line (files written whole "
        "end with a line break)."
    ]


def need(module: str) -> Any:
    """Import `module` of an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (
            f"`crossent eval` needs {module.split('.')[0]}; install the metrics extra: "
            "pip install 'crossent[metrics]'."
        )
        raise CLIError(msg) from exc


def is_numeric(pa: Any, t: Any) -> bool:
    """An integer or floating Arrow type."""
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def is_numeric_list(pa: Any, t: Any) -> bool:
    """A list (of any kind) of integers or floats."""
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return bool(listy and is_numeric(pa, t.value_type))


#: bytes per block of the text readers: larger blocks let the peak memory creep up with
#: the file under Arrow's jemalloc and system pools; :func:`regroup` makes full batches
BLOCK_SIZE = 1 << 16
#: the largest block the text readers grow to, for a line longer than ``BLOCK_SIZE``
MAX_BLOCK_SIZE = 1 << 26  # 64 MiB: a row of 3M classes; a broken line stops there


def _too_long(exc: BaseException) -> bool:
    """pyarrow's error for a line longer than a block (a row of thousands of classes)."""
    return "straddl" in str(exc)  # "straddling object straddles two block boundaries"


def _grow(exc: BaseException, read: Any) -> None:
    """Double `read`'s block size after `exc` if a line did not fit in a block, else raise."""
    if not _too_long(exc) or read.block_size >= MAX_BLOCK_SIZE:
        raise exc
    read.block_size *= 2


def open_growing(open_reader: Callable[[], Any], read: Any) -> Any:
    """``open_reader()`` (a pyarrow streaming reader with the options `read`), its block
    size doubled until the header and the first row fit in a block."""
    while True:
        try:
            return open_reader()
        except Exception as exc:  # pyarrow.ArrowInvalid
            _grow(exc, read)


def growing_blocks(
    first: Iterator[Any], more: Callable[[int], Iterator[Any]], read: Any
) -> Iterator[Any]:
    """The blocks of `first`, then, if a line does not fit in a block (pyarrow parses whole
    lines), those of ``more(rows read so far)`` with blocks twice as large, as often as
    needed: a file whose rows exceed ``BLOCK_SIZE`` is read, in larger blocks."""
    rows, blocks = 0, first
    while True:
        try:
            for block in blocks:
                rows += block.num_rows
                yield block
            return
        except Exception as exc:  # pyarrow.ArrowInvalid
            _grow(exc, read)
            blocks = more(rows)


def skip_rows(blocks: Iterator[Any], rows: int) -> Iterator[Any]:
    """`blocks` without their first `rows` rows."""
    for block in blocks:
        if rows >= block.num_rows:
            rows -= block.num_rows
            continue
        yield block.slice(rows) if rows else block
        rows = 0


def regroup(blocks: Iterator[Any], batch_size: int) -> Iterator[Any]:
    """Record batches of `batch_size` rows from smaller `blocks` (the last one shorter).

    The first batch holds at least the whole first block, whose cells set the
    column types: ``check_text_columns`` (in ``_columns``) looks
    there for the cell that made a class column text. When the blocks'
    schema changes (a CSV's labels read as text from some block on), the rows
    before the change make a batch of their own.
    """
    pa = need("pyarrow")
    held: list[Any] = []
    rows = 0
    first = True
    for block in blocks:
        if held and block.schema != held[0].schema:
            yield pa.concat_batches(held)
            held, rows, first = [], 0, False
        held.append(block)
        rows += block.num_rows
        if rows < batch_size:
            continue
        whole = pa.concat_batches(held)
        start = 0
        if first:
            yield whole
            start, first = whole.num_rows, False
        while whole.num_rows - start >= batch_size:
            yield whole.slice(start, batch_size)
            start += batch_size
        rest = whole.slice(start)
        held, rows = ([rest] if rest.num_rows else []), rest.num_rows
    if rows:
        yield pa.concat_batches(held)


def record_batches(
    make: Callable[[], Iterator[Any]], first_row: int = 0
) -> Callable[[], Iterator[Batch]]:
    """Number the record batches that `make()` yields by their first row (the first
    one's is `first_row`: the rows of the file before them)."""

    def batches() -> Iterator[Batch]:
        start = first_row
        for data in make():
            yield Batch(data, start)
            start += data.num_rows

    return batches


def to_numpy(column: Any) -> Any:
    """An Arrow array's values as NumPy: a zero-copy view when it can be one.

    A fixed-width numeric array without nulls is viewed in place through its
    data buffer (``Array.to_numpy`` would import pandas, 0.2 s, to check for
    extension types); anything else goes through ``to_numpy``.
    """
    import numpy as np

    t = column.type
    if column.null_count == 0 and is_numeric(need("pyarrow"), t) and t.bit_width % 8 == 0:
        dtype = np.dtype(t.to_pandas_dtype())
        data = column.buffers()[1]
        return np.frombuffer(
            data, dtype=dtype, count=len(column), offset=column.offset * dtype.itemsize
        )
    return column.to_numpy(zero_copy_only=False)
