"""Every op family against PyTorch's cuDNN/ATen composition, on the real layer shapes of the models.

    python -m bench.kernels              # GPU: TF32 and IEEE tables, attention56/92, batch 64 and 128
    python -m bench.kernels --dry-run    # CPU: interpret backend, tiny shapes, agreement only

Layers come from the models themselves: one forward of each model at batch 1 on the numpy
backend with ``ra_kernels.functional``'s ops wrapped to record their arguments' shapes; the
calls are grouped into shape classes (a :class:`Layer`: family, operand shapes, static options),
counted per model, and scaled to the batch. Cross-entropy (on the logits) and the SGD update
(over every parameter, the paper's momentum 0.9, Nesterov, weight decay 1e-4) are added per model.

Per layer, batch and precision: fresh random inputs (never zeros); both sides compute outputs,
updated state and input gradients on the same inputs (PyTorch reads our CuPy arrays through
DLPack) and must agree (``common.TOLERANCES``) before anything is timed; then forward and
forward+backward are timed on each side twice: as device time, by replaying a CUDA graph that
holds many calls (``common.graph_time_ms``: the ratios and rates), and launch-inclusive, by events
around each call (``common.time_ms``: the "launch" columns). Ours is timed at the level of
``ra_kernels.kernels`` (the launchers ``ra_kernels.functional`` calls on the cuda backend,
``op(...) -> (outputs, saved)`` and ``op_backward(dy, saved)``), without the autograd
bookkeeping; PyTorch through ``torch.nn.functional`` and ``torch.autograd.grad``, as its users
call it. Forward runs as in training (batch statistics, inputs that want gradients).
The whole network with both autograds is ``bench.step``.

The ratio is PyTorch's time over ours: above 1, ours is faster. "of roofline": the floor of the
op (its FLOPs at the measured matmul rate of the precision, or its bytes at the measured copy
rate, whichever is larger) over our time.

--dry-run: tiny versions of the models (``common.DRY_RUN_MODEL``: the same depth, widths 8/16/32,
8x8 images, batch 4), the interpret backend, our kernels checked against reference/ in float64
and against PyTorch on the CPU when it is installed; the tables are printed with "dry run: no
timing" instead of times. Nothing is written.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import reference
import ra_kernels.functional as F
from ra_kernels import backend, models
from ra_kernels.autograd import no_grad
from ra_kernels.kernels import attention as attention_kernels
from ra_kernels.kernels import batchnorm as batchnorm_kernels
from ra_kernels.kernels import conv as conv_kernels
from ra_kernels.kernels import linear as linear_kernels
from ra_kernels.kernels import loss as loss_kernels
from ra_kernels.kernels import optim as optim_kernels
from ra_kernels.kernels import pool as pool_kernels
from ra_kernels.kernels import resize as resize_kernels
from ra_kernels.kernels.tiles import out_size
from train.common import non_negative_int, positive_float

from . import common

#: The paper's CIFAR recipe, for the SGD layer.
SGD_OPTIONS = (("momentum", 0.9), ("weight_decay", 1e-4), ("nesterov", True))


# --------------------------------------------------------------------------- operands and costs

def _size(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _hwc(shape):
    return "x".join(str(d) for d in shape[1:])


@dataclass(frozen=True)
class Operand:
    """One array argument of an op.

    layout: ours -> PyTorch (``torch_model.to_torch``); batched: dim 0 is the batch; role: "grad"
    (differentiable input), "const" (read only) or "state" (updated in place: each side gets its
    own copy); draw: how fresh values are drawn (``_draw``).
    """
    name: str
    layout: str = "same"
    batched: bool = False
    role: str = "grad"
    draw: str = "normal"


@dataclass(frozen=True)
class Cost:
    """FLOPs and the fewest bytes (each input read once, each output written once) per call."""
    flops_fwd: float
    flops_bwd: float
    bytes_fwd: float
    bytes_bwd: float


def _draw(kind, rng, shape, shapes):
    """Fresh float32 (or int64 labels) values for an operand: never zeros, scales as in training."""
    if kind == "normal":
        values = rng.standard_normal(shape)
    elif kind == "weight":  # He-like: unit-scale outputs
        values = rng.standard_normal(shape) / np.sqrt(math.prod(shape[:-1]))
    elif kind == "positive":  # gamma, running variance
        values = rng.uniform(0.5, 1.5, shape)
    elif kind == "small":  # beta, running mean, gradients and velocities of the SGD update
        values = 0.1 * rng.standard_normal(shape)
    elif kind == "labels":
        return rng.integers(0, shapes["logits"][1], shape).astype(np.int64)
    elif kind == "lr":
        values = np.full(shape, 0.1)
    else:
        raise ValueError(f"unknown draw {kind!r}")
    return values.astype(np.float32)


# --------------------------------------------------------------------------- op families

class Family:
    """An op family: its operands, its static options, how each side computes it, what it costs.

    ``op`` names the function in ``reference`` and in ``kernels``, which share one API:
    ``op(...) -> (*outputs, saved)`` and ``op_backward(dy, saved) -> gradients`` of the "grad"
    operands in order (None for an absent one). ``outputs`` name the outputs, the first of which
    receives dy; ``output_layouts`` give their layouts.
    """
    name = op = ""
    kernels = None
    operands: tuple = ()
    options: tuple = ()
    outputs = ("y",)
    output_layouts = ("nhwc",)
    differentiable = True
    recorded = True  # found by wrapping ra_kernels.functional.<op> during a forward

    def call(self, fn, a, o):
        """Run ``fn`` (reference's or the kernels' op) on arrays ``a`` with options ``o``."""
        raise NotImplementedError

    def torch_forward(self, torch, t, o):
        """PyTorch's composition on tensors ``t`` (PyTorch layouts): a callable returning the outputs."""
        raise NotImplementedError

    def output_shape(self, s, o):
        """The shape of the first output (the one dy is for), from the operand shapes ``s``."""
        raise NotImplementedError

    def label(self, s, o) -> str:
        raise NotImplementedError

    def cost(self, s, o) -> Cost:
        raise NotImplementedError


