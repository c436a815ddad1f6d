"""Modules: parameters, buffers, sub-modules, train/eval, state dicts; the generic layers
(Conv2d, BatchNorm2d, ConvBnRelu, Linear, Sequential). The paper's blocks are in models.py.

A :class:`Module` finds its parts by attribute assignment: a :class:`Parameter`
is a trainable tensor, another Module is a child, and ``register_buffer`` names
an array that is state but not trained (batch-norm running statistics).
``state_dict()`` gives host NumPy copies keyed by dotted names, so a checkpoint
made on the GPU loads on the CPU; ``save``/``load`` write and read it as .npz.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict, defaultdict

import numpy as np

from . import autograd
from . import functional as F
from . import npzfile
from .autograd import Tensor
from .backend import asarray, is_cupy_array, to_numpy


_recorded_calls = []  # a stack of lists; the innermost records (module, output shape) per call


@contextlib.contextmanager
def record_calls():
    """Inside the block every module call appends (module, output shape) to the yielded list."""
    calls = []
    _recorded_calls.append(calls)
    try:
        yield calls
    finally:
        _recorded_calls.pop()


class Parameter(Tensor):
    """A trainable tensor: requires a gradient."""
    __slots__ = ()

    def __init__(self, data):
        super().__init__(data, requires_grad=True)


class Module:
    """Base class: subclasses assign Parameters, Modules and buffers in ``__init__``
    and compute in ``forward``; calling the module calls ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        if not isinstance(value, (Parameter, Module)):
            # A registered name keeps its kind: any other value would silently drop it from
            # parameters() and state_dict() (PyTorch raises too). Parameters and modules take any name.
            if name in self._buffers:
                if not (isinstance(value, np.ndarray) or is_cupy_array(value)):
                    raise TypeError(f"{type(self).__name__}.{name} is a buffer: assign an array, not a "
                                    f"{type(value).__name__}")
                self._buffers[name] = value  # assigning a registered buffer replaces it
                return
            if name in self._parameters or name in self._modules:
                kind = "parameter: assign a Parameter" if name in self._parameters else "submodule: assign a Module"
                raise TypeError(f"{type(self).__name__}.{name} is a {kind}, not a {type(value).__name__}")
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name):  # only called when normal lookup fails
        for table in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__.get(table, ()):
                return self.__dict__[table][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name: str, array):
        """Keep ``array`` as state saved in ``state_dict`` but not trained."""
        if name in self._parameters or name in self._modules:
            kind = "parameter" if name in self._parameters else "submodule"
            raise ValueError(f"{type(self).__name__}.register_buffer: {name!r} is already a {kind}")
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if _recorded_calls:
            _recorded_calls[-1].append((self, tuple(out.shape)))
        return out

    # ----------------------------------------------------------------- traversal

    def named_modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant, depth first."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self):
        """(dotted name, Parameter) for every parameter of the tree, each once."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield prefix + name, b

    def zero_grad(self):
        """Zero every gradient in place (an optimizer may hold them as views of one buffer), one kernel
        each on the kernel backends (``autograd.arithmetic``), so that a captured step may call it."""
        for p in self.parameters():
            if p.grad is not None:
                autograd.arithmetic.zero(p.grad)

    # ----------------------------------------------------------------- modes

    def train(self, mode: bool = True):
        """Training mode (batch statistics) for this module and all below; returns self."""
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics); returns self."""
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """``with model.evaluating(): ...`` runs the block in eval mode, then gives every module the mode
        it had before, each its own (a batch norm frozen in eval mode inside a training model stays
        frozen; ``train(was_training)`` would set them all alike)."""
        modes = [(module, module.training) for _, module in self.named_modules()]
        self.eval()
        try:
            yield self
        finally:
            for module, mode in modes:
                object.__setattr__(module, "training", mode)

    # ----------------------------------------------------------------- state

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Host NumPy copies of every parameter and buffer, by dotted name."""
        state = OrderedDict((name, to_numpy(p.data).copy()) for name, p in self.named_parameters())
        state.update((name, to_numpy(b).copy()) for name, b in self.named_buffers())
        return state

    def load_state_dict(self, state, strict: bool = True):
        """Copy arrays from ``state`` (name -> array) into parameters and buffers, in place.

        Each value is converted to the kind of array (NumPy or CuPy) and the dtype it
        replaces, so a GPU checkpoint loads into a CPU model; shapes must match. With
        ``strict``, missing and unexpected names are errors. Everything is checked before
        anything is copied: a load that fails leaves the module as it was.
        """
        targets = dict(self.named_parameters())
        targets.update(self.named_buffers())
        owners = defaultdict(list)  # each parameter or buffer: every (module, its own name for it) holding it
        for _, module in self.named_modules():
            for name, target in (*module._parameters.items(), *module._buffers.items()):
                owners[id(target)].append((module, name))
        missing = [n for n in targets if n not in state]
        unexpected = [n for n in state if n not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {_some(missing)}, unexpected {_some(unexpected)}")
        copies = []
        for name, target in targets.items():
            if name not in state:
                continue
            array = target.data if isinstance(target, Tensor) else target
            value = state[name]
            value = np.asarray(to_numpy(value.data if isinstance(value, Tensor) else value))  # named_parameters()
            if value.shape != tuple(array.shape):
                raise ValueError(f"load_state_dict: {name} has shape {value.shape} in the state, "
                                 f"{tuple(array.shape)} in the module; nothing was loaded")
            if not np.can_cast(value.dtype, np.float64, "same_kind"):
                raise TypeError(f"load_state_dict: {name} has dtype {value.dtype} in the state, {array.dtype} "
                                f"in the module; nothing was loaded")
            for module, own_name in owners[id(target)]:
                problem = module.unloadable(own_name, value)
                if problem:
                    raise ValueError(f"load_state_dict: {name} {problem}; nothing was loaded")
            copies.append((array, value))
        for array, value in copies:
            array[...] = asarray(value, dtype=array.dtype, like=array)
        return self

    def unloadable(self, name, value) -> str | None:
        """Why the host array ``value`` cannot be this module's parameter or buffer ``name``, or None.
        Shapes and dtypes are checked by load_state_dict; a module whose state has more constraints
        states them here."""
        return None

    def architecture(self):
        """What this module is, saved with its weights: {"class": its class name, "config": the
        ``config`` dict it was built from, or None}. Weights load only into the same architecture."""
        return {"class": type(self).__name__, "config": getattr(self, "config", None)}

    def astype(self, dtype):
        """Convert every parameter and buffer to ``dtype`` in place (float64: numpy backend only,
        for gradient checks); returns self."""
        for module in (m for _, m in self.named_modules()):
            for p in module._parameters.values():
                p.data, p.grad = p.data.astype(dtype), None
            for name, b in module._buffers.items():
                module._buffers[name] = b.astype(dtype)
        return self

    def save(self, path):
        """Write the weights (``state_dict()``) and ``architecture()`` to an .npz file, atomically
        (ra_kernels/npzfile.py gives the format, which training checkpoints share)."""
        arrays = {f"model/{name}": value for name, value in self.state_dict().items()}
        npzfile.write(path, arrays, {"kind": "weights", "model": self.architecture()})

    def load(self, path, strict: bool = True):
        """Load the weights of an .npz file written by ``save`` or by ``train.cifar`` (a checkpoint);
        returns self. An error, and nothing changed, when the file cannot be read, holds another
        architecture, or its arrays do not fit."""
        meta, arrays = npzfile.read(path)
        if meta["model"] != json.loads(json.dumps(self.architecture())):  # as stored: tuples become lists
            raise ValueError(f"load: {os.fspath(path)} holds the weights of {_described(meta['model'])}, "
                             f"this module is {_described(self.architecture())}; nothing was loaded")
        return self.load_state_dict(npzfile.members(arrays, "model/"), strict=strict)

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        lines += [f"  {name}: {tuple(p.shape)}" for name, p in self._parameters.items()]
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}()"


def _described(architecture):
    config = architecture["config"]
    return architecture["class"] + ("" if config is None else
                                    "(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")")


# --------------------------------------------------------------------------- layers

def _he_normal(rng, shape, fan_out):
    """Kaiming normal, fan-out mode (ReLU gain): N(0, 2 / fan_out), float32."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)


