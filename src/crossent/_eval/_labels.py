"""Labels: class names or integer class indices, turned into class indices."""

from __future__ import annotations

from typing import Any

import numpy as np

from crossent._eval._columns import Columns, first_null
from crossent._eval._errors import RowError
from crossent._eval._table import is_numeric, need, to_numpy

__all__ = ["as_int_text", "batch_labels"]


def as_int_text(text: str) -> int | None:
    """The integer `text` holds (``7``, ``07``, ``7.0``), or None."""
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() else None


def _distinct(values: Any) -> tuple[list[str], np.ndarray]:
    """The distinct values of a column as text, and each row's index among them.

    Hash-based (Arrow's ``dictionary_encode``): the rows are never sorted nor
    turned into Python strings; only the few distinct values are.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(values) if isinstance(values, np.ndarray) else values
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    encoded = pc.dictionary_encode(array)
    texts = [str(v) for v in encoded.dictionary.to_pylist()]
    return texts, to_numpy(encoded.indices)


def batch_labels(batch: Any, columns: Columns, *, mode: str) -> np.ndarray:
    """Class indices of one batch from labels that are class names or integer indices.

    When every class name is an integer (columns ``0, 1, 2`` or ``3, 5, 7``) the
    labels are read as names; otherwise integers are indices and text is a
    name (``mode`` "index" or "name" forces one reading).
    """
    col = batch.column(columns.label)
    if col.null_count:
        raise RowError(first_null(col), f"has no label (column {columns.label!r} is empty)")
    numeric = is_numeric(need("pyarrow"), col.type)  # else text: never one Python str per row
    raw = to_numpy(col) if numeric else np.zeros(0)
    names = columns.classes
    lookup = {name: i for i, name in enumerate(names)}
    names_are_ints = all(as_int_text(n) is not None for n in names)
    if numeric and raw.dtype.kind == "f":
        # not an int64 either (1e20 cast to int64 read as -2**63): not a label
        frac = np.flatnonzero(~(np.abs(raw) < 2.0**63) | (raw != np.round(raw)))
        if frac.size:
            row = int(frac[0])
            raise RowError(
                row, f"has label {raw[row].item()!r}, which is not a class index or name"
            )
        raw = raw.astype(np.int64)
    index_reading = mode == "index" or (mode == "auto" and not names_are_ints)
    if numeric and index_reading:  # integer indices: no text, no sorting
        bad = np.flatnonzero((raw < 0) | (raw >= len(names)))
        if bad.size == 0:
            return raw.astype(np.int64, copy=False)
    uniques, inverse = _distinct(raw if numeric else col)
    mapped = np.empty(len(uniques), dtype=np.int64)
    for j, text in enumerate(uniques):
        text = str(text).strip()
        as_int = as_int_text(text)
        by_name = lookup.get(text)
        if by_name is None and names_are_ints and as_int is not None:
            by_name = next((i for i, n in enumerate(names) if as_int_text(n) == as_int), None)
        if mode == "name" or (mode == "auto" and (names_are_ints or as_int is None)):
            index = by_name
        else:
            index = as_int if as_int is not None and 0 <= as_int < len(names) else None
        if index is None:
            row = int(np.flatnonzero(inverse == j)[0])
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            how = f"a class index in [0, {len(names)}) or a class name ({shown})"
            if mode == "name" or (mode == "auto" and names_are_ints):
                how = f"a class name ({shown})"
            raise RowError(row, f"has label {text!r}, which is not {how}")
        mapped[j] = index
    return mapped[inverse.reshape(-1)]
