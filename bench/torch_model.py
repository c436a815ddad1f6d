"""The Residual Attention Network of ``ra_kernels.models`` written in PyTorch, layer for layer, and
the conversions between our layouts and PyTorch's.

Module and attribute names mirror ``ra_kernels.nn`` and ``ra_kernels.models`` exactly, so a
parameter's name in our ``state_dict`` is its name here, with batch norm's ``gamma``/``beta``
called ``weight``/``bias``. Layouts: ours NHWC activations, HWIO conv weights and (in, out)
linear weights; PyTorch's NCHW activations (held channels_last, so the same memory order as
NHWC), OIHW conv weights and (out, in) linear weights. The network takes NCHW float images
(N, 3, H, W), best channels_last, and returns logits (N, classes).

Semantics, as ours (docs/design.md §3 and ra_kernels/models.py): pre-activation bottleneck units with a 1x1
projection of the pre-activated input when the shape changes; max-pool 3/2/1 (the ImageNet
network's: 3/2/0 in ceil mode, Caffe's, in its stem and masks); bilinear
upsampling with aligned corners plus the skip; batch norm with momentum 0.1 and eps 1e-5
(biased variance to normalise, unbiased for the running estimate); the mask as sigmoid
("mixed"), x / sqrt(sum_c x^2 + 1e-12) ("channel") or sigmoid of the per-sample, per-channel
standardisation with eps 1e-5 ("spatial"); output (1 + M) * T or M * T.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ra_kernels.models import CAFFE_POOLING, IMAGENET_TAIL, IMAGENET_WIDTHS, MASK_DEPTHS

# --------------------------------------------------------------------------- layouts

#: "nhwc" activations, "hwio" conv weights, "io" linear weights, "same" for everything else.
LAYOUTS = ("nhwc", "hwio", "io", "same")


def to_torch(tensor, layout: str):
    """A tensor in our layout as PyTorch holds it: NHWC -> NCHW (a view: channels_last strides),
    HWIO -> OIHW (a channels_last copy, as cuDNN wants it), (in, out) -> (out, in) (a contiguous copy)."""
    if layout == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    if layout == "hwio":
        return tensor.permute(3, 0, 1, 2).contiguous().permute(0, 3, 1, 2)
    if layout == "io":
        return tensor.t().contiguous()
    if layout == "same":
        return tensor
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def from_torch(tensor, layout: str):
    """The inverse of :func:`to_torch`, as a view."""
    if layout == "nhwc":
        return tensor.permute(0, 2, 3, 1)
    if layout == "hwio":
        return tensor.permute(2, 3, 1, 0)
    if layout == "io":
        return tensor.t()
    if layout == "same":
        return tensor
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def parameter_layout(shape) -> str:
    """The layout of one of our parameters or buffers: 4-D conv weights, the 2-D classifier weight."""
    return {4: "hwio", 2: "io"}.get(len(shape), "same")


def torch_name(our_name: str) -> str:
    """The name of one of our parameters or buffers in the PyTorch network."""
    stem, _, leaf = our_name.rpartition(".")
    return f"{stem}.{ {'gamma': 'weight', 'beta': 'bias'}.get(leaf, leaf)}"


# --------------------------------------------------------------------------- layers

class BatchNorm2d(nn.BatchNorm2d):
    """Batch norm over N, H, W per channel, then ReLU if ``relu`` (ra_kernels.nn.BatchNorm2d)."""

    def __init__(self, channels, relu=False):
        super().__init__(channels, eps=1e-5, momentum=0.1)
        self.relu = relu

    def forward(self, x):
        y = super().forward(x)
        return F.relu(y) if self.relu else y


def conv2d(cin, cout, kernel_size=1, stride=1, padding=0):
    return nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout, kernel_size=1, stride=1, padding=0, relu=True):
        super().__init__()
        self.conv = conv2d(cin, cout, kernel_size, stride, padding)
        self.bn = BatchNorm2d(cout, relu=relu)

    def forward(self, x):
        return self.bn(self.conv(x))


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck unit, as ra_kernels.models.ResidualUnit."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        mid = cout // 4
        self.pre = BatchNorm2d(cin, relu=True)
        self.reduce = ConvBnRelu(cin, mid, 1)
        self.spatial = ConvBnRelu(mid, mid, 3, stride, 1)
        self.expand = conv2d(mid, cout, 1)
        self.project = conv2d(cin, cout, 1, stride) if cin != cout or stride != 1 else None

    def forward(self, x):
        activated = self.pre(x)
        shortcut = x if self.project is None else self.project(activated)
        return self.expand(self.spatial(self.reduce(activated))) + shortcut


def upsample(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class AttentionModule(nn.Module):
    """The attention module, as ra_kernels.models.AttentionModule."""

    def __init__(self, channels, depth, p=1, t=2, r=1, residual_attention=True, attention="mixed",
                 caffe_pooling=False):
        super().__init__()

        def units(n):
            return nn.Sequential(*[ResidualUnit(channels, channels) for _ in range(n)])

        self.depth, self.residual_attention, self.attention = depth, residual_attention, attention
        self.pooling = CAFFE_POOLING if caffe_pooling else dict(kernel_size=3, stride=2, padding=1)
        self.pre, self.trunk, self.post = units(p), units(t), units(p)
        self.down = nn.Sequential(*[units(r) for _ in range(depth)])
        self.skips = nn.Sequential(*[units(1) for _ in range(depth - 1)])
        self.bottom = units(r)
        self.up = nn.Sequential(*[units(r) for _ in range(depth - 1)])
        self.mask_head = nn.Sequential(BatchNorm2d(channels, relu=True), ConvBnRelu(channels, channels, 1),
                                       conv2d(channels, channels, 1))

    def forward(self, x):
        x = self.pre(x)
        trunk = self.trunk(x)
        mask, skips = x, []
        for level in range(self.depth):
            mask = self.down[level](F.max_pool2d(mask, **self.pooling))
            if level < self.depth - 1:
                skips.append(self.skips[level](mask))
        mask = self.bottom(mask)
        for level in reversed(range(self.depth - 1)):
            mask = self.up[level](upsample(mask, skips[level].shape[2:]) + skips[level])
        logits = self.mask_head(upsample(mask, trunk.shape[2:]))
        if self.attention == "mixed":
            gate = torch.sigmoid(logits)
        elif self.attention == "channel":
            gate = logits / torch.sqrt((logits * logits).sum(1, keepdim=True) + 1e-12)
        else:
            gate = torch.sigmoid(F.instance_norm(logits, eps=1e-5))
        return self.post((1 + gate) * trunk if self.residual_attention else gate * trunk)


class ResidualAttentionNet(nn.Module):
    """ra_kernels.models.ResidualAttentionNet in PyTorch: NCHW images -> logits (N, num_classes).

    Takes the keyword arguments of ``ResidualAttentionNet.config``; the weights come from
    :func:`load_our_state`.
    """

    def __init__(self, modules_per_stage=1, p=1, t=2, r=1, stem=16, widths=(64, 128, 256), num_classes=10,
                 residual_attention=True, attention="mixed"):
        super().__init__()
        self.stem = conv2d(3, stem, 3, 1, 1)
        cin = stem
        for s, (width, depth) in enumerate(zip(widths, MASK_DEPTHS)):
            stage = [ResidualUnit(cin, width, stride=1 if s == 0 else 2)]
            stage += [AttentionModule(width, depth, p, t, r, residual_attention, attention)
                      for _ in range(modules_per_stage)]
            setattr(self, f"stage{s + 1}", nn.Sequential(*stage))
            cin = width
        self.tail = nn.Sequential(*[ResidualUnit(cin, cin) for _ in range(3)])
        self.head = BatchNorm2d(cin, relu=True)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.tail(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.classifier(self.head(x).mean((2, 3)))


class ImageNetAttentionNet(nn.Module):
    """ra_kernels.models.ImageNetAttentionNet in PyTorch: NCHW images -> logits (N, num_classes).

    Takes the keyword arguments of its ``config``; the weights come from :func:`load_our_state`.
    """

    def __init__(self, modules_per_stage=(1, 1, 1), num_classes=1000, residual_attention=True, attention="mixed"):
        super().__init__()
        self.stem = ConvBnRelu(3, 64, 7, 2, 3)
        cin = 64
        for s, (width, depth, count) in enumerate(zip(IMAGENET_WIDTHS, MASK_DEPTHS, modules_per_stage)):
            stage = [ResidualUnit(cin, width, stride=1 if s == 0 else 2)]
            stage += [AttentionModule(width, depth, residual_attention=residual_attention, attention=attention,
                                      caffe_pooling=True) for _ in range(count)]
            setattr(self, f"stage{s + 1}", nn.Sequential(*stage))
            cin = width
        self.tail = nn.Sequential(ResidualUnit(cin, IMAGENET_TAIL, stride=2),
                                  *[ResidualUnit(IMAGENET_TAIL, IMAGENET_TAIL) for _ in range(2)])
        self.head = BatchNorm2d(IMAGENET_TAIL, relu=True)
        self.classifier = nn.Linear(IMAGENET_TAIL, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), **CAFFE_POOLING)
        x = self.tail(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(self.head(x).mean((2, 3)))


#: The twin of each of our network classes, by class name.
TWINS = {"ResidualAttentionNet": ResidualAttentionNet, "ImageNetAttentionNet": ImageNetAttentionNet}


# --------------------------------------------------------------------------- weights both ways

def _tensors(net):
    """Every parameter and buffer of the PyTorch network by name, batch norm's step counters excepted."""
    tensors = dict(net.named_parameters())
    tensors.update((n, b) for n, b in net.named_buffers() if not n.endswith("num_batches_tracked"))
    return tensors


