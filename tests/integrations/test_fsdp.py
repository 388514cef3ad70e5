"""A patched model under FSDP2 (``fully_shard``), FSDP1 and DDP on 2 gloo ranks trains as the
unpatched one.

The head sharded on its own is the case that needs the loss inside the head's call: outside it
the head's weight is the sharded ``DTensor`` ("aten.mm.out got mixed torch.Tensor and DTensor").
Each rank trains on its own half of the batch, so a head gradient that missed FSDP's
reduce-scatter differs from the unpatched model's.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tests.distributed._harness import run_ranks  # noqa: E402

MODES = ("root", "layers_and_root", "head_on_its_own", "fsdp1_root", "ddp_checkpointing")


def _train_step(rank: int, world_size: int, mode: str, *, patched: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from crossent.integrations.transformers import patch
    from tests.integrations._models import make_model

    model = make_model("llama")
    if patched:
        patch(model)
    if mode == "ddp_checkpointing":  # DistributedDataParallel, activation checkpointing
        from torch.nn.parallel import DistributedDataParallel

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = DistributedDataParallel(model)
    elif mode == "fsdp1_root":  # FullyShardedDataParallel, as accelerate's FSDP v1
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        mesh = init_device_mesh("cpu", (world_size,))
        if mode != "root":
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
        if mode == "head_on_its_own":
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 160, (2 * world_size, 9), generator=generator)
    labels = ids.clone()
    labels[:, :2] = -100
    mine = slice(2 * rank, 2 * rank + 2)
    loss = model(input_ids=ids[mine], labels=labels[mine]).loss
    loss.backward()
    if mode == "ddp_checkpointing":
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    elif mode == "fsdp1_root":
        with type(model).summon_full_params(model, with_grads=True):
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    else:
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    refused = ""
    if mode == "head_on_its_own":  # the sharded weight outside the head's call: a clear error
        from crossent.fused import linear_cross_entropy

        try:
            linear_cross_entropy(torch.randn(3, 32), model.lm_head.weight, labels[mine, 0])
        except TypeError as exc:
            refused = str(exc)
    return {
        "loss": loss.detach(),
        "grads": grads,
        "params": len(list(model.parameters())),
        "refused": refused,
    }


def _worker(rank: int, world_size: int, payload: Any) -> dict[Any, Any]:
    """Every mode's step, patched and not; an error as its message (each mode its own test)."""
    results: dict[Any, Any] = {}
    for mode in MODES:
        for patched in (False, True):
            try:
                results[mode, patched] = _train_step(rank, world_size, mode, patched=patched)
            except Exception as exc:  # both ranks fail alike: no collective is left waiting
                results[mode, patched] = f"{type(exc).__name__}: {exc}"
    results["fsdp1_head"] = _fsdp1_head_refused()
    return results


def _fsdp1_head_refused() -> str:
    """The message of a patched model whose head FullyShardedDataParallel wraps on its own."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from crossent.integrations.transformers import patch
    from tests.integrations._models import make_model

    model = patch(make_model("llama"))
    policy = ModuleWrapPolicy({torch.nn.Linear})
    model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), auto_wrap_policy=policy)
    ids = torch.zeros((1, 4), dtype=torch.int64)
    try:
        model(input_ids=ids, labels=ids)
    except TypeError as exc:
        return str(exc)
    return ""


@pytest.fixture(scope="module")
def ranks() -> list[dict[Any, Any]]:
    return run_ranks(_worker, 2)


@pytest.mark.parametrize("mode", MODES)
def test_patched_fsdp_model_trains_as_the_unpatched_one(ranks: Any, mode: str) -> None:
    for result in ranks:
        want, got = result[mode, False], result[mode, True]
        assert not isinstance(want, str), want
        assert not isinstance(got, str), got
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)
        assert set(got["grads"]) == set(want["grads"])
        assert len(got["grads"]) == want["params"]  # the head's gradient included
        for name, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_sharded_weight_is_refused_with_a_clear_error(ranks: Any) -> None:
    for result in ranks:
        refused = result["head_on_its_own", True]["refused"]
        assert "`weight` is a DTensor" in refused
        assert "to_local()" in refused


def test_a_head_fsdp1_wraps_on_its_own_is_refused_with_a_clear_error(ranks: Any) -> None:
    for result in ranks:
        assert "wrapped by FullyShardedDataParallel on its own" in result["fsdp1_head"]
