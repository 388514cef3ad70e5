"""The one module that talks to array-api-compat.

Every public function fetches its namespace once, ``xp = array_namespace(...)``,
and passes it keyword-only to the helpers below, so each formula is written
once and runs on NumPy, PyTorch, JAX, array-api-strict and any other array-API
library. Where a backend has a native, faster or more accurate kernel
(``torch.logsumexp``, ``jax.nn.logsumexp``, ``torch.nn.functional.logsigmoid``)
the helper uses it; otherwise it falls back to a portable formula.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, Literal

import array_api_compat
from array_api_compat import is_jax_namespace

__all__ = [
    "Array",
    "array_namespace",
    "astype",
    "check_same_device",
    "compute_dtype",
    "device",
    "difference",
    "differentiated",
    "dim_size",
    "forward_ad_active",
    "host_float",
    "is_array",
    "is_jax_namespace",
    "is_lazy",
    "is_numpy_namespace",
    "is_torch_namespace",
    "is_torch_tensor",
    "isfinite",
    "known_true",
    "log_sigmoid",
    "log_sigmoid_pair",
    "logsumexp",
    "moveaxis",
    "nan_shift",
    "number_for",
    "one_hot",
    "output_dtype",
    "quiet",
    "refuse_jit_trace",
    "representable",
    "result_type",
    "safe_divide",
    "size",
    "size_array",
    "softplus_of_neg_abs",
    "stop_gradient",
    "take_along_axis",
    "to_numpy",
    "torch_tracing",
    "xlogy",
]

Array = Any


def is_array(x: object) -> bool:
    """Whether `x` is an array of a supported library (not a Python scalar)."""
    return is_torch_tensor(x) or bool(array_api_compat.is_array_api_obj(x))


def is_torch_namespace(xp: Any) -> bool:
    """Whether `xp` is PyTorch's namespace (plain or array-api-compat's).

    Written out rather than array-api-compat's, whose cached helpers
    ``torch.compile`` refuses to trace silently.
    """
    return getattr(xp, "__name__", None) in ("torch", "array_api_compat.torch")


def is_numpy_namespace(xp: Any) -> bool:
    """Whether `xp` is NumPy's namespace (plain or array-api-compat's): written out, as
    :func:`is_torch_namespace` (array-api-compat's is ``lru_cache``-wrapped, and dynamo warns
    at every traced call of one, an error where warnings are errors: ``js_divergence`` of
    probabilities under ``torch.compile``)."""
    return getattr(xp, "__name__", None) in ("numpy", "array_api_compat.numpy")


def _library(x: object) -> str:
    """``"numpy.ndarray"``, ``"torch.Tensor"``, ... for messages."""
    return type(x).__module__.split(".")[0] + "." + type(x).__name__


def _conversion(reference: object, name: str) -> str:
    """How to turn `name` into an array of `reference`'s library, for messages."""
    library = type(reference).__module__.split(".")[0]
    fn = {
        "numpy": "np.asarray",
        "torch": "torch.as_tensor",
        "jax": "jnp.asarray",
        "jaxlib": "jnp.asarray",
    }
    return f"{fn.get(library, 'xp.asarray')}({name})"


def refuse_jit_trace(torch: Any) -> None:
    """A clear error under ``torch.jit.trace``, which records the operations of one call with
    every Python number read on the way as a constant: the sizes and values crossent's
    PyTorch paths read (a mean's element count, a checked value) would hold for other
    inputs too (a binary mean traced on 2 rows of 3 halved a 1-row batch's loss: 0.347 for
    0.693). Dynamo and ``torch.export`` trace these reads properly; 0.06 µs a call."""
    if torch._C._get_tracing_state() is not None:
        msg = (
            "crossent's losses cannot be traced by `torch.jit.trace` (deprecated by PyTorch): "
            "a trace keeps the sizes and values the loss read while tracing as constants, so "
            "the traced loss would be wrong for other batch sizes. Use `torch.compile(model)` "
            "or `torch.export.export(model, args)`, or trace the model without the loss and "
            "apply the loss outside it."
        )
        raise TypeError(msg)


