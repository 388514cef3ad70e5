"""The documentation's own tools: benchmark-table parsing and rendering, and prose-page doctests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
sys.path[:0] = [str(DOCS / "performance"), str(DOCS / "_ext")]

import collect  # noqa: E402
import crossent_docs  # noqa: E402
import render  # noqa: E402

RIGHT_ALIGNED = """\
     N      C |  torch ms crossent ms  ratio | torch MiB crossent MiB  ratio
   512   4000 |      45.6       261.1   5.73 |      23.2         19.1   0.82
  4096    200 |      52.0         1.2   0.02 |       9.2          9.0   0.98

     N      C |    jax ms crossent-on-jax ms  ratio
   512   4000 |       1.9                2.5   1.35
"""

LEFT_ALIGNED = """\
torch 2.13.0+cpu, 2 threads

## N=512 d=128 V=4000 float32 on cpu; crossent chunk = 512 tokens
   logits (N×V×4 B): 8 MiB; one chunk: 8 MiB
provider      fwd+bwd s  crossent/x  extra MiB  extra/chunk
crossent          0.216        1.00         12         1.53
eager             0.366        0.59         25         3.21
three-GEMM floor: 0.124 s chunked (13 GFLOP/s)
"""


def test_parse_right_aligned_tables_with_single_spaced_headers() -> None:
    tables = collect.parse_tables(RIGHT_ALIGNED)
    assert [t["columns"] for t in tables] == [
        ["N", "C", "torch ms", "crossent ms", "ratio", "torch MiB", "crossent MiB", "ratio"],
        ["N", "C", "jax ms", "crossent-on-jax ms", "ratio"],
    ]
    assert tables[0]["rows"][1] == ["4096", "200", "52.0", "1.2", "0.02", "9.2", "9.0", "0.98"]
    assert len(tables[1]["rows"]) == 1


def test_parse_left_aligned_table_with_its_title() -> None:
    (table,) = collect.parse_tables(LEFT_ALIGNED)
    assert table["columns"] == ["provider", "fwd+bwd s", "crossent/x", "extra MiB", "extra/chunk"]
    assert table["rows"] == [
        ["crossent", "0.216", "1.00", "12", "1.53"],
        ["eager", "0.366", "0.59", "25", "3.21"],
    ]
    assert table["title"].startswith("N=512 d=128 V=4000")


PIPE_TABLE = """validation on; 3 interleaved rounds
PyTorch eager
| case                              |    torch µs | crossent µs | ratio |
|-----------------------------------|-------------|-------------|-------|
| sparse 32x10 float32 fwd eager 1t |         6.4 |        10.5 |  1.65 |
| binary 32x10 float32 fwd eager 1t |         6.8 |        67.2 |  9.88 |

"""


def test_parse_pipe_table_with_spaces_in_cells() -> None:
    (table,) = collect.parse_tables(PIPE_TABLE)
    assert table["title"] == "PyTorch eager"
    assert table["columns"] == ["case", "torch µs", "crossent µs", "ratio"]
    assert table["rows"] == [
        ["sparse 32x10 float32 fwd eager 1t", "6.4", "10.5", "1.65"],
        ["binary 32x10 float32 fwd eager 1t", "6.8", "67.2", "9.88"],
    ]


def test_render_writes_tables_and_a_ratio_figure(tmp_path: Path) -> None:
    results = {
        "benchmarks": {
            "bench_x": {
                "command": "python -m benchmarks.bench_x --quick",
                "date": "2026-01-01 00:00 UTC",
                "machine": {"cpu": "CPU", "cores": 2, "os": "Linux", "python": "3.11",
                            "torch": "2.13.0", "torch_threads": 2},
                "output": RIGHT_ALIGNED,
                "tables": collect.parse_tables(RIGHT_ALIGNED),
            }
        }
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    render.render(path, tmp_path)
    page = (tmp_path / "performance.md").read_text()
    assert "| 512 | 4000 | 45.6 | 261.1 | 5.73 | 23.2 | 19.1 | 0.82 |" in page
    assert "python -m benchmarks.bench_x --quick" in page
    assert "![bench_x, table 1](/_generated/perf_bench_x_1.png)" in page
    assert (tmp_path / "perf_bench_x_1.png").read_bytes()[:4] == b"\x89PNG"


def _run_doctests(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    page = tmp_path / "page.md"
    page.write_text(text)
    app = SimpleNamespace(env=SimpleNamespace(doc2path=lambda name: str(page)))
    warnings: list[str] = []
    monkeypatch.setattr(crossent_docs.logger, "warning", lambda msg, *a, **k: warnings.append(msg % a))
    crossent_docs.run_page_doctests(app, "page", [text])  # type: ignore[arg-type]
    return warnings


def test_page_doctests_run_pycon_blocks_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = "# t\n\n```pycon\n>>> 1 + 1\n2\n```\n\n```python\n>>> 1 + 1\n3\n```\n"
    assert _run_doctests(good, tmp_path, monkeypatch) == []
    bad = "# t\n\n```pycon\n>>> import crossent as ce\n>>> ce.__version__ == 'x'\nTrue\n```\n"
    (warning,) = _run_doctests(bad, tmp_path, monkeypatch)
    assert "1 doctest failure(s) in page" in warning
    assert "ce.__version__ == 'x'" in warning
