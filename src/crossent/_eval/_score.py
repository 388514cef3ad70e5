"""Score record batches into metric states: shared by the local and the Dask engines.

A :class:`Plan` says how to read a table's batches (the label and class
columns, binary or multiclass, what the scores hold, the group column) and
makes the empty metric; :func:`score_batch` adds one Arrow record batch to a
:class:`~crossent._eval._groups.GroupedMetrics`, straight from the Arrow
buffers (one float64 copy of the class columns, integer labels never go
through text); :func:`score_table` streams a whole table and turns a bad row
into a :class:`~crossent._eval._errors.CLIError` that names the file and the row.
Plans pickle, so the Dask engine ships them to its workers.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossent._eval._columns import Columns, batch_scores, check_finite, first_null
from crossent._eval._errors import RowError, too_many_bins
from crossent._eval._groups import GroupedMetrics, group_keys
from crossent._eval._labels import batch_labels
from crossent._eval._table import Batch, Table, need, to_numpy

__all__ = [
    "Plan",
    "Selection",
    "base_name",
    "binary_labels",
    "input_hint",
    "score_batch",
    "score_table",
]

#: the units of a summary's ``log_loss``, and the numbers that name them
_BASES = {"e": math.e, "2": 2.0, "10": 10.0}
#: how labels are read (``crossent eval --labels``)
LABEL_MODES = ("auto", "index", "name")
_TRUE = ("1", "1.0", "true", "t", "yes")
_FALSE = ("0", "0.0", "false", "f", "no")


@dataclass(frozen=True)
class Selection:
    """The columns asked for: the label, the class columns (or those to exclude), the group."""

    label_column: str = "label"
    columns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    group_by: str | None = None


@dataclass
class Plan:
    """How to score a table: its columns, what the scores hold, the metric's settings."""

    columns: Columns
    input_kind: str
    labels: str = "auto"
    bins: int = 15
    base: str = "e"  # of the summary's `log_loss`: "e", "2" or "10"
    selection: Selection = Selection()

    def __post_init__(self) -> None:
        self.base = self.check(base=self.base, labels=self.labels, bins=self.bins)

    @staticmethod
    def check(*, base: object, labels: object, bins: object) -> str:
        """The unit name of `base` (``base_name``); a ValueError for a bad `labels`, or
        for too many `bins` (``too_many_bins``; the metrics check the rest of `bins`)."""
        too_many = too_many_bins(bins, "`bins`") if isinstance(bins, int) else None
        if too_many is not None:
            raise ValueError(too_many)
        if labels not in LABEL_MODES:
            modes = ", ".join(repr(m) for m in LABEL_MODES)
            msg = f"`labels` must be one of {modes}; got {labels!r}."
            raise ValueError(msg)
        return base_name(base)

    @property
    def group_by(self) -> str | None:
        """The group column, if any."""
        return self.selection.group_by

    @property
    def binary(self) -> bool:
        """One class column: it holds P(label = 1)."""
        return self.columns.list_column is None and len(self.columns.classes) == 1

    def make_metric(self) -> Any:
        """A new, empty metric for this plan."""
        from crossent.metrics import BinaryClassificationMetrics, ClassificationMetrics

        kind = BinaryClassificationMetrics if self.binary else ClassificationMetrics
        return kind(input_kind=self.input_kind, bins=self.bins)

    def new_state(self) -> GroupedMetrics:
        """An empty (grouped when `group_by` is set) state."""
        return GroupedMetrics(functools.partial(_make, self), column=self.group_by)


def base_name(base: object) -> str:
    """The unit of a summary's ``log_loss``, ``"e"``, ``"2"`` or ``"10"``, from that name or
    from the number (2, 10, ``math.e``); a ValueError for anything else."""
    if isinstance(base, str) and base in _BASES:
        return base
    if isinstance(base, numbers.Real) and not isinstance(base, bool):
        for name, number in _BASES.items():
            if float(base) == number:
                return name
    names = ", ".join(repr(name) for name in _BASES)
    msg = f"`base` must be one of {names} (or the number 2, 10 or math.e); got {base!r}."
    raise ValueError(msg)


