r"""
Why logits
==========

A network's last layer produces *logits* :math:`z`, unnormalised
log-probabilities; softmax (or sigmoid) turns them into probabilities. The
loss only needs the **log**-probability of the label,

.. math::

    \log \operatorname{softmax}(z)_y &= z_y - \operatorname{lse}(z), \\
    \operatorname{lse}(z) &= m + \log \sum_k e^{z_k - m}, \qquad m = \max_k z_k ,

and for two classes :math:`\log \sigma(x) = -\operatorname{softplus}(-x) =
-\bigl(\max(-x, 0) + \log(1 + e^{-|x|})\bigr)`. Computed this way nothing
overflows (every exponent is :math:`\le 0`) and nothing underflows into
:math:`\log 0`. Computing the probability first and taking its log afterwards
loses exactly the information the loss is about: how wrong a confident model
is. That is why every crossent loss takes ``from_logits=True``.
"""

# %%
# Softmax, then log
# -----------------
# Logits of a very confident, wrong model: in float32 the probability of the
# label underflows to 0 and its log is :math:`-\infty`; in log-sum-exp form the
# loss is the exact 120 nats.
import matplotlib.pyplot as plt
import numpy as np

import crossent as ce

z = np.array([[0.0, 120.0]], dtype=np.float32)  # the label is class 0
label = np.array([0])
with np.errstate(divide="ignore", over="ignore"):
    naive = -np.log(np.exp(z[0, 0]) / np.exp(z[0]).sum())
print("naive -log(softmax(z))_y:", naive)
print("crossent (from logits):  ", ce.sparse_categorical_cross_entropy(z, label, from_logits=True))

# %%
# Logits of 1000 overflow ``exp`` even when the answer is right:
with np.errstate(over="ignore", invalid="ignore"):
    big = np.array([1000.0, 0.0])
    print("naive:   ", -np.log(np.exp(big[0]) / np.exp(big).sum()))
print("crossent:", ce.sparse_categorical_cross_entropy(big[None], label, from_logits=True))

# %%
# The error of the naive forms
# ----------------------------
# Binary cross-entropy of a logit :math:`x` with label 1, in float32, against
# the exact value :math:`\operatorname{softplus}(-x)` computed in float64:
#
# * **sigmoid then log**: ``-log(sigmoid(x))``: for :math:`x < -88` the
#   sigmoid underflows and the loss is infinite; for large positive :math:`x`,
#   :math:`1 - \sigma(x)` rounds to 0 so the loss of the other label is lost.
# * **epsilon clipping** (Keras' ``binary_crossentropy`` on probabilities):
#   :math:`p` is clipped into :math:`[\epsilon, 1 - \epsilon]` with
#   :math:`\epsilon = 10^{-7}`, so no loss can exceed :math:`-\log \epsilon =
#   16.1` nats: a wrong logit of −50 is scored as if it were −16, and its
#   gradient is zero.
# * **crossent** ``binary_cross_entropy(x, y, from_logits=True)`` in float32.
x = np.linspace(-100, 60, 641).astype(np.float32)
exact = np.logaddexp(0.0, -x.astype(np.float64))  # softplus(-x), the exact loss for y = 1
with np.errstate(divide="ignore", over="ignore"):
    sig = (1 / (1 + np.exp(-x))).astype(np.float32)
    naive = -np.log(sig)
    eps = np.float32(1e-7)
    clipped = -np.log(np.clip(sig, eps, 1 - eps))
ours = ce.binary_cross_entropy(x, np.ones_like(x), from_logits=True, reduction="none")


def rel_error(v: np.ndarray) -> np.ndarray:
    return np.abs(v.astype(np.float64) - exact) / exact


fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].plot(x, exact, "k", lw=3, alpha=0.4, label="exact (float64)")
axes[0].plot(x, naive, lw=1.5, label="-log(sigmoid(x))")
axes[0].plot(x, clipped, lw=1.5, ls="--", label="clipped at ε = 1e-7")
axes[0].plot(x, ours, lw=1.5, ls=":", label="crossent, from_logits")
axes[0].set_xlabel("logit x (label 1)")
axes[0].set_ylabel("loss (nats)")
axes[0].set_ylim(0, 105)
axes[0].legend()
with np.errstate(invalid="ignore"):
    for values, name, style in ((naive, "-log(sigmoid(x))", "-"), (clipped, "clipped", "--"),
                                (ours, "crossent", ":")):
        err = rel_error(np.asarray(values))
        axes[1].semilogy(x, np.clip(np.nan_to_num(err, nan=1.0, posinf=1.0), 1e-12, 1.0),
                         style, lw=1.5, label=name)
axes[1].axhline(np.finfo(np.float32).eps, color="gray", lw=1, label="float32 eps")
axes[1].set_xlabel("logit x (label 1)")
axes[1].set_ylabel("relative error (capped at 1; 1e-12 = exact)")
axes[1].legend(loc="center left")
fig.tight_layout()

# %%
# Right of 0 the naive form loses all digits as soon as
# :math:`e^{-x} < \epsilon_{32}` (the loss is tiny but not zero, and the
# naive form says 0); left of −88 the sigmoid underflows to 0 and the naive
# loss is infinite. Left of −16 the clipped form is wrong by the whole
# difference: it says 16.1 nats where the truth is up to 100. crossent stays
# within float32 rounding across the range.
max_err = float(np.max(rel_error(np.asarray(ours))))
print(f"crossent float32 max relative error over [-100, 60]: {max_err:.1e}")

# %%
# Log-sigmoid and the gradient
# ----------------------------
# The gradient of the loss with respect to the logit is
# :math:`\sigma(x) - y`: bounded, never NaN. With clipping it is 0 wherever
# the clip is active, so a confidently wrong model stops learning.
loss, grad = ce.value_and_grad(ce.binary_cross_entropy, np.array([-50.0, 0.0, 50.0]),
                               np.ones(3), from_logits=True, reduction="none")
print("loss:", loss)
print("grad:", grad)
