"""accumulate_metrics: the Triton kernel (interpret; cuda on a GPU) and the numpy path against
np.argmax (top-1) and a stable sort (top-5).

Logits are small integers, so that most rows hold ties (the first maximum must
win, as in np.argmax; within the top five, ties go in column order, as a stable
sort has them); some rows hold NaN (np.argmax picks the first NaN; NaNs lead the
order) or only -inf (np.argmax picks column 0). Counts are exact in float32; the
loss sum is checked within float32 rounding.
"""
import numpy as np
import pytest

from ra_kernels import backend
from ra_kernels.kernels import metrics as metrics_kernels
from ra_kernels.metrics import TOTALS, accumulate_metrics

EPS = 2.0 ** -24  # float32 unit roundoff


def _logits(rng, n, classes):
    logits = rng.integers(-3, 4, (n, classes)).astype(np.float32)  # 7 values: ties in most rows
    if n >= 3:
        logits[1, rng.integers(0, classes, 2)] = np.nan
        logits[2] = -np.inf
    return logits


def _top5(logits, labels):
    """Rows whose label is among the first five of a stable sort: NaNs first, then by value from
    the largest, ties in column order."""
    nan = np.isnan(logits)
    columns = np.broadcast_to(np.arange(logits.shape[1]), logits.shape)
    order = np.lexsort((columns, np.where(nan, 0, -logits.astype(np.float64)), ~nan), axis=1)
    return int(sum(label in row[:5] for row, label in zip(order, labels)))


def _expected(batches):
    """(loss sum, correct, count, top-5 correct) in float64 from np.argmax and a sort."""
    loss_sum = sum(float(loss) * len(labels) for _, labels, loss in batches)
    correct = sum(int((np.argmax(logits, axis=1) == labels).sum()) for logits, labels, _ in batches)
    top5 = sum(_top5(logits, labels) for logits, labels, _ in batches)
    return loss_sum, correct, sum(len(labels) for _, labels, _ in batches), top5


def _run(batches, start, accumulate=accumulate_metrics):
    totals = backend.asarray(start.copy())  # asarray does not copy a host array
    for logits, labels, loss in batches:
        out = accumulate(backend.asarray(logits), backend.asarray(labels), backend.asarray(np.float32(loss)), totals)
        assert out is totals
    return backend.to_numpy(totals)


# (N, classes): batch 1; CIFAR-10 / -100 at batch 64; 70 rows (several row blocks, the last
# partial); 2,100 classes (three class slices, ties across slices: the earlier slice must win).
CASES = [(1, 10), (64, 10), (64, 100), (70, 100), (9, 2100)]


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n, classes", CASES)
def test_accumulate_matches_argmax(triton_backend, rng, n, classes, label_dtype):
    batches = [(_logits(rng, n, classes), rng.integers(0, classes, n).astype(label_dtype), 0.5 + rng.random())
               for _ in range(2)]
    # Labels equal to the prediction on every third row and on the NaN and -inf rows, and the
    # fifth or sixth of the sorted row on others, so that neither count is just chance.
    hit = np.arange(n) % 3 == 0
    hit[:3] = True
    near = (np.arange(n) % 3 == 1) & ~hit
    for logits, labels, _ in batches:
        labels[hit] = np.argmax(logits[hit], axis=1)
        order = np.argsort(-logits[near], axis=1, kind="stable")
        ranks = rng.integers(4, 6, near.sum())
        ranks[:1] = 4  # at least one label fifth: top-5 counts more than top-1
        labels[near] = order[np.arange(near.sum()), ranks]
    start = np.float32([3.25, 5.0, 7.0, 2.0])  # accumulates onto what is there
    got = _run(batches, start)
    loss_sum, correct, count, top5 = _expected(batches)
    assert got[1] == start[1] + correct and got[2] == start[2] + count and got[3] == start[3] + top5
    assert correct < top5 or n < 3
    # Each call rounds loss * N and the sum once: 2 roundings per call of the running value.
    assert abs(got[0] - (start[0] + loss_sum)) <= 4 * len(batches) * EPS * (start[0] + loss_sum)
    with backend.use_backend("numpy"):  # the numpy path: the kernel's arithmetic exactly
        want = _run(batches, start)
    if triton_backend == "interpret":  # no FMA contraction in the interpreter: bitwise
        assert np.array_equal(got, want)


