"""``--group-by``: every figure per group equals scoring that group's rows alone."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest

from crossent._eval._groups import order_groups
from tests._evaldata import DAYS, assert_same_figures, csv_text, error, rows, run, run_json, write

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return rows(90, seed=5)


def _group_file(tmp: Path, data: dict[str, Any], day: str) -> Path:
    lines = csv_text(data).splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.endswith(day)]
    return write(tmp / f"{day}.csv", "\n".join(kept) + "\n")


def test_every_figure_per_group_equals_the_group_alone(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    path = write(tmp_path / "all.csv", csv_text(data))
    out = run_json("eval", str(path), "--exclude", "id", "--group-by", "day")
    assert_same_figures(out, run_json("eval", str(path), "--exclude", "id"))
    assert out["group_by"] == "day"
    assert out["groups_ordered"] is True
    assert [g["group"] for g in out["groups"]] == DAYS
    assert sum(g["rows"] for g in out["groups"]) == out["rows"]
    for group in out["groups"]:
        alone = run_json(
            "eval", str(_group_file(tmp_path, data, group["group"])), "--exclude", "id,day"
        )
        assert_same_figures(group, alone)
        assert [c["class"] for c in group["per_class"]] == out["classes"]


def test_groups_from_parquet_keep_their_type_and_order(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    p, y = data["p"], data["y"]
    version = [f"v{[2, 10, 1][i % 3]}" for i in range(len(y))]  # v1 < v2 < v10, not "v10" < "v2"
    day = [dt.date(2024, 5, 1 + i % 3) for i in range(len(y))]
    table = pa.table(
        {"label": y, "a": p[:, 0], "b": p[:, 1], "c": p[:, 2], "version": version, "day": day}
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=20)  # groups span batches
    by_version = run_json(
        "eval", str(tmp_path / "p.parquet"), "--group-by", "version", "--batch-size", "16"
    )
    assert [g["group"] for g in by_version["groups"]] == ["v1", "v2", "v10"]
    assert by_version["groups_ordered"] is True
    by_day = run_json("eval", str(tmp_path / "p.parquet"), "--group-by", "day")
    assert [g["group"] for g in by_day["groups"]] == DAYS
    assert [g["rows"] for g in by_day["groups"] + by_version["groups"]] == [30] * 6


def test_order_of_groups() -> None:
    assert order_groups(["mobile", "desktop", "tablet"]) == (["desktop", "mobile", "tablet"], False)
    assert order_groups([3, 1, 2]) == ([1, 2, 3], True)
    assert order_groups(["1.10", "1.9", "1.2.1"]) == (["1.2.1", "1.9", "1.10"], True)
    assert order_groups(["2024-05-10", "2024-05-02"]) == (["2024-05-02", "2024-05-10"], True)
    assert order_groups([True, False]) == ([False, True], False)
    # a file of days beside one of timestamps (a TypeError when compared)
    day, noon = dt.date(2024, 5, 2), dt.datetime(2024, 5, 1, 12)
    assert order_groups([day, noon]) == ([noon, day], True)


def test_a_csv_group_is_its_cell_as_written_in_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # each file's column typed apart: 2024-05-03 a day in one file, a timestamp in the
    # other (two groups, then a TypeError); 1 a number in one, text beside v3 in the other
    days, versions = tmp_path / "days", tmp_path / "versions"
    days.mkdir(), versions.mkdir()
    write(days / "a.csv", "label,p,day\n1,0.9,2024-05-01\n0,0.2,2024-05-03\n")
    write(days / "b.csv", "label,p,day\n1,0.7,2024-05-02 10:00:00\n0,0.4, 2024-05-03\n")
    # and a JSON string "2024-05-01" (a timestamp at midnight to pyarrow) is that day
    write(days / "c.jsonl", '{"label": 1, "p": 0.8, "day": "2024-05-01"}\n')
    out = run_json("eval", str(days), "--group-by", "day")
    assert [g["group"] for g in out["groups"]] == [
        "2024-05-01",
        "2024-05-02 10:00:00",
        "2024-05-03",
    ]
    assert [g["rows"] for g in out["groups"]] == [2, 1, 2]
    assert out["groups_ordered"] is True
    write(versions / "a.csv", "label,p,v\n1,0.9,1\n0,0.2,2\n")
    write(versions / "b.csv", "label,p,v\n1,0.7,1\n0,0.4,v3\n")
    out = run_json("eval", str(versions), "--group-by", "v")
    assert [(g["group"], g["rows"]) for g in out["groups"]] == [("1", 2), ("2", 1), ("v3", 1)]
    expected = -math.fsum([math.log(0.9), math.log(0.7)]) / 2
    assert out["groups"][0]["log_loss_nats"] == pytest.approx(expected, rel=1e-15)
    # a text group cell that is empty is a row of no group, as an empty day is
    write(versions / "b.csv", "label,p,v\n1,0.7,web\n0,0.4,\n")
    err = error(capsys, "eval", str(versions), "--group-by", "v")
    assert f"{versions / 'b.csv'}: row 2 (line 3) has no value in the --group-by column 'v'" in err


def test_text_and_report_show_the_groups(tmp_path: Path, data: dict[str, Any]) -> None:
    path = write(tmp_path / "all.csv", csv_text(data))
    status, text = run("eval", str(path), "--exclude", "id", "--group-by", "day")
    assert status == 0
    assert "by day (3 groups, in order)" in text
    for day in DAYS:
        assert f"\n  {day}  " in text
    out = run_json(
        "eval", str(path), "--exclude", "id", "--group-by", "day", "--report", str(tmp_path / "r")
    )
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<h2>By day</h2>" in page
    assert page.count("<td>2024-05-0") == 3
    assert (tmp_path / "r" / "groups.png").stat().st_size > 1000
    assert out["report"].endswith("index.html")
    # unordered groups: the table, but no plot against the groups' order
    segments = csv_text(data).replace("2024-05-01", "mobile").replace("2024-05-02", "web")
    segments = segments.replace("2024-05-03", "tv")
    run_json(
        "eval",
        str(write(tmp_path / "seg.csv", segments)),
        "--exclude",
        "id",
        "--group-by",
        "day",
        "--report",
        str(tmp_path / "s"),
    )
    assert "<h2>By day</h2>" in (tmp_path / "s" / "index.html").read_text()
    assert not (tmp_path / "s" / "groups.png").exists()


def test_a_group_column_with_nulls_exits_2(
    tmp_path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    text = csv_text(data).splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ","  # row 5 (line 6) has no day
    path = write(tmp_path / "nulls.csv", "\n".join(text) + "\n")
    err = error(capsys, "eval", str(path), "--exclude", "id", "--group-by", "day")
    assert "row 5 (line 6) has no value in the --group-by column 'day'" in err


def test_one_group_value_typed_apart_by_each_format_is_one_group(tmp_path: Path) -> None:
    import json

    rows = {"csv": [(1, 0.9, "2"), (0, 0.2, "10")], "jsonl": [(1, 0.7, 2.0), (0, 0.4, 1.0)]}
    rows["parquet"] = [(1, 0.6, 10), (0, 0.3, 2)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    lines = [f"{y},{p},{g}" for y, p, g in rows["csv"]]
    write(folder / "a.csv", "label,p,g\n" + "\n".join(lines) + "\n")
    lines = [json.dumps({"label": y, "p": p, "g": g}) for y, p, g in rows["jsonl"]]
    write(folder / "b.jsonl", "\n".join(lines) + "\n")
    columns = list(zip(*rows["parquet"], strict=True))
    pq.write_table(pa.table(dict(zip(["label", "p", "g"], columns, strict=True))), folder / "c.pq")
    out = run_json("eval", str(folder), "--group-by", "g")
    assert [(g["group"], g["rows"]) for g in out["groups"]] == [("1", 1), ("2", 3), ("10", 2)]
    assert out["groups_ordered"] is True
    every = [r for rs in rows.values() for r in rs]
    for group in out["groups"]:
        mine = [(y, p) for y, p, g in every if str(int(float(g))) == group["group"]]
        loss = -math.fsum(math.log(p if y else 1 - p) for y, p in mine) / len(mine)
        assert group["log_loss_nats"] == pytest.approx(loss, rel=1e-15)
    # values of one kind keep their type and order
    alone = run_json("eval", str(folder / "c.pq"), "--group-by", "g")
    assert [g["group"] for g in alone["groups"]] == [2, 10]


def test_too_many_groups_exit_2_before_the_states_fill_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group holds a whole metric (its fine calibration histogram: ~0.5 MB): a file
    of 20000 rows grouped by its row id took 11 GB and 112 s, a larger one was killed for
    memory. More than MAX_GROUPS groups now exit 2 naming the column, while reading."""
    import numpy as np

    from crossent._eval import _groups
    from crossent.metrics import Accuracy

    monkeypatch.setattr(_groups, "MAX_GROUPS", 5)
    lines = ["a,b,label,id", *(f"0.25,0.75,{i % 2},{i}" for i in range(8))]
    path = write(tmp_path / "ids.csv", "\n".join(lines) + "\n")
    for batch in ("2", "100"):
        err = error(capsys, "eval", str(path), "--group-by", "id", "--batch-size", batch)
        assert "--group-by column 'id' has more than 5 distinct values" in err
    five = write(tmp_path / "five.csv", "\n".join(lines[:6]) + "\n")
    assert len(run_json("eval", str(five), "--group-by", "id")["groups"]) == 5
    # the Dask engine merges partition states: their groups count together
    halves = []
    for values in ([0, 1, 2], [3, 4, 5]):
        state = _groups.GroupedMetrics(lambda: Accuracy(input_kind="probs"), column="id")
        codes = np.arange(3)
        state.update(np.full((3, 2), 0.5), np.zeros(3, dtype=np.int64), (codes, values))
        halves.append(state)
    with pytest.raises(_groups.CLIError, match="column 'id' has more than 5 distinct values"):
        halves[0].merge(halves[1])


