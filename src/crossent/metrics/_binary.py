r"""Binary classification metrics from one column: the predicted P(label = 1).

A binary classifier's prediction log has one score per row, the probability
of the positive class (or its logit, or its log), and labels 0/1.
:class:`BinaryClassificationMetrics` reports the binary figures in one
streaming, mergeable pass: log loss, the Brier score as scikit-learn defines
it (mean of (p − y)², half the two-column multiclass Brier score), accuracy
at the 0.5 threshold, and the calibration error of P(label = 1) (the
reliability diagram of scikit-learn's ``calibration_curve``, with the bins
closed on the left: a score on an edge is in the bin above it).

Its state has the same parts as :class:`~crossent.metrics.ClassificationMetrics`
over two classes (log-loss sums, accuracy counts, per-class sums, calibration
histograms), so it merges, pickles and all-reduces the same way.
"""

from __future__ import annotations

import math
from typing import Any, Self, cast

import numpy as np

from crossent._lib import _checks
from crossent._lib._xp import Array, to_numpy
from crossent.metrics import _functional as F
from crossent.metrics._metric import (
    _SUMMARY_PARTS,
    Metric,
    _batch_namespace,
    _calibration_part,
    _per_class_list,
    _traced,
    _update_eagerly,
)

__all__ = ["BinaryClassificationMetrics"]


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^−|x|)."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _log1mexp(a: np.ndarray) -> np.ndarray:
    """log(1 − e^a) for a ≤ 0, accurate near 0 and near −inf (Mächler 2012)."""
    with np.errstate(divide="ignore"):
        return np.where(a > -math.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


def _binary_rows(score: np.ndarray, label: np.ndarray, *, input_kind: str) -> dict[str, np.ndarray]:
    """Per-row statistics of binary predictions (float64 / int64 / bool host arrays).

    The same keys as :func:`crossent.metrics._functional._row_stats` for two
    classes, with ``conf`` = P(label = 1) and ``pred`` = 1 for every row, so the
    top-label calibration update bins (P(1), label = 1) pairs: the calibration
    of the positive class. ``brier`` is (p − y)² and ``pred01`` the 0.5-threshold
    prediction used by accuracy and the per-class counts.
    """
    y = label.astype(np.int64, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        if input_kind == "logits":
            log_p1, log_p0 = -_softplus(-score), -_softplus(score)
            p = np.exp(log_p1)
            clamped = np.zeros(score.shape, dtype=np.bool_)
        elif input_kind == "log_probs":
            log_p1, log_p0 = score, _log1mexp(score)
            p = np.exp(score)
            clamped = np.zeros(score.shape, dtype=np.bool_)
        else:
            p = score
            log_p1, log_p0 = np.log(p), np.log1p(-p)
        log_p_y = np.where(y == 1, log_p1, log_p0)
    if input_kind == "probs":
        clamped = log_p_y < F.LOG_P_FLOOR  # PyTorch's BCE rule: log p ≥ −100
        log_p_y = np.maximum(log_p_y, F.LOG_P_FLOOR, where=~np.isnan(log_p_y), out=log_p_y)
    nan = np.isnan(p)
    return {
        "label": y,
        "nll": -log_p_y,
        "clamped": clamped,
        # argmax of (1 − p, p), a tie going to class 0; from logits the logit's sign (p rounds
        # to 0.5 for |z| below 1e-16, which predicted 0 for a positive logit)
        "pred": ((score > 0) if input_kind == "logits" else (p > 0.5)).astype(np.int64),
        "conf": p,
        "brier": (p - y) ** 2,
        "nan": nan,
    }


def _check_binary(score: np.ndarray, label: np.ndarray, *, input_kind: str) -> None:
    """Labels must be 0 or 1; probabilities in [0, 1] and log-probabilities ≤ 0 (NaN passes)."""
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        row = int(bad[0])
        reason = f"has label {label[row]:g}, not 0 or 1"
        msg = f"`target` row {row} {reason}. Binary labels are 0/1 (or false/true)."
        raise F.BadRowError(msg, row=row, reason=reason)
    if input_kind == "logits":
        return
    outside = (score < 0) | (score > 1) if input_kind == "probs" else score > 0
    hits = np.flatnonzero(outside)
    if hits.size:
        row = int(hits[0])
        bound = "[0, 1]" if input_kind == "probs" else "[-inf, 0]"
        shown = _checks.shown_value(float(score[row]))
        reason = f"has P(label = 1) = {shown}, outside {bound}"
        if input_kind == "log_probs":
            reason = f"has log P(label = 1) = {shown}, outside {bound}"
        msg = (
            f"`input` row {row} {reason}. Pass input_kind='logits' if these are logits "
            "(scores before the sigmoid)."
        )
        raise F.BadRowError(msg, row=row, reason=reason)


def _check_shapes(score: tuple[int, ...], label: tuple[int, ...]) -> None:
    """One score per label: equal shapes (multi-label too), or a column of one per label.

    Shapes that merely hold as many numbers, such as scores ``(1, 2)`` beside two labels,
    were flattened into that many binary predictions; two columns per label are the
    probabilities (or logits) of both classes, not P(label = 1).
    """

    def trimmed(shape: tuple[int, ...]) -> tuple[int, ...]:
        while shape and shape[-1] == 1:
            shape = shape[:-1]
        return shape

    if trimmed(score) == trimmed(label):
        return
    if len(score) >= 2 and score[-1] == 2:  # (N, 2) beside N labels, or (1, 2) beside 2
        msg = (
            f"`input` has shape {score}: two columns beside `target` of shape {label}, the "
            "scores of both classes, where BinaryClassificationMetrics "
            "takes one P(label = 1) per label. Pass input[..., 1] (probabilities or "
            "log-probabilities; for two logits input[..., 1] - input[..., 0]), or score both "
            "columns with ClassificationMetrics."
        )
        raise ValueError(msg)
    msg = (
        f"`input` of shape {score} and `target` of shape {label} must have the same shape: "
        "one P(label = 1) per label (a multi-label target: one per label and class)."
    )
    raise ValueError(msg)


class BinaryClassificationMetrics(Metric):
    r"""Binary figures of one P(label = 1) column in one streaming pass.

    Parameters
    ----------
    input_kind : {"probs", "logits", "log_probs"}
        What the scores hold: P(label = 1), its logit (the score before the
        sigmoid), or log P(label = 1).
    bins : int, default 15
        Equal-width calibration bins of P(label = 1).
    base : float, optional
        Logarithm base of ``log_loss`` (nats and bits are always reported).
    ignore_index : int, optional
        Rows whose label equals it are skipped.

    Notes
    -----
    With p = P(label = 1) and y ∈ {0, 1}:

    .. math:: \mathrm{LL} = -\frac1N\sum_i \big[y_i\log p_i + (1-y_i)\log(1-p_i)\big],\qquad
              \mathrm{BS} = \frac1N\sum_i (p_i - y_i)^2

    Log loss is scikit-learn's ``log_loss`` (probabilities are not clipped: the
    log is clamped at −100 as in PyTorch's ``binary_cross_entropy``, and
    ``clamped_rows`` counts where that happened); logits use
    −log σ(z) = softplus(−z), exact for any finite logit. The Brier score is
    scikit-learn's ``brier_score_loss``, half the two-column multiclass one.
    Accuracy predicts class 1 when p > 0.5 (from logits: z > 0). ``ece`` is the calibration error
    of p against the positive rate, Σ_b (n_b/N)|mean y_b − mean p_b| over
    equal-width bins of p (the reliability diagram of scikit-learn's
    ``calibration_curve``, but with bins [k/B, (k+1)/B), as
    :class:`~crossent.metrics.CalibrationError`: a score of exactly 0.5 is in
    [0.5, 0.6) with 10 bins, where scikit-learn has it in (0.4, 0.5]);
    ``ece_equal_mass`` uses bins of equal counts.

    Examples
    --------
    >>> import numpy as np
    >>> from crossent.metrics import BinaryClassificationMetrics
    >>> m = BinaryClassificationMetrics(input_kind="probs", bins=10)
    >>> _ = m.update(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 1]))
    >>> r = m.compute()
    >>> round(r["log_loss_nats"], 6), round(r["brier"], 6), r["accuracy"]
    (0.540271, 0.1925, 0.5)
    """

    def __init__(
        self,
        *,
        input_kind: str,
        bins: int = 15,
        base: float | None = None,
        ignore_index: int | None = None,
    ) -> None:
        self.bins = F._check_positive_int(bins, name="bins")
        F._log_base(base)
        self.base = base
        self._parts = {**_SUMMARY_PARTS, "positive": _calibration_part("top_label", self.bins)}
        super().__init__(input_kind=input_kind, ignore_index=ignore_index, num_classes=2)

    def _config(self) -> tuple[Any, ...]:
        return (*super()._config(), self.bins, self.base)

    def update(self, input: Array, target: Array) -> Self:
        """Add a batch: `input` holds one floating score per label, `target` the 0/1 labels.

        `input` has `target`'s shape (a multi-label target: one score per label and
        class), or that shape with a trailing axis of 1 (a column). Two columns per
        label (both classes' scores) are refused, not flattened: pass ``input[..., 1]``.
        """
        if _traced(input):  # torch.compile: eagerly, at a graph break
            return cast(Self, _update_eagerly(self, input, target))
        xp = _batch_namespace(input, target)  # a clear TypeError for non-arrays or two libraries
        # integer or boolean scores (hard 0/1 decisions?) are not read as probabilities 0 and 1
        _checks.check_floating(input, name="input", xp=xp, hint=" (P(label = 1), not a class)")
        score = to_numpy(input, dtype=np.float64)
        # as float64 (exact for 0/1 and any label near them): an int64 copy would truncate
        # 0.5 or 1.2 to a label 0/1
        label = to_numpy(target, dtype=np.float64)
        _check_shapes(score.shape, label.shape)
        score, label = np.ravel(score), np.ravel(label)
        if self.ignore_index is not None:
            kept = label != self.ignore_index
            score, label = score[kept], label[kept]
        _check_binary(score, label, input_kind=self.input_kind)
        rows = _binary_rows(score, label.astype(np.int64), input_kind=self.input_kind)
        self.update_rows(rows)
        return self

    def update_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Add per-row statistics made by ``_binary_rows`` (the fast path of ``eval``)."""
        positive = {**rows, "pred": np.ones_like(rows["pred"])}  # hit = (label == 1)
        self._add_rows(lambda name: positive if name == "positive" else rows)

    def compute(self) -> dict[str, Any]:
        """All figures as plain Python numbers.

        Keys: ``rows``, ``classes`` (2), ``log_loss_nats``, ``log_loss_bits``,
        ``log_loss`` (in `base`), ``perplexity``, ``accuracy``, ``brier``,
        ``ece``, ``mce``, ``ece_equal_mass``, ``positive_rate``,
        ``mean_prediction``, ``clamped_rows`` and ``per_class`` (classes 0, 1).
        """
        log_loss = self._states["log_loss"]
        positive = self._states["positive"]
        nats = F._log_loss_compute(log_loss)
        per_class = F._per_class_compute(self._states["per_class"], base=self.base)
        count = int(log_loss["count"])
        conf = positive["width_conf"]  # the bins' exact sums, added exactly, rounded once
        conf_sum = float(conf.regroup(np.zeros(conf.shape, dtype=np.int64), 1).value()[0, 0])
        return {
            "rows": count,
            "classes": 2,
            "log_loss_nats": nats,
            "log_loss_bits": nats / math.log(2),
            "log_loss": F._log_loss_compute(log_loss, base=self.base),
            "perplexity": F._perplexity_compute(log_loss),
            "accuracy": F._accuracy_compute(self._states["accuracy"]),
            "brier": F._brier_compute(self._states["brier"]),
            "ece": F._calibration_compute(positive, binning="width"),
            "mce": F._calibration_compute(positive, binning="width", norm="max"),
            "ece_equal_mass": F._calibration_compute(positive, binning="mass"),
            "positive_rate": F._ratio(per_class["count"][1], count),
            "mean_prediction": (math.nan if positive["nan"] else F._ratio(conf_sum, count)),
            "clamped_rows": int(log_loss["clamped"]),
            "per_class": _per_class_list(per_class),
        }

    def reliability(self, *, binning: str = "width") -> dict[str, np.ndarray]:
        """Per-bin ``count``, mean P(label = 1) (``confidence``), positive rate (``accuracy``)."""
        F._check_choice(binning, F.BINNINGS, name="binning")
        return F._reliability(self._states["positive"], binning=binning)
