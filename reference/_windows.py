"""Sliding-window helpers shared by conv2d and max_pool2d (NHWC layout)."""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def out_size(size, kernel, stride, padding, ceil_mode=False):
    """Windows along one axis: floor((size + 2*padding - kernel) / stride) + 1, or with ``ceil_mode``
    the ceiling, less one if the last window would start past the input and its left padding
    (Caffe's pooling, and PyTorch's ceil_mode)."""
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def _padded_size(size, kernel, stride, padding, out):
    """Length of the padded axis that ``out`` windows read: the input with its padding, longer in
    ceil mode when the last window reaches past it."""
    return max(size + 2 * padding, (out - 1) * stride + kernel)


def windows(x, kernel_hw, stride, padding, pad_value=0.0, ceil_mode=False):
    """Every window of NHWC x, padded by `padding` with `pad_value`, as a view (N, OH, OW, KH, KW, C).

    OH = out_size(H, KH, stride, padding, ceil_mode), likewise OW; in ceil mode the last windows
    reach past the padding, and read `pad_value` there too. Only the padded copy is
    materialised; the windows are a strided view of it.
    """
    # What the last window needs beyond the padding (ceil mode only), along H and along W.
    extra_h, extra_w = (_padded_size(size, k, stride, padding, out_size(size, k, stride, padding, ceil_mode))
                        - size - 2 * padding for size, k in zip(x.shape[1:3], kernel_hw))
    if padding or extra_h or extra_w:
        x = np.pad(x, ((0, 0), (padding, padding + extra_h), (padding, padding + extra_w), (0, 0)),
                   constant_values=pad_value)
    view = sliding_window_view(x, kernel_hw, axis=(1, 2))[:, ::stride, ::stride]
    return view.transpose(0, 1, 2, 4, 5, 3)


def fold_windows(tap_values, kernel_hw, input_shape, out_hw, stride, padding, dtype):
    """Adjoint of `windows`: sum per-tap window values back onto an input of shape (N, H, W, C).

    tap_values(i, j) gives the (N, OH, OW, C) values at window tap (i, j), out_hw = (OH, OW); each tap is
    one strided slice-add into a padded buffer, so positions covered by several
    windows accumulate and values landing on padding (or past it, in ceil mode) are dropped.
    """
    n, h, w, c = input_shape
    kh, kw = kernel_hw
    oh, ow = out_hw
    padded = np.zeros((n, _padded_size(h, kh, stride, padding, oh), _padded_size(w, kw, stride, padding, ow), c),
                      dtype)
    for i in range(kh):
        for j in range(kw):
            values = tap_values(i, j)
            padded[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] += values
    return np.ascontiguousarray(padded[:, padding:padding + h, padding:padding + w])