class Conv2d(Module):
    """Convolution without bias: NHWC in, NHWC out; ``weight`` is HWIO (k, k, cin, cout)."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, padding=0, rng=None):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.stride, self.padding = stride, padding
        k = kernel_size
        self.weight = Parameter(asarray(_he_normal(rng, (k, k, cin, cout), k * k * cout)))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.stride, self.padding)

    def chain_layer(self):
        """This conv as the last layer of ``F.conv_chain``."""
        return self.weight, self.stride, self.padding, None


class BatchNorm2d(Module):
    """Batch norm over N, H, W per channel, optionally followed by ReLU.

    ``gamma``/``beta`` are trained; ``running_mean``/``running_var`` are buffers,
    updated in training mode and used in eval mode.
    """

    def __init__(self, channels, relu=False, momentum=0.1, eps=1e-5):
        super().__init__()
        self.relu, self.momentum, self.eps = relu, momentum, eps
        self.gamma = Parameter(asarray(np.ones(channels, np.float32)))
        self.beta = Parameter(asarray(np.zeros(channels, np.float32)))
        self.register_buffer("running_mean", asarray(np.zeros(channels, np.float32)))
        self.register_buffer("running_var", asarray(np.ones(channels, np.float32)))

    def unloadable(self, name, value):
        # A negative or NaN running variance gives NaN in eval mode (through the square root) and no
        # error; a checkpoint holding one is damaged.
        if name == "running_var":
            rule, bad = "finite and >= 0 (a variance)", ~(np.isfinite(value) & (value >= 0))
        elif name == "running_mean":
            rule, bad = "finite", ~np.isfinite(value)
        else:
            return None
        if not bad.any():
            return None
        return f"must be {rule}: {np.count_nonzero(bad)} of {value.size} values are not, the first {value[bad][0]:g}"

    def statistics(self):
        """The four per-channel arrays F.batch_norm takes, in order."""
        return self.gamma, self.beta, self.running_mean, self.running_var

    def chain_input(self):
        """This batch norm as ``F.conv_chain``'s ``input_bn`` (which always applies the ReLU)."""
        if not self.relu:
            raise ValueError("BatchNorm2d.chain_input: F.conv_chain applies a ReLU after its input batch norm; "
                             "this one has relu=False")
        return self.statistics()

    def forward(self, x):
        return F.batch_norm(x, *self.statistics(), training=self.training, momentum=self.momentum,
                            eps=self.eps, relu=self.relu)


