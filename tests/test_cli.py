"""The `crossent` command line end to end: every file format, JSON schema, exit codes, report."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossent.cli import benchmarks_dir, main
from tests._reference import metrics as ref

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("matplotlib")

NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(40, 3))
    log_p = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    return {"logits": z, "log_probs": log_p, "probs": np.exp(log_p), "y": rng.integers(0, 3, 40)}


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(args), out=out)
    return status, out.getvalue()


def run_json(*args: str) -> dict[str, Any]:
    status, text = run(*args, "--format", "json")
    assert status == 0, text
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_rows(data: dict[str, np.ndarray], kind: str = "probs") -> list[list[Any]]:
    return [
        [NAMES[t], *(f"{v:.17g}" for v in row)]
        for row, t in zip(data[kind], data["y"], strict=True)
    ]


# ------------------------------------------------------------------ every format


def _write_every_format(tmp: Path, data: dict[str, np.ndarray]) -> dict[str, Path]:
    p, y = data["probs"], data["y"]
    files = {
        "csv": write_csv(
            tmp / "p.csv",
            ["id", "label", *NAMES],
            [[f"r{i}", *r] for i, r in enumerate(csv_rows(data))],
        )
    }
    table = pa.table({"label": pa.array(y), **{n: pa.array(p[:, k]) for k, n in enumerate(NAMES)}})
    pq.write_table(table, tmp / "p.parquet")
    files["parquet"] = tmp / "p.parquet"
    with open(tmp / "p.jsonl", "w") as f:  # a list column, integer labels
        for row, t in zip(p, y, strict=True):
            f.write(json.dumps({"label": int(t), "probs": row.tolist()}) + "\n")
    files["jsonl"] = tmp / "p.jsonl"
    structured = np.zeros(len(y), dtype=[("label", "i8")] + [(n, "f8") for n in NAMES])
    structured["label"] = y
    for k, n in enumerate(NAMES):
        structured[n] = p[:, k]
    np.save(tmp / "p.npy", structured)
    files["npy"] = tmp / "p.npy"
    np.savez(tmp / "p.npz", label=y, probs=p)
    files["npz"] = tmp / "p.npz"
    (tmp / "p.tsv").write_text(files["csv"].read_text().replace(",", "\t"))
    files["tsv"] = tmp / "p.tsv"
    return files


SCHEMA = {
    "file": str,
    "format": str,
    "input": str,
    "bins": int,
    "base": str,
    "classes": list,
    "ignored_columns": list,
    "files": int,
    "rows": int,
    "log_loss_nats": float,
    "log_loss_bits": float,
    "log_loss": float,
    "perplexity": float,
    "accuracy": float,
    "brier": float,
    "ece": float,
    "mce": float,
    "ece_equal_mass": float,
    "classwise_ece": float,
    "ece_positive": (float, type(None)),
    "clamped_rows": int,
    "per_class": list,
}
PER_CLASS_SCHEMA = {
    "class": str,
    "index": int,
    "count": int,
    "cross_entropy_nats": float,
    "cross_entropy_bits": float,
    "recall": float,
    "precision": float,
}


def test_every_format_gives_the_reference_figures(
    tmp_path: Path, data: dict[str, np.ndarray]
) -> None:
    want_nats = ref.log_loss(data["probs"], data["y"], "probs")
    for fmt, path in _write_every_format(tmp_path, data).items():
        out = run_json("eval", str(path), "--base", "2")
        assert set(out) == set(SCHEMA), fmt
        for key, kind in SCHEMA.items():
            assert isinstance(out[key], kind), (fmt, key, out[key])
        for entry in out["per_class"]:
            assert set(entry) == set(PER_CLASS_SCHEMA)
            for key, kind in PER_CLASS_SCHEMA.items():
                assert isinstance(entry[key], kind), (fmt, key)
        assert out["format"] == ("csv" if fmt == "tsv" else fmt)
        assert out["rows"] == 40
        assert out["classes"] == (["0", "1", "2"] if fmt in ("jsonl", "npz") else NAMES), fmt
        assert out["log_loss_nats"] == pytest.approx(want_nats, rel=1e-12), fmt
        assert out["log_loss_bits"] == pytest.approx(want_nats / math.log(2), rel=1e-12)
        assert out["log_loss"] == out["log_loss_bits"]
        assert out["accuracy"] == ref.accuracy(data["probs"], data["y"])
        assert out["brier"] == pytest.approx(ref.brier(data["probs"], data["y"], "probs"))
        assert out["ece"] == pytest.approx(ref.ece(data["probs"], data["y"], "probs", n_bins=15))
        assert [c["count"] for c in out["per_class"]] == np.bincount(
            data["y"], minlength=3
        ).tolist()
    assert run_json("eval", str(tmp_path / "p.csv"))["ignored_columns"] == ["id"]


@pytest.mark.parametrize("kind", ["logits", "log_probs"])
def test_input_kinds_and_bases(tmp_path: Path, data: dict[str, np.ndarray], kind: str) -> None:
    path = write_csv(tmp_path / "z.csv", ["label", *NAMES], csv_rows(data, kind))
    out = run_json("eval", str(path), "--input", kind, "--base", "10", "--bins", "5")
    nats = ref.log_loss(data[kind], data["y"], kind)
    assert out["log_loss_nats"] == pytest.approx(nats, rel=1e-12)
    assert out["log_loss"] == pytest.approx(nats / math.log(10), rel=1e-12)
    assert out["ece"] == pytest.approx(ref.ece(data[kind], data["y"], kind, n_bins=5))
    assert out["bins"] == 5


def test_text_output(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = write_csv(tmp_path / "p.csv", ["label", *NAMES], csv_rows(data))
    status, text = run("eval", str(path))
    assert status == 0
    nats = ref.log_loss(data["probs"], data["y"], "probs")
    assert f"{nats:.4f} nats" in text
    assert f"{nats / math.log(2):.4f} bits" in text
    assert "40 rows, 3 classes (cat, dog, bird)" in text
    assert re.search(r"^\s+bird\s+\d+", text, flags=re.M)


def test_types_widen_after_the_first_block(tmp_path: Path) -> None:
    # the first 40,000 rows hold integers only (one-hot); the last row holds fractions
    as_list = [{"label": i % 2, "p": [1 - i % 2, i % 2]} for i in range(40000)]
    as_list.append({"label": 0, "p": [0.5, 0.5]})
    as_columns = [{"label": r["label"], "x": r["p"][0], "y": r["p"][1]} for r in as_list]
    for name, records in (("list", as_list), ("columns", as_columns)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = run_json("eval", str(path), "--batch-size", "100")  # 64 KiB blocks
        assert out["rows"] == 40001
        assert out["log_loss_nats"] == pytest.approx(math.log(2) / 40001, rel=1e-12)
    rows = [[r["label"], r["x"], r["y"]] for r in as_columns]
    path = write_csv(tmp_path / "columns.csv", ["label", "x", "y"], rows)
    out = run_json("eval", str(path), "--batch-size", "100")
    assert out["log_loss_nats"] == pytest.approx(math.log(2) / 40001, rel=1e-12)


def test_integer_labels_written_as_floats_after_the_first_block(tmp_path: Path) -> None:
    # the first block's labels are JSON integers, a later one is 1.0 (a label column with a
    # missing value written by pandas is float): the label is 1, as it is in a file of float
    # labels only, in the CSV file and in the binary one. It was exit 2: "cannot read it
    # as jsonl: Failed to convert JSON to int64, couldn't parse:1.0"
    records = [{"label": i % 2, "x": 0.75, "y": 0.25} for i in range(4000)]
    records.append({"label": 1.0, "x": 0.5, "y": 0.5})
    want = (2000 * math.log(0.75) + 2000 * math.log(0.25) + math.log(0.5)) / -4001
    binary = [{"label": r["label"], "p": r["y"]} for r in records]
    for name, rows in (("columns", records), ("binary", binary)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = run_json("eval", str(path))
        assert out["rows"] == 4001
        assert out["log_loss_nats"] == pytest.approx(want, rel=1e-12)
        assert out["per_class"][1]["count"] == 2001
    path = write_csv(
        tmp_path / "floats.csv", ["label", "x", "y"], [list(r.values()) for r in records]
    )
    out = run_json("eval", str(path))
    assert out["log_loss_nats"] == pytest.approx(want, rel=1e-12)


def test_infinite_figures_are_the_json_number_1e999_and_undefined_ones_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """+inf (the log loss of a label given probability 0) is written 1e999: a standard JSON
    number that Python and JavaScript read back as infinity. It was null, which reads as
    "missing", the same as an undefined figure (NaN: precision of a class never predicted)."""
    rows = [[0, "-inf", 0.0, 1.0], [1, 0.0, 2.0, -1.0]]  # label 0 has logit -inf: loss +inf
    path = write_csv(tmp_path / "inf.csv", ["label", *NAMES], rows)
    capsys.readouterr()
    assert main(["eval", str(path), "--input", "logits", "--format", "json"]) == 0
    text = capsys.readouterr().out
    assert '"log_loss_nats": 1e999,' in text
    assert "Infinity" not in text
    assert "NaN" not in text
    out = json.loads(text)
    assert out == json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert out["log_loss_nats"] == out["log_loss_bits"] == out["perplexity"] == math.inf
    assert out["accuracy"] == 0.5
    assert out["per_class"][0]["cross_entropy_nats"] == math.inf
    assert out["per_class"][0]["precision"] is None  # never predicted: 0 / 0
    out = run_json("eval", str(path), "--input", "logits", "--progress")
    assert out["log_loss_nats"] == math.inf
    # the tokens are replaced outside strings only
    from crossent._eval import to_json

    summary = {"Infinity": ['"-Infinity"', -math.inf, math.nan, 1.5], "x\\": "\\Infinity"}
    back = json.loads(to_json(summary))
    assert back == {"Infinity": ['"-Infinity"', -math.inf, None, 1.5], "x\\": "\\Infinity"}
    assert out["per_class"][1]["cross_entropy_nats"] == pytest.approx(
        ref.log_loss(np.array([[0.0, 2.0, -1.0]]), np.array([1]), "logits")
    )
    status, text = run("eval", str(path), "--input", "logits")
    assert status == 0
    assert "inf nats" in text


def test_label_forms(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    p, y = data["probs"], data["y"]
    want = ref.log_loss(p, y, "probs")
    # integer indices with named columns
    rows = [[int(t), *row] for row, t in zip(p, y, strict=True)]
    path = write_csv(tmp_path / "idx.csv", ["label", *NAMES], rows)
    assert run_json("eval", str(path))["log_loss_nats"] == pytest.approx(want)
    # float labels that are integers (1.0)
    path = write_csv(tmp_path / "f.csv", ["label", *NAMES], [[float(r[0]), *r[1:]] for r in rows])
    assert run_json("eval", str(path))["log_loss_nats"] == pytest.approx(want)
    # columns named by integers are class names: labels 3, 5, 7
    codes = ["3", "5", "7"]
    rows = [[codes[t], *row] for row, t in zip(p, y, strict=True)]
    path = write_csv(tmp_path / "codes.csv", ["label", *codes], rows)
    assert run_json("eval", str(path))["log_loss_nats"] == pytest.approx(want)
    # ... where label 0 is then not a class
    rows[5][0] = "0"
    status, _ = run("eval", str(write_csv(path, ["label", *codes], rows)))
    assert status == 2
    # --labels index forces indices
    rows = [[int(t), *row] for row, t in zip(p, y, strict=True)]
    path = write_csv(tmp_path / "forced.csv", ["label", *codes], rows)
    assert run_json("eval", str(path), "--labels", "index")["log_loss_nats"] == pytest.approx(want)


def test_custom_label_column_and_streaming_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5000, 3))
    y = rng.integers(0, 3, 5000)
    rows = [[*(f"{v:.17g}" for v in row), int(t)] for row, t in zip(z, y, strict=True)]
    path = write_csv(tmp_path / "big.csv", [*NAMES, "truth"], rows)
    one = run_json("eval", str(path), "--input", "logits", "--label-column", "truth")
    many = run_json(
        "eval", str(path), "--input", "logits", "--label-column", "truth", "--batch-size", "97"
    )
    assert one["rows"] == many["rows"] == 5000
    assert many["log_loss_nats"] == pytest.approx(ref.log_loss(z, y, "logits"), rel=1e-12)
    for key in ("log_loss_nats", "accuracy", "brier", "ece", "ece_equal_mass", "classwise_ece"):
        assert many[key] == pytest.approx(one[key], rel=1e-12), key
    # a bad row deep inside a later block is named by its row and line in the file
    from crossent.cli import open_table

    table = open_table(path, batch_size=97, label_column="truth")
    assert len(list(table.batches())) > 3  # the file is read in several blocks
    rows[4320][0] = "nan"
    write_csv(path, [*NAMES, "truth"], rows)
    err = _error(capsys, "eval", str(path), "--input", "logits", "--label-column", "truth")
    assert "row 4321 (line 4322) holds NaN" in err


# ------------------------------------------------------------------ malformed files


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    status, out = run(*args)
    err = capsys.readouterr().err
    assert status == 2, out
    assert err.startswith("crossent eval: error: ")
    return err


def test_malformed_files_exit_2_naming_the_problem(
    tmp_path: Path, data: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = csv_rows(data)
    good = ["label", *NAMES]

    path = write_csv(tmp_path / "nolabel.csv", ["truth", *NAMES], rows)
    err = _error(capsys, "eval", str(path))
    assert "no label column 'label'" in err
    assert "truth, cat, dog, bird" in err
    assert "--label-column" in err

    bad = [list(r) for r in rows]
    bad[2][1:] = ["0.7", "0.7", "0.1"]
    err = _error(capsys, "eval", str(write_csv(tmp_path / "sum.csv", good, bad)))
    assert "row 3 (line 4) sums to 1.5, not 1" in err
    assert "--input logits" in err

    bad = [list(r) for r in rows]
    bad[6][0] = "fish"
    err = _error(capsys, "eval", str(write_csv(tmp_path / "fish.csv", good, bad)))
    assert "row 7 (line 8) has label 'fish'" in err
    assert "cat, dog, bird" in err

    bad = [list(r) for r in rows]
    bad[3][0] = "7"
    err = _error(capsys, "eval", str(write_csv(tmp_path / "range.csv", good, bad)))
    assert "row 4 (line 5) has label '7'" in err
    assert "[0, 3)" in err

    bad = [list(r) for r in rows]
    bad[9][2] = "nan"
    err = _error(capsys, "eval", str(write_csv(tmp_path / "nan.csv", good, bad)))
    assert "row 10 (line 11) holds NaN" in err

    bad = [list(r) for r in rows]
    bad[11][3] = ""
    err = _error(capsys, "eval", str(write_csv(tmp_path / "empty.csv", good, bad)))
    assert "row 12 (line 13) has no value in column 'bird'" in err

    bad = [list(r) for r in rows]
    bad[12][1] = "-0.5"
    err = _error(capsys, "eval", str(write_csv(tmp_path / "neg.csv", good, bad)))
    assert "row 13 (line 14) has a value -0.5 outside [0, 1]" in err

    with open(tmp_path / "ragged.jsonl", "w") as f:
        f.write(json.dumps({"label": 0, "p": [0.5, 0.5]}) + "\n")
        f.write(json.dumps({"label": 1, "p": [0.2, 0.3, 0.5]}) + "\n")
    err = _error(capsys, "eval", str(tmp_path / "ragged.jsonl"))
    assert "row 2 (line 2) has 3 predictions" in err

    # one class column is binary: P(label = 1), labels 0/1 or true/false
    err = _error(capsys, "eval", str(write_csv(tmp_path / "one.csv", ["label", "cat"], [[2, 1.0]])))
    # an integer label is read as an integer (text labels: 'maybe' in test_eval_binary)
    assert "row 1 (line 2) has label 2, not 0 or 1 (a binary label)" in err

    err = _error(
        capsys, "eval", str(write_csv(tmp_path / "text.csv", ["label", "note"], [[0, "x"]]))
    )
    assert "no prediction columns" in err

    np.save(tmp_path / "plain.npy", data["probs"])
    assert "structured array" in _error(capsys, "eval", str(tmp_path / "plain.npy"))

    (tmp_path / "p.xlsx").write_text("x")
    assert "unknown file type '.xlsx'" in _error(capsys, "eval", str(tmp_path / "p.xlsx"))
    assert "no such file" in _error(capsys, "eval", str(tmp_path / "missing.csv"))
    path = write_csv(tmp_path / "ok.csv", good, rows)
    assert "--bins must be at least 1" in _error(capsys, "eval", str(path), "--bins", "0")


def test_too_many_bins_exit_2_before_the_state_fills_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--bins 100000000 on a 2-row file held ~6.5 GB per 10**7 bins (a calibration state
    per class) and was killed for memory (SIGKILL, no message); now exit 2 naming --bins."""
    from crossent.cli import evaluate

    path = write_csv(tmp_path / "p.csv", ["a", "b", "label"], [[0.2, 0.8, 1], [0.6, 0.4, 0]])
    assert "--bins must be at most 10000" in _error(capsys, "eval", str(path), "--bins", "10001")
    assert run_json("eval", str(path), "--bins", "10000")["bins"] == 10000
    with pytest.raises(ValueError, match=r"`bins` must be at most 10000; got 100000000"):
        evaluate(path, bins=100_000_000)


