"""Softmax cross-entropy: per-row kernel, a one-program mean, and the backward.

Layouts: logits (N, K) float32 C-contiguous; labels (N,) integers of any width
(int32 and int64 are compiled ahead of time), passed as they are; the loss is a
0-d float32 array. NumPy (interpret backend) or CuPy (cuda backend).

Forward: ``cross_entropy_rows_kernel`` computes, per row, the max m, the
log-sum-exp of the shifted row log s = log sum_k exp(x_k - m) (an online
max-and-rescale over BLOCK_C-class slices, so any K works), and the row loss
log s - (x_label - m): the reference's operation order, stable for any logit
magnitude. The last of its programs to finish (``batchnorm.last_to_arrive``) then
averages the row losses, in a fixed order (deterministic, no float atomics). The backward recomputes the softmax as
exp((x - m) - log s) from the logits and the two saved per-row values, instead
of the forward writing an (N, K) softmax that the backward would read back.

A label outside [0, K) is not checked on the host (that would read device memory
mid-step): its row loss, hence the loss, is NaN, and so is its row of dlogits.

Bytes per call for N = 64, K = 100, int64 labels: forward 27,140 B (logits
25,600 + labels 512 + row loss/max/log-sum 768 written, 256 read back + 4 for
the loss; the label's logit is re-read from cache); backward 52,228 B (logits
25,600 + labels 512 + max/log-sum 512 + dloss 4 + dlogits 25,600).
Offsets are int32 (int64 where int64 labels enter them): fine below 2**31 logits.
"""
import triton.language as tl

from ..backend import empty, empty_like
from ..launch import kernel, launch
from .batchnorm import arrival_counters, last_to_arrive
from .tiles import cdiv, next_power_of_2, row_tile

MAX_BLOCK_MEAN = 1024


# The attention92 head at batch 64: CIFAR-10 and CIFAR-100.
_AOT_SHAPES = ((64, 10), (64, 100))
_LABEL_TYPES = ("*i32", "*i64")


@kernel(aot=[dict(logits_ptr="*fp32", labels_ptr=labels, row_loss_ptr="*fp32", row_max_ptr="*fp32",
                  row_log_sum_ptr="*fp32", loss_ptr="*fp32", counters_ptr="*i32", n_rows="i32", n_classes="i32",
                  BLOCK_MEAN=64, **row_tile(*shape))
             for shape in _AOT_SHAPES for labels in _LABEL_TYPES])
def cross_entropy_rows_kernel(logits_ptr, labels_ptr, row_loss_ptr, row_max_ptr, row_log_sum_ptr, loss_ptr,
                              counters_ptr, n_rows, n_classes,
                              BLOCK_MEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row of logits (n_rows, n_classes): max m, log s = log sum exp(x - m), loss log s - (x_label - m);
    then their mean, the loss (0-d), by the last program to finish.

    Grid (cdiv(n_rows, BLOCK_R),). Outputs (n_rows,) float32 each; the loss is
    NaN where the label is outside [0, n_classes). The mean sums BLOCK_MEAN lanes of strided
    row losses, then the lanes, and divides rounding to nearest.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    # Rows past the end re-read the last row (their stores are masked), so that no
    # lane computes exp(-inf - -inf).
    rows = tl.minimum(rows, n_rows - 1)
    row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_R,), tl.float32)  # sum of exp(x - row_max) so far
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(logits_ptr + rows[:, None] * n_classes + cols[None, :],
                    mask=(cols < n_classes)[None, :], other=float("-inf"))  # [BLOCK_R, BLOCK_C]
        # NaN left out of the max (as compiled tl.max does; the interpreter's nanmax would warn
        # on a row of NaN); it still makes the row's sum, and so its loss, NaN.
        new_max = tl.maximum(row_max, tl.max(tl.where(x == x, x, float("-inf")), axis=1))
        # Rescale the running sum to the new max; exp(-inf) = 0 on the first slice.
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        row_max = new_max
    log_sum = tl.log(sum_exp)
    label = tl.load(labels_ptr + rows)
    label_ok = (label >= 0) & (label < n_classes)
    target = tl.load(logits_ptr + rows * n_classes + label, mask=label_ok, other=0.0)
    loss = tl.where(label_ok, log_sum - (target - row_max), float("nan"))
    tl.store(row_loss_ptr + rows, loss, mask=row_ok)
    tl.store(row_max_ptr + rows, row_max, mask=row_ok)
    tl.store(row_log_sum_ptr + rows, log_sum, mask=row_ok)
    if last_to_arrive(counters_ptr, tl.num_programs(0)):
        partial = tl.zeros((BLOCK_MEAN,), tl.float32)
        for start in range(0, n_rows, BLOCK_MEAN):
            offs = start + tl.arange(0, BLOCK_MEAN)
            partial += tl.load(row_loss_ptr + offs, mask=offs < n_rows, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.div_rn(tl.sum(partial, axis=0), tl.cast(n_rows, tl.float32)))


