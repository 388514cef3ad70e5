r"""
Imbalanced data: class weights, pos_weight and focal loss
=========================================================

When one class is rare, plain cross-entropy is dominated by the many easy
examples of the common class. Three remedies, all options of the crossent
losses (and of their :mod:`crossent.nn` modules):

* ``weight``: a per-class weight :math:`w_c` in the categorical losses; the
  mean divides by the summed weight of the counted targets (PyTorch's rule),
  so a weight of 2 is the same as seeing each example of that class twice.
* ``pos_weight``: in :func:`crossent.binary_cross_entropy`, a factor on the
  positive term, :math:`-[\,w_+ y \log p + (1-y)\log(1-p)\,]`; set it to
  #negatives / #positives to balance a rare positive class.
* ``gamma`` (focal loss, Lin et al. 2017): each term gets the factor
  :math:`(1 - p_t)^\gamma`, where :math:`p_t` is the probability of the true
  class, so well-classified examples are down-weighted; ``alpha`` (binary)
  weighs positives by :math:`\alpha` and negatives by :math:`1-\alpha`.
"""

# %%
# Class weights are repeated examples
# -----------------------------------
import matplotlib.pyplot as plt
import numpy as np

import crossent as ce

rng = np.random.default_rng(0)
logits = rng.normal(size=(6, 3))
labels = np.array([0, 0, 0, 0, 1, 2])  # class 0 is four times as common
weight = np.array([0.25, 1.0, 1.0])
weighted = ce.sparse_categorical_cross_entropy(logits, labels, from_logits=True, weight=weight)
print("weighted mean:", float(weighted))

# the same number from rows repeated in proportion to their weights (x4 for classes 1 and 2)
repeat = np.where(labels == 0, 1, 4)
replicated = ce.sparse_categorical_cross_entropy(
    np.repeat(logits, repeat, axis=0), np.repeat(labels, repeat), from_logits=True
)
print("replicated rows:", float(replicated))

# %%
# pos_weight for a rare positive class
# ------------------------------------
# One positive in ten: ``pos_weight = 9`` makes the positive term weigh as
# much as all the negatives together. It matches PyTorch's
# ``BCEWithLogitsLoss(pos_weight=...)``:
import torch

x = rng.normal(size=10)
t = np.zeros(10)
t[3] = 1.0
ours = ce.binary_cross_entropy(x, t, from_logits=True, pos_weight=np.array(9.0))
theirs = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(9.0))(torch.tensor(x), torch.tensor(t))
print(f"crossent {float(ours):.12f}   torch {float(theirs):.12f}")

# %%
# The focal factor
# ----------------
# :math:`(1-p_t)^\gamma` against the probability of the true class: at
# :math:`\gamma = 2` an example already classified at 90% counts 100 times
# less than under plain cross-entropy, a badly classified one almost fully.
p_t = np.linspace(0.0, 1.0, 300)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
    axes[0].plot(p_t, (1 - p_t) ** gamma, lw=2, label=f"γ = {gamma:g}")
    loss = ce.binary_cross_entropy(p_t[1:], np.ones(p_t.size - 1), gamma=gamma, reduction="none")
    axes[1].plot(p_t[1:], loss, lw=2, label=f"γ = {gamma:g}")
axes[0].set_xlabel("probability of the true class $p_t$")
axes[0].set_ylabel("focal factor $(1-p_t)^\\gamma$")
axes[0].legend()
axes[1].set_xlabel("probability of the true class $p_t$")
axes[1].set_ylabel("focal loss $-(1-p_t)^\\gamma \\log p_t$")
axes[1].set_ylim(0, 5)
axes[1].legend()
fig.tight_layout()

# %%
# The curves on the right are :func:`crossent.binary_cross_entropy` with
# ``gamma=``; the categorical losses take the same option, and
# :class:`crossent.nn.FocalLoss` / :class:`crossent.nn.BinaryFocalLoss` are
# the module forms (``gamma=2`` by default). With ``alpha`` the binary focal
# loss is torchvision's ``sigmoid_focal_loss``, written out here in float64:
p = 1 / (1 + np.exp(-x))
formula = -(0.25 * t * (1 - p) ** 2 * np.log(p) + 0.75 * (1 - t) * p**2 * np.log1p(-p)).sum()
focal = ce.binary_cross_entropy(x, t, from_logits=True, gamma=2.0, alpha=0.25, reduction="sum")
print(f"crossent {float(focal):.12f}   formula {formula:.12f}")
