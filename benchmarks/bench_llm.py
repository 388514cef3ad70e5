"""Language-model heads: fused log-probs + entropy and fused distillation vs materialized logits.

Contenders (forward + backward unless said otherwise, the same inputs, one CPU thread):

* ``log-probs``: :func:`crossent.fused.linear_log_probs` with ``return_entropy=True`` in a
  policy-gradient loss ``-(A·log p).mean() - 0.01·H.mean()`` against the materialized
  reference ``log_softmax(h @ W.T) -> gather + entropy`` with autograd.
* ``log-probs,no_grad``: the same two, forward only under :func:`torch.no_grad`, as RL
  rollouts score the old and the reference policy.
* ``distill``: :func:`crossent.fused.linear_distillation_loss` (β = 0.5) against the
  materialized generalized JSD (both models' logits, ``log_softmax``, log-space mixture,
  two KL terms, as TRL's ``generalized_jsd_loss``) with autograd.
* ``distill, close``: the same with a teacher close to the student (its hidden states
  moved by 0.02: a KL near 2e-4 per token, late in a distillation), where crossent computes
  every row again from the logits, in float64 (the materialized formula's values are off
  by 2e-3 relative there, crossent's by 1e-7, at N=256, d=256, V=8000).

Time is process CPU time; contenders alternate A, B, A, B over rounds and the table
reports each one's median and the median of the per-round ratios. Memory is the extra
peak RSS of one forward+backward in a fresh process (VmHWM after resetting it), minus
the gradients' bytes, also in units of one crossent chunk of float32 logits
(``chunk × V × 4`` B, the chunk crossent picks). Goals (issue 10): time ≤ 0.8× the
materialized reference at N=4096, d=1024, V=32000; extra memory ≤ 1.2 chunks.

On CUDA, :func:`cuda_section` adds Liger Kernel's fused linear JSD and cut-cross-entropy's
per-token loss when they are installed. Other sections (the patched Hugging Face training
step) register themselves in :data:`SECTIONS`.

Usage::

    python -m benchmarks.bench_llm                 # N=4096, d=1024, V=32000, float32
    python -m benchmarks.bench_llm --quick         # tiny shapes, one round, no memory runs
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

from benchmarks._hf import hf_section
from benchmarks._util import REPO, reset_peak_rss, rss_mib
from crossent.fused import linear_distillation_loss, linear_log_probs
from crossent.fused._chunked import _auto_chunk_size

SHAPE = (4096, 1024, 32000)
QUICK_SHAPE = (256, 64, 2000)
ENTROPY_BONUS = 0.01
BETA = 0.5
#: The hidden-state noise between the student and the teacher of ``distill, close``.
CLOSE = 0.02

Inputs = dict[str, Any]
Case = Callable[[Inputs], torch.Tensor]

#: Extra sections ``fn(args)`` run after the two tables (e.g. a Hugging Face training step).
SECTIONS: list[Callable[[argparse.Namespace], None]] = []


def make_inputs(n: int, d: int, v: int, device: str = "cpu") -> Inputs:
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden": torch.randn(n, d, generator=gen).to(device).requires_grad_(),
        "weight": (torch.randn(v, d, generator=gen) / d**0.5).to(device).requires_grad_(),
        "target": torch.randint(0, v, (n,), generator=gen).to(device),
        "advantage": torch.randn(n, generator=gen).to(device),
        "t_hidden": torch.randn(n, d, generator=gen).to(device),
        "t_weight": (torch.randn(v, d, generator=gen) * 1.5 / d**0.5).to(device),
    }
    # the close teacher's hidden states: an input, like the other teacher's (not extra memory)
    inputs["c_hidden"] = (
        inputs["hidden"].detach() + torch.randn(n, d, generator=gen).to(device) * CLOSE
    )
    return inputs


# ------------------------------------------------------------------------------ contenders


def _pg_loss(lp: torch.Tensor, ent: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    return -(advantage * lp).mean() - ENTROPY_BONUS * ent.mean()


def log_probs_fused(x: Inputs) -> torch.Tensor:
    lp, ent = linear_log_probs(x["hidden"], x["weight"], x["target"], return_entropy=True)
    return _pg_loss(lp, ent, x["advantage"])


def log_probs_materialized(x: Inputs) -> torch.Tensor:
    logp = torch.log_softmax(F.linear(x["hidden"], x["weight"]).float(), dim=-1)
    lp = logp.gather(-1, x["target"][:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return _pg_loss(lp, ent, x["advantage"])


def distill_fused(x: Inputs) -> torch.Tensor:
    return linear_distillation_loss(
        x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], beta=BETA
    )


def _close_teacher(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher close to the student: its hidden states moved by ``CLOSE`` (a KL near 2e-4
    per token, where every row's divergence is computed again from the logits)."""
    return x["c_hidden"], x["weight"].detach()


