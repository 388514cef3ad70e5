"""Launchers of the Triton kernels in :mod:`crossent.fused._kernels`.

The chunk loop (:func:`crossent.fused._chunked._chunked_linear_ce`) calls
:func:`row_stats` and :func:`logits_grad_` in place of its PyTorch element-wise
passes when the tensors live on CUDA (or when ``use_triton=True``, which with
``TRITON_INTERPRET=1`` also runs on CPU tensors, as the tests do). Triton is
imported here only on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

import torch

from crossent._losses._logprob import SoftcapForm, softcap_form

__all__ = ["logits_grad_", "row_stats", "triton_available"]

#: Vocabulary tile of the kernels (a power of two).
BLOCK_V = 1024


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it is optional: ``pip install crossent[triton]``).

    Looked up once: the search stats the file system (about 80 µs, on every loss call).
    """
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> Any:
    return importlib.import_module("crossent.fused._kernels")


def _block(v: int, block_v: int | None) -> int:
    if block_v is not None:
        return int(block_v)
    return max(16, min(BLOCK_V, 1 << max(0, (v - 1).bit_length())))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` on `device`, made once per value (a host-to-device copy synchronises with
    the host; a cached tensor does not, after its first use). Made outside inference mode,
    so that calls with a gradient can use one cached by a call under inference mode."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _cap_args(form: SoftcapForm | None) -> tuple[float, float, float]:
    """The kernels' `softcap`, `cap_scale` and `cap_below` (:class:`SoftcapForm`; unused
    without a cap)."""
    return (1.0, 1.0, 0.0) if form is None else (form.cap, form.scale, form.below)


def row_stats(
    buf: torch.Tensor,
    y_loc: torch.Tensor,
    cw_local: torch.Tensor | None,
    *,
    softcap: float | None,
    smoothing: bool,
    block_v: int | None = None,
    inside: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, s, Σ w (m - z), z_y)`` of each row of the raw logits `buf` (``_row_stats_kernel``).

    The fields of :class:`crossent._losses._rows.RowStats` (the weighted sum is 0
    unless `smoothing`). `buf` is left unchanged; `y_loc` holds local column
    indices (the caller masks `z_y` of labels outside ``[0, V_local)``), or with
    `inside` only labels in ``[0, V_local)`` (checked by the caller: nothing is clamped).
    """
    n, v = buf.shape
    if buf.stride(1) != 1:
        msg = "internal: the logits buffer must be row-major."
        raise RuntimeError(msg)
    out = torch.empty((4, n), dtype=_wide(buf.dtype), device=buf.device)
    form = softcap_form(softcap, out.dtype, xp=torch)
    k = _kernels()
    k._row_stats_kernel[(n,)](
        buf,
        buf.stride(0),
        y_loc.contiguous() if inside else torch.where((y_loc >= 0) & (y_loc < v), y_loc, 0),
        cw_local.contiguous() if cw_local is not None else buf,  # read as CW + offs
        out[0],
        out[1],
        out[2],
        out[3],
        v,
        *_cap_args(form),
        HAS_SOFTCAP=form is not None,
        CAP_GUARD=form is not None and form.guarded,
        HAS_WEIGHT=cw_local is not None,
        HAS_SMOOTHING=smoothing,
        BLOCK_V=_block(v, block_v),
    )
    return out[0], out[1], out[2], out[3]


def logits_grad_(
    buf: torch.Tensor,
    y_loc: torch.Tensor,
    cw_local: torch.Tensor | None,
    lse: torch.Tensor,
    w_y: torch.Tensor,
    scale: torch.Tensor,
    total_weight: torch.Tensor | float,
    *,
    label_smoothing: float,
    num_classes: int,
    z_loss: float,
    softcap: float | None,
    block_v: int | None = None,
    out: torch.Tensor | None = None,
    inside: bool = False,
) -> None:
    """Overwrite the raw logits in `buf` with d loss / d logits (``_logits_grad_kernel``).

    With `out` (row-major, `buf`'s shape), the gradient goes there instead and
    `buf` is left unchanged.

    Row i becomes ``(a_i p_ik - b_i [k = y_i] - e_i w_k)·(1 - tanh²(x_ik/c))`` with
    ``p = exp(z - lse)`` and ``(a, b, e)`` of :func:`crossent._losses._rows.coefficients`
    for the row's target weight `w_y`, scale and the whole vocabulary's
    `total_weight` over `num_classes` classes. Labels outside ``[0, V_local)`` (the
    target lies in another rank's slice) have no target term; `inside` says there are
    none (as in :func:`row_stats`).
    """
    n, v = buf.shape
    if n == 0:
        return
    block = _block(v, block_v)
    dt = _wide(buf.dtype)
    form = softcap_form(softcap, dt, xp=torch)
    dest = buf if out is None else out
    if dest.stride(1) != 1:
        msg = "internal: the gradient buffer must be row-major."
        raise RuntimeError(msg)

    def per_row(t: torch.Tensor) -> tuple[torch.Tensor, int]:
        # a value per row, read at row * stride: a broadcast scalar (the mean's upstream
        # gradient, a weight of 1) has stride 0, so nothing is copied to a row vector
        t = t.to(dt).expand(n)
        return t, t.stride(0)

    eps = float(label_smoothing)
    # [1 - ε, ε / C, 2λ, W]; a W computed on the device (class weights) is never read back
    scalars = (1.0 - eps, eps / num_classes, 2.0 * float(z_loss))
    if isinstance(total_weight, torch.Tensor):
        params = torch.cat((_constants(scalars, dt, buf.device), total_weight.to(dt).reshape(1)))
    else:
        params = _constants((*scalars, float(total_weight)), dt, buf.device)
    y_kernel = y_loc.contiguous() if inside else torch.where((y_loc >= 0) & (y_loc < v), y_loc, -1)
    k = _kernels()
    k._logits_grad_kernel[(n, (v + block - 1) // block)](
        buf,
        buf.stride(0),
        dest,
        dest.stride(0),
        y_kernel,
        cw_local.contiguous() if cw_local is not None else buf,  # read as CW + offs
        *per_row(lse),
        *per_row(w_y),
        *per_row(scale),
        params,
        v,
        *_cap_args(form),
        HAS_SOFTCAP=form is not None,
        CAP_GUARD=form is not None and form.guarded,
        HAS_WEIGHT=cw_local is not None,
        HAS_SMOOTHING=label_smoothing != 0,
        HAS_Z_LOSS=z_loss != 0,
        BLOCK_V=block,
    )
