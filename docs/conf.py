"""Sphinx configuration of the crossent documentation.

Build (from the repository root; warnings are errors, every cross-reference checked)::

    .venv/bin/sphinx-build -W --keep-going -n -q docs docs/_build/html

Everything offline: MathJax is served from the ``sphinx-mathjax-offline``
package, no intersphinx inventory is fetched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import crossent  # noqa: E402

project = "crossent"
author = "the crossent developers"
copyright = "the crossent developers"
version = release = crossent.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_design",
    "sphinx_gallery.gen_gallery",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: the pages render math offline
    "crossent_docs",  # API pages from __all__, doctests of the prose pages, CLI help, benchmarks
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
# the guide gallery's own index page is replaced by guides/index.md, which lists its examples
exclude_patterns = [
    "_build", "gallery", "**/README.md", "_generated/*.md", "guides/examples/index.rst"
]
nitpicky = True
# Names in signatures and docstrings that live outside this project (no intersphinx: offline).
_EXTERNAL = (
    "torch|numpy|np|jax|sklearn|scipy|transformers|dask|triton"
    "|collections\\.abc|contextvars|functools|threading|asyncio|typing|argparse|os|io"
)
nitpick_ignore_regex = [
    ("py:.*", rf"({_EXTERNAL})(\..*)?"),
    ("py:class", r"(Tensor|Array|ArrayLike|Module|optional|array|array-like|int|float|bool|str)"),
]

# -- autodoc / autosummary / numpydoc ------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- MyST ------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- sphinx-gallery: concepts and guides with figures, executed at every build ---------------
sphinx_gallery_conf = {
    "examples_dirs": ["gallery/concepts", "gallery/guides"],
    "gallery_dirs": ["concepts", "guides/examples"],
    "filename_pattern": r"plot_",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "capture_repr": ("_repr_html_",),
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "within_subsection_order": "FileNameSortKey",
    "reset_modules": ("matplotlib",),
    "min_reported_time": 10**6,
    "write_computation_times": False,
}

# -- HTML -------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"crossent {release}"
html_static_path = ["_static"]
html_css_files = ["crossent.css"]
html_js_files = [("search_anchor.js", {"defer": "defer"})]  # after searchtools.js
html_show_sourcelink = False
html_favicon = "_static/favicon.svg"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 7,
    "navbar_end": ["theme-switcher", "navbar-icon-links"],
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}

# Reproducible figures whatever the machine.
os.environ.setdefault("CROSSENT_VALIDATE", "1")