class ConvBnRelu(Module):
    """conv2d then batch norm then ReLU (if ``relu``), as one fused op."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, padding=0, relu=True, rng=None):
        super().__init__()
        self.conv = Conv2d(cin, cout, kernel_size, stride, padding, rng)
        self.bn = BatchNorm2d(cout, relu=relu)

    def chain_layer(self):
        """This layer as a layer of ``F.conv_chain`` (which always applies the ReLU)."""
        if not self.bn.relu:
            raise ValueError("ConvBnRelu.chain_layer: F.conv_chain applies a ReLU after each batch norm; this "
                             "layer has relu=False")
        return self.conv.weight, self.conv.stride, self.conv.padding, self.bn.statistics()

    def forward(self, x):
        return F.conv_bn_relu(x, self.conv.weight, *self.bn.statistics(), stride=self.conv.stride,
                              padding=self.conv.padding, training=self.training,
                              momentum=self.bn.momentum, eps=self.bn.eps, relu=self.bn.relu)


class Linear(Module):
    """``x @ weight + bias``; weight (in, out), PyTorch's default uniform initialisation."""

    def __init__(self, n_in, n_out, rng=None):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        bound = 1.0 / np.sqrt(n_in)
        self.weight = Parameter(asarray(rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)))
        self.bias = Parameter(asarray(rng.uniform(-bound, bound, n_out).astype(np.float32)))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _some(names, shown=8):
    """Names for a message: the first ``shown`` and how many more (a network has hundreds)."""
    if not names:
        return "nothing"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} ({', '.join(names[:shown])}{more})"


class Sequential(Module):
    """Modules applied in order; children are named 0, 1, 2, ..."""

    def __init__(self, *modules):
        super().__init__()
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, index):
        """The module at ``index`` (from the end when negative), or a Sequential of a slice's, as for a list."""
        modules = list(self._modules.values())
        return Sequential(*modules[index]) if isinstance(index, slice) else modules[index]

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x
