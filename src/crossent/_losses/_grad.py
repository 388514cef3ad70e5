"""``value_and_grad``: a loss and its gradient in closed form, on every backend.

Each loss family owns its closed-form gradient (``_binary_value_and_grad`` in
``_binary.py`` and so on); this module only finds the family from the loss
function (or its name) and checks the options against the public loss's
signature, so the two can never list different options.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

from crossent._lib._xp import Array, numpy_array
from crossent._losses._binary import _binary_value_and_grad, binary_cross_entropy
from crossent._losses._categorical import _categorical_value_and_grad, categorical_cross_entropy
from crossent._losses._distill import _distill_value_and_grad, distillation_loss
from crossent._losses._listnet import _listnet_value_and_grad, listnet_loss
from crossent._losses._sparse import _sparse_value_and_grad, sparse_categorical_cross_entropy

__all__ = ["value_and_grad"]

# loss name -> (public loss, its closed-form (value, grad) function from the same family module)
_FAMILIES: dict[str, tuple[Callable[..., Any], Callable[..., tuple[Array, Array]]]] = {
    "binary_cross_entropy": (binary_cross_entropy, _binary_value_and_grad),
    "categorical_cross_entropy": (categorical_cross_entropy, _categorical_value_and_grad),
    "distillation_loss": (distillation_loss, _distill_value_and_grad),
    "listnet_loss": (listnet_loss, _listnet_value_and_grad),
    "sparse_categorical_cross_entropy": (
        sparse_categorical_cross_entropy,
        _sparse_value_and_grad,
    ),
}


def _public(name: str) -> Callable[..., Any]:
    return _FAMILIES[name][0]


def _closed_form(name: str) -> Callable[..., tuple[Array, Array]]:
    return _FAMILIES[name][1]


def _options_of(name: str) -> tuple[str, ...]:
    """The keyword-only options of the public loss `name`, in signature order."""
    options = _OPTIONS.get(name)
    if options is None:
        params = inspect.signature(_public(name)).parameters.values()
        options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        _OPTIONS[name] = options
    return options


_OPTIONS: dict[str, tuple[str, ...]] = {}
""":func:`_options_of`'s results. Not ``functools.cache``: under ``torch.compile`` dynamo warns
about a call to an ``lru_cache``-wrapped function (an error where warnings are errors)."""

# torch.compile calls it at trace time and keeps the result (torch._dynamo.assume_constant_result,
# without importing torch): the options of a loss are a constant
_options_of._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _valid_losses() -> str:
    return ", ".join(sorted(_FAMILIES))


def _resolve(loss: object) -> tuple[str, dict[str, Any]]:
    """The family name of `loss` and any options bound by ``functools.partial``."""
    bound: dict[str, Any] = {}
    while isinstance(loss, functools.partial):
        if loss.args:
            msg = (
                "`loss` is a functools.partial with positional arguments; bind options by "
                "keyword only (e.g. functools.partial(ce.binary_cross_entropy, from_logits=True))."
            )
            raise TypeError(msg)
        bound = {**loss.keywords, **bound}
        loss = loss.func
    if isinstance(loss, str):
        if loss in _FAMILIES:
            return loss, bound
        close = difflib.get_close_matches(loss, _FAMILIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = (
            f"`loss` must be one of {_valid_losses()} (the function or its name); "
            f"got {loss!r}.{hint}"
        )
        raise ValueError(msg)
    if not callable(loss):
        msg = (
            f"`loss` must be a crossent loss function or its name ({_valid_losses()}); "
            f"got {type(loss).__name__}."
        )
        raise TypeError(msg)
    for name in _FAMILIES:
        if loss is _public(name):
            return name, bound
    label = getattr(loss, "__qualname__", type(loss).__name__)
    module = getattr(loss, "__module__", None)
    where = f"{module}.{label}" if module else label
    msg = (
        f"`loss` must be one of crossent's losses with a closed-form gradient: {_valid_losses()} "
        f"(the function or its name); got {where}. Use your framework's autodiff for other losses."
    )
    raise ValueError(msg)


def _arrays(name: str, arrays: tuple[Array, ...], options: dict[str, Any]) -> tuple[Array, Array]:
    """`input` and `target`, given positionally or (the contract's spelling) by keyword.

    :func:`crossent.distillation_loss` takes ``target=`` as its row mask, so its
    two logits arrays must be positional.
    """
    keywords = [key for key in ("input", "target") if name != "distillation_loss"]
    given = list(arrays)
    for key in keywords[len(given) :]:
        if key in options:
            given.append(options.pop(key))
    if len(given) != 2:
        what = "the student's and the teacher's logits" if not keywords else "`input` and `target`"
        msg = (
            f"value_and_grad({name}, ...) takes two arrays, {what}; got {len(given)}. "
            f"Pass them as value_and_grad(loss, input, target, **options)."
        )
        raise TypeError(msg)
    return given[0], given[1]


def value_and_grad(
    loss: Callable[..., Array] | str, /, *arrays: Array, **options: Any
) -> tuple[Array, Array]:
    r"""A loss and its gradient with respect to `input`, in closed form.

    Works on every array-API backend (NumPy, PyTorch, JAX, ...) without
    autodiff: each loss family has its gradient written out, computed in the
    same numerically safe (log-space) way as the loss itself.

    Parameters
    ----------
    loss : callable or str
        One of :func:`crossent.binary_cross_entropy`,
        :func:`crossent.categorical_cross_entropy`,
        :func:`crossent.sparse_categorical_cross_entropy`,
        :func:`crossent.listnet_loss` or :func:`crossent.distillation_loss`
        (gradient for the student's logits), or its name as a string. A
        ``functools.partial`` of one of them with keyword options bound also
        works (explicit `options` win over bound ones).
    input : array
        The loss's first argument (probabilities, logits or scores).
    target : array
        The loss's second argument (labels, class probabilities or relevance).
    **options
        The loss's keyword options, exactly as the loss takes them (for example
        ``from_logits=True, label_smoothing=0.1``; for
        :func:`crossent.distillation_loss`, whose second argument is the
        teacher's logits, ``target=`` is its row mask, so its two arrays must
        be passed positionally). `input` and `target` may also be passed by
        keyword for the other losses.

    Returns
    -------
    loss_value : array
        ``loss(input, target, **options)``.
    grad : array
        :math:`\partial\,\mathrm{loss} / \partial\,\mathrm{input}`, with the
        shape, dtype and device of `input`. For ``reduction="none"`` it is the
        gradient of the sum of the per-item losses; since each item depends only
        on its own slice of `input`, that is every item's own gradient.

    Raises
    ------
    TypeError
        If `loss` is neither a function nor a string, or an option is not one
        the loss takes (the message lists the ones it does).
    ValueError
        If `loss` is not one of the losses above (the message lists them), or
        for any error the loss itself raises on the arguments.

    See Also
    --------
    binary_cross_entropy, categorical_cross_entropy,
    sparse_categorical_cross_entropy, listnet_loss

    Notes
    -----
    For logits :math:`z` and a hard label :math:`y` the sparse cross-entropy
    and its gradient are

    .. math:: \ell = \operatorname{lse}(z) - z_y, \qquad
              \frac{\partial \ell}{\partial z_k} = \operatorname{softmax}(z)_k - [k = y],

    and each option (class weights, label smoothing, focal factor, z-loss,
    softcap, ignored labels, reductions) adds its own written-out term. The
    result equals what autodiff of the loss gives, to float rounding, and is
    finite wherever the loss is (masked ``-inf`` logits get a zero gradient).

    Examples
    --------
    One step of gradient descent on a two-example, three-class problem, in
    plain NumPy:

    >>> import numpy as np
    >>> import crossent as ce
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    >>> labels = np.array([0, 2])
    >>> loss, grad = ce.value_and_grad(
    ...     ce.sparse_categorical_cross_entropy, logits, labels, from_logits=True
    ... )
    >>> print(round(float(loss), 6))
    0.896378
    >>> grad.shape
    (2, 3)
    >>> new_loss, _ = ce.value_and_grad(
    ...     "sparse_categorical_cross_entropy", logits - 1.0 * grad, labels, from_logits=True
    ... )
    >>> bool(new_loss < loss)
    True
    """
    name, bound = _resolve(loss)
    input, target = _arrays(name, arrays, options)
    options = {**bound, **options}
    allowed = _options_of(name)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                hints.append(f"`{key}` -> did you mean `{close[0]}`?")
        hint = (" " + " ".join(hints)) if hints else ""
        names = ", ".join(f"`{key}`" for key in unknown)
        msg = (
            f"value_and_grad({name}, ...) got unknown option(s) {names}; {name} takes "
            f"{', '.join(allowed)}.{hint}"
        )
        raise TypeError(msg)
    value, grad = _closed_form(name)(input, target, **options)
    return numpy_array(value), numpy_array(grad)
