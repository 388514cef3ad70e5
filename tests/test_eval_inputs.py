"""``crossent eval`` inputs: several files, directories, globs, compression, stdin, column choice.

Every input form is checked against the single-file result of the same rows.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._evaldata import (
    NAMES,
    assert_same_figures,
    csv_text,
    error,
    rows,
    run,
    run_json,
    write,
)

pa = pytest.importorskip("pyarrow")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return rows(60)


@pytest.fixture
def single(tmp_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The reference: every row in one plain CSV file (id excluded from the classes)."""
    path = write(tmp_path / "all.csv", csv_text(data))
    return run_json("eval", str(path), "--exclude", "id")


def _shards(folder: Path, data: dict[str, Any], suffix: str = ".csv") -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [
        write(folder / f"part-{i}{suffix}", csv_text(data, 20 * i, 20 * (i + 1))) for i in range(3)
    ]


def test_several_files_a_directory_and_a_glob_are_one_table(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any]
) -> None:
    parts = _shards(tmp_path / "shards", data)
    (tmp_path / "shards" / "_SUCCESS").write_text("")  # Spark's marker: skipped
    (tmp_path / "shards" / ".hidden.csv").write_text("not,a\nprediction,file\n")
    for args in (
        [str(p) for p in parts],
        [str(tmp_path / "shards")],
        [str(tmp_path / "shards" / "part-*.csv")],
    ):
        out = run_json("eval", *args, "--exclude", "id")
        assert out["files"] == 3, args
        assert_same_figures(out, single)
    # the order of the files does not change the figures
    assert_same_figures(
        run_json("eval", *(str(p) for p in reversed(parts)), "--exclude", "id"), single
    )