class Conv2d(Family):
    name = op = "conv2d"
    kernels = conv_kernels
    operands = (Operand("x", "nhwc", True), Operand("w", "hwio", draw="weight"))
    options = ("stride", "padding")

    def call(self, fn, a, o):
        return fn(a["x"], a["w"], o["stride"], o["padding"])

    def torch_forward(self, torch, t, o):
        return lambda: (torch.nn.functional.conv2d(t["x"], t["w"], stride=o["stride"], padding=o["padding"]),)

    def output_shape(self, s, o):
        n, h, wd, _ = s["x"]
        kh, kw, _, cout = s["w"]
        return n, out_size(h, kh, o["stride"], o["padding"]), out_size(wd, kw, o["stride"], o["padding"]), cout

    def label(self, s, o):
        kh, kw = s["w"][:2]
        return f"{_hwc(s['x'])} → {_hwc(self.output_shape(s, o))}, {kh}x{kw}/{o['stride']}"

    def cost(self, s, o):
        """2 FLOPs per multiply-add forward, twice that backward (dgrad and wgrad). Bytes: x, w, y
        forward; dy, x, w read and dx, dw written backward."""
        y = self.output_shape(s, o)
        macs = _size(y) * _size(s["w"]) // s["w"][3]
        x, w, y = _size(s["x"]), _size(s["w"]), _size(y)
        return Cost(2 * macs, 4 * macs, 4 * (x + w + y), 4 * (y + 2 * x + 2 * w))


_BN_OPERANDS = (Operand("gamma", draw="positive"), Operand("beta", draw="small"),
                Operand("running_mean", role="state", draw="small"),
                Operand("running_var", role="state", draw="positive"))


def _torch_batch_norm(torch, z, t, relu):
    y = torch.nn.functional.batch_norm(z, t["running_mean"], t["running_var"], t["gamma"], t["beta"],
                                       training=True, momentum=0.1, eps=1e-5)
    return (torch.nn.functional.relu(y) if relu else y), t["running_mean"], t["running_var"]


class ConvBnRelu(Conv2d):
    name = op = "conv_bn_relu"
    operands = Conv2d.operands + _BN_OPERANDS
    options = ("stride", "padding", "relu")
    outputs = ("y", "running_mean", "running_var")
    output_layouts = ("nhwc", "same", "same")

    def call(self, fn, a, o):
        return fn(a["x"], a["w"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], stride=o["stride"],
                  padding=o["padding"], training=True, relu=o["relu"])

    def torch_forward(self, torch, t, o):
        conv = torch.nn.functional.conv2d
        return lambda: _torch_batch_norm(torch, conv(t["x"], t["w"], stride=o["stride"], padding=o["padding"]),
                                         t, o["relu"])

    def cost(self, s, o):
        """The conv's FLOPs (batch norm's few per element not counted). Bytes: forward x, w, y and
        gamma, beta, the running statistics read and written; backward dy, y, x, w, gamma, beta
        read, dx, dw, dgamma, dbeta written (y suffices: where the ReLU passed, it gives x-hat)."""
        conv = super().cost(s, o)
        y, c = _size(self.output_shape(s, o)), s["w"][3]
        return Cost(conv.flops_fwd, conv.flops_bwd, conv.bytes_fwd + 4 * 6 * c, conv.bytes_bwd + 4 * (y + 4 * c))


class BatchNormRelu(Family):
    name = op = "batch_norm"
    kernels = batchnorm_kernels
    operands = (Operand("x", "nhwc", True),) + _BN_OPERANDS
    options = ("relu",)
    outputs = ("y", "running_mean", "running_var")
    output_layouts = ("nhwc", "same", "same")

    def call(self, fn, a, o):
        return fn(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], training=True, relu=o["relu"])

    def torch_forward(self, torch, t, o):
        return lambda: _torch_batch_norm(torch, t["x"], t, o["relu"])

    def output_shape(self, s, o):
        return s["x"]

    def label(self, s, o):
        return _hwc(s["x"]) + (" + ReLU" if o["relu"] else "")

    def cost(self, s, o):
        """Memory-bound: x, y, gamma, beta, running statistics read and written forward;
        dy, y, gamma, beta read and dx, dgamma, dbeta written backward."""
        x, c = _size(s["x"]), s["x"][3]
        return Cost(0, 0, 4 * (2 * x + 6 * c), 4 * (3 * x + 4 * c))


