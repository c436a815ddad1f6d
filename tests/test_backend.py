"""Backend selection, precision, the Triton adapters and launch checks."""
import numpy as np
import pytest
import triton

from ra_kernels import backend, launch
from ra_kernels.kernels import elementwise


@pytest.fixture
def unselected(monkeypatch):
    """Forget the selected backend, as in a fresh process."""
    monkeypatch.setitem(backend._selected, "backend", None)


def test_default_is_cuda_with_a_gpu_else_numpy(unselected, monkeypatch):
    monkeypatch.delenv("RA_BACKEND", raising=False)
    assert backend.get_backend() == ("cuda" if backend.gpu_available() else "numpy")


def test_environment_variable_selects(unselected, monkeypatch):
    monkeypatch.setenv("RA_BACKEND", "interpret")
    assert backend.get_backend() == "interpret"


def test_environment_variable_is_checked(unselected, monkeypatch):
    monkeypatch.setenv("RA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backend.get_backend()


def test_set_backend_returns_previous_and_context_restores():
    assert backend.set_backend("interpret") == "numpy"
    assert backend.get_backend() == "interpret"
    with pytest.raises(KeyError):
        with backend.use_backend("numpy"):
            assert backend.get_backend() == "numpy"
            raise KeyError("inside")
    assert backend.get_backend() == "interpret"
    assert backend.uses_triton()


def test_unknown_backend():
    with pytest.raises(ValueError, match="expected one of cuda, interpret, numpy"):
        backend.set_backend("metal")
    assert backend.get_backend() == "numpy"


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present")
def test_cuda_without_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="needs CuPy and a GPU.*numpy"):
        backend.set_backend("cuda")
    assert backend.get_backend() == "numpy"


def test_precision_setting():
    assert backend.get_precision() == "ieee"  # the test fixture's choice
    with backend.use_precision("tf32"):
        assert backend.get_precision() == "tf32"
    assert backend.get_precision() == "ieee"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        backend.set_precision("fp8")


def test_host_adapter_points_at_the_array(rng):
    a = rng.standard_normal((3, 5)).astype(np.float32)
    h = launch.HostArray(a)
    assert h.data_ptr() == a.ctypes.data == h.untyped_storage().data_ptr()
    assert h.dtype == np.float32


def test_empty_is_poisoned_only_when_asked():
    with backend.poison_outputs():
        assert np.isnan(backend.empty((4, 3))).all()
        assert (backend.empty(5, np.int8) == -1).all()
        assert (backend.empty(5, np.uint8) == 255).all()
    with backend.poison_outputs(False):
        assert backend.empty((2,)).shape == (2,)


def test_launch_refuses_numpy_backend(rng):
    a = rng.standard_normal(8).astype(np.float32)
    with pytest.raises(RuntimeError, match="do not run on the numpy backend"):
        elementwise.relu(a)


def test_launch_refuses_arrays_beyond_int32_offsets(rng):
    """An array of 2**31 elements or more would wrap the kernels' int32 offsets: refused at launch, not
    read or written at wrapped addresses. Views over 8 floats stand in for the huge arrays (nothing
    allocated); the kernel copies their first 8 elements, all it touches."""
    base = rng.standard_normal(8).astype(np.float32)
    as_large = lambda n: np.lib.stride_tricks.as_strided(base, shape=(n,), strides=(4,), writeable=False)
    out = np.full(8, np.nan, np.float32)
    copy = lambda a: launch.launch(elementwise.elementwise_kernel, (1,), a, a, out, 0.0, 8, OP="copy",
                                   BLOCK_N=elementwise.FLAT_BLOCK)
    with backend.use_backend("interpret"):
        with pytest.raises(ValueError, match=r"\(2,147,483,648 elements\).*int32 offsets.*at most 2,147,483,647"):
            copy(as_large(launch.MAX_ELEMENTS + 1))
        assert np.isnan(out).all()
        copy(as_large(launch.MAX_ELEMENTS))
    np.testing.assert_array_equal(out, base)


@pytest.mark.gpu
def test_launch_refuses_host_arrays_on_cuda(rng):
    a = rng.standard_normal(8).astype(np.float32)
    with backend.use_backend("cuda"), pytest.raises(TypeError, match="numpy array was given"):
        elementwise.relu(a)


