"""Pooling kernels over NHWC activations: max pooling with argmax, global average pooling.

Layouts: x (N, H, W, C) float32 or bfloat16 (computed in float32), C-contiguous, NumPy (interpret backend) or
CuPy (cuda backend). All four kernels are memory-bound, so each program works
on a [BLOCK_P positions x BLOCK_C channels] tile with channels the fastest
axis (:func:`tiles.nhwc_tile`): a row of the tile is BLOCK_C contiguous float32, and
loads and stores vectorise when C is a multiple of 4. Offsets are int32:
``launch`` refuses an array of 2**31 elements or more (ImageNet's largest activation at batch
256, 256x56x56x256, is 2.1e8).

The launchers mirror ``reference/pool.py``: ``op(...) -> (out, saved)``,
``op_backward(dy, saved) -> (dx,)``.
"""
import triton.language as tl

from ..backend import empty
from ..launch import kernel, launch
from . import storage
from .tiles import TILES_AOT, TILES_TYPES_AOT, cdiv, nhwc_tile, out_size, positions

def _argmax_dtype(kernel_size):
    """As in reference/: the row-major tap index fits int8 up to 128 taps (11x11)."""
    return "int8" if kernel_size * kernel_size <= 128 else "int32"



# --------------------------------------------------------------------------- max pooling

# (KSIZE, STRIDE, PAD, argmax type): the network's 3x3/s2/p1 and the tests' others (overlapping,
# tiling, gapped windows, and 12x12 windows, whose 144 taps need an int32 argmax).
# (3, 2, 0): the ImageNet networks' stem pooling, in ceil mode (which only changes OH and OW).
_MAX_POOL_AOT = [(3, 2, 1, "*i8"), (2, 2, 0, "*i8"), (3, 1, 1, "*i8"), (2, 3, 0, "*i8"), (12, 1, 6, "*i32"),
                 (3, 2, 0, "*i8")]


@kernel(aot=[dict(x_ptr=f"*{t}", y_ptr=f"*{t}", argmax_ptr=idx, H="i32", W="i32", C="i32",
                  OH="i32", OW="i32", n_out="i32", KSIZE=k, STRIDE=s, PAD=p, BLOCK_P=bp, BLOCK_C=bc)
             for k, s, p, idx in _MAX_POOL_AOT for (bp, bc), t in TILES_TYPES_AOT])
