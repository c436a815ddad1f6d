"""Sliding-window helpers shared by conv2d and max_pool2d (NHWC layout)."""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def windows(x, kernel_hw, stride, padding, pad_value=0.0):
    """Every window of NHWC x, padded by `padding` with `pad_value`, as a view (N, OH, OW, KH, KW, C).

    OH = (H + 2*padding - KH) // stride + 1 (floor), likewise OW. Only the padded
    copy is materialised; the windows are a strided view of it.
    """
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=pad_value)
    view = sliding_window_view(x, kernel_hw, axis=(1, 2))[:, ::stride, ::stride]
    return view.transpose(0, 1, 2, 4, 5, 3)


def fold_windows(tap_values, kernel_hw, input_shape, stride, padding, dtype):
    """Adjoint of `windows`: sum per-tap window values back onto an input of shape (N, H, W, C).

    tap_values(i, j) gives the (N, OH, OW, C) values at window tap (i, j); each tap is
    one strided slice-add into a padded buffer, so positions covered by several
    windows accumulate and values landing on padding are dropped.
    """
    n, h, w, c = input_shape
    kh, kw = kernel_hw
    padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype)
    for i in range(kh):
        for j in range(kw):
            values = tap_values(i, j)
            oh, ow = values.shape[1:3]
            padded[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] += values
    return np.ascontiguousarray(padded[:, padding:padding + h, padding:padding + w])
