"""Which columns hold the label and the predictions, and the score matrix of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossent._eval._errors import CLIError, RowError
from crossent._eval._table import Table, is_numeric, is_numeric_list, need, to_numpy

__all__ = [
    "Columns",
    "batch_scores",
    "check_finite",
    "check_text_columns",
    "first_null",
    "resolve_columns",
]

#: a cell that reads as a number (what pyarrow's CSV reader accepts as a float64)
_NUMBER = r"^\s*[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)\s*$"


@dataclass
class Columns:
    label: str
    classes: list[str]
    list_column: str | None
    ignored: list[str] = field(default_factory=list)


def _named(table: Table, names: Sequence[str], option: str) -> None:
    missing = [n for n in names if n not in table.names]
    if missing:
        msg = (
            f"{table.path}: {option} names {', '.join(map(repr, missing))}, not a column; "
            f"the columns are {', '.join(table.names)}."
        )
        raise CLIError(msg)


def _flat(table: Table, name: str, what: str, expected: str) -> None:
    """A CLIError when column `name` holds lists, structs or maps (no label, no group)."""
    t = table.types[name]
    if need("pyarrow").types.is_nested(t):
        kind = str(t).split("<", 1)[0]
        msg = (
            f"{table.path}: {what} {name!r} holds {kind} values ({t}); it must hold "
            f"{expected}. Flatten the column, or name another one."
        )
        raise CLIError(msg)


def resolve_columns(
    table: Table,
    label_column: str,
    first: Any = None,
    *,
    columns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    group_by: str | None = None,
) -> Columns:
    """The label column and the class columns (or the one list column) of `table`.

    `columns` names the class columns (in class order); otherwise every numeric
    column but the label, `group_by` and those in `exclude` is one, in file
    order. One class column left means binary predictions: it holds P(label = 1).
    `first` is the table's first record batch (None for a file without rows):
    a text column that holds numbers there is a class column with a bad cell
    (see :func:`check_text_columns`).
    """
    pa = need("pyarrow")
    if label_column not in table.names:
        msg = (
            f"{table.path}: no label column {label_column!r}; the columns are "
            f"{', '.join(table.names)}. Name the label column with --label-column."
        )
        raise CLIError(msg)
    _named(table, exclude, "--exclude")
    _flat(table, label_column, "the label column", "a class name or index per row")
    if group_by is not None:
        _named(table, [group_by], "--group-by")
        _flat(table, group_by, "the --group-by column", "a number, text, a date or a boolean")
    if columns is not None:
        _named(table, columns, "--columns")
        chosen = [label_column, group_by, *exclude]
        wrong = [n for n in columns if n in chosen or not is_numeric(pa, table.types[n])]
        if wrong or len(set(columns)) != len(columns) or not columns:
            msg = (
                f"{table.path}: --columns must name distinct numeric columns other than the "
                f"label, --group-by and --exclude ones; got {', '.join(columns) or 'none'}"
                + (f" ({', '.join(wrong)} cannot be a class column)." if wrong else ".")
            )
            raise CLIError(msg)
        others = [n for n in table.names if n not in columns and n not in chosen]
        return Columns(label_column, list(columns), None, others)
    classes, lists, ignored = [], [], []
    for name in table.names:
        if name in (label_column, group_by) or name in exclude:
            continue
        t = table.types[name]
        if is_numeric(pa, t):
            classes.append(name)
        elif is_numeric_list(pa, t):
            lists.append(name)
        elif pa.types.is_decimal(t):  # a number, but not one crossent reads: never drop a class
            msg = (
                f"{table.path}: column {name!r} holds decimals ({t}), which are not read as "
                "predictions; store it as float64, or --exclude it if it is not a class."
            )
            raise CLIError(msg)
        elif pa.types.is_null(t):  # every cell empty so far: a class without values, or junk
            msg = (
                f"{table.path}: column {name!r} has no values (every cell read so far is "
                "empty), so it is neither a class nor an ignored column; fill it, or "
                "--exclude it if it is not a class."
            )
            raise CLIError(msg)
        else:
            ignored.append(name)
    if first is not None:
        try:
            check_text_columns(first, ignored)
        except RowError as exc:
            raise table.row_error(exc.row, exc.reason) from exc
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
    return Columns(label_column, classes, lists[0] if lists else None, ignored)


def first_null(column: Any) -> int:
    """Index of the first null of an Arrow array."""
    return int(np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False)))[0])


def batch_scores(batch: Any, columns: Columns) -> np.ndarray:
    """The (rows, classes) float64 score matrix of one record batch.

    Class columns are copied once, each into one column of a column-major
    matrix (the metrics reduce a few classes column by column).
    """
    pa = need("pyarrow")
    if columns.list_column is None:
        if not columns.classes:
            return np.zeros((0, 0))
        scores = np.empty((len(columns.classes), batch.num_rows)).T  # column-major
        for k, name in enumerate(columns.classes):
            col = batch.column(name)
            if col.null_count:
                raise RowError(first_null(col), f"has no value in column {name!r}")
            scores[:, k] = to_numpy(col)
        return scores
    col = batch.column(columns.list_column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise RowError(first_null(col), f"has no value in column {columns.list_column!r}")
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
        raise RowError(
            row, f"has {int(lengths[row])} predictions, but the rows before have {width}"
        )
    flat = col.flatten()
    if flat.null_count:
        row = int(np.searchsorted(np.cumsum(lengths), first_null(flat), side="right"))
        raise RowError(row, f"has a missing value in column {columns.list_column!r}")
    return flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), width)


def check_finite(scores: np.ndarray, kind: str, *, binary: bool = False) -> None:
    """A file must not hold NaN or +inf (logits and log-probabilities may hold −inf).

    One `binary` column holds P(label = 1), or its logit or log: a logit of ±inf
    (P = 1 or 0) and a log of −inf (P = 0) are predictions like any other.
    """
    if np.isfinite(scores.sum(axis=1)).all():  # one pass: no NaN, no inf in any row
        return
    bad_nan = np.asarray(np.isnan(scores).any(axis=1))
    none = np.zeros(len(scores), dtype=np.bool_)
    bad_inf = none if binary and kind == "logits" else np.asarray(np.isposinf(scores).any(axis=1))
    bad_all = np.asarray(np.isneginf(scores).all(axis=1))
    if kind == "probs" or binary:  # (a probability of -inf is outside [0, 1]: said there)
        bad_all = none
    bad = np.flatnonzero(bad_nan | bad_inf | bad_all)
    if bad.size:
        row = int(bad[0])
        what = "NaN" if bad_nan[row] else ("+inf" if bad_inf[row] else "only -inf")
        raise RowError(row, f"holds {what}")


def check_text_columns(batch: Any, names: list[str]) -> None:
    """A text column whose cells are mostly numbers is a class column with a bad cell.

    A single non-numeric cell makes the CSV and JSON readers type a whole
    column as text, which would drop the class silently; raise a
    :class:`RowError` naming the first such cell instead. A column that is
    mostly text (ids, notes) stays an ignored column.
    """
    pa = need("pyarrow")
    for name in names:
        column = batch.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        pc = need("pyarrow.compute")  # only here: its import costs 0.04 s
        numeric = pc.match_substring_regex(column, _NUMBER, ignore_case=True)
        blank = pc.equal(pc.utf8_trim_whitespace(column), "")
        filled = int(pc.sum(pc.invert(blank)).as_py() or 0)  # nulls are neither
        numbers = int(pc.sum(numeric).as_py() or 0)
        if numbers == 0 or 2 * numbers < filled:
            continue
        text = pc.and_(pc.invert(numeric), pc.invert(blank)).fill_null(False)
        rows = np.flatnonzero(text.to_numpy(zero_copy_only=False))
        if rows.size == 0:  # every cell a number written as text (JSON "0.7"): say so
            row = int(np.flatnonzero(numeric.fill_null(False).to_numpy(zero_copy_only=False))[0])
            reason = (
                f"has {column[row].as_py()!r} in column {name!r}: numbers written as text "
                "(quoted in JSON); write them as numbers, or --exclude the column if it is "
                "not a class"
            )
            raise RowError(row, reason)
        row = int(rows[0])
        reason = (
            f"has {column[row].as_py()!r} in column {name!r}, which is not a number, while "
            f"{numbers} of the column's {filled} cells in this block are: fix the cell (an "
            "empty cell is a missing value), or drop the column if it is not a class"
        )
        raise RowError(row, reason)
