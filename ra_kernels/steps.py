"""The training step and the evaluation step of a classifier, eager or captured as a CUDA graph.

``train.cifar`` and ``bench.step`` run these, so what is timed is what trains. Both read nothing
back to the host: the batch's loss and correct predictions are added into a ``totals`` array on
the device (ra_kernels/metrics.py), which the caller reads when it wants. With ``capture`` each
step is a :class:`~ra_kernels.graph.StepGraph`: a few eager calls, then one graph per batch shape,
replayed (docs/design.md §7). Capture is the default on cuda; the numpy backend has no kernels to
capture, and on interpret capture serves the tests.
"""
from __future__ import annotations

from . import functional as F
from .autograd import no_grad
from .backend import get_backend, get_precision
from .graph import StepGraph
from .metrics import accumulate_metrics


def default_capture() -> bool:
    """Whether steps are captured when not told: on the cuda backend."""
    return get_backend() == "cuda"


def kernel_choices():
    """What picks a step's kernels besides the model's mode and the optimizer: the precision. A
    captured step keeps one graph per value, as a replay runs the kernels chosen at its capture."""
    return (get_precision(),)


def _checked_capture(capture):
    capture = default_capture() if capture is None else bool(capture)
    if capture and get_backend() == "numpy":
        raise ValueError("capture=True needs the cuda backend (or interpret, to test): the numpy backend "
                         "runs no kernels to capture")
    return capture


class _Step:
    def __init__(self, fn, capture, warmup, state):
        self.captured = _checked_capture(capture)
        self._run = StepGraph(fn, warmup, state) if self.captured else fn

    def __call__(self, x, labels):
        """Run on images x (N, H, W, C) and integer labels (N,), arrays of the backend; returns the
        (logits, loss) arrays. Captured, they are rewritten by the next call of the same batch size."""
        return self._run(x, labels)


class TrainStep(_Step):
    """One SGD step per call: zero the gradients, forward, mean cross-entropy, backward, the
    optimizer's update, and the batch's loss and correct predictions added into ``totals``
    (a (4,) float32 array of the backend, ra_kernels/metrics.py, which the caller may zero or read between calls).

    ``capture``: None for :func:`default_capture`. ``warmup``: eager steps per batch shape before
    the capture. The learning rate is the optimizer's device array, read by every replay, so
    ``optimizer.set_lr`` between steps takes effect. A change of the model's mode, of
    :func:`kernel_choices` or of the optimizer's momentum, weight decay or Nesterov switch gets a
    graph of its own; changes below the model's top (one layer frozen after the capture) need a new
    TrainStep.

    ``exchange``: called between the backward pass and the update, in data-parallel training
    ``distributed.DataParallel.exchange`` (the gradients and statistics averaged over the ranks;
    on cuda NCCL's all-reduce, which a capture records). Host-side collectives (MPI) cannot be
    captured: with them, ``capture`` must be off.
    """

    def __init__(self, model, optimizer, totals, capture=None, warmup=2, exchange=None):
        own = {id(p) for p in model.parameters()}
        if not all(id(p) in own for p in optimizer.parameters):  # (an optimizer of a model built again)
            raise ValueError("TrainStep: the optimizer updates parameters that are not the model's: build it over "
                             "model.parameters() of this model")
        self.model, self.optimizer, self.totals, self.exchange = model, optimizer, totals, exchange
        super().__init__(self._step, capture, warmup, self._state)

    def _state(self):
        o = self.optimizer
        return self.model.training, *kernel_choices(), o.momentum, o.weight_decay, o.nesterov

    def _step(self, x, labels):
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if self.exchange is not None:
            self.exchange()
        self.optimizer.step()
        accumulate_metrics(logits.data, labels, loss.data, self.totals)
        return logits.data, loss.data


class EvalStep(_Step):
    """One evaluation per call: the model in eval mode, without gradients, its loss and correct
    predictions added into ``totals``; every module's mode is restored after (``Module.evaluating``). ``capture`` and
    ``warmup`` as for :class:`TrainStep`."""

    def __init__(self, model, totals, capture=None, warmup=2):
        self.model, self.totals = model, totals
        super().__init__(self._step, capture, warmup, kernel_choices)

    def __call__(self, x, labels):
        with self.model.evaluating():
            return super().__call__(x, labels)

    def _step(self, x, labels):
        with no_grad():
            logits = self.model(x)
            loss = F.cross_entropy(logits, labels)
            accumulate_metrics(logits.data, labels, loss.data, self.totals)
        return logits.data, loss.data
