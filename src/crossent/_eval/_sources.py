"""Where the rows come from: files, directories, quoted globs, compressed files, stdin.

:func:`expand_sources` turns ``crossent eval``'s FILE arguments into a list
of files, in a stable order (each directory and glob sorted by path): a
directory contributes every predictions file under it (hidden files and
names starting with ``_``, such as Spark's ``_SUCCESS``, are skipped, and so
is everything under such a folder, such as Spark's ``_temporary``), a glob
every file it matches; a file reached twice (named twice, by a directory and
a glob that overlap, or through a link) is refused rather than scored twice.
``-`` is CSV on standard input, spooled to a temporary file (pyarrow reads a
CSV twice: once for its columns, once for its rows).

:func:`data_suffix` and :func:`open_input` handle compressed text files:
``.gz``, ``.bz2`` and ``.zst`` are decompressed by pyarrow's own codecs as
the file streams, ``.xz`` by Python's :mod:`lzma`; the format is the
extension before the compression one (``preds.csv.gz`` is CSV).
"""

from __future__ import annotations

import contextlib
import glob
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from crossent._eval._errors import CLIError

__all__ = [
    "COMPRESSIONS",
    "data_suffix",
    "expand_sources",
    "is_blank_text",
    "open_input",
    "open_text",
    "stdin_as_file",
]

#: compressed-file extension -> pyarrow codec (None: Python's lzma)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": None}
#: formats that may be compressed (the others have their own compression inside)
COMPRESSIBLE = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def data_suffix(path: Path) -> tuple[str, str | None]:
    """(format extension, compression extension or None) of `path`, lower case."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2], suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def open_input(path: Path) -> Any:
    """`path` as a pyarrow input stream, decompressed by its extension."""
    import pyarrow as pa

    fmt, compression = data_suffix(path)
    if compression is None:
        return pa.input_stream(str(path))
    if fmt not in COMPRESSIBLE:
        msg = (
            f"{path}: compressed {fmt or 'files'} are not read; compression by extension is for "
            f"CSV, TSV and JSONL (Parquet and .npz compress inside the file)."
        )
        raise CLIError(msg)
    codec = COMPRESSIONS[compression]
    if codec is None:
        import lzma

        return pa.PythonFile(lzma.open(path, "rb"), mode="r")
    return pa.input_stream(str(path), compression=codec)


def open_text(path: Path) -> IO[str]:
    """`path` as UTF-8 text (undecodable bytes replaced), decompressed by its extension.

    Newlines are left as they are (``newline=""``), as the :mod:`csv` module wants.
    """
    import io

    return io.TextIOWrapper(open_input(path), encoding="utf-8", errors="replace", newline="")


def is_blank_text(path: Path) -> bool:
    """Whether `path` is a text file (CSV, TSV, JSONL; compressed or not) of white space
    only: 0 bytes, or line breaks (what pandas and Dask write for an empty partition as
    JSON lines, what Spark writes as 0 bytes): a file without rows, like a CSV file of a
    header only. False for anything else, and for a file that cannot be read (its opener
    says why)."""
    fmt, _ = data_suffix(path)
    if fmt not in COMPRESSIBLE:
        return False
    try:
        if path.stat().st_size == 0:
            return True
        with open_text(path) as f:  # stops at the first block with a character
            while chunk := f.read(1 << 16):
                if not chunk.isspace():
                    return False
    except Exception:  # OSError, a damaged compressed stream: not blank (the opener says)
        return False
    return True


def _known(path: Path, formats: Sequence[str]) -> bool:
    fmt, _ = data_suffix(path)
    return fmt in formats and not path.name.startswith((".", "_"))


def _directory(folder: Path, formats: Sequence[str]) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and _known(p, formats))
    # nothing under a hidden or underscore folder at any depth below `folder` (Spark's
    # _temporary/0/_temporary/attempt_*/part-*, .cache/...); `folder` itself was asked for
    found = [
        p
        for p in found
        if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts[:-1])
    ]
    if not found:
        shown = ", ".join(sorted(formats))
        msg = f"{folder}: a directory with no predictions files ({shown}, optionally compressed)."
        raise CLIError(msg)
    return found


def expand_sources(files: Sequence[str], *, formats: Sequence[str]) -> list[Path | str]:
    """The files named by `files` (paths, directories, globs, ``-``), in a stable order."""
    out: list[Path | str] = []
    for text in files:
        if text == "-":
            if "-" in out:
                msg = "`-` (standard input) can be given once only."
                raise CLIError(msg)
            out.append("-")
            continue
        path = Path(text)
        if path.is_dir():
            out.extend(_directory(path, formats))
        elif path.exists() or not glob.has_magic(text):
            out.append(path)  # a missing plain path: the opener says "no such file"
        else:
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True))
            files_only = [p for p in matched if p.is_file()]
            if not files_only:
                msg = f"{text}: the pattern matches no file."
                raise CLIError(msg)
            out.extend(files_only)
    if "-" in out and len(out) > 1:
        msg = "`-` (CSV on standard input) cannot be combined with other files."
        raise CLIError(msg)
    _refuse_repeats(out)
    return out


def _refuse_repeats(paths: Sequence[Path | str]) -> None:
    """Raise if two entries of `paths` are one file (named twice, by a directory and a glob
    that overlap, or through a link): its rows would be scored twice."""
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        try:
            info = Path(path).stat()
        except OSError:  # missing or unreadable: the opener says so
            continue
        key = (info.st_dev, info.st_ino)
        first = seen.get(key)
        if first is None:
            seen[key] = Path(path)
        else:
            same = (
                "named twice by the FILE arguments (a directory, a pattern and a file may overlap)"
                if first == Path(path)
                else f"the same file as {first} (a link)"
            )
            msg = f"{path}: {same}; its rows would be scored twice. Name each file once."
            raise CLIError(msg)


@contextlib.contextmanager
def stdin_as_file(stream: IO[bytes] | None = None) -> Iterator[Path]:
    """Standard input (or `stream`) copied to a temporary ``.csv`` file, removed on exit."""
    import shutil  # here only: shutil imports bz2 and lzma (ms at every start-up)
    import tempfile

    source = sys.stdin.buffer if stream is None else stream
    with tempfile.TemporaryDirectory(prefix="crossent-stdin-") as folder:
        path = Path(folder) / "stdin.csv"
        with open(path, "wb") as f:
            shutil.copyfileobj(source, f, length=1 << 20)
        yield path
