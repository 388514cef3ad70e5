"""Global switches: value validation on or off.

Value checks (labels in range, probabilities in [0, 1], non-negative weights)
need a device-to-host read on accelerators. They are on by default and can be
turned off for speed with :func:`set_validation` or by setting the environment
variable ``CROSSENT_VALIDATE=0`` before import. Shape and dtype checks are
free and always run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["get_validation", "set_validation", "validation"]


def _from_env() -> bool:
    value = os.environ.get("CROSSENT_VALIDATE", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


_VALIDATE = _from_env()


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off for the whole process.

    Parameters
    ----------
    enabled : bool
        ``True`` (the default state) checks values such as label ranges and
        probability bounds; ``False`` skips them. Shape and dtype checks
        always run.

    Examples
    --------
    >>> import crossent as ce
    >>> ce.set_validation(False)
    >>> ce.get_validation()
    False
    >>> ce.set_validation(True)
    """
    global _VALIDATE
    if not isinstance(enabled, bool):
        msg = f"`enabled` must be a bool; got {type(enabled).__name__}."
        raise TypeError(msg)
    _VALIDATE = enabled


def get_validation() -> bool:
    """Whether value checks are on.

    Examples
    --------
    >>> import crossent as ce
    >>> ce.get_validation()
    True
    """
    return _VALIDATE


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets value validation inside a ``with`` block.

    Examples
    --------
    >>> import crossent as ce
    >>> with ce.validation(False):
    ...     ce.get_validation()
    False
    """
    previous = get_validation()
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)