def test_a_report_folder_that_cannot_be_written_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--report under a file, or on a file: exit 2 naming --report, before the scoring
    (it was an uncaught NotADirectoryError / FileExistsError traceback, exit 1)."""
    path = tmp_path / "p.csv"
    path.write_text("label,a,b\n0,0.7,0.3\n1,0.4,0.6\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for folder in (blocker / "sub", blocker):
        err = _error(capsys, "eval", str(path), "--report", str(folder))
        assert f"--report {folder}: cannot write the report there" in err
    assert blocker.read_text() == ""


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["eval", "x.csv", "--input", "probabilities"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_the_installed_command_and_its_exit_status(
    tmp_path: Path, data: dict[str, np.ndarray]
) -> None:
    bad = [list(r) for r in csv_rows(data)]
    bad[2][1:] = ["0.7", "0.7", "0.1"]
    path = write_csv(tmp_path / "sum.csv", ["label", *NAMES], bad)
    done = subprocess.run(
        [sys.executable, "-m", "crossent", "eval", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "row 3" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("command", [[], ["eval"], ["demo"], ["bench"]])
def test_help_on_each_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: crossent")
    assert len(text) > 200


# ------------------------------------------------------------------ reliability (issue 11)


def test_a_text_cell_in_a_class_column_is_an_error_naming_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one non-numeric cell made pyarrow type column b as text: it was dropped, exit 0
    path = tmp_path / "cell.csv"
    path.write_text("label,a,b,c\n0,2.0,0.1,-1.0\n1,0.5,x,3.0\n1,0.1,0.2,0.3\n")
    err = _error(capsys, "eval", str(path), "--input", "logits")
    assert "row 2 (line 3) has 'x' in column 'b'" in err
    # the same in JSON Lines (pyarrow named "row 1" of a block), after blank lines
    path = tmp_path / "cell.jsonl"
    path.write_text('{"label": 0, "a": 0.5, "b": 0.5}\n\n\n{"label": 1, "a": 0.5, "b": "x"}\n')
    err = _error(capsys, "eval", str(path))
    assert "line 4 has 'x' (text) in column 'b', whose other values are numbers" in err
    # a column of text (ids) with a stray number stays an ignored column
    path = write_csv(
        tmp_path / "ids.csv",
        ["id", "label", "a", "b"],
        [["r1", 0, 0.5, 0.5], ["r2", 1, 0.25, 0.75], ["7", 1, 0.5, 0.5]],
    )
    assert run_json("eval", str(path))["ignored_columns"] == ["id"]


def test_a_decimal_column_is_not_dropped_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Parquet decimal class column was left out of the classes (listed only in
    ignored_columns): with --input logits over columns a (decimal), b, c the log loss was
    that of a 2-class softmax over b and c, a silently wrong figure. Now exit 2 naming it."""
    import decimal

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "dec.parquet"
    a = pa.array([decimal.Decimal("2.0"), decimal.Decimal("0.1")])
    pq.write_table(pa.table({"label": [0, 1], "a": a, "b": [0.5, 1.5], "c": [0.1, -1.0]}), path)
    err = _error(capsys, "eval", str(path), "--input", "logits")
    assert "column 'a' holds decimals (decimal128(2, 1))" in err
    assert run_json("eval", str(path), "--input", "logits", "--exclude", "a")["classes"] == [
        "b",
        "c",
    ]


