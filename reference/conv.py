"""2-D convolution (NHWC activations, HWIO weights) and its composition with batch norm."""
from . import elementwise
from ._windows import fold_windows, windows
from .norm import batch_norm, batch_norm_backward


def _im2col(x, kernel_hw, stride, padding):
    """The (N*OH*OW, KH*KW*Cin) patch matrix of x; a copy-free view reshape for 1x1/stride-1/unpadded convs."""
    cols = windows(x, kernel_hw, stride, padding)
    n, oh, ow, kh, kw, c = cols.shape
    return cols.reshape(n * oh * ow, kh * kw * c), (n, oh, ow)


def conv2d(x, w, stride=1, padding=0):
    """Convolution without bias: x (N, H, W, Cin), w (KH, KW, Cin, Cout) -> y (N, OH, OW, Cout).

    OH = (H + 2*padding - KH) // stride + 1, zero padding, cross-correlation like
    F.conv2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), stride=stride, padding=padding).
    """
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"conv2d: x has {x.shape[3]} channels, w {w.shape} expects Cin = {w.shape[2]}")
    kh, kw, cin, cout = w.shape
    cols, (n, oh, ow) = _im2col(x, (kh, kw), stride, padding)
    y = (cols @ w.reshape(kh * kw * cin, cout)).reshape(n, oh, ow, cout)
    # Save x, not the KH*KW-times larger patch matrix: a whole network's saved
    # state lives until backward, and rebuilding the patches is one copy.
    return y, (x, w, stride, padding)


def conv2d_backward(dy, saved, need_dx=True, dw_into=None):
    """Gradients of conv2d: dy (N, OH, OW, Cout) -> (dx (N, H, W, Cin), dw (KH, KW, Cin, Cout));
    dx is None, and not computed, when not ``need_dx`` (an input image, say). With ``dw_into``
    dw is added into that array, which is returned as dw."""
    x, w, stride, padding = saved
    kh, kw, cin, cout = w.shape
    n, oh, ow, _ = dy.shape
    dy2d = dy.reshape(-1, cout)
    cols, _ = _im2col(x, (kh, kw), stride, padding)
    dw = elementwise.gradient_into((cols.T @ dy2d).reshape(w.shape), dw_into)
    if not need_dx:
        return None, dw
    # One (N*OH*OW, Cout) @ (Cout, Cin) product per tap: faster than one product into a
    # KH*KW-times larger buffer, and lighter on memory.
    dx = fold_windows(lambda i, j: (dy2d @ w[i, j].T).reshape(n, oh, ow, cin), (kh, kw), x.shape, stride, padding,
                      dy.dtype)
    return dx, dw


def conv_bn_relu(x, w, gamma, beta, running_mean, running_var, stride=1, padding=0, training=True,
                 momentum=0.1, eps=1e-5, relu=True):
    """batch_norm(conv2d(x, w, stride, padding), gamma, beta, running_mean, running_var, ...).

    Returns (y, new_running_mean, new_running_var, saved), exactly the two ops in turn
    (PyTorch: F.conv2d, then F.batch_norm, then F.relu when relu=True).
    """
    z, conv_saved = conv2d(x, w, stride, padding)
    y, new_mean, new_var, bn_saved = batch_norm(z, gamma, beta, running_mean, running_var, training, momentum,
                                                eps, relu)
    return y, new_mean, new_var, (conv_saved, bn_saved)


def conv_bn_relu_backward(dy, saved, need_dx=True, dw_into=None, dgamma_into=None, dbeta_into=None):
    """Gradients of conv_bn_relu: dy (N, OH, OW, Cout) -> (dx, dw, dgamma, dbeta); dx None when not
    ``need_dx``; each ``*_into`` as in conv2d_backward."""
    conv_saved, bn_saved = saved
    dz, dgamma, dbeta = batch_norm_backward(dy, bn_saved, dgamma_into, dbeta_into)
    dx, dw = conv2d_backward(dz, conv_saved, need_dx, dw_into)
    return dx, dw, dgamma, dbeta


def conv_chain(x, *params, layers, momentum=0.1, eps=1e-5, skip=None):
    """conv2d, batch_norm + ReLU, conv2d, ..., conv2d in training mode: each conv but the last is
    conv_bn_relu (batch statistics, ReLU), the last conv2d, plus ``skip`` when given (an array of
    the output's shape). params: w_1, gamma_1, beta_1, running_mean_1, running_var_1, w_2, ..., w_n;
    layers: ((stride, padding), ...), one per conv.

    Returns (y, ((new_running_mean, new_running_var), ...), saved): exactly the ops in turn.
    """
    n, y, running, saved = len(layers), x, [], []
    for i, (stride, padding) in enumerate(layers):
        if i < n - 1:
            y, new_mean, new_var, layer_saved = conv_bn_relu(y, *params[5 * i:5 * i + 5], stride, padding, True,
                                                             momentum, eps, True)
            running.append((new_mean, new_var))
        else:
            y, layer_saved = conv2d(y, params[5 * i], stride, padding)
        saved.append(layer_saved)
    if skip is not None:
        y = elementwise.add(y, skip)[0]
    return y, tuple(running), (saved, skip is not None)


def conv_chain_backward(dy, saved, need_dx=True, into=None):
    """Gradients of conv_chain, one per input: (dx, dw_1, dgamma_1, dbeta_1, None, None, dw_2, ..., dw_n,
    dskip), None for the running statistics; dx None when not ``need_dx``; dskip is dy (None without
    skip); ``into``: per entry of params, an array to add that gradient into (returned for it), or None."""
    saved, has_skip = saved
    dskip = dy if has_skip else None
    n = len(saved)
    into = into or (None,) * (5 * n - 4)
    grads = [None] * (5 * n - 4)
    for i in reversed(range(n)):
        if i == n - 1:
            dy, grads[5 * i] = conv2d_backward(dy, saved[i], i > 0 or need_dx, into[5 * i])
        else:
            dy, grads[5 * i], grads[5 * i + 1], grads[5 * i + 2] = conv_bn_relu_backward(
                dy, saved[i], i > 0 or need_dx, *into[5 * i:5 * i + 3])
    return (dy, *grads, dskip)
