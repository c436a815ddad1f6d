"""NumPy reference ops: the ground truth every ra_kernels kernel is tested against.

Activations are NHWC, conv weights HWIO (KH, KW, Cin, Cout), linear weights
(in, out). Each op `name(...)` returns `(out, saved)` and `name_backward(dy, saved)`
returns one gradient per differentiable input, in argument order; batch_norm and
conv_bn_relu return `(y, new_running_mean, new_running_var, saved)`. Pure
functions: inputs are never modified, computation stays in the input dtype
(float64 for gradient checks, float32 for real runs). The exceptions write where
told to: the backwards of ops with parameters add a parameter's gradient into
an array given as ``*_into`` (a gradient buffer), and ``fill`` and ``add_into``
work in place; with ``copy`` they are the array arithmetic of the autograd
engine and the optimizer.
"""
from .augment import augment
from .attention import (attention_mix, attention_mix_backward, channel_attention, channel_attention_backward,
                        spatial_attention, spatial_attention_backward)
from .conv import conv2d, conv2d_backward, conv_bn_relu, conv_bn_relu_backward, conv_chain, conv_chain_backward
from .elementwise import (add, add_backward, add_into, cast, cast_backward, copy, fill, relu, relu_backward,
                          sigmoid, sigmoid_backward)
from .linear import linear, linear_backward
from .loss import cross_entropy, cross_entropy_backward
from .metrics import accumulate_metrics
from .norm import batch_norm, batch_norm_backward
from .optim import sgd_step
from .pool import global_avg_pool, global_avg_pool_backward, max_pool2d, max_pool2d_backward
from .resize import upsample_bilinear, upsample_bilinear_backward

__all__ = [
    "conv2d", "conv2d_backward",
    "batch_norm", "batch_norm_backward",
    "conv_bn_relu", "conv_bn_relu_backward",
    "conv_chain", "conv_chain_backward",
    "max_pool2d", "max_pool2d_backward",
    "upsample_bilinear", "upsample_bilinear_backward",
    "sigmoid", "sigmoid_backward",
    "attention_mix", "attention_mix_backward",
    "channel_attention", "channel_attention_backward",
    "spatial_attention", "spatial_attention_backward",
    "add", "add_backward", "cast", "cast_backward", "fill", "copy", "add_into",
    "relu", "relu_backward",
    "global_avg_pool", "global_avg_pool_backward",
    "linear", "linear_backward",
    "cross_entropy", "cross_entropy_backward",
    "sgd_step",
    "augment", "accumulate_metrics",
]
