"""Read the next batches of a file in a background thread while this one scores.

Parsing a CSV block (pyarrow's streaming reader parses in the thread that
asks for the next block, even with ``use_threads``) and scoring a batch both
release the GIL for most of their time, so one reader thread a couple of
batches ahead of the scoring thread runs them side by side. Memory stays
bounded: the reader waits when :data:`DEPTH` batches are ready, so at most
that many, plus the one being read and the one being scored, are held.

Everything the reader raises (a parse error, a bad cell named by the
reader's diagnosis) reaches the scoring thread after the batches before it,
in the order a serial read would have given.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = ["DEPTH", "prefetched"]

T = TypeVar("T")

#: batches read ahead of the scoring thread
DEPTH = 2


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def prefetched(
    make: Callable[[], Iterator[T]],
    depth: int | None = None,
    *,
    meanwhile: Callable[[], object] | None = None,
) -> Iterator[T]:
    """The items of ``make()``, produced by a background thread up to `depth` ahead.

    `make` is called in the background thread, so a reader is opened, read
    and closed there. With one CPU (nothing to overlap) or ``depth == 0`` the
    items come from this thread. Closing the returned iterator early stops the
    reader after the item it is reading. `depth` defaults to :data:`DEPTH`.
    `meanwhile`, if given, is called in this thread while the first item is
    read (before it, when there is no background thread).
    """
    depth = DEPTH if depth is None else depth
    if depth < 1 or _cpus() < 2:
        if meanwhile is not None:
            meanwhile()
        yield from make()
        return
    ready: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            items = make()
            try:
                for item in items:
                    ready.put((False, item))
                    if stop.is_set():
                        return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the scoring thread, raised there
            ready.put((True, exc))
        else:
            ready.put((True, None))

    reader = threading.Thread(target=read, name="crossent-eval-reader", daemon=True)
    reader.start()
    try:
        if meanwhile is not None:
            meanwhile()
        while True:
            done, item = ready.get()
            if done:
                if item is not None:
                    raise item  # type: ignore[misc]
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while reader.is_alive():  # free a slot for a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.01)
        reader.join()
