"""SGD with momentum, Nesterov and weight decay over flat buffers; learning-rate schedules.

:class:`SGD` keeps every parameter of a model in one flat float32 buffer of
the backend, every gradient in a second and every velocity in a third, so that
one launch of the fused kernel (``kernels.optim.sgd_step``) updates the whole
model. Parameters and their gradients become views of those buffers when the
optimizer is built: autograd then accumulates gradients straight into the
flat gradient buffer (``autograd._accumulate`` adds in place into an existing
``grad``), and nothing is copied per step. The learning rate lives in a
1-element array of the backend, so a captured CUDA graph reads whatever a
schedule last wrote there.

The contract that follows: once the optimizer is built, nobody re-binds a
parameter's ``data`` or ``grad``. Zero gradients with ``SGD.zero_grad()`` or
``Module.zero_grad()`` (both zero in place), load weights with
``Module.load_state_dict()`` (it copies in place), and convert dtypes before
building the optimizer. ``step()`` checks this and raises if a view was
replaced.

Schedules are plain functions iteration -> learning rate, evaluated on the host.
"""
from __future__ import annotations

import math

import numpy as np

import reference

from .backend import check_array, check_flag, check_float, check_int, choose, to_numpy, xp
from .kernels import elementwise
from .kernels import optim as optim_kernels

# The paper's CIFAR recipe: LR divided by 10 at 64k and 96k of 160k iterations; its ImageNet
# recipe: at 200k, 400k and 500k of 530k.
PAPER_ITERATIONS = 160_000
PAPER_MILESTONES = (64_000, 96_000)
IMAGENET_ITERATIONS = 530_000
IMAGENET_MILESTONES = (200_000, 400_000, 500_000)


def _hyperparameter(index: int, name: str) -> property:
    """SGD's ``name`` (momentum, weight_decay or nesterov), slot ``index`` of its checked triple: an
    assignment between steps is checked with the other two, as the constructor checks them (a
    TrainStep then captures a graph of its own for the new values)."""
    def assign(self, value):
        values = list(self._hyperparameters)
        values[index] = value
        self._hyperparameters = self._check_hyperparameters(*values)

    return property(lambda self: self._hyperparameters[index], assign, doc=f"{name}, checked when assigned")


