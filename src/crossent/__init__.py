"""crossent: cross-entropy, done right.

Information measures (:mod:`crossent.info`), the whole cross-entropy loss
family on every array-API backend, PyTorch modules (:mod:`crossent.nn`), fused
large-vocabulary losses (:mod:`crossent.fused`), vocabulary-parallel losses
(:mod:`crossent.distributed`) and streaming metrics (:mod:`crossent.metrics`).
Every name is imported on first use (PEP 562): ``import crossent`` itself is
instant and needs nothing; the PyTorch-only subpackages need PyTorch when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (PEP 562), so `crossent --version` stays instant
    from crossent import info
    from crossent._lib._config import get_validation, set_validation, validation
    from crossent._losses._binary import binary_cross_entropy
    from crossent._losses._categorical import categorical_cross_entropy
    from crossent._losses._distill import distillation_loss
    from crossent._losses._grad import value_and_grad
    from crossent._losses._listnet import listnet_loss
    from crossent._losses._sparse import sparse_categorical_cross_entropy

#: public name -> the module that defines it, imported on first access
_LAZY_NAMES = {
    "get_validation": "crossent._lib._config",
    "set_validation": "crossent._lib._config",
    "validation": "crossent._lib._config",
    "binary_cross_entropy": "crossent._losses._binary",
    "categorical_cross_entropy": "crossent._losses._categorical",
    "distillation_loss": "crossent._losses._distill",
    "value_and_grad": "crossent._losses._grad",
    "listnet_loss": "crossent._losses._listnet",
    "sparse_categorical_cross_entropy": "crossent._losses._sparse",
}

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "distillation_loss",
    "distributed",
    "fused",
    "get_validation",
    "info",
    "listnet_loss",
    "metrics",
    "nn",
    "set_validation",
    "sparse_categorical_cross_entropy",
    "validation",
    "value_and_grad",
]

_LAZY_SUBMODULES = ("info", "nn", "fused", "distributed", "metrics")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"crossent.{name}")
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    msg = f"module 'crossent' has no attribute {name!r}"
    raise AttributeError(msg)
