"""vocab_parallel_linear_log_probs on 2, 3 and 4 gloo ranks equals the single-process linear_log_probs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from crossent.fused import linear_log_probs
from tests.distributed._cases import LOG_PROB_CASES, Case, bounds
from tests.distributed._workers import LOG_PROB_BAD_CALLS, run_log_prob_case
from tests.distributed.test_vocab_parallel import TOL, assert_rounded_alike, check_errors


def reference(case: Case) -> dict[str, Any]:
    """The single-process linear_log_probs with the whole projection."""
    return run_log_prob_case(linear_log_probs, case, 0, 0)


@pytest.mark.parametrize("case", LOG_PROB_CASES, ids=lambda c: c.name)
def test_log_probs_entropy_and_grads_equal_single_process(case: Case, ranks: Any) -> None:
    world_size, all_results = ranks
    results = [res["log_probs"]["cases"][case.name] for res in all_results]
    want = reference(case)
    tol = TOL[case.dtype]
    for r, res in enumerate(results):
        assert torch.equal(res["log_probs"], results[0]["log_probs"]), f"rank {r} differs"
        torch.testing.assert_close(res["log_probs"], want["log_probs"], **tol)
        if want["entropy"] is None:
            assert res["entropy"] is None
        else:
            torch.testing.assert_close(res["entropy"], want["entropy"], **tol)
        tol_h = TOL[case.hidden_dtype or case.dtype]
        torch.testing.assert_close(res["grad_hidden"], want["grad_hidden"], **tol_h)
        if case.hidden_dtype:  # a wider head: the slices' sum rounded once, as one process
            assert_rounded_alike(res["grad_hidden"], want["grad_hidden"])
        lo, hi = bounds(case, world_size, r)
        assert res["grad_weight"].shape == (hi - lo, case.hidden)
    torch.testing.assert_close(
        torch.cat([res["grad_weight"] for res in results]), want["grad_weight"], **tol
    )
    if case.confident:  # each row to its own size, against float64
        exact = run_log_prob_case(linear_log_probs, replace(case, dtype="float64"), 0, 0)
        for r, res in enumerate(results):
            for key in ("log_probs", "entropy"):
                got, ref = res[key].double(), exact[key]
                assert ((got - ref).abs() <= 3e-5 * ref.abs()).all(), (r, key, got, ref)
            err = (res["grad_hidden"].double() - exact["grad_hidden"]).norm(dim=-1)
            assert (err <= 3e-5 * exact["grad_hidden"].norm(dim=-1)).all(), (r, err)
    if case.bias:
        grad_b = torch.cat([res["grad_bias"] for res in results])
        torch.testing.assert_close(grad_b, want["grad_bias"], **tol)


EXPECTED_ERRORS = {
    # named crossent.fused.linear_log_probs before
    "log_probs_dual_hidden": (
        None,
        "RuntimeError",
        "crossent.distributed.vocab_parallel_linear_log_probs has no forward-mode",
    ),
    "log_probs_temperature_zero_on_last_rank": (-1, "ValueError", "`temperature`"),
    # the message names the log-probability keywords (it listed the loss's: label_smoothing, ...)
    "log_probs_options_differ": (None, "ValueError", "different options or dtypes (`ignore_index`"),
    "log_probs_temperature_differs": (None, "ValueError", "`temperature`, `softcap`, `return_"),
    "log_probs_label_above_global_vocab": (None, "ValueError", "outside the global vocabulary"),
    "log_probs_label_above_global_vocab_validation_off": (None, "IndexError", "outside [0, 11)"),
    "log_probs_negative_label_on_rank_1_validation_off": (None, "IndexError", "min=-7"),
}


def test_every_bad_call_is_listed() -> None:
    assert set(LOG_PROB_BAD_CALLS) == set(EXPECTED_ERRORS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_call_raises_on_every_rank(name: str, ranks: Any) -> None:
    world_size, results = ranks
    culprit, kind, text = EXPECTED_ERRORS[name]
    if culprit == -1:
        culprit = world_size - 1
    errors = [res["log_probs"]["errors"][name] for res in results]
    check_errors(name, (culprit, kind, text), errors)
