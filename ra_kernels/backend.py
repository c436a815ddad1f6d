"""Which backend runs the ops, and how arrays reach Triton.

Three backends share one op contract:

* ``"cuda"``: CuPy arrays on the GPU, Triton kernels compiled for it.
* ``"interpret"``: NumPy arrays, the *same* Triton source run by Triton's
  interpreter on the CPU. Slow; it exists so that every kernel is tested on
  machines without a GPU.
* ``"numpy"``: NumPy arrays, the ops of ``reference/`` (im2col + BLAS). The
  backend for real CPU runs, and the only one that also accepts float64.

Selection, first match wins: ``set_backend(name)`` / ``use_backend(name)``;
then :func:`default_backend`: the environment variable ``RA_BACKEND``; ``"cuda"``
when CuPy sees a GPU; ``"numpy"``.

Kernels are written, registered and launched through ``ra_kernels.launch``,
which reads the selection made here.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import ml_dtypes
import numpy as np

BACKENDS = ("cuda", "interpret", "numpy")
PRECISIONS = ("tf32", "ieee", "bf16")
#: bfloat16 storage of activations (precision "bf16"): ml_dtypes' NumPy type, which Triton reads as
#: bf16 and CuPy 14 accepts too. Kernels compute in float32 (kernels/storage.py).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
#: bfloat16's unit roundoff: 8 significant bits, so one rounding to nearest is off by at most
#: 2**-8 of the value (the tests' bounds are built from it).
BFLOAT16_ROUNDOFF = 2.0 ** -8

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


def default_backend() -> str:
    """The backend when none is set: ``RA_BACKEND`` when it is set, else ``"cuda"`` when CuPy sees
    a GPU, else ``"numpy"``. The one selection rule (``train.cifar --backend auto`` uses it too)."""
    env = os.environ.get("RA_BACKEND")
    if not env:
        return "cuda" if gpu_available() else "numpy"
    try:
        return _check_name(env)
    except (ValueError, RuntimeError) as error:
        raise type(error)(f"the environment variable RA_BACKEND={env!r}: {error}") from None


def get_backend() -> str:
    """The name of the backend ops run on now."""
    if _selected["backend"] is None:
        _selected["backend"] = default_backend()
    return _selected["backend"]


def set_backend(name: str | None) -> str | None:
    """Select the backend by name ('cuda', 'interpret' or 'numpy'), or None for
    :func:`default_backend`; returns the previous selection (None where none was made)."""
    if name is None:
        default_backend()  # a bad RA_BACKEND is reported here, with the selection left as it was
    else:
        _check_name(name)
    previous, _selected["backend"] = _selected["backend"], name
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("interpret"): ...`` runs the block on that backend."""
    previous = set_backend(name)
    try:
        yield
    finally:
        _selected["backend"] = previous  # as it was, checked when it was set


def uses_triton() -> bool:
    """True when ops run as Triton kernels (cuda or interpret backend)."""
    return get_backend() != "numpy"


def choose(numpy_version, triton_version):
    """The one place the NumPy-or-kernel choice is made: ``numpy_version`` (from reference/) on the
    numpy backend, ``triton_version`` (from kernels/) on cuda and interpret. Modules or functions
    with one signature, so that a caller chooses in one line."""
    return triton_version if uses_triton() else numpy_version


def check_array(where: str, name: str, a, hint: str = "", also: str = ""):
    """``a`` itself when it is an array of the current backend: NumPy on numpy and interpret,
    CuPy on cuda. Otherwise a TypeError naming ``where`` (the op) and ``name`` (the argument),
    what was given and what the backend takes, then ``hint``. ``also``: what else the caller
    accepts, for the message (" or a Tensor")."""
    backend = get_backend()
    wanted = "CuPy" if backend == "cuda" else "NumPy"
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        kind = type(a).__module__.split(".")[0] + "." + type(a).__name__
        raise TypeError(f"{where}: {name} must be a NumPy or CuPy array{also}, got {type(a).__name__} (it must "
                        f"be a {wanted} array on the {backend} backend, got a {kind}){hint}")
    if is_cupy_array(a) != (backend == "cuda"):
        given = "CuPy" if is_cupy_array(a) else "NumPy"
        raise TypeError(f"{where}: {name} is a {given} array but the backend is {backend!r}, which takes "
                        f"{wanted} arrays (convert with ra_kernels.backend.asarray){hint}")
    if not a.dtype.isnative:  # kernels read memory in this machine's byte order
        raise TypeError(f"{where}: {name} is {a.dtype.name} in the other byte order ({a.dtype.str}); convert it "
                        f"with {name}.astype({name}.dtype.newbyteorder('=')){hint}")
    return a


