"""``check_*`` helpers that raise clear errors for bad user input.

Every message names the argument in backticks, says what was expected and what
was given, and suggests the fix. Shape and dtype checks always run; value
checks (which read data back from the device) run only while
:func:`crossent.get_validation` is true and never on lazy arrays (JAX tracers).
Under ``torch.compile`` and ``torch.export`` they run as asynchronous device-side
assertions (:func:`checked_on_device`): no host synchronisation, no graph break, the
same message without the offending values (``torch.func`` transforms traced by the compiler
included: :mod:`crossent._lib._assert_op`). Under ``torch.func`` transforms run eagerly
(``grad``, ``vmap``, ``vjp``, ``jacrev``) they read the values beneath the transforms'
wrappers (:func:`values_beneath`), as eagerly, with the same messages.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeGuard, overload

import numpy as np

from crossent._lib import _config
from crossent._lib._xp import (
    Array,
    astype,
    compute_dtype,
    dim_size,
    host_float,
    int64_labels,
    is_array,
    is_lazy,
    is_torch_tensor,
    known_true,
    label_extremes,
    representable,
    size,
    stop_gradient,
    uint64_label,
)

__all__ = [
    "ProbabilityRangeError",
    "assert_labels_inside",
    "assert_labels_on_device",
    "assert_on_device",
    "beneath_transforms",
    "check_array",
    "check_axis",
    "check_base",
    "check_chunk_size",
    "check_floating",
    "check_from_logits",
    "check_ignore_index",
    "check_in_unit_interval",
    "check_integer_labels",
    "check_label_range",
    "check_nonnegative",
    "check_nonnegative_scalar",
    "check_probabilities",
    "check_probability_rows",
    "check_reduction",
    "check_same_shape",
    "check_softcap",
    "check_unit_interval_scalar",
    "checked_on_device",
    "device_assertions",
    "eager_transforms",
    "guard_label_range",
    "guard_uint64_labels",
    "is_integer_scalar",
    "is_real_scalar",
    "label_index_error",
    "label_range_message",
    "not_ignored",
    "numpy_in_unit_interval",
    "outside_unit_interval",
    "read_beneath",
    "refuse_traced_numpy_scalar",
    "row_sum_tolerance",
    "shown_value",
    "sum_tolerance",
    "unit_interval_message",
    "values_beneath",
    "values_checked",
]

REDUCTIONS = ("mean", "sum", "none")


def values_checked(*arrays: Array) -> bool:
    """Whether value checks should read `arrays` now (validation on, none lazy)."""
    # lazy first: the common eager call reads the switch once
    return not any(a is not None and is_lazy(a) for a in arrays) and _config.get_validation()


def checked_on_device(x: Array) -> bool:
    """Whether the value checks of `x` run as device-side assertions (:func:`assert_on_device`):
    a PyTorch tensor under ``torch.compile`` or ``torch.export``, validation on.

    Called where :func:`values_checked` is false. The switch is read in the traced code:
    dynamo guards it (:mod:`crossent._lib._config`), so turning validation off or on
    recompiles. Compiled ``torch.func`` transforms included (``torch.compile(vmap(grad(f)))``):
    there the assertion is an op with a ``vmap`` rule (:mod:`crossent._lib._assert_op`); run
    eagerly, the transforms' values are read beneath them instead (:func:`values_beneath`).
    """
    return is_torch_tensor(x) and device_assertions() and _config.get_validation()


def device_assertions() -> bool:
    """Whether a device-side assertion is traced now: under ``torch.compile`` or
    ``torch.export``, ``torch.func`` transforms traced by them included
    (:func:`assert_on_device`)."""
    import torch

    return torch.compiler.is_compiling()


def eager_transforms() -> bool:
    """Whether ``torch.func`` transforms (``grad``, ``vmap``, ...) are active, run eagerly
    (not traced by ``torch.compile``): where :func:`values_beneath` finds the values."""
    import torch

    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def values_beneath(x: Array) -> tuple[Array, int] | None:
    """Under ``torch.func`` transforms run eagerly (not compiled): the values of the PyTorch
    tensor `x` as a plain, detached tensor, and how many vmapped dimensions lead it; None
    elsewhere (no transform, ``torch.compile``, not a tensor, ``meta`` values).

    Labels and targets are never differentiated, and their values exist beneath the
    transforms' wrappers (``vmap``'s batched tensor, ``grad``'s and ``jvp``'s gradient
    tracking tensor, ``functionalize``'s functional tensor): peeled off, they are the eager
    tensor, every sample of every ``vmap`` level in one, whose values the eager checks read
    (inside :func:`beneath_transforms`) with the eager messages. Before, every value check was
    skipped there: a bad label gave PyTorch's own index error, a bad weight a silently wrong
    loss. Each ``vmap`` level's dimension is moved to the front, so the tensor's own axis
    ``a`` is ``a + count`` there. Called only where :func:`values_checked` is false.
    """
    if not is_torch_tensor(x) or not eager_transforms():
        return None
    import torch

    functorch = torch._C._functorch
    real, dims, batch = x, list(range(x.ndim)), list[int]()
    while functorch.is_functorch_wrapped_tensor(real) or torch._is_functional_tensor(real):
        if functorch.is_batchedtensor(real):  # a dimension of this level at `bdim`
            bdim = functorch.maybe_get_bdim(real)
            dims = [d + (d >= bdim) for d in dims]
            batch = [b + (b >= bdim) for b in batch] + [bdim]
            real = functorch.get_unwrapped(real)
        elif torch._is_functional_tensor(real):
            torch._sync(real)  # apply the pending in-place updates first
            real = torch._from_functional_tensor(real)
        else:  # grad's and jvp's wrapper: the same shape
            real = functorch.get_unwrapped(real)
    if real.device.type == "meta":
        return None
    with beneath_transforms():
        real = real.detach()
        if batch:
            real = real.permute(batch + dims)
    return real, len(batch)


def beneath_transforms() -> Any:
    """A context in which operations on the tensors of :func:`values_beneath` run as eager
    PyTorch, past the ``torch.func`` transforms (``torch._C._DisableFuncTorch``)."""
    import torch

    return torch._C._DisableFuncTorch()


def assert_on_device(bad: Array, msg: str) -> None:
    """Fail with `msg` where the boolean tensor `bad` holds a True, asynchronously (no host
    synchronisation): ``torch._assert_async``, a ``RuntimeError`` when the compiled or
    exported program runs (a device-side assertion on CUDA); under ``torch.func`` transforms
    an op that ``vmap`` batches (:mod:`crossent._lib._assert_op`)."""
    import torch

    from crossent._lib._assert_op import assert_true

    assert_true(torch.logical_not(bad.any()), msg)


DEVICE_MESSAGE_MAX = 254
"""The longest message, in bytes, that a device-side assertion may carry: PyTorch's CUDA
``_assert_async`` copies it into a 256-byte buffer and raises "Message length must be smaller
than 255" for a longer one (on every call, valid input or not). crossent's deferred messages
fit for every argument name it checks (a test holds them to it; cutting them here would cost
guards on every compiled call)."""


def refuse_traced_numpy_scalar(value: object, *, name: str, integer: bool = False) -> None:
    """Raise a TypeError that says what to pass if `value` is a NumPy scalar traced by dynamo.

    Eagerly a NumPy scalar option (``np.float32(0.1)``) is a number like any other
    (:func:`is_real_scalar`). ``torch.compile`` traces one that comes from an argument, a
    closure or an attribute as a 0-d array, a graph input whose value is unknown while
    tracing, so the option's checks and the branches it selects cannot read it. Called by
    each scalar check before it formats its own message (which would read the value).
    """
    if isinstance(value, np.ndarray) and _config.dynamo_tracing():
        number = "int" if integer else "float"
        msg = (
            f"`{name}` is a NumPy scalar, which torch.compile traces as a tensor whose "
            f"value is unknown while tracing; pass a Python {number} instead: "
            f"`{name}={number}({name})`."
        )
        raise TypeError(msg)


def is_real_scalar(value: object) -> TypeGuard[numbers.Real]:
    """Whether `value` is a real number, Python's or NumPy's (``numbers.Real``), not a bool.

    crossent's one rule for scalar options: a NumPy scalar of the right kind
    (``np.float32(0.1)`` for a float, ``np.int64(3)`` for an int) is accepted
    wherever a Python number is, as Python's own ``numbers`` ABCs do; a bool
    (``True``, ``np.True_``) is refused where a number is expected.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):  # without the ABC look-up (and as torch.compile traces)
        return True
    return isinstance(value, numbers.Real)


