r"""Sparse categorical cross-entropy (integer class labels) and PyTorch's ``nll_loss``.

Layout of the module:

- :func:`_sparse_rows` / :func:`_sparse_rows_grad`: the per-row loss and its
  closed-form gradient, class axis last, in the compute dtype. They are the
  single implementation behind the public function (every backend), the
  closed-form :func:`_sparse_value_and_grad`, and the PyTorch fast path
  (:class:`torch.autograd.Function` built by :func:`_torch_function`), which
  calls them on chunks of rows.
- :func:`sparse_categorical_cross_entropy`: validation, then the fast path
  (PyTorch tensor and ``from_logits=True``) or the generic array-API path
  (differentiable by the backend's own autodiff).
- :func:`_nll_loss`: PyTorch's ``nll_loss`` semantics on log-probabilities,
  for :class:`crossent.nn.NLLLoss`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Literal

from crossent._lib._checks import (
    check_axis,
    check_floating,
    check_from_logits,
    check_integer_labels,
    check_label_range,
    check_nonnegative_scalar,
    check_probability_rows,
    check_reduction,
    check_unit_interval_scalar,
)
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    compute_dtype,
    device,
    is_torch_namespace,
    logsumexp,
    safe_divide,
    take_along_axis,
)
from crossent._losses._common import reduce_loss
from crossent._losses._logprob import (
    add_at_index,
    check_class_weight,
    class_terms,
    propagate_nan,
    softcap_backward,
    softcap_logits,
    term_grad,
    term_value,
)

__all__ = ["sparse_categorical_cross_entropy"]

_CHUNK_ELEMENTS = 1 << 20
"""Rows per chunk of the PyTorch fast path: about this many logits (4 MiB in float32)."""


# --------------------------------------------------------------------------- validation


def _check_options(
    *,
    from_logits: object,
    label_smoothing: object,
    gamma: object,
    z_loss: object,
    softcap: object,
    reduction: object,
) -> tuple[float, float, float, float | None, str]:
    if not isinstance(from_logits, bool):
        msg = f"`from_logits` must be a bool; got {type(from_logits).__name__}."
        raise TypeError(msg)
    eps = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    gamma = check_nonnegative_scalar(gamma, name="gamma")
    z_loss = check_nonnegative_scalar(z_loss, name="z_loss")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float):
            msg = f"`softcap` must be None or a positive number such as 30.0; got {softcap!r}."
            raise TypeError(msg)
        if not 0 < softcap < float("inf"):
            msg = (
                f"`softcap` must be positive and finite (or None for no capping); got {softcap!r}."
            )
            raise ValueError(msg)
        softcap = float(softcap)
    check_from_logits(bool(from_logits), z_loss=z_loss, softcap=softcap)
    return eps, gamma, z_loss, softcap, check_reduction(reduction)


def _check_labels(
    input: Array,
    target: Array,
    *,
    axis: object,
    weight: Array | None,
    ignore_index: object,
    xp: Any,
) -> int:
    """Shapes, dtypes and values of `input`, `target`, `weight`; returns the class axis."""
    if not hasattr(input, "shape") or not hasattr(target, "shape"):
        msg = "`input` and `target` must be arrays (NumPy, PyTorch, JAX, ...)."
        raise TypeError(msg)
    axis = check_axis(axis, input.ndim)
    check_floating(input, name="input", xp=xp)
    check_integer_labels(target, xp=xp)
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        msg = f"`ignore_index` must be None or an int such as -100; got {ignore_index!r}."
        raise TypeError(msg)
    num_classes = int(input.shape[axis])
    expected = tuple(input.shape[:axis]) + tuple(input.shape[axis + 1 :])
    if tuple(target.shape) != expected:
        squeeze = (
            " Drop its trailing axis of size 1 first (e.g. `target.reshape(-1)`)."
            if tuple(target.shape) == (*expected, 1)
            else ""
        )
        msg = (
            f"`target` must have the shape of `input` without the class axis {axis}, "
            f"{expected}; got {tuple(target.shape)}.{squeeze} For one-hot or soft targets use "
            "categorical_cross_entropy."
        )
        raise ValueError(msg)
    check_class_weight(weight, num_classes, xp=xp)
    check_label_range(target, num_classes, ignore_index=ignore_index, xp=xp)
    return axis


# --------------------------------------------------------------------------- the row core


def _labels(target: Array, ignore_index: int | None, *, xp: Any) -> tuple[Array, Array]:
    """(counted, safe label): ignored labels become 0 so that gathers stay in range."""
    if ignore_index is None:
        return xp.ones(target.shape, dtype=xp.bool, device=device(target)), target
    valid = target != ignore_index
    return valid, xp.where(valid, target, xp.zeros_like(target))


def _target_weight(
    weight: Array | None, label: Array, valid: Array, *, dtype: Any, xp: Any
) -> Array:
    """w_y for counted targets, 0 for ignored ones."""
    if weight is None:
        return xp.astype(valid, dtype)
    w_y = xp.reshape(xp.take(weight, xp.reshape(label, (-1,)), axis=0), label.shape)
    return xp.where(valid, w_y, xp.zeros_like(w_y))


def _smoothing_coef(
    weight: Array | None, eps: float, num_classes: int, *, like: Array, xp: Any
) -> Array:
    """ε/C · w_k (a 0-d array ε/C without weights)."""
    if weight is None:
        return xp.asarray(eps / num_classes, dtype=like.dtype, device=device(like))
    return (eps / num_classes) * weight


def _gather(x: Array, label: Array, *, xp: Any) -> Array:
    return xp.squeeze(take_along_axis(x, xp.expand_dims(label, axis=-1), axis=-1, xp=xp), axis=-1)


def _sparse_rows(
    z: Array,
    target: Array,
    lse: Array,
    *,
    kind: str,
    weight: Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    gamma: float,
    z_loss: float,
    xp: Any,
) -> tuple[Array, Array]:
    r"""Per-row loss and target weight w_y (0 where ignored); class axis last.

    loss = (1-ε) w_y f_y (-log p_y) + (ε/C) Σ_k w_k f_k (-log p_k) + z_loss · lse².
    """
    eps = label_smoothing
    valid, label = _labels(target, ignore_index, xp=xp)
    w_y = _target_weight(weight, label, valid, dtype=z.dtype, xp=xp)
    terms_y = class_terms(_gather(z, label, xp=xp), lse, kind=kind, gamma=gamma, xp=xp)
    row = term_value((1 - eps) * w_y, terms_y, gamma, xp=xp)
    if eps > 0:
        c_s = _smoothing_coef(weight, eps, z.shape[-1], like=z, xp=xp)
        lse_col = None if lse is None else xp.expand_dims(lse, axis=-1)
        terms = class_terms(z, lse_col, kind=kind, gamma=gamma, xp=xp)
        row = row + xp.sum(term_value(c_s, terms, gamma, xp=xp), axis=-1)
    if z_loss > 0:
        row = row + z_loss * (lse * lse)
    row = propagate_nan(row, z, kind=kind, xp=xp)
    return xp.where(valid, row, xp.zeros_like(row)), w_y


def _sparse_rows_grad(
    z: Array,
    target: Array,
    lse: Array,
    scale: Array,
    *,
    kind: str,
    weight: Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    gamma: float,
    z_loss: float,
    xp: Any,
) -> Array:
    r"""Closed-form d(Σ_i scale_i · loss_i)/dz, class axis last (see :mod:`._logprob`).

    Ignored rows get an all-zero gradient row (their ``lse`` is taken as +inf
    so that the softmax row is 0 without an extra pass).
    """
    eps = label_smoothing
    valid, label = _labels(target, ignore_index, xp=xp)
    w_y = _target_weight(weight, label, valid, dtype=z.dtype, xp=xp)
    s = xp.where(valid, scale, xp.zeros_like(scale))
    s_col = xp.expand_dims(s, axis=-1)
    if kind == "logits":
        lse = xp.where(valid, lse, xp.full_like(lse, float("inf")))
    lse_col = None if lse is None else xp.expand_dims(lse, axis=-1)
    terms_y = class_terms(_gather(z, label, xp=xp), lse, kind=kind, gamma=gamma, xp=xp)
    h_y = term_grad((1 - eps) * w_y, terms_y, gamma, kind=kind, xp=xp)
    h_dense = None
    if eps > 0:
        c_s = _smoothing_coef(weight, eps, z.shape[-1], like=z, xp=xp)
        terms = class_terms(z, lse_col, kind=kind, gamma=gamma, xp=xp)
        h_dense = term_grad(c_s, terms, gamma, kind=kind, xp=xp)
    if kind != "logits":
        g = xp.zeros_like(z) if h_dense is None else s_col * h_dense + xp.zeros_like(z)
        return add_at_index(g, label, s * h_y, xp=xp)
    total = h_y
    if h_dense is not None:
        if gamma == 0:  # h_dense is ε/C·w (or ε/C): its row sum needs no N×C pass
            c_sum = xp.sum(h_dense) if weight is not None else eps * xp.ones_like(h_dense)
            total = total + xp.where(valid, c_sum * xp.ones_like(total), xp.zeros_like(total))
        else:
            total = total + xp.sum(h_dense, axis=-1)
    if z_loss > 0:
        total = total + (2 * z_loss) * xp.where(valid, lse, xp.zeros_like(lse))
    g = xp.expand_dims(total * s, axis=-1) * xp.exp(z - lse_col)
    if h_dense is not None:
        g = g - s_col * h_dense
    return add_at_index(g, label, -s * h_y, xp=xp)


def _row_scale(
    grad_output: Array | None,
    reduction: str,
    denominator: Array,
    shape: tuple[int, ...],
    *,
    xp: Any,
) -> Array:
    """d(reduced loss)/d(row loss) times the upstream gradient, one value per row."""
    if grad_output is None:
        g = xp.ones((), dtype=denominator.dtype, device=device(denominator))
    else:
        g = xp.astype(grad_output, denominator.dtype)
    if reduction == "mean":
        g = safe_divide(g, denominator, xp=xp)
    return xp.broadcast_to(g, shape)


@contextlib.contextmanager
def _no_autograd(xp: Any) -> Iterator[None]:
    """Closed forms need no graph: turn PyTorch's autograd off inside."""
    if is_torch_namespace(xp):
        import torch

        with torch.no_grad():
            yield
    else:
        yield


