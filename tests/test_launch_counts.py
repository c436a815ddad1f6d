"""Kernel launches per training step, counted (deterministic: they depend on shapes, not values).

Each launch costs the host tens of microseconds when a step runs eagerly, and the device a few
microseconds of ramp even inside a CUDA graph, so the counts are held here as ceilings. They are
today's counts: issue 13 aims at 800 for attention92 (one fused kernel per conv forward and two
per backward), which the fusions still to come must reach; lower the ceilings as they land.
"""
import pytest

from bench import host

#: Launches of one eager training step at batch 64 (forward, loss, backward, SGD, metrics).
LAUNCH_CEILINGS = {"attention56": 557, "attention92": 1001}


@pytest.mark.parametrize("name", sorted(LAUNCH_CEILINGS))
def test_a_training_step_launches_at_most_its_ceiling(name):
    counts = host.count_step(name, 64)
    launches = sum(counts["launches"].values())
    assert launches <= LAUNCH_CEILINGS[name], counts["launches"].most_common()
    # the conv and batch-norm gradients land in the optimizer's flat buffer inside their op's kernels:
    # the elementwise launches are the residual adds, the fan-out sums, two fills and the classifier's
    # two gradient additions, not one addition per parameter
    assert counts["launches"]["elementwise_kernel"] < counts["parameters"] // 3
    assert counts["launches"]["sgd_kernel"] == 1 and counts["launches"]["metrics_kernel"] == 1
