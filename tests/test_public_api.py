"""The public contract (shared/API.md): every name importable, documented, with an example."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import crossent as ce

CONTRACT: dict[str, list[str]] = {
    "crossent": [
        "binary_cross_entropy",
        "categorical_cross_entropy",
        "sparse_categorical_cross_entropy",
        "listnet_loss",
        "value_and_grad",
        "set_validation",
        "get_validation",
    ],
    "crossent.info": [
        "surprisal",
        "entropy",
        "cross_entropy",
        "kl_divergence",
        "js_divergence",
    ],
    "crossent.nn": [
        "CrossEntropyLoss",
        "NLLLoss",
        "BCELoss",
        "BCEWithLogitsLoss",
        "FocalLoss",
        "BinaryFocalLoss",
        "LinearCrossEntropyLoss",
    ],
    "crossent.fused": ["linear_cross_entropy"],
    "crossent.distributed": [
        "vocab_parallel_cross_entropy",
        "vocab_parallel_linear_cross_entropy",
    ],
}

# Keyword-only options and their defaults, exactly as the contract fixes them.
SIGNATURES: dict[str, dict[str, Any]] = {
    "binary_cross_entropy": {
        "from_logits": False,
        "weight": None,
        "pos_weight": None,
        "label_smoothing": 0.0,
        "gamma": 0.0,
        "alpha": None,
        "reduction": "mean",
    },
    "categorical_cross_entropy": {
        "from_logits": False,
        "axis": -1,
        "weight": None,
        "label_smoothing": 0.0,
        "gamma": 0.0,
        "reduction": "mean",
    },
    "sparse_categorical_cross_entropy": {
        "from_logits": False,
        "axis": -1,
        "weight": None,
        "ignore_index": None,
        "label_smoothing": 0.0,
        "gamma": 0.0,
        "z_loss": 0.0,
        "softcap": None,
        "reduction": "mean",
    },
    "listnet_loss": {"axis": -1, "reduction": "mean"},
}


def _public(module_name: str) -> list[tuple[str, Any]]:
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in CONTRACT[module_name]]


@pytest.mark.parametrize("module_name", sorted(CONTRACT))
def test_contract_names_exist_and_are_exported(module_name: str) -> None:
    pytest.importorskip("torch")
    module = importlib.import_module(module_name)
    for name in CONTRACT[module_name]:
        assert hasattr(module, name), f"{module_name}.{name} is missing"
        assert name in getattr(module, "__all__", []), f"{module_name}.__all__ lacks {name}"


@pytest.mark.parametrize("module_name", sorted(CONTRACT))
def test_every_public_symbol_is_documented_with_an_example(module_name: str) -> None:
    pytest.importorskip("torch")
    for name, obj in _public(module_name):
        doc = inspect.getdoc(obj) or ""
        assert len(doc) > 80, f"{module_name}.{name} has no real docstring"
        assert "Examples" in doc, f"{module_name}.{name} has no Examples section"
        assert ">>>" in doc, f"{module_name}.{name} has no runnable example"


@pytest.mark.parametrize(("name", "options"), sorted(SIGNATURES.items()))
def test_loss_signatures_match_the_contract(name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(getattr(ce, name)).parameters
    positional = [p.name for p in params.values() if p.kind is not p.KEYWORD_ONLY]
    assert positional[:2] in (["input", "target"], ["scores", "relevance"])
    for option, default in options.items():
        assert option in params, f"{name} lacks `{option}`"
        assert params[option].kind is params[option].KEYWORD_ONLY, f"`{option}` not keyword-only"
        assert params[option].default == default, f"{name}({option}=...) default differs"


def test_info_signatures() -> None:
    for name in ("entropy", "cross_entropy", "kl_divergence", "js_divergence"):
        params = inspect.signature(getattr(ce.info, name)).parameters
        assert params["axis"].default == -1
        assert params["base"].default is None
    assert inspect.signature(ce.info.surprisal).parameters["base"].default is None


def test_fused_signature() -> None:
    pytest.importorskip("torch")
    from crossent.fused import linear_cross_entropy

    params = inspect.signature(linear_cross_entropy).parameters
    assert list(params)[:3] == ["hidden", "weight", "target"]
    expected = {
        "bias": None,
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "z_loss": 0.0,
        "softcap": None,
        "reduction": "mean",
        "chunk_size": None,
    }
    for option, default in expected.items():
        assert params[option].default == default, option


def test_import_crossent_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, crossent; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ci_runs_the_readme_test_command() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme)
    assert match, "README lacks the marked test command"
    assert "pytest" in match.group(1)
    assert "test-command" in (root / ".ci" / "run").read_text()
    main = re.search(r"<!-- main-command -->\n```bash\n(.+)\n```", readme)
    assert main
    assert "crossent demo" in main.group(1)
