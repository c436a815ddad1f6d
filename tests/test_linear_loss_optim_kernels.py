"""linear, cross-entropy and SGD kernels (interpret backend; cuda too on a GPU) against reference/.

The launchers of ra_kernels.kernels.{linear, loss, optim} run on float32 inputs;
reference/ runs in float64 on the same values (SGD: in float32, as the
reference's exact operation order is what the kernel reproduces). Outputs are
NaN-poisoned before each kernel runs (conftest), so an element a kernel fails to
write fails the comparison. Tolerances are bounds derived from float32 rounding
(unit roundoff EPS = 2**-24), never fitted to observed errors.
"""
import numpy as np
import pytest

import reference as ref
from ra_kernels import backend
from ra_kernels.kernels import linear as linear_kernels
from ra_kernels.kernels import loss as loss_kernels
from ra_kernels.kernels import optim as optim_kernels

EPS = 2.0 ** -24   # float32 unit roundoff: one rounding is off by at most EPS relative
TF32_EPS = 2.0 ** -10  # TF32 keeps 10 mantissa bits: an input truncated to it is off by < this


def _host(a):
    return backend.to_numpy(a)


def _assert_within(got, want, bound, what):
    """|got - want| <= bound elementwise (bound broadcasts), with the worst offender on failure."""
    got = _host(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    excess = np.abs(got.astype(np.float64) - want) - bound
    worst = np.unravel_index(np.argmax(np.where(np.isnan(excess), np.inf, excess)), want.shape)
    allowed = np.broadcast_to(bound, want.shape)[worst]
    assert not np.isnan(got).any() and (excess <= 0).all(), (
        f"{what}: at {worst} got {got[worst]}, expected {want[worst]} within {allowed}")


def _product_bound(a, b, input_eps=0.0):
    """Error bound of a float32 A @ B (K terms) against the exact product of the same float32 values.

    Each of the K products and K-1 sums of a dot product rounds once: at most
    (K + 1) * EPS relative to sum |a_k b_k|, in any summation order. Inputs
    rounded to ``input_eps`` (TF32) add 2 * input_eps per product.
    """
    k = a.shape[1]
    return ((k + 1) * EPS + 2 * input_eps) * (np.abs(a) @ np.abs(b))


# --------------------------------------------------------------------------- linear

# (N, in, out): batch 1 and 3, in and out not multiples of any block (5, 33, 10, 100),
# in = 256 spanning several BLOCK_K slices, and the attention92 head at batch 64.
LINEAR_SHAPES = [(1, 5, 10), (3, 256, 100), (1, 256, 10), (3, 5, 100), (17, 33, 21), (64, 256, 100)]


def _linear_case(rng, n, n_in, n_out):
    shapes = ((n, n_in), (n_in, n_out), (n_out,), (n, n_out))  # x, w, b, dy
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _check_linear(x, w, b, dy, input_eps):
    """Kernels vs reference in float64; the bounds of _product_bound, plus one rounding for the bias."""
    y, saved = linear_kernels.linear(*(backend.asarray(a) for a in (x, w, b)))
    dx, dw, db = linear_kernels.linear_backward(backend.asarray(dy), saved)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    want_y, ref_saved = ref.linear(x64, w64, b64)
    want_dx, want_dw, want_db = ref.linear_backward(dy64, ref_saved)
    y_bound = _product_bound(x64, w64, input_eps) + 2 * EPS * (np.abs(x64) @ np.abs(w64) + np.abs(b64))
    _assert_within(y, want_y, y_bound, "y")
    _assert_within(dx, want_dx, _product_bound(dy64, w64.T, input_eps), "dx")
    _assert_within(dw, want_dw, _product_bound(x64.T, dy64, input_eps), "dw")
    # db sums N float32 values exactly as given (no TF32): N roundings.
    _assert_within(db, want_db, (x.shape[0] + 1) * EPS * np.abs(dy64).sum(0), "db")


@pytest.mark.parametrize("n, n_in, n_out", LINEAR_SHAPES)
def test_linear_forward_backward(triton_backend, rng, n, n_in, n_out):
    _check_linear(*_linear_case(rng, n, n_in, n_out), input_eps=0.0)


def test_linear_with_bfloat16_x(triton_backend, rng):
    """bfloat16 x (global average pooling's output in bf16 training), float32 w, b and dy (the
    logits stay float32 for the loss). The products with x take both operands in bfloat16: w
    rounded as it loads in the forward, dy in the weight gradient, each exact in float32 then, so
    against float64 from those rounded operands only the float32 sums remain (_product_bound).
    dx = dy @ w^T multiplies float32 operands and is stored in x's type: one bfloat16 rounding more."""
    x, w, b, dy = _linear_case(rng, 17, 33, 21)
    x = x.astype(backend.BFLOAT16)
    y, saved = linear_kernels.linear(*(backend.asarray(a) for a in (x, w, b)))
    dx, dw, db = linear_kernels.linear_backward(backend.asarray(dy), saved)
    assert (_host(y).dtype, _host(dx).dtype, _host(dw).dtype) == (np.float32, backend.BFLOAT16, np.float32)
    x64, w64, b64, dy64 = (a.astype(np.float64) for a in (x, w, b, dy))
    w_bf, dy_bf = (a.astype(backend.BFLOAT16).astype(np.float64) for a in (w, dy))
    _assert_within(y, x64 @ w_bf + b64,
                   _product_bound(x64, w_bf) + 2 * EPS * (np.abs(x64) @ np.abs(w_bf) + np.abs(b64)), "y")
    want_dx = dy64 @ w64.T
    _assert_within(dx, want_dx, backend.BFLOAT16_ROUNDOFF * np.abs(want_dx) + _product_bound(dy64, w64.T), "dx")
    _assert_within(dw, x64.T @ dy_bf, _product_bound(x64.T, dy_bf), "dw")
    _assert_within(db, dy64.sum(0), (x.shape[0] + 1) * EPS * np.abs(dy64).sum(0), "db")


@pytest.mark.parametrize("given", ["both", "dw", "db"])
def test_linear_gradients_added_into_buffers(triton_backend, rng, given):
    """dw and db added into the optimizer's buffers (both in the wgrad kernel, one alone by an add)."""
    x, w, b, dy = _linear_case(rng, 17, 33, 21)
    _, saved = linear_kernels.linear(*(backend.asarray(a) for a in (x, w, b)))
    before = {"dw": rng.standard_normal(w.shape).astype(np.float32),
              "db": rng.standard_normal(b.shape).astype(np.float32)}
    buffers = {k: backend.asarray(v.copy()) if given in (k, "both") else None for k, v in before.items()}
    _, dw, db = linear_kernels.linear_backward(backend.asarray(dy), saved, dw_into=buffers["dw"],
                                               db_into=buffers["db"])
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    _, want_dw, want_db = ref.linear_backward(dy64, ref.linear(x64, w.astype(np.float64), b.astype(np.float64))[1])
    for name, got, want, bound in (("dw", dw, want_dw, _product_bound(x64.T, dy64, 0.0)),
                                   ("db", db, want_db, (x.shape[0] + 1) * EPS * np.abs(dy64).sum(0))):
        if buffers[name] is None:
            _assert_within(got, want, bound, name)
        else:
            assert got is buffers[name], f"{name} must be added into the buffer given and returned"
            # one more rounding for the addition of the buffer's value
            _assert_within(backend.to_numpy(got).astype(np.float64) - before[name], want,
                           bound + 2 * EPS * (np.abs(want) + np.abs(before[name])), name)


@pytest.mark.parametrize("n, n_in, n_out", [(3, 256, 100), (1, 5, 10)])
def test_linear_tf32(triton_backend, rng, n, n_in, n_out):
    # TF32 keeps 11 significant bits of each input (tensor cores may truncate rather than
    # round): each product off by up to 2 * 2**-10, about 2e-3 relative to sum |a_k b_k|.
    # The interpreter computes in float32 whatever the precision, so there this only
    # checks that the TF32 path runs; on a GPU it is the real bound.
    with backend.use_precision("tf32"):
        _check_linear(*_linear_case(rng, n, n_in, n_out), input_eps=TF32_EPS)


# --------------------------------------------------------------------------- cross-entropy

def _logits(rng, n, classes, kind):
    z = rng.standard_normal((n, classes))
    if kind == "scale_1e3":     # spread 1e3: softmax all but one-hot, losses in the thousands
        z *= 1e3
    elif kind == "offset_1e3":  # rows near +1e3 and -1e3: naive exp overflows / underflows to 0
        z += 1e3 * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    return z.astype(np.float32)


def _check_cross_entropy(logits, labels, dloss):
    """Loss and dlogits vs reference in float64 on the same float32 logits.

    Loss: each row's log s - (x_label - m) has two non-negative terms, so the
    shift and final subtraction round within a few EPS of the loss; the log of a
    float32 sum of K terms in (0, 1] is off by at most (K + 8) EPS absolute (K
    roundings of the sum, a few ulp of the GPU's approximate log); the mean of N
    rows adds N roundings relative.
    dlogits: softmax = exp((x - m) - log s) inherits (K + 8) EPS from log s and
    about 2 EPS |x - m| from the shift, relative; |x - m| exp(-(x - m)) <= 1/e,
    so the absolute error is at most about (K + 10) EPS, times dloss / N.
    """
    n, classes = logits.shape
    loss, saved = loss_kernels.cross_entropy(backend.asarray(logits), backend.asarray(labels))
    (dlogits,) = loss_kernels.cross_entropy_backward(backend.asarray(np.float32(dloss)), saved)
    want_loss, ref_saved = ref.cross_entropy(logits.astype(np.float64), labels)
    (want_dlogits,) = ref.cross_entropy_backward(np.float64(dloss), ref_saved)
    assert _host(loss).shape == () and _host(loss).dtype == np.float32
    _assert_within(loss, want_loss, (n + 4) * EPS * abs(want_loss) + (classes + 8) * EPS, "loss")
    _assert_within(dlogits, want_dlogits,
                   4 * EPS * np.abs(want_dlogits) + (classes + 10) * EPS * abs(dloss) / n, "dlogits")


# (N, classes, labels dtype, logits): batch 1, CIFAR-10 / -100 class counts, the head at
# batch 64, and 2,100 classes: three 1,024-class slices through the online log-sum-exp.
CE_CASES = [(1, 10, np.int64, "normal"), (3, 100, np.int32, "normal"), (64, 10, np.int64, "normal"),
            (5, 100, np.int64, "scale_1e3"), (4, 10, np.int32, "offset_1e3"),
            (3, 2100, np.int32, "scale_1e3"), (2, 2100, np.int64, "offset_1e3")]


@pytest.mark.parametrize("n, classes, label_dtype, kind", CE_CASES)
def test_cross_entropy_forward_backward(triton_backend, rng, n, classes, label_dtype, kind):
    logits = _logits(rng, n, classes, kind)
    labels = rng.integers(0, classes, n).astype(label_dtype)
    _check_cross_entropy(logits, labels, dloss=0.5 + rng.random())


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad_label", [-1, 10, 2**31 - 1])
def test_cross_entropy_bad_label_gives_nan(triton_backend, rng, label_dtype, bad_label):
    # No host-side check on the GPU: a label outside [0, K) must poison the loss and its
    # row of the gradient, and leave the other rows right.
    n, classes, bad_row = 5, 10, 2
    logits = _logits(rng, n, classes, "normal")
    labels = rng.integers(0, classes, n).astype(label_dtype)
    labels[bad_row] = bad_label
    loss, saved = loss_kernels.cross_entropy(backend.asarray(logits), backend.asarray(labels))
    (dlogits,) = loss_kernels.cross_entropy_backward(backend.asarray(np.float32(1.0)), saved)
    assert np.isnan(_host(loss))
    dlogits = _host(dlogits)
    assert np.isnan(dlogits[bad_row]).all()
    # The good rows do not depend on the bad label: compare with any valid one in its place.
    labels[bad_row] = 0
    _, ref_saved = ref.cross_entropy(logits.astype(np.float64), labels)
    (want,) = ref.cross_entropy_backward(1.0, ref_saved)
    good = np.arange(n) != bad_row
    _assert_within(dlogits[good], want[good], 4 * EPS * np.abs(want[good]) + (classes + 10) * EPS / n,
                   "dlogits of the valid rows")


# --------------------------------------------------------------------------- SGD

@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_sgd_matches_reference_over_100_steps(triton_backend, rng, nesterov, weight_decay):
    # 2,500 elements: three 1,024-element blocks, the last one partial.
    size, momentum, steps = 2500, 0.9, 100
    param_np = rng.standard_normal(size).astype(np.float32)
    velocity_np = np.zeros(size, np.float32)  # zero velocity: PyTorch's first step
    # Copies: on the interpret backend asarray returns the very array, which the kernel updates in place.
    param, velocity = backend.asarray(param_np.copy()), backend.asarray(velocity_np.copy())
    want_param, want_velocity = param_np, velocity_np
    lr = backend.asarray(np.array([0.1], np.float32))
    for step in range(steps):
        if step == steps // 2:  # a schedule writes the device array; the kernel must read it anew
            lr[...] = np.float32(0.01)
        grad = rng.standard_normal(size).astype(np.float32)
        out = optim_kernels.sgd_step(param, backend.asarray(grad), velocity, lr, momentum=momentum,
                                     weight_decay=weight_decay, nesterov=nesterov)
        assert out[0] is param and out[1] is velocity  # updated in place
        want_param, want_velocity = ref.sgd_step(want_param, grad, want_velocity, float(_host(lr)[0]),
                                                 momentum=momentum, weight_decay=weight_decay,
                                                 nesterov=nesterov)
    # Same float32 operations in the same order: the interpreter (NumPy) agrees bit for bit.
    # On the GPU the compiler contracts a * b + c into one FMA (one rounding instead of two),
    # so the last bit can differ at each step, and the differences carry over 100 steps:
    # 1e-6 relative to the array's scale (an element passing near zero has no relative scale).
    for got, want, what in ((param, want_param, "param"), (velocity, want_velocity, "velocity")):
        rel = 0.0 if triton_backend == "interpret" else 1e-6
        _assert_within(got, want.astype(np.float64), rel * np.abs(want).max(), what)
