"""Fused linear cross-entropy: forward+backward time and peak memory.

Providers, timed in this process on the same inputs:

* ``crossent``   — :func:`crossent.fused.linear_cross_entropy` (chunk_size=None)
* ``eager``      — ``F.cross_entropy(F.linear(h, W), y)``
* ``torch-lce``  — ``torch.nn.functional.linear_cross_entropy`` with
  ``options=LinearCrossEntropyOptions()`` (its chunked path; torch >= 2.13)

plus the three-GEMM floor: the three matrix products alone
(``h_c @ W.T``, ``G @ W``, ``G.T @ h_c``) on the same chunks, output buffers and
dtype as crossent, timed in the same run (and once unchunked, for reference).

Memory: each provider runs once more in a fresh subprocess; the peak resident
memory during forward+backward above the resident memory after the inputs are
built (VmHWM after resetting it through /proc/self/clear_refs; the CUDA
allocator's peak on a GPU), minus the gradients' bytes, is the "extra" memory,
also printed in units of one crossent chunk of float32 logits (chunk × V × 4 B).

Usage::

    python benchmarks/fused.py                      # the two CPU shapes, float32
    python benchmarks/fused.py --dtype bfloat16
    python benchmarks/fused.py --small              # a quick smoke run (one timed call)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._util import REPO, reset_peak_rss, rss_mib
from crossent.fused import linear_cross_entropy
from crossent.fused._chunked import _auto_chunk_size

SHAPES = [(4096, 1024, 32000), (2048, 512, 32000), (2048, 512, 128000)]
SMALL_SHAPES = [(512, 128, 4000)]  # a smoke run (each provider measured in its own process)


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    weight = torch.randn(v, d, generator=gen).mul_(1.0 / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "target": target,
    }


def _has_torch_lce() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def providers() -> dict[str, Callable[[dict[str, Any]], torch.Tensor]]:
    out: dict[str, Callable[[dict[str, Any]], torch.Tensor]] = {
        "crossent": lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["target"]),
        "eager": lambda x: F.cross_entropy(F.linear(x["hidden"], x["weight"]), x["target"]),
    }
    if _has_torch_lce():
        opts = torch.nn.LinearCrossEntropyOptions()
        out["torch-lce"] = lambda x: F.linear_cross_entropy(
            x["hidden"], x["weight"], x["target"], options=opts
        )
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn: Callable[[dict[str, Any]], torch.Tensor], x: dict[str, Any]) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None
    fn(x).backward()


def time_it(run: Callable[[], None], *, repeat: int, device: str) -> float:
    run()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def three_gemm_floor(x: dict[str, Any], chunk: int | None) -> Callable[[], None]:
    """The three matrix products of crossent's loop (same chunks, buffers, dtypes)."""
    h, w = x["hidden"].detach(), x["weight"].detach()
    n, d = h.shape
    v = w.shape[0]
    low = h.dtype in (torch.float16, torch.bfloat16)
    step = n if chunk is None else chunk
    buf = torch.empty(step, v, dtype=torch.float32 if low else h.dtype, device=h.device)
    lp = torch.empty(step, v, dtype=h.dtype, device=h.device) if low else buf
    if low:  # real values (never-written pages would all map the zero page and read fast)
        buf.normal_()
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(v, d, dtype=torch.float32 if low else h.dtype, device=h.device)

    def run() -> None:
        for s in range(0, n, step):
            e = min(s + step, n)
            h_c = h[s:e]
            torch.mm(h_c, w.t(), out=lp[: e - s])
            torch.mm(lp[: e - s], w, out=grad_h[s:e])
            if low and h.device.type == "cpu":  # crossent's float32 weight-gradient product
                torch.addmm(grad_w, buf[: e - s].t(), h_c.float(), out=grad_w)
            else:
                torch.addmm(grad_w, lp[: e - s].t(), h_c, out=grad_w)

    return run


# ------------------------------------------------------------------------------ memory


