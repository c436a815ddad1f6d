"""Tile shapes and index helpers shared by the memory-bound kernels over NHWC activations."""
import triton
import triton.language as tl  # noqa: F401  (Triton's interpreter requires it in a jit function's globals)

from ..launch import device_function

#: Elements per tile: 1,024 over 4 warps is 8 float32 per thread and tap.
TILE = 1024
#: Widest channel block: 64 float32 = 256 contiguous bytes per tile row.
MAX_BLOCK_C = 64


def nhwc_tile(c):
    """(BLOCK_P, BLOCK_C) for NHWC tiles of TILE elements over c channels.

    BLOCK_C covers all of c up to MAX_BLOCK_C (a power of two, so c = 3 wastes one
    lane of four, not 61 of 64); the positions fill the rest of the tile.
    """
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    return TILE // block_c, block_c


#: (BLOCK_P, BLOCK_C) compiled ahead of time: 64 channels and more, and a narrow layer.
TILES_AOT = (nhwc_tile(64), nhwc_tile(3))


@device_function
def positions(flat, rows, cols):
    """(image, row, col) of flat position indices over (N, rows, cols) grids, e.g. n*OH*OW + oh*OW + ow."""
    per_image = rows * cols
    within = flat % per_image
    return flat // per_image, within // cols, within % cols
