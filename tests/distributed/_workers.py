"""What each spawned rank runs: every case in one process group, results returned to the parent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import crossent as ce
from tests.distributed._cases import (
    CASES,
    LINEAR_CASES,
    LOG_PROB_CASES,
    Case,
    bounds,
    log_prob_upstream,
    problem,
)

BAD_CALLS: dict[str, Callable[[int, int], dict[str, Any]]] = {}
"""Each builds one rank's (local_logits, target, options) for a call that must raise everywhere."""


def _bad(name: str) -> Callable[[Callable[[int, int], dict[str, Any]]], Any]:
    def register(fn: Callable[[int, int], dict[str, Any]]) -> Any:
        BAD_CALLS[name] = fn
        return fn

    return register


def _good_args(rank: int, world_size: int) -> dict[str, Any]:
    case = Case("bad")
    p = problem(case)
    lo, hi = bounds(case, world_size, rank)
    return {"local_logits": p["logits"][..., lo:hi], "target": p["target"].clone()}


DUAL = "_dual"
"""Key of a bad call's arguments naming those given as forward-mode dual tensors (see
:func:`call`)."""


@_bad("dual_logits")
def _(rank: int, world_size: int) -> dict[str, Any]:
    return {**_good_args(rank, world_size), DUAL: ("local_logits",)}


@_bad("batch_shape_differs")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == world_size - 1:
        args = {k: v[:-1] for k, v in args.items()}
    return args


@_bad("label_above_global_vocab")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    args["target"][1] = 11
    return args


@_bad("negative_label")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    args["target"][2] = -7
    return args


@_bad("float_target_on_rank_0")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == 0:
        args["target"] = args["target"].float()
    return args


@_bad("target_shape_mismatch_on_rank_1")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == 1:
        args["target"] = args["target"][:-1]
    return args


@_bad("options_differ")
def _(rank: int, world_size: int) -> dict[str, Any]:
    return {**_good_args(rank, world_size), "label_smoothing": 0.1 if rank == 1 else 0.0}


@_bad("bad_option_on_last_rank")
def _(rank: int, world_size: int) -> dict[str, Any]:
    return {
        **_good_args(rank, world_size),
        "reduction": "avg" if rank == world_size - 1 else "mean",
    }


@_bad("targets_differ")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == 1:
        args["target"][1] = (args["target"][1] + 1) % 11
    return args


@_bad("weight_on_rank_0_only")
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == 0:
        args["weight"] = torch.ones(11)
    return args


@_bad("weight_wrong_length")
def _(rank: int, world_size: int) -> dict[str, Any]:
    return {**_good_args(rank, world_size), "weight": torch.ones(12)}


@_bad("weights_differ")
def _(rank: int, world_size: int) -> dict[str, Any]:
    weight = torch.ones(11)
    weight[3] = 2.0 if rank == 1 else 1.0  # the whole vector, one value off on rank 1
    return {**_good_args(rank, world_size), "weight": weight}


# Labels outside [0, V) fail even with validation off (as torch's kernels do), on every rank.
UNCHECKED = "_validation_off"
"""Bad calls whose name ends with this run inside ``crossent.validation(False)``."""
BAD_CALLS["label_above_global_vocab" + UNCHECKED] = BAD_CALLS["label_above_global_vocab"]
BAD_CALLS["negative_label" + UNCHECKED] = BAD_CALLS["negative_label"]


@_bad("uint64_label_wrapping_to_ignore_index")
def _(rank: int, world_size: int) -> dict[str, Any]:
    # 2**64 - 100 wrapped to -100, the ignore_index, in the int64 label summary: dropped
    args = _good_args(rank, world_size)
    target = args["target"].to(torch.uint64)
    target[1] = torch.tensor(2**64 - 100, dtype=torch.uint64)
    return {**args, "target": target}


BAD_CALLS["uint64_label_wrapping_to_ignore_index" + UNCHECKED] = BAD_CALLS[
    "uint64_label_wrapping_to_ignore_index"
]


@_bad("label_above_global_vocab_on_rank_1_only" + UNCHECKED)
def _(rank: int, world_size: int) -> dict[str, Any]:
    args = _good_args(rank, world_size)
    if rank == 1:
        args["target"][1] = 11
    return args


