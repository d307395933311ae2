"""A serving actor whose Ray node dies is restarted on another node, and the request that met the dead
actor is retried once. Runs a three-node Ray cluster on this machine (ray.cluster_utils.Cluster): a
head without CPUs and two worker nodes, so actors live on workers; the node hosting the actor is
killed (raylet and workers, no graceful drain) as soon as that actor has answered a first click. The
next click is answered by the restarted actor on the surviving node with at most one retry."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray
from backend_support import encode_into_store, grabcut_images, make_checkpoint, pixel, reference_mask
from ray.cluster_utils import Cluster

from connectors.actors import ActorPool
from connectors.engine import EngineConfig
from connectors.rle import rle_to_mask
from connectors.segment import SegmentRequest

SIZE = (64, 96)
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ray.is_initialized():
        pytest.fail("this module needs its own Ray cluster; another test left Ray initialised")
    tmp = tmp_path_factory.mktemp("nodes")
    ckpt = make_checkpoint(tmp / "small.pth")
    images = grabcut_images(1, SIZE)
    encode_into_store(ckpt, tmp / "db", "features", [("img-0", "a", images[0][1])])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "_system_config": FAST_FAILURE_DETECTION})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield {"cluster": c, "workers": workers, "tmp": tmp, "ckpt": ckpt}
    finally:
        ray.shutdown()
        c.shutdown()


def _until_dead(node_id: str, limit_s: float = 180.0) -> None:
    """Wait for Ray to declare the node dead (health checks every 0.5 s), within a generous bound."""
    deadline = time.monotonic() + limit_s
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "Ray did not notice the killed node"
        time.sleep(0.2)


def test_an_actor_on_a_killed_node_comes_back_elsewhere_with_one_retry(cluster):
    tmp, ckpt = cluster["tmp"], cluster["ckpt"]
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small", threads=1)
    pool = ActorPool(cfg, num_actors=1, actor_cpus=1, encode_on_demand=False, max_restarts=2,
                     restart_timeout_s=300)
    try:
        pool.wait_ready(timeout_s=300)
        clicks = (pixel(50, 50, SIZE), pixel(20, 30, SIZE, False))
        first = asyncio.run(pool.segment(SegmentRequest(clicks=clicks[:1], original_size=SIZE, image_id="img-0",
                                                        region_key="r")))
        assert first.path == "replay"
        home = ray.get(pool.actors[0].node_id.remote())
        victim = next(n for n in cluster["workers"] if n.node_id == home)
        survivor = next(n for n in cluster["workers"] if n.node_id != home)

        cluster["cluster"].remove_node(victim, allow_graceful=False)  # the event: the actor has served a click
        _until_dead(home)

        res = asyncio.run(pool.segment(SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-0",
                                                      region_key="r")))
        # Whether the request meets the dead incarnation (one retry) or is queued by Ray for the restarting
        # actor (none) depends on when Ray notices the node's death; either way no request is retried twice.
        assert pool.retries <= 1
        assert res.path == "replay"  # the new incarnation lost the session and rebuilt it from the clicks
        assert ray.get(pool.actors[0].node_id.remote()) == survivor.node_id
        expected = reference_mask(ckpt, tmp / "db", "features", "img-0", list(clicks))
        np.testing.assert_array_equal(rle_to_mask(res.rle, *SIZE), expected)
        again = asyncio.run(pool.segment(SegmentRequest(clicks=clicks, original_size=SIZE, image_id="img-0",
                                                        region_key="r")))
        assert again.path == "cached" and pool.retries <= 1
    finally:
        pool.shutdown()
