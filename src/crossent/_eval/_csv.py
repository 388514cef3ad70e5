"""CSV and TSV files, read in blocks by ``pyarrow.csv``.

pyarrow skips blank lines and lets a quoted cell span lines, so the file line
of a row is not its index plus one: :func:`row_lines` walks the file with
Python's :mod:`csv` module, which splits rows the same way, to find it (only
when an error names a row). A parse or conversion error half-way through the
file carries no line number in pyarrow's message; :func:`_diagnose` finds the
offending row and cell.
"""

from __future__ import annotations

import csv
import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crossent._eval._errors import CLIError
from crossent._eval._labels import as_int_text
from crossent._eval._sources import data_suffix, open_input, open_text
from crossent._eval._table import (
    BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    Table,
    checked_blocks,
    growing_blocks,
    is_numeric,
    need,
    open_growing,
    record_batches,
    regroup,
    skip_rows,
    text_table,
)

__all__ = ["NULL_VALUES", "open_csv", "row_lines"]

#: cells read as missing values ("nan" and "inf" are numbers, reported as such)
NULL_VALUES = ["", "NA", "N/A", "NULL", "null", "None"]


def _delimiter(path: Path) -> str:
    return "\t" if data_suffix(path)[0] == ".tsv" else ","


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of every non-blank row of `path`, the header first.

    `line` (from 1) is where the row starts: blank lines are skipped, as
    pyarrow skips them, and a quoted cell may span several lines.
    """
    # a cell may be as long as a block: above the csv module's default 128 KiB (the
    # process-wide limit is only ever raised)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_BLOCK_SIZE))
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=_delimiter(path))
        last = 0
        for row in reader:
            start, last = last + 1, reader.line_num
            if row:
                yield start, row


def row_lines(path: Path) -> Iterator[int]:
    """The line (from 1) on which each data row of `path` starts, in order."""
    return (line for line, _ in itertools.islice(_rows(path), 1, None))


def _line_of(path: Path, row: int) -> int | None:
    return next(itertools.islice(row_lines(path), row, None), None)


def _bad_cell(pa: Any, pc: Any, column: Any) -> int | None:
    """Index of the first cell of a text column that pyarrow cannot read as a float64."""
    text = pc.utf8_trim_whitespace(column)
    missing = pc.is_in(text, value_set=pa.array(NULL_VALUES))
    for i, (value, is_null) in enumerate(zip(text.to_pylist(), missing.to_pylist(), strict=True)):
        if value is None or is_null:
            continue
        try:
            pc.cast(pa.array([value]), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return i
    return None


def _diagnose(table: Table, numeric: list[str], read: Any, parse: Any) -> str | None:
    """Name the row (and line) that made pyarrow fail half-way through the file."""
    pa = need("pyarrow")
    pc = need("pyarrow.compute")
    pcsv = need("pyarrow.csv")
    # the same parser with every column as text: the same rows, no conversion
    as_text = pcsv.ConvertOptions(column_types=dict.fromkeys(table.names, pa.string()))
    start = 0
    try:
        reader = pcsv.open_csv(
            open_input(table.path),
            read_options=read,
            parse_options=parse,
            convert_options=as_text,
        )
        for batch in reader:
            for name in numeric:
                column = batch.column(table.names.index(name))
                if _cast_ok(pa, pc, column):
                    continue
                bad = _bad_cell(pa, pc, column)
                if bad is not None:
                    cell = column[bad].as_py()
                    return (
                        f"{table.where(start + bad)} has {cell!r} in column {name!r}, which is "
                        "not a number (an empty cell is a missing value)"
                    )
            start += batch.num_rows
    except pa.ArrowInvalid:
        return _ragged_line(table.path)
    return None


def _ragged_line(path: Path) -> str | None:
    """The first row whose number of cells differs from the header's."""
    rows = _rows(path)
    width = len(next(rows, (0, []))[1])
    for line, row in rows:
        if len(row) != width:
            return f"line {line} has {len(row)} cells, but the header has {width}"
    return None


