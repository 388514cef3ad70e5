"""Launchers of the Triton kernels in :mod:`crossent.fused._kernels`.

The chunk loop (:func:`crossent.fused._chunked._chunked_linear_ce`) calls
:func:`row_stats` and :func:`logits_grad_` in place of its PyTorch element-wise
passes when the tensors live on CUDA (or when ``use_triton=True``, which with
``TRITON_INTERPRET=1`` also runs on CPU tensors, as the tests do). Triton is
imported here only on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

__all__ = ["logits_grad_", "row_stats", "triton_available"]

#: Vocabulary tile of the kernels (a power of two).
BLOCK_V = 1024


def triton_available() -> bool:
    """Whether Triton can be imported (it is optional: ``pip install crossent[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def _kernels() -> Any:
    return importlib.import_module("crossent.fused._kernels")


def _block(v: int, block_v: int | None) -> int:
    if block_v is not None:
        return int(block_v)
    return max(16, min(BLOCK_V, 1 << max(0, (v - 1).bit_length())))


def row_stats(
    buf: torch.Tensor,
    y_loc: torch.Tensor,
    cw_local: torch.Tensor | None,
    *,
    softcap: float | None,
    smoothing: bool,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, s, S, z_y - m)`` of each row of the raw logits `buf` (see ``_row_stats_kernel``).

    `buf` is left unchanged; `y_loc` holds local column indices in ``[0, V_local)``.
    """
    n, v = buf.shape
    if buf.stride(1) != 1:
        msg = "internal: the logits buffer must be row-major."
        raise RuntimeError(msg)
    out = torch.empty((4, n), dtype=buf.dtype, device=buf.device)
    k = _kernels()
    k._row_stats_kernel[(n,)](
        buf,
        buf.stride(0),
        y_loc.contiguous(),
        cw_local if cw_local is not None else buf,
        out[0],
        out[1],
        out[2],
        out[3],
        v,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_WEIGHT=cw_local is not None,
        HAS_SMOOTHING=smoothing,
        BLOCK_V=_block(v, block_v),
    )
    return out[0], out[1], out[2], out[3]


def logits_grad_(
    buf: torch.Tensor,
    y_loc: torch.Tensor,
    owned: torch.Tensor,
    cw_local: torch.Tensor | None,
    lse: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    coef_eps: torch.Tensor,
    *,
    softcap: float | None,
    smoothing: bool,
    block_v: int | None = None,
) -> None:
    """Overwrite the raw logits in `buf` with d loss / d logits (see ``_logits_grad_kernel``).

    Row i becomes ``(A_i p_ik - B_i [k = y_i] - E_i w_k)·(1 - tanh²(x_ik/c))`` with
    ``p = exp(z - lse)``; the target term is dropped where `owned` is False (the
    target lies in another rank's vocabulary slice). `coef_eps` (read only when
    `smoothing`) is 0-d or per row.
    """
    n, v = buf.shape
    if n == 0:
        return
    block = _block(v, block_v)
    dt = buf.dtype

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt).expand(n).contiguous()

    y_kernel = torch.where(owned, y_loc, -1).contiguous()
    k = _kernels()
    k._logits_grad_kernel[(n, (v + block - 1) // block)](
        buf,
        buf.stride(0),
        y_kernel,
        cw_local if cw_local is not None else buf,
        per_row(lse),
        per_row(coef_a),
        per_row(coef_b),
        per_row(coef_eps),
        v,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_WEIGHT=cw_local is not None,
        HAS_SMOOTHING=smoothing,
        BLOCK_V=block,
    )
