"""The ``crossent`` command line: ``eval`` a predictions file, run the ``demo``, ``bench``.

``crossent eval FILE ...`` streams predictions files (CSV, Parquet, JSONL,
.npy or .npz; several files, directories or globs as one table; compressed
CSV/JSONL; ``-`` for stdin) in batches through
:class:`crossent.metrics.ClassificationMetrics` (or the binary metrics for one
P(label = 1) column), per ``--group-by`` group as well, locally or on Dask
(``--engine dask``), and prints the figures as text or JSON; ``--report DIR``
also writes an HTML report. Exit status: 0 on success, 2 on a malformed file or bad arguments,
with a message that names the problem and, for a bad row, the row.

This module is argument handling only: the readers, column resolution,
label parsing and the scoring loop live in ``crossent._eval``. pyarrow,
tqdm and matplotlib (the ``metrics`` extra) are imported only by the
subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from crossent._eval._errors import CLIError, too_many_bins

if TYPE_CHECKING:
    from crossent._eval import evaluate, open_table

__all__ = ["CLIError", "evaluate", "main", "open_table"]


def __getattr__(name: str) -> Any:
    # re-exports, imported on first use: `crossent --version` must not import numpy
    if name in ("evaluate", "open_table"):
        import crossent._eval

        return getattr(crossent._eval, name)
    msg = f"module 'crossent.cli' has no attribute {name!r}"
    raise AttributeError(msg)


BASES = {"e": None, "2": 2.0, "10": 10.0}


def _names(text: str | None, option: str) -> list[str] | None:
    """A comma-separated column list (``--columns a,b``), without blanks."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        msg = f"{option} takes column names separated by commas; got {text!r}."
        raise CLIError(msg)
    return names


def _cmd_eval(args: argparse.Namespace, out: IO[str]) -> int:
    if args.bins < 1:
        msg = f"--bins must be at least 1; got {args.bins}."
        raise CLIError(msg)
    too_many = too_many_bins(args.bins, "--bins")
    if too_many is not None:
        raise CLIError(too_many)
    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1; got {args.batch_size}."
        raise CLIError(msg)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be at least 1; got {args.workers}."
        raise CLIError(msg)
    if args.scheduler is not None and args.engine != "dask":
        msg = "--scheduler is for --engine dask; add --engine dask, or drop --scheduler."
        raise CLIError(msg)
    if args.workers is not None and (args.engine != "dask" or args.scheduler is not None):
        msg = (
            "--workers sizes the local Dask cluster of --engine dask (a --scheduler's "
            "cluster has its own workers); add --engine dask, or drop --workers."
        )
        raise CLIError(msg)
    if args.report is not None:  # before scoring: a big file is not read to fail at the end
        _report_folder(args.report)
    from crossent._eval import _memory, evaluate, format_text, to_json

    _memory.reuse_freed_memory()  # this process scores: each batch reuses the memory of the last
    summary, metric = evaluate(
        args.file,
        label_column=args.label_column,
        input_kind=args.input,
        bins=args.bins,
        base=args.base,
        labels=args.labels,
        batch_size=args.batch_size,
        progress=progress,
        columns=_names(args.columns, "--columns"),
        exclude=_names(args.exclude, "--exclude") or (),
        group_by=args.group_by,
        engine=args.engine,
        scheduler=args.scheduler,
        workers=args.workers,
    )
    if args.report is not None:
        from crossent._report import write_report

        try:
            html = write_report(
                Path(args.report),
                summary=summary,
                reliability=metric.reliability(),
                title=f"crossent eval {' '.join(Path(f).name for f in args.file)}",
            )
        except ImportError as exc:
            raise CLIError(str(exc)) from exc
        except OSError as exc:
            raise CLIError(_report_error(args.report, exc)) from exc
        summary["report"] = str(html)
    if args.format == "json":
        out.write(to_json(summary) + "\n")
    else:
        out.write(format_text(summary) + "\n")
        if args.report is not None:
            out.write(f"report: {summary['report']}\n")
    return 0


