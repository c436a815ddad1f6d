"""Bilinear resizing with aligned corners over NHWC activations, the skip add fused in.

Layouts: x (N, H, W, C), y and skip (N, OH, OW, C), float32 or bfloat16 (each its own; computed
in float32, kernels/storage.py), C-contiguous,
NumPy (interpret backend) or CuPy (cuda backend). Tiles are [BLOCK_P positions
x BLOCK_C channels] with channels the fastest axis (``tiles.nhwc_tile``).
Offsets are int32: fine below 2**31 elements per array.

Source coordinates. Output index o of an axis samples src = o * (in - 1) / (out - 1)
(src = 0 when out == 1). The kernels compute it as the exact ratio of integers
num = in - 1 and den = out - 1 (num = 0, den = 1 when out == 1): lo = o*num // den
is the exact floor, hi = min(lo + 1, in - 1), and frac = (o*num - lo*den) / den is
one correctly rounded float32 division, as in reference/. Products o*num stay far
below 2**31.

The launchers mirror ``reference/resize.py``.
"""
import triton.language as tl

from ..backend import empty
from ..launch import device_function, kernel, launch
from . import storage
from .tiles import TILES_TYPES_AOT, cdiv, nhwc_tile, positions


def _axis(in_size, out_size):
    """(num, den, taps) of one axis: src = o * num / den, and taps bounds how many
    outputs read one input index.

    The outputs that read input i are those with src in [i - 1, i + 1), an interval
    of length 2*den/num in o, so at most cdiv(2*den, num) of them; with num = 0
    (in == 1 or out == 1) every output reads index 0.
    """
    num, den = (in_size - 1, out_size - 1) if out_size > 1 else (0, 1)
    return num, den, (cdiv(2 * den, num) if num else out_size)


@device_function
def _source(o, num, den, in_size):
    """Interpolation source of output indices o (int32): (lo, hi, frac), src = o*num/den = lo + frac."""
    scaled = o * num
    lo = scaled // den                                # o, num >= 0: exact floor
    hi = tl.minimum(lo + 1, in_size - 1)
    frac = tl.math.div_rn((scaled - lo * den).to(tl.float32), tl.cast(den, tl.float32))
    return lo, hi, frac


@device_function
def _lerp(below, above, frac):
    """(1 - frac) * below + frac * above; exactly ``below`` where frac = 0, so that an inf
    neighbour of weight 0 gives no 0 * inf = NaN (reference/resize.py does the same)."""
    return tl.where(frac == 0.0, below, (1.0 - frac) * below + frac * above)


@device_function
def _weight(o, i, num, den, in_size):
    """Weight of input index i in output o's interpolation: 1 - frac at lo, + frac at hi."""
    lo, hi, frac = _source(o, num, den, in_size)
    return tl.where(lo == i, 1.0 - frac, 0.0) + tl.where(hi == i, frac, 0.0)


@device_function
def _first_output(i, num, den):
    """The first output index whose src = o*num/den reaches i - 1: cdiv(max(i - 1, 0)*den, num).

    With num = 0 every output has src = 0; dividing by 1 instead gives 0 for i = 0.
    """
    divisor = tl.maximum(num, 1)
    return (tl.maximum(i - 1, 0) * den + divisor - 1) // divisor


_GEOMETRY = dict(H="i32", W="i32", C="i32", OH="i32", OW="i32", num_h="i32", den_h="i32",
                 num_w="i32", den_w="i32")


@kernel(aot=[dict(x_ptr=f"*{t}", skip_ptr=f"*{t}", y_ptr=f"*{t}", **_GEOMETRY, n_out="i32",
                  HAS_SKIP=has_skip, BLOCK_P=bp, BLOCK_C=bc)
             for has_skip in (True, False) for (bp, bc), t in TILES_TYPES_AOT])
