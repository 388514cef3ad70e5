"""Threads: the per-thread float32 work buffers and the validation switch under concurrency."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import crossent as ce  # noqa: E402


def _cases() -> list[tuple[Any, Callable[[Any], Any]]]:
    """(input, loss) pairs of different shapes and dtypes, each on a chunked buffer path."""
    g = torch.Generator().manual_seed(0)
    cases: list[tuple[Any, Callable[[Any], Any]]] = []
    for n, c, dtype in [(700, 300, torch.bfloat16), (400, 400, torch.float16),
                        (300, 500, torch.float32), (9, 5, torch.float64)]:  # fmt: skip
        x = (torch.randn(n, c, generator=g) * 3).to(dtype)
        y = torch.randint(0, c, (n,), generator=g)
        t = torch.rand(n, c, generator=g).to(dtype)
        p = torch.softmax(torch.randn(n, c, generator=g), 1).to(dtype)
        w = (torch.rand(c, generator=g) + 0.5).to(dtype)
        q = torch.rand(n, c, generator=g).to(dtype)  # probabilities
        cases += [
            (q, lambda v, t=t, w=w: ce.binary_cross_entropy(v, t, weight=w, label_smoothing=0.1)),
            (x, lambda v, y=y: ce.sparse_categorical_cross_entropy(v, y, from_logits=True)),
            (x, lambda v, t=t, w=w: ce.binary_cross_entropy(v, t, from_logits=True, pos_weight=w)),
            (x, lambda v, p=p: ce.categorical_cross_entropy(v, p, from_logits=True, reduction="none")),
        ]  # fmt: skip
    return cases


def _run(x: Any, loss: Callable[[Any], Any]) -> tuple[Any, Any]:
    v = x.clone().requires_grad_(True)
    out = loss(v)
    (grad,) = torch.autograd.grad(out.sum(), v)
    return out.detach(), grad


def test_concurrent_losses_equal_sequential_ones() -> None:
    """Threads calling losses of different shapes and dtypes get the sequential bits."""
    old = sys.getswitchinterval()
    cases = _cases()
    expected = [_run(*case) for case in cases]
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            i = rng.randrange(len(cases))
            got = _run(*cases[i])
            if not all(torch.equal(a, b) for a, b in zip(got, expected[i], strict=True)):
                failures.append(f"case {i}")

    sys.setswitchinterval(1e-5)  # switch threads inside the chunk loops
    try:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not failures


def test_validation_switch_is_per_thread() -> None:
    """`validation(False)` in one thread leaves the other thread's checks on."""
    probs = torch.tensor([[0.5, 0.6, 0.1]])
    y = torch.tensor([0])
    inside, outside = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def raises() -> bool:
        try:
            ce.sparse_categorical_cross_entropy(probs, y)
        except ValueError:
            return True
        return False

    def switched_off() -> None:
        with ce.validation(False):
            inside.set()
            outside.wait()
            seen["off"] = raises()

    def default() -> None:
        inside.wait()
        seen["on"] = raises()
        outside.set()

    threads = [threading.Thread(target=switched_off), threading.Thread(target=default)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"off": False, "on": True}
