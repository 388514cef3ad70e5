"""One prepared GPU check: CUDA correctness of crossent's torch paths, then GPU benchmarks.

Run on a machine with a CUDA device: ``python -m benchmarks.gpu_check``
(about 5 minutes on one H100/H200; every step has its own time limit and the
whole run stops before 8 minutes). ``--dry-run`` prints the plan and checks
that everything imports; without a CUDA device the script says so and exits 0
(``crossent bench`` runs it too, so it must be harmless on a CPU machine).

Steps:

1. correctness on CUDA, float32 and bfloat16: sparse / categorical / binary
   losses against PyTorch (values and gradients, class weights,
   ``ignore_index``, smoothing, every label width), the all-ignored mean (0, zero
   gradient), double backward, ``torch.compile(fullgraph=True)`` with
   validation on, autocast dtype, and that no host synchronisation happens in
   the plain sparse path (``torch.cuda.set_sync_debug_mode("error")``); the
   fused ``linear_cross_entropy`` and ``linear_log_probs`` (+ entropy) on the
   Triton and on the PyTorch chunk path, and ``linear_distillation_loss``,
   against float64 references on the same rounded inputs (relative error of
   the values and of every gradient);
2. the CUDA-capable test files (fused Triton kernels, the torch transforms)
   under pytest;
3. benchmarks with CUDA events, median of interleaved rounds: a sparse CE size
   sweep (crossent / torch, float32 and bfloat16, 256 x 1000 to 8192 x 32000), sparse CE
   (crossent / torch / Liger Kernel's ``LigerCrossEntropyLoss``), fused linear
   CE (crossent / torch ``F.linear_cross_entropy`` if present / Liger's
   ``LigerFusedLinearCrossEntropyLoss`` / cut-cross-entropy's
   ``linear_cross_entropy``), time and peak memory; contenders that are not
   installed are reported as such; then ``bench_llm``'s CUDA section
   (``linear_log_probs``, distillation vs Liger's fused JSD and cut-cross-entropy).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

DEADLINE_S = 7.5 * 60
_START = time.monotonic()


def _left() -> float:
    return DEADLINE_S - (time.monotonic() - _START)


def _optional(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except Exception:  # any import failure means "not installable here"
        return None


# --------------------------------------------------------------------------- 1. correctness


def _close(a: Any, b: Any, tol: float, what: str) -> None:
    import torch

    a, b = a.detach(), b.detach()
    err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    scale = float(b.double().abs().max()) if b.numel() else 1.0
    if not err <= tol * max(scale, 1.0):
        msg = f"{what}: max error {err:.3g} > {tol:g} x {max(scale, 1.0):.3g}"
        raise AssertionError(msg)
    assert torch.isfinite(a).all() or not torch.isfinite(b).all(), what


def correctness(device: str) -> list[str]:
    """Run every CUDA check; return the names of those that failed (after printing why)."""
    import torch
    import torch.nn.functional as F

    import crossent as ce
    import crossent.nn as cnn

    failures: list[str] = []

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            print(f"  ok    {name}", flush=True)
        except Exception as exc:  # report (with where it happened) and continue
            failures.append(name)
            print(f"  FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
            frames = traceback.extract_tb(exc.__traceback__)[-4:]
            print("".join(traceback.format_list(frames)), flush=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    n, c = 512, 1000
    x64 = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::7] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    bt = (torch.rand(n, c, generator=g) > 0.5).double()

    def parity(dtype: Any, tol: float) -> Callable[[], None]:
        def run() -> None:
            x = x64.to(device, dtype).requires_grad_(True)
            xr = x64.to(device, dtype).double().requires_grad_(True)
            yy, ww = y.to(device), w.to(device)
            for ours, ref in (
                (
                    lambda v: ce.sparse_categorical_cross_entropy(
                        v, yy, from_logits=True, weight=ww.to(v.dtype), ignore_index=-100,
                        label_smoothing=0.1,
                    ),
                    lambda v: F.cross_entropy(v, yy, ww, ignore_index=-100, label_smoothing=0.1),
                ),
                (
                    lambda v: ce.categorical_cross_entropy(v, probs.to(device, v.dtype),
                                                           from_logits=True),
                    lambda v: F.cross_entropy(v, probs.to(device)),
                ),
                (
                    lambda v: ce.binary_cross_entropy(v, bt.to(device, v.dtype), from_logits=True),
                    lambda v: F.binary_cross_entropy_with_logits(v, bt.to(device)),
                ),
            ):  # fmt: skip
                a, b = ours(x), ref(xr)
                ga, gb = torch.autograd.grad(a, x)[0], torch.autograd.grad(b, xr)[0]
                _close(a, b, tol, "value")
                _close(ga, gb, tol, "gradient")

        return run

    check("parity float32", parity(torch.float32, 1e-5))
    check("parity bfloat16 (computed in float32)", parity(torch.bfloat16, 1e-2))

    def label_widths() -> None:
        x = x64.to(device, torch.float32)
        yy = torch.where(y < 0, 0, y).to(device)
        ref = ce.sparse_categorical_cross_entropy(x, yy, from_logits=True)
        for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
            small = (yy % 100).to(dtype)
            got = ce.sparse_categorical_cross_entropy(x, small, from_logits=True)
            want = ce.sparse_categorical_cross_entropy(x, small.long(), from_logits=True)
            _close(got, want, 0, str(dtype))
        assert ref.isfinite()

    check("every label width", label_widths)

    def all_ignored() -> None:
        x = x64.to(device, torch.float32).requires_grad_(True)
        loss = cnn.CrossEntropyLoss()(x, torch.full((n,), -100, device=device))
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss.detach()) == 0
        assert not grad.any()

    check("all-ignored mean is 0 with zero gradient", all_ignored)

    def no_sync() -> None:
        x = x64.to(device, torch.float32).requires_grad_(True)
        yy = y.to(device)
        module = cnn.CrossEntropyLoss(label_smoothing=0.1)
        module(x, yy)  # warm-up: lazy imports, caches
        torch.cuda.set_sync_debug_mode("error")
        try:
            module(x, yy).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    check("no host synchronisation (CrossEntropyLoss fwd+bwd)", no_sync)

    def triton_sparse() -> None:
        from crossent._backends import _triton_sparse
        from crossent._losses._options import make_options

        big = torch.randn(2048, 32768, device=device, dtype=torch.bfloat16)  # 2**26 elements
        ybig = torch.randint(0, 32768, (2048,), device=device)
        ybig[::7] = -100
        assert _triton_sparse.usable(big, make_options(from_logits=True)), "executor not chosen"
        module = cnn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)
        xs = big.clone().requires_grad_(True)
        module(xs, ybig).backward()  # warm-up: kernels compiled, constants cached
        torch.cuda.set_sync_debug_mode("error")
        try:
            module(xs, ybig).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = F.cross_entropy(big.double(), ybig, ignore_index=-100, label_smoothing=0.1)
        _close(module(big, ybig), ref, 1e-2, "value")
        x16 = x64[:64].to(device, torch.bfloat16)
        v = torch.randn(x16.shape, device=device).bfloat16()
        second = []
        for on in (True, False):
            before = _triton_sparse.MIN_ELEMENTS
            _triton_sparse.MIN_ELEMENTS = 0 if on else 2**62
            try:
                xx = x16.clone().requires_grad_(True)
                loss = ce.sparse_categorical_cross_entropy(
                    xx, y[:64].to(device), from_logits=True, z_loss=1e-3, ignore_index=-100
                )
                (g,) = torch.autograd.grad(loss, xx, create_graph=True)
                second.append(torch.autograd.grad((g * v).sum(), xx)[0])
            finally:
                _triton_sparse.MIN_ELEMENTS = before
        _close(second[0], second[1], 1e-2, "second derivative, Triton vs PyTorch path")

    check("bfloat16 sparse CE on the Triton executor: no sync, exact double backward",
          triton_sparse)  # fmt: skip

    def double_backward() -> None:
        x = x64[:8, :10].to(device).requires_grad_(True)
        yy = torch.where(y[:8] < 0, 0, y[:8]).to(device) % 10
        for fn in (
            lambda v: cnn.CrossEntropyLoss(label_smoothing=0.1)(v, yy),
            lambda v: cnn.FocalLoss()(v, yy),
            lambda v: ce.binary_cross_entropy(v, bt[:8, :10].to(device), from_logits=True,
                                              gamma=2.0),
        ):  # fmt: skip
            assert torch.autograd.gradgradcheck(fn, (x,))

    check("double backward (gradgradcheck)", double_backward)

    def compiled() -> None:
        torch._dynamo.reset()
        x = x64.to(device, torch.float32)
        yy = y.to(device)
        module = cnn.CrossEntropyLoss(label_smoothing=0.1)
        explanation = torch._dynamo.explain(module)(x, yy)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        fast = torch.compile(module, fullgraph=True)
        _close(fast(x, yy), module(x, yy), 1e-5, "compiled value")

    check("torch.compile fullgraph, validation on", compiled)

    def autocast() -> None:
        x = x64.to(device, torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cnn.CrossEntropyLoss()(x.bfloat16(), y.to(device))
        assert out.dtype == torch.float32, out.dtype

    check("autocast returns float32", autocast)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 2e-2)):
        for triton in (True, False):
            label = f"{str(dtype)[6:]}, {'Triton' if triton else 'PyTorch'} chunk path"
            check(f"fused linear_cross_entropy ({label})", _fused_ce(device, dtype, tol, triton))
            check(f"fused linear_log_probs + entropy ({label})",
                  _fused_log_probs(device, dtype, tol, triton))  # fmt: skip
        check(f"fused linear_distillation_loss ({str(dtype)[6:]})",
              _fused_distill(device, dtype, tol))  # fmt: skip
    return failures


def _fused_inputs(device: str, dtype: Any, seed: int) -> tuple[Any, ...]:
    """Fresh random float64 hidden/weight/bias/target (with ignored rows), rounded to `dtype`.

    Returns (CUDA leaves in `dtype`, CPU float64 leaves holding the same rounded values, target).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    n, d, v = 300, 64, 5003  # an odd vocabulary: partial tiles
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 2 / d**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[::11] = -100
    ours = [t.to(device, dtype).requires_grad_(True) for t in (h, w, b)]
    ref = [t.detach().cpu().double().requires_grad_(True) for t in ours]
    return ours, ref, y


