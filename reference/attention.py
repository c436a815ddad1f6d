"""The attention activations of the Residual Attention Network (NHWC): mixing, channel and spatial attention."""
import numpy as np

from .elementwise import sigmoid, sigmoid_backward
from .norm import inverse_scale, normalize_backward, standardize


def attention_mix(mask_logits, trunk, residual=True, from_logits=True):
    """(1 + M) * t (attention residual learning), or M * t when residual=False (naive), M = sigmoid(m).

    mask_logits and trunk have the same shape; like (1 + torch.sigmoid(m)) * t. With
    from_logits=False the mask is given as it is, M = m: the channel (f2) and spatial (f3)
    attention ablations compute their own mask.
    """
    if mask_logits.shape != trunk.shape:
        raise ValueError(f"attention_mix: shapes differ: mask_logits {mask_logits.shape}, trunk {trunk.shape}")
    mask, sigmoid_saved = sigmoid(mask_logits) if from_logits else (mask_logits, None)
    y = ((1 + mask) if residual else mask) * trunk
    return y, (mask, sigmoid_saved, trunk, residual)


def attention_mix_backward(dy, saved):
    """(dm, dt) = (dy * t * dM/dm, dy * (1 + M)), or dt = dy * M when residual=False;
    dM/dm = M * (1 - M) for the sigmoid, 1 without it."""
    mask, sigmoid_saved, trunk, residual = saved
    dmask = dy * trunk
    dm = dmask if sigmoid_saved is None else sigmoid_backward(dmask, sigmoid_saved)[0]
    return dm, dy * ((1 + mask) if residual else mask)


def channel_attention(x, eps=1e-12):
    """The paper's f2: y = x / sqrt(sum_c x^2 + eps) at each (n, h, w) of x (N, H, W, C).

    eps keeps y (= 0 there) and its gradient finite at an all-zero pixel and is far
    below any non-negligible sum of squares. Close to F.normalize(x, dim=channels),
    which instead divides by max(norm, eps). Each position is scaled by p, a power of
    two near its largest |x|, before squaring, so that the sum cannot overflow:
    norm = p * sqrt(sum_c (x/p)^2 + eps/p^2).
    """
    inv_p = inverse_scale(np.abs(x).max(axis=-1, keepdims=True))
    scaled = x * inv_p
    root = np.sqrt((scaled * scaled).sum(axis=-1, keepdims=True) + eps * inv_p * inv_p)
    y = scaled / root
    return y, (y, root / inv_p)


def channel_attention_backward(dy, saved):
    """dx = (dy - y * sum_c(dy * y)) / norm."""
    y, norm = saved
    return ((dy - y * (dy * y).sum(axis=-1, keepdims=True)) / norm,)


def spatial_attention(x, eps=1e-5):
    """The paper's f3: y = sigmoid((x - mean) / sqrt(var + eps)) of x (N, H, W, C).

    mean and biased var per sample and channel over H, W, like
    torch.sigmoid(F.instance_norm(x.permute(0, 3, 1, 2), eps=eps)).
    """
    z, rstd = standardize(x, (1, 2), eps)
    y, sigmoid_saved = sigmoid(z)
    return y, (z, rstd, sigmoid_saved)


def spatial_attention_backward(dy, saved):
    """dx through the sigmoid and the per-(sample, channel) standardisation, mean and var included."""
    z, rstd, sigmoid_saved = saved
    (dz,) = sigmoid_backward(dy, sigmoid_saved)
    return (normalize_backward(dz, z, rstd, (1, 2)),)
