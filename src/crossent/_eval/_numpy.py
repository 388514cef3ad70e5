"""NumPy files: a structured ``.npy`` array, or an ``.npz`` archive of equal-length arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from crossent._eval._errors import CLIError
from crossent._eval._table import Batch, Table, need, record_batches

__all__ = ["open_npy", "open_npz"]


def _numpy_batches(
    columns: dict[str, np.ndarray], rows: int, batch_size: int
) -> Callable[[], Iterator[Batch]]:
    pa = need("pyarrow")

    def to_arrow(a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a)
        if a.ndim == 2:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        return pa.array(a)

    def blocks() -> Iterator[Any]:
        for start in range(0, rows, batch_size):
            chunk = {k: to_arrow(v[start : start + batch_size]) for k, v in columns.items()}
            yield pa.record_batch(chunk)

    return record_batches(blocks)


def open_npy(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a ``.npy`` file holding a structured array (one field per column)."""
    pa = need("pyarrow")
    data = np.load(path, mmap_mode="r", allow_pickle=False)
    if data.dtype.names is None:
        msg = (
            f"{path}: a .npy file must hold a structured array with named fields (the label "
            f"and one field per class); got a plain {data.dtype} array of shape {data.shape}. "
            "Save a plain matrix as .npz instead: np.savez(FILE, label=labels, probs=matrix)."
        )
        raise CLIError(msg)
    names = list(data.dtype.names)
    columns = {n: data[n] for n in names}
    types = {n: pa.from_numpy_dtype(data.dtype[n].base) for n in names}
    for n in names:
        if data.dtype[n].shape:  # a sub-array field: one list column
            types[n] = pa.list_(pa.from_numpy_dtype(data.dtype[n].base))
    rows = int(data.shape[0])
    return Table(path, "npy", names, types, _numpy_batches(columns, rows, batch_size), rows)


def open_npz(path: Path, batch_size: int, label_column: str) -> Table:
    """Open an ``.npz`` archive: 1-d arrays are columns, a 2-d array is a list column."""
    pa = need("pyarrow")
    archive = np.load(path, allow_pickle=False)
    columns = {name: archive[name] for name in archive.files}
    lengths = {name: a.shape[0] if a.ndim else None for name, a in columns.items()}
    if not columns or len(set(lengths.values())) != 1 or None in lengths.values():
        shapes = ", ".join(f"{k}: {v.shape}" for k, v in columns.items())
        msg = f"{path}: every array of a .npz file must have the same number of rows; got {shapes}."
        raise CLIError(msg)
    types = {}
    for name, a in columns.items():
        if a.ndim > 2:
            msg = (
                f"{path}: array `{name}` has {a.ndim} dimensions; "
                "use 1 (a column) or 2 (rows x classes)."
            )
            raise CLIError(msg)
        t = pa.from_numpy_dtype(a.dtype) if a.dtype.kind != "U" else pa.string()
        types[name] = pa.list_(t) if a.ndim == 2 else t
    rows = int(next(iter(lengths.values())) or 0)
    return Table(path, "npz", list(columns), types, _numpy_batches(columns, rows, batch_size), rows)
