"""Storage types: kernels compute in float32 and store float32 or bfloat16 (docs/design.md §8).

A kernel takes the storage type from its pointers, so one Triton source serves both: loads
widen with ``.to(tl.float32)``, and stores go through :func:`store`, which rounds to the
pointer's type. The rounding is written out in integer arithmetic rather than left to
``.to(tl.bfloat16)``: compiled, that cast is ``cvt.rn.bf16.f32`` (round to nearest, ties to
even), but triton 3.6's interpreter truncates it (its fp_trunc drops the low 16 bits), so the
CPU tests would see a different, biased rounding. Written out, both backends give the same
bits, those of ``cvt.rn`` and of ``ml_dtypes.bfloat16``, NaN and infinities included.
"""
import triton.language as tl

from ..launch import device_function


@device_function
def round_to_bfloat16(x):
    """float32 x rounded to the nearest bfloat16, ties to even (the top 16 bits of the result).

    On the bits: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits. A carry out of
    the mantissa steps the exponent, and the largest finite values round to infinity, as IEEE
    rounding does; infinities stay. A NaN is not rounded (the add could carry its all-ones
    mantissa into the sign bit) but truncated with its quiet bit set, so it stays a NaN.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    is_nan = x != x
    kept = tl.where(is_nan, bits | 0x400000, rounded)  # a quiet NaN, whatever its payload
    return (kept >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@device_function
def to_type_of(value, ptr):
    """``value`` in the element type of the pointer(s) ``ptr``: float32 as it is, bfloat16 rounded to
    nearest even (from any float type). The conv kernels make their dot operands so: bfloat16
    storage multiplies in bfloat16, float32 in float32 (TF32 or IEEE)."""
    ty = ptr.dtype.element_ty
    if value.dtype != ty:
        if ty == tl.bfloat16:
            value = round_to_bfloat16(value.to(tl.float32))
        else:
            value = value.to(ty)
    return value


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
