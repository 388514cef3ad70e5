"""A PyTorch loss as one node of dynamo's graph under ``torch.compile``.

Dynamo guards what the code it traces reads: every function, module and constant of
crossent's dispatch (the options, the executor's choice of path, the checks), and it
checks the guards before each call of the compiled function. A categorical
cross-entropy traced that way installed 94 guards (``F.cross_entropy``: 11), about
3 µs of a 15 µs compiled 32 × 10 call, the gap to compiled PyTorch.

So while dynamo traces, the public losses hand their call to :func:`graph_node`, which
dynamo does not trace but writes into its graph as one call
(``torch._dynamo.allow_in_graph``): it runs the loss once on fake tensors for the output's
shape, and AOTAutograd traces it into ATen operations, for inductor to fuse as before,
installing no guard for what it reads. What the call depends on beyond its tensors is
evaluated by dynamo and guarded: the options (checked before the call, constants of the
graph) and the validation switch, handed in as `checked`. The tensors' dtypes, devices,
shapes and ``requires_grad``, grad mode and autocast are guarded by dynamo as for any
graph.

A shape or dtype error found while the call is traced is raised by dynamo as its
``TorchRuntimeError`` (a ``RuntimeError``) with crossent's message, as PyTorch's own
losses' are; option errors keep their ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations

import sys
from typing import Any

from crossent._lib._config import validation

__all__ = ["graph_node", "in_graph", "torch_operands"]


def graph_node(loss: str, /, *args: Any, checked: bool, **kwargs: Any) -> Any:
    """``crossent.<loss>(*args, **kwargs)`` with validation `checked`: the loss as dynamo's
    graph sees it (one opaque call; :func:`in_graph` registers it). A dotted `loss`
    (``"module.function"``) names a function of an imported module instead."""
    torch = sys.modules["torch"]
    for name, value in kwargs.items():  # a number dynamo made dynamic: specialized (a guard)
        if isinstance(value, torch.SymInt):
            kwargs[name] = int(value)
        elif isinstance(value, torch.SymFloat):
            kwargs[name] = float(value)
    module, _, name = loss.rpartition(".")
    with validation(checked):
        return getattr(sys.modules[module or "crossent"], name)(*args, **kwargs)


_REGISTERED: list[bool] = []


def in_graph() -> bool:
    """True, once :func:`graph_node` is registered with dynamo (``allow_in_graph``).

    Marked as a constant result: dynamo calls it for real while it traces (PyTorch loads dynamo
    with ``torch.compile``, after crossent: registering at import would load it for every
    user), before it reaches the call of :func:`graph_node`.
    """
    if not _REGISTERED:
        from torch._dynamo import allow_in_graph

        allow_in_graph(graph_node)
        _REGISTERED.append(True)
    return True


in_graph._dynamo_marked_constant = True  # type: ignore[attr-defined]


def torch_operands(axis: object, target: object, *optional: object) -> bool:
    """Whether a call's other operands can enter :func:`graph_node`: `target` a tensor, the
    `optional` ones (weights) None, tensors or numbers, `axis` an int; anything else is traced
    as it is, and its checks raise. A number that dynamo made dynamic (it changed between
    calls) is specialized by :func:`graph_node`: a guard on its value, as the traced checks
    would install.

    The scalar options are handed in as the checked options' values: constants of the graph
    (:func:`~crossent._losses._options.make_options` runs at trace time), never symbolic.
    """
    tensor = sys.modules["torch"].Tensor
    return (
        type(axis) is int
        and isinstance(target, tensor)
        and all(o is None or isinstance(o, (tensor, int, float)) for o in optional)
    )
