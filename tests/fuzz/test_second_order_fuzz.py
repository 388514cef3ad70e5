"""A bounded differential fuzz of second derivatives (double backward, ``torch.func``).

The contract promises exact second derivatives for every unfused PyTorch loss under
``create_graph=True`` and ``torch.func`` (Hessian-vector products for influence functions,
gradient penalties, per-sample curvature), or an error that says so, never a wrong number.
Each generated call draws the function (sparse, categorical and binary cross-entropy from
logits and from probabilities, ListNet, distillation, the information measures from logits
and from probabilities), its options, the shape, the dtype, extreme values (logits of ±1e4,
masked classes, probabilities of exactly 0 and 1, close and far-apart distributions),
whether the executor's size thresholds are shrunk so that tiny inputs take the chunked
paths, whether the accelerator path (no scalar read back) serves it, and which inputs take
gradients (logits, soft targets, the second distribution, class weights). The
first derivative, the Hessian-vector product of the first input, and the mixed second
derivatives through the others must equal those of the float64 formula under PyTorch's
autograd to the dtype's rounding at the size of the terms.

It found NaN second derivatives at probabilities of exactly 0 and 1, NaN ones of float32
distillation at a vanishing student probability, the rounding noise of JS's second
derivative where one distribution is far below the other, and NaN class-weight gradients
beside an ignored row holding masked classes (first derivatives too); in forward mode,
float64 tangents of float32 losses and a traceback of ``jvp`` of ``grad`` on one example
(PyTorch's ``jvp`` of a 0-d tensor times a number: ``crossent._lib._xp.number_for``); with
distillation targets under ``jax.grad``, an error message naming the wrong argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from tests.fuzz._settings import fuzz

torch = pytest.importorskip("torch")
from tests.losses.test_torch_differential import (  # noqa: E402
    _accelerator,
    _binary_ref,
    _categorical_ref,
    _sparse_ref,
    _thresholds,
)

FUZZ = fuzz(400)

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover - jax is in the dev extra
    jax = None
MODES = ("autograd", "autograd", "func", "fwd_rev", "rev_fwd", "dual")
"""PyTorch's double backward (twice as often), ``torch.func``'s ``grad`` of ``grad``, and
forward mode: ``jvp`` of ``grad`` (forward over reverse, as ``torch.func.hessian``),
``grad`` of ``jvp`` (reverse over forward) and dual tensors (``torch.autograd.forward_ad``)
through double backward, whose loss's tangent is the directional derivative too. ``"jax"``
and ``"jax_fwd"`` (JAX's ``grad`` of ``grad`` and ``jvp`` of ``grad``, a compilation per
primitive and shape) run as a test of their own, fewer examples."""

DTYPES = {"float64": torch.float64, "float32": torch.float32}
INFO = ("entropy", "cross_entropy", "kl_divergence", "js_divergence")
OTHERS = ("listnet", "distill", *INFO)
"""Functions of two distributions given alike (:func:`_other_calls`)."""
LOSSES = ("sparse", "categorical", "binary", "sparse_p", "categorical_p", "binary_p", *OTHERS)
SHAPES = [(3, 5), (8, 10), (1, 7), (2, 3, 4), (6,), (5, 1), (40, 3)]


@dataclass
class Call:
    """One generated call: the loss, float64 data, options, and what requires a gradient."""

    loss: str
    dtype: str
    x: Any
    t: Any
    weight: Any = None
    pos_weight: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    axis: int = -1
    mode: str = "autograd"
    shrunk: bool = False
    device: bool = False
    t_grad: bool = False
    w_grad: bool = False
    seed: int = 0


@st.composite
def calls(draw: st.DrawFn, modes: tuple[str, ...] = MODES) -> Call:
    loss = draw(st.sampled_from(LOSSES))
    if loss in OTHERS:
        return draw(_other_calls(loss, modes))
    dtype = draw(st.sampled_from(["float64", "float64", "float32"]))
    # binary: a 0-d input too (one example's logit, as under vmap of a per-example loss)
    shape = draw(st.sampled_from([*SHAPES, ()] if loss.startswith("binary") else SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.3, 3.0, 20.0]))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    axis = -1 if len(shape) <= 1 else draw(st.sampled_from([-1, 1, 0]))
    c = shape[axis] if shape else 1
    categorical = loss.startswith(("sparse", "categorical"))
    extreme = draw(st.sampled_from(["none", "none", "big", "masked", "tied"]))
    if extreme == "tied":  # whole numbers: rows whose largest logit is shared (equal at 0)
        x = x.round()
    elif extreme != "none" and not loss.endswith("_p") and (categorical or extreme == "big"):
        pick = torch.rand(shape, generator=g) < 0.2  # ±1e4, or -inf: a masked class
        x = torch.where(pick, -math.inf if extreme == "masked" else 1e4, x)
        if extreme == "big":
            x = torch.where(pick & (torch.rand(shape, generator=g) < 0.5), -1e4, x)
    if loss.endswith("_p"):  # probabilities: a softmax (categorical) or sigmoid (binary)
        x = torch.softmax(x, axis) if categorical else torch.sigmoid(x)
        if dtype == "float32":  # 1/p² overflows float32 below 1e-19, PyTorch's autograd alike
            x = x.clamp(1e-15, 1 - 1e-7)
        if draw(st.booleans()):  # exact 0 and 1 (clamped logs): a confident row, or elements
            pick = torch.rand(shape, generator=g) < 0.3
            if categorical:
                hard = torch.nn.functional.one_hot(x.movedim(axis, -1).argmax(-1), c)
                hard = hard.double().movedim(-1, axis)
                x = torch.where(pick.any(axis, keepdim=True), hard, x)
            else:
                x = torch.where(pick, (x > 0.5).double(), x)
    call = Call(
        loss, dtype, x, None, axis=axis, seed=seed,
        mode=draw(st.sampled_from(modes)),
        shrunk=draw(st.booleans()),
        device=draw(st.sampled_from([False, False, True])),
        options={"reduction": draw(st.sampled_from(["mean", "sum", "none"]))},
    )  # fmt: skip
    o = call.options
    if loss.startswith("sparse"):
        ax = axis % len(shape)
        t = torch.randint(0, c, shape[:ax] + shape[ax + 1 :], generator=g)
        if draw(st.booleans()):
            o["ignore_index"] = -100
            t = torch.where(torch.rand(t.shape, generator=g) < 0.3, -100, t)
        call.t = t
    elif categorical:
        kind = draw(st.sampled_from(["one_hot", "soft", "unnormalized"]))
        if kind == "one_hot":
            ax = axis % len(shape)
            labels = torch.randint(0, c, shape[:ax] + shape[ax + 1 :], generator=g)
            t = torch.nn.functional.one_hot(labels, c).double().movedim(-1, ax)
        elif kind == "soft":
            t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), axis)
        else:
            t = torch.rand(shape, generator=g, dtype=torch.float64)
        call.t = t
        call.t_grad = draw(st.booleans())
    else:
        soft = draw(st.booleans())
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        call.t = t if soft else (t < 0.5).double()
        call.t_grad = draw(st.booleans())
        for name in ("weight", "pos_weight"):
            how = draw(st.sampled_from([None, None, "full", "last", "number"]))
            if how == "number":
                setattr(call, name, draw(st.sampled_from([0.5, 2.0])))
            elif how is not None:
                w_shape = shape if how == "full" else shape[-1:]
                setattr(call, name, torch.rand(w_shape, generator=g, dtype=torch.float64) * 2)
        call.w_grad = isinstance(call.weight, torch.Tensor) and draw(st.booleans())
    o["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1]))
    o["gamma"] = draw(st.sampled_from([0.0, 0.0, 2.0]))
    if loss == "sparse":
        o["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-2]))
        o["softcap"] = draw(st.sampled_from([None, None, 5.0]))
    if loss.startswith("binary"):
        o["alpha"] = draw(st.sampled_from([None, None, 0.25]))
    if categorical and draw(st.booleans()):
        call.weight = torch.rand(c, generator=g, dtype=torch.float64) * 2
        call.w_grad = draw(st.booleans())
    return call


@st.composite
def _other_calls(draw: st.DrawFn, loss: str, modes: tuple[str, ...]) -> Call:
    """ListNet, distillation (the teacher as `t`, without a gradient) and the information
    measures (from logits, or from positive probabilities: the second argument as `t`)."""
    dtype = draw(st.sampled_from(["float64", "float64", "float32"]))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    axis = -1 if len(shape) == 1 else draw(st.sampled_from([-1, 1, 0]))

    def logits() -> Any:
        scale = draw(st.sampled_from([0.3, 3.0, 20.0]))
        z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        return z.round() if draw(st.booleans()) else z  # tied maxima, equal logits

    x, t = logits(), logits()
    if draw(st.booleans()):  # close models / lists (late distillation: KL near 0)
        t = x + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)
    masked = draw(st.sampled_from(["none", "none", "both", "first", "second"]))
    if masked != "none" and loss != "listnet":  # classes a distribution rules out (-inf)
        pick = torch.rand(shape, generator=g) < 0.25
        pick = pick & ~pick.all(axis, keepdim=True)  # a class left in every row
        if masked in ("both", "first"):
            x = torch.where(pick, -math.inf, x)
        if masked in ("both", "second"):
            t = torch.where(pick, -math.inf, t)
    o: dict[str, Any] = {}
    if loss == "distill":
        o = {
            "beta": draw(st.sampled_from([0.0, 0.5, 1.0, 0.1])),
            "temperature": draw(st.sampled_from([1.0, 2.0, 0.5])),
            "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        }
        if len(shape) > 1 and draw(st.booleans()):  # rows masked by `target` (padding)
            ax = axis % len(shape)
            rows = shape[:ax] + shape[ax + 1 :]
            masked_rows = torch.rand(rows, generator=g) < draw(st.sampled_from([0.3, 1.0]))
            o["target"] = torch.where(masked_rows, -100, torch.randint(0, 5, rows, generator=g))
    elif loss == "listnet":
        o = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    else:
        o = {"from_logits": draw(st.booleans()), "base": draw(st.sampled_from([None, 2.0]))}
        if not o["from_logits"]:  # positive probabilities (the log's pole is not derivable)
            x, t = torch.softmax(x, axis), torch.softmax(t, axis)
            if dtype == "float32":  # 1/p² overflows float32 below 1e-19; XLA flushes the
                # subnormal (p + q)³ of JS's second derivative below 1e-13 (NaN)
                x, t = x.clamp_min(1e-12), t.clamp_min(1e-12)
    return Call(
        loss, dtype, x, None if loss == "entropy" else t, options=o, axis=axis, seed=seed,
        mode=draw(st.sampled_from(modes)),
        shrunk=draw(st.booleans()), device=draw(st.sampled_from([False, False, True])),
        t_grad=loss not in ("entropy", "distill") and draw(st.booleans()),
    )  # fmt: skip


# --------------------------------------------------------------------------- references


def _clamped_log(p: Any, *, complement: bool = False) -> Any:
    """PyTorch's rule for probabilities: log p (log(1 - p) with `complement`, by ``log1p``)
    clamped at -100 where the computed log is below it (not where p is below exp(-100)
    rounded: the two differ by an ulp at the edge), the constant -100 there (no 0 · inf in
    its derivatives)."""
    with torch.no_grad():
        small = (torch.log1p(-p) if complement else torch.log(p)) < -100.0
    safe = torch.where(small, 0.0 if complement else 1.0, p)
    return torch.where(small, -100.0, torch.log1p(-safe) if complement else torch.log(safe))


def _reference(call: Call, x: Any, t: Any, w: Any) -> Any:
    """The float64 loss of `call` from the documented formula, differentiable in each input."""
    o = dict(call.options)
    loss = call.loss
    if loss in OTHERS:
        return _other_reference(call, x, t)
    if loss == "sparse":
        full = {"ignore_index": None, "z_loss": 0.0, "softcap": None, **o}
        return _sparse_ref(x, t, call.axis, w, full)[0]
    if loss == "categorical":
        return _categorical_ref(x, t, call.axis, w, o)[0]
    if loss == "binary":
        return _binary_ref(x, t, w, _as64(call.pos_weight), o)[0]
    # from probabilities: the same formulas with log p (and log(1 - p)) clamped at -100
    if loss == "binary_p":
        eps, gamma, alpha = o["label_smoothing"], o["gamma"], o["alpha"]
        ts = t * (1 - eps) + eps / 2
        big_p, big_n = ts, 1 - ts
        if w is not None:
            big_p, big_n = big_p * w, big_n * w
        if call.pos_weight is not None:
            big_p = big_p * _as64(call.pos_weight)
        if alpha is not None:
            big_p, big_n = big_p * alpha, big_n * (1 - alpha)
        lp, lq = -_clamped_log(x), -_clamped_log(x, complement=True)
        if gamma:
            lp, lq = lp * (1 - x) ** gamma, lq * x**gamma
        row = big_p * lp + big_n * lq
        return _reduced(row, o["reduction"], torch.tensor(float(row.numel()), dtype=x.dtype))
    z = x.movedim(call.axis, -1)
    c = z.shape[-1]
    log_p = _clamped_log(z)
    factor = (1 - z) ** o["gamma"] if o["gamma"] else 1.0
    term = -log_p * factor
    ww = torch.ones(c, dtype=x.dtype) if w is None else w
    eps = o["label_smoothing"]
    if loss == "categorical_p":
        tt = t.movedim(call.axis, -1)
        mass = ((1 - eps) * tt + eps / c) * ww
        row = (mass * term).sum(-1)
        return _reduced(row, o["reduction"], torch.tensor(float(row.numel()), dtype=x.dtype))
    valid = t != o["ignore_index"] if "ignore_index" in o else torch.ones_like(t, dtype=torch.bool)
    label = torch.where(valid, t, 0)
    w_y = torch.where(valid, ww[label], 0.0)
    row = (1 - eps) * w_y * term.gather(-1, label.unsqueeze(-1)).squeeze(-1)
    if eps:
        row = row + torch.where(valid, eps / c * (ww * term).sum(-1), 0.0)
    return _reduced(row, o["reduction"], w_y.sum())


def _other_reference(call: Call, x: Any, t: Any) -> Any:
    o = call.options
    z = x.movedim(call.axis, -1)
    u = None if t is None else t.movedim(call.axis, -1)
    count = torch.tensor(float(z[..., 0].numel()), dtype=x.dtype)
    if call.loss == "listnet":
        row = -(torch.softmax(u, -1) * torch.log_softmax(z, -1)).sum(-1)
        return _reduced(row, o["reduction"], count)
    if call.loss == "distill":
        beta, temp = o["beta"], o["temperature"]
        counted = None if o.get("target") is None else o["target"] != -100
        if counted is not None:  # masked rows read zeros: no inf or NaN in their derivatives
            z, u = (torch.where(counted.unsqueeze(-1), a, 0.0) for a in (z, u))
        ls, lt = torch.log_softmax(z / temp, -1), torch.log_softmax(u / temp, -1)
        if beta == 0:
            row = _p_log_ratio(lt, ls).sum(-1)
        elif beta == 1:
            row = _p_log_ratio(ls, lt).sum(-1)
        else:  # (a class both rule out: 0 there, no NaN in the log-sum-exp's derivatives)
            both = (lt == -math.inf) & (ls == -math.inf)
            lt_s, ls_s = torch.where(both, 0.0, lt), torch.where(both, 0.0, ls)
            lm = torch.logsumexp(torch.stack([lt_s + math.log(beta), ls_s + math.log(1 - beta)]), 0)
            row = beta * _p_log_ratio(lt, lm).sum(-1) + (1 - beta) * _p_log_ratio(ls, lm).sum(-1)
        if counted is not None:  # masked rows: 0, and the mean over the counted ones
            row = torch.where(counted, row, 0.0)
            count = counted.sum().to(row.dtype)
        return _reduced(row, o["reduction"], count)
    logits = o["from_logits"]
    lp, lq = _log(z, logits), None if u is None else _log(u, logits)
    p, q = (None, None) if logits else (z, u)  # probabilities: a itself, not exp(log a)
    if call.loss == "entropy":
        row = -_p_log_ratio(lp, torch.zeros_like(lp), p).sum(-1)
    elif call.loss == "cross_entropy":
        row = _p_log_ratio(lp, lq, p, own=False).sum(-1)
    elif call.loss == "kl_divergence":
        row = _p_log_ratio(lp, lq, p).sum(-1)
    else:  # log(p / m) = log 2 - softplus(log q - log p): no cancellation in its derivatives
        row = (_p_log_half(lp, lq, p).sum(-1) + _p_log_half(lq, lp, q).sum(-1)) / 2
    return row / math.log(o["base"]) if o["base"] else row


def _log(a: Any, logits: bool) -> Any:
    """log-softmax of logits; the log of probabilities, -inf at 0 (whose derivative, taken
    at 1 there, is then the documented 0 where a distribution has no mass)."""
    if logits:
        return torch.log_softmax(a, -1)
    return torch.where(a > 0, torch.log(torch.where(a > 0, a, 1.0)), -math.inf)


def _p_log_ratio(la: Any, lb: Any, a: Any = None, *, own: bool = True) -> Any:
    """a log(a / b) (with `own` False, -a log b) from the logs (`a` itself when given), 0
    where a = 0 (its logs replaced there: no 0 · inf in the derivatives), +inf where
    b = 0 < a. -a log b keeps its derivative -log b at a = 0 where b > 0."""
    if not own:
        ok = lb > -math.inf
        weight = la.exp() if a is None else a
        inf = torch.where(weight == 0, 0.0, math.inf)
        return torch.where(ok, -weight * torch.where(ok, lb, 0.0), inf)
    mass = la > -math.inf
    la_s, lb_s = torch.where(mass, la, 0.0), torch.where(mass, lb, 0.0)
    weight = la_s.exp() if a is None else torch.where(mass, a, 0.0)
    return torch.where(mass, weight * ((la_s - lb_s) if own else -lb_s), 0.0)


def _p_log_half(la: Any, lb: Any, a: Any = None) -> Any:
    """a log(2a / (a + b)) from the logs (`a` itself when given), 0 where a = 0."""
    mass = la > -math.inf
    la_s, lb_s = torch.where(mass, la, 0.0), torch.where(mass, lb, -math.inf)
    weight = la_s.exp() if a is None else torch.where(mass, a, 0.0)
    return torch.where(mass, weight * (math.log(2) - _softplus(lb_s - la_s)), 0.0)


def _softplus(v: Any) -> Any:
    """softplus without PyTorch's default threshold (20: above, x and a derivative of 1)."""
    return torch.nn.functional.softplus(v, threshold=1e300)


