"""Differentiable ops: the op contract of docs/design.md §3.

Each op is one :class:`~ra_kernels.autograd.Function`. On the numpy backend it
runs ``reference.<op>`` and ``reference.<op>_backward``; on the cuda and
interpret backends it runs the Triton kernels of ``ra_kernels.kernels``. The
backend and precision are fixed per call at forward time, and backward follows them
(the autograd engine records them with each op: docs/design.md §3).

Arguments are Tensors or raw arrays of the current backend (a raw array is a
constant: it gets no gradient). Activations are NHWC C-contiguous, float32 or (precision
"bf16", cuda and interpret only) bfloat16; parameters and statistics are float32; the numpy
backend also takes float64 throughout, for gradient checks (the rule: ``_check_array``).
Bad input raises a ValueError or TypeError naming the op, the argument, what it got and what
it expected, before anything runs. That includes an empty array (a zero-size
dimension: batch 0, H or W 0, no channels), refused alike on every backend, since
the statistics and means of these ops have no value over nothing. Scalar options
may be Python or NumPy numbers; they reach the kernels as Python numbers.

Running statistics of batch norm are plain arrays updated in place, like
buffers of a module.
"""
from __future__ import annotations

import numpy as np

import reference as ref

from . import autograd
from .autograd import Function, Tensor
from .backend import (BFLOAT16, check_array, check_flag, check_float, check_int, check_labels, choose, empty_like,
                      get_backend, get_precision)
from .kernels import attention as attention_kernels
from .kernels import batchnorm as batchnorm_kernels
from .kernels import conv as conv_kernels
from .kernels import elementwise
from .kernels import linear as linear_kernels
from .kernels import loss as loss_kernels
from .kernels import pool as pool_kernels
from .kernels import resize as resize_kernels
from .kernels.tiles import out_size


# --------------------------------------------------------------------------- argument checks

def _data(a):
    return a.data if isinstance(a, Tensor) else a


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def _activation_types():
    """The types activations may be stored as on the current backend."""
    return (_FLOAT32, _FLOAT64) if get_backend() == "numpy" else (_FLOAT32, BFLOAT16)


def _names(dtypes):
    return " or ".join(d.name for d in dtypes)


def _bfloat16_hint(dtype):
    return ("; bfloat16 (precision 'bf16') runs on the cuda and interpret backends"
            if get_backend() == "numpy" and dtype == BFLOAT16 else "")


def _check_array(op, name, a, ndim=None, layout=None, dtype=None, activation=True):
    """Check one array argument; return its float dtype.

    The storage rule (docs/design.md §8): on the cuda and interpret backends activations
    (``activation``) are float32 or bfloat16, and everything else (parameters, batch-norm
    statistics, logits) float32; the numpy backend takes float32 or float64 throughout.
    ``dtype``: the dtype of the op's activations, when already known: another activation must
    have it, and a non-activation must have its parameter type (float32 beside bfloat16).
    """
    a = check_array(op, name, _data(a), also=" or a Tensor")
    allowed = _activation_types() if activation or get_backend() == "numpy" else (_FLOAT32,)
    if a.dtype not in allowed:  # dtype equality, not dtype.name: the name is built at each call
        raise TypeError(f"{op}: {name} must be {_names(allowed)} on the {get_backend()} backend, "
                        f"got {a.dtype.name}{_bfloat16_hint(a.dtype)}")
    if dtype is not None:
        expected = _FLOAT32 if not activation and dtype == BFLOAT16 else dtype
        if a.dtype != expected:
            raise TypeError(f"{op}: {name} is {a.dtype.name} but must be {expected.name}, since the "
                            f"{'other inputs are' if activation else 'activations are'} {dtype.name}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout or ''}, got shape {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(a.shape)}); ops take arrays without "
                         f"zero-size dimensions")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (strides {a.strides} for shape "
                         f"{tuple(a.shape)}); pass a contiguous copy")
    return a.dtype


