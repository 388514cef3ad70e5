"""Extra peak memory of the fused functions with half-precision hidden states and a float32 head.

Measured as ``benchmarks/fused_memory.py`` does (the resident-set high-water mark of one
forward+backward in a fresh process, the gradients' own bytes discounted), against the same
call with float32 hidden states: the products are float32 in both, so the work buffers and
the BLAS library's own are the same, and what a bfloat16 ``hidden`` adds is what the fused
function keeps for its gradient. Issue 10: extra memory at most 1.2 chunks of logits.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the Linux resident-set high-water mark"
)

# N x d x 2 bytes = 16 MiB; one chunk of logits (64 x 256 x 4 bytes) = 64 KiB
N, D, V, CHUNK = 4096, 2048, 256, 64


@pytest.mark.parametrize("case", ["ce", "ce_none", "log_probs", "distill", "vp_ce", "vp_log_probs"])
def test_bfloat16_hidden_keeps_no_float32_gradient(case: str) -> None:
    """bfloat16 hidden + float32 head: the hidden gradient is no longer held in float32 (it
    was, N x d x 4 bytes from forward to backward or through the recomputing backward: 2.2
    chunks of logits at N=4096, d=4096, V=32000 on top of the float32 call's 1.24); what is
    left is a chunk of it in float32 (chunk x d x 4 bytes) and a power of two per row. The
    vocabulary-parallel forms run on a gloo group of one process."""
    from benchmarks.fused_memory import in_subprocess

    wide = in_subprocess(case, N, D, V, "float32", chunk_size=CHUNK)
    mixed = in_subprocess(case, N, D, V, "mixed", chunk_size=CHUNK)
    assert wide is not None
    assert mixed is not None
    # the float32 chunk of the product and the upcast chunk of hidden: 2 x 0.5 MiB
    assert mixed - wide < N * D * 2 // 4, (mixed, wide)


# a bfloat16 head of 13824 x 2048: its float32 gradient is 108 MiB, three blocks of 36 MiB
N_W, D_W, V_W, CHUNK_W = 256, 2048, 13824, 16


@pytest.mark.parametrize("case", ["ce", "log_probs", "distill"])
def test_bfloat16_head_keeps_its_float32_gradient_and_a_rounded_copy_apart(case: str) -> None:
    """bfloat16 hidden + bfloat16 head: the weight gradient is accumulated in float32 (V x d x
    4 bytes) and rounded to bfloat16 at the end. It was one float32 tensor and its rounded
    copy, both whole at the end: 4 bytes per weight on top of the gradient (4.4 chunks of
    logits at N=4096, d=1024, V=32000). Held in blocks of rows, each freed once rounded, it is
    2 + 2 / blocks bytes (3.0-3.4 chunks there): here 2.67, 72 of the 108 MiB."""
    from benchmarks.fused_memory import in_subprocess

    extra = in_subprocess(case, N_W, D_W, V_W, "bfloat16", chunk_size=CHUNK_W)
    assert extra is not None
    # the chunk's buffers (16 x 13824 x 6 bytes) and the allocator's slack: a few MiB
    assert extra < 3.25 * V_W * D_W, extra / (V_W * D_W)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "dtype", "backend"),
    [("ce", "mixed", "inductor"), ("nn", "mixed", "inductor"), ("distill", "mixed", "inductor"),
     ("ce", "bfloat16", "aot_eager")],
)  # fmt: skip
def test_compiled_holds_no_more_than_eager(case: str, dtype: str, backend: str) -> None:
    """``torch.compile(fullgraph=True)`` of a forward+backward holds what eager does (both
    warmed by a first call of the same shape), plus less than a quarter of the hidden
    gradient's bytes. Before, the compiled op returned the
    gradients formed in forward (``"mean"``/``"sum"``) as outputs: a float32 hidden gradient
    for bfloat16 hidden states (N x d x 4 bytes: +32 MiB here with inductor), and its
    backward scaled each gradient out of place (a second copy: +16 MiB with a bfloat16 head
    under aot_eager)."""
    from benchmarks.fused_memory import in_subprocess

    eager = in_subprocess(case, N, D, V, dtype, chunk_size=CHUNK, full_warmup=True)
    compiled = in_subprocess(case, N, D, V, dtype, chunk_size=CHUNK, backend=backend)
    assert eager is not None
    assert compiled is not None
    assert compiled - eager < N * D * 2 // 4, (compiled, eager)
