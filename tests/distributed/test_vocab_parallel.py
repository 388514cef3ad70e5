"""vocab_parallel_cross_entropy on 2 and 4 gloo ranks equals the single-process loss and grad."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

import crossent as ce
from crossent.distributed import vocab_parallel_cross_entropy
from tests.distributed._cases import CASES, Case, bounds, problem, split_sizes
from tests.distributed._workers import BAD_CALLS

TOL = {
    "float32": {"rtol": 1e-5, "atol": 1e-6},
    "float64": {"rtol": 1e-12, "atol": 1e-13},
    "bfloat16": {"rtol": 1.6e-2, "atol": 1e-3},
}


def assert_rounded_alike(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` within one unit in the last place of `want`'s low-precision dtype, entry by entry:
    two roundings of wider values that differ by their own rounding (the sum over the ranks
    and the single process's product) agree but at a rounding boundary."""
    assert got.dtype == want.dtype
    w, info = want.double(), torch.finfo(want.dtype)
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(info.tiny)))) * info.eps
    err = (got.double() - w).abs()
    assert (err <= ulp).all(), (
        f"{int((err > ulp).sum())} entries off by {float((err / ulp).max()):.1f} ulp"
    )


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process crossent loss and its gradient on the whole logits."""
    p = problem(case)
    logits = p["logits"]
    if case.zero_weight_masked:  # F.cross_entropy forms 0 * inf = NaN there (differences.md):
        # the same rows with the masked logit finite, far below the rest (probability 0)
        logits = logits.masked_fill(logits.isneginf(), -1e30)
    weight = p["class_weight"]
    if case.weight_scale != 1:  # F.cross_entropy's sums overflow there (float32 3e38 weights)
        logits, weight = logits.double(), weight.double()  # a float64 reference
    x = logits.clone().requires_grad_(True)
    options = dict(case.options)
    ignore_index = options.pop("ignore_index", -100)
    loss = ce.sparse_categorical_cross_entropy(
        x,
        p["target"],
        from_logits=True,
        weight=weight,
        ignore_index=ignore_index,
        **options,
    )
    (loss.double() * p["upstream"]).sum().backward()
    assert x.grad is not None
    dtype = p["logits"].dtype
    return loss.detach().to(dtype), x.grad.to(dtype)


def check_against_reference(case: Case, world_size: int, results: list[dict[str, Any]]) -> None:
    want_loss, want_grad = reference(case)
    for r, res in enumerate(results):  # the same loss, bit for bit, on every rank
        assert res["loss"].dtype == want_loss.dtype
        assert torch.equal(res["loss"], results[0]["loss"]), f"rank {r} differs from rank 0"
    torch.testing.assert_close(results[0]["loss"], want_loss, **TOL[case.dtype])
    grad = torch.cat([res["grad"] for res in results], dim=-1)
    assert [res["grad"].shape[-1] for res in results] == split_sizes(
        case.vocab, world_size, case.split
    )
    torch.testing.assert_close(grad, want_grad, **TOL[case.dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_loss_and_grad_equal_single_process(case: Case, ranks: Any) -> None:
    world_size, results = ranks
    check_against_reference(
        case, world_size, [res["unfused"]["cases"][case.name] for res in results]
    )


def test_group_still_usable_after_bad_calls(ranks: Any) -> None:
    world_size, results = ranks
    check_against_reference(
        CASES[0], world_size, [res["unfused"]["after_errors"] for res in results]
    )


# name: (rank(s) whose own arguments are wrong, the error they raise, words in every message)
EXPECTED_ERRORS = {
    # no jvp: was 'You must implement the jvp function for custom autograd.Function'
    "dual_logits": (
        None,
        "RuntimeError",
        "crossent.distributed.vocab_parallel_cross_entropy has no forward-mode derivative",
    ),
    "batch_shape_differs": (None, "ValueError", "same shape on every rank"),
    "label_above_global_vocab": (None, "ValueError", "outside the global vocabulary [0, 11)"),
    "negative_label": (None, "ValueError", "min=-7"),
    "float_target_on_rank_0": (0, "TypeError", "integer class indices"),
    "target_shape_mismatch_on_rank_1": (1, "ValueError", "without its last (vocabulary) axis"),
    # the options and dtypes vocab_parallel_cross_entropy compares, none it does not take
    # (the message listed the hidden size, a bias and `shift`, the fused functions')
    "options_differ": (
        None,
        "ValueError",
        "(`ignore_index`, `label_smoothing`, `z_loss`, `softcap`, `reduction`, the dtype of "
        "`local_logits`); pass",
    ),
    "bad_option_on_last_rank": (-1, "ValueError", "`reduction`"),
    "targets_differ": (None, "ValueError", "different `target` tensors"),
    "weight_on_rank_0_only": (None, "ValueError", "given on some ranks but not on others"),
    "weight_wrong_length": (None, "ValueError", "either the whole vocabulary (11 classes)"),
    "weights_differ": (None, "ValueError", "the ranks hold different `weight` values"),
    # with validation off: torch's IndexError, still on every rank
    "label_above_global_vocab_validation_off": (None, "IndexError", "outside [0, 11)"),
    "negative_label_validation_off": (None, "IndexError", "min=-7"),
    "label_above_global_vocab_on_rank_1_only_validation_off": (None, "IndexError", "max=11"),
    # a uint64 label of 2**63 or more, named by its value; it was dropped silently
    "uint64_label_wrapping_to_ignore_index": (None, "ValueError", "max=18446744073709551516."),
    "uint64_label_wrapping_to_ignore_index_validation_off": (
        None,
        "IndexError",
        "max=18446744073709551516",
    ),
}


def test_every_bad_call_is_listed() -> None:
    assert set(BAD_CALLS) == set(EXPECTED_ERRORS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_call_raises_on_every_rank(name: str, ranks: Any) -> None:
    _, results = ranks
    check_errors(name, EXPECTED_ERRORS[name], [res["unfused"]["errors"][name] for res in results])


def check_errors(name: str, expected: tuple[Any, str, str], errors: list[Any]) -> None:
    culprit, kind, words = expected
    if culprit is not None:
        culprit %= len(errors)
    for r, err in enumerate(errors):
        assert err is not None, f"rank {r} did not raise for {name}"
        if culprit is None or r == culprit:
            assert err[0] == kind, err
            assert words in err[1], err
        else:  # the other ranks name the culprit instead of waiting for it
            assert err[0] == "ValueError", err
            assert f"rank(s) [{culprit}]" in err[1], err


def test_needs_a_process_group() -> None:
    case = CASES[0]
    p = problem(case)
    lo, hi = bounds(case, 1, 0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(p["logits"][..., lo:hi], p["target"])


@pytest.fixture
def one_rank_group() -> Any:
    """A gloo group of one in this process (127.0.0.1), destroyed afterwards."""
    import torch.distributed as dist

    from tests.distributed._harness import HOST, free_port

    dist.init_process_group("gloo", init_method=f"tcp://{HOST}:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_on_a_group_of_one(reduction: str, one_rank_group: Any) -> None:
    from crossent.distributed import vocab_parallel_linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2, 2])
    weight = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    opts = {"label_smoothing": 0.2, "z_loss": 0.05, "softcap": 2.0, "reduction": reduction}
    torch.autograd.gradcheck(
        lambda x: vocab_parallel_cross_entropy(x, target, weight=weight, **opts), (logits,)
    )
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda h, w, b: vocab_parallel_linear_cross_entropy(
            h, w, target, bias=b, class_weight=weight, chunk_size=2, **opts
        ),
        (hidden, proj, bias),
    )


@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "label_smoothing": 0.1}])
def test_strided_local_logits(options: dict[str, Any], one_rank_group: Any) -> None:
    """A transposed (column-major) slice of logits: the in-place softmax of the core read
    values it had already overwritten (loss 1.36 off, gradient rows not summing to 0)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64).T.requires_grad_(True)
    assert not logits.is_contiguous()
    target = torch.tensor([0, 3, 1, 2, 2])
    got = vocab_parallel_cross_entropy(logits, target, reduction="none", **options)
    want = ce.sparse_categorical_cross_entropy(
        logits.detach().contiguous(), target, from_logits=True, reduction="none", **options
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    (grad,) = torch.autograd.grad((got * torch.arange(5.0, dtype=torch.float64)).sum(), logits)
    x = logits.detach().contiguous().requires_grad_(True)
    loss = ce.sparse_categorical_cross_entropy(
        x, target, from_logits=True, reduction="none", **options
    )
    (want_grad,) = torch.autograd.grad((loss * torch.arange(5.0, dtype=torch.float64)).sum(), x)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-13)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_transforms_give_a_clear_error(one_rank_group: Any) -> None:
    """torch.func raised "must override the setup_context staticmethod" (the unfused loss),
    torch.compile(fullgraph=True) "does not know how to trace the builtin zlib.crc32"."""
    from crossent.distributed import vocab_parallel_linear_cross_entropy

    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, -100])

    def loss(x: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)

    transforms = [  # (the name in the message, the call); vjp and jacrev push grad's level
        ("grad", lambda: torch.func.grad(loss)(logits)),
        ("vmap", lambda: torch.func.vmap(loss)(logits[None])),
        ("grad", lambda: torch.func.vjp(loss, logits)),
        ("jvp", lambda: torch.func.jacfwd(loss)(logits)),
    ]
    for name, call in transforms:
        with pytest.raises(
            RuntimeError, match="vocab_parallel_cross_entropy does not support"
        ) as info:
            call()
        # the transform is named, and the per-sample fix given (before: "torch.func
        # transforms (grad, vmap, jacrev)" whichever ran, no word on per-sample gradients)
        assert f"does not support torch.func.{name} (nor any" in str(info.value)
        assert "for per-sample gradients (vmap(grad(...))) use the single-process" in str(
            info.value
        )
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy does not support torch\.func"):
        torch.func.grad(lambda h: vocab_parallel_linear_cross_entropy(h, logits, target))(
            torch.randn(3, 3, dtype=torch.float64)
        )
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"cannot be traced by torch\.compile") as info:
        torch.compile(loss, fullgraph=True, backend="eager")(logits)
    assert "zlib" not in str(info.value)
    # without fullgraph: graph breaks (Dynamo warns about what it cannot trace), the call
    # runs eagerly, the numbers are right
    x = logits.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(loss, backend="eager")(x)
    (grad,) = torch.autograd.grad(got, x)
    want = ce.sparse_categorical_cross_entropy(
        x, target, from_logits=True, label_smoothing=0.1, ignore_index=-100
    )
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-13)


