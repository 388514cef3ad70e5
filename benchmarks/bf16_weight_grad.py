"""Accuracy of a bfloat16 head's weight gradient: ways of accumulating it over chunks of rows.

Issue 10's goals meet here: the fused functions' extra memory (at most 1.2 chunks of
logits) and their bfloat16 accuracy (no worse than PyTorch's own bfloat16 computation).
With bfloat16 hidden states and head, the weight gradient :math:`\\nabla_W = \\sum_i G_i^\\top
h_i` sums one product per chunk of rows. Held in float32 (what crossent does) it costs more
memory than the bfloat16 gradient; held in bfloat16 it is rounded once per chunk. Compared,
on the same inputs, against the float64 gradient of the same bfloat16 inputs:

``pytorch``
    PyTorch's own: bfloat16 logits ``h @ W.T``, ``F.cross_entropy``, autograd (the bfloat16
    gradient of the logits, one bfloat16 product accumulated in float32, rounded once).
``crossent``
    ``crossent.fused.linear_cross_entropy``: float32 accumulation, rounded once.
``bf16 sum``
    Option (a): the running sum kept in bfloat16, a float32 product added per chunk and
    the sum rounded (``torch.addmm`` into a bfloat16 gradient).
``bf16 hi+lo``
    Option (b): the running sum as two bfloat16 numbers (the sum and its rounding error),
    2 bytes more than the gradient instead of 4.

The metric, the same for all: ``rel/u``, the relative error of the gradient in the
Frobenius norm, :math:`\\lVert g - g_{64} \\rVert / \\lVert g_{64} \\rVert`, in units of
bfloat16's unit roundoff :math:`u = 2^{-8}`; and ``ulp``, the mean of :math:`|g - g_{64}|`
over the elements in units of the spacing of bfloat16 numbers at :math:`|g_{64}|`. Rounding
the float64 gradient to bfloat16 gives at most 0.5 ulp.

Usage::

    python -m benchmarks.bf16_weight_grad                    # d=64, V=512, chunk 256
    python -m benchmarks.bf16_weight_grad --quick            # N up to 4096
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

BF = torch.bfloat16


def errors(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(rel/u, mean ulp)`` of `g` against the float64 `ref` (see the module docstring)."""
    diff = g.double() - ref
    rel = float(diff.norm() / ref.norm()) / 2**-8
    mag = ref.abs()
    nz = mag > 0
    spacing = torch.exp2(torch.floor(torch.log2(mag[nz])) - 7)  # 8 significant bits
    return rel, float((diff.abs()[nz] / spacing).mean())


def inputs(n: int, d: int, v: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(BF)
    w = (torch.randn(v, d, generator=gen) * 2 / d**0.5).to(BF)
    return h, w, torch.randint(0, v, (n,), generator=gen)


def reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The float64 weight gradient of the mean cross-entropy of the same bfloat16 inputs."""
    w64 = w.double().requires_grad_()
    F.cross_entropy(h.double() @ w64.T, y).backward()
    assert w64.grad is not None
    return w64.grad


def pytorch(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PyTorch's bfloat16 materialized gradient."""
    w = w.clone().requires_grad_()
    F.cross_entropy(h @ w.T, y).backward()
    assert w.grad is not None
    return w.grad


def crossent(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    from crossent.fused import linear_cross_entropy

    w = w.clone().requires_grad_()
    linear_cross_entropy(h, w, y, chunk_size=chunk).backward()
    assert w.grad is not None
    return w.grad


def rounded_sums(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int
) -> dict[str, torch.Tensor]:
    """Options (a) and (b): each chunk's float32 product (of the float32 gradient of the
    bfloat16 logits, as crossent forms it) added to a sum held in bfloat16, or in two."""
    n = h.shape[0]
    acc = torch.zeros(w.shape, dtype=BF)
    hi, lo = torch.zeros(w.shape, dtype=BF), torch.zeros(w.shape, dtype=BF)
    for s in range(0, n, chunk):
        h_c = h[s : s + chunk]
        g = torch.softmax((h_c @ w.T).float(), dim=1)
        g[torch.arange(h_c.shape[0]), y[s : s + chunk]] -= 1.0
        p = (g / n).T @ h_c.float()
        acc = (acc.float() + p).to(BF)
        total = hi.float() + lo.float() + p
        hi = total.to(BF)
        lo = (total - hi.float()).to(BF)
    return {"bf16 sum": acc, "bf16 hi+lo": (hi.float() + lo.float()).to(BF)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,4096,16384", help="N values")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--v", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="N = 1024, 4096")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = "1024,4096"
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; d={args.d} V={args.v} chunk={args.chunk}; "
          "rel/u: relative Frobenius error / 2^-8; ulp: mean error in bfloat16 ulps")  # fmt: skip
    print(f"{'N':>6} {'chunks':>6} {'method':<11} {'rel/u':>6} {'ulp':>6}")
    for n in (int(r) for r in args.rows.split(",")):
        h, w, y = inputs(n, args.d, args.v)
        ref = reference(h, w, y)
        grads = {"pytorch": pytorch(h, w, y), "crossent": crossent(h, w, y, args.chunk)}
        grads.update(rounded_sums(h, w, y, args.chunk))
        for name, g in grads.items():
            rel, ulp = errors(g, ref)
            print(f"{n:>6} {-(-n // args.chunk):>6} {name:<11} {rel:6.3f} {ulp:6.2f}", flush=True)


if __name__ == "__main__":
    main()
