"""Placeholder: being written; replaced by the real implementation."""

def surprisal(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def entropy(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def cross_entropy(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def kl_divergence(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def js_divergence(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


