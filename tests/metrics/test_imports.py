"""The metrics core needs only NumPy; the CLI imports pyarrow/matplotlib/tqdm only when used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "jax", "pyarrow", "matplotlib", "tqdm", "sklearn", "scipy")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_metrics_on_numpy_import_nothing_heavy() -> None:
    code = (
        "import numpy as np\n"
        "from crossent.metrics import ClassificationMetrics\n"
        "m = ClassificationMetrics(input_kind='logits')\n"
        "m.update(np.zeros((4, 3)), np.arange(4) % 3)\n"
        "m.merge(m.sync()).compute()"
    )
    assert _imported_after(code) == set()


def test_the_cli_module_imports_its_extras_lazily() -> None:
    assert _imported_after("import crossent.cli, crossent._report, crossent._demo") == set()
