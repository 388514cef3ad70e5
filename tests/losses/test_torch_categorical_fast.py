"""The PyTorch executor's probability-target path: PyTorch's own kernel for float32/float64
(crossent's masked-class and empty-mean rules on top), and the chunked float32 computation
of half-precision logits (:class:`crossent._backends._torch._LowPrecisionSoftCE`; what
it and the sparse :class:`~crossent._backends._torch._LowPrecisionCE` keep for backward).

References are float64 evaluated on the very inputs the fast path sees.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import crossent as ce  # noqa: E402
from crossent._backends import _torch as torch_exec  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _case(dtype: Any, n: int = 400, c: int = 100, seed: int = 5) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.softmax(torch.randn(n, c, generator=g) * 2, -1).to(dtype)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return x, t, w


def _ours(x: Any, t: Any, w: Any, eps: float, reduction: str, upstream: float) -> Any:
    """(logits requiring a gradient, crossent's loss, the gradient of its sum times
    `upstream`)."""
    xg = x.clone().requires_grad_(True)
    loss = ce.categorical_cross_entropy(
        xg, t, from_logits=True, weight=w, label_smoothing=eps, reduction=reduction
    )
    (grad,) = torch.autograd.grad(loss.sum() * upstream, xg, retain_graph=True)
    return xg, loss, grad


def _float64(x: Any, t: Any, w64: Any, eps: float, reduction: str, upstream: float) -> Any:
    """PyTorch's loss of the same inputs in float64, and its gradient as :func:`_ours`'."""
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, t.double(), weight=w64, label_smoothing=eps, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum() * upstream, x64)
    return ref, ref_grad


def _ulps(a: Any, b: Any, dtype: Any) -> Any:
    """Differences in units of `dtype`'s rounding at the reference's magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs() / (torch.finfo(dtype).eps * b.abs().clamp_min(torch.finfo(dtype).tiny))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("eps", "weighted"), [(0.0, False), (0.1, True)])
@pytest.mark.parametrize("upstream", [1.0, 0.3])
@pytest.mark.parametrize("scratch", [None, 3 * 100 * 70])  # one chunk / chunks of 70 or 105 rows
def test_half_categorical_is_float64_rounded_once(
    dtype: Any,
    reduction: str,
    eps: float,
    weighted: bool,
    upstream: float,
    scratch: int | None,
    monkeypatch: Any,
) -> None:
    if scratch:
        monkeypatch.setattr(torch_exec, "_LOW_SCRATCH", scratch)
    monkeypatch.setattr(torch_exec, "_LOW_MIN", 1 << 15)  # the chunked path at this size
    x, t, w64 = _case(dtype)
    assert x.numel() >= torch_exec._LOW_MIN
    w = w64.float() if weighted else None
    xg, loss, grad = _ours(x, t, w, eps, reduction, upstream)
    ref, ref_grad = _float64(x, t, w64 if weighted else None, eps, reduction, upstream)
    assert loss.dtype == dtype
    assert grad.dtype == dtype
    # the loss: float64's value rounded once
    assert float(_ulps(loss, ref.to(dtype).double(), dtype).max()) == 0
    # the gradient s (S p - c): one rounding of float64's, plus float32's own error of the
    # difference (a few float32 units of its terms, which are at most s (S + max c))
    scale = upstream / (x.shape[0] if reduction == "mean" else 1)
    f32 = 8 * torch.finfo(torch.float32).eps * scale * 3
    err = (grad.double() - ref_grad).abs()
    fi = torch.finfo(dtype)
    bound = fi.eps * ref_grad.abs() + f32 + fi.smallest_normal * fi.eps  # + float16's subnormals
    assert bool((err <= bound).all())
    pt = torch.autograd.grad(
        F.cross_entropy(xg, t, weight=None if w is None else w.to(dtype), label_smoothing=eps,
                        reduction=reduction).sum() * upstream, xg,
    )[0]  # fmt: skip
    assert not bool(((pt.double() - ref_grad).abs() <= bound).all())  # the test sees it


