"""The machinery of ``crossent eval``: open a predictions file, find its columns, score it.

- :mod:`._table`: :class:`Table` (column names and types, numbered record
  batches, where a row lies in the file) and :class:`Batch`;
- :mod:`._csv`, :mod:`._jsonl`, :mod:`._parquet`, :mod:`._numpy`: one opener
  per format; :mod:`._open` picks one by the file's extension;
- :mod:`._columns` (label and class columns, the score matrix of a batch),
  :mod:`._labels` (class names or indices to indices);
- :mod:`._evaluate`: stream a table through ``ClassificationMetrics``;
- :mod:`._prefetch`: the reader thread; :mod:`._memory`: each batch reuses the
  memory the batch before freed (the command line sets it for its process);
- :mod:`._text`: the text table and JSON-ready summary.

pyarrow, tqdm and matplotlib are imported only when a file is read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crossent._eval._errors import CLIError, RowError

if TYPE_CHECKING:  # imported on first use, so `crossent --version` imports nothing heavy
    from crossent._eval._columns import Columns, batch_scores, check_finite, resolve_columns
    from crossent._eval._evaluate import evaluate
    from crossent._eval._labels import batch_labels
    from crossent._eval._open import FORMATS, open_table, read_batches
    from crossent._eval._table import Batch, Table
    from crossent._eval._text import format_text, jsonable, to_json

_LAZY = {
    "Columns": "_columns",
    "batch_scores": "_columns",
    "check_finite": "_columns",
    "resolve_columns": "_columns",
    "evaluate": "_evaluate",
    "batch_labels": "_labels",
    "FORMATS": "_open",
    "open_table": "_open",
    "read_batches": "_open",
    "Batch": "_table",
    "Table": "_table",
    "format_text": "_text",
    "jsonable": "_text",
    "to_json": "_text",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"crossent._eval.{_LAZY[name]}"), name)
    msg = f"module 'crossent._eval' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "FORMATS",
    "Batch",
    "CLIError",
    "Columns",
    "RowError",
    "Table",
    "batch_labels",
    "batch_scores",
    "check_finite",
    "evaluate",
    "format_text",
    "jsonable",
    "open_table",
    "read_batches",
    "resolve_columns",
    "to_json",
]
