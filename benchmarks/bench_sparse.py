"""Forward+backward time and peak memory: crossent sparse CE vs torch cross_entropy (and JAX).

Run: ``python -m benchmarks.bench_sparse [--quick]``. Times are best of 5
(CPU, float32); memory is the extra RSS high-water mark of a fresh subprocess
per case (see benchmarks/_util.py).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import crossent as ce
from benchmarks._util import best_time, peak_memory_mib, reset_peak_rss, rss_mib

FULL = [(8192, 32000), (65536, 1000)]
QUICK = [(512, 4000), (4096, 200)]


def _step(provider: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if provider == "torch":
        loss = F.cross_entropy(x, y)
    else:
        loss = ce.sparse_categorical_cross_entropy(x, y, from_logits=True)
    loss.backward()
    x.grad = None


def _inputs(n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, generator=g).requires_grad_(True), torch.randint(
        0, c, (n,), generator=g
    )


def _measure(provider: str, n: int, c: int) -> None:
    small_x, small_y = _inputs(8, 16)
    _step(provider, small_x, small_y)  # lazy initialisation before the baseline
    x, y = _inputs(n, c)
    before = reset_peak_rss()
    _step(provider, x, y)
    print(json.dumps({"peak_mib": rss_mib("VmHWM") - before}))


def _jax_times(n: int, c: int) -> tuple[float, float] | None:
    """Jitted value-and-grad time: JAX's own log_softmax CE vs crossent on JAX arrays."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (n, c), dtype=jnp.float32)
    y = jax.random.randint(key_y, (n,), 0, c)

    def native(z: jax.Array) -> jax.Array:
        log_p = jax.nn.log_softmax(z, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    def ours(z: jax.Array) -> jax.Array:
        return ce.sparse_categorical_cross_entropy(z, y, from_logits=True)

    times = []
    for f in (native, ours):
        step = jax.jit(jax.value_and_grad(f))
        times.append(best_time(lambda step=step: step(x)[1].block_until_ready()))
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument(
        "--measure", nargs=3, metavar=("PROVIDER", "N", "C"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure:
        _measure(args.measure[0], int(args.measure[1]), int(args.measure[2]))
        return
    ce.set_validation(False)
    print(f"{'N':>6} {'C':>6} | {'torch ms':>9} {'crossent ms':>11} {'ratio':>6} | "
          f"{'torch MiB':>9} {'crossent MiB':>12} {'ratio':>6}")  # fmt: skip
    for n, c in QUICK if args.quick else FULL:
        x, y = _inputs(n, c)
        t_torch = best_time(lambda x=x, y=y: _step("torch", x, y))
        t_ce = best_time(lambda x=x, y=y: _step("crossent", x, y))
        m_torch = peak_memory_mib("benchmarks.bench_sparse", "torch", str(n), str(c))
        m_ce = peak_memory_mib("benchmarks.bench_sparse", "crossent", str(n), str(c))
        print(f"{n:>6} {c:>6} | {t_torch * 1e3:9.1f} {t_ce * 1e3:11.1f} {t_ce / t_torch:6.2f} | "
              f"{m_torch:9.1f} {m_ce:12.1f} {m_ce / max(m_torch, 1e-9):6.2f}")  # fmt: skip
    print()
    print(f"{'N':>6} {'C':>6} | {'jax ms':>9} {'crossent-on-jax ms':>18} {'ratio':>6}")
    for n, c in QUICK if args.quick else FULL:
        jt = _jax_times(n, c)
        if jt is None:
            print("jax not installed: JAX comparison skipped")
            break
        print(f"{n:>6} {c:>6} | {jt[0] * 1e3:9.1f} {jt[1] * 1e3:18.1f} {jt[1] / jt[0]:6.2f}")


if __name__ == "__main__":
    main()
