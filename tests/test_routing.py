"""Routing images to serving actors (connectors/actors.py): rendezvous hashing + in-flight tie-break."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.actors import StickyRouter, choose_actor, rendezvous_ranking, route

IDS = [f"image-{i:05d}" for i in range(20_000)]


def test_route_is_stable_and_spreads_images():
    assert route("img-0", 4) == route("img-0", 4)
    counts = [0] * 4
    for key in IDS[:4000]:
        counts[route(key, 4)] += 1
    assert min(counts) > 900  # ~1000 each
    with pytest.raises(ValueError):
        route("img", 0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_adding_an_actor_moves_about_one_in_n_plus_one_images_all_to_the_new_actor(n):
    before = {k: route(k, n) for k in IDS}
    after = {k: route(k, n + 1) for k in IDS}
    moved = [k for k in IDS if before[k] != after[k]]
    assert all(after[k] == n for k in moved)  # nothing shuffles between the old actors
    assert abs(len(moved) / len(IDS) - 1 / (n + 1)) < 0.015


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_removing_an_actor_moves_only_its_images(n):
    before = {k: route(k, n) for k in IDS}
    moved = [k for k in IDS if route(k, n - 1) != before[k]]
    assert all(before[k] == n - 1 for k in moved)
    assert abs(len(moved) / len(IDS) - 1 / n) < 0.015


@given(st.text(max_size=40), st.integers(1, 40))
def test_ranking_is_a_permutation_and_extends_consistently(key, n):
    ranked = rendezvous_ranking(key, n)
    assert sorted(ranked) == list(range(n)) and ranked[0] == route(key, n)
    grown = rendezvous_ranking(key, n + 1)
    assert [i for i in grown if i != n] == ranked  # a new actor slots in; the others keep their order


@pytest.mark.parametrize("n", [2, 4, 8])
def test_changing_actors_between_restarts_keeps_most_images_on_their_actor_index(n):
    rng = random.Random(n)
    placed = []
    for count in (n, n + 1):  # a server restart with --actors n, then n + 1: fresh routers
        router = StickyRouter(count)
        order = IDS[:5000]
        rng.shuffle(order)
        placed.append({k: router.pick(k) for k in order})
    moved = sum(placed[0][k] != placed[1][k] for k in IDS[:5000]) / 5000
    assert moved < 1 / (n + 1) + 0.03


def test_in_flight_tie_break_prefers_the_idle_second_choice_and_stays_sticky():
    key = "busy-image"
    first, second = rendezvous_ranking(key, 3)[:2]
    router = StickyRouter(3)
    router.inflight[first] = 2
    assert router.pick(key) == second
    router.inflight = [0, 0, 0]
    assert router.pick(key) == second  # sticky: the image's sessions live there now
    idle = StickyRouter(3)
    assert all(idle.pick(k) == route(k, 3) for k in IDS[:200])  # idle actors: pure rendezvous
    pure = StickyRouter(3, choices=1)
    pure.inflight[route(key, 3)] = 9
    assert pure.pick(key) == route(key, 3)


def test_choose_actor_is_a_pure_function_of_key_and_load():
    key = "k"
    ranked = rendezvous_ranking(key, 4)
    load = [0, 0, 0, 0]
    assert choose_actor(key, 4, 2, load) == ranked[0] == choose_actor(key, 4)
    load[ranked[0]] = 1
    assert choose_actor(key, 4, 2, load) == ranked[1]
    assert choose_actor(key, 4, 1, load) == ranked[0]
    load[ranked[1]] = 1
    assert choose_actor(key, 4, 2, load) == ranked[0]  # equal load: the better rank
    assert choose_actor(key, 4, 4, load) in ranked[2:]


def test_router_forgets_least_recently_used_images_beyond_capacity():
    small = StickyRouter(2, capacity=2)
    for key in ("a", "b", "c"):
        small.pick(key)
    assert sum(small.images) == 2 and "a" not in small._assigned
    with pytest.raises(ValueError):
        StickyRouter(2, choices=0)
