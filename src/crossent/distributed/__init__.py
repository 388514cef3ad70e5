"""Vocabulary-parallel cross-entropy over :mod:`torch.distributed`.

When the output layer is sharded over the ranks of a tensor-parallel group,
each rank holds a contiguous slice of the vocabulary. The losses here give the
single-process result and gradients from the slices, with a handful of small
collectives per call and none in the backward pass of
:func:`vocab_parallel_cross_entropy`.
"""

from __future__ import annotations

from crossent.distributed._linear import vocab_parallel_linear_cross_entropy
from crossent.distributed._vocab_parallel import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
