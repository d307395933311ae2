"""CPU Ray actors that serve clicks, and the pool the HTTP server talks to.

- `N` serving actors (`SegmentActor`), each a `SegmentEngine`: the interact part of the model loaded
  once, the feature table opened once, a bounded LRU of features and the per-region sessions.
  Requests for one image always go to the same actor, so its features and sessions are warm there:
  rendezvous hashing on the image id (`route`), so a changed actor count moves only ~1/N of the images.
- one encoder actor (`EncoderActor`), an `OnDemandEncoder`, for images that have no features yet.
- An actor that dies is restarted by Ray (`max_restarts`) and the request is retried once; a
  restarted actor has lost its sessions, so the retry is a replay from the clicks (same mask).

Only RLE + score + timings come back from an actor, never feature tensors.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
import uuid
from collections import OrderedDict
from typing import Any, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from pipeline.placement import actors_that_fit, describe, largest_share

from .engine import EngineConfig, OnDemandEncoder, SegmentEngine
from .logs import get_logger, log_event, setup_logging
from .segment import EncodeFirst, SegmentError, SegmentRequest, SegmentResult

log = get_logger("actors")


def _weight(key: str, index: int) -> int:
    """A stable 64-bit pseudo-random weight of (key, actor index): the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(f"{index}\x00{key}".encode("utf-8"), digest_size=8).digest(), "big")


def rendezvous_ranking(key: str, n: int) -> list[int]:
    """Actor indices 0..n-1 ordered by rendezvous (highest-random-weight) hashing of `key`, best first.

    Each index's weight depends only on (key, index), so going from n to n+1 actors moves exactly the keys
    whose new actor n outranks all others (about 1/(n+1)), and going to n-1 moves only the keys of actor
    n-1; every other key keeps its actor, its cached features and its sessions.
    """
    if n < 1:
        raise ValueError(f"need at least one actor, got {n}")
    return sorted(range(n), key=lambda i: _weight(key, i), reverse=True)


def route(key: str, n: int) -> int:
    """The actor of `key` among n: its top rendezvous choice."""
    return rendezvous_ranking(key, n)[0]


def choose_actor(key: str, n: int, choices: int = 1, load: Sequence[Any] | None = None) -> int:
    """The actor for a new image: the least loaded (`load[i]`, any comparable) of its top `choices`
    rendezvous actors, ties to the better rank; `choices=1` or no `load` is `route(key, n)`."""
    ranked = rendezvous_ranking(key, n)[: max(1, min(choices, n))]
    if len(ranked) == 1 or load is None:
        return ranked[0]
    return min(ranked, key=lambda i: (load[i], ranked.index(i)))


class StickyRouter:
    """Image -> actor by rendezvous hashing on the image id, fixed at the image's first request.

    A new image goes to the least busy of its top `choices` rendezvous actors: fewest requests in flight
    (with `by_images`, then fewest images), ties to the better rank, so with idle actors it is exactly
    `route(key, n)`. bench/bench_routing.py measured the default, 2 choices by requests in flight: it
    moves as few images as pure rendezvous hashing when `--actors` changes (~1/(N+1) for N -> N+1) and
    cuts the queueing of pure hashing, where a few busy images can pile onto one actor, to near the old
    least-busy router's (which reshuffled 50-65 % of the images on a restart). `choices=1` is pure
    rendezvous hashing. Assignments are kept for the `capacity` most recently used images.
    """

    def __init__(self, n: int, capacity: int = 100_000, choices: int = 2, by_images: bool = False) -> None:
        if choices < 1:
            raise ValueError(f"choices must be at least 1, got {choices}")
        self.n = n
        self.capacity = capacity
        self.choices = min(choices, n)
        self.by_images = by_images
        self.inflight = [0] * n
        self.images = [0] * n
        self._assigned: OrderedDict[str, int] = OrderedDict()

    def pick(self, key: str) -> int:
        index = self._assigned.get(key)
        if index is None:
            load = None
            if self.choices > 1:
                load = [(self.inflight[i], self.images[i] if self.by_images else 0) for i in range(self.n)]
            index = choose_actor(key, self.n, self.choices, load)
            self._assigned[key] = index
            self.images[index] += 1
            if len(self._assigned) > self.capacity:
                _, old = self._assigned.popitem(last=False)
                self.images[old] -= 1
        else:
            self._assigned.move_to_end(key)
        return index


