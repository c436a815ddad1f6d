"""Pooling over NHWC activations: max pooling with argmax, global average pooling."""
import numpy as np

from ._windows import fold_windows, windows
from .elementwise import gradient_into


def max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=False):
    """Max over each kernel_size^2 window of x (N, H, W, C) -> (N, OH, OW, C), padding counting as -inf.

    OH = (H + 2*padding - kernel_size) // stride + 1, like F.max_pool2d(x.permute(0, 3, 1, 2),
    kernel_size, stride, padding, ceil_mode); with ``ceil_mode`` the division rounds up (Caffe's
    pooling: the last windows run past the input, what lies beyond counting as -inf too; see
    _windows.out_size). saved holds the argmax as the
    row-major tap index within the window; ties go to the first maximum inside the input, so a
    window whose inputs are all -inf sends its gradient to the first of them, never to the
    padding (as PyTorch). A NaN is the maximum of its window, as in PyTorch: y is NaN and the
    gradient goes to the first NaN. y is the value of that first maximum: -0.0 where a window's
    first maximum is the -0.0 of a tie with +0.0, as in PyTorch and the kernel.
    """
    if not 0 <= padding <= kernel_size // 2:
        # As in PyTorch: larger padding would allow windows made only of padding.
        raise ValueError(f"max_pool2d: padding must be in [0, kernel_size // 2], got {padding} for {kernel_size}")
    geometry = dict(kernel_hw=(kernel_size, kernel_size), stride=stride, padding=padding, ceil_mode=ceil_mode)
    taps = windows(x, **geometry, pad_value=-np.inf)
    # (1, OH, OW, KH, KW, 1): which taps of each window lie inside x, not in its padding.
    inside = windows(np.ones((1, *x.shape[1:3], 1), bool), **geometry, pad_value=False)
    top = taps.max(axis=(3, 4))
    y = np.empty_like(top)
    argmax = np.zeros(y.shape, np.int8 if kernel_size * kernel_size <= 128 else np.int32)
    # Taps in reverse row-major order, so the first maximum is the last written. (np.argmax
    # over the tap axis gives the same but runs several times slower on the strided view.)
    top_is_nan = np.isnan(top)
    for tap in reversed(range(kernel_size * kernel_size)):
        kh, kw = divmod(tap, kernel_size)
        value = taps[:, :, :, kh, kw]
        first = ((value == top) | (top_is_nan & np.isnan(value))) & inside[:, :, :, kh, kw]
        np.copyto(argmax, tap, where=first)
        np.copyto(y, value, where=first)
    return y, (argmax, x.shape, kernel_size, stride, padding)


def max_pool2d_backward(dy, saved, dx_into=None):
    """dx (N, H, W, C): each dy element goes to its window's argmax; overlapping windows accumulate.
    With ``dx_into`` dx is added into it, which is returned."""
    argmax, x_shape, kernel_size, stride, padding = saved
    dx = fold_windows(lambda i, j: np.where(argmax == i * kernel_size + j, dy, 0), (kernel_size, kernel_size),
                      x_shape, dy.shape[1:3], stride, padding, dy.dtype)
    return (gradient_into(dx, dx_into),)


def global_avg_pool(x):
    """Mean over H and W: x (N, H, W, C) -> (N, C), like x.permute(0, 3, 1, 2).mean((2, 3))."""
    return x.mean((1, 2)), (x.shape,)


def global_avg_pool_backward(dy, saved):
    """dx (N, H, W, C) = dy / (H*W) broadcast over H and W."""
    (x_shape,) = saved
    n, h, w, c = x_shape
    return (np.broadcast_to((dy / (h * w))[:, None, None, :], x_shape).copy(),)
