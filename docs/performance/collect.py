"""Run the benchmark scripts and save their output for the Performance page.

Usage, from the repository root::

    .venv/bin/python docs/performance/collect.py --quick          # every benchmarks/*.py
    .venv/bin/python docs/performance/collect.py --quick fused    # refresh one script's entry

Each script runs as ``python -m benchmarks.<name> [--quick]``, exactly as
``crossent bench`` runs it; its printed tables are parsed (columns found from
the numbers' positions, headers matched to them) and stored with the raw text,
the command, the date and the machine in ``docs/performance/results.json``.
Entries of scripts not named keep their previous results. The docs build
(``docs/performance/render.py``) turns that file into the page's tables and
figures, so re-running this refreshes the page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results.json"
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?x?$")


def _is_number(token: str) -> bool:
    return bool(_NUMBER.match(token)) or token in {"-", "n/a", "nan", "inf"}


def _spans(line: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", line) if m.group() != "|"]


def _title(lines: list[str], header: int) -> str:
    """The nearest ``#`` line above a table's header, within its paragraph ("" when none)."""
    for k in range(header - 1, -1, -1):
        if not lines[k].strip():
            break
        if lines[k].lstrip().startswith("#"):
            return lines[k].lstrip("# ").strip()
    return ""


_PIPE_RULE = re.compile(r"^\s*\|[-:| ]+\|\s*$")


def _cells(line: str) -> list[str]:
    """The cells of a Markdown pipe-table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> list[dict[str, object]]:
    """Tables in a script's output: Markdown pipe tables, and a header line followed by
    rows of equally many tokens, mostly numbers.

    Columns are the rows' token positions; each header word goes to the column
    it overlaps (or the nearest one), so left- and right-aligned layouts parse alike.
    """
    lines = text.splitlines()
    tables: list[dict[str, object]] = []
    i = 1
    while i < len(lines):
        if _PIPE_RULE.match(lines[i]) and lines[i - 1].lstrip().startswith("|"):
            j = i + 1
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            title = lines[i - 2].strip() if i >= 2 and not lines[i - 2].startswith("|") else ""
            tables.append({"title": title.lstrip("# "), "columns": _cells(lines[i - 1]),
                           "rows": [_cells(line) for line in lines[i + 1 : j]]})  # fmt: skip
            i = j + 1
            continue
        row = _spans(lines[i])
        width = len(row)
        if width < 2 or sum(_is_number(t) for *_, t in row) < width / 2:
            i += 1
            continue
        j = i
        rows = []
        while j < len(lines) and len(_spans(lines[j])) == width:
            rows.append(_spans(lines[j]))
            j += 1
        header = _spans(lines[i - 1])
        if not header or len(rows) < 1:
            i = j + 1
            continue
        phrases = [p for p in re.split(r"\s{2,}|\s*\|\s*", lines[i - 1].strip()) if p]
        extents = [(min(r[k][0] for r in rows), max(r[k][1] for r in rows)) for k in range(width)]
        names: list[list[str]] = [[] for _ in range(width)]
        for start, end, word in header:

            def distance(ext: tuple[int, int], start: int = start, end: int = end) -> int:
                overlap = min(end, ext[1]) - max(start, ext[0])
                return -overlap if overlap > 0 else min(abs(start - ext[1]), abs(end - ext[0]))

            names[min(range(width), key=lambda k: distance(extents[k]))].append(word)
        columns = [" ".join(n) or f"column {k + 1}" for k, n in enumerate(names)]
        if len(phrases) == width:  # headers set apart by two spaces or more: take them as they are
            columns = phrases
        tables.append({"title": _title(lines, i - 1), "columns": columns,
                       "rows": [[t for *_, t in r] for r in rows]})  # fmt: skip
        i = j + 1
    return tables


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(terse=True),
    }


def store_log(output: Path, name: str, log: Path, machine_text: str, command: str) -> None:
    """Store the saved output `log` of benchmark `name`, run elsewhere, in the results file."""
    results = json.loads(output.read_text()) if output.exists() else {"benchmarks": {}}
    out = log.read_text()
    results["benchmarks"][name] = {
        "command": command or f"python -m benchmarks.{name}",
        "date": datetime.datetime.fromtimestamp(log.stat().st_mtime, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": {"description": machine_text} if machine_text else machine(),
        "output": out,
        "tables": parse_tables(out),
        "external": True,
    }
    output.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", help="benchmark names (default: every script)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each script")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file")
    parser.add_argument(
        "--log",
        type=Path,
        help="store this saved output of the one script named (a run on another machine, "
        "such as gpu_check on a GPU) instead of running it here",
    )
    parser.add_argument("--machine", default="", help="with --log: that machine, in words")
    parser.add_argument("--command", default="", help="with --log: the command that printed it")
    args = parser.parse_args(argv)
    if args.log is not None:
        if len(args.scripts) != 1:
            parser.error("--log stores the output of exactly one script: name it")
        store_log(args.output, args.scripts[0], args.log, args.machine, args.command)
        return
    names = args.scripts or sorted(
        p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_")
    )
    results = json.loads(args.output.read_text()) if args.output.exists() else {"benchmarks": {}}
    failed = []
    for name in names:
        if results["benchmarks"].get(name, {}).get("external"):
            print(f"{name}: kept (run on another machine; refresh it with --log)")
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        print("+", " ".join(cmd[1:]), flush=True)
        run = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True)
        print(run.stdout, run.stderr[-2000:] if run.returncode else "", flush=True)
        if run.returncode:  # a script that cannot run here (a GPU-only one): keep its old entry
            failed.append(name)
            continue
        out = run.stdout
        results["benchmarks"][name] = {
            "command": "python " + " ".join(cmd[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "output": out,
            "tables": parse_tables(out),
        }
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    if failed:
        print(f"failed (previous results kept): {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