@pytest.mark.parametrize("kind", ["sparse", "categorical"])
def test_half_precision_saves_no_float32_copy(kind: str) -> None:
    """Only half-precision arrays of the input's size are kept for backward (the input, the
    gradient made with the forward, the targets)."""
    x, t, _ = _case(torch.bfloat16, n=2048, c=100)
    xg = x.clone().requires_grad_(True)
    saved: list[Any] = []

    def pack(v: Any) -> Any:
        saved.append((v.dtype, v.numel()))
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        if kind == "sparse":
            y = t.argmax(-1)
            y[::9] = -100
            loss = ce.sparse_categorical_cross_entropy(xg, y, from_logits=True, ignore_index=-100)
        else:
            loss = ce.categorical_cross_entropy(xg, t, from_logits=True)
    big = [d for d, n in saved if n >= x.numel()]
    assert big
    assert all(d == torch.bfloat16 for d in big), saved
    assert sum(n for _, n in saved if n >= x.numel()) <= 2 * x.numel()
    loss.backward()
    assert xg.grad is not None
    assert xg.grad.dtype == torch.bfloat16


def test_half_categorical_second_backward_equals_the_first() -> None:
    """The gradient made with the forward and the recomputed one are the same bits."""
    x, t, _ = _case(torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    loss = ce.categorical_cross_entropy(xg, t, from_logits=True, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    assert xg.grad is not None
    first = xg.grad.clone()
    xg.grad.mul_(100.0)  # the caller may change it in place between the two calls
    xg.grad = None
    loss.backward()  # recomputed by chunks
    torch.testing.assert_close(xg.grad, first, rtol=0, atol=0)


def test_half_categorical_double_backward_leaves_float32_targets_alone() -> None:
    """float32 targets with half logits: the differentiable backward builds its coefficients
    out of place (``t.float()`` is `t` itself), the caller's targets are not written."""
    x, t, w = _case(torch.bfloat16)
    t = t.float()
    kept = t.clone()
    xg = x.clone().requires_grad_(True)
    loss = ce.categorical_cross_entropy(
        xg, t, from_logits=True, label_smoothing=0.1, weight=w.float()
    )
    (g,) = torch.autograd.grad(loss, xg, create_graph=True)
    torch.testing.assert_close(t, kept, rtol=0, atol=0)
    ref = torch.func.grad(lambda v: F.cross_entropy(v, t.double(), weight=w, label_smoothing=0.1))(
        x.double()
    )
    assert _ulps(g, ref, torch.bfloat16).max() <= 2


def test_half_categorical_masked_class_falls_back_to_the_guarded_form() -> None:
    x, t, _ = _case(torch.bfloat16)
    x[:, 3] = -float("inf")
    t = t.clone()
    t[:, 3] = 0
    xg = x.clone().requires_grad_(True)
    loss = ce.categorical_cross_entropy(xg, t, from_logits=True)
    loss.backward()
    keep = torch.arange(x.shape[1]) != 3
    x64 = x[:, keep].double().requires_grad_(True)
    ref = F.cross_entropy(x64, t[:, keep].double())
    ref.backward()
    assert torch.isfinite(loss)
    assert float(_ulps(loss, ref.to(torch.bfloat16).double(), torch.bfloat16).max()) == 0
    assert xg.grad is not None
    assert bool((xg.grad[:, 3] == 0).all())
    torch.testing.assert_close(xg.grad[:, keep].double(), x64.grad, rtol=2**-7, atol=1e-7)


def test_half_categorical_target_with_grad_and_double_backward() -> None:
    x, t, _ = _case(torch.bfloat16, n=360, c=100)
    # a target that needs a gradient goes through autograd (same values)
    tg = t.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    a = ce.categorical_cross_entropy(xg, tg, from_logits=True)
    b = ce.categorical_cross_entropy(x, t, from_logits=True)
    assert a.item() == b.item()
    (gt,) = torch.autograd.grad(a, tg)
    x64, t64 = x.double(), t.double().requires_grad_(True)
    (ref_gt,) = torch.autograd.grad(F.cross_entropy(x64, t64), t64)
    torch.testing.assert_close(gt.double(), ref_gt, rtol=2**-7, atol=1e-9)
    # double backward (create_graph): the differentiable recomputation, against float64
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ce.categorical_cross_entropy(xg, t, from_logits=True), xg,
                               create_graph=True)  # fmt: skip
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    (hv,) = torch.autograd.grad((g * v).sum(), xg)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, t.double()), x64, create_graph=True)
    (hv64,) = torch.autograd.grad((g64 * v.double()).sum(), x64)
    torch.testing.assert_close(g.double(), g64, rtol=2**-7, atol=1e-7)
    torch.testing.assert_close(hv.double(), hv64, rtol=2**-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [1, -1, 0])
