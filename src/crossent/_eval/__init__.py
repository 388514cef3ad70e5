"""The machinery of ``crossent eval``: open a predictions file, find its columns, score it.

- :mod:`._table`: :class:`Table` (column names and types, numbered record
  batches, where a row lies in the file) and :class:`Batch`;
- :mod:`._csv`, :mod:`._jsonl`, :mod:`._parquet`, :mod:`._numpy`: one opener
  per format; :mod:`._open` picks one by the file's extension;
- :mod:`._columns` (label and class columns, the score matrix of a batch),
  :mod:`._labels` (class names or indices to indices);
- :mod:`._evaluate`: stream a table through ``ClassificationMetrics``;
- :mod:`._text`: the text table and JSON-ready summary.

pyarrow, tqdm and matplotlib are imported only when a file is read.
"""

from crossent._eval._columns import Columns, batch_scores, check_finite, resolve_columns
from crossent._eval._errors import CLIError, RowError
from crossent._eval._evaluate import evaluate
from crossent._eval._labels import batch_labels
from crossent._eval._open import FORMATS, open_table, read_batches
from crossent._eval._table import Batch, Table
from crossent._eval._text import format_text, jsonable

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
]
