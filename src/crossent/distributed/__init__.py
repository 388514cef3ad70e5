"""Vocabulary-parallel cross-entropy over :mod:`torch.distributed`.

When the output layer is sharded over the ranks of a tensor-parallel group,
each rank holds a contiguous slice of the vocabulary. The losses here give the
single-process result and gradients from the slices, with a handful of small
collectives per call and none in the backward pass of
:func:`vocab_parallel_cross_entropy`.

- :func:`vocab_parallel_cross_entropy`: from each rank's slice of the logits.
- :func:`vocab_parallel_linear_cross_entropy`: fused, from each rank's rows of
  the output projection (the chunked core of :mod:`crossent.fused`).
- :func:`vocab_parallel_linear_log_probs`: fused per-token log-probabilities
  and entropy (policy-gradient training with a sharded head).

Bad calls (ranks disagreeing on shapes, options or labels; labels outside the
global vocabulary) raise on every rank instead of hanging. Metric states of
:mod:`crossent.metrics` are summed over ranks by ``Metric.sync(group)``.
Runnable example: ``torchrun --nproc-per-node 2 examples/vocab_parallel.py``.
"""

from __future__ import annotations

from crossent.distributed._linear import (
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_log_probs,
)
from crossent.distributed._vocab_parallel import vocab_parallel_cross_entropy

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_log_probs",
]
