"""``crossent eval`` gives the same bits whatever the batch size (every per-row term
depends on its row alone, and the sums are exact), and names a bad value as written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossent._eval import _csv as _csv_reader
from crossent._eval import _jsonl as _jsonl_reader
from tests._evaldata import run, run_json

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = 8  # a contiguous row of 8 or more is summed pairwise by NumPy, a column-major
# matrix column by column: the per-row log-sum-exp and Brier term differed by an ulp


def _logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(scale=3.0, size=(n, CLASSES)), rng.integers(0, CLASSES, n)


def _parquet(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    table = {"label": y, **{f"c{k}": x[:, k] for k in range(x.shape[1])}}
    pq.write_table(pa.table(table), path)
    return path


def _jsonl(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    lines = [
        json.dumps({"label": int(t), **{f"c{k}": float(v) for k, v in enumerate(row)}})
        for row, t in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    lines = [",".join(["label", *(f"c{k}" for k in range(x.shape[1]))])]
    lines += [",".join([str(t), *(f"{v:.17g}" for v in row)]) for row, t in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


WRITERS = {"parquet": _parquet, "jsonl": _jsonl, "csv": _csv}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_batches_of_one_two_three_rows_give_the_figures_of_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # text readers: blocks of a few rows (else the first batch holds the first 64 KiB)
    monkeypatch.setattr(_csv_reader, "BLOCK_SIZE", 256)
    monkeypatch.setattr(_jsonl_reader, "BLOCK_SIZE", 256)
    x, y = _logits(12, seed=5)
    path = WRITERS[fmt](tmp_path / f"p.{fmt}", x, y)
    one = run_json("eval", str(path), "--input", "logits", "--batch-size", "65536")
    for size in ("1", "2", "3", "5"):
        many = run_json("eval", str(path), "--input", "logits", "--batch-size", size)
        assert many == one, (fmt, size)
    lse = np.log(np.exp(x).sum(axis=1))
    assert one["log_loss_nats"] == pytest.approx(np.mean(lse - x[np.arange(12), y]), rel=1e-13)


def test_a_nan_group_value_exits_2_naming_the_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # NaN equals nothing: it made a group of its own in every batch (four groups of one
    # row from batches of 3), exit 0
    x, y = _logits(12, seed=2)
    table = {"label": y, **{f"c{k}": x[:, k] for k in range(CLASSES)}}
    table["version"] = np.array([1.0, np.nan, 2.0] * 4)
    path = tmp_path / "g.parquet"
    pq.write_table(pa.table(table), path)
    for size in ("3", "100"):
        status, text = run(
            "eval", str(path), "--input", "logits", "--group-by", "version", "--batch-size", size
        )
        err = capsys.readouterr().err
        assert status == 2, text
        assert "row 2 has NaN in the --group-by column 'version'" in err


def test_a_float_label_beyond_int64_is_named_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1e20 was cast to int64 (a RuntimeWarning) and reported as '-9223372036854775808'
    x, _ = _logits(4, seed=3)
    path = tmp_path / "l.parquet"
    table = {"label": [0.0, 1.0, 2.0, 1e20], **{f"c{k}": x[:, k] for k in range(CLASSES)}}
    pq.write_table(pa.table(table), path)
    for size in ("1", "100"):
        status, _ = run("eval", str(path), "--input", "logits", "--batch-size", size)
        err = capsys.readouterr().err
        assert status == 2
        assert "row 4 has label 1e+20, which is not a class index or name" in err, err


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_longer_than_a_block_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    # pyarrow parses whole lines per 64 KiB block: a row of 4000 classes (97 KB) failed
    # with "straddling object straddles two block boundaries", exit 2
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4000))
    x, y = z - np.log(np.exp(z).sum(axis=1, keepdims=True)), rng.integers(0, 4000, 3)
    path = WRITERS[fmt](tmp_path / f"wide.{fmt}", x, y)
    for size in ("1", "100"):
        out = run_json("eval", str(path), "--input", "log_probs", "--batch-size", size)
        assert out["log_loss_nats"] == pytest.approx(-x[np.arange(3), y].mean(), rel=1e-14)
    # short rows, then a 200 KB text cell half-way (a note column), then a bad cell: the
    # reader goes on in larger blocks and still names the bad cell
    p = np.exp(x[:, :3] - np.log(np.exp(x[:, :3]).sum(axis=1, keepdims=True)))
    rows: list[dict[str, object]] = [
        {
            "label": i % 3,
            **dict(zip("abc", p[i % 3].tolist(), strict=True)),
            "note": "x" * 200_000 if i in (5, 2500) else "ok",
        }
        for i in range(3000)
    ]

    def write(bad: bool) -> Path:
        cells = [dict(r, b="zz") if bad and i == 2800 else r for i, r in enumerate(rows)]
        late = tmp_path / f"late.{fmt}"
        if fmt == "jsonl":
            late.write_text("".join(json.dumps(r) + "\n" for r in cells))
        else:
            text = ["label,a,b,c,note"]
            text += [
                ",".join(v if isinstance(v, str) else repr(v) for v in r.values()) for r in cells
            ]
            late.write_text("\n".join(text) + "\n")
        return late

    status, _ = run("eval", str(write(bad=True)), "--batch-size", "7")
    assert status == 2
    err = capsys.readouterr().err
    assert (
        "row 2801 (line 2802) has 'zz' in column 'b'"
        if fmt == "csv"
        else "line 2801 has 'zz' (text) in column 'b'"
    ) in err, err
    assert run_json("eval", str(write(bad=False)), "--batch-size", "7")["rows"] == 3000
