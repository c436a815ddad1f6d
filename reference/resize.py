"""Bilinear resizing with align_corners=True semantics (NHWC), with an optional skip addition."""
import numpy as np


def _interp_matrix(out_size, in_size, dtype):
    """(out_size, in_size) matrix of 1-D linear interpolation with aligned corners.

    Output i samples src = i * (in - 1) / (out - 1) (src = 0 when out == 1), from
    floor(src) with weight 1 - frac and the next index (clamped) with weight frac,
    as in PyTorch's upsample_bilinear2d. The coordinates are computed in float64
    and only the weights are cast to `dtype`.
    """
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = scale * np.arange(out_size)
    lo = np.minimum(np.floor(src).astype(np.intp), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    matrix[rows, lo] = 1 - frac
    matrix[rows, hi] += frac  # +=: at the last input index hi == lo, and the two weights add up to 1
    return matrix.astype(dtype)


def upsample_bilinear(x, size, skip=None):
    """Resize x (N, H, W, C) to size = (OH, OW) bilinearly, plus skip (N, OH, OW, C) when given.

    Like F.interpolate(x.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=True)
    (+ skip); any sizes, up or down. Separable: one interpolation matrix per axis, each
    applied as a single matmul.
    """
    n, h, w, c = x.shape
    out_h, out_w = size
    if skip is not None and skip.shape != (n, out_h, out_w, c):
        raise ValueError(f"upsample_bilinear: skip must have shape {(n, out_h, out_w, c)}, got {skip.shape}")
    rows, cols = _interp_matrix(out_h, h, x.dtype), _interp_matrix(out_w, w, x.dtype)
    y = rows @ x.reshape(n, h, w * c)                              # (N, OH, W*C)
    y = (cols @ y.reshape(n * out_h, w, c)).reshape(n, out_h, out_w, c)
    if skip is not None:
        y = y + skip
    return y, (rows, cols, x.shape, skip is not None)


def upsample_bilinear_backward(dy, saved):
    """Gradients of upsample_bilinear: dy (N, OH, OW, C) -> (dx (N, H, W, C), dskip = dy or None)."""
    rows, cols, (n, h, w, c), has_skip = saved
    out_h, out_w = rows.shape[0], cols.shape[0]
    dx = cols.T @ dy.reshape(n * out_h, out_w, c)                  # (N*OH, W, C)
    dx = (rows.T @ dx.reshape(n, out_h, w * c)).reshape(n, h, w, c)
    return dx, (dy if has_skip else None)