def test_autocast_returns_float32(one_rank_group: Any) -> None:
    """Under torch.autocast a bfloat16 loss came back in bfloat16 (2.4375 where the
    single-process loss and F.cross_entropy give float32 2.44043)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g).to(torch.bfloat16).requires_grad_(True)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vocab_parallel_cross_entropy(logits, target)
        want = torch.nn.functional.cross_entropy(logits, target)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got, logits)
    assert grad.dtype == torch.bfloat16
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad)


def test_double_backward_raises(one_rank_group: Any) -> None:
    """create_graph=True gave a gradient without a graph: (g * x).sum().backward() then
    returned g alone as d/dx, a wrong second-order term (-0.144 where the single-process
    loss gives -0.033), instead of an error."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1])
    loss = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_double_backward_of_the_linear_functions_names_them(one_rank_group: Any) -> None:
    """Their second-derivative error named crossent.fused.linear_cross_entropy /
    linear_log_probs, functions the caller never called."""
    from crossent.distributed import (
        vocab_parallel_linear_cross_entropy,
        vocab_parallel_linear_log_probs,
    )

    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 4, 1])
    for fn, name in (
        (vocab_parallel_linear_cross_entropy, "vocab_parallel_linear_cross_entropy"),
        (vocab_parallel_linear_log_probs, "vocab_parallel_linear_log_probs"),
    ):
        out = fn(h, w, target, reduction="none") if "cross" in name else fn(h, w, target)
        with pytest.raises(RuntimeError, match=rf"^crossent\.distributed\.{name} has no second"):
            torch.autograd.grad(out.sum(), h, create_graph=True)


