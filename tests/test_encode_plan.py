"""The encode job's pool plan against the cluster's nodes: Ray places an actor or task whole on one node and
waits forever, without a word, for one no live node can hold, so a plan sized from the cluster's total (3 nodes of
1 CPU = "3 CPUs") could ask for an encoder nothing will ever run. A plan is refused before anything starts, or
everything it asks for can be placed."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.encoding import plan_resources


NODE_SIZES = st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0, 8.0])


@settings(max_examples=300, deadline=None)
@given(node_cpus=st.lists(NODE_SIZES, min_size=1, max_size=6), num_encoders=st.none() | st.integers(1, 4),
       cpus_per_encoder=st.none() | st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       memory_mib=st.sampled_from([256, 512, 4096]))
def test_a_plan_either_fits_the_nodes_or_is_refused(node_cpus, num_encoders, cpus_per_encoder, memory_mib):
    """Whatever the nodes, a plan is refused (ResourcePlanError, before anything starts) or Ray can place every
    encoder and a decode task: the default share fits the nodes (it used to be sized from the cluster's total,
    so 3 nodes of 1 CPU asked for a 2-CPU encoder and the job waited forever)."""
    from pipeline.encoding import ResourcePlanError
    from pipeline.placement import actors_that_fit, fits_on

    nodes = [{"CPU": c, "memory": memory_mib * 1024**2} for c in node_cpus]
    try:
        plan = plan_resources(sum(node_cpus), 0, num_encoders, cpus_per_encoder, nodes=nodes,
                              task_memory=512 * 1024**2)
    except ResourcePlanError:
        assert cpus_per_encoder is not None or num_encoders is not None or memory_mib < 512 or sum(node_cpus) <= 1.5
        return
    assert actors_that_fit(nodes, plan.cpus_per_encoder) >= plan.num_encoders
    assert any(fits_on(n, plan.cpus_per_task, 0.0, 512 * 1024**2) for n in nodes)
    # wherever Ray put the encoders, a node that holds the task's memory has its CPU share free
    for counts in _placements([fits_on(n, plan.cpus_per_encoder) for n in nodes], plan.num_encoders):
        assert any(n["CPU"] - k * plan.cpus_per_encoder >= plan.cpus_per_task - 1e-9 and n["memory"] >= 512 * 1024**2
                   for n, k in zip(nodes, counts)), (counts, plan)


def _placements(capacity: list[int], count: int):
    """Every way to put `count` identical actors on nodes holding `capacity` of them each (actors per node)."""
    if not capacity:
        if count == 0:
            yield ()
        return
    for here in range(min(capacity[0], count) + 1):
        for rest in _placements(capacity[1:], count - here):
            yield (here, *rest)


@settings(max_examples=300, deadline=None)
@given(node_cpus=st.lists(NODE_SIZES, min_size=1, max_size=5), count=st.integers(1, 5),
       cpus=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]), small_memory=st.lists(st.booleans(), min_size=5))
def test_worst_room_is_the_least_room_any_placement_leaves(node_cpus, count, cpus, small_memory):
    """The room a task is sure to find is the smallest, over every placement of the actors, of the largest CPU
    room left on a node holding the task's memory (brute force over all placements)."""
    from pipeline.placement import fits_on, worst_room

    nodes = [{"CPU": c, "memory": 100.0 if small else 1000.0} for c, small in zip(node_cpus, small_memory)]
    rooms = [max([n["CPU"] - k * cpus for n, k in zip(nodes, counts) if n["memory"] >= 500.0], default=0.0)
             for counts in _placements([fits_on(n, cpus) for n in nodes], count)]
    if rooms:  # the actors can all be placed
        assert worst_room(nodes, count, cpus, memory=500.0) == pytest.approx(min(rooms))


def test_a_decode_task_gets_the_cpu_share_encoders_leave_on_some_node():
    """2 encoders of 1.5 CPUs on 2 nodes of 2 leave 1 CPU in all but 0.5 per node: a 1-CPU decode task was
    placeable nowhere while they ran (a silent hang); it now asks for 0.5. Encoders that can fill every node
    are refused."""
    from pipeline.encoding import ResourcePlanError

    two = [{"CPU": 2.0}] * 2
    assert plan_resources(4, 0, num_encoders=2, cpus_per_encoder=1.5, nodes=two).cpus_per_task == 0.5
    assert plan_resources(4, 0, num_encoders=1, cpus_per_encoder=1.5, nodes=two).cpus_per_task == 1.0
    with pytest.raises(ResourcePlanError, match="can take every CPU"):
        plan_resources(5, 0, num_encoders=2, cpus_per_encoder=2, nodes=[*two, {"CPU": 1.0, "memory": 1.0}],
                       task_memory=512 * 1024**2)


def test_small_nodes_get_encoders_they_can_hold():
    from pipeline.encoding import ResourcePlanError

    three_small = [{"CPU": 1.0}] * 3
    plan = plan_resources(3, 0, nodes=three_small)
    assert plan.num_encoders == 1 and plan.cpus_per_encoder == 1.0  # was 2 CPUs: placeable nowhere
    assert plan_resources(4, 0, nodes=[{"CPU": 2.0}] * 2).cpus_per_encoder == 2.0  # was 3
    with pytest.raises(ResourcePlanError, match="cannot all be placed"):
        plan_resources(3, 0, num_encoders=1, cpus_per_encoder=2, nodes=three_small)
    with pytest.raises(ResourcePlanError, match="decode task"):
        plan_resources(3, 0, num_encoders=1, cpus_per_encoder=1, nodes=[{"CPU": 1.0, "memory": 400 * 1024**2}] * 3,
                       task_memory=512 * 1024**2)
