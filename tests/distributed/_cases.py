"""Deterministic cases shared by the spawned ranks and the parent that checks them.

Every rank rebuilds the whole problem from the case's seed, takes its slice of
the vocabulary, and returns its loss and gradient slice; the parent rebuilds the
same problem and computes the single-process loss with crossent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    batch: tuple[int, ...] = (7,)
    vocab: int = 11
    split: str = "even"  # "even" (sizes differ by at most 1) or "skewed" (rank 0 holds 1 class)
    weight: str | None = None  # None, "global" (whole vector) or "local" (this rank's slice)
    dtype: str = "float32"
    ignored: str = "some"  # "none", "some" or "all" targets equal to ignore_index
    masked: bool = False  # some non-target logits are -inf (fused: MASKED_CLASSES in the bias)
    hidden: int = 5  # hidden size of the fused cases
    bias: bool = False  # fused cases: a bias vector
    hidden_dtype: str | None = None  # fused cases: hidden in another dtype than the weight
    far_target: float = 0.0  # fused cases with a bias: row 1's target class lowered this much
    # fused cases: hidden states moved so that one class gets p near 1, 1 - p falling from
    # 1e-1 to below 1e-10 along the rows: the target in even rows, the next class in odd ones
    confident: bool = False
    # class weights of the upper classes (>= HIGH_CLASSES) times this: none on rank 0's slice
    # of 2, 3 or 4 ranks, so that a scale decided from a rank's own slice would differ
    weight_scale: float = 1.0
    # row 1's label is ZERO_WEIGHT_CLASS, of class weight 0 and logit -inf (fused: bias -inf)
    zero_weight_masked: bool = False
    # fused cases with a bias: every class's bias lowered this much (every row's largest logit
    # negative, below the 0 that stands in for the max of a slice of -inf logits)
    bias_shift: float = 0.0
    seed: int = 0


#: Classes a fused case with ``masked=True`` (and a bias) rules out: where the even splits
#: of 11 classes over 2, 3 and 4 ranks start, and the whole first slice of a skewed split.
MASKED_CLASSES = [0, 3, 4, 6, 8, 9]

#: First class scaled by ``Case.weight_scale`` (11 classes: rank 0 holds 0..5, 0..3 or 0..2).
HIGH_CLASSES = 6

#: The class of ``Case.zero_weight_masked``: on rank 1 of 2 or 3 ranks, on rank 2 of 4.
ZERO_WEIGHT_CLASS = 7


def split_sizes(vocab: int, world_size: int, kind: str) -> list[int]:
    """Slice lengths in rank order; never divisible-friendly by construction of the cases."""
    if kind == "skewed":
        rest = [len(c) for c in torch.arange(vocab - 1).tensor_split(world_size - 1)]
        return [1, *rest]
    return [len(c) for c in torch.arange(vocab).tensor_split(world_size)]


def bounds(case: Case, world_size: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(case.vocab, world_size, case.split)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def problem(case: Case) -> dict[str, Any]:
    """Logits, hidden, weight matrix, target, class weights, upstream gradient (float64)."""
    g = torch.Generator().manual_seed(case.seed)
    n = 1
    for d in case.batch:
        n *= d
    ignore_index = case.options.get("ignore_index", -100)
    target = torch.randint(0, case.vocab, case.batch, generator=g)
    if case.ignored == "some" and ignore_index is not None:
        target.view(-1)[::3] = ignore_index
    elif case.ignored == "all":
        target.fill_(ignore_index)
    hidden = torch.randn((*case.batch, case.hidden), generator=g, dtype=torch.float64)
    matrix = torch.randn((case.vocab, case.hidden), generator=g, dtype=torch.float64)
    logits = 3 * torch.randn((*case.batch, case.vocab), generator=g, dtype=torch.float64)
    if case.masked:
        mask = torch.rand(logits.shape, generator=g) < 0.3
        mask.view(-1, case.vocab)[torch.arange(n), target.view(-1).clamp(0, case.vocab - 1)] = False
        logits = logits.masked_fill(mask, -float("inf"))
    class_weight = torch.rand(case.vocab, generator=g, dtype=torch.float64) + 0.25
    # huge: the high classes; tiny: every class (all below 2**-64 is what scales them)
    class_weight[HIGH_CLASSES if case.weight_scale > 1 else 0 :] *= case.weight_scale
    bias = torch.randn(case.vocab, generator=g, dtype=torch.float64)
    if case.masked and case.bias:  # fused cases: classes ruled out by a -inf bias
        bias[MASKED_CLASSES] = -float("inf")
    if case.zero_weight_masked:
        target.view(-1)[1] = ZERO_WEIGHT_CLASS
        class_weight[ZERO_WEIGHT_CLASS] = 0.0
        logits[..., ZERO_WEIGHT_CLASS] = -float("inf")
        bias[ZERO_WEIGHT_CLASS] = -float("inf")
    if case.far_target:
        bias[target.view(-1)[1]] -= case.far_target
    bias -= case.bias_shift
    if case.confident:
        flat = target.view(-1).clamp(0, case.vocab - 1)
        top = (flat + torch.arange(n) % 2) % case.vocab
        boost = torch.linspace(4.0, 50.0, n, dtype=torch.float64)
        rows = matrix[top]
        hidden.view(n, -1).add_(boost[:, None] * rows / (rows**2).sum(dim=1, keepdim=True))
    reduction = case.options.get("reduction", "mean")
    out_shape = case.batch
    if case.options.get("shift"):
        out_shape = (*case.batch[:-1], case.batch[-1] - 1)
    upstream = torch.randn(
        out_shape if reduction == "none" else (), generator=g, dtype=torch.float64
    )
    dtype = DTYPES[case.dtype]
    return {
        "logits": logits.to(dtype),
        "hidden": hidden.to(DTYPES[case.hidden_dtype or case.dtype]),
        "matrix": matrix.to(dtype),
        "target": target,
        "class_weight": class_weight.to(dtype) if case.weight else None,
        "bias": bias.to(dtype) if case.bias else None,
        "upstream": upstream,
    }


CASES = [
    Case("plain_mean"),
    Case("plain_sum", {"reduction": "sum"}, split="skewed"),
    Case("plain_none_2d", {"reduction": "none"}, batch=(2, 4)),
    Case("no_ignore_index", {"ignore_index": None}, ignored="none"),
    Case("other_ignore_index", {"ignore_index": 3, "reduction": "sum"}),
    Case("smoothing_mean", {"label_smoothing": 0.2}, split="skewed"),
    Case("smoothing_none", {"label_smoothing": 0.1, "reduction": "none"}),
    Case("z_loss_mean", {"z_loss": 1e-2}),
    Case("z_loss_none", {"z_loss": 1e-1, "reduction": "none"}, split="skewed"),
    Case("softcap_sum", {"softcap": 2.5, "reduction": "sum"}),
    # beyond float32's range: the cap overflowed to inf, inf * tanh(x / inf) was NaN
    Case("softcap_beyond_float32_masked", {"softcap": 1e39, "reduction": "none"}, masked=True),
    Case("weight_global_mean", {"label_smoothing": 0.1}, weight="global"),
    Case("weight_local_none", {"reduction": "none", "z_loss": 1e-2}, weight="local"),
    Case(
        "weight_local_smoothing_sum",
        {"label_smoothing": 0.3, "reduction": "sum"},
        weight="local",
        split="skewed",
    ),
    Case(
        "everything_mean",
        {"label_smoothing": 0.15, "z_loss": 1e-2, "softcap": 4.0},
        weight="global",
        vocab=13,
    ),
    Case("all_ignored_mean", ignored="all"),
    Case("masked_logits_mean", masked=True),
    Case(
        "float64_everything_none",
        {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "reduction": "none"},
        dtype="float64",
    ),
    Case("bfloat16_mean", {"label_smoothing": 0.1}, dtype="bfloat16"),
    # float32 class weights near its largest: both sums of the weighted mean overflowed (NaN)
    Case("huge_weight_local_mean", {"label_smoothing": 0.1}, weight="local", weight_scale=2.5e38),
    Case("huge_weight_global_mean", weight="global", weight_scale=2.5e38, split="skewed"),
    # subnormal float32 weights: their products lost digits (every rank scales them alike)
    Case("tiny_weight_local_mean", {"label_smoothing": 0.1}, weight="local", weight_scale=1e-40),
    # above the scaling threshold (2**64) on some ranks' slices only: one decision for all ranks
    Case("large_weight_local_mean", weight="local", weight_scale=2.0**66),
    # a counted label of class weight 0 on a -inf logit: its term is 0, not 0 * inf = NaN
    Case("zero_weight_label_on_masked_class_mean", weight="global", zero_weight_masked=True),
    Case(
        "zero_weight_label_on_masked_class_smoothing_none",
        {"label_smoothing": 0.1, "reduction": "none"},
        weight="local",
        zero_weight_masked=True,
    ),
]

# The fused path: `options` may add chunk_size; `weight` can only be "global" (the core's rule).
LINEAR_CASES = [
    Case("linear_mean"),
    Case("linear_sum_bias_skewed", {"reduction": "sum"}, bias=True, split="skewed"),
    Case(
        "linear_none_2d_smoothing_z",
        {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2},
        batch=(2, 4),
    ),
    Case(
        "linear_softcap_smoothing_chunks",
        {"softcap": 3.0, "label_smoothing": 0.2, "chunk_size": 3},
        bias=True,
    ),
    Case(
        "linear_class_weight_mean",
        {"label_smoothing": 0.1, "chunk_size": 2},
        weight="global",
        vocab=13,
    ),
    Case(
        "linear_softcap_beyond_float32_masked",
        {"softcap": 1e39, "chunk_size": 3, "reduction": "none"},
        bias=True,
        masked=True,
    ),
    Case("linear_other_ignore_index_sum", {"ignore_index": 4, "reduction": "sum"}),
    Case("linear_all_ignored_mean", ignored="all"),
    Case(
        "linear_float64_everything_none",
        {
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "softcap": 2.0,
            "reduction": "none",
            "chunk_size": 2,
        },
        dtype="float64",
        bias=True,
        weight="global",
    ),
    Case(
        "linear_shift_none_bias",
        {"reduction": "none", "shift": True, "chunk_size": 3},
        batch=(2, 5),
        bias=True,
    ),
    Case("linear_shift_mean_skewed", {"shift": True}, batch=(3, 4), split="skewed"),
    Case(
        "linear_bfloat16_hidden_float32_weight",
        {"label_smoothing": 0.1, "chunk_size": 4},
        bias=True,
        hidden_dtype="bfloat16",
    ),
    Case(  # float32 class weights near its largest: the weighted mean's sums overflowed
        "linear_huge_class_weight_mean",
        {"label_smoothing": 0.1, "chunk_size": 3},
        weight="global",
        weight_scale=2.5e38,
    ),
    Case(  # subnormal float32 class weights: 1 / sum(w_y) overflowed (inf)
        "linear_tiny_class_weight_mean",
        {"chunk_size": 3},
        weight="global",
        weight_scale=1e-40,
    ),
    Case(  # a counted label of class weight 0 on a class masked by a -inf bias
        "linear_zero_weight_label_on_masked_bias",
        {"label_smoothing": 0.1, "chunk_size": 3},
        weight="global",
        bias=True,
        zero_weight_masked=True,
    ),
    Case(
        "linear_bfloat16_sum_bias",
        {"reduction": "sum", "label_smoothing": 0.1},
        dtype="bfloat16",
        bias=True,
    ),
]

# vocab_parallel_linear_log_probs: `options` are linear_log_probs keywords.
LOG_PROB_CASES = [
    Case("log_probs_plain", {"chunk_size": 3}),
    Case(
        "log_probs_entropy_temperature_bias_skewed",
        {"return_entropy": True, "temperature": 0.7, "chunk_size": 2},
        bias=True,
        split="skewed",
    ),
    Case(
        "log_probs_entropy_softcap_shift_2d",
        {"return_entropy": True, "softcap": 2.5, "shift": True, "temperature": 1.3},
        batch=(2, 5),
    ),
    Case("log_probs_all_ignored", {"return_entropy": True}, ignored="all"),
    Case(
        "log_probs_softcap_beyond_float32_masked",
        {"return_entropy": True, "softcap": 1e39},
        bias=True,
        masked=True,
    ),
    Case(
        "log_probs_float64_entropy",
        {"return_entropy": True, "softcap": 3.0, "chunk_size": 4},
        dtype="float64",
        bias=True,
    ),
    Case(
        "log_probs_masked_bias_entropy_temperature",
        {"return_entropy": True, "temperature": 0.8, "chunk_size": 3},
        bias=True,
        masked=True,
    ),
    Case(
        "log_probs_masked_bias_empty_first_slice",
        {"return_entropy": True},
        bias=True,
        masked=True,
        split="skewed",
    ),
    Case(  # a slice's log-sum-exp recovered at the target column cancelled: 3e-3 error
        "log_probs_target_1e6_below_the_rest",
        {"return_entropy": True},
        bias=True,
        far_target=1e6,
    ),
    Case(  # log_softmax's log p_* of a confident row is rounded at 1, as was log(sum e^delta)
        "log_probs_confident_rows_entropy",
        {"return_entropy": True, "chunk_size": 4},
        batch=(16,),
        hidden=32,
        bias=True,
        confident=True,
    ),
    Case(
        "log_probs_bfloat16_hidden_float32_weight",
        {"return_entropy": True},
        hidden_dtype="bfloat16",
    ),
    Case(  # 1/T = 1e38: the slices' unshifted log-sum-exp overflowed (logits above 3.4)
        "log_probs_tiny_temperature_entropy",
        {"return_entropy": True, "temperature": 1e-38, "chunk_size": 3},
        bias=True,
    ),
    Case(  # and with a class masked by -inf in one slice
        "log_probs_tiny_temperature_masked",
        {"temperature": 3e-39},
        bias=True,
        masked=True,
        split="skewed",
    ),
    Case(  # rank 0's slice all -inf, every row's largest logit negative: the empty slice's
        # stand-in maximum 0 won the ranks' maximum, and log p came back +inf (float64: the
        # tempered logits are finite; float32 alike)
        "log_probs_tiny_temperature_empty_slice_negative_logits",
        {"temperature": 3e-39, "return_entropy": True, "chunk_size": 3},
        bias=True,
        masked=True,
        split="skewed",
        bias_shift=40.0,
        dtype="float64",
    ),
]


def log_prob_upstream(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream gradients of (log_probs, entropy), float64, the output's shape."""
    shape = case.batch
    if case.options.get("shift"):
        shape = (*case.batch[:-1], case.batch[-1] - 1)
    g = torch.Generator().manual_seed(case.seed + 1)
    # a tiny temperature's gradients are about g / T, beyond float32 for g ~ 1 (the hidden
    # gradient's matmul then meets inf - inf, in a single process too): g ~ 1e-30 there
    scale = 1e-30 if case.options.get("temperature", 1.0) < 1e-30 else 1.0
    return (
        scale * torch.randn(shape, generator=g, dtype=torch.float64),
        scale * torch.randn(shape, generator=g, dtype=torch.float64),
    )
