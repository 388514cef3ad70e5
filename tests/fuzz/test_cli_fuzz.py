"""Bounded fuzzing of `crossent eval`: malformed CSV, TSV, JSONL, Parquet, .npy and .npz files.

Hypothesis writes a valid predictions file, then applies one mutation whose
outcome is known: benign ones (blank lines, CRLF, quoting, shuffled
columns) must give the float64 reference figures; damaging ones (a text,
empty, NaN or +inf cell, a missing cell, a bad label, a duplicate column
name, truncation) must exit 2 with a message that names the row or file
line where there is one. Truncating a text file may leave a valid shorter
file: then the figures must be the reference over the rows that were read,
unless the file no longer ends with a line break (its last row may be cut
inside a number) and the warning that says so was printed.
Every run is in-process: a traceback fails the test, and so does a hang
(the suite runs in seconds).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent.cli import main
from tests._reference import metrics as ref

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXT_MUTATIONS = (
    "none",
    "blank_lines",
    "crlf",
    "quoted",
    "shuffled",
    "text_cell",
    "empty_cell",
    "nan_cell",
    "inf_cell",
    "missing_cell",
    "bad_label",
    "duplicate_name",
    "truncate",
)
BINARY_MUTATIONS = ("none", "nan_cell", "bad_label", "duplicate_name", "truncate")


@st.composite
def tables(draw: Any) -> dict[str, Any]:
    """Rows of predictions (probabilities or logits, extremes included) and labels."""
    n = draw(st.integers(3, 25))
    c = draw(st.integers(2, 4))
    kind = draw(st.sampled_from(["probs", "logits"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 60.0]))
    z = rng.normal(scale=scale, size=(n, c))
    if kind == "probs":
        x = np.exp(z - z.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    else:
        x = z
    return {"x": x, "y": rng.integers(0, c, size=n), "kind": kind, "rng": rng}


def _run(path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    out = io.StringIO()
    status = main(["eval", str(path), "--input", kind, "--format", "json"], out=out)
    err = capsys.readouterr().err
    return status, (json.loads(out.getvalue()) if status == 0 else None), err


def _check_figures(result: dict[str, Any], x: np.ndarray, y: np.ndarray, kind: str) -> None:
    assert result["rows"] == len(y)
    assert result["log_loss_nats"] == pytest.approx(ref.log_loss(x, y, kind), rel=1e-9, abs=1e-12)
    assert result["brier"] == pytest.approx(ref.brier(x, y, kind), rel=1e-9, abs=1e-12)
    assert result["accuracy"] == pytest.approx(ref.accuracy(x, y), abs=1e-12)


def _cells(row: np.ndarray) -> list[str]:
    return [repr(float(v)) for v in row]


def _write_text(
    path: Path, data: dict[str, Any], mutation: str, fmt: str
) -> tuple[Path, dict[str, Any]]:
    """Write `data` as CSV/TSV/JSONL with `mutation`; returns the path and what to expect.

    The expectation: {"ok": True} or {"ok": False, "says": regex the error must match}.
    """
    x, y, rng = data["x"], data["y"], data["rng"]
    n, c = x.shape
    names = ["label", *(f"c{k}" for k in range(c))]
    rows: list[list[str]] = [[str(int(t)), *_cells(r)] for t, r in zip(y, x, strict=True)]
    bad = int(rng.integers(0, n))  # the row a damaging mutation hits
    col = int(rng.integers(1, c + 1))
    expect: dict[str, Any] = {"ok": True}
    if mutation == "shuffled":
        order = [0, *rng.permutation(np.arange(1, c + 1)).tolist()]
        names = [names[i] for i in order]
        rows = [[f"c{t}", *(r[i] for i in order[1:])] for t, r in zip(y, rows, strict=True)]
        expect = {"ok": True, "perm": [i - 1 for i in order[1:]]}
    elif mutation in ("text_cell", "empty_cell", "nan_cell", "inf_cell"):
        rows[bad][col] = {"text_cell": "x1", "empty_cell": "", "nan_cell": "nan"}.get(
            mutation, "inf"
        )
        expect = {"ok": False, "row": bad}
    elif mutation == "missing_cell":
        del rows[bad][col]
        expect = {"ok": False, "row": bad}
    elif mutation == "bad_label":
        rows[bad][0] = str(int(rng.choice([c, c + 7, -1])))
        expect = {"ok": False, "row": bad}
    elif mutation == "duplicate_name":
        names[col] = names[1 + col % c]
        expect = {"ok": False, "says": "duplicate column names|twice"}
    # the file line of each row: the header is line 1, blank lines push rows down
    blank_before = rng.integers(0, 3, size=n) if mutation == "blank_lines" else np.zeros(n, int)
    line_of = [2 + i + int(blank_before[: i + 1].sum()) for i in range(n)]
    newline = "\r\n" if mutation == "crlf" else "\n"
    if fmt == "jsonl":
        lines = []
        for i, r in enumerate(rows):
            lines += [""] * int(blank_before[i])
            if mutation == "missing_cell" and i == bad:
                r = [*r, "0.5"]  # drop a key instead: JSON has no column count
                obj = {k: v for k, v in zip(names, r, strict=False) if k != names[col]}
                expect = {"ok": False, "row": bad, "missing_key": True}
            else:
                obj = dict(zip(names, r, strict=True))
            text = (
                "{"
                + ", ".join(
                    f'"{k}": ' + (_json_cell(v, k == names[col] and i == bad and mutation))
                    for k, v in obj.items()
                )
                + "}"
            )
            if mutation == "duplicate_name":
                text = (
                    "{"
                    + ", ".join(
                        f'"{k}": {_json_cell(v, False)}' for k, v in zip(names, r, strict=True)
                    )
                    + "}"
                )
            lines.append(text)
        body = newline.join(lines) + newline
        line_of = [1 + i + int(blank_before[: i + 1].sum()) for i in range(n)]
    else:
        sep = "\t" if fmt == "tsv" else ","
        quote = (lambda v: f'"{v}"') if mutation == "quoted" else (lambda v: v)
        lines = [sep.join(quote(v) for v in names)]
        for i, r in enumerate(rows):
            lines += [""] * int(blank_before[i])
            lines.append(sep.join(quote(v) for v in r))
        body = newline.join(lines) + newline
    expect["line_of"] = line_of
    if mutation == "truncate":
        cut = int(rng.integers(len(body) // 3, len(body)))
        body = body[:cut]
        expect = {"ok": None, "line_of": line_of}
    path = path.with_suffix("." + fmt)
    path.write_text(body, newline="")
    return path, expect


def _json_cell(value: str, mutation: Any) -> str:
    if mutation == "text_cell":
        return '"x1"'
    if mutation == "empty_cell":
        return "null"
    if value == "nan":
        return "NaN"
    if value == "inf":
        return "Infinity"
    try:
        float(value)
    except ValueError:
        return json.dumps(value)  # a class name
    return value


def _assert_names_the_row(err: str, expect: dict[str, Any]) -> None:
    assert err.startswith("crossent eval: error: "), err
    assert "Traceback" not in err
    if "says" in expect:
        assert re.search(expect["says"], err), err
    elif "row" in expect:
        row, line = expect["row"], expect["line_of"][expect["row"]]
        if expect.get("missing_key"):
            assert f"row {row + 1}" in err or f"line {line}" in err, err
        else:
            assert f"row {row + 1} (line {line})" in err or f"line {line} " in err, err


@settings(max_examples=400)
@given(
    data=tables(),
    mutation=st.sampled_from(TEXT_MUTATIONS),
    fmt=st.sampled_from(["csv", "tsv", "jsonl"]),
)
def test_text_files(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any],
    mutation: str,
    fmt: str,
) -> None:
    if fmt == "jsonl" and mutation in ("quoted", "duplicate_name"):
        mutation = "none" if mutation == "quoted" else mutation
    path, expect = _write_text(tmp_path_factory.mktemp("fuzz") / "p", data, mutation, fmt)
    if fmt == "jsonl" and mutation == "duplicate_name":
        return  # a JSON object cannot hold two keys of one name from a dict: covered in test_cli
    status, result, err = _run(path, data["kind"], capsys)
    x, y, kind = data["x"], data["y"], data["kind"]
    if expect["ok"] is None:  # truncated: an error naming a line, or the rows before the cut
        if status == 0:
            k = result["rows"]
            assert 0 < k <= len(y)
            if "does not end with a line break" not in err:  # else the last row may be cut
                _check_figures(result, x[:k], y[:k], kind)
        else:
            assert status == 2, err
            assert err.startswith("crossent eval: error: "), err
            assert re.search(r"(row|line) \d+|no rows|empty", err), err
        return
    if expect["ok"]:
        assert status == 0, err
        if "perm" in expect:  # columns in another order: the classes follow the header
            x = x[:, expect["perm"]]
            y = np.argsort(expect["perm"])[y]
        _check_figures(result, x, y, kind)
        return
    assert status == 2, (err, result)
    _assert_names_the_row(err, expect)


def _write_binary(
    path: Path, data: dict[str, Any], mutation: str, fmt: str
) -> tuple[Path, dict[str, Any]]:
    x, y, rng = data["x"].copy(), data["y"].copy(), data["rng"]
    n, c = x.shape
    bad = int(rng.integers(0, n))
    expect: dict[str, Any] = {"ok": True, "line_of": list(range(n))}
    if mutation == "nan_cell":
        x[bad, int(rng.integers(0, c))] = np.nan
        expect = {"ok": False, "row": bad}
    elif mutation == "bad_label":
        y[bad] = c + 3
        expect = {"ok": False, "row": bad}
    path = path.with_suffix("." + fmt)
    names = [f"c{k}" for k in range(c)]
    if fmt == "parquet":
        if mutation == "duplicate_name":
            names[1] = names[0]
            expect = {"ok": False, "says": "duplicate column names"}
        table = pa.Table.from_arrays(
            [pa.array(y), *(pa.array(x[:, k]) for k in range(c))], names=["label", *names]
        )
        pq.write_table(table, path)
    elif fmt == "npy":
        structured = np.zeros(n, dtype=[("label", "i8"), ("p", "f8", (c,))])
        structured["label"], structured["p"] = y, x
        np.save(path, structured)
    else:
        np.savez(path, label=y, probs=x)
    if mutation == "duplicate_name" and fmt != "parquet":
        mutation = "truncate"  # NumPy files cannot repeat a name
    if mutation == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: int(rng.integers(1, len(raw)))])
        expect = {"ok": False, "says": "truncated|cannot read|not a NumPy|not a zip|damaged"}
    return path, expect


@settings(max_examples=200)
@given(
    data=tables(),
    mutation=st.sampled_from(BINARY_MUTATIONS),
    fmt=st.sampled_from(["parquet", "npy", "npz"]),
)
def test_binary_files(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    data: dict[str, Any],
    mutation: str,
    fmt: str,
) -> None:
    path, expect = _write_binary(tmp_path_factory.mktemp("fuzz") / "p", data, mutation, fmt)
    status, result, err = _run(path, data["kind"], capsys)
    if expect["ok"]:
        assert status == 0, err
        _check_figures(result, data["x"], data["y"], data["kind"])
        return
    assert status == 2, (err, result)
    assert err.startswith("crossent eval: error: "), err
    if "says" in expect:
        assert re.search(expect["says"], err), err
    else:
        assert f"row {expect['row'] + 1} " in err, err
