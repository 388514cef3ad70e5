"""``crossent.info`` on PyTorch tensors against the same measures written in plain PyTorch.

Run: ``python -m benchmarks.bench_info [--quick]``.

The references are what a PyTorch user writes: ``F.kl_div`` of two ``log_softmax`` (KL),
the two halves of the Jensen–Shannon divergence against ``logaddexp(log p, log q) - log 2``,
``-(softmax · log_softmax).sum()`` (cross-entropy), ``Categorical(logits=z).entropy()``, and
from probabilities ``F.kl_div(q.log(), p)``, the two halves of JS against ``((p + q)/2).log()``
and ``-torch.xlogy`` (cross-entropy, entropy); ``crossent.distillation_loss`` (beta = 1/2, the
teacher a constant) against TRL's generalized JSD of two ``log_softmax``. crossent keeps nearly
equal rows and peaked rows accurate where these cancel: the last table gives the relative error
of each on float32 logits :math:`10^{-6}` apart against float64 (mpmath-grade: the float64
form of crossent's formula).

Per-call process CPU time, 1 thread, contenders interleaved round by round, median of the
rounds; ratio = crossent / reference; glibc's malloc thresholds raised for both (freed blocks
reused, as ``bench_sweep`` does: no page faults on every large temporary). ``no_grad``: the
value alone (crossent evaluates float32 divergences in float64 there,
``_logdiv.jsd_in_float64``); ``fwd+bwd``: the value and the gradient with respect to both
inputs (KL and JS: one autograd node, the closed-form gradient in float64; cross-entropy:
one node, ``_logdiv.cross_entropy_of_logits``; entropy: the peak-relative log-softmax's node,
``_logdiv._peak_log_softmax``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import crossent as ce
from benchmarks._util import interleaved_cpu_times
from crossent import info
from crossent._eval._memory import reuse_freed_memory

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kl_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)


def _js_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lp, lq = a.log_softmax(-1), b.log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl = lambda x: F.kl_div(lm, x, log_target=True, reduction="none").sum(-1)  # noqa: E731
    return (kl(lp) + kl(lq)) / 2


def _ce_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -(a.softmax(-1) * b.log_softmax(-1)).sum(-1)


def _entropy_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=a).entropy()


def _distill_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TRL's generalized JSD (beta = 1/2) of student `a` and teacher `b` (a constant)."""
    lq, lp = a.log_softmax(-1), b.detach().log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_p = F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
    kl_q = F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
    return 0.5 * kl_p + 0.5 * kl_q


def _kl_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return F.kl_div(q.log(), p, reduction="none").sum(-1)


def _js_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    lm = ((p + q) / 2).log()
    kl = lambda x: F.kl_div(lm, x, reduction="none").sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def _ce_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, q).sum(-1)


def _entropy_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)


CASES: dict[str, tuple[Fn, Fn, bool]] = {
    "kl_divergence, logits": (
        lambda a, b: info.kl_divergence(a, b, from_logits=True), _kl_logits, True,
    ),
    "js_divergence, logits": (
        lambda a, b: info.js_divergence(a, b, from_logits=True), _js_logits, True,
    ),
    "cross_entropy, logits": (
        lambda a, b: info.cross_entropy(a, b, from_logits=True), _ce_logits, True,
    ),
    "entropy, logits": (
        lambda a, b: info.entropy(a, from_logits=True), _entropy_logits, True,
    ),
    "distillation_loss, logits": (
        lambda a, b: ce.distillation_loss(a, b, reduction="none"), _distill_logits, True,
    ),
    "kl_divergence, probabilities": (info.kl_divergence, _kl_probs, False),
    "js_divergence, probabilities": (info.js_divergence, _js_probs, False),
    "cross_entropy, probabilities": (info.cross_entropy, _ce_probs, False),
    "entropy, probabilities": (lambda a, b: info.entropy(a), _entropy_probs, False),
}  # fmt: skip


def _step(fn: Fn, a: torch.Tensor, b: torch.Tensor, grad: bool) -> Callable[[], object]:
    if not grad:
        return lambda: fn(a, b)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()

    def run() -> None:
        x.grad = y.grad = None
        fn(x, y).sum().backward()

    return run


def _speed(sizes: list[tuple[int, int]], calls: int, rounds: int) -> None:
    print("\n| case | size | mode | torch µs | crossent µs | ratio |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, c in sizes:
        z1, z2 = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
        k = max(1, calls // max(1, n * c // 320))
        for name, (ours, ref, logits) in CASES.items():
            a, b = (z1, z2) if logits else (z1.softmax(-1), z2.softmax(-1))
            for grad in (False, True):
                fns = {"torch": _step(ref, a, b, grad), "crossent": _step(ours, a, b, grad)}
                if grad:
                    got = interleaved_cpu_times(fns, k, rounds)
                else:
                    with torch.no_grad():
                        got = interleaved_cpu_times(fns, k, rounds)
                t, o = got["torch"] * 1e6, got["crossent"] * 1e6
                mode = "fwd+bwd" if grad else "no_grad"
                print(f"| {name} | {n}x{c} | {mode} | {t:.1f} | {o:.1f} | {o / t:.2f} |")


def _accuracy() -> None:
    g = torch.Generator().manual_seed(1)
    zq = torch.randn(64, 1000, generator=g) * 2
    zp = zq + 1e-6 * torch.randn(64, 1000, generator=g)
    print("\nfloat32 logits 1e-6 apart, 64 x 1000: worst relative error of a row against float64")
    print("| measure | torch | crossent |")
    print("|---|---|---|")
    for name in ("kl_divergence, logits", "js_divergence, logits", "distillation_loss, logits"):
        ours, ref, _ = CASES[name]
        want = ours(zp.double(), zq.double())
        err = [float(((f(zp, zq).double() - want).abs() / want).max()) for f in (ref, ours)]
        print(f"| {name} | {err[0]:.1e} | {err[1]:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reuse_freed_memory()
    sizes = [(32, 10), (256, 100)] if args.quick else [(32, 10), (256, 100), (1024, 1000)]
    _speed(sizes, calls=20 if args.quick else 400, rounds=3 if args.quick else 5)
    _accuracy()


if __name__ == "__main__":
    main()