def _check_same_shape(op, names, arrays):
    shapes = [tuple(_data(a).shape) for a in arrays]
    if len(set(shapes)) != 1:
        got = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"{op}: inputs must have the same shape, got {got}")


def _check_nhwc(op, x):
    return _check_array(op, "x", x, 4, "NHWC (N, H, W, C)")


def _check_channel_params(op, c, dtype, of="x", prefix="", **params):
    """Per-channel vectors (C,) of the ``c`` channels of ``of`` (what they normalise, for messages);
    ``prefix`` names whose they are ("layer 1 bn ")."""
    for name, p in params.items():
        _check_array(op, prefix + name, p, 1, "(C,)", dtype, activation=False)
        if _data(p).shape[0] != c:
            raise ValueError(f"{op}: {prefix}{name} has {_data(p).shape[0]} channels, {of} has {c}")


def _out_size(op, size, kernel, stride, padding, ceil_mode=False):
    out = out_size(size, kernel, stride, padding, ceil_mode)
    if out < 1:
        raise ValueError(f"{op}: input size {size} with kernel {kernel}, stride {stride}, "
                         f"padding {padding} gives an empty output")
    return out


# --------------------------------------------------------------------------- the Function pattern

class _Op(Function):
    """One op: ``reference.<op>`` on the numpy backend, ``<kernels module>.<op>`` otherwise.

    Both modules expose the same pair: ``<op>(*args, **kwargs) -> (out, saved)``
    and ``<op>_backward(dy, saved) -> grads``, one gradient per differentiable
    input in order; trailing non-differentiable inputs get None here.
    """
    op = ""          # the op's name in reference/ and in its kernels/ module
    kernels = None   # the kernels/ module implementing it
    #: Ops whose backward takes ``need_dx``: the gradient of the first input is then skipped
    #: (not computed, no kernel launched) when autograd says nothing wants it, as for the
    #: network's input image under the stem conv.
    skips_unwanted_dx = False
    #: Backward options that take an input's gradient buffer (autograd's ``ctx.grad_into``), by input
    #: index: the op adds that gradient into the buffer, and no separate addition is launched.
    grads_into = {}

    @classmethod
    def implementation(cls):
        return choose(ref, cls.kernels)

    @classmethod
    def run(cls, impl, *args, **kwargs):
        """Call the implementation: (out, saved). Overridden where arguments need adapting."""
        return getattr(impl, cls.op)(*args, **kwargs)

    @classmethod
    def forward(cls, ctx, *args, **kwargs):
        impl = cls.implementation()
        ctx.n_inputs, ctx.op_backward = len(args), getattr(impl, cls.op + "_backward")
        out, ctx.op_saved = cls.run(impl, *args, **kwargs)
        return out

    @classmethod
    def backward(cls, ctx, dy):
        options = {"need_dx": ctx.needs_input_grad[0]} if cls.skips_unwanted_dx else {}
        if ctx.grad_into:
            options.update((name, ctx.grad_into[i]) for name, i in cls.grads_into.items())
        grads = tuple(ctx.op_backward(dy, ctx.op_saved, **options))
        return grads + (None,) * (ctx.n_inputs - len(grads))


def _update_running(buffers, values):
    """Running-statistics buffers take the op's new values: kernels update them in place (then this
    copies nothing), reference/ returns new arrays."""
    for buffer, value in zip(buffers, values):
        if value is not buffer:
            buffer[...] = value


class _BatchNorm(_Op):
    op, kernels = "batch_norm", batchnorm_kernels
    grads_into = {"dgamma_into": 1, "dbeta_into": 2}

    @classmethod
    def run(cls, impl, *args, **kwargs):
        # The running statistics are the last two positional arguments; the op returns
        # their new values (kernels update them in place, making this copy a no-op).
        y, new_mean, new_var, saved = getattr(impl, cls.op)(*args, **kwargs)
        _update_running(args[-2:], (new_mean, new_var))
        return y, saved


