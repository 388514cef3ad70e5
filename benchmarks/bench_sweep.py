"""Size sweep: crossent against the reference library of each backend, ratios of median CPU time.

Run: ``python -m benchmarks.bench_sweep [--quick] [--sizes 32x10,1024x1000] [--threads 1,2]
[--dtypes float32,bfloat16] [--cases sparse,binary] [--compiled [--skip-eager]] [--no-validation]``.

Contenders run interleaved (A, B, A, B, ...) for ``--rounds`` rounds; each
round times a batch of calls in *process* CPU time (robust on a shared
machine); the table shows the median per-call time of each and the ratio of
medians (crossent / reference; below 1 is faster). The process first raises
glibc malloc's mmap and trim thresholds (``crossent eval``'s
:func:`~crossent._eval._memory.reuse_freed_memory`), for both contenders
alike: otherwise a megabyte-sized temporary is either reused or faulted in
page by page (zeroed by the kernel) depending on what earlier cases left in
the heap, and the same kernel measured 1.0 or 3.1 ms at 1024 x 1000 from one
run to the next; ``--default-malloc`` leaves them as they are. Cases:

- PyTorch: sparse CE (``F.cross_entropy``), categorical CE (``F.cross_entropy``
  with probability targets), binary CE (``F.binary_cross_entropy_with_logits``);
  the same three from probabilities (``F.nll_loss`` and a sum of the log clamped at
  -100, PyTorch's rule, and ``F.binary_cross_entropy``),
  forward under ``no_grad`` and forward+backward, float32 and bfloat16, 1 and 2
  threads, eager and (``--compiled``) ``torch.compile``; with ``--compiled``
  a second table gives each side's compile time (wall seconds of the first
  call, which traces and compiles, each in a fresh inductor cache; the
  forward under ``no_grad`` and forward+backward are separate graphs); then
  (unless ``--no-memory``) the peak memory one eager forward+backward
  allocates, each side (:func:`peak_tensor_bytes`: the CPU allocator's
  allocation and free events recorded by PyTorch's profiler, summed in time
  order);
- crossent-only options (z-loss + softcap, focal) against the same loss
  written in plain torch operations;
- JAX: ``jit(value_and_grad)`` against an optax-style ``jax.nn.log_softmax`` CE;
- NumPy: ``value_and_grad`` against a ``scipy.special.log_softmax`` CE, and the losses
  from probabilities against the same formulas in plain NumPy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import crossent as ce
from crossent._eval._memory import reuse_freed_memory

FULL_SIZES = [(32, 10), (256, 100), (1024, 1000), (2048, 1000), (4096, 32000), (8192, 32000)]
QUICK_SIZES = [(32, 10), (256, 100)]


def _per_call(fn: Callable[[], object], budget: float) -> int:
    """Calls per timed batch so that a batch takes about `budget` seconds of CPU time."""
    fn()
    start = time.process_time()
    fn()
    one = max(time.process_time() - start, 1e-6)
    return max(1, int(budget / one))


def compare(
    ours: Callable[[], object], ref: Callable[[], object], *, rounds: int, budget: float
) -> tuple[float, float]:
    """(median seconds per call of `ref`, of `ours`), interleaved rounds of process CPU time."""
    calls = max(_per_call(ours, budget), _per_call(ref, budget))
    times: dict[str, list[float]] = {"ref": [], "ours": []}
    for _ in range(rounds):
        for name, fn in (("ref", ref), ("ours", ours)):
            start = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - start) / calls)
    return statistics.median(times["ref"]), statistics.median(times["ours"])


def _row(case: str, ref_s: float, ours_s: float) -> str:
    return f"| {case:<54} | {ref_s * 1e6:>11.1f} | {ours_s * 1e6:>11.1f} | {ours_s / ref_s:>5.2f} |"


def _header(title: str, ref: str) -> None:
    print(f"\n{title}")
    print(f"| {'case':<54} | {ref + ' µs':>11} | {'crossent µs':>11} | {'ratio':>5} |")
    print(f"|{'-' * 56}|{'-' * 13}|{'-' * 13}|{'-' * 7}|")


# --------------------------------------------------------------------------- PyTorch


def torch_cases(
    n: int, c: int, dtype: Any, device: str = "cpu"
) -> dict[str, tuple[Callable[..., Any], ...]]:
    """name -> (logits, crossent loss, reference loss) for one size, dtype and device."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(device, dtype)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    probs = torch.softmax(torch.randn(n, c, generator=g), -1).to(device, dtype)
    bt = (torch.rand(n, c, generator=g) > 0.5).to(device, dtype)
    bw = (torch.rand(c, generator=g) + 0.5).to(device, dtype)  # per-label weight / pos_weight
    # probability inputs: a softmax (categorical) and a sigmoid (binary) of the logits
    px = torch.softmax(x.float(), -1).to(dtype)
    sx = torch.sigmoid(x.float()).to(dtype)

    def clamped_log(v: Any) -> Any:  # PyTorch's own rule for probabilities (F.binary_cross_entropy)
        return v.log().clamp_min(-100)

    def plain_zloss_softcap(v: Any) -> Any:
        z = 30.0 * torch.tanh(v.float() / 30.0)
        lse = torch.logsumexp(z, -1)
        return (lse - z.gather(-1, y[:, None])[:, 0] + 1e-4 * lse**2).mean().to(v.dtype)

    def plain_focal(v: Any) -> Any:
        log_p = torch.log_softmax(v.float(), -1).gather(-1, y[:, None])[:, 0]
        return (-((1 - log_p.exp()) ** 2) * log_p).mean().to(v.dtype)

    return {
        "sparse": (
            x,
            lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True),
            lambda v: F.cross_entropy(v, y),
        ),
        "categorical": (
            x,
            lambda v: ce.categorical_cross_entropy(v, probs, from_logits=True),
            lambda v: F.cross_entropy(v, probs),
        ),
        "binary": (
            x,
            lambda v: ce.binary_cross_entropy(v, bt, from_logits=True),
            lambda v: F.binary_cross_entropy_with_logits(v, bt),
        ),
        "binary weight": (
            x,
            lambda v: ce.binary_cross_entropy(v, bt, from_logits=True, weight=bw),
            lambda v: F.binary_cross_entropy_with_logits(v, bt, weight=bw),
        ),
        "binary pos_weight": (
            x,
            lambda v: ce.binary_cross_entropy(v, bt, from_logits=True, pos_weight=bw),
            lambda v: F.binary_cross_entropy_with_logits(v, bt, pos_weight=bw),
        ),
        "sparse probs": (
            px,
            lambda v: ce.sparse_categorical_cross_entropy(v, y),
            lambda v: F.nll_loss(clamped_log(v), y),
        ),
        "categorical probs": (
            px,
            lambda v: ce.categorical_cross_entropy(v, probs),
            lambda v: -(probs * clamped_log(v)).sum(-1).mean(),
        ),
        "binary probs": (
            sx,
            lambda v: ce.binary_cross_entropy(v, bt),
            lambda v: F.binary_cross_entropy(v, bt),
        ),
        "sparse z-loss+softcap vs torch ops": (
            x,
            lambda v: ce.sparse_categorical_cross_entropy(
                v, y, from_logits=True, z_loss=1e-4, softcap=30.0
            ),
            plain_zloss_softcap,
        ),
        "sparse focal vs torch ops": (
            x,
            lambda v: ce.sparse_categorical_cross_entropy(v, y, from_logits=True, gamma=2.0),
            plain_focal,
        ),
    }


