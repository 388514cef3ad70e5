"""The two errors of ``crossent eval``: a bad input (exit 2) and a bad row inside a batch."""

from __future__ import annotations

__all__ = ["CLIError", "RowError"]


class CLIError(Exception):
    """A problem with the input or the arguments: printed as one message, exit status 2."""


class RowError(Exception):
    """A bad row: `row` counts from 0 within the batch; `reason` completes "row N ..."."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.reason = reason
