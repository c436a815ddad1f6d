"""Training metrics accumulated over batches."""
import numpy as np

#: The slots of a totals array, in order: the loss summed over examples, the examples whose label
#: is the top prediction, the examples, the examples whose label is among the TOP_K first.
TOTALS = ("loss_sum", "correct", "count", "correct_top5")
TOP_K = 5


def label_ranks(logits, labels):
    """The rank of each row's label among its logits (0: the prediction): how many columns come
    before it when a row is ordered NaN first, then by value from the largest, ties and NaNs in
    column order. Rank 0 is exactly ``np.argmax`` (the first maximum; the first NaN when there is
    one). A label outside [0, classes) ranks above any k, never correct. int64 (N,)."""
    n_rows, n_classes = logits.shape
    valid = (labels >= 0) & (labels < n_classes)
    label_col = np.where(valid, labels, 0).astype(np.int64)[:, None]
    own = np.take_along_axis(logits, label_col, axis=1)  # (N, 1)
    cols = np.arange(n_classes)[None, :]
    earlier = cols < label_col
    x_nan, own_nan = np.isnan(logits), np.isnan(own)
    before = np.where(x_nan, ~own_nan | earlier, ~own_nan & ((logits > own) | ((logits == own) & earlier)))
    return np.where(valid, before.sum(axis=1), np.iinfo(np.int64).max)


def accumulate_metrics(logits, labels, loss, totals):
    """Add one batch into ``totals`` (4,) float32 in place, and return it: loss * N, the rows whose
    label ranks 0 (see :func:`label_ranks`), N, the rows whose label ranks below TOP_K. In float32,
    in the Triton kernel's order."""
    n_rows = logits.shape[0]
    ranks = label_ranks(logits, labels)
    loss32 = np.float32(loss.reshape(()))
    totals += np.array([loss32 * np.float32(n_rows), np.count_nonzero(ranks == 0), n_rows,
                        np.count_nonzero(ranks < TOP_K)], dtype=np.float32)
    return totals