def test_an_empty_column_is_not_dropped_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A column whose every cell is empty (Arrow's null type) went into ignored_columns: with
    --input logits over a, b (empty), c the figures were those of a 2-class softmax over a and
    c, exit 0. Now exit 2 naming it, in every format; --exclude drops it on purpose."""
    csv = tmp_path / "empty.csv"
    csv.write_text("label,a,b,c\n0,2.0,,0.1\n1,0.5,,3.0\n")
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text('{"label": 0, "a": 2.0, "b": null, "c": 0.1}\n'
                     '{"label": 1, "a": 0.5, "b": null, "c": 3.0}\n')  # fmt: skip
    for path in (csv, jsonl):
        err = _error(capsys, "eval", str(path), "--input", "logits")
        assert "column 'b' has no values" in err
        out = run_json("eval", str(path), "--input", "logits", "--exclude", "b")
        assert out["classes"] == ["a", "c"]


def test_a_class_column_of_numbers_written_as_text_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON numbers quoted as strings in every row: exit 2 naming the cell (it was an
    IndexError traceback from the search for a non-numeric cell, exit 1)."""
    path = tmp_path / "quoted.jsonl"
    path.write_text('{"label": 0, "a": "0.7", "b": 0.3}\n{"label": 1, "a": "0.2", "b": 0.8}\n')
    err = _error(capsys, "eval", str(path))
    assert "has '0.7' in column 'a': numbers written as text" in err


def test_duplicate_column_names_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("label,a,a,b\n0,0.2,0.3,0.5\n")
    err = _error(capsys, "eval", str(path))
    assert "duplicate column names ('a' is columns 2, 3)" in err
    table = pa.Table.from_arrays(
        [pa.array([0]), pa.array([0.5]), pa.array([0.5])], names=["label", "p", "p"]
    )
    pq.write_table(table, tmp_path / "dup.parquet")
    assert "duplicate column names" in _error(capsys, "eval", str(tmp_path / "dup.parquet"))
    path = tmp_path / "dup.jsonl"
    path.write_text('{"label": 0, "a": 0.5, "b": 0.5}\n{"label": 1, "a": 0.5, "a": 0.5}\n')
    assert "line 2 has the key 'a' twice" in _error(capsys, "eval", str(path))


def test_errors_name_the_file_line_past_blank_lines_and_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # blank lines: the row on line 6 was reported as line 4
    path = tmp_path / "blank.csv"
    path.write_text("label,a,b\n0,0.5,0.5\n\n1,0.5,0.5\n\n1,0.7,0.7\n")
    assert "row 3 (line 6) sums to 1.4" in _error(capsys, "eval", str(path))
    # a quoted cell that spans two lines shifts the lines after it
    path.write_text('label,a,b\na,0.5,0.5\n"b\n",0.5,0.5\nb,0.7,0.7\n')
    assert "row 3 (line 5) sums to 1.4" in _error(capsys, "eval", str(path))
    # a non-numeric cell after the first block (pyarrow names no row there)
    good = "".join(f"{i % 2},0.5,0.5\n" for i in range(3000))
    path.write_text("label,a,b\n" + good + "\n1,0.5,oops\n" + good)
    err = _error(capsys, "eval", str(path), "--batch-size", "100")  # 64 KB blocks
    assert "row 3001 (line 3003) has 'oops' in column 'b', which is not a number" in err
    # a row with a missing cell, after the first block
    path.write_text("label,a,b\n" + good + "\n1,0.5\n" + good)
    err = _error(capsys, "eval", str(path), "--batch-size", "100")
    assert "line 3003 has 2 cells, but the header has 3" in err
    # JSON Lines: the file line, not a row inside a block
    rows = "".join(json.dumps({"label": i % 2, "a": 0.5, "b": 0.5}) + "\n" for i in range(3000))
    path = tmp_path / "late.jsonl"
    path.write_text(rows + "\n" + '{"label": 1, "a": 0.5, "b": "x"}\n' + rows)
    err = _error(capsys, "eval", str(path), "--batch-size", "100")
    assert "line 3002 has 'x' (text) in column 'b', whose other values are numbers" in err
    path.write_text(rows + "\n" + '{"label": 1, "a": 0.5, "b": 0.7}\n' + rows)
    err = _error(capsys, "eval", str(path), "--batch-size", "100")
    assert "row 3001 (line 3002) sums to 1.2" in err
    path.write_text(rows + "\n" + '{"label": 1, "a": 0.5, "b": 0.5' + "\n")
    err = _error(capsys, "eval", str(path), "--batch-size", "100")
    assert "line 3002 is cut off" in err


def test_a_text_file_cut_inside_its_last_row_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0.75 cut to 0.7 still parses: the missing final line break is the one trace left
    for name, text in (
        ("cut.csv", "label,a,b\n0,0.5,0.5\n1,1.2,0.7"),
        ("cut.jsonl", '{"label": 0, "a": 0.5, "b": 0.5}\n{"label": 1, "a": 1.2, "b": 0.7}'),
    ):
        (tmp_path / name).write_text(text)
        status, _ = run("eval", str(tmp_path / name), "--input", "logits")
        err = capsys.readouterr().err
        assert status == 0
        assert "warning:" in err
        assert "does not end with a line break" in err
        (tmp_path / name).write_text(text + "\n")
        assert run("eval", str(tmp_path / name), "--input", "logits")[0] == 0
        assert capsys.readouterr().err == ""


def test_what_is_not_a_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is a character device" in _error(capsys, "eval", "/dev/null")
    # a directory is read as its predictions files (issue 12); an empty one is an error
    assert "a directory with no predictions files" in _error(capsys, "eval", str(tmp_path))
    (tmp_path / "empty.csv").write_text("")
    assert "is empty (0 bytes)" in _error(capsys, "eval", str(tmp_path / "empty.csv"))
    assert "no such file" in _error(capsys, "eval", str(tmp_path / "missing.csv"))


def _write_format(tmp: Path, fmt: str, rows: int) -> Path:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=rows)
    y = rng.integers(0, 3, rows)
    path = tmp / f"p.{fmt}"
    if fmt == "csv":
        write_csv(path, ["label", *NAMES], [[t, *r] for t, r in zip(y, p, strict=True)])
    elif fmt == "jsonl":
        path.write_text(
            "".join(
                json.dumps({"label": int(t), "p": r.tolist()}) + "\n"
                for t, r in zip(y, p, strict=True)
            )
        )
    elif fmt == "parquet":
        pq.write_table(
            pa.table({"label": y, "cat": p[:, 0], "dog": p[:, 1], "bird": p[:, 2]}), path
        )
    elif fmt == "npy":
        structured = np.zeros(rows, dtype=[("label", "i8"), ("p", "f8", (3,))])
        structured["label"], structured["p"] = y, p
        np.save(path, structured)
    else:
        np.savez(path, label=y, probs=p)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "npy", "npz"])
