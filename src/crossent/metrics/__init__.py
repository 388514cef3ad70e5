"""Streaming, mergeable classification metrics.

Update with batches of predictions (probabilities, logits or log-probabilities,
stated with ``input_kind``) and integer labels from any array-API library,
merge the states of several workers (or all-reduce them over
``torch.distributed`` with :meth:`Metric.sync`), and compute at the end.
States are exact sums (integer fixed-point, rounded to float64 once, when a
figure is computed) and int64 counts on the host: merging shards in any
order, or :meth:`Metric.sync`, gives the single-pass figures bit for bit, and
long streams do not drift.

- :class:`CrossEntropy` (log loss, in any base), :class:`Perplexity`,
  :class:`BitsPerToken`
- :class:`Accuracy`, :class:`BrierScore`
- :class:`CalibrationError` (ECE / MCE; top-label, classwise, positive-class;
  equal-width or equal-mass bins)
- :class:`PerClassCrossEntropy`
- :class:`ClassificationMetrics`: all of the above in one pass (``crossent eval``)
- :class:`BinaryClassificationMetrics`: the binary figures of one P(label = 1) column
- :func:`evaluate_dask`: every figure of a Dask DataFrame, partition states merged in a tree

Only NumPy is needed; PyTorch is imported only by :meth:`Metric.sync` when
``torch.distributed`` is already initialised.
"""

from typing import TYPE_CHECKING, Any

from crossent.metrics._binary import BinaryClassificationMetrics
from crossent.metrics._functional import BadRowError
from crossent.metrics._metric import (
    Accuracy,
    BitsPerToken,
    BrierScore,
    CalibrationError,
    ClassificationMetrics,
    CrossEntropy,
    Metric,
    PerClassCrossEntropy,
    Perplexity,
)

__all__ = [
    "Accuracy",
    "BadRowError",
    "BinaryClassificationMetrics",
    "BitsPerToken",
    "BrierScore",
    "CalibrationError",
    "ClassificationMetrics",
    "CrossEntropy",
    "Metric",
    "PerClassCrossEntropy",
    "Perplexity",
    "evaluate_dask",
]

if TYPE_CHECKING:
    from crossent._eval._dask import evaluate_dask


def __getattr__(name: str) -> Any:
    if name == "evaluate_dask":  # needs dask and pyarrow: imported on first use
        from crossent._eval._dask import evaluate_dask

        return evaluate_dask
    msg = f"module 'crossent.metrics' has no attribute {name!r}"
    raise AttributeError(msg)