# --------------------------------------------------------------------------- PyTorch fast path


@functools.cache
def _torch_function() -> Any:
    """The :class:`torch.autograd.Function` of the logits path (built on first use)."""
    import torch
    from torch.autograd.function import once_differentiable

    xp = array_namespace(torch.empty(0))

    def layout(x: Any, target: Any, axis: int) -> tuple[Any, Any, list[Any]]:
        """Class axis last; contiguous inputs become (rows, C) chunks of ~_CHUNK_ELEMENTS."""
        xl = x.movedim(axis, -1)
        if not xl.is_contiguous():  # e.g. (N, C, d1, d2): one pass over the strided view
            return xl, target, [slice(None)]
        num_classes = max(int(xl.shape[-1]), 1)
        xl = xl.reshape(-1, xl.shape[-1])
        step = max(1, _CHUNK_ELEMENTS // num_classes)
        chunks = [slice(i, i + step) for i in range(0, xl.shape[0], step)]
        return xl, target.reshape(-1), chunks

    class SparseCrossEntropy(torch.autograd.Function):
        """Forward keeps only ``lse`` per row; backward rebuilds softmax from the input."""

        @staticmethod
        def forward(ctx: Any, x: Any, target: Any, weight: Any, opts: dict[str, Any]) -> Any:
            cdt = compute_dtype(x.dtype, xp=xp)
            w = None if weight is None else weight.to(cdt)
            xl, tl, chunks = layout(x, target, opts["axis"])
            lse = torch.empty(tl.shape, dtype=cdt, device=x.device)
            row = torch.empty(tl.shape, dtype=cdt, device=x.device)
            w_y = torch.empty(tl.shape, dtype=cdt, device=x.device)
            for sl in chunks:
                z = softcap_logits(xl[sl].to(cdt), opts["softcap"], xp=xp)
                lse[sl] = torch.logsumexp(z, dim=-1)
                row[sl], w_y[sl] = _sparse_rows(
                    z, tl[sl], lse[sl], kind="logits", weight=w, **opts["rows"], xp=xp
                )
            denominator = w_y.sum()
            ctx.save_for_backward(x, target, w, lse, denominator)
            ctx.opts = opts
            loss = reduce_loss(row, opts["reduction"], denominator=denominator, xp=xp)
            return (
                loss.reshape(target.shape).to(x.dtype)
                if opts["reduction"] == "none"
                else loss.to(x.dtype)
            )

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad_output: Any) -> Any:
            x, target, w, lse, denominator = ctx.saved_tensors
            opts = ctx.opts
            cdt = lse.dtype
            xl, tl, chunks = layout(x, target, opts["axis"])
            scale = _row_scale(
                grad_output.reshape(tl.shape) if opts["reduction"] == "none" else grad_output,
                opts["reduction"],
                denominator,
                tuple(tl.shape),
                xp=xp,
            )
            grad = torch.empty(xl.shape, dtype=x.dtype, device=x.device) if len(chunks) > 1 else xl
            for sl in chunks:
                xc = xl[sl].to(cdt)
                z = softcap_logits(xc, opts["softcap"], xp=xp)
                g = _sparse_rows_grad(
                    z, tl[sl], lse[sl], scale[sl], kind="logits", weight=w, **opts["rows"], xp=xp
                )
                g = softcap_backward(xc, opts["softcap"], g, xp=xp)
                if len(chunks) == 1:
                    grad = g.to(x.dtype)
                else:
                    grad[sl] = g
            grad = grad.reshape(x.movedim(opts["axis"], -1).shape).movedim(-1, opts["axis"])
            return grad, None, None, None

    return SparseCrossEntropy


