"""Triton kernels written once and run on either Triton backend: registration, the two array
adapters, and the patches that let one process run the same ``@triton.jit`` source compiled
or interpreted.

This is the code of the project that leans on Triton's internals, so each patch says why it
exists. It was checked against triton 3.6.0 (the GPU machines' version, with NumPy 2.5) and
3.9 (the CPU machines' newest):

* ``_cuda_driver_on_cupy``: Triton's launcher asks its driver for the current stream
  (PyTorch's when torch is installed); kernels must run on CuPy's current stream so that a
  CUDA graph captured there records them. And Triton's CUDA driver needs torch to exist at
  all; without torch it is built here on CuPy.
* ``_interpreting`` / ``_call_interpreted``: ``triton.jit`` decides interpret-or-compile once,
  at import, for every jit function; here the backend changes at run time.
* ``_fix_interpreter_scalar_index``: triton 3.6's interpreter calls ``int()`` on shape-(1,)
  arrays, which NumPy >= 2.4 refuses.
* ``_fix_interpreter_bfloat16``: triton 3.6's interpreter truncates float32 to bfloat16 (compiled
  code rounds to nearest even) and multiplies bfloat16 dot operands as their raw 16-bit patterns.
* ``_interpreter_lock``: the interpreter keeps global state during a launch.

Kernels are written with :func:`kernel` (and :func:`device_function` for helpers they call)
and launched with :func:`launch`, which hands NumPy arrays to the interpreter and CuPy arrays
to the compiled kernel on the backend selected in ``ra_kernels.backend``.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import numpy as np
import triton
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .backend import BFLOAT16, get_backend, is_cupy_array, xp


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
def _cuda_driver_on_cupy():
    """Make Triton's CUDA driver take its device and stream from CuPy, and exist without torch.

    Triton's launcher asks its driver for the current device and stream (torch's, when torch
    is installed); kernels must run on CuPy's current stream so that a CUDA graph captured
    on it records them. And Triton's CUDA driver counts as active only beside a CUDA build of
    torch (``CudaDriver.is_active`` and the constructor import it): without torch, Triton finds
    "0 active drivers". Then the driver is built here, its torch-backed methods given CuPy's.
    """
    cupy = xp()  # called on the cuda backend
    try:
        driver = triton.runtime.driver.active
    except RuntimeError:  # no active driver: no CUDA build of torch in this environment
        driver = _cuda_driver_without_torch()
        triton.runtime.driver.set_active(driver)
    driver.get_current_stream = lambda device=None: cupy.cuda.get_current_stream().ptr
    driver.get_current_device = lambda: cupy.cuda.Device().id
    driver.set_current_device = lambda device: cupy.cuda.Device(device).use()
    driver.get_device_capability = lambda device=None: divmod(
        int(cupy.cuda.Device(device).compute_capability), 10)  # "90" -> (9, 0)
    return driver


def _cuda_driver_without_torch():
    """Triton's CudaDriver, built without the torch imports of its constructor."""
    try:
        from triton.backends.nvidia.driver import CudaDriver, CudaLauncher, CudaUtils
        driver = object.__new__(CudaDriver)  # CudaDriver.__init__ -> GPUDriver.__init__ imports torch
        driver.utils, driver.launcher_cls = CudaUtils(), CudaLauncher
        return driver
    except Exception as error:
        raise RuntimeError(
            f"the cuda backend could not start Triton {triton.__version__}'s CUDA driver without PyTorch "
            f"({type(error).__name__}: {error}). Install a CUDA build of torch beside CuPy "
            f"(pip install torch), or use triton 3.6, against which ra_kernels builds the driver itself; "
            f"or run on the numpy backend (RA_BACKEND=numpy)") from error


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


@functools.lru_cache(maxsize=None)
def _fix_interpreter_bfloat16():
    """triton 3.6's interpreter keeps bfloat16 as uint16 bit patterns and gets two things wrong.

    * float32 -> bfloat16 (``x.to(tl.bfloat16)``) truncates: its fp_trunc drops the low 16 bits
      (and its own round-to-nearest path rounds ties up and loses the carry), where compiled code
      rounds to nearest, ties to even (``cvt.rn.bf16.f32``). Here it rounds as ml_dtypes does,
      which gives cvt.rn's bits, infinities included, and a NaN for a NaN.
    * ``create_dot`` widens only 8-bit floats: a dot of bfloat16 operands multiplies the patterns
      as integers (values off by ~1e10). The operands are widened to float32 first, as the tensor
      cores do (the products of bfloat16 values are exact in float32).
    """
    builder = interpreter.InterpreterBuilder
    cast_impl, create_dot = builder.cast_impl, builder.create_dot
    bfloat16, float32 = triton.language.bfloat16, triton.language.float32

    def cast_rounding_to_nearest(self, src, dst_type):
        if src.dtype.scalar == float32 and dst_type.scalar == bfloat16:
            with np.errstate(over="ignore", invalid="ignore"):  # to infinity, and NaN, as cvt.rn
                return interpreter.TensorHandle(src.data.astype(BFLOAT16).view(np.uint16), bfloat16)
        return cast_impl(self, src, dst_type)

    def widened(builder_self, operand):
        return builder_self.cast_impl(operand, float32) if operand.dtype.scalar == bfloat16 else operand

    def create_dot_widening_bfloat16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widened(self, a), widened(self, b), d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = cast_rounding_to_nearest
    builder.create_dot = create_dot_widening_bfloat16


