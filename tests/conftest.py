"""Shared fixtures: backends to run kernels on, fresh random data, poisoned outputs."""
import os

import numpy as np
import pytest

from ra_kernels import backend

def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="seed of the rng fixture instead of a fresh one, to replay a failure")


def pytest_configure(config):
    # bench.gpu_check runs the cuda tests under compute-sanitizer with RA_CUPY_POOL=off: without
    # CuPy's memory pool each array is its own allocation, so an access past its end is reported
    # instead of landing in the pool's next block.
    if os.environ.get("RA_CUPY_POOL") == "off" and backend.gpu_available():
        import cupy
        cupy.cuda.set_allocator(None)


def pytest_collection_modifyitems(config, items):
    if backend.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_backend_state():
    """Every test starts on the numpy backend, with IEEE float32 products and poisoned kernel outputs.

    Tests that run kernels ask for ``triton_backend``: the interpreter always, cuda too on a GPU.
    """
    previous = backend.set_backend("numpy")
    with backend.use_precision("ieee"), backend.poison_outputs():
        yield
    backend.set_backend(previous)


@pytest.fixture(params=[pytest.param(b, marks=[pytest.mark.gpu] if b == "cuda" else [])
                        for b in ["interpret", "cuda"]])
def triton_backend(request):
    """Run the test on each backend that executes Triton kernels."""
    with backend.use_backend(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    """A generator with a fresh seed, printed on failure so the case can be replayed
    with ``pytest --seed SEED``."""
    seed = request.config.getoption("--seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
