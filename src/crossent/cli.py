"""The ``crossent`` command line: ``eval`` a predictions file, run the ``demo``, ``bench``.

``crossent eval FILE`` streams a predictions file (CSV, Parquet, JSONL, .npy
or .npz) in batches through :class:`crossent.metrics.ClassificationMetrics`
and prints the figures as text or JSON; ``--report DIR`` also writes an HTML
report. Exit status: 0 on success, 2 on a malformed file or bad arguments,
with a message that names the problem and, for a bad row, the row.

pyarrow, tqdm and matplotlib (the ``metrics`` extra) are imported only by the
subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["main"]

FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".npy": "npy",
    ".npz": "npz",
}
BASES = {"e": None, "2": 2.0, "10": 10.0}


class CLIError(Exception):
    """A problem with the input or the arguments: printed as one message, exit status 2."""


# =================================================================== reading


@dataclass
class _Table:
    """A predictions file opened for streaming: its columns and a batch iterator."""

    path: Path
    format: str
    names: list[str]
    types: dict[str, Any]
    batches: Callable[[], Iterator[Any]]
    total_rows: int | None
    line_offset: int = 0  # lines before the first data row (1 for a CSV header)


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (
            f"`crossent eval` needs {module.split('.')[0]}; install the metrics extra: "
            "pip install 'crossent[metrics]'."
        )
        raise CLIError(msg) from exc


def _is_numeric(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_numeric_list(pa: Any, t: Any) -> bool:
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return bool(listy and _is_numeric(pa, t.value_type))


def _open_csv(path: Path, batch_size: int, label_column: str) -> _Table:
    pa = _need("pyarrow")
    pcsv = _need("pyarrow.csv")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    parse = pcsv.ParseOptions(delimiter=delimiter)
    read = pcsv.ReadOptions(block_size=max(1 << 16, batch_size * 64))
    first = pcsv.open_csv(path, read_options=read, parse_options=parse)
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (int, then 0.5):
    # read every numeric column as float64 and the label as text.
    column_types = {
        f.name: pa.string() if f.name == label_column else pa.float64()
        for f in schema
        if f.name == label_column or _is_numeric(pa, f.type)
    }
    # "nan" and "inf" are numbers (reported as such); empty cells and NA are missing values
    nulls = ["", "NA", "N/A", "NULL", "null", "None"]
    convert = pcsv.ConvertOptions(column_types=column_types, null_values=nulls)

    def batches() -> Iterator[Any]:
        reader = pcsv.open_csv(
            path, read_options=read, parse_options=parse, convert_options=convert
        )
        yield from reader

    types = {f.name: column_types.get(f.name, f.type) for f in schema}
    return _Table(path, "csv", list(schema.names), types, batches, None, line_offset=1)


def _open_parquet(path: Path, batch_size: int, label_column: str) -> _Table:
    pq = _need("pyarrow.parquet")
    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow

    def batches() -> Iterator[Any]:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)

    types = {f.name: f.type for f in schema}
    return _Table(path, "parquet", list(schema.names), types, batches, meta.metadata.num_rows)


def _open_jsonl(path: Path, batch_size: int, label_column: str) -> _Table:
    pa = _need("pyarrow")
    pjson = _need("pyarrow.json")
    read = pjson.ReadOptions(block_size=max(1 << 16, batch_size * 64))
    first = pjson.open_json(path, read_options=read)
    schema = first.schema
    first.close()
    # types from the first block can be too narrow for later ones (1, then 0.5): widen
    # every numeric column, and every numeric list column, to float64
    widened = []
    for f in schema:
        if f.name != label_column and _is_numeric(pa, f.type):
            f = pa.field(f.name, pa.float64())
        elif f.name != label_column and _is_numeric_list(pa, f.type):
            f = pa.field(f.name, pa.list_(pa.float64()))
        widened.append(f)
    parse = pjson.ParseOptions(explicit_schema=pa.schema(widened))

    def batches() -> Iterator[Any]:
        yield from pjson.open_json(path, read_options=read, parse_options=parse)

    types = {f.name: f.type for f in widened}
    return _Table(path, "jsonl", list(schema.names), types, batches, None)


def _numpy_batches(
    columns: dict[str, np.ndarray], rows: int, batch_size: int
) -> Callable[[], Iterator[Any]]:
    pa = _need("pyarrow")

    def to_arrow(a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a)
        if a.ndim == 2:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        return pa.array(a)

    def batches() -> Iterator[Any]:
        for start in range(0, rows, batch_size):
            chunk = {k: to_arrow(v[start : start + batch_size]) for k, v in columns.items()}
            yield pa.record_batch(chunk)

    return batches


def _open_npy(path: Path, batch_size: int, label_column: str) -> _Table:
    pa = _need("pyarrow")
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
    return _Table(path, "npy", names, types, _numpy_batches(columns, rows, batch_size), rows)


def _open_npz(path: Path, batch_size: int, label_column: str) -> _Table:
    pa = _need("pyarrow")
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
    return _Table(
        path, "npz", list(columns), types, _numpy_batches(columns, rows, batch_size), rows
    )


_OPENERS = {
    "csv": _open_csv,
    "parquet": _open_parquet,
    "jsonl": _open_jsonl,
    "npy": _open_npy,
    "npz": _open_npz,
}


def open_table(path: Path, *, batch_size: int, label_column: str) -> _Table:
    """Open a predictions file for streaming, by its extension."""
    if not path.is_file():
        msg = f"{path}: no such file."
        raise CLIError(msg)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        msg = f"{path}: unknown file type {path.suffix!r}; use one of {known}."
        raise CLIError(msg)
    try:
        return _OPENERS[fmt](path, batch_size, label_column)
    except CLIError:
        raise
    except Exception as exc:  # pyarrow / numpy parse errors: report them as a bad file
        msg = f"{path}: cannot read it as {fmt}: {exc}"
        raise CLIError(msg) from exc


# =================================================================== columns and rows


@dataclass
class _Columns:
    label: str
    classes: list[str]
    list_column: str | None
    ignored: list[str] = field(default_factory=list)


def resolve_columns(table: _Table, label_column: str) -> _Columns:
    """The label column and the class columns (or the one list column) of `table`."""
    pa = _need("pyarrow")
    if label_column not in table.names:
        msg = (
            f"{table.path}: no label column {label_column!r}; the columns are "
            f"{', '.join(table.names)}. Name the label column with --label-column."
        )
        raise CLIError(msg)
    classes, lists, ignored = [], [], []
    for name in table.names:
        if name == label_column:
            continue
        t = table.types[name]
        if _is_numeric(pa, t):
            classes.append(name)
        elif _is_numeric_list(pa, t):
            lists.append(name)
        else:
            ignored.append(name)
    if classes and lists:
        msg = (
            f"{table.path}: has both per-class columns ({', '.join(classes)}) and a list "
            f"column ({', '.join(lists)}); keep one way of giving the predictions."
        )
        raise CLIError(msg)
    if len(lists) > 1:
        msg = f"{table.path}: has several list columns ({', '.join(lists)}); keep one."
        raise CLIError(msg)
    if not classes and not lists:
        msg = (
            f"{table.path}: no prediction columns besides {label_column!r}; give one numeric "
            "column per class, or one list column holding each row's predictions."
        )
        raise CLIError(msg)
    if classes and len(classes) < 2:
        msg = f"{table.path}: only one class column ({classes[0]}); give one column per class."
        raise CLIError(msg)
    return _Columns(label_column, classes, lists[0] if lists else None, ignored)


class _RowError(Exception):
    """A bad row: `row` counts from 0 within the batch."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.reason = reason


