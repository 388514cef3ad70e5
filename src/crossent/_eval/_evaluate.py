"""Stream predictions files through the metrics: the local engine, or the Dask one.

:func:`evaluate` expands the FILE arguments (files, directories, globs, ``-``),
resolves the columns from the first file (every other file must have the
same ones), and scores every file into one
:class:`~crossent._eval._groups.GroupedMetrics`: batch after batch in this
process (``engine="local"``), or one state per partition on Dask workers,
merged in a tree (``engine="dask"``): a partition is a file, or a run of row
groups of a large Parquet file (:func:`file_parts`), so that one large file
is scored in parallel too.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from crossent._eval._columns import Columns, batch_scores, resolve_columns
from crossent._eval._errors import CLIError, RowError
from crossent._eval._groups import GroupedMetrics
from crossent._eval._open import FORMATS, open_table, read_batches
from crossent._eval._score import Plan, Selection, base_name, score_table
from crossent._eval._sources import data_suffix, expand_sources, is_blank_text, stdin_as_file
from crossent._eval._summary import summarize_state
from crossent._eval._table import Batch, Table

__all__ = ["evaluate", "file_parts", "open_scored", "score_file"]


def _progress_bar(total: int | None, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the metrics extra
        return None
    return tqdm(total=total, unit=" rows", unit_scale=True, delay=1.0, file=sys.stderr, leave=False)


def open_scored(
    path: Path,
    selection: Selection,
    batch_size: int,
    like: tuple[Path, Sequence[str]] | None = None,
    row_groups: tuple[int, int] | None = None,
    *,
    rows_or_none: bool = False,
) -> tuple[Table, Columns | None, Iterator[Batch]]:
    """Open `path`, resolve its columns (its first batch tells a text cell from a
    text column), and return the table, the columns and every batch.

    `like` is (first file, its column names): this file must have the same ones.
    `row_groups` [start, stop) reads only those row groups of a Parquet file.
    The columns are None for a file without rows when `like` is given or
    `rows_or_none` is set: a CSV file with a header only has no column types, a blank
    one (``is_blank_text``) no columns either.
    """
    if (like is not None or rows_or_none) and is_blank_text(path):
        fmt = FORMATS[data_suffix(path)[0]]
        return Table(path, fmt, [], {}, lambda: iter(()), 0), None, iter(())
    table = open_table(
        path,
        batch_size=batch_size,
        label_column=selection.label_column,
        row_groups=row_groups,
        group_by=selection.group_by,
    )
    if like is not None and set(table.names) != set(like[1]):
        _other_columns(table, *like, "")
    batches = read_batches(table)
    head = next(batches, None)
    if head is None and (like is not None or rows_or_none):
        return table, None, iter(())
    columns = resolve_columns(
        table,
        selection.label_column,
        None if head is None else head.data,
        columns=selection.columns,
        exclude=selection.exclude,
        group_by=selection.group_by,
    )
    return table, columns, itertools.chain([] if head is None else [head], batches)


@contextlib.contextmanager
def _renamed(path: Path, name: str) -> Iterator[None]:
    """Error messages about `path` (standard input's spooled copy) say `name` instead."""
    try:
        yield
    except CLIError as exc:
        raise CLIError(str(exc).replace(str(path), name)) from exc.__cause__


def check_same_columns(table: Table, columns: Columns, plan: Plan, first: Path) -> None:
    """Every file of one evaluation must have the class columns of the `first` one."""
    same_classes = columns.list_column == plan.columns.list_column and (
        columns.list_column is not None or columns.classes == plan.columns.classes
    )
    if not same_classes:
        _other_columns(
            table, first, table.names, f"its class columns are {', '.join(columns.classes)}"
        )


def _other_columns(table: Table, first: Path, names: Sequence[str], why: str) -> None:
    extra = [n for n in table.names if n not in names]
    missing = [n for n in names if n not in table.names]
    parts = [
        f"it lacks {', '.join(missing)}" if missing else "",
        f"it also has {', '.join(extra)}" if extra else "",
        why,
    ]
    detail = "; ".join(p for p in parts if p)
    msg = (
        f"{table.path}: has other columns than {first} ({detail}); files scored together "
        "must have the same columns. Score them separately, or fix the files."
    )
    raise CLIError(msg)


def score_file(
    path: Path,
    plan: Plan,
    first: Path,
    names: Sequence[str],
    batch_size: int,
    row_groups: tuple[int, int] | None = None,
) -> GroupedMetrics:
    """One file's state, or that of its row groups [start, stop) (a Dask task: it runs
    on a worker)."""
    like = (first, names)
    table, columns, batches = open_scored(path, plan.selection, batch_size, like, row_groups)
    state = plan.new_state()
    if columns is not None:  # else no rows
        check_same_columns(table, columns, plan, first)
        score_table(state, table, batches, plan)
    return state


def evaluate(
    paths: Path | str | Sequence[Path | str],
    *,
    label_column: str = "label",
    input_kind: str = "probs",
    bins: int = 15,
    base: str | float = "e",
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
    """Score the predictions in `paths` as one table; returns (summary, overall metric).

    `base` is ``"e"``, ``"2"`` or ``"10"`` (or the number); a bad setting is a
    ValueError before any file is read.
    """
    _check_settings(engine=engine, batch_size=batch_size, base=base, labels=labels, bins=bins)
    args = [str(paths)] if isinstance(paths, str | Path) else [str(p) for p in paths]
    sources = expand_sources(args, formats=tuple(FORMATS))
    selection = Selection(
        label_column, None if columns is None else tuple(columns), tuple(exclude), group_by
    )
    with contextlib.ExitStack() as stack:
        if sources == ["-"]:
            if engine != "local":
                msg = "`-` (standard input) is read by the local engine only; drop --engine dask."
                raise CLIError(msg)
            spooled = stack.enter_context(stdin_as_file())
            stack.enter_context(_renamed(spooled, "<stdin>"))
            sources = [spooled]
        files = [Path(s) for s in sources]
        files, (first, resolved, batches) = _open_first(files, selection, batch_size)
        plan = Plan(resolved, input_kind, labels, bins, base_name(base), selection)
        if engine == "dask":
            _number_list_classes(plan, batches)
            state = _dask_state(files, plan, first, batch_size, scheduler, workers)
        else:
            state = _local_state(files, plan, first, batches, batch_size, progress)
    if args == ["-"]:
        first.path = Path("<stdin>")
    for warning in state.warnings:
        print(f"crossent eval: warning: {warning}", file=sys.stderr)
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


def _number_list_classes(plan: Plan, batches: Iterator[Batch]) -> None:
    """Number the classes of a list column from the first batch's first row, as the local
    engine's first batch does, before the plan goes to the Dask workers: each task then
    checks its rows against that number and names the file and row of a longer or shorter
    list. (Each task numbered its own: files of 3 and of 4 predictions per row failed in
    the merge of their states, a ValueError traceback.) A bad first row is left to the
    task that reads it, which names it."""
    if plan.columns.list_column is None or plan.columns.classes:
        return
    head = next(batches, None)
    if head is None:
        return
    try:
        width = batch_scores(head.data, plan.columns).shape[1]
    except RowError:
        return
    plan.columns.classes = [str(k) for k in range(width)]


def _check_settings(*, engine: str, batch_size: int, base: object, labels: str, bins: int) -> None:
    """ValueErrors for the settings the command line's parser checks (`engine`, `base`,
    `labels`) or ``_cmd_eval`` does (`batch_size`, `bins`), for callers of ``evaluate``."""
    if engine not in ("local", "dask"):
        msg = f"`engine` must be 'local' or 'dask'; got {engine!r}."
        raise ValueError(msg)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"`batch_size` must be at least 1; got {batch_size!r}."
        raise ValueError(msg)
    Plan.check(base=base, labels=labels, bins=bins)


def _open_first(
    files: list[Path], selection: Selection, batch_size: int
) -> tuple[list[Path], tuple[Table, Columns, Iterator[Batch]]]:
    """The first file with rows, opened and its columns resolved, and `files` with it
    first (files without rows, such as a CSV file of a header only, have no column
    types to resolve; the last file is resolved whatever it holds)."""
    for i, path in enumerate(files[:-1]):
        table, columns, batches = open_scored(path, selection, batch_size, rows_or_none=True)
        if columns is not None:
            return [path, *files[:i], *files[i + 1 :]], (table, columns, batches)
    table, columns, batches = open_scored(files[-1], selection, batch_size)
    assert columns is not None  # resolved (or raised) without rows_or_none
    return [files[-1], *files[:-1]], (table, columns, batches)


def _local_state(
    files: list[Path],
    plan: Plan,
    first: Table,
    batches: Iterator[Batch],
    batch_size: int,
    progress: bool,
) -> GroupedMetrics:
    state = plan.new_state()
    total = first.total_rows if len(files) == 1 else None
    bar = _progress_bar(total, enabled=progress)
    try:
        score_table(state, first, batches, plan, bar)
        for path in files[1:]:
            like = (first.path, first.names)
            table, columns, more = open_scored(path, plan.selection, batch_size, like)
            if columns is not None:  # else no rows
                check_same_columns(table, columns, plan, first.path)
                score_table(state, table, more, plan, bar)
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
            delayed(score_file)(path.resolve(), plan, first.path, first.names, batch_size, part)
            for path in files
            for part in file_parts(path, batch_size)
        ]
        try:
            state: GroupedMetrics = client.compute(tree_merge(parts)).result()
        except CLIError as exc:  # workers read absolute paths: name the files as given
            msg = str(exc)
            for path in files:
                msg = msg.replace(f"{path.resolve()}:", f"{path}:")
            raise CLIError(msg) from exc.__cause__
    return state


#: a Dask partition of a large Parquet file holds at least this many batches' rows
PART_BATCHES = 4


def file_parts(path: Path, batch_size: int) -> list[tuple[int, int] | None]:
    """The Dask partitions of one file: runs of row groups of a Parquet file (each of at
    least ``PART_BATCHES`` batches, so that one large file is scored on several workers),
    else the whole file (None)."""
    fmt, compression = data_suffix(path)
    if FORMATS.get(fmt) != "parquet" or compression is not None:
        return [None]
    from crossent._eval._parquet import row_group_parts

    try:
        parts = row_group_parts(path, PART_BATCHES * batch_size)
    except (OSError, ValueError):  # pyarrow's errors: its task says why, as the local engine does
        return [None]
    return [None] if len(parts) == 1 else list(parts)