def run_case(loss_fn: Callable[..., torch.Tensor], case: Case, rank: int, world_size: int) -> Any:
    p = problem(case)
    lo, hi = bounds(case, world_size, rank)
    x = p["logits"][..., lo:hi].clone().requires_grad_(True)
    weight = p["class_weight"]
    if case.weight == "local":
        weight = weight[lo:hi]
    loss = loss_fn(x, p["target"], weight=weight, **case.options)
    (loss.double() * p["upstream"]).sum().backward()
    return {"loss": loss.detach(), "grad": x.grad}


def run_linear_case(loss_fn: Callable[..., torch.Tensor], case: Case, rank: int, ws: int) -> Any:
    p = problem(case)
    lo, hi = bounds(case, ws, rank)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["matrix"][lo:hi].clone().requires_grad_(True)
    bias = None if p["bias"] is None else p["bias"][lo:hi].clone().requires_grad_(True)
    args = {"bias": bias, "class_weight": p["class_weight"], **case.options}
    loss = loss_fn(hidden, weight, p["target"], **args)
    (loss.double() * p["upstream"]).sum().backward()
    with torch.no_grad():  # the loss-only path (no gradient buffers) gives the same value
        eval_loss = loss_fn(hidden, weight, p["target"], **args)
    return {
        "loss": loss.detach(),
        "eval_loss": eval_loss,
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "grad_bias": None if bias is None else bias.grad,
    }


LINEAR_BAD_CALLS: dict[str, Callable[[int, int], dict[str, Any]]] = {}


def _linear_args(rank: int, world_size: int) -> dict[str, Any]:
    case = Case("bad")
    p = problem(case)
    lo, hi = bounds(case, world_size, rank)
    return {"hidden": p["hidden"], "local_weight": p["matrix"][lo:hi], "target": p["target"]}


