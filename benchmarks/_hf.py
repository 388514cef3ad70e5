"""A Hugging Face training step, patched vs unpatched: time and extra peak memory.

A section of ``python -m benchmarks.bench_llm [--quick]`` (registered in its
``SECTIONS``; this module only runs alone as the memory subprocess). A tiny random
``LlamaForCausalLM`` (2 layers, hidden size 64, built in code) with a 32000-token
vocabulary takes one forward+backward step on 8 × 512 tokens, unpatched (the
model's own ``ForCausalLMLoss`` on materialized logits) and patched with
``crossent.integrations.transformers.patch`` (default chunk size, and 512-token
chunks). Times are process CPU time on one thread, the contenders interleaved
over rounds, median ratio to the unpatched step. Memory is the extra RSS
high-water mark of one step in a fresh subprocess per case (see
benchmarks/_util.py). Goal: the patched step's extra peak memory at
vocabulary 32k is at most 0.5x the unpatched one's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

from benchmarks._util import peak_memory_mib, reset_peak_rss, rss_mib

FULL = [(8, 512, 32000)]
QUICK = [(2, 128, 4000)]
PROVIDERS = {"unpatched": None, "patched": 0, "patched-chunk512": 512}
"""Provider -> chunk size for patch() (0: the default, None: not patched)."""


def _model(vocab: int, length: int, provider: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from crossent.integrations.transformers import patch

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    chunk = PROVIDERS[provider]
    if chunk is not None:
        patch(model, chunk_size=chunk or None)
    return model


def _ids(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _step(model: Any, ids: torch.Tensor) -> float:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return float(out.loss.detach())


def _measure(provider: str, batch: int, length: int, vocab: int) -> None:
    torch.set_num_threads(1)
    model = _model(vocab, length, provider)
    _step(model, _ids(1, 8, vocab))  # lazy initialisation, and the gradients' storage
    ids = _ids(batch, length, vocab)
    before = reset_peak_rss()
    _step(model, ids)
    print(json.dumps({"peak_mib": rss_mib("VmHWM") - before}))


def hf_section(args: argparse.Namespace) -> None:
    """The patched vs unpatched training-step table (``args.quick``, ``args.rounds``)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers not installed: Hugging Face benchmark skipped")
        return
    torch.set_num_threads(1)
    print("\n## Hugging Face training step (tiny Llama), patched vs unpatched")
    print(f"{'B x T':>9} {'V':>6} {'provider':>17} | {'CPU s':>7} {'ratio':>6} | "
          f"{'extra MiB':>9} {'ratio':>6} | loss")  # fmt: skip
    providers = list(PROVIDERS)[:2] if args.quick else list(PROVIDERS)
    for batch, length, vocab in QUICK if args.quick else FULL:
        ids = _ids(batch, length, vocab)
        models = {p: _model(vocab, length, p) for p in providers}
        times: dict[str, list[float]] = {p: [] for p in providers}
        losses = {}
        for p, m in models.items():  # warm-up
            losses[p] = _step(m, ids)
        for _ in range(args.rounds):
            for p, m in models.items():  # A, B, C, A, B, C, ...
                start = time.process_time()
                _step(m, ids)
                times[p].append(time.process_time() - start)
        del models
        peaks = {  # quick: no memory subprocesses, as in the rest of bench_llm
            p: math.nan
            if args.quick
            else peak_memory_mib("benchmarks._hf", p, str(batch), str(length), str(vocab))
            for p in providers
        }
        base = "unpatched"
        for p in providers:
            ratio_t = statistics.median(a / b for a, b in zip(times[p], times[base], strict=True))
            print(f"{batch:>4} x {length:<4}{vocab:>6} {p:>17} | "
                  f"{statistics.median(times[p]):7.2f} {ratio_t:6.2f} | "
                  f"{peaks[p]:9.1f} {peaks[p] / max(peaks[base], 1e-9):6.2f} | "
                  f"{losses[p]:.6f}")  # fmt: skip


def main() -> None:
    """``python -m benchmarks._hf --measure PROVIDER B T V``: one case's peak, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=4, metavar=("PROVIDER", "B", "T", "V"), required=True)
    provider, *sizes = parser.parse_args().measure
    _measure(provider, *map(int, sizes))


if __name__ == "__main__":
    main()