class MaxPool2d(Family):
    name = op = "max_pool2d"
    kernels = pool_kernels
    operands = (Operand("x", "nhwc", True),)
    options = ("kernel_size", "stride", "padding")

    def call(self, fn, a, o):
        return fn(a["x"], o["kernel_size"], o["stride"], o["padding"])

    def torch_forward(self, torch, t, o):
        return lambda: (torch.nn.functional.max_pool2d(t["x"], o["kernel_size"], o["stride"], o["padding"]),)

    def output_shape(self, s, o):
        n, h, w, c = s["x"]
        k, stride, padding = o["kernel_size"], o["stride"], o["padding"]
        return n, out_size(h, k, stride, padding), out_size(w, k, stride, padding), c

    def label(self, s, o):
        return f"{_hwc(s['x'])}, {o['kernel_size']}x{o['kernel_size']}/{o['stride']}"

    def cost(self, s, o):
        """x read, y written forward; dy and a 1-byte tap index per output read, dx written backward."""
        x, y = _size(s["x"]), _size(self.output_shape(s, o))
        return Cost(0, 0, 4 * (x + y), 5 * y + 4 * x)


class UpsampleBilinear(Family):
    name = op = "upsample_bilinear"
    kernels = resize_kernels
    operands = (Operand("x", "nhwc", True), Operand("skip", "nhwc", True))
    options = ("size",)

    def call(self, fn, a, o):
        return fn(a["x"], o["size"], a["skip"])

    def torch_forward(self, torch, t, o):
        def forward():
            y = torch.nn.functional.interpolate(t["x"], size=o["size"], mode="bilinear", align_corners=True)
            return (y if t["skip"] is None else y + t["skip"]),
        return forward

    def output_shape(self, s, o):
        n, _, _, c = s["x"]
        return (n, *o["size"], c)

    def label(self, s, o):
        return f"{_hwc(s['x'])} → {o['size'][0]}x{o['size'][1]}" + (" + skip" if s["skip"] else "")

    def cost(self, s, o):
        """x, skip read and y written forward; dy read and dx written backward (dskip is dy)."""
        x, y = _size(s["x"]), _size(self.output_shape(s, o))
        return Cost(0, 0, 4 * (x + _size(s["skip"]) + y), 4 * (y + x))


class AttentionMix(Family):
    name = op = "attention_mix"
    kernels = attention_kernels
    operands = (Operand("mask_logits", "nhwc", True), Operand("trunk", "nhwc", True))
    options = ("residual", "from_logits")

    def call(self, fn, a, o):
        return fn(a["mask_logits"], a["trunk"], residual=o["residual"], from_logits=o["from_logits"])

    def torch_forward(self, torch, t, o):
        def forward():
            gate = torch.sigmoid(t["mask_logits"]) if o["from_logits"] else t["mask_logits"]
            return ((1 + gate) * t["trunk"] if o["residual"] else gate * t["trunk"]),
        return forward

    def output_shape(self, s, o):
        return s["trunk"]

    def label(self, s, o):
        return _hwc(s["trunk"]) + ("" if o["residual"] else ", naive") + ("" if o["from_logits"] else ", mask given")

    def cost(self, s, o):
        """m, t read and y written forward; dy, m, t read and dm, dt written backward."""
        n = _size(s["trunk"])
        return Cost(0, 0, 12 * n, 20 * n)


class Linear(Family):
    name = op = "linear"
    kernels = linear_kernels
    operands = (Operand("x", batched=True), Operand("w", "io", draw="weight"), Operand("b", draw="small"))
    outputs, output_layouts = ("y",), ("same",)

    def call(self, fn, a, o):
        return fn(a["x"], a["w"], a["b"])

    def torch_forward(self, torch, t, o):
        return lambda: (torch.nn.functional.linear(t["x"], t["w"], t["b"]),)

    def output_shape(self, s, o):
        return s["x"][0], s["w"][1]

    def label(self, s, o):
        return f"{s['w'][0]} → {s['w'][1]}"

    def cost(self, s, o):
        """2 FLOPs per multiply-add forward, twice that backward. Bytes: x, w, b, y forward;
        dy, w, x read and dx, dw, db written backward."""
        (n, n_in), n_out = s["x"], s["w"][1]
        macs = n * n_in * n_out
        return Cost(2 * macs, 4 * macs, 4 * (n * n_in + n_in * n_out + n_out + n * n_out),
                    4 * (n * n_out + 2 * n_in * n_out + 2 * n * n_in + n_out))


class CrossEntropy(Family):
    name = op = "cross_entropy"
    kernels = loss_kernels
    operands = (Operand("logits", batched=True), Operand("labels", batched=True, role="const", draw="labels"))
    outputs, output_layouts = ("loss",), ("same",)
    recorded = False

    def call(self, fn, a, o):
        return fn(a["logits"], a["labels"])

    def torch_forward(self, torch, t, o):
        return lambda: (torch.nn.functional.cross_entropy(t["logits"], t["labels"]),)

    def output_shape(self, s, o):
        return ()

    def label(self, s, o):
        return f"{s['logits'][1]} classes"

    def cost(self, s, o):
        """logits and int64 labels read, the loss written forward; logits, labels, dloss read and
        dlogits written backward."""
        n, k = s["logits"]
        return Cost(0, 0, 4 * n * k + 8 * n + 4, 8 * n * k + 8 * n + 4)


