"""``--group-by``: every figure per group equals scoring that group's rows alone."""

from __future__ import annotations

import datetime as dt
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
