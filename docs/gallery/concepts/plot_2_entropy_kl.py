r"""
Entropy, cross-entropy, KL and JS
=================================

The **entropy** of a distribution :math:`p` is its average surprisal,

.. math:: H(p) = -\sum_k p_k \log p_k \qquad (0 \log 0 = 0),

the fewest bits per event any code can spend on events drawn from :math:`p`.
A code built for a *different* distribution :math:`q` spends the
**cross-entropy**

.. math:: H(p, q) = -\sum_k p_k \log q_k ,

and the excess is the **Kullback–Leibler divergence**

.. math:: D(p \,\|\, q) = \sum_k p_k \log \frac{p_k}{q_k} = H(p, q) - H(p) \ge 0 .

So :math:`H(p, q) = H(p) + D(p \| q)`: when :math:`p` is fixed (the labels),
minimising cross-entropy and minimising KL are the same thing. KL is not
symmetric; the **Jensen–Shannon divergence**

.. math:: \mathrm{JS}(p, q) = \tfrac12 D(p \| m) + \tfrac12 D(q \| m), \qquad m = \tfrac12 (p + q),

is, and it lies in :math:`[0, 1]` bit.
"""

# %%
# The weather station again
# -------------------------
# Eight weather states with these true frequencies :math:`p`; the station's
# code was designed for the frequencies :math:`q` of another town.
import matplotlib.pyplot as plt
import numpy as np

import crossent as ce

states = ["sun", "part", "cloud", "drizzle", "rain", "storm", "snow", "fog"]
p = np.array([0.35, 0.35, 0.10, 0.10, 0.04, 0.04, 0.01, 0.01])
q = np.array([0.01, 0.01, 0.04, 0.04, 0.10, 0.10, 0.35, 0.35])

h_p = float(ce.info.entropy(p, base=2))
h_pq = float(ce.info.cross_entropy(p, q, base=2))
kl = float(ce.info.kl_divergence(p, q, base=2))
print(f"H(p)     = {h_p:.4f} bits")
print(f"H(p, q)  = {h_pq:.4f} bits")
print(f"D(p||q)  = {kl:.4f} bits")
print(f"H(p) + D(p||q) - H(p, q) = {h_p + kl - h_pq:.1e}")

# %%
# The identity holds to rounding. Drawn as bars: the entropy is what the
# weather costs; the KL divergence is what the wrong code wastes.
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
x = np.arange(len(states))
axes[0].bar(x - 0.2, p, 0.4, label="true $p$")
axes[0].bar(x + 0.2, q, 0.4, label="code built for $q$")
axes[0].set_xticks(x, states, rotation=30)
axes[0].set_ylabel("probability")
axes[0].legend()
axes[1].bar(["H(p)", "H(p, q)"], [h_p, h_p], color="C0", label="entropy H(p)")
axes[1].bar(["H(p, q)"], [kl], bottom=[h_p], color="C3", label="D(p‖q): wasted")
axes[1].bar(["D(q‖p)"], [float(ce.info.kl_divergence(q, p, base=2))], color="C2",
            label="D(q‖p): not symmetric")
axes[1].set_ylabel("bits per day")
axes[1].legend()
fig.tight_layout()

# %%
# A coin's entropy, and the divergences against a fair coin
# ---------------------------------------------------------
# For a coin with heads probability :math:`t`, the entropy peaks at one bit
# for the fair coin. Against a fair-coin model :math:`q = (0.5, 0.5)`, the
# cross-entropy is always exactly 1 bit (every outcome costs 1 bit), so
# :math:`D(p \| q) = 1 - H(p)`; JS is symmetric and smaller.
t = np.linspace(0.0, 1.0, 201)
coins = np.stack([t, 1 - t], axis=-1)
fair = np.full_like(coins, 0.5)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(t, ce.info.entropy(coins, base=2), lw=2, label="H(p)")
ax.plot(t, ce.info.cross_entropy(coins, fair, base=2), lw=2, label="H(p, fair)")
ax.plot(t, ce.info.kl_divergence(coins, fair, base=2), lw=2, label="D(p ‖ fair)")
ax.plot(t, ce.info.kl_divergence(fair, coins, base=2), lw=2, ls=":", label="D(fair ‖ p)")
ax.plot(t, ce.info.js_divergence(coins, fair, base=2), lw=2, ls="--", label="JS(p, fair)")
ax.set_xlabel("heads probability of the coin $p$")
ax.set_ylabel("bits")
ax.set_ylim(0, 2.5)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()

# %%
# :math:`D(\text{fair} \| p)` blows up at a certain coin (it has a
# probability-0 outcome the fair coin expects), while :math:`D(p \| \text{fair})`
# stays below 1 bit: which argument comes first matters, which is why
# distillation distinguishes forward and reverse KL. A probability of zero
# where the reference is positive gives an infinite divergence, not a NaN:
print(ce.info.kl_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])))
print(ce.info.kl_divergence(np.array([1.0, 0.0]), np.array([0.5, 0.5]), base=2))