def max_pool2d_kernel(x_ptr, y_ptr, argmax_ptr, H, W, C, OH, OW, n_out,
                      KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[n, oh, ow, c] = max of x over the KSIZE x KSIZE window at (oh*STRIDE - PAD, ow*STRIDE - PAD).

    x (N, H, W, C) and y (N, OH, OW, C), float32 or bfloat16 (both the same); argmax (N, OH, OW, C) int8
    or int32: the row-major tap index kh*KSIZE + kw of the first maximum. Padding
    reads as -inf but is never the argmax: a window whose inputs are all -inf points at the
    first of them. A NaN wins over numbers and the first NaN is kept, as np.argmax does.
    Grid: (cdiv(n_out, BLOCK_P), cdiv(C, BLOCK_C)), n_out = N*OH*OW.
    """
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)      # flat (n, oh, ow), [BLOCK_P]
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)     # [BLOCK_C]
    n, oh, ow = positions(pos, OH, OW)
    tile_mask = (pos < n_out)[:, None] & (chan < C)[None, :]
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    best_tap = tl.full((BLOCK_P, BLOCK_C), 0, tl.int32)
    seen = tl.zeros((BLOCK_P,), tl.int1)  # an inside tap visited yet, per position
    # Taps in row-major order with a strict comparison: ties keep the first maximum. The first
    # tap inside x is taken whatever its value, so that an all -inf window's gradient reaches
    # an input rather than the padding (which the backward drops). Columns
    # unroll; rows unroll up to 4x4 windows (the network's 3x3: all 9 loads in flight, as with one
    # unrolled loop) and loop above: 144 unrolled taps of a 12x12 window made the forward and
    # backward take 94 s to compile on the H200 machine (2026-11-30), now under a second each.
    for kh in tl.range(KSIZE, loop_unroll_factor=KSIZE if KSIZE <= 4 else 1):
        ih = oh * STRIDE - PAD + kh
        row_inside = (ih >= 0) & (ih < H)
        for kw in tl.static_range(KSIZE):
            iw = ow * STRIDE - PAD + kw
            inside = row_inside & (iw >= 0) & (iw < W)
            row = ((n * H + ih) * W + iw) * C
            v = tl.load(x_ptr + row[:, None] + chan[None, :], mask=tile_mask & inside[:, None],
                        other=float("-inf")).to(tl.float32)
            first = inside & ~seen
            take = (v > best) | ((v != v) & (best == best)) | first[:, None]  # (v != v): NaN, taken once
            best = tl.where(take, v, best)
            best_tap = tl.where(take, kh * KSIZE + kw, best_tap)
            seen = seen | inside
    out = pos[:, None] * C + chan[None, :]
    storage.store(y_ptr + out, best, tile_mask)  # a value of x: exact in x's type
    tl.store(argmax_ptr + out, best_tap.to(argmax_ptr.dtype.element_ty), mask=tile_mask)


@kernel(aot=[dict(dy_ptr=f"*{t}", argmax_ptr=idx, dx_ptr=f"*{t}", H="i32", W="i32", C="i32",
                  OH="i32", OW="i32", n_in="i32", KSIZE=k, STRIDE=s, PAD=p, ACCUMULATE=(bp, bc) == TILES_AOT[0],
                  BLOCK_P=bp, BLOCK_C=bc)
             for k, s, p, idx in _MAX_POOL_AOT for (bp, bc), t in TILES_TYPES_AOT])
def max_pool2d_backward_kernel(dy_ptr, argmax_ptr, dx_ptr, H, W, C, OH, OW, n_in,
                               KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                               ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[n, ih, iw, c] = sum of dy over the windows whose argmax is (ih, iw), by gather.

    dy (N, OH, OW, C) and dx (N, H, W, C) float32 or bfloat16 (summed in float32), argmax
    (N, OH, OW, C) int8/int32 from the forward. Gather, not scatter: each input element visits the
    windows that can cover it, at most cdiv(KSIZE, STRIDE) per axis (the window
    rows oh with oh*STRIDE - PAD <= ih < oh*STRIDE - PAD + KSIZE), and sums the dy
    of those whose argmax tap is its own position in that window. So there are no
    atomics, the sum order is fixed (deterministic), and each dx element is
    written once, zeros included (no memset). Grid: (cdiv(n_in, BLOCK_P),
    cdiv(C, BLOCK_C)), n_in = N*H*W. ACCUMULATE: dx holds x's gradient from its other
    consumers, and this one is added into it.
    """
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)      # flat (n, ih, iw), [BLOCK_P]
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, ih, iw = positions(pos, H, W)
    tile_mask = (pos < n_in)[:, None] & (chan < C)[None, :]
    # The last window row that can cover ih starts at or before it: oh_last = (ih + PAD) // STRIDE
    # (ih + PAD >= 0, so // is floor); earlier candidates step back one window at a time.
    oh_last = (ih + PAD) // STRIDE
    ow_last = (iw + PAD) // STRIDE
    acc = tl.full((BLOCK_P, BLOCK_C), 0, tl.float32)
    WINDOWS: tl.constexpr = (KSIZE + STRIDE - 1) // STRIDE      # per axis
    for i in tl.range(WINDOWS, loop_unroll_factor=WINDOWS if KSIZE <= 4 else 1):  # rows as in the forward
        oh = oh_last - i
        kh = ih + PAD - oh * STRIDE                                # >= 0 by construction
        row_ok = (oh >= 0) & (oh < OH) & (kh < KSIZE)
        for j in tl.static_range(WINDOWS):
            ow = ow_last - j
            kw = iw + PAD - ow * STRIDE
            ok = row_ok & (ow >= 0) & (ow < OW) & (kw < KSIZE)
            win = (((n * OH + oh) * OW + ow) * C)[:, None] + chan[None, :]
            mask = tile_mask & ok[:, None]
            hit = tl.load(argmax_ptr + win, mask=mask, other=-1) == (kh * KSIZE + kw)[:, None]
            acc += tl.load(dy_ptr + win, mask=mask & hit, other=0.0).to(tl.float32)
    storage.store_or_add(dx_ptr + pos[:, None] * C + chan[None, :], acc, tile_mask, ACCUMULATE)


def max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=False):
    """Max over each kernel_size^2 window of x (N, H, W, C) -> (y (N, OH, OW, C), saved).

    OH = (H + 2*padding - kernel_size) // stride + 1 (likewise OW), rounded up with
    ``ceil_mode`` (tiles.out_size); padding, and what the last windows reach past it in ceil
    mode, counts as -inf (the kernels bound every tap by H and W, and the backward every window
    by OH and OW, so ceil mode is only the output's size). saved holds the argmax (N, OH, OW, C),
    int8 (int32 above 128 taps), the row-major tap index of the first maximum in its window. One
    call reads x about (kernel_size/stride)^2 times through the cache but from DRAM once, and
    writes y and the argmax: 4*N*H*W*C + 5*N*OH*OW*C bytes (3x3/s2/p1 on 64x32x32x64:
    16.8 MB + 5.2 MB).
    """
    n, h, w, c = x.shape
    oh, ow = (out_size(size, kernel_size, stride, padding, ceil_mode) for size in (h, w))
    y = empty((n, oh, ow, c), x.dtype)
    argmax = empty((n, oh, ow, c), _argmax_dtype(kernel_size))
    block_p, block_c = nhwc_tile(c)
    n_out = n * oh * ow
    launch(max_pool2d_kernel, (cdiv(n_out, block_p), cdiv(c, block_c)),
           x, y, argmax, h, w, c, oh, ow, n_out,
           KSIZE=kernel_size, STRIDE=stride, PAD=padding, BLOCK_P=block_p, BLOCK_C=block_c)
    return y, (argmax, (h, w), kernel_size, stride, padding)


