"""Modules: parameters, buffers, sub-modules, train/eval, state dicts.

A :class:`Module` finds its parts by attribute assignment: a :class:`Parameter`
is a trainable tensor, another Module is a child, and ``register_buffer`` names
an array that is state but not trained (batch-norm running statistics).
``state_dict()`` gives host NumPy copies keyed by dotted names, so a checkpoint
made on the GPU loads on the CPU; ``save``/``load`` write and read it as .npz.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from .autograd import Tensor
from .backend import asarray, to_numpy


class Parameter(Tensor):
    """A trainable tensor: requires a gradient."""
    __slots__ = ()

    def __init__(self, data):
        super().__init__(data, requires_grad=True)

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


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
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = value  # assigning a registered buffer replaces it
            return
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
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

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
        for p in self.parameters():
            p.grad = None

    # ----------------------------------------------------------------- modes

    def train(self, mode: bool = True):
        """Training mode (batch statistics) for this module and all below; returns self."""
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics); returns self."""
        return self.train(False)

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
        ``strict``, missing and unexpected names are errors.
        """
        targets = dict(self.named_parameters())
        targets.update(self.named_buffers())
        missing = [n for n in targets if n not in state]
        unexpected = [n for n in state if n not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        for name, target in targets.items():
            if name not in state:
                continue
            array = target.data if isinstance(target, Tensor) else target
            value = np.asarray(to_numpy(state[name]))
            if value.shape != tuple(array.shape):
                raise ValueError(f"load_state_dict: {name} has shape {value.shape} in the state, "
                                 f"{tuple(array.shape)} in the module")
            array[...] = asarray(value, dtype=array.dtype, like=array)
        return self

    def save(self, path):
        """Write ``state_dict()`` to an .npz file (atomically: a temporary file, then rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **self.state_dict())
        os.replace(tmp, path)

    def load(self, path, strict: bool = True):
        """Load parameters and buffers from an .npz file written by ``save``."""
        with np.load(os.fspath(path)) as state:
            return self.load_state_dict({k: state[k] for k in state.files}, strict=strict)

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        lines += [f"  {name}: {tuple(p.shape)}" for name, p in self._parameters.items()]
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}()"
