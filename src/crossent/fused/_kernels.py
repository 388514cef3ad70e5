r"""Triton kernels of the fused linear cross-entropy (``@triton.jit`` functions only).

Imported only by :mod:`crossent.fused._launch`, on first use, so crossent works
without Triton. Both kernels read a logits buffer ``X`` (row-major ``(n, V_local)``:
a chunk's float32/float64 buffer in the fused loop, or the user's float16/bfloat16
logits in the unfused CUDA loss of :mod:`crossent._backends._triton_sparse`, widened
to float32 in registers) in vocabulary tiles of ``BLOCK_V``:

* :func:`_row_stats_kernel` — one program per row, one pass over the row with an
  online (running-max) log-sum-exp, the fields of
  :class:`crossent._losses._rows.RowStats`: :math:`m`, :math:`s = \sum_k e^{z_k - m}`,
  :math:`\sum_k w_k (m - z_k)` and :math:`z_y`. Tile by tile it applies
  :func:`crossent._losses._rows.combine`'s merge: when the running max grows
  from :math:`m` to :math:`m'`, :math:`s \leftarrow s e^{m - m'}` and
  :math:`\sum w (m - z) \leftarrow \sum w (m - z) + (\sum w)(m' - m)` — both parts
  :math:`\ge 0`, so no cancellation.
* :func:`_logits_grad_kernel` — one program per (row, tile): writes to ``OUT``
  (``X`` itself for the chunk loop's in-place gradient, a tensor in the input
  dtype for the unfused loss) :math:`\partial L/\partial x_k = (a e^{z_k - L} - b[k = y] - e w_k)(1 - t_k^2)`
  where :math:`t = \tanh(x/c)` under a soft cap (1 otherwise), and
  :math:`(a, b, e)` come from :func:`crossent._losses._rows.coefficients` (jitted).

The soft cap is applied to the raw logits inside both kernels, so no second
buffer is needed. ``tanh`` is written out (:func:`_tanh`): an odd Taylor
polynomial near 0 and :math:`(1 - e^{-2|u|})/(1 + e^{-2|u|})` elsewhere, accurate
to a few ulps and available in the interpreter as well as on GPUs.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl

from crossent._losses._rows import coefficients


def _jit_helper(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)`` for a plain-Python helper defined outside this module.

    The same code object, with globals that show ``triton.language`` (which
    Triton's interpreter looks for in every jitted function it runs; the helper
    itself uses no global name).
    """
    clone = types.FunctionType(fn.__code__, {"tl": tl}, fn.__name__, fn.__defaults__)
    clone.__qualname__, clone.__doc__, clone.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return triton.jit(clone)


#: The row formula's gradient coefficients: the very function the PyTorch path calls.
_coefficients = _jit_helper(coefficients)


