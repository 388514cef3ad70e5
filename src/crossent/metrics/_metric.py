r"""Stateful, mergeable metric classes over the pure functions of ``_functional``.

Every class has the same life cycle::

    metric = CrossEntropy(input_kind="logits", base=2)
    for logits, labels in batches:
        metric.update(logits, labels)        # NumPy, PyTorch, JAX, ... arrays
    metric.merge(other_worker_metric)        # exact: the states are exact sums
    value = metric.sync().compute()          # all_reduce over torch.distributed

A metric's state is a few exact sums and int64 counts on the host
(:attr:`Metric.state`); it pickles, merges and all-reduces exactly: a merged
or synced metric computes the same bits as one metric fed every row.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, cast

import numpy as np

from crossent._lib import _config
from crossent._lib._checks import check_array, check_ignore_index, is_integer_scalar
from crossent._lib._xp import Array, array_namespace, is_torch_tensor, torch_transform_name
from crossent.metrics import _functional as F
from crossent.metrics._exact import ExactSum

__all__ = [
    "Accuracy",
    "BitsPerToken",
    "BrierScore",
    "CalibrationError",
    "ClassificationMetrics",
    "CrossEntropy",
    "Metric",
    "PerClassCrossEntropy",
    "Perplexity",
]

Rows = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Part:
    """One group of state arrays: how to create it and how to add a batch to it."""

    init: Callable[[int], F.State]
    update: Callable[..., F.State]  # (state, rows, *, defer=None) -> state
    needs_probs: bool = False


def _batch_namespace(input: object, target: object) -> Any:
    """The array namespace of an update's batch; a TypeError naming `input` or `target` for
    None, a number or a list, and for arrays of two libraries."""
    check_array(input, name="input")
    check_array(target, name="target")
    refuse_traced_update(input, target)
    return array_namespace(input=input, target=target)


def refuse_traced_update(*arrays: object) -> None:
    """A TypeError that names the transform and the fix for an update under a ``torch.func``
    transform (``vmap``, ``grad``, ..., eager or compiled).

    A metric's state is exact sums and counts on the host: an update reads the batch's
    values, which there are the transform's wrappers. Before, ``vmap`` gave "cannot read the
    values of a lazy array (a JAX tracer inside `jit`)", which named the wrong library (no
    figure was ever computed from unchecked values there).
    """
    if not any(is_torch_tensor(a) for a in arrays):
        return
    name = torch_transform_name()
    if name is not None:
        msg = (
            f"crossent.metrics cannot update under torch.func.{name}: a metric adds the "
            "batch's values to exact sums on the host, and under a transform they are not "
            "readable. Update the metric outside the transformed function, with its outputs "
            "(`metric.update(logits.detach(), target)`)."
        )
        raise TypeError(msg)


def _traced(input: object) -> bool:
    """Whether `input` is a tensor traced by ``torch.compile`` (dynamo): see
    :func:`_update_eagerly`."""
    return is_torch_tensor(input) and _config.dynamo_tracing()


def _update_eagerly(metric: Any, input: Any, target: Any) -> Any:
    """``metric.update(input, target)`` run eagerly under ``torch.compile``: at a graph break
    (``torch.compiler.disable``), its values read, checked and added to the host state as in
    an eager call.

    Traced, the update crashed: dynamo traced its host copy into NumPy ("RuntimeError when
    making fake tensor call" for valid input; bad rows gave the eager error only because the
    check's read broke the graph first). Dynamo does not inline this function (its
    ``_torchdynamo_disable`` mark, set without importing PyTorch): without ``fullgraph=True``
    it breaks the graph here; with it, it fails with the reason below.
    """
    import torch

    return torch.compiler.disable(type(metric).update)(metric, input, target)


_update_eagerly._torchdynamo_disable = True  # type: ignore[attr-defined]
_update_eagerly._torchdynamo_disable_msg = (  # type: ignore[attr-defined]
    "crossent.metrics adds a batch's values to exact sums on the host, so an update cannot be "
    "part of a graph: compile without fullgraph=True (the update then runs eagerly at a graph "
    "break), or update the metric outside the compiled function, with its outputs "
    "(`metric.update(logits.detach(), target)`)"
)


_COMPUTE_OUTSIDE_GRAPHS = (
    "crossent.metrics computes its figures from exact sums on the host, so compute() cannot "
    "be part of a graph: compile without fullgraph=True (compute() then runs eagerly at a "
    "graph break), or call compute() outside the compiled function"
)


def _eager_under_dynamo(compute: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A metric's `compute`, never traced by dynamo: under ``torch.compile`` it runs eagerly at
    a graph break, as an update does (``_update_eagerly``), with the eager figures.

    Traced, dynamo turned the host arithmetic on exact sums (Python integers, NumPy arrays)
    into a graph: "RuntimeError when making fake tensor call" for a valid state, "Data-dependent
    branching" with ``fullgraph=True``. Dynamo does not inline the wrapper (its
    ``_torchdynamo_disable`` mark, set without importing PyTorch), so the graph breaks at the
    caller's ``metric.compute()``; with ``fullgraph=True`` its error quotes
    ``_COMPUTE_OUTSIDE_GRAPHS``. The wrapper runs `compute` with dynamo off
    (``torch.compiler.disable``), else dynamo would compile the frames it calls.
    """

    @functools.wraps(compute)
    def wrapper(self: Any) -> Any:
        if "torch" not in sys.modules:  # no torch.compile without PyTorch
            return compute(self)
        return _without_dynamo(compute)(self)

    wrapper._torchdynamo_disable = True  # type: ignore[attr-defined]
    wrapper._torchdynamo_disable_msg = _COMPUTE_OUTSIDE_GRAPHS  # type: ignore[attr-defined]
    return wrapper


