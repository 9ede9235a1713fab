"""A restricted unpickler for old PyTorch checkpoints that ``torch.load(weights_only=True)`` refuses.

Checkpoints published with papers often pickle harmless extras next to the weights (numpy scalars for the
best accuracy, an ``argparse.Namespace`` of training options, ...), which the weights-only loader rejects.
This unpickler executes only an allow-list of constructors needed to rebuild tensors and plain containers;
every other global becomes an inert placeholder (:class:`Opaque`), so no code from the file is run. The
weights come out intact and the extras come out as placeholders, which the state-dict extraction ignores.

Use through :func:`torch_load_restricted`; the module itself is passed to ``torch.load`` as its
``pickle_module``.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any, Callable

import torch


class Opaque:
    """Placeholder for a pickled Python object that is not needed to read the weights."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


def _opaque_class(module: str, name: str) -> type:
    return type(f"Opaque[{module}.{name}]", (Opaque,), {"qualname": f"{module}.{name}"})


def _rebuild_from_type_v2(func: Callable, new_type: type, args: tuple, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2 without the subclass and its Python state: the plain tensor."""
    return func(*args)


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode  # how protocol-2 pickles store bytes
    return allowed


_ALLOWED = _allowed()


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque_class(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def torch_load_restricted(path: Any) -> Any:
    """``torch.load`` of ``path`` on CPU through the restricted unpickler (see the module docstring)."""
    import sys

    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__])
