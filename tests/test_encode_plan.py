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