def max_pool2d_backward(dy, saved, dx_into=None):
    """dx (N, H, W, C): each dy element goes to its window's argmax; overlapping windows add. With
    ``dx_into`` (x's gradient from its other consumers) dx is added into it, which is returned.

    Reads dy and the argmax (5 bytes per output element, each about
    (kernel_size/stride)^2 times through the cache), writes dx once (4 bytes per input element).
    """
    argmax, (h, w), kernel_size, stride, padding = saved
    n, oh, ow, c = dy.shape
    dx = empty((n, h, w, c), dy.dtype) if dx_into is None else dx_into
    block_p, block_c = nhwc_tile(c)
    n_in = n * h * w
    launch(max_pool2d_backward_kernel, (cdiv(n_in, block_p), cdiv(c, block_c)),
           dy, argmax, dx, h, w, c, oh, ow, n_in,
           KSIZE=kernel_size, STRIDE=stride, PAD=padding, ACCUMULATE=dx_into is not None, BLOCK_P=block_p,
           BLOCK_C=block_c)
    return (dx,)


# --------------------------------------------------------------------------- global average pooling

@kernel(aot=[dict(x_ptr=f"*{t}", y_ptr=f"*{t}", C="i32", n_hw="i32", BLOCK_HW=bp, BLOCK_C=bc)
             for (bp, bc), t in TILES_TYPES_AOT])
def global_avg_pool_kernel(x_ptr, y_ptr, C, n_hw, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[n, c] = mean of x[n, :, :, c] over the n_hw = H*W positions.

    x (N, H, W, C), y (N, C), float32 or bfloat16 (summed in float32). Grid: (N, cdiv(C, BLOCK_C)); each
    program sweeps its sample's H*W positions in BLOCK_HW-row tiles, keeping a
    [BLOCK_HW, BLOCK_C] float32 partial sum that is reduced over positions once at the end.
    """
    n = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chan < C
    acc = tl.full((BLOCK_HW, BLOCK_C), 0, tl.float32)
    for start in range(0, n_hw, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        offs = ((n * n_hw + hw) * C)[:, None] + chan[None, :]
        acc += tl.load(x_ptr + offs, mask=(hw < n_hw)[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
    # Correctly rounded division (plain / is approximate on the GPU); tl.cast, not n_hw.to(...):
    # an int argument equal to 1 reaches the compiled kernel as a constexpr.
    mean = tl.math.div_rn(tl.sum(acc, axis=0), tl.cast(n_hw, tl.float32))
    storage.store(y_ptr + n * C + chan, mean, chan_ok)


@kernel(aot=[dict(dy_ptr=f"*{t}", dx_ptr=f"*{t}", C="i32", n_hw="i32", n_in="i32", BLOCK_P=bp, BLOCK_C=bc)
             for (bp, bc), t in TILES_TYPES_AOT])
def global_avg_pool_backward_kernel(dy_ptr, dx_ptr, C, n_hw, n_in,
                                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[n, h, w, c] = dy[n, c] / n_hw, n_hw = H*W.

    dy (N, C), dx (N, H, W, C), float32 or bfloat16. Grid: (cdiv(n_in, BLOCK_P),
    cdiv(C, BLOCK_C)) over the n_in = N*H*W positions; the dy rows a tile needs
    are read through the cache, dx is written once.
    """
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)      # flat (n, h, w)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile_mask = (pos < n_in)[:, None] & (chan < C)[None, :]
    dy = tl.load(dy_ptr + ((pos // n_hw) * C)[:, None] + chan[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    storage.store(dx_ptr + pos[:, None] * C + chan[None, :], tl.math.div_rn(dy, tl.cast(n_hw, tl.float32)),
                  tile_mask)


def global_avg_pool(x):
    """Mean over H and W: x (N, H, W, C) -> (y (N, C), saved).

    Reads x once and writes y: 4*N*(H*W + 1)*C bytes.
    """
    n, h, w, c = x.shape
    y = empty((n, c), x.dtype)
    block_hw, block_c = nhwc_tile(c)
    launch(global_avg_pool_kernel, (n, cdiv(c, block_c)), x, y, c, h * w,
           BLOCK_HW=block_hw, BLOCK_C=block_c)
    return y, (x.shape,)


def global_avg_pool_backward(dy, saved):
    """dx (N, H, W, C) = dy / (H*W) broadcast over H and W. Writes dx once: 4*N*H*W*C bytes."""
    (x_shape,) = saved
    n, h, w, c = x_shape
    dx = empty(x_shape, dy.dtype)
    block_p, block_c = nhwc_tile(c)
    n_in = n * h * w
    launch(global_avg_pool_backward_kernel, (cdiv(n_in, block_p), cdiv(c, block_c)),
           dy, dx, c, h * w, n_in, BLOCK_P=block_p, BLOCK_C=block_c)
    return (dx,)
