"""The built documentation site, checked in headless Chromium, and its API reference's coverage.

The README's test command builds the site (``sphinx-build -W --keep-going -n``)
into ``docs/_build/html`` before pytest runs; these tests use that build, or
``$CROSSENT_DOCS_HTML``, or build it into a temporary folder when neither
exists. Chromium is Debian's ``/usr/bin/chromium`` (the README's command
installs it), driven through playwright; nothing is fetched from the network.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import pkgutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import crossent

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
GALLERY_PAGE = "concepts/plot_4_why_logits.html"


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built HTML folder."""
    given = os.environ.get("CROSSENT_DOCS_HTML")
    html = Path(given) if given else REPO / "docs" / "_build" / "html"
    if not (html / "index.html").exists():
        html = tmp_path_factory.mktemp("docs") / "html"
        subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q",
             str(REPO / "docs"), str(html)],
            check=True, cwd=REPO,
        )  # fmt: skip
    return html


@pytest.fixture(scope="session")
def server(site: Path) -> Iterator[str]:
    """The site served over HTTP on the loopback interface (as a reader would open it)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} is missing: apt-get install chromium (the README's test command does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            headless=True,
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        yield context
        context.close()


class _Page:
    """A page opened in Chromium, with what it logged and what it requested."""

    def __init__(self, context: Any, url: str) -> None:
        self.errors: list[str] = []
        self.external: list[str] = []
        self.failed: list[str] = []
        self.page = context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.on("request", self._request)
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))
        self.page.goto(url, wait_until="load")

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"console {message.type}: {message.text}")

    def _request(self, request: Any) -> None:
        if not request.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")):
            self.external.append(request.url)

    def images(self) -> list[dict[str, Any]]:
        return self.page.evaluate(
            "Array.from(document.images).map(i => "
            "({src: i.currentSrc, complete: i.complete, width: i.naturalWidth}))"
        )

    def check_clean(self) -> None:
        assert not self.errors, f"{self.errors}; requests that failed: {self.failed}"
        assert not self.failed, f"requests that failed: {self.failed}"
        assert not self.external, f"requests leaving the machine: {self.external}"

    def close(self) -> None:
        self.page.close()


def _check_figures_and_math(page: _Page, min_images: int) -> None:
    page.page.wait_for_selector("mjx-container", timeout=20_000)  # MathJax typeset the math
    images = page.images()
    assert len(images) >= min_images, images
    broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
    assert not broken, f"images that did not load: {broken}"
    # MathJax's CommonHTML output: rendered glyphs, no "Math input error" markers
    assert page.page.locator("mjx-container mjx-math").count() >= 1
    assert page.page.locator("mjx-merror").count() == 0
    page.check_clean()


def test_index_page_figures_math_console(browser: Any, server: str) -> None:
    page = _Page(browser, f"{server}/index.html")
    try:
        assert "crossent" in page.page.title()
        _check_figures_and_math(page, min_images=1)
        nav = page.page.locator("nav").first.inner_text()
        for section in ("Getting started", "Concepts", "Guides", "Performance", "API reference"):
            assert section in nav, nav
    finally:
        page.close()


def test_gallery_page_figures_math_console(browser: Any, server: str) -> None:
    page = _Page(browser, f"{server}/{GALLERY_PAGE}")
    try:
        _check_figures_and_math(page, min_images=1)
        gallery = [i for i in page.images() if "sphx_glr_plot_4_why_logits" in i["src"]]
        assert gallery, "the example's own figure is not on its page"
        # the example's printed output was captured when it ran during the build
        assert "crossent float32 max relative error" in page.page.content()
    finally:
        page.close()


@pytest.mark.parametrize(
    "path",
    [
        "getting_started.html",
        "concepts/index.html",
        "guides/index.html",
        "guides/examples/plot_imbalanced.html",
        "differences.html",
        "performance/index.html",
        "api/index.html",
        "api/generated/crossent.nn.CrossEntropyLoss.html",
    ],
)
def test_each_section_loads_cleanly(browser: Any, server: str, path: str) -> None:
    page = _Page(browser, f"{server}/{path}")
    try:
        page.page.wait_for_load_state("networkidle")
        broken = [i["src"] for i in page.images() if not i["complete"] or i["width"] == 0]
        assert not broken, f"images that did not load: {broken}"
        assert page.page.locator("mjx-merror").count() == 0
        page.check_clean()
    finally:
        page.close()


def test_search_finds_a_function(browser: Any, server: str) -> None:
    page = _Page(browser, f"{server}/search.html?q=sparse_categorical_cross_entropy")
    try:
        results = page.page.locator("#search-results ul.search li")
        results.first.wait_for(timeout=30_000)
        text = page.page.locator("#search-results").inner_text()
        assert "sparse_categorical_cross_entropy" in text, text
        # every result's summary is fetched from its page and cut at its anchor: wait for them
        page.page.wait_for_load_state("networkidle")
        summaries = page.page.locator("#search-results ul.search li p.context")
        assert summaries.count() >= 1
        page.check_clean()  # no "Anchored content block not found" (dotted ids, search_anchor.js)
    finally:
        page.close()


def _public_names() -> list[str]:
    """Every public name: ``crossent.__all__`` and each public subpackage's, qualified."""
    modules = ["crossent"]
    for info in pkgutil.walk_packages(crossent.__path__, "crossent."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            modules.append(info.name)
    names = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        names += [f"{name}.{n}" for n in getattr(module, "__all__", [])]
    return names


def test_every_public_name_in_the_api_reference(site: Path) -> None:
    names = _public_names()
    for sub in ("info", "nn", "fused", "distributed", "metrics"):
        assert f"crossent.{sub}" in names  # the subpackages are public
        assert any(n.startswith(f"crossent.{sub}.") for n in names)
    # names of the later releases, so a module that fails to import cannot drop them silently
    expected = [
        "crossent.distillation_loss",
        "crossent.fused.linear_log_probs",
        "crossent.fused.linear_distillation_loss",
        "crossent.distributed.vocab_parallel_linear_log_probs",
        "crossent.metrics.evaluate_dask",
        "crossent.metrics.BinaryClassificationMetrics",
        "crossent.integrations.transformers.patch",
        "crossent.integrations.transformers.unpatch",
    ]
    assert not [n for n in expected if n not in names], names
    assert (site / "api" / "crossent.integrations.transformers.html").exists()
    api = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    missing = []
    for qualified in names:
        value = importlib.import_module(qualified.rsplit(".", 1)[0])
        obj = getattr(value, qualified.rsplit(".", 1)[1])
        if type(obj).__name__ == "module":  # a subpackage: its own page in the reference
            ok = (site / "api" / f"{qualified}.html").exists() and f'id="module-{qualified}"' in api
        else:  # a documented object: an anchor with its qualified name
            ok = f'id="{qualified}"' in api
        if not ok:
            missing.append(qualified)
    assert not missing, f"public names without an entry in the API reference: {missing}"


def test_mathjax_is_served_locally(site: Path) -> None:
    index = (site / "index.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in index
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
    assert "cdn.jsdelivr" not in index


def test_chromium_install_line_in_readme() -> None:
    line = _readme_test_command()
    assert "sphinx-build -W --keep-going -n" in line
    assert "apt-get install" in line
    assert "chromium" in line


def _readme_test_command() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    return lines[lines.index("<!-- test-command -->") + 2]
