"""Training metrics kept on the device: the Triton kernel behind ``ra_kernels.metrics``.

``accumulate_metrics(logits, labels, loss, totals)`` adds one batch into
``totals``, a (4,) float32 array of the backend whose slots are named by
``reference.metrics.TOTALS``: the sum of loss * batch size, the number of correct
predictions, the number of examples, the number of labels among the top five.
Mean loss = totals[0] / totals[2], accuracy = totals[1] / totals[2], top-5
accuracy = totals[3] / totals[2]. A training loop reads ``totals`` back once
per logging interval instead of once per step, so nothing inside a step waits
for the device (docs/design.md §6). float32 counts are exact up to 2**24
examples, beyond an epoch of ImageNet (1.28 M).

Both accuracies come from the label's rank (``reference.metrics.label_ranks``):
how many columns precede the label's when a row is ordered NaN first, then by
value, ties in column order. Rank 0 is exactly ``np.argmax``'s prediction.
Counting is one pass over the row after one gathered load of the label's logit,
where a running argmax would need a top-5 selection.

One Triton program (grid (1,): a batch is 64 x 10 to 256 x 1,000 logits, too little
to spread, and one program needs no atomics and sums in a fixed order);
``reference.accumulate_metrics`` is the NumPy version. Bytes per call at batch 64,
CIFAR-100, int64 labels: 25,600 (logits) + 256 (the labels' logits) + 512 (labels)
+ 4 (loss) + 16 read and 16 written (totals).
"""
import triton.language as tl

from reference.metrics import TOP_K

from ..launch import kernel, launch
from .tiles import row_tile


# Batch 64 (training) and 1,000 (a large evaluation batch), CIFAR-10 and CIFAR-100; ImageNet at
# batch 64 and 256.
_AOT_SHAPES = ((64, 10), (64, 100), (1000, 10), (1000, 100), (64, 1000), (256, 1000))
_LABEL_TYPES = ("*i32", "*i64")


@kernel(aot=[dict(logits_ptr="*fp32", labels_ptr=labels, loss_ptr="*fp32", totals_ptr="*fp32",
                  n_rows="i32", n_classes="i32", TOP_K=TOP_K, **row_tile(*shape))
             for shape in _AOT_SHAPES for labels in _LABEL_TYPES])
def metrics_kernel(logits_ptr, labels_ptr, loss_ptr, totals_ptr, n_rows, n_classes,
                   TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """totals += (loss * n_rows, labels ranked 0, n_rows, labels ranked below TOP_K). Grid (1,).

    logits (n_rows, n_classes) float32; labels (n_rows,) integers; loss a 0-d
    float32; totals (4,) float32, read and written by this one program.
    """
    correct = tl.zeros((BLOCK_R,), tl.int32)
    correct_top_k = tl.zeros((BLOCK_R,), tl.int32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        stored = tl.load(labels_ptr + rows, mask=rows < n_rows, other=-1)
        # The range is checked in the labels' own type (int64 labels would wrap into range as int32);
        # an invalid label is never correct.
        valid = (rows < n_rows) & (stored >= 0) & (stored < n_classes)
        label = tl.where(valid, stored, 0).to(tl.int32)
        own = tl.load(logits_ptr + rows * n_classes + label, mask=valid, other=0.0)
        own_nan = own != own
        rank = tl.zeros((BLOCK_R,), tl.int32)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            in_bounds = valid[:, None] & (cols < n_classes)[None, :]
            x = tl.load(logits_ptr + rows[:, None] * n_classes + cols[None, :], mask=in_bounds, other=0.0)
            earlier = cols[None, :] < label[:, None]
            # Columns before the label's: a NaN earlier than it, or any NaN when its logit is not
            # one; a larger value, or an equal one earlier, when neither is NaN.
            before = tl.where(x != x, (~own_nan[:, None]) | earlier,
                              (~own_nan[:, None]) & ((x > own[:, None]) | ((x == own[:, None]) & earlier)))
            rank += tl.sum((in_bounds & before).to(tl.int32), axis=1)
        correct += (valid & (rank == 0)).to(tl.int32)
        correct_top_k += (valid & (rank < TOP_K)).to(tl.int32)
    loss = tl.load(loss_ptr)
    tl.store(totals_ptr, tl.load(totals_ptr) + loss * n_rows)
    tl.store(totals_ptr + 1, tl.load(totals_ptr + 1) + tl.sum(correct, axis=0).to(tl.float32))
    tl.store(totals_ptr + 2, tl.load(totals_ptr + 2) + n_rows)
    tl.store(totals_ptr + 3, tl.load(totals_ptr + 3) + tl.sum(correct_top_k, axis=0).to(tl.float32))


def accumulate_metrics(logits, labels, loss, totals):
    """Add one batch into ``totals`` in place with metrics_kernel; returns ``totals``. Arrays as
    checked by ``ra_kernels.metrics.accumulate_metrics``, which is what callers use."""
    n_rows, n_classes = logits.shape
    launch(metrics_kernel, (1,), logits, labels, loss, totals, n_rows, n_classes, TOP_K=TOP_K,
           **row_tile(n_rows, n_classes))
    return totals
