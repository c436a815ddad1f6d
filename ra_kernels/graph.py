"""Capture a function of device arrays once and replay it: a whole training step as one CUDA graph
(docs/design.md §7).

A step launches hundreds of kernels (800 in attention92's, tests/test_launch_counts.py), each a few
microseconds of device work behind tens of microseconds of Python. Captured as a CUDA graph, the
step costs one launch from the host, and the device runs the kernels back to back. What capture
demands, and how it is met here:

* Nothing is computed during capture, only recorded; so no value may be read back to the host
  (``backend.no_host_reads`` makes a read an error) and the Python of the step must not depend on
  the arrays' values.
* Every array the step allocates is recorded by address. They come from a memory pool of the
  graph's own, kept as long as the graph: nothing else may reuse that memory, or a replay would
  overwrite it (the loader's next batch, say).
* Inputs are read from fixed addresses: each call copies its arrays into the graph's static input
  buffers before the replay.
* Every kernel runs on the current stream and every kernel is compiled and loaded before capture:
  hence the eager warm-up calls.

Two recorders keep that contract. On cuda, CuPy's stream capture on a private stream (relaxed
mode), with CuPy's allocator switched to a private ``MemoryPool``. On the interpret backend,
``launch.record_launches(run=False)`` records the launches with the arrays they were given, and
``launch.replay`` runs them again: the same promise as a graph (recorded, not run; a replay runs
the same kernels on the same arrays), so the whole machinery runs and is tested on a CPU. That
also makes it the capture-safety check: work that is not a kernel launch (a NumPy or CuPy
operation in the step) is not recorded, so a replay leaves it out and its result differs from
the eager step's (``tests/test_graph.py``).
"""
from __future__ import annotations

import functools

import numpy as np

from . import backend, launch

_DURING_CAPTURE = "while a step was being captured as a CUDA graph (nothing runs during capture)"


class Captured:
    """A captured function: ``replay()`` runs it again on the arrays it was captured with; ``outputs``
    is what the function returned, arrays that every replay rewrites; ``memory`` keeps the pool of
    the graph's arrays alive."""

    def __init__(self, replay, outputs, memory):
        self.replay, self.outputs, self.memory = replay, outputs, memory


def capture(fn, *args) -> Captured:
    """Capture ``fn(*args)`` on the current backend (cuda or interpret; see the module docstring).
    Its Python runs once; its kernels run at each ``replay()``, on the then-current stream."""
    name = backend.get_backend()
    if name == "numpy":
        raise RuntimeError("graph.capture: the numpy backend runs no kernels, so there is nothing to capture; "
                           "use the cuda backend (or interpret, to test)")
    return _capture_cuda(fn, args) if name == "cuda" else _capture_recorded(fn, args)


def _capture_cuda(fn, args):
    cupy = backend.xp()
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)  # capture cannot start on the legacy default stream
    with stream, cupy.cuda.using_allocator(pool.malloc), backend.no_host_reads(_DURING_CAPTURE):
        stream.begin_capture()
        try:
            outputs = fn(*args)
        finally:
            graph = stream.end_capture()
    return Captured(lambda: graph.launch(cupy.cuda.get_current_stream()), outputs, (pool, graph))


def _capture_recorded(fn, args):
    pool = []

    def allocate(shape, dtype):
        pool.append(np.empty(shape, dtype))
        return pool[-1]

    with backend.use_allocator(allocate), backend.no_host_reads(_DURING_CAPTURE), \
            launch.record_launches(run=False) as launches:
        outputs = fn(*args)
    return Captured(functools.partial(launch.replay, launches), outputs, pool)


class StepGraph:
    """``fn`` of device arrays, run eagerly ``warmup`` times and then captured and replayed, once per
    signature: the shapes and dtypes of the arguments (a last partial batch gets its own graph), and
    ``state()``, a hashable of whatever else the captured kernels were chosen by (a mode, the
    precision, hyperparameters passed as launch arguments); a new value gets its own warm-up and
    graph. Checks on host values in ``fn`` (the labels' range on a host array) run at the eager
    calls and the capture only.

    ``step(*arrays)`` returns what ``fn`` returns. Until the signature's ``warmup`` eager calls are
    done, that is a plain call (Triton compiles and loads the kernels it meets). The next call
    copies the arrays into static buffers, captures ``fn`` on them and replays it; every later
    call copies and replays. A captured call returns the outputs of the capture, arrays that the
    next replay of the same signature rewrites: read or copy them before the next call.
    """

    def __init__(self, fn, warmup: int = 2, state=lambda: None):
        if warmup < 1:
            raise ValueError(f"StepGraph: warmup must be >= 1 (kernels compile in the eager calls), got {warmup}")
        self.fn, self.warmup, self.state = fn, warmup, state
        self._graphs = {}      # signature -> (static inputs, Captured)
        self._eager_calls = {}  # signature -> eager calls made so far

    def signatures(self):
        """The signatures captured so far."""
        return list(self._graphs)

    def __call__(self, *arrays):
        signature = (tuple((tuple(a.shape), np.dtype(a.dtype).str) for a in arrays), self.state())
        entry = self._graphs.get(signature)
        if entry is None:
            done = self._eager_calls.get(signature, 0)
            if done < self.warmup:
                self._eager_calls[signature] = done + 1
                return self.fn(*arrays)
            inputs = [backend.empty(a.shape, a.dtype) for a in arrays]  # outside the graph's pool
            for static, a in zip(inputs, arrays):
                static[...] = a
            entry = self._graphs[signature] = (inputs, capture(self.fn, *inputs))
        else:
            for static, a in zip(entry[0], arrays):
                static[...] = a
        entry[1].replay()
        return entry[1].outputs
