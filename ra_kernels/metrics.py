"""Training metrics kept on the device: each step adds its batch's loss and correct predictions
into a (4,) float32 ``totals`` array of the backend (slots: :data:`TOTALS`), which a training
loop reads back once per logging interval (docs/design.md §6). Mean loss = totals[0] /
totals[2], accuracy = totals[1] / totals[2], top-5 accuracy = totals[3] / totals[2]; float32
counts are exact up to 2**24 examples.

The NumPy version is ``reference.accumulate_metrics``, the Triton one
``kernels/metrics.py``; both give the same bits.
"""
import numpy as np

import reference

from .backend import check_array, check_labels, choose, get_backend
from .kernels import metrics as metrics_kernels

TOTALS, TOP_K = reference.metrics.TOTALS, reference.metrics.TOP_K


def _check(logits, labels, loss, totals):
    backend = get_backend()
    for name, a in (("logits", logits), ("loss", loss)):
        check_array("accumulate_metrics", name, a)
    floats = ("float32", "float64") if backend == "numpy" else ("float32",)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.dtype.name not in floats:
        raise ValueError(f"accumulate_metrics: logits must be a non-empty (N, classes) array of "
                         f"{' or '.join(floats)}, got shape {tuple(logits.shape)} {logits.dtype}")
    if not logits.flags.c_contiguous:
        raise ValueError(f"accumulate_metrics: logits must be C-contiguous, got strides {logits.strides}")
    check_labels("accumulate_metrics", labels, *logits.shape)
    if loss.size != 1 or loss.dtype.name not in floats:
        raise ValueError(f"accumulate_metrics: loss must be a single {' or '.join(floats)} value, "
                         f"got {loss.dtype} of shape {tuple(loss.shape)}")
    check_totals("accumulate_metrics", totals)


def check_totals(where, totals):
    """``totals`` itself when it is a contiguous (4,) float32 array of the current backend (slots
    :data:`TOTALS`); else a TypeError or ValueError naming ``where``."""
    check_array(where, "totals", totals)
    if totals.shape != (len(TOTALS),) or totals.dtype != np.float32 or not totals.flags.c_contiguous:
        raise ValueError(f"{where}: totals must be a contiguous ({len(TOTALS)},) float32 array "
                         f"({', '.join(TOTALS)}), got {totals.dtype} of shape {tuple(totals.shape)}")
    return totals


def accumulate_metrics(logits, labels, loss, totals):
    """Add one batch into ``totals`` in place; returns ``totals``.

    logits (N, K) float32 C-contiguous (float64 too on the numpy backend); labels (N,)
    integers in [0, K) (``backend.check_labels``: on cuda, where their values are not checked,
    one outside is never correct, and the loss of its row is NaN); loss: the batch's mean loss, a
    0-d (or 1-element) array; totals (4,) float32.
    Correct: the label is the argmax of its row (the first maximum; the first NaN if any), or
    among the TOP_K first in that order (``reference.metrics.label_ranks``).
    All arrays of the current backend. Nothing is read back to the host.
    """
    _check(logits, labels, loss, totals)
    return choose(reference, metrics_kernels).accumulate_metrics(logits, labels, loss, totals)
