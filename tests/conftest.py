"""Shared fixtures: the `xp` backend fixture and helpers to move data between backends."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

# Under pytest-xdist each of the N workers gets cores // N threads (OpenMP: torch's intra-op
# pool, BLAS; subprocesses of tests inherit it), not every core each: at -n 2 on 2 cores the
# 4 threads spin-waited on each other and tests/fused/test_linear_ce.py, test_func.py and
# tests/losses/test_torch_fast_paths.py took 3.4x the time and CPU of one thread per worker.
# An OMP_NUM_THREADS given by the caller is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = max(1, (_cores or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    if "torch" in sys.modules:  # imported before this file (a plugin): its pool is sized
        sys.modules["torch"].set_num_threads(_threads)

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles each jitted program and each operation per shape (half the JAX tests' time);
# without LLVM's optimization passes the JAX tests take 0.9x the time (-n 2: 126 s, 140 s),
# and with the CPU backend's older LLVM emitters for fusions instead of its MLIR fusion
# emitters a compile takes 0.55x as long (the two hypothesis tests of test_differential that
# run JAX eagerly: 43.6 s, 27.8 s). The HLO (the operations and their order) is unchanged;
# the machine code is slower and may contract fewer multiply-adds, differences far inside
# every tolerance here (all pass either way). (A persistent compilation cache was tried: 2x
# slower with the cold cache CI has.)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)

settings.register_profile(
    "crossent",
    deadline=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("crossent")

BACKENDS = ("numpy", "array_api_strict", "torch", "jax")


def _import_backend(name: str) -> Any:
    if name == "numpy":
        import array_api_compat.numpy as xp_np

        return xp_np
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp_torch

        return xp_torch
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp
    raise ValueError(name)


@pytest.fixture(params=BACKENDS)
def xp(request: pytest.FixtureRequest) -> Any:
    """Every array-API backend crossent claims to support (float64 enabled on JAX)."""
    return _import_backend(request.param)


def to_xp(xp: Any) -> Callable[..., Any]:
    """A converter from NumPy data to `xp` arrays (keeps dtype unless given)."""

    def convert(a: Any, dtype: Any = None) -> Any:
        arr = np.asarray(a)
        out = xp.asarray(arr)
        if dtype is not None:
            out = xp.astype(out, dtype)
        return out

    return convert


def to_numpy(a: Any) -> np.ndarray:
    """Any backend's array as a float64/int NumPy array (test code only)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
    if type(a).__module__.startswith("array_api_strict"):
        a = np.asarray(a._array)
    return np.asarray(a)
