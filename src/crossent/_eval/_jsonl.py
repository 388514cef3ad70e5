"""JSON Lines files (one object per line), read in blocks by ``pyarrow.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._sources import open_input
from crossent._eval._table import Table, is_numeric, is_numeric_list, need, record_batches

__all__ = ["open_jsonl"]


def open_jsonl(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a JSON Lines file."""
    pa = need("pyarrow")
    pjson = need("pyarrow.json")
    read = pjson.ReadOptions(block_size=max(1 << 16, batch_size * 64))
    first = pjson.open_json(open_input(path), read_options=read)
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (1, then 0.5): widen
    # every numeric column, and every numeric list column, to float64
    widened = []
    for f in schema:
        if f.name != label_column and is_numeric(pa, f.type):
            f = pa.field(f.name, pa.float64())
        elif f.name != label_column and is_numeric_list(pa, f.type):
            f = pa.field(f.name, pa.list_(pa.float64()))
        widened.append(f)
    parse = pjson.ParseOptions(explicit_schema=pa.schema(widened))

    def blocks() -> Iterator[Any]:
        yield from pjson.open_json(open_input(path), read_options=read, parse_options=parse)

    types = {f.name: f.type for f in widened}
    return Table(path, "jsonl", list(schema.names), types, record_batches(blocks), None)