class _ConvBnRelu(_BatchNorm):
    op, kernels, skips_unwanted_dx = "conv_bn_relu", conv_kernels, True
    grads_into = {"dw_into": 1, "dgamma_into": 2, "dbeta_into": 3}


class _ConvChain(_Op):
    """Arguments (x, w_1, gamma_1, beta_1, running_mean_1, running_var_1, w_2, ..., w_n, [gamma_0, beta_0,
    running_mean_0, running_var_0 of the input's batch norm,] skip), skip an array or None; every
    parameter's gradient may go into its buffer (``into``, aligned with the parameters)."""
    op, kernels, skips_unwanted_dx, new_grads = "conv_chain", conv_kernels, True, (0,)

    @classmethod
    def run(cls, impl, *args, **kwargs):
        y, running, saved = impl.conv_chain(*args[:-1], skip=args[-1], **kwargs)
        for i, values in enumerate(running):
            _update_running(args[5 * i + 4:5 * i + 6], values)
        return y, saved

    @classmethod
    def backward(cls, ctx, dy):
        dx_into, *into = ctx.grad_into or (None,)
        return tuple(ctx.op_backward(dy, ctx.op_saved, need_dx=ctx.needs_input_grad[0], into=into[:-1] or None,
                                     dx_into=dx_into))


class _UpsampleBilinear(_Op):
    """Arguments (x, size, skip), as in reference/ and kernels/; all positional, so that skip gets
    a gradient slot, and size's slot is None."""
    op, kernels = "upsample_bilinear", resize_kernels

    @classmethod
    def backward(cls, ctx, dy):
        dx, dskip = ctx.op_backward(dy, ctx.op_saved)
        return dx, None, dskip


def _op(name, kernels, skips_unwanted_dx=False, grads_into=None, new_grads=()):
    """The Function of a plain op: reference.<name> on numpy, kernels.<name> on cuda and interpret."""
    return type(f"_{name}", (_Op,), {"op": name, "kernels": kernels, "skips_unwanted_dx": skips_unwanted_dx,
                                     "grads_into": grads_into or {}, "new_grads": new_grads})


_Conv2d = _op("conv2d", conv_kernels, skips_unwanted_dx=True, grads_into={"dx_into": 0, "dw_into": 1}, new_grads=(0,))
_MaxPool2d = _op("max_pool2d", pool_kernels, grads_into={"dx_into": 0}, new_grads=(0,))
_Sigmoid = _op("sigmoid", attention_kernels)
_AttentionMix = _op("attention_mix", attention_kernels)
_ChannelAttention = _op("channel_attention", attention_kernels)
_SpatialAttention = _op("spatial_attention", attention_kernels)
_Add = _op("add", elementwise)
_Cast = _op("cast", elementwise)
_Relu = _op("relu", elementwise)
_GlobalAvgPool = _op("global_avg_pool", pool_kernels)
_Linear = _op("linear", linear_kernels, grads_into={"dw_into": 1, "db_into": 2})
_CrossEntropy = _op("cross_entropy", loss_kernels)


class _BackendArithmetic:
    """The autograd engine's array arithmetic (``autograd.arithmetic``) on the current backend:
    reference/ on numpy, the elementwise kernels on cuda and interpret."""

    @staticmethod
    def ones_like(a):
        return choose(ref, elementwise).fill(empty_like(a), 1.0)

    @staticmethod
    def add(a, b):
        return choose(ref, elementwise).add(a, b)[0]

    @staticmethod
    def add_into(into, g):
        return choose(ref, elementwise).add_into(into, g)

    @staticmethod
    def copy(a):
        return choose(ref, elementwise).copy(a)

    @staticmethod
    def zero(into):
        return choose(ref, elementwise).fill(into, 0.0)


autograd.arithmetic = _BackendArithmetic()


# --------------------------------------------------------------------------- the ops