def _js_analytic(call: Call, p: Any, q: Any, up: Any, v: Any) -> tuple[list[Any], Any]:
    r"""JS of probabilities: the first derivative :math:`\tfrac12 \log(2p/(p+q))` times the
    upstream gradient and, as :func:`_second_order` gives them, its derivatives along `v`
    for `p`, :math:`\tfrac12\,q/(p(p+q))`, and for `q`, :math:`-\tfrac12/(p+q)`, in closed
    form (autograd of the value cancels in :math:`1/p - 1/(p+q)`); the first 0 where
    :math:`p = 0` (the documented gradient there), the second for `p` undefined there (NaN:
    not compared; the first derivative tends to :math:`-\infty`), in the base."""
    up = up.unsqueeze(call.axis)
    mass = p > 0
    p_s, s_s = torch.where(mass, p, 1.0), torch.where(mass, p + q, 1.0)
    base = math.log(call.options["base"]) if call.options["base"] else 1.0
    gx = torch.where(mass, 0.5 * torch.log(2 * p_s / s_s), 0.0) * up / base
    hx = torch.where(mass, 0.5 * q / (p_s * s_s), math.nan) * up * v / base
    got = [hx]
    if call.t_grad:
        some = p + q > 0  # (p = 0 too: the limit of -1 / (2 (p + q)))
        mixed = torch.where(some, -0.5 / torch.where(some, p + q, 1.0), math.nan)
        got.append((mixed * up * v).sum_to_size(q.shape) / base)
    return got, gx


