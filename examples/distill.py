"""Distil a teacher language-model head into a smaller student, logits never materialized.

    python examples/distill.py

A fixed random "teacher" (token embedding, a tanh layer of width 64 and an
output projection over an 8000-token vocabulary) and a narrower student
(width 16) read the same token sequences. The student is trained to match the
teacher's next-token distributions with the generalized Jensen–Shannon loss
of ``crossent.fused.linear_distillation_loss`` (β = 0.5, temperature 2):
both models' logits are formed chunk by chunk from their hidden states and
projections, and only the student gets gradients.

The first step is checked three ways on materialized logits: against
``crossent.distillation_loss`` (the same loss), against
``crossent.info.js_divergence(..., from_logits=True)`` (β = 0.5 is the
Jensen–Shannon divergence) and, with β = 0, against
``crossent.info.kl_divergence(..., from_logits=True)`` (forward KL). Then
the loss falls.
"""

from __future__ import annotations

import argparse
import sys

import torch

import crossent as ce
from crossent import info
from crossent.fused import linear_distillation_loss

VOCAB, BATCH, LENGTH = 8000, 16, 24
BETA, TEMPERATURE = 0.5, 2.0


class TinyLM(torch.nn.Module):
    """h_t = tanh(W (E[x_t] + P[t])); the head is kept apart for the fused loss."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width)
        self.pos = torch.nn.Embedding(LENGTH, width)
        self.body = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, VOCAB)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(tokens) + self.pos(torch.arange(tokens.shape[-1]))))


def fused_loss(student: TinyLM, teacher: TinyLM, tokens: torch.Tensor, target: torch.Tensor,
               *, beta: float = BETA) -> torch.Tensor:  # fmt: skip
    with torch.no_grad():
        teacher_hidden = teacher.hidden(tokens)
    return linear_distillation_loss(
        student.hidden(tokens), student.head.weight, teacher_hidden, teacher.head.weight, target,
        bias=student.head.bias, teacher_bias=teacher.head.bias, beta=beta,
        temperature=TEMPERATURE, shift=True,
    )  # fmt: skip


def check_first_step(student: TinyLM, teacher: TinyLM, tokens: torch.Tensor,
                     target: torch.Tensor) -> float:  # fmt: skip
    """Largest gap between the fused loss and three references on materialized logits."""
    with torch.no_grad():
        s_logits = student.head(student.hidden(tokens))[:, :-1]
        t_logits = teacher.head(teacher.hidden(tokens))[:, :-1]
        counted = target[:, 1:] != -100
        gaps = []
        for beta in (BETA, 0.0):
            fused = fused_loss(student, teacher, tokens, target, beta=beta)
            same = ce.distillation_loss(
                s_logits, t_logits, beta=beta, temperature=TEMPERATURE, target=target[:, 1:]
            )
            measure = info.js_divergence if beta == 0.5 else info.kl_divergence
            per_row = measure(t_logits / TEMPERATURE, s_logits / TEMPERATURE, from_logits=True)
            by_info = per_row[counted].mean()
            print(f"beta={beta}: fused {float(fused):.6f}  distillation_loss {float(same):.6f}  "
                  f"info.{measure.__name__} {float(by_info):.6f}")  # fmt: skip
            gaps += [abs(float(fused - same)), abs(float(fused - by_info))]
    return max(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    teacher, student = TinyLM(64).requires_grad_(False), TinyLM(16)
    with torch.no_grad():
        teacher.head.weight.mul_(8.0)  # a confident teacher: peaked next-token distributions
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    target = tokens.clone()
    target[:, : LENGTH // 4] = -100  # a prompt that is not distilled

    gap = check_first_step(student, teacher, tokens, target)
    print(f"max gap to the references: {gap:.1e}")
    if gap > 1e-5:
        return 1
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    first = last = 0.0
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = fused_loss(student, teacher, tokens, target)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:>3}  generalized JSD {last:.5f}")
    if any(p.grad is not None for p in teacher.parameters()):
        return 1
    print(f"distillation loss: {first:.5f} -> {last:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
