"""Native executors: backend-specific fast paths behind the array-API formula.

Each executor runs the same loss as :mod:`crossent._losses` (same options
object, same semantics, same errors) with the backend's own kernels where they
have crossent's semantics, and returns ``None`` where the generic formula must
run instead.
"""

from __future__ import annotations

import sys
from types import ModuleType

_TORCH: ModuleType | None = None


def torch_executor() -> ModuleType:
    """:mod:`crossent._backends._torch`, imported with the first tensor (crossent does not import
    PyTorch itself), then kept: the hot path pays a call, not an import statement."""
    global _TORCH
    if _TORCH is None:
        from crossent._backends import _torch

        _TORCH = _torch
    return _TORCH


if "torch" in sys.modules:  # PyTorch is loaded already: the executor now, outside any traced
    # call (imported inside one, the assignment above would fail dynamo's guard on ``_TORCH``
    # once and recompile the caller's graph: twice the compile time of a first compiled call)
    torch_executor()