def _cast_ok(pa: Any, pc: Any, column: Any) -> bool:
    text = pc.utf8_trim_whitespace(column)
    text = pc.if_else(pc.is_in(text, value_set=pa.array(NULL_VALUES)), None, text)
    try:
        pc.cast(text, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def open_csv(path: Path, batch_size: int, label_column: str, group_by: str | None = None) -> Table:
    """Open a CSV (TSV for a ``.tsv`` name) file with a header line.

    The `group_by` column is read as text (each cell trimmed; an empty or
    ``NA`` cell is missing): a group is the cell as written, whatever type
    pyarrow would guess for the column of this file (``1`` read as a number
    in one file and as text in another, beside ``v2``, made two groups).
    """
    pa = need("pyarrow")
    pcsv = need("pyarrow.csv")
    parse = pcsv.ParseOptions(delimiter=_delimiter(path))
    # with threads pyarrow parses blocks ahead of the consumer as fast as it can, so the
    # peak memory grew with the file (+44 MB at 3M rows), and it still parsed in the
    # asking thread: one thread reads a block when asked, and the parallelism is the
    # reader thread's (:func:`.prefetched`, a bounded two batches ahead of the scoring);
    # small blocks (BLOCK_SIZE) keep the peak flat (1 MiB blocks: +32 MB at 1M rows under
    # jemalloc; +25 MB from 0.3M to 3M rows under mimalloc), then :func:`.regroup` makes
    # full batches
    read = pcsv.ReadOptions(block_size=BLOCK_SIZE, use_threads=False)
    try:
        first = open_growing(
            lambda: pcsv.open_csv(open_input(path), read_options=read, parse_options=parse), read
        )
    except pa.ArrowInvalid as exc:
        ragged = _ragged_line(path)
        if ragged is None:
            raise
        msg = f"{path}: {ragged}."
        raise CLIError(msg) from exc
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (int, then 0.5):
    # read every numeric column as float64, and the label as text, or as int64 while
    # its cells are integers (see :func:`_int_labels`)
    column_types = {
        f.name: pa.string() if f.name == label_column else pa.float64()
        for f in schema
        if f.name == label_column or is_numeric(pa, f.type)
    }
    group = group_by if group_by in schema.names and group_by != label_column else None
    if group is not None:
        column_types[group] = pa.string()
    numeric = [name for name, t in column_types.items() if t == pa.float64()]
    convert = pcsv.ConvertOptions(column_types=column_types, null_values=NULL_VALUES)
    as_int = None
    if _int_labels(schema, label_column):
        int_types = {**column_types, label_column: pa.int64()}
        as_int = pcsv.ConvertOptions(column_types=int_types, null_values=NULL_VALUES)

    def explain(exc: Exception) -> CLIError | None:
        found = _diagnose(table, numeric, read, parse)
        return None if found is None else CLIError(f"{path}: {found}.")

    def reader(options: Any) -> Any:
        return pcsv.open_csv(
            open_input(path), read_options=read, parse_options=parse, convert_options=options
        )

    def text_blocks(skip: int) -> Iterator[Any]:
        return skip_rows(checked_blocks(reader(convert), lambda: table, explain), skip)

    def blocks() -> Iterator[Any]:
        first = (
            text_blocks(0)
            if as_int is None
            else _with_int_labels(reader(as_int), label_column, text_blocks)
        )
        # a line longer than a block: the rest in larger blocks, labels as text
        batches = regroup(growing_blocks(first, text_blocks, read), batch_size)
        return batches if group is None else _group_text(batches, group)

    types = {f.name: column_types.get(f.name, f.type) for f in schema}
    line_of = functools.partial(_line_of, path)
    table = text_table(path, "csv", list(schema.names), types, record_batches(blocks), line_of)
    return table


def _group_text(batches: Iterator[Any], name: str) -> Iterator[Any]:
    """`batches` with the text column `name` trimmed, its ``NULL_VALUES`` cells missing."""
    pa = need("pyarrow")
    pc = need("pyarrow.compute")
    missing = pa.array(NULL_VALUES)
    for batch in batches:
        i = batch.schema.get_field_index(name)
        text = pc.utf8_trim_whitespace(batch.column(i))
        text = pc.if_else(pc.is_in(text, value_set=missing), None, text)
        yield batch.set_column(i, name, text)


def _int_labels(schema: Any, label_column: str) -> bool:
    """Whether labels may be read as int64 (pyarrow typed the first block's as integers).

    An integer label then means what its text would: ``07`` is 7 (as in a
    Parquet file), matched to a class name by its integer value, which is
    ambiguous only when two column names have the same one (``1`` and ``01``):
    then the label stays text.
    """
    pa = need("pyarrow")
    if schema.names.count(label_column) != 1:  # none, or repeated: the table says so
        return False
    if not pa.types.is_integer(schema.field(label_column).type):
        return False
    values = [v for v in map(as_int_text, schema.names) if v is not None]
    return len(values) == len(set(values))


def _with_int_labels(
    reader: Any, label_column: str, text_blocks: Callable[[int], Iterator[Any]]
) -> Iterator[Any]:
    """The blocks of `reader` (int64 labels) while every label is an integer; from the
    first block where one is not (or is missing, or any cell fails), the blocks of
    `text_blocks(rows read so far)`, which read the labels as text and explain a bad cell."""
    rows = 0
    try:
        while True:
            try:
                block = reader.read_next_batch()
            except StopIteration:
                return
            except Exception:  # pyarrow.ArrowInvalid: a cell that is not an int64, or worse
                break
            if block.column(label_column).null_count:
                break
            rows += block.num_rows
            yield block
    finally:
        reader.close()
    yield from text_blocks(rows)