@kernel(aot=[dict(logits_ptr="*fp32", labels_ptr=labels, row_max_ptr="*fp32", row_log_sum_ptr="*fp32",
                  dloss_ptr="*fp32", dlogits_ptr="*fp32", n_rows="i32", n_classes="i32",
                  **row_tile(*shape))
             for shape in _AOT_SHAPES for labels in _LABEL_TYPES])
def cross_entropy_backward_kernel(logits_ptr, labels_ptr, row_max_ptr, row_log_sum_ptr, dloss_ptr,
                                  dlogits_ptr, n_rows, n_classes,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dlogits (n_rows, n_classes) = (softmax - onehot(label)) * dloss / n_rows.

    Grid (cdiv(n_rows, BLOCK_R), cdiv(n_classes, BLOCK_C)). softmax = exp((x - m) - log s)
    from the forward's per-row m and log s; dloss is a 0-d float32 array read here,
    on the device. Rows whose label is outside [0, n_classes) are NaN.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    in_bounds = row_ok[:, None] & (cols < n_classes)[None, :]
    offs = rows[:, None] * n_classes + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=in_bounds, other=float("-inf"))  # masked lanes: exp -> 0
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(row_log_sum_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    label_ok = (label >= 0) & (label < n_classes)
    scale = tl.div_rn(tl.load(dloss_ptr), tl.cast(n_rows, tl.float32))
    probs = tl.exp((x - row_max[:, None]) - log_sum[:, None])
    onehot = (cols[None, :] == label[:, None]).to(tl.float32)
    dlogits = tl.where(label_ok[:, None], (probs - onehot) * scale, float("nan"))
    tl.store(dlogits_ptr + offs, dlogits, mask=in_bounds)


# Launchers mirror reference/loss.py: cross_entropy(...) -> (loss, saved),
# cross_entropy_backward(dloss, saved) -> (dlogits,).

def cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[n, labels[n]]: a 0-d float32 array.

    saved = (logits, labels, row max, row log-sum-exp of the shifted logits).
    """
    n_rows, n_classes = logits.shape
    blocks = row_tile(n_rows, n_classes)
    row_loss, row_max, row_log_sum = (empty((n_rows,)) for _ in range(3))
    loss = empty(())
    launch(cross_entropy_rows_kernel, (cdiv(n_rows, blocks["BLOCK_R"]),), logits, labels,
           row_loss, row_max, row_log_sum, loss, arrival_counters(1), n_rows, n_classes,
           BLOCK_MEAN=min(next_power_of_2(n_rows), MAX_BLOCK_MEAN), **blocks)
    return loss, (logits, labels, row_max, row_log_sum)


def cross_entropy_backward(dloss, saved):
    """dloss: a 0-d float32 array of the backend -> (dlogits (N, K),)."""
    logits, labels, row_max, row_log_sum = saved
    n_rows, n_classes = logits.shape
    blocks = row_tile(n_rows, n_classes)
    dlogits = empty_like(logits)
    grid = (cdiv(n_rows, blocks["BLOCK_R"]), cdiv(n_classes, blocks["BLOCK_C"]))
    launch(cross_entropy_backward_kernel, grid, logits, labels, row_max, row_log_sum, dloss, dlogits,
           n_rows, n_classes, **blocks)
    return (dlogits,)
