"""crossent: cross-entropy, done right.

Information measures (:mod:`crossent.info`), the whole cross-entropy loss
family on every array-API backend, PyTorch modules (:mod:`crossent.nn`), fused
large-vocabulary losses (:mod:`crossent.fused`), vocabulary-parallel losses
(:mod:`crossent.distributed`) and streaming metrics (:mod:`crossent.metrics`).
The PyTorch-only subpackages are imported on first use, so ``import crossent``
needs only NumPy.
"""

from __future__ import annotations

import importlib
from typing import Any

from crossent import info
from crossent._lib._config import get_validation, set_validation, validation
from crossent._losses._binary import binary_cross_entropy
from crossent._losses._categorical import categorical_cross_entropy
from crossent._losses._distill import distillation_loss
from crossent._losses._grad import value_and_grad
from crossent._losses._listnet import listnet_loss
from crossent._losses._sparse import sparse_categorical_cross_entropy

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

_LAZY_SUBMODULES = ("nn", "fused", "distributed", "metrics")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"crossent.{name}")
    msg = f"module 'crossent' has no attribute {name!r}"
    raise AttributeError(msg)