class SgdUpdate(Family):
    """One fused SGD step over every parameter of a model: flat float32 buffers, lr on the device."""
    name = op = "sgd_step"
    kernels = optim_kernels
    operands = (Operand("param", role="state", draw="small"), Operand("grad", role="const", draw="small"),
                Operand("velocity", role="state", draw="small"), Operand("lr", role="const", draw="lr"))
    options = tuple(name for name, _ in SGD_OPTIONS)
    outputs, output_layouts = ("param", "velocity"), ("same", "same")
    differentiable = recorded = False

    def call(self, fn, a, o):
        # reference.sgd_step returns new arrays, the kernel updates param and velocity in place:
        # both return (param, velocity), which is what is compared.
        return fn(a["param"], a["grad"], a["velocity"], a["lr"], o["momentum"], o["weight_decay"], o["nesterov"])

    def torch_forward(self, torch, t, o):
        """torch.optim.SGD with the fused kernel (one launch, as ours) over the same flat buffer,
        its momentum buffer set to our velocity."""
        param = t["param"]
        param.grad = t["grad"]
        optimizer = torch.optim.SGD([param], lr=float(t["lr"].cpu()[0]), momentum=o["momentum"],
                                    weight_decay=o["weight_decay"], nesterov=o["nesterov"], fused=True)
        optimizer.state[param]["momentum_buffer"] = t["velocity"]

        def step():
            optimizer.step()
            return param, t["velocity"]
        return step

    def label(self, s, o):
        return f"{s['param'][0]:,} parameters"

    def cost(self, s, o):
        """param, grad, velocity read and param, velocity written (20 B per parameter)."""
        return Cost(0, 0, 20 * s["param"][0] + 4, 0)


FAMILIES = {f.name: f for f in (ConvBnRelu(), Conv2d(), BatchNormRelu(), MaxPool2d(), UpsampleBilinear(),
                                 AttentionMix(), Linear(), CrossEntropy(), SgdUpdate())}


# --------------------------------------------------------------------------- layers of the models

@dataclass(frozen=True)
class Layer:
    """A shape class: a family, its operands' shapes at batch 1 (None: absent) and its static options."""
    family: str
    shapes: tuple   # ((operand name, shape or None), ...)
    options: tuple  # ((option name, value), ...)

    def at_batch(self, batch: int) -> dict:
        """Operand shapes with the batch dimension set to ``batch``."""
        operands = {op.name: op for op in FAMILIES[self.family].operands}
        return {name: None if shape is None else (batch,) + shape[1:] if operands[name].batched else shape
                for name, shape in self.shapes}

    def label(self) -> str:
        return FAMILIES[self.family].label(self.at_batch(1), dict(self.options))


def _layer(family: Family, arguments: dict) -> Layer:
    """The Layer of one call, from its bound arguments (Tensors, arrays, options)."""
    def shape(value):
        return None if value is None else tuple(int(d) for d in value.shape)

    def plain(value):
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else value

    return Layer(family.name, tuple((op.name, shape(arguments[op.name])) for op in family.operands),
                 tuple((name, plain(arguments[name])) for name in family.options))