def _selected_torch_cases(
    args: argparse.Namespace, n: int, c: int, dtype: Any
) -> list[tuple[str, tuple[Callable[..., Any], ...]]]:
    """:func:`torch_cases` that the command line asks for (``--cases``; ``--quick`` skips the
    plain-torch-ops comparisons)."""
    return [
        (name, case)
        for name, case in torch_cases(n, c, dtype).items()
        if not ((args.quick and "vs torch ops" in name) or (args.cases and name not in args.cases))
    ]


def _torch_sweep(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    modes = ([] if args.skip_eager else ["eager"]) + (["compiled"] if args.compiled else [])
    _header("PyTorch " + " and ".join(modes), "torch")
    compile_times: list[tuple[str, float, float]] = []
    if args.compiled:  # the first compile of a process pays for loading inductor: not timed
        _first_call_s(lambda: torch.compile(lambda v: v.exp().sum())(torch.ones(2)))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n, c in sizes:
            for dname in args.dtypes:
                for name, (x, ours, ref) in _selected_torch_cases(args, n, c, dtypes[dname]):
                    for mode in modes:
                        f_ours, f_ref = ours, ref
                        if mode == "compiled":
                            # the lambdas share code objects across cases: without a reset,
                            # dynamo would recompile them with dynamic shapes, then give up
                            # (recompile limit) and run them eagerly
                            torch._dynamo.reset()
                            f_ours, f_ref = torch.compile(ours), torch.compile(ref)
                        _torch_row(
                            name, mode, threads, n, c, dname, x, f_ours, f_ref, args, compile_times
                        )
    if compile_times:
        _compile_table(compile_times)


def _first_call_s(fn: Callable[[], object]) -> float:
    """Wall seconds of the first call of a compiled `fn` (trace + compile), in a fresh cache."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def _compile_table(rows: list[tuple[str, float, float]]) -> None:
    print("\nCompile time (wall s of the first call, fresh inductor cache)")
    print(f"| {'case':<54} | {'torch s':>11} | {'crossent s':>11} | {'ratio':>5} |")
    print(f"|{'-' * 56}|{'-' * 13}|{'-' * 13}|{'-' * 7}|")
    for case, ref_s, ours_s in rows:
        print(f"| {case:<54} | {ref_s:>11.2f} | {ours_s:>11.2f} | {ours_s / ref_s:>5.2f} |")


def _torch_row(
    name: str,
    mode: str,
    threads: int,
    n: int,
    c: int,
    dname: str,
    x: Any,
    ours: Callable[[Any], Any],
    ref: Callable[[Any], Any],
    args: argparse.Namespace,
    compile_times: list[tuple[str, float, float]],
) -> None:
    import torch

    xg = x.clone().requires_grad_(True)

    def step(fn: Callable[[Any], Any]) -> Callable[[], None]:
        def run() -> None:
            fn(xg).backward()
            xg.grad = None

        return run

    def forward(fn: Callable[[Any], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn(x)

        return run

    for kind, wrap in (("fwd", forward), ("fwd+bwd", step)):
        case = f"{name} {n}x{c} {dname} {kind} {mode} {threads}t"
        if mode == "compiled":
            compile_times.append((case, _first_call_s(wrap(ref)), _first_call_s(wrap(ours))))
        r, o = compare(wrap(ours), wrap(ref), rounds=args.rounds, budget=args.budget)
        print(_row(case, r, o), flush=True)


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes `fn` holds at once in PyTorch's CPU allocator, over everything it allocates.

    PyTorch's profiler (``profile_memory=True``) records every allocation and free of
    the allocator, inside kernels too (forward, saved tensors, backward, the gradient);
    the running sum of those events in time order peaks at the value returned.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def _torch_memory(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    """Peak tensor memory of one forward+backward (:func:`peak_tensor_bytes`), eager."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    print("\nPyTorch eager fwd+bwd, peak allocated memory (MiB; ratio = crossent / torch)")
    print(f"| {'case':<54} | {'torch MiB':>11} | {'crossent MiB':>12} | {'ratio':>5} |")
    print(f"|{'-' * 56}|{'-' * 13}|{'-' * 14}|{'-' * 7}|")
    for n, c in sizes:
        for dname in args.dtypes:
            for name, (x, ours, ref) in _selected_torch_cases(args, n, c, dtypes[dname]):
                peaks = []
                for fn in (ref, ours):
                    xg = x.clone().requires_grad_(True)
                    fn(xg).backward()  # warm-up (caches, lazy initialisation)
                    xg.grad = None
                    peaks.append(peak_tensor_bytes(lambda fn=fn, xg=xg: fn(xg).backward()))
                r, o = (p / 2**20 for p in peaks)
                ratio = o / r if r else float("nan")
                case = f"{name} {n}x{c} {dname} fwd+bwd"
                print(f"| {case:<54} | {r:>11.2f} | {o:>12.2f} | {ratio:>5.2f} |", flush=True)


# --------------------------------------------------------------------------- JAX and NumPy


def _jax_sweep(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("\njax not installed: JAX comparison skipped")
        return
    _header("JAX jit(value_and_grad), float32", "optax-style")
    for n, c in sizes:
        kx, ky = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (n, c), dtype=jnp.float32)
        y = jax.random.randint(ky, (n,), 0, c)

        def reference(z: Any, y: Any = y) -> Any:  # optax.softmax_cross_entropy_with_integer_labels
            log_p = jax.nn.log_softmax(z, axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

        def ours(z: Any, y: Any = y) -> Any:
            return ce.sparse_categorical_cross_entropy(z, y, from_logits=True)

        f_ref = jax.jit(jax.value_and_grad(reference))
        f_ours = jax.jit(jax.value_and_grad(ours))
        r, o = compare(
            lambda f=f_ours, x=x: f(x)[1].block_until_ready(),
            lambda f=f_ref, x=x: f(x)[1].block_until_ready(),
            rounds=args.rounds,
            budget=args.budget,
        )
        print(_row(f"sparse {n}x{c} value_and_grad", r, o), flush=True)


def _numpy_sweep(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> None:
    import numpy as np

    try:
        from scipy.special import log_softmax
    except ImportError:
        print("\nscipy not installed: NumPy comparison skipped")
        return
    _header("NumPy value_and_grad, float32", "scipy-style")
    for n, c in sizes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c)).astype(np.float32)
        y = rng.integers(0, c, n)

        def reference(x: Any = x, y: Any = y, n: int = n) -> Any:
            log_p = log_softmax(x, axis=-1)
            loss = -log_p[np.arange(n), y].mean()
            grad = np.exp(log_p)
            grad[np.arange(n), y] -= 1
            return loss, grad / n

        def ours(x: Any = x, y: Any = y) -> Any:
            return ce.value_and_grad(ce.sparse_categorical_cross_entropy, x, y, from_logits=True)

        r, o = compare(ours, reference, rounds=args.rounds, budget=args.budget)
        print(_row(f"sparse {n}x{c} value_and_grad", r, o), flush=True)
    _header("NumPy losses from probabilities, float32 (the log clamped at -100)", "numpy")
    for n, c in sizes:
        for name, (ours_p, reference_p) in _numpy_probability_cases(n, c).items():
            r, o = compare(ours_p, reference_p, rounds=args.rounds, budget=args.budget)
            print(_row(f"{name} {n}x{c}", r, o), flush=True)


def _numpy_probability_cases(n: int, c: int) -> dict[str, tuple[Callable[[], Any], ...]]:
    """name -> (crossent, plain NumPy) for losses from float32 probabilities: a softmax
    (sparse, categorical) and a sigmoid (binary) of random logits."""
    import numpy as np

    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, c))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    t = p[::-1].copy()
    s = (1 / (1 + np.exp(-z))).astype(np.float32)
    b = (rng.random((n, c)) > 0.5).astype(np.float32)
    y = rng.integers(0, c, n)
    rows = np.arange(n)

    def clamped_log(v: Any) -> Any:
        with np.errstate(divide="ignore"):
            return np.maximum(np.log(v), -100)

    def binary_reference() -> Any:
        with np.errstate(divide="ignore"):
            log_not_p = np.maximum(np.log1p(-s), -100)
        return -(b * clamped_log(s) + (1 - b) * log_not_p).mean()

    return {
        "sparse probs": (
            lambda: ce.sparse_categorical_cross_entropy(p, y),
            lambda: -clamped_log(p[rows, y]).mean(),
        ),
        "sparse probs value_and_grad": (
            lambda: ce.value_and_grad(ce.sparse_categorical_cross_entropy, p, y),
            lambda: _sparse_probability_reference(p, y, rows, clamped_log),
        ),
        "categorical probs": (
            lambda: ce.categorical_cross_entropy(p, t),
            lambda: -(t * clamped_log(p)).sum(axis=1).mean(),
        ),
        "binary probs": (lambda: ce.binary_cross_entropy(s, b), binary_reference),
    }