def test_asarray_and_to_numpy_round_trip(triton_backend, rng):
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = backend.asarray(a)
    assert backend.memory_of(b) == ("device" if triton_backend == "cuda" else "host")
    np.testing.assert_array_equal(backend.to_numpy(b), a)


@triton.jit
def _double(x):
    return x * 2


def test_jit_calls_are_interpreted_only_inside_an_interpreted_launch(rng):
    # Kernels call jit helpers (ours and Triton's tl.sum, tl.zeros...) when interpreted;
    # outside a launch a jit function keeps refusing to be called, as Triton defines it.
    with backend.use_backend("interpret"):
        y, _ = elementwise.relu(rng.standard_normal(5).astype(np.float32))
    assert np.isfinite(y).all()
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        _double(1.0)


def _language_state():
    """What lookup gives for every name of triton.language that yields the same object twice
    (a bound class method or __dict__ is new on each access, so it cannot be compared)."""
    import triton.language as tl
    return {(owner.__name__, name): getattr(owner, name)
            for owner in (tl, tl.core, tl.core.tensor, tl.math) for name in dir(owner)
            if getattr(owner, name) is getattr(owner, name)}


def test_interpreted_launch_leaves_triton_language_as_it_was(rng):
    # A kernel that calls Triton's own jit helpers (tl.sum) under the interpreter patches
    # triton.language; anything left patched would make a later compile in this process
    # build through the interpreter (seen: a cold-cache AOT compile failing after kernel tests).
    from ra_kernels.kernels import pool
    before = _language_state()
    with backend.use_backend("interpret"):
        y, _ = pool.global_avg_pool(rng.standard_normal((2, 3, 5, 7)).astype(np.float32))
    assert np.isfinite(y).all()
    after = _language_state()
    changed = sorted(k for k in before if after.get(k) is not before[k])
    assert not changed, f"left patched: {changed[:5]}"


def test_interpreted_launches_from_several_threads_take_turns(rng):
    # The data loader augments in its prefetch thread while the training thread runs kernels.
    # The interpreter keeps global state during a launch (the patched triton.language, the
    # program id, JITFunction.__call__), so launches from two threads at once would mix them up.
    from concurrent.futures import ThreadPoolExecutor
    from ra_kernels.kernels import pool
    inputs = [rng.standard_normal((2, 3, 5, 4 + i)).astype(np.float32) for i in range(8)]

    def mean_and_relu(x):
        return pool.global_avg_pool(x)[0], elementwise.relu(x)[0]

    with backend.use_backend("interpret"), ThreadPoolExecutor(4) as threads:
        results = list(threads.map(mean_and_relu, inputs))
    for x, (mean, relu) in zip(inputs, results):
        np.testing.assert_allclose(mean, x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(relu, np.maximum(x, 0))


# --------------------------------------------------------------------------- Triton's driver without torch

NO_TORCH_RELU = """
import sys
sys.modules["torch"] = None  # import torch now raises ImportError, as where it is not installed
import numpy as np
from ra_kernels import backend
from ra_kernels.kernels import elementwise
backend.set_backend("cuda")
y, _ = elementwise.relu(backend.asarray(np.array([-1.0, 2.0, np.nan], np.float32)))
print(backend.to_numpy(y).tolist())
"""


@pytest.mark.gpu
def test_cuda_backend_runs_without_torch():
    # Triton's CUDA driver is active only beside a CUDA build of torch ("0 active drivers"
    # otherwise); launch.py builds it on CuPy instead. A fresh process, torch blocked.
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", NO_TORCH_RELU], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "[0.0, 2.0, nan]"


def test_a_driver_that_cannot_be_built_says_what_to_install(monkeypatch):
    from triton.backends.nvidia import driver as nvidia_driver

    def no_cuda_library():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(nvidia_driver, "CudaUtils", no_cuda_library)
    with pytest.raises(RuntimeError, match=r"without PyTorch \(OSError: libcuda.so.1: .*\)\. Install a CUDA "
                                           r"build of torch beside CuPy \(pip install torch\)"):
        launch._cuda_driver_without_torch()
