"""Spread items over Ray actors and survive losing some: a worker that dies (its node lost, killed for
memory) hands its item to the workers left, so every item's result comes back exactly once.

`ray.util.ActorPool.map_unordered` raises at the first dead actor and forgets the items in flight; a bulk
job then stops although the rest of the cluster could finish it.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator

import ray

DEFAULT_ITEM_RETRIES = 3


def map_unordered_surviving(
    actors: list,
    submit: Callable[[Any, Any], "ray.ObjectRef"],
    items: Iterable,
    new_actor: Callable[[], Any],
    max_retries: int = DEFAULT_ITEM_RETRIES,
    on_lost: Callable[[Any, Exception], Any] | None = None,
) -> Iterator[Any]:
    """Yield `submit(actor, item)`'s result for every item, in completion order, one item per actor at a time.

    When an actor dies with an item, the item goes back to the queue (at most `max_retries` times) and the
    actor leaves the pool; a new one (`new_actor()`) is started only when none is left, since the cluster
    that lost a node may have no room for more. An item that kills its actor more often than that (an image
    that exhausts memory, crashes a native library) yields `on_lost(item, error)` in its place, so one bad
    item does not stop the others; without `on_lost` the actor's error is raised. A result is yielded once:
    an item is re-run only when its first run produced none."""
    queue = deque(enumerate(items))
    idle = list(actors)
    in_flight: dict = {}
    retries: Counter = Counter()
    while queue or in_flight:
        while idle and queue:
            actor = idle.pop()
            index, item = queue.popleft()
            in_flight[submit(actor, item)] = (actor, index, item)
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        actor, index, item = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            retries[index] += 1
            lost = retries[index] > max_retries
            if lost and on_lost is None:
                raise
            if not lost:
                queue.appendleft((index, item))
            if queue and not idle and not in_flight:
                idle.append(new_actor())
            if lost:
                yield on_lost(item, error)
            continue
        idle.append(actor)
        yield result
