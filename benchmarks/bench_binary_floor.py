"""Binary CE with logits: what each unavoidable piece costs next to PyTorch's whole call.

Run: ``python -m benchmarks.bench_binary_floor [--quick]``.

crossent does not hand small inputs to ``F.binary_cross_entropy_with_logits``: PyTorch's
formula :math:`(1-t)x - \\log\\sigma(x)` cancels for confidently right logits (the second
table: relative error per element against the exact value, float32) and its gradient
:math:`\\sigma(x) - t` rounds small gradients to 0. The exact formula needs two ``softplus``
kernels, a ``lerp``, a sum and a 0-d division, and the validation of the targets one
``aminmax`` and two reads; the first table prints each of them (per-call process CPU time,
1 thread, median of interleaved rounds), their sum, and PyTorch's call and crossent's
whole call, each as a ratio to PyTorch's. The third table does the same for a forward+backward
at 256 × 100, where crossent's chunked path keeps the exact gradient computed in the forward
pass: two ``sigmoid``, one ``log1p`` and the cheap kernels around them, the validation, and an
``autograd.Function`` that does no work (its forward and the backward engine's round trip).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F

import crossent as ce
from benchmarks._util import interleaved_cpu_times


def _pieces(n: int, c: int, calls: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g)
    t = (torch.rand(n, c, generator=g) > 0.5).float()
    sp = torch._C._nn.softplus
    a, b = sp(x, 1, 40.0), sp(x, -1, 40.0)
    total, count = a.sum(), torch.tensor(float(-x.numel()))
    pieces: dict[str, Callable[[], object]] = {
        "softplus(x, beta=1)": lambda: sp(x, 1, 40.0),
        "softplus(x, beta=-1)": lambda: sp(x, -1, 40.0),
        "neg_": lambda: a.neg_(),
        "lerp_(b, t)": lambda: a.lerp_(b, t),
        "sum": lambda: a.sum(),
        "0-d div_": lambda: total.div_(count),
        "validation: aminmax(t) + 2 item": lambda: [v.item() for v in torch.aminmax(t)],
        "NaN test of the result: item": lambda: total.item(),
    }
    whole: dict[str, Callable[[], object]] = {
        "F.binary_cross_entropy_with_logits": lambda: F.binary_cross_entropy_with_logits(x, t),
        "crossent.binary_cross_entropy": lambda: ce.binary_cross_entropy(x, t, from_logits=True),
    }
    with torch.no_grad():
        got = interleaved_cpu_times({**whole, **pieces}, calls, rounds)
    _table(f"forward under no_grad, {n}x{c} float32", got, pieces, whole)


class _NoWork(torch.autograd.Function):
    """A custom autograd node whose forward allocates the gradient that its backward returns,
    and computes nothing: what the node itself costs (called as crossent calls its nodes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.grad = torch.empty_like(x)
        return x.new_ones(())

    @staticmethod
    def backward(ctx: Any, up: torch.Tensor) -> torch.Tensor:
        grad, ctx.grad = ctx.grad, None
        return grad


_NO_WORK = super(torch.autograd.Function, _NoWork).apply


def _chunk_pieces(n: int, c: int, calls: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g)
    t = (torch.rand(n, c, generator=g) > 0.5).float()
    xg = x.clone().requires_grad_(True)
    a, b, d = (torch.sigmoid(x) for _ in range(3))
    scale = torch.tensor(1.0 / x.numel())

    def step(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss().backward()
            xg.grad = None

        return run

    pieces: dict[str, Callable[[], object]] = {
        "sigmoid(x) (x2)": lambda: (torch.sigmoid(x, out=a), torch.sigmoid(x, out=b)),
        "neg(x)": lambda: torch.neg(x, out=d),
        "minimum": lambda: torch.minimum(a, b, out=d),
        "neg_ (x2)": lambda: (d.neg_(), d.neg_()),
        "log1p": lambda: torch.log1p(a, out=d),
        "lerp (x2)": lambda: (torch.lerp(a, b, t, out=d), torch.lerp(a, b, t, out=d)),
        "mul_ (the mean's 1/n)": lambda: d.mul_(scale),
        "clamp_min": lambda: torch.clamp_min(x, 0, out=d),
        "sub": lambda: torch.sub(a, x, out=d),
        "sum (x2)": lambda: (d.sum(), d.sum()),
        "validation: aminmax(t as int32) + 2 item": lambda: [
            v.item() for v in torch.aminmax(t.view(torch.int32))
        ],
        "autograd.Function doing nothing, fwd+bwd": step(lambda: _NO_WORK(xg)),
    }
    whole: dict[str, Callable[[], object]] = {
        "F.binary_cross_entropy_with_logits": step(
            lambda: F.binary_cross_entropy_with_logits(xg, t)
        ),
        "crossent.binary_cross_entropy": step(
            lambda: ce.binary_cross_entropy(xg, t, from_logits=True)
        ),
    }
    got = interleaved_cpu_times({**whole, **pieces}, calls, rounds)
    _table(f"forward+backward, {n}x{c} float32", got, pieces, whole)


def _table(
    title: str, got: dict[str, float], pieces: Collection[str], whole: Collection[str]
) -> None:
    ref = got["F.binary_cross_entropy_with_logits"]
    print(f"\n{title} (ratio = time / PyTorch's whole call)")
    print(f"| {'piece':<40} | {'µs':>7} | {'ratio':>5} |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 7}|")
    kernels = 0.0
    for name in (*pieces, "sum of the pieces", *whole):
        if name == "sum of the pieces":
            value = kernels
        else:
            value = got[name]
            kernels += value if name in pieces else 0.0
        print(f"| {name:<40} | {value * 1e6:>7.2f} | {value / ref:>5.2f} |")


def _accuracy() -> None:
    print("\nfloat32, confidently right hard targets: relative error against the exact loss")
    print(f"| {'|x|':>5} | {'exact loss':>10} | {'PyTorch':>9} | {'crossent':>9} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 11}|")
    for a in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        x, t = torch.tensor([-a, a]), torch.tensor([0.0, 1.0])
        exact = torch.log1p(torch.exp(-x.double().abs()))  # x and t agree: sp(-|x|)
        errs = []
        for fn in (F.binary_cross_entropy_with_logits, _crossent_none):
            got = fn(x, t, reduction="none").double()
            errs.append(float(((got - exact).abs() / exact).max()))
        print(f"| {a:>5.0f} | {float(exact[0]):>10.3e} | {errs[0]:>9.1e} | {errs[1]:>9.1e} |")


def _crossent_none(x: torch.Tensor, t: torch.Tensor, *, reduction: str) -> torch.Tensor:
    return ce.binary_cross_entropy(x, t, from_logits=True, reduction=reduction)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _pieces(32, 10, calls=300 if args.quick else 20000, rounds=3 if args.quick else 7)
    _accuracy()
    _chunk_pieces(256, 100, calls=30 if args.quick else 2000, rounds=3 if args.quick else 7)


if __name__ == "__main__":
    main()
