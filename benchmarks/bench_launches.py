"""Operations per call on an accelerator's eager path: crossent against PyTorch.

Run: ``python -m benchmarks.bench_launches [--quick]``.

At the sizes where most classifiers live, an eager loss on CUDA is bound by the host: each
PyTorch operation is a kernel launch of a few microseconds, whatever the tensor's size
(``benchmarks/gpu_check.py`` measured crossent at 2.0-2.6x PyTorch's time from 256 x 1000
to 2048 x 32000 in bfloat16). The number of operations one call dispatches is therefore a
proxy for that time which needs no GPU: the tensors here are on the ``meta`` device, which
takes the same non-CPU code paths as CUDA (no value read back) and runs no kernel. Each
operation PyTorch's dispatcher sees (``TorchDispatchMode``) is counted, for a forward under
``no_grad`` and a forward+backward, crossent's loss and PyTorch's own.

On CUDA crossent also checks values with validation on (targets in [0, 1]: one device read;
labels: a device-side assertion, four launches); ``meta`` tensors have no values, so the
counts leave those out.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_sweep import torch_cases


class _Count(TorchDispatchMode):
    """Counts every operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count(loss: Callable[[Any], Any], x: Any, *, backward: bool) -> int:
    """Operations of one call of `loss` on `x` (and its backward, if `backward`)."""
    x = x.detach().requires_grad_(backward)
    with _Count() as mode:
        if backward:
            loss(x).backward()
        else:
            with torch.no_grad():
                loss(x)
    return mode.ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="float32 only")
    args = parser.parse_args(argv)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    n, c = 256, 1000  # the counts do not depend on the size below the Triton executor's
    print("Operations dispatched per call on the meta device (an accelerator's eager path)")
    print(f"| {'case':<50} | {'torch':>5} | {'crossent':>8} | {'ratio':>5} |")
    print(f"|{'-' * 52}|{'-' * 7}|{'-' * 10}|{'-' * 7}|")
    for dtype in dtypes:
        for name, (x, ours, ref) in torch_cases(n, c, dtype, device="meta").items():
            for backward in (False, True):
                mine, theirs = count(ours, x, backward=backward), count(ref, x, backward=backward)
                what = (
                    f"{name} {str(dtype).removeprefix('torch.')} {'fwd+bwd' if backward else 'fwd'}"
                )
                print(f"| {what:<50} | {theirs:>5} | {mine:>8} | {mine / theirs:>5.2f} |")


if __name__ == "__main__":
    main()
