"""Extra peak memory of every fused function, in chunks of logits, per dtype configuration.

Issue 10's goal: the extra memory of one forward+backward of every fused function is at
most 1.2 chunks of logits. Functions: ``linear_cross_entropy`` (``"mean"``; also
``"none"`` with per-row upstream gradients), ``crossent.nn.LinearCrossEntropyLoss``,
``linear_log_probs`` (log-probs and entropy in a policy-gradient loss),
``linear_distillation_loss`` and the vocabulary-parallel forms (a gloo group of one
process). Dtypes: ``float32``, ``mixed`` (bfloat16 hidden states with a float32 head: a
float32 master weight) and ``bfloat16`` (both).

Each case runs in a fresh process (one thread): the extra memory is the resident-set
high-water mark during forward+backward (VmHWM after resetting it) above the resident set
after the inputs are built, minus the gradients' own bytes (each in its parameter's dtype).
A chunk is ``chunk × V × 4`` bytes, ``chunk`` being the automatic chunk crossent picks for
the shape and product dtype (as in ``benchmarks/fused.py`` and ``bench_llm.py``).

Usage::

    python -m benchmarks.fused_memory                          # N=4096, d=1024, V=32000
    python -m benchmarks.fused_memory --shapes 8192x4096x32000 --dtypes mixed --cases ce
    python -m benchmarks.fused_memory --upstream 0.37          # loss * 0.37: a scaled backward
    python -m benchmarks.fused_memory --quick                  # a smoke run (crossent bench)
    python -m benchmarks.fused_memory --backend inductor       # torch.compile(fullgraph=True)
    python -m benchmarks.fused_memory --full-warmup            # eager, warmed as compiled is
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._util import REPO, reset_peak_rss, rss_mib
from crossent.fused._chunked import _auto_chunk_size, clear_workspace

Inputs = dict[str, Any]

DTYPES = {  # hidden dtype, weight dtype
    "float32": (torch.float32, torch.float32),
    "mixed": (torch.bfloat16, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
}


def make_inputs(n: int, d: int, v: int, dtype: str, chunk_size: int | None = None) -> Inputs:
    h_dt, w_dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    return {
        "chunk_size": chunk_size,
        "hidden": torch.randn(n, d, generator=gen).to(h_dt).requires_grad_(),
        "weight": (torch.randn(v, d, generator=gen) / d**0.5).to(w_dt).requires_grad_(),
        "target": torch.randint(0, v, (n,), generator=gen),
        "row_grad": torch.rand(n, generator=gen),
        "t_hidden": torch.randn(n, d, generator=gen).to(h_dt),
        "t_weight": (torch.randn(v, d, generator=gen) * 1.5 / d**0.5).to(w_dt),
    }


def _group() -> Any:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(REPO, '.fused_memory_store')}",
            rank=0, world_size=1,
        )  # fmt: skip
    return dist.group.WORLD


def _ce(x: Inputs) -> torch.Tensor:
    from crossent.fused import linear_cross_entropy

    return linear_cross_entropy(x["hidden"], x["weight"], x["target"], chunk_size=x["chunk_size"])


def _ce_none(x: Inputs) -> torch.Tensor:
    from crossent.fused import linear_cross_entropy

    loss = linear_cross_entropy(
        x["hidden"], x["weight"], x["target"], reduction="none", chunk_size=x["chunk_size"]
    )
    return (loss * x["row_grad"]).sum()


def _nn(x: Inputs) -> torch.Tensor:
    from crossent.nn import LinearCrossEntropyLoss

    loss = LinearCrossEntropyLoss(chunk_size=x["chunk_size"])
    out: torch.Tensor = loss(x["hidden"], x["weight"], x["target"])
    return out


def _log_probs(x: Inputs) -> torch.Tensor:
    from crossent.fused import linear_log_probs

    lp, ent = linear_log_probs(
        x["hidden"], x["weight"], x["target"], return_entropy=True, chunk_size=x["chunk_size"]
    )
    return -(x["row_grad"] * lp).mean() - 0.01 * ent.mean()


def _distill(x: Inputs) -> torch.Tensor:
    from crossent.fused import linear_distillation_loss

    return linear_distillation_loss(
        x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], chunk_size=x["chunk_size"]
    )


def _vp_ce(x: Inputs) -> torch.Tensor:
    from crossent.distributed import vocab_parallel_linear_cross_entropy

    return vocab_parallel_linear_cross_entropy(
        x["hidden"], x["weight"], x["target"], group=_group(), chunk_size=x["chunk_size"]
    )


def _vp_log_probs(x: Inputs) -> torch.Tensor:
    from crossent.distributed import vocab_parallel_linear_log_probs

    lp, ent = vocab_parallel_linear_log_probs(
        x["hidden"], x["weight"], x["target"], group=_group(), return_entropy=True,
        chunk_size=x["chunk_size"],
    )  # fmt: skip
    return -(x["row_grad"] * lp).mean() - 0.01 * ent.mean()


CASES: dict[str, Callable[[Inputs], torch.Tensor]] = {
    "ce": _ce,
    "ce_none": _ce_none,
    "nn": _nn,
    "log_probs": _log_probs,
    "distill": _distill,
    "vp_ce": _vp_ce,
    "vp_log_probs": _vp_log_probs,
}


def fwd_bwd(fn: Callable[[Inputs], torch.Tensor], x: Inputs, upstream: float) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None
    loss = fn(x)
    (loss * upstream if upstream != 1 else loss).backward()


def chunk_bytes(n: int, d: int, v: int, dtype: str) -> int:
    """One chunk of float32 logits, ``chunk × V × 4`` B, at crossent's automatic chunk."""
    h_dt, w_dt = DTYPES[dtype]
    low = torch.promote_types(h_dt, w_dt) != torch.float32
    return _auto_chunk_size(n, v, low_precision=low) * v * 4