def test_float_categorical_is_pytorch_kernel_with_crossent_rules(dtype: Any, axis: int) -> None:
    x, t, w = _case(dtype, n=6, c=5)
    x, t = x.reshape(2, 3, 5), t.reshape(2, 3, 5)
    xm, tm = x.movedim(-1, axis), t.movedim(-1, axis)
    for reduction in ("mean", "sum", "none"):
        out = ce.categorical_cross_entropy(
            xm, tm, from_logits=True, axis=axis, weight=w.to(dtype), label_smoothing=0.2,
            reduction=reduction,
        )  # fmt: skip
        ref = F.cross_entropy(
            x.movedim(-1, 1), t.movedim(-1, 1), weight=w.to(dtype), label_smoothing=0.2,
            reduction=reduction,
        )  # fmt: skip
        torch.testing.assert_close(out, ref)
    # a mean over no rows is 0 (PyTorch: NaN)
    empty = ce.categorical_cross_entropy(
        torch.zeros(0, 4, dtype=dtype), torch.zeros(0, 4, dtype=dtype), from_logits=True
    )
    assert float(empty) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed target", "float64 target"])
def test_float_categorical_unsmoothed_is_pytorch_kernel_bits(
    dtype: Any, reduction: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without smoothing or weight the common call computes PyTorch's probability-target
    kernel's operations itself (log-softmax, product, sum, division by -N, no negation): the
    same bits as the kernel, values and gradients of the logits and of the targets, with or
    without a gradient (the product in place then), for any upstream gradient."""
    x, t, _ = _case(dtype, n=37, c=29)
    if layout == "transposed target":
        t = t.T.contiguous().T
    elif layout == "float64 target":
        t = t.double()
    cast = t.to(dtype)  # what PyTorch's kernel is given (crossent converts a wider target)
    want = {r: F.cross_entropy(x, cast, reduction=r) for r in ("mean", "sum", "none")}
    xg, tg = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    xr, tr = x.clone().requires_grad_(True), cast.detach().clone().requires_grad_(True)
    up = torch.rand(want["none"].shape, dtype=dtype) if reduction == "none" else 0.37
    ref = F.cross_entropy(xr, tr, reduction=reduction)
    ref_gx, ref_gt = torch.autograd.grad((ref * up).sum(), (xr, tr))
    monkeypatch.setattr(torch_exec, "_CROSS_ENTROPY", None)  # PyTorch's kernel is not called
    with torch.no_grad():
        out = ce.categorical_cross_entropy(x, t, from_logits=True, reduction=reduction)
    assert out.dtype == dtype
    assert torch.equal(out, want[reduction])
    loss = ce.categorical_cross_entropy(xg, tg, from_logits=True, reduction=reduction)
    assert torch.equal(loss.detach(), want[reduction])
    gx, gt = torch.autograd.grad((loss * up).sum(), (xg, tg))
    assert torch.equal(gx, ref_gx)
    assert torch.equal(gt, ref_gt.to(gt.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target_grad", [False, True])
def test_half_categorical_small_graph_converts_the_target_once(
    dtype: Any, target_grad: bool
) -> None:
    """Small half-precision logits and targets with a gradient: the target is converted to
    float32 once (exact), so the product and its backward are float32 kernels, not
    mixed-dtype ones; the same bits as the mixed-dtype product (values, logit and target
    gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, t, _ = _case(dtype, n=40, c=30)
    xg, tg = x.clone().requires_grad_(True), t.clone().requires_grad_(target_grad)
    muls: list[Any] = []

    class Muls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket is torch.ops.aten.mul:
                muls.append({a.dtype for a in args if isinstance(a, torch.Tensor) and a.ndim})
            return func(*args, **(kwargs or {}))

    with Muls():
        loss = ce.categorical_cross_entropy(xg, tg, from_logits=True)
        grads = torch.autograd.grad(loss, (xg, tg) if target_grad else (xg,))
    assert muls
    assert all(m == {torch.float32} for m in muls), muls
    xr, tr = x.clone().requires_grad_(True), t.clone().requires_grad_(target_grad)
    ref = (torch.log_softmax(xr, 1, dtype=torch.float32) * tr).sum() / -x.shape[0]
    ref_grads = torch.autograd.grad(ref.to(dtype), (xr, tr) if target_grad else (xr,))
    assert torch.equal(loss, ref.to(dtype))
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (7, 10), (300, 129), (3, 40000)])
def test_in_place_softmax_kernels_give_the_out_of_place_bits(shape: tuple[int, int]) -> None:
    """The chunked half-precision path runs PyTorch's float32 ``softmax`` and ``log_softmax``
    in place in its chunk buffer: each row is read before it is written."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(shape, generator=g) * 6
    z[0, -1] = 60.0
    if shape[1] > 1:
        z[-1, 0] = -float("inf")  # a masked class
    assert torch.equal(torch_exec._softmax_(z.clone()), torch.softmax(z, 1))
    assert torch.equal(torch_exec._log_softmax_(z.clone()), torch.log_softmax(z, 1))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bad", [-1, 100])
def test_half_sparse_chunks_bad_label_message(requires_grad: bool, bad: int) -> None:
    """On the chunked path a bad label is found by ``gather``'s own bound check and raises
    crossent's message (several chunks: the bad label in the last one)."""
    x, t, _ = _case(torch.bfloat16, n=12000, c=100)
    assert x.numel() > torch_exec._LOW_SCRATCH
    y = t.argmax(-1)
    y[-1] = bad
    xg = x.clone().requires_grad_(requires_grad)
    with pytest.raises(ValueError, match=r"`target` has labels outside \[0, 100\)"):
        ce.sparse_categorical_cross_entropy(xg, y, from_logits=True)