def _first_null(column: Any) -> int:
    return int(np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False)))[0])


def batch_scores(batch: Any, columns: _Columns) -> np.ndarray:
    """The (rows, classes) float64 score matrix of one record batch."""
    pa = _need("pyarrow")
    if columns.list_column is None:
        parts = []
        for name in columns.classes:
            col = batch.column(name)
            if col.null_count:
                raise _RowError(_first_null(col), f"has no value in column {name!r}")
            parts.append(col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
        return np.stack(parts, axis=1) if parts else np.zeros((0, 0))
    col = batch.column(columns.list_column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise _RowError(_first_null(col), f"has no value in column {columns.list_column!r}")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.float64).reshape(len(col), width)
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if len(lengths) else 0
    if columns.classes:
        width = len(columns.classes)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = int(bad[0])
        raise _RowError(
            row, f"has {int(lengths[row])} predictions, but the rows before have {width}"
        )
    flat = col.flatten()
    if flat.null_count:
        row = int(np.searchsorted(np.cumsum(lengths), _first_null(flat), side="right"))
        raise _RowError(row, f"has a missing value in column {columns.list_column!r}")
    return flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), width)


def _as_int_text(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() else None


def batch_labels(batch: Any, columns: _Columns, *, mode: str) -> np.ndarray:
    """Class indices of one batch from labels that are class names or integer indices.

    When every class name is an integer (columns ``0, 1, 2`` or ``3, 5, 7``) the
    labels are read as names; otherwise integers are indices and text is a
    name (``mode`` "index" or "name" forces one reading).
    """
    col = batch.column(columns.label)
    if col.null_count:
        raise _RowError(_first_null(col), f"has no label (column {columns.label!r} is empty)")
    raw = col.to_numpy(zero_copy_only=False)
    names = columns.classes
    lookup = {name: i for i, name in enumerate(names)}
    names_are_ints = all(_as_int_text(n) is not None for n in names)
    if raw.dtype.kind == "f":
        frac = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if frac.size:
            row = int(frac[0])
            raise _RowError(row, f"has label {raw[row]!r}, which is not a class index or name")
        raw = raw.astype(np.int64)
    uniques, inverse = np.unique(raw.astype(str), return_inverse=True)
    mapped = np.empty(len(uniques), dtype=np.int64)
    for j, text in enumerate(uniques):
        text = str(text).strip()
        as_int = _as_int_text(text)
        by_name = lookup.get(text)
        if by_name is None and names_are_ints and as_int is not None:
            by_name = next((i for i, n in enumerate(names) if _as_int_text(n) == as_int), None)
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
            raise _RowError(row, f"has label {text!r}, which is not {how}")
        mapped[j] = index
    return mapped[inverse.reshape(-1)]


def check_finite(scores: np.ndarray, kind: str) -> None:
    """A file must not hold NaN or +inf (logits and log-probabilities may hold −inf)."""
    bad_nan = np.asarray(np.isnan(scores).any(axis=1))
    bad_inf = np.asarray(np.isposinf(scores).any(axis=1))
    bad_all = np.asarray(np.isneginf(scores).all(axis=1))
    if kind == "probs":
        bad_all = np.zeros(len(scores), dtype=np.bool_)
    bad = np.flatnonzero(bad_nan | bad_inf | bad_all)
    if bad.size:
        row = int(bad[0])
        what = "NaN" if bad_nan[row] else ("+inf" if bad_inf[row] else "only -inf")
        raise _RowError(row, f"holds {what}")


# =================================================================== eval


def _row_label(table: _Table, row: int) -> str:
    text = f"row {row + 1}"
    if table.line_offset:
        text += f" (line {row + 1 + table.line_offset})"
    return text


def _input_hint(kind: str) -> str:
    others = {
        "probs": "--input logits or --input log_probs",
        "logits": "--input probs",
        "log_probs": "--input logits or --input probs",
    }
    return f"If the columns hold something else, pass {others[kind]}."


def evaluate(
    path: Path,
    *,
    label_column: str = "label",
    input_kind: str = "probs",
    bins: int = 15,
    base: str = "e",
    labels: str = "auto",
    batch_size: int = 65536,
    progress: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Stream `path` through ClassificationMetrics; returns (summary, metric)."""
    import crossent as ce
    from crossent.metrics import BadRowError, ClassificationMetrics

    table = open_table(path, batch_size=batch_size, label_column=label_column)
    columns = resolve_columns(table, label_column)
    metric = ClassificationMetrics(input_kind=input_kind, bins=bins)
    offset = 0
    bar = _progress_bar(table.total_rows, enabled=progress)
    try:
        with ce.validation(True):  # a file is always checked, whatever CROSSENT_VALIDATE says
            for batch in _read_batches(table):
                try:
                    scores = batch_scores(batch, columns)
                    if columns.list_column is not None and not columns.classes:
                        columns.classes = [str(k) for k in range(scores.shape[1])]
                    elif scores.shape[1] != len(columns.classes):
                        raise _RowError(
                            0, f"has {scores.shape[1]} predictions, not {len(columns.classes)}"
                        )
                    if scores.shape[1] < 2:
                        raise _RowError(0, "has fewer than two class predictions")
                    target = batch_labels(batch, columns, mode=labels)
                    check_finite(scores, input_kind)
                    metric.update(scores, target)
                except _RowError as exc:
                    row = offset + exc.row
                    msg = f"{path}: {_row_label(table, row)} {exc.reason}."
                    raise CLIError(msg) from exc
                except BadRowError as exc:
                    row = offset + exc.row
                    msg = (
                        f"{path}: {_row_label(table, row)} {exc.reason}. {_input_hint(input_kind)}"
                    )
                    raise CLIError(msg) from exc
                offset += batch.num_rows
                if bar is not None:
                    bar.update(batch.num_rows)
    finally:
        if bar is not None:
            bar.close()
    if offset == 0:
        msg = f"{path}: has no rows."
        raise CLIError(msg)
    summary = _summary(metric, table, columns, input_kind=input_kind, bins=bins, base=base)
    return summary, metric


def _read_batches(table: _Table) -> Iterator[Any]:
    try:
        yield from table.batches()
    except CLIError:
        raise
    except Exception as exc:  # a parse error half-way through the file
        msg = f"{table.path}: cannot read it as {table.format}: {exc}"
        raise CLIError(msg) from exc


def _progress_bar(total: int | None, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the metrics extra
        return None
    return tqdm(total=total, unit=" rows", unit_scale=True, delay=1.0, file=sys.stderr, leave=False)


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary(
    metric: Any, table: _Table, columns: _Columns, *, input_kind: str, bins: int, base: str
) -> dict[str, Any]:
    from crossent._report import summarize

    return summarize(
        metric,
        classes=columns.classes,
        file=str(table.path),
        format=table.format,
        input_kind=input_kind,
        bins=bins,
        base=base,
        ignored_columns=columns.ignored,
    )


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, list):
            out[key] = [
                {k: _finite(v) for k, v in item.items()} if isinstance(item, dict) else item
                for item in value
            ]
        else:
            out[key] = _finite(value)
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def format_text(summary: dict[str, Any]) -> str:
    """The summary as a readable text table."""
    unit = {"e": "nats", "2": "bits", "10": "bans"}[summary["base"]]
    classes = summary["classes"]
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    lines = [
        f"{summary['file']}: {summary['rows']:,} rows, {len(classes)} classes ({shown}), "
        f"input {summary['input']}",
        f"  log loss        {_fmt(summary['log_loss_nats'])} nats   "
        f"{_fmt(summary['log_loss_bits'])} bits"
        + (f"   {_fmt(summary['log_loss'])} {unit}" if unit == "bans" else ""),
        f"  perplexity      {_fmt(summary['perplexity'])}",
        f"  accuracy        {_fmt(summary['accuracy'])}",
        f"  Brier score     {_fmt(summary['brier'])}",
        f"  ECE             {_fmt(summary['ece'])}   ({summary['bins']} equal-width bins; "
        f"equal-mass {_fmt(summary['ece_equal_mass'])}; MCE {_fmt(summary['mce'])})",
        f"  classwise ECE   {_fmt(summary['classwise_ece'])}",
    ]
    if summary["ece_positive"] is not None:
        lines.append(f"  ECE, class {classes[1]}  {_fmt(summary['ece_positive'])}")
    if summary["clamped_rows"]:
        lines.append(
            f"  note: {summary['clamped_rows']} rows gave their label probability < e^-100; "
            "log p was clamped at -100 (100 nats each)"
        )
    if summary["ignored_columns"]:
        lines.append(f"  ignored non-numeric columns: {', '.join(summary['ignored_columns'])}")
    width = max(5, *(len(c) for c in classes[:50]))
    lines.append("")
    lines.append(
        f"  {'class':<{width}}  {'rows':>8}  {'CE (' + unit + ')':>10}  "
        f"{'recall':>7}  {'precision':>9}"
    )
    divisor = {"e": 1.0, "2": math.log(2), "10": math.log(10)}[summary["base"]]
    for entry in summary["per_class"][:50]:
        ce_value = entry["cross_entropy_nats"] / divisor
        lines.append(
            f"  {entry['class']:<{width}}  {entry['count']:>8,}  {_fmt(ce_value):>10}  "
            f"{_fmt(entry['recall']):>7}  {_fmt(entry['precision']):>9}"
        )
    if len(summary["per_class"]) > 50:
        lines.append(f"  ... {len(summary['per_class']) - 50} more classes (see --format json)")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace, out: IO[str]) -> int:
    if args.bins < 1:
        msg = f"--bins must be at least 1; got {args.bins}."
        raise CLIError(msg)
    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1; got {args.batch_size}."
        raise CLIError(msg)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    summary, metric = evaluate(
        Path(args.file),
        label_column=args.label_column,
        input_kind=args.input,
        bins=args.bins,
        base=args.base,
        labels=args.labels,
        batch_size=args.batch_size,
        progress=progress,
    )
    if args.report is not None:
        from crossent._report import write_report

        try:
            html = write_report(
                Path(args.report),
                summary=summary,
                reliability=metric.reliability(),
                title=f"crossent eval {Path(args.file).name}",
            )
        except ImportError as exc:
            raise CLIError(str(exc)) from exc
        summary["report"] = str(html)
    if args.format == "json":
        json.dump(_jsonable(summary), out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        out.write(format_text(summary) + "\n")
        if args.report is not None:
            out.write(f"report: {summary['report']}\n")
    return 0


# =================================================================== demo and bench


def _cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from crossent._demo import run_demo

    try:
        run_demo(
            fast=args.fast,
            report_dir=None if args.no_report else Path(args.report),
            seed=args.seed,
            out=out,
            progress=sys.stderr.isatty(),
        )
    except ImportError as exc:  # scikit-learn or matplotlib missing: say which extra
        raise CLIError(str(exc)) from exc
    return 0


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (next to ``src/``)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _cmd_bench(args: argparse.Namespace, out: IO[str]) -> int:
    import subprocess

    folder = Path(args.dir) if args.dir else benchmarks_dir()
    if not folder.is_dir():
        msg = (
            f"no benchmarks folder at {folder}: the benchmark scripts live in the source "
            "repository, not in an installed package. Run `crossent bench` from a clone "
            "(pip install -e .), or pass --dir PATH."
        )
        raise CLIError(msg)
    scripts = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if any(word in p.stem for word in args.only)]
    if not scripts:
        msg = f"no benchmark scripts (*.py) in {folder}" + (
            f" matching {', '.join(args.only)}." if args.only else "."
        )
        raise CLIError(msg)
    failed = []
    for script in scripts:
        # run as a module of the folder's package, so scripts share helpers (benchmarks._util)
        module = f"{script.parent.name}.{script.stem}"
        command = [sys.executable, "-m", module, *(["--quick"] if args.quick else [])]
        out.write(f"== {script.name} {'(quick)' if args.quick else ''}\n")
        out.flush()
        # forward the script's output line by line, as it comes (long benchmarks)
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=script.parent.parent,
        ) as proc:
            for line in proc.stdout or ():
                out.write(line)
                out.flush()
        if proc.returncode != 0:
            failed.append(script.name)
            out.write(f"!! {script.name} exited with status {proc.returncode}\n")
        out.flush()
    if failed:
        out.write(f"{len(failed)} of {len(scripts)} benchmarks failed: {', '.join(failed)}\n")
        return 1
    return 0


# =================================================================== argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossent",
        description="Cross-entropy tools: score a predictions file, run the demo, run benchmarks.",
    )
    from crossent import __version__

    parser.add_argument("--version", action="version", version=f"crossent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,demo,bench}")

    ev = sub.add_parser(
        "eval",
        help="score a predictions file (log loss, accuracy, Brier, calibration)",
        description=(
            "Score a predictions file: CSV/TSV, Parquet, JSONL, .npy (structured) or .npz. "
            "One column holds the label (a class name or an integer index); every other "
            "numeric column is one class, named by its column, in file order - or a single "
            "list column holds each row's predictions. The file is streamed in batches. "
            "Exit status 0 on success, 2 on a malformed file or bad arguments."
        ),
    )
    ev.add_argument("file", help="the predictions file")
    ev.add_argument(
        "--label-column", default="label", help="name of the label column (default: label)"
    )
    ev.add_argument(
        "--input",
        choices=("probs", "logits", "log_probs"),
        default="probs",
        help="what the class columns hold (default: probs)",
    )
    ev.add_argument(
        "--base",
        choices=tuple(BASES),
        default="e",
        help="log base of `log_loss` (nats and bits are always reported too; default: e)",
    )
    ev.add_argument("--bins", type=int, default=15, help="calibration bins (default: 15)")
    ev.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    ev.add_argument("--report", metavar="DIR", help="write an HTML report (and its PNGs) into DIR")
    ev.add_argument(
        "--labels",
        choices=("auto", "index", "name"),
        default="auto",
        help=(
            "how to read labels (default: auto: as class names when every class name is an "
            "integer, e.g. columns 3,5,7; otherwise integers are indices and text is a name)"
        ),
    )
    ev.add_argument("--batch-size", type=int, default=65536, help="rows per batch (default: 65536)")
    ev.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    ev.set_defaults(run=_cmd_eval)

    demo = sub.add_parser(
        "demo",
        help="train softmax regression on scikit-learn's digits with crossent's losses",
        description=(
            "Train softmax-regression classifiers on an imbalanced version of scikit-learn's "
            "digits data with crossent's own losses and closed-form gradients (plain "
            "cross-entropy, label smoothing, class weights, focal loss), print held-out "
            "cross-entropy in bits, accuracy and calibration error, and write an HTML report "
            "for the best model."
        ),
    )
    demo.add_argument("--fast", action="store_true", help="few iterations (for CI)")
    demo.add_argument(
        "--report",
        default="crossent-report",
        metavar="DIR",
        help="report folder (default: crossent-report)",
    )
    demo.add_argument("--no-report", action="store_true", help="do not write the report")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(run=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark scripts in benchmarks/ and print their tables",
        description="Run every benchmarks/*.py script of the repository; print their tables.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes (passed to each script)")
    bench.add_argument(
        "--only", nargs="+", metavar="NAME", help="only scripts whose name contains NAME"
    )
    bench.add_argument("--dir", help="the benchmarks folder (default: the repository's)")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None, *, out: IO[str] | None = None) -> int:
    """Run the ``crossent`` command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``crossent`` (``sys.argv[1:]`` when None).
    out : file, optional
        Where results go (standard output when None); errors go to stderr.

    Returns
    -------
    int
        0 on success, 1 when a benchmark script failed, 2 on a malformed file
        or bad arguments (argparse exits with 2 itself for unknown options).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "predictions.npz"
    >>> np.savez(path, label=np.array([0, 1]), probs=np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> main(["eval", str(path), "--format", "json"])  # doctest: +ELLIPSIS
    {
      "file": ...,
      "rows": 2,
      "log_loss_nats": 0.490...,
      "log_loss_bits": 0.707...,
    ...
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    stream = sys.stdout if out is None else out
    try:
        status: int = args.run(args, stream)
    except CLIError as exc:
        stream.flush()
        print(f"crossent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `crossent eval ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status