def conv2d(x, w, stride=1, padding=0):
    """2-D convolution without bias. x (N, H, W, Cin), w (KH, KW, Cin, Cout) -> (N, OH, OW, Cout)."""
    _, stride, padding, _ = _check_conv("conv2d", x, w, stride, padding)
    return _Conv2d.apply(x, w, stride=stride, padding=padding)


def _check_conv(op, x, w, stride, padding):
    """(dtype, stride, padding, output positions N * OH * OW) of a checked convolution."""
    dtype = _check_nhwc(op, x)
    _check_array(op, "w", w, 4, "HWIO (KH, KW, Cin, Cout)", dtype, activation=False)
    stride, padding = check_int(op, "stride", stride, 1), check_int(op, "padding", padding, 0)
    (_, h, wd, c), (kh, kw, cin, _) = _data(x).shape, _data(w).shape
    if cin != c:
        raise ValueError(f"{op}: x has {c} channels but w (KH, KW, Cin, Cout) = {tuple(_data(w).shape)} "
                         f"expects Cin = {cin}{_layout_hint(x, cin)}")
    n = _data(x).shape[0]
    return dtype, stride, padding, n * _out_size(op, h, kh, stride, padding) * _out_size(op, wd, kw, stride, padding)


def _layout_hint(x, channels):
    """A hint when an NCHW array seems to have been given where NHWC is expected."""
    shape = _data(x).shape
    return (f" (x is NHWC (N, H, W, C); its shape {tuple(shape)} looks like NCHW: transpose it with "
            f"x.transpose(0, 2, 3, 1))" if len(shape) == 4 and shape[1] == channels else "")


def _check_bn(op, channels, count, dtype, gamma, beta, running_mean, running_var, training, momentum, eps, relu,
              of="x"):
    """(training, momentum, eps, relu) of a checked batch norm of ``count`` values per channel of ``of``."""
    _check_channel_params(op, channels, dtype, of, gamma=gamma, beta=beta,
                          running_mean=running_mean, running_var=running_var)
    training, relu = check_flag(op, "training", training), check_flag(op, "relu", relu)
    momentum = check_float(op, "momentum", momentum, 0.0, 1.0)
    eps = check_float(op, "eps", eps, 0.0, low_open=True)
    if training and count < 2:
        raise ValueError(f"{op}: training needs more than 1 value per channel to normalise by their "
                         f"variance, got {count}")
    if training:
        _check_writable(op, running_mean=running_mean, running_var=running_var)
    return training, momentum, eps, relu


def _check_writable(op, **statistics):
    """Running statistics that a training step updates in place must be writable (a kernel would
    write through a read-only NumPy array's pointer regardless)."""
    for name, a in statistics.items():
        if not getattr(_data(a).flags, "writeable", True):  # CuPy arrays have no such flag
            raise ValueError(f"{op}: {name} is read-only, and training updates it in place")


def batch_norm(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
               relu=False):
    """Batch norm over N, H, W per channel of NHWC x, then ReLU if ``relu``.

    Training normalises with the batch mean and biased variance and updates
    ``running_mean`` / ``running_var`` (arrays of shape (C,), in place) with the
    unbiased variance; eval normalises with the running statistics.
    """
    dtype = _check_nhwc("batch_norm", x)
    n, h, w, c = _data(x).shape
    training, momentum, eps, relu = _check_bn("batch_norm", c, n * h * w, dtype, gamma, beta,
                                              running_mean, running_var, training, momentum, eps, relu)
    return _BatchNorm.apply(x, gamma, beta, _data(running_mean), _data(running_var), training=training,
                            momentum=momentum, eps=eps, relu=relu)


def conv_bn_relu(x, w, gamma, beta, running_mean, running_var, stride=1, padding=0, training=True,
                 momentum=0.1, eps=1e-5, relu=True):
    """``batch_norm(conv2d(x, w, stride, padding), ...)`` as one op (fused kernels on GPU backends)."""
    dtype, stride, padding, positions = _check_conv("conv_bn_relu", x, w, stride, padding)
    training, momentum, eps, relu = _check_bn("conv_bn_relu", _data(w).shape[3], positions, dtype, gamma, beta,
                                              running_mean, running_var, training, momentum, eps, relu,
                                              of="the conv's output (w's Cout)")
    return _ConvBnRelu.apply(x, w, gamma, beta, _data(running_mean), _data(running_var), stride=stride,
                             padding=padding, training=training, momentum=momentum, eps=eps, relu=relu)


