"""Metric.sync(): all_reduce of the states over torch.distributed (2 gloo processes).

The synced figures must be bit-identical to one pass over both ranks' rows:
the exact sums' digits are aligned (rank 1 holds far larger logits, so its
sums need more digits) and summed as integers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - builds without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _data(rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    n = 37 if rank == 0 else 91  # uneven shards
    scale = 1.0 if rank == 0 else 1e6  # different digit windows on the two ranks
    return rng.normal(size=(n, 4)) * scale, rng.integers(0, 4, size=n)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from crossent.metrics import ClassificationMetrics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z, y = _data(rank)
        metric = ClassificationMetrics(input_kind="logits", bins=10).update(
            torch.tensor(z), torch.tensor(y)
        )
        synced = metric.sync()
        again = metric.sync()  # sync leaves the local metric alone: no double counting
        result = synced.compute()
        np.save(
            Path(out_dir) / f"rank{rank}.npy",
            np.array(
                [
                    result["rows"],
                    result["log_loss_nats"],
                    result["ece"],
                    again.count,
                    metric.count,
                    result["brier"],
                    result["ece_equal_mass"],
                    result["per_class"][2]["cross_entropy"],
                ]
            ),
        )
    finally:
        dist.destroy_process_group()


def test_sync_sums_the_states_of_all_ranks() -> None:
    from crossent.metrics import ClassificationMetrics

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        torch.multiprocessing.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        results = [np.load(Path(tmp) / f"rank{r}.npy") for r in range(2)]
    z0, y0 = _data(0)
    z1, y1 = _data(1)
    one = ClassificationMetrics(input_kind="logits", bins=10)
    one.update(np.concatenate([z0, z1]), np.concatenate([y0, y1]))
    want = one.compute()
    for rank, (rows, nats, ece, again_count, local_count, brier, mass, ce2) in enumerate(results):
        assert rows == 128
        assert again_count == 128
        assert local_count == (37, 91)[rank]
        # bit-identical to one pass, not merely close
        assert nats == want["log_loss_nats"]
        assert ece == want["ece"]
        assert brier == want["brier"]
        assert mass == want["ece_equal_mass"]
        assert ce2 == want["per_class"][2]["cross_entropy"]


def _mismatch_worker(rank: int, world: int, payload: object) -> dict[str, object]:
    """Each bad sync, then a good one (the group must still work)."""
    from crossent.metrics import CalibrationError, CrossEntropy

    def attempt(make: object) -> str | None:
        try:
            make().sync()  # type: ignore[operator]
        except ValueError as exc:
            return str(exc)
        return None

    logits, labels = torch.zeros(2, 3 + rank), torch.tensor([0, 1])
    out: dict[str, object] = {
        # rank 1 saw no batch: it raised alone, rank 0 waited in the all_reduce
        "no_batch_on_rank_1": attempt(
            lambda: (
                CrossEntropy(input_kind="logits").update(logits[:, :3], labels)
                if rank == 0
                else CrossEntropy(input_kind="logits")
            )
        ),
        # 3 and 4 classes: silently summed (merge() refuses it)
        "classes_differ": attempt(lambda: CrossEntropy(input_kind="logits").update(logits, labels)),
        # states of different sizes: gloo aborted the processes (SIGABRT)
        "bins_differ": attempt(
            lambda: CalibrationError(input_kind="logits", bins=10 + rank, num_classes=3)
        ),
    }
    good = CrossEntropy(input_kind="logits").update(logits[:, :3], labels).sync()
    out["after"] = good.count
    return out


def test_sync_mismatch_raises_on_every_rank() -> None:
    from tests.distributed._harness import run_ranks

    results = run_ranks(_mismatch_worker, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["after"] == 4
        assert "rank(s) [1] have seen no batch" in str(res["no_batch_on_rank_1"])
        for name in ("classes_differ", "bins_differ"):
            assert "different metrics, settings or numbers of classes" in str(res[name]), rank
        assert "[3, 4]" in str(res["classes_differ"])