class SGD:
    """Stochastic gradient descent as torch.optim.SGD (dampening 0), all parameters in one launch.

    Per element, in float32 (reference.sgd_step's order): g = grad + weight_decay * param;
    v = momentum * v + g; param -= lr * (g + momentum * v if nesterov else v).

    parameters: the model's Parameters (float32 arrays of the current backend,
    each once). On construction each is copied into ``flat_params`` (n,) and its
    ``data`` replaced by a C-contiguous view of it; its ``grad`` becomes a view
    of ``flat_grads`` (n,), zeroed. ``velocity`` (n,) starts at zero; ``lr`` is
    a (1,) float32 array of the backend, written by :meth:`set_lr` (assigning ``lr`` is refused:
    the array is what a captured step reads). ``momentum``, ``weight_decay`` and ``nesterov`` may be
    assigned between steps; each assignment is checked.

    Every parameter is updated every step: one that no op used has a zero gradient, so weight
    decay and momentum still move it (torch.optim.SGD skips a parameter whose grad is None, which
    its zero_grad() leaves by default; ours are views of the buffer, never None).
    """

    momentum, weight_decay, nesterov = (_hyperparameter(i, name)
                                        for i, name in enumerate(("momentum", "weight_decay", "nesterov")))

    def __init__(self, parameters, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True):
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("SGD: got an empty parameter list")
        if len({id(p) for p in self.parameters}) != len(self.parameters):
            raise ValueError("SGD: a parameter appears more than once in the list")
        self._hyperparameters = self._check_hyperparameters(momentum, weight_decay, nesterov)
        for i, p in enumerate(self.parameters):
            if not hasattr(p, "data") or not hasattr(p.data, "dtype"):
                raise TypeError(f"SGD: parameter {i} must be a Parameter (a Tensor), got {type(p).__name__}")
            if p.data.dtype != np.float32:
                raise TypeError(f"SGD: parameter {i} must be float32, got {p.data.dtype} with shape "
                                f"{tuple(p.data.shape)}")
            check_array("SGD", f"parameter {i}", p.data,
                        hint="; build the model and the optimizer on the same backend")
        n = sum(int(p.data.size) for p in self.parameters)
        module = xp()
        self.flat_params = module.empty(n, dtype=np.float32)
        self.flat_grads = module.zeros(n, dtype=np.float32)
        self.velocity = module.zeros(n, dtype=np.float32)
        self._lr = module.empty(1, dtype=np.float32)
        self.set_lr(lr)
        # (data view, grad view) per parameter: what step() checks nobody has re-bound.
        self._views = []
        offset = 0
        for p in self.parameters:
            shape, size = p.data.shape, int(p.data.size)
            self.flat_params[offset:offset + size] = p.data.reshape(-1)
            p.data = self.flat_params[offset:offset + size].reshape(shape)
            p.grad = self.flat_grads[offset:offset + size].reshape(shape)
            self._views.append((p.data, p.grad))
            offset += size

    @staticmethod
    def _check_hyperparameters(momentum, weight_decay, nesterov):
        """(momentum, weight_decay, nesterov) as Python numbers and a bool; ValueError if one is not."""
        momentum, weight_decay = check_float("SGD", "momentum", momentum, 0.0), check_float("SGD", "weight_decay",
                                                                                           weight_decay, 0.0)
        if check_flag("SGD", "nesterov", nesterov) and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0")
        return momentum, weight_decay, bool(nesterov)

    @property
    def lr(self):
        """The learning rate: a (1,) float32 array of the backend, which every step reads."""
        return self._lr

    @lr.setter
    def lr(self, value):
        raise AttributeError(f"SGD.lr is the (1,) float32 array of the backend that every step reads (a captured "
                             f"step too); write a new rate into it with set_lr({value!r})")

    def set_lr(self, value):
        """Write the learning rate into the device array ``lr`` (no host read).

        The value travels as a launch argument of the fill: under CUDA-graph capture, call
        this outside the captured region, which then reads the array as it stands."""
        self._lr.fill(_check_lr(value))

    def zero_grad(self):
        """Zero every gradient with one fill of the flat buffer (a kernel on cuda and interpret, so
        that a captured step is kernels only); the views stay."""
        choose(reference, elementwise).fill(self.flat_grads, 0.0)

    def step(self):
        """One update of every parameter: one kernel launch (cuda, interpret) or one
        reference.sgd_step over the flat buffers (numpy). Reads nothing back to the host."""
        for p, (data_view, grad_view) in zip(self.parameters, self._views):
            if p.data is not data_view or p.grad is not grad_view:
                which = "data" if p.data is not data_view else "grad"
                raise RuntimeError(
                    f"SGD.step: a parameter of shape {tuple(data_view.shape)} had its {which} replaced "
                    f"after the optimizer was built, so the update would miss it; zero gradients with "
                    f"SGD.zero_grad() or Module.zero_grad() and load weights with "
                    f"Module.load_state_dict(), which work in place")
        param, velocity = choose(reference, optim_kernels).sgd_step(
            self.flat_params, self.flat_grads, self.velocity, self.lr, self.momentum, self.weight_decay,
            self.nesterov)
        if param is not self.flat_params:  # reference/ returns new arrays; the kernel updates in place
            self.flat_params[...] = param
            self.velocity[...] = velocity

    def state_dict(self) -> dict:
        """Host NumPy arrays: velocity (n,) float32, lr (1,) float32, momentum and weight_decay
        0-d float64, nesterov 0-d bool."""
        return {"velocity": to_numpy(self.velocity).copy(), "lr": to_numpy(self.lr).copy(),
                "momentum": np.array(self.momentum), "weight_decay": np.array(self.weight_decay),
                "nesterov": np.array(self.nesterov)}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` gave (velocity and lr copied in place)."""
        expected = ("velocity", "lr", "momentum", "weight_decay", "nesterov")
        missing = [k for k in expected if k not in state]
        if missing:
            raise KeyError(f"SGD.load_state_dict: missing {missing}; expected keys {list(expected)}")
        velocity = np.asarray(to_numpy(state["velocity"]))
        if velocity.shape != tuple(self.velocity.shape):
            raise ValueError(f"SGD.load_state_dict: velocity has shape {velocity.shape}, this optimizer "
                             f"holds {self.velocity.size} parameters (a checkpoint of another model?)")
        momentum, weight_decay, nesterov = self._check_hyperparameters(  # as saved: 0-d NumPy arrays
            state["momentum"], state["weight_decay"], state["nesterov"])
        lr = np.asarray(to_numpy(state["lr"])).reshape(-1)
        if lr.size != 1:
            raise ValueError(f"SGD.load_state_dict: lr must be one value, got {lr.size}")
        _check_lr(lr[0])  # everything checked before anything changes: a failed load changes nothing
        self._hyperparameters = momentum, weight_decay, nesterov
        self.velocity[...] = xp().asarray(velocity, dtype=np.float32)
        self.set_lr(lr[0])


def _check_lr(value) -> float:
    """``value`` as a float; ValueError unless it is a finite number >= 0."""
    return check_float("SGD.set_lr", "the learning rate", value, 0.0)


def _check_schedule(name, base_lr, total_iterations):
    check_float(name, "base_lr", base_lr, 0.0)
    return check_int(name, "total_iterations", total_iterations, 1)


def _check_iteration(name, iteration):
    check_int(name, "iteration", iteration, 0)


def paper_schedule(base_lr, total_iterations, iterations=PAPER_ITERATIONS, milestones=PAPER_MILESTONES):
    """The paper's step schedule: iteration -> base_lr, divided by 10 at each of ``milestones`` of
    ``iterations`` (by default the CIFAR recipe's 64k and 96k of 160k; ImageNet's are
    IMAGENET_MILESTONES of IMAGENET_ITERATIONS), scaled to ``total_iterations`` (for CIFAR 40% and
    60% of it, rounded down). From a milestone on, the lower rate applies; past the end, the last one."""
    total = _check_schedule("paper_schedule", base_lr, total_iterations)
    milestones = [total * m // iterations for m in milestones]

    def lr(iteration):
        _check_iteration("paper_schedule", iteration)
        return base_lr / 10 ** sum(iteration >= m for m in milestones)
    return lr


def cosine_schedule(base_lr, total_iterations):
    """Cosine annealing from base_lr at iteration 0 to 0 at ``total_iterations`` (and after):
    base_lr * (1 + cos(pi * iteration / total_iterations)) / 2."""
    total = _check_schedule("cosine_schedule", base_lr, total_iterations)

    def lr(iteration):
        _check_iteration("cosine_schedule", iteration)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
    return lr


def linear_scaling(schedule, factor, warmup_iterations):
    """``schedule`` (iteration -> learning rate) for a batch ``factor`` times larger: the rate
    multiplied by ``factor`` (Goyal et al. 2017, "the linear scaling rule"), reached by a linear
    ramp from the unscaled rate over the first ``warmup_iterations`` (their gradual warm-up: the
    early steps, where the weights change fastest, would diverge at the full rate)."""
    check_float("linear_scaling", "factor", factor, 1.0)
    check_int("linear_scaling", "warmup_iterations", warmup_iterations, 0)

    def lr(iteration):
        ramp = 1.0 if iteration >= warmup_iterations else iteration / warmup_iterations
        return schedule(iteration) * (1 + (factor - 1) * ramp)
    return lr


SCHEDULES = {"paper": paper_schedule, "cosine": cosine_schedule}
