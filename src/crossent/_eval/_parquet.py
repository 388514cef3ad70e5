"""Parquet files, read in record batches by ``pyarrow.parquet``.

pyarrow pre-buffers a whole row group by default (the whole file when it has
one row group), so memory grew with the file; here the column chunks are read
through a small buffered stream instead, page by page, and memory stays
bounded by the batch size.

A file can also be opened as a run of its row groups (:func:`row_group_parts`
cuts a large file into such runs): the Dask engine scores the parts of one
file on several workers, and a bad row is still named by its row in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._table import Table, need, record_batches

__all__ = ["open_parquet", "row_group_parts"]

_BUFFER = 1 << 20  # bytes read at a time from a column chunk


def open_parquet(
    path: Path, batch_size: int, label_column: str, row_groups: tuple[int, int] | None = None
) -> Table:
    """Open a Parquet file, or only its row groups [start, stop) when `row_groups` is given."""
    pq = need("pyarrow.parquet")
    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow
    groups = range(meta.metadata.num_row_groups)
    if row_groups is not None:
        groups = range(*row_groups)
    sizes = [meta.metadata.row_group(i).num_rows for i in range(groups.start)]
    first_row = sum(sizes)  # rows before the first group read

    def blocks() -> Iterator[Any]:
        stream = pq.ParquetFile(path, pre_buffer=False, buffer_size=_BUFFER)
        yield from stream.iter_batches(
            batch_size=batch_size, row_groups=list(groups), use_threads=False
        )

    types = {f.name: f.type for f in schema}
    rows = sum(meta.metadata.row_group(i).num_rows for i in groups)
    return Table(
        path, "parquet", list(schema.names), types, record_batches(blocks, first_row), rows
    )


def row_group_parts(path: Path, min_rows: int) -> list[tuple[int, int]]:
    """Runs [start, stop) of consecutive row groups of at least `min_rows` rows each
    (the last run may be shorter), covering the whole file; one run for a small file."""
    pq = need("pyarrow.parquet")
    meta = pq.ParquetFile(path).metadata
    parts: list[tuple[int, int]] = []
    start, rows = 0, 0
    for i in range(meta.num_row_groups):
        rows += meta.row_group(i).num_rows
        if rows >= min_rows:
            parts.append((start, i + 1))
            start, rows = i + 1, 0
    if start < meta.num_row_groups:
        if parts:  # a short tail joins the run before it
            parts[-1] = (parts[-1][0], meta.num_row_groups)
        else:
            parts.append((start, meta.num_row_groups))
    return parts or [(0, 0)]
