"""Which backend runs the ops, and how arrays reach Triton.

Three backends share one op contract:

* ``"cuda"``: CuPy arrays on the GPU, Triton kernels compiled for it.
* ``"interpret"``: NumPy arrays, the *same* Triton source run by Triton's
  interpreter on the CPU. Slow; it exists so that every kernel is tested on
  machines without a GPU.
* ``"numpy"``: NumPy arrays, the ops of ``reference/`` (im2col + BLAS). The
  backend for real CPU runs, and the only one that also accepts float64.

Selection, first match wins: ``set_backend(name)`` / ``use_backend(name)``;
the environment variable ``RA_BACKEND``; ``"cuda"`` when CuPy sees a GPU;
``"numpy"``.

Kernels are written once with :func:`kernel` (and :func:`device_function` for
helpers they call) and launched with :func:`launch`, which hands NumPy arrays
to the interpreter and CuPy arrays to the compiled kernel, each through one
small adapter below.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np
import triton
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

BACKENDS = ("cuda", "interpret", "numpy")
PRECISIONS = ("tf32", "ieee")

_selected = {"backend": None, "precision": "tf32", "poison": False}


# --------------------------------------------------------------------------- selection

@functools.lru_cache(maxsize=None)
def _cupy():
    """The cupy module when it is installed and sees a GPU, else None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, or CUDARuntimeError when there is no driver
        pass
    return None


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one GPU."""
    return _cupy() is not None


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "cuda" and not gpu_available():
        raise RuntimeError(
            "backend 'cuda' needs CuPy and a GPU, and none was found: install the GPU extra "
            "(pip install -e '.[cuda12]' or '.[cuda13]') on a machine with an NVIDIA GPU, "
            "or choose 'numpy' (fast on the CPU) or 'interpret' (Triton's interpreter)")
    return name


def get_backend() -> str:
    """The name of the backend ops run on now."""
    if _selected["backend"] is None:
        env = os.environ.get("RA_BACKEND")
        _selected["backend"] = _activate(_check_name(env) if env else
                                         "cuda" if gpu_available() else "numpy")
    return _selected["backend"]


def set_backend(name: str) -> str:
    """Select the backend by name ('cuda', 'interpret' or 'numpy'); returns the previous one."""
    previous = get_backend()
    _selected["backend"] = _activate(_check_name(name))
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("interpret"): ...`` runs the block on that backend."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _activate(name):
    if name == "cuda":
        _launch_on_cupy_stream()
    return name


def uses_triton() -> bool:
    """True when ops run as Triton kernels (cuda or interpret backend)."""
    return get_backend() != "numpy"


def xp():
    """The array module of the current backend: cupy for 'cuda', numpy otherwise."""
    return _cupy() if get_backend() == "cuda" else np


# --------------------------------------------------------------------------- precision

def get_precision() -> str:
    """Input precision of float32 matrix products in kernels: 'tf32' (default) or 'ieee'."""
    return _selected["precision"]


def set_precision(precision: str) -> str:
    """Select 'tf32' or 'ieee' float32 matrix products; returns the previous setting.

    Accumulation is float32 either way. The numpy backend always computes in the
    arrays' own precision and ignores this setting.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    previous, _selected["precision"] = _selected["precision"], precision
    return previous


@contextlib.contextmanager
def use_precision(precision: str):
    previous = set_precision(precision)
    try:
        yield
    finally:
        set_precision(previous)


# --------------------------------------------------------------------------- arrays

def is_cupy_array(a) -> bool:
    return type(a).__module__.startswith("cupy") and hasattr(a, "data")


def asarray(a, dtype=None, like=None):
    """``a`` (NumPy, CuPy, list, scalar) as an array of the current backend.

    With ``like``, as an array of the same kind as ``like`` (NumPy or CuPy) instead.
    """
    on_gpu = is_cupy_array(like) if like is not None else get_backend() == "cuda"
    if on_gpu:
        return _cupy().asarray(a, dtype=dtype)
    return np.asarray(to_numpy(a), dtype=dtype)


def empty(shape, dtype=np.float32):
    """An uninitialised array of the current backend for a kernel to write.

    Under :func:`poison_outputs` it is filled with NaN (float), -1 (signed) or
    the largest value (unsigned) instead, so that an element a kernel forgets to write shows up.
    """
    out, dtype = xp().empty(shape, dtype=dtype), np.dtype(dtype)
    if _selected["poison"]:
        out.fill(np.nan if dtype.kind == "f" else -1 if dtype.kind == "i" else np.iinfo(dtype).max)
    return out


def empty_like(a):
    return empty(a.shape, a.dtype)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Poison every array made by :func:`empty` inside the block (the tests run so)."""
    previous, _selected["poison"] = _selected["poison"], enabled
    try:
        yield
    finally:
        _selected["poison"] = previous


def to_numpy(a) -> np.ndarray:
    """A host NumPy copy (or view) of an array of any backend."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def backend_of(a) -> str:
    """'cuda' for a CuPy array, 'host' for a NumPy array (numpy and interpret backends)."""
    if is_cupy_array(a):
        return "cuda"
    if isinstance(a, np.ndarray):
        return "host"
    raise TypeError(f"expected a NumPy or CuPy array, got {type(a).__name__}")


# --------------------------------------------------------------------------- Triton adapters

class _HostStorage:
    """The storage the interpreter copies "to the host" and back: already there."""

    def __init__(self, ptr):
        self._ptr = ptr

    def data_ptr(self):
        return self._ptr

    def cpu(self):
        return self

    def copy_(self, other):
        pass


