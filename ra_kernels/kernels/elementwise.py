"""Elementwise kernels: add, relu and relu's backward, cast; and the array arithmetic of the autograd
engine and the optimizer (fill, copy, add in place), so that a training step is kernels only.

Arrays of any shape, float32 or bfloat16 (each array its own: computed in float32, stored as
the output's type, kernels/storage.py), C-contiguous, all of one shape, NumPy (interpret
backend) or CuPy (cuda backend). They are memory-bound: each call reads two
arrays and writes one, 12 bytes per element in float32, so the loop is a flat 1-D sweep in
``BLOCK_N``-element tiles whose accesses vectorise (BLOCK_N = tiles.FLAT_BLOCK = 1024 over 4 warps
is 8 contiguous float32 per thread: two 128-bit loads per array).
Offsets are int32: ``launch`` refuses an array of 2**31 elements or more (ImageNet's largest
activation at batch 256, 256x56x56x256, is 2.1e8).
"""
import triton.language as tl

from ..backend import empty, empty_like
from ..launch import kernel, launch
from . import storage
from .tiles import FLAT_BLOCK

_OPS = ("add", "relu", "relu_backward", "copy", "fill")


# Every op in both storage types, and the copies between them (cast: the network's input under
# precision "bf16", and its gradient).
_TYPES = [(t, t) for t in ("fp32", "bf16")] + [("fp32", "bf16"), ("bf16", "fp32")]


@kernel(aot=[dict(a_ptr=f"*{a}", b_ptr=f"*{a}", out_ptr=f"*{out}", value="fp32", n="i32", OP=op, BLOCK_N=FLAT_BLOCK)
             for op in _OPS for a, out in _TYPES if a == out or op == "copy"])
def elementwise_kernel(a_ptr, b_ptr, out_ptr, value, n, OP: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = OP(a, b) over n elements (out may be a or b: each element is read before it is written).

    OP = "add": a + b.  "relu": max(a, 0) (b unused).
    "relu_backward": a where b > 0 else 0, with a = dy and b = relu's output y.
    "copy": a.  "fill": ``value`` (a and b unused).
    """
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = offs < n
    if OP == "fill":
        storage.store(out_ptr + offs, tl.full([BLOCK_N], value, tl.float32), in_bounds)
        return
    a = tl.load(a_ptr + offs, mask=in_bounds).to(tl.float32)
    if OP == "copy":
        out = a
    elif OP == "add":
        out = a + tl.load(b_ptr + offs, mask=in_bounds).to(tl.float32)
    elif OP == "relu":
        out = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as PyTorch
    else:
        out = tl.where(tl.load(b_ptr + offs, mask=in_bounds).to(tl.float32) > 0.0, a, 0.0)
    storage.store(out_ptr + offs, out, in_bounds)


def _run(op, a, b, out=None, value=0.0):
    out = empty_like(a) if out is None else out
    n = out.size
    launch(elementwise_kernel, ((n + FLAT_BLOCK - 1) // FLAT_BLOCK,), a, b, out, value, n, OP=op,
           BLOCK_N=FLAT_BLOCK)
    return out


# Launchers mirror reference/: op(...) -> (out, saved), op_backward(dy, saved) -> grads.

def add(a, b):
    """a + b, same shapes."""
    return _run("add", a, b), ()


def add_backward(dy, saved):
    return dy, dy  # the identity for both inputs: no kernel, no copy


def fill(out, value):
    """Every element of ``out`` set to ``value``, in place; returns out."""
    return _run("fill", out, out, out, float(value))


def copy(a):
    """A new array equal to a."""
    return _run("copy", a, a)


def cast(x, dtype):
    """x converted to ``dtype`` (float32 or bfloat16, rounded to nearest even); saves x's dtype."""
    return _run("copy", x, x, empty(x.shape, dtype)), (x.dtype,)


def cast_backward(dy, saved):
    """dx = dy in the input's dtype."""
    return (cast(dy, *saved)[0],)


def add_into(into, g):
    """into += g, in place; returns into."""
    return _run("add", into, g, into)


def gradient_into(g, into):
    """A backward's gradient g, added into ``into`` when one is given (then ``into`` is returned),
    as reference.gradient_into: for a parameter's buffer that its kernel could not add into."""
    return g if into is None else add_into(into, g)


def relu(x):
    """max(x, 0); saves its output for the backward mask."""
    y = _run("relu", x, x)
    return y, (y,)


def relu_backward(dy, saved):
    """dx = dy * [y > 0]."""
    (y,) = saved
    return (_run("relu_backward", dy, y),)
