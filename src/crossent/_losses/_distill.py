r"""Knowledge distillation: the generalized Jensen–Shannon divergence between two softmaxes.

One row formula, :func:`distill_rows` (its loss from
``crossent._lib._logdiv.generalized_jsd_from_log``, which also serves
:mod:`crossent.info`), serves :func:`distillation_loss` (every
array-API backend), its closed-form gradient in ``value_and_grad``, and the
fused :func:`crossent.fused.linear_distillation_loss`, which calls it on each
chunk of logits.

With :math:`P = \operatorname{softmax}(t/T)` (teacher), :math:`Q = \operatorname{softmax}(s/T)`
(student) and the mixture :math:`M = \beta P + (1-\beta) Q`,

.. math::

    L_\beta = \beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M), \qquad 0 < \beta < 1,

and at the ends the two KL divergences the mixture degenerates from:
:math:`L_0 = \mathrm{KL}(P\|Q)` (forward KL) and :math:`L_1 = \mathrm{KL}(Q\|P)`
(reverse KL) — the convention of TRL's ``generalized_jsd_loss`` (Agarwal et al.,
GKD). Everything is in log space: :math:`\log M =
\operatorname{logaddexp}(\log\beta + \log P, \log(1-\beta) + \log Q)`.

The gradient with respect to the student's logits :math:`s` (the teacher is a
constant): with :math:`r_k = \log Q_k - \log M_k` (:math:`\log Q_k - \log P_k`
for :math:`\beta = 1`),

.. math::

    \frac{\partial L_\beta}{\partial s_k}
        = \frac{c_\beta}{T}\, Q_k \big(r_k - \textstyle\sum_j Q_j r_j\big)
        = \frac{c_\beta}{T}\, Q_k \big(r_k - \mathrm{KL}(Q\|M)\big),
    \quad c_\beta = 1 - \beta \ (1 \text{ at } \beta = 1), \qquad
    \frac{\partial L_0}{\partial s_k} = \frac{Q_k - P_k}{T},

since :math:`\partial L_\beta / \partial Q_k = (1-\beta)(\log Q_k - \log M_k)` (the
:math:`\log M` terms of the two KL divergences cancel through :math:`\sum_k \partial M_k = 0`).
The loss and this gradient are computed together by
``crossent._lib._logdiv.jsd_and_grad_from_log`` (the KL in the gradient is the
loss's own non-negative sum).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from crossent._backends._node import graph_node, in_graph, torch_operands
from crossent._lib._checks import (
    check_array,
    check_axis,
    check_floating,
    check_ignore_index,
    check_integer_labels,
    check_reduction,
    check_same_shape,
    is_real_scalar,
    refuse_traced_numpy_scalar,
)
from crossent._lib._config import dynamo_tracing, get_validation
from crossent._lib._logdiv import (
    generalized_jsd_from_log,
    in_place,
    jsd_and_grad_from_log,
    log_ratio_from_logits,
    log_softmax,
    refine_close_rows,
)
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    compute_dtype,
    device,
    difference,
    forward_ad_active,
    is_jax_namespace,
    is_torch_namespace,
    is_torch_tensor,
    moveaxis,
    numpy_array,
    output_dtype,
    quiet,
    representable,
    torch_tracing,
)
from crossent._losses._common import reduce_loss

__all__ = [
    "check_beta",
    "check_temperature",
    "distill_rows",
    "distillation_loss",
]


def check_beta(beta: object) -> float:
    """`beta` is a number in [0, 1]."""
    if not is_real_scalar(beta):
        refuse_traced_numpy_scalar(beta, name="beta")
        msg = f"`beta` must be a number in [0, 1] such as 0.5; got {type(beta).__name__}."
        raise TypeError(msg)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        msg = (
            f"`beta` must lie in [0, 1] (0: forward KL(teacher||student), 1: reverse "
            f"KL(student||teacher), in between: the generalized JSD); got {beta!r}."
        )
        raise ValueError(msg)
    return beta


def check_temperature(temperature: object) -> float:
    """`temperature` is a positive, finite number."""
    if not is_real_scalar(temperature):
        refuse_traced_numpy_scalar(temperature, name="temperature")
        kind = type(temperature).__name__
        msg = f"`temperature` must be a positive number such as 1.0; got {kind}."
        raise TypeError(msg)
    temperature = float(temperature)
    if not 0.0 < temperature < math.inf:
        msg = (
            f"`temperature` must be positive and finite (the logits are divided by it); "
            f"got {temperature!r}. Use 1.0 for the plain softmax."
        )
        raise ValueError(msg)
    return temperature


def check_temperature_range(temperature: float, dtype: Any, *, xp: Any) -> None:
    """``1 / temperature`` must be finite in the compute `dtype`.

    Below that (float32: ``temperature < 2.9e-39``) the logits times ``1 / temperature``
    were inf and every loss, log-probability and gradient NaN, where the value is finite
    (the softmax is the argmax's one-hot) but not computable in that dtype.
    """
    big = float(xp.finfo(dtype).max)
    if 1.0 / temperature > big:
        msg = (
            f"`temperature` must be at least 1 / (the largest {dtype} value) = {1.0 / big:.3g} "
            f"for logits computed in {dtype} (the logits are divided by it); got "
            f"{temperature!r}. Use a larger temperature, or float64 logits (or weights)."
        )
        raise ValueError(msg)


HUGE_INV_TEMPERATURE = 2.0**64
"""Above this 1 / temperature the logits are shifted by their row max before the scaling
(``tempered``)."""


def tempered(
    x: Array, inv_t: float, *, xp: Any, overwrite: bool = False, shift: Array | None = None
) -> Array:
    r"""Logits `x` (classes last) divided by the temperature, as ``x * inv_t``.

    For a tiny temperature (``inv_t`` above :math:`2^{64}`; the check allows float32's down
    to 2.9e-39) ``x * inv_t`` overflowed for ordinary logits (2 / 3e-39 = 6.7e38 > float32's
    largest): the row max was inf and every value and gradient NaN where they are finite
    (KL of such rows about 3.3e38 in float32). There the row max :math:`m` (a finite one;
    0 otherwise) is subtracted first: :math:`(x - m) / T` is at most 0 and the softmax is
    unchanged; a class far below the max gets :math:`-\infty`, its probability 0. Ordinary
    temperatures take the plain product, unchanged bit for bit. `overwrite`: PyTorch
    tensors the caller owns (the fused loop), changed in place. `shift`: that row max as
    ``tempered_shift(x)`` gave it (a caller that needs it too), else computed here.
    """
    if inv_t <= HUGE_INV_TEMPERATURE:
        if inv_t == 1.0:
            return x
        return x.mul_(inv_t) if overwrite else x * inv_t
    m = tempered_shift(x, xp=xp) if shift is None else shift
    if overwrite:
        return x.sub_(m).mul_(inv_t)
    with quiet(xp, "over"):  # a class far below the max: -inf, rightly (probability 0)
        return difference(x, m, xp=xp) * inv_t


def tempered_shift(x: Array, *, xp: Any) -> Array:
    """The row max that ``tempered`` subtracts for a tiny temperature (a finite one; 0 where
    the max is infinite or NaN), keepdims, cut from autodiff."""
    m = _constant(xp.max(x, axis=-1, keepdims=True), xp=xp)
    return xp.where(xp.isfinite(m), m, xp.zeros_like(m))


def _constant(x: Array, *, xp: Any) -> Array:
    """`x` cut from autodiff (the teacher gets no gradient) on the backends that have one."""
    if is_torch_namespace(xp):
        return x.detach()
    if is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def distill_rows(
    student: Array,
    teacher: Array,
    *,
    beta: float,
    temperature: float,
    grad: bool,
    xp: Any,
    scale: float | Array = 1.0,
    work: Array | None = None,
) -> tuple[Array, Array | None]:
    r"""Per-row generalized JSD and its gradient for the student's logits (last axis).

    `student` and `teacher` are ``(..., V)`` logits in the compute dtype; returns
    the loss ``(...)`` and, with `grad`, `scale` (a number or an array of the
    rows' shape) times :math:`\partial L / \partial s` ``(..., V)`` (None
    otherwise). The formulas are in the module docstring. With `work`
    (untracked PyTorch buffers the caller owns, the fused loop: work space of
    shape ``(6, *student.shape)``) both inputs are overwritten and the gradient
    is returned in `student`'s storage.

    Rows close to each other keep a few ulps: the array-API formulas take the log ratio
    :math:`\log P - \log Q` from the logits (``log_ratio_from_logits``) and sum the terms
    from it; the in-place PyTorch formulas (untracked tensors: the fused loop,
    ``value_and_grad``, ``no_grad``), which difference the log-probabilities, have their
    close rows computed again that way (``refine_close_rows``; from the logits kept in
    ``work[4:]``). Both read the logits before their division by the temperature (whose
    quotients round at their size unless :math:`T` is a power of two). A tiny temperature
    (1 / T above ``HUGE_INV_TEMPERATURE``) keeps the differences of the logs.

    Tracked PyTorch logits (eager; not under a ``torch.func`` transform, forward-mode AD or
    ``torch.compile``) without `grad` go through one autograd node (:func:`_distill_node`):
    the untracked formulas and their closed-form gradient, kept for backward.
    """
    if not grad and work is None and _tracked_torch(xp, student):
        return _distill_node().apply(student, teacher, beta, temperature), None
    overwrite = work is not None
    inv_t = 1.0 / temperature
    wide = inv_t > HUGE_INV_TEMPERATURE
    fast = in_place(xp, student, teacher)
    # the rows the plain formulas leave inaccurate are computed again (refine_close_rows) where
    # rows can be picked eagerly: untracked PyTorch tensors and NumPy; elsewhere (JAX, traced
    # calls, autograd) the array-API formulas take the log ratio from the logits. Both from
    # the logits before the division by T: their differences are exact where the rows are
    # close, the quotients by a T that is not a power of two each rounded at its size (float32
    # rows 1e-5 apart at T = 3: the loss 2e-2 off, the gradient 3e-2 of its norm)
    eager = fast or getattr(xp, "__name__", "") in _NUMPY  # (not lru_cache'd: dynamo warns)
    logits = (teacher, student)
    kept = None  # the logits of the rows refine_close_rows computes again
    if eager and not wide:
        kept = logits
        if work is not None:  # overwritten below
            kept = (work[4].copy_(teacher), work[5].copy_(student))
    student = tempered(student, inv_t, xp=xp, overwrite=overwrite)
    teacher = tempered(teacher, inv_t, xp=xp, overwrite=overwrite)
    # the student's log Q relative to its top class: autodiff's gradient of a peaked student
    # (log_softmax); the in-place formulas (the fused loop, untracked tensors) form the gradient
    # in closed form, and PyTorch's kernel takes a third of the time (its max with indices
    # was a tenth of a 256 x 100 loss)
    log_q = log_softmax(
        student, axis=-1, xp=xp, overwrite=overwrite, exact_peak=not (overwrite or fast)
    )
    log_p = log_softmax(teacher, axis=-1, xp=xp, overwrite=overwrite)
    d = None  # log P - log Q from the logits, accurate for close rows
    if not (eager or wide):
        d = log_ratio_from_logits(*logits, log_p, log_q, axis=-1, xp=xp, inv_t=inv_t)
    buffers = None if work is None else work[:4]
    factor = scale * inv_t
    if not grad:
        loss = generalized_jsd_from_log(log_p, log_q, beta=beta, axis=-1, xp=xp, work=buffers, d=d)
        g = None
    else:
        loss, g = jsd_and_grad_from_log(
            log_p, log_q, beta=beta, xp=xp, scale=factor, work=buffers, wide=wide, d=d
        )
    if kept is not None:
        loss, g = refine_close_rows(
            *kept,
            loss,
            g,
            beta=beta,
            xp=xp,
            scale=factor,
            work=buffers,  # free by now
            inv_t=inv_t,
        )
    return loss, g


_NUMPY = ("numpy", "array_api_compat.numpy")
"""NumPy's namespaces (:func:`distill_rows` picks rows of NumPy arrays eagerly)."""


def _tracked_torch(xp: Any, student: Array) -> bool:
    """Whether `student` is a PyTorch tensor autograd tracks, eagerly (:func:`_distill_node`)."""
    if not is_torch_namespace(xp):
        return False
    import torch

    return (
        torch.is_grad_enabled()
        and student.requires_grad
        and not torch_tracing()
        and not forward_ad_active()
    )


@functools.cache
def _distill_node() -> Any:
    r"""The ``autograd.Function`` of :func:`distill_rows` for tracked PyTorch logits (defined on
    first use: this module imports without PyTorch).

    The forward pass computes the rows' losses and their closed-form gradient for the student
    (:func:`distill_rows` of the untracked values: the in-place formulas, the close rows
    computed again; one pass over the logits where autograd of the array-API formulas took
    about seven times as long at 256 x 4000) and keeps the gradient; backward scales it by
    each row's upstream gradient (a row whose loss is NaN: NaN throughout, as
    ``value_and_grad``; a row with an upstream gradient of 0, an ignored one: 0). Under
    ``create_graph`` backward forms the closed form again by differentiable operations, so
    second derivatives are those of the closed form. The teacher gets no gradient.
    """
    import torch

    from crossent._lib._xp import _torch_namespace

    xp = _torch_namespace()

    class DistillRows(torch.autograd.Function):
        """Per-row generalized JSD of tracked logits."""

        @staticmethod
        def forward(ctx: Any, student: Any, teacher: Any, beta: float, temperature: float) -> Any:
            loss, g = distill_rows(
                student.detach(), teacher.detach(), beta=beta, temperature=temperature,
                grad=True, xp=xp,
            )  # fmt: skip
            ctx.save_for_backward(student, teacher)
            ctx.options, ctx.g, ctx.nan = (beta, temperature), g, torch.isnan(loss)
            return loss

        @staticmethod
        def backward(ctx: Any, up: Any) -> tuple[Any, None, None, None]:
            student, teacher = ctx.saved_tensors
            beta, temperature = ctx.options
            g = ctx.g
            if torch.is_grad_enabled():  # create_graph: the closed form, recorded
                g = distill_rows(
                    student, teacher.detach(), beta=beta, temperature=temperature, grad=True,
                    xp=xp,
                )[1]  # fmt: skip
            nan = ctx.nan.unsqueeze(-1)
            g = torch.where(nan, math.nan, g)
            out = g * up.unsqueeze(-1)
            return torch.where((up == 0).unsqueeze(-1) & ~nan, 0.0, out), None, None, None

    return DistillRows


def _prepare(
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: object = 0.5,
    temperature: object = 1.0,
    axis: object = -1,
    target: Array | None = None,
    ignore_index: object = -100,
    reduction: object = "mean",
) -> tuple[Any, Array, Array, Array | None, dict[str, Any]]:
    """Checks; the logits moved to the last axis (compute dtype) and the counted-row mask.

    The defaults are :func:`distillation_loss`'s (``value_and_grad`` passes only
    the options it is given).
    """
    check_array(student_logits, name="student_logits")
    check_array(teacher_logits, name="teacher_logits")
    xp = array_namespace(
        student_logits=student_logits, teacher_logits=teacher_logits, target=target
    )
    check_floating(student_logits, name="student_logits", xp=xp)
    check_floating(teacher_logits, name="teacher_logits", xp=xp)
    check_same_shape(student_logits, teacher_logits, names=("student_logits", "teacher_logits"))
    checked_temperature = check_temperature(temperature)
    opts = {
        "beta": check_beta(beta),
        "temperature": checked_temperature,
        "reduction": check_reduction(reduction),
    }
    ndim = len(student_logits.shape)
    if ndim == 0:
        msg = "`student_logits` must have a class axis; got a 0-d array."
        raise ValueError(msg)
    ax = check_axis(axis, ndim, name="student_logits")
    index = check_ignore_index(ignore_index, allow_none=True)
    dtype = compute_dtype(student_logits.dtype, teacher_logits.dtype, xp=xp)
    check_temperature_range(checked_temperature, dtype, xp=xp)
    s = moveaxis(astype(student_logits, dtype, xp=xp), ax, -1, xp=xp)
    t = moveaxis(astype(_constant(teacher_logits, xp=xp), dtype, xp=xp), ax, -1, xp=xp)
    counted = None
    if target is not None:
        check_array(target, name="target")  # a number: array_namespace skipped it
        check_integer_labels(target, xp=xp)
        batch = tuple(s.shape[:-1])
        if tuple(target.shape) != batch:
            msg = (
                f"`target` must have the shape of the logits without `axis`, {batch}; "
                f"got {tuple(target.shape)}. It only masks rows equal to `ignore_index`."
            )
            raise ValueError(msg)
        if index is not None and representable(index, target.dtype, xp=xp):
            counted = target != index
    return xp, s, t, counted, {**opts, "axis": ax}


def _finish(
    rows: Array, counted: Array | None, reduction: str, *, xp: Any
) -> tuple[Array, Array | None]:
    """Masked rows → 0; the reduction; and d(result)/d(row) for ``"mean"`` (None: 1)."""
    denom = None
    if counted is not None:
        rows = xp.where(counted, rows, xp.zeros_like(rows))
        denom = xp.sum(xp.astype(counted, rows.dtype))
    return reduce_loss(rows, reduction, denominator=denom, xp=xp), denom


def distillation_loss(
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: int = -1,
    target: Array | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""Generalized Jensen–Shannon divergence between the teacher's and the student's softmax.

    With :math:`P = \operatorname{softmax}(t/T)` (teacher), :math:`Q =
    \operatorname{softmax}(s/T)` (student) and :math:`M = \beta P + (1-\beta) Q`,
    each row's loss is :math:`\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)`;
    ``beta=0`` is exactly the forward :math:`\mathrm{KL}(P\|Q)` and ``beta=1``
    exactly the reverse :math:`\mathrm{KL}(Q\|P)`. Computed in log space; the
    teacher is a constant (no gradient flows to it).

    Parameters
    ----------
    student_logits : array
        The student's logits; classes along `axis`.
    teacher_logits : array
        The teacher's logits, same shape.
    beta : float, default 0.5
        Mixture weight β in [0, 1].
    temperature : float, default 1.0
        Both logits are divided by it before the softmax (no :math:`T^2` factor).
    axis : int, default -1
        The class axis.
    target : array of int, optional
        Shape of the logits without `axis`; rows where it equals `ignore_index`
        are masked (they add 0 and do not count in the mean). Only used as a mask.
    ignore_index : int, default -100
        See `target`.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the number of counted rows (0 for none counted).

    Returns
    -------
    array
        0-d for ``"mean"``/``"sum"``, the logits' shape without `axis` for
        ``"none"``; in the logits' (promoted) dtype, computed in float32 or
        better (float32 under ``torch.autocast``, as PyTorch's losses).

    Raises
    ------
    TypeError
        Non-floating logits, a bad type for an option or integer `target`.
    ValueError
        Mismatched shapes, `beta` outside [0, 1], `temperature` ≤ 0, a bad `axis` or `reduction`.

    Notes
    -----
    .. math::

        L_\beta = \beta \sum_k P_k (\log P_k - \log M_k)
            + (1-\beta) \sum_k Q_k (\log Q_k - \log M_k),
        \qquad \log M = \operatorname{logaddexp}(\log\beta + \log P,\ \log(1-\beta) + \log Q).

    A term with :math:`P_k = 0` (or :math:`Q_k = 0`) contributes 0, so masked
    (−inf) classes are allowed in both models. Each KL is summed over the
    non-negative terms :math:`a_k (d_k + \operatorname{expm1}(-d_k))`,
    :math:`d_k = \log a_k - \log b_k`, as in :func:`crossent.info.kl_divergence`
    (the same function computes both), so the loss is never negative. Where the two models
    are close, :math:`d_k` is taken from the logits (their difference, shifted at the
    student's most probable class, minus :math:`\operatorname{log1p}` of its
    :math:`Q`-weighted ``expm1``: the difference of the log-probabilities rounds at their
    size, :math:`\epsilon |\log P_k|`, where :math:`d_k` may be :math:`10^{-5}`) and the
    terms by their series, so the loss and its gradient keep a few ulps however close the
    models are, at any temperature (the differences are those of the logits, divided by
    :math:`T` after: each model's logits divided first round at their size unless :math:`T`
    is a power of two, 2e-2 relative at :math:`T = 3`) (float32 rows :math:`10^{-5}` apart:
    1e-7 relative, where summing the
    differences of the log-probabilities was 0.5 % off and the gradient 2–10 %; peaked rows
    of 32000 classes at a KL of 1e-3: 2e-3). On untracked PyTorch tensors and NumPy arrays
    the rows are computed first by the faster formulas and those below a small divergence
    (:math:`0.05\,\beta(1-\beta)`, 0.05 at the ends) again, in float64 for float32
    inputs. This is TRL's ``generalized_jsd_loss`` (GKD) [1]_ without its :math:`T^2`
    factor.

    The gradient for the student's logits is :math:`c_\beta Q_k (r_k - \mathrm{KL}(Q\|M))`,
    :math:`r = \log Q - \log M`, formed from :math:`r - r_*` (:math:`*` the student's most
    probable class), accurate to the input's rounding for a peaked student far from the
    teacher, by ``value_and_grad``, :func:`crossent.fused.linear_distillation_loss` and
    PyTorch's autograd of this function (eager: one autograd node whose forward pass forms
    the closed form; about a fifth of the time autograd of the formulas took, and exact
    second derivatives of the closed form under ``create_graph``). Other autodiff
    (``jax.grad``, ``torch.func``, ``torch.compile``) differentiates the terms above and,
    like PyTorch's own autograd of the formula, cancels there: its error is about the
    dtype's epsilon times the KL per class, relative to a gradient :math:`(1 - Q_*)` times
    smaller (float32 rows of a student with :math:`Q_* \approx 1 - 10^{-4}` and a KL near
    20 were off by 17 % of their norm). Use ``value_and_grad`` there where such rows matter.

    A row whose loss is :math:`+\infty` has a gradient too. ``beta=0`` with a student
    class of −inf the teacher gives mass: the limit :math:`(Q - P)/T`, on every path (as
    PyTorch's ``kl_div``). ``beta=1`` with a teacher class of −inf the student gives mass
    (:math:`Q_k > 0 = P_k`, underflowed :math:`Q_k` included): the limit as those teacher
    probabilities vanish alike, from ``value_and_grad``, the fused loss and PyTorch's eager
    autograd: :math:`+\infty` on those classes, :math:`-\infty` on the student's other
    classes, 0 where :math:`Q_k = 0`; finite if the student has no mass where the teacher
    has. Other autodiff of this function gives what PyTorch's autograd of ``kl_div`` gives,
    NaN on those classes.
    Through a matrix product (the fused loss's `hidden`) the infinities can meet as NaN.

    References
    ----------
    .. [1] Agarwal et al., "On-Policy Distillation of Language Models: Learning from
       Self-Generated Mistakes" (GKD), ICLR 2024.

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> s = np.array([[2.0, 0.0, -1.0]])
    >>> t = np.array([[1.0, 1.0, 0.0]])
    >>> print(f"{float(ce.distillation_loss(s, t, beta=0.0)):.6f}")  # KL(teacher || student)
    0.463214
    >>> log_p, log_q = t - np.log(np.exp(t).sum()), s - np.log(np.exp(s).sum())
    >>> print(f"{np.sum(np.exp(log_p) * (log_p - log_q)):.6f}")
    0.463214
    >>> print(f"{float(ce.distillation_loss(s, t, beta=0.5, temperature=2.0)):.6f}")
    0.030295
    """
    if (
        is_torch_tensor(student_logits)
        and dynamo_tracing()
        and in_graph()
        and torch_operands(axis, teacher_logits, target)
    ):
        return graph_node(  # one opaque node: few guards (crossent._backends._node)
            "distillation_loss", student_logits, teacher_logits, checked=get_validation(),
            beta=check_beta(beta), temperature=check_temperature(temperature), axis=axis,
            target=target, ignore_index=ignore_index, reduction=check_reduction(reduction),
        )  # fmt: skip
    value, _ = _distill(
        student_logits,
        teacher_logits,
        grad=False,
        beta=beta,
        temperature=temperature,
        axis=axis,
        target=target,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return numpy_array(value)


def _distill(
    student_logits: Array, teacher_logits: Array, *, grad: bool, **options: Any
) -> tuple[Array, Array | None]:
    """The loss and, with `grad`, its closed-form gradient for `student_logits`."""
    xp, s, t, counted, opts = _prepare(student_logits, teacher_logits, **options)
    rows, g = distill_rows(
        s, t, beta=opts["beta"], temperature=opts["temperature"], grad=grad, xp=xp
    )
    value, denom = _finish(rows, counted, opts["reduction"], xp=xp)
    out_dtype = output_dtype(student_logits, teacher_logits, xp=xp)
    value = astype(value, out_dtype, xp=xp)
    if g is None:
        return value, None
    # ignored rows: 0; a NaN loss row (a NaN or +inf logit): NaN throughout, as autodiff's
    # (the closed form reads the teacher's probabilities too, finite in part of such a row)
    bad = xp.isnan(rows)
    keep = ~bad if counted is None else counted & ~bad
    fill = xp.where(bad, xp.full_like(rows, float("nan")), xp.zeros_like(rows))
    g = xp.where(keep[..., None], g, xp.astype(fill, g.dtype)[..., None])
    if opts["reduction"] == "mean":
        n = (
            denom
            if denom is not None
            else xp.asarray(float(math.prod(rows.shape)), dtype=g.dtype, device=device(g))
        )
        g = g / xp.where(n > 0, n, xp.ones_like(n))
    g = moveaxis(g, -1, opts["axis"], xp=xp)
    return value, astype(g, student_logits.dtype, xp=xp)


def _distill_value_and_grad(
    student_logits: Array, teacher_logits: Array, **options: Any
) -> tuple[Array, Array]:
    """``(distillation_loss(...), d loss / d student_logits)`` in closed form."""
    value, g = _distill(student_logits, teacher_logits, grad=True, **options)
    if g is None:  # pragma: no cover - grad=True always returns it
        msg = "internal: the distillation gradient was not computed."
        raise RuntimeError(msg)
    return value, g