def test_nan_class_weight_propagates_to_the_mean(one_rank_group: Any) -> None:
    """A NaN class weight of a counted target gave a mean of 0 (NaN > 0 is False, the
    'no counted target' branch), where the single-process loss and F.cross_entropy give NaN."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 4, 2, -100])
    weight = torch.tensor([float("nan"), 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    loss = vocab_parallel_cross_entropy(logits, target, weight=weight)
    want = torch.nn.functional.cross_entropy(logits, target, weight=weight)
    assert torch.isnan(want)
    assert torch.isnan(loss)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1}])
def test_an_ignored_row_of_masked_logits_gets_a_zero_gradient(
    options: dict[str, Any], one_rank_group: Any
) -> None:
    """An ignored row whose logits are all -inf (a masked padding position) contributes
    nothing: its gradient was NaN NaN NaN NaN (the merged row max -inf made p NaN, times the
    row's zero scale), as the single-process losses' was; now 0, the other rows unchanged."""
    inf = float("inf")
    logits = torch.tensor(
        [[-inf] * 4, [0.5, 1.0, -1.0, 2.0], [0.0, -inf, 3.0, 1.0]], dtype=torch.float64
    )
    target = torch.tensor([-100, 1, 2])
    grads = []
    for rows in (slice(None), slice(1, None)):
        x = logits[rows].clone().requires_grad_(True)
        vocab_parallel_cross_entropy(x, target[rows], **options).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0][0], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1:], grads[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("label", [-100, 0], ids=["ignored", "counted"])
@pytest.mark.parametrize("bad", ["nan", "+inf"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 0.1}])
def test_a_row_holding_nan_or_inf_gets_a_nan_gradient_throughout(
    options: dict[str, Any], bad: str, label: int, one_rank_group: Any
) -> None:
    """A row holding NaN or +inf, counted or ignored: a NaN gradient throughout, as
    F.cross_entropy's and the single-process losses' (an ignored row's loss stays out of
    the value); the other rows unchanged."""
    row = [math.nan if bad == "nan" else math.inf, 0.5, 1.0, -1.0]
    logits = torch.tensor(
        [row, [0.5, 1.0, -1.0, 2.0], [0.0, -math.inf, 3.0, 1.0]], dtype=torch.float64
    )
    target = torch.tensor([label, 1, 2])
    grads, losses = [], []
    for rows in (slice(None), slice(1, None)):
        x = logits[rows].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(x, target[rows], reduction="sum", **options)
        loss.backward()
        grads.append(x.grad)
        losses.append(loss.detach())
    assert grads[0][0].isnan().all(), grads[0][0]
    torch.testing.assert_close(grads[0][1:], grads[1], rtol=1e-12, atol=1e-15)
    if label == -100:
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