def test_numpy_path_counts_ties_like_argmax():
    logits = np.float32([[1, 3, 3], [np.nan, 5, np.nan], [-np.inf, -np.inf, -np.inf], [2, 2, 1]])
    totals = np.zeros(len(TOTALS), np.float32)
    accumulate_metrics(logits, np.array([1, 0, 0, 0]), np.array(0.5, np.float32), totals)
    assert totals.tolist() == [2.0, 4.0, 4.0, 4.0]
    accumulate_metrics(logits, np.array([2, 1, 1, 1]), np.array(0.5, np.float32), totals)
    assert totals.tolist() == [4.0, 4.0, 8.0, 8.0]


def test_top5_ranks_ties_nan_and_invalid_labels(triton_backend):
    """Rank by rank around the fifth place: ties in column order, NaN first, -inf last, and a label
    outside the classes never correct in the kernel (on cuda nothing checks the labels' values
    before it: accumulate_metrics refuses them on host arrays)."""
    row = np.float32([4, 9, 4, 7, 4, np.nan, 4, -np.inf, 8])  # order: 5, 1, 8, 3, 0, 2, 4, 6, 7
    logits = np.repeat(row[None, :], 10, axis=0)
    labels = np.array([5, 1, 8, 3, 0, 2, 4, 7, 9, -1])
    got = _run([(logits, labels, 1.0)], np.zeros(len(TOTALS), np.float32), metrics_kernels.accumulate_metrics)
    assert got.tolist() == [10.0, 1.0, 10.0, 5.0]
    # Fewer classes than five: every valid label counts, no invalid one. int64 labels that wrap to
    # a valid class as int32 are invalid all the same.
    few = np.float32([[1, 2, 3], [3, 2, 1], [0, 0, 0], [5, 5, 5], [1, 1, 1]])
    labels = np.array([0, 0, -1, 3, 2**32 + 1], np.int64)
    got = _run([(few, labels, 1.0)], np.zeros(len(TOTALS), np.float32), metrics_kernels.accumulate_metrics)
    assert got.tolist() == [5.0, 1.0, 5.0, 2.0]


def test_bad_arguments():
    logits, labels, loss = np.zeros((4, 10), np.float32), np.zeros(4, np.int64), np.array(1.0, np.float32)
    totals = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="totals must be"):
        accumulate_metrics(logits, labels, loss, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="totals must be"):
        accumulate_metrics(logits, labels, loss, np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        accumulate_metrics(logits, labels[:3], loss, totals)
    with pytest.raises(ValueError, match="labels must be integers"):
        accumulate_metrics(logits, labels.astype(np.float32), loss, totals)
    with pytest.raises(ValueError, match="labels must be C-contiguous"):  # read as other labels by a kernel
        accumulate_metrics(logits, np.zeros((4, 2), np.int64)[:, 0], loss, totals)
    for bad in (-1, 10, 10**9):  # counted as wrong predictions before, where cross_entropy refused them
        with pytest.raises(ValueError, match=r"accumulate_metrics: labels must lie in \[0, 10\), got values from "):
            accumulate_metrics(logits, np.array([0, bad, 3, 9]), loss, totals)
    assert not totals.any()
    with pytest.raises(TypeError, match=r"labels is int64 in the other byte order \(>i8\)"):
        accumulate_metrics(logits, labels.astype(">i8"), loss, totals)
    with pytest.raises(ValueError, match="logits must be a non-empty"):
        accumulate_metrics(logits[0], labels, loss, totals)
    with pytest.raises(ValueError, match="C-contiguous"):
        accumulate_metrics(np.zeros((10, 4), np.float32).T, labels, loss, totals)
    with pytest.raises(ValueError, match="loss must be a single"):
        accumulate_metrics(logits, labels, np.zeros(2, np.float32), totals)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        accumulate_metrics(logits, labels, 1.0, totals)