def measure_memory(
    provider: str, n: int, d: int, v: int, dtype: str, device: str
) -> dict[str, int]:
    """Run in a fresh process: extra peak memory of one forward+backward."""
    fn = providers()[provider]
    small = make_inputs(8, d, min(v, 64), getattr(torch, dtype), device)
    fwd_bwd(fn, small)  # lazy initialisation (thread pools, kernels) before the baseline
    x = make_inputs(n, d, v, getattr(torch, dtype), device)
    grad_bytes = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"]))
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = int(reset_peak_rss() * 2**20)
        fwd_bwd(fn, x)
        peak = int(rss_mib("VmHWM") * 2**20)
    return {"peak_above_inputs": peak - base, "grad_bytes": grad_bytes}


def memory_in_subprocess(provider: str, n: int, d: int, v: int, dtype: str, device: str) -> Any:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.fused",
        "--_memory",
        json.dumps([provider, n, d, v, dtype, device]),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- main


def bench_shape(n: int, d: int, v: int, *, dtype: str, device: str, repeat: int) -> None:
    dt = getattr(torch, dtype)
    x = make_inputs(n, d, v, dt, device)
    low = dt in (torch.float16, torch.bfloat16)
    chunk = _auto_chunk_size(n, v, low_precision=low, softcap=False)
    chunk_bytes = chunk * v * 4
    print(f"\n## N={n} d={d} V={v} {dtype} on {device}; crossent chunk = {chunk} tokens")
    mib = 2**20
    print(f"   logits (N×V×4 B): {n * v * 4 / mib:.0f} MiB; one chunk: {chunk_bytes / mib:.0f} MiB")

    times: dict[str, float] = {}
    for name, fn in providers().items():

        def run(fn: Callable[[dict[str, Any]], torch.Tensor] = fn) -> None:
            fwd_bwd(fn, x)

        times[name] = time_it(run, repeat=repeat, device=device)
    floor = time_it(three_gemm_floor(x, chunk), repeat=repeat, device=device)
    floor_full = time_it(three_gemm_floor(x, None), repeat=repeat, device=device)
    ours = times["crossent"]

    head = ("provider", "fwd+bwd s", "crossent/x", "extra MiB", "extra/chunk")
    print(f"{head[0]:<12} {head[1]:>10} {head[2]:>11} {head[3]:>10} {head[4]:>12}")
    for name, t in times.items():
        mem = memory_in_subprocess(name, n, d, v, dtype, device)
        if mem is None:
            extra_s, ratio_s = "n/a", "n/a"
        else:
            extra = mem["peak_above_inputs"] - mem["grad_bytes"]
            extra_s = f"{extra / 2**20:.0f}"
            ratio_s = f"{extra / chunk_bytes:.2f}"
        print(f"{name:<12} {t:>10.3f} {ours / t:>11.2f} {extra_s:>10} {ratio_s:>12}")
    flops = 6 * n * v * d
    print(
        f"three-GEMM floor: {floor:.3f} s chunked ({flops / floor / 1e9:.0f} GFLOP/s), "
        f"{floor_full:.3f} s unchunked; crossent reaches {floor / ours:.1%} of the chunked "
        f"floor, {floor_full / ours:.1%} of the unchunked one"
    )
    if not _has_torch_lce():
        print("torch.nn.functional.linear_cross_entropy is not in this torch; skipped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--repeat", type=int, help="timed calls per provider, median (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--quick", "--small", dest="small", action="store_true", help="small shapes (smoke test)"
    )
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        print(json.dumps(measure_memory(*json.loads(args._memory))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # --quick is a smoke run (crossent bench --quick, in CI): one timed call after the warm-up
    repeat = args.repeat if args.repeat is not None else 1 if args.small else 3
    for n, d, v in SMALL_SHAPES if args.small else SHAPES:
        bench_shape(n, d, v, dtype=args.dtype, device=args.device, repeat=repeat)


if __name__ == "__main__":
    main()
