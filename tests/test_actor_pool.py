"""The worker pool of pre-annotation and evaluation (pipeline/actor_pool.py) on a real local Ray: a worker whose
constructor raises is one clear error naming the cause, at once, not a "worker died" retried on every item
(each retry loading the model again); workers lost during start-up are dropped and the others go on; and a pool
with no worker while no node can hold one stops after the stall timeout instead of waiting forever."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from pipeline.actor_pool import ClusterStalled, WorkerStartError, live_workers, map_unordered_surviving


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.1, max_restarts=0)
class Worker:
    def __init__(self, starts: str, fail: bool = False) -> None:
        with open(starts, "a") as f:
            f.write("x")
        if fail:
            raise ValueError("checkpoint /models/a.pth changed after the run started")

    def ping(self) -> int:
        return 1

    def run(self, item: float) -> float:
        time.sleep(item)
        return item


def test_a_constructor_error_is_one_clear_error_without_retrying_every_item(tmp_path):
    starts = tmp_path / "starts"
    workers = [Worker.remote(str(starts), True) for _ in range(2)]
    with pytest.raises(WorkerStartError, match="checkpoint /models/a.pth changed after the run started"):
        list(map_unordered_surviving(workers, lambda a, x: a.run.remote(x), [0.0] * 8,
                                     lambda: Worker.remote(str(starts), True), on_lost=lambda item, e: "lost"))
    assert len(starts.read_text()) <= 3  # the two workers (and at most one replacement), not 8 items x 4 tries


def test_start_up_drops_workers_lost_meanwhile_and_names_a_constructor_error(tmp_path):
    starts = str(tmp_path / "starts")
    good, gone = Worker.remote(starts), Worker.remote(starts)
    ray.kill(gone)  # as a node lost while the model loads
    assert live_workers([good, gone], lambda a: a.ping.remote()) == [good]
    with pytest.raises(WorkerStartError, match="changed after the run started"):
        live_workers([good, Worker.remote(starts, True)], lambda a: a.ping.remote())


def test_no_placeable_worker_for_the_stall_timeout_stops_the_wait(tmp_path):
    slow = Worker.remote(str(tmp_path / "starts"))
    t0 = time.monotonic()
    with pytest.raises(ClusterStalled, match="no live node of the cluster could hold a worker"):
        list(map_unordered_surviving([slow], lambda a, x: a.run.remote(x), [60.0], lambda: None,
                                     placeable=lambda: False, stall_timeout_s=1.0))
    assert time.monotonic() - t0 < 30
    ray.kill(slow)


def test_a_slow_item_is_waited_for_while_a_worker_can_be_placed(tmp_path):
    worker = Worker.remote(str(tmp_path / "starts"))
    assert list(map_unordered_surviving([worker], lambda a, x: a.run.remote(x), [3.0], lambda: None,
                                        placeable=lambda: True, stall_timeout_s=0.5)) == [3.0]


def test_a_pool_is_never_larger_than_the_live_nodes_hold():
    from pipeline.placement import pool_size

    nodes = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0}]
    assert pool_size(None, nodes, 1.0) == 6
    assert pool_size(9, nodes, 1.0) == 6  # the rest would be queued by Ray without end, their items with them
    assert pool_size(9, nodes, 1.5) == 2  # 4.5 CPUs in all but one node of 4 holds two
    assert pool_size(2, nodes, 1.0, items=1) == 1
    assert pool_size(None, nodes, 8.0) == 0
    assert pool_size(None, [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 8.0}], 1.0, gpus=1.0) == 1