class Launch(NamedTuple):
    """One kernel launch as :func:`launch` made it: what a CUDA graph records."""
    kernel_fn: JITFunction
    grid: tuple
    args: tuple       # arrays already wrapped for the backend's Triton (HostArray, DeviceArray)
    num_warps: int
    constexprs: dict
    compiled: bool    # on the cuda backend (compiled), else interpreted


# Launches made by this thread go into _recording.launches while it is a list (record_launches);
# other threads (the data loader's prefetch thread) launch as usual, as a CUDA graph captured on
# one stream does not record the launches another thread makes on its own.
_recording = threading.local()


@contextlib.contextmanager
def record_launches(run: bool = True):
    """Inside the block, every launch this thread makes is appended to the yielded list of
    :class:`Launch`, and run only if ``run``. ``run=False`` is what a CUDA-graph capture does (the
    work is recorded, not done) and what counting launches without their cost needs; a recorded
    list runs later with :func:`replay`. Blocks do not nest."""
    if getattr(_recording, "launches", None) is not None:
        raise RuntimeError("record_launches: launches are already being recorded on this thread")
    _recording.launches, _recording.run = [], run
    try:
        yield _recording.launches
    finally:
        _recording.launches = None


_SCALARS = frozenset((int, float, bool))
#: The most elements of an array a kernel takes: every kernel's offsets are int32.
MAX_ELEMENTS = 2 ** 31 - 1


def launch(kernel_fn: JITFunction, grid, *args, num_warps=4, **constexprs):
    """Run ``kernel_fn[grid](*args, **constexprs)`` on the current backend.

    Array arguments must belong to the backend: NumPy arrays run in the
    interpreter, CuPy arrays in the compiled kernel on CuPy's current stream.
    """
    backend = get_backend()
    if backend == "numpy":
        raise RuntimeError(f"{kernel_fn.__name__}: Triton kernels do not run on the numpy backend")
    on_device = backend == "cuda"
    adapter = DeviceArray if on_device else HostArray
    wrapped = []
    for a in args:
        if type(a) in _SCALARS:  # most arguments: sizes and options, passed as they are
            wrapped.append(a)
            continue
        host = isinstance(a, np.ndarray)
        if host or is_cupy_array(a):
            if on_device == host:
                raise TypeError(f"{kernel_fn.__name__}: a {type(a).__module__} array was given "
                                f"to a kernel on the {backend} backend")
            if a.size > MAX_ELEMENTS:
                raise ValueError(f"{kernel_fn.__name__}: an array of shape {a.shape} ({a.size:,} elements): the "
                                 f"kernels index with int32 offsets, so an array holds at most {MAX_ELEMENTS:,} "
                                 f"elements (use a smaller batch)")
            a = adapter(a)
        wrapped.append(a)
    call = Launch(kernel_fn, grid, tuple(wrapped), num_warps, constexprs, on_device)
    recorded = getattr(_recording, "launches", None)
    if recorded is not None:
        recorded.append(call)
        if not _recording.run:
            return
    _run(call)


def replay(launches):
    """Run recorded launches again, in order, on the arrays they were recorded with (the
    interpret backend's stand-in for replaying a CUDA graph)."""
    for call in launches:
        _run(call)


#: Called after an interpreted launch stopped partway (an error, Ctrl-C): state that programs keep
#: across launches may be left half-updated (the arrival counters of kernels/batchnorm.py). A
#: compiled launch cannot stop partway: it finishes, or the CUDA context is lost.
_after_interrupted_launch = []


def after_interrupted_launch(fn):
    """Decorator: call ``fn()`` whenever an interpreted launch raises before its last program ran."""
    _after_interrupted_launch.append(fn)
    return fn


def _run(call: Launch):
    if call.compiled:
        _cuda_driver_on_cupy()
        call.kernel_fn[call.grid](*call.args, num_warps=call.num_warps, enable_fp_fusion=True, **call.constexprs)
        return
    _fix_interpreter_scalar_index()
    _fix_interpreter_bfloat16()
    with _interpreter_lock, _interpreting():
        try:
            _interpreted(call.kernel_fn.fn)[call.grid](*call.args, **call.constexprs)
        except BaseException:
            for repair in _after_interrupted_launch:
                repair()
            raise