def _make(plan: Plan) -> Any:  # module level, so GroupedMetrics pickles
    return plan.make_metric()


def binary_labels(column: Any, *, name: str) -> np.ndarray:
    """0/1 labels of one Arrow column holding 0/1, 0.0/1.0 or true/false (any case)."""
    pa = need("pyarrow")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise RowError(first_null(column), f"has no label (column {name!r} is empty)")
    t = column.type
    if pa.types.is_boolean(t):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        values = to_numpy(column)
        bad = np.flatnonzero((values != 0) & (values != 1))
        if bad.size:
            row = int(bad[0])
            raise RowError(row, f"has label {values[row].item()!r}, not 0 or 1 (a binary label)")
        return values.astype(np.int64, copy=False)
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
    # text: map the few distinct values, not every row
    encoded = need("pyarrow.compute").dictionary_encode(column)
    words = [str(w).strip().lower() for w in encoded.dictionary.to_pylist()]
    mapping = np.array([1 if w in _TRUE else 0 if w in _FALSE else -1 for w in words])
    codes = to_numpy(encoded.indices)
    labels = mapping[codes] if len(mapping) else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero(labels < 0)
    if bad.size:
        row = int(bad[0])
        shown = encoded.dictionary[int(codes[row])].as_py()
        raise RowError(row, f"has label {shown!r}, not 0/1 or true/false (a binary label)")
    return labels.astype(np.int64, copy=False)


def score_batch(state: GroupedMetrics, data: Any, plan: Plan) -> None:
    """Add one Arrow record batch to `state` (raises RowError / BadRowError for bad rows)."""
    columns = plan.columns
    scores = batch_scores(data, columns)
    if columns.list_column is not None and not columns.classes:
        columns.classes = [str(k) for k in range(scores.shape[1])]
    elif scores.shape[1] != len(columns.classes):
        raise RowError(0, f"has {scores.shape[1]} predictions, not {len(columns.classes)}")
    if columns.list_column is not None and scores.shape[1] < 2:
        raise RowError(0, "has fewer than two class predictions")
    if plan.binary:
        target = binary_labels(data.column(columns.label), name=columns.label)
    else:
        target = batch_labels(data, columns, mode=plan.labels)
    check_finite(scores, plan.input_kind, binary=plan.binary)
    keys = None
    if plan.group_by is not None:
        try:
            keys = group_keys(data.column(plan.group_by), name=plan.group_by)
        except ValueError as exc:
            raise RowError(int(exc.args[1]), str(exc.args[0])) from exc
    state.update(scores[:, 0] if plan.binary else scores, target, keys)


def input_hint(kind: str) -> str:
    """What to pass when the class columns hold something other than `kind`."""
    others = {
        "probs": "--input logits or --input log_probs",
        "logits": "--input probs",
        "log_probs": "--input logits or --input probs",
    }
    return f"If the columns hold something else, pass {others[kind]}."


def score_table(
    state: GroupedMetrics, table: Table, batches: Iterable[Batch], plan: Plan, bar: Any = None
) -> int:
    """Add every batch of `table` to `state`; returns the number of rows.

    A bad row becomes a CLIError naming the file and the row (and its line).
    """
    import crossent as ce
    from crossent.metrics import BadRowError

    rows = 0
    with ce.validation(True):  # a file is always checked, whatever CROSSENT_VALIDATE says
        for batch in batches:
            try:
                score_batch(state, batch.data, plan)
            except RowError as exc:
                raise table.row_error(batch.start + exc.row, exc.reason) from exc
            except BadRowError as exc:
                hint = input_hint(plan.input_kind)
                raise table.row_error(batch.start + exc.row, exc.reason, hint) from exc
            rows += batch.data.num_rows
            if bar is not None:
                bar.update(batch.data.num_rows)
    state.warnings += table.warnings
    return rows
