"""Parquet files, read in record batches by ``pyarrow.parquet``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._table import Table, need, record_batches

__all__ = ["open_parquet"]


def open_parquet(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a Parquet file."""
    pq = need("pyarrow.parquet")
    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow

    def blocks() -> Iterator[Any]:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)

    types = {f.name: f.type for f in schema}
    return Table(
        path, "parquet", list(schema.names), types, record_batches(blocks), meta.metadata.num_rows
    )
