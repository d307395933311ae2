"""Bytes an object graph holds in array buffers, and an LRU bounded by those bytes.

A serving actor's memory is its cached features and its click sessions; both are numpy arrays and
torch tensors hanging off plain Python objects whose layout belongs to the model code. Counting their
buffers by walking the graph (each buffer once) gives the bound without knowing that layout, so a new
field in a session cannot silently escape it.
"""
from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

import numpy as np
import torch

V = TypeVar("V")
_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         torch.nn.Module, str, bytes, int, float, bool, type(None))


def buffer_bytes(root: Any, exclude: Iterable[Any] = ()) -> int:
    """Bytes of the numpy/torch buffers reachable from `root` (each buffer once), not through `exclude`."""
    seen: set[int] = {id(o) for o in exclude}
    buffers: set[tuple[int, int]] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        elif isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            key = (base.__array_interface__["data"][0], base.nbytes)
        else:
            if isinstance(obj, dict):
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                stack.extend(obj)
            else:
                stack.extend(getattr(obj, "__dict__", {}).values())
                for slot in getattr(type(obj), "__slots__", ()):
                    if hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
            continue
        if key not in buffers:
            buffers.add(key)
            total += key[1]
    return total


class ByteLRU(Generic[V]):
    """Least-recently-used entries whose measured sizes add up to at most `max_bytes`.

    An entry larger than the whole budget is not kept, and evicts nothing: the others stay. Sizes are
    re-measured with `remeasure` when an entry grows after it was stored (e.g. features gain a model cache
    on first use); one that outgrows the whole budget is dropped alone.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 1:
            raise ValueError(f"a cache budget must be positive, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._d: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def keys(self) -> list[Hashable]:
        return list(self._d)

    def get(self, key: Hashable) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: V) -> None:
        """Store `value` (replacing the key's old one), evicting the least recently used to make room; a value
        larger than the whole budget is not stored and evicts nothing."""
        self.pop(key)
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        self._d[key] = (value, size)
        self.nbytes += size
        self._shrink()

    def remeasure(self, key: Hashable) -> None:
        """Re-measure an entry that may have grown; one now larger than the whole budget is dropped alone."""
        hit = self._d.get(key)
        if hit is not None:
            size = self.size_of(hit[0])
            if size > self.max_bytes:
                self.pop(key)
                return
            self._d[key] = (hit[0], size)
            self.nbytes += size - hit[1]
            self._shrink()

    def pop(self, key: Hashable) -> V | None:
        hit = self._d.pop(key, None)
        if hit is None:
            return None
        self.nbytes -= hit[1]
        return hit[0]

    def _shrink(self) -> None:
        while self.nbytes > self.max_bytes and self._d:
            _, (_, size) = self._d.popitem(last=False)
            self.nbytes -= size
