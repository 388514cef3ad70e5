"""All-reduce over threads, one per rank: stands in for torch.distributed in unit tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadRanks"]


class ThreadRanks:
    """`size` ranks, one thread each; :meth:`reducer` gives a rank its all-reduce."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)
        self.slots: list[Any] = [None] * size

    def reducer(
        self, rank: int, merge: Callable[[list[Any]], Any], *, in_place: bool = False
    ) -> Callable[[Any], Any]:
        """``reduce(x)``: `merge` of every rank's `x` (NumPy or torch), returned or written to x."""

        def reduce(x: Any) -> Any:
            self.slots[rank] = x.clone() if hasattr(x, "clone") else x.copy()
            self.barrier.wait()
            result = merge(self.slots)
            self.barrier.wait()
            if not in_place:
                return result
            x[...] = result
            return None

        return reduce

    def run(self, work: Callable[[int], None]) -> None:
        """``work(rank)`` on every rank's thread; an error on one rank releases the others."""
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                work(rank)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(len(self.slots))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