def conv_chain(x, layers, momentum=0.1, eps=1e-5, skip=None, input_bn=None, residual=False):
    """Convolutions in a row, each but the last followed by batch norm in training mode and ReLU:
    ``conv2d(conv_bn_relu(conv_bn_relu(x, ...), ...), ...)`` as one op (a bottleneck branch), plus
    ``skip`` (of the output's shape: a residual unit's shortcut, added in the last conv's epilogue),
    or x itself with ``residual`` (an identity shortcut: its gradient joins dx inside the op).
    ``input_bn`` = (gamma, beta, running_mean, running_var): a batch norm + ReLU of x first, in
    training mode too (a pre-activation unit, ``F.batch_norm(x, *input_bn, relu=True)``; with
    ``residual`` x, not its activation, is added).

    ``layers``: one (w, stride, padding, bn) per conv, bn = (gamma, beta, running_mean, running_var)
    for every conv but the last, None for the last. Training mode only (batch statistics; the
    running statistics are updated in place): in eval, run the layers as conv_bn_relu and conv2d,
    which apply eval batch norm inside the conv already. On the kernel backends no batch-norm
    output is ever written: each conv applies the batch norm before it as it loads its input, and
    takes that batch norm's backward sums in its own gradient kernel (docs/design.md §7).
    """
    op = "conv_chain"
    if not isinstance(layers, (list, tuple)) or len(layers) < 2:
        raise ValueError(f"{op}: layers must list at least 2 convolutions as (w, stride, padding, bn), got {layers!r}")
    dtype = _check_nhwc(op, x)
    args, shapes, channels = [x], [], _data(x).shape[3]
    shape = _data(x).shape
    for i, layer in enumerate(layers):
        if not isinstance(layer, (list, tuple)) or len(layer) != 4:
            raise ValueError(f"{op}: layer {i} must be (w, stride, padding, bn), got {layer!r}")
        w, stride, padding, bn = layer
        _check_array(op, f"layer {i} w", w, 4, "HWIO (KH, KW, Cin, Cout)", dtype, activation=False)
        stride = check_int(op, f"layer {i} stride", stride, 1)
        padding = check_int(op, f"layer {i} padding", padding, 0)
        kh, kw, cin, cout = _data(w).shape
        if cin != channels:
            raise ValueError(f"{op}: layer {i} w (KH, KW, Cin, Cout) = {tuple(_data(w).shape)} expects Cin = {cin}, "
                             f"its input has {channels} channels")
        shape = (shape[0], _out_size(op, shape[1], kh, stride, padding), _out_size(op, shape[2], kw, stride, padding),
                 cout)
        last = i == len(layers) - 1
        if last != (bn is None):
            raise ValueError(f"{op}: every layer but the last takes bn = (gamma, beta, running_mean, running_var), "
                             f"the last None; layer {i} has {'none' if bn is None else 'one'}")
        args.append(w)
        if not last:
            args += _chain_norm(op, f"layer {i} bn", f"layer {i}'s", bn, shape, dtype)
        shapes.append((stride, padding))
        channels = cout
    if input_bn is not None:
        args += _chain_norm(op, "input_bn", "the input's", input_bn, _data(x).shape, dtype)
    momentum = check_float(op, "momentum", momentum, 0.0, 1.0)
    eps = check_float(op, "eps", eps, 0.0, low_open=True)
    residual = check_flag(op, "residual", residual)
    if residual and skip is not None:
        raise ValueError(f"{op}: give skip or residual (which adds x itself), not both")
    if residual and tuple(_data(x).shape) != shape:
        raise ValueError(f"{op}: residual adds x, so the output must have x's shape {tuple(_data(x).shape)}, "
                         f"got {shape}")
    if skip is not None:
        _check_array(op, "skip", skip, 4, "NHWC", dtype)
        if tuple(_data(skip).shape) != shape:
            raise ValueError(f"{op}: skip must have the output's shape {shape}, got {tuple(_data(skip).shape)}")
    return _ConvChain.apply(*args, skip, layers=tuple(shapes), momentum=momentum, eps=eps,
                            input_bn=input_bn is not None, residual=residual)


