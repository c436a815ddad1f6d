"""A define-by-run autograd engine: Tensor, Function, backward(), no_grad().

Each differentiable op is a :class:`Function` with a ``forward(ctx, *arrays)``
and a hand-written ``backward(ctx, *grads)``; calling ``Op.apply(...)`` runs the
forward on raw arrays and, when a gradient is wanted, records one :class:`Node`
linking the outputs to the inputs. ``Tensor.backward()`` walks those nodes in
reverse topological order (iteratively: a 452-layer network is a deep graph) and
sums gradients where a tensor fed several ops. Nothing here knows any op.

A leaf that already has a ``grad`` array (an optimizer's view of its flat gradient buffer)
has its gradient added into it: the engine offers that array to the backward of the op
that consumes the leaf (``ctx.grad_into``), and an op that adds its gradient there itself
returns that very array, which then needs no addition here. A tensor that feeds several ops
is offered the same way: once one consumer's gradient has arrived in an array that nothing
else holds (a sum the engine made, or a gradient its op declared new, ``Function.new_grads``),
the next consumer may add its own into it. The little array arithmetic the
engine does itself (the ones that seed a backward, a sum, a copy, an addition in place) goes
through :data:`arithmetic`, which ``ra_kernels.functional`` points at the backend's kernels,
so that a training step on a GPU backend is made of kernel launches only.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np

from .backend import check_array, settings, to_numpy, use_settings

_grad_enabled = [True]


class ArrayArithmetic:
    """What the engine computes on gradient arrays, by the arrays' own methods (NumPy or CuPy)."""

    @staticmethod
    def ones_like(a):
        ones = a.copy()
        ones.fill(1)
        return ones

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def add_into(into, g):
        into += g
        return into

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def zero(into):
        into.fill(0)
        return into


#: The engine's array arithmetic; ra_kernels.functional installs one that runs the backend's kernels.
arithmetic = ArrayArithmetic()


def is_grad_enabled() -> bool:
    return _grad_enabled[0]


@contextlib.contextmanager
def no_grad():
    """Ops inside the block record nothing and their outputs need no gradient."""
    previous, _grad_enabled[0] = _grad_enabled[0], False
    try:
        yield
    finally:
        _grad_enabled[0] = previous