def load_our_state(net: nn.Module, state: dict) -> nn.Module:
    """Copy our ``state_dict()`` (name -> host array in our layout) into ``net`` in place; every
    parameter and buffer must be covered both ways. Returns ``net``."""
    targets = _tensors(net)
    mapped = {torch_name(name): name for name in state}
    missing = sorted(set(targets) - set(mapped))
    unexpected = sorted(name for t, name in mapped.items() if t not in targets)
    if missing or unexpected:
        raise KeyError(f"load_our_state: PyTorch tensors without a value: {missing or 'none'}; "
                       f"our names without a PyTorch tensor: {unexpected or 'none'}")
    with torch.no_grad():
        for name, value in state.items():
            target = targets[torch_name(name)]
            source = to_torch(torch.from_numpy(np.ascontiguousarray(value)), parameter_layout(value.shape))
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"load_our_state: {name} has shape {tuple(value.shape)} (ours), which gives "
                                 f"{tuple(source.shape)}, but {torch_name(name)} is {tuple(target.shape)}")
            target.copy_(source)
    return net


def from_ours(model, device="cpu") -> nn.Module:
    """The PyTorch twin of our ResidualAttentionNet or ImageNetAttentionNet ``model``: same
    configuration, same weights and running statistics, the same dtype, on ``device``,
    channels_last, in ``model``'s mode."""
    state = model.state_dict()
    dtype = torch.from_numpy(np.empty(0, next(iter(state.values())).dtype)).dtype
    net = TWINS[type(model).__name__](**model.config).to(device=device, dtype=dtype,
                                                         memory_format=torch.channels_last)
    return load_our_state(net, state).train(model.training)


def as_ours(net: nn.Module, which: str = "data") -> dict:
    """The network's parameters and buffers (``which="data"``) or its parameters' gradients
    (``which="grad"``) as float64 host arrays in our layouts, keyed by our names."""
    ours = {}
    for name, tensor in _tensors(net).items():
        value = tensor.grad if which == "grad" else tensor
        if value is None or (which == "grad" and not isinstance(tensor, nn.Parameter)):
            continue
        our_name = name.rpartition(".")[0] + "." + _our_leaf(net, name)
        ours[our_name] = from_torch(value.detach(), parameter_layout(value.shape)).cpu().double().numpy()
    return ours


def _our_leaf(net, name):
    """Our name for the last part of a PyTorch tensor name: a batch norm's weight/bias is gamma/beta."""
    stem, _, leaf = name.rpartition(".")
    if isinstance(net.get_submodule(stem), nn.BatchNorm2d):
        return {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
    return leaf
