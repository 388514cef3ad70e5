"""NumPy files: a structured ``.npy`` array, or an ``.npz`` archive of equal-length arrays.

Both are read batch by batch from the file (an ``.npz`` member is read from
its zip stream, compressed or not), never mapped or loaded whole, so memory
stays bounded by the batch size and a file truncated while it is read is an
error rather than a crash (a memory map of a truncated file faults). Arrays
saved in Fortran order cannot be read by rows and are loaded whole.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from crossent._eval._errors import CLIError
from crossent._eval._table import Table, need, record_batches

__all__ = ["open_npy", "open_npz"]


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype[Any]
    offset: int  # bytes before the data


def _header(f: IO[bytes], where: str) -> _Header:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
    except ValueError as exc:
        msg = f"{where}: is not a NumPy .npy array ({exc})."
        raise CLIError(msg) from exc
    if dtype.hasobject:
        msg = (
            f"{where}: holds Python objects (dtype {dtype}), which are not read for safety; "
            "save numbers and strings only."
        )
        raise CLIError(msg)
    return _Header(tuple(shape), bool(fortran), dtype, f.tell())


def _read_rows(f: IO[bytes], header: _Header, count: int, where: str, start: int) -> np.ndarray:
    """The next `count` rows of the array whose data `f` is positioned in."""
    row_shape = header.shape[1:]
    row_bytes = header.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    data = f.read(count * row_bytes)
    if len(data) != count * row_bytes:
        got = start + len(data) // max(row_bytes, 1)
        msg = (
            f"{where}: is truncated: its header says {header.shape[0]:,} rows, but the data "
            f"ends after {got:,}."
        )
        raise CLIError(msg)
    return np.frombuffer(data, dtype=header.dtype).reshape(count, *row_shape)


def _to_arrow(pa: Any, a: np.ndarray) -> Any:
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
    return pa.array(a)


def _arrow_type(pa: Any, dtype: np.dtype[Any], ndim: int) -> Any:
    t = pa.string() if dtype.kind == "U" else pa.from_numpy_dtype(dtype)
    return pa.list_(t) if ndim == 2 else t


# ---------------------------------------------------------------- .npy


def open_npy(path: Path, batch_size: int, label_column: str) -> Table:
    """Open a ``.npy`` file holding a structured array (one field per column)."""
    pa = need("pyarrow")
    with open(path, "rb") as f:
        header = _header(f, str(path))
    dtype = header.dtype
    if dtype.names is None or len(header.shape) != 1:
        msg = (
            f"{path}: a .npy file must hold a 1-d structured array with named fields (the "
            f"label and one field per class); got a plain {dtype} array of shape "
            f"{header.shape}. Save a plain matrix as .npz instead: "
            "np.savez(FILE, label=labels, probs=matrix)."
        )
        raise CLIError(msg)
    names = list(dtype.names)
    types = {n: _arrow_type(pa, dtype[n].base, 2 if dtype[n].shape else 1) for n in names}
    rows = header.shape[0]

    def blocks() -> Iterator[Any]:
        with open(path, "rb") as f:
            f.seek(header.offset)
            for start in range(0, rows, batch_size):
                chunk = _read_rows(f, header, min(batch_size, rows - start), str(path), start)
                yield pa.record_batch({n: _to_arrow(pa, chunk[n]) for n in names})

    return Table(path, "npy", names, types, record_batches(blocks), rows)


# ---------------------------------------------------------------- .npz


def _npz_headers(path: Path) -> dict[str, _Header]:
    with zipfile.ZipFile(path) as archive:
        headers = {}
        for member in archive.namelist():
            name = member.removesuffix(".npy")
            with archive.open(member) as f:
                headers[name] = _header(f, f"{path}: array `{name}`")
    return headers


def _npz_columns(
    path: Path, headers: dict[str, _Header], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of every array of the archive, `batch_size` rows at a time."""
    rows = next(iter(headers.values())).shape[0]
    with zipfile.ZipFile(path) as archive:
        streams: dict[str, Any] = {}
        whole: dict[str, np.ndarray] = {}
        try:
            for name, header in headers.items():
                f = archive.open(name + ".npy")
                if header.fortran and len(header.shape) > 1:
                    with f:  # column-major: rows are not contiguous, load it whole
                        whole[name] = np.lib.format.read_array(f, allow_pickle=False)
                else:
                    _header(f, f"{path}: array `{name}`")  # to the first row
                    streams[name] = f
            for start in range(0, rows, batch_size):
                count = min(batch_size, rows - start)
                batch = {
                    name: _read_rows(f, headers[name], count, f"{path}: array `{name}`", start)
                    for name, f in streams.items()
                }
                batch |= {name: a[start : start + count] for name, a in whole.items()}
                yield {name: batch[name] for name in headers}
        finally:
            for f in streams.values():
                f.close()


def open_npz(path: Path, batch_size: int, label_column: str) -> Table:
    """Open an ``.npz`` archive: 1-d arrays are columns, a 2-d array is a list column."""
    pa = need("pyarrow")
    headers = _npz_headers(path)
    lengths = {name: h.shape[0] if h.shape else None for name, h in headers.items()}
    if not headers or len(set(lengths.values())) != 1 or None in lengths.values():
        shapes = ", ".join(f"{k}: {h.shape}" for k, h in headers.items())
        msg = f"{path}: every array of a .npz file must have the same number of rows; got {shapes}."
        raise CLIError(msg)
    for name, h in headers.items():
        if len(h.shape) > 2:
            msg = (
                f"{path}: array `{name}` has {len(h.shape)} dimensions; "
                "use 1 (a column) or 2 (rows x classes)."
            )
            raise CLIError(msg)
    types = {name: _arrow_type(pa, h.dtype, len(h.shape)) for name, h in headers.items()}
    rows = int(next(iter(lengths.values())) or 0)

    def blocks() -> Iterator[Any]:
        for chunk in _npz_columns(path, headers, batch_size):
            yield pa.record_batch({n: _to_arrow(pa, a) for n, a in chunk.items()})

    return Table(path, "npz", list(headers), types, record_batches(blocks), rows)