# --------------------------------------------------------------------------- public API


def sparse_categorical_cross_entropy(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""Cross-entropy between class scores and integer class labels.

    Parameters
    ----------
    input : array
        Probabilities, or logits if `from_logits` is True; classes lie along `axis`.
        Each row of probabilities must sum to 1 up to rounding,
        :math:`|\sum_k p_k - 1| \le \epsilon_{\text{in}} + C\,\epsilon_{\text{sum}}`
        (machine epsilons of the input's dtype and of the summing dtype,
        float32 for float16/bfloat16): a softmax output passes, a sigmoid
        output or unnormalized scores raise.
    target : array of int
        Class indices in ``[0, C)`` (or `ignore_index`); the shape of `input` without `axis`.
    from_logits : bool, default False
        Whether `input` holds logits (any real numbers, ``-inf`` masks a class)
        rather than probabilities.
    axis : int, default -1
        The class axis of `input` (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).
    weight : array, optional
        Per-class weights, shape ``(C,)``, floating, non-negative.
    ignore_index : int, optional
        Targets equal to it contribute nothing to the loss, the gradient or the
        mean's denominator.
    label_smoothing : float, default 0.0
        ε in [0, 1]: the target becomes :math:`(1-\varepsilon)\,e_y + \varepsilon/C`.
    gamma : float, default 0.0
        Focal-loss focusing parameter; each class term gets :math:`(1-p_k)^\gamma`.
    z_loss : float, default 0.0
        Adds ``z_loss * lse(logits)**2`` per counted target (PaLM). Needs logits.
    softcap : float, optional
        Replaces logits by ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        ``-inf`` logits stay ``-inf``. Needs logits.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the summed weight :math:`\sum_i w_{y_i}` of the
        counted targets (the count without weights); a mean over no counted
        target is 0 with a zero gradient.

    Returns
    -------
    array
        0-d for ``"mean"`` and ``"sum"``; the shape of `target` for ``"none"``
        (0 at ignored targets). Same array type, device and dtype as `input`.

    Raises
    ------
    TypeError
        Float (or boolean) labels, an integer `input`, non-numeric options.
    ValueError
        Wrong shapes, labels outside ``[0, C)`` that are not `ignore_index`,
        a `weight` of the wrong length or with negative entries, probabilities
        outside [0, 1] or rows of them that do not sum to 1, `z_loss`/`softcap`
        without ``from_logits=True``, a bad `axis` or `reduction`.

    See Also
    --------
    categorical_cross_entropy : one-hot or soft targets.

    Notes
    -----
    With :math:`\log p_k = z_k - \operatorname{lse}(z)` (logits) or
    :math:`\max(\log p_k, -100)` (probabilities) and
    :math:`f_k = (1-p_k)^\gamma`, the loss of one counted target is

    .. math::
        \ell = (1-\varepsilon)\, w_y f_y (-\log p_y)
             + \frac{\varepsilon}{C}\sum_k w_k f_k (-\log p_k)
             + \lambda_z \operatorname{lse}(z)^2 ,

    PyTorch's composition of label smoothing with class weights [1]_; the
    z-loss term is not weighted. ``lse`` is computed as
    :math:`m + \log\sum_k e^{z_k - m}`, :math:`m = \max_k z_k` [2]_, so no
    finite logit overflows. float16/bfloat16 inputs are computed in float32
    and the result is cast back.

    A class with a ``-inf`` logit (or probability 0) and target 0 contributes
    exactly 0 to the value and the gradient. With label smoothing every class
    has a positive target, so a ``-inf`` logit makes the loss ``+inf``, which
    is the mathematically right value (a probability-0 class then gives the
    clamped ``100`` instead).

    On PyTorch tensors with ``from_logits=True`` a custom autograd function
    keeps only the input and one ``lse`` per row for the backward pass (no
    copy of the logits), and computes the gradient in closed form; it does
    not support double backward. Differences from
    ``torch.nn.functional.cross_entropy``: the class axis defaults to -1, and
    a mean over no counted target is 0 instead of NaN.

    References
    ----------
    .. [1] PyTorch, ``torch.nn.functional.cross_entropy`` (``label_smoothing``).
    .. [2] Blanchard, Higham, Higham, "Accurately computing the log-sum-exp
       and softmax functions", IMA J. Numer. Anal., 2021.

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    >>> loss = ce.sparse_categorical_cross_entropy(logits[:1], np.array([0]), from_logits=True)
    >>> print(float(loss))
    0.12692801104297...
    >>> ce.sparse_categorical_cross_entropy(logits, np.array([0, -100]), from_logits=True,
    ...                                     ignore_index=-100, reduction="none")
    array([0.12692801, 0.        ])
    >>> probs = np.array([[0.9, 0.1], [0.0, 1.0]])
    >>> print(float(ce.sparse_categorical_cross_entropy(probs, np.array([0, 1]), reduction="sum")))
    0.10536051565782...
    """
    xp = array_namespace(input=input, target=target, weight=weight)
    setup = _setup(
        input, target, from_logits=from_logits, axis=axis, weight=weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma,
        z_loss=z_loss, softcap=softcap, reduction=reduction, xp=xp,
    )  # fmt: skip
    if setup["kind"] == "logits" and is_torch_namespace(xp):
        return _torch_function().apply(input, target, weight, setup)
    return _forward(input, target, weight=weight, **setup, xp=xp)


def _setup(
    input: Array,
    target: Array,
    *,
    from_logits: object,
    axis: object,
    weight: Array | None,
    ignore_index: object,
    label_smoothing: object,
    gamma: object,
    z_loss: object,
    softcap: object,
    reduction: object,
    xp: Any,
) -> dict[str, Any]:
    """Validate everything; return the keyword arguments of the computing functions."""
    eps, gamma_, z_loss_, softcap_, reduction_ = _check_options(
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        gamma=gamma,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
    )
    axis_ = _check_labels(input, target, axis=axis, weight=weight, ignore_index=ignore_index, xp=xp)
    if not from_logits:
        check_probability_rows(input, axis=axis_, xp=xp)
    rows = {
        "ignore_index": ignore_index,
        "label_smoothing": eps,
        "gamma": gamma_,
        "z_loss": z_loss_,
    }
    kind = "logits" if from_logits else "probs"
    return {"kind": kind, "axis": axis_, "softcap": softcap_, "reduction": reduction_, "rows": rows}


def _prepare(
    input: Array, *, kind: str, axis: int, weight: Array | None, softcap: float | None, xp: Any
) -> tuple[Array, Array, Array, Array | None]:
    """(x, z, lse, w): input in the compute dtype with classes last, capped logits, lse, weight."""
    cdt = compute_dtype(input.dtype, xp=xp)
    w = None if weight is None else astype(weight, cdt, xp=xp)
    x = xp.moveaxis(astype(input, cdt, xp=xp), axis, -1)
    z = softcap_logits(x, softcap, xp=xp)
    lse = logsumexp(z, axis=-1, xp=xp) if kind == "logits" else None
    return x, z, lse, w


def _forward(
    input: Array,
    target: Array,
    *,
    kind: str,
    axis: int,
    weight: Array | None,
    softcap: float | None,
    reduction: str,
    rows: dict[str, Any],
    xp: Any,
) -> Array:
    """The generic (autodiff-friendly) path on any backend."""
    _, z, lse, w = _prepare(input, kind=kind, axis=axis, weight=weight, softcap=softcap, xp=xp)
    row, w_y = _sparse_rows(z, target, lse, kind=kind, weight=w, **rows, xp=xp)
    loss = reduce_loss(row, reduction, denominator=xp.sum(w_y), xp=xp)
    return astype(loss, input.dtype, xp=xp)


def _sparse_value_and_grad(
    input: Array,
    target: Array,
    *,
    from_logits: bool = False,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    grad_output: Array | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    """The loss and d(loss)/d(input) in closed form, on every backend, no autodiff.

    For ``reduction="none"`` the gradient is that of ``sum(grad_output * loss)``
    (``grad_output`` defaults to ones); otherwise ``grad_output`` (0-d) scales it.
    """
    if xp is None:
        xp = array_namespace(input=input, target=target, weight=weight)
    setup = _setup(
        input, target, from_logits=from_logits, axis=axis, weight=weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma,
        z_loss=z_loss, softcap=softcap, reduction=reduction, xp=xp,
    )  # fmt: skip
    return _value_and_grad(input, target, weight=weight, **setup, grad_output=grad_output, xp=xp)


def _value_and_grad(
    input: Array,
    target: Array,
    *,
    kind: str,
    axis: int,
    weight: Array | None,
    softcap: float | None,
    reduction: str,
    rows: dict[str, Any],
    grad_output: Array | None,
    xp: Any,
) -> tuple[Array, Array]:
    with _no_autograd(xp):
        x, z, lse, w = _prepare(input, kind=kind, axis=axis, weight=weight, softcap=softcap, xp=xp)
        row, w_y = _sparse_rows(z, target, lse, kind=kind, weight=w, **rows, xp=xp)
        denominator = xp.sum(w_y)
        loss = reduce_loss(row, reduction, denominator=denominator, xp=xp)
        scale = _row_scale(grad_output, reduction, denominator, tuple(row.shape), xp=xp)
        g = _sparse_rows_grad(z, target, lse, scale, kind=kind, weight=w, **rows, xp=xp)
        g = softcap_backward(x, softcap, g, xp=xp)
        grad = xp.moveaxis(g, -1, axis)
    return astype(loss, input.dtype, xp=xp), astype(grad, input.dtype, xp=xp)


def _nll_loss(
    log_probs: Array,
    target: Array,
    *,
    axis: int = 1,
    weight: Array | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    xp: Any = None,
) -> Array:
    r"""PyTorch's ``nll_loss``: :math:`-w_y x_y` per counted target, no normalisation, no clamp.

    ``"mean"`` divides by :math:`\sum_i w_{y_i}` over counted targets (0 when
    there are none). Differentiable by the backend's autodiff.
    """
    if xp is None:
        xp = array_namespace(input=log_probs, target=target, weight=weight)
    reduction = check_reduction(reduction)
    axis = _check_labels(
        log_probs, target, axis=axis, weight=weight, ignore_index=ignore_index, xp=xp
    )
    rows = {"ignore_index": ignore_index, "label_smoothing": 0.0, "gamma": 0.0, "z_loss": 0.0}
    return _forward(
        log_probs,
        target,
        kind="log_probs",
        axis=axis,
        weight=weight,
        softcap=None,
        reduction=reduction,
        rows=rows,
        xp=xp,
    )
