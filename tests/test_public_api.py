"""The public contract (shared/API.md): every name importable, documented, with an example."""

from __future__ import annotations

import importlib
import inspect
import math
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
        "distillation_loss",
        "value_and_grad",
        "set_validation",
        "get_validation",
        "validation",
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
    "crossent.fused": ["linear_cross_entropy", "linear_log_probs", "linear_distillation_loss"],
    "crossent.distributed": [
        "vocab_parallel_cross_entropy",
        "vocab_parallel_linear_cross_entropy",
        "vocab_parallel_linear_log_probs",
    ],
    "crossent.integrations.transformers": ["patch", "unpatch"],
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
    "distillation_loss": {
        "beta": 0.5,
        "temperature": 1.0,
        "axis": -1,
        "target": None,
        "ignore_index": -100,
        "reduction": "mean",
    },
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
    assert positional[:2] in (
        ["input", "target"],
        ["scores", "relevance"],
        ["student_logits", "teacher_logits"],
    )
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


def _check_options(fn: Any, expected: dict[str, Any], *, keyword_only: bool = True) -> None:
    params = inspect.signature(fn).parameters
    for option, default in expected.items():
        assert option in params, f"{fn.__qualname__} lacks `{option}`"
        assert params[option].default == default, f"{fn.__qualname__}({option}=...) default"
        if keyword_only:
            assert params[option].kind is params[option].KEYWORD_ONLY, f"`{option}` positional"


#: linear_cross_entropy's options (API.md section 4), LinearCrossEntropyLoss's too
FUSED_CE_OPTIONS: dict[str, Any] = {
    "bias": None,
    "ignore_index": -100,
    "label_smoothing": 0.0,
    "z_loss": 0.0,
    "softcap": None,
    "reduction": "mean",
    "chunk_size": None,
}


def test_fused_signature() -> None:
    """API.md section 4, `class_weight` and `shift` included, all keyword-only."""
    pytest.importorskip("torch")
    from crossent.fused import linear_cross_entropy

    params = inspect.signature(linear_cross_entropy).parameters
    assert list(params)[:3] == ["hidden", "weight", "target"]
    _check_options(linear_cross_entropy, {**FUSED_CE_OPTIONS, "class_weight": None, "shift": False})


LOG_PROBS_OPTIONS: dict[str, Any] = {
    "bias": None,
    "temperature": 1.0,
    "softcap": None,
    "ignore_index": -100,
    "shift": False,
    "return_entropy": False,
    "chunk_size": None,
}


def test_linear_log_probs_and_distillation_signatures() -> None:
    pytest.importorskip("torch")
    from crossent import fused

    params = inspect.signature(fused.linear_log_probs).parameters
    assert list(params)[:3] == ["hidden", "weight", "target"]
    _check_options(fused.linear_log_probs, LOG_PROBS_OPTIONS)
    params = inspect.signature(fused.linear_distillation_loss).parameters
    names = ["hidden", "weight", "teacher_hidden", "teacher_weight", "target"]
    assert list(params)[:5] == names
    assert params["target"].default is None
    assert params["target"].kind is params["target"].POSITIONAL_OR_KEYWORD
    _check_options(
        fused.linear_distillation_loss,
        {
            "bias": None,
            "teacher_bias": None,
            "beta": 0.5,
            "temperature": 1.0,
            "ignore_index": -100,
            "reduction": "mean",
            "shift": False,
            "chunk_size": None,
        },
    )


def test_distributed_signatures() -> None:
    """API.md section 5: `group=None` first among the options; the log-probs function takes
    linear_log_probs's keywords."""
    pytest.importorskip("torch")
    from crossent import distributed

    for fn, arrays in (
        (distributed.vocab_parallel_cross_entropy, ["local_logits", "target"]),
        (distributed.vocab_parallel_linear_cross_entropy, ["hidden", "local_weight", "target"]),
        (distributed.vocab_parallel_linear_log_probs, ["hidden", "local_weight", "target"]),
    ):
        params = inspect.signature(fn).parameters
        assert list(params)[: len(arrays)] == arrays, fn.__name__
        _check_options(fn, {"group": None})
    _check_options(distributed.vocab_parallel_linear_log_probs, LOG_PROBS_OPTIONS)


