"""The Dask engine against the local one: a LocalCluster of 2 worker processes on 127.0.0.1.

One cluster serves the whole module (starting one takes seconds) and is shut down after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._evaldata import NAMES, assert_same_figures, csv_text, error, rows, run_json, write

distributed = pytest.importorskip("distributed")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",  # a free port: never clash with a running dashboard
    ) as local:
        yield local


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return rows(120, seed=7)


def _parquet_shards(folder: Path, data: dict[str, Any], shards: int = 4) -> Path:
    folder.mkdir()
    size = len(data["y"]) // shards
    for i in range(shards):
        s = slice(i * size, (i + 1) * size)
        table = pa.table(
            {
                "label": [NAMES[t] for t in data["y"][s]],
                **{n: data["p"][s, k] for k, n in enumerate(NAMES)},
                "day": data["day"][s],
            }
        )
        pq.write_table(table, folder / f"part-{i}.parquet")
    return folder


def test_cli_dask_engine_equals_local(cluster: Any, tmp_path: Path, data: dict[str, Any]) -> None:
    folder = _parquet_shards(tmp_path / "shards", data)
    local = run_json("eval", str(folder), "--group-by", "day")
    remote = run_json(
        "eval",
        str(folder),
        "--group-by",
        "day",
        "--engine",
        "dask",
        "--scheduler",
        cluster.scheduler_address,
    )
    assert remote["files"] == 4
    assert_same_figures(remote, local, rtol=0)  # exact sums: bit-identical
    assert [g["group"] for g in remote["groups"]] == [g["group"] for g in local["groups"]]
    for a, b in zip(remote["groups"], local["groups"], strict=True):
        assert_same_figures(a, b, rtol=0)


def test_cli_dask_engine_compressed_csv_and_bad_rows(
    cluster: Any, tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import gzip

    folder = tmp_path / "csv"
    folder.mkdir()
    for i in range(3):
        text = csv_text(data, 40 * i, 40 * (i + 1))
        (folder / f"p{i}.csv.gz").write_bytes(gzip.compress(text.encode()))
    args = ("eval", str(folder), "--exclude", "id")
    remote = run_json(*args, "--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert_same_figures(remote, run_json(*args), rtol=0)
    # a bad row on a worker: exit 2, naming the file and the row
    bad = csv_text(data, 0, 40).splitlines()
    bad[3] = bad[3].replace(",", ",-", 1)
    write(folder / "p9.csv", "\n".join(bad) + "\n")
    err = error(capsys, *args, "--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert f"{folder / 'p9.csv'}: row 3 (line 4) has a value -" in err


def test_evaluate_dask_on_a_dataframe(cluster: Any, tmp_path: Path, data: dict[str, Any]) -> None:
    from crossent.metrics import evaluate_dask

    frame = pd.DataFrame(
        {"label": data["y"], **{n: data["p"][:, k] for k, n in enumerate(NAMES)}, "id": data["id"]}
    )
    path = write(tmp_path / "all.csv", csv_text(data))
    local = run_json("eval", str(path), "--exclude", "id,day", "--labels", "name")
    with distributed.Client(cluster) as client:
        assert client.scheduler_info()["workers"]
        figures = evaluate_dask(dd.from_pandas(frame, npartitions=5), exclude=["id"])
        binary = evaluate_dask(
            dd.from_pandas(
                frame.assign(label=(frame["label"] == 1), p=frame["dog"]), npartitions=3
            ),
            columns=["p"],
        )
        with pytest.raises(ValueError, match=r"partition \d: row \d+ has label '7'"):
            evaluate_dask(dd.from_pandas(frame.assign(label=7), npartitions=2), exclude=["id"])
        with pytest.raises(ValueError, match="--columns names 'wolf', not a column"):
            evaluate_dask(dd.from_pandas(frame, npartitions=2), columns=["wolf"])
    assert figures["classes"] == NAMES
    assert_same_figures(figures, local, rtol=0)  # other batches, the same figures bit for bit
    assert binary["binary"] is True
    dog = data["p"][:, 1]
    y = (data["y"] == 1).astype(float)
    expected = -np.mean(y * np.log(dog) + (1 - y) * np.log1p(-dog))
    assert binary["log_loss_nats"] == pytest.approx(expected, rel=1e-12)


def _one_parquet(path: Path, data: dict[str, Any], row_group_size: int) -> Path:
    table = pa.table(
        {
            "label": [NAMES[t] for t in data["y"]],
            **{n: data["p"][:, k] for k, n in enumerate(NAMES)},
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_large_parquet_file_split_by_row_groups(tmp_path: Path, data: dict[str, Any]) -> None:
    from crossent._eval._evaluate import file_parts
    from crossent._eval._parquet import row_group_parts

    path = _one_parquet(tmp_path / "one.parquet", data, row_group_size=10)  # 12 row groups
    assert row_group_parts(path, 25) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert row_group_parts(path, 35) == [(0, 4), (4, 8), (8, 12)]
    assert row_group_parts(path, 50) == [(0, 5), (5, 12)]  # a short tail joins the last run
    assert row_group_parts(path, 10_000) == [(0, 12)]
    assert file_parts(path, 8) == [(0, 4), (4, 8), (8, 12)]  # runs of >= 4 batches of 8 rows
    assert file_parts(path, 65536) == [None]  # small: the whole file is one partition
    csv = write(tmp_path / "one.csv", csv_text(data))
    assert file_parts(csv, 8) == [None]


def test_cli_dask_engine_splits_one_parquet_file(
    cluster: Any, tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _one_parquet(tmp_path / "one.parquet", data, row_group_size=10)
    dask = ("--engine", "dask", "--scheduler", cluster.scheduler_address, "--batch-size", "8")
    local = run_json("eval", str(path), "--batch-size", "8")
    remote = run_json("eval", str(path), *dask)
    assert remote["files"] == 1
    assert_same_figures(remote, local, rtol=0)
    # a bad row in the third partition is named by its row in the file, not in the partition
    bad = data | {"p": data["p"].copy()}
    bad["p"][97, 0] = -0.25
    _one_parquet(path, bad, row_group_size=10)
    err = error(capsys, "eval", str(path), *dask)
    assert f"{path}: row 98 has a value -0.25 outside [0, 1]" in err
    assert error(capsys, "eval", str(path), "--batch-size", "8") == err  # as the local engine


def test_cli_unreachable_scheduler(
    tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    import socket
    import time

    from crossent._eval import _dask

    monkeypatch.setattr(_dask, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path / "p.csv", csv_text(data, extra=False))
    start = time.monotonic()
    err = error(
        capsys, "eval", str(path), "--engine", "dask", "--scheduler", f"tcp://127.0.0.1:{port}"
    )
    assert time.monotonic() - start < 30
    assert f"--scheduler tcp://127.0.0.1:{port}: cannot connect to a Dask scheduler there" in err


def test_cli_dask_engine_refuses_a_file_named_twice(
    cluster: Any, tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file named twice was scored twice on both engines (120 rows as 160): now exit 2 on
    both, naming it, before a task starts."""
    paths = [
        str(write(tmp_path / f"p{i}.csv", csv_text(data, 40 * i, 40 * (i + 1)))) for i in range(3)
    ]
    for engine in (
        ("--engine", "local"),
        ("--engine", "dask", "--scheduler", cluster.scheduler_address),
    ):
        err = error(capsys, "eval", *paths, paths[0], "--exclude", "id", *engine)
        assert f"{paths[0]}: named twice" in err
        assert "its rows would be scored twice" in err