def _unwrap(e: RayTaskError) -> BaseException:
    """The exception an actor method raised, without Ray's wrapper (so SegmentError keeps its status)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _logged_error(status: int, what: str, e: BaseException, **fields) -> SegmentError:
    """Log a Ray failure in full under a fresh error id; the client gets `what` and that id only.

    Ray's text names the worker's pid, node IP, actor id and namespace, and for a failed actor creation a
    traceback with server paths: for the operator's log, never for an HTTP body."""
    error_id = uuid.uuid4().hex[:12]
    log_event(log, what, level=40, error_id=error_id, error=f"{type(e).__name__}: {e}"[:4000], **fields)
    return SegmentError(status, f"{what}; the backend's log has the details (error id {error_id})")


class _EncoderActor:
    def __init__(self, cfg: EngineConfig, log_level: str) -> None:
        setup_logging(log_level)
        self.encoder = OnDemandEncoder(cfg)

    def encode(self, image_id: str, image_ref: str, task_id: int | None) -> dict:
        return self.encoder.encode(image_id, image_ref, task_id)

    def ping(self) -> int:
        return os.getpid()


def _unnice() -> int:
    """Run this worker at niceness 0 if allowed (Ray starts workers at 15); returns the niceness in effect."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except (PermissionError, OSError):
            break
    return os.getpriority(os.PRIO_PROCESS, 0)


def _ask_the_caller_to_encode(image_id: str, image_ref: str, task_id: int | None) -> dict:
    """A serving actor never waits for an encode (seconds, or a slow image host's timeout): every annotator
    routed to it would wait too. It hands the image back to the pool, which has the encoder actor store it."""
    raise EncodeFirst(image_id, image_ref, task_id)


class _SegmentActor:
    def __init__(self, index: int, cfg: EngineConfig, encode_on_demand: bool, log_level: str) -> None:
        setup_logging(log_level)
        niceness = _unnice()
        if niceness > 0:
            log_event(log, "serving actor runs at a lowered priority", level=30, actor=index, niceness=niceness)
        self.index = index
        self.engine = SegmentEngine(cfg, _ask_the_caller_to_encode if encode_on_demand else None)

    def segment(self, req: SegmentRequest) -> SegmentResult:
        return dataclasses.replace(self.engine.segment(req), actor=self.index)

    def ping(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this incarnation runs on (it moves when its node dies)."""
        return ray.get_runtime_context().get_node_id()


def default_actor_cpus(count: int, node_cpus: Sequence[float]) -> float:
    """The largest CPU share (in thousandths) with which `count` actors all fit on the nodes: on one node its
    CPUs / count; on several, a size each node holds a whole number of (pipeline.placement.largest_share)."""
    return largest_share(count, [{"CPU": c} for c in node_cpus]) or 0.001


def placement_problem(count: int, actor_cpus: float, node_cpus: Sequence[float]) -> str | None:
    """Why `count` actors of `actor_cpus` CPUs each can never all start on nodes of `node_cpus` CPUs (the last
    ones would wait for resources forever), or None when they fit."""
    nodes = [{"CPU": c} for c in node_cpus]
    fit = actors_that_fit(nodes, actor_cpus)
    if fit >= count:
        return None
    return (f"--actor-cpus {actor_cpus:g}: the backend needs {count} actors (--actors, plus one encoder unless "
            f"--no-encode-on-demand) and the cluster's nodes ({describe(nodes)}) hold {fit} of that size; "
            "lower --actor-cpus or --actors, or add nodes")


RECREATE_WINDOW_S = 3600.0  # an actor created anew more than max_restarts + 1 times within this is a crash loop
ENCODER = -1  # the encoder actor's slot; serving actors' slots are their indices

SegmentActor = ray.remote(_SegmentActor)
EncoderActor = ray.remote(_EncoderActor)


class ActorPool:
    """The `Segmenter` of the server: N serving actors + 1 encoder actor on a (local or remote) Ray."""

    def __init__(self, cfg: EngineConfig, num_actors: int = 2, actor_cpus: float = 0.5,
                 encode_on_demand: bool = True, max_restarts: int = 3, log_level: str = "info",
                 restart_timeout_s: float = 120.0) -> None:
        if num_actors < 1:
            raise ValueError(f"need at least one serving actor, got {num_actors}")
        self.cfg = cfg
        self.num_actors = num_actors
        self.max_restarts = max_restarts
        self.restart_timeout_s = restart_timeout_s
        # Idle OpenMP threads sleep instead of spinning: spinning threads of several actors (and other
        # processes) on a few cores turn a 100 ms click step into seconds.
        opts = dict(num_cpus=actor_cpus, max_restarts=max_restarts, max_task_retries=0,
                    runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        self._opts, self._log_level = opts, log_level
        self.encoder = self._new_actor(ENCODER) if encode_on_demand else None
        self.actors = [self._new_actor(i) for i in range(num_actors)]
        self.router = StickyRouter(num_actors)
        self.retries = 0  # requests retried because their actor died (each at most once)
        self.recreated = 0  # actors created anew after Ray's restarts of one were used up
        self._ready = False
        self._dead: set[int] = set()  # slots whose actor is dead for good and not (yet) replaced
        self._replacing: dict[int, asyncio.Lock] = {}
        self._recreations: dict[int, list[float]] = {}

    def _new_actor(self, slot: int) -> Any:
        if slot == ENCODER:
            return EncoderActor.options(**self._opts).remote(self.cfg, self._log_level)
        return SegmentActor.options(**self._opts).remote(slot, self.cfg, self.encoder is not None, self._log_level)

    def _actor(self, slot: int) -> Any:
        return self.encoder if slot == ENCODER else self.actors[slot]

    @staticmethod
    def _name(slot: int) -> str:
        return "the encoder actor" if slot == ENCODER else f"serving actor {slot}"

    def ready(self) -> bool:
        """Every serving actor has started and none is dead for good (the server's /health; images with features
        are served whatever the encoder actor's state)."""
        return self._ready and not (self._dead - {ENCODER})

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Block until every actor has loaded its model and opened the table; raises on failure."""
        t0 = time.perf_counter()
        handles = self.actors + ([self.encoder] if self.encoder is not None else [])
        try:
            pids = ray.get([h.ping.remote() for h in handles], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"serving actors did not start within {timeout_s:.0f} s: not enough free CPUs in the Ray "
                f"cluster for {len(handles)} actors, or a slow model load"
            ) from None
        except (RayActorError, RayTaskError) as e:
            raise RuntimeError(f"a serving actor failed to start: {e}") from None
        self._ready = True
        info = {"actors": self.num_actors, "pids": pids, "startup_s": round(time.perf_counter() - t0, 2)}
        log_event(log, "actors ready", **info)
        return info

    async def segment(self, req: SegmentRequest) -> SegmentResult:
        """Run on the image's actor; if that actor died, retry once on its restarted incarnation."""
        index = self.router.pick(req.route_key)
        self.router.inflight[index] += 1
        try:
            return await self._segment_on(index, req)
        finally:
            self.router.inflight[index] -= 1

    async def _segment_on(self, index: int, req: SegmentRequest) -> SegmentResult:
        encode_ms = None
        attempt = 1
        while True:
            try:
                result = await self.actors[index].segment.remote(req)  # the actor at index may have been replaced
                self._dead.discard(index)
                if encode_ms is None:
                    return result
                return dataclasses.replace(result, encoded_on_demand=True,
                                           timings_ms={**result.timings_ms, "encode": encode_ms})
            except RayTaskError as e:
                cause = _unwrap(e)
                if isinstance(cause, EncodeFirst) and encode_ms is None:
                    encode_ms = await self._encode(cause)
                    continue
                if isinstance(cause, EncodeFirst):
                    raise SegmentError(500, "the image was encoded but its features cannot be read back") from None
                if isinstance(cause, SegmentError):
                    raise cause from None
                raise _logged_error(500, f"serving actor {index} failed", cause, actor=index) from None
            except RayActorError as e:
                if attempt == 2:
                    raise _logged_error(503, f"serving actor {index} failed twice for this request", e,
                                        actor=index) from None
                log_event(log, "actor died, retrying once", level=30, actor=index, error=str(e)[:300])
                self.retries += 1
                attempt = 2
                await self._until_alive(index)

    async def _encode(self, ask: EncodeFirst) -> float:
        """Store the image's features through the encoder actor (the serving actors go on meanwhile); the ms.
        An encoder actor that died (its node lost, killed for memory) is waited for while Ray restarts it, or
        created anew, as a serving actor is, and the image is encoded once more: storing features is
        idempotent."""
        log_event(log, "encoding on demand", image_id=ask.image_id, image_ref=ask.image_ref, task=ask.task_id)
        t0 = time.perf_counter()
        attempt = 1
        while True:
            try:
                info = await self.encoder.encode.remote(ask.image_id, ask.image_ref, ask.task_id)
                self._dead.discard(ENCODER)
                break
            except RayTaskError as e:
                cause = _unwrap(e)
                if isinstance(cause, SegmentError):
                    raise cause from None
                raise _logged_error(502, "the task's image could not be encoded on demand", cause,
                                    image_id=ask.image_id) from None
            except RayActorError as e:
                if attempt == 2:
                    raise _logged_error(503, "the encoder actor failed twice for this request", e) from None
                log_event(log, "encoder actor died, retrying once", level=30, error=str(e)[:300])
                self.retries += 1
                attempt = 2
                await self._until_alive(ENCODER)
        ms = (time.perf_counter() - t0) * 1e3
        log_event(log, "encoded on demand", image_id=ask.image_id, encode_ms=round(ms, 1), **info)
        return ms

    async def _until_alive(self, slot: int) -> None:
        """Wait (bounded) while Ray restarts the actor of `slot`: calls meanwhile fail as 'unavailable'."""
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                await asyncio.wait_for(self._actor(slot).ping.remote(), max(0.1, deadline - time.monotonic()))
                return
            except (ActorUnavailableError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise SegmentError(503, f"{self._name(slot)} did not come back within "
                                            f"{self.restart_timeout_s:.0f} s") from None
                await asyncio.sleep(0.1)
            except RayActorError as e:  # died for good (Ray's restarts used up): a new actor takes its place
                await self._replace(slot, e)

    async def _replace(self, slot: int, error: Exception) -> None:
        """Create a new actor for `slot` after Ray's `max_restarts` of the old one were used up (a long-lived
        backend loses nodes now and then), unless it already was `max_restarts + 1` times in the last hour (a
        crash loop: then 503, and for a serving actor /health says not ready). Concurrent callers create one."""
        dead = self._actor(slot)
        async with self._replacing.setdefault(slot, asyncio.Lock()):
            if self._actor(slot) is not dead:  # another request replaced it meanwhile
                return
            now = time.monotonic()
            recent = [t for t in self._recreations.get(slot, []) if now - t < RECREATE_WINDOW_S]
            if len(recent) > self.max_restarts:
                self._dead.add(slot)
                raise _logged_error(503, f"{self._name(slot)} is dead and kept dying after being created anew "
                                         f"{len(recent)} times within an hour", error, actor=slot)
            self._dead.add(slot)
            log_event(log, f"{self._name(slot)} dead for good: creating a new one", level=30, actor=slot,
                      error=str(error)[:300])
            self._recreations[slot] = [*recent, now]
            if slot == ENCODER:
                self.encoder = self._new_actor(slot)
            else:
                self.actors[slot] = self._new_actor(slot)
            self.recreated += 1
        await self._until_alive(slot)
        self._dead.discard(slot)

    def shutdown(self) -> None:
        """Kill the actors (no restart)."""
        for h in self.actors + ([self.encoder] if self.encoder is not None else []):
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # already gone
                pass
        self._ready = False
