"""Whether actors and tasks of a given size can be placed on a Ray cluster's nodes, from their resources alone.

Ray places an actor or task whole on one node and queues one that no live node can hold, without an error and
without a deadline: a pool sized from the cluster's TOTAL resources (3 nodes of 1 CPU = "3 CPUs") can ask for
an actor of 2 CPUs that nothing will ever run. These pure functions size pools from the per-node resources
(`ray.nodes()`' `Resources` of the live nodes) so that the jobs refuse such a plan, or pick one that fits,
before anything starts. Shared by the encode job's pool plan and the backend's serving actors.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

Node = Mapping[str, float]  # a live node's resources: "CPU", "GPU", "memory" (bytes), ...
_EPS = 1e-9


def fits_on(node: Node, cpus: float, gpus: float = 0.0, memory: float = 0.0) -> int:
    """How many (cpus, gpus, memory) units one node holds at once (a node that reports no "memory" resource is
    not limited by it)."""
    counts = [int(node.get(name, 0.0) / need + _EPS) for name, need in (("CPU", cpus), ("GPU", gpus),
                                                                         ("memory", memory))
              if need > 0 and (name != "memory" or name in node)]
    return min(counts) if counts else 0


def actors_that_fit(nodes: Sequence[Node], cpus: float, gpus: float = 0.0) -> int:
    """How many actors of (cpus, gpus) the nodes hold at once."""
    return sum(fits_on(node, cpus, gpus) for node in nodes)


def pool_size(requested: int | None, nodes: Sequence[Node], cpus: float, gpus: float = 0.0,
              items: int | None = None) -> int:
    """How many workers of (cpus, gpus) to start: `requested` (None: as many as the nodes hold), at most as many
    as the live nodes hold at once and at most `items`; 0 when no node holds one. A worker beyond what the nodes
    hold is queued by Ray without end, and the items handed to it would wait with it."""
    n = actors_that_fit(nodes, cpus, gpus)
    if requested is not None:
        n = min(n, requested)
    return max(0, min(n, items) if items is not None else n)


def largest_share(count: int, nodes: Sequence[Node], cap: float | None = None) -> float | None:
    """The largest CPU share (in thousandths, at most `cap`) with which `count` CPU actors all fit on the nodes
    (a size each node holds a whole number of: an even split of the total can fit nowhere on small nodes), or
    None when not even a thousandth of a CPU each fits."""
    node_cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    candidates = {math.floor(c / k * 1000) / 1000 for c in node_cpus if c > 0 for k in range(1, count + 1)}
    if cap is not None:
        candidates = {min(c, math.floor(cap * 1000) / 1000) for c in candidates}
    return next((c for c in sorted(candidates, reverse=True) if c > 0 and actors_that_fit(nodes, c) >= count), None)


def worst_room(nodes: Sequence[Node], count: int, cpus: float, gpus: float = 0.0, memory: float = 0.0) -> float:
    """The CPUs a task needing `memory` is sure to find free on some node while `count` actors of (cpus, gpus) run,
    wherever Ray placed them: the largest CPU room left on a node that holds the memory, under the placement that
    makes it smallest (Ray may fill every node partly, e.g. 2 actors of 1.5 CPUs on 2 nodes of 2 leave 0.5 each
    although 1 CPU is free in total). Greedy is that placement: each actor goes where the most room is left."""
    holds = [memory <= 0 or "memory" not in n or float(n["memory"]) + _EPS >= memory for n in nodes]
    rooms = [float(n.get("CPU", 0.0)) if ok else 0.0 for n, ok in zip(nodes, holds)]
    spare = [fits_on(n, cpus, gpus) if ok else 0 for n, ok in zip(nodes, holds)]
    for _ in range(count):
        open_ = [i for i in range(len(nodes)) if spare[i] > 0]
        if not open_:
            break
        i = max(open_, key=lambda j: rooms[j])
        rooms[i] -= cpus
        spare[i] -= 1
    return max([r for r, ok in zip(rooms, holds) if ok], default=0.0)


def describe(nodes: Sequence[Node]) -> str:
    """The nodes' CPUs (and GPUs where any), for messages: 'CPUs per node: 1, 1, 1'."""
    cpus = ", ".join(f"{float(n.get('CPU', 0.0)):g}" for n in nodes) or "none"
    gpus = [float(n.get("GPU", 0.0)) for n in nodes]
    return f"CPUs per node: {cpus}" + (f"; GPUs per node: {', '.join(f'{g:g}' for g in gpus)}" if any(gpus) else "")
