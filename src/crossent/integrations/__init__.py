"""Integrations with other libraries; each submodule imports its library on first use.

:mod:`crossent.integrations.transformers`
    :func:`~crossent.integrations.transformers.patch` a Hugging Face causal-LM
    model so that its training loss is the fused
    :func:`crossent.fused.linear_cross_entropy` (no logits in memory).
"""
