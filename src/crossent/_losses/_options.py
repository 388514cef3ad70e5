"""The checked options of a cross-entropy loss: one frozen, typed object.

:func:`make_options` runs the shared scalar checks (types, ranges, options that
need logits) once and returns a :class:`CEOptions`; every executor (the
array-API formula, the PyTorch executor, and the ``crossent.nn`` modules,
which build it once in ``__init__``) reads the same object. Array checks
(shapes, dtypes, label values) depend on the call's arrays and stay with the
executors.

The options are plain Python scalars, so :func:`make_options` caches the
objects it builds: a training loop that calls a loss with the same options
pays for the checks once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np

from crossent._lib._checks import (
    check_from_logits,
    check_ignore_index,
    check_nonnegative_scalar,
    check_reduction,
    check_softcap,
    check_unit_interval_scalar,
)
from crossent._lib._xp import torch_tracing

__all__ = ["CEOptions", "Kind", "Reduction", "make_options"]

Kind = Literal["logits", "probs", "log_probs"]
Reduction = Literal["mean", "sum", "none"]


@dataclass(frozen=True, slots=True)
class CEOptions:
    """Checked options of one loss call (or of one ``crossent.nn`` module).

    Attributes
    ----------
    kind : {"logits", "probs", "log_probs"}
        What the input holds: logits, probabilities (log clamped at −100) or
        log-probabilities (``nll_loss``).
    label_smoothing : float
        ε in [0, 1].
    gamma : float
        Focal focusing parameter, ≥ 0.
    z_loss : float
        PaLM's z-loss coefficient, ≥ 0 (logits only).
    softcap : float or None
        Gemma 2's logit soft-cap, positive (logits only).
    ignore_index : int or None
        Sparse targets equal to it are not counted.
    reduction : {"mean", "sum", "none"}
    alpha : float or None
        Binary focal class balance in [0, 1].
    """

    kind: Kind
    label_smoothing: float = 0.0
    gamma: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    ignore_index: int | None = None
    reduction: Reduction = "mean"
    alpha: float | None = None
    plain: bool = field(init=False, repr=False, compare=False)
    """No crossent-only option (focal, z-loss, softcap, alpha): PyTorch's own kernels apply.
    Computed once at construction (the hot path reads it on every call)."""

    def __post_init__(self) -> None:
        plain = self.gamma == 0 and self.z_loss == 0 and self.softcap is None and self.alpha is None
        object.__setattr__(self, "plain", plain)

    @property
    def from_logits(self) -> bool:
        """Whether the input holds logits."""
        return self.kind == "logits"


def _check_from_logits_flag(from_logits: object) -> bool:
    if not isinstance(from_logits, bool):
        msg = f"`from_logits` must be a bool (True or False); got {from_logits!r}."
        raise TypeError(msg)
    return from_logits


def _make(
    from_logits: object,
    label_smoothing: object,
    gamma: object,
    z_loss: object,
    softcap: object,
    ignore_index: object,
    reduction: object,
    alpha: object,
    kind: Kind | None,
) -> CEOptions:
    logits = _check_from_logits_flag(from_logits)
    eps = check_unit_interval_scalar(label_smoothing, name="label_smoothing")
    gamma_ = check_nonnegative_scalar(gamma, name="gamma")
    z_loss_ = check_nonnegative_scalar(z_loss, name="z_loss")
    softcap_ = check_softcap(softcap)
    check_from_logits(logits, z_loss=z_loss_, softcap=softcap_)
    ignore = check_ignore_index(ignore_index, allow_none=True)
    alpha_ = None if alpha is None else check_unit_interval_scalar(alpha, name="alpha")
    if kind is None:
        kind = "logits" if logits else "probs"
    return CEOptions(
        kind=kind,
        label_smoothing=eps,
        gamma=gamma_,
        z_loss=z_loss_,
        softcap=softcap_,
        ignore_index=ignore,
        reduction=cast(Reduction, check_reduction(reduction)),
        alpha=alpha_,
    )


_CACHE: dict[tuple[object, ...], CEOptions] = {}
_FLOATS = frozenset((float, np.float16, np.float32, np.float64))
_CACHED_TYPES = _FLOATS | {int, str, type(None), np.int8, np.int16, np.int32, np.int64}
"""The types of options :func:`make_options` caches: each is accepted by its checks (a float
for a number, an integer for `ignore_index`, a string for `reduction` and `kind`); a bool, a
complex number or a Decimal equal to a cached value is checked (and refused) instead."""
_CACHE_SIZE = 1024


def make_options(
    *,
    from_logits: object = False,
    label_smoothing: object = 0.0,
    gamma: object = 0.0,
    z_loss: object = 0.0,
    softcap: object = None,
    ignore_index: object = None,
    reduction: object = "mean",
    alpha: object = None,
    kind: Kind | None = None,
) -> CEOptions:
    """Check the scalar options of a loss once; return them as a :class:`CEOptions`.

    Raises
    ------
    TypeError
        An option of the wrong type (a string for a number, a float `ignore_index`).
    ValueError
        An option out of range, an unknown `reduction`, or `z_loss` / `softcap`
        without ``from_logits=True``.
    """
    key = (
        from_logits, label_smoothing, gamma, z_loss, softcap, ignore_index, reduction, alpha, kind,
    )  # fmt: skip
    if torch_tracing():
        # traced once: the checks run as a constant (:func:`_traced_options`); a bad option is
        # checked again, traced, to raise its own error
        opts = _traced_options(*map(_specialized, key))
        return _make(*key) if opts is None else opts
    try:
        opts = _CACHE.get(key)
    except TypeError:  # an unhashable option (a list): let the checks name it
        return _make(*key)
    # equal values of other types hash alike (True == 1, -1.0 == -1, 0.5 + 0j == 0.5,
    # Decimal("0.5") == 0.5): only options of the types the checks accept are cache hits, the
    # others are checked (from_logits, first, must be a bool; ignore_index an integer)
    types = map(type, key)
    exact = (
        next(types) is bool
        and _CACHED_TYPES.issuperset(types)
        and type(ignore_index) not in _FLOATS
    )
    if opts is not None and exact:
        return opts
    opts = _make(*key)
    if exact and len(_CACHE) < _CACHE_SIZE:
        _CACHE[key] = opts
    return opts


def _specialized(value: object) -> object:
    """A number option as a Python constant while traced.

    ``torch.compile(dynamic=True)`` (and automatic dynamic, after a second value) makes a
    float or int with a source (a default, an argument, an attribute, a ``partial``'s
    keyword) symbolic, which the constant :func:`_traced_options` cannot take (dynamo:
    'assume_constant_result argument conversion failed'). ``float.hex`` reads its value,
    which specialises it: dynamo guards the value and recompiles for another one. An int is
    read in two halves that a float holds exactly. The types are asked by ``isinstance``: on a
    value from a trace-time constant (an ``nn`` module's options) ``type(value) is float``
    fails in dynamo (a guard on a constant's type: InternalTorchDynamoError).
    """
    if isinstance(value, float):
        return float.fromhex(value.hex())
    if isinstance(value, int) and not isinstance(value, bool):
        high, low = value // (1 << 32), value % (1 << 32)
        return int(float.fromhex(float(high).hex())) * (1 << 32) + int(
            float.fromhex(float(low).hex())
        )
    return value


def _traced_options(*key: object) -> CEOptions | None:
    """:func:`_make` run by ``torch.compile`` at trace time, its result a constant (None: a bad
    option, whose error the traced checks raise).

    Traced, the checks would leave a dynamo guard on every function, builtin and
    module-level constant they read (about 30), evaluated before every call of the
    compiled function: a tenth of a compiled 32 × 10 loss. The options are Python
    scalars known at trace time and guarded where the caller passed them, so the
    object built from them is a constant.
    """
    try:
        return _make(*key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# torch._dynamo.assume_constant_result(_traced_options), without importing torch
_traced_options._dynamo_marked_constant = True  # type: ignore[attr-defined]
