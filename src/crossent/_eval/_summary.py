"""The summary of a scored table: every figure overall and, with ``--group-by``, per group.

This dict is what ``crossent eval --format json`` prints and what the HTML
report shows: the figures of :func:`crossent._report.summarize` for all
rows, plus, when grouped, ``group_by`` (the column), ``groups_ordered``
(whether the groups have a natural order: numbers, dates, versions) and
``groups``: one entry per group value, in that order, with the same figures.
"""

from __future__ import annotations

from typing import Any

from crossent._eval._groups import GroupedMetrics, jsonable_key
from crossent._eval._score import Plan

__all__ = ["summarize_state"]

#: summary fields that describe the input, not the rows: left out of each group's entry
_INPUT_FIELDS = ("file", "format", "input", "bins", "classes", "ignored_columns", "base")


def _class_names(plan: Plan) -> list[str]:
    return ["0", "1"] if plan.binary else list(plan.columns.classes)


def summarize_state(
    state: GroupedMetrics, plan: Plan, *, file: str | None, format: str | None
) -> dict[str, Any]:
    """The JSON-ready summary of `state` (overall figures, then the groups)."""
    from crossent._report import summarize

    def figures(metric: Any, **where: Any) -> dict[str, Any]:
        return summarize(
            metric,
            classes=_class_names(plan),
            input_kind=plan.input_kind,
            bins=plan.bins,
            base=plan.base,
            ignored_columns=plan.columns.ignored,
            **where,
        )

    summary = figures(state.overall, file=file, format=format)
    if plan.binary:
        summary["binary"] = True
        summary["score_column"] = plan.columns.classes[0]
    if plan.group_by is not None:
        groups, ordered = state.ordered()
        summary["group_by"] = plan.group_by
        summary["groups_ordered"] = ordered
        summary["groups"] = [
            {
                "group": jsonable_key(value),
                **{k: v for k, v in figures(state.groups[key]).items() if k not in _INPUT_FIELDS},
            }
            for value, key in groups
        ]
    return summary