def _linear_bad_d(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    if rank == 1:
        args["local_weight"] = args["local_weight"][:, :-1]
    return args


def _linear_grad_differs(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    args["hidden"] = args["hidden"].clone().requires_grad_(rank == 0)
    return args


def _linear_label_out_of_range(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    args["target"] = args["target"].clone()
    args["target"][0] = 11
    return args


def _linear_negative_label_on_rank_1(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    if rank == 1:
        args["target"] = args["target"].clone()
        args["target"][0] = -7
    return args


def _linear_local_class_weight(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    return {**args, "class_weight": torch.ones(args["local_weight"].shape[0])}


def _linear_class_weights_differ(rank: int, world_size: int) -> dict[str, Any]:
    weight = torch.ones(11)
    weight[7] = 0.5 if rank == world_size - 1 else 1.0
    return {**_linear_args(rank, world_size), "class_weight": weight}


def _linear_class_weight_requires_grad(rank: int, world_size: int) -> dict[str, Any]:
    return {**_linear_args(rank, world_size), "class_weight": torch.ones(11, requires_grad=True)}


def _linear_dual_hidden(rank: int, world_size: int) -> dict[str, Any]:
    return {**_linear_args(rank, world_size), DUAL: ("hidden",)}


LINEAR_BAD_CALLS.update(
    {
        "linear_dual_hidden": _linear_dual_hidden,
        "linear_class_weights_differ": _linear_class_weights_differ,
        "linear_class_weight_requires_grad": _linear_class_weight_requires_grad,
        "linear_hidden_size_differs_on_rank_1": _linear_bad_d,
        "linear_requires_grad_differs": _linear_grad_differs,
        "linear_label_above_global_vocab": _linear_label_out_of_range,
        "linear_class_weight_slice": _linear_local_class_weight,
        "linear_label_above_global_vocab" + UNCHECKED: _linear_label_out_of_range,
        "linear_negative_label_on_rank_1" + UNCHECKED: _linear_negative_label_on_rank_1,
    }
)


def call(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    """``fn(**args)``; the arguments named under :data:`DUAL` as dual tensors of
    ``torch.autograd.forward_ad`` (tangent 1), inside a dual level."""
    dual = args.pop(DUAL, ())
    if not dual:
        return fn(**args)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        for k in dual:
            args[k] = fwad.make_dual(args[k], torch.ones_like(args[k]))
        return fn(**args)


def capture(fn: Callable[[], Any], name: str = "") -> tuple[str, str] | None:
    """(exception type, message) raised by `fn`, or None; with validation off for an
    :data:`UNCHECKED` `name`."""
    try:
        with ce.validation(not name.endswith(UNCHECKED)):
            fn()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def vocab_parallel_worker(rank: int, world_size: int, payload: Any) -> dict[str, Any]:
    from crossent.distributed import vocab_parallel_cross_entropy as loss_fn

    out: dict[str, Any] = {"cases": {}, "errors": {}}
    for case in CASES:
        out["cases"][case.name] = run_case(loss_fn, case, rank, world_size)
    for name, make in BAD_CALLS.items():
        out["errors"][name] = capture(lambda make=make: call(loss_fn, make(rank, world_size)), name)
    # The group still works after all those errors.
    out["after_errors"] = run_case(loss_fn, CASES[0], rank, world_size)
    return out


def linear_worker(rank: int, world_size: int, payload: Any) -> dict[str, Any]:
    from crossent.distributed import vocab_parallel_linear_cross_entropy as loss_fn

    out: dict[str, Any] = {"cases": {}, "errors": {}}
    for case in LINEAR_CASES:
        out["cases"][case.name] = run_linear_case(loss_fn, case, rank, world_size)
    for name, make in LINEAR_BAD_CALLS.items():
        out["errors"][name] = capture(lambda make=make: call(loss_fn, make(rank, world_size)), name)
    out["after_errors"] = run_linear_case(loss_fn, LINEAR_CASES[0], rank, world_size)
    return out


def run_log_prob_case(fn: Callable[..., Any], case: Case, rank: int, ws: int) -> Any:
    """One rank's (log_probs, entropy) and gradients of Σ g·log_probs + e·entropy.

    ``ws=0`` runs the whole vocabulary in this process (the single-process reference).
    """
    p = problem(case)
    lo, hi = bounds(case, ws, rank) if ws else (0, case.vocab)
    hidden = p["hidden"].clone().requires_grad_(True)
    weight = p["matrix"][lo:hi].clone().requires_grad_(True)
    bias = None if p["bias"] is None else p["bias"][lo:hi].clone().requires_grad_(True)
    out = fn(hidden, weight, p["target"], bias=bias, **case.options)
    lp, ent = out if isinstance(out, tuple) else (out, None)
    g_lp, g_ent = log_prob_upstream(case)
    total = (lp.double() * g_lp).sum() + (0.0 if ent is None else (ent.double() * g_ent).sum())
    total.backward()
    return {
        "log_probs": lp.detach(),
        "entropy": None if ent is None else ent.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "grad_bias": None if bias is None else bias.grad,
    }


def _log_prob_bad_temperature(rank: int, world_size: int) -> dict[str, Any]:
    args = _linear_args(rank, world_size)
    return {**args, "temperature": 0.0 if rank == world_size - 1 else 1.0}


def _log_prob_options_differ(rank: int, world_size: int) -> dict[str, Any]:
    return {**_linear_args(rank, world_size), "return_entropy": rank == 0}


def _log_prob_temperature_differs(rank: int, world_size: int) -> dict[str, Any]:
    return {**_linear_args(rank, world_size), "temperature": 1.0 + rank}


LOG_PROB_BAD_CALLS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "log_probs_dual_hidden": _linear_dual_hidden,
    "log_probs_temperature_zero_on_last_rank": _log_prob_bad_temperature,
    "log_probs_options_differ": _log_prob_options_differ,
    "log_probs_temperature_differs": _log_prob_temperature_differs,
    "log_probs_label_above_global_vocab": _linear_label_out_of_range,
    "log_probs_label_above_global_vocab" + UNCHECKED: _linear_label_out_of_range,
    "log_probs_negative_label_on_rank_1" + UNCHECKED: _linear_negative_label_on_rank_1,
}


def log_prob_worker(rank: int, world_size: int, payload: Any) -> dict[str, Any]:
    from crossent.distributed import vocab_parallel_linear_log_probs as fn

    out: dict[str, Any] = {"cases": {}, "errors": {}}
    for case in LOG_PROB_CASES:
        out["cases"][case.name] = run_log_prob_case(fn, case, rank, world_size)
    for name, make in LOG_PROB_BAD_CALLS.items():
        out["errors"][name] = capture(lambda make=make: call(fn, make(rank, world_size)), name)
    return out


def both_worker(rank: int, world_size: int, payload: Any) -> dict[str, Any]:
    """Every loss in one process group (one spawn per world size for the whole test package)."""
    return {
        "unfused": vocab_parallel_worker(rank, world_size, payload),
        "linear": linear_worker(rank, world_size, payload),
        "log_probs": log_prob_worker(rank, world_size, payload),
    }
