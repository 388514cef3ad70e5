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


def test_numpy_probabilities_leave_array_api_compats_numpy_unimported() -> None:
    # importing array_api_compat.numpy loads every lazy NumPy submodule (0.1 s of CPU):
    # the NumPy probability path of the metrics and `crossent eval` never needs it
    code = (
        "import numpy as np\n"
        "from crossent.metrics import ClassificationMetrics\n"
        "m = ClassificationMetrics(input_kind='probs')\n"
        "m.update(np.full((4, 3), 1 / 3), np.arange(4) % 3).compute()\n"
        "import sys\n"
        "print('array_api_compat.numpy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]


def test_the_lazy_numpy_namespace_is_array_api_compats() -> None:
    import array_api_compat
    import array_api_compat.numpy as compat
    import numpy as np

    from crossent._lib._xp import array_namespace

    xp = array_namespace(input=np.zeros(3))
    assert array_api_compat.is_numpy_namespace(xp)
    assert xp.take_along_axis is compat.take_along_axis  # the standard's spelling
    assert xp.isdtype(np.dtype("float32"), "real floating")
    assert xp.reshape(np.arange(6), (2, 3)).shape == (2, 3)
