"""Kernel launches per training step, counted (deterministic: they depend on shapes, not values).

Each launch costs the host tens of microseconds when a step runs eagerly, and the device a few
microseconds of ramp even inside a CUDA graph, so the counts are held here as ceilings. They are
today's counts, and attention92's is issue 13's bound of 800 (docs/design.md §7 says where each
launch goes); lower them as further fusions land.
"""
import pytest

from bench import host

#: Launches of one eager training step at batch 64 (forward, loss, backward, SGD, metrics).
LAUNCH_CEILINGS = {"attention56": 449, "attention92": 800}


@pytest.mark.parametrize("name", sorted(LAUNCH_CEILINGS))
def test_a_training_step_launches_at_most_its_ceiling(name):
    counts = host.count_step(name, 64)
    launches = sum(counts["launches"].values())
    assert launches <= LAUNCH_CEILINGS[name], counts["launches"].most_common()
    # every gradient lands in the optimizer's flat buffer inside its op's kernels, the residual adds
    # happen in the convs' epilogues and the batch norms' backward, and a tensor that feeds two ops
    # gets the second gradient added by that op's kernel: the only elementwise launches left are the
    # two fills, the gradient buffer's zeroing and the loss's seed
    assert counts["launches"]["elementwise_kernel"] == 2
    assert counts["launches"]["sgd_kernel"] == 1 and counts["launches"]["metrics_kernel"] == 1