def _chain_norm(op, name, whose, bn, shape, dtype):
    """The four arrays of one of conv_chain's batch norms, ``bn`` = (gamma, beta, running_mean,
    running_var), checked against the NHWC ``shape`` it normalises (``whose``: "layer 0's", "the input's")."""
    if not isinstance(bn, (list, tuple)) or len(bn) != 4:
        raise ValueError(f"{op}: {name} must be (gamma, beta, running_mean, running_var), got {bn!r}")
    of = "x" if name == "input_bn" else f"{whose} output (its w's Cout)"
    _check_channel_params(op, shape[3], dtype, of, f"{name} ", gamma=bn[0], beta=bn[1], running_mean=bn[2],
                          running_var=bn[3])
    _check_writable(op, **{f"{name} running_mean": bn[2], f"{name} running_var": bn[3]})
    if shape[0] * shape[1] * shape[2] < 2:
        raise ValueError(f"{op}: {whose} batch norm needs more than 1 value per channel to normalise by their "
                         f"variance, got {shape[0] * shape[1] * shape[2]}")
    return [bn[0], bn[1], _data(bn[2]), _data(bn[3])]


def max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=False):
    """Max over each window of NHWC x; padding counts as -inf; gradient to the first maximum.
    ``ceil_mode``: the output size rounds up, as Caffe's pooling (the ImageNet stem) and PyTorch's
    ceil_mode; the last windows then reach past the input, which counts as -inf too."""
    _check_nhwc("max_pool2d", x)
    kernel_size = check_int("max_pool2d", "kernel_size", kernel_size, 1)
    stride = check_int("max_pool2d", "stride", stride, 1)
    padding = check_int("max_pool2d", "padding", padding, 0)
    if 2 * padding > kernel_size:
        raise ValueError(f"max_pool2d: padding {padding} must be at most kernel_size // 2 "
                         f"({kernel_size // 2}), or some windows would hold only padding")
    ceil_mode = check_flag("max_pool2d", "ceil_mode", ceil_mode)
    _, h, w, _ = _data(x).shape
    _out_size("max_pool2d", h, kernel_size, stride, padding, ceil_mode)
    _out_size("max_pool2d", w, kernel_size, stride, padding, ceil_mode)
    return _MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


def upsample_bilinear(x, size, skip=None):
    """Bilinear resize of NHWC x to ``size = (OH, OW)``, corners aligned, plus ``skip`` if given."""
    dtype = _check_nhwc("upsample_bilinear", x)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"upsample_bilinear: size must be (OH, OW) with positive integers, got {size!r}")
    size = tuple(check_int("upsample_bilinear", name, s, 1) for name, s in zip(("OH of size", "OW of size"), size))
    if skip is not None:
        _check_array("upsample_bilinear", "skip", skip, 4, "NHWC (N, OH, OW, C)", dtype)
        n, _, _, c = _data(x).shape
        if tuple(_data(skip).shape) != (n, *size, c):
            raise ValueError(f"upsample_bilinear: skip must have shape {(n, *size, c)} (x resized to "
                             f"size), got {tuple(_data(skip).shape)}")
    return _UpsampleBilinear.apply(x, size, skip)


def sigmoid(x):
    """Logistic function, safe for large |x|."""
    _check_array("sigmoid", "x", x)
    return _Sigmoid.apply(x)


