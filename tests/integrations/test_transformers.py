"""crossent.integrations.transformers: patched Hugging Face models train exactly as unpatched ones."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from tests.integrations._models import MODELS, VOCAB, make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from crossent.integrations.transformers import patch, unpatch  # noqa: E402

NAMES = tuple(MODELS)


def _batch(seed: int = 1, batch: int = 3, length: int = 11) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    labels[2, -3:] = -100  # right padding
    return ids, labels


def _reference_loss(model: Any, ids: Any, labels: Any, num_items: Any = None) -> Any:
    """ForCausalLMLoss's semantics on the unpatched model's own logits, in the model's dtype."""
    logits = model(input_ids=ids).logits
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if num_items is None:
        return F.cross_entropy(z, y, ignore_index=-100)
    return F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / num_items


def _grads(model: Any) -> dict[str, Any]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_every_gradient_equal_the_unpatched_model(name: str) -> None:
    """float64: the patched loss and every parameter's gradient equal the unpatched ones."""
    ref_model = make_model(name, dtype=torch.float64)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch()
    loss = _assert_trains_like(model, ref_model, ids, labels)
    # HF's own loss (it upcasts logits to float32, so float32 agreement only)
    hf = ref_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss.float(), hf, rtol=1e-6, atol=0)
    assert set(_grads(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def _assert_trains_like(model: Any, ref_model: Any, ids: Any, labels: Any) -> Any:
    """float64: patched `model`'s loss and gradients equal unpatched `ref_model`'s; the loss."""
    want = _reference_loss(ref_model, ids, labels)
    want.backward()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    want_grads, got_grads = _grads(ref_model), _grads(model)
    assert set(got_grads) == set(want_grads)
    for n, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-10, atol=1e-13, msg=n)
    return out.loss


def _assert_float32_training_equal(ref_model: Any, model: Any) -> None:
    """One float32 training step of `model` (patched) and `ref_model`: equal loss and gradients."""
    ids, labels = _batch(seed=2)
    want = ref_model(input_ids=ids, labels=labels).loss
    want.backward()
    got = model(input_ids=ids, labels=labels).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    want_grads = _grads(ref_model)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=2e-6, msg=n)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_float32_training_matches_the_models_own_loss(name: str) -> None:
    """float32, against the unpatched model's own loss (HF's ForCausalLMLoss) and gradients."""
    ref_model = make_model(name)
    model = patch(copy.deepcopy(ref_model), chunk_size=7)
    _assert_float32_training_equal(ref_model, model)


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_num_items_in_batch_gradient_accumulation(name: str) -> None:
    """Two micro-batches with num_items_in_batch = all counted tokens: their summed
    gradients equal one step on the whole batch, as with the unpatched model."""
    ref_model = make_model(name, dtype=torch.float64)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=3, batch=4)
    num_items = (labels[:, 1:] != -100).sum()
    total = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        loss = model(input_ids=ids[part], labels=labels[part], num_items_in_batch=num_items).loss
        want = ref_model(
            input_ids=ids[part], labels=labels[part], num_items_in_batch=num_items
        ).loss
        torch.testing.assert_close(loss.float(), want, rtol=1e-6, atol=0)
        loss.backward()
        total += float(loss.detach())
    whole = _reference_loss(ref_model, ids, labels)
    whole.backward()
    assert total == pytest.approx(float(whole.detach()), rel=1e-12)
    want_grads = _grads(ref_model)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-10, atol=1e-13, msg=n)


def test_shift_labels_and_ignore_index_are_honoured() -> None:
    ref_model = make_model("llama", dtype=torch.float64)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=4)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    got = model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    want = ref_model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
    other = labels.masked_fill(labels == -100, 7)
    got = model(input_ids=ids, labels=other, ignore_index=7).loss
    want = ref_model(input_ids=ids, labels=other, ignore_index=7).loss
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)


def test_logits_are_never_materialized_in_training() -> None:
    """The head sees the hidden states but returns one position; peak memory stays low."""
    model = patch(make_model("llama"))
    ids, labels = _batch(seed=5, length=33)
    shapes: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        out = model(input_ids=ids, labels=labels)
    finally:
        handle.remove()
    assert out.logits is None
    assert shapes == [(3, 1, VOCAB)]  # one position, not (3, 33, VOCAB)
    out.loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_return_dict_false_gives_loss_first() -> None:
    ref_model = make_model("gpt2", dtype=torch.float64)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=6)
    got = model(input_ids=ids, labels=labels, return_dict=False)
    want = ref_model(input_ids=ids, labels=labels)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0].float(), want.loss, rtol=1e-6, atol=0)
    # (loss, logits, *rest) unpatched; (loss, *rest) patched, as to_tuple() drops the None logits
    assert len(got) == len(want.to_tuple()) - 1
    assert not any(isinstance(t, torch.Tensor) and t.ndim == 3 for t in got)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_eval_no_labels_and_generate_are_unchanged(name: str) -> None:
    ref_model = make_model(name)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=7)
    # training mode without labels: the model's own logits
    torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits)
    model.eval()
    ref_model.eval()
    with torch.no_grad():
        got, want = model(input_ids=ids, labels=labels), ref_model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(model.generate(ids, **kwargs), ref_model.generate(ids, **kwargs))


