"""JSON Lines files (one object per line), read in blocks by ``pyarrow.json``.

pyarrow's errors name a row inside a block ("in row 1"), and it skips blank
lines, so neither gives the file line. :func:`_objects` walks the file with
Python's :mod:`json` decoder, object by object, to find the line of a row
(for an error message only) and, when pyarrow fails half-way, the line and
column that made it fail.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._errors import CLIError
from crossent._eval._sources import open_input, open_text
from crossent._eval._table import (
    BLOCK_SIZE,
    Table,
    checked_blocks,
    growing_blocks,
    is_numeric,
    is_numeric_list,
    need,
    open_growing,
    record_batches,
    regroup,
    skip_rows,
    text_table,
)

__all__ = ["open_jsonl"]


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            msg = f"has the key {key!r} twice in one object"
            raise _Duplicate(msg)
        seen[key] = value
    return seen


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _objects(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) of every JSON value in `path`, in order; raises CLIError on bad JSON.

    Blank lines are skipped; a line may hold several values and a value may
    span lines, as pyarrow allows.
    """
    buffer, line, pending = "", 0, 0  # pending: lines in `buffer` after its first
    with open_text(path) as f:
        for text in itertools.chain(f, [None]):
            if text is not None:
                buffer += text
                pending += 1
                if not buffer.strip():
                    line, pending, buffer = line + pending, 0, ""
                    continue
            while buffer.strip():
                start = len(buffer) - len(buffer.lstrip())
                first_line = line + 1 + buffer.count("\n", 0, start)
                try:
                    value, end = _DECODER.raw_decode(buffer, start)
                except _Duplicate as exc:
                    msg = f"{path}: line {first_line} {exc}; give each key once."
                    raise CLIError(msg) from None
                except json.JSONDecodeError as exc:
                    if text is not None and exc.pos >= len(buffer.rstrip()):
                        break  # the value goes on on the next line
                    if exc.pos >= len(buffer.rstrip()):  # the end of the file
                        msg = (
                            f"{path}: line {first_line} is cut off: the file ends inside a "
                            "JSON value (is it truncated?)."
                        )
                        raise CLIError(msg) from None
                    bad = line + 1 + buffer.count("\n", 0, exc.pos)
                    msg = f"{path}: line {bad} is not valid JSON ({exc.msg})."
                    raise CLIError(msg) from None
                yield first_line, value
                consumed = buffer.count("\n", 0, end)
                line, pending, buffer = line + consumed, pending - consumed, buffer[end:]
            if not buffer.strip():
                line, pending, buffer = line + pending, 0, ""


def _line_of(path: Path, row: int) -> int | None:
    found = next(itertools.islice(_objects(path), row, None), None)
    return None if found is None else found[0]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "list"
    return "object"


def _cells(value: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(column, kind, cell) of an object's cells, list items as column ``name[]``; no nulls."""
    for key, cell in value.items():
        kind = _kind(cell)
        if kind != "null":
            yield key, kind, cell
        if kind == "list":
            for item in cell:
                if _kind(item) != "null":
                    yield f"{key}[]", _kind(item), item


def _diagnose(path: Path) -> str | None:
    """The first line with a cell whose kind is not its column's usual kind.

    The usual kind is the one most cells of the column have (a first row
    holding text in a column of numbers is the odd one, not the rows after).
    """
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line, value in _objects(path):
        if not isinstance(value, dict):
            return f"line {line} holds a JSON {_kind(value)}, not an object"
        for column, kind, _ in _cells(value):
            counts[column][kind] += 1
    usual = {column: kinds.most_common(1)[0][0] for column, kinds in counts.items()}
    for line, value in _objects(path):
        for column, kind, cell in _cells(value):
            if kind != usual[column]:
                where = (
                    f"the list of column {column[:-2]!r}"
                    if column.endswith("[]")
                    else f"column {column!r}"
                )
                return (
                    f"line {line} has {cell!r} ({kind}) in {where}, whose other values are "
                    f"{usual[column]}s"
                )
    return None


def _fail(path: Path, exc: Exception) -> CLIError:
    found = _diagnose(path)
    msg = f"{path}: {found}." if found else f"{path}: cannot read it as jsonl: {exc}"
    return CLIError(msg)


def open_jsonl(
    path: Path, batch_size: int, label_column: str, group_by: str | None = None
) -> Table:
    """Open a JSON Lines file.

    A `group_by` column of JSON strings stays text: pyarrow would read
    ``"2024-05-01"`` as a timestamp (midnight), not the day a CSV file has.
    """
    pa = need("pyarrow")
    pjson = need("pyarrow.json")
    # one thread, a block when asked (no parse-ahead), in 64 KiB blocks: with larger
    # blocks the peak crept up with the file under Arrow's jemalloc and system pools
    # (12 -> 56 MB from 0.1M to 2M rows with 1 MiB blocks); :func:`.regroup` makes the
    # small blocks full batches again
    read = pjson.ReadOptions(block_size=BLOCK_SIZE, use_threads=False)
    try:
        first = open_growing(lambda: pjson.open_json(open_input(path), read_options=read), read)
    except pa.ArrowInvalid as exc:
        raise _fail(path, exc) from exc
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (1, then 0.5): widen
    # every numeric column, and every numeric list column, to float64; integer labels too
    # (1, then 1.0: a label column with a missing value, written by pandas), which are
    # read as integers from float64 (a fraction is still a bad label)
    widened = []
    for f in schema:
        if is_numeric(pa, f.type):
            f = pa.field(f.name, pa.float64())
        elif f.name != label_column and is_numeric_list(pa, f.type):
            f = pa.field(f.name, pa.list_(pa.float64()))
        elif f.name == group_by and pa.types.is_timestamp(f.type):  # strings in the file
            f = pa.field(f.name, pa.string())
        widened.append(f)
    parse = pjson.ParseOptions(explicit_schema=pa.schema(widened))

    def read_from(skip: int) -> Iterator[Any]:
        reader = pjson.open_json(open_input(path), read_options=read, parse_options=parse)
        return skip_rows(checked_blocks(reader, lambda: table, lambda e: _fail(path, e)), skip)

    def blocks() -> Iterator[Any]:
        # a line longer than a block: the rest in larger blocks
        return regroup(growing_blocks(read_from(0), read_from, read), batch_size)

    types = {f.name: f.type for f in widened}
    line_of = functools.partial(_line_of, path)
    table = text_table(path, "jsonl", list(schema.names), types, record_batches(blocks), line_of)
    return table
