"""The Residual Attention Network family: for CIFAR (32x32 NHWC input), and the paper's ImageNet
networks (ImageNetAttentionNet, 224x224, as the official prototxts have them).

CIFAR: conv3x3 3 -> stem; per stage s = 1, 2, 3 at 32x32, 16x16, 8x8: a residual unit
into ``widths[s]`` (stride 2 from stage 2 on) and ``modules_per_stage``
attention modules whose mask branch pools ``(3, 2, 1)[s]`` times; three more
units; BN-ReLU, global average pool, linear. Depth 36m + 20 for m modules per
stage with (p, t, r) = (1, 2, 1): attention56 has m = 1, attention92 m = 2.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from .autograd import no_grad
from .backend import asarray, check_flag, check_int, to_numpy
from .nn import BatchNorm2d, Conv2d, ConvBnRelu, Linear, Module, Sequential, record_calls

MASK_DEPTHS = (3, 2, 1)  # max-pool levels of the mask branch per stage: 32->4, 16->4, 8->4
#: Caffe's max-pooling in the official ImageNet prototxts (3x3/2): no padding, the output size
#: rounded up (112 -> 56).
CAFFE_POOLING = dict(kernel_size=3, stride=2, padding=0, ceil_mode=True)


# --------------------------------------------------------------------------- the paper's blocks

def _branch(x, *layers, skip=None, residual=False):
    """[BatchNorm2d with ReLU,] ConvBnRelu layers, then a Conv2d; plus ``skip`` if given, or x itself
    when ``residual``: one ``F.conv_chain`` when every layer is in training mode, else the layers'
    own calls (each in its own mode: a frozen batch norm stays frozen) and an add."""
    if all(layer.training for layer in layers):
        input_bn = layers[0] if isinstance(layers[0], BatchNorm2d) else None
        convs = layers[1:] if input_bn is not None else layers
        norms = {(layer.bn.momentum, layer.bn.eps) for layer in convs[:-1]}
        if input_bn is not None:
            norms.add((input_bn.momentum, input_bn.eps))
        if len(norms) != 1:
            raise ValueError(f"a conv chain's batch norms must share momentum and eps, got {sorted(norms)}")
        (momentum, eps), = norms
        return F.conv_chain(x, [layer.chain_layer() for layer in convs], momentum, eps, skip=skip,
                            input_bn=None if input_bn is None else input_bn.chain_input(), residual=residual)
    y = x
    for layer in layers:
        y = layer(y)
    if residual:
        skip = x
    return y if skip is None else F.add(y, skip)


class ResidualUnit(Module):
    """Pre-activation bottleneck unit (NHWC): cin -> cout at stride ``stride``.

    BN-ReLU, conv1x1 (cin -> cout/4) + BN-ReLU, conv3x3 (stride) + BN-ReLU, conv1x1
    (-> cout); plus the input, or a 1x1 stride-s projection of the pre-activated
    input when the channels or the stride change. In training the unit runs as one
    ``conv_chain`` (no batch-norm output is written): with the pre-activation and the
    identity shortcut inside it, or, with a projection, after the pre-activation, which
    the projection reads too. In eval each conv that a BN-ReLU follows runs as one
    ``conv_bn_relu``, batch norm applied in its epilogue.
    """

    def __init__(self, cin, cout, stride=1, rng=None):
        super().__init__()
        mid = cout // 4
        self.pre = BatchNorm2d(cin, relu=True)
        self.reduce = ConvBnRelu(cin, mid, 1, rng=rng)
        self.spatial = ConvBnRelu(mid, mid, 3, stride, 1, rng=rng)
        self.expand = Conv2d(mid, cout, 1, rng=rng)
        if cin != cout or stride != 1:
            self.project = Conv2d(cin, cout, 1, stride, rng=rng)

    def forward(self, x):
        if "project" not in self._modules:
            return _branch(x, self.pre, self.reduce, self.spatial, self.expand, residual=True)
        activated = self.pre(x)
        return _branch(activated, self.reduce, self.spatial, self.expand, skip=self.project(activated))


ATTENTIONS = ("mixed", "channel", "spatial")


class AttentionModule(Module):
    """The attention module of the paper at ``channels`` channels (NHWC in and out, same shape).

    ``p`` units, then side by side a trunk of ``t`` units and a bottom-up top-down
    mask branch of ``depth`` 3x3/2 max-pool levels with ``r`` units each (a skip
    unit after each level but the deepest, ``r`` more units at the bottom; going
    up, bilinear upsample to the level above with its skip added in the same
    kernel, then ``r`` units; a last upsample to the trunk's size), a mask head
    BN-ReLU-conv1x1-BN-ReLU-conv1x1, then ``p`` units.

    The output is ``(1 + M) * T`` (attention residual learning) or ``M * T``, with
    M = sigmoid(mask) ("mixed"), the paper's f2 ("channel") or f3 ("spatial").
    Set ``keep_mask`` to keep M of the last forward in ``mask`` (an array). The mask's max-pools
    are 3x3/2 with padding 1; with ``caffe_pooling`` (the official ImageNet prototxts) without
    padding, in ceil mode: the same sizes on even maps (56 -> 28), windows shifted by one.
    """

    def __init__(self, channels, depth, p=1, t=2, r=1, residual_attention=True, attention="mixed",
                 rng=None, caffe_pooling=False):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"AttentionModule: attention must be one of {ATTENTIONS}, got {attention!r}")
        if depth < 1:
            raise ValueError(f"AttentionModule: depth must be >= 1, got {depth}")

        def units(n):
            return Sequential(*[ResidualUnit(channels, channels, rng=rng) for _ in range(n)])

        self.depth, self.residual_attention, self.attention = depth, residual_attention, attention
        self.pooling = CAFFE_POOLING if caffe_pooling else dict(kernel_size=3, stride=2, padding=1)
        self.keep_mask, self.mask = False, None
        self.pre, self.trunk, self.post = units(p), units(t), units(p)
        self.down = Sequential(*[units(r) for _ in range(depth)])
        self.skips = Sequential(*[units(1) for _ in range(depth - 1)])
        self.bottom = units(r)
        self.up = Sequential(*[units(r) for _ in range(depth - 1)])
        self.mask_head = Sequential(BatchNorm2d(channels, relu=True),
                                    ConvBnRelu(channels, channels, 1, rng=rng),
                                    Conv2d(channels, channels, 1, rng=rng))

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
            mask = self.up[level](F.upsample_bilinear(mask, skips[level].shape[1:3], skip=skips[level]))
        head = self.mask_head
        logits = _branch(F.upsample_bilinear(mask, trunk.shape[1:3]), head[0], head[1], head[2])
        if self.attention == "mixed":
            out = F.attention_mix(logits, trunk, residual=self.residual_attention)
            if self.keep_mask:
                with no_grad():
                    self.mask = F.sigmoid(logits.detach()).data
        else:
            gate = F.channel_attention(logits) if self.attention == "channel" else F.spatial_attention(logits)
            out = F.attention_mix(gate, trunk, residual=self.residual_attention, from_logits=False)
            if self.keep_mask:
                self.mask = gate.data
        return self.post(out)


# --------------------------------------------------------------------------- the network


def _three(where, must, values) -> tuple:
    """``values`` (any sequence, a NumPy array too) as a tuple of 3; ValueError "where: must, got ..." if not."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{where}: {must}, got {values!r}")
    return tuple(values)


