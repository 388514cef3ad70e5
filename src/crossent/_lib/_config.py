"""Global switches: value validation on or off.

Value checks (labels in range, probabilities in [0, 1] summing to 1,
non-negative weights) need a device-to-host read on accelerators. They are
on by default. :func:`set_validation` (or the environment variable
``CROSSENT_VALIDATE=0`` before import) sets the process-wide default;
:func:`validation` overrides it inside a ``with`` block for the current thread
or asyncio task only (a :class:`contextvars.ContextVar`), so concurrent code
never sees another thread's or task's setting. Shape and dtype checks are
free and always run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

__all__ = ["get_validation", "set_validation", "validation"]


def _from_env() -> bool:
    value = os.environ.get("CROSSENT_VALIDATE", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


_DEFAULT = _from_env()
"""The process-wide default, set by :func:`set_validation`."""

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("crossent_validation")
"""The override of the current thread / asyncio task (unset: use the default)."""


class _Switch:
    """Reads the override through a property whose getter is ``_LOCAL.get`` itself.

    ``torch.compile`` cannot trace ``ContextVar.get``, but it evaluates a property whose
    getter is a C function and guards its value: ``_SWITCH.local`` is read again before
    every call of a compiled function, in the caller's thread and task, and a change of the
    switch (or of :data:`_DEFAULT`, a guarded global) recompiles. Unset, the getter returns
    its argument, ``_SWITCH`` itself (``ContextVar.get(default)``).
    """

    __slots__ = ()
    local = property(_LOCAL.get)


class _Fixed:
    """A switch whose override is fixed: what :func:`validation` installs while dynamo traces."""

    __slots__ = ("local",)

    def __init__(self, local: bool) -> None:
        self.local = local


_SWITCH: _Switch | _Fixed = _Switch()
_TRACED_SWITCH = {True: _Fixed(True), False: _Fixed(False)}


def dynamo_tracing() -> bool:
    """Whether dynamo traces this code (``torch.compile``, strict ``torch.export``).

    Dynamo replaces ``is_dynamo_compiling()`` by True; it is False everywhere else (eager
    code, ``torch.func`` transforms, the AOT tracing after dynamo), where the context
    variable works.
    """
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.compiler.is_dynamo_compiling())


def _check_flag(enabled: object) -> bool:
    if not isinstance(enabled, bool):
        msg = f"`enabled` must be a bool; got {type(enabled).__name__}."
        raise TypeError(msg)
    return enabled


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off: the process-wide default.

    Every thread and asyncio task uses this default, except inside a
    ``with crossent.validation(flag):`` block, which overrides it for its own
    thread or task only.

    Parameters
    ----------
    enabled : bool
        ``True`` (the initial default, unless ``CROSSENT_VALIDATE=0``) checks
        values; ``False`` skips the checks that read data: labels in
        ``[0, C)`` (or `ignore_index`), probabilities in [0, 1] whose rows sum
        to 1, binary targets in [0, 1], non-negative weights. Shape and dtype
        checks always run.

    Notes
    -----
    Validation off is a promise that the inputs are valid. Invalid values
    then give **undefined results**, not errors: on NumPy a label of −1
    wraps around to the last class and a label ``C`` raises NumPy's own
    ``IndexError``; on JAX an out-of-range label gives NaN or wraps; a
    probability outside [0, 1], a row that does not sum to 1 or a negative
    weight gives a number that means nothing. On PyTorch, out-of-range labels
    still fail as they do in torch's own kernels (``torch.gather`` and the
    fused loss raise on CPU; a device-side assertion on CUDA): never a number.

    Under ``torch.compile`` and ``torch.export`` the value checks are device-side
    assertions in the graph; the switch is read while tracing and guarded, so a
    change recompiles (an exported program keeps the checks it was exported with).
    Under ``torch.func`` transforms values are not checked.

    Examples
    --------
    >>> import crossent as ce
    >>> ce.set_validation(False)
    >>> ce.get_validation()
    False
    >>> ce.set_validation(True)
    """
    global _DEFAULT
    _DEFAULT = _check_flag(enabled)


def get_validation() -> bool:
    """Whether value checks are on in the current thread or asyncio task.

    Examples
    --------
    >>> import crossent as ce
    >>> ce.get_validation()
    True
    """
    local = _SWITCH.local
    return local if type(local) is bool else _DEFAULT


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Turn value checks on or off inside a ``with`` block, for this thread or task only.

    The setting lives in a :class:`contextvars.ContextVar`: other threads and
    other asyncio tasks keep their own (the process-wide default of
    :func:`set_validation` unless they are inside a block of their own), and
    leaving the block restores exactly what was there before, whatever other
    threads or tasks did meanwhile. A new thread starts with the default; an
    asyncio task starts with a copy of its creator's setting. See
    :func:`set_validation` for what validation off means.

    Inside a function compiled by ``torch.compile`` (``fullgraph=True`` included) the
    block works too, without a graph break: dynamo cannot trace
    :meth:`contextvars.ContextVar.set`, so while it traces, the block swaps the
    module's switch for a fixed one and back instead, and the losses traced inside the
    block are compiled with or without their device-side checks. The choice is part of
    the compiled code, as if written in it: it does not depend on the caller's thread or
    task, and it ends with the block.

    Examples
    --------
    >>> import crossent as ce
    >>> with ce.validation(False):
    ...     ce.get_validation()
    False
    >>> ce.get_validation()
    True
    """
    flag = _check_flag(enabled)
    if dynamo_tracing():
        global _SWITCH
        outer = _SWITCH
        _SWITCH = _TRACED_SWITCH[flag]
        try:
            yield
        finally:
            _SWITCH = outer
        return
    token = _LOCAL.set(flag)
    try:
        yield
    finally:
        _LOCAL.reset(token)
