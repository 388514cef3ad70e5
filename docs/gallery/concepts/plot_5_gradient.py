r"""
The gradient of softmax cross-entropy: p − y
============================================

For logits :math:`z \in \mathbb{R}^C`, :math:`p = \operatorname{softmax}(z)`
and a target distribution :math:`y` (one-hot, or soft) with
:math:`\sum_k y_k = 1`,

.. math:: \ell(z) = -\sum_k y_k \log p_k = -\sum_k y_k z_k + \operatorname{lse}(z) .

Since :math:`\partial \operatorname{lse}(z) / \partial z_j = e^{z_j} / \sum_k e^{z_k} = p_j`,

.. math:: \frac{\partial \ell}{\partial z_j} = p_j - y_j .

The gradient is the prediction minus the truth: bounded in
:math:`[-1, 1]`, zero exactly when the prediction is the target, and the
softmax Jacobian never has to be formed. With ``reduction="mean"`` over
:math:`N` rows, each row's gradient is divided by :math:`N`.
:func:`crossent.value_and_grad` returns the loss and this gradient in closed
form, on any backend, with no autodiff.
"""

# %%
# Check it
# --------
# The closed form against :math:`p - y` written out, and against PyTorch's
# autograd on the same numbers.
import matplotlib.pyplot as plt
import numpy as np
import torch

import crossent as ce

rng = np.random.default_rng(0)
z = rng.normal(size=(4, 5))
y = np.array([3, 0, 4, 1])
loss, grad = ce.value_and_grad(ce.sparse_categorical_cross_entropy, z, y, from_logits=True)

p = np.exp(z - z.max(axis=1, keepdims=True))
p /= p.sum(axis=1, keepdims=True)
one_hot = np.eye(5)[y]
print("loss:", float(loss))
print("max |grad - (p - y)/N|:", np.abs(grad - (p - one_hot) / len(y)).max())

zt = torch.tensor(z, requires_grad=True)
torch.nn.functional.cross_entropy(zt, torch.tensor(y)).backward()
print("max |grad - torch autograd|:", np.abs(grad - zt.grad.numpy()).max())

# %%
# And against central finite differences of the loss itself:
h = 1e-6
fd = np.zeros_like(z)
for idx in np.ndindex(z.shape):
    step = np.zeros_like(z)
    step[idx] = h
    up = ce.sparse_categorical_cross_entropy(z + step, y, from_logits=True)
    down = ce.sparse_categorical_cross_entropy(z - step, y, from_logits=True)
    fd[idx] = (up - down) / (2 * h)
print("max |grad - finite differences|:", np.abs(grad - fd).max())

# %%
# What the gradient looks like
# ----------------------------
# For the first row: the label's logit is pushed up by :math:`1 - p_y`, every
# other logit down by its probability; the pushes sum to zero (adding a
# constant to every logit changes nothing).
fig, ax = plt.subplots(figsize=(7, 3.5))
classes = np.arange(5)
ax.bar(classes - 0.25, p[0], 0.25, label="p = softmax(z)")
ax.bar(classes, one_hot[0], 0.25, label="y (label 3)")
ax.bar(classes + 0.25, p[0] - one_hot[0], 0.25, label="p − y = ∂ℓ/∂z")
ax.axhline(0, color="black", lw=0.8)
ax.set_xticks(classes)
ax.set_xlabel("class")
ax.legend()
fig.tight_layout()
print("sum of the row's gradient:", (p[0] - one_hot[0]).sum())

# %%
# Label smoothing and class weights change the target, not the shape
# -------------------------------------------------------------------
# With smoothing :math:`\varepsilon` the target becomes
# :math:`(1-\varepsilon) y + \varepsilon / C`, and the gradient is still
# :math:`p` minus it:
_, g_smooth = ce.value_and_grad(ce.sparse_categorical_cross_entropy, z, y, from_logits=True,
                                label_smoothing=0.1, reduction="sum")
print("max |grad - (p - smoothed y)|:", np.abs(g_smooth - (p - (0.9 * one_hot + 0.1 / 5))).max())