def _reduced(row: Any, reduction: str, den: Any) -> Any:
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / torch.where(den == 0, 1.0, den)


def _as64(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _crossent(call: Call, x: Any, t: Any, w: Any) -> Any:
    o = dict(call.options)
    if call.loss == "listnet":
        return ce.listnet_loss(x, t, axis=call.axis, **o)
    if call.loss == "distill":
        if "target" in o and not isinstance(x, torch.Tensor):  # JAX: its labels too
            o["target"] = _to_jax(o["target"])
        return ce.distillation_loss(x, t, axis=call.axis, **o)
    if call.loss in INFO:
        args = (x,) if t is None else (x, t)
        return getattr(ce.info, call.loss)(*args, axis=call.axis, **o)
    logits = not call.loss.endswith("_p")
    if call.loss.startswith("sparse"):
        return ce.sparse_categorical_cross_entropy(
            x, t, from_logits=logits, axis=call.axis, weight=w, **o
        )
    if call.loss.startswith("categorical"):
        return ce.categorical_cross_entropy(x, t, from_logits=logits, axis=call.axis, weight=w, **o)
    pw = call.pos_weight
    if isinstance(pw, torch.Tensor):
        pw = pw.to(x.dtype) if isinstance(x, torch.Tensor) else _to_jax(pw, x.dtype)
    return ce.binary_cross_entropy(x, t, from_logits=logits, weight=w, pos_weight=pw, **o)


# --------------------------------------------------------------------------- second order


def _to_jax(a: Any, dtype: Any = None) -> Any:
    """A PyTorch tensor as a JAX array (floating ones in `dtype` when given)."""
    if not isinstance(a, torch.Tensor):
        return a
    out = jnp.asarray(a.detach().numpy())
    return out.astype(dtype) if dtype is not None and a.is_floating_point() else out


def _jax_second_order(
    fn: Any, ins: list[Any], up: Any, v: Any, forward: bool
) -> tuple[list[Any], Any, Any]:
    """:func:`_second_order` by JAX's ``grad`` of ``grad`` (``jvp`` of ``grad`` if `forward`),
    of `fn` given JAX arrays."""
    up_j, v_j = _to_jax(up), _to_jax(v)
    ins_j = tuple(_to_jax(a) for a in ins)
    argnums = tuple(range(len(ins)))

    def scalar(*args: Any) -> Any:
        return jnp.sum(fn(*args) * up_j)

    if forward:
        tangents = (v_j, *(jnp.zeros_like(a) for a in ins_j[1:]))
        grads, got = jax.jvp(jax.grad(scalar, argnums=argnums), ins_j, tangents)
        gx = grads[0]
    else:

        def first(*args: Any) -> Any:
            gx = jax.grad(scalar)(*args)
            return jnp.sum(gx * v_j), gx

        got, gx = jax.grad(first, argnums=argnums, has_aux=True)(*ins_j)
    return [torch.from_numpy(np.array(g)) for g in got], torch.from_numpy(np.array(gx)), None


def _second_order(
    fn: Any, ins: list[Any], up: Any, v: Any, mode: str
) -> tuple[list[Any], Any, Any]:
    """d/d(ins) of <d(sum(up * fn))/dx, v> (x = ins[0]): the Hessian-vector product of the
    logits and the mixed derivatives of the others, by double backward, ``torch.func``
    (reverse or forward over reverse, or reverse over forward), dual tensors or JAX; that
    first derivative; and, where forward mode gives it, the directional derivative
    <d(sum(up * fn))/dx, v> from the loss's own tangent (else None)."""
    if mode in ("jax", "jax_fwd"):
        return _jax_second_order(fn, ins, up, v, forward=mode == "jax_fwd")
    argnums = tuple(range(len(ins)))

    def scalar(*args: Any) -> Any:
        return (fn(*args) * up).sum()

    if mode == "func":

        def func_first(*args: Any) -> Any:
            gx = torch.func.grad(scalar)(*args)
            return (gx * v).sum(), gx

        got, gx = torch.func.grad(func_first, argnums=argnums, has_aux=True)(*ins)
        return list(got), gx, None
    if mode in ("fwd_rev", "rev_fwd"):  # and the loss's own tangent, in the loss's dtype
        out, tangent = torch.func.jvp(lambda xx: fn(xx, *ins[1:]), (ins[0],), (v,))
        assert tangent.dtype == out.dtype, f"a {tangent.dtype} tangent of a {out.dtype} loss"
        along = (tangent * up).sum()
    if mode == "fwd_rev":
        tangents = (v, *(torch.zeros_like(a) for a in ins[1:]))
        grads, got = torch.func.jvp(torch.func.grad(scalar, argnums=argnums), tuple(ins), tangents)
        return list(got), grads[0], along
    if mode == "rev_fwd":

        def directional(*args: Any) -> Any:
            rest = args[1:]
            out, tangent = torch.func.jvp(lambda xx: scalar(xx, *rest), (args[0],), (v,))
            return tangent, out

        got, _ = torch.func.grad(directional, argnums=argnums, has_aux=True)(*ins)
        return list(got), torch.func.grad(scalar)(*ins), along
    leaves = [a.detach().requires_grad_(True) for a in ins]
    if mode == "dual":
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level():
            out = fn(fwad.make_dual(leaves[0], v), *leaves[1:])
            directional = (fwad.unpack_dual(out).tangent * up).sum()
            grads = torch.autograd.grad(out, leaves, up.to(out.dtype), allow_unused=True)
            unpacked = [None if g is None else fwad.unpack_dual(g) for g in grads]
        got = [
            torch.zeros_like(a) if u is None or u.tangent is None else u.tangent
            for a, u in zip(leaves, unpacked, strict=True)
        ]
        gx = torch.zeros_like(leaves[0]) if unpacked[0] is None else unpacked[0].primal
        return got, gx, directional
    out = fn(*leaves)
    (gx,) = torch.autograd.grad(out, leaves[0], up.to(out.dtype), create_graph=True)
    if not gx.requires_grad:  # a gradient that depends on none of them (p ↦ -Σ p log q)
        return [torch.zeros_like(a) for a in leaves], gx, None
    got = torch.autograd.grad((gx * v).sum(), leaves, allow_unused=True)
    grads_ = [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, got, strict=True)]
    return grads_, gx, None


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@FUZZ
@given(call=calls())
def test_second_derivatives_equal_the_float64_formula(call: Call) -> None:
    _check(call)