def is_integer_scalar(value: object) -> TypeGuard[numbers.Integral]:
    """Whether `value` is an integer, Python's or NumPy's (``numbers.Integral``), not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, numbers.Integral)


def check_reduction(reduction: object) -> str:
    """`reduction` must be "mean", "sum" or "none"."""
    if reduction not in REDUCTIONS:
        msg = f'`reduction` must be one of "mean", "sum" or "none"; got {reduction!r}.'
        raise ValueError(msg)
    return str(reduction)


def check_axis(axis: object, ndim: int, *, name: str = "input") -> int:
    """`axis` as a non-negative int valid for a `ndim`-d array."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        if not is_integer_scalar(axis):
            refuse_traced_numpy_scalar(axis, name="axis", integer=True)
            msg = f"`axis` must be an int; got {type(axis).__name__}."
            raise TypeError(msg)
        return check_axis(int(axis), ndim, name=name)
    if ndim == 0:
        msg = f"`{name}` must have at least one dimension (the class axis); got a 0-d array."
        raise ValueError(msg)
    if not -ndim <= axis < ndim:
        msg = (
            f"`axis`={axis} is out of range for `{name}` with {ndim} dimension(s); "
            f"use an axis in [{-ndim}, {ndim - 1}]."
        )
        raise ValueError(msg)
    return axis % ndim