def test_only_that_instance_is_patched_and_unpatch_restores_it() -> None:
    model = make_model("qwen2")
    other = make_model("qwen2")
    ids, labels = _batch(seed=8)
    class_forward = type(model).forward
    assert patch(model) is model
    assert type(model).forward is class_forward
    assert "forward" not in vars(other)
    assert other(input_ids=ids, labels=labels).logits is not None
    assert model(input_ids=ids, labels=labels).logits is None
    assert patch(model, chunk_size=4) is model  # patching again only updates the chunk size
    assert unpatch(model) is model
    assert "forward" not in vars(model)
    assert "forward" not in vars(model.lm_head)
    assert not any(k.startswith("_crossent") for k in vars(model))
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, copy.deepcopy(model)(input_ids=ids, labels=labels).loss)
    with pytest.raises(ValueError, match=r"`model` is not patched"):
        unpatch(model)


def test_a_deep_copy_or_pickle_of_a_patched_model_trains_itself() -> None:
    """A copy (a reference or EMA model) is patched and runs its own weights, not the original's."""
    pristine = make_model("llama", dtype=torch.float64)
    model = patch(copy.deepcopy(pristine))
    ids, labels = _batch(seed=12)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        ref_model = copy.deepcopy(pristine)
        with torch.no_grad():
            for p, q in zip(clone.parameters(), ref_model.parameters(), strict=True):
                p.mul_(0.5)
                q.mul_(0.5)
        _assert_trains_like(clone, ref_model, ids, labels)
        assert all(p.grad is None for p in model.parameters())
        kept = clone.forward
        assert unpatch(clone) is clone
        assert "forward" not in vars(clone)
        assert clone(input_ids=ids, labels=labels).logits is not None
        assert kept(input_ids=ids, labels=labels).logits is None  # a kept wrapper still runs


def _replicate(module: Any, scale: float) -> Any:
    """A replica of `module` as ``nn.DataParallel`` builds one (``torch.nn.parallel.replicate``,
    here on the CPU): ``_replicate_for_data_parallel`` of every submodule, each parameter a
    differentiable copy of the original's (times `scale`, so that the replica's own weights
    show in its loss)."""
    replicas = {m: m._replicate_for_data_parallel() for m in module.modules()}
    for m, r in replicas.items():
        for key, child in m._modules.items():
            r._modules[key] = None if child is None else replicas[child]
        for key, p in m._parameters.items():
            setattr(r, key, None if p is None else p * scale)
    return replicas[module]


def test_a_shallow_copy_or_data_parallel_replica_runs_itself() -> None:
    """copy.copy and nn.DataParallel's replicas copy the instance's __dict__, the patched forward
    with it: a replica ran the original module (its weights, its device; on one device the
    same numbers), and a shallow copy put in evaluation mode still gave the original's training
    result (logits None, the fused loss). Each now runs its own module."""
    pristine = make_model("llama", dtype=torch.float64)
    model = patch(copy.deepcopy(pristine))
    ids, labels = _batch(seed=13)

    replica = _replicate(model, 0.5)
    ref_model = _replicate(pristine, 0.5)
    _assert_trains_like(replica, ref_model, ids, labels)
    for p, q in zip(model.parameters(), pristine.parameters(), strict=True):
        assert p.grad is not None  # through the replica's copies, as DataParallel's
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)

    shallow = copy.copy(model)
    shallow.training = False  # the copy's own flag (its submodules are the original's)
    out = shallow(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, pristine(input_ids=ids, labels=labels).loss)
    assert model(input_ids=ids, labels=labels).logits is None  # the original still fused
    unpatch(shallow)
    assert model(input_ids=ids, labels=labels).logits is None


def test_unpatch_restores_an_instance_forward_wrapper() -> None:
    """A forward already wrapped on the instance (as accelerate's hooks do) comes back as it was."""
    model = make_model("llama")
    calls: list[int] = []
    original = model.forward

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapped
    ids, labels = _batch(seed=9)
    patch(model)
    assert model(input_ids=ids, labels=labels).logits is None
    assert calls == [1]
    unpatch(model)
    assert model.forward is wrapped


