"""``crossent eval``'s output: the summary as JSON-ready values or as a text table."""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["format_text", "jsonable", "to_json"]

#: a JSON string (kept as it is) or the token Python writes for +-inf
_INFINITY = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity')


def _finite(value: Any) -> Any:
    """NaN (a figure not defined: 0 / 0) becomes null; +-inf stays."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with NaN as None (an undefined figure), at every depth; inf stays."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return _finite(value)

    out: dict[str, Any] = clean(summary)
    return out


def to_json(summary: dict[str, Any]) -> str:
    """The summary as standard JSON: +-inf as the numbers ``1e999`` / ``-1e999``, NaN as null.

    JSON has no infinity; ``1e999`` is a number of its grammar beyond every float, which
    Python's ``json`` and JavaScript's ``JSON.parse`` read back as infinity (jq as the
    largest double). null stays what it means elsewhere: not defined (NaN, a 0 / 0 such as
    the precision of a class never predicted). Python's own ``Infinity`` token is not JSON.
    """
    text = json.dumps(jsonable(summary), indent=2, allow_nan=True)
    return _INFINITY.sub(lambda m: m[0] if m[0][0] == '"' else m[0][:-8] + "1e999", text)


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
    if summary.get("binary"):
        head = (
            f"{summary['file']}: {summary['rows']:,} rows, binary: column "
            f"{summary['score_column']!r} is P(label = 1), input {summary['input']}"
        )
    else:
        head = (
            f"{summary['file']}: {summary['rows']:,} rows, {len(classes)} classes ({shown}), "
            f"input {summary['input']}"
        )
    lines = [
        head,
        f"  log loss        {_fmt(summary['log_loss_nats'])} nats   "
        f"{_fmt(summary['log_loss_bits'])} bits"
        + (f"   {_fmt(summary['log_loss'])} {unit}" if unit == "bans" else ""),
        f"  perplexity      {_fmt(summary['perplexity'])}",
        f"  accuracy        {_fmt(summary['accuracy'])}",
        f"  Brier score     {_fmt(summary['brier'])}"
        + ("   (mean of (p - y)^2, as scikit-learn)" if summary.get("binary") else ""),
        f"  ECE             {_fmt(summary['ece'])}   ({summary['bins']} equal-width bins"
        + (" of P(label = 1)" if summary.get("binary") else "")
        + f"; equal-mass {_fmt(summary['ece_equal_mass'])}; MCE {_fmt(summary['mce'])})",
    ]
    if summary.get("binary"):
        lines.append(
            f"  positive rate   {_fmt(summary['positive_rate'])}   "
            f"mean P(label = 1) {_fmt(summary['mean_prediction'])}"
        )
    else:
        lines.append(f"  classwise ECE   {_fmt(summary['classwise_ece'])}")
    if summary.get("ece_positive") is not None:
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
    if "groups" in summary:
        lines.extend(_group_lines(summary, unit=unit, divisor=divisor))
    return "\n".join(lines)


def _group_lines(summary: dict[str, Any], *, unit: str, divisor: float) -> list[str]:
    """One line per group: rows, log loss, accuracy, Brier, ECE."""
    groups = summary["groups"]
    names = [str(g["group"]) for g in groups]
    width = max(5, len(summary["group_by"]), *(len(n) for n in names))
    lines = [
        "",
        f"  by {summary['group_by']} ({len(groups)} groups"
        + (", in order" if summary["groups_ordered"] else "")
        + ")",
        f"  {summary['group_by']:<{width}}  {'rows':>10}  {'log loss (' + unit + ')':>16}  "
        f"{'accuracy':>8}  {'Brier':>7}  {'ECE':>7}",
    ]
    for name, g in zip(names, groups, strict=True):
        lines.append(
            f"  {name:<{width}}  {g['rows']:>10,}  {_fmt(g['log_loss_nats'] / divisor):>16}  "
            f"{_fmt(g['accuracy']):>8}  {_fmt(g['brier']):>7}  {_fmt(g['ece']):>7}"
        )
    return lines
