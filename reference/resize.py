"""Bilinear resizing with align_corners=True semantics (NHWC), with an optional skip addition."""
import numpy as np


def _sources(out_size, in_size, dtype):
    """(lo, hi, frac) of 1-D linear interpolation with aligned corners, one entry per output index.

    Output o samples src = o * (in - 1) / (out - 1) (src = 0 when out == 1) from lo = floor(src)
    with weight 1 - frac and hi = min(lo + 1, in - 1) with weight frac, as in PyTorch's
    upsample_bilinear2d. src is the exact ratio of integers: lo is an integer division and frac
    one correctly rounded division in ``dtype``.
    """
    num, den = (in_size - 1, out_size - 1) if out_size > 1 else (0, 1)
    product = np.arange(out_size) * num
    lo = product // den
    frac = (product - lo * den).astype(dtype) / np.asarray(den, dtype)
    return lo, np.minimum(lo + 1, in_size - 1), frac


def _interp_matrix(out_size, in_size, dtype):
    """(out_size, in_size) matrix of the interpolation of :func:`_sources`."""
    lo, hi, frac = _sources(out_size, in_size, dtype)
    matrix = np.zeros((out_size, in_size), dtype)
    rows = np.arange(out_size)
    matrix[rows, lo] = 1 - frac
    matrix[rows, hi] += frac  # +=: at the last input index hi == lo, and the two weights add up to 1
    return matrix


def _interpolate(x, axis, out_size):
    """x resized along ``axis``. An output whose source is exactly an input index (frac = 0) is
    that input: its neighbour, of weight 0, is not read, so an inf there cannot make 0 * inf = NaN."""
    lo, hi, frac = _sources(out_size, x.shape[axis], x.dtype)
    frac = frac.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    below, above = np.take(x, lo, axis), np.take(x, hi, axis)
    with np.errstate(invalid="ignore"):  # inf neighbours of weight 0: the where() leaves those out
        return np.where(frac == 0, below, (1 - frac) * below + frac * above)


def upsample_bilinear(x, size, skip=None):
    """Resize x (N, H, W, C) to size = (OH, OW) bilinearly, plus skip (N, OH, OW, C) when given.

    Like F.interpolate(x.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=True)
    (+ skip); any sizes, up or down. Rows first, then columns; the backward applies the
    transposed interpolation matrix of each axis as one matmul.
    """
    n, h, w, c = x.shape
    out_h, out_w = size
    if skip is not None and skip.shape != (n, out_h, out_w, c):
        raise ValueError(f"upsample_bilinear: skip must have shape {(n, out_h, out_w, c)}, got {skip.shape}")
    y = _interpolate(_interpolate(x, 1, out_h), 2, out_w)
    if skip is not None:
        y = y + skip
    return y, (_interp_matrix(out_h, h, x.dtype), _interp_matrix(out_w, w, x.dtype), x.shape, skip is not None)


def upsample_bilinear_backward(dy, saved):
    """Gradients of upsample_bilinear: dy (N, OH, OW, C) -> (dx (N, H, W, C), dskip = dy or None)."""
    rows, cols, (n, h, w, c), has_skip = saved
    out_h, out_w = rows.shape[0], cols.shape[0]
    dx = cols.T @ dy.reshape(n * out_h, out_w, c)                  # (N*OH, W, C)
    dx = (rows.T @ dx.reshape(n, out_h, w * c)).reshape(n, h, w, c)
    return dx, (dy if has_skip else None)
