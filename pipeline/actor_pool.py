"""Spread items over Ray actors and survive losing some: a worker that dies (its node lost, killed for
memory) hands its item to the workers left, so every item's result comes back exactly once.

`ray.util.ActorPool.map_unordered` raises at the first dead actor and forgets the items in flight; a bulk
job then stops although the rest of the cluster could finish it.

Two deaths are not a lost worker and are not retried: a worker whose constructor raised (a checkpoint missing
or changed on its node, a table it cannot open: every worker would fail the same way, and retrying each item
would load the model again and again before saying why) is a `WorkerStartError` naming the constructor's error;
and a pool left without a live worker while no node can hold a new one for `stall_timeout_s` (every worker node
lost) is a `ClusterStalled` instead of a wait without end.
"""
from __future__ import annotations

import sys
import time
from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator

import ray

from .stall import DEFAULT_STALL_TIMEOUT_S, WAIT_LINE_S, ClusterStalled, is_stalled, unplaceable_since

__all__ = ["DEFAULT_ITEM_RETRIES", "DEFAULT_STALL_TIMEOUT_S", "ClusterStalled", "WorkerStartError", "live_workers",
           "map_unordered_surviving", "start_failure"]

DEFAULT_ITEM_RETRIES = 3


class WorkerStartError(RuntimeError):
    """A worker's constructor raised: a configuration problem (exit 2), not a lost worker."""


def start_failure(error: BaseException) -> str | None:
    """The constructor's error (its last `Type: message` line) when `error` says an actor died in its
    creation task (its `__init__` raised), else None."""
    if not getattr(error, "actor_init_failed", False):
        return None
    lines = [ln.strip() for ln in str(getattr(error, "error_msg", "") or error).splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith(("File ", "ray::", "The actor"))),
                 lines[-1] if lines else type(error).__name__)
    return cause[:500]


def live_workers(actors: list, ping: Callable[[Any], "ray.ObjectRef"]) -> list:
    """The actors whose constructor finished (`ping` answered), in order; those whose node was lost meanwhile
    are dropped (the pool starts replacements when it needs them). A constructor that raised is a
    WorkerStartError."""
    alive = []
    for actor in actors:
        try:
            ray.get(ping(actor))
        except ray.exceptions.RayActorError as error:
            problem = start_failure(error)
            if problem is not None:
                raise WorkerStartError(f"a worker could not start: {problem}") from None
            continue
        alive.append(actor)
    return alive


def map_unordered_surviving(
    actors: list,
    submit: Callable[[Any, Any], "ray.ObjectRef"],
    items: Iterable,
    new_actor: Callable[[], Any],
    max_retries: int = DEFAULT_ITEM_RETRIES,
    on_lost: Callable[[Any, Exception], Any] | None = None,
    placeable: Callable[[], bool] | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
) -> Iterator[Any]:
    """Yield `submit(actor, item)`'s result for every item, in completion order, one item per actor at a time.

    When an actor dies with an item, the item goes back to the queue (at most `max_retries` times) and the
    actor leaves the pool; a new one (`new_actor()`) is started only when none is left, since the cluster
    that lost a node may have no room for more. An item that kills its actor more often than that (an image
    that exhausts memory, crashes a native library) yields `on_lost(item, error)` in its place, so one bad
    item does not stop the others; without `on_lost` the actor's error is raised. A result is yielded once:
    an item is re-run only when its first run produced none. An actor whose constructor raised is a
    WorkerStartError. While no result comes, a line says so every 30 s; when `placeable()` (whether a live node
    can hold a worker) stays False for `stall_timeout_s`, ClusterStalled ends the wait."""
    queue = deque(enumerate(items))
    idle = list(actors)
    in_flight: dict = {}
    retries: Counter = Counter()
    while queue or in_flight:
        while idle and queue:
            actor = idle.pop()
            index, item = queue.popleft()
            in_flight[submit(actor, item)] = (actor, index, item)
        ref = _next_done(list(in_flight), placeable, stall_timeout_s)
        actor, index, item = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            problem = start_failure(error)
            if problem is not None:
                raise WorkerStartError(f"a worker could not start: {problem}") from None
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


def _next_done(refs: list, placeable: Callable[[], bool] | None, stall_timeout_s: float) -> "ray.ObjectRef":
    """The first of `refs` to finish; a line every 30 s while none does, ClusterStalled when no live node could
    hold a worker for `stall_timeout_s`."""
    started = time.monotonic()
    since: float | None = None
    while True:
        done, _ = ray.wait(refs, num_returns=1, timeout=min(WAIT_LINE_S, stall_timeout_s))
        if done:
            return done[0]
        now = time.monotonic()
        since = unplaceable_since(since, started, now, placeable is None or placeable())
        if is_stalled(since, now, stall_timeout_s):
            raise ClusterStalled(f"no result for {now - started:.0f} s and no live node of the cluster could "
                                 f"hold a worker for {now - since:.0f} s (worker nodes lost?)")
        if since is not None:
            print(f"waiting for workers: no result for {now - started:.0f} s; no live node can hold a worker now "
                  f"(giving up after {stall_timeout_s:.0f} s of that)", file=sys.stderr, flush=True)