@contextlib.contextmanager
def _recording_functional_calls(layers: list):
    """Inside the block, every call of a recorded family's ``ra_kernels.functional`` op appends its
    Layer to ``layers`` (the modules call the ops through the module, so wrapping its attributes
    catches every call); the original functions are restored afterwards."""
    originals = {f.op: getattr(F, f.op) for f in FAMILIES.values() if f.recorded}

    def recorder(family, fn):
        signature = inspect.signature(fn)

        def recorded(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            layers.append(_layer(family, bound.arguments))
            return fn(*args, **kwargs)
        return recorded

    try:
        for family in FAMILIES.values():
            if family.recorded:
                setattr(F, family.op, recorder(family, originals[family.op]))
        yield layers
    finally:
        for op, fn in originals.items():
            setattr(F, op, fn)


def model_layers(model, image_size: int) -> collections.Counter:
    """{Layer: calls per training step} of ``model`` (built on the numpy backend), from one forward
    of a single image plus the loss and the SGD update, in first-call order."""
    calls = []
    # eval: batch 1 at the deepest mask level would be a single value per channel
    with backend.use_backend("numpy"), no_grad(), _recording_functional_calls(calls), model.evaluating():
        logits = model(np.ones((1, image_size, image_size, 3), np.float32))
    num_classes = logits.shape[1]
    calls.append(Layer("cross_entropy", (("logits", (1, num_classes)), ("labels", (1,))), ()))
    n_params = sum(_size(p.shape) for p in model.parameters())
    calls.append(Layer("sgd_step", (("param", (n_params,)), ("grad", (n_params,)), ("velocity", (n_params,)),
                                    ("lr", (1,))), SGD_OPTIONS))
    return collections.Counter(calls)


def benchmark_layers(model_names, dry_run: bool):
    """[(Layer, {model name: uses})] over the models, grouped by family in FAMILIES order, each
    family's layers in first-call order."""
    uses = {}
    for name in model_names:
        with backend.use_backend("numpy"):
            model = common.build_model(name, dry_run)
        for layer, count in model_layers(model, common.DRY_RUN_IMAGE if dry_run else common.IMAGE_SIZE).items():
            uses.setdefault(layer, {})[name] = count
    order = list(FAMILIES)
    return sorted(uses.items(), key=lambda item: order.index(item[0].family))


# --------------------------------------------------------------------------- the two sides

def _grad_operands(family: Family, arrays: dict):
    """The operands that get a gradient in this call (an absent optional one does not)."""
    return [op for op in family.operands if op.role == "grad" and arrays[op.name] is not None]


class OurSide:
    """One layer on our kernels (``impl``: the family's kernels module, arrays of the current
    backend) or on reference/ (``impl``: the reference package, float64 host arrays)."""

    def __init__(self, family: Family, impl, arrays: dict, options: dict, dy):
        self.family, self.arrays, self.options, self.dy = family, arrays, options, dy
        self.fn = getattr(impl, family.op)
        self.fn_backward = getattr(impl, family.op + "_backward", None)
        self.grad_operands = _grad_operands(family, arrays)

    def forward(self):
        """(outputs, saved); saved is None for an op without a backward."""
        result = self.family.call(self.fn, self.arrays, self.options)
        return (result[:-1], result[-1]) if self.family.differentiable else (result, None)

    def forward_backward(self):
        return self.fn_backward(self.dy, self.forward()[1])

    def results(self) -> dict:
        """Outputs and gradients ("d" + operand name) as float64 host arrays in our layouts."""
        outputs, saved = self.forward()
        results = dict(zip(self.family.outputs, outputs))
        if self.family.differentiable:
            grads = [g for g in self.fn_backward(self.dy, saved) if g is not None]
            results.update((f"d{op.name}", g) for op, g in zip(self.grad_operands, grads))
        return {name: backend.to_numpy(value).astype(np.float64) for name, value in results.items()}


class TorchSide:
    """One layer on PyTorch, reading our arrays (CuPy or NumPy) through DLPack, converted to
    PyTorch's layouts; state operands get their own copy of the initial values ``host``."""

    def __init__(self, torch, family: Family, arrays: dict, host: dict, options: dict, dy):
        from . import torch_model
        self.torch, self.family, self.torch_model = torch, family, torch_model
        tensors = {}
        for op in family.operands:
            array = host[op.name].copy() if op.role == "state" else arrays[op.name]
            tensors[op.name] = None if array is None else torch_model.to_torch(
                torch.from_dlpack(backend.asarray(array)), op.layout)
        self.grad_operands = _grad_operands(family, arrays)
        self.grad_tensors = [tensors[op.name].detach().requires_grad_() for op in self.grad_operands]
        tensors.update((op.name, t) for op, t in zip(self.grad_operands, self.grad_tensors))
        self.run = family.torch_forward(torch, tensors, options)
        self.dy = None if dy is None else torch_model.to_torch(torch.from_dlpack(dy), family.output_layouts[0])

    def forward(self):
        return self.run()

    def forward_backward(self):
        return self.torch.autograd.grad(self.run()[0], self.grad_tensors, self.dy)

    def results(self) -> dict:
        """As :meth:`OurSide.results`."""
        outputs = self.run()
        results = {name: (t.detach(), layout)
                   for name, t, layout in zip(self.family.outputs, outputs, self.family.output_layouts)}
        if self.family.differentiable:
            grads = self.torch.autograd.grad(outputs[0], self.grad_tensors, self.dy)
            results.update((f"d{op.name}", (g, op.layout)) for op, g in zip(self.grad_operands, grads))
        return {name: self.torch_model.from_torch(t, layout).cpu().double().numpy()
                for name, (t, layout) in results.items()}


# --------------------------------------------------------------------------- one layer

#: Suffix of a phase timed launch-inclusive (events around each call) rather than as device time.
LAUNCH = " launch"

@dataclass
class LayerResult:
    """One layer at one batch and precision: agreement and (unless a dry run) timings.

    errors: {"reference" or "PyTorch": largest relative error of ours against it};
    times: {("ours" or "PyTorch", "fwd" or "fwd+bwd"): common.Timing}, device time by graph replay,
    and the same phases + LAUNCH: launch-inclusive, by events around each call.
    """
    layer: Layer
    uses: dict
    batch: int
    precision: str
    errors: dict
    times: dict

    @property
    def family(self) -> Family:
        return FAMILIES[self.layer.family]

    def cost(self) -> Cost:
        return self.family.cost(self.layer.at_batch(self.batch), dict(self.layer.options))

    def step_ms(self, side):
        """Milliseconds this layer takes per training step on ``side``: forward+backward (the
        update alone for SGD); None in a dry run."""
        timing = self.times.get((side, "fwd+bwd" if self.family.differentiable else "fwd"))
        return None if timing is None else timing.median


#: Layers with a ReLU are compared with dy zeroed where the float64 reference's output is below this.
#: Two correct float32 implementations disagree on the ReLU of an element whose pre-activation lies
#: within their rounding of zero, and each such element changes dbeta by a whole dy, and dx and dw
#: through it. TF32 products move pre-activations (unit scale after batch norm) by about 3e-4:
#: measured on the CPU with reference/, TF32 rounding of x and w alone moves the gradients of a 1x1
#: conv_bn_relu at batch 64 by about 1e-2 with the ReLU and 2e-4 without it, and on the H200 ours and
#: cuDNN's differed by 1.1e-2 to 3.4e-2 on every conv_bn_relu layer (2026-11-30). Zeroing dy within
#: 1e-2 of the kink (0.4% of the elements of a unit normal) leaves no element whose ReLU the sides
#: could see differently, so the tolerance again measures rounding, not kinks.
RELU_KINK = 1e-2


def _float64(host: dict) -> dict:
    return {name: None if v is None else v.astype(np.float64) if v.dtype.kind == "f" else v.copy()
            for name, v in host.items()}


def away_from_relu_kink(layer: Layer, host: dict, dy):
    """``dy`` with zeros where the layer's float64 reference output is below RELU_KINK, for a layer
    with a ReLU; ``dy`` itself otherwise."""
    family, options = FAMILIES[layer.family], dict(layer.options)
    if not options.get("relu") or dy is None:
        return dy
    y = family.call(getattr(reference, family.op), _float64(host), options)[0]
    return np.where(y < RELU_KINK, 0, dy).astype(dy.dtype)


def draw_inputs(layer: Layer, batch: int, rng):
    """Fresh host inputs of one layer at ``batch``: ({operand name: array or None}, dy or None)."""
    family, options = FAMILIES[layer.family], dict(layer.options)
    shapes = layer.at_batch(batch)
    host = {op.name: None if shapes[op.name] is None else _draw(op.draw, rng, shapes[op.name], shapes)
            for op in family.operands}
    dy = _draw("normal", rng, family.output_shape(shapes, options), shapes) if family.differentiable else None
    return host, dy


def _on_backend(host: dict, dy):
    """Host inputs and dy as arrays of the current backend, copies (the interpret backend would
    otherwise update ``host``'s state operands in place)."""
    arrays = {name: None if value is None else backend.asarray(value.copy()) for name, value in host.items()}
    return arrays, None if dy is None else backend.asarray(dy)


def our_side(layer: Layer, batch: int, rng) -> OurSide:
    """One layer on our kernels, on fresh inputs of the current backend (to compile its kernels, say)."""
    family = FAMILIES[layer.family]
    arrays, dy = _on_backend(*draw_inputs(layer, batch, rng))
    return OurSide(family, family.kernels, arrays, dict(layer.options), dy)


def run_layer(layer: Layer, uses: dict, batch: int, precision: str, session: common.Session) -> LayerResult:
    """Check agreement of one layer on fresh inputs, then time it (unless a dry run).

    Raises common.AgreementError when ours and a comparison side disagree.
    """
    family, options = FAMILIES[layer.family], dict(layer.options)
    host, dy_host = draw_inputs(layer, batch, session.rng)
    dy_host = away_from_relu_kink(layer, host, dy_host)
    arrays, dy = _on_backend(host, dy_host)
    ours = OurSide(family, family.kernels, arrays, options, dy)
    others = {}
    if session.dry_run:
        others["reference"] = OurSide(family, reference, _float64(host), options,
                                      None if dy_host is None else dy_host.astype(np.float64))
    if session.torch is not None:
        others["PyTorch"] = TorchSide(session.torch, family, arrays, host, options, dy)
    what = f"{layer.family} {layer.label()} at batch {batch}, {precision}"
    ours_results = ours.results()
    errors = {name: common.check_agreement(f"{what}: ours against {name}", ours_results, side.results(),
                                           common.TOLERANCES[precision])
              for name, side in others.items()}
    times = {}
    if not session.dry_run:
        phases = [("fwd", "forward")] + ([("fwd+bwd", "forward_backward")] if family.differentiable else [])
        for side_name, side, clock in (("ours", ours, session.our_clock),
                                       ("PyTorch", others["PyTorch"], session.torch_clock)):
            for phase, method in phases:
                fn = getattr(side, method)
                times[side_name, phase + LAUNCH] = common.time_ms(fn, clock, budget_ms=session.budget_ms)
                try:
                    times[side_name, phase] = common.graph_time_ms(fn, clock)
                except Exception as error:  # a side that cannot be captured keeps its launch-inclusive time
                    print(f"  {what}: {side_name} {phase} could not be captured in a CUDA graph: {error}",
                          file=sys.stderr)
    return LayerResult(layer, uses, batch, precision, errors, times)


# --------------------------------------------------------------------------- reports

def _us(timing) -> str:
    return "-" if timing is None else f"{timing.median * 1e3:,.1f}"


def _ratio(theirs, ours) -> str:
    return "-" if theirs is None or ours is None else f"{theirs.median / ours.median:.2f}"


def layer_table(results, model_names, ceilings) -> str:
    """One row per layer: uses per model, times, ratios (PyTorch / ours), our rate and fraction of
    roofline for a training step's share (forward+backward, or the update), agreement."""
    header = (["op", "layer", "uses " + "/".join(_short(m) for m in model_names),
               "fwd ours µs", "fwd PyTorch µs", "fwd ratio", "f+b ours µs", "f+b PyTorch µs", "f+b ratio",
               "ours rate", "of roofline", "f+b launch ours µs", "f+b launch PyTorch µs"]
              + [f"err vs {name}" for name in ("reference", "PyTorch") if any(name in r.errors for r in results)])
    rows = []
    for r in results:
        t = r.times
        rate = roofline = "-"
        step = r.step_ms("ours")
        if step is not None:
            cost = r.cost()
            flops, nbytes = cost.flops_fwd + cost.flops_bwd, cost.bytes_fwd + cost.bytes_bwd
            floor, bound = common.roofline(flops, nbytes, ceilings, r.precision)
            rate, roofline = common.achieved(flops, nbytes, step, bound), f"{floor / step:.0%}"
        step_phase = "fwd+bwd" if r.family.differentiable else "fwd"
        rows.append([r.layer.family, r.layer.label(), "/".join(str(r.uses.get(m, 0)) for m in model_names),
                     _us(t.get(("ours", "fwd"))), _us(t.get(("PyTorch", "fwd"))),
                     _ratio(t.get(("PyTorch", "fwd")), t.get(("ours", "fwd"))),
                     _us(t.get(("ours", "fwd+bwd"))), _us(t.get(("PyTorch", "fwd+bwd"))),
                     _ratio(t.get(("PyTorch", "fwd+bwd")), t.get(("ours", "fwd+bwd"))), rate, roofline,
                     _us(t.get(("ours", step_phase + LAUNCH))), _us(t.get(("PyTorch", step_phase + LAUNCH)))]
                    + [f"{r.errors[name]:.1e}" for name in ("reference", "PyTorch") if name in r.errors])
    return common.markdown_table(header, rows)


def _short(model_name: str) -> str:
    return model_name.removeprefix("attention")


def step_ratios(results, model: str, batch: int) -> dict:
    """{family, and "all": PyTorch's time over ours for one training step's worth of its layers
    (each weighted by its uses in ``model``) at ``batch``, or None where a time is missing (a dry run)}."""
    ratios = {}
    for family in list(dict.fromkeys(r.layer.family for r in results)) + ["all"]:
        chosen = [r for r in results if r.batch == batch and r.uses.get(model) and family in (r.layer.family, "all")]
        totals = [sum(r.uses[model] * r.step_ms(side) for r in chosen) if chosen and
                  all(r.step_ms(side) is not None for r in chosen) else None for side in ("PyTorch", "ours")]
        ratios[family] = None if None in totals else totals[0] / totals[1]
    return ratios


def summary_table(results, model_names, batches) -> str:
    """Per family, :func:`step_ratios` per model and batch; "-" in a dry run."""
    columns = {(m, b): step_ratios(results, m, b) for m in model_names for b in batches}
    header = ["op"] + [f"{_short(m)} b{b}" for m, b in columns]
    families = next(iter(columns.values())) if columns else {}
    rows = [[family] + ["-" if ratios[family] is None else f"{ratios[family]:.2f}" for ratios in columns.values()]
            for family in families]
    return common.markdown_table(header, rows)


def raw_records(results) -> list:
    """Every number of the run as JSON-ready records, one per layer, batch and precision."""
    return [{"family": r.layer.family, "layer": r.layer.label(), "shapes": r.layer.at_batch(r.batch),
             "options": dict(r.layer.options), "uses": r.uses, "batch": r.batch, "precision": r.precision,
             "errors": r.errors, "cost": vars(r.cost()),
             "times_ms": {f"{side} {phase}": vars(t) for (side, phase), t in r.times.items()}} for r in results]


def chart(records: list, path: Path):
    """PNG of PyTorch / ours per layer, forward and forward+backward, one panel per precision and
    batch, from ``raw_records`` (or the JSON a run wrote: ``--chart-from``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = list(dict.fromkeys((r["precision"], r["batch"]) for r in records))
    n_layers = max(sum(1 for r in records if (r["precision"], r["batch"]) == p) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 1.5 + 0.22 * n_layers), sharey=True,
                             squeeze=False)
    for ax, (precision, batch) in zip(axes[0], panels):
        chosen = [r for r in records if (r["precision"], r["batch"]) == (precision, batch)]
        ys = np.arange(len(chosen))
        for offset, phase in ((-0.2, "fwd"), (0.2, "fwd+bwd")):
            ratios = [r["times_ms"][f"PyTorch {phase}"]["median"] / r["times_ms"][f"ours {phase}"]["median"]
                      if {f"ours {phase}", f"PyTorch {phase}"} <= r["times_ms"].keys() else np.nan for r in chosen]
            ax.barh(ys + offset, ratios, height=0.4, label=phase)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        # Ratios lie within about 1/8 to 8: plain labels at the powers of two; the log scale's
        # minor-tick labels would overlap.
        ax.set_xticks([2.0 ** k for k in range(-3, 4)], [f"{2.0 ** k:g}" for k in range(-3, 4)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{precision.upper()}, batch {batch}")
        ax.set_xlabel("PyTorch time / ours (> 1: ours faster)")
        ax.set_yticks(ys, [f"{r['family']} {r['layer']}" for r in chosen], fontsize=7)
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["attention56", "attention92"], choices=list(models.MODELS),
                        help="models whose layers are benchmarked (default: attention56 attention92)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128], help="batch sizes (default: 64 128)")
    parser.add_argument("--precisions", nargs="+", default=["tf32", "ieee"], choices=list(common.TOLERANCES),
                        help="float32 matrix products as TF32 or IEEE on both sides, one table each "
                             "(default: tf32 ieee)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="op families to run (default: all)")
    parser.add_argument("--budget-ms", type=positive_float, default=100.0,
                        help="device time per launch-inclusive measurement; repetitions are clamped to [20, 500] "
                             "(default: 100)")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="seed of the inputs (default: a fresh one, printed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="RESULTS.md is appended here, the chart and raw JSON go to OUT/charts (default: bench/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: interpret backend, tiny shapes, agreement checks, no timing, nothing written")
    parser.add_argument("--chart-from", type=Path, metavar="JSON",
                        help="only draw the chart of an earlier run from its JSON (PNG beside it), e.g. where "
                             "the GPU machine had no matplotlib")
    args = parser.parse_args(argv)
    if not args.dry_run:  # nothing is written in a dry run
        common.checked_out(parser, args.out)
    args.command = "python -m bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    if any(b < 2 for b in args.batches):
        parser.error(f"--batches must be at least 2 (batch norm in training), got {args.batches}")
    if args.chart_from and not args.chart_from.is_file():
        parser.error(f"--chart-from {args.chart_from}: no such file (a run writes it beside its chart, "
                     f"charts/kernels-<date>.json)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chart_from:
        chart(json.loads(args.chart_from.read_text())["results"], args.chart_from.with_suffix(".png"))
        print(f"chart {args.chart_from.with_suffix('.png')}")
        return 0
    session = common.start_session(args.dry_run, args.seed, args.budget_ms)
    ceilings = None
    if not session.dry_run:
        ceilings = common.measure_ceilings(session.torch, session.torch_clock)
        print("ceilings:", ceilings.describe())
    batches = [common.DRY_RUN_BATCH] if session.dry_run else args.batches
    layers = [(layer, uses) for layer, uses in benchmark_layers(args.models, session.dry_run)
              if layer.family in args.families]
    print(f"{len(layers)} layer shapes from {', '.join(args.models)}"
          + (f" (dry run: widths {common.DRY_RUN_MODEL['widths']}, {common.DRY_RUN_IMAGE}x{common.DRY_RUN_IMAGE} "
             "images)"
             if session.dry_run else ""))
    results = []
    for precision in args.precisions:
        with common.precision(precision, session.torch):
            for batch in batches:
                for layer, uses in layers:
                    results.append(run_layer(layer, uses, batch, precision, session))
                    print(f"  {precision} b{batch} {layer.family} {layer.label()}: ok", file=sys.stderr)
    sections = []
    for precision in args.precisions:
        for batch in batches:
            chosen = [r for r in results if (r.precision, r.batch) == (precision, batch)]
            caption = f"### {precision.upper()}, batch {batch}" + (f" ({common.NO_TIMING})" if session.dry_run else "")
            sections.append(caption + "\n\n" + layer_table(chosen, args.models, ceilings))
    summaries = [f"### PyTorch / ours per training step, {precision.upper()}"
                 + (f" ({common.NO_TIMING})" if session.dry_run else "") + "\n\n"
                 + summary_table([r for r in results if r.precision == precision], args.models, batches)
                 for precision in args.precisions]
    print("\n\n".join(sections + summaries))
    if not session.dry_run:
        write_report(args, session, ceilings, results, sections + summaries)
    return 0


def write_report(args, session, ceilings, results, sections):
    """Append the tables to OUT/RESULTS.md with the run's environment and ceilings; every number to
    OUT/charts/kernels-<date>.json, the chart beside it (skipped, with a note, without matplotlib)."""
    env = common.environment(session.torch, args.command)
    stamp = env["date"].replace(" ", "-").replace(":", "")
    raw_path = args.out / "charts" / f"kernels-{stamp}.json"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    records = raw_records(results)
    raw_path.write_text(json.dumps({"environment": env, "ceilings": vars(ceilings), "results": records},
                                   indent=1, default=str))
    header = (f"## bench.kernels, {env['date']}\n\n{common.describe_environment(env)}\n\n"
              f"Ceilings measured in this run: {ceilings.describe()}. Device time: median over 10 replays "
              f"of a CUDA graph of 20 calls, per call. Launch-inclusive: median of 20 to 500 calls "
              f"({args.budget_ms:g} ms of device time), L2 flushed before each. Ratio = PyTorch / ours.\n")
    chart_link = f"![PyTorch / ours per layer](charts/{raw_path.with_suffix('.png').name})"
    common.append_results(args.out / "RESULTS.md", "\n\n".join([header] + sections + [chart_link]))
    print(f"\nappended to {args.out / 'RESULTS.md'}; every number in {raw_path}")
    try:
        chart(records, raw_path.with_suffix(".png"))
    except ImportError:
        print(f"matplotlib is not installed: draw the chart elsewhere with "
              f"python -m bench.kernels --chart-from {raw_path}")


if __name__ == "__main__":
    sys.exit(main())