def upsample_bilinear_kernel(x_ptr, skip_ptr, y_ptr, H, W, C, OH, OW, num_h, den_h, num_w, den_w, n_out,
                             HAS_SKIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[n, oy, ox, c] = bilinear sample of x at (src(oy), src(ox)) (+ skip[n, oy, ox, c] if HAS_SKIP).

    Grid: (cdiv(n_out, BLOCK_P), cdiv(C, BLOCK_C)), n_out = N*OH*OW. Rows are
    interpolated first, then columns, the order of reference/. skip_ptr is unused
    (any pointer) without HAS_SKIP.
    """
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)      # flat (n, oy, ox), [BLOCK_P]
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)     # [BLOCK_C]
    n, oy, ox = positions(pos, OH, OW)
    tile_mask = (pos < n_out)[:, None] & (chan < C)[None, :]
    y0, y1, fy = _source(oy, num_h, den_h, H)
    x0, x1, fx = _source(ox, num_w, den_w, W)
    row0, row1 = (n * H + y0) * W, (n * H + y1) * W                # [BLOCK_P] pixel indices
    chan2 = chan[None, :]
    x00 = tl.load(x_ptr + ((row0 + x0) * C)[:, None] + chan2, mask=tile_mask, other=0.0).to(tl.float32)
    x10 = tl.load(x_ptr + ((row1 + x0) * C)[:, None] + chan2, mask=tile_mask, other=0.0).to(tl.float32)
    x01 = tl.load(x_ptr + ((row0 + x1) * C)[:, None] + chan2, mask=tile_mask, other=0.0).to(tl.float32)
    x11 = tl.load(x_ptr + ((row1 + x1) * C)[:, None] + chan2, mask=tile_mask, other=0.0).to(tl.float32)
    wy1, wx1 = fy[:, None], fx[:, None]
    left = _lerp(x00, x10, wy1)
    right = _lerp(x01, x11, wy1)
    out = _lerp(left, right, wx1)
    offs = pos[:, None] * C + chan2
    if HAS_SKIP:
        out += tl.load(skip_ptr + offs, mask=tile_mask, other=0.0).to(tl.float32)
    storage.store(y_ptr + offs, out, tile_mask)


@kernel(aot=[dict(dy_ptr=f"*{t}", dx_ptr=f"*{t}", **_GEOMETRY, n_in="i32", taps_h="i32",
                  TAPS_W=taps, BLOCK_P=bp, BLOCK_C=bc)
             for taps in (5, 1) for (bp, bc), t in TILES_TYPES_AOT])       # 5: every 2x upsample of the network
def upsample_bilinear_backward_kernel(dy_ptr, dx_ptr, H, W, C, OH, OW, num_h, den_h, num_w, den_w, n_in,
                                      taps_h, TAPS_W: tl.constexpr,
                                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[n, iy, ix, c] = sum over outputs (oy, ox) of w(oy, iy) * w(ox, ix) * dy[n, oy, ox, c], by gather.

    dy (N, OH, OW, C), dx (N, H, W, C), float32 or bfloat16. Grid: (cdiv(n_in, BLOCK_P),
    cdiv(C, BLOCK_C)), n_in = N*H*W. Each input index i is read by the outputs
    whose src lies in [i - 1, i + 1): at most taps_h rows and TAPS_W columns
    (``_axis``) from ``_first_output`` on. Candidates past the last output are
    masked, and those that do not read i get weight 0. No atomics, a fixed
    summation order (deterministic), each dx element written once. The columns
    are unrolled so that a row's loads are in flight together; the rows are a
    loop, so a large taps_h (a 1-pixel input) does not multiply the code.
    """
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)      # flat (n, iy, ix), [BLOCK_P]
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, iy, ix = positions(pos, H, W)
    tile_mask = (pos < n_in)[:, None] & (chan < C)[None, :]
    oy_first = _first_output(iy, num_h, den_h)
    ox_first = _first_output(ix, num_w, den_w)
    acc = tl.full((BLOCK_P, BLOCK_C), 0, tl.float32)
    for ty in range(taps_h):
        oy = oy_first + ty
        row = tl.full((BLOCK_P, BLOCK_C), 0, tl.float32)             # sum over ox of w(ox, ix) * dy
        for tx in tl.static_range(TAPS_W):
            ox = ox_first + tx
            ok = (oy < OH) & (ox < OW)
            g = tl.load(dy_ptr + (((n * OH + oy) * OW + ox) * C)[:, None] + chan[None, :],
                        mask=tile_mask & ok[:, None], other=0.0).to(tl.float32)
            row += _weight(ox, ix, num_w, den_w, W)[:, None] * g
        acc += _weight(oy, iy, num_h, den_h, H)[:, None] * row
    storage.store(dx_ptr + pos[:, None] * C + chan[None, :], acc, tile_mask)


def upsample_bilinear(x, size, skip=None):
    """Resize x (N, H, W, C) to size = (OH, OW) bilinearly, corners aligned, + skip (N, OH, OW, C) if given.

    Like F.interpolate(x.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=True)
    (+ skip); any sizes, up or down. One kernel either way: it reads the 4 source
    pixels of each output through the cache (x from DRAM about once when upsampling),
    skip once, and writes y once: about 4*N*C*(H*W + 2*OH*OW) bytes with skip
    (8x8 -> 16x16, 64 samples x 256 channels: 4.2 + 33.6 MB).
    """
    n, h, w, c = x.shape
    out_h, out_w = size
    (num_h, den_h, _), (num_w, den_w, _) = _axis(h, out_h), _axis(w, out_w)
    y = empty((n, out_h, out_w, c), x.dtype)
    block_p, block_c = nhwc_tile(c)
    n_out = n * out_h * out_w
    launch(upsample_bilinear_kernel, (cdiv(n_out, block_p), cdiv(c, block_c)),
           x, x if skip is None else skip, y, h, w, c, out_h, out_w, num_h, den_h, num_w, den_w, n_out,
           HAS_SKIP=skip is not None, BLOCK_P=block_p, BLOCK_C=block_c)
    return y, (x.shape, skip is not None)


def upsample_bilinear_backward(dy, saved):
    """Gradients: dy (N, OH, OW, C) -> (dx (N, H, W, C), dskip = dy itself or None).

    Reads dy about once from DRAM (each element by up to 4 inputs, through the
    cache) and writes dx once: 4*N*C*(OH*OW + H*W) bytes.
    """
    (n, h, w, c), has_skip = saved
    _, out_h, out_w, _ = dy.shape
    (num_h, den_h, taps_h), (num_w, den_w, taps_w) = _axis(h, out_h), _axis(w, out_w)
    dx = empty((n, h, w, c), dy.dtype)
    block_p, block_c = nhwc_tile(c)
    n_in = n * h * w
    launch(upsample_bilinear_backward_kernel, (cdiv(n_in, block_p), cdiv(c, block_c)),
           dy, dx, h, w, c, out_h, out_w, num_h, den_h, num_w, den_w, n_in, taps_h,
           TAPS_W=taps_w, BLOCK_P=block_p, BLOCK_C=block_c)
    return dx, (dy if has_skip else None)  # the skip add's gradient is dy: no kernel, no copy
