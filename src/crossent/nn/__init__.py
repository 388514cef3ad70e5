"""PyTorch loss modules: drop-in replacements for :mod:`torch.nn`'s, plus focal and fused losses.

:class:`CrossEntropyLoss`, :class:`NLLLoss`, :class:`BCELoss` and
:class:`BCEWithLogitsLoss` take the same constructor arguments, in the same
order and with the same defaults, as the :mod:`torch.nn` classes of those
names, hold `weight` / `pos_weight` as buffers named like torch's (so
``load_state_dict`` works across), put the classes on dim 1, and give the same
results. Each adds, keyword-only, the crossent options PyTorch lacks (focal
`gamma`, `z_loss`, `softcap`, binary `label_smoothing`, `alpha`, ...).
:class:`FocalLoss`, :class:`BinaryFocalLoss` and :class:`LinearCrossEntropyLoss`
have no torch counterpart.

Importing this module imports torch; ``import crossent`` alone does not.
"""

from crossent.nn._loss import (
    BCELoss,
    BCEWithLogitsLoss,
    BinaryFocalLoss,
    CrossEntropyLoss,
    FocalLoss,
    LinearCrossEntropyLoss,
    NLLLoss,
)

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "BinaryFocalLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LinearCrossEntropyLoss",
    "NLLLoss",
]