def test_merge_pair_leaves_its_inputs_unchanged(data: dict[str, Any]) -> None:
    """A Dask task's state may be read by several merges (and a distributed scheduler may run
    one merge twice): merging into a copy keeps each input as it was. It merged in place into
    its first input, so a file named twice counted the files merged into it twice (170 rows
    as 240) before such calls were refused."""
    from crossent._eval._dask import merge_pair
    from crossent.metrics import ClassificationMetrics

    def state(lo: int, hi: int) -> Any:
        m = ClassificationMetrics(num_classes=len(NAMES), input_kind="probs")
        m.update(np.asarray(data["p"][lo:hi]), np.asarray(data["y"][lo:hi]))
        return m

    a, b, whole = state(0, 50), state(50, 120), state(0, 120)
    merged = merge_pair(a, b)
    again = merge_pair(a, b)  # the inputs as they were: the same result
    np.testing.assert_equal(merged.compute(), whole.compute())
    np.testing.assert_equal(again.compute(), whole.compute())
    np.testing.assert_equal(a.compute(), state(0, 50).compute())
    np.testing.assert_equal(b.compute(), state(50, 120).compute())


def test_cli_dask_engine_list_columns_of_other_lengths_are_the_local_error(
    cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # each task numbered the classes of its own list column: the merge of 3 and 4 classes
    # raised a ValueError traceback (exit 1) where the local engine names the file and row
    folder = tmp_path / "lists"
    folder.mkdir()
    pq.write_table(
        pa.table({"label": [0, 1], "p": [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]}), folder / "a.parquet"
    )
    pq.write_table(
        pa.table({"label": [0, 3], "p": [[0.5, 0.3, 0.1, 0.1]] * 2}), folder / "b.parquet"
    )
    local = error(capsys, "eval", str(folder))
    assert "b.parquet: row 1 has 4 predictions" in local
    dask = ("--engine", "dask", "--scheduler", cluster.scheduler_address)
    assert "b.parquet: row 1 has 4 predictions" in error(capsys, "eval", str(folder), *dask)
    (folder / "b.parquet").unlink()
    pq.write_table(pa.table({"label": [2, 0], "p": [[0.1, 0.1, 0.8]] * 2}), folder / "b.parquet")
    assert_same_figures(run_json("eval", str(folder), *dask), run_json("eval", str(folder)))


def test_cli_dask_engine_errors_are_the_local_ones(
    cluster: Any,
    tmp_path: Path,
    data: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a damaged Parquet file after the first: a pyarrow traceback (its row groups were
    # read on the client to split it); files named as given, not by their absolute path
    monkeypatch.chdir(tmp_path)
    _parquet_shards(tmp_path / "shards", data, shards=2)
    write(tmp_path / "shards" / "part-2.parquet", "not a parquet file\n")
    dask = ("--engine", "dask", "--scheduler", cluster.scheduler_address)
    err = error(capsys, "eval", "shards", "--group-by", "day")
    assert err.startswith("crossent eval: error: shards/part-2.parquet: cannot read it as parquet")
    assert error(capsys, "eval", "shards", "--group-by", "day", *dask) == err
    (tmp_path / "shards" / "part-2.parquet").unlink()
    lines = [line.split(",") for line in csv_text(data, 0, 30).splitlines()]
    lines[2][1] = "-" + lines[2][1]  # row 2 (line 3): a negative probability
    write(
        tmp_path / "shards" / "part-3.csv", "".join(",".join(c[:4] + c[5:]) + "\n" for c in lines)
    )
    err = error(capsys, "eval", "shards", "--group-by", "day")
    assert err.startswith("crossent eval: error: shards/part-3.csv: row 2 (line 3) has a value -")
    assert error(capsys, "eval", "shards", "--group-by", "day", *dask) == err


def test_evaluate_dask_on_repartitioned_text_columns(data: dict[str, Any]) -> None:
    # a pyarrow-backed string column made of several chunks (concatenated partitions)
    # is no RecordBatch column: a TypeError traceback
    import dask

    from crossent.metrics import evaluate_dask

    frame = pd.DataFrame(
        {
            "label": pd.array([NAMES[t] for t in data["y"]], dtype="string[pyarrow]"),
            **{n: data["p"][:, k] for k, n in enumerate(NAMES)},
            "day": pd.array(data["day"], dtype="string[pyarrow]"),
        }
    )
    parts = dd.from_pandas(frame, npartitions=6)
    with dask.config.set(scheduler="sync"):
        whole = evaluate_dask(parts.repartition(npartitions=2), group_by="day")
        split = evaluate_dask(parts, group_by="day")
    assert whole["rows"] == len(frame)
    assert_same_figures(whole, split, rtol=0)
    for a, b in zip(whole["groups"], split["groups"], strict=True):
        assert a["group"] == b["group"]
        assert_same_figures(a, b, rtol=0)


def test_evaluate_dask_on_a_frame_without_rows_raises(data: dict[str, Any]) -> None:
    # NaN figures came back where the command line exits 2 ("has no rows")
    import dask

    from crossent.metrics import evaluate_dask

    frame = pd.DataFrame({"label": data["y"], **{n: data["p"][:, k] for k, n in enumerate(NAMES)}})
    empty = dd.from_pandas(frame, npartitions=2)
    empty = empty[empty["label"] < 0]
    with dask.config.set(scheduler="sync"), pytest.raises(ValueError, match="`frame` has no rows"):
        evaluate_dask(empty)


def test_evaluate_dask_takes_the_base_as_a_number_and_checks_its_settings(
    data: dict[str, Any],
) -> None:
    # base=2 (as CrossEntropy(base=2) takes it) and base="3" scored every partition, then
    # failed with a bare KeyError; labels="indices" read the labels as indices silently
    import dask

    from crossent.metrics import evaluate_dask

    frame = pd.DataFrame({"label": data["y"], **{n: data["p"][:, k] for k, n in enumerate(NAMES)}})
    parts = dd.from_pandas(frame, npartitions=2)
    with dask.config.set(scheduler="sync"):
        nats = evaluate_dask(parts)
        for base, unit in ((2, "2"), (10, "10"), (math.e, "e"), ("2", "2")):
            figures = evaluate_dask(parts, base=base)
            assert figures["base"] == unit
            expected = nats["log_loss_nats"] / math.log(float(base) if unit != "e" else math.e)
            assert figures["log_loss"] == pytest.approx(expected, rel=1e-15)
        for bad in ("3", 3, None, True, "bits"):
            with pytest.raises(ValueError, match=r"`base` must be one of 'e', '2', '10'"):
                evaluate_dask(parts, base=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`labels` must be one of 'auto', 'index', 'name'"):
            evaluate_dask(parts, labels="indices")