def check_base(base: object) -> float | None:
    """`base` is None (nats) or a positive, finite number other than 1."""
    if base is None:
        return None
    if not is_real_scalar(base):
        refuse_traced_numpy_scalar(base, name="base")
        msg = f"`base` must be None (nats) or a positive number such as 2; got {base!r}."
        raise TypeError(msg)
    base = float(base)
    if not 0 < base < math.inf or base == 1:  # base inf would turn every value into 0
        msg = f"`base` must be positive, finite and not 1 (None means nats, 2 bits); got {base!r}."
        raise ValueError(msg)
    return base


def check_array(x: object, *, name: str) -> None:
    """`x` is an array (NumPy, PyTorch, JAX, ...): not None, a Python number or a list."""
    if not is_array(x):
        msg = f"`{name}` must be an array (NumPy, PyTorch, JAX, ...); got {type(x).__name__}."
        raise TypeError(msg)


def check_floating(x: Array, *, name: str, xp: Any, hint: str = "") -> None:
    """`x` must have a real floating dtype.

    crossent's one dtype rule: every array argument except class indices
    (predictions, probability and binary targets, relevance grades, weights,
    distributions) must be floating; class indices must be integer. An
    integer or boolean array is never converted silently (PyTorch's rule: an
    integer target means class indices there).
    """
    if is_torch_tensor(x) and x.is_floating_point():  # the hot path, without array-api-compat
        return
    if not xp.isdtype(x.dtype, "real floating"):
        msg = (
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype}. Cast it first, e.g. `{name}.astype(float)` or `{name}.float()`"
            f"{hint}."
        )
        raise TypeError(msg)


