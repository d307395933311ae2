"""Routing images to serving actors: rendezvous hashing vs least-busy stickiness (issue 12, item 4).

Two measurements, both deterministic (seeded), no Ray and no model: the routing functions of
connectors/actors.py are pure.

1. Resize: the fraction of images whose actor changes when `--actors` goes N -> N+1 and N -> N-1 across a
   restart (a fresh router). Rendezvous hashing moves ~1/(N+1) resp. ~1/N; a router whose choice depends
   on load order reshuffles most images, each then a cold feature fetch on its new actor.
2. Queueing: a closed-loop simulation of annotators, each labelling a stream of images (`--clicks` per
   image, exponential think time between clicks), on N FIFO actors with a per-click service time of 1
   and a cold fetch (`--cold` units) on an image's first request to an actor. Reported: mean and p95
   response time in service-time units, per policy, and the share of images placed on their top
   rendezvous actor (those stay put across a restart).

    python bench/bench_routing.py --actors 2 4 --annotators 2 4 8
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.actors import StickyRouter, route  # noqa: E402

# (choices: None = all actors, tie-break by image count as well as requests in flight)
POLICIES = {"rendezvous": (1, False), "rendezvous-2": (2, False), "rendezvous-2-img": (2, True),
            "least-busy": (None, True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, nargs="+", default=[2, 4, 8], help="actor counts N")
    p.add_argument("--annotators", type=int, nargs="+", default=[2, 4, 8, 16], help="concurrent annotators")
    p.add_argument("--images", type=int, default=10_000, help="image ids for the resize measurement")
    p.add_argument("--clicks", type=int, default=6, help="clicks per image in the simulation")
    p.add_argument("--think", type=float, default=3.0, help="mean think time between clicks (service units)")
    p.add_argument("--cold", type=float, default=3.0, help="extra service on an image's first request to an actor")
    p.add_argument("--requests", type=int, default=4000, help="clicks per annotator simulated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def _router(policy: str, n: int) -> StickyRouter:
    choices, by_images = POLICIES[policy]
    return StickyRouter(n, choices=n if choices is None else choices, by_images=by_images)


def moved_fraction(policy: str, n_before: int, n_after: int, n_images: int, seed: int) -> float:
    """Images on another actor index after a restart with n_after instead of n_before actors."""
    rng = random.Random(seed)
    ids = [f"image-{i}" for i in range(n_images)]
    placed = []
    for n in (n_before, n_after):
        router = _router(policy, n)
        order = ids[:]
        rng.shuffle(order)  # the order images are first requested after each start
        placed.append({k: router.pick(k) for k in order})
    return sum(placed[0][k] != placed[1][k] for k in ids) / n_images


def simulate(policy: str, n: int, annotators: int, args: argparse.Namespace) -> dict[str, float]:
    """Closed loop: each annotator clicks, waits for the answer, thinks, clicks; a new image every `clicks`."""
    rng = random.Random(args.seed)
    router = _router(policy, n)
    free_at = [0.0] * n
    warm: list[set[str]] = [set() for _ in range(n)]
    events = [(rng.expovariate(1 / args.think), a, 0) for a in range(annotators)]
    heapq.heapify(events)
    responses: list[float] = []
    inflight_until: list[list[float]] = [[] for _ in range(n)]
    while events:
        t, a, k = heapq.heappop(events)
        if k >= args.requests:
            continue
        image = f"ann{a}-img{k // args.clicks}"
        for i in range(n):  # requests still queued or running at time t
            inflight_until[i] = [u for u in inflight_until[i] if u > t]
            router.inflight[i] = len(inflight_until[i])
        i = router.pick(image)
        service = 1.0 + (args.cold if image not in warm[i] else 0.0)
        warm[i].add(image)
        done = max(t, free_at[i]) + service
        free_at[i] = done
        inflight_until[i].append(done)
        responses.append(done - t)
        heapq.heappush(events, (done + rng.expovariate(1 / args.think), a, k + 1))
    responses.sort()
    on_top = sum(i == route(k, n) for k, i in router._assigned.items()) / max(1, len(router._assigned))
    return {"mean": sum(responses) / len(responses), "p95": responses[int(0.95 * (len(responses) - 1))],
            "on_top": on_top}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict = {"resize": [], "queueing": []}
    print("moved fraction after a restart with another actor count (lower is better)")
    print(f"{'policy':<14}" + "".join(f"{f'{n}->{n + 1}':>9}{f'{n}->{n - 1}':>9}" for n in args.actors))
    for policy in POLICIES:
        row = []
        for n in args.actors:
            up = moved_fraction(policy, n, n + 1, args.images, args.seed)
            down = moved_fraction(policy, n, n - 1, args.images, args.seed) if n > 1 else 0.0
            out["resize"].append({"policy": policy, "n": n, "up": up, "down": down})
            row.append(f"{up:>9.3f}{down:>9.3f}")
        print(f"{policy:<14}" + "".join(row))
    print(f"\nmean / p95 response time in service units (think {args.think}, cold fetch {args.cold}, "
          f"{args.clicks} clicks per image); (share of images on their top rendezvous actor)")
    for n in args.actors:
        for annotators in args.annotators:
            cells = []
            for policy in POLICIES:
                r = simulate(policy, n, annotators, args)
                out["queueing"].append({"policy": policy, "n": n, "annotators": annotators, **r})
                cells.append(f"{policy} {r['mean']:.2f}/{r['p95']:.2f} ({r['on_top']:.0%})")
            print(f"N={n} annotators={annotators:<3} " + "   ".join(cells))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