def test_bad_models_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"has no `lm_head`"):
        patch(transformers.LlamaModel(make_model("llama").config))
    model = make_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match=r"`model.lm_head` must be a torch.nn.Linear"):
        patch(model)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module"):
        patch(object())  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"`chunk_size` must be None or a positive int"):
        patch(make_model("llama"), chunk_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`chunk_size` must be >= 1"):
        patch(make_model("llama"), chunk_size=0)
    custom = make_model("llama")
    custom.loss_function = lambda *a, **k: torch.tensor(0.0)
    with pytest.raises(
        ValueError, match=r"`model.loss_function` must be transformers' ForCausalLMLoss"
    ):
        patch(custom)


def test_an_unknown_logit_transform_is_refused() -> None:
    """A model that scales its logits (as Cohere does) would train on another loss: refused."""
    model = make_model("llama")
    cls = type(model)

    class Scaled(cls):  # type: ignore[misc, valid-type]
        def forward(self, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
            out = super().forward(input_ids=input_ids, **kwargs)
            out.logits = out.logits * 0.5
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, VOCAB)
            return out

    model.__class__ = Scaled
    patch(model)
    ids, labels = _batch(seed=10)
    with pytest.raises(RuntimeError, match=r"transforms the output of `lm_head`"):
        model(input_ids=ids, labels=labels)


def test_compiled_patched_model_has_no_graph_break_and_still_checks_the_head() -> None:
    """torch.compile(fullgraph=True) of a patched model's training step: no graph break (4:
    Signature.bind, the head check's two .item() reads and allclose, then the lock of the
    head's recording), loss and gradients equal to the eager patched model's; the head check
    is a device-side assertion there, so a model that scales its logits still fails."""
    model = patch(make_model("llama", dtype=torch.float64))
    eager = copy.deepcopy(model)
    ids, labels = _batch(seed=14)

    def step(m: Any, i: Any, y: Any) -> Any:
        return m(input_ids=i, labels=y).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # a break: an error
    _assert_step_equal(compiled, step, model, eager, ids, labels)

    scaled = make_model("llama")
    scaled.lm_head.register_forward_hook(lambda mod, args, out: out * 0.5)
    patch(scaled)
    with pytest.raises(RuntimeError, match=r"transforms the output of `lm_head`"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(scaled, ids, labels)


def _assert_step_equal(
    compiled: Any, step: Any, model: Any, eager: Any, ids: Any, labels: Any
) -> None:
    """A compiled training step of the patched `model` against the eager step of its copy
    `eager`: the loss and every parameter's gradient (accumulated over the calls) equal."""
    got = compiled(model, ids, labels)
    got.backward()
    want = step(eager, ids, labels)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for (n, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=n)


def test_dynamic_compile_of_a_patched_model_traces_one_graph_for_two_lengths() -> None:
    """torch.compile(dynamic=True, fullgraph=True) of a patched model's training step: one
    graph for two sequence lengths, loss and gradients equal to the eager patched model's.
    Before, the fused loss's options were symbolic there and its op's option string could not
    be traced: an error with fullgraph, a RecursionError without."""
    model = patch(make_model("llama", dtype=torch.float64))
    eager = copy.deepcopy(model)
    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    def step(m: Any, i: Any, y: Any) -> Any:
        return m(input_ids=i, labels=y).loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for length in (11, 8):
        ids, labels = _batch(seed=15, length=length)
        _assert_step_equal(compiled, step, model, eager, ids, labels)
    assert len(graphs) == 1


def test_nan_logits_are_not_taken_for_a_logit_transform() -> None:
    """A float64 Llama gives NaN logits for a left-padded sequence (eager attention): the
    check of the head's transform compares the other entries instead of raising
    (it raised "atol must be greater than or equal to zero, but got -nan")."""
    ref_model = make_model("llama", dtype=torch.float64)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=13)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the first sequence
    logits = ref_model(input_ids=ids, attention_mask=mask).logits
    assert torch.isnan(logits[0]).all()  # the case
    assert torch.isfinite(logits[1:]).all()
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isnan(got)  # NaN propagates, as in the model's own loss
    labels[0] = -100  # that sequence ignored: the loss of the others
    z, y = logits[1:, :-1].reshape(-1, VOCAB), labels[1:, 1:].reshape(-1)
    want = F.cross_entropy(z, y, ignore_index=-100)
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_all_ignored_batch_gives_zero_loss_and_gradient() -> None:
    """Documented difference: PyTorch's mean over no token is NaN; the patched loss is 0."""
    model = patch(make_model("mistral"))
    ids, _ = _batch(seed=11)
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_bfloat16_model_gives_a_float32_loss_close_to_the_models_own() -> None:
    ref_model = make_model("llama", dtype=torch.bfloat16)
    model = patch(copy.deepcopy(ref_model))
    ids, labels = _batch(seed=12)
    want = ref_model(input_ids=ids, labels=labels).loss
    got = model(input_ids=ids, labels=labels).loss
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    got.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(model.lm_head.weight.grad.float()).all()


def test_public_contract() -> None:
    import inspect

    import crossent.integrations.transformers as integration

    assert set(integration.__all__) == {"patch", "unpatch"}
    params = inspect.signature(patch).parameters
    assert list(params) == ["model", "chunk_size"]
    assert params["chunk_size"].kind is params["chunk_size"].KEYWORD_ONLY
    assert params["chunk_size"].default is None
    for fn in (patch, unpatch):
        doc = inspect.getdoc(fn) or ""
        assert "Examples" in doc
        assert ">>>" in doc


def test_unpatch_refuses_to_drop_a_later_wrapper() -> None:
    model = patch(make_model("gpt2"))
    patched = model.forward
    model.forward = lambda *a, **k: patched(*a, **k)
    with pytest.raises(ValueError, match=r"was replaced after patch\(\)"):
        unpatch(model)
    model.forward = patched
    assert unpatch(model) is model


# ----------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------


def _in_threads(*calls: Any) -> list[Any]:
    """Run each call in its own thread; their results in order (re-raising the first error)."""
    import threading

    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _meet_inside_the_base_model(model: Any, parties: int) -> Any:
    """A hook that holds every call in the base model until `parties` calls are inside it."""
    import threading

    barrier = threading.Barrier(parties, timeout=30)

    def hook(*_: Any) -> None:
        barrier.wait()

    return model.base_model.register_forward_hook(hook)


def test_a_training_call_and_a_plain_call_in_two_threads_do_not_mix() -> None:
    """While one thread's fused call records the head's input, another thread gets its logits."""
    model = make_model("llama")
    ref_model = copy.deepcopy(model)
    ids, labels = _batch(seed=13)
    want_loss = _reference_loss(ref_model, ids, labels)
    want_logits = ref_model(input_ids=ids).logits
    patch(model)
    hook = _meet_inside_the_base_model(model, 2)
    fused, plain = _in_threads(
        lambda: model(input_ids=ids, labels=labels), lambda: model(input_ids=ids)
    )
    hook.remove()
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, want_loss)
    torch.testing.assert_close(plain.logits, want_logits, rtol=0, atol=0)
    assert "forward" not in vars(model.lm_head)


