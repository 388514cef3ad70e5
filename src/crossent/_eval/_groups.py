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
from typing import Any

import numpy as np

__all__ = ["GroupedMetrics", "group_keys", "order_groups"]

_VERSION = re.compile(r"^[vV]?\d+([._-]\d+)*$")
_DATE = re.compile(r"^\d{4}-\d{2}(-\d{2})?([ T].*)?$")


class GroupedMetrics:
    """One metric over all rows and one per group value.

    Parameters
    ----------
    make : callable
        Returns a new, empty metric (a picklable ``functools.partial`` when
        the object travels to Dask workers).
    grouped : bool
        Whether rows come with group keys.
    """

    def __init__(self, make: Callable[[], Any], *, grouped: bool) -> None:
        self.make = make
        self.grouped = grouped
        self.overall = make()
        self.groups: dict[Any, Any] = {}

    def update(self, scores: np.ndarray, target: np.ndarray, keys: np.ndarray | None) -> None:
        """Add a batch; `keys` (one group value per row, no nulls) when grouped.

        The overall metric sees the whole batch first, so a bad row is reported
        with its index in the batch; the groups then get their rows without a
        second round of value checks.
        """
        self.overall.update(scores, target)
        if not self.grouped or keys is None or len(target) == 0:
            return
        import crossent as ce

        uniques, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        ends = np.cumsum(np.bincount(inverse, minlength=len(uniques)))
        start = 0
        with ce.validation(False):  # the overall update checked these rows
            for key, end in zip(uniques.tolist(), ends.tolist(), strict=True):
                rows = order[start:end]
                start = end
                metric = self.groups.get(key)
                if metric is None:
                    metric = self.groups[key] = self.make()
                metric.update(scores[rows], target[rows])

    def merge(self, other: GroupedMetrics) -> GroupedMetrics:
        """Add `other`'s rows (overall and per group) to this one; returns ``self``."""
        self.overall.merge(other.overall)
        for key, metric in other.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = metric
            else:
                mine.merge(metric)
        return self

    @property
    def count(self) -> int:
        """Rows added so far."""
        return int(self.overall.count)


def group_keys(column: Any, *, name: str) -> np.ndarray:
    """The group value of each row of an Arrow column, as a NumPy array (no nulls).

    Raises ``ValueError`` (with the first null row in ``args[1]``) when a row
    has no group value: a row that belongs to no group is a bad input, not
    something to drop silently.
    """
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        mask = column.is_null().to_numpy(zero_copy_only=False)
        row = int(np.flatnonzero(mask)[0])
        msg = f"has no value in the --group-by column {name!r}"
        raise ValueError(msg, row)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object).astype(str)
    if pa.types.is_temporal(column.type):
        return np.asarray(column.to_pylist(), dtype=object)
    return column.to_numpy(zero_copy_only=False)


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
        return sorted(keys), True
    text = [str(k) for k in keys]
    if all(_DATE.match(t) for t in text):
        return [k for _, k in sorted(zip(text, keys, strict=True))], True
    if all(_VERSION.match(t) for t in text):
        return [k for _, k in sorted(zip(map(_version_key, text), keys, strict=True))], True
    return [k for _, k in sorted(zip(text, keys, strict=True))], False


def jsonable_key(key: Any) -> Any:
    """A group value as JSON shows it: ints and floats as numbers, dates in ISO form."""
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, _dt.date | _dt.datetime | _dt.time):
        return key.isoformat()
    if isinstance(key, _dt.timedelta):
        return str(key)
    return key
