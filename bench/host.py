"""What an eager training step costs the host: kernel launches, allocations and Python time per step.

    python -m bench.host                                 # attention56 and attention92, batch 64
    python -m bench.host --models attention92 --steps 50

Runs on a CPU. The step is ``ra_kernels.steps.TrainStep`` (zero-grad, forward, loss, backward, SGD,
metrics) on the interpret backend with its launches recorded and not run
(``launch.record_launches(run=False)``) and its arrays taken from a cache that hands a step's k-th
request for a shape and dtype the same array every step (``_ArrayCache``, standing in for CuPy's
memory pool, which hands a freed block back in about a microsecond): what is left is the Python
of the step up to each kernel call, which an eager step pays on the GPU too, before Triton's own
launch path. Counts are exact (a step's launches do not
depend on the data); times are the median and the minimum over ``--steps`` steps after two
(Python's garbage collector makes the spread). A captured step (ra_kernels/graph.py) pays
none of it after its warm-up.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np

from ra_kernels import backend, launch, models, steps
from ra_kernels.metrics import TOTALS
from ra_kernels.optim import SGD

from .common import IMAGE_SIZE, NUM_CLASSES, markdown_table


class _ArrayCache:
    """An allocator for ``backend.use_allocator`` that reuses arrays from step to step: the k-th array
    of a (shape, dtype) a step asks for is the same array every step. Within a step each array is
    distinct, as real allocations are: the autograd engine tells gradients apart by identity (an
    op that added into the array offered returns that very array), so a shared array would skip
    additions and undercount launches. Call ``new_step()`` before each step."""

    def __init__(self):
        self.arrays, self.taken, self.calls = collections.defaultdict(list), collections.Counter(), 0

    def new_step(self):
        self.taken.clear()

    def __call__(self, shape, dtype):
        self.calls += 1
        key = (tuple(np.atleast_1d(shape)), np.dtype(dtype).str)
        arrays, k = self.arrays[key], self.taken[key]
        if k == len(arrays):
            arrays.append(np.empty(shape, dtype))  # never written: the launches are not run
        self.taken[key] += 1
        return arrays[k]


def step_on_stubs(name: str, batch: int):
    """(step, inputs, allocator) of ``name`` at ``batch`` on the interpret backend, to be run inside
    ``record_launches(run=False)`` and ``use_allocator(allocator)``."""
    backend.set_backend("interpret")
    model = models.MODELS[name](num_classes=NUM_CLASSES)
    optimizer = SGD(model.parameters())
    totals = np.zeros(len(TOTALS), np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int64)
    return steps.TrainStep(model, optimizer, totals, capture=False), (x, labels), _ArrayCache()


def count_step(name: str, batch: int) -> dict:
    """{"launches": Counter of kernel names, "allocations": int, "parameters": int (tensors)} of one
    eager training step."""
    step, inputs, allocator = step_on_stubs(name, batch)
    allocator.new_step()
    with backend.use_allocator(allocator), launch.record_launches(run=False) as launches:
        step(*inputs)
    return {"launches": collections.Counter(call.kernel_fn.__name__ for call in launches),
            "allocations": allocator.calls, "parameters": len(step.model.parameters())}


def time_steps(name: str, batch: int, n_steps: int) -> dict:
    """Host milliseconds per eager step (median, minimum over ``n_steps`` after 2) with the counts."""
    step, inputs, allocator = step_on_stubs(name, batch)
    times = []
    with backend.use_allocator(allocator):
        for _ in range(n_steps + 2):
            allocator.new_step()
            with launch.record_launches(run=False) as launches:
                start = time.perf_counter()
                step(*inputs)
                times.append(time.perf_counter() - start)
    times = np.array(times[2:]) * 1e3
    return {"launches": len(launches), "allocations": allocator.calls // (n_steps + 2),
            "median_ms": float(np.median(times)), "min_ms": float(times.min())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(models.MODELS), default=["attention56", "attention92"])
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model (default: 30)")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1:
        parser.error("--batch must be at least 2 (batch norm in training) and --steps at least 1")
    rows = []
    for name in args.models:
        r = time_steps(name, args.batch, args.steps)
        rows.append([name, args.batch, f"{r['launches']:,}", f"{r['allocations']:,}", f"{r['median_ms']:.1f}",
                     f"{r['min_ms']:.1f}", f"{1e3 * r['median_ms'] / r['launches']:.1f}"])
        print(f"  {name}: {count_step(name, args.batch)['launches'].most_common(8)}", file=sys.stderr)
    print(markdown_table(["model", "batch", "launches", "allocations", "host ms (median)", "host ms (min)",
                          "us per launch"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
