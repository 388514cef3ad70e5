r"""
Surprisal and bits
==================

How much do you learn when an event happens? The less likely it was, the
more: the *surprisal* (or self-information) of an event of probability
:math:`p` is

.. math:: I(p) = -\log_b p,

in bits for :math:`b = 2` and in nats for :math:`b = e`. A certain event
(:math:`p = 1`) tells you nothing; halving the probability adds one bit.
Surprisals of independent events add up, because their probabilities multiply.

:func:`crossent.info.surprisal` computes it for any array.
"""

# %%
# A fair coin
# -----------
# One toss of a fair coin has two equally likely outcomes, so seeing it land
# heads is worth exactly one bit; three tosses (eight equally likely
# sequences) are worth three bits, and so is any one of eight equally likely
# weather states.
import matplotlib.pyplot as plt
import numpy as np

import crossent as ce

print(ce.info.surprisal(np.array([0.5, 0.5**3, 1 / 8]), base=2))

# %%
# A biased coin carries less information per toss on average: heads at 90%
# is hardly news (0.15 bits), tails at 10% is (3.3 bits).
print(ce.info.surprisal(np.array([0.9, 0.1]), base=2))

# %%
# The weather forecast
# --------------------
# A weather station sends one of two messages, *sunny* or *rain*. Where it is
# sunny 75% of the days, learning that it will be sunny tomorrow is worth
# :math:`-\log_2 0.75 = 0.415` bits and learning that it will rain is worth
# :math:`-\log_2 0.25 = 2` bits. Averaged over days, the station delivers
# :math:`0.75 \cdot 0.415 + 0.25 \cdot 2 = 0.811` bits a day: the *entropy* of
# the weather (next page). A one-bit message per day wastes 0.19 bits.
weather = np.array([0.75, 0.25])
bits = ce.info.surprisal(weather, base=2)
print("surprisal (bits):", bits)
print("average (entropy):", float(ce.info.entropy(weather, base=2)))

# %%
# The curve
# ---------
# Surprisal against probability: it is 0 at :math:`p = 1` and grows without
# bound as :math:`p \to 0`; in nats the same curve is scaled by
# :math:`\ln 2 \approx 0.693`.
p = np.linspace(0.004, 1.0, 500)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(p, ce.info.surprisal(p, base=2), lw=2, label="bits, $-\\log_2 p$")
ax.plot(p, ce.info.surprisal(p), lw=2, ls="--", label="nats, $-\\ln p$")
events = {
    "fair coin: heads": 0.5,
    "three heads in a row": 0.125,
    "sunny (75%)": 0.75,
    "rain (25%)": 0.25,
    "tails of a 90/10 coin": 0.1,
}
for name, prob in events.items():
    b = float(ce.info.surprisal(np.array(prob), base=2))
    ax.plot(prob, b, "o", color="C3")
    ax.annotate(f"{name}: {b:.2f} bits", (prob, b), xytext=(6, 4), textcoords="offset points")
ax.set_xlabel("probability $p$ of the event")
ax.set_ylabel("surprisal")
ax.set_ylim(0, 7)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()

# %%
# The weather, as bars
# --------------------
# Each message's surprisal is drawn over its probability; the area-weighted
# average, the dashed line, is the entropy in bits per day.
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(["sunny", "rain"], bits, width=weather, color=["C1", "C0"], edgecolor="black")
ax.axhline(float(ce.info.entropy(weather, base=2)), ls="--", color="black", label="entropy")
ax.set_ylabel("surprisal (bits)")
ax.set_title("bar width = probability of the message")
ax.legend()
fig.tight_layout()