def test_value_and_grad_takes_loss_input_target_and_options() -> None:
    """`value_and_grad(loss, input, target, **options)`, positionally or by keyword."""
    import numpy as np

    z, y = np.array([[2.0, 0.0, -1.0]]), np.array([0])
    f = ce.sparse_categorical_cross_entropy
    v1, g1 = ce.value_and_grad(f, z, y, from_logits=True)
    v2, g2 = ce.value_and_grad(f, input=z, target=y, from_logits=True)
    v3, g3 = ce.value_and_grad("sparse_categorical_cross_entropy", z, y, from_logits=True)
    want = math.log1p(math.exp(-2.0) + math.exp(-3.0))  # lse(z) - z_0
    assert float(v1) == float(v2) == float(v3) == pytest.approx(want, rel=1e-15)
    assert (g1 == g2).all()
    assert (g1 == g3).all()


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss"])
def test_nn_modules_take_torch_nn_constructor_arguments(name: str) -> None:
    """API.md section 3: same constructor arguments, in the same order, with the same defaults;
    crossent's extra options come after them."""
    torch = pytest.importorskip("torch")
    import crossent.nn

    theirs = list(inspect.signature(getattr(torch.nn, name).__init__).parameters.values())[1:]
    ours = list(inspect.signature(getattr(crossent.nn, name).__init__).parameters.values())[1:]
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=False):
        assert a.default == b.default, (name, a.name)
        assert a.kind == b.kind, (name, a.name)
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs) :]), name


def test_focal_modules_default_gamma_and_linear_module_options() -> None:
    pytest.importorskip("torch")
    import crossent.nn

    for name in ("FocalLoss", "BinaryFocalLoss"):
        gamma = inspect.signature(getattr(crossent.nn, name).__init__).parameters["gamma"]
        assert gamma.default == 2.0, name
    options = {k: v for k, v in FUSED_CE_OPTIONS.items() if k != "bias"}  # bias: forward's
    _check_options(crossent.nn.LinearCrossEntropyLoss.__init__, options)


def test_transformers_patch_signature() -> None:
    pytest.importorskip("torch")
    from crossent.integrations import transformers

    params = inspect.signature(transformers.patch).parameters
    assert next(iter(params)) == "model"
    _check_options(transformers.patch, {"chunk_size": None})
    assert list(inspect.signature(transformers.unpatch).parameters) == ["model"]


def test_eval_flags_and_defaults_match_the_contract() -> None:
    """API.md section 7: every flag of `crossent eval`, its choices and its default."""
    from crossent.cli import build_parser

    args = build_parser().parse_args(["eval", "predictions.csv"])
    assert args.label_column == "label"
    assert args.input == "probs"
    assert args.base == "e"
    assert args.bins == 15
    assert args.format == "text"
    assert args.report is None
    assert args.columns is None
    assert args.group_by is None
    assert args.scheduler is None
    assert args.engine == "local"
    given = [
        *("eval", "a.csv", "b.csv", "--label-column", "y", "--input", "log_probs"),
        *("--base", "10", "--bins", "7", "--format", "json", "--report", "out"),
        *("--columns", "x,z", "--exclude", "id", "--group-by", "day"),
        *("--engine", "dask", "--scheduler", "tcp://h:1"),
    ]
    args = build_parser().parse_args(given)
    assert (args.label_column, args.input, args.base, args.bins) == ("y", "log_probs", "10", 7)
    assert (args.format, args.report, args.group_by, args.engine) == ("json", "out", "day", "dask")
    for choice, values in (("--input", "probs logits log_probs"), ("--base", "e 2 10")):
        for value in values.split():
            build_parser().parse_args(["eval", "f.csv", choice, value])
    for flag in ("--format", "--engine", "--input", "--base"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(["eval", "f.csv", flag, "bogus"])
        assert info.value.code == 2


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