def test_an_integral_number_written_with_a_fraction_is_the_integer_group(tmp_path: Path) -> None:
    """A CSV float column writes 7 as ``7.0`` (pandas) while a Parquet file holds the int 7:
    one group, "7". It was two, "7" and "7.0". Versions and other decimals stay as written
    (``1.10`` is not ``1.1``)."""
    folder = tmp_path / "typed"
    folder.mkdir()
    write(folder / "a.csv", "label,p,g\n1,0.9,7.0\n0,0.2,-3.00\n1,0.6,1e2\n0,0.3,1.10\n")
    table = pa.table({"label": [1, 0, 1, 0], "p": [0.7, 0.4, 0.8, 0.1], "g": [7, -3, 100, 8]})
    pq.write_table(table, folder / "b.parquet")
    write(folder / "c.csv", "label,p,g\n1,0.5,7\n0,0.45,1.1\n")
    out = run_json("eval", str(folder), "--group-by", "g")
    groups = {g["group"]: g["rows"] for g in out["groups"]}
    assert groups == {"-3": 2, "7": 3, "8": 1, "100": 2, "1.1": 1, "1.10": 1}
    sevens = [(1, 0.9), (1, 0.7), (1, 0.5)]
    loss = -math.fsum(math.log(p) for _, p in sevens) / 3
    assert next(g for g in out["groups"] if g["group"] == "7")["log_loss_nats"] == pytest.approx(
        loss, rel=1e-15
    )
