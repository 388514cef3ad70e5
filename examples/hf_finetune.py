"""Fine-tune a tiny random Hugging Face Llama, patched and unpatched: same losses, less memory.

    python examples/hf_finetune.py              # vocabulary 32000, 4 steps
    python examples/hf_finetune.py --vocab 8000 --steps 2

A ``LlamaForCausalLM`` is built in code (2 layers, hidden size 64, a
32000-token vocabulary; no download), twice from the same seed. Both copies
train for a few AdamW steps on the same synthetic text (token sequences that
follow a fixed rule, so the loss falls); one is patched with
``crossent.integrations.transformers.patch`` and computes its loss with the
fused linear cross-entropy, never holding the (tokens × vocabulary) logits.
The script prints both loss curves side by side and the extra peak memory of
one training step of each (resident memory on CPU, allocated memory on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crossent.integrations.transformers import patch

ALPHABET = 256
"""The synthetic text uses the first ALPHABET token ids of the vocabulary."""


def synthetic_batch(batch: int, length: int, *, seed: int) -> torch.Tensor:
    """Token ids where each token follows from the previous one by a fixed rule (learnable)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, ALPHABET, (batch, 1), generator=g)
    steps = torch.arange(length).unsqueeze(0)
    return (start + steps * 13) % ALPHABET


def peak_mib(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """``(extra peak memory of step() in MiB, what step() returned)``.

    CUDA: the allocator's peak. CPU: Linux's resident-memory high-water mark
    (NaN elsewhere).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        value = step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, value
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
            f.write("5")
        base = _status_mib("VmRSS")
    except OSError:
        return float("nan"), step()  # not Linux: no cheap peak-memory probe
    value = step()
    return _status_mib("VmHWM") - base, value


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One optimizer step on the next-token loss of `ids`; the loss."""
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(field)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per fused chunk")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.length,
    )  # fmt: skip
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).to(device).train()
    fused = patch(copy.deepcopy(plain), chunk_size=args.chunk_size)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=3e-3)
        for name, model in (("plain", plain), ("fused", fused))
    }

    print(f"vocabulary {args.vocab}, {args.batch} x {args.length} tokens per step, {device}")
    print(f"{'step':>4}  {'unpatched loss':>14}  {'patched loss':>12}  {'|diff|':>8}")
    peaks: dict[str, float] = {}
    worst = 0.0
    for step in range(args.steps):
        ids = synthetic_batch(args.batch, args.length, seed=step).to(device)
        losses = {}
        for name, model in (("plain", plain), ("fused", fused)):
            step_fn = functools.partial(train_step, model, optimizers[name], ids)
            peak, losses[name] = peak_mib(step_fn, device)
            if step > 0:  # the first step also allocates AdamW's state
                peaks[name] = max(peaks.get(name, 0.0), peak)
        gap = abs(losses["fused"] - losses["plain"])
        worst = max(worst, gap)
        print(f"{step:>4}  {losses['plain']:>14.6f}  {losses['fused']:>12.6f}  {gap:>8.1e}")

    if peaks:
        plain_mib, fused_mib = peaks["plain"], peaks["fused"]
        print(f"peak extra memory of a training step: unpatched {plain_mib:.1f} MiB, "
              f"patched {fused_mib:.1f} MiB ({fused_mib / plain_mib:.2f}x)")  # fmt: skip
    print(f"max |patched - unpatched| loss: {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
