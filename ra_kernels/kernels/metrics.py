"""Training metrics kept on the device: the Triton kernel behind ``ra_kernels.metrics``.

``accumulate_metrics(logits, labels, loss, totals)`` adds one batch into
``totals``, a (3,) float32 array of the backend whose slots are named by
``reference.metrics.TOTALS``: the sum of loss * batch size, the number of correct
predictions, the number of examples. Mean loss = totals[0] / totals[2],
accuracy = totals[1] / totals[2]. A training loop reads ``totals`` back once
per logging interval instead of once per step, so nothing inside a step waits
for the device (docs/design.md §6). float32 counts are exact up to 2**24
examples, far beyond an epoch of CIFAR.

A prediction is the argmax of a row of logits, ties going to the first
maximum and a NaN counting as the maximum (exactly ``np.argmax``).

One Triton program (grid (1,): a batch is 64 x 10 or 64 x 100 logits, far
too little to spread, and one program needs no atomics and sums in a fixed
order); ``reference.accumulate_metrics`` is the NumPy version. Bytes per call at batch 64, CIFAR-100, int64 labels: 25,600 (logits)
+ 512 (labels) + 4 (loss) + 12 read and 12 written (totals).
"""
import triton.language as tl

from ..launch import kernel, launch
from .tiles import row_tile


# Batch 64 (training) and 1,000 (a large evaluation batch), CIFAR-10 and CIFAR-100.
_AOT_SHAPES = ((64, 10), (64, 100), (1000, 10), (1000, 100))
_LABEL_TYPES = ("*i32", "*i64")


@kernel(aot=[dict(logits_ptr="*fp32", labels_ptr=labels, loss_ptr="*fp32", totals_ptr="*fp32",
                  n_rows="i32", n_classes="i32", **row_tile(*shape))
             for shape in _AOT_SHAPES for labels in _LABEL_TYPES])
def metrics_kernel(logits_ptr, labels_ptr, loss_ptr, totals_ptr, n_rows, n_classes,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """totals += (loss * n_rows, correct predictions, n_rows). Grid (1,).

    logits (n_rows, n_classes) float32; labels (n_rows,) integers; loss a 0-d
    float32; totals (3,) float32, read and written by this one program.
    """
    correct = tl.zeros((BLOCK_R,), tl.int32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        # Running argmax over class slices: the best value so far and its first column
        # (column 0 while every value seen is -inf, as np.argmax), and the first NaN column
        # (n_classes: none), which wins when there is one.
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        best_col = tl.zeros((BLOCK_R,), tl.int32)
        first_nan = tl.full((BLOCK_R,), n_classes, tl.int32)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            in_bounds = row_ok[:, None] & (cols < n_classes)[None, :]
            x = tl.load(logits_ptr + rows[:, None] * n_classes + cols[None, :], mask=in_bounds,
                        other=float("-inf"))
            is_nan = x != x
            first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols[None, :], n_classes), axis=1))
            x = tl.where(is_nan, float("-inf"), x)
            slice_max = tl.max(x, axis=1)
            slice_col = tl.min(tl.where(x == slice_max[:, None], cols[None, :], n_classes), axis=1)
            better = slice_max > best  # strictly: an equal value later is not the first maximum
            best_col = tl.where(better, slice_col, best_col)
            best = tl.where(better, slice_max, best)
        prediction = tl.where(first_nan < n_classes, first_nan, best_col)
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        correct += (row_ok & (prediction == label)).to(tl.int32)
    loss = tl.load(loss_ptr)
    tl.store(totals_ptr, tl.load(totals_ptr) + loss * n_rows)
    tl.store(totals_ptr + 1, tl.load(totals_ptr + 1) + tl.sum(correct, axis=0).to(tl.float32))
    tl.store(totals_ptr + 2, tl.load(totals_ptr + 2) + n_rows)


def accumulate_metrics(logits, labels, loss, totals):
    """Add one batch into ``totals`` in place with metrics_kernel; returns ``totals``. Arrays as
    checked by ``ra_kernels.metrics.accumulate_metrics``, which is what callers use."""
    n_rows, n_classes = logits.shape
    launch(metrics_kernel, (1,), logits, labels, loss, totals, n_rows, n_classes, **row_tile(n_rows, n_classes))
    return totals