def array_namespace(*arrays: object, **named: object) -> Any:
    """The array-API namespace shared by the arrays; ``None`` and Python scalars are skipped.

    Pass the arrays by keyword (``array_namespace(input=input, target=target)``)
    so that an error names the argument.

    Raises
    ------
    TypeError
        If an argument is not an array (a list, say), the arrays come from
        different libraries, or none is an array; the message names the
        argument and the conversion that fixes it.
    """
    torch = sys.modules.get("torch")
    if torch is not None:  # the common case first: tensors and None, few names to trace
        found = None
        mixed = False
        for a in (*arrays, *named.values()):
            if isinstance(a, torch.Tensor):
                if found is None:
                    found = a
                elif not mixed and a.device != found.device:
                    mixed = True
            elif a is not None:
                break
        else:
            if found is not None:
                if mixed:
                    check_same_device(*arrays, **named)
                refuse_jit_trace(torch)
                return _torch_namespace()
    items = [(f"argument {i + 1}", a) for i, a in enumerate(arrays)] + list(named.items())
    given = [(n, a) for n, a in items if a is not None]
    present = [(n, a) for n, a in given if not isinstance(a, int | float | bool)]
    if not present:  # only None and Python numbers: name them all (`p`, not "the arguments")
        shown = given or items  # the numbers given, or (only None given) every argument
        names = ", ".join(f"`{n}`" for n, _ in shown) or "the arguments"
        got = ", ".join(type(a).__name__ for _, a in shown) or "nothing"
        msg = (
            f"{names}: expected at least one array (NumPy, PyTorch, JAX, ...); got {got}. "
            "Pass an array, e.g. np.asarray(...)."
        )
        raise TypeError(msg)
    if all(is_torch_tensor(a) for _, a in present):  # the common case, cheap and traceable
        check_same_device(*arrays, **named)
        refuse_jit_trace(sys.modules["torch"])
        return _torch_namespace()
    numpy = sys.modules.get("numpy")
    if numpy is not None and all(type(a) is numpy.ndarray for _, a in present):
        return _NUMPY
    arrays_only = [(n, a) for n, a in present if array_api_compat.is_array_api_obj(a)]
    reference = arrays_only[0][1] if arrays_only else None
    for n, a in present:
        if not array_api_compat.is_array_api_obj(a):
            fix = _conversion(reference, n) if reference is not None else f"np.asarray({n})"
            msg = (
                f"`{n}` must be an array (NumPy, PyTorch, JAX, ...); got {_library(a)}. "
                f"Convert it first, e.g. `{fix}`."
            )
            raise TypeError(msg)
    try:
        return array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError as exc:
        first_name, first = present[0]
        library = _namespace_of(first)
        other = next(((n, a) for n, a in present if _namespace_of(a) is not library), None)
        if other is None:
            raise
        msg = (
            f"all arrays must come from one array library; `{first_name}` is a "
            f"{_library(first)} but `{other[0]}` is a {_library(other[1])}. Convert it first, "
            f"e.g. `{_conversion(first, other[0])}`."
        )
        raise TypeError(msg) from exc


def _namespace_of(x: object) -> Any:
    """The namespace of one array (None if it has none), for :func:`array_namespace`'s message:
    a JAX tracer (``jax.LinearizeTracer``, under ``jax.grad``) and a concrete JAX array
    (``jaxlib.ArrayImpl``) are of one library though their types' modules differ."""
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        return None