def check_same_shape(a: Array, b: Array, *, names: Sequence[str] = ("input", "target")) -> None:
    """`a` and `b` must have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        msg = (
            f"`{names[1]}` must have the same shape as `{names[0]}`; got {tuple(b.shape)} "
            f"and {tuple(a.shape)}."
        )
        raise ValueError(msg)


def check_from_logits(from_logits: bool, **options: object) -> None:
    """Options that only make sense on logits (z_loss, softcap) need ``from_logits=True``."""
    if from_logits:
        return
    for name, value in options.items():
        if value is not None and value is not False and value != 0:
            msg = f"`{name}` needs logits; pass from_logits=True (got {name}={value!r})."
            raise ValueError(msg)


def check_nonnegative_scalar(value: object, *, name: str) -> float:
    """A finite, non-negative Python number."""
    if not is_real_scalar(value):
        refuse_traced_numpy_scalar(value, name=name)
        msg = f"`{name}` must be a number; got {type(value).__name__}."
        raise TypeError(msg)
    number = float(value)
    if not number >= 0 or number == math.inf:
        msg = f"`{name}` must be finite and >= 0; got {value!r}."
        raise ValueError(msg)
    return number


def check_unit_interval_scalar(value: object, *, name: str) -> float:
    """A Python number in [0, 1]."""
    value = check_nonnegative_scalar(value, name=name)
    if value > 1:
        msg = f"`{name}` must lie in [0, 1]; got {value!r}."
        raise ValueError(msg)
    return value


class ProbabilityRangeError(ValueError):
    """Probabilities outside [0, 1]; the message's fix can be reworded by a caller.

    The functions suggest ``from_logits=True``; :class:`crossent.nn.BCELoss`,
    which has no such argument, re-raises with :meth:`with_fix`.
    """

    def __init__(
        self,
        name: str,
        lo: float,
        hi: float,
        fix: str = "pass from_logits=True if these are logits",
    ) -> None:
        self.name, self.lo, self.hi = name, lo, hi
        super().__init__(f"`{name}` has values outside [0, 1] (min={lo:.6g}, max={hi:.6g}); {fix}.")

    @staticmethod
    def deferred_message(name: str) -> str:
        """The message of a device-side check, which cannot read the values."""
        return (
            f"`{name}` has values outside [0, 1]; pass from_logits=True (BCEWithLogitsLoss "
            "for BCELoss) if these are logits."
        )

    def with_fix(self, fix: str) -> ProbabilityRangeError:
        """The same error with another suggested fix."""
        return ProbabilityRangeError(self.name, self.lo, self.hi, fix)


def check_probabilities(x: Array, *, name: str = "input", xp: Any) -> None:
    """Values of `x` must lie in [0, 1] (NaN passes and propagates)."""
    if size(x) == 0:
        return
    if not values_checked(x):
        if checked_on_device(x):
            assert_on_device((x < 0) | (x > 1), ProbabilityRangeError.deferred_message(name))
        else:
            read_beneath(x, _probabilities_read, name=name, xp=xp)
        return
    _probabilities_read(x, name=name, xp=xp)


def _validated_beneath(x: Array) -> tuple[Array, int] | None:
    """:func:`values_beneath` where validation is on."""
    return values_beneath(x) if _config.get_validation() else None


def read_beneath(x: Array, read: Callable[..., None], /, **kwargs: Any) -> None:
    """Under ``torch.func`` transforms run eagerly, with validation on: a check's eager body
    ``read(values, known=bool, **kwargs)`` on the values beneath the transforms
    (:func:`values_beneath`; ``bool`` reads a 0-d boolean there, where ``known_true`` would
    call every tensor lazy). Nothing elsewhere."""
    beneath = _validated_beneath(x)
    if beneath is not None:
        with beneath_transforms():
            read(beneath[0], known=bool, **kwargs)


def outside_unit_interval(
    x: Array, *, xp: Any, known: Callable[[Array], bool] = known_true
) -> tuple[float, float] | None:
    """The smallest and largest value of readable `x` when one lies outside [0, 1] (NaN does
    not), else None: the read behind every range check of probabilities and targets.

    PyTorch tensors on the CPU: one ``aminmax`` pass where all values are in range (the
    comparisons, their union and ``any`` were four: 5.8 ms of a 15 ms ``info.kl_divergence``
    of two 1024 x 1000 float32 arrays); NumPy arrays: ``min`` and ``max`` (0.5 ms of a 1.8 ms
    sparse loss from 1024 x 1000 float32 probabilities). `known`: how a 0-d boolean is read,
    :func:`known_true`, or ``bool`` beneath ``torch.func`` transforms, where
    :func:`known_true` would call every tensor lazy.
    """
    if is_torch_tensor(x) and x.is_cpu:
        import torch

        lo_, hi_ = torch.aminmax(x.detach())
        if lo_.item() >= 0 and hi_.item() <= 1:
            return None
    elif type(x) is np.ndarray and x.dtype.kind == "f" and x.size and numpy_in_unit_interval(x):
        return None  # (NaN: the comparisons below decide)
    if known(xp.any((x < 0) | (x > 1))):
        return host_float(xp.min(x)), host_float(xp.max(x))
    return None


def numpy_in_unit_interval(x: np.ndarray) -> bool:
    """Whether every value of the non-empty NumPy array `x` lies in [0, 1] (False for NaN):
    ``min`` and ``max``, two passes without boolean arrays."""
    return bool(x.min() >= 0 and x.max() <= 1)


def _probabilities_read(
    x: Array, *, name: str, xp: Any, known: Callable[[Array], bool] = known_true
) -> None:
    """:func:`check_probabilities` of readable values (`known`: as for
    :func:`outside_unit_interval`)."""
    got = outside_unit_interval(x, xp=xp, known=known)
    if got is not None:
        raise ProbabilityRangeError(name, *got)


def row_sum_tolerance(dtype: Any, num_classes: int, *, xp: Any) -> float:
    r"""How far from 1 a row of `num_classes` probabilities of `dtype` may sum.

    .. math:: \Bigl|\sum_k p_k - 1\Bigr| \le \epsilon_{\text{in}} + C\,\epsilon_{\text{sum}}

    with :math:`\epsilon` the machine epsilon of the input's dtype and of the
    dtype the sum is computed in (float32 for float16/bfloat16): twice the
    rounding of each probability to the input's dtype plus Higham's worst-case
    bound for summing C terms, once by the producer (the softmax) and once
    here. float32, C = 32768: 0.0039; bfloat16: 0.0117; float64: 7.3e-12.
    """
    eps_in = float(xp.finfo(dtype).eps)
    eps_sum = float(xp.finfo(compute_dtype(dtype, xp=xp)).eps)
    return eps_in + max(num_classes, 1) * eps_sum


def sum_tolerance(dtype: Any, num_classes: int, *, xp: Any) -> float:
    """:func:`row_sum_tolerance` as the row sums' dtype (the compute dtype) holds it, what a
    comparison with those sums uses; cached (3.7 µs a call on NumPy, a seventh of a small
    loss). For the eager executors, whose class count is an integer."""
    key = (xp.__name__, dtype, num_classes)
    tol = _SUM_TOLERANCES.get(key)
    if tol is None:
        if len(_SUM_TOLERANCES) >= 256:
            _SUM_TOLERANCES.clear()
        exact = row_sum_tolerance(dtype, num_classes, xp=xp)
        tol = _SUM_TOLERANCES[key] = float(xp.asarray(exact, dtype=compute_dtype(dtype, xp=xp)))
    return tol


_SUM_TOLERANCES: dict[tuple[str, Any, int], float] = {}


def shown_value(value: float) -> str:
    """`value` in 6 significant digits, in full when those would show a value just outside
    [0, 1] as 0 or 1: "a value 1 outside [0, 1]" for 1.0000000001, "sums to 1" for a row that
    fails by 1e-6 (the messages of bad probabilities and of bad row sums)."""
    short = f"{value:.6g}"
    return short if float(short) not in (0.0, 1.0) or float(short) == value else repr(value)


def check_probability_rows(x: Array, *, axis: int, name: str = "input", xp: Any) -> None:
    """Probability predictions: values in [0, 1] and every row summing to 1 along `axis`.

    The sum may miss 1 by :func:`row_sum_tolerance`; NaN rows pass (NaN
    propagates). A row that does not sum to 1 (sigmoid outputs, a forgotten
    softmax, logits) is a bad input, never renormalized silently.
    """
    check_probabilities(x, name=name, xp=xp)
    if size(x) == 0:
        return
    if values_checked(x):
        _row_sums_read(x, axis=axis, name=name, shown=axis, xp=xp)
    elif checked_on_device(x):
        _, bad, _ = _row_sums(x, axis=axis, xp=xp)
        msg = (  # no numbers: under dynamic shapes the class count and tolerance are symbolic
            f"`{name}` holds probabilities whose rows must sum to 1 along axis {axis} (up to "
            f"{str(x.dtype).removeprefix('torch.')} rounding); a row does not. {_ROW_SUM_FIX}"
        )
        assert_on_device(bad, msg)
    elif (beneath := _validated_beneath(x)) is not None:
        real, leading = beneath
        with beneath_transforms():
            _row_sums_read(
                real, axis=axis % x.ndim + leading, name=name, shown=axis, xp=xp, known=bool
            )


def _row_sums(x: Array, *, axis: int, xp: Any) -> tuple[Array, Array, float]:
    """(the sums of `x` along `axis`, the mask of those off 1 by more than the tolerance, the
    tolerance)."""
    tol = row_sum_tolerance(x.dtype, dim_size(x.shape[axis]), xp=xp)
    sums = xp.sum(astype(stop_gradient(x, xp=xp), compute_dtype(x.dtype, xp=xp), xp=xp), axis=axis)
    return sums, xp.abs(sums - 1) > tol, tol


def _row_sums_read(
    x: Array,
    *,
    axis: int,
    name: str,
    shown: int,
    xp: Any,
    known: Callable[[Array], bool] = known_true,
) -> None:
    """The row-sum check of :func:`check_probability_rows` on readable values (`shown`: the
    axis the message names, the caller's; the row index counts ``vmap``'s samples first;
    `known` as for ``_probabilities_read``)."""
    sums, bad, tol = _row_sums(x, axis=axis, xp=xp)
    if not known(xp.any(bad)):
        return
    num_classes = dim_size(x.shape[axis])
    flat = xp.reshape(bad, (-1,))
    first = int(xp.argmax(xp.astype(flat, xp.int32)))
    total = host_float(xp.reshape(sums, (-1,))[first])
    index: list[int] = []
    for extent in reversed(tuple(sums.shape)):
        first, i = divmod(first, int(extent))
        index.insert(0, i)
    where = f"row {index[0]}" if len(index) == 1 else f"row {tuple(index)}"
    msg = (
        f"`{name}` holds probabilities whose rows must sum to 1 along axis {shown}; {where} sums "
        f"to {shown_value(total)} (tolerance {tol:.2g} for {num_classes} classes in {x.dtype}). "
        f"{_ROW_SUM_FIX}"
    )
    raise ValueError(msg)


_ROW_SUM_FIX = (
    "Apply softmax first, or pass from_logits=True if these are logits "
    "(for independent per-class probabilities use binary_cross_entropy)."
)


def check_in_unit_interval(x: Array, *, name: str, xp: Any) -> None:
    """Targets such as binary labels must lie in [0, 1]."""
    if size(x) == 0:
        return
    if not values_checked(x):
        if checked_on_device(x):
            assert_on_device((x < 0) | (x > 1), unit_interval_message(name, ""))
        else:
            read_beneath(x, _unit_interval_read, name=name, xp=xp)
        return
    _unit_interval_read(x, name=name, xp=xp)


def _unit_interval_read(
    x: Array, *, name: str, xp: Any, known: Callable[[Array], bool] = known_true
) -> None:
    """:func:`check_in_unit_interval` of readable values (`known` as for
    :func:`outside_unit_interval`)."""
    got = outside_unit_interval(x, xp=xp, known=known)
    if got is not None:
        msg = unit_interval_message(name, f"; got values in [{got[0]:.6g}, {got[1]:.6g}]")
        raise ValueError(msg)


def unit_interval_message(name: str, got: str) -> str:
    """The message for targets outside [0, 1] (`got`: what they hold, if known)."""
    return (
        f"`{name}` must lie in [0, 1]{got}. "
        "Rescale the targets, or use sparse_categorical_cross_entropy for class indices."
    )


def check_nonnegative(x: Array, *, name: str, xp: Any) -> None:
    """Weights must be >= 0 (NaN passes and propagates)."""
    if size(x) == 0:
        return
    if not values_checked(x):
        if checked_on_device(x):
            assert_on_device(x < 0, f"`{name}` must be non-negative; it holds a negative value.")
        else:
            read_beneath(x, _nonnegative_read, name=name, xp=xp)
        return
    _nonnegative_read(x, name=name, xp=xp)


def _nonnegative_read(
    x: Array, *, name: str, xp: Any, known: Callable[[Array], bool] = known_true
) -> None:
    """:func:`check_nonnegative` of readable values (`known` as for ``_probabilities_read``)."""
    if known(xp.any(x < 0)):
        msg = f"`{name}` must be non-negative; got a minimum of {host_float(xp.min(x)):.6g}."
        raise ValueError(msg)


def check_integer_labels(target: Array, *, name: str = "target", xp: Any) -> None:
    """Sparse targets must have an integer dtype."""
    if not xp.isdtype(target.dtype, "integral"):
        msg = (
            f"`{name}` must hold integer class indices; got dtype {target.dtype}. "
            "Cast it (e.g. `target.astype(int)` / `target.long()`), or use "
            "categorical_cross_entropy for one-hot or soft targets."
        )
        raise TypeError(msg)


def check_label_range(
    target: Array, num_classes: int, *, ignore_index: int | None, name: str = "target", xp: Any
) -> Array:
    """Labels must lie in [0, num_classes) unless they equal `ignore_index`.

    Returns the labels to index with: `target`, or where the check is a device-side
    assertion, `target` with the labels it refuses replaced by 0
    (:func:`assert_labels_on_device`).
    """
    if size(target) == 0:
        return target
    if not values_checked(target):
        if checked_on_device(target):
            return assert_labels_on_device(target, num_classes, ignore_index)
        read_beneath(
            target, _labels_read, num_classes=num_classes, ignore_index=ignore_index,
            name=name, xp=xp,
        )  # fmt: skip
        return target
    _labels_read(target, num_classes, ignore_index, name=name, xp=xp)
    return target


def _labels_read(
    target: Array,
    num_classes: int,
    ignore_index: int | None,
    *,
    name: str,
    xp: Any,
    known: Callable[[Array], bool] = known_true,
) -> None:
    """:func:`check_label_range` of readable labels (`known` as for ``_probabilities_read``)."""
    label, bad = _outside(target, num_classes, ignore_index, xp=xp)
    if bad is None:
        return
    if known(xp.any(bad)):
        if label is not target:  # PyTorch uint16/32/64, widened: uint64 ones by their value
            lo, hi = label_extremes(target, bad)
        else:
            bad_values = label[bad]
            lo, hi = int(xp.min(bad_values)), int(xp.max(bad_values))
        hint = "" if ignore_index is None else f" (ignore_index={ignore_index})"
        msg = (
            f"`{name}` has labels outside [0, {num_classes}) that are not `ignore_index`"
            f"{hint}: min={lo}, max={hi}. Check the number of classes, or set `ignore_index`."
        )
        raise ValueError(msg)


def _outside(
    target: Array, num_classes: int, ignore_index: int | None, *, xp: Any
) -> tuple[Array, Array | None]:
    """(labels as compared, mask of the labels outside [0, num_classes) that are not
    `ignore_index`); the mask is None where no label of the dtype can be outside."""
    label = target
    if is_torch_tensor(label) and not label.dtype.is_signed and label.dtype.itemsize > 1:
        label = int64_labels(label)  # PyTorch has no comparisons for uint16/32/64 ("ge_cpu")
    # no comparison with an int the dtype cannot hold (array-api-strict refuses it)
    bad = label >= num_classes if representable(num_classes, label.dtype, xp=xp) else None
    if xp.iinfo(label.dtype).min < 0:
        bad = label < 0 if bad is None else (label < 0) | bad
    if (
        bad is not None
        and ignore_index is not None
        and representable(ignore_index, label.dtype, xp=xp)
    ):
        bad = bad & (label != ignore_index)
    return label, bad


def poison_unread_labels(
    target: Array, num_classes: int, *, ignore_index: int | None, xp: Any
) -> Array:
    """Where labels cannot be read (JAX tracers: ``jit``, ``grad``, ``vmap``) and validation
    is on: `target` with each label outside ``[0, C)`` that is not `ignore_index` replaced by
    a label past the end (C, or C + 1 where `ignore_index` is C), in an index dtype that
    holds it; `target` itself otherwise.

    No check can raise there, and JAX's gather wrapped a negative label to a class counted
    from the end (label −1 gave the last class's loss: a silently wrong number). Past the
    end, :func:`~crossent._lib._xp.take_along_axis` gives NaN with a NaN gradient (JAX's own
    gather fills NaN and drops the gradient: a NaN loss with a finite gradient), and
    ``take`` of a class weight NaN: the row's loss and gradient are NaN, as a NaN input's
    (NaN propagates). A few operations on the labels; none on the logits.
    """
    if not (is_lazy(target) and not is_torch_tensor(target) and _config.get_validation()):
        return target
    label, bad = _outside(target, num_classes, ignore_index, xp=xp)
    if bad is None:
        return target
    past = num_classes + 1 if ignore_index == num_classes else num_classes
    index_dtype = xp.asarray(0).dtype  # JAX: int32, or int64 with x64 on
    if not representable(past, index_dtype, xp=xp):
        index_dtype = xp.int64
    return xp.where(bad, xp.asarray(past, dtype=index_dtype), xp.astype(label, index_dtype))


def guard_label_range(target: Array, num_classes: int, *, ignore_index: int | None) -> None:
    """PyTorch tensors: out-of-range labels fail even with validation off, as torch's kernels do.

    For paths that index with labels themselves (the fused and chunked
    kernels mask or clamp them, where ``torch.gather`` / ``nll_loss`` would
    fail): on CPU an ``IndexError`` like ``nll_loss``'s, on an accelerator
    or under ``torch.compile`` a device-side assertion (``torch._assert_async``,
    no host synchronisation), like torch's CUDA kernels; under ``torch.func``
    transforms run eagerly, either on the labels beneath them (:func:`values_beneath`).
    Called after :func:`check_label_range`: with validation on that has checked the labels
    (eagerly, by its traced assertion, or beneath the transforms) and this does nothing
    (under ``torch.compile`` a second assertion in the graph would check them again).
    """
    if size(target) == 0 or _config.get_validation():
        return
    import torch

    if torch.compiler.is_compiling():
        assert_labels_on_device(target, num_classes, ignore_index)
        return
    beneath = values_beneath(target)
    if beneath is None:
        _guard_read(target, num_classes, ignore_index)
        return
    with beneath_transforms():
        _guard_read(beneath[0], num_classes, ignore_index)


def guard_uint64_labels(target: Array, num_classes: int, *, ignore_index: int | None) -> None:
    """``guard_label_range`` for PyTorch uint64 labels only, before (or instead of) an
    error of PyTorch's own: their int64 copy (``int64_labels``) shows a
    label of :math:`2^{63}` or more as int64's largest value, which PyTorch's bound checks
    then named ("Target 9223372036854775807 is out of bounds" for 2**63 + 5) with
    validation off. This names the label by its own value; other dtypes keep PyTorch's
    message, which names theirs."""
    if is_torch_tensor(target) and str(target.dtype) == "torch.uint64":
        guard_label_range(target, num_classes, ignore_index=ignore_index)


def _guard_read(target: Array, num_classes: int, ignore_index: int | None) -> None:
    """:func:`guard_label_range` of eager labels."""
    import torch

    if target.device.type != "cpu":
        assert_labels_on_device(target, num_classes, ignore_index)
        return
    # the mask of check_label_range: no comparison with a class count or an ignore_index the
    # dtype cannot hold (uint8 156 is not -100; no uint8 label reaches 300 classes)
    _, bad = _outside(target, num_classes, ignore_index, xp=torch)
    if bad is not None and bool(bad.any()):
        first = int(target.long()[bad].reshape(-1)[0])  # uint64 ones by their value
        raise label_index_error(num_classes, str(uint64_label(first, target.dtype)))


def assert_labels_on_device(target: Array, num_classes: int, ignore_index: int | None) -> Array:
    """:func:`assert_on_device` for PyTorch labels outside ``[0, num_classes)`` that are not
    `ignore_index` (the ignored ones replaced by 0, then :func:`assert_labels_inside`); returns
    the labels to index with: `target` with each label the assertion refuses replaced by 0.

    Inductor bound-checks every index it loads with (``index out of bounds: 0 <= tmp21 <
    5L``, naming its generated C++ file) and ``nll_loss`` raises ``Target 7 is out of
    bounds``, and either ran before the assertion: a compiled sparse loss gave those errors,
    not crossent's message. Indexing with the returned labels, only the assertion can fail.
    """
    import torch

    wide = int64_labels(target)  # compared in a narrow dtype, V and ignore_index would wrap
    if num_classes < 1:  # no class: every counted label is outside
        counted = not_ignored(wide, ignore_index, xp=torch)
        assert_on_device(counted, label_range_message(num_classes, ignore_index))
        return torch.where(counted, 0, target)
    if ignore_index is not None:
        wide = torch.where(not_ignored(wide, ignore_index, xp=torch), wide, 0)
    inside = assert_labels_inside(wide, num_classes, ignore_index)
    return torch.where(inside, target, 0)


def assert_labels_inside(label: Array, num_classes: int, ignore_index: int | None) -> Array:
    """Device-side check that every int64 label (ignored ones already replaced by 0) lies in
    ``[0, num_classes)``, ``num_classes >= 1``: ``label // num_classes`` is 0 exactly there
    (four operations, each a kernel launch on an accelerator; no host synchronisation).
    `ignore_index` only completes the message. Returns the mask of the labels inside."""
    from crossent._lib._assert_op import assert_true

    msg = label_range_message(num_classes, ignore_index)
    inside = label.div(num_classes, rounding_mode="floor") == 0
    assert_true(inside.all(), msg)
    return inside


def label_range_message(num_classes: int, ignore_index: int | None) -> str:
    """The message of a device-side label check, which cannot read the labels.

    Traced (``torch.compile``, ``torch.export``) the class count is not written in: with
    dynamic shapes it is symbolic, and formatting it would specialise the graph to it (a
    recompile for every vocabulary size, ``fullgraph=True`` failing at the recompile limit),
    and dynamo shows a symbolic size as a plain int, so the two cannot be told apart there.
    """
    import torch

    traced = torch.compiler.is_compiling() or type(num_classes) is not int
    bound = "C), C the size of the class axis," if traced else f"{num_classes})"
    hint = "" if ignore_index is None else f" (ignore_index={ignore_index})"
    return (
        f"`target` has labels outside [0, {bound} that are not `ignore_index`{hint}; "
        "check the number of classes, or set `ignore_index`."
    )


def not_ignored(target: Array, ignore_index: int | None, *, xp: Any) -> Array:
    """Boolean mask of the labels that count: those not equal to `ignore_index`.

    All of them when `ignore_index` is None or does not fit the labels' dtype:
    comparing with it would wrap it (PyTorch compares ``uint8`` labels with ``-100``
    as with ``156``) and silently drop real labels.
    """
    if ignore_index is None or not representable(ignore_index, target.dtype, xp=xp):
        return xp.ones_like(target, dtype=xp.bool)
    return target != ignore_index


def label_index_error(num_classes: int, found: str) -> IndexError:
    """The error for a label outside ``[0, num_classes)`` with validation off (`found`: which)."""
    msg = (
        f"`target` has a label outside [0, {num_classes}) that is not `ignore_index`: "
        f"{found} (checked even with validation off, as torch's kernels do)."
    )
    return IndexError(msg)


def check_chunk_size(chunk_size: object) -> int | None:
    """`chunk_size` of the fused losses: None (chosen from memory) or a positive int."""
    if chunk_size is None:
        return None
    if not is_integer_scalar(chunk_size):
        refuse_traced_numpy_scalar(chunk_size, name="chunk_size", integer=True)
        msg = f"`chunk_size` must be None or a positive int; got {chunk_size!r}."
        raise TypeError(msg)
    size = int(chunk_size)
    if size < 1:
        msg = f"`chunk_size` must be >= 1 (or None to pick one from memory); got {size}."
        raise ValueError(msg)
    return size


def check_softcap(softcap: object) -> float | None:
    """`softcap` is None (no capping) or a positive, finite number."""
    if softcap is None:
        return None
    if not is_real_scalar(softcap):
        refuse_traced_numpy_scalar(softcap, name="softcap")
        msg = f"`softcap` must be None or a positive number such as 30.0; got {softcap!r}."
        raise TypeError(msg)
    cap = float(softcap)
    if not 0 < cap < math.inf:
        msg = f"`softcap` must be positive and finite (or None for no capping); got {softcap!r}."
        raise ValueError(msg)
    return cap


@overload
def check_ignore_index(ignore_index: object, *, allow_none: Literal[False]) -> int: ...
@overload
def check_ignore_index(ignore_index: object, *, allow_none: bool) -> int | None: ...
def check_ignore_index(ignore_index: object, *, allow_none: bool) -> int | None:
    """`ignore_index` is an int (or None where no label is ignored by default)."""
    if ignore_index is None and allow_none:
        return None
    if not is_integer_scalar(ignore_index):
        refuse_traced_numpy_scalar(ignore_index, name="ignore_index", integer=True)
        expected = "None or an int" if allow_none else "an int"
        msg = f"`ignore_index` must be {expected} such as -100; got {ignore_index!r}."
        raise TypeError(msg)
    return int(ignore_index)
