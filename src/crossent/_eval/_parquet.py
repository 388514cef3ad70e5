"""Parquet files, read in record batches by ``pyarrow.parquet``.

pyarrow pre-buffers a whole row group by default (the whole file when it has
one row group), so memory grew with the file; here the column chunks are read
through a small buffered stream instead, page by page, and memory stays
bounded by the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._table import Table, need, record_batches

__all__ = ["open_parquet"]

_BUFFER = 1 << 20  # bytes read at a time from a column chunk


def open_parquet(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a Parquet file."""
    pq = need("pyarrow.parquet")
    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow

    def blocks() -> Iterator[Any]:
        stream = pq.ParquetFile(path, pre_buffer=False, buffer_size=_BUFFER)
        yield from stream.iter_batches(batch_size=batch_size, use_threads=False)

    types = {f.name: f.type for f in schema}
    return Table(
        path, "parquet", list(schema.names), types, record_batches(blocks), meta.metadata.num_rows
    )