def warm_blas(n: int, d: int, v: int, dtype: str, chunk_size: int | None = None) -> None:
    """Plain ``torch.mm`` products of one chunk's shapes in the product dtype, then freed.

    The BLAS library allocates work memory of its own on its first product of a large shape
    and keeps it for the life of the process (16 MiB for a float32 512 x 1024 x 32000 product,
    3 MiB at 256 x 1024 x 64000, with one thread): a cost of the process, paid once by any
    code that multiplies at that size (the materialized reference as well), not extra memory
    of a forward+backward. Without this warm-up a cold measurement counts it (float32 ce at
    N=4096, d=1024, V=32000: 1.24 chunks cold, 1.00 warm)."""
    h_dt, w_dt = DTYPES[dtype]
    mm_dt = torch.promote_types(h_dt, w_dt)
    chunk = chunk_size or _auto_chunk_size(n, v, low_precision=mm_dt != torch.float32)
    h = torch.ones(chunk, d, dtype=mm_dt)
    w = torch.ones(v, d, dtype=mm_dt)
    g = h @ w.t()  # the logits
    _ = g @ w, g.t() @ h  # the hidden and the weight gradients
    del h, w, g, _


def measure(
    case: str,
    n: int,
    d: int,
    v: int,
    dtype: str,
    upstream: float,
    chunk_size: int | None = None,
    backend: str | None = None,
    full_warmup: bool = False,
) -> dict[str, int]:
    """In this (fresh) process: extra peak RSS of one forward+backward, gradients discounted.

    Before it, a forward+backward at a small shape initialises what is lazy, and
    :func:`warm_blas` the BLAS library's own work memory. With a
    `backend`, the case runs under ``torch.compile(fullgraph=True, backend=backend)``, and
    the first call is one of the same shape (so that the measured call runs the compiled
    graphs only), as with `full_warmup`; that call's cached work buffers are then released
    (:func:`in_subprocess` fixes glibc's mmap threshold for these runs). Compare a compiled
    case with an eager one measured with `full_warmup`."""
    torch.set_num_threads(1)
    fn = CASES[case]
    if backend is not None:
        fn = torch.compile(fn, fullgraph=True, backend=backend)
    if backend is None and not full_warmup:
        fwd_bwd(fn, make_inputs(8, d, min(v, 64), dtype), upstream)  # lazy initialisation
        warm_blas(n, d, v, dtype, chunk_size)
    else:
        fwd_bwd(fn, make_inputs(n, d, v, dtype, chunk_size), upstream)  # compiles, if compiled
        clear_workspace()  # the measured call allocates its own work buffers
    x = make_inputs(n, d, v, dtype, chunk_size)
    grads = sum(x[k].numel() * x[k].element_size() for k in ("hidden", "weight"))
    base = int(reset_peak_rss() * 2**20)
    fwd_bwd(fn, x, upstream)
    peak = int(rss_mib("VmHWM") * 2**20)
    return {"extra": peak - base - grads}


