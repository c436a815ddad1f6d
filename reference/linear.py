"""Fully connected layer."""


def linear(x, w, b):
    """y = x @ w + b: x (N, in), w (in, out), b (out,) -> (N, out); F.linear(x, w.T, b)."""
    return x @ w + b, (x, w)


def linear_backward(dy, saved):
    """Gradients of linear: dy (N, out) -> (dx = dy @ w.T, dw = x.T @ dy, db = sum_n dy)."""
    x, w = saved
    return dy @ w.T, x.T @ dy, dy.sum(0)
