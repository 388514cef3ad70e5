"""Binary predictions: one P(label = 1) column, against scikit-learn and float64 references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from crossent.metrics import BadRowError, BinaryClassificationMetrics, ClassificationMetrics
from tests._evaldata import error, run_json, write

sklearn_metrics = pytest.importorskip("sklearn.metrics")
pytest.importorskip("pyarrow")


def _data(n: int = 400, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    y = (rng.uniform(size=n) < p**1.5).astype(np.int64)  # a miscalibrated model
    return p, y


def _ece_reference(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Σ_b (n_b/N)|mean y_b − mean p_b| over equal-width bins of p, by a loop."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [
            (pi, yi)
            for pi, yi in zip(p, y, strict=True)
            if lo <= pi < hi or (b == bins - 1 and pi == 1.0)
        ]
        if members:
            mean_p = math.fsum(m[0] for m in members) / len(members)
            mean_y = math.fsum(m[1] for m in members) / len(members)
            total += len(members) / len(p) * abs(mean_y - mean_p)
    return total


def test_binary_metrics_match_scikit_learn() -> None:
    p, y = _data()
    r = BinaryClassificationMetrics(input_kind="probs", bins=10).update(p, y).compute()
    assert r["log_loss_nats"] == pytest.approx(sklearn_metrics.log_loss(y, p), rel=1e-13)
    assert r["brier"] == pytest.approx(sklearn_metrics.brier_score_loss(y, p), rel=1e-13)
    assert r["accuracy"] == sklearn_metrics.accuracy_score(y, (p > 0.5).astype(int))
    assert r["ece"] == pytest.approx(_ece_reference(p, y, 10), rel=1e-12)
    assert r["positive_rate"] == pytest.approx(y.mean())
    assert r["mean_prediction"] == pytest.approx(p.mean())
    assert r["log_loss_bits"] == pytest.approx(r["log_loss_nats"] / math.log(2))


def test_scores_on_bin_edges_are_in_the_bin_above_unlike_scikit_learn() -> None:
    # docs/differences.md: bins [k/B, (k+1)/B); scikit-learn's calibration_curve closes
    # them on the right, so 0.5 and 0.55 share a bin here and not there (ECE 0.025 / 0.475)
    calibration = pytest.importorskip("sklearn.calibration")
    p, y = np.array([0.5, 0.55, 0.5, 0.55]), np.array([0, 1, 0, 1])
    m = BinaryClassificationMetrics(input_kind="probs", bins=10).update(p, y)
    assert m.reliability()["count"].tolist() == [0, 0, 0, 0, 0, 4, 0, 0, 0, 0]
    assert m.compute()["ece"] == pytest.approx(abs(2 - 2.1) / 4, rel=1e-12)
    assert m.compute()["ece"] == pytest.approx(_ece_reference(p, y, 10), rel=1e-12)
    accuracy, confidence = calibration.calibration_curve(y, p, n_bins=10)
    assert accuracy.tolist() == [0.0, 1.0]  # two bins: (0.4, 0.5] and (0.5, 0.6]
    assert confidence.tolist() == pytest.approx([0.5, 0.55])
    edges = BinaryClassificationMetrics(input_kind="probs", bins=10)
    edges.update(np.arange(11) / 10, np.ones(11, dtype=np.int64))
    assert edges.reliability()["count"].tolist() == [1] * 9 + [2]  # 0.9 and 1.0 in the last


def test_logits_and_log_probs_give_the_same_figures() -> None:
    p, y = _data()
    ref = BinaryClassificationMetrics(input_kind="probs").update(p, y).compute()
    logits = np.log(p) - np.log1p(-p)
    for kind, scores in (("logits", logits), ("log_probs", np.log(p))):
        r = BinaryClassificationMetrics(input_kind=kind).update(scores, y).compute()
        for key in ("log_loss_nats", "brier", "ece", "accuracy"):
            assert r[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), (kind, key)


def test_a_tiny_positive_logit_predicts_class_1_as_the_two_class_metrics_do() -> None:
    # σ(z) rounds to 0.5 for |z| below about 1e-16: "p > 0.5" predicted class 0 for a positive
    # logit, and the binary accuracy (1/3) disagreed with the two-class one of logits [0, z] (1)
    z, y = np.array([1e-17, -1e-17, 3e-300, 0.0]), np.array([1, 0, 1, 0])
    binary = BinaryClassificationMetrics(input_kind="logits").update(z, y).compute()
    two = ClassificationMetrics(input_kind="logits").update(np.stack([0 * z, z], 1), y).compute()
    assert binary["accuracy"] == two["accuracy"] == 1.0
    assert [c["recall"] for c in binary["per_class"]] == [1.0, 1.0]


def test_extreme_logits_are_exact_and_zero_probabilities_are_clamped() -> None:
    # −log σ(z) for z = −800: 800 nats, no overflow; log σ(40) ≈ −4.2e-18 kept exactly
    r = (
        BinaryClassificationMetrics(input_kind="logits")
        .update(np.array([-800.0, 40.0]), np.array([1, 1]))
        .compute()
    )
    assert r["log_loss_nats"] == pytest.approx((800.0 + math.exp(-40.0)) / 2, rel=1e-15)
    r = (
        BinaryClassificationMetrics(input_kind="probs")
        .update(np.array([0.0, 1.0]), np.array([1, 1]))
        .compute()
    )
    assert r["log_loss_nats"] == 50.0  # PyTorch's rule: log 0 is clamped at −100
    assert r["clamped_rows"] == 1


def test_merging_halves_equals_one_pass() -> None:
    p, y = _data()
    whole = BinaryClassificationMetrics(input_kind="probs").update(p, y)
    a = BinaryClassificationMetrics(input_kind="probs").update(p[:150], y[:150])
    b = BinaryClassificationMetrics(input_kind="probs").update(p[150:], y[150:])
    merged = a.merge(b).compute()
    for key, value in whole.compute().items():
        if key != "per_class":
            assert merged[key] == pytest.approx(value, rel=1e-14), key


def test_bad_binary_input_names_the_row() -> None:
    m = BinaryClassificationMetrics(input_kind="probs")
    with pytest.raises(BadRowError, match=r"`target` row 1 has label 2, not 0 or 1"):
        m.update(np.array([0.5, 0.5]), np.array([0, 2]))
    with pytest.raises(
        BadRowError, match=r"`input` row 0 has P\(label = 1\) = 1.5, outside \[0, 1\]"
    ):
        m.update(np.array([1.5, 0.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one P"):
        m.update(np.array([0.5, 0.5]), np.array([0]))
    ignored = BinaryClassificationMetrics(input_kind="probs", ignore_index=-1)
    assert ignored.update(np.array([0.8, 7.0]), np.array([1, -1])).count == 1


def test_cli_binary_file_matches_scikit_learn(tmp_path: Path) -> None:
    p, y = _data(200)
    words = ["false", "true"]
    text = "label,score,id\n" + "".join(
        f"{words[t] if i % 2 else t},{v:.17g},{i}\n"
        for i, (v, t) in enumerate(zip(p, y, strict=True))
    )
    out = run_json("eval", str(write(tmp_path / "b.csv", text)), "--exclude", "id")
    assert out["binary"] is True
    assert out["score_column"] == "score"
    assert out["classes"] == ["0", "1"]
    assert out["log_loss_nats"] == pytest.approx(sklearn_metrics.log_loss(y, p), rel=1e-13)
    assert out["brier"] == pytest.approx(sklearn_metrics.brier_score_loss(y, p), rel=1e-13)
    assert out["ece"] == pytest.approx(_ece_reference(p, y, 15), rel=1e-12)
    # the same through --columns, and with boolean / integer label columns in Parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    for labels in (pa.array(y.astype(bool)), pa.array(y)):
        pq.write_table(pa.table({"label": labels, "s": p, "t": p}), tmp_path / "b.parquet")
        same = run_json("eval", str(tmp_path / "b.parquet"), "--columns", "s")
        assert same["log_loss_nats"] == pytest.approx(out["log_loss_nats"], rel=1e-14)


def test_cli_binary_bad_labels_and_scores_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "b.csv", "label,p\n1,0.9\nmaybe,0.2\n")
    assert "row 2 (line 3) has label 'maybe', not 0/1 or true/false" in error(
        capsys, "eval", str(path)
    )
    path = write(tmp_path / "c.csv", "label,p\n1,0.9\n0,1.2\n")
    err = error(capsys, "eval", str(path))
    assert "row 2 (line 3) has P(label = 1) = 1.2, outside [0, 1]" in err
    assert "--input logits" in err
    path = write(tmp_path / "d.csv", "label,p\n1,0.9\n0,\n")
    assert "row 2 (line 3) has no value in column 'p'" in error(capsys, "eval", str(path))


def test_cli_binary_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    p, y = _data(100)
    text = "label,p\n" + "".join(f"{t},{v}\n" for v, t in zip(p, y, strict=True))
    out = run_json("eval", str(write(tmp_path / "b.csv", text)), "--report", str(tmp_path / "r"))
    page = Path(out["report"]).read_text()
    assert "positive rate" in page
    assert "mean P(label = 1)" in page
    # the figures bin P(label = 1): their captions said "top-label confidence"
    assert "top-label" not in page
    assert "Histogram of P(label = 1)" in page


def test_binary_labels_that_are_not_0_or_1_are_refused_not_truncated() -> None:
    # an int64 copy of the labels made 0.5 a 0 and 1.2 a 1: two rows scored, exit 0
    m = BinaryClassificationMetrics(input_kind="probs")
    for labels, shown in (([0.0, 0.5], "0.5"), ([1.2, 1.0], "1.2"), ([0.0, np.nan], "nan")):
        row = 1 if shown != "1.2" else 0
        with pytest.raises(BadRowError, match=rf"`target` row {row} has label {shown}, not 0 or 1"):
            m.update(np.array([0.2, 0.3]), np.array(labels))
    assert m.count == 0
    floats = m.update(np.array([0.2, 0.9]), np.array([0.0, 1.0])).compute()
    ints = BinaryClassificationMetrics(input_kind="probs").update(
        np.array([0.2, 0.9]), np.array([False, True])
    )
    assert floats["log_loss_nats"] == ints.compute()["log_loss_nats"]
    assert floats["log_loss_nats"] == pytest.approx(-(np.log(0.8) + np.log(0.9)) / 2, rel=1e-15)


def test_mean_prediction_is_the_exact_sum_rounded_once() -> None:
    # the bins' sums were each rounded, then added in float64: 63 of 200 means an ulp off
    rng = np.random.default_rng(0)
    for _ in range(40):
        p = rng.random(int(rng.integers(2, 40)))
        y = rng.integers(0, 2, p.size)
        got = BinaryClassificationMetrics(input_kind="probs").update(p, y).compute()
        assert got["mean_prediction"] == math.fsum(p) / p.size


def test_cli_binary_infinite_logits_and_log_zero_are_predictions(tmp_path: Path) -> None:
    # a logit of ±inf is P(label = 1) = 1 or 0, a log-probability of -inf is P = 0: the
    # figures of the metric on the same values (NaN and a log of +inf are still refused)
    z = np.array([np.inf, -np.inf, 0.3, -2.0, np.inf])
    y = np.array([1, 0, 1, 0, 1])
    text = "label,z\n" + "".join(f"{t},{v}\n" for v, t in zip(z, y, strict=True))
    out = run_json("eval", str(write(tmp_path / "z.csv", text)), "--input", "logits")
    want = BinaryClassificationMetrics(input_kind="logits").update(z, y).compute()
    for key in ("log_loss_nats", "brier", "ece", "accuracy", "mean_prediction"):
        assert out[key] == want[key], key
    assert out["log_loss_nats"] == pytest.approx(
        math.fsum([0.0, 0.0, math.log1p(math.exp(-0.3)), math.log1p(math.exp(-2.0)), 0.0]) / 5,
        rel=1e-15,
    )
    with np.errstate(divide="ignore"):
        log_p = np.log(np.array([1.0, 0.0, 0.7, 0.2]))
    y = y[:4]
    text = "label,lp\n" + "".join(f"{t},{v}\n" for v, t in zip(log_p, y, strict=True))
    out = run_json("eval", str(write(tmp_path / "l.csv", text)), "--input", "log_probs")
    want = BinaryClassificationMetrics(input_kind="log_probs").update(log_p, y).compute()
    for key in ("log_loss_nats", "brier", "ece", "accuracy"):
        assert out[key] == want[key], key


def test_cli_binary_nan_and_a_log_of_inf_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "n.csv", "label,z\n1,0.5\n0,nan\n")
    assert "row 2 (line 3) holds NaN" in error(capsys, "eval", str(path), "--input", "logits")
    path = write(tmp_path / "i.csv", "label,lp\n1,-0.5\n0,inf\n")
    assert "row 2 (line 3) holds +inf" in error(capsys, "eval", str(path), "--input", "log_probs")


def test_two_columns_per_label_are_refused_not_flattened() -> None:
    """Scores of shape (N, 2) (both classes' probabilities) with N labels, or (1, 2) with two:
    an error naming `input` and the fix. (1, 2) beside 2 labels was flattened silently
    into two binary predictions. Equal shapes (multi-label) and a (N, 1) column still score."""
    m = BinaryClassificationMetrics(input_kind="probs")
    both = np.array([[0.3, 0.7], [0.9, 0.1]])
    for scores, labels in ((both[:1], np.array([1, 0])), (both, np.array([1, 0]))):
        with pytest.raises(ValueError, match=r"`input` has shape \(\d, 2\).*input\[\.\.\., 1\]"):
            m.update(scores, labels)
    with pytest.raises(ValueError, match=r"`input` of shape \(4,\) and `target` of shape \(2, 2\)"):
        m.update(np.array([0.3, 0.7, 0.9, 0.1]), np.array([[1, 0], [0, 1]]))
    assert m.count == 0
    column = m.update(both[:, 1:], np.array([1, 0])).compute()["log_loss_nats"]
    want = -(math.log(0.7) + math.log(0.9)) / 2
    assert column == pytest.approx(want, rel=1e-15)
    multi = BinaryClassificationMetrics(input_kind="probs").update(both, np.array([[0, 1], [1, 0]]))
    assert multi.count == 4