class HostArray:
    """A NumPy array as Triton's interpreter sees a tensor.

    The interpreter copies each tensor's storage to the host before the launch and
    back after it; NumPy memory already is host memory, so those steps are no-ops and
    the kernel reads and writes the array in place.
    """

    def __init__(self, array: np.ndarray):
        self.array, self.dtype = array, array.dtype

    def data_ptr(self):
        return self.array.ctypes.data

    def untyped_storage(self):
        return _HostStorage(self.data_ptr())

    def new_empty(self, *shape, **kwargs):
        return self

    def set_(self, *args):
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return self.array.strides


class DeviceArray:
    """A CuPy array as compiled Triton sees a tensor: a device pointer and a dtype."""

    def __init__(self, array):
        self.array, self.dtype = array, array.dtype

    def data_ptr(self):
        return self.array.data.ptr


@functools.lru_cache(maxsize=None)
def _launch_on_cupy_stream():
    """Make Triton launch on CuPy's current stream instead of asking torch for one.

    Triton's launcher asks its driver for the current stream (torch's, when torch is
    installed). Kernels must run on CuPy's current stream so that a CUDA graph
    captured on it records them.
    """
    cupy = _cupy()
    driver = triton.runtime.driver.active
    driver.get_current_stream = lambda device=None: cupy.cuda.get_current_stream().ptr
    driver.get_current_device = lambda: cupy.cuda.Device().id


# --------------------------------------------------------------------------- kernels

#: Every kernel of the package, with the specialisations the AOT check compiles.
KERNELS: list[JITFunction] = []


def kernel(*, aot: list[dict]):
    """Decorator for a Triton kernel: ``triton.jit``, registered for the AOT compile check.

    ``aot`` lists representative specialisations, one dict each mapping every
    parameter to its Triton type (``"*fp32"``, ``"i32"``, ...) or, for a
    ``tl.constexpr`` parameter, to its value.
    """
    def decorate(fn):
        compiled = triton.jit(fn)
        compiled.aot_specs = aot
        KERNELS.append(compiled)
        return compiled
    return decorate


#: Decorator for a helper called from kernels (plain ``triton.jit``; named for symmetry).
device_function = triton.jit


@functools.lru_cache(maxsize=None)
def _interpreted(fn) -> InterpretedFunction:
    return InterpretedFunction(fn)


def _call_interpreted(jit_function, *args, **kwargs):
    # InterpretedFunction.__call__ patches triton.language as seen from the helper's module
    # (for Triton's own tl.sum: triton.language.core) and never restores it, which is
    # harmless when everything is interpreted; here a later compile in the same process would
    # then build through the interpreter's builder. Patch in a scope of our own and restore it.
    scope = interpreter._patch_lang(jit_function.fn)
    try:
        return _interpreted(jit_function.fn)(*args, **kwargs)
    finally:
        scope.restore()


# Triton's interpreter keeps global state during a launch (the patched triton.language,
# the program id, JITFunction.__call__ below), so launches from several threads (the data
# loader's prefetch thread beside the training loop) take turns.
_interpreter_lock = threading.Lock()


@contextlib.contextmanager
def _interpreting():
    """Let one process run the same ``@triton.jit`` source compiled or interpreted.

    ``triton.jit`` picks interpretation once, from TRITON_INTERPRET at import, for
    every jit function, Triton's own library (tl.sum, tl.zeros, ...) included; here
    the backend changes at run time. During an interpreted launch, a call from the
    kernel to any jit function (which JITFunction.__call__ otherwise refuses) runs
    that function's interpreted twin. Outside the launch nothing changes.
    """
    refusing_call = JITFunction.__dict__["__call__"]
    JITFunction.__call__ = _call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = refusing_call


@functools.lru_cache(maxsize=None)
def _fix_interpreter_scalar_index():
    """triton 3.6's interpreter turns a scalar kernel argument into a Python int with
    ``int(array_of_shape_1)``, which NumPy >= 2.4 refuses, so ``range(0, K, BLOCK_K)``
    over a run-time K fails there (the GPU machines pair 3.6 with NumPy 2.5). Newer
    Triton squeezes first; do the same for every version."""
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index


def launch(kernel_fn: JITFunction, grid, *args, num_warps=4, **constexprs):
    """Run ``kernel_fn[grid](*args, **constexprs)`` on the current backend.

    Array arguments must belong to the backend: NumPy arrays run in the
    interpreter, CuPy arrays in the compiled kernel on CuPy's current stream.
    """
    backend = get_backend()
    if backend == "numpy":
        raise RuntimeError(f"{kernel_fn.__name__}: Triton kernels do not run on the numpy backend")
    adapter = DeviceArray if backend == "cuda" else HostArray
    wrapped = []
    for a in args:
        if isinstance(a, np.ndarray) or is_cupy_array(a):
            if (backend == "cuda") != is_cupy_array(a):
                raise TypeError(f"{kernel_fn.__name__}: a {type(a).__module__} array was given "
                                f"to a kernel on the {backend} backend")
            a = adapter(a)
        wrapped.append(a)
    if backend == "interpret":
        _fix_interpreter_scalar_index()
        with _interpreter_lock, _interpreting():
            _interpreted(kernel_fn.fn)[grid](*wrapped, **constexprs)
    else:
        kernel_fn[grid](*wrapped, num_warps=num_warps, enable_fp_fusion=True, **constexprs)
