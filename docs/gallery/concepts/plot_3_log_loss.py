r"""
Binary cross-entropy and log loss
=================================

With two outcomes, cross-entropy is the **binary cross-entropy** or **log
loss**: for a label :math:`y \in \{0, 1\}` and a predicted probability
:math:`p = P(y = 1)`,

.. math:: \ell(p, y) = -\bigl[\,y \log p + (1 - y) \log (1 - p)\,\bigr],

the surprisal of what actually happened under the model's forecast. Averaged
over a data set it is what :func:`sklearn.metrics.log_loss` reports and what
:func:`crossent.binary_cross_entropy` computes.
"""

# %%
# A medical diagnosis
# -------------------
# A tumour is biopsied and turns out malignant (:math:`y = 1`). Three models
# had read the scan:
#
# * the **confident wrong** one said 1% malignant,
# * the **hesitant** one said 40% malignant,
# * the **right** one said 95% malignant.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import log_loss

import crossent as ce

predictions = {"confident wrong": 0.01, "hesitant": 0.40, "right": 0.95}
truth = np.array([1.0])
for name, prob in predictions.items():
    nats = float(ce.binary_cross_entropy(np.array([prob]), truth))
    print(f"{name:>16}: P(malignant) = {prob:.2f} -> loss {nats:.3f} nats "
          f"= {nats / np.log(2):.2f} bits")

# %%
# The hesitant model's mistake costs 0.92 nats; the confident one's 4.6 nats,
# five times as much, though both "predicted benign" at a 50% threshold.
# Accuracy cannot tell them apart; log loss punishes confidence in a wrong
# answer without bound (:math:`-\log p \to \infty` as :math:`p \to 0`). That
# is what makes it a *proper scoring rule*: the expected loss is smallest
# when the forecast is the true probability.
#
# Over a whole clinic
# -------------------
# Ten patients, four malignant; the per-patient losses average to the same
# number scikit-learn reports.
y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=float)
p = np.array([0.9, 0.8, 0.4, 0.01, 0.2, 0.1, 0.3, 0.05, 0.6, 0.02])
ours = float(ce.binary_cross_entropy(p, y))
print(f"crossent: {ours:.6f}   scikit-learn: {log_loss(y, p):.6f}")
per_patient = ce.binary_cross_entropy(p, y, reduction="none")
print(np.round(per_patient, 3))

# %%
# The two branches of the loss
# ----------------------------
# :math:`-\log p` when the tumour is malignant and :math:`-\log(1-p)` when it
# is benign, with the three models marked.
grid = np.linspace(0.001, 0.999, 500)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(grid, ce.binary_cross_entropy(grid, np.ones_like(grid), reduction="none"),
        lw=2, label="truth malignant: $-\\log p$")
ax.plot(grid, ce.binary_cross_entropy(grid, np.zeros_like(grid), reduction="none"),
        lw=2, label="truth benign: $-\\log(1-p)$")
for name, prob in predictions.items():
    loss = float(ce.binary_cross_entropy(np.array([prob]), truth))
    ax.plot(prob, loss, "o", color="C3")
    ax.annotate(f"{name}\n{loss:.2f} nats", (prob, loss), xytext=(8, 4), textcoords="offset points")
ax.set_xlabel("predicted P(malignant)")
ax.set_ylabel("log loss (nats)")
ax.set_ylim(0, 5.5)
ax.grid(alpha=0.3)
ax.legend(loc="upper center")
fig.tight_layout()

# %%
# A probability of exactly 0 or 1
# -------------------------------
# A model that says "certainly benign" about a malignant tumour has an
# infinite surprisal. crossent follows PyTorch: the logarithm is computed
# exactly and clamped at −100, so the loss is finite (100 nats) and the rest
# of the batch still trains; nothing is clipped at an epsilon.
print(ce.binary_cross_entropy(np.array([0.0, 1.0]), np.array([1.0, 1.0]), reduction="none") + 0.0)
