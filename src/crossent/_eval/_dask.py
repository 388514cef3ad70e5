"""The Dask engine of ``crossent eval``: one metric state per partition, merged in a tree.

Each partition (a file of the input or a run of row groups of a large
Parquet file, or a partition of a Dask DataFrame)
is scored on a worker into a :class:`~crossent._eval._groups.GroupedMetrics`,
the same object the local engine fills batch by batch; the states are then
merged pairwise in a balanced binary tree (``log2(P)`` levels, each merge
on a worker), and only the final state, a few kilobytes, comes back. The
states hold int64 counts and exact sums (:mod:`crossent.metrics._exact`),
and every per-row term is computed row by row, so the figures are the local
engine's bit for bit, whatever the partitioning and the merge order.

``dask`` and ``distributed`` (the ``dask`` extra) are imported only here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from crossent._eval._errors import CLIError

__all__ = [
    "dask_client",
    "delayed",
    "evaluate_dask",
    "merge_pair",
    "score_partition",
    "tree_merge",
]


#: seconds to wait for a --scheduler to answer before giving up (exit 2)
CONNECT_TIMEOUT = 10.0


def _need_dask() -> tuple[Any, Any]:
    try:
        import dask

        import distributed
    except ImportError as exc:
        msg = (
            "--engine dask needs dask and distributed; install the dask extra: "
            "pip install 'crossent[dask]'."
        )
        raise CLIError(msg) from exc
    return dask, distributed


def merge_pair(a: Any, b: Any) -> Any:
    """Merge two partition states (the tree's inner node) into a new one.

    Neither input is changed: a task's result may be read by several tasks
    (a file given twice is one task), which may run at the same time.
    """
    import copy

    return copy.deepcopy(a).merge(copy.deepcopy(b))


def tree_merge(parts: Sequence[Any], combine: Callable[[Any, Any], Any] = merge_pair) -> Any:
    """A balanced binary tree of ``dask.delayed`` merges over `parts`; returns its root.

    Pairs are formed in partition order (0+1, 2+3, ...; an odd last one goes up a
    level unchanged), so the same partitions always merge the same way.
    """
    dask, _ = _need_dask()
    if not parts:
        msg = "nothing to merge: the input has no partitions."
        raise CLIError(msg)
    level = list(parts)
    while len(level) > 1:
        merged = [
            dask.delayed(combine, pure=True)(level[i], level[i + 1])
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0]


@contextlib.contextmanager
def dask_client(scheduler: str | None, *, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: connected to `scheduler`, or to a new local cluster.

    The local cluster has `workers` single-threaded worker processes on
    127.0.0.1 (one per CPU when None) and its dashboard on a free port; it is shut down on exit.
    """
    _, distributed = _need_dask()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=f"{CONNECT_TIMEOUT}s")
        except (OSError, TimeoutError) as exc:
            msg = f"--scheduler {scheduler}: cannot connect to a Dask scheduler there: {exc}"
            raise CLIError(msg) from exc
        with client:
            yield client
        return
    import os

    cluster = distributed.LocalCluster(
        n_workers=workers or os.cpu_count() or 1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",  # a free port: never clash with a running dashboard
    )
    with cluster, distributed.Client(cluster) as client:
        yield client


def delayed(function: Callable[..., Any]) -> Any:
    """``dask.delayed(function, pure=True)``: a task whose result depends on its arguments only."""
    dask, _ = _need_dask()
    return dask.delayed(function, pure=True)


def score_partition(frame: Any, plan: Any, index: int) -> Any:
    """One pandas partition's state (a Dask task); a bad row names the partition."""
    import pyarrow as pa

    from crossent._eval._score import score_table
    from crossent._eval._table import Batch, Table

    # via a Table: a pyarrow-backed column of several chunks (a repartitioned string
    # column) is no RecordBatch column (a TypeError); one chunk each
    whole = pa.Table.from_pandas(frame, preserve_index=False)
    data = pa.RecordBatch.from_arrays(
        [column.combine_chunks() for column in whole.columns], schema=whole.schema
    )
    table = Table(
        Path(f"partition {index}"),  # the "path" of its messages
        "dask",
        list(data.schema.names),
        {f.name: f.type for f in data.schema},
        lambda: iter(()),
        data.num_rows,
    )
    state = plan.new_state()
    score_table(state, table, [Batch(data, 0)], plan)
    return state


