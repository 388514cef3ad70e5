"""crossent.metrics against scikit-learn and the float64 reference; streaming laws; errors."""

from __future__ import annotations

import itertools
import math
import pickle
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent as ce
from crossent.metrics import (
    Accuracy,
    BadRowError,
    BinaryClassificationMetrics,
    BitsPerToken,
    BrierScore,
    CalibrationError,
    ClassificationMetrics,
    CrossEntropy,
    PerClassCrossEntropy,
    Perplexity,
)
from crossent.metrics import _functional as F
from crossent.metrics._exact import ExactSum
from tests._reference import metrics as ref
from tests.conftest import to_xp

sklearn_metrics = pytest.importorskip("sklearn.metrics")

KINDS = ("probs", "logits", "log_probs")


def _data(n: int = 300, c: int = 4, *, seed: int = 0, scale: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=scale, size=(n, c))
    y = rng.integers(0, c, size=n)
    log_p = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    return {"logits": z, "log_probs": log_p, "probs": np.exp(log_p), "y": y}


# ------------------------------------------------------------------ values


def test_log_loss_matches_sklearn() -> None:
    d = _data()
    got = CrossEntropy(input_kind="probs").update(d["probs"], d["y"]).compute()
    want = sklearn_metrics.log_loss(d["y"], d["probs"], labels=range(4))
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", [None, 2, 10, 3.5])
def test_log_loss_matches_reference(kind: str, base: float | None) -> None:
    d = _data(n=120, c=5, seed=1)
    got = CrossEntropy(input_kind=kind, base=base).update(d[kind], d["y"]).compute()
    assert got == pytest.approx(ref.log_loss(d[kind], d["y"], kind, base), rel=1e-12)


def test_perplexity_and_bits_per_token() -> None:
    d = _data(seed=2)
    nats = ref.log_loss(d["logits"], d["y"], "logits")
    ppl = Perplexity(input_kind="logits").update(d["logits"], d["y"]).compute()
    bits = BitsPerToken(input_kind="logits").update(d["logits"], d["y"]).compute()
    assert ppl == pytest.approx(math.exp(nats), rel=1e-12)
    assert bits == pytest.approx(nats / math.log(2), rel=1e-12)


def test_log_loss_equals_the_library_loss_including_the_clamp() -> None:
    d = _data(n=50, seed=3)
    p = d["probs"].copy()
    p[0] = [0.0, 1.0, 0.0, 0.0]  # label probability exactly 0 for row 0 if its label is not 1
    y = d["y"].copy()
    y[0] = 0
    metric = CrossEntropy(input_kind="probs").update(p, y)
    loss = ce.sparse_categorical_cross_entropy(p, y)
    assert metric.compute() == pytest.approx(float(loss), rel=1e-12)
    assert metric.clamped == 1


def test_logit_of_minus_inf_on_the_label_gives_inf() -> None:
    z = np.array([[-np.inf, 0.0], [1.0, 0.0]])
    assert CrossEntropy(input_kind="logits").update(z, np.array([0, 1])).compute() == math.inf


def test_brier_matches_sklearn_multiclass_and_binary() -> None:
    d = _data(seed=4)
    got = BrierScore(input_kind="probs").update(d["probs"], d["y"]).compute()
    want = sklearn_metrics.brier_score_loss(d["y"], d["probs"], labels=range(4))
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(ref.brier(d["probs"], d["y"], "probs"), rel=1e-12)
    b = _data(c=2, seed=5)
    got2 = BrierScore(input_kind="logits").update(b["logits"], b["y"]).compute()
    # binary: the multiclass sum over both columns is twice the one-column score
    want2 = sklearn_metrics.brier_score_loss(b["y"], b["probs"][:, 1])
    assert got2 == pytest.approx(2 * want2, rel=1e-12)


def test_accuracy_matches_sklearn() -> None:
    d = _data(seed=6)
    got = Accuracy(input_kind="logits").update(d["logits"], d["y"]).compute()
    assert got == sklearn_metrics.accuracy_score(d["y"], np.argmax(d["logits"], axis=1))
    assert got == ref.accuracy(d["logits"], d["y"])


@pytest.mark.parametrize("which", ["top_label", "classwise", "positive"])
@pytest.mark.parametrize("norm", ["l1", "max"])
def test_calibration_error_equal_width_matches_reference(which: str, norm: str) -> None:
    c = 2 if which == "positive" else 4
    d = _data(n=400, c=c, seed=7)
    metric = CalibrationError(input_kind="logits", bins=10, kind=which, norm=norm)
    got = metric.update(d["logits"], d["y"]).compute()
    want = ref.ece(d["logits"], d["y"], "logits", n_bins=10, which=which, norm=norm)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_equal_mass_bins_are_the_quantile_bins_up_to_the_fine_resolution() -> None:
    d = _data(n=3000, c=3, seed=8, scale=3.0)
    metric = CalibrationError(input_kind="logits", bins=15, binning="mass")
    metric.update(d["logits"], d["y"])
    counts = metric.reliability()["count"]
    assert counts.sum() == 3000
    # a bin edge can miss the exact quantile by at most one fine bin's content
    finest = int(metric.state["calibration"]["fine_count"].max())
    assert finest <= 15
    assert np.all(np.abs(counts - 200) <= finest), counts
    want = ref.ece(d["logits"], d["y"], "logits", n_bins=15, binning="mass")
    assert metric.compute() == pytest.approx(want, abs=2 * finest / 3000)
    width = CalibrationError(input_kind="logits", bins=15).update(d["logits"], d["y"])
    assert np.ptp(width.reliability()["count"]) > 100  # equal-width bins are far from equal


def test_equal_mass_bins_resolve_confidences_near_one() -> None:
    # 1 - conf spread over 1e-7 .. 1e-3: equal-width bins put all in one bin
    rng = np.random.default_rng(9)
    gap = 10.0 ** rng.uniform(-7, -3, size=1000)
    p = np.stack([1 - gap, gap], axis=1)
    metric = CalibrationError(input_kind="probs", bins=10, binning="mass").update(
        p, np.zeros(1000, dtype=np.int64)
    )
    counts = metric.reliability()["count"]
    assert np.all(np.abs(counts - 100) <= 3), counts


