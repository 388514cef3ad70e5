"""Policy gradient with an entropy bonus from fused per-token log-probabilities.

    python examples/policy_gradient.py

A tiny autoregressive policy (token embedding, a position embedding, a tanh
layer and an output projection over a 5000-token vocabulary) samples
sequences; the reward of a sequence is the fraction of its tokens that are
even. Each step computes REINFORCE with a mean-reward baseline and an entropy
bonus (the loss of GRPO/PPO without clipping)

    loss = -sum_t A · log π(x_{t+1} | x_≤t) / n  -  β · mean_t H(π(· | x_≤t))

with ``crossent.fused.linear_log_probs(..., shift=True, return_entropy=True,
temperature=T)``: the log-probabilities and entropies of every position come
from the hidden states and the projection chunk by chunk, never from the
(tokens × vocabulary) logits, and the gradient flows through both. The first
step is checked against log_softmax + gather + entropy on materialized
logits (values and gradients); then the mean reward climbs from 1/2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from crossent.fused import linear_log_probs

VOCAB, HIDDEN, BATCH, LENGTH = 5000, 32, 32, 12
TEMPERATURE, BETA = 1.0, 0.01


class Policy(torch.nn.Module):
    """h_t = tanh(W_in (E[x_t] + P[t])); logits_t = W_out h_t (the last layer stays separate)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.pos = torch.nn.Embedding(LENGTH, HIDDEN)
        self.body = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1])
        return torch.tanh(self.body(self.embed(tokens) + self.pos(positions)))

    @torch.no_grad()
    def sample(self, first: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample LENGTH tokens after `first`, one position's logits at a time."""
        tokens = first.unsqueeze(-1)
        for _ in range(LENGTH - 1):
            h = self.hidden(tokens)[:, -1]
            logits = self.head(h) / TEMPERATURE
            u = torch.rand(logits.shape, generator=generator).clamp_min(1e-20)
            nxt = (logits - torch.log(-torch.log(u))).argmax(-1, keepdim=True)  # Gumbel-max
            tokens = torch.cat((tokens, nxt), dim=-1)
        return tokens


def pg_loss(policy: Policy, tokens: torch.Tensor, advantage: torch.Tensor, *, fused: bool):
    """The REINFORCE loss with entropy bonus, fused or on materialized logits (the reference)."""
    h = policy.hidden(tokens)
    if fused:
        log_probs, entropy = linear_log_probs(
            h, policy.head.weight, tokens, temperature=TEMPERATURE, shift=True,
            return_entropy=True,
        )  # fmt: skip
    else:
        logp_all = torch.log_softmax(policy.head(h[:, :-1]).float() / TEMPERATURE, dim=-1)
        log_probs = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss = -(advantage[:, None] * log_probs).mean() - BETA * entropy.mean()
    return loss, log_probs, entropy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    policy = Policy()
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)

    first_reward = last_reward = 0.0
    for step in range(args.steps):
        tokens = policy.sample(torch.randint(0, VOCAB, (BATCH,), generator=g), g)
        reward = (tokens[:, 1:] % 2 == 0).float().mean(-1)
        advantage = reward - reward.mean()
        opt.zero_grad(set_to_none=True)
        loss, log_probs, entropy = pg_loss(policy, tokens, advantage, fused=True)
        loss.backward()
        if step == 0:  # parity with the materialized reference, values and gradients
            grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
            opt.zero_grad(set_to_none=True)
            ref_loss, ref_lp, ref_ent = pg_loss(policy, tokens, advantage, fused=False)
            ref_loss.backward()
            gap_lp = float((log_probs - ref_lp).detach().abs().max())
            gap_ent = float((entropy - ref_ent).detach().abs().max())
            params = policy.named_parameters()
            gap_grad = max(float((grads[n] - p.grad).abs().max()) for n, p in params)
            print(f"fused vs materialized: max |d log p| {gap_lp:.1e}, max |d entropy| "
                  f"{gap_ent:.1e}, max |d grad| {gap_grad:.1e}")  # fmt: skip
            if max(gap_lp, gap_ent) > 1e-4 or gap_grad > 1e-5:
                return 1
            for n, p in policy.named_parameters():
                p.grad = grads[n]
        opt.step()
        mean_reward = float(reward.mean())
        first_reward = mean_reward if step == 0 else first_reward
        last_reward = mean_reward
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:>3}  mean reward {mean_reward:.3f}  "
                  f"mean entropy {float(entropy.detach().mean()):.3f} nats")  # fmt: skip
    print(f"mean reward: {first_reward:.3f} -> {last_reward:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
