"""Launchers of the Triton kernels (the PyTorch path is used meanwhile)."""

from __future__ import annotations

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether Triton imports (it is optional: ``pip install crossent[triton]``)."""
    return False