def test_ece_bin_edges_and_confidence_one_in_the_last_bin() -> None:
    k = np.arange(11)
    p1 = k / 10  # confidences 0, 0.1, ..., 1.0 exactly on the edges
    p = np.stack([1 - p1, p1], axis=1)
    y = np.ones(11, dtype=np.int64)
    metric = CalibrationError(input_kind="probs", bins=10, kind="positive").update(p, y)
    counts = metric.reliability()["count"]
    assert counts.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]  # k/10 in bin k; 1.0 joins bin 9
    top = CalibrationError(input_kind="probs", bins=4).update(
        np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])
    )
    assert top.reliability()["count"].tolist() == [0, 0, 0, 2]
    assert top.compute() == 0.0
    assert F._width_bin(np.array([0.0, 0.25, np.nextafter(0.5, 0), 0.999999, 1.0]), 4).tolist() == [
        0,
        1,
        1,
        3,
        3,
    ]


def test_positive_class_equals_classwise_slice_and_ece_of_perfect_calibration() -> None:
    d = _data(n=500, c=2, seed=10)
    pos = CalibrationError(input_kind="probs", bins=15, kind="positive").update(d["probs"], d["y"])
    full = ClassificationMetrics(input_kind="probs", bins=15).update(d["probs"], d["y"]).compute()
    assert full["ece_positive"] == pytest.approx(pos.compute(), rel=1e-12)


def test_per_class_cross_entropy_matches_reference() -> None:
    d = _data(n=200, c=5, seed=11)
    y = d["y"].copy()
    y[y == 3] = 4  # class 3 unseen: NaN
    out = PerClassCrossEntropy(input_kind="log_probs", base=2).update(d["log_probs"], y).compute()
    want = ref.per_class_log_loss(d["log_probs"], y, "log_probs", 5) / math.log(2)
    np.testing.assert_allclose(out["cross_entropy"], want, rtol=1e-12)
    assert out["count"].tolist() == np.bincount(y, minlength=5).tolist()
    recall = sklearn_metrics.recall_score(
        y, np.argmax(d["log_probs"], 1), labels=[0, 1, 2, 4], average=None
    )
    np.testing.assert_allclose(out["recall"][[0, 1, 2, 4]], recall)
    assert math.isnan(out["recall"][3])


def test_classification_metrics_agree_with_the_single_metrics() -> None:
    d = _data(n=250, c=3, seed=12)
    out = ClassificationMetrics(input_kind="logits", bins=12, base=10).update(d["logits"], d["y"])
    r = out.compute()
    assert r["rows"] == 250
    assert r["classes"] == 3
    assert r["log_loss_nats"] == pytest.approx(ref.log_loss(d["logits"], d["y"], "logits"))
    assert r["log_loss_bits"] == pytest.approx(r["log_loss_nats"] / math.log(2))
    assert r["log_loss"] == pytest.approx(r["log_loss_nats"] / math.log(10))
    assert r["ece"] == pytest.approx(ref.ece(d["logits"], d["y"], "logits", n_bins=12))
    assert r["mce"] == pytest.approx(ref.ece(d["logits"], d["y"], "logits", n_bins=12, norm="max"))
    classwise = ref.ece(d["logits"], d["y"], "logits", n_bins=12, which="classwise")
    assert r["classwise_ece"] == pytest.approx(classwise)
    assert r["brier"] == pytest.approx(ref.brier(d["logits"], d["y"], "logits"))
    assert r["ece_positive"] is None
    assert [c["count"] for c in r["per_class"]] == np.bincount(d["y"], minlength=3).tolist()