def _sparse_probability_reference(p: Any, y: Any, rows: Any, clamped_log: Any) -> Any:
    import numpy as np

    p_y = p[rows, y]
    grad = np.zeros_like(p)
    grad[rows, y] = -1 / (p_y * len(y))
    return -clamped_log(p_y).mean(), grad


# --------------------------------------------------------------------------- main


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, c = item.lower().split("x")
        out.append((int(n), int(c)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small sizes, float32, 1 thread")
    parser.add_argument("--sizes", type=_sizes, help="e.g. 32x10,1024x1000")
    parser.add_argument("--threads", default=None, help="e.g. 1,2")
    parser.add_argument("--dtypes", default=None, help="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="CPU seconds per batch")
    parser.add_argument("--compiled", action="store_true", help="also torch.compile both sides")
    parser.add_argument(
        "--cases", type=lambda t: t.split(","), help="PyTorch cases, e.g. sparse,binary"
    )
    parser.add_argument("--skip-eager", action="store_true", help="with --compiled: compiled only")
    parser.add_argument("--no-validation", action="store_true", help="crossent value checks off")
    parser.add_argument("--no-memory", action="store_true", help="skip the torch memory table")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (timings then depend on page faults)",
    )
    parser.add_argument(
        "--only", default="torch,jax,numpy", help="backends to run (torch,jax,numpy)"
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    args.threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    args.dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.budget = args.budget or (0.01 if args.quick else 0.2)
    ce.set_validation(not args.no_validation)
    tuned = not args.default_malloc and reuse_freed_memory()
    print(
        f"validation {'off' if args.no_validation else 'on'}; {args.rounds} interleaved rounds; "
        "median per-call process CPU time; ratio = crossent / reference; malloc "
        + ("thresholds raised (freed blocks reused)" if tuned else "as is")
    )
    only = args.only.split(",")
    if "torch" in only:
        _torch_sweep(args, sizes)
        if not args.no_memory:
            _torch_memory(args, sizes)
    small = sizes[:1] if args.quick else sizes
    if "jax" in only:
        _jax_sweep(args, small)
    if "numpy" in only:
        _numpy_sweep(args, small)


if __name__ == "__main__":
    main()
