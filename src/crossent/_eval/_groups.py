"""Every figure per value of a group column (a model version, a day, a segment) and overall.

:class:`GroupedMetrics` holds one metric over every row and one per group
value, all made by the same factory, so it streams, merges (one partition's
groups with another's) and pickles like a single metric. Groups are listed in
their natural order: numbers and dates by value, strings that are all dates
or versions (``v1.2``, ``2024-05-01``) in version order, other strings
alphabetically; the first kinds are *ordered* (a plot of log loss against the
group makes sense), the last is not.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np

from crossent._eval._errors import CLIError
from crossent._eval._table import to_numpy

__all__ = ["MAX_GROUPS", "GroupedMetrics", "group_keys", "group_name", "order_groups"]

#: the most groups of one ``--group-by``: each holds a whole metric (its calibration
#: histograms: about 0.5 MB over a few classes), so a column of row ids filled the memory
MAX_GROUPS = 2000

_VERSION = re.compile(r"^[vV]?\d+([._-]\d+)*$")
#: a number written with a fraction of zeros or an exponent: ``7.0``, ``-3.00``, ``1e2``
_INTEGRAL_TEXT = re.compile(r"^[+-]?\d+(\.0*)?([eE][+-]?\d{1,3})?$")
_DATE = re.compile(r"^\d{4}-\d{2}(-\d{2})?([ T].*)?$")


class GroupedMetrics:
    """One metric over all rows and one per group value.

    Parameters
    ----------
    make : callable
        Returns a new, empty metric (a picklable ``functools.partial`` when
        the object travels to Dask workers).
    column : str, optional
        The group column, when rows come with group keys; at most
        ``MAX_GROUPS`` of its values make groups (a ``CLIError`` beyond).
    """

    def __init__(self, make: Callable[[], Any], *, column: str | None = None) -> None:
        self.make = make
        self.column = column
        self.grouped = column is not None
        self.overall = make()
        self.groups: dict[str, Any] = {}  # group name (:func:`group_name`) -> metric
        self.values: dict[str, Any] = {}  # group name -> the first value read of that group
        self.warnings: list[str] = []  # about the files read (they travel from Dask workers)

    def update(
        self, scores: np.ndarray, target: np.ndarray, keys: tuple[np.ndarray, list[Any]] | None
    ) -> None:
        """Add a batch; when grouped, `keys` is (each row's code, the value of each code).

        The overall metric sees the whole batch first, so a bad row is reported
        with its index in the batch; the groups then get their rows without a
        second round of value checks.
        """
        self.overall.update(scores, target)
        if not self.grouped or keys is None or len(target) == 0:
            return
        import crossent as ce

        codes, values = keys
        order = np.argsort(codes, kind="stable")
        ends = np.cumsum(np.bincount(codes, minlength=len(values)))
        start = 0
        with ce.validation(False):  # the overall update checked these rows
            for value, end in zip(values, ends.tolist(), strict=True):
                rows = order[start:end]
                start = end
                if rows.size == 0:
                    continue
                key = group_name(value)
                metric = self.groups.get(key)
                if metric is None:
                    self._check_room(1)
                    metric = self.groups[key] = self.make()
                    self.values[key] = value
                metric.update(scores[rows], target[rows])

    def merge(self, other: GroupedMetrics) -> GroupedMetrics:
        """Add `other`'s rows (overall and per group) to this one; returns ``self``."""
        self._check_room(len(other.groups.keys() - self.groups.keys()))
        self.overall.merge(other.overall)
        self.warnings += other.warnings
        for key, metric in other.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = metric
                self.values[key] = other.values[key]
            else:
                mine.merge(metric)
        return self

    def _check_room(self, more: int) -> None:
        """A CLIError when `more` new groups would make more than ``MAX_GROUPS``."""
        if len(self.groups) + more > MAX_GROUPS:
            msg = (
                f"the --group-by column {self.column!r} has more than {MAX_GROUPS} distinct "
                "values; each group keeps every figure's state in memory, so group by a "
                "coarser column (a model, a day, a segment), not an id."
            )
            raise CLIError(msg)

    @property
    def count(self) -> int:
        """Rows added so far."""
        return int(self.overall.count)

    def ordered(self) -> tuple[list[tuple[Any, str]], bool]:
        """(value shown, group name) of every group in natural order, and whether that
        order means something (:func:`order_groups`).

        Values of one kind (numbers, days and times, booleans) keep their type and
        order; mixed kinds (a file's ``7`` read as text, another's as a number) are
        shown and ordered by their names.
        """
        kinds = {_kind(v) for v in self.values.values()}
        if len(kinds) == 1 and kinds != {"text"}:
            by_value = {id(v): k for k, v in self.values.items()}
            values, ordered = order_groups(list(self.values.values()))
            return [(v, by_value[id(v)]) for v in values], ordered
        names, ordered = order_groups(list(self.groups))
        return [(name, name) for name in names], ordered


def _kind(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | float | np.integer | np.floating):
        return "number"
    if isinstance(value, _dt.date | _dt.datetime | _dt.time | _dt.timedelta):
        return "time"
    return "text"


def group_name(value: Any) -> str:
    """The group a value belongs to, as text, whatever type its file gave it.

    A value is named as a CSV cell would write it (``7`` for 7 and 7.0, ``2024-05-01``,
    ``2024-05-01 10:00:00``, ``true``), so that files that typed one column apart
    (a Parquet integer, a CSV cell read as text, a JSON float) put the same value
    in the same group.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, _dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, str):
        text = value.strip()
        return _integral_text(text) if ("." in text or "e" in text.lower()) else text
    return str(value)


def _integral_text(text: str) -> str:
    """``7`` for a cell that writes an integral number with a fraction or an exponent.

    ``7.0``, ``7.00``, ``-3.0`` and ``1e2`` (a float column written by pandas or a
    spreadsheet) are the integers a Parquet or JSON file holds as 7, -3 and 100, so
    they are one group. Other decimals stay as written (``1.10`` is a version, not
    ``1.1``); integers too (``07`` is an id).
    """
    if not _INTEGRAL_TEXT.match(text):
        return text
    number = Decimal(text)
    if number != number.to_integral_value():
        return text
    return str(int(number))


def group_keys(column: Any, *, name: str) -> tuple[np.ndarray, list[Any]]:
    """Each row's group code and the group value of each code, from an Arrow column.

    Hash-based (Arrow's ``dictionary_encode``): only the distinct values become
    Python objects. Raises ``ValueError`` (with the first such row in
    ``args[1]``) when a row has no group value, null or NaN: a row that belongs
    to no group is a bad input, not something to drop silently (NaN, equal to
    nothing, made a group of its own in every batch).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    nan = pc.is_nan(column).fill_null(False) if pa.types.is_floating(column.type) else None
    if column.null_count or (nan is not None and pc.any(nan).as_py()):
        missing = column.is_null() if nan is None else pc.or_(column.is_null(), nan)
        row = int(np.flatnonzero(np.asarray(missing))[0])
        what = "NaN" if column[row].is_valid else "no value"
        msg = f"has {what} in the --group-by column {name!r}"
        raise ValueError(msg, row)
    encoded = pc.dictionary_encode(column)
    codes = to_numpy(encoded.indices).astype(np.int64, copy=False)
    return codes, encoded.dictionary.to_pylist()


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.split(r"[._-]", text.lstrip("vV")))


def order_groups(keys: list[Any]) -> tuple[list[Any], bool]:
    """`keys` in natural order, and whether that order means something (days, versions)."""
    if not keys:
        return [], False
    if all(isinstance(k, bool | np.bool_) for k in keys):
        return sorted(keys), False
    if all(isinstance(k, int | float | np.integer | np.floating) for k in keys):
        return sorted(keys), True
    if all(isinstance(k, _dt.date | _dt.datetime | _dt.time | _dt.timedelta) for k in keys):
        try:
            return sorted(keys), True
        except TypeError:  # days beside timestamps (files typed apart), naive beside aware
            pass  # their ISO text sorts in time order
    text = [str(k) for k in keys]
    if all(_DATE.match(t) for t in text):
        return _sorted_by(text, keys), True
    if all(_VERSION.match(t) for t in text):
        return _sorted_by(list(map(_version_key, text)), keys), True
    return _sorted_by(text, keys), False


def _sorted_by(order: list[Any], keys: list[Any]) -> list[Any]:
    """`keys` sorted by `order` alone (equal orders never compare the keys: 1 and "1")."""
    return [keys[i] for i in sorted(range(len(keys)), key=order.__getitem__)]


def jsonable_key(key: Any) -> Any:
    """A group value as JSON shows it: ints and floats as numbers, dates in ISO form."""
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, _dt.date | _dt.datetime | _dt.time):
        return key.isoformat()
    if isinstance(key, _dt.timedelta):
        return str(key)
    return key
