r"""ListNet top-one cross-entropy for learning to rank."""

from __future__ import annotations

from typing import Any, Literal

from crossent._backends._node import graph_node, in_graph, torch_operands
from crossent._lib._checks import check_reduction
from crossent._lib._config import dynamo_tracing, get_validation
from crossent._lib._xp import (
    Array,
    array_namespace,
    astype,
    compute_dtype,
    difference,
    is_torch_tensor,
    logsumexp,
    moveaxis,
    numpy_array,
    output_dtype,
    shift_by_max,
)
from crossent._losses._categorical import _check_soft, _soft_loss, _soft_value_and_grad
from crossent._losses._sparse import _no_autograd

__all__ = ["listnet_loss"]

_NAMES = ("scores", "relevance")


def _prepare(
    scores: Array, relevance: Array, *, axis: object, reduction: object, xp: Any
) -> tuple[Array, Array, str, int]:
    """Validate; return (scores, softmax(relevance), reduction, axis), list axis last."""
    axis, reduction = _check_soft(
        scores, relevance, axis=axis, reduction=reduction, xp=xp, names=_NAMES
    )
    cdt = compute_dtype(scores.dtype, xp=xp)
    s = moveaxis(astype(scores, cdt, xp=xp), axis, -1, xp=xp)
    r = moveaxis(astype(relevance, cdt, xp=xp), axis, -1, xp=xp)
    r, _ = shift_by_max(r, xp=xp)  # softmax(r) accurate for large grades
    q = xp.exp(difference(r, logsumexp(r, axis=-1, keepdims=True, xp=xp), xp=xp))
    return s, q, reduction, axis


def listnet_loss(
    scores: Array,
    relevance: Array,
    *,
    axis: int = -1,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Array:
    r"""ListNet top-one cross-entropy between relevance grades and predicted scores.

    Parameters
    ----------
    scores : array
        Predicted scores (logits) of the items of each list; items lie along `axis`.
        ``-inf`` masks an item (padding).
    relevance : array
        Relevance grades (any real numbers), same shape as `scores`; ``-inf``
        masks an item. Floating, like every array but class indices: cast
        integer grades first (``relevance.astype(float)``).
    axis : int, default -1
        The item axis.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` averages over lists.

    Returns
    -------
    array
        0-d for ``"mean"`` and ``"sum"``; one value per list for ``"none"``.

    Raises
    ------
    TypeError
        Non-floating `scores` or `relevance`.
    ValueError
        Shapes that differ, a bad `axis` or `reduction`.

    Notes
    -----
    The top-one probabilities of ListNet [1]_ are softmaxes, so the loss of one list is

    .. math:: \ell(s, r) = -\sum_k \operatorname{softmax}(r)_k \log\operatorname{softmax}(s)_k
              = \sum_k \operatorname{softmax}(r)_k\,(\operatorname{lse}(s) - s_k),

    which is :func:`categorical_cross_entropy` on logits `scores` with the
    soft target :math:`\operatorname{softmax}(r)`. Its gradient is
    :math:`\operatorname{softmax}(s) - \operatorname{softmax}(r)`.

    References
    ----------
    .. [1] Cao, Qin, Liu, Tsai, Li, "Learning to rank: from pairwise approach
       to listwise approach", ICML 2007.

    Examples
    --------
    >>> import numpy as np
    >>> import crossent as ce
    >>> scores = np.array([[2.0, 1.0, 0.0]])
    >>> print(float(ce.listnet_loss(scores, np.array([[2.0, 1.0, 0.0]]))))
    0.83239558...
    >>> print(float(ce.listnet_loss(scores, np.array([[0.0, 1.0, 2.0]]))))
    1.98281634...
    """
    if (
        is_torch_tensor(scores)
        and dynamo_tracing()
        and in_graph()
        and torch_operands(axis, relevance)
    ):
        return graph_node(  # one opaque node: few guards (crossent._backends._node)
            "listnet_loss", scores, relevance, checked=get_validation(), axis=axis,
            reduction=check_reduction(reduction),
        )  # fmt: skip
    xp = array_namespace(scores=scores, relevance=relevance)
    s, q, reduction_, _ = _prepare(scores, relevance, axis=axis, reduction=reduction, xp=xp)
    loss = _soft_loss(s, q, kind="logits", gamma=0.0, reduction=reduction_, xp=xp)
    return numpy_array(astype(loss, output_dtype(scores, xp=xp), xp=xp))


def _listnet_value_and_grad(
    scores: Array,
    relevance: Array,
    *,
    axis: int = -1,
    reduction: str = "mean",
    grad_output: Array | None = None,
    xp: Any = None,
) -> tuple[Array, Array]:
    """The ListNet loss and d(loss)/d(scores) in closed form, on every backend, no autodiff."""
    if xp is None:
        xp = array_namespace(scores=scores, relevance=relevance)
    with _no_autograd(xp):
        s, q, reduction_, axis_ = _prepare(scores, relevance, axis=axis, reduction=reduction, xp=xp)
        loss, grad = _soft_value_and_grad(
            s, q, kind="logits", gamma=0.0, reduction=reduction_, grad_output=grad_output, xp=xp
        )
        grad = moveaxis(grad, -1, axis_, xp=xp)
    return astype(loss, scores.dtype, xp=xp), astype(grad, scores.dtype, xp=xp)
