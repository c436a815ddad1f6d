"""Batch normalisation (NHWC, per channel) and the standardisation it shares with spatial attention."""
import numpy as np

from . import elementwise


def normalize(x, mean, var, eps):
    """xhat = (x - mean) / sqrt(var + eps); returns (xhat, rstd) with rstd = 1 / sqrt(var + eps).

    A variance that overflowed (inf) gives rstd = NaN, not 0: 1 / sqrt(inf) would silently
    make xhat 0 everywhere.
    """
    with np.errstate(divide="ignore"):
        rstd = np.where(np.isinf(var), np.nan, 1 / np.sqrt(var + eps)).astype(np.result_type(var, x))
    return (x - mean) * rstd, rstd


def inverse_scale(largest):
    """1 / p, p the largest power of two <= max(largest, 1) (p = 1 where largest is inf or NaN),
    elementwise in largest's dtype: the scale taken out before squaring, exactly."""
    bound = np.maximum(np.where(np.isfinite(largest), largest, 1), 1)
    return 1 / np.ldexp(np.ones_like(bound), np.frexp(bound)[1] - 1)


def standardize(x, axes, eps):
    """(xhat, rstd) of x standardised by its mean and biased variance over ``axes``, without
    overflow for any finite x: the deviations are scaled by p, a power of two near their
    largest, before squaring, as robust norms do; rstd = (1/p) / sqrt(mean((dev/p)^2) + eps/p^2).
    A power of two scales exactly, so for ordinary x this is the unscaled computation."""
    deviation = x - x.mean(axes, keepdims=True)
    inv_p = inverse_scale(np.abs(deviation).max(axes, keepdims=True))
    scaled = deviation * inv_p
    rstd = inv_p / np.sqrt((scaled * scaled).mean(axes, keepdims=True) + eps * inv_p * inv_p)
    return deviation * rstd, rstd


def normalize_backward(dxhat, xhat, rstd, axes):
    """Gradient of `normalize` when mean and biased var are statistics of x over `axes`.

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means over `axes`:
    the gradient flows through the mean and the variance.
    """
    return rstd * (dxhat - dxhat.mean(axes, keepdims=True) - xhat * (dxhat * xhat).mean(axes, keepdims=True))


def batch_norm(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5, relu=False):
    """Batch norm of x (N, H, W, C) per channel over N, H, W, then ReLU if `relu`; gamma, beta, stats (C,).

    Returns (y, new_running_mean, new_running_var, saved). Training: normalise with the
    batch mean and biased variance; new running stats are (1 - momentum) * old +
    momentum * (batch mean, unbiased batch variance var * n / (n - 1), n = N*H*W).
    Eval: normalise with the running stats and return those arrays unchanged.
    Like F.batch_norm(x.permute(0, 3, 1, 2), running_mean, running_var, gamma, beta,
    training, momentum, eps) (+ F.relu), without its in-place running-stat update.
    """
    if training:
        n = x.size // x.shape[-1]
        if n < 2:
            raise ValueError(f"batch_norm: training needs more than 1 value per channel, got x {x.shape}")
        mean = x.mean((0, 1, 2))
        var = x.var((0, 1, 2))
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * (var * (n / (n - 1)))
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    xhat, rstd = normalize(x, mean, var, eps)
    y = gamma * xhat + beta
    relu_saved = None
    if relu:
        y, relu_saved = elementwise.relu(y)
    return y, new_mean, new_var, (xhat, gamma, rstd, training, relu_saved)


def batch_norm_backward(dy, saved, dgamma_into=None, dbeta_into=None):
    """Gradients of batch_norm: dy (N, H, W, C) -> (dx, dgamma, dbeta).

    The ReLU mask (y > 0) is applied to dy first. Training: the full backward
    through the batch statistics; eval: the running statistics are constants.
    With ``dgamma_into`` / ``dbeta_into`` that gradient is added into the array given, which is
    returned in its place.
    """
    xhat, gamma, rstd, training, relu_saved = saved
    if relu_saved is not None:
        (dy,) = elementwise.relu_backward(dy, relu_saved)
    dgamma = elementwise.gradient_into((dy * xhat).sum((0, 1, 2)), dgamma_into)
    dbeta = elementwise.gradient_into(dy.sum((0, 1, 2)), dbeta_into)
    dxhat = dy * gamma
    dx = normalize_backward(dxhat, xhat, rstd, (0, 1, 2)) if training else dxhat * rstd
    return dx, dgamma, dbeta