def distill_close_fused(x: Inputs) -> torch.Tensor:
    t_hidden, t_weight = _close_teacher(x)
    return linear_distillation_loss(x["hidden"], x["weight"], t_hidden, t_weight, beta=BETA)


def distill_close_materialized(x: Inputs) -> torch.Tensor:
    return distill_materialized(x, teacher=_close_teacher(x))


def distill_materialized(
    x: Inputs, teacher: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """TRL-style generalized JSD on materialized logits (teacher under no_grad)."""
    t_hidden, t_weight = (x["t_hidden"], x["t_weight"]) if teacher is None else teacher
    log_q = torch.log_softmax(F.linear(x["hidden"], x["weight"]).float(), dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(F.linear(t_hidden, t_weight).float(), dim=-1)
    log_m = torch.logsumexp(
        torch.stack(
            [log_q + torch.log1p(torch.tensor(-BETA)), log_p + torch.log(torch.tensor(BETA))]
        ),
        dim=0,
    )
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return (BETA * kl_p + (1 - BETA) * kl_q).mean()


def no_grad(fn: Case) -> Case:
    """``fn`` run forward only under :func:`torch.no_grad` (named ``<fn>_no_grad``)."""

    def run(x: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    run.__name__ = f"{fn.__name__}_no_grad"
    return run


PAIRS: dict[str, tuple[Case, Case]] = {
    "log-probs+entropy": (log_probs_fused, log_probs_materialized),
    "log-probs,no_grad": (no_grad(log_probs_fused), no_grad(log_probs_materialized)),
    "distill (JSD)": (distill_fused, distill_materialized),
    "distill, close": (distill_close_fused, distill_close_materialized),
}
CASES: dict[str, Case] = {fn.__name__: fn for pair in PAIRS.values() for fn in pair}


def fwd_bwd(fn: Case, x: Inputs) -> None:
    """One call of ``fn``, and its backward unless it ran under ``no_grad``."""
    x["hidden"].grad = None
    x["weight"].grad = None
    loss = fn(x)
    if loss.requires_grad:
        loss.backward()


# -------------------------------------------------------------------------------- timing


def cpu_seconds(fn: Case, x: Inputs) -> float:
    start = time.process_time()
    fwd_bwd(fn, x)
    return time.process_time() - start


def interleaved(a: Case, b: Case, x: Inputs, rounds: int) -> tuple[float, float, float]:
    """Median CPU seconds of a and b, and the median per-round ratio a/b (A, B, A, B …)."""
    fwd_bwd(a, x)  # warm-up (workspace, thread pools)
    fwd_bwd(b, x)
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(cpu_seconds(a, x))
        tb.append(cpu_seconds(b, x))
    ratios = [p / q for p, q in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


# -------------------------------------------------------------------------------- memory


def measure_memory(case: str, n: int, d: int, v: int) -> dict[str, int]:
    """In a fresh process: extra peak RSS of one forward+backward, and the gradients' bytes."""
    torch.set_num_threads(1)
    fn = CASES[case]
    fwd_bwd(fn, make_inputs(8, d, min(v, 64)))  # lazy initialisation before the baseline
    x = make_inputs(n, d, v)
    grad_bytes = sum(x[k].numel() * x[k].element_size() for k in ("hidden", "weight"))
    base = int(reset_peak_rss() * 2**20)
    fwd_bwd(fn, x)
    peak = int(rss_mib("VmHWM") * 2**20)
    if x["hidden"].grad is None:  # forward only: no gradients to discount
        grad_bytes = 0
    return {"extra": peak - base - grad_bytes}


def memory_in_subprocess(case: str, n: int, d: int, v: int) -> int | None:
    cmd = [sys.executable, "-m", "benchmarks.bench_llm", "--_memory", json.dumps([case, n, d, v])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["extra"])


# ----------------------------------------------------------------------------------- CUDA


def cuda_section(args: argparse.Namespace) -> None:
    """On CUDA: crossent vs Liger Kernel's fused linear JSD and cut-cross-entropy (if installed)."""
    if not torch.cuda.is_available():
        print("\n(no CUDA device: the Liger Kernel / cut-cross-entropy comparison is skipped)")
        return
    n, d, v = QUICK_SHAPE if args.quick else SHAPE
    x = make_inputs(n, d, v, device="cuda")
    x = {
        k: (t.detach().bfloat16().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
        for k, t in x.items()
    }
    contenders: dict[str, Case] = {
        "crossent log-probs": lambda x: (
            -linear_log_probs(x["hidden"], x["weight"], x["target"]).mean()
        ),
        "crossent distill": distill_fused,
        "materialized distill": distill_materialized,
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        contenders["cce per-token CE"] = lambda x: cce(
            x["hidden"], x["weight"], x["target"], reduction="none"
        ).mean()
    except ImportError:
        print("cut-cross-entropy not installed: skipped")
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=BETA)
        contenders["liger fused JSD"] = lambda x: jsd(  # shift_labels: no label mask
            x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], None
        )
    except ImportError:
        print("liger-kernel not installed: skipped")
    print(f"\n## CUDA, bfloat16, N={n} d={d} V={v}")
    print(f"{'contender':<22} {'fwd+bwd ms':>11} {'peak extra MiB':>15}")
    for name, fn in contenders.items():
        fwd_bwd(fn, x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            fwd_bwd(fn, x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        extra = torch.cuda.max_memory_allocated() - base
        print(f"{name:<22} {1e3 * statistics.median(times):>11.2f} {extra / 2**20:>15.0f}")


SECTIONS.append(cuda_section)
SECTIONS.append(hf_section)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round, no memory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "D", "V"))
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        print(json.dumps(measure_memory(*json.loads(args._memory))))
        return
    torch.set_num_threads(1)
    if args.quick:
        args.rounds = 1
    n, d, v = args.shape or (QUICK_SHAPE if args.quick else SHAPE)
    chunk = _auto_chunk_size(n, v, low_precision=False)
    chunk_bytes = chunk * v * 4
    print(f"torch {torch.__version__}, 1 thread, CPU time; N={n} d={d} V={v} float32")
    mib_chunk = chunk_bytes / 2**20
    print(f"logits {n * v * 4 / 2**20:.0f} MiB; one chunk ({chunk} tokens) {mib_chunk:.0f} MiB")
    x = make_inputs(n, d, v)
    head = ("task", "fused s", "material s", "ratio", "fused MiB", "mat. MiB", "fused/chunk")
    widths = (-18, 8, 10, 6, 9, 9, 11)
    print(
        " ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(head, widths, strict=True))
    )
    for task, (fused, materialized) in PAIRS.items():
        t_f, t_m, ratio = interleaved(fused, materialized, x, args.rounds)
        if args.quick:
            mem_f = mem_m = None
        else:
            mem_f = memory_in_subprocess(fused.__name__, n, d, v)
            mem_m = memory_in_subprocess(materialized.__name__, n, d, v)

        def mib(b: int | None) -> str:
            return "n/a" if b is None else f"{b / 2**20:.0f}"

        per_chunk = "n/a" if mem_f is None else f"{mem_f / chunk_bytes:.2f}"
        print(
            f"{task:<18} {t_f:>8.3f} {t_m:>10.3f} {ratio:>6.2f} {mib(mem_f):>9} {mib(mem_m):>9} "
            f"{per_chunk:>11}"
        )
    for section in SECTIONS:
        section(args)


if __name__ == "__main__":
    main()