@functools.cache
def _without_dynamo(compute: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`compute` wrapped by ``torch.compiler.disable`` (once per metric class)."""
    import torch

    disabled: Callable[[Any], Any] = torch.compiler.disable(compute)
    return disabled


def _calibration_init(num_classes: int, *, kind: str, bins: int, fine: bool) -> F.State:
    return F._calibration_init(num_classes if kind == "classwise" else 1, bins, fine=fine)


def _calibration_part(kind: str, bins: int, *, fine: bool = True) -> _Part:
    # functools.partial of module-level functions (not closures), so metrics pickle
    return _Part(
        functools.partial(_calibration_init, kind=kind, bins=bins, fine=fine),
        functools.partial(F._calibration_update, kind=kind),
        needs_probs=kind != "top_label",
    )


def _without_classes(init: Callable[[], F.State], num_classes: int) -> F.State:
    return init()


_LOG_LOSS = _Part(functools.partial(_without_classes, F._log_loss_init), F._log_loss_update)
_ACCURACY = _Part(functools.partial(_without_classes, F._accuracy_init), F._accuracy_update)
_BRIER = _Part(functools.partial(_without_classes, F._brier_init), F._brier_update)
_PER_CLASS = _Part(F._per_class_init, F._per_class_update)
#: the parts behind every summary of ``crossent eval`` (binary or multiclass)
_SUMMARY_PARTS = {
    "log_loss": _LOG_LOSS,
    "accuracy": _ACCURACY,
    "brier": _BRIER,
    "per_class": _PER_CLASS,
}


class Metric:
    """Base class: a streaming metric over (prediction, integer label) batches.

    Parameters
    ----------
    input_kind : {"probs", "logits", "log_probs"}
        What `input` holds; stated explicitly, never guessed from the values.
    axis : int, default -1
        The class axis of `input`; `target` has `input`'s shape without it.
    ignore_index : int, optional
        Rows whose label equals it are skipped (padding tokens).
    num_classes : int, optional
        Number of classes. Known from the first batch when omitted; give it
        when a worker may see no batch before :meth:`sync`.

    Notes
    -----
    :meth:`update` computes per-row statistics on the caller's backend in its
    compute dtype (float16/bfloat16 in float32), copies the per-row vectors to
    the host as float64 and adds them to exact sums (integer fixed-point
    digits, rounded to float64 once when a figure is computed) and int64
    counts. So 10⁷ float32 predictions accumulate without drift, and
    :meth:`merge` and :meth:`sync` are exact: the figures of merged shards are
    bit-identical to one pass over all the rows, whatever the sharding, the
    batching and the merge order. (With NumPy and PyTorch on the CPU each
    per-row term depends on its row alone; JAX/XLA, and GPU kernels, may sum a
    row over the classes in an order chosen by the batch's shape, so their
    per-row terms, and the figures, can differ by an ulp between batchings.)

    Probability inputs: log p of the label is computed exactly and clamped at
    −100 (PyTorch's rule, the same as :func:`crossent.sparse_categorical_cross_entropy`),
    so a probability of exactly 0 costs 100 nats instead of making the mean
    infinite; :attr:`CrossEntropy.clamped` counts the rows where this happened, so it is
    never silent. Logits and log-probabilities are not clamped: a label whose
    logit or log-probability is −inf gives +inf. NaN propagates.

    Value checks (labels in range always; rows of probabilities in [0, 1] that
    sum to 1 within 1e-3, or the rounding of a low-precision softmax of many
    classes if larger, while :func:`crossent.get_validation` is on; rows of
    log-probabilities within that plus the rounding of each log-probability,
    about 3u times the row's entropy for a dtype of unit roundoff u: 0.08 in
    bfloat16 over 1000 classes) raise ``ValueError`` naming the first bad row
    of the batch.
    """

    _parts: dict[str, _Part] = {}  # noqa: RUF012 - each subclass sets its own in __init__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each subclass's own ``compute`` runs eagerly under ``torch.compile``
        (``_eager_under_dynamo``), as ``update`` does."""
        super().__init_subclass__(**kwargs)
        if "compute" in cls.__dict__:
            setattr(cls, "compute", _eager_under_dynamo(cls.__dict__["compute"]))  # noqa: B010

    def __init__(
        self,
        *,
        input_kind: str,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.input_kind = F._check_input_kind(input_kind)
        if not is_integer_scalar(axis):
            msg = f"`axis` must be an int; got {type(axis).__name__}."
            raise TypeError(msg)
        self.axis = int(axis)
        self.ignore_index = check_ignore_index(ignore_index, allow_none=True)
        if num_classes is not None:
            num_classes = F._check_positive_int(num_classes, name="num_classes")
        self.num_classes = num_classes
        self._states: dict[str, F.State] = {}
        if num_classes is not None:
            self._allocate(num_classes)

    # -- configuration -------------------------------------------------------------

    def _config(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.input_kind, self.axis, self.ignore_index)

    def _allocate(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._states = {name: part.init(num_classes) for name, part in self._parts.items()}

    # -- life cycle ----------------------------------------------------------------

    def update(self, input: Array, target: Array) -> Self:
        """Add a batch: `input` (predictions, classes along `axis`) and integer `target`.

        Returns the metric itself, so calls chain: ``metric.update(x, y).compute()``.
        """
        if _traced(input):  # torch.compile: eagerly, at a graph break
            return cast(Self, _update_eagerly(self, input, target))
        xp = _batch_namespace(input, target)
        need_probs = any(part.needs_probs for part in self._parts.values())
        rows = F._row_stats(
            input,
            target,
            input_kind=self.input_kind,
            axis=self.axis,
            ignore_index=self.ignore_index,
            need_probs=need_probs,
            xp=xp,
        )
        num_classes = int(rows.pop("num_classes"))
        if self.num_classes is None or not self._states:
            self._allocate(num_classes)
        elif num_classes != self.num_classes:
            msg = (
                f"`input` has {num_classes} classes along axis {self.axis}, but this metric "
                f"has {self.num_classes} (reset() keeps that number); use one metric per class "
                f"set: a new {type(self).__name__} for these."
            )
            raise ValueError(msg)
        self._add_rows(lambda name: rows)
        return self

    def _add_rows(self, rows_of: Callable[[str], Rows]) -> None:
        """Each part's state plus its rows (``rows_of(part name)``); every part's exact terms
        are added together, so that terms of the same values share one split."""
        deferred: F.Deferred = []
        states = {
            name: part.update(self._states[name], rows_of(name), defer=deferred)
            for name, part in self._parts.items()
        }
        F._add_terms(deferred)
        self._states = states

    def merge(self, *others: Metric) -> Self:
        """Add the states of `others` (the same metric, updated on other rows) to this one.

        The result equals one metric updated with all the rows; returns ``self``.
        """
        name = type(self).__name__
        for other in others:
            if not isinstance(other, Metric):
                msg = f"`others` must be {name} metrics to merge; got {type(other).__name__}."
                raise TypeError(msg)
            if type(other) is not type(self) or other._config() != self._config():
                msg = (
                    f"`others`: can only merge a {name} with one of the same settings; got "
                    f"{type(other).__name__} with settings {other._config()}, not "
                    f"{self._config()}. Build every shard's metric with the same arguments."
                )
                raise ValueError(msg)
            if other._states and self._states and other.num_classes != self.num_classes:
                msg = (
                    f"`others`: cannot merge metrics over {self.num_classes} and "
                    f"{other.num_classes} classes; use one metric per class set."
                )
                raise ValueError(msg)
            if not other._states:
                continue
            if not self._states:
                self.num_classes = other.num_classes
            self._states = {
                name: F._merge(self._states.get(name, {}), other._states[name])
                for name in self._parts
            }
        return self

    def reset(self) -> Self:
        """Forget every batch (keeps `num_classes` if it was given or seen)."""
        if self.num_classes is not None:
            self._allocate(self.num_classes)
        else:
            self._states = {}
        return self

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """A copy of the state: exact sums (``float()`` / ``.value()`` round them) and int64
        counts, grouped by part."""
        return {name: {k: v.copy() for k, v in s.items()} for name, s in self._states.items()}

    @property
    def count(self) -> int:
        """Number of rows added so far (ignored rows excluded)."""
        for state in self._states.values():
            if "count" in state:
                return int(state["count"])
        return 0

    def sync(self, group: Any = None) -> Self:
        """A copy whose state is the sum over all ranks of ``torch.distributed``.

        Runs ``all_reduce`` on the state's integer arrays when
        ``torch.distributed`` is initialised (a MAX to agree on the digits
        the exact sums need, then one int64 SUM, which is exact), and is a
        plain copy otherwise. The metric itself is left as it is, so calling
        :meth:`sync` twice never counts a row twice. Every rank must call it
        (a collective). Before the sums, the ranks exchange a small header:
        a rank that has seen no batch (without `num_classes`), or ranks
        holding different metrics, settings or numbers of classes (which
        :meth:`merge` refuses too), raise a ``ValueError`` on every rank.

        Parameters
        ----------
        group : torch.distributed.ProcessGroup, optional
            The process group; the default group when None.
        """
        synced = copy.deepcopy(self)
        dist = sys.modules.get("torch.distributed")  # never imports torch itself
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return synced
        _agree(synced, dist=dist, group=group)
        _all_reduce_states(synced._states, dist=dist, group=group)
        return synced

    def compute(self) -> Any:
        """The metric's value over every row added (NaN before the first batch)."""
        raise NotImplementedError  # pragma: no cover - every subclass overrides

    def _part_state(self, name: str) -> F.State:
        if not self._states:
            return self._parts[name].init(1)
        return self._states[name]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_kind={self.input_kind!r}, rows={self.count})"


class CrossEntropy(Metric):
    r"""Mean cross-entropy (log loss) of the labels: −(1/N) Σ_i log p_i(y_i).

    In nats by default, or in any `base` (``base=2``: bits per token).

    Parameters
    ----------
    input_kind : {"probs", "logits", "log_probs"}
        What `input` holds (see :class:`Metric` for the rest).
    base : float, optional
        Logarithm base of the result: None for nats, 2 for bits, 10 for bans.

    Notes
    -----
    .. math:: \mathrm{CE} = -\frac{1}{N}\sum_{i=1}^{N}\log_b p_i(y_i),\qquad
              -\log p_i(y_i) = \operatorname{lse}(z_i) - z_{i,y_i} \text{ from logits}

    Probabilities: log p is clamped at −100 (see :attr:`clamped`).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import CrossEntropy
    >>> metric = CrossEntropy(input_kind="probs", base=2)
    >>> _ = metric.update(np.array([[0.5, 0.5], [0.25, 0.75]]), np.array([0, 1]))
    >>> metric.compute()  # (1 + 0.415) / 2 bits
    0.7075187496...
    """

    def __init__(
        self,
        *,
        input_kind: str,
        base: float | None = None,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self._parts = {"log_loss": _LOG_LOSS}
        F._log_base(base)
        self.base = base
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.base)

    def compute(self) -> float:
        """Mean cross-entropy in units of `base` (NaN before the first batch)."""
        return F._log_loss_compute(self._part_state("log_loss"), base=self.base)

    @property
    def clamped(self) -> int:
        """Rows whose label had probability below e^−100, so log p was clamped at −100."""
        return int(self._part_state("log_loss")["clamped"])


class Perplexity(CrossEntropy):
    r"""Perplexity: exp of the mean cross-entropy in nats, exp(−(1/N) Σ log p_i(y_i)).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import Perplexity
    >>> logits = np.zeros((3, 4))  # uniform over 4 tokens
    >>> ppl = Perplexity(input_kind="logits").update(logits, np.array([0, 1, 3])).compute()
    >>> round(ppl, 6)
    4.0
    """

    def __init__(
        self,
        *,
        input_kind: str,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def compute(self) -> float:
        """exp(mean cross-entropy in nats); inf when that overflows."""
        return F._perplexity_compute(self._part_state("log_loss"))


class BitsPerToken(CrossEntropy):
    r"""Mean cross-entropy in bits: −(1/N) Σ log₂ p_i(y_i) (``CrossEntropy(base=2)``).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import BitsPerToken
    >>> BitsPerToken(input_kind="log_probs").update(np.log([[0.5, 0.5]]), np.array([1])).compute()
    1.0
    """

    def __init__(
        self,
        *,
        input_kind: str,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            input_kind=input_kind,
            base=2,
            axis=axis,
            ignore_index=ignore_index,
            num_classes=num_classes,
        )


class Accuracy(Metric):
    r"""Fraction of rows whose highest-scoring class is the label.

    Ties go to the first class (``argmax``). A row holding NaN makes the
    result NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import Accuracy
    >>> logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    >>> Accuracy(input_kind="logits").update(logits, np.array([0, 1, 1])).compute()
    0.666666...
    """

    def __init__(
        self,
        *,
        input_kind: str,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self._parts = {"accuracy": _ACCURACY}
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def compute(self) -> float:
        """Accuracy in [0, 1] (NaN before the first batch or after a NaN row)."""
        return F._accuracy_compute(self._part_state("accuracy"))


class BrierScore(Metric):
    r"""Multiclass Brier score: (1/N) Σ_i Σ_k (p_ik − 1[k = y_i])², in [0, 2].

    Notes
    -----
    .. math:: \mathrm{BS} = \frac{1}{N}\sum_{i=1}^N\sum_{k=1}^C (p_{ik} - [k = y_i])^2

    Brier's original (1950) definition, the one scikit-learn's
    ``brier_score_loss`` uses for more than two classes. For two classes it is
    twice the one-column binary Brier score (mean of (p₁ − y)²).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import BrierScore
    >>> score = BrierScore(input_kind="probs").update(np.array([[0.8, 0.2]]), np.array([0]))
    >>> round(score.compute(), 6)
    0.08
    """

    def __init__(
        self,
        *,
        input_kind: str,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self._parts = {"brier": _BRIER}
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def compute(self) -> float:
        """Mean Brier score (NaN before the first batch)."""
        return F._brier_compute(self._part_state("brier"))


class CalibrationError(Metric):
    r"""Expected (or maximum) calibration error over confidence bins.

    Parameters
    ----------
    input_kind : {"probs", "logits", "log_probs"}
        What `input` holds.
    bins : int, default 15
        Number of bins B.
    binning : {"width", "mass"}, default "width"
        ``"width"``: B equal-width bins, bin = min(⌊conf·B⌋, B − 1), so a
        confidence of exactly 1.0 is in the last bin. ``"mass"``: B bins
        holding (nearly) equal numbers of predictions, from a fine streaming
        histogram (see Notes).
    kind : {"top_label", "classwise", "positive"}, default "top_label"
        ``"top_label"``: confidence = max_k p_k, hit = argmax is the label.
        ``"classwise"``: every class k in turn, confidence p_k, hit = label is
        k; the result is the mean over classes (Kull et al.'s classwise-ECE).
        ``"positive"``: two classes, confidence p₁, hit = label is 1.
    norm : {"l1", "max"}, default "l1"
        ``"l1"``: ECE = ``Σ_b (n_b/N)|acc_b − conf_b|``; ``"max"``: MCE =
        max over non-empty bins of ``|acc_b − conf_b|``.

    Notes
    -----
    .. math:: \mathrm{ECE} = \sum_{b=1}^{B}\frac{n_b}{N}\,|\mathrm{acc}_b - \mathrm{conf}_b|,
              \quad \mathrm{acc}_b = \frac{1}{n_b}\sum_{i\in b}\mathrm{hit}_i,
              \quad \mathrm{conf}_b = \frac{1}{n_b}\sum_{i\in b}\mathrm{conf}_i

    Equal-mass bins are quantiles of all confidences, which no bounded
    streaming state holds exactly. The state keeps a histogram of 4096 fine
    bins, equal-width in log-odds between 1e-8 and 1 − 1e-8 (so it resolves
    confidences near 0 and 1 as finely as near 0.5); each fine bin goes to the
    equal-mass bin that holds its median rank. The bin sums are exact; the bin
    edges are exact quantiles up to the fine resolution (ties, e.g. many
    confidences of exactly 1.0, cannot be split by any binning).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import CalibrationError
    >>> probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    >>> labels = np.array([0, 1, 0, 1])
    >>> ece = CalibrationError(input_kind="probs", bins=10).update(probs, labels)
    >>> ece.compute()  # bins: {0.9, 0.9} acc 0.5; {0.6} acc 1; {0.7} acc 1
    0.375
    """

    def __init__(
        self,
        *,
        input_kind: str,
        bins: int = 15,
        binning: str = "width",
        kind: str = "top_label",
        norm: str = "l1",
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.bins = F._check_positive_int(bins, name="bins")
        self.binning = F._check_choice(binning, F.BINNINGS, name="binning")
        self.kind = F._check_choice(kind, F.CALIBRATION_KINDS, name="kind")
        self.norm = F._check_choice(norm, ("l1", "max"), name="norm")
        # classwise equal-width bins need no fine histogram (C x 4096 numbers per class set)
        fine = self.binning == "mass" or self.kind != "classwise"
        self._parts = {"calibration": _calibration_part(self.kind, self.bins, fine=fine)}
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.bins, self.kind, self.binning)

    def compute(self) -> float:
        """ECE (or MCE for ``norm="max"``) in [0, 1]; NaN before the first batch."""
        return F._calibration_compute(
            self._part_state("calibration"), binning=self.binning, norm=self.norm
        )

    def reliability(self) -> dict[str, np.ndarray]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (NaN for empty bins), and
        ``nan``, the number of rows left out of the bins because they hold NaN (with any,
        :meth:`compute` is NaN).

        For ``kind="classwise"`` this is class 0's diagram.
        """
        return F._reliability(self._part_state("calibration"), binning=self.binning)


class PerClassCrossEntropy(Metric):
    r"""Cross-entropy and counts broken down by the true class.

    :meth:`compute` returns a dict of arrays indexed by class:
    ``cross_entropy`` (mean −log p of that class's rows, in units of `base`;
    NaN for a class with no rows), ``count``, ``recall`` (accuracy on the
    class's rows) and ``precision``. A row holding NaN has no prediction: the
    recall of its class and every precision are NaN (as the accuracy is).

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import PerClassCrossEntropy
    >>> probs = np.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]])
    >>> out = PerClassCrossEntropy(input_kind="probs", base=2).update(probs, np.array([0, 1, 1]))
    >>> out.compute()["cross_entropy"]
    array([1.        , 0.70751875])
    """

    def __init__(
        self,
        *,
        input_kind: str,
        base: float | None = None,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        F._log_base(base)
        self.base = base
        self._parts = {"per_class": _PER_CLASS}
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.base)

    def compute(self) -> dict[str, np.ndarray]:
        """Per-class arrays (empty before the first batch)."""
        if not self._states:
            return F._per_class_compute(F._per_class_init(0), base=self.base)
        return F._per_class_compute(self._states["per_class"], base=self.base)


class ClassificationMetrics(Metric):
    r"""Every metric of this module in one pass: what ``crossent eval`` reports.

    :meth:`compute` returns a dict of plain Python numbers: ``rows``,
    ``log_loss_nats``, ``log_loss_bits``, ``log_loss`` (in units of `base`),
    ``perplexity``, ``accuracy``, ``brier``, ``ece`` and ``mce`` (top-label,
    equal-width), ``ece_equal_mass``, ``classwise_ece``, ``ece_positive`` (two
    classes only, else None), ``clamped_rows``, and ``per_class`` (a list of
    dicts). :meth:`reliability` gives the top-label reliability diagram.

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import ClassificationMetrics
    >>> m = ClassificationMetrics(input_kind="probs", bins=10)
    >>> _ = m.update(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
    >>> result = m.compute()
    >>> result["accuracy"], round(result["log_loss_bits"], 4)
    (0.5, 1.237)
    """

    def __init__(
        self,
        *,
        input_kind: str,
        bins: int = 15,
        base: float | None = None,
        axis: int = -1,
        ignore_index: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.bins = F._check_positive_int(bins, name="bins")
        F._log_base(base)
        self.base = base
        self._parts = {
            **_SUMMARY_PARTS,
            "top_label": _calibration_part("top_label", self.bins),
            # equal-width only: a fine histogram per class would grow with the vocabulary
            "classwise": _calibration_part("classwise", self.bins, fine=False),
        }
        super().__init__(
            input_kind=input_kind, axis=axis, ignore_index=ignore_index, num_classes=num_classes
        )

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.bins, self.base)

    def compute(self) -> dict[str, Any]:
        """All figures as plain Python numbers (see the class docstring)."""
        log_loss = self._part_state("log_loss")
        top = self._part_state("top_label")
        classwise = self._part_state("classwise")
        binary = self.num_classes == 2
        nats = F._log_loss_compute(log_loss)
        per_class = (
            F._per_class_compute(self._states["per_class"], base=self.base)
            if self._states
            else F._per_class_compute(F._per_class_init(0))
        )
        return {
            "rows": self.count,
            "classes": self.num_classes or 0,
            "log_loss_nats": nats,
            "log_loss_bits": nats / math.log(2),
            "log_loss": F._log_loss_compute(log_loss, base=self.base),
            "perplexity": F._perplexity_compute(log_loss),
            "accuracy": F._accuracy_compute(self._part_state("accuracy")),
            "brier": F._brier_compute(self._part_state("brier")),
            "ece": F._calibration_compute(top, binning="width"),
            "mce": F._calibration_compute(top, binning="width", norm="max"),
            "ece_equal_mass": F._calibration_compute(top, binning="mass"),
            "classwise_ece": F._calibration_compute(classwise, binning="width"),
            "ece_positive": (
                F._calibration_compute(_class_slice(classwise, 1), binning="width")
                if binary
                else None
            ),
            "clamped_rows": int(log_loss["clamped"]),
            "per_class": _per_class_list(per_class),
        }

    def reliability(self, *, binning: str = "width") -> dict[str, np.ndarray]:
        """Top-label per-bin ``count``, mean ``confidence`` and ``accuracy``, and ``nan``, the
        rows left out of the bins because they hold NaN."""
        F._check_choice(binning, F.BINNINGS, name="binning")
        return F._reliability(self._part_state("top_label"), binning=binning)


def _per_class_list(per_class: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The per-class arrays of ``_per_class_compute`` as one dict of plain numbers per class."""
    return [
        {
            "index": k,
            "count": int(per_class["count"][k]),
            "cross_entropy": float(per_class["cross_entropy"][k]),
            "recall": float(per_class["recall"][k]),
            "precision": float(per_class["precision"][k]),
        }
        for k in range(per_class["count"].size)
    ]


def _agree(metric: Metric, *, dist: Any, group: Any) -> None:
    """Check, on every rank alike, that the ranks' states can be summed; raise otherwise.

    One ``all_gather`` of a small int64 header per rank (whether it has states, the
    number of classes, checksums of the settings and of the state's layout): a rank
    that has seen no batch, or ranks with different metrics, settings or numbers of
    classes, raise a ``ValueError`` on every rank, instead of leaving the others
    waiting in the all_reduce, crashing gloo ("collective mismatch", SIGABRT) or
    silently adding states that :meth:`Metric.merge` refuses.
    """
    import torch

    states = metric._states
    layout = [
        (n, k, v.shape if isinstance(v, ExactSum) else np.shape(v))
        for n in sorted(states)
        for k, v in sorted(states[n].items())
    ]
    header = [
        int(bool(states)),
        metric.num_classes or 0,
        zlib.crc32(repr(metric._config()).encode()),
        zlib.crc32(repr(layout).encode()),
    ]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = torch.tensor(header, dtype=torch.int64, device=_collective_device(dist, group))
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    name = f"{type(metric).__name__}.sync()"
    empty = [r for r, row in enumerate(rows) if not row[0]]
    if empty:
        msg = (
            f"{name} needs the number of classes on every rank, but rank(s) {empty} have seen "
            "no batch; pass num_classes=... to the constructor on every rank."
        )
        if rank not in empty:
            msg += f" (This is rank {rank}; every rank stops, so that none waits forever.)"
        raise ValueError(msg)
    if len({tuple(row[1:]) for row in rows}) > 1:
        msg = (
            f"{name}: the ranks hold different metrics, settings or numbers of classes "
            f"(classes per rank: {[row[1] for row in rows]}); every rank must sync the same "
            "metric with the same settings over the same classes."
        )
        raise ValueError(msg)


def _collective_device(dist: Any, group: Any) -> Any:
    """Where the tensors of a collective must live: CUDA for NCCL, else the CPU."""
    import torch

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_states(states: dict[str, F.State], *, dist: Any, group: Any) -> None:
    """Sum `states` over the ranks of `group`, in place, exactly.

    The exact sums are first widened to the same digit window on every rank
    (an all_reduce MAX of their windows), so that their digits line up; then
    every int64 array (counts, digits, NaN and inf counts) goes into one
    all_reduce SUM. Digits are below 2**32, so the sum over ranks cannot
    overflow, and carries are propagated afterwards.
    """
    import torch

    on = _collective_device(dist, group)
    keys = [(name, key) for name in sorted(states) for key in sorted(states[name])]
    exact = [(n, k) for n, k in keys if isinstance(states[n][k], ExactSum)]
    if exact:
        # [-lo..., hi...] under MAX: the smallest lo and the largest hi of all ranks
        none = -(2**40)
        bounds = []
        for n, k in exact:
            window = states[n][k].window()
            bounds.append(none if window is None else -window[0])
        for n, k in exact:
            window = states[n][k].window()
            bounds.append(none if window is None else window[1])
        tensor = torch.tensor(bounds, dtype=torch.int64, device=on)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        agreed = tensor.cpu().tolist()
        for i, (n, k) in enumerate(exact):
            lo, hi = -agreed[i], agreed[len(exact) + i]
            if hi != none:
                states[n][k].pad_to(lo, hi)
    # (holder, field): the int64 arrays to sum, where each lives
    slots: list[tuple[Any, str]] = []
    for n, k in keys:
        if isinstance(states[n][k], ExactSum):
            slots += [(states[n][k], f) for f in ("limbs", "nan", "pos_inf", "neg_inf")]
        else:
            slots.append((states[n], k))

    def get(holder: Any, name: str) -> np.ndarray:
        return np.asarray(holder[name] if isinstance(holder, dict) else getattr(holder, name))

    arrays = [get(holder, name) for holder, name in slots]
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.int64)
    tensor = torch.from_numpy(flat).to(on)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    summed = tensor.cpu().numpy()
    start = 0
    for (holder, name), a in zip(slots, arrays, strict=True):
        value = summed[start : start + a.size].reshape(a.shape).copy()
        if isinstance(holder, dict):
            holder[name] = value
        else:
            setattr(holder, name, value)
        start += a.size
    for n, k in exact:
        states[n][k]._normalize()


def _class_slice(state: F.State, k: int) -> F.State:
    """The classwise calibration state of class `k` alone (the positive class when k = 1)."""
    return {key: (v[k : k + 1] if v.ndim == 2 else v) for key, v in state.items()}
