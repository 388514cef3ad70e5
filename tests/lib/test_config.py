"""The validation switch: in code, as a context manager and from the environment."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

import crossent as ce


def test_set_validation_round_trip() -> None:
    assert ce.get_validation() is True
    ce.set_validation(False)
    try:
        assert ce.get_validation() is False
    finally:
        ce.set_validation(True)


def _fail_inside_validation_off() -> None:
    with ce.validation(False):
        assert not ce.get_validation()
        raise RuntimeError


def test_context_manager_restores_on_error() -> None:
    with pytest.raises(RuntimeError):
        _fail_inside_validation_off()
    assert ce.get_validation()


def test_set_validation_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="`enabled` must be a bool"):
        ce.set_validation("no")  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [("0", "False"), ("off", "False"), ("1", "True")])
def test_environment_variable(value: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import crossent; print(crossent.get_validation())"],
        env={"CROSSENT_VALIDATE": value, "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


# --------------------------------------------------------------------------- threads and tasks

BAD_LABEL = (np.array([[0.2, 0.8]]), np.array([7]))


def _bad_label_error() -> type[BaseException] | None:
    """The exception a label outside [0, 2) gives now (ValueError with validation on)."""
    try:
        ce.sparse_categorical_cross_entropy(*BAD_LABEL)
    except (ValueError, IndexError) as exc:
        return type(exc)
    return None


def test_validation_block_is_local_to_its_thread() -> None:
    """While thread A is inside validation(False), thread B still gets the ValueError."""
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def a() -> None:
        with ce.validation(False):
            inside.set()
            done.wait(10)
            seen["a"] = ce.get_validation()

    def b() -> None:
        inside.wait(10)
        seen["b"] = ce.get_validation()
        seen["b_error"] = _bad_label_error()
        done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"a": False, "b": True, "b_error": ValueError}
    assert ce.get_validation()


def test_interleaved_blocks_in_two_threads_restore_the_default() -> None:
    """A enters, B enters, A leaves, B leaves: validation is on again for everyone."""
    steps = [threading.Event() for _ in range(4)]
    seen: dict[str, bool] = {}

    def a() -> None:
        with ce.validation(False):
            steps[0].set()
            steps[1].wait(10)
        seen["a_after"] = ce.get_validation()
        steps[2].set()

    def b() -> None:
        steps[0].wait(10)
        with ce.validation(False):
            steps[1].set()
            steps[2].wait(10)
            seen["b_inside"] = ce.get_validation()
        seen["b_after"] = ce.get_validation()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"a_after": True, "b_inside": False, "b_after": True}
    assert ce.get_validation()


def test_set_validation_is_the_default_for_every_thread_but_blocks_win() -> None:
    seen: list[bool] = []
    ce.set_validation(False)
    try:
        worker = threading.Thread(target=lambda: seen.append(ce.get_validation()))
        worker.start()
        worker.join(10)
        with ce.validation(True):
            assert ce.get_validation()
            assert _bad_label_error() is ValueError
        assert not ce.get_validation()
    finally:
        ce.set_validation(True)
    assert seen == [False]


def test_validation_block_is_local_to_its_asyncio_task() -> None:
    async def main() -> dict[str, Any]:
        entered, release = asyncio.Event(), asyncio.Event()
        seen: dict[str, Any] = {}

        async def off() -> None:
            with ce.validation(False):
                entered.set()
                await release.wait()
                seen["off_after_await"] = ce.get_validation()

        async def on() -> None:
            await entered.wait()
            seen["on"] = ce.get_validation()
            seen["on_error"] = _bad_label_error()
            release.set()

        await asyncio.gather(off(), on())
        seen["main"] = ce.get_validation()
        return seen

    seen = asyncio.run(main())
    assert seen == {"off_after_await": False, "on": True, "on_error": ValueError, "main": True}


def test_interleaved_blocks_in_two_tasks_restore_the_default() -> None:
    async def main() -> list[bool]:
        order: list[bool] = []
        a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def a() -> None:
            with ce.validation(False):
                a_in.set()
                await b_in.wait()
            order.append(ce.get_validation())
            a_out.set()

        async def b() -> None:
            await a_in.wait()
            with ce.validation(False):
                b_in.set()
                await a_out.wait()
                order.append(ce.get_validation())
            order.append(ce.get_validation())

        await asyncio.gather(a(), b())
        return [*order, ce.get_validation()]

    assert asyncio.run(main()) == [True, False, True, True]
