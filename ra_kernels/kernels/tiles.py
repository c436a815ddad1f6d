"""Shapes and tiles: the output size of a window op, and the block shapes of the memory-bound
kernels, in one place (docs/design.md §1).

Flat 1-D sweeps take FLAT_BLOCK elements a program. Tiles over (rows, channels), with channels
the contiguous axis so that a tile row is one coalesced run, come from :func:`channel_tile`:
NHWC activations (:func:`nhwc_tile`; batch norm and channel attention with their own tile
sizes) and rows of class scores (:func:`row_tile`).
"""
import triton.language as tl  # noqa: F401  (Triton's interpreter requires it in a jit function's globals)

from ..launch import device_function

#: Flat sweeps (add, relu, sigmoid, the attention mix, augmentation, SGD): 1,024 elements over
#: 4 warps is 8 contiguous float32 per thread, so accesses vectorise.
FLAT_BLOCK = 1024
#: NHWC tiles: 1,024 elements over 4 warps is 8 float32 per thread and tap.
NHWC_TILE = 1024
#: Widest channel block of an NHWC tile: 64 float32 = 256 contiguous bytes per tile row.
NHWC_MAX_BLOCK_C = 64
#: Rows of class scores (cross-entropy, metrics): up to 4,096 elements a tile, up to 1,024 classes
#: a block (more classes loop over blocks).
ROW_TILE, ROW_MAX_BLOCK_C = 4096, 1024


def cdiv(a, b):
    """ceil(a / b) of positive ints, in plain Python: ``triton.cdiv`` is a jit function, and each
    call from Python costs about 2 us of Triton's call machinery; a step makes thousands."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (n >= 1), in plain Python (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


def out_size(size, kernel_size, stride, padding, ceil_mode=False):
    """Output length of a convolution or pooling window along one axis: floor mode, or with
    ``ceil_mode`` (pooling, as Caffe and PyTorch) the division rounded up, less one if the last
    window would start past the input and its left padding."""
    span = size + 2 * padding - kernel_size
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def channel_tile(c, elements, max_block_c=None):
    """(block_rows, block_c) for tiles of about ``elements`` elements over c channels.

    block_c covers all of c up to ``max_block_c`` (a power of two, so c = 3 wastes one lane of
    four, not 61 of 64); the rows fill the rest of the tile, at least one.
    """
    block_c = next_power_of_2(c)
    if max_block_c is not None:
        block_c = min(block_c, max_block_c)
    return max(1, elements // block_c), block_c


def nhwc_tile(c):
    """(BLOCK_P, BLOCK_C) for NHWC tiles of NHWC_TILE elements over c channels."""
    return channel_tile(c, NHWC_TILE, NHWC_MAX_BLOCK_C)


def row_tile(n_rows, n_classes):
    """{BLOCK_R, BLOCK_C} for [rows x classes] tiles of at most ROW_TILE elements, no more rows
    than there are."""
    block_r, block_c = channel_tile(n_classes, ROW_TILE, ROW_MAX_BLOCK_C)
    return dict(BLOCK_R=min(next_power_of_2(n_rows), block_r), BLOCK_C=block_c)


#: (BLOCK_P, BLOCK_C) compiled ahead of time: 64 channels and more, and a narrow layer.
TILES_AOT = (nhwc_tile(64), nhwc_tile(3))
#: ((BLOCK_P, BLOCK_C), activation storage type) compiled ahead of time: each tile in float32, the
#: wide one in bfloat16 too (kernels/storage.py).
TILES_TYPES_AOT = tuple((tile, "fp32") for tile in TILES_AOT) + ((TILES_AOT[0], "bf16"),)


@device_function
def positions(flat, rows, cols):
    """(image, row, col) of flat position indices over (N, rows, cols) grids, e.g. n*OH*OW + oh*OW + ow."""
    per_image = rows * cols
    within = flat % per_image
    return flat // per_image, within // cols, within % cols
