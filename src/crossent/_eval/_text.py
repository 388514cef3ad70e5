"""``crossent eval``'s output: the summary as JSON-ready values or as a text table."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_text", "jsonable"]


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with inf and NaN as None (JSON has neither)."""
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