# The checks of scalar arguments, shared by the ops, the optimizer, the models and the data: each
# gives a Python number (Triton cannot specialise NumPy scalars) or a ValueError naming ``where``
# and ``name``. Bools are not numbers here (``stride=True`` is a mistake, not 1).

def _unwrapped(value):
    """A 0-d NumPy array as the NumPy scalar it holds, so that the checks below take it as they take
    that scalar (``np.array(0.1)``, what a NumPy reduction can give); anything else unchanged."""
    return value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value


def check_int(where: str, name: str, value, minimum: int) -> int:
    """``value`` as a Python int: an integer (Python or NumPy, a 0-d NumPy array too) >= ``minimum``."""
    value = _unwrapped(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(where: str, name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a Python float: a finite number (Python or NumPy, a 0-d NumPy array too) in
    [low, high], or (low, high] with ``low_open``. A CuPy array is refused: reading it would wait
    for the device."""
    value = _unwrapped(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range, 10**400
        value = math.inf if value > 0 else -math.inf
    if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        above = f"{'>' if low_open else '>='} {low:g}"
        within = above if math.isinf(high) else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{where}: {name} must be a finite number {within}, got {value:g}")
    return value


def check_flag(where: str, name: str, value) -> bool:
    """``value`` as a Python bool: True, False or a NumPy bool (a 0-d NumPy array too)."""
    value = _unwrapped(value)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {name} must be True or False, got {value!r}")
    return bool(value)


def check_labels(where: str, labels, count: int, classes: int):
    """``labels`` itself when it is a C-contiguous integer array (count,) of the current backend
    whose values lie in [0, classes); otherwise a TypeError or ValueError naming ``where``. Kernels
    read labels by their index, so a strided view would be read as other labels. The values are
    checked on host arrays only: on cuda that would read the labels back mid-step, and the loss
    kernel makes a row with a label out of range NaN instead (kernels/loss.py)."""
    labels = check_array(where, "labels", labels)
    if labels.dtype.kind not in "iu" or labels.shape != (count,):
        raise ValueError(f"{where}: labels must be integers of shape ({count},), got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    if not labels.flags.c_contiguous:
        raise ValueError(f"{where}: labels must be C-contiguous (strides {labels.strides}); pass a contiguous copy")
    if isinstance(labels, np.ndarray) and labels.size and not (0 <= labels.min() and labels.max() < classes):
        raise ValueError(f"{where}: labels must lie in [0, {classes}), got values from {labels.min()} to "
                         f"{labels.max()}")
    return labels


def xp():
    """The array module of the current backend: cupy for 'cuda', numpy otherwise."""
    return _cupy() if get_backend() == "cuda" else np


# --------------------------------------------------------------------------- precision

def get_precision() -> str:
    """The precision ops run at: 'tf32' (default), 'ieee' or 'bf16' (see :func:`set_precision`)."""
    return _selected["precision"]


def set_precision(precision: str) -> str:
    """Select the precision of the kernels; returns the previous setting.

    * ``"tf32"``: float32 storage, float32 matrix products with TF32 inputs (the default).
    * ``"ieee"``: float32 storage, float32 matrix products in full float32.
    * ``"bf16"``: activations and their gradients stored as bfloat16, matrix products with
      bfloat16 inputs; parameters, their gradients, batch-norm statistics, logits, the loss and
      the optimizer stay float32 (docs/design.md §8). The cuda and interpret backends only.

    Accumulation is float32 always. The numpy backend computes in the arrays' own precision
    (float32 or float64) and ignores "tf32"; "bf16" is refused there, by the first op that
    would store a bfloat16 activation.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    previous, _selected["precision"] = _selected["precision"], precision
    return previous


def dot_precision() -> str:
    """tl.dot's ``input_precision`` for float32 operands under the current precision: "ieee" or
    "tf32". Under "bf16" the operands are bfloat16 and this setting does not apply to them; the
    few float32 products left (none in the network) take TF32."""
    return "ieee" if _selected["precision"] == "ieee" else "tf32"


@contextlib.contextmanager
def use_precision(precision: str):
    previous = set_precision(precision)
    try:
        yield
    finally:
        set_precision(previous)


def settings() -> tuple:
    """(backend, precision) in force now: what fixes how an op computes. The autograd engine records
    them with each op and runs the op's backward under them (:func:`use_settings`)."""
    return get_backend(), _selected["precision"]


@contextlib.contextmanager
def use_settings(chosen: tuple):
    """Run the block under ``chosen``, (backend, precision) from :func:`settings` (checked when they
    were set), and restore the settings in force after it."""
    previous = _selected["backend"], _selected["precision"]
    _selected["backend"], _selected["precision"] = chosen
    try:
        yield
    finally:
        _selected["backend"], _selected["precision"] = previous


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


# Per thread: the allocator of empty() (None: the backend's own) and whether host reads are refused.
_thread = threading.local()


def empty(shape, dtype=np.float32):
    """An uninitialised array of the current backend for a kernel to write.

    Under :func:`poison_outputs` it is filled with NaN (float), -1 (signed) or
    the largest value (unsigned) instead, so that an element a kernel forgets to write shows up.
    Inside :func:`use_allocator` the array comes from that allocator.
    """
    allocate = getattr(_thread, "allocate", None)
    out = allocate(shape, dtype) if allocate is not None else xp().empty(shape, dtype=dtype)
    if _selected["poison"]:
        dtype = np.dtype(dtype)
        floating = dtype.kind == "f" or dtype == BFLOAT16
        out.fill(np.nan if floating else -1 if dtype.kind == "i" else np.iinfo(dtype).max)
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


@contextlib.contextmanager
def use_allocator(allocate):
    """Inside the block, :func:`empty` called from this thread returns ``allocate(shape, dtype)``:
    how a captured step keeps its arrays in a pool of its own (ra_kernels/graph.py)."""
    previous, _thread.allocate = getattr(_thread, "allocate", None), allocate
    try:
        yield
    finally:
        _thread.allocate = previous


@contextlib.contextmanager
def no_host_reads(why: str):
    """Inside the block, :func:`to_numpy` called from this thread raises RuntimeError(``why``...):
    a step being captured as a CUDA graph must not wait for the device."""
    previous, _thread.no_host_reads = getattr(_thread, "no_host_reads", None), why
    try:
        yield
    finally:
        _thread.no_host_reads = previous


def host_reads_refused() -> bool:
    """True inside :func:`no_host_reads` on this thread: while a step is being captured."""
    return getattr(_thread, "no_host_reads", None) is not None


def to_numpy(a) -> np.ndarray:
    """A host NumPy copy (or view) of an array of any backend."""
    why = getattr(_thread, "no_host_reads", None)
    if why is not None:
        raise RuntimeError(f"an array of shape {tuple(a.shape)} was read back to the host {why}")
    return a.get() if is_cupy_array(a) else np.asarray(a)


def memory_of(a) -> str:
    """Where an array lives: 'device' for a CuPy array (the cuda backend's), 'host' for a NumPy
    array (the numpy and interpret backends')."""
    if is_cupy_array(a):
        return "device"
    if isinstance(a, np.ndarray):
        return "host"
    raise TypeError(f"expected a NumPy or CuPy array, got {type(a).__name__}")