# ------------------------------------------------------------------ backends


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_gives_the_numpy_result(xp: Any, kind: str) -> None:
    d = _data(n=64, c=3, seed=13)
    convert = to_xp(xp)
    want = ClassificationMetrics(input_kind=kind).update(d[kind], d["y"]).compute()
    got = ClassificationMetrics(input_kind=kind).update(convert(d[kind]), convert(d["y"])).compute()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-15), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_low_precision_accumulates_in_float32(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    d = _data(n=200, c=6, seed=14)
    z = torch.tensor(d["logits"]).to(getattr(torch, dtype))
    got = CrossEntropy(input_kind="logits").update(z, torch.tensor(d["y"])).compute()
    want = ref.log_loss(z.double().numpy(), d["y"], "logits")
    assert got == pytest.approx(want, rel=1e-5)


def test_class_axis_and_sequence_shapes() -> None:
    d = _data(n=24, c=5, seed=15)
    z = d["logits"].reshape(2, 3, 4, 5)  # (batch, seq, ..., classes)
    y = d["y"].reshape(2, 3, 4)
    flat = CrossEntropy(input_kind="logits").update(d["logits"], d["y"]).compute()
    assert CrossEntropy(input_kind="logits").update(z, y).compute() == pytest.approx(flat)
    moved = np.moveaxis(z, -1, 1)  # (batch, classes, seq, ...), PyTorch's layout
    assert CrossEntropy(input_kind="logits", axis=1).update(moved, y).compute() == pytest.approx(
        flat
    )


def test_ignored_rows_are_not_checked_and_bad_rows_keep_their_index() -> None:
    p = np.array([[0.5, 0.5], [0.0, 0.0], [0.9, 0.9], [0.2, 0.8]])
    y = np.array([0, -1, 1, 1])
    with pytest.raises(BadRowError, match="row 2 ") as info:
        CrossEntropy(input_kind="probs", ignore_index=-1).update(p, y)
    assert info.value.row == 2
    ok = CrossEntropy(input_kind="probs", ignore_index=-1).update(p[[0, 1, 3]], y[[0, 1, 3]])
    assert ok.count == 2
    assert ok.compute() == pytest.approx((math.log(2) - math.log(0.8)) / 2)


def test_ignore_index_skips_rows() -> None:
    d = _data(n=40, c=3, seed=16)
    y = d["y"].copy()
    y[::4] = -100
    kept = y != -100
    metric = Perplexity(input_kind="logits", ignore_index=-100).update(d["logits"], y)
    assert metric.count == int(kept.sum())
    want = math.exp(ref.log_loss(d["logits"][kept], y[kept], "logits"))
    assert metric.compute() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ streaming laws


def _same_figures(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical figures (NaN equal to NaN), per-class entries included."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        if key == "per_class":
            for x, y in zip(value, other, strict=True):
                _same_figures(x, y)
        elif isinstance(value, float) and math.isnan(value):
            assert isinstance(other, float), key
            assert math.isnan(other), key
        else:
            assert other == value, (key, other, value)


def test_seven_uneven_shards_merge_to_one_pass() -> None:
    d = _data(n=1000, c=4, seed=17)
    cuts = [0, 3, 10, 11, 250, 251, 700, 1000]  # 7 shards of sizes 3..449
    one = ClassificationMetrics(input_kind="probs", bins=15).update(d["probs"], d["y"])
    shards = [
        ClassificationMetrics(input_kind="probs", bins=15).update(d["probs"][a:b], d["y"][a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    merged = ClassificationMetrics(input_kind="probs", bins=15).merge(*shards)
    for part, state in one.state.items():
        for key, value in state.items():
            other = merged.state[part][key]
            if isinstance(value, ExactSum):  # the same value, bit for bit
                np.testing.assert_array_equal(other.value(), value.value(), err_msg=key)
            else:
                np.testing.assert_array_equal(other, value, err_msg=f"{part}.{key}")
    _same_figures(merged.compute(), one.compute())


@given(
    cuts=st.lists(st.integers(0, 400), max_size=6),
    order=st.randoms(use_true_random=False),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(KINDS),
    scale=st.sampled_from([0.1, 3.0, 40.0]),
)
def test_merges_are_bit_identical_to_one_pass(
    cuts: list[int], order: Any, seed: int, kind: str, scale: float
) -> None:
    """Issue 11: in 21 of 48 random shardings the merged CE and Brier were 1 ulp off."""
    d = _data(n=400, c=5, seed=seed, scale=scale)
    x, y = d[kind], d["y"]
    one = ClassificationMetrics(input_kind=kind, bins=10).update(x, y)
    bounds = [0, *sorted(cuts), 400]
    shards = [
        ClassificationMetrics(input_kind=kind, bins=10).update(x[a:b], y[a:b])
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    order.shuffle(shards)
    # merge as a random tree: pairs of neighbours until one is left
    while len(shards) > 1:
        i = order.randrange(len(shards) - 1)
        shards[i : i + 2] = [shards[i].merge(shards[i + 1])]
    _same_figures(shards[0].compute(), one.compute())
    for metric in (CrossEntropy, BrierScore):
        parts = [
            metric(input_kind=kind).update(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)
        ]
        merged = metric(input_kind=kind).merge(*reversed(parts))
        assert merged.compute() == metric(input_kind=kind).update(x, y).compute()


def test_batched_updates_equal_one_update() -> None:
    d = _data(n=100, c=3, seed=18)
    one = CalibrationError(input_kind="logits", binning="mass").update(d["logits"], d["y"])
    many = CalibrationError(input_kind="logits", binning="mass")
    for a in range(0, 100, 7):
        many.update(d["logits"][a : a + 7], d["y"][a : a + 7])
    assert many.compute() == pytest.approx(one.compute(), rel=1e-12)


def test_ten_million_float32_predictions_sum_without_drift() -> None:
    rng = np.random.default_rng(19)
    metric = CrossEntropy(input_kind="log_probs")
    exact_parts = []
    float32_running = np.float32(0.0)
    for _ in range(10):
        p = rng.uniform(0.05, 0.95, size=1_000_000).astype(np.float32)
        log_p = np.stack([np.log(p), np.log1p(-p)], axis=1).astype(np.float32)
        y = (p < 0.5).astype(np.int64)  # the less likely class: losses near 0.7-3
        metric.update(log_p, y)
        nll = -log_p[np.arange(y.size), y]  # float32 per-row losses, exact negation
        exact_parts.append(math.fsum(nll.astype(np.float64)))
        float32_running = np.float32(float32_running + np.cumsum(nll, dtype=np.float32)[-1])
    exact = math.fsum(exact_parts)
    state = metric.state["log_loss"]
    assert int(state["count"]) == 10_000_000
    assert float(state["nll_sum"]) == exact  # fsum rounds the exact sum once, as the state does
    # the same sum accumulated in float32 drifts far beyond that: the test can fail
    assert abs(float(float32_running) - exact) / exact > 1e-6


def test_pickle_round_trip_keeps_the_state() -> None:
    d = _data(n=50, c=3, seed=20)
    metric = ClassificationMetrics(input_kind="logits").update(d["logits"], d["y"])
    clone = pickle.loads(pickle.dumps(metric))
    assert clone.compute() == metric.compute()
    clone.update(d["logits"], d["y"])
    assert clone.count == 100
    assert metric.count == 50


def test_reset_and_empty_metrics_give_nan() -> None:
    metric = CrossEntropy(input_kind="probs")
    assert math.isnan(metric.compute())
    metric.update(np.array([[0.5, 0.5]]), np.array([0]))
    assert metric.compute() == pytest.approx(math.log(2))
    assert math.isnan(metric.reset().compute())
    assert math.isnan(CalibrationError(input_kind="probs").compute())
    assert math.isnan(Perplexity(input_kind="probs").compute())
    huge = np.array([[0.0, 800.0]])  # exp(800) overflows: perplexity is inf, not an error
    assert Perplexity(input_kind="logits").update(huge, np.array([0])).compute() == math.inf


def test_another_number_of_classes_names_the_fix_that_works() -> None:
    # reset() keeps the number of classes seen (sync() needs it on every rank): the error
    # said "use one metric per class set, or reset() it", and after reset() it came again
    metric = CrossEntropy(input_kind="logits").update(np.zeros((2, 3)), np.array([0, 1]))
    for _ in range(2):
        with pytest.raises(ValueError, match=r"has 4 classes .* has 3") as info:
            metric.update(np.zeros((2, 4)), np.array([0, 3]))
        assert "reset() it" not in str(info.value)
        assert "reset() keeps" in str(info.value)
        metric.reset()
    fresh = CrossEntropy(input_kind="logits").update(np.zeros((2, 4)), np.array([0, 3]))
    assert fresh.compute() == pytest.approx(math.log(4))


def test_sync_without_distributed_is_a_copy() -> None:
    d = _data(n=30, c=3, seed=21)
    metric = Accuracy(input_kind="logits").update(d["logits"], d["y"])
    synced = metric.sync()
    assert synced is not metric
    assert synced.compute() == metric.compute()


@given(
    shift=st.floats(-1e6, 1e6, allow_nan=False),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 20),
)
def test_logit_shift_invariance_and_kinds_agree(shift: float, seed: int, n: int) -> None:
    d = _data(n=n, c=4, seed=seed)
    base = ClassificationMetrics(input_kind="logits").update(d["logits"], d["y"]).compute()
    shifted = ClassificationMetrics(input_kind="logits").update(d["logits"] + shift, d["y"])
    from_log_p = ClassificationMetrics(input_kind="log_probs").update(d["log_probs"], d["y"])
    for other in (shifted.compute(), from_log_p.compute()):
        assert other["log_loss_nats"] == pytest.approx(base["log_loss_nats"], rel=1e-6, abs=1e-9)
        assert other["brier"] == pytest.approx(base["brier"], rel=1e-6, abs=1e-9)


@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6), seed=st.integers(0, 100))
def test_merge_in_any_grouping_equals_one_stream(sizes: list[int], seed: int) -> None:
    n = sum(sizes)
    if n == 0:
        return
    d = _data(n=n, c=3, seed=seed)
    one = CrossEntropy(input_kind="logits").update(d["logits"], d["y"])
    parts = []
    start = 0
    for s in sizes:
        m = CrossEntropy(input_kind="logits")
        if s:
            m.update(d["logits"][start : start + s], d["y"][start : start + s])
        parts.append(m)
        start += s
    merged = CrossEntropy(input_kind="logits").merge(*reversed(parts))
    assert merged.count == n
    assert merged.compute() == one.compute()


# ------------------------------------------------------------------ NaN and errors


def test_nan_propagates() -> None:
    z = np.array([[np.nan, 0.0], [1.0, 0.0]])
    y = np.array([0, 1])
    r = ClassificationMetrics(input_kind="logits").update(z, y).compute()
    for key in ("log_loss_nats", "perplexity", "accuracy", "brier", "ece", "classwise_ece"):
        assert math.isnan(r[key]), key


@pytest.mark.parametrize("kind", ["probs", "log_probs", "logits"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_nan_in_another_column_makes_the_log_loss_nan(
    xp: Any, kind: str, order: Literal["C", "F"]
) -> None:
    """A NaN anywhere in a row propagates to its −log p, whatever the input kind: the log
    loss of probabilities used to read the label's column only and stay finite (0.5249
    here) while the accuracy, the Brier score and the logits' log loss were NaN."""
    convert = to_xp(xp)
    p = np.array([[np.nan, 0.5], [0.3, 0.7]], order=order)
    x = {"probs": p, "log_probs": np.log(p), "logits": np.log(p)}[kind]
    y = np.array([1, 1])
    r = ClassificationMetrics(input_kind=kind).update(convert(x), convert(y)).compute()
    for key in ("log_loss_nats", "log_loss_bits", "perplexity", "accuracy", "brier"):
        assert math.isnan(r[key]), key
    assert r["clamped_rows"] == 0
    per_class = PerClassCrossEntropy(input_kind=kind).update(convert(x), convert(y)).compute()
    assert math.isnan(per_class["cross_entropy"][1])
    assert math.isnan(CrossEntropy(input_kind=kind).update(convert(x), convert(y)).compute())


@pytest.mark.parametrize("row", [[math.inf, 0.0], [math.inf, math.inf], [-math.inf, -math.inf]])
def test_infinite_logits_give_nan_rows_not_a_traceback(xp: Any, row: list[float]) -> None:
    """inf - inf in the softmax made NaN confidences that crashed the calibration bins."""
    convert = to_xp(xp)
    z = convert(np.array([row, [1.0, 0.0]]))
    r = ClassificationMetrics(input_kind="logits").update(z, convert(np.array([0, 1]))).compute()
    for key in ("log_loss_nats", "accuracy", "brier", "ece", "ece_equal_mass", "classwise_ece"):
        assert math.isnan(r[key]), key
    assert r["rows"] == 2


def test_input_kind_must_be_stated() -> None:
    with pytest.raises(TypeError):
        CrossEntropy()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="input_kind"):
        CrossEntropy(input_kind="probabilities")


def test_rows_that_are_not_distributions_are_named() -> None:
    p = np.array([[0.5, 0.5], [0.7, 0.7], [0.2, 0.8]])
    with pytest.raises(BadRowError, match=r"row 1 .*sums to 1\.4") as info:
        CrossEntropy(input_kind="probs").update(p, np.array([0, 1, 0]))
    assert info.value.row == 1
    with pytest.raises(ValueError, match=r"row 0 .*outside \[0, 1\].*logits"):
        CrossEntropy(input_kind="probs").update(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="row 0"):
        CrossEntropy(input_kind="log_probs").update(np.array([[0.0, 0.0]]), np.array([0]))
    with ce.validation(False):  # value checks can be switched off
        CrossEntropy(input_kind="probs").update(p, np.array([0, 1, 0]))


def test_labels_out_of_range_name_the_row() -> None:
    with pytest.raises(ValueError, match=r"`target` row 2 has label 3, outside \[0, 3\)"):
        Accuracy(input_kind="logits").update(np.zeros((3, 3)), np.array([0, 1, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        Accuracy(input_kind="logits").update(np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        Accuracy(input_kind="logits").update(np.zeros((3, 3)), np.zeros(4, dtype=int))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("ignore_index", [-100, None])
def test_uint64_labels_beyond_int64_are_refused(library: str, ignore_index: int | None) -> None:
    """uint64 labels of 2**63 and more wrapped to negative int64 values: 2**64 - 100 became an
    ignore_index of -100 and its row was dropped silently (NumPy; PyTorch raised
    NotImplementedError '"index_select" not implemented for UInt64'). Now a bad row; valid
    uint64 labels (PyTorch's too) score as int64 ones."""
    p = np.full((3, 4), 0.25)
    labels = [1, 2, 2**64 - 100]
    if library == "torch":
        torch = pytest.importorskip("torch")
        p, y, ok = (
            torch.tensor(p),
            torch.tensor(labels, dtype=torch.uint64),
            torch.tensor([1, 2, 3], dtype=torch.uint64),
        )
    else:
        y, ok = np.array(labels, dtype=np.uint64), np.array([1, 2, 3], dtype=np.uint64)
    metric = CrossEntropy(input_kind="probs", ignore_index=ignore_index)
    # named by its value (it was int64's largest, 9223372036854775807)
    with pytest.raises(ValueError, match=rf"`target` row 2 has label {2**64 - 100}, outside"):
        metric.update(p, y)
    got = CrossEntropy(input_kind="probs", ignore_index=ignore_index).update(p, ok).compute()
    assert got == pytest.approx(math.log(4), rel=1e-15)


def test_bad_settings_and_mismatched_merges() -> None:
    with pytest.raises(ValueError, match="binning"):
        CalibrationError(input_kind="probs", binning="quantile")
    with pytest.raises(ValueError, match="bins"):
        CalibrationError(input_kind="probs", bins=0)
    with pytest.raises(ValueError, match="base"):
        CrossEntropy(input_kind="probs", base=1)
    with pytest.raises(ValueError, match="two classes"):
        CalibrationError(input_kind="probs", kind="positive").update(
            np.full((2, 3), 1 / 3), np.array([0, 1])
        )
    a = CrossEntropy(input_kind="probs", base=2)
    with pytest.raises(ValueError, match="same settings"):
        a.merge(CrossEntropy(input_kind="probs"))
    with pytest.raises(ValueError, match="same settings"):
        a.merge(Accuracy(input_kind="probs"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`others` must be CrossEntropy metrics"):
        a.merge(3)  # type: ignore[arg-type]
    a.update(np.full((1, 2), 0.5), np.array([0]))
    with pytest.raises(ValueError, match="classes"):
        a.update(np.full((1, 3), 1 / 3), np.array([0]))
    with pytest.raises(ValueError, match="`others`: cannot merge metrics over 2 and 3 classes"):
        a.merge(
            CrossEntropy(input_kind="probs", base=2).update(np.full((1, 3), 1 / 3), np.array([0]))
        )


@pytest.mark.parametrize("metric", [CrossEntropy, Accuracy, BinaryClassificationMetrics])
def test_none_numbers_and_lists_are_type_errors_naming_the_argument(metric: Any) -> None:
    """update(None, y) and update(x, None) leaked AttributeError ('... has no attribute
    \'ndim\''); the binary metric named "the arguments" and "Python scalars" for None."""
    x, y = np.full((2, 2), 0.5), np.array([0, 1])
    if metric is BinaryClassificationMetrics:
        x = np.array([0.5, 0.5])
    for bad_x, bad_y, name in ((None, y, "input"), (x, None, "target"), (0.5, y, "input")):
        with pytest.raises(TypeError, match=f"`{name}` must be an array"):
            metric(input_kind="probs").update(bad_x, bad_y)


def test_jax_tracers_are_refused() -> None:
    jax = pytest.importorskip("jax")
    metric = CrossEntropy(input_kind="logits")

    def step(z: Any) -> Any:
        metric.update(z, jax.numpy.zeros(2, dtype=jax.numpy.int32))
        return z

    with pytest.raises(TypeError, match="jit"):
        jax.jit(step)(jax.numpy.zeros((2, 3)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_logits_give_accurate_log_probabilities(xp: Any, dtype: str) -> None:
    # z - lse(z) rounds lse at the logits' magnitude: float32 [1e4, 1e4] gave 0.693359
    scale = 1e4 if dtype == "float32" else 1e15
    z = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, -2.0]]) * scale + scale
    z[1] = [scale, scale - 1.0]
    z[2] = [-scale, -scale + 2.0]
    y = np.array([0, 1, 0])
    convert = to_xp(xp)
    x = convert(z.astype(dtype))
    r = ClassificationMetrics(input_kind="logits").update(x, convert(y)).compute()
    want = ref.log_loss(np.asarray(z.astype(dtype), dtype=np.float64), y, "logits")
    assert r["log_loss"] == pytest.approx(want, rel=1e-6)
    assert r["brier"] == pytest.approx(ref.brier(z.astype(dtype).astype(np.float64), y, "logits"))
    ce1 = CrossEntropy(input_kind="logits").update(x, convert(y)).compute()
    assert ce1 == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "classes", "scale"),
    [("bfloat16", 32768, 6.0), ("float16", 32768, 6.0), ("float32", 262144, 8.0)],
)
def test_a_real_low_precision_softmax_of_many_classes_is_a_distribution(
    dtype: str, classes: int, scale: float
) -> None:
    # the sum tolerance is the losses' rule (row_sum_tolerance) with a 1e-3 floor
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, classes, generator=g) * scale
    p = torch.softmax(z.to(getattr(torch, dtype)), dim=-1)
    deviation = float((p.double().sum(-1) - 1).abs().max())
    if dtype == "bfloat16":
        assert deviation > 1e-3  # what a fixed 1e-3 rejected
    y = torch.tensor([0, 1, 2, 3])
    got = CrossEntropy(input_kind="probs").update(p, y).compute()
    assert got == pytest.approx(ref.log_loss(p.double().numpy(), y.numpy(), "probs"), rel=1e-6)
    log_p = torch.log(p.float()).to(p.dtype)
    CrossEntropy(input_kind="log_probs").update(log_p, y).compute()
    bad = p.clone()
    bad[2, 0] += 0.05  # beyond any rounding: still a bad row
    with pytest.raises(BadRowError, match=r"row 2 .*tolerance"):
        CrossEntropy(input_kind="probs").update(bad, y)


@pytest.mark.parametrize(
    ("dtype", "classes"),
    [("bfloat16", 100), ("bfloat16", 1000), ("bfloat16", 32000), ("float16", 1000)],
)
def test_a_low_precision_log_softmax_is_a_distribution(dtype: str, classes: int) -> None:
    # a log-probability rounded to a low precision is off by up to u·|log p| (u the unit
    # roundoff), not u: torch.log_softmax of bfloat16 logits summed to 1 ± 0.01-0.018 here,
    # beyond the probabilities' tolerance (0.0078 for 1000 classes), and was a BadRowError
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, classes, generator=g).to(getattr(torch, dtype))
    log_p = torch.log_softmax(z, dim=-1)
    deviation = float((log_p.double().exp().sum(-1) - 1).abs().max())
    assert deviation > F._sum_tolerance(log_p.dtype, classes, xp=ce._lib._xp.array_namespace(z))
    y = torch.arange(64) % classes
    got = CrossEntropy(input_kind="log_probs").update(log_p, y).compute()
    assert got == pytest.approx(ref.log_loss(log_p.double().numpy(), y.numpy(), "log_probs"))
    # the uniform distribution over 700 classes: -log 700 = -6.551 is -6.5625 in bfloat16,
    # every probability 1.2 % too small, all in the same direction
    uniform = torch.full((1, 700), -math.log(700)).to(torch.bfloat16)
    CrossEntropy(input_kind="log_probs").update(uniform, torch.tensor([3])).compute()
    # beyond any rounding: still a bad row (probabilities 1.65 times too large)
    bad = log_p.clone()
    bad[5] += 0.5
    with pytest.raises(BadRowError, match=r"row 5 .*exp\(values\) summing to .*tolerance"):
        CrossEntropy(input_kind="log_probs").update(bad, y)


def test_a_low_precision_log_probability_of_minus_inf_is_checked_without_a_warning() -> None:
    # a class ruled out (log p = -inf) in float16 log-probabilities: the rounding slack formed
    # 0 · inf, dropped afterwards, but NumPy warned "invalid value encountered in multiply",
    # an error where warnings are (this suite; found by a random metrics hunt)
    log_p = np.array([[0.0, -np.inf], [math.log(0.25), math.log(0.75)]], dtype=np.float16)
    y = np.array([0, 1])
    got = CrossEntropy(input_kind="log_probs").update(log_p, y).compute()
    assert got == pytest.approx(-float(log_p[1, 1]) / 2)
    assert ClassificationMetrics(input_kind="log_probs").update(log_p, y).compute()["brier"] > 0


@pytest.mark.parametrize("classes", [3, F.COLUMN_CLASSES + 6])
@pytest.mark.parametrize("bad", [-1.0, 5.0, np.inf])
def test_a_probability_outside_0_1_beside_a_nan_is_a_bad_row_on_every_backend(
    xp: Any, classes: int, bad: float
) -> None:
    # NumPy's checks read the row's max and min, which a NaN makes NaN: the row passed
    # (its figures NaN) where PyTorch, JAX and array-api-strict raise
    p = np.full((3, classes), 1.0 / classes)
    p[1, 0], p[1, 1] = np.nan, bad
    with pytest.raises(BadRowError, match=r"row 1 .* has a value .* outside \[0, 1\]") as info:
        CrossEntropy(input_kind="probs").update(to_xp(xp)(p), to_xp(xp)(np.array([0, 2, 1])))
    assert info.value.row == 1
    p[1, 1] = 0.5  # NaN alone passes and propagates
    got = CrossEntropy(input_kind="probs").update(to_xp(xp)(p), to_xp(xp)(np.array([0, 2, 1])))
    assert math.isnan(got.compute())


@pytest.mark.parametrize("classes", [2, 7, F.COLUMN_CLASSES + 1])
def test_numpy_probability_rows_in_either_layout(classes: int) -> None:
    # up to COLUMN_CLASSES classes the rows are reduced column by column: the same argmax
    # (ties to the first class, NaN rows to their first NaN), and bit-identical statistics
    # whatever the memory layout of the input
    rng = np.random.default_rng(classes)
    p = rng.dirichlet(np.ones(classes), size=300)
    p[:40] = 0.0
    p[:40, :2] = 0.5  # ties
    p[40:60] = np.roll(p[40:60], 1, axis=1)
    y = rng.integers(0, classes, 300)
    y[:20] = 1
    rows = {}
    for order in "CF":
        x = np.asarray(p, order=order)
        rows[order] = F._numpy_prob_rows(x, y, tol=1e-3, need_probs=True)
        got = rows[order]
        np.testing.assert_array_equal(got["pred"], p.argmax(axis=1))
        np.testing.assert_array_equal(got["conf"], p.max(axis=1))
        hot = np.eye(classes)[y]
        np.testing.assert_allclose(got["brier"], ((p - hot) ** 2).sum(axis=1), rtol=1e-15)
        with np.errstate(divide="ignore"):  # a label of probability 0: clamped at 100 nats
            nll = np.minimum(-np.log(p[np.arange(300), y]), -F.LOG_P_FLOOR)
        np.testing.assert_array_equal(got["nll"], nll)
        np.testing.assert_array_equal(got["clamped"], nll == -F.LOG_P_FLOOR)
        np.testing.assert_array_equal(got["probs"], p)
    for key in rows["C"]:
        np.testing.assert_array_equal(rows["C"][key], rows["F"][key], err_msg=key)
    c = ClassificationMetrics(input_kind="probs").update(p, y).compute()
    f = ClassificationMetrics(input_kind="probs").update(np.asfortranarray(p), y).compute()
    assert repr(c) == repr(f)  # every figure, bit for bit (NaN precision of unpredicted classes)
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    generic = ClassificationMetrics(input_kind="log_probs").update(log_p, y).compute()
    for key in ("accuracy", "brier", "ece", "classwise_ece"):  # (log_probs are not clamped)
        assert c[key] == pytest.approx(generic[key], rel=1e-12, abs=1e-15), key
    q = p.copy()
    q[5, 3 % classes] = np.nan
    q[6, 0] = np.nan
    with ce.validation(False):
        nan_rows = F._numpy_prob_rows(q, y, tol=1e-3, need_probs=False)
    np.testing.assert_array_equal(nan_rows["pred"], q.argmax(axis=1))
    np.testing.assert_array_equal(np.flatnonzero(nan_rows["nan"]), [5, 6])


@pytest.mark.parametrize("classes", [1, 2, 3, F.COLUMN_CLASSES, 256, 300])
def test_column_argmax_is_numpys_argmax(classes: int) -> None:
    # the first column holding the row max, counted column by column (ties at any two
    # columns, the max in the last column, -0.0 next to 0.0, NaN rows: their first NaN;
    # 300 columns: the counter widens past a byte)
    rng = np.random.default_rng(classes)
    x = rng.integers(0, 3, size=(500, classes)).astype(np.float64)
    x[:5] = 0.0
    x[5, -1] = 7.0
    x[6, 0], x[6, -1] = -0.0, 0.0
    x[7, -1] = np.nan
    x[8, 0] = np.nan
    x = np.asfortranarray(x)
    nan = np.isnan(x).any(axis=1)
    with np.errstate(invalid="ignore"):
        got = F._column_argmax(x, x.max(axis=1), nan)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, x.argmax(axis=1))


@pytest.mark.parametrize("order", ["C", "F"])
def test_width_bin_in_work_arrays_is_the_floor_rule(order: Literal["C", "F"]) -> None:
    # floor(conf * B) up to B - 1, in the layout asked for, the same in a kept work array
    # (twice: the second call reuses it) as in new arrays; out-of-range values (only with
    # value checks off) in the end bins
    rng = np.random.default_rng(3)
    conf = rng.random((50, 7))
    conf[0, :3] = [1.0, -0.25, 1.5]
    want = np.minimum(np.floor(np.clip(conf, 0, None) * 15), 14).astype(np.int64)
    for work in (None, "test", "test"):
        got = F._width_bin(conf, 15, order=order, work=work)
        assert got.dtype == np.int64
        assert got.flags.f_contiguous if order == "F" else got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_fine_bin_in_place_is_the_log_odds_rule() -> None:
    # the in-place steps give the bins of the formula written out, bit for bit: at 0 and 1,
    # past the log-odds range, beyond [0, 1] (value checks off), and on a log-odds grid
    r = F.FINE_LOGIT_RANGE
    rng = np.random.default_rng(5)
    conf = np.concatenate(
        [
            rng.random(20_000),
            rng.random(2_000) ** 30,
            1 - rng.random(2_000) ** 30,
            [0.0, 1.0, 5e-324, 0.5, np.nextafter(1.0, 0.0), -0.1, 1.2],
            1 / (1 + np.exp(-np.linspace(-20, 20, 20_001))),
        ]
    )
    c = np.clip(conf, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(c) - np.log1p(-c)
    t = (np.clip(logit, -r, r) + r) / (2 * r)
    want = np.minimum(np.floor(t * F.FINE_BINS).astype(np.int64), F.FINE_BINS - 1)
    got = F._fine_bin(conf[:, None])
    assert got.shape == (conf.size, 1)
    np.testing.assert_array_equal(got[:, 0], want)
    assert got.min() == 0
    assert got.max() == F.FINE_BINS - 1


def test_a_negative_probability_is_found_past_a_nan_row() -> None:
    # a row whose only fault is a value below 0 (its max and sum are fine), after a NaN row
    # (which propagates): the whole-batch minimum skips NaN, then the row is named
    p = np.asfortranarray([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5], [0.6, 0.5, -0.1]])
    with pytest.raises(BadRowError, match=r"row 2 .*-0\.1 outside \[0, 1\]") as info:
        ClassificationMetrics(input_kind="probs").update(p, np.array([0, 1, 2]))
    assert info.value.row == 2
    ok = ClassificationMetrics(input_kind="probs").update(p[:2], np.array([0, 1])).compute()
    assert math.isnan(ok["log_loss_nats"])


@pytest.mark.parametrize("classes", [3, 8, F.COLUMN_CLASSES, F.COLUMN_CLASSES + 1])
@pytest.mark.parametrize("kind", ["logits", "log_probs"])
def test_row_statistics_depend_on_the_row_alone(kind: str, classes: int) -> None:
    # a contiguous row was summed pairwise and a column-major batch column by column: one
    # row, a C-ordered, an F-ordered batch and a view gave log-sum-exps an ulp apart
    d = _data(n=40, c=classes, seed=classes, scale=3.0)
    x, y = d[kind], d["y"]

    def stats(a: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        out = F._row_stats(
            a, t, input_kind=kind, axis=-1, ignore_index=None, need_probs=True, xp=np
        )
        out.pop("num_classes")
        out.pop("probs_bounded")
        return out

    one = [stats(x[i : i + 1], y[i : i + 1]) for i in range(40)]
    rows = {key: np.concatenate([r[key] for r in one]) for key in one[0]}
    wide = np.zeros((40, 2 * classes))
    wide[:, ::2] = x
    layouts = {
        "C": (np.ascontiguousarray(x), y),
        "F": (np.asfortranarray(x), y),
        "strided": (wide[:, ::2], y),
        "reversed": (x[::-1], y[::-1]),
        "float32 rows": (x.astype(np.float32), y),
    }
    for name, (a, t) in layouts.items():
        got = stats(a, t)
        if name == "reversed":
            got = {key: value[::-1] for key, value in got.items()}
        if name == "float32 rows":  # the same rule in float32: rows alone still decide
            single = [stats(a[i : i + 1], t[i : i + 1]) for i in range(40)]
            want = {key: np.concatenate([r[key] for r in single]) for key in single[0]}
        else:
            want = rows
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
    lse = np.log(np.sum(np.exp(d["logits"]), axis=1))
    nll = lse - d["logits"][np.arange(40), y]
    np.testing.assert_allclose(rows["nll"], nll, rtol=1e-13)
    hot = np.eye(classes)[y]
    np.testing.assert_allclose(rows["brier"], ((d["probs"] - hot) ** 2).sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_row_statistics_depend_on_the_row_alone(kind: str) -> None:
    torch = pytest.importorskip("torch")
    d = _data(n=30, c=16, seed=4, scale=3.0)
    x = torch.tensor(d[kind])
    y = torch.tensor(d["y"])
    one = ClassificationMetrics(input_kind=kind)
    for i in range(30):
        one.update(x[i : i + 1], y[i : i + 1])
    transposed = x.T.contiguous().T  # column-major: torch reduced its rows another way
    got = ClassificationMetrics(input_kind=kind).update(transposed, y)
    for part, state in one.state.items():
        for key, value in state.items():
            other = got.state[part][key]
            if isinstance(value, ExactSum):
                np.testing.assert_array_equal(other.value(), value.value(), err_msg=key)


@pytest.mark.parametrize("shape", [(0, 0), (2, 0)])
def test_an_input_without_classes_is_named(shape: tuple[int, int]) -> None:
    # (0, 0) failed inside NumPy: "zero-size array to reduction operation maximum"
    for kind in KINDS:
        with pytest.raises(ValueError, match=r"`input` has no classes along axis 1"):
            ClassificationMetrics(input_kind=kind).update(
                np.zeros(shape), np.zeros(shape[0], dtype=int)
            )


def test_a_nan_row_makes_its_recall_and_every_precision_nan() -> None:
    # the NaN row counted as a miss: class 0's recall was 0.0 and the precisions numbers,
    # while the accuracy was NaN
    z = np.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    y = np.array([0, 1, 1, 2])
    got = PerClassCrossEntropy(input_kind="logits").update(z, y).compute()
    assert np.isnan(got["recall"][0])
    np.testing.assert_array_equal(got["recall"][1:], [0.5, 1.0])
    assert np.isnan(got["precision"]).all()
    np.testing.assert_array_equal(got["count"], [1, 2, 1])
    clean = PerClassCrossEntropy(input_kind="logits").update(z[1:], y[1:]).compute()
    np.testing.assert_array_equal(clean["precision"], [0.0, 1.0, 1.0])
    merged = PerClassCrossEntropy(input_kind="logits").update(z[1:], y[1:])
    merged.merge(PerClassCrossEntropy(input_kind="logits").update(z[:1], y[:1]))
    assert repr(merged.compute()) == repr(got)


def test_a_value_just_outside_0_1_is_shown_as_it_is() -> None:
    # 6 digits showed 1.0000000001 as "a value 1 outside [0, 1]"
    from crossent.metrics import BinaryClassificationMetrics

    with pytest.raises(BadRowError, match=r"a value 1\.0000000001 outside \[0, 1\]"):
        CrossEntropy(input_kind="probs").update(np.array([[1.0000000001, 0.0]]), np.array([0]))
    with pytest.raises(BadRowError, match=r"a value -1e-12 outside \[0, 1\]"):
        CrossEntropy(input_kind="probs").update(np.array([[-1e-12, 1.0]]), np.array([0]))
    with pytest.raises(BadRowError, match=r"P\(label = 1\) = -1e-300, outside \[0, 1\]"):
        BinaryClassificationMetrics(input_kind="probs").update(np.array([-1e-300]), np.array([0]))
    with pytest.raises(BadRowError, match=r"P\(label = 1\) = 1\.0000000001, outside"):
        BinaryClassificationMetrics(input_kind="probs").update(
            np.array([1.0000000001]), np.array([0])
        )


def test_two_threads_updating_two_metrics_get_the_serial_bits() -> None:
    # work arrays are kept per thread: a thread never sees another's bins or lanes
    import sys
    import threading

    def batches(c: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        d = _data(n=600, c=c, seed=seed, scale=3.0)
        p = np.asfortranarray(d["probs"])
        return [(p[a : a + 37], d["y"][a : a + 37]) for a in range(0, 600, 37)]

    jobs = [
        (lambda: ClassificationMetrics(input_kind="probs"), batches(5, 1)),
        (lambda: CalibrationError(input_kind="probs", kind="classwise"), batches(5, 2)),
        (lambda: ClassificationMetrics(input_kind="probs", bins=7), batches(150, 3)),
    ]

    def feed(metric: Any, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for x, y in data:
            metric.update(x, y)

    serial = []
    for make, data in jobs:
        metric = make()
        feed(metric, data)
        serial.append(repr(metric.compute()))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        metrics = [make() for make, _ in jobs]
        threads = [
            threading.Thread(target=feed, args=(m, data))
            for m, (_, data) in zip(metrics, jobs, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert [repr(m.compute()) for m in metrics] == serial


@pytest.mark.parametrize("classes", [1, 2, 7, F.COLUMN_CLASSES, F.COLUMN_CLASSES + 1, 150])
@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_logit_rows_are_the_general_paths_bits(
    classes: int, order: Literal["C", "F"], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fast NumPy logits path against the general array-API path, key by key, bit for
    # bit: ties at the maximum, -inf classes, huge and tiny logits, a row of one class
    rng = np.random.default_rng(classes)
    z = rng.normal(scale=4.0, size=(200, classes))
    z[:20] = 1.5  # every class at the maximum
    z[20:40, : min(2, classes)] = 9.0  # ties at the maximum
    z[40:60, 1:] = -np.inf  # masked classes (a row of one finite logit)
    z[60:80] *= 300.0  # far apart: exp underflows to 0
    z[80:100] += 1e6  # large logits, small differences
    y = rng.integers(0, classes, 200)
    y[40:60] = 0
    x = np.asarray(z, order=order)

    def stats() -> dict[str, np.ndarray]:
        out = F._row_stats(
            x, y, input_kind="logits", axis=-1, ignore_index=None, need_probs=True, xp=np
        )
        return {key: np.asarray(value) for key, value in out.items()}

    calls: list[int] = []
    fast = F._numpy_logit_rows

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fast(*args, **kwargs)

    monkeypatch.setattr(F, "_numpy_logit_rows", counted)
    got = stats()
    assert calls  # the fast path ran
    monkeypatch.setattr(F, "_numpy_logit_rows", lambda *args, **kwargs: None)
    want = stats()
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype == want[key].dtype, key
    # and against float64 references of the formulas
    s = z - z.max(axis=1, keepdims=True)  # shifted first: no rounding at the scale of 1e6
    nll = np.log(np.sum(np.exp(s), axis=1)) - s[np.arange(200), y]
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got["pred"], z.argmax(axis=1))


def test_numpy_logit_rows_leave_non_finite_rows_to_the_general_path() -> None:
    # a NaN, a +inf or an all -inf row: the general path decides (NaN row, NaN terms)
    y = np.array([0, 1, 0])
    for bad in (np.nan, np.inf):
        z = np.array([[0.0, 1.0], [bad, 0.0], [2.0, -1.0]])
        assert F._numpy_logit_rows(np.asfortranarray(z), y, need_probs=True) is None
        rows = F._row_stats(
            z, y, input_kind="logits", axis=-1, ignore_index=None, need_probs=False, xp=np
        )
        np.testing.assert_array_equal(rows["nan"], [False, True, False])
    z = np.array([[0.0, 1.0], [-np.inf, -np.inf]])
    assert F._numpy_logit_rows(np.asfortranarray(z), y[:2], need_probs=True) is None


def test_reliability_counts_the_nan_rows_it_leaves_out() -> None:
    # a NaN row is in no bin: the diagram says how many, the calibration error is NaN
    d = _data(n=50, c=3, seed=4, scale=2.0)
    probs = d["probs"].copy()
    probs[[3, 17]] = np.nan
    with ce.validation(False):
        for metric in (
            CalibrationError(input_kind="probs", bins=5),
            ClassificationMetrics(input_kind="probs", bins=5),
        ):
            diagram = metric.update(probs, d["y"]).reliability()
            assert int(diagram["nan"]) == 2
            assert int(diagram["count"].sum()) == 48
            figures = metric.compute()
            ece = figures if isinstance(figures, float) else figures["ece"]
            assert math.isnan(ece)
    clean = CalibrationError(input_kind="probs", bins=5).update(d["probs"], d["y"])
    assert int(clean.reliability()["nan"]) == 0