class _AttentionNetwork(Module):
    """What the CIFAR and ImageNet networks share: ``entry`` (the stem), three stages
    (``stage1``..``stage3``: a residual unit, then attention modules), ``tail`` units, a BN-ReLU
    ``head``, global average pooling and a ``classifier``; the mask readout and the summary."""

    #: The side of the images the network is made for (what summary() runs).
    IMAGE_SIZE = 32

    def __init__(self, attention, num_classes, seed, residual_attention):
        """Checks what both networks take; makes ``self.rng``, which draws the weights from ``seed``."""
        super().__init__()
        name = type(self).__name__
        if attention not in ATTENTIONS:
            raise ValueError(f"{name}: attention must be one of {ATTENTIONS}, got {attention!r}")
        check_int(name, "num_classes", num_classes, 2)
        check_flag(name, "residual_attention", residual_attention)
        self.rng = np.random.default_rng(check_int(name, "seed", seed, 0))

    def entry(self, x):
        return self.stem(x)

    def forward(self, x):
        x = self.tail(self.stage3(self.stage2(self.stage1(self.entry(F.to_precision(x))))))
        return self.classifier(F.global_avg_pool(self.head(x)))

    def _build_stages(self, cin, widths, modules_per_stage, **module_options):
        """stage1..stage3: per stage a unit into its width (stride 1, then 2) and its attention
        modules, mask depths MASK_DEPTHS; returns the last width."""
        for s, (width, depth, count) in enumerate(zip(widths, MASK_DEPTHS, modules_per_stage)):
            stage = [ResidualUnit(cin, width, stride=1 if s == 0 else 2, rng=self.rng)]
            stage += [AttentionModule(width, depth, rng=self.rng, **module_options) for _ in range(count)]
            setattr(self, f"stage{s + 1}", Sequential(*stage))
            cin = width
        return cin

    def _build_top(self, tail, num_classes):
        """The ``tail`` units (a list), then the BN-ReLU head and the classifier of their width."""
        self.tail = Sequential(*tail)
        width = tail[-1].expand.weight.shape[-1]
        self.head = BatchNorm2d(width, relu=True)
        self.classifier = Linear(width, num_classes, rng=self.rng)

    def attention_modules(self):
        """(name, AttentionModule) in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, AttentionModule)]

    def attention_masks(self, x):
        """Forward ``x`` without recording gradients; return {module name: mask M} as host arrays.

        Each mask has the shape of its module's trunk, (N, H, W, C); for "mixed"
        attention its values lie in (0, 1). The forward runs in the model's own mode (in training
        mode the batch norms use the batch's statistics: an untrained model's running statistics
        would saturate its masks to 0 or 1), and the running statistics are put back after, so that
        drawing masks leaves the model as it was.
        """
        modules = self.attention_modules()
        running = [(b, b.copy()) for _, b in self.named_buffers()]
        for _, m in modules:
            m.keep_mask = True
        try:
            with no_grad():
                self(x)
            return {name.rstrip("."): to_numpy(m.mask).astype(np.float32) for name, m in modules}
        finally:
            for _, m in modules:
                m.keep_mask, m.mask = False, None
            for buffer, before in running:
                buffer[...] = before

    def summary(self) -> str:
        """A table of every conv and linear layer in forward order: output shape, parameters and
        multiply-adds per image, from one forward pass of a single IMAGE_SIZE x IMAGE_SIZE image."""
        names = {id(m): name.rstrip(".") for name, m in self.named_modules()}
        # in training mode the pass would update the running statistics
        with self.evaluating(), record_calls() as calls, no_grad():
            self(asarray(np.zeros((1, self.IMAGE_SIZE, self.IMAGE_SIZE, 3), np.float32)))
        header = f"{'layer':<46} {'type':<9} {'output':>12} {'params':>10} {'mult-adds':>14}"
        rows, total_macs = [header, "-" * len(header)], 0
        for module, out_shape in calls:
            conv = module.conv if isinstance(module, ConvBnRelu) else module
            if isinstance(conv, Conv2d) and names[id(module)].endswith(".conv"):
                continue  # a ConvBnRelu's own conv: listed as the ConvBnRelu
            if isinstance(conv, Conv2d):
                kh, kw, cin, cout = conv.weight.shape
                kind, macs = f"conv{kh}x{kw}", out_shape[1] * out_shape[2] * kh * kw * cin * cout
            elif isinstance(module, Linear):
                kind, macs = "linear", int(np.prod(module.weight.shape))
            else:
                continue
            params = sum(int(np.prod(p.shape)) for p in module.parameters())
            total_macs += macs
            shape = "x".join(str(d) for d in out_shape[1:])
            rows.append(f"{names[id(module)]:<46} {kind:<9} {shape:>12} {params:>10,} {macs:>14,}")
        n_params = sum(int(np.prod(p.shape)) for p in self.parameters())
        rows += ["-" * len(header),
                 f"{'total (every parameter, BN included)':<69} {n_params:>10,} {total_macs:>14,}"]
        return "\n".join(rows)


#: The fewest channels of a stage: its units' bottlenecks have a quarter of them.
MIN_STAGE_WIDTH = 4


class ResidualAttentionNet(_AttentionNetwork):
    """Residual Attention Network: NHWC float32 images (N, 32, 32, 3) -> logits (N, num_classes).

    ``residual_attention``: (1 + M) * T (ARL) or M * T (the paper's naive NAL).
    ``attention``: "mixed" (sigmoid), "channel" (f2) or "spatial" (f3).
    Weights are drawn from ``seed``: He normal (fan-out) for convs, BN gamma 1
    and beta 0, PyTorch's default for the classifier.
    """

    def __init__(self, modules_per_stage=1, p=1, t=2, r=1, stem=16, widths=(64, 128, 256),
                 num_classes=10, residual_attention=True, attention="mixed", seed=0):
        super().__init__(attention, num_classes, seed, residual_attention)
        for option, value, minimum in (("modules_per_stage", modules_per_stage, 0), ("p", p, 0), ("t", t, 0),
                                       ("r", r, 0), ("stem", stem, 1)):
            check_int("ResidualAttentionNet", option, value, minimum)
        widths = _three("ResidualAttentionNet", "widths must name 3 stages", widths)
        for width in widths:
            check_int("ResidualAttentionNet", "each of widths", width, 1)
        if min(widths) < MIN_STAGE_WIDTH:
            raise ValueError(f"ResidualAttentionNet: each stage needs at least {MIN_STAGE_WIDTH} channels (a unit's "
                             f"bottleneck has a quarter of them), got widths {tuple(widths)}")
        # The architecture, saved with the weights (nn.Module.architecture); the seed only draws them.
        # Python numbers, not NumPy's, so that it is JSON in the saved file.
        self.config = dict(modules_per_stage=int(modules_per_stage), p=int(p), t=int(t), r=int(r), stem=int(stem),
                           widths=tuple(int(w) for w in widths), num_classes=int(num_classes),
                           residual_attention=bool(residual_attention), attention=str(attention))
        self.stem = Conv2d(3, stem, 3, 1, 1, rng=self.rng)
        cin = self._build_stages(stem, widths, (modules_per_stage,) * 3, p=p, t=t, r=r,
                                 residual_attention=residual_attention, attention=attention)
        self._build_top([ResidualUnit(cin, cin, rng=self.rng) for _ in range(3)], num_classes)


#: The ImageNet networks' stage widths and their tail's (docs/design.md §9).
IMAGENET_WIDTHS, IMAGENET_TAIL = (256, 512, 1024), 2048


class ImageNetAttentionNet(_AttentionNetwork):
    """The paper's ImageNet network as the official prototxts lay it out: NHWC float32 images
    (N, S, S, 3), S a multiple of 32 (224 in training) -> logits (N, num_classes).

    conv7x7/2 (3 -> 64) + BN-ReLU, max-pool 3x3/2 without padding in ceil mode (Caffe's: 112 ->
    56); a unit to 256 and ``modules_per_stage[0]`` attention modules at S/4 (mask depth 3),
    a unit to 512 at stride 2 and ``modules_per_stage[1]`` modules (depth 2), a unit to 1024 at
    stride 2 and ``modules_per_stage[2]`` modules (depth 1); three units at 2048, the first at
    stride 2; BN-ReLU, global average pooling, the classifier. Units are the pre-activation
    bottlenecks of ResidualUnit (stride on the 3x3, projections from the pre-activated input, no
    conv biases), modules p, t, r = 1, 2, 1 with Caffe's mask pooling. Mask sizes follow the
    input. Attention-56: modules (1, 1, 1); Attention-92: (1, 2, 3). Weights as for
    ResidualAttentionNet, from ``seed``.
    """

    IMAGE_SIZE = 224

    def __init__(self, modules_per_stage=(1, 1, 1), num_classes=1000, residual_attention=True, attention="mixed",
                 seed=0):
        super().__init__(attention, num_classes, seed, residual_attention)
        modules_per_stage = _three("ImageNetAttentionNet", "modules_per_stage must give 3 counts", modules_per_stage)
        for count in modules_per_stage:
            check_int("ImageNetAttentionNet", "each of modules_per_stage", count, 1)
        self.config = dict(modules_per_stage=tuple(int(m) for m in modules_per_stage), num_classes=int(num_classes),
                           residual_attention=bool(residual_attention), attention=str(attention))
        self.stem = ConvBnRelu(3, 64, 7, 2, 3, rng=self.rng)
        cin = self._build_stages(64, IMAGENET_WIDTHS, modules_per_stage, residual_attention=residual_attention,
                                 attention=attention, caffe_pooling=True)
        self._build_top([ResidualUnit(cin, IMAGENET_TAIL, stride=2, rng=self.rng)]
                        + [ResidualUnit(IMAGENET_TAIL, IMAGENET_TAIL, rng=self.rng) for _ in range(2)], num_classes)

    def entry(self, x):
        return F.max_pool2d(self.stem(x), **CAFFE_POOLING)


def imagenet_attention56(num_classes=1000, **kwargs):
    return ImageNetAttentionNet((1, 1, 1), num_classes=num_classes, **kwargs)


def imagenet_attention92(num_classes=1000, **kwargs):
    return ImageNetAttentionNet((1, 2, 3), num_classes=num_classes, **kwargs)


IMAGENET_MODELS = {"attention56": imagenet_attention56, "attention92": imagenet_attention92}


def _constructor(modules_per_stage, p=1, t=2, r=1):
    def build(num_classes=10, **kwargs):
        return ResidualAttentionNet(modules_per_stage, p, t, r, num_classes=num_classes, **kwargs)
    return build


attention56 = _constructor(1)
attention92 = _constructor(2)
attention128 = _constructor(3)
attention164 = _constructor(4)
attention236 = _constructor(6)
attention452 = _constructor(6, p=2, t=4, r=3)

MODELS = {"attention56": attention56, "attention92": attention92, "attention128": attention128,
          "attention164": attention164, "attention236": attention236, "attention452": attention452}
