"""A multi-node Ray cluster on this one machine (ray.cluster_utils.Cluster: a head and worker raylets, each its
own node with its own CPUs), and the helpers to kill a worker node on an event: the node that runs a given
process, found through the process tree."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ray.cluster_utils import Cluster

# A driver started with `--address 127.0.0.1:PORT` would swap 127.0.0.1 for the machine's own address (Ray's
# resolve_ip_for_localhost), where a cluster bound to loopback does not listen; this keeps it on loopback.
LOOPBACK_DRIVER = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# For start_cluster's env: the GCS declares a killed node dead after ~3 s (3 failed checks 1 s apart; a refused
# connection fails at once) instead of ~15 s.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def start_cluster(workers: int, cpus_per_node: int = 1, env: dict | None = None) -> Cluster:
    """A head (no CPUs: only the driver's bookkeeping runs there) and `workers` nodes of `cpus_per_node` CPUs.
    `env` is set for the raylets started here, hence for every worker process of the cluster."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "include_dashboard": False,
                                          "node_ip_address": "127.0.0.1"})
        for _ in range(workers):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    cluster.wait_for_nodes()
    return cluster


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def node_of_process(cluster: Cluster, pid: int):
    """The worker node whose raylet is an ancestor of `pid` (None for the head or an unknown process)."""
    raylets = {raylet_pid(n): n for n in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state is the parent pid
    return None


def wait_for(predicate, what: str, timeout: float = 300.0, poll: float = 0.05):
    """Wait for an event (a bound on a hang, never a speed requirement); returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
