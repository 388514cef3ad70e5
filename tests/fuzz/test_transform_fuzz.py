"""A bounded differential fuzz of the losses under ``torch.compile`` and per-sample ``vmap``.

The calls of the second-order fuzzer (:mod:`tests.fuzz.test_second_order_fuzz`: every
unfused loss and measure, its options, shapes, dtypes and extreme values) run

* compiled (``torch.compile(fullgraph=True)``, static or dynamic shapes, warnings being
  errors): the value and the first derivatives of every input that takes one, against the
  float64 formula under PyTorch's autograd;
* per sample: ``vmap`` of ``grad`` and ``vmap`` of ``jvp`` of ``grad`` (per-sample
  gradients, Opacus-style, and per-sample Hessian-vector products) of each sample's own
  summed loss, whose results are the rows of the gradient and of the Hessian-vector product
  of the whole batch's summed loss (the Hessian is block-diagonal over samples).

Compiled, it found ``js_divergence`` of probabilities warning under dynamo (array-api-compat's
``lru_cache``-wrapped ``is_numpy_namespace``), an error where warnings are errors.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz._settings import fuzz

torch = pytest.importorskip("torch")
from tests.fuzz import test_second_order_fuzz as so  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _assert_close(got: Any, want: Any, scale: float, call: so.Call, what: str) -> None:
    """`got` (the call's dtype) equals the float64 `want` to 256 ulps of `scale` times the
    input's magnitude; NaN where `want` is NaN, and the documented NaN gradient rows."""
    a, b = got.detach().double(), want.detach().double()
    if a.shape == call.x.shape:
        b = torch.where(so._native_nan(call), a, b)
    tol = 256 * torch.finfo(so.DTYPES[call.dtype]).eps * scale * so._magnitude(call)
    bad = ((a - b).abs() > tol) | (a.isnan() != b.isnan())
    assert not bad.any(), f"{what}: {a[bad][:6]} vs {b[bad][:6]}"


@fuzz(12)
@given(call=so.calls(modes=("autograd",)), dynamic=st.booleans())
def test_compiled_values_and_gradients_equal_the_float64_formula(
    call: so.Call, dynamic: bool
) -> None:
    x, t, w = so._typed(call)
    diff = [call.t_grad, call.w_grad]
    ins = [x] + [a for a, on in zip((t, w), diff, strict=True) if on]

    fn, ref_fn = so._functions(call, t, w)

    with torch.no_grad():
        if not ref_fn(*(a.double() for a in ins)).isfinite().all():
            return  # a positive target on a masked class: no derivative
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    leaves = [a.detach().requires_grad_(True) for a in ins]
    with so._thresholds(call.shrunk), so._accelerator(call.device):
        out = compiled(*leaves)
    g = torch.Generator().manual_seed(call.seed + 1)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, up.to(out.dtype), allow_unused=True)
    refs = [a.double().detach().requires_grad_(True) for a in ins]
    ref = ref_fn(*refs)
    want = torch.autograd.grad(ref, refs, up, allow_unused=True)
    what = f"compiled dynamic={dynamic} {call}"
    assert out.dtype == x.dtype, what
    _assert_close(out, ref, so._max(ref) + 1, call, f"{what}: value")
    for name, a, b, a_in in zip("xtw", grads, want, ins, strict=False):
        a = torch.zeros_like(a_in) if a is None else a
        b = torch.zeros_like(a_in, dtype=torch.float64) if b is None else b
        assert a.dtype == a_in.dtype, f"{what}: d/d{name} is {a.dtype}"
        weights = 1 + (1 / so._min(w) if call.w_grad else 0.0)
        _assert_close(a, b, (so._max(b) + so._max(up)) * weights, call, f"{what}: d/d{name}")


@fuzz(300)
@given(call=so.calls(modes=("autograd",)), second=st.booleans())
def test_per_sample_vmap_equals_the_rows_of_the_batch(call: so.Call, second: bool) -> None:
    if call.x.ndim < 2 or call.axis % call.x.ndim == 0:
        return  # a leading batch axis that is not the class axis
    if second and call.loss == "js_divergence" and not call.options["from_logits"]:
        return  # (autograd of the float64 formula cancels there: the other fuzzer's closed form)
    pw = call.pos_weight
    if (isinstance(pw, torch.Tensor) and pw.shape == call.x.shape) or "target" in call.options:
        return  # a pos_weight per element, distillation's row mask: more vmapped arguments
    if "reduction" in call.options:
        call.options["reduction"] = "sum"
    x, t, w = so._typed(call)
    one = so.Call(**{**call.__dict__, "axis": call.axis % x.ndim - 1})  # a sample's class axis
    w_dim = 0 if isinstance(w, torch.Tensor) and w.shape == x.shape else None
    t_dim = None if t is None else 0

    def loss(xi: Any, ti: Any, wi: Any) -> Any:
        return so._crossent(one, xi, ti, wi).sum()

    def ref_total(xx: Any) -> Any:
        return so._reference(call, xx, so._as64(t), so._as64(w)).sum()

    with torch.no_grad():
        if not ref_total(x.double()).isfinite():
            return
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(call.seed + 1))
    with so._thresholds(call.shrunk), so._accelerator(call.device):
        if second:

            def hvp(xi: Any, ti: Any, wi: Any, vi: Any) -> Any:
                return torch.func.jvp(torch.func.grad(lambda u: loss(u, ti, wi)), (xi,), (vi,))[1]

            got = torch.func.vmap(hvp, in_dims=(0, t_dim, w_dim, 0))(x, t, w, v.to(x.dtype))
        else:
            got = torch.func.vmap(torch.func.grad(loss), in_dims=(0, t_dim, w_dim))(x, t, w)
    xr = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_total(xr), xr, create_graph=second)
    if second:
        v64 = v.double()
        want = torch.autograd.grad((want * v64).sum(), xr)[0] if want.requires_grad else 0 * xr
    what = f"vmap second={second} {call}"
    assert got.dtype == x.dtype, what
    _assert_close(got, want, (so._max(want) + 1) * (so._max(v) if second else 1), call, what)