def test_a_file_reached_twice_is_refused_not_scored_twice(
    tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file named twice, by a directory and a glob (or a file) that overlap, or by a link,
    was scored twice (its rows counted twice, silently): exit 2, naming it."""
    parts = _shards(tmp_path / "shards", data)
    folder, first = str(tmp_path / "shards"), str(parts[0])
    link = tmp_path / "link.csv"
    link.symlink_to(parts[0])
    for args, says in (
        ([first, first], f"{first}: named twice"),
        ([folder, first], f"{first}: named twice"),
        ([folder, str(tmp_path / "shards" / "part-*.csv")], f"{first}: named twice"),
        ([str(link), folder], f"{first}: the same file as {link}"),
    ):
        err = error(capsys, "eval", *args, "--exclude", "id")
        assert says in err, (args, err)
        assert "its rows would be scored twice. Name each file once" in err


def test_a_directory_skips_everything_under_hidden_and_underscore_folders(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any]
) -> None:
    """Only a file's own folder was checked, so the rows under Spark's
    ``_temporary/0/_temporary/attempt_*/`` (left by a job that failed or still runs), or
    under ``.cache/sub/``, were scored with the others: 4 copies of the rows, exit 0."""
    folder = tmp_path / "shards"
    _shards(folder, data)
    whole = csv_text(data)
    for nested in ("_temporary/0/_temporary/attempt_1", "_temporary/0", ".cache/sub", "_x/y/z"):
        (folder / nested).mkdir(parents=True, exist_ok=True)
        write(folder / nested / "part-9.csv", whole)
    out = run_json("eval", str(folder), "--exclude", "id")
    assert out["files"] == 3
    assert_same_figures(out, single)
    # a hidden or underscore folder named on the command line is read: it was asked for
    assert run_json("eval", str(folder / "_x"), "--exclude", "id")["files"] == 1


def test_files_without_rows_among_others(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # a CSV file of a header only has no column types (pyarrow: null): it made every
    # evaluation it was part of exit 2 ("no prediction columns"), first or not
    parts = _shards(tmp_path / "shards", data)
    header = csv_text(data, 0, 0)
    empty = [write(tmp_path / "shards" / f"{name}.csv", header) for name in ("a-empty", "z-empty")]
    for args in ([str(tmp_path / "shards")], [str(empty[0]), str(parts[0]), str(empty[1])]):
        out = run_json("eval", *args, "--exclude", "id", "--group-by", "day")
        assert out["files"] == (5 if len(args) == 1 else 3)
        if len(args) == 1:
            assert_same_figures(out, single)
        else:
            alone = run_json("eval", str(parts[0]), "--exclude", "id", "--group-by", "day")
            assert_same_figures(out, alone)
            assert out["groups"] == alone["groups"]
    # still the same columns in each, and no rows at all is still an error (as for one file)
    write(empty[1], header.replace("label,", "truth,"))
    err = error(capsys, "eval", str(tmp_path / "shards"), "--exclude", "id")
    assert f"{empty[1]}: has other columns than {parts[0]} (it lacks label; it also" in err
    again = write(tmp_path / "again.csv", header)
    err = error(capsys, "eval", str(empty[0]), str(again), "--exclude", "id")
    assert err.replace(str(again), str(empty[0])) == error(
        capsys, "eval", str(empty[0]), "--exclude", "id"
    )


def test_blank_files_among_others_have_no_rows(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # pandas and Dask write an empty partition as JSON lines as one line break (a filtered
    # frame: dd.to_json(..., lines=True)), Spark as 0 bytes: files without rows, as a CSV
    # file of a header only; they were exit 2 ("cannot read it as jsonl: Empty JSON
    # stream", "is empty (0 bytes)"). Alone, or all of them, they are still an error.
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for i in range(3):
        records = [
            {"label": NAMES[data["y"][j]], **dict(zip(NAMES, data["p"][j].tolist(), strict=True))}
            for j in range(20 * i, 20 * (i + 1))
        ]
        write(folder / f"part-{i}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write(folder / "part-1a.jsonl", "\n")
    write(folder / "part-1b.jsonl", "")
    write(folder / "part-3.jsonl.gz", "")
    (folder / "part-4.jsonl.gz").write_bytes(gzip.compress(b" \n\n"))
    out = run_json("eval", str(folder))
    assert out["files"] == 7
    assert_same_figures(out, single)
    csv_parts = _shards(tmp_path / "csv", data)
    write(tmp_path / "csv" / "part-0a.csv", "")
    out = run_json("eval", str(tmp_path / "csv"), "--exclude", "id,day")
    assert (out["rows"], out["files"]) == (60, len(csv_parts) + 1)
    blank = [str(folder / "part-1a.jsonl"), str(folder / "part-1b.jsonl")]
    assert "Empty JSON stream" in error(capsys, "eval", blank[0])
    assert "is empty (0 bytes)" in error(capsys, "eval", *blank)


def _compress(path: Path, suffix: str) -> Path:
    data = path.read_bytes()
    target = path.with_name(path.name + suffix)
    if suffix == ".gz":
        target.write_bytes(gzip.compress(data))
    elif suffix == ".bz2":
        target.write_bytes(bz2.compress(data))
    elif suffix == ".xz":
        target.write_bytes(lzma.compress(data))
    else:
        with pa.CompressedOutputStream(str(target), "zstd") as f:
            f.write(data)
    return target


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_read_by_extension(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any], suffix: str
) -> None:
    plain = write(tmp_path / "p.csv", csv_text(data))
    out = run_json("eval", str(_compress(plain, suffix)), "--exclude", "id")
    assert out["format"] == "csv"
    assert_same_figures(out, single)


def test_compressed_jsonl_and_tsv(tmp_path: Path, data: dict[str, Any]) -> None:
    lines = [
        json.dumps({"label": int(t), "probs": list(map(float, p))})
        for p, t in zip(data["p"], data["y"], strict=True)
    ]
    plain = write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")
    assert_same_figures(
        run_json("eval", str(_compress(plain, ".gz"))), run_json("eval", str(plain))
    )
    tsv = write(tmp_path / "p.tsv", csv_text(data, extra=False).replace(",", "\t"))
    assert_same_figures(run_json("eval", str(_compress(tsv, ".xz"))), run_json("eval", str(tsv)))


def test_dash_reads_csv_from_stdin(
    monkeypatch: pytest.MonkeyPatch, data: dict[str, Any], single: dict[str, Any]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(csv_text(data).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    out = run_json("eval", "-", "--exclude", "id")
    assert out["file"] == "<stdin>"
    assert_same_figures(out, single)


def test_stdin_errors_name_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"label,a,b\n0,0.5,0.7\n")))
    err = error(capsys, "eval", "-")
    assert "<stdin>: row 1 (line 2) sums to 1.2" in err
    assert "crossent-stdin" not in err


def test_columns_and_exclude_choose_the_class_columns(
    tmp_path: Path, data: dict[str, Any], single: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "p.csv", csv_text(data))
    # by default the numeric id column is a class (its first value is 100)
    assert "row 1 (line 2) has a value 100 outside [0, 1]" in error(capsys, "eval", str(path))
    out = run_json("eval", str(path), "--exclude", "id")
    assert out["classes"] == NAMES
    assert out["ignored_columns"] == ["day"]
    # --columns names them in class order: the per-class table follows it
    chosen = run_json("eval", str(path), "--columns", "bird,cat,dog")
    assert chosen["classes"] == ["bird", "cat", "dog"]
    assert_same_figures(
        {**chosen, "per_class": sorted(chosen["per_class"], key=lambda c: NAMES.index(c["class"]))},
        single,
    )
    assert set(chosen["ignored_columns"]) == {"id", "day"}
    # two of the three columns: a label of the third class is no class
    err = error(capsys, "eval", str(path), "--columns", "cat,dog")
    assert "has label 'bird', which is not a class index in [0, 2) or a class name" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--columns", "cat,wolf"], "--columns names 'wolf', not a column"),
        (["--exclude", "idd"], "--exclude names 'idd', not a column"),
        (["--columns", "cat,cat,dog"], "--columns must name distinct numeric columns"),
        (["--columns", "cat,day,dog"], "(day cannot be a class column)"),
        (["--columns", "cat,,dog"], "--columns takes column names separated by commas"),
        (["--group-by", "month"], "--group-by names 'month', not a column"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler is for --engine dask"),
        (["--workers", "4"], "--workers sizes the local Dask cluster"),  # was ignored
        (["--engine", "dask", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--workers"),
    ],
)
def test_bad_column_choices_exit_2(
    tmp_path: Path,
    data: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    path = write(tmp_path / "p.csv", csv_text(data))
    assert message in error(capsys, "eval", str(path), *args)


def test_bad_inputs_in_every_new_path_exit_2(
    tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = str(tmp_path / "nothing-*.csv")
    assert f"{pattern}: the pattern matches no file" in error(capsys, "eval", pattern)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "a directory with no predictions files" in error(capsys, "eval", str(tmp_path / "empty"))

    a = write(tmp_path / "a.csv", csv_text(data, 0, 30))
    b = write(tmp_path / "b.csv", csv_text(data, 30, 60, extra=False))
    err = error(capsys, "eval", str(a), str(b), "--exclude", "id")
    assert f"{b}: has other columns than {a} (it lacks id, day)" in err
    # same names, but `day` holds numbers in the second file: there it is a class column
    c = write(tmp_path / "c.csv", csv_text(data, 0, 30))
    d = write(tmp_path / "d.csv", csv_text(data, 30, 60).replace("2024-05-0", ""))
    err = error(capsys, "eval", str(c), str(d), "--exclude", "id")
    assert f"{d}: has other columns than {c} (its class columns are cat, dog, bird, day)" in err
    plain = write(tmp_path / "p.csv", csv_text(data))
    corrupt = tmp_path / "corrupt.csv.gz"
    corrupt.write_bytes(b"this is not gzip data")
    assert f"{corrupt}: cannot read it as csv" in error(capsys, "eval", str(corrupt))
    cut = _compress(plain, ".gz")
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    assert f"{cut}: cannot read it as csv" in error(capsys, "eval", str(cut), "--exclude", "id")
    xz = tmp_path / "corrupt.csv.xz"
    xz.write_bytes(b"not xz")
    assert f"{xz}: cannot read it as csv" in error(capsys, "eval", str(xz))

    (tmp_path / "p.parquet.gz").write_bytes(b"x")
    assert "compressed .parquet are not read" in error(
        capsys, "eval", str(tmp_path / "p.parquet.gz")
    )
    assert "can be given once only" in error(capsys, "eval", "-", "-")
    assert "cannot be combined with other files" in error(capsys, "eval", "-", str(plain))


def test_stdin_is_local_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert "read by the local engine only" in error(capsys, "eval", "-", "--engine", "dask")


def test_version_imports_nothing_heavy() -> None:
    import subprocess

    code = (
        "import sys; from crossent.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'pyarrow', 'pandas', 'torch') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_eval_imports_no_framework(tmp_path: Path) -> None:
    # scoring a Parquet file needs numpy and pyarrow only: torch, JAX, pandas (which
    # pyarrow's to_numpy and read_table import when installed: 0.2 s), scikit-learn and
    # matplotlib stay out
    import subprocess

    pq = pytest.importorskip("pyarrow.parquet")
    data = rows()
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"label": data["y"], **dict(zip(NAMES, data["p"].T, strict=True))}), path
    )
    code = (
        "import io, sys; from crossent.cli import main\n"
        f"assert main(['eval', {str(path)!r}, '--format', 'json'], out=io.StringIO()) == 0\n"
        "frameworks = ('torch', 'jax', 'pandas', 'sklearn', 'matplotlib', 'scipy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in frameworks))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_text_output_of_several_files(tmp_path: Path, data: dict[str, Any]) -> None:
    parts = _shards(tmp_path / "s", data)
    status, text = run("eval", *map(str, parts), "--exclude", "id")
    assert status == 0
    assert text.startswith(f"{parts[0]} {parts[1]} {parts[2]}: 60 rows, 3 classes")


def test_evaluate_checks_its_settings_before_scoring(tmp_path: Path, data: dict[str, Any]) -> None:
    # crossent.cli.evaluate (the command line checks these itself): batch_size=0 looped
    # forever, engine="dsak" scored with the local engine, base=2 or "3" failed with a bare
    # KeyError after every row was read, labels="indices" read labels as indices silently
    from crossent.cli import evaluate

    path = write(tmp_path / "all.csv", csv_text(data))
    nats, _ = evaluate(path, exclude=["id"])
    bits, _ = evaluate(path, exclude=["id"], base=2)
    assert bits["base"] == "2"
    assert bits["log_loss"] == nats["log_loss_nats"] / math.log(2)
    cases = [
        ({"batch_size": 0}, r"`batch_size` must be at least 1; got 0"),
        ({"engine": "dsak"}, r"`engine` must be 'local' or 'dask'; got 'dsak'"),
        ({"base": "3"}, r"`base` must be one of 'e', '2', '10'"),
        ({"labels": "indices"}, r"`labels` must be one of 'auto', 'index', 'name'"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate(path, exclude=["id"], **settings)
