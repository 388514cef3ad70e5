"""Stream predictions files through the metrics: the local engine, or the Dask one.

:func:`evaluate` expands the FILE arguments (files, directories, globs, ``-``),
resolves the columns from the first file (every other file must have the
same ones), and scores every file into one
:class:`~crossent._eval._groups.GroupedMetrics`: batch after batch in this
process (``engine="local"``), or one state per file on Dask workers, merged
in a tree (``engine="dask"``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossent._eval._columns import resolve_columns
from crossent._eval._errors import CLIError
from crossent._eval._groups import GroupedMetrics
from crossent._eval._open import FORMATS, open_table, read_batches
from crossent._eval._score import Plan, score_table
from crossent._eval._sources import expand_sources, stdin_as_file
from crossent._eval._summary import summarize_state
from crossent._eval._table import Table

__all__ = ["evaluate", "score_file"]


def _progress_bar(total: int | None, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the metrics extra
        return None
    return tqdm(total=total, unit=" rows", unit_scale=True, delay=1.0, file=sys.stderr, leave=False)


def check_same_columns(table: Table, names: Sequence[str], first: Path) -> None:
    """Every file of one evaluation must have the columns of the first one."""
    if set(table.names) != set(names):
        extra = [n for n in table.names if n not in names]
        missing = [n for n in names if n not in table.names]
        detail = "; ".join(
            part
            for part in (
                f"it lacks {', '.join(missing)}" if missing else "",
                f"it also has {', '.join(extra)}" if extra else "",
            )
            if part
        )
        msg = (
            f"{table.path}: has other columns than {first} ({detail}); files scored together "
            "must have the same columns. Score them separately, or fix the files."
        )
        raise CLIError(msg)


def score_file(
    path: Path, plan: Plan, names: Sequence[str], first: Path, batch_size: int
) -> GroupedMetrics:
    """One file's state (a Dask task: it runs on a worker)."""
    table = open_table(path, batch_size=batch_size, label_column=plan.columns.label)
    check_same_columns(table, names, first)
    state = plan.new_state()
    score_table(state, table, read_batches(table), plan)
    return state


def evaluate(
    paths: Path | str | Sequence[Path | str],
    *,
    label_column: str = "label",
    input_kind: str = "probs",
    bins: int = 15,
    base: str = "e",
    labels: str = "auto",
    batch_size: int = 65536,
    progress: bool = False,
    columns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    group_by: str | None = None,
    engine: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """Score the predictions in `paths` as one table; returns (summary, overall metric)."""
    args = [str(paths)] if isinstance(paths, str | Path) else [str(p) for p in paths]
    sources = expand_sources(args, formats=tuple(FORMATS))
    with contextlib.ExitStack() as stack:
        if sources == ["-"]:
            if engine != "local":
                msg = "`-` (standard input) is read by the local engine only; drop --engine dask."
                raise CLIError(msg)
            sources = [stack.enter_context(stdin_as_file())]
        files = [Path(s) for s in sources]
        first = open_table(files[0], batch_size=batch_size, label_column=label_column)
        if args == ["-"]:
            first.path = Path("<stdin>")
        resolved = resolve_columns(
            first, label_column, columns=columns, exclude=exclude, group_by=group_by
        )
        plan = Plan(resolved, input_kind, labels, bins, base, group_by)
        if engine == "dask":
            state = _dask_state(files, plan, first, batch_size, scheduler, workers)
        else:
            state = _local_state(files, plan, first, batch_size, progress)
    if state.count == 0:
        msg = f"{' '.join(args)}: has no rows."
        raise CLIError(msg)
    if not plan.columns.classes:  # a list column: classes are numbered (set on the workers)
        plan.columns.classes = [str(k) for k in range(state.overall.num_classes or 0)]
    label = args[0] if len(args) == 1 else " ".join(args)
    summary = summarize_state(
        state, plan, file=str(first.path) if len(files) == 1 else label, format=first.format
    )
    summary["files"] = len(files)
    return summary, state.overall


def _local_state(
    files: list[Path], plan: Plan, first: Table, batch_size: int, progress: bool
) -> GroupedMetrics:
    state = plan.new_state()
    total = first.total_rows if len(files) == 1 else None
    bar = _progress_bar(total, enabled=progress)
    try:
        for path in files:
            table = first
            if path != files[0]:
                table = open_table(path, batch_size=batch_size, label_column=plan.columns.label)
                check_same_columns(table, first.names, first.path)
            score_table(state, table, read_batches(table), plan, bar)
    finally:
        if bar is not None:
            bar.close()
    return state


def _dask_state(
    files: list[Path],
    plan: Plan,
    first: Table,
    batch_size: int,
    scheduler: str | None,
    workers: int | None,
) -> GroupedMetrics:
    from crossent._eval._dask import dask_client, delayed, tree_merge

    with dask_client(scheduler, workers=workers) as client:
        parts = [
            delayed(score_file)(path.resolve(), plan, first.names, first.path, batch_size)
            for path in files
        ]
        state: GroupedMetrics = client.compute(tree_merge(parts)).result()
    return state
