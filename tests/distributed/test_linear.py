"""vocab_parallel_linear_cross_entropy on 2 and 4 gloo ranks equals the fused single-process one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from crossent.fused import linear_cross_entropy
from tests.distributed._cases import LINEAR_CASES, Case, bounds, problem
from tests.distributed._workers import LINEAR_BAD_CALLS
from tests.distributed.test_vocab_parallel import TOL, assert_rounded_alike, check_errors


def reference(case: Case) -> dict[str, Any]:
    """The single-process fused loss and its gradients with the whole projection."""
    p = problem(case)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["matrix"].clone().requires_grad_(True)
    bias = None if p["bias"] is None else p["bias"].clone().requires_grad_(True)
    loss = linear_cross_entropy(
        hidden, weight, p["target"], bias=bias, class_weight=p["class_weight"], **case.options
    )
    (loss.double() * p["upstream"]).sum().backward()
    return {
        "loss": loss.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "grad_bias": None if bias is None else bias.grad,
    }


def check_linear(case: Case, world_size: int, results: list[dict[str, Any]]) -> None:
    want = reference(case)
    tol = TOL[case.dtype]
    for r, res in enumerate(results):
        assert torch.equal(res["loss"], results[0]["loss"]), f"rank {r} loss differs from rank 0"
        torch.testing.assert_close(res["eval_loss"], res["loss"], rtol=0, atol=0)
        # every rank holds the whole (all-reduced) gradient of `hidden`
        tol_h = TOL[case.hidden_dtype or case.dtype]
        torch.testing.assert_close(res["grad_hidden"], want["grad_hidden"], **tol_h)
        if case.hidden_dtype:  # a wider head: the slices' sum rounded once, as one process
            assert_rounded_alike(res["grad_hidden"], want["grad_hidden"])
        lo, hi = bounds(case, world_size, r)
        assert res["grad_weight"].shape == (hi - lo, case.hidden)
    torch.testing.assert_close(results[0]["loss"], want["loss"], **tol)
    grad_w = torch.cat([res["grad_weight"] for res in results])
    torch.testing.assert_close(grad_w, want["grad_weight"], **tol)
    if case.bias:
        grad_b = torch.cat([res["grad_bias"] for res in results])
        torch.testing.assert_close(grad_b, want["grad_bias"], **tol)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_loss_and_grads_equal_single_process(case: Case, ranks: Any) -> None:
    world_size, results = ranks
    check_linear(case, world_size, [res["linear"]["cases"][case.name] for res in results])


def test_group_still_usable_after_bad_calls(ranks: Any) -> None:
    world_size, results = ranks
    check_linear(LINEAR_CASES[0], world_size, [res["linear"]["after_errors"] for res in results])


EXPECTED_ERRORS = {
    # named crossent.fused.linear_cross_entropy before
    "linear_dual_hidden": (
        None,
        "RuntimeError",
        "crossent.distributed.vocab_parallel_linear_cross_entropy has no forward-mode",
    ),
    "linear_hidden_size_differs_on_rank_1": (1, "ValueError", "`local_weight` must have shape"),
    "linear_requires_grad_differs": (
        None,
        "ValueError",
        "`shift`, whether a gradient is taken, and for `hidden`); pass",
    ),
    "linear_label_above_global_vocab": (None, "ValueError", "outside the global vocabulary"),
    "linear_class_weight_slice": (None, "ValueError", "`class_weight` must hold the whole"),
    "linear_class_weights_differ": (None, "ValueError", "different `class_weight` values"),
    # a constant there: a gradient silently left out would be a wrong number
    "linear_class_weight_requires_grad": (
        None,
        "RuntimeError",
        "`class_weight` requires a gradient, which crossent.distributed.vocab_parallel_linear",
    ),
    "linear_label_above_global_vocab_validation_off": (None, "IndexError", "outside [0, 11)"),
    "linear_negative_label_on_rank_1_validation_off": (None, "IndexError", "min=-7"),
}


def test_every_bad_call_is_listed() -> None:
    assert set(LINEAR_BAD_CALLS) == set(EXPECTED_ERRORS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_call_raises_on_every_rank(name: str, ranks: Any) -> None:
    _, results = ranks
    check_errors(name, EXPECTED_ERRORS[name], [res["linear"]["errors"][name] for res in results])
