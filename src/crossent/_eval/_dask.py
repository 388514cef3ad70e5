"""The Dask engine of ``crossent eval``: one metric state per partition, merged in a tree.

Each partition (a file of the input, or a partition of a Dask DataFrame)
is scored on a worker into a :class:`~crossent._eval._groups.GroupedMetrics`,
the same object the local engine fills batch by batch; the states are then
merged pairwise in a balanced binary tree (``log2(P)`` levels, each merge
on a worker), and only the final state, a few kilobytes, comes back. The
merges add float64 sums and int64 counts, so the figures equal the local
engine's up to the order of the float additions.

``dask`` and ``distributed`` (the ``dask`` extra) are imported only here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from crossent._eval._errors import CLIError

__all__ = ["dask_client", "delayed", "merge_pair", "tree_merge"]


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
    """Merge two partition states (the tree's inner node)."""
    return a.merge(b)


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
    127.0.0.1 (one per CPU when None) and no dashboard; it is shut down on exit.
    """
    _, distributed = _need_dask()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="10s")
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
        dashboard_address=None,
    )
    with cluster, distributed.Client(cluster) as client:
        yield client


def delayed(function: Callable[..., Any]) -> Any:
    """``dask.delayed(function, pure=True)``: a task whose result depends on its arguments only."""
    dask, _ = _need_dask()
    return dask.delayed(function, pure=True)