def in_subprocess(
    case: str,
    n: int,
    d: int,
    v: int,
    dtype: str,
    upstream: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
    full_warmup: bool = False,
) -> int | None:
    """:func:`measure` in a fresh process (bytes; None if it failed, its error on stderr)."""
    arg = json.dumps([case, n, d, v, dtype, upstream, chunk_size, backend, full_warmup])
    cmd = [sys.executable, "-m", "benchmarks.fused_memory", "--_measure", arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if backend is not None or full_warmup:
        # glibc raises its mmap threshold to the size of a freed mmapped block (up to 32 MiB):
        # the warm-up's buffers would stay in the heap, counted in the base, and the measured
        # call would reuse them without raising the high-water mark (32 MiB less at
        # N=8192, d=2048, V=4000 mixed). A fixed threshold keeps every large block mmapped.
        # (warm_blas's large blocks are above 32 MiB; its small ones, a chunk of rows by d,
        # are below a MiB.)
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["extra"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x1024x32000", help="NxdxV,NxdxV,...")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--upstream", type=float, default=1.0, help="upstream gradient")
    parser.add_argument(
        "--backend", help="run each case under torch.compile(fullgraph=True, backend=BACKEND)"
    )
    parser.add_argument(
        "--full-warmup",
        action="store_true",
        help="first call at the measured shape (as compiled cases have): compare with --backend",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 256x64x2000, mixed, ce and log_probs"
    )
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(*json.loads(args._measure))))
        return
    if args.quick:
        args.shapes, args.dtypes, args.cases = "256x64x2000", "mixed", "ce,log_probs"
    mode = "eager" if args.backend is None else f"compiled ({args.backend}, fullgraph)"
    mode += ", warmed at the measured shape" if args.full_warmup or args.backend else ""
    print(
        f"torch {torch.__version__}; {mode}; upstream gradient {args.upstream}; goal <= 1.2 chunks"
    )
    print(f"{'N x d x V':<18} {'dtype':<9} {'case':<13} {'chunk MiB':>9} {'extra MiB':>9} "
          f"{'chunks':>7}")  # fmt: skip
    for shape in args.shapes.split(","):
        n, d, v = (int(s) for s in shape.split("x"))
        for dtype in args.dtypes.split(","):
            unit = chunk_bytes(n, d, v, dtype)
            for case in args.cases.split(","):
                extra = in_subprocess(
                    case, n, d, v, dtype, args.upstream, backend=args.backend,
                    full_warmup=args.full_warmup,
                )  # fmt: skip
                shown = "n/a" if extra is None else f"{extra / 2**20:9.0f} {extra / unit:7.2f}"
                print(f"{shape:<18} {dtype:<9} {case:<13} {unit / 2**20:9.1f} {shown}", flush=True)


if __name__ == "__main__":
    main()