def test_a_file_truncated_while_it_is_read_is_an_error(tmp_path: Path, fmt: str) -> None:
    from crossent._eval import CLIError, open_table, read_batches

    path = _write_format(tmp_path, fmt, 6000)
    table = open_table(path, batch_size=100, label_column="label")
    batches = read_batches(table)
    next(batches)
    with open(path, "r+b") as f:  # another process cuts the file short
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CLIError, match="truncated"):
        for _ in batches:
            pass


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "npy", "npz"])
def test_a_truncated_file_is_an_error(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_format(tmp_path, fmt, 500)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3 + 3])
    err = _error(capsys, "eval", str(path))
    if fmt in ("csv", "jsonl"):  # cut inside a row: that row's line
        assert re.search(r"line \d+ (has \d cells|is cut off)", err), err
    elif fmt == "npy":
        assert "is truncated: its header says 500 rows" in err


@pytest.mark.parametrize("ext", ["parquet", "npy", "npz", "csv", "jsonl"])
def test_memory_stays_bounded_by_the_batch_size(tmp_path: Path, ext: str) -> None:
    """Peak RSS while reading files of each format, small and 10x larger, in fresh processes.

    The growth of the peak from the small file to the large one must be a small
    fraction of the growth of the file: pyarrow's default Parquet reader
    pre-buffers whole row groups (+130 MB for 93 MB), a memory-mapped .npy keeps
    its touched pages resident, np.load of an .npz holds every array whole, and
    pyarrow's threaded CSV reader parses blocks far ahead of the consumer.
    """
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from crossent.cli import open_table\nfrom crossent._eval._open import read_batches\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "table = open_table(Path(sys.argv[1]), batch_size=65536, label_column='label')\n"
        "base = hwm()\n"
        "rows = sum(b.data.num_rows for b in read_batches(table))\n"
        "print(rows, hwm() - base)\n"
    )

    def peak(path: Path, rows: int) -> float:
        """The least growth of three fresh processes: allocator noise only ever adds."""
        grown = []
        for _ in range(3):
            done = subprocess.run(
                [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
            )
            count, value = done.stdout.split()
            assert int(count) == rows
            grown.append(float(value))
        return min(grown)

    # one case per format (xdist spreads them), each writing its own two files only
    rows = 100_000 if ext in ("csv", "jsonl") else 200_000
    rng = np.random.default_rng(0)
    for n in (rows, rows * 10):
        p = rng.random((n, 4))
        y = rng.integers(0, 4, n)
        path = tmp_path / f"{n}.{ext}"
        if ext == "parquet":
            pq.write_table(
                pa.table({"label": y, **{f"c{k}": p[:, k] for k in range(4)}}),
                path,
                row_group_size=n,
            )
        elif ext == "npy":
            structured = np.zeros(n, dtype=[("label", "i8"), ("p", "f8", (4,))])
            structured["label"], structured["p"] = y, p
            np.save(path, structured)
        elif ext == "npz":
            np.savez(path, label=y, probs=p)
        elif ext == "csv":  # pyarrow's threaded read-ahead
            pcsv = pytest.importorskip("pyarrow.csv")
            pcsv.write_csv(pa.table({"label": y, **{f"c{k}": p[:, k] for k in range(4)}}), path)
        else:  # JSON Lines: its peak grew with the file with 1 MiB blocks (jemalloc, system pools)
            fmt = '{"label": %d, ' + ", ".join(f'"c{k}": %.17g' for k in range(4)) + "}"
            np.savetxt(path, np.column_stack([y, p]), fmt=fmt)
        del p, y
    small, large = tmp_path / f"{rows}.{ext}", tmp_path / f"{rows * 10}.{ext}"
    file_growth = (large.stat().st_size - small.stat().st_size) / 2**20  # 40 to 80 MB
    rss_growth = peak(large, rows * 10) - peak(small, rows)
    # was > 1x; JSON Lines in 1 MiB blocks: 18-24 MB (0.2x), in 64 KiB blocks: 2 MB
    bound = 0.1 if ext == "jsonl" else 0.35  # one CSV run's peak is noisy: -8 to +36 MB
    assert rss_growth < bound * file_growth, (ext, rss_growth, file_growth)


def test_eval_does_not_switch_validation_for_other_threads(
    tmp_path: Path, data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crossent eval` checks its file with validation on, for its own thread only."""
    import threading

    import crossent as ce
    from crossent.metrics import ClassificationMetrics

    path = write_csv(tmp_path / "p.csv", ["label", *NAMES], csv_rows(data))
    inside, resume = threading.Event(), threading.Event()
    seen: list[bool] = []
    update = ClassificationMetrics.update

    def paused_update(self: Any, *args: Any) -> Any:
        seen.append(ce.get_validation())
        inside.set()
        resume.wait(30)
        return update(self, *args)

    monkeypatch.setattr(ClassificationMetrics, "update", paused_update)
    ce.set_validation(False)
    try:
        worker = threading.Thread(target=run, args=("eval", str(path)))
        worker.start()
        assert inside.wait(30)
        during = ce.get_validation()  # this thread, while eval is inside its with-block
        resume.set()
        worker.join(30)
        assert seen == [True]  # the file is checked
        assert during is False
        assert ce.get_validation() is False
    finally:
        resume.set()
        ce.set_validation(True)


# ------------------------------------------------------------------ report


def test_report_files_exist_and_the_html_references_its_images(
    tmp_path: Path, data: dict[str, np.ndarray]
) -> None:
    path = write_csv(tmp_path / "p.csv", ["label", *NAMES], csv_rows(data))
    report = tmp_path / "report"
    out = run_json("eval", str(path), "--report", str(report))
    assert out["report"] == str(report / "index.html")
    html = (report / "index.html").read_text()
    for name in ("reliability.png", "confidence.png", "per_class.png"):
        png = (report / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(png) > 5000, name
        assert f'href="{name}"' in html, name  # the caption links the PNG file beside the HTML
        embedded = base64.b64encode(png).decode("ascii")
        assert f'src="data:image/png;base64,{embedded}"' in html, name  # and embeds the same bytes
    for c in NAMES:
        assert f"<td>{c}</td>" in html
    assert f"{ref.log_loss(data['probs'], data['y'], 'probs'):.4f}" in html
    assert "<script" not in html
    assert re.findall(r'src="(?!data:)', html) == []  # nothing outside the file is needed


# ------------------------------------------------------------------ bench


def test_bench_runs_scripts_with_quick(tmp_path: Path) -> None:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "bench_a.py").write_text("import sys\nprint('| size | ms |', sys.argv[1:])\n")
    (folder / "_helpers.py").write_text("raise SystemExit(3)\n")
    status, out = run("bench", "--dir", str(folder), "--quick")
    assert status == 0
    assert "== bench_a.py (quick)" in out
    assert "| size | ms | ['--quick']" in out
    assert "_helpers" not in out
    (folder / "bench_b.py").write_text("import sys\nprint('partial')\nsys.exit(1)\n")
    status, out = run("bench", "--dir", str(folder))
    assert status == 1
    assert "bench_b.py exited with status 1" in out
    status, out = run("bench", "--dir", str(folder), "--only", "bench_a")
    assert status == 0
    assert "bench_b" not in out


def test_bench_without_the_benchmarks_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = run("bench", "--dir", str(tmp_path / "nowhere"))
    assert status == 2
    err = capsys.readouterr().err
    assert "no benchmarks folder" in err
    assert "source" in err


# The repository's benchmark scripts; `bench --only NAME` runs those whose name holds NAME, so
# one case per name that holds no other (fused also runs fused_memory): each runs once, and
# xdist spreads the cases (one test of them all ran 1.5 minutes on one worker).
_SCRIPTS = sorted(p.stem for p in benchmarks_dir().glob("*.py") if not p.name.startswith("_"))
_BENCH_CASES = [s for s in _SCRIPTS if not any(o != s and o in s for o in _SCRIPTS)]
# what some of them print
_BENCH_PRINTS = {
    "bench_binary_floor": ["sum of the pieces"],
    "bench_sparse": ["crossent ms"],
    "fused": ["three-GEMM floor"],
    "bench_eval": ["pyarrow + NumPy"],
    "bench_launches": ["| sparse float32 fwd+bwd"],
    "bench_info": ["| kl_divergence, logits | 32x10 | no_grad |", "1e-6 apart"],
}


def test_bench_cases_cover_the_scripts() -> None:
    assert set(_BENCH_PRINTS) <= set(_BENCH_CASES)
    assert sorted(s for c in _BENCH_CASES for s in _SCRIPTS if c in s) == _SCRIPTS


@pytest.mark.parametrize("name", _BENCH_CASES)
def test_bench_runs_the_repository_scripts_quick(name: str) -> None:
    """The real benchmark scripts run through `crossent bench --quick` and print their tables."""
    pytest.importorskip("torch")
    status, out = run("bench", "--quick", "--only", name)
    assert status == 0, out
    for script in _SCRIPTS:
        assert (f"== {script}.py (quick)" in out) == (name in script), out
    for text in _BENCH_PRINTS.get(name, []):
        assert text in out, out


def test_eval_of_huge_logits_is_accurate(tmp_path: Path) -> None:
    # float64 z - lse(z) at 1e15 rounds lse to 1/8: log 2 came out 0.625
    rows = [["cat", 1e15, 1e15, 0.0], ["dog", -1e15, -1e15 + 3.0, -1e15]]
    path = write_csv(tmp_path / "big.csv", ["label", *NAMES], rows)
    out = run_json("eval", str(path), "--input", "logits")
    want = (math.log(2.0) + math.log(1.0 + 2.0 * math.exp(-3.0))) / 2.0
    assert out["log_loss"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("nested", ["list", "struct"])
def test_a_nested_label_or_group_column_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nested: str
) -> None:
    """A list or struct label or --group-by column (Parquet, JSON lines) crashed with
    pyarrow's ArrowNotImplementedError traceback (dictionary_encode), exit 1."""
    values = [[1], [0], [0]] if nested == "list" else [{"k": 1}, {"k": 0}, {"k": 0}]
    probs = {"a": [0.2, 0.6, 0.3], "b": [0.8, 0.4, 0.7]}
    pq.write_table(pa.table({**probs, "label": values}), tmp_path / "label.parquet")
    pq.write_table(pa.table({"p": probs["a"], "label": values}), tmp_path / "binary.parquet")
    for name in ("label", "binary"):
        err = _error(capsys, "eval", str(tmp_path / f"{name}.parquet"))
        assert f"the label column 'label' holds {nested}" in err
    pq.write_table(pa.table({**probs, "label": [1, 0, 0], "g": values}), tmp_path / "g.parquet")
    err = _error(capsys, "eval", str(tmp_path / "g.parquet"), "--group-by", "g")
    assert f"the --group-by column 'g' holds {nested}" in err