@pytest.mark.skipif(jax is None, reason="JAX is not installed")
@fuzz(25)
@given(call=calls(modes=("jax", "jax_fwd")))
def test_jax_second_derivatives_equal_the_float64_formula(call: Call) -> None:
    _check(call)


def _typed(call: Call) -> tuple[Any, Any, Any]:
    """The call's input, target and class weight in its dtype (sparse labels as they are)."""
    dtype = DTYPES[call.dtype]
    t = call.t if call.t is None or call.loss.startswith("sparse") else call.t.to(dtype)
    w = call.weight.to(dtype) if isinstance(call.weight, torch.Tensor) else call.weight
    return call.x.to(dtype), t, w


def _functions(call: Call, t: Any, w: Any) -> tuple[Any, Any]:
    """crossent's loss and the float64 formula's, each of the input and then of the target and
    the class weight where `call` differentiates them (fixed `t` and `w` otherwise)."""

    def fn(xx: Any, *rest: Any) -> Any:
        it = iter(rest)
        tt = next(it) if call.t_grad else t
        ww = next(it) if call.w_grad else w
        if call.mode.startswith("jax"):  # the fixed inputs as JAX arrays too
            tt, ww = _to_jax(tt), _to_jax(ww, xx.dtype)
        return _crossent(call, xx, tt, ww)

    def ref_fn(xx: Any, *rest: Any) -> Any:
        it = iter(rest)
        tt = next(it) if call.t_grad else _as64(t)
        ww = next(it) if call.w_grad else _as64(w)
        return _reference(call, xx, tt, ww)

    return fn, ref_fn


