"""Stream a predictions file through :class:`crossent.metrics.ClassificationMetrics`."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

from crossent._eval._columns import (
    Columns,
    batch_scores,
    check_finite,
    resolve_columns,
)
from crossent._eval._errors import CLIError, RowError
from crossent._eval._labels import batch_labels
from crossent._eval._open import open_table, read_batches
from crossent._eval._table import Table

__all__ = ["evaluate"]


def _input_hint(kind: str) -> str:
    others = {
        "probs": "--input logits or --input log_probs",
        "logits": "--input probs",
        "log_probs": "--input logits or --input probs",
    }
    return f"If the columns hold something else, pass {others[kind]}."


def _progress_bar(total: int | None, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the metrics extra
        return None
    return tqdm(total=total, unit=" rows", unit_scale=True, delay=1.0, file=sys.stderr, leave=False)


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
    batches = read_batches(table)
    first = next(batches, None)
    columns = resolve_columns(table, label_column, None if first is None else first.data)
    metric = ClassificationMetrics(input_kind=input_kind, bins=bins)
    rows = 0
    bar = _progress_bar(table.total_rows, enabled=progress)
    try:
        with ce.validation(True):  # a file is always checked, whatever CROSSENT_VALIDATE says
            for batch in itertools.chain([] if first is None else [first], batches):
                try:
                    scores = batch_scores(batch.data, columns)
                    if columns.list_column is not None and not columns.classes:
                        columns.classes = [str(k) for k in range(scores.shape[1])]
                    elif scores.shape[1] != len(columns.classes):
                        raise RowError(
                            0, f"has {scores.shape[1]} predictions, not {len(columns.classes)}"
                        )
                    if scores.shape[1] < 2:
                        raise RowError(0, "has fewer than two class predictions")
                    target = batch_labels(batch.data, columns, mode=labels)
                    check_finite(scores, input_kind)
                    metric.update(scores, target)
                except RowError as exc:
                    raise table.row_error(batch.start + exc.row, exc.reason) from exc
                except BadRowError as exc:
                    hint = _input_hint(input_kind)
                    raise table.row_error(batch.start + exc.row, exc.reason, hint) from exc
                rows += batch.data.num_rows
                if bar is not None:
                    bar.update(batch.data.num_rows)
    finally:
        if bar is not None:
            bar.close()
    if rows == 0:
        msg = f"{path}: has no rows."
        raise CLIError(msg)
    for warning in table.warnings:
        print(f"crossent eval: warning: {warning}", file=sys.stderr)
    summary = _summary(metric, table, columns, input_kind=input_kind, bins=bins, base=base)
    return summary, metric


def _summary(
    metric: Any, table: Table, columns: Columns, *, input_kind: str, bins: int, base: str
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
