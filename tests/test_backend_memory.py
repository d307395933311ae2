"""Byte accounting of a serving actor's caches (connectors/memory.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.memory import ByteLRU, buffer_bytes


@dataclass
class _Holder:
    arrays: list
    tensor: torch.Tensor
    extra: dict


def test_buffers_are_counted_once_however_they_are_reached():
    a = np.zeros((100, 10), dtype=np.float32)  # 4000 bytes
    t = torch.zeros(250, dtype=torch.float64)  # 2000 bytes
    h = _Holder([a, a[:10], a.T], t, {"again": t[5:], "nested": [[a]], "model": torch.nn.Linear(1000, 1000)})
    assert buffer_bytes(h) == 6000  # views and repeats share the buffer; modules are not state
    assert buffer_bytes(h, exclude=[t]) == 6000  # t is still reached through its view in `extra`
    assert buffer_bytes([h, h]) == 6000 and buffer_bytes({"x": 1, "y": "s"}) == 0


def test_the_lru_keeps_recent_entries_within_its_byte_budget():
    lru: ByteLRU[np.ndarray] = ByteLRU(10_000, buffer_bytes)
    for i in range(5):
        lru.put(i, np.zeros(3000, dtype=np.uint8))
        assert lru.nbytes <= 10_000
    assert lru.keys() == [2, 3, 4]
    lru.get(2)
    lru.put(5, np.zeros(3000, dtype=np.uint8))
    assert lru.keys() == [4, 2, 5]  # 3 was the least recently used
    box = {"g": np.zeros(1000, dtype=np.uint8)}
    lru.put("g", box)
    assert lru.keys() == [4, 2, 5, "g"] and lru.nbytes == 10_000
    box["more"] = np.zeros(6000, dtype=np.uint8)  # the entry gains a buffer after it was stored
    lru.remeasure("g")
    assert lru.keys() == [5, "g"] and lru.nbytes == 10_000
    lru.put("huge", np.zeros(20_000, dtype=np.uint8))  # larger than the budget: not kept
    assert "huge" not in lru and lru.nbytes <= 10_000
    with pytest.raises(ValueError):
        ByteLRU(0, buffer_bytes)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.lists(st.tuples(st.sampled_from(["put", "grow", "get"]), st.integers(0, 5),
                                               st.integers(0, 300)), max_size=40))
def test_an_entry_over_the_whole_budget_is_never_kept_and_never_evicts_the_others(budget, ops):
    """Against a model LRU: an oversized put or remeasure leaves every other entry in place."""
    sizes: dict[int, int] = {}
    lru: ByteLRU[int] = ByteLRU(budget, lambda key: sizes[key])
    model: list[int] = []  # keys, least recently used first
    for op, key, size in ops:
        if op == "get":
            if lru.get(key) is not None:
                model.remove(key)
                model.append(key)
            continue
        if op == "grow" and key not in model:
            continue
        sizes[key] = size
        if op == "put":
            lru.put(key, key)
            model = [k for k in model if k != key] + ([key] if size <= budget else [])
        else:
            lru.remeasure(key)
            if size > budget:
                model.remove(key)
        while sum(sizes[k] for k in model) > budget:
            model.pop(0)
        assert lru.keys() == model and lru.nbytes == sum(sizes[k] for k in model) <= budget


def test_the_auditors_case_an_oversized_put_keeps_the_four_entries():
    lru: ByteLRU[int] = ByteLRU(100, lambda v: v)
    for key in "abcd":
        lru.put(key, 20)
    lru.put("huge", 101)
    assert lru.keys() == list("abcd") and lru.nbytes == 80