def _triton_switch(on: bool) -> Any:
    """A context manager that forces the fused chunk loop onto / off the Triton kernels."""
    import contextlib

    import crossent.fused._chunked as chunked

    @contextlib.contextmanager
    def switch() -> Any:
        before = chunked._triton_ops
        if not on:
            chunked._triton_ops = lambda operand, use_triton: None
        try:
            yield
        finally:
            chunked._triton_ops = before

    return switch()


def _compare(ours: Any, ref: Any, tol: float, what: str) -> None:
    """Relative (Frobenius) error of each pair, as METHOD.md measures it; NaN never passes."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        a, b = a.detach().cpu().double(), b.detach().double()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if not err <= tol:
            raise AssertionError(f"{what}[{i}]: relative error {err:.3g} > {tol:g}")


def _fused_ce(device: str, dtype: Any, tol: float, triton: bool) -> Callable[[], None]:
    def run() -> None:
        import torch

        import crossent as ce
        from crossent.fused import linear_cross_entropy

        (h, w, b), (hr, wr, br), y = _fused_inputs(device, dtype, seed=1)
        opts = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0}
        with _triton_switch(triton):
            loss = linear_cross_entropy(h, w, y.to(device), bias=b, chunk_size=128, **opts)
            grads = torch.autograd.grad(loss, (h, w, b))
        ref = ce.sparse_categorical_cross_entropy(hr @ wr.T + br, y, from_logits=True, **opts)
        rgrads = torch.autograd.grad(ref, (hr, wr, br))
        assert loss.dtype == torch.float32, loss.dtype
        _compare([loss.reshape(1), *grads], [ref.reshape(1), *rgrads], tol, "loss, grads")

    return run


def _fused_log_probs(device: str, dtype: Any, tol: float, triton: bool) -> Callable[[], None]:
    def run() -> None:
        import torch

        from crossent.fused import linear_log_probs

        (h, w, b), (hr, wr, br), y = _fused_inputs(device, dtype, seed=2)
        g = torch.Generator().manual_seed(3)
        up1, up2 = torch.randn(2, y.numel(), generator=g, dtype=torch.float64)
        with _triton_switch(triton):
            lp, ent = linear_log_probs(h, w, y.to(device), bias=b, temperature=0.7,
                                       return_entropy=True, chunk_size=128)  # fmt: skip
            out = (lp.double() * up1.to(device)).sum() + (ent.double() * up2.to(device)).sum()
            grads = torch.autograd.grad(out, (h, w, b))
        logp = torch.log_softmax((hr @ wr.T + br) / 0.7, -1)
        keep = y != -100
        rlp = torch.where(keep, logp.gather(1, y.clamp_min(0)[:, None])[:, 0], 0.0)
        rent = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
        rout = (rlp * up1).sum() + (rent * up2).sum()
        rgrads = torch.autograd.grad(rout, (hr, wr, br))
        _compare([lp, ent, *grads], [rlp, rent, *rgrads], tol, "log-probs, entropy, grads")

    return run


def _fused_distill(device: str, dtype: Any, tol: float) -> Callable[[], None]:
    def run() -> None:
        import torch

        import crossent as ce
        from crossent.fused import linear_distillation_loss

        (h, w, b), (hr, wr, br), y = _fused_inputs(device, dtype, seed=4)
        (th, tw, tb), (thr, twr, tbr), _ = _fused_inputs(device, dtype, seed=5)
        loss = linear_distillation_loss(h, w, th.detach(), tw.detach(), y.to(device), bias=b,
                                        teacher_bias=tb.detach(), beta=0.3, temperature=2.0,
                                        chunk_size=128)  # fmt: skip
        grads = torch.autograd.grad(loss, (h, w, b))
        ref = ce.distillation_loss(hr @ wr.T + br, (thr @ twr.T + tbr).detach(), beta=0.3,
                                   temperature=2.0, target=y)  # fmt: skip
        rgrads = torch.autograd.grad(ref, (hr, wr, br))
        _compare([loss.reshape(1), *grads], [ref.reshape(1), *rgrads], tol, "loss, grads")

    return run


# --------------------------------------------------------------------------- 2. tests


def run_tests(limit: float) -> int:
    files = ["tests/fused", "tests/losses/test_torch_transforms.py"]
    print(f"\n== pytest {' '.join(files)} (limit {limit:.0f} s)", flush=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", *files],
            timeout=max(limit, 10),
            check=False,
        )
    except subprocess.TimeoutExpired:
        print("pytest stopped at its time limit", flush=True)
        return 1
    return done.returncode


# --------------------------------------------------------------------------- 3. benchmarks


def _cuda_time(fn: Callable[[], object], *, rounds: int = 7, calls: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object]) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cells(contenders: dict[str, Callable[[], object]], names: tuple[str, ...]) -> str:
    cells = []
    for name in names:
        fn = contenders.get(name)
        if fn is None:
            cells.append("not installed")
            continue
        try:
            cells.append(f"{_cuda_time(fn, rounds=5, calls=3):.2f} ({_peak_mib(fn):.0f})")
        except Exception as exc:  # a contender failing is a result
            cells.append(f"error: {type(exc).__name__}")
    return " | ".join(cells)


def _sparse_row(n: int, v: int, dtype: Any, device: str) -> str:
    import torch
    import torch.nn.functional as F

    import crossent as ce

    x = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,), device=device)

    def step(loss: Any) -> None:
        loss.backward()
        x.grad = None

    contenders: dict[str, Callable[[], object]] = {
        "torch": lambda: step(F.cross_entropy(x, y)),
        "crossent": lambda: step(ce.sparse_categorical_cross_entropy(x, y, from_logits=True)),
    }
    liger = _optional("liger_kernel.transformers.cross_entropy")
    if liger is not None:
        module = liger.LigerCrossEntropyLoss()
        contenders["liger"] = lambda: step(module(x, y))
    return f"| {n} x {v} | {str(dtype)[6:]} | " + _cells(contenders, ("torch", "crossent", "liger"))


FUSED = ("torch matmul+CE", "crossent", "torch linear_cross_entropy", "liger", "cce")


def _fused_row(n: int, d: int, v: int, device: str) -> str:
    import torch
    import torch.nn.functional as F

    from crossent.fused import linear_cross_entropy

    h = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    wt = (torch.randn(v, d, device=device, dtype=torch.bfloat16) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)

    def step(loss: Any) -> None:
        loss.backward()
        h.grad = wt.grad = None

    contenders: dict[str, Callable[[], object]] = {
        "torch matmul+CE": lambda: step(F.cross_entropy((h @ wt.T).float(), y)),
        "crossent": lambda: step(linear_cross_entropy(h, wt, y)),
    }
    native = getattr(F, "linear_cross_entropy", None)
    if native is not None:
        contenders["torch linear_cross_entropy"] = lambda: step(native(h, wt, y))
    liger = _optional("liger_kernel.transformers.fused_linear_cross_entropy")
    if liger is not None:
        module = liger.LigerFusedLinearCrossEntropyLoss()
        contenders["liger"] = lambda: step(module(wt, h, y))
    cce = _optional("cut_cross_entropy")
    if cce is not None:
        contenders["cce"] = lambda: step(cce.linear_cross_entropy(h, wt, y))
    return f"| {n} x {d} x {v} | " + _cells(contenders, FUSED)


SWEEP = ((256, 1000), (2048, 1000), (1024, 32000), (2048, 32000), (4096, 32000), (8192, 32000))


def _sweep(device: str) -> None:
    """Sparse CE fwd+bwd from 256 x 1000 up: crossent / torch, the size sweep of issue 9's goal
    (at small sizes both are bound by host time: Python and kernel launches)."""
    import torch
    import torch.nn.functional as F

    import crossent as ce

    print("\n## sparse cross-entropy fwd+bwd size sweep, CUDA events, median ms")
    print("| N x V | dtype | torch | crossent | crossent / torch |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for n, v in SWEEP:
            if _left() < 90:
                print("time limit: rest of the sweep skipped")
                return
            x = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
            y = torch.randint(0, v, (n,), device=device)

            def step(loss: Any, x: Any = x) -> None:
                loss.backward()
                x.grad = None

            times: dict[str, list[float]] = {}
            for _ in range(2):  # interleaved: torch, crossent, torch, crossent
                for name, fn in (
                    ("torch", lambda x=x, y=y: step(F.cross_entropy(x, y))),
                    ("crossent", lambda x=x, y=y: step(
                        ce.sparse_categorical_cross_entropy(x, y, from_logits=True))),
                ):  # fmt: skip
                    times.setdefault(name, []).append(_cuda_time(fn, rounds=5, calls=10))
            t, c = min(times["torch"]), min(times["crossent"])
            print(f"| {n} x {v} | {str(dtype)[6:]} | {t:.3f} | {c:.3f} | {c / t:.2f} |", flush=True)


def benchmarks(device: str) -> None:
    import torch

    _sweep(device)
    print("\n## sparse cross-entropy fwd+bwd, CUDA events, median ms (peak MiB)")
    print("| N x V | dtype | torch | crossent | liger |\n|---|---|---|---|---|")
    for n, v in ((4096, 32000), (8192, 128256)):
        for dtype in (torch.float32, torch.bfloat16):
            if _left() < 60:
                print("time limit: remaining benchmarks skipped")
                return
            print(_sparse_row(n, v, dtype, device), flush=True)
    print("\n## fused linear cross-entropy fwd+bwd, bfloat16, median ms (peak MiB)")
    print("| N x d x V | " + " | ".join(FUSED) + " |\n" + "|---" * (len(FUSED) + 1) + "|")
    for n, d, v in ((8192, 2048, 32000), (8192, 4096, 128256)):
        if _left() < 60:
            print("time limit: remaining benchmarks skipped")
            return
        print(_fused_row(n, d, v, device), flush=True)
    if _left() < 60:
        print("time limit: LLM benchmarks skipped")
        return
    from benchmarks import bench_llm  # its CUDA section: log-probs, distillation vs Liger / CCE

    bench_llm.cuda_section(argparse.Namespace(quick=False, rounds=5))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global DEADLINE_S
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, import, exit")
    parser.add_argument("--quick", action="store_true", help="(crossent bench) same as --dry-run")
    parser.add_argument("--skip-tests", action="store_true", help="no pytest step")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the run")
    args = parser.parse_args(argv)
    DEADLINE_S = args.deadline
    import torch

    contenders = {
        name: _optional(module) is not None
        for name, module in (("liger", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy"))
    }
    print(f"gpu_check: torch {torch.__version__}; optional contenders: {contenders}")
    if args.dry_run or args.quick:
        print("dry run: steps 1 (CUDA correctness), 2 (pytest), 3 (GPU benchmarks) not run")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: GPU checks skipped")
        return 0
    device = "cuda"
    print(f"device: {torch.cuda.get_device_name()}")
    print("\n== 1. CUDA correctness")
    failures = correctness(device)
    status = 1 if failures else 0
    if not args.skip_tests:
        status |= run_tests(limit=min(180.0, _left() - 150))
    benchmarks(device)
    print(f"\ngpu_check: {'FAILED: ' + ', '.join(failures) if failures else 'checks passed'}; "
          f"{time.monotonic() - _START:.0f} s")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