def _report_error(folder: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != folder else ""
    return f"--report {folder}: cannot write the report there: {reason}{where}. Pick another."


def _report_folder(folder: str) -> None:
    """Create the --report folder (a CLIError, exit 2, where that is impossible)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(_report_error(folder, exc)) from exc


# =================================================================== demo and bench


def _cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from crossent._demo import run_demo

    if args.seed < 0:
        msg = f"--seed must be a non-negative integer; got {args.seed}."
        raise CLIError(msg)
    if not args.no_report:
        _report_folder(args.report)
    try:
        run_demo(
            fast=args.fast,
            report_dir=None if args.no_report else Path(args.report),
            seed=args.seed,
            out=out,
            progress=sys.stderr.isatty(),
        )
    except ImportError as exc:  # scikit-learn or matplotlib missing: say which extra
        raise CLIError(str(exc)) from exc
    return 0


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (next to ``src/``)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _cmd_bench(args: argparse.Namespace, out: IO[str]) -> int:
    import subprocess

    folder = Path(args.dir) if args.dir else benchmarks_dir()
    if not folder.is_dir():
        msg = (
            f"no benchmarks folder at {folder}: the benchmark scripts live in the source "
            "repository, not in an installed package. Run `crossent bench` from a clone "
            "(pip install -e .), or pass --dir PATH."
        )
        raise CLIError(msg)
    scripts = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if any(word in p.stem for word in args.only)]
    if not scripts:
        msg = f"no benchmark scripts (*.py) in {folder}" + (
            f" matching {', '.join(args.only)}." if args.only else "."
        )
        raise CLIError(msg)
    failed = []
    for script in scripts:
        # run as a module of the folder's package, so scripts share helpers (benchmarks._util)
        module = f"{script.parent.name}.{script.stem}"
        command = [sys.executable, "-m", module, *(["--quick"] if args.quick else [])]
        out.write(f"== {script.name} {'(quick)' if args.quick else ''}\n")
        out.flush()
        # forward the script's output line by line, as it comes (long benchmarks)
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=script.parent.parent,
        ) as proc:
            for line in proc.stdout or ():
                out.write(line)
                out.flush()
        if proc.returncode != 0:
            failed.append(script.name)
            out.write(f"!! {script.name} exited with status {proc.returncode}\n")
        out.flush()
    if failed:
        out.write(f"{len(failed)} of {len(scripts)} benchmarks failed: {', '.join(failed)}\n")
        return 1
    return 0


# =================================================================== argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossent",
        description="Cross-entropy tools: score a predictions file, run the demo, run benchmarks.",
    )
    from crossent import __version__

    parser.add_argument("--version", action="version", version=f"crossent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,demo,bench}")

    ev = sub.add_parser(
        "eval",
        help="score a predictions file (log loss, accuracy, Brier, calibration)",
        description=(
            "Score a predictions file: CSV/TSV, Parquet, JSONL, .npy (structured) or .npz. "
            "One column holds the label (a class name or an integer index); every other "
            "numeric column is one class, named by its column, in file order - or a single "
            "list column holds each row's predictions; a single class column is binary: "
            "P(label = 1), labels 0/1 or true/false. The files are streamed in batches. "
            "Exit status 0 on success, 2 on a malformed file or bad arguments."
        ),
    )
    ev.add_argument(
        "file",
        nargs="+",
        metavar="FILE",
        help=(
            "predictions files, directories or quoted globs, scored as one table (same columns "
            "in each, each file once); .gz, .bz2, .xz and .zst CSV/JSONL are read by extension; "
            "- is CSV on stdin"
        ),
    )
    ev.add_argument(
        "--label-column", default="label", help="name of the label column (default: label)"
    )
    ev.add_argument(
        "--input",
        choices=("probs", "logits", "log_probs"),
        default="probs",
        help="what the class columns hold (default: probs)",
    )
    ev.add_argument(
        "--base",
        choices=tuple(BASES),
        default="e",
        help="log base of `log_loss` (nats and bits are always reported too; default: e)",
    )
    ev.add_argument(
        "--bins", type=int, default=15, help="calibration bins (default: 15; at most 10000)"
    )
    ev.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    ev.add_argument("--report", metavar="DIR", help="write an HTML report (and its PNGs) into DIR")
    ev.add_argument(
        "--labels",
        choices=("auto", "index", "name"),
        default="auto",
        help=(
            "how to read labels (default: auto: as class names when every class name is an "
            "integer, e.g. columns 3,5,7; otherwise integers are indices and text is a name)"
        ),
    )
    ev.add_argument(
        "--columns",
        metavar="A,B,...",
        help="the class columns, in class order (default: every numeric column but the label); "
        "one column means binary predictions: P(label = 1), labels 0/1 or true/false",
    )
    ev.add_argument(
        "--exclude",
        metavar="C,...",
        help="columns left out of the automatic choice of class columns (ids, timestamps)",
    )
    ev.add_argument(
        "--group-by",
        metavar="COL",
        help="report every figure per value of COL (a model version, a day) and overall",
    )
    ev.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="local: stream in this process (default); dask: one task per file on a Dask "
        "cluster, states merged in a tree (pip install 'crossent[dask]')",
    )
    ev.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="the dask.distributed scheduler (default: start a local cluster)",
    )
    ev.add_argument(
        "--workers",
        type=int,
        help="worker processes of the local Dask cluster (default: one per CPU)",
    )
    ev.add_argument("--batch-size", type=int, default=65536, help="rows per batch (default: 65536)")
    ev.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    ev.set_defaults(run=_cmd_eval)

    demo = sub.add_parser(
        "demo",
        help="train softmax regression on scikit-learn's digits with crossent's losses",
        description=(
            "Train softmax-regression classifiers on an imbalanced version of scikit-learn's "
            "digits data with crossent's own losses and closed-form gradients (plain "
            "cross-entropy, label smoothing, class weights, focal loss), print held-out "
            "cross-entropy in bits, accuracy and calibration error, and write an HTML report "
            "for the best model."
        ),
    )
    demo.add_argument("--fast", action="store_true", help="few iterations (for CI)")
    demo.add_argument(
        "--report",
        default="crossent-report",
        metavar="DIR",
        help="report folder (default: crossent-report)",
    )
    demo.add_argument("--no-report", action="store_true", help="do not write the report")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(run=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark scripts in benchmarks/ and print their tables",
        description="Run every benchmarks/*.py script of the repository; print their tables.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes (passed to each script)")
    bench.add_argument(
        "--only", nargs="+", metavar="NAME", help="only scripts whose name contains NAME"
    )
    bench.add_argument("--dir", help="the benchmarks folder (default: the repository's)")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None, *, out: IO[str] | None = None) -> int:
    """Run the ``crossent`` command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``crossent`` (``sys.argv[1:]`` when None).
    out : file, optional
        Where results go (standard output when None); errors go to stderr.

    Returns
    -------
    int
        0 on success, 1 when a benchmark script failed, 2 on a malformed file
        or bad arguments (argparse exits with 2 itself for unknown options).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "predictions.npz"
    >>> np.savez(path, label=np.array([0, 1]), probs=np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> main(["eval", str(path), "--format", "json"])  # doctest: +ELLIPSIS
    {
      "file": ...,
      "rows": 2,
      "log_loss_nats": 0.490...,
      "log_loss_bits": 0.707...,
    ...
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    stream = sys.stdout if out is None else out
    try:
        status: int = args.run(args, stream)
    except CLIError as exc:
        stream.flush()
        print(f"crossent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `crossent eval ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status
