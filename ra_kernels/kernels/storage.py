"""Storage types: kernels compute in float32 and store float32 or bfloat16 (docs/design.md §8).

A kernel takes the storage type from its pointers, so one Triton source serves both: loads
widen with ``.to(tl.float32)``, and stores go through :func:`store`, which rounds to the
pointer's type. Into bfloat16 that is ``.to(tl.bfloat16)``: compiled, ``cvt.rn.bf16.f32`` (round
to nearest, ties to even); interpreted, the same bits, those of ``ml_dtypes.bfloat16``, since
``launch._fix_interpreter_bfloat16`` mends the interpreter's truncation.
"""
import triton.language as tl

from ..launch import device_function


@device_function
def to_type_of(value, ptr):
    """``value`` in the element type of the pointer(s) ``ptr``: float32 as it is, bfloat16 rounded to
    nearest even. The conv kernels make their dot operands so: bfloat16 storage multiplies in
    bfloat16, float32 in float32 (TF32 or IEEE)."""
    return value.to(ptr.dtype.element_ty)


@device_function
def store(ptrs, value, mask):
    """Store float32 ``value`` at ``ptrs`` in their element type (see :func:`to_type_of`); returns
    what was stored, as float32, for an epilogue that goes on from it (statistics of the stored
    values, not of values no later kernel sees)."""
    stored = to_type_of(value, ptrs)
    tl.store(ptrs, stored, mask=mask)
    return stored.to(tl.float32)


@device_function
def store_or_add(ptrs, value, mask, ACCUMULATE: tl.constexpr):
    """:func:`store`, or with ACCUMULATE add ``value`` into what ``ptrs`` hold first (a gradient
    buffer, or the gradient of a tensor's other consumer); returns what was stored, as float32."""
    if ACCUMULATE:
        value += tl.load(ptrs, mask=mask).to(tl.float32)
    return store(ptrs, value, mask)
