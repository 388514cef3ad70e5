r"""Sparse cross-entropy of float16/bfloat16 logits on CUDA: two Triton passes, no float32 copy.

PyTorch's own float16/bfloat16 cross-entropy rounds the log-softmax to the
input dtype (its mean overflows in float16, its gradient is well above the
rounding floor), and computing it in float32 through PyTorch's kernels needs a
float32 copy of the logits: 2.7–2.9× PyTorch's time and twice its memory,
measured on an H200 (``python -m benchmarks.gpu_check``). Here the fused loss's
kernels (:mod:`crossent.fused._kernels`) read the 16-bit logits as they are and
widen them to float32 in registers:

* forward, one pass: :func:`crossent.fused._launch.row_stats` gives each row's
  :class:`crossent._losses._rows.RowStats`, and :func:`crossent._losses._rows.row_loss`
  reads the loss off them;
* backward, one pass: :func:`crossent.fused._launch.logits_grad_` writes
  :math:`\partial\ell/\partial z = a p - b [k = y] - e w` (the coefficients of
  :func:`crossent._losses._rows.coefficients`, times the upstream gradient) into
  a new tensor in the input dtype. Only the per-row log-sum-exp is kept between
  the two.

Double backward (``create_graph=True``) recomputes the gradient with the
differentiable PyTorch formula, so second derivatives stay exact. Under
``torch.compile``, ``torch.export`` and ``torch.func`` this executor is not
used (those trace PyTorch's operations instead), nor for the focal loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from crossent._lib._xp import forward_ad_active, torch_tracing
from crossent._losses import _rows
from crossent._losses._options import CEOptions

__all__ = ["SparseRows", "usable"]

#: Run on CPU tensors too (tests, with ``TRITON_INTERPRET=1``).
ON_CPU = False

#: Smallest logits tensor (elements) this executor takes. Below it both crossent paths are
#: bound by host time (Python, kernel launches), not by the GPU, and the PyTorch path's
#: (a float32 copy, PyTorch's kernels) is smaller. On an H200 (bfloat16, fwd+bwd, CUDA
#: events; ``python -m benchmarks.gpu_check`` and a size sweep, 2026-11-30) 2048×32000 took
#: 0.90 ms there against 1.09 ms here, 4096×32000 (131M elements) 1.71 ms and 1500 MiB
#: there against 0.75–1.20 ms (two machines) and 250 MiB here, 8192×128256 13.6 ms and
#: 12 GiB there against 1.9 ms and 2 GiB here (PyTorch's own, less exact bfloat16 kernel:
#: 0.34, 0.63 and 4.6 ms).
MIN_ELEMENTS = 2**26

_LOW = (torch.float16, torch.bfloat16)


def usable(x: Tensor, opts: CEOptions) -> bool:
    """Whether this executor computes the loss: large 16-bit CUDA logits, eager, no focal."""
    if x.dtype not in _LOW or not (x.is_cuda or ON_CPU) or x.numel() < max(MIN_ELEMENTS, 1):
        return False
    if opts.kind != "logits" or opts.gamma != 0 or x.ndim == 0 or torch_tracing():
        return False
    if forward_ad_active():  # SparseRows has no jvp: dual tensors take PyTorch's operations
        return False
    from crossent.fused import _launch

    return _launch.triton_available()


class SparseRows(torch.autograd.Function):
    """Per-row loss of ``(n, C)`` row-major 16-bit logits; gradient by the Triton kernel.

    ``apply(x, label, valid, weight, opts, loss_of, recompute)`` returns the
    per-row loss and each row's target weight (0 at ignored rows; None without class
    weights; not differentiable), which the mean divides by; every `label` lies in
    ``[0, C)`` (ignored rows hold 0; the caller checks on the device, the kernels read the
    target logit unclamped). `loss_of` turns
    the kernel's :class:`~crossent._losses._rows.RowStats` into it, each row's target
    weight (0 at ignored rows; None without class weights) and the rows' log-sum-exp
    (the PyTorch executor's function, so the masking and the weights are written
    once); `recompute` is the executor's differentiable per-row loss of `x`, used for
    double backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        label: Tensor,
        valid: Tensor | None,
        weight: Tensor | None,
        opts: CEOptions,
        loss_of: Callable[[_rows.RowStats], tuple[Tensor, Tensor | None, Tensor]],
        recompute: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor | None]:
        from crossent.fused import _launch

        m, s, wd, z_y = _launch.row_stats(
            x,
            label,
            weight,
            softcap=opts.softcap,
            smoothing=opts.label_smoothing != 0,
            inside=True,
        )
        wsum = float(x.shape[1]) if weight is None else weight.sum()
        stats = _rows.RowStats(m=m, s=s, wd=wd, wsum=wsum, z_y=z_y)
        row, w_y, big_l = loss_of(stats)
        # the L the gradient kernel reads p = exp(z - L) with: an ignored row of -inf only gets
        # L = 0 (p = 0, a zero gradient), not -inf (p = exp(-inf + inf) NaN times its zero
        # scale); any other row without a finite L (NaN, +inf, a counted row of -inf) gets NaN,
        # so that its gradient is NaN throughout (p was 0 at its finite logits under a +inf)
        nan = math.nan
        counted = big_l.nan_to_num(nan=nan, posinf=nan, neginf=nan)  # one operation
        if valid is not None:
            big_l = torch.where(valid, counted, big_l.nan_to_num(nan=nan, posinf=nan, neginf=0.0))
        else:
            big_l = counted
        ctx.save_for_backward(x, label, valid, weight, big_l, w_y)
        ctx.opts, ctx.recompute, ctx.wsum = opts, recompute, wsum
        if w_y is not None:
            ctx.mark_non_differentiable(w_y)
        return row, w_y

    @staticmethod
    def backward(ctx: Any, grad_row: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x, label, valid, weight, big_l, w_y = ctx.saved_tensors
        opts: CEOptions = ctx.opts
        none = (None, None, None, None, None, None)
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient, exact 2nd order
            with torch.enable_grad():
                row = ctx.recompute(x)
            (grad,) = torch.autograd.grad(row, x, grad_row.to(row.dtype), create_graph=True)
            return (grad, *none)
        from crossent.fused import _launch

        if w_y is None:  # no class weights: 1 for every row (a cached tensor, broadcast)
            w_y = _launch._constants((1.0,), big_l.dtype, big_l.device)
        scale = grad_row.to(big_l.dtype)
        if valid is not None:
            scale = torch.where(valid, scale, 0.0)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _launch.logits_grad_(
            x,
            label,
            weight,
            big_l,
            w_y,
            scale,
            ctx.wsum,
            label_smoothing=opts.label_smoothing,
            num_classes=x.shape[1],
            z_loss=opts.z_loss,
            softcap=opts.softcap,
            out=out,
            inside=True,
        )
        return (out, *none)
