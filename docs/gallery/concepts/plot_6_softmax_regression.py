r"""
Softmax regression in NumPy alone
=================================

Multinomial logistic regression is a linear layer followed by softmax
cross-entropy: logits :math:`Z = XW + b` and the mean loss
:math:`L = \frac1N \sum_i \ell(z_i, y_i)`. By the chain rule and the
:math:`p - y` gradient of the previous page,

.. math::

    \frac{\partial L}{\partial W} = X^\top G, \qquad
    \frac{\partial L}{\partial b} = \textstyle\sum_i G_i, \qquad
    G = \frac{\partial L}{\partial Z} = \tfrac1N (P - Y),

so :func:`crossent.value_and_grad` is all the calculus a training loop
needs: no autodiff framework, plain NumPy arrays. Here it trains on
scikit-learn's handwritten digits (8×8 images, 10 classes), with the
``crossent.metrics`` streaming metrics to score the held-out set.
"""

# %%
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import crossent as ce
from crossent.metrics import Accuracy, CrossEntropy

X, y = load_digits(return_X_y=True)
X = X / 16.0
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
n_features, n_classes = X.shape[1], 10

W = np.zeros((n_features, n_classes))
b = np.zeros(n_classes)
learning_rate, history = 0.5, []
for _step in range(300):
    logits = X_train @ W + b
    loss, G = ce.value_and_grad(ce.sparse_categorical_cross_entropy, logits, y_train,
                                from_logits=True, label_smoothing=0.05)
    W -= learning_rate * (X_train.T @ G)
    b -= learning_rate * G.sum(axis=0)
    test_loss = ce.sparse_categorical_cross_entropy(X_test @ W + b, y_test, from_logits=True)
    history.append((float(loss), float(test_loss)))

# %%
# Score the held-out digits with the streaming metrics (in batches, as a
# training loop would):
xent, acc = CrossEntropy(input_kind="logits", base=2), Accuracy(input_kind="logits")
for start in range(0, len(X_test), 128):
    batch = slice(start, start + 128)
    xent.update(X_test[batch] @ W + b, y_test[batch])
    acc.update(X_test[batch] @ W + b, y_test[batch])
print(f"test cross-entropy: {xent.compute():.3f} bits per digit, accuracy: {acc.compute():.3f}")

# %%
# The learning curves, and the learned weights of each class as an image:
# the templates the model compares each digit with.
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([h[0] for h in history], label="training loss (smoothed targets)")
ax.plot([h[1] for h in history], label="test loss")
ax.set_xlabel("gradient step")
ax.set_ylabel("cross-entropy (nats)")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()

fig, axes = plt.subplots(1, 10, figsize=(10, 1.6))
for digit, ax in enumerate(axes):
    ax.imshow(W[:, digit].reshape(8, 8), cmap="RdBu_r")
    ax.set_title(str(digit))
    ax.axis("off")
fig.tight_layout()