@pytest.mark.parametrize("kind", ["sparse", "categorical"])
def test_half_chunk_buffers_in_and_out_of_inference_mode(kind: str) -> None:
    """The per-thread chunk buffers made by a call in inference mode serve later calls outside
    it, with a gradient (a fresh thread: its first call makes them)."""
    import threading

    x, t, _ = _case(torch.bfloat16, n=1500, c=100)
    y = t.argmax(-1)

    def loss(v: Any) -> Any:
        if kind == "sparse":
            return ce.sparse_categorical_cross_entropy(v, y, from_logits=True)
        return ce.categorical_cross_entropy(v, t, from_logits=True)

    want = loss(x)
    got: list[Any] = []

    def run() -> None:
        with torch.inference_mode():
            got.append(loss(x))
        xg = x.clone().requires_grad_(True)
        value = loss(xg)
        value.backward()
        got.append(value.detach())
        got.append(xg.grad)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(got) == 3
    assert got[0] == want
    assert got[1] == want
    xg = x.clone().requires_grad_(True)
    loss(xg).backward()
    torch.testing.assert_close(got[2], xg.grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("eps", "weighted"), [(0.0, False), (0.1, True)])
@pytest.mark.parametrize("upstream", [1.0, 0.3])
def test_large_float32_with_a_gradient_takes_the_chunks(
    reduction: str, eps: float, weighted: bool, upstream: float, monkeypatch: Any
) -> None:
    """float32 logits that make a gradient take the chunked path from
    ``_FLOAT32_CHUNKED`` elements (its gradient formed with the forward: fewer passes than
    autograd through PyTorch's kernels): float32 rounding of float64's loss and gradient,
    as PyTorch's own float32 computation; several chunks (a smaller buffer)."""
    monkeypatch.setattr(torch_exec, "_FLOAT32_CHUNKED", 1 << 14)
    monkeypatch.setattr(torch_exec, "_LOW_SCRATCH", 3 * 100 * 70)
    x, t, w64 = _case(torch.float32, n=300, c=100)
    t = t.float()
    w = w64.float() if weighted else None
    _, loss, grad = _ours(x, t, w, eps, reduction, upstream)
    assert type(loss.grad_fn).__name__ == "_LowPrecisionSoftCEBackward"
    ref, ref_grad = _float64(x, t, w64 if weighted else None, eps, reduction, upstream)
    assert (loss.dtype, grad.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(loss.double(), ref, rtol=4e-6, atol=0.0)
    scale = upstream / (x.shape[0] if reduction == "mean" else 1)
    err = (grad.double() - ref_grad).abs()
    assert bool((err <= 8 * EPS32 * (ref_grad.abs() + 3 * scale)).all())
    with torch.no_grad():  # without a gradient: PyTorch's kernels
        assert ce.categorical_cross_entropy(x, t, from_logits=True).grad_fn is None
