"""The backend's command line refuses what it cannot serve with one `error:` line and exit 2 BEFORE Ray starts
and the actors load a model (seconds to minutes with real weights): a table name LanceDB refuses, a --db that is
a file, an address this machine does not have (binding it sends no traffic), a port already in use."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def _backend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connectors", "--variant", "small", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["table", "db file", "host", "port in use"])
def test_what_the_backend_cannot_serve_is_refused_before_ray_starts(tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = str(held.getsockname()[1])
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = str(free.getsockname()[1])
    free.close()
    args = {"table": ["--db", str(tmp_path / "db"), "--table", "../x", "--port", free_port],
            "db file": ["--db", str(afile), "--port", free_port],
            "host": ["--db", str(tmp_path / "db"), "--host", "192.0.2.1", "--port", free_port],
            "port in use": ["--db", str(tmp_path / "db"), "--host", "127.0.0.1", "--port", port]}[case]
    try:
        done = _backend(*args)
    finally:
        held.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    assert "Started a local Ray" not in done.stderr and not (tmp_path / "db").exists()


def test_actors_that_can_never_all_be_placed_are_refused_instead_of_waiting(tmp_path):
    """2 actors (1 serving + the encoder) of 1.5 CPUs on one 2-CPU node: the second would wait for CPUs forever
    (the pool used to give up after 300 s with a traceback)."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
    free.close()
    done = _backend("--db", str(tmp_path / "db"), "--port", port, "--ray-cpus", "2", "--actors", "1",
                    "--actor-cpus", "1.5")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --actor-cpus 1.5") and "hold 1 of that size" in last and "Traceback" not in done.stderr


@pytest.mark.parametrize("count, cpus, nodes, fits", [
    (3, 1.0, [2.0, 1.0], True), (4, 1.0, [2.0, 1.0], False), (3, 1.333, [4.0], True), (3, 1.334, [4.0], False),
    (2, 0.5, [0.5, 0.5], True), (1, 2.0, [1.0, 1.0], False), (1, 0.1, [], False), (3, 2 / 3, [2.0], True),
])
def test_placement_counts_whole_actors_per_node(count, cpus, nodes, fits):
    from connectors.actors import placement_problem

    assert (placement_problem(count, cpus, nodes) is None) == fits


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 12), nodes=st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0]),
                                                min_size=1, max_size=5))
def test_the_default_share_always_fits_and_is_the_largest_that_does(count, nodes):
    from connectors.actors import default_actor_cpus
    from pipeline.placement import actors_that_fit

    share, resources = default_actor_cpus(count, nodes), [{"CPU": c} for c in nodes]
    assert actors_that_fit(resources, share) >= count or share == 0.001
    assert actors_that_fit(resources, share + 0.001) < count or share + 0.001 > max(nodes)
