"""Training metrics accumulated over batches."""
import numpy as np

#: The slots of a totals array, in order.
TOTALS = ("loss_sum", "correct", "count")


def accumulate_metrics(logits, labels, loss, totals):
    """Add one batch into ``totals`` (3,) float32 in place, and return it: loss * N, the number of
    rows whose argmax (the first maximum; a NaN counts as the maximum, as ``np.argmax``) is the
    label, N. In float32, in the Triton kernel's order."""
    n_rows = logits.shape[0]
    correct = np.count_nonzero(np.argmax(logits, axis=1) == labels)
    loss32 = np.float32(loss.reshape(()))
    totals += np.array([loss32 * np.float32(n_rows), correct, n_rows], dtype=np.float32)
    return totals