class Tensor:
    """An array (NumPy or CuPy, per backend) with its gradient and the node that made it.

    ``grad`` is filled by :meth:`backward` for leaves that require a gradient and
    for non-leaves that called :meth:`retain_grad`; other intermediate gradients
    are freed as soon as they have been used.
    """
    __slots__ = ("data", "grad", "requires_grad", "node", "output_index", "retains_grad", "__weakref__")

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data): data is already a Tensor; use .data or .detach()")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.node = None          # the Node whose forward produced this tensor (None: a leaf)
        self.output_index = 0     # which of that node's outputs this is
        self.retains_grad = False

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    is_leaf = property(lambda self: self.node is None)

    #: Tensors of at most this many elements show their values in repr (read from the device).
    REPR_MAX_VALUES = 64

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        name = type(self).__name__
        if self.data.size > self.REPR_MAX_VALUES:
            return f"{name}(shape={tuple(self.shape)}, dtype={self.dtype}{flag})"
        values = np.array2string(np.asarray(to_numpy(self.data)), precision=4, separator=", ",
                                 prefix=name + "(")
        dtype = "" if self.dtype == np.float32 else f", dtype={self.dtype}"
        return f"{name}({values}{dtype}{flag})"

    def detach(self) -> "Tensor":
        """The same array, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> "Tensor":
        """Keep ``grad`` on this non-leaf tensor after backward()."""
        self.retains_grad = True
        return self

    def zero_grad(self):
        self.grad = None

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``grad``.

        ``grad`` defaults to ones, which requires a single-element tensor (a loss). Each op's
        backward runs under the backend and precision of its forward, and the engine's own
        arithmetic under those of the op that made this tensor, whatever is in force when
        backward() is called.
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require a gradient "
                               "(no input required one, or it was made under no_grad())")
        with use_settings(settings() if self.node is None else self.node.settings):
            self._backward(grad)

    def _backward(self, grad):
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward(): grad can be omitted only for a single-element "
                                   f"tensor (a loss), this one has shape {tuple(self.shape)}")
            grad = arithmetic.ones_like(self.data)
        _check_gradient("backward(): grad", check_array("backward()", "grad", grad), self)
        if self.node is None:
            _accumulate(self, grad)
            return
        nodes = list(_reverse_topological(self.node))
        # Checked before anything runs, so that a refused backward adds nothing anywhere.
        if any(node.ctx is None for node in nodes):
            raise RuntimeError("backward(): part of this graph was differentiated already, and a backward pass "
                               "frees what each op saved for it: compute the forward again")
        for node in nodes:
            for t in node.inputs:
                if t is not None and t.node is None and t.grad is not None and t.requires_grad:
                    _check_gradient("a leaf's grad", t.grad, t, added_into=True)
        # Gradients waiting for each node, one slot per output, summed as they arrive; ``owned``: the
        # (node id, output index) slots whose array nothing but the slot holds, so that a later
        # backward may add into it (never the caller's grad, nor a gradient an op may share).
        pending = {id(self.node): [None] * len(self.node.outputs)}
        pending[id(self.node)][self.output_index] = grad
        owned = set()
        for node in nodes:
            out_grads = pending.pop(id(node))
            for out_ref, g in zip(node.outputs, out_grads):
                out = out_ref()
                if out is not None and out.retains_grad and g is not None:
                    _accumulate(out, g)
            if all(g is None for g in out_grads):
                continue
            node.ctx.grad_into = tuple(_grad_buffer(t, pending, owned) for t in node.inputs)
            if node.settings == self.node.settings:
                in_grads = node.function.backward(node.ctx, *out_grads)
            else:  # an op recorded under another backend or precision than this tensor's
                with use_settings(node.settings):
                    in_grads = node.function.backward(node.ctx, *out_grads)
            in_grads = tuple(map(_array, in_grads)) if isinstance(in_grads, tuple) else (_array(in_grads),)
            if len(in_grads) != len(node.inputs):
                raise RuntimeError(f"{node.function.__name__}.backward returned {len(in_grads)} "
                                   f"gradients for {len(node.inputs)} inputs")
            for index, (tensor, g, into) in enumerate(zip(node.inputs, in_grads, node.ctx.grad_into)):
                if g is None or tensor is None or not tensor.requires_grad or g is into:
                    continue  # no gradient, or the op added it into the array offered
                if g.shape != tensor.shape:
                    raise RuntimeError(f"{node.function.__name__}.backward gave a gradient of shape "
                                       f"{tuple(g.shape)} for an input of shape {tuple(tensor.shape)}")
                if tensor.node is None:
                    _accumulate(tensor, g)
                else:
                    slots = pending.setdefault(id(tensor.node), [None] * len(tensor.node.outputs))
                    i = tensor.output_index
                    if slots[i] is None:
                        slots[i] = g
                        if index in node.function.new_grads:
                            owned.add((id(tensor.node), i))
                    else:
                        slots[i] = arithmetic.add(slots[i], g)
                        owned.add((id(tensor.node), i))
            node.ctx = None  # free what forward saved: each node runs backward once


def _array(a):
    """``a``, with a NumPy scalar made a 0-d array: NumPy's arithmetic on 0-d arrays returns scalars
    (``a + b``), which are immutable (an addition in place would make a new value) and are not arrays
    to the ops' argument checks."""
    return np.asarray(a) if isinstance(a, np.generic) else a


def _grad_buffer(tensor, pending, owned):
    """The array an op may add ``tensor``'s gradient into: the ``grad`` of a leaf that has one, or
    the gradient summed so far of a non-leaf whose array is the engine's own (``owned``)."""
    if tensor is None or not tensor.requires_grad:
        return None
    if tensor.node is None:
        return tensor.grad
    key = (id(tensor.node), tensor.output_index)
    return pending[key[0]][key[1]] if key in owned else None


def _accumulate(tensor, grad):
    """Add ``grad`` into ``tensor.grad``: in place when there is one (an optimizer may have
    made it a view of its flat gradient buffer), else as a copy (``grad`` may be shared)."""
    if tensor.grad is None:
        tensor.grad = arithmetic.copy(grad)
    else:
        _check_gradient("a tensor's grad", tensor.grad, tensor, added_into=True)
        arithmetic.add_into(tensor.grad, grad)


