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
from .backend import check_flag, get_backend, get_precision
from .graph import StepGraph
from .metrics import accumulate_metrics, check_totals


def default_capture() -> bool:
    """Whether steps are captured when not told: on the cuda backend."""
    return get_backend() == "cuda"


def _checked_capture(where, capture):
    capture = default_capture() if capture is None else check_flag(where, "capture", capture)
    if capture and get_backend() == "numpy":
        raise ValueError(f"{where}: capture=True needs the cuda backend (or interpret, to test): the numpy backend "
                         f"runs no kernels to capture")
    return capture


class _Step:
    """``state()``: what picks the step's kernels besides the batch shape (the precision, the
    model's mode, the optimizer's switches); a captured step keeps one graph per value, as a replay
    runs the kernels chosen at its capture."""

    def __init__(self, fn, capture, warmup, state, totals):
        where = type(self).__name__
        self.captured = _checked_capture(where, capture)
        # Checked here, not in the step: found there, after the optimizer's update, a bad totals would
        # fail a step that had updated the parameters (and a retry would update them twice).
        self._totals = check_totals(where, totals)
        self._run = StepGraph(fn, warmup, state) if self.captured else fn

    @property
    def totals(self):
        """The (4,) float32 array each step adds into (read-only: a captured step adds into the array
        it was captured with)."""
        return self._totals

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
    ``optimizer.set_lr`` between steps takes effect. A change of the model's mode, of the precision
    or of the optimizer's momentum, weight decay or Nesterov switch gets a
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
        self.model, self.optimizer, self.exchange = model, optimizer, exchange
        super().__init__(self._step, capture, warmup, self._state, totals)

    def _state(self):
        o = self.optimizer
        return self.model.training, get_precision(), o.momentum, o.weight_decay, o.nesterov

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
        self.model = model
        super().__init__(self._step, capture, warmup, get_precision, totals)

    def __call__(self, x, labels):
        with self.model.evaluating():
            return super().__call__(x, labels)

    def _step(self, x, labels):
        with no_grad():
            logits = self.model(x)
            loss = F.cross_entropy(logits, labels)
            accumulate_metrics(logits.data, labels, loss.data, self.totals)
        return logits.data, loss.data
