"""Fully connected layer."""

from .elementwise import gradient_into


def linear(x, w, b):
    """y = x @ w + b: x (N, in), w (in, out), b (out,) -> (N, out); F.linear(x, w.T, b)."""
    return x @ w + b, (x, w)


def linear_backward(dy, saved, dw_into=None, db_into=None):
    """Gradients of linear: dy (N, out) -> (dx = dy @ w.T, dw = x.T @ dy, db = sum_n dy); each ``*_into``
    given gets its gradient added and is returned for it."""
    x, w = saved
    return dy @ w.T, gradient_into(x.T @ dy, dw_into), gradient_into(dy.sum(0), db_into)