def _check_gradient(what, grad, tensor, added_into=False):
    """A gradient array that kernels will read or add into must match ``tensor``: its shape and
    dtype, and C-contiguous (a kernel indexes it as such, so a strided view would be read or
    written in the wrong places); one ``added_into`` must be writable too (a kernel would write
    through a read-only NumPy array's memory). CuPy arrays are always writable."""
    if added_into and not getattr(grad.flags, "writeable", True):
        raise ValueError(f"{what} is a read-only array, and the gradient is added into it: give a writable "
                         f"one (or set the tensor's grad to None)")
    if grad.shape != tensor.shape or grad.dtype != tensor.dtype or not grad.flags.c_contiguous:
        layout = "" if grad.flags.c_contiguous else ", not C-contiguous"
        raise ValueError(f"{what} must be a C-contiguous array of the tensor's shape {tuple(tensor.shape)} and "
                         f"dtype {tensor.dtype}, got shape {tuple(grad.shape)} and dtype {grad.dtype}{layout}")


def _reverse_topological(root):
    """Nodes reachable from ``root``, each after every node that consumes its outputs.

    Iterative depth-first post-order (no recursion limit), then reversed.
    """
    order, visited = [], {id(root)}
    stack = [(root, iter(root.parents()))]
    while stack:
        node, parents = stack[-1]
        for parent in parents:
            if id(parent) not in visited:
                visited.add(id(parent))
                stack.append((parent, iter(parent.parents())))
                break
        else:
            stack.pop()
            order.append(node)
    return reversed(order)


class Context:
    """What a Function's forward leaves for its backward.

    ``save_for_backward(*arrays)`` / ``saved`` for arrays, plain attributes for
    anything else; ``needs_input_grad[i]`` says whether input i wants a gradient.
    During backward, ``grad_into[i]`` is the ``grad`` array of input i when it is a leaf
    that has one, or the gradient summed so far of input i when another consumer's gradient
    has arrived in an array the engine owns (else None): a backward may add input i's
    gradient into it and return that array as the gradient, which the engine then leaves as it is.
    """

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved = ()
        self.grad_into = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays


class Node:
    """One recorded call: the function, its ctx, its input tensors and its outputs.

    Outputs are held by weak reference, so that an activation nobody holds any more
    is freed at once rather than by the cycle collector.
    """
    __slots__ = ("function", "ctx", "inputs", "outputs", "settings")

    def __init__(self, function, ctx, inputs, settings):
        self.function, self.ctx, self.inputs, self.outputs = function, ctx, inputs, ()
        self.settings = settings  # the backend and precision of the forward, which its backward follows

    def parents(self):
        return (t.node for t in self.inputs if t is not None and t.node is not None and t.requires_grad)


class Function:
    """Base class of a differentiable op.

    Subclasses define ``forward(ctx, *args, **kwargs)`` on raw arrays (Tensor
    arguments arrive unwrapped, keyword arguments are passed as they are) returning
    an array or a tuple of arrays, and ``backward(ctx, *grad_outputs)`` returning one
    gradient (or None) per positional argument. A grad_output is None when that
    output received no gradient.

    ``new_grads``: the positions of the arguments whose gradient backward always returns in a
    new array that it keeps no reference to (not a grad_output passed through, not a saved
    array), or in the array offered by ``ctx.grad_into``; the engine may then let another
    consumer of that input add its gradient into it.
    """
    new_grads = ()

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        tensors = [a if isinstance(a, Tensor) else None for a in args]
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(t is not None and t.requires_grad for t in tensors)
        record = is_grad_enabled() and any(needs)
        ctx = Context(needs)
        raw = cls.forward(ctx, *arrays, **kwargs)
        single = not isinstance(raw, tuple)
        outputs = tuple(Tensor(_array(r), requires_grad=record) for r in ((raw,) if single else raw))
        if record:
            node = Node(cls, ctx, tensors, settings())
            node.outputs = tuple(weakref.ref(out) for out in outputs)
            for i, out in enumerate(outputs):
                out.node, out.output_index = node, i
        return outputs[0] if single else outputs