def evaluate_dask(
    frame: Any,
    *,
    label_column: str = "label",
    columns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    input_kind: str = "probs",
    bins: int = 15,
    base: str | float = "e",
    labels: str = "auto",
    group_by: str | None = None,
) -> dict[str, Any]:
    r"""Every figure of ``crossent eval`` for a Dask DataFrame of predictions.

    Each partition is scored where it lives into a mergeable metric state
    (:class:`~crossent.metrics.ClassificationMetrics`, or
    :class:`~crossent.metrics.BinaryClassificationMetrics` for one class
    column), the states are merged in a balanced binary tree of tasks, and only
    the final state comes back. It runs on the current Dask scheduler: a
    ``distributed.Client`` when one is active, else Dask's default.

    Parameters
    ----------
    frame : dask.dataframe.DataFrame
        One row per prediction: the label column, and one numeric column per
        class (or one column holding P(label = 1) for a binary classifier).
    label_column : str, default "label"
        The labels: class names or indices (0/1 or true/false when binary).
    columns : sequence of str, optional
        The class columns, in class order (default: every other numeric column).
    exclude : sequence of str, default ()
        Columns left out of the automatic choice (ids, timestamps).
    input_kind : {"probs", "logits", "log_probs"}, default "probs"
        What the class columns hold.
    bins : int, default 15
        Calibration bins.
    base : {"e", "2", "10"} or {2, 10, math.e}, default "e"
        Unit of ``log_loss`` (``log_loss_nats`` and ``log_loss_bits`` are always there).
    labels : {"auto", "index", "name"}, default "auto"
        How to read labels, as ``crossent eval --labels``.
    group_by : str, optional
        A column: every figure is reported per value of it as well (``groups``).

    Returns
    -------
    dict
        The dict ``crossent eval --format json`` prints: ``rows``,
        ``log_loss_nats``, ``log_loss_bits``, ``accuracy``, ``brier``, ``ece``,
        ..., ``per_class``, and ``groups`` with `group_by`.

    Raises
    ------
    ValueError
        For a column that is missing or of the wrong kind, a bad row (the
        message names the partition and the row), a frame without rows, or
        a bad `input_kind`, `bins`, `base` or `labels` (before any partition
        is scored).

    Notes
    -----
    The states hold int64 counts and exact sums, so the result is, bit for
    bit, that of one pass over all rows (``crossent eval``'s local engine),
    whatever the partitions and the order of the merges.

    Examples
    --------
    >>> import pandas as pd, dask.dataframe as dd
    >>> from crossent.metrics import evaluate_dask
    >>> df = pd.DataFrame({"label": [1, 0, 1, 0], "p": [0.9, 0.2, 0.6, 0.4]})
    >>> figures = evaluate_dask(dd.from_pandas(df, npartitions=2))
    >>> figures["rows"], round(figures["log_loss_nats"], 6), round(figures["brier"], 6)
    (4, 0.337539, 0.0925)
    """
    import dask
    import pyarrow as pa

    from crossent._eval._columns import resolve_columns
    from crossent._eval._score import Plan, Selection, base_name
    from crossent._eval._summary import summarize_state
    from crossent._eval._table import Table

    schema = pa.Schema.from_pandas(frame._meta, preserve_index=False)
    table = Table(
        Path("the DataFrame"),
        "dask",
        list(schema.names),
        {f.name: f.type for f in schema},
        lambda: iter(()),
        None,
    )
    try:
        resolved = resolve_columns(
            table, label_column, columns=columns, exclude=exclude, group_by=group_by
        )
        selection = Selection(
            label_column, None if columns is None else tuple(columns), tuple(exclude), group_by
        )
        plan = Plan(resolved, input_kind, labels, bins, base_name(base), selection)
        plan.make_metric()  # checks input_kind and bins here, not on every worker
        parts = [
            delayed(score_partition)(part, plan, i) for i, part in enumerate(frame.to_delayed())
        ]
        (state,) = dask.compute(tree_merge(parts))
    except CLIError as exc:
        raise ValueError(str(exc)) from None
    if state.count == 0:  # as `crossent eval` exits 2 on a table without rows
        msg = "`frame` has no rows: there is nothing to score. Check the filter that made it."
        raise ValueError(msg)
    if not plan.columns.classes:
        plan.columns.classes = [str(k) for k in range(state.overall.num_classes or 0)]
    return summarize_state(state, plan, file=None, format="dask")