def _magnitude(call: Call) -> float:
    """1 + the largest finite magnitude of the call's input: the rounding of p = exp(z - lse)."""
    finite = call.x[call.x.isfinite()]
    return 1 + (float(finite.abs().max()) if finite.numel() else 0.0)


def _check(call: Call) -> None:
    """The first and second derivatives of `call` equal the float64 formula's."""
    dtype = DTYPES[call.dtype]
    x, t, w = _typed(call)
    diff = [("t", call.t_grad), ("w", call.w_grad)]
    fn, ref_fn = _functions(call, t, w)

    g = torch.Generator().manual_seed(call.seed + 1)
    ins = [x] + [a for a, (_, on) in zip((t, w), diff, strict=True) if on]
    with torch.no_grad():
        value = _reference(call, x.double(), _as64(t), _as64(w))
    if not value.isfinite().all():  # a positive target on a masked class: no derivative
        return
    shape = value.shape
    up = torch.randn(shape, generator=g, dtype=torch.float64) if shape else torch.tensor(1.5)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    what = f"{call.loss} {call.dtype} {tuple(x.shape)} axis={call.axis} {call.options} " + (
        f"w={w is not None} pw={call.pos_weight is not None} t_grad={call.t_grad} "
        f"w_grad={call.w_grad} {call.mode} shrunk={call.shrunk} device={call.device}"
    )
    with _thresholds(call.shrunk), _accelerator(call.device):
        got, got_gx, directional = _second_order(fn, ins, up.to(dtype), v.to(dtype), call.mode)
    if call.loss == "js_divergence" and not call.options["from_logits"]:
        want, gx = _js_analytic(call, x.double(), _as64(t), up, v)
    else:
        want, gx, _ = _second_order(ref_fn, [a.double() for a in ins], up, v, "autograd")
    names = ["x"] + [name for name, on in diff if on]
    kept = _native_nan(call)
    # the rounding of the dtype at the size of the terms: the second derivatives', the first
    # derivative's times v (a mixed derivative of a weighted mean is a difference of such
    # terms over the weights), the logits' magnitude (the rounding of p = exp(z - lse))
    size = _magnitude(call)
    first_size = _max(gx) * _max(v) * (1 + (1 / _min(w) if call.w_grad else 0.0))
    a, b = got_gx.detach().double(), gx.detach().double()  # the first derivative too
    b = torch.where(kept, a, b)
    tol = 256 * torch.finfo(dtype).eps * (_max(b) + _max(up)) * size
    bad = ((a - b).abs() > tol) | (a.isnan() != b.isnan())
    assert not bad.any(), f"{what}: d/dx (first) {a[bad][:6]} vs {b[bad][:6]}"
    if directional is not None and not kept.any():  # the loss's tangent along v: <d/dx, v>
        b64 = gx.detach().double()
        a, b = directional.detach().double(), (b64 * v).sum()
        tol = 256 * torch.finfo(dtype).eps * float(((b64.abs() + _max(up)) * v.abs()).sum()) * size
        assert (a - b).abs() <= tol or (a.isnan() and b.isnan()), f"{what}: tangent {a} vs {b}"
    for name, a, b, a_in in zip(names, got, want, ins, strict=True):
        assert a.dtype == a_in.dtype, f"{what}: d/d{name} is {a.dtype}"
        a, b = a.double(), b.double()
        defined = ~b.isnan() | (call.loss != "js_divergence")  # (_js_analytic's NaN)
        b = torch.where(defined, b, a)
        if name == "x":
            b = torch.where(kept, a, b)
        scale = _max(b[defined]) + _max(v) * _max(up) + first_size
        tol = 256 * torch.finfo(dtype).eps * scale * size
        bad = ((a - b).abs() > tol) | (a.isnan() != b.isnan())
        assert not bad.any(), f"{what}: d/d{name} {a[bad][:6]} vs {b[bad][:6]}"


def _native_nan(call: Call) -> Any:
    """Where the first and second derivatives in the logits may be NaN as documented (the
    differences page): ignored rows of -inf only on an accelerator's eager path through
    PyTorch's own kernels (no z-loss, softcap or focal; nothing traced or transformed),
    ``F.cross_entropy``'s NaN gradient row."""
    o = call.options
    native = (
        call.loss == "sparse"
        and call.device
        and call.mode in ("autograd", "dual")
        and "ignore_index" in o
        and not (o["z_loss"] or o["softcap"] or o["gamma"])
    )
    if not native:
        return torch.zeros(call.x.shape, dtype=torch.bool)
    masked = (call.x == -math.inf).all(call.axis, keepdim=True)
    ignored = (call.t == o["ignore_index"]).unsqueeze(call.axis)
    return (masked & ignored).expand(call.x.shape)


def _max(a: Any) -> float:
    return float(a.detach().abs().max()) if a is not None and a.numel() else 0.0


def _min(a: Any) -> float:
    return float(a.detach().abs().min()) if a is not None and a.numel() else 1.0
