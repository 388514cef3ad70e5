"""Sphinx extension of the crossent docs: generated pages and executed prose examples.

* API reference: one page per public module, listing every name of its
  ``__all__`` in an ``autosummary`` table (so a name added to the package appears
  without editing the docs); written to ``docs/api/`` before autosummary runs.
* Doctests of the prose pages: every ``pycon`` block of a MyST page is run when
  the page is read; a failure is a build warning (an error under ``-W``).
* ``crossent --help`` texts and the performance tables/figures, from the
  benchmark results committed in ``docs/performance/results.json``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

import crossent

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
GENERATED = DOCS / "_generated"

MODULE_TITLES = {
    "crossent": "Losses and settings (``crossent``)",
    "crossent.info": "Information measures (``crossent.info``)",
    "crossent.nn": "PyTorch modules (``crossent.nn``)",
    "crossent.fused": "Fused linear cross-entropy (``crossent.fused``)",
    "crossent.distributed": "Vocabulary-parallel losses (``crossent.distributed``)",
    "crossent.metrics": "Streaming metrics (``crossent.metrics``)",
    "crossent.cli": "Command-line entry point (``crossent.cli``)",
    "crossent.integrations.transformers": "Hugging Face integration "
    "(``crossent.integrations.transformers``)",
}


def public_modules() -> list[str]:
    """``crossent`` and every public subpackage (recursively) that declares ``__all__``."""
    found = ["crossent"]
    for info in pkgutil.walk_packages(crossent.__path__, "crossent."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency is missing: documented where it is installed
            continue
        if hasattr(module, "__all__"):
            found.append(info.name)
    return found


def public_names(module_name: str) -> tuple[list[str], list[str]]:
    """(documented objects, submodules) of a module's ``__all__``."""
    module = importlib.import_module(module_name)
    objects, submodules = [], []
    for name in module.__all__:
        if name == "__version__":
            continue
        value = getattr(module, name)
        (submodules if type(value).__name__ == "module" else objects).append(name)
    return objects, submodules


def _api_page(module_name: str) -> str:
    module = importlib.import_module(module_name)
    objects, submodules = public_names(module_name)
    title = MODULE_TITLES.get(module_name, f"``{module_name}``")
    lines = [title, "=" * len(title), "", f".. automodule:: {module_name}", "   :no-members:", ""]
    if module_name == "crossent":
        lines += [
            ".. py:data:: __version__",
            "",
            f"   The version of the package, ``{crossent.__version__}``.",
            "",
        ]
    if submodules:
        lines += ["Subpackages: " + ", ".join(f":mod:`{module_name}.{s}`" for s in submodules), ""]
    if objects:
        lines += [f".. currentmodule:: {module_name}", "", ".. autosummary::",
                  "   :toctree: generated/", "   :nosignatures:", ""]  # fmt: skip
        lines += [f"   {name}" for name in objects]
        lines.append("")
    del module
    return "\n".join(lines)


def write_api_pages(app: Sphinx, config: object = None) -> None:
    """Write docs/api/<module>.rst for every public module, and the API index toctree."""
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    order = list(MODULE_TITLES)
    modules = sorted(public_modules(), key=lambda m: (order.index(m) if m in order else 99, m))
    for name in modules:
        _write_if_changed(api / f"{name}.rst", _api_page(name))
    toc = ["API reference", "=============", "",
           "Every public name of the package, generated from its docstrings.", "",
           ".. toctree::", "   :maxdepth: 2", ""]  # fmt: skip
    toc += [f"   {name}" for name in modules]
    toc += ["   cli", ""]
    _write_if_changed(api / "index.rst", "\n".join(toc))


def write_cli_help(app: Sphinx) -> None:
    """``crossent --help`` and each subcommand's, for the command-line page."""
    GENERATED.mkdir(exist_ok=True)
    for args in ([], ["eval"], ["demo"], ["bench"]):
        text = subprocess.run(
            [sys.executable, "-m", "crossent", *args, "--help"],
            check=True, capture_output=True, text=True, env={"COLUMNS": "88", "PATH": ""},
        ).stdout  # fmt: skip
        name = "_".join(["crossent", *args])
        _write_if_changed(GENERATED / f"{name}.txt", text.replace(Path.cwd().as_posix(), "."))


def write_performance(app: Sphinx) -> None:
    """Tables (MyST) and figures from docs/performance/results.json."""
    sys.path.insert(0, str(DOCS / "performance"))
    try:
        import render  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    GENERATED.mkdir(exist_ok=True)
    render.render(DOCS / "performance" / "results.json", GENERATED)


def write_home_figure(app: Sphinx) -> None:
    """The home page's figure: the surprisal of an event, in bits, against its probability."""
    import matplotlib.pyplot as plt
    import numpy as np

    p = np.linspace(0.005, 1.0, 400)
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    ax.plot(p, np.asarray(crossent.info.surprisal(p, base=2)), lw=2)
    for prob, text in ((0.5, "a fair coin lands heads: 1 bit"), (0.25, "rain at 25%: 2 bits")):
        ax.plot(prob, -np.log2(prob), "o", color="C3")
        ax.annotate(text, (prob, -np.log2(prob)), xytext=(8, 6), textcoords="offset points")
    ax.set_xlabel("probability of the event")
    ax.set_ylabel("surprisal (bits)")
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    GENERATED.mkdir(exist_ok=True)
    fig.savefig(GENERATED / "home.png", dpi=110)
    plt.close(fig)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_PYCON = re.compile(r"^```pycon[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def run_page_doctests(app: Sphinx, docname: str, source: list[str]) -> None:
    """Run the ``pycon`` blocks of a MyST prose page as one doctest; failures are warnings.

    Blocks fenced as ``python`` are shown, not run (commands that need several
    processes, such as ``torchrun``).
    """
    path = Path(app.env.doc2path(docname))
    blocks = _PYCON.findall(source[0]) if path.suffix == ".md" else []
    if not blocks:
        return
    parser = doctest.DocTestParser()
    text = "\n\n".join(blocks)
    test = parser.get_doctest(text, {"__name__": docname}, docname, str(path), 0)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    report: list[str] = []
    # the globals are left for the garbage collector: clearing them under torch.compile's
    # guards (which watch the page's globals dict) prints "Exception ignored" at exit
    runner.run(test, out=report.append, clear_globs=False)
    if runner.failures:
        detail = "".join(report)
        logger.warning("%d doctest failure(s) in %s:\n%s", runner.failures, docname, detail,
                       location=docname, type="crossent", subtype="doctest")  # fmt: skip
    else:
        logger.info("doctest %s: %d examples passed", docname, runner.tries)


def setup(app: Sphinx) -> dict[str, Any]:
    # the API pages exist before Sphinx lists the sources (autosummary stubs them at builder-inited)
    app.connect("config-inited", write_api_pages)
    app.connect("builder-inited", write_cli_help, priority=400)
    app.connect("builder-inited", write_performance, priority=400)
    app.connect("builder-inited", write_home_figure, priority=400)
    app.connect("source-read", run_page_doctests)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
