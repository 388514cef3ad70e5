"""Vocabulary-parallel cross-entropy under torchrun prints the single-process loss.

Run it on one machine, CPU only (gloo), with any number of ranks:

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Every rank builds the same problem from a fixed seed (hidden states, a
projection with an odd vocabulary size of 1001 classes, labels with some
ignored), keeps its contiguous slice of the vocabulary, and computes the loss
and gradients vocabulary-parallel, both from its slice of the logits and fused
from its rows of the projection. Rank 0 prints them next to the single-process
crossent losses computed on the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import crossent as ce
from crossent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from crossent.fused import linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 64, 32, 1001
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "ignore_index": -100}


def _gap(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max |a - b| of two gradients."""
    if a is None or b is None:
        msg = "a gradient is missing"
        raise RuntimeError(msg)
    return float((a - b).abs().max())


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets the rank, world size and address
    rank, world = dist.get_rank(), dist.get_world_size()

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    target[::7] = -100  # ignored tokens
    logits = hidden @ weight.T

    # This rank's contiguous slice of the vocabulary (lengths differ when VOCAB % world != 0).
    rows = torch.arange(VOCAB).tensor_split(world)[rank]
    lo, hi = int(rows[0]), int(rows[-1]) + 1

    # 1. From this rank's slice of the logits.
    local_logits = logits[:, lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local_logits, target, **OPTIONS)
    loss.backward()

    # 2. Fused: from this rank's rows of the projection (no rank holds its whole logits).
    h = hidden.clone().requires_grad_(True)
    local_weight = weight[lo:hi].clone().requires_grad_(True)
    fused = vocab_parallel_linear_cross_entropy(h, local_weight, target, **OPTIONS)
    fused.backward()

    if rank == 0:
        full = logits.clone().requires_grad_(True)
        single = ce.sparse_categorical_cross_entropy(full, target, from_logits=True, **OPTIONS)
        single.backward()
        h1 = hidden.clone().requires_grad_(True)
        single_fused = linear_cross_entropy(h1, weight, target, **OPTIONS)
        single_fused.backward()
        assert full.grad is not None
        gaps = (_gap(local_logits.grad, full.grad[:, lo:hi]), _gap(h.grad, h1.grad))
        slices = [len(r) for r in torch.arange(VOCAB).tensor_split(world)]
        print(f"ranks: {world}, vocabulary slices: {slices}")
        print(f"vocab_parallel_cross_entropy:        {loss.item():.10f}")
        print(f"sparse_categorical_cross_entropy:    {single.item():.10f}")
        print(f"vocab_parallel_linear_cross_entropy: {fused.item():.10f}")
        print(f"fused.linear_cross_entropy:          {single_fused.item():.10f}")
        print("max |gradient difference|, rank 0's logits and hidden: {:.1e}, {:.1e}".format(*gaps))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
