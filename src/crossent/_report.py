"""Self-contained HTML report: reliability diagram, confidence histogram, per-class table.

:func:`write_report` writes ``index.html`` and the figures as PNG files into a
folder. The HTML embeds every PNG as a base64 ``data:`` URI, so the one file
can be mailed or archived on its own, and each figure's caption links the PNG
file beside it (``<a href="reliability.png">``) for reuse in slides and papers.
matplotlib is imported here only, with the non-interactive Agg canvas (no
pyplot, no global state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BINARY_FIGURES", "FIGURES", "summarize", "write_report"]

#: file name -> caption of every figure the report writes
FIGURES = {
    "reliability.png": "Reliability diagram (top-label confidence, equal-width bins)",
    "confidence.png": "Histogram of top-label confidence",
    "per_class.png": "Cross-entropy per true class (bits)",
    "groups.png": "Log loss per group, in the groups' order (bits)",
}

#: the captions that differ for binary predictions (the figures bin P(label = 1))
BINARY_FIGURES = {
    "reliability.png": "Reliability diagram (P(label = 1), equal-width bins)",
    "confidence.png": "Histogram of P(label = 1)",
}


def summarize(
    metric: Any,
    *,
    classes: list[str],
    input_kind: str,
    bins: int,
    base: str = "e",
    file: str | None = None,
    format: str | None = None,
    ignored_columns: list[str] | None = None,
) -> dict[str, Any]:
    """The figures of a :class:`~crossent.metrics.ClassificationMetrics` as one flat dict.

    This is the JSON ``crossent eval`` prints and the input of :func:`write_report`:
    plain numbers, the log loss in nats, in bits and in `base` (``"e"``, ``"2"``
    or ``"10"``), and ``per_class`` entries named by `classes`.
    """
    result = metric.compute()
    per_class = []
    for entry, name in zip(result.pop("per_class"), classes, strict=True):
        nats = entry["cross_entropy"]
        per_class.append(
            {
                "class": name,
                "index": entry["index"],
                "count": entry["count"],
                "cross_entropy_nats": nats,
                "cross_entropy_bits": nats / math.log(2),
                "recall": entry["recall"],
                "precision": entry["precision"],
            }
        )
    result.pop("classes")
    result.pop("log_loss")
    divisor = {"e": 1.0, "2": math.log(2), "10": math.log(10)}[base]
    summary: dict[str, Any] = {
        "file": file,
        "format": format,
        "input": input_kind,
        "bins": bins,
        "classes": list(classes),
        "ignored_columns": list(ignored_columns or []),
    }
    for key, value in result.items():
        summary[key] = value
        if key == "log_loss_bits":
            summary["base"] = base
            summary["log_loss"] = result["log_loss_nats"] / divisor
    summary["per_class"] = per_class
    return summary


def _figure(width: float = 5.2, height: float = 4.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the metrics extra
        msg = "the HTML report needs matplotlib; install it with pip install 'crossent[metrics]'."
        raise ImportError(msg) from exc
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _reliability_png(reliability: dict[str, np.ndarray], summary: dict[str, Any]) -> bytes:
    count = reliability["count"]
    bins = len(count)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    seen = count > 0
    acc = np.where(seen, reliability["accuracy"], 0.0)
    conf = np.where(seen, reliability["confidence"], 0.0)
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar(
        centers[seen],
        acc[seen],
        width=1 / bins,
        color="#4C72B0",
        edgecolor="white",
        label="accuracy in bin",
    )
    gap_bottom = np.minimum(acc, conf)[seen]
    ax.bar(
        centers[seen],
        np.abs(conf - acc)[seen],
        bottom=gap_bottom,
        width=1 / bins,
        color="#DD8452",
        alpha=0.55,
        edgecolor="#C44E52",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot(
        [0, 1], [0, 1], linestyle="--", color="#333333", linewidth=1, label="perfect calibration"
    )
    mean_name = "bin mean P(label = 1)" if summary.get("binary") else "bin mean confidence"
    ax.plot(conf[seen], acc[seen], "o", color="#1f1f1f", markersize=3, label=mean_name)
    for x, n in zip(centers[seen], count[seen], strict=True):
        ax.annotate(
            f"{n:,}",
            (x, 0.015),
            ha="center",
            va="bottom",
            fontsize=6,
            color="#222222",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "lw": 0},
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if summary.get("binary"):
        ax.set_xlabel("P(label = 1); boxed: predictions per bin")
        ax.set_ylabel("fraction of label 1")
    else:
        ax.set_xlabel("confidence (top-label probability); boxed: predictions per bin")
        ax.set_ylabel("accuracy")
    ece = summary.get("ece")
    ax.set_title(
        f"Reliability diagram, ECE = {ece:.4f}" if isinstance(ece, float) else "Reliability diagram"
    )
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    return _png(fig)


def _confidence_png(reliability: dict[str, np.ndarray], summary: dict[str, Any]) -> bytes:
    count = reliability["count"].astype(np.float64)
    bins = len(count)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = count.sum()
    share = count / total if total else count
    fig = _figure(height=3.4)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], share, width=1 / bins, align="edge", color="#55A868", edgecolor="white")
    seen = count > 0
    mean_conf = (
        float(np.sum(reliability["confidence"][seen] * count[seen]) / total) if total else math.nan
    )
    binary = bool(summary.get("binary"))
    # binary: P(label = 1) against the share of label 1; otherwise confidence against accuracy
    mean_name, observed_name = ("mean P(label = 1)", "positive rate") if binary else (
        "mean confidence", "accuracy")  # fmt: skip
    observed = summary.get("positive_rate" if binary else "accuracy")
    ax.axvline(mean_conf, color="#C44E52", linestyle="--", label=f"{mean_name} {mean_conf:.3f}")
    if isinstance(observed, float) and math.isfinite(observed):
        label = f"{observed_name} {observed:.3f}"
        ax.axvline(observed, color="#333333", linestyle=":", label=label)
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(label = 1)" if binary else "confidence (top-label probability)")
    ax.set_ylabel("share of predictions")
    ax.set_title("Histogram of P(label = 1)" if binary else "Confidence histogram")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.25, axis="y")
    return _png(fig)


def _per_class_png(summary: dict[str, Any]) -> bytes:
    rows = summary["per_class"]
    names = [str(r["class"]) for r in rows]
    bits = np.array([r["cross_entropy_bits"] for r in rows], dtype=np.float64)
    fig = _figure(width=max(5.2, 0.35 * len(rows) + 1.5), height=3.4)
    ax = fig.add_subplot()
    finite = np.where(np.isfinite(bits), bits, 0.0)
    ax.bar(range(len(rows)), finite, color="#8172B2")
    mean_bits = summary.get("log_loss_bits")
    if isinstance(mean_bits, float) and math.isfinite(mean_bits):
        ax.axhline(
            mean_bits,
            color="#333333",
            linestyle="--",
            linewidth=1,
            label=f"overall {mean_bits:.3f} bits",
        )
        ax.legend(fontsize=8, frameon=False)
    ax.set_xticks(range(len(rows)), names, rotation=45 if len(rows) > 12 else 0, fontsize=8)
    ax.set_xlabel("true class")
    ax.set_ylabel("cross-entropy (bits)")
    ax.set_title("Cross-entropy per true class")
    ax.grid(alpha=0.25, axis="y")
    return _png(fig)


def _groups_png(summary: dict[str, Any]) -> bytes:
    """Log loss (bits) of each group against the groups' order (days, versions)."""
    groups = summary["groups"]
    names = [str(g["group"]) for g in groups]
    bits = np.array([g["log_loss_bits"] for g in groups], dtype=np.float64)
    fig = _figure(width=max(5.2, 0.3 * len(groups) + 2.0), height=3.4)
    ax = fig.add_subplot()
    ax.plot(range(len(groups)), bits, "o-", color="#4C72B0", markersize=4)
    overall = summary.get("log_loss_bits")
    if isinstance(overall, float) and math.isfinite(overall):
        ax.axhline(
            overall, color="#333333", linestyle="--", linewidth=1, label=f"all rows {overall:.3f}"
        )
        ax.legend(fontsize=8, frameon=False)
    step = max(1, len(groups) // 20)  # at most ~20 tick labels
    ticks = list(range(0, len(groups), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel(str(summary["group_by"]))
    ax.set_ylabel("log loss (bits)")
    ax.set_title(f"Log loss per {summary['group_by']}")
    ax.grid(alpha=0.25)
    return _png(fig)


def _groups_table(summary: dict[str, Any]) -> str:
    """The HTML section with one row per group."""
    if "groups" not in summary:
        return ""
    rows = "\n".join(
        "<tr>"
        f"<td>{html.escape(str(g['group']))}</td><td>{_cell(g['rows'])}</td>"
        f"<td>{_cell(g['log_loss_nats'])}</td><td>{_cell(g['log_loss_bits'])}</td>"
        f"<td>{_cell(g['accuracy'])}</td><td>{_cell(g['brier'])}</td><td>{_cell(g['ece'])}</td>"
        "</tr>"
        for g in summary["groups"]
    )
    name = html.escape(str(summary["group_by"]))
    return (
        f"<h2>By {name}</h2>\n<table>\n<tr><th>{name}</th><th>rows</th><th>log loss (nats)</th>"
        "<th>log loss (bits)</th><th>accuracy</th><th>Brier score</th><th>ECE</th></tr>\n"
        f"{rows}\n</table>"
    )


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.92em; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def write_report(
    directory: Path, *, summary: dict[str, Any], reliability: dict[str, np.ndarray], title: str
) -> Path:
    """Write ``index.html`` and its PNG figures into `directory`; returns the HTML path.

    `summary` is the dict ``crossent eval`` prints as JSON (with ``per_class``
    entries naming their ``class``); `reliability` is the top-label
    per-bin ``count``, ``confidence`` and ``accuracy``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    images = {
        "reliability.png": _reliability_png(reliability, summary),
        "confidence.png": _confidence_png(reliability, summary),
        "per_class.png": _per_class_png(summary),
    }
    if summary.get("groups") and summary.get("groups_ordered"):
        images["groups.png"] = _groups_png(summary)
    for name, data in images.items():
        (directory / name).write_bytes(data)

    captions = FIGURES | (BINARY_FIGURES if summary.get("binary") else {})
    figures = "\n".join(
        f'<figure><img alt="{html.escape(captions[name])}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
        f"<figcaption>{html.escape(captions[name])} &middot; PNG file: "
        f'<a href="{name}">{name}</a></figcaption></figure>'
        for name, data in images.items()
    )
    summary_rows = [
        ("rows", summary.get("rows")),
        ("classes", len(summary.get("classes", []))),
        ("input", summary.get("input")),
        ("log loss (nats)", summary.get("log_loss_nats")),
        ("log loss (bits)", summary.get("log_loss_bits")),
        ("perplexity", summary.get("perplexity")),
        ("accuracy", summary.get("accuracy")),
        ("Brier score", summary.get("brier")),
        (f"ECE ({summary.get('bins')} equal-width bins)", summary.get("ece")),
        ("ECE (equal-mass bins)", summary.get("ece_equal_mass")),
        ("MCE", summary.get("mce")),
        ("classwise ECE", summary.get("classwise_ece")),
        ("ECE of the positive class", summary.get("ece_positive")),
        ("positive rate", summary.get("positive_rate")),
        ("mean P(label = 1)", summary.get("mean_prediction")),
        ("rows with log p clamped at -100", summary.get("clamped_rows")),
    ]
    overview = "\n".join(
        f"<tr><td>{html.escape(label)}</td><td>{_cell(value)}</td></tr>"
        for label, value in summary_rows
        if value is not None
    )
    per_class = "\n".join(
        "<tr>"
        f"<td>{html.escape(str(r['class']))}</td><td>{_cell(r['count'])}</td>"
        f"<td>{_cell(r['cross_entropy_nats'])}</td><td>{_cell(r['cross_entropy_bits'])}</td>"
        f"<td>{_cell(r['recall'])}</td><td>{_cell(r['precision'])}</td>"
        "</tr>"
        for r in summary["per_class"]
    )
    document = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">{html.escape(str(summary.get("file", "")))}</p>
<h2>Summary</h2>
<table>
{overview}
</table>
<h2>Calibration</h2>
{figures}
<h2>Per class</h2>
<table>
<tr><th>class</th><th>rows</th><th>cross-entropy (nats)</th><th>cross-entropy (bits)</th>
<th>recall</th><th>precision</th></tr>
{per_class}
</table>
{_groups_table(summary)}
<p class="note">Made by crossent. The images are embedded in this file; the PNG files
beside it hold the same figures.</p>
</body>
</html>
"""
    path = directory / "index.html"
    path.write_text(document, encoding="utf-8")
    return path
