"""Turn ``results.json`` (written by ``collect.py``) into the Performance page's tables and figures.

Called by the docs build (``docs/_ext/crossent_docs.py``); writes
``performance.md`` and one PNG per table that has ratio columns into the
output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _is_float(value: str) -> bool:
    try:
        float(value.rstrip("%x"))
    except ValueError:
        return False
    return True


def _key_columns(columns: list[str], rows: list[list[str]]) -> int:
    """How many leading columns name a case (text or integers) rather than measure it."""
    k = 0
    while k < len(columns) - 1 and all(
        not _is_float(r[k]) or r[k].lstrip("-").isdigit() for r in rows
    ):
        k += 1
    return max(k, 1)


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _figure(name: str, k: int, table: dict, path: Path) -> bool:
    columns: list[str] = table["columns"]
    rows: list[list[str]] = table["rows"]
    ratio = [c for c, col in enumerate(columns)
             if "ratio" in col.lower() or col.lower().startswith("crossent/")]  # fmt: skip
    if not ratio:
        return False
    nkey = _key_columns(columns, rows)
    labels = [
        ", ".join(f"{columns[c]}={r[c]}" if r[c].isdigit() else r[c] for c in range(nkey))
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(rows) * len(ratio) + 0.6))
    height = 0.8 / len(ratio)
    for i, c in enumerate(ratio):
        values = [float(r[c].rstrip("%x")) if _is_float(r[c]) else float("nan") for r in rows]
        where = [y + i * height for y in range(len(rows))]
        label = columns[c] if columns[c].lower() != "ratio" else _ratio_name(columns, c)
        ax.barh(where, values, height=height, label=label)
        for y, v in zip(where, values, strict=True):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (crossent / reference); below 1 is better for crossent")
    ax.set_title(table.get("title") or f"{name}: table {k + 1}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ratio_name(columns: list[str], c: int) -> str:
    """A bare "ratio" column is named after the measurement before it ("ms", "MiB", ...)."""
    before = columns[c - 1].split()[-1] if c > 0 else ""
    return f"{before} ratio".strip()


def render(results_path: Path, outdir: Path) -> None:
    results = json.loads(results_path.read_text())
    md: list[str] = []
    for name, entry in sorted(results["benchmarks"].items()):
        m = entry["machine"]
        md += [
            f"## `benchmarks/{name}.py`",
            "",
            f"Command: `{entry['command']}` (from the repository root), {entry['date']}.",
            "",
            (
                f"Machine: {m['description']}."
                if "description" in m
                else f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; "
                f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads)."
            ),
            "",
        ]
        for k, table in enumerate(entry["tables"]):
            png = f"perf_{name}_{k + 1}.png"
            if table.get("title"):
                md += [f"**{table['title']}**", ""]
            if _figure(name, k, table, outdir / png):
                md += [f"![{name}, table {k + 1}](/_generated/{png})", ""]
            md += [*_markdown_table(table["columns"], table["rows"]), ""]
        md += [
            "<details><summary>The script's full output</summary>",
            "",
            "```text",
            entry["output"].rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    text = "\n".join(md)
    target = outdir / "performance.md"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