def test_concurrent_training_calls_give_their_own_losses() -> None:
    model = make_model("gpt2")
    ref_model = copy.deepcopy(model)
    batches = [_batch(seed=s) for s in (14, 15, 16)]
    want = [_reference_loss(ref_model, ids, labels) for ids, labels in batches]
    patch(model)
    hook = _meet_inside_the_base_model(model, len(batches))
    outs = _in_threads(*(lambda b=b: model(input_ids=b[0], labels=b[1]) for b in batches))
    hook.remove()
    for out, ref in zip(outs, want, strict=True):
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref)
    assert "forward" not in vars(model.lm_head)


def test_concurrent_patch_and_unpatch_patch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Racing patch() calls (slowed down inside) wrap the model once; unpatch() undoes it all."""
    import threading
    import time

    import crossent.integrations.transformers as integration

    check = integration._check_loss_function

    def slow_check(model: Any) -> None:
        time.sleep(0.05)
        check(model)

    monkeypatch.setattr(integration, "_check_loss_function", slow_check)
    model = make_model("qwen2")
    start = threading.Barrier(4, timeout=30)

    def patcher() -> Any:
        start.wait()
        return patch(model, chunk_size=8)

    assert all(m is model for m in _in_threads(*(patcher for _ in range(4))))
    wrapped = vars(model)["forward"].__wrapped__  # the model's own forward, not another wrapper
    assert getattr(wrapped, "__func__", None) is type(model).forward
    done = threading.Barrier(4, timeout=30)

    def unpatcher() -> str:
        done.wait()
        try:
            unpatch(model)
        except ValueError:
            return "refused"
        return "done"

    assert sorted(_in_threads(*(unpatcher for _ in range(4)))) == ["done"] + ["refused"] * 3
    assert "forward" not in vars(model)
    ids, labels = _batch(seed=17)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_gemma2_softcapping_beyond_float32_is_the_uncapped_loss() -> None:
    """`final_logit_softcapping` = 1e39 in float32: the fused loss took the cap as inf and
    made every loss NaN (inf · tanh(x / inf)); the cap is the identity to rounding for
    these logits, so the patched loss and gradients are those of the uncapped model (the
    unpatched model's own float32 logits are NaN: it divides by the cap cast to inf)."""
    ref_model = make_model("gemma2")
    ref_model.config.final_logit_softcapping = None
    model = copy.deepcopy(ref_model)
    model.config.final_logit_softcapping = 1e39
    model = patch(model, chunk_size=7)
    _assert_float32_training_equal(ref_model, model)
