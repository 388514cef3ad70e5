"""The two errors of ``crossent eval``: a bad input (exit 2) and a bad row inside a batch."""

from __future__ import annotations

__all__ = ["MAX_BINS", "CLIError", "RowError", "too_many_bins"]

#: the most calibration bins ``crossent eval`` takes: the state holds every bin of every
#: class (and group), about 200 bytes each; more bins than this leave too few rows in each
#: for an accuracy, and 10**7 of them took 6.5 GB for a file of two rows
MAX_BINS = 10_000


class CLIError(Exception):
    """A problem with the input or the arguments: printed as one message, exit status 2."""


class RowError(Exception):
    """A bad row: `row` counts from 0 within the batch; `reason` completes "row N ..."."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(reason)
        self.row = row
        self.reason = reason


def too_many_bins(bins: int, name: str) -> str | None:
    """The message for more than ``MAX_BINS`` calibration `bins` (the option or argument
    `name` gave them), or None when they are few enough."""
    if bins <= MAX_BINS:
        return None
    return (
        f"{name} must be at most {MAX_BINS}; got {bins} (every bin of every class is kept "
        "in memory, and so many bins leave too few rows in each)."
    )