def attention_mix(mask_logits, trunk, residual=True, from_logits=True):
    """``(1 + M) * t`` (attention residual learning), or ``M * t`` if not residual, M = sigmoid(m).

    ``from_logits=False`` takes M as given (an addition to the contract: the channel and
    spatial attention ablations compute their own mask, and still get the mix and
    its two gradients from one kernel each).
    """
    dtype = _check_array("attention_mix", "mask_logits", mask_logits)
    _check_array("attention_mix", "trunk", trunk, dtype=dtype)
    _check_same_shape("attention_mix", ("mask_logits", "trunk"), (mask_logits, trunk))
    residual = check_flag("attention_mix", "residual", residual)
    from_logits = check_flag("attention_mix", "from_logits", from_logits)
    return _AttentionMix.apply(mask_logits, trunk, residual=residual, from_logits=from_logits)


def channel_attention(x):
    """The paper's f2: x divided by its L2 norm over channels at each position (NHWC)."""
    _check_nhwc("channel_attention", x)
    return _ChannelAttention.apply(x)


def spatial_attention(x):
    """The paper's f3: sigmoid of x standardised per sample and channel over H, W (NHWC)."""
    _check_nhwc("spatial_attention", x)
    return _SpatialAttention.apply(x)


def add(a, b):
    """a + b, same shapes (no broadcasting)."""
    dtype = _check_array("add", "a", a)
    _check_array("add", "b", b, dtype=dtype)
    _check_same_shape("add", ("a", "b"), (a, b))
    return _Add.apply(a, b)


def cast(x, dtype):
    """x stored as ``dtype``, an activation type of the backend (float32 or bfloat16 on cuda and
    interpret, float32 or float64 on numpy); x itself when it has that type already. The gradient
    comes back in x's type. Models cast their input with :func:`to_precision`."""
    from_dtype, dtype = _check_array("cast", "x", x), np.dtype(dtype)
    if dtype not in _activation_types():
        raise TypeError(f"cast: the {get_backend()} backend stores activations as {_names(_activation_types())}, "
                        f"not {dtype.name}{_bfloat16_hint(dtype)}")
    return x if dtype == from_dtype else _Cast.apply(x, dtype)


def to_precision(x):
    """A network's input in the activation storage of the current precision: x cast to bfloat16
    under "bf16" (every activation computed from it is then bfloat16), x itself otherwise."""
    return cast(x, BFLOAT16) if get_precision() == "bf16" else x


def relu(x):
    """max(x, 0); the gradient is 0 where x <= 0."""
    _check_array("relu", "x", x)
    return _Relu.apply(x)


def global_avg_pool(x):
    """Mean over H, W: NHWC (N, H, W, C) -> (N, C)."""
    _check_nhwc("global_avg_pool", x)
    return _GlobalAvgPool.apply(x)


def linear(x, w, b):
    """``x @ w + b``: x (N, in), w (in, out), b (out,) -> (N, out)."""
    dtype = _check_array("linear", "x", x, 2, "(N, in)")
    _check_array("linear", "w", w, 2, "(in, out)", dtype, activation=False)
    _check_array("linear", "b", b, 1, "(out,)", dtype, activation=False)
    (_, n_in), (w_in, n_out), (b_out,) = _data(x).shape, _data(w).shape, _data(b).shape
    if w_in != n_in or b_out != n_out:
        raise ValueError(f"linear: x {tuple(_data(x).shape)}, w {tuple(_data(w).shape)} and "
                         f"b {tuple(_data(b).shape)} do not fit (N, in) @ (in, out) + (out,)")
    return _Linear.apply(x, w, b)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of logits (N, classes) against integer labels (N,): a 0-d tensor.
    Label values are checked as ``backend.check_labels`` says."""
    _check_array("cross_entropy", "logits", logits, 2, "(N, classes)", activation=False)
    n, classes = _data(logits).shape
    return _CrossEntropy.apply(logits, check_labels("cross_entropy", _data(labels), n, classes))
