"""CSV and TSV files, read in blocks by ``pyarrow.csv``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossent._eval._sources import data_suffix, open_input
from crossent._eval._table import Table, is_numeric, need, record_batches

__all__ = ["NULL_VALUES", "open_csv"]

#: cells read as missing values ("nan" and "inf" are numbers, reported as such)
NULL_VALUES = ["", "NA", "N/A", "NULL", "null", "None"]


def open_csv(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a CSV (TSV for a ``.tsv`` name) file with a header line."""
    pa = need("pyarrow")
    pcsv = need("pyarrow.csv")
    delimiter = "\t" if data_suffix(path)[0] == ".tsv" else ","
    parse = pcsv.ParseOptions(delimiter=delimiter)
    read = pcsv.ReadOptions(block_size=max(1 << 16, batch_size * 64))
    first = pcsv.open_csv(open_input(path), read_options=read, parse_options=parse)
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (int, then 0.5):
    # read every numeric column as float64 and the label as text.
    column_types = {
        f.name: pa.string() if f.name == label_column else pa.float64()
        for f in schema
        if f.name == label_column or is_numeric(pa, f.type)
    }
    convert = pcsv.ConvertOptions(column_types=column_types, null_values=NULL_VALUES)

    def blocks() -> Iterator[Any]:
        reader = pcsv.open_csv(
            open_input(path), read_options=read, parse_options=parse, convert_options=convert
        )
        yield from reader

    types = {f.name: column_types.get(f.name, f.type) for f in schema}
    return Table(
        path,
        "csv",
        list(schema.names),
        types,
        record_batches(blocks),
        None,
        line_of=lambda row: row + 2,  # the header is line 1
    )
