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


def conv2d_backward(dy, saved, need_dx=True, dw_into=None, dx_into=None):
    """Gradients of conv2d: dy (N, OH, OW, Cout) -> (dx (N, H, W, Cin), dw (KH, KW, Cin, Cout));
    dx is None, and not computed, when not ``need_dx`` (an input image, say). With ``dw_into``
    dw is added into that array, which is returned as dw; with ``dx_into`` likewise dx."""
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
    dx = fold_windows(lambda i, j: (dy2d @ w[i, j].T).reshape(n, oh, ow, cin), (kh, kw), x.shape, (oh, ow), stride,
                      padding, dy.dtype)
    return elementwise.gradient_into(dx, dx_into), dw


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


def conv_chain(x, *params, layers, momentum=0.1, eps=1e-5, skip=None, input_bn=False, residual=False):
    """conv2d, batch_norm + ReLU, conv2d, ..., conv2d in training mode: each conv but the last is
    conv_bn_relu (batch statistics, ReLU), the last conv2d; plus ``skip`` when given (an array of
    the output's shape), or x itself when ``residual``. With ``input_bn`` a batch norm + ReLU of x
    comes first (a pre-activation unit: ``residual`` still adds x, not its activation).

    params: w_1, gamma_1, beta_1, running_mean_1, running_var_1, w_2, ..., w_n, then, with
    ``input_bn``, gamma_0, beta_0, running_mean_0, running_var_0 of the input's batch norm (last,
    so that batch norm j always has params 5j+1 to 5j+4); layers: ((stride, padding), ...), one per conv.

    Returns (y, ((new_running_mean, new_running_var), ...), saved), the running statistics in the
    order of params: exactly the ops in turn.
    """
    n, y, running, saved = len(layers), x, [], []
    input_saved = None
    if input_bn:
        y, new_mean, new_var, input_saved = batch_norm(x, *params[5 * n - 4:5 * n], True, momentum, eps, True)
    for i, (stride, padding) in enumerate(layers):
        if i < n - 1:
            y, new_mean_i, new_var_i, layer_saved = conv_bn_relu(y, *params[5 * i:5 * i + 5], stride, padding, True,
                                                                 momentum, eps, True)
            running.append((new_mean_i, new_var_i))
        else:
            y, layer_saved = conv2d(y, params[5 * i], stride, padding)
        saved.append(layer_saved)
    if input_bn:
        running.append((new_mean, new_var))
    if skip is not None or residual:
        y = elementwise.add(y, x if residual else skip)[0]
    return y, tuple(running), (saved, input_saved, skip is not None, residual)


def conv_chain_backward(dy, saved, need_dx=True, into=None, dx_into=None):
    """Gradients of conv_chain, one per input: (dx, dw_1, dgamma_1, dbeta_1, None, None, dw_2, ..., dw_n,
    [dgamma_0, dbeta_0, None, None,] dskip), None for the running statistics; dx None when not
    ``need_dx`` (with ``residual`` it includes dy); dskip is dy (None without skip); ``into``: per
    entry of params, an array to add that gradient into (returned for it), or None; ``dx_into`` the
    same for dx."""
    saved, input_saved, has_skip, residual = saved
    dskip, dout = (dy if has_skip else None), dy
    n = len(saved)
    n_params = 5 * n - 4 + (4 if input_saved is not None else 0)
    into = into or (None,) * n_params
    grads = [None] * n_params
    for i in reversed(range(n)):
        need = i > 0 or need_dx or input_saved is not None  # the input batch norm's gradients need dx
        if i == n - 1:
            dy, grads[5 * i] = conv2d_backward(dy, saved[i], need, into[5 * i])
        else:
            dy, grads[5 * i], grads[5 * i + 1], grads[5 * i + 2] = conv_bn_relu_backward(
                dy, saved[i], need, *into[5 * i:5 * i + 3])
    if input_saved is not None:
        j = 5 * n - 4
        dy, grads[j], grads[j + 1] = batch_norm_backward(dy, input_saved, *into[j:j + 2])
    if not need_dx:
        dy = None
    else:
        if residual:
            dy = elementwise.add(dy, dout)[0]
        dy = elementwise.gradient_into(dy, dx_into)
    return (dy, *grads, dskip)