@triton.jit
def _tanh_sech2(u):
    # (tanh u, 1 - tanh^2 u); the second as 4 e / (1 + e)^2, e = exp(-2|u|), where tanh is
    # near 1 and 1 - t * t cancels (its rounding times 1 / (1 - t^2): 1e-3 relative at |u| = 5
    # in float32), 1 - t * t near 0 (the series)
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    us = tl.where(a < 0.125, u, 0.0)  # the series only where it is used (no overflow)
    u2 = us * us
    # odd Taylor series through u^15: truncation < 1e-18 relative for |u| < 1/8
    poly = -929569.0 / 638512875.0
    poly = 21844.0 / 6081075.0 + u2 * poly
    poly = -1382.0 / 155925.0 + u2 * poly
    poly = 62.0 / 2835.0 + u2 * poly
    poly = -17.0 / 315.0 + u2 * poly
    poly = 2.0 / 15.0 + u2 * poly
    poly = -1.0 / 3.0 + u2 * poly
    small = us + us * u2 * poly
    t = tl.where(a < 0.125, small, tl.where(u < 0, -big, big))
    return t, tl.where(a < 0.125, 1.0 - small * small, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _cap_and_slope(x, softcap, cap_scale, cap_below, CAP_GUARD: tl.constexpr):
    # (c tanh(x / c), 1 - tanh^2(x / c)), with -inf (a masked class) kept -inf as in the
    # unfused losses; guarded (a huge cap: _logprob.SoftcapForm) x itself below cap_below and
    # c = cap_scale * softcap divided in two steps
    if CAP_GUARD:
        t, s2 = _tanh_sech2(x / cap_scale / softcap)
        infinite = tl.abs(x) == float("inf")
        z = tl.where(tl.abs(x) < cap_below, x, (softcap * tl.where(infinite, 0.0, t)) * cap_scale)
        # c tanh(+inf / c) = c, inf when c is beyond the range (cap_scale not 1)
        z = tl.where(x == float("inf"), tl.where(cap_scale == 1.0, softcap, x), z)
    else:
        t, s2 = _tanh_sech2(x / softcap)
        z = softcap * t
    return tl.where(x == -float("inf"), x, z), s2


@triton.jit
def _cap(x, softcap, cap_scale, cap_below, CAP_GUARD: tl.constexpr):
    z, _ = _cap_and_slope(x, softcap, cap_scale, cap_below, CAP_GUARD)
    return z


@triton.jit
def _row_stats_kernel(
    X,
    stride_x,
    Y,
    CW,
    M_out,
    S_out,
    WD_out,
    ZY_out,
    V,
    softcap,
    cap_scale,
    cap_below,
    HAS_SOFTCAP: tl.constexpr,
    CAP_GUARD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    # running statistics in float32 (float64 for float64 logits): 16-bit logits are read
    # as they are and widened in registers, so no float32 copy of them is ever stored
    dt = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    m = tl.full((), -float("inf"), dt)
    s = tl.full((), 0.0, dt)
    sm = tl.full((), 0.0, dt)
    w_seen = tl.full((), 0.0, dt)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(dt)
        z = _cap(x, softcap, cap_scale, cap_below, CAP_GUARD) if HAS_SOFTCAP else x
        z_max = tl.max(tl.where(mask, z, -float("inf")), axis=0)
        m_new = tl.maximum(m, z_max)
        # -inf logits (masked classes) add nothing; no inf - inf while every logit seen is -inf
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        # lanes past V (x read as 0) get exp(-inf): exp(0 - m_ref) overflows below a row max
        # of -88 in float32 (harmless once masked, but Triton's interpreter, NumPy, warns)
        e = tl.exp(tl.where(mask, z - m_ref, -float("inf")))
        s = s * tl.exp(m - m_ref) + tl.sum(e, axis=0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(CW + offs, mask=mask, other=0.0).to(z.dtype)
            else:
                w = tl.where(mask, 1.0, 0.0).to(z.dtype)
            shift = w_seen * tl.where(w_seen > 0, m - m_new, 0.0)
            # classes of weight 0 add nothing (also at a -inf logit: no 0 * inf is formed,
            # which Triton's interpreter, NumPy, would warn about)
            d = tl.where(mask & (w != 0), z - m_ref, 0.0)
            sm = sm + shift + tl.sum(w * d, axis=0)
            w_seen = w_seen + tl.sum(w, axis=0)
        m = m_new
    y = tl.load(Y + row)
    x_y = tl.load(x_row + y).to(dt)
    z_y = _cap(x_y, softcap, cap_scale, cap_below, CAP_GUARD) if HAS_SOFTCAP else x_y
    tl.store(M_out + row, m)
    tl.store(S_out + row, s)
    tl.store(WD_out + row, -sm)
    tl.store(ZY_out + row, z_y)


@triton.jit
def _logits_grad_kernel(
    X,
    stride_x,
    OUT,
    stride_out,
    Y,
    CW,
    LSE,
    stride_lse,
    WY,
    stride_wy,
    R,
    stride_r,
    P,
    V,
    softcap,
    cap_scale,
    cap_below,
    HAS_SOFTCAP: tl.constexpr,
    CAP_GUARD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    dt = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(dt)
    if HAS_SOFTCAP:
        # the chain rule's 1 - t^2 (0 at -inf), as 4 e / (1 + e)^2 (softcap_slope)
        z, sech2 = _cap_and_slope(x, softcap, cap_scale, cap_below, CAP_GUARD)
    else:
        z = x
    lse = tl.load(LSE + row * stride_lse)
    y = tl.load(Y + row)
    w_y = tl.load(WY + row * stride_wy)
    # P: 1 - eps, eps / C, 2 z_loss, W (the buffer's dtype)
    a, b, e = _coefficients(
        w_y,
        lse,
        tl.load(R + row * stride_r),
        tl.load(P + 3),
        tl.load(P),
        tl.load(P + 1),
        HAS_SMOOTHING,
        tl.load(P + 2),
        HAS_Z_LOSS,
    )
    g = a * tl.exp(tl.where(mask, z - lse, -float("inf"))) - tl.where(offs == y, b, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(CW + offs, mask=mask, other=0.0).to(z.dtype)
            g = g - e * w
        else:
            g = g - e
    if HAS_SOFTCAP:
        g = g * sech2
    tl.store(OUT + row * stride_out + offs, g.to(OUT.dtype.element_ty), mask=mask)