def dim_size(n: Any) -> Any:
    """A dimension's size as an int; a PyTorch symbolic size (``torch.compile`` with dynamic
    shapes, traced by AOTAutograd inside a loss's graph node) as it is: ``int()`` would
    specialize the graph to the size it was traced with (a recompile for every class count)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(n, torch.SymInt):
        return n
    return int(n)


def is_torch_tensor(x: object) -> bool:
    """Whether `x` is a ``torch.Tensor``, without importing PyTorch (the thin dispatch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_tracing() -> bool:
    """Whether PyTorch is tracing (``torch.compile``/``export``, or a ``torch.func`` transform).

    Values do not exist then (or reading them would break the graph), so value
    checks do not read them: under compile and export they are device-side assertions
    (:func:`crossent._lib._checks.checked_on_device`), under ``torch.func`` run eagerly they
    read the values beneath the transforms' wrappers
    (:func:`crossent._lib._checks.values_beneath`); eagerly they run as everywhere else.

    Dynamo calls it for real at trace time (below). PyTorch 2.13 holds
    ``torch.compiler.is_compiling()`` true for the whole compile; earlier versions (2.11)
    only inside traced code, where dynamo replaces the call by True, so dynamo's tracing
    context (``torch._guards.TracingContext``, set on both while it traces) is read too:
    its thread-local dictionary directly (``TracingContext.try_get`` raises and catches an
    ``AttributeError`` when unset, 0.4 µs on every eager call).
    """
    state = _TORCH_STATE or _torch_state()
    if not state:
        return False
    is_compiling, functorch_active, guards_tls = state
    return bool(
        is_compiling()
        or functorch_active()
        or guards_tls.__dict__.get("tracing_context") is not None
    )


def torch_transform_name() -> str | None:
    """The innermost active ``torch.func`` transform, as its users write it ("vmap", "grad",
    "jvp", "functionalize"), or None where none is active; for error messages."""
    torch = sys.modules.get("torch")
    if torch is None or not torch._C._are_functorch_transforms_active():
        return None
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is None:  # pragma: no cover - active transforms have an interpreter
        return "a torch.func transform"
    key = str(interpreter.key()).rsplit(".", 1)[-1]
    return _TRANSFORM_NAMES.get(key, key.lower())


_TRANSFORM_NAMES = {"Vmap": "vmap", "Grad": "grad", "Jvp": "jvp", "Functionalize": "functionalize"}
"""``torch._C._functorch.TransformType`` names -> the ``torch.func`` functions that push them
(``vjp``, ``jacrev`` and ``grad`` push Grad; ``jacfwd`` pushes Jvp)."""


def int64_labels(target: Any) -> Any:
    """PyTorch integer labels of any width as int64, what PyTorch's kernels index with.

    uint64 labels of :math:`2^{63}` and more wrap to negative int64 values, which an
    `ignore_index` of -100 (or the sentinel standing for none) then skipped silently: the row
    scored 0. They become int64's largest value instead, outside every class range, so the
    label checks refuse them (PyTorch has no comparison for uint64 to find them first)."""
    import torch

    if target.dtype == torch.int64:
        return target
    wide = target.long()
    if target.dtype == getattr(torch, "uint64", None):
        wide = torch.where(wide < 0, torch.iinfo(torch.int64).max, wide)
    return wide


def uint64_label(value: int, dtype: Any) -> int:
    """A label `value` read from an int64 copy (wrapped) as its own `dtype` holds it.

    uint64 labels of :math:`2^{63}` and more are negative in an int64 copy (and int64's
    largest after :func:`int64_labels`); error messages name them by this, their value.
    """
    return value % 2**64 if str(dtype).endswith("uint64") else value


def label_extremes(target: Any, bad: Any) -> tuple[int, int]:
    """The smallest and largest of PyTorch labels ``target[bad]``, as their dtype holds them.

    For error messages (a slow path): uint64 labels of :math:`2^{63}` and more, which
    :func:`int64_labels` shows as int64's largest, by their own value.
    """
    wrapped = target.long()[bad]
    if not str(target.dtype).endswith("uint64"):
        return int(wrapped.min()), int(wrapped.max())
    high = wrapped < 0  # 2**63 and more
    low = wrapped[~high]
    lo = int(low.min()) if low.numel() else uint64_label(int(wrapped[high].min()), target.dtype)
    hi = (
        uint64_label(int(wrapped[high].max()), target.dtype) if bool(high.any()) else int(low.max())
    )
    return lo, hi


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``).

    Dual tensors need no ``requires_grad``, so a path chosen for "no gradient wanted"
    would run ``out=`` operations, which have no forward derivative ('Trying to use forward
    AD with abs_out that does not support it').
    """
    forward_ad = sys.modules.get("torch.autograd.forward_ad")
    return forward_ad is not None and forward_ad._current_level >= 0


def torch_autocast(x: Any) -> bool:
    """Whether ``torch.autocast`` is on for the device of torch tensor `x`.

    False on a device without autocast (``meta``, where ``torch.is_autocast_enabled`` raises
    "unknown device type"); "cpu" is named without building a device object (a third of a
    small loss's rounding).
    """
    torch = sys.modules["torch"]
    if x.is_cpu:
        return bool(torch.is_autocast_enabled("cpu"))
    device = x.device.type
    return bool(torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


_TORCH_STATE: list[Any] = []
"""What :func:`torch_tracing` reads, looked up once PyTorch is imported."""


def _torch_state() -> list[Any]:
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    import torch._guards

    _TORCH_STATE[:] = [
        torch.compiler.is_compiling,
        torch._C._are_functorch_transforms_active,
        torch._guards._TLS,
    ]
    return _TORCH_STATE


# torch.compile calls it once at trace time and keeps the result, a constant
# (torch._dynamo.assume_constant_result, without importing torch): traced, it would leave
# dynamo guards on `sys.modules` and `torch.compiler`, checked before every compiled call
torch_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _torch_namespace() -> Any:
    """array-api-compat's PyTorch namespace (imported once)."""
    import array_api_compat.torch as module

    return module


class _NumpyNamespace:
    """array-api-compat's NumPy namespace, imported when first needed.

    Importing ``array_api_compat.numpy`` touches every lazily loaded NumPy
    submodule (``f2py``, ``testing``, ``random``, ...): 0.1 s of CPU, a
    seventh of ``crossent eval``'s time on a million rows. The few names
    that NumPy 2 itself provides with the standard's meaning (the dtype
    queries, ``reshape``, ``moveaxis``: what value checks and the NumPy
    fast paths use) are served by NumPy; the first other name imports the
    namespace, which serves every name from then on.
    """

    __name__ = "array_api_compat.numpy"  # what is_numpy_namespace looks for
    _NATIVE = frozenset(
        {"isdtype", "finfo", "result_type", "float16", "float32", "float64", "reshape", "moveaxis"}
    )

    def __getattr__(self, name: str) -> Any:
        import numpy

        if name in self._NATIVE and hasattr(numpy, "isdtype"):  # NumPy 2
            value = getattr(numpy, name)
        else:
            import array_api_compat.numpy as module

            value = getattr(module, name)
        setattr(self, name, value)  # found directly from now on
        return value

    def __repr__(self) -> str:
        return "<array_api_compat.numpy namespace (imported on first use)>"


_NUMPY = _NumpyNamespace()


def device(x: Array) -> Any:
    """The device `x` lives on."""
    if is_torch_tensor(x):
        return x.device
    return array_api_compat.device(x)


def size_array(x: Array, *, dtype: Any, xp: Any) -> Array:
    """The number of elements of `x` as a 0-d array of `dtype` on `x`'s device (a mean's
    denominator); symbolic while PyTorch traces dynamic shapes, where ``float(size(x))``
    would specialise it."""
    if is_torch_tensor(x):
        import torch

        return torch.scalar_tensor(x.numel(), dtype=dtype, device=x.device)
    return xp.asarray(float(size(x)), dtype=dtype, device=device(x))


def size(x: Array) -> int:
    """Number of elements of `x` (0 for an empty array).

    A PyTorch size is returned as it is: traced with dynamic shapes it is symbolic, and
    ``int()`` would specialise it (a ``torch.export`` with a dynamic batch failed, and
    ``torch.compile`` recompiled for every batch size).
    """
    if is_torch_tensor(x):
        return x.numel()
    n = array_api_compat.size(x)
    return 0 if n is None else int(n)


def is_lazy(x: Array) -> bool:
    """Whether `x` has no concrete values yet (a JAX tracer inside ``jit``, a lazy array).

    array-api-compat's ``is_lazy_array`` calls every JAX array lazy (JAX may be
    asynchronous), which would switch value checks off on JAX altogether; a
    concrete JAX array can be read, so only tracers count as lazy there.
    """
    if is_torch_tensor(x):
        return torch_tracing() or x.device.type == "meta"
    if array_api_compat.is_jax_array(x):
        import jax

        return isinstance(x, jax.core.Tracer)
    checker = getattr(array_api_compat, "is_lazy_array", None)
    if checker is not None:
        return bool(checker(x))
    return type(x).__name__.endswith("Tracer")  # pragma: no cover - old array-api-compat


def known_true(x: Array) -> bool:
    """Whether the 0-d boolean `x` is known to be true (a device-to-host read).

    Inside ``jax.jit`` even arrays built from concrete inputs are traced and
    have no value yet; they count as not known to be true, so a value check
    built on this is skipped under tracing instead of failing.
    """
    if is_lazy(x):
        return False
    return bool(x)


def _is_low_precision(dtype: Any, *, xp: Any) -> bool:
    return bool(xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits < 32)


def compute_dtype(*dtypes: Any, xp: Any) -> Any:
    """The floating dtype to compute in: float16/bfloat16 accumulate in float32.

    Integer and boolean inputs compute in the namespace's default float.
    Mixed float dtypes promote (float32 with float64 gives float64).
    """
    floats = [d for d in dtypes if d is not None and xp.isdtype(d, "real floating")]
    if not floats:
        return xp.asarray(0.0).dtype
    result = result_type(*floats, xp=xp)
    return xp.float32 if _is_low_precision(result, xp=xp) else result


def result_type(*dtypes: Any, xp: Any) -> Any:
    """The promoted dtype of `dtypes` (at least one).

    On PyTorch ``torch.promote_types``: array-api-compat's ``result_type`` looks
    bfloat16 up in the standard's table, misses, and calls ``torch.result_type``
    on two empty tensors, which ``torch.compile(fullgraph=True)`` cannot trace.
    """
    promote = sys.modules["torch"].promote_types if is_torch_namespace(xp) else xp.result_type
    result = dtypes[0]
    for d in dtypes[1:]:
        result = promote(result, d)
    return result


def astype(x: Array, dtype: Any, *, xp: Any) -> Array:
    """`x` as `dtype`, without a copy when it already has it.

    A value beyond the largest float of a narrower `dtype` (a float32 loss above 65504 as
    float16) rounds to ±inf, which is its value in that dtype (PyTorch's too): without
    NumPy's "overflow encountered in cast" warning (:func:`quiet`).
    """
    if x.dtype == dtype:
        return x
    with quiet(xp, "over"):
        return xp.astype(x, dtype)


def numpy_array(x: Array) -> Array:
    """`x`, a NumPy scalar (``np.float64``) as the 0-d ndarray it stands for.

    NumPy's ufuncs and whole-array reductions return scalars for 0-d results, so the same
    loss came back as an ``ndarray`` from one reduction or path and as ``np.float64`` from
    another (``binary_cross_entropy`` of 0-d arrays: ``"mean"`` an ndarray, ``"sum"`` and
    ``"none"`` scalars). The losses return arrays (API section 2: the caller's kind of
    array), 0-d for a reduction; every other array is returned as it is.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.generic):
        return numpy.asarray(x)
    return x


def difference(a: Array, b: Array, *, xp: Any) -> Array:
    """``a - b`` for log-space shifts (``z - m``, ``m - z``, ``z - lse``), where a difference
    beyond the largest float is rightly ±inf (its exponential is 0 or inf) and ``inf - inf``
    rightly NaN (a ``+inf`` logit, or a row of ``-inf``, has no log-softmax): without NumPy's
    "overflow encountered in subtract" warning for logits spanning more than ~1.8e308 (3.4e38
    in float32), nor its "invalid value encountered in subtract" (:func:`quiet`).
    """
    with quiet(xp, "invalid", "over"):
        return a - b


def output_dtype(x: Array, *others: Array, xp: Any) -> Any:
    """The dtype of a loss of `x` (and `others`, promoted with it): their own, or float32 for
    half precision under ``torch.autocast``.

    PyTorch's losses compute in float32 under autocast and return float32; so do crossent's.
    """
    dtype = x.dtype if not others else result_type(x.dtype, *(o.dtype for o in others), xp=xp)
    if is_torch_tensor(x):
        torch = sys.modules["torch"]  # the module is_torch_tensor read (one source when traced)
        if dtype in (torch.float16, torch.bfloat16) and torch_autocast(x):
            return torch.float32
    return dtype


def logsumexp(
    x: Array,
    *,
    axis: int,
    keepdims: bool = False,
    xp: Any,
    row_sum: Callable[[Array], Array] | None = None,
) -> Array:
    r"""Log-sum-exp along `axis`, exact for any finite input.

    Notes
    -----
    .. math:: \operatorname{lse}(x) = m + \log\Bigl(1 + \sum_{k \ne k^*} e^{x_k - m}\Bigr),
              \quad m = x_{k^*} = \max_k x_k

    The sum over the non-maximal terms goes through ``log1p`` so the result
    keeps full relative accuracy when one term dominates [1]_. A row of all
    ``-inf`` gives ``-inf``; ``+inf`` gives ``+inf``; NaN propagates.
    `row_sum`, when given, sums the terms along the last axis (``axis=-1``),
    keeping it (length 1), instead of ``xp.sum`` (the metrics: a sum that depends
    on the row alone, not on the memory layout). PyTorch uses its native fused kernel
    (``torch.logsumexp``) unless `row_sum` is given: it is the hot
    path of training, and its error, relative to a result near 0, is larger
    (about 1e-3 for ``[0, -30]``) but stays below one ulp of the maximum.

    References
    ----------
    .. [1] Blanchard, Higham, Higham, "Accurately computing the log-sum-exp
       and softmax functions", IMA J. Numer. Anal., 2021.
    """
    if is_torch_namespace(xp) and row_sum is None:
        import torch

        return torch.logsumexp(x, dim=axis, keepdim=keepdims)
    m = stop_gradient(xp.max(x, axis=axis, keepdims=True), xp=xp)
    finite_max = xp.isfinite(m)
    m_safe = xp.where(finite_max, m, xp.zeros_like(m))
    is_max = x == m
    zero = xp.zeros_like(x)
    # rows whose max is NaN or +inf are shifted by NaN (nan_shift): nothing overflows, the
    # value is m there, and autodiff's gradient is NaN throughout (every exp(x - NaN) has
    # a NaN derivative); rows of -inf by 0 (exp(-inf) = 0)
    e = xp.exp(difference(x, nan_shift(m, xp=xp), xp=xp))
    # s = sum_k e_k - 1: the others' terms, plus the maxima's minus 1, each exactly 1 in value
    # (so n_max - 1 exactly, in any order of summation) and e_k in every derivative, with m a
    # constant: autodiff's derivatives of every order are those of the log-sum-exp, also where
    # the max is tied (the maxima's terms held at 1 and the max's own derivative, shared
    # between the tied classes, gave a wrong Hessian there: 0 at equal logits)
    total = row_sum if row_sum is not None else (lambda a: xp.sum(a, axis=axis, keepdims=True))
    # (each where's temporary freed before the next is made: reused, not faulted in afresh)
    rest = total(xp.where(is_max, zero, e))
    maxima = xp.sum(xp.where(is_max, e, zero), axis=axis, keepdims=True) - 1
    # (a row without a finite max reads m alone below: its terms, 0 or NaN, no log1p(-1))
    s = rest + xp.where(finite_max, maxima, xp.zeros_like(maxima))
    # A non-finite max decides the result on its own: -inf (all masked), +inf or NaN.
    out = xp.where(finite_max, xp.log1p(s) + m_safe, m)
    if not keepdims:
        out = xp.squeeze(out, axis=axis)
    return out


def log_sigmoid(x: Array, *, xp: Any) -> Array:
    r"""log σ(x) = −softplus(−x) = min(x, 0) − log1p(e^{−|x|}), exact for any finite x."""
    if is_torch_namespace(xp):
        import torch

        return torch.nn.functional.logsigmoid(x)
    if is_jax_namespace(xp):
        import jax

        return jax.nn.log_sigmoid(x)
    zero = xp.zeros_like(x)
    return xp.minimum(x, zero) - xp.log1p(xp.exp(-xp.abs(x)))


def log_sigmoid_pair(x: Array, *, xp: Any) -> tuple[Array, Array]:
    r"""(log σ(x), log σ(−x)) = min(±x, 0) − log1p(e^{−|x|}), sharing the one transcendental term.

    Exact for any finite `x`; ±inf give 0 and −inf, NaN propagates. Eager
    PyTorch and JAX call their fused ``logsigmoid`` twice (one pass each, fewer
    than the shared form's); traced (``torch.compile``, ``torch.func``) and
    elsewhere the shared form, so the compiler (or NumPy) computes the
    exponential and the logarithm once per element instead of twice.

    At :math:`x = 0`, where :math:`|x|` has no derivative, autodiff of the shared form
    took the tail's derivatives as 0 (and ``minimum``'s as 1/2 each): right in the first
    derivative, 0 instead of :math:`-1/4` in the second (focal binary loss under
    ``torch.func``: its Hessian 6 % off at logits of exactly 0). Both pieces take the
    :math:`x \le 0` side there: ``where`` for the minima, :func:`softplus_of_neg_abs` for
    the tail.
    """
    if is_jax_namespace(xp) or (is_torch_namespace(xp) and not torch_tracing()):
        return log_sigmoid(x, xp=xp), log_sigmoid(-x, xp=xp)
    zero = xp.zeros_like(x)
    tail = softplus_of_neg_abs(x, xp=xp)
    right = x > 0
    return xp.where(right, zero, x) - tail, xp.where(right, -x, zero) - tail


def softplus_of_neg_abs(x: Array, *, xp: Any) -> Array:
    r""":math:`\operatorname{softplus}(-|x|) = \operatorname{log1p}(e^{-|x|})`, the transcendental
    part shared by :math:`\log\sigma(\pm x)` and :math:`\operatorname{softplus}(\pm x)`, with
    autodiff's derivatives at :math:`x = 0` those of the :math:`x \le 0` side (1/2 and 1/4,
    the third 0): :math:`|x|` has none there, and autodiff took 0 for both. An exact 0,
    :math:`x_0 (1/2 + x_0/8)` with :math:`x_0 = x` only where :math:`x = 0`, carries them."""
    x0 = xp.where(x == 0, x, xp.zeros_like(x))
    half, eighth = number_for(0.5, x), number_for(0.125, x)
    return xp.log1p(xp.exp(-xp.abs(x))) + x0 * (half + eighth * x0)


def number_for(value: Any, x: Any) -> Any:
    """`value` to combine with `x` by ``* / + -``: the Python number itself (an array `value` as
    it is), except beside a 0-d PyTorch tensor, which gets a 0-d tensor of its dtype and device.

    ``torch.func.jvp`` gives ``x * 2.0`` (also ``/``, ``+``, ``-``) of a 0-d float32 `x` a
    float64 tangent (PyTorch 2.13: the number's wrapped tensor promotes the tangent, not the
    value; ``torch.autograd.forward_ad`` keeps float32): the tangent of a float32 loss came
    back in float64, and under ``jvp`` of ``grad`` (per-sample Hessian-vector products,
    ``vmap`` of them) that tangent met a float32 one in a ``scatter``: a traceback. Rows are
    0-d for an unbatched input, and so under ``vmap`` of a per-example loss.
    """
    if getattr(x, "ndim", 1) != 0 or not is_torch_tensor(x) or not isinstance(value, float | int):
        return value
    return sys.modules["torch"].full((), value, dtype=x.dtype, device=x.device)


def stop_gradient(x: Array, *, xp: Any) -> Array:
    """`x` as a constant for autodiff (JAX, PyTorch); other backends have no autodiff.

    For shifts that cancel in value, such as the maximum subtracted inside a
    log-sum-exp: derivatives of every order stay exact, and autodiff skips the
    maximum's own (argmax) derivative.
    """
    if is_torch_tensor(x):
        return x.detach()
    if is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def differentiated(x: Array, *, xp: Any) -> bool:
    """Whether autodiff may differentiate through `x`: a JAX tracer (``jax.grad``, or ``jit``,
    whose trace may be differentiated later), a PyTorch tensor that requires a gradient, under
    a ``torch.func`` transform or in a forward-AD level; never NumPy and the others. For forms
    that cost more only so that their derivatives are exact."""
    if is_torch_tensor(x):
        return bool(x.requires_grad or torch_transform_name() is not None or forward_ad_active())
    return is_jax_namespace(xp) and _is_tracer(x)


def nan_shift(m: Array, *, zero: Array | bool = True, xp: Any) -> Array:
    r"""A log-sum-exp shift from row maxima `m`: `m` where it is finite, NaN where it is not,
    except 0 for a row of ``-inf`` only where `zero` (True: every such row; an array: those
    rows; False: none).

    For formulas whose values read :math:`L = m` where the max is not finite (so that the
    shift cancels in every value) and which autodiff differentiates. A row without a finite
    max has no softmax: every local derivative :math:`e^{z_k - \mathrm{NaN}}` is NaN, so the
    gradient is NaN throughout the row (times any cotangent, 0 included), as PyTorch's
    ``F.cross_entropy`` and the closed forms give it, not NaN at a NaN entry and 0 elsewhere.
    The exception, `zero`, is a row of ``-inf`` only that is ignored (a masked padding
    position: :math:`e^{z_k - 0} = 0`, a zero gradient) or a slice of a row (a vocabulary
    chunk whose classes are all masked, merged with the others). :math:`m + (m - m)` is `m`
    for a finite max and NaN for any other: two small operations per row.
    """
    with quiet(xp, "invalid"):
        shifted = m + (m - m)
    if zero is False:
        return shifted
    neg = m == -float("inf")
    return xp.where(neg if zero is True else neg & zero, xp.zeros_like(m), shifted)


def shift_by_max(
    z: Array, *, axis: int = -1, nan_rows: bool = False, masked_zero: bool = True, xp: Any
) -> tuple[Array, Array]:
    r"""``(z - m, m)`` with :math:`m = \max_k z_k` along `axis` (0 where it is not finite; `m`
    without `axis`), a constant for autodiff (:func:`stop_gradient`).

    Softmax is shift invariant, so the log-space formulas work on :math:`z - m`, whose
    log-sum-exp lies in :math:`[0, \log C]`: then :math:`\log p_k = (z_k - m)
    - \operatorname{lse}(z - m)` is accurate to a few ulps of the result. The
    unshifted form :math:`z_k - \operatorname{lse}(z)` rounds
    :math:`\operatorname{lse}(z)` at the magnitude of the logits and loses
    :math:`\log_2 |z|` bits (float32 logits of 1e4: log 2 came out as 0.69336; logits
    [300, 288, 200]: log p_0 = 0 instead of -6.1e-6). A row without a finite maximum (every
    logit ``-inf``, a ``+inf``, NaN) is not shifted: its log-softmax is NaN. The unshifted
    :math:`\operatorname{lse}(z) = m + \operatorname{lse}(z - m)` has the right derivative
    (softmax) with `m` constant, and autodiff skips the maximum's own (argmax) derivative.
    A difference beyond the largest float is rightly -inf (:func:`difference`). `nan_rows`:
    a row holding NaN or ``+inf`` is shifted by NaN (:func:`nan_shift`; its values are then
    NaN throughout, and so is its gradient), a row of ``-inf`` only too unless `masked_zero`.
    """
    m = stop_gradient(xp.max(z, axis=axis, keepdims=True), xp=xp)
    if nan_rows:
        m = nan_shift(m, zero=masked_zero, xp=xp)
    else:
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    return difference(z, m, xp=xp), xp.squeeze(m, axis=axis)


def xlogy(x: Array, y: Array, *, xp: Any) -> Array:
    r"""x · log y with 0 · log 0 = 0 (and 0 · log ∞ = 0), NaN-free in value and gradient.

    Only ``x = 0`` at a pole of the log (``y = 0`` or ``+inf``) is replaced, so the
    derivative in `x` is :math:`\log y` wherever that is finite, also at ``x = 0`` (the
    derivative of the cross-entropy :math:`-\sum_k p_k \log q_k` in a zero-mass
    :math:`p_k` is :math:`-\log q_k`, not 0); at the pole it is 0 by convention. The double
    ``where`` keeps autodiff from evaluating ``0 / 0`` in the untaken branch. NaN in `x` or
    `y` propagates, also ``0 · log NaN``.
    """
    is_pole = (x == 0) & ((y == 0) | (y == float("inf")))
    y_safe = xp.where(is_pole, xp.ones_like(y), y)
    return xp.where(is_pole, xp.zeros_like(x * y_safe), x * xp.log(y_safe))


def check_same_device(*arrays: object, **named: object) -> None:
    """The PyTorch tensors among the arguments (by keyword, so that the error names them) must
    share the first one's device; a ``ValueError`` naming the two arguments otherwise.

    Called where PyTorch's own error would come first ("Expected all tensors to be on the
    same device", or a meta tensor read by a value check): by :func:`array_namespace`, and
    by the executors' callers when a kernel raises (free on the hot path). A 0-d CPU tensor
    (a ``weight`` or ``pos_weight`` of ``torch.tensor(2.0)``) goes with tensors on any
    device, as in PyTorch's own operations.
    """
    items = [(f"argument {i + 1}", a) for i, a in enumerate(arrays)] + list(named.items())
    tensors: list[tuple[str, Any]] = [(n, a) for n, a in items if is_torch_tensor(a)]
    tensors = [(n, a) for n, a in tensors if not (a.ndim == 0 and a.is_cpu)]
    if not tensors:
        return
    first, ref = tensors[0]
    for name, a in tensors[1:]:
        if a.device != ref.device:
            msg = (
                f"`{name}` is on {a.device} but `{first}` is on {ref.device}; move it with "
                f"`{name}.to({first}.device)`."
            )
            raise ValueError(msg)


def isfinite(x: Array, *, xp: Any) -> Array:
    """``xp.isfinite(x)`` in the fewest operations: PyTorch composes its ``isfinite`` of four
    (each a kernel launch on an accelerator), ``abs(x) < inf`` is two (NaN compares False)."""
    if is_torch_tensor(x):
        return x.abs() < float("inf")
    return xp.isfinite(x)


_NUMPY_NAMESPACES = ("numpy", "array_api_compat.numpy", "array_api_strict")
"""The namespaces that compute with NumPy, which warns about invalid operations and overflow."""


def quiet(
    xp: Any, *kinds: Literal["invalid", "over", "divide"], when: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """A context in which `xp` warns of none of `kinds` (``np.errstate`` names: "invalid" for
    NaN formed from ``inf - inf``, "over" for a difference beyond the largest float, "divide"
    for the log of 0).
    `when` False: nothing to quiet (no ``np.errstate``, 0.7 µs, on NumPy's hot path).

    Only NumPy (and array-api-strict, which computes with NumPy) warns there;
    PyTorch, JAX and CuPy are silent, so the formula needs no guard operations
    (each a kernel launch on an accelerator) to stay quiet.
    """
    if when and getattr(xp, "__name__", "") in _NUMPY_NAMESPACES:
        import numpy as np

        return np.errstate(
            invalid="ignore" if "invalid" in kinds else None,  # None: left as it is
            over="ignore" if "over" in kinds else None,
            divide="ignore" if "divide" in kinds else None,
        )
    return _NOTHING


_NOTHING = contextlib.nullcontext()
"""What :func:`quiet` returns where there is nothing to quiet (one object: a null context is
reusable and reentrant, and building one costs a tenth of a microsecond per call)."""


def safe_divide(num: Array, den: Array, *, xp: Any) -> Array:
    """`num` / `den`, with 0 (and a zero gradient) where `den` is 0 and `num` is finite.

    Where `den` is 0 the quotient is ``num / inf``: 0 for a finite `num`, NaN for a NaN
    (NaN propagates: a NaN logit in a row of weight 0 makes the mean NaN, as in
    PyTorch's kernels, whose mean crossent divides by +inf there, not 0) or an infinite one
    (inf / inf; quietly on NumPy, which warned of it: an error where warnings are).
    """
    den_zero = den == 0
    numpy_like = getattr(xp, "__name__", "") in _NUMPY_NAMESPACES
    with quiet(xp, "invalid", when=numpy_like and bool(xp.any(den_zero))):
        q = num / xp.where(den_zero, xp.full_like(den, float("inf")), den)
    return xp.where(den_zero, q, q)  # an array, also where NumPy's division gives a scalar


def take_along_axis(x: Array, indices: Array, *, axis: int, xp: Any) -> Array:
    """``x[..., indices, ...]`` along `axis`; `indices` has `x`'s shape with size 1 on `axis`.

    JAX: an index past the end gives NaN whose gradient is NaN (at the first entry), not
    JAX's NaN fill whose gradient is dropped (``crossent._lib._checks.poison_unread_labels``
    moves a bad label there where it cannot raise).
    """
    if is_torch_namespace(xp):
        import torch

        return torch.gather(x, axis, indices)
    if is_jax_namespace(xp):
        past = indices >= x.shape[axis]
        got = xp.take_along_axis(x, xp.where(past, xp.zeros_like(indices), indices), axis=axis)
        one = xp.asarray(1.0, dtype=got.dtype)
        return got * xp.where(past, xp.asarray(float("nan"), dtype=got.dtype), one)
    native = getattr(xp, "take_along_axis", None)
    if native is not None:
        return native(x, indices, axis=axis)
    mask = one_hot(xp.squeeze(indices, axis=axis), x.shape[axis], dtype=xp.bool, axis=axis, xp=xp)
    # where, not a product: another entry's NaN or -inf (a masked class) times 0 is NaN
    return xp.sum(xp.where(mask, x, xp.zeros_like(x)), axis=axis, keepdims=True)


def representable(value: int, dtype: Any, *, xp: Any) -> bool:
    """Whether the Python int `value` fits the integer `dtype`.

    No element of such an array equals a `value` that does not fit (``-100`` and
    ``uint8`` labels), and array-api-strict refuses to compare with one.
    """
    info = xp.iinfo(dtype)
    return bool(info.min <= value <= info.max)


def moveaxis(x: Array, source: int, destination: int, *, xp: Any) -> Array:
    """``xp.moveaxis``: `x` itself when the axis stays (no call); ``movedim`` for tensors.

    ``torch.func.vmap`` has a batching rule for ``movedim`` and none for
    ``moveaxis`` (which array-api-compat's namespace calls): a probability loss
    under ``vmap`` failed with "Batching rule not implemented for aten::moveaxis.int".
    """
    ndim = x.ndim
    if ndim and source % ndim == destination % ndim:
        return x
    if is_torch_tensor(x):
        return x.movedim(source, destination)
    return xp.moveaxis(x, source, destination)


def one_hot(labels: Array, num_classes: int, *, dtype: Any, axis: int = -1, xp: Any) -> Array:
    """One-hot encoding of integer `labels` with classes inserted at `axis`.

    Labels outside ``[0, num_classes)`` give an all-zero row.
    """
    classes = xp.arange(num_classes, device=device(labels))
    if labels.dtype == xp.uint64:  # no integer type holds both uint64 and int64
        labels = xp.astype(labels, classes.dtype)
    expanded = xp.expand_dims(labels, axis=-1) == classes
    out = xp.astype(expanded, dtype)
    ndim = out.ndim
    if axis < 0:
        axis += ndim
    if axis != ndim - 1:
        out = moveaxis(out, -1, axis, xp=xp)
    return out


def to_numpy(x: Array, *, dtype: Any) -> Any:
    """`x` copied to the host as a NumPy array of `dtype` (a device-to-host read).

    Library code computes on the caller's backend; the one exception is state
    that must live on the host, such as the float64 sums and int64 counts of
    :mod:`crossent.metrics` (exact to merge across batches and workers whatever
    the caller's device or precision). Every such conversion goes through here.

    Raises
    ------
    TypeError
        If `x` is lazy (a JAX tracer inside ``jit``): its values do not exist yet.
    """
    import numpy as np

    if _is_tracer(x):
        msg = (
            "cannot read the values of a lazy array (a JAX tracer inside `jit`); "
            "update metrics outside the jitted function, with concrete arrays."
        )
        raise TypeError(msg)
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x, dtype=dtype)
    if is_torch_namespace(array_namespace(x)):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        return x.numpy().astype(dtype, copy=False)
    try:
        host = np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, ValueError):  # pragma: no cover - exotic arrays
        host = np.asarray(x)
    return host.astype(dtype, copy=False)


def host_float(x: Array) -> float:
    """The value of the 0-d array `x` as a Python float, read outside autodiff.

    For the numbers in error messages: a tensor that requires grad is read
    without autograd's scalar-conversion warning (an error under ``-W error``). A PyTorch
    tensor is read directly: the checks also read the values beneath ``torch.func``
    transforms (:func:`crossent._lib._checks.values_beneath`), where :func:`to_numpy`
    would call every tensor lazy.
    """
    if is_torch_tensor(x):
        return float(x.detach().item())
    return float(to_numpy(x, dtype=float))


def _is_tracer(x: Array) -> bool:
    """Whether `x` has no values yet (a JAX tracer; array-api-compat calls every JAX array lazy)."""
    if type(x).__module__.startswith("jax"):
        import jax

        return isinstance(x, jax.core.Tracer)
    return is_lazy(x)
