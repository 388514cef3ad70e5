r"""
Distillation figures: mode covering, mode seeking, temperature
==============================================================

A student that cannot represent the teacher's distribution exactly must
choose what to get wrong, and the divergence it minimises makes the choice:

* **forward KL** :math:`D(p_T \| p_S)` charges the student wherever the
  teacher has mass the student lacks: it is *mean-seeking* and covers every
  mode, putting mass between them;
* **reverse KL** :math:`D(p_S \| p_T)` charges it wherever it puts mass the
  teacher lacks: it is *mode-seeking* and locks onto one mode;
* **Jensen–Shannon** is symmetric and bounded; on this example it chooses
  like reverse KL.

Here the teacher is a two-peaked distribution over 40 classes and the
student a one-peaked family (a discretised Gaussian with centre :math:`\mu`
and width :math:`\sigma`), fitted by grid search with
:func:`crossent.info.kl_divergence` and :func:`crossent.info.js_divergence`.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np

import crossent as ce

k = np.arange(40)


def normalise(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


teacher = normalise(np.logaddexp(-((k - 10) ** 2) / 8, np.log(0.6) - ((k - 29) ** 2) / 8))
mu = np.linspace(0, 39, 157)[:, None, None]
sigma = np.linspace(1, 15, 57)[None, :, None]
students = normalise(-((k - mu) ** 2) / (2 * sigma**2))  # (mu, sigma, class)

fits = {
    "forward KL  D(teacher ‖ student)": ce.info.kl_divergence(teacher, students),
    "reverse KL  D(student ‖ teacher)": ce.info.kl_divergence(students, teacher),
    "Jensen–Shannon": ce.info.js_divergence(teacher, students),
}
fig, ax = plt.subplots(figsize=(8, 4))
ax.bar(k, teacher, color="lightgray", edgecolor="gray", label="teacher")
for (name, divergence), style in zip(fits.items(), ("-", "--", ":"), strict=True):
    i, j = np.unravel_index(np.argmin(divergence), divergence.shape)
    best = students[i, j]
    ax.plot(k, best, style, lw=2.5, label=f"{name}: μ={mu[i, 0, 0]:.1f}, σ={sigma[0, j, 0]:.1f}")
    print(f"{name}: minimum {divergence[i, j]:.3f} nats at mu={mu[i, 0, 0]:.2f}, "
          f"sigma={sigma[0, j, 0]:.2f}")
ax.set_xlabel("class")
ax.set_ylabel("probability")
ax.legend(fontsize=8, loc="upper center")
fig.tight_layout()

# %%
# Forward KL spreads the student over both peaks (and the gap between them);
# reverse KL sits on the larger peak and ignores the other. Distilling a
# classifier usually wants forward KL (the student should know every
# plausible answer); distilling a generative model often prefers reverse KL or
# JSD, so that the student does not generate from the gaps.
#
# Temperature
# -----------
# Dividing the teacher's logits by :math:`T > 1` before the softmax reveals
# how it ranks the unlikely classes; the entropy, in bits, rises with
# :math:`T`.
logits = np.array([6.0, 3.5, 3.0, 1.0, 0.5, -1.0, -2.0, -4.0])
fig, ax = plt.subplots(figsize=(8, 3.5))
for n, T in enumerate((1.0, 2.0, 4.0)):
    p = normalise(logits / T)
    h = float(ce.info.entropy(p, base=2))
    ax.bar(np.arange(8) + (n - 1) * 0.27, p, 0.27, label=f"T = {T:g}: entropy {h:.2f} bits")
ax.set_xlabel("class")
ax.set_ylabel("softmax(z / T)")
ax.legend()
fig.tight_layout()
