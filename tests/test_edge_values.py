"""Edge shapes and values through every op of the contract, on every backend.

The property test draws random small shapes (1x1, odd sizes, batch 1) and inputs of
one kind each: ordinary, with NaN, with +-inf, around 1e30, or denormal; each op then
runs on numpy and on the interpreter (and compiled on a GPU), and both must agree:
the same error class, or the same values (NaN and inf at the same places, finite
values within float32 rounding of the op's magnitudes). The other tests pin single
decisions: empty arrays are errors, NumPy scalars are numbers, the normalisations do
not overflow, NaN propagates (docs/design.md §2).
"""
import numpy as np
import pytest

from ra_kernels import backend
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor

# Each backend the ops run on here: numpy and interpret always, cuda on a GPU.
ALL_BACKENDS = [pytest.param("numpy"), pytest.param("interpret"), pytest.param("cuda", marks=pytest.mark.gpu)]

KINDS = ("ordinary", "nan", "inf", "huge", "denormal")


def draw(rng, shape, kind="ordinary"):
    """float32 values of ``shape`` of one kind: standard normal, scaled to ~1e30 or ~1e-40
    (denormal), or with a few NaN or +-inf among them."""
    x = rng.standard_normal(shape)
    if kind == "huge":
        x *= 1e30
    elif kind == "denormal":
        x *= 1e-40
    x = x.astype(np.float32)
    if kind in ("nan", "inf") and x.size:
        special = rng.choice(x.size, size=max(1, x.size // 16), replace=False)
        x.flat[special] = np.nan if kind == "nan" else np.where(rng.random(special.size) < 0.5, np.inf, -np.inf)
    return x


def bn_state(rng, c):
    """gamma, beta, running mean, running var (C,) float32: ordinary values, var > 0."""
    return (draw(rng, c), draw(rng, c), draw(rng, c), (rng.random(c) + 0.5).astype(np.float32))


# --------------------------------------------------------------------------- the cases

def case(rng, op):
    """(function of arrays, input arrays, name) for one random call of ``op``."""
    kind = KINDS[rng.integers(len(KINDS))]
    dims = [int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 6))]
    if rng.random() < 0.15:  # an empty array: batch 0, no rows or columns, or no channels
        dims[rng.integers(4)] = 0
    n, h, w, c = dims
    x = draw(rng, (n, h, w, c), kind)
    if op == "conv2d":
        k = int(rng.integers(1, min(h, w) + 1)) if min(h, w) > 0 and rng.random() < 0.7 else 1
        stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1))
        return (lambda x, wt: F.conv2d(x, wt, stride, padding)), [x, draw(rng, (k, k, c, 3))], kind
    if op in ("batch_norm", "conv_bn_relu"):
        training, relu = bool(rng.random() < 0.7), bool(rng.random() < 0.5)
        if op == "batch_norm":
            fn = (lambda x, g, b, rm, rv: F.batch_norm(x, g, b, rm, rv, training=training, relu=relu))
            return fn, [x, *bn_state(rng, c)], kind
        fn = (lambda x, wt, g, b, rm, rv: F.conv_bn_relu(x, wt, g, b, rm, rv, 1, 0, training=training, relu=relu))
        return fn, [x, draw(rng, (1, 1, c, 4)), *bn_state(rng, 4)], kind
    if op == "conv_chain":  # conv1x1 + BN (training) + ReLU, conv1x1
        fn = (lambda x, w1, g, b, rm, rv, w2: F.conv_chain(x, [(w1, 1, 0, (g, b, rm, rv)), (w2, 1, 0, None)]))
        return fn, [x, draw(rng, (1, 1, c, 4)), *bn_state(rng, 4), draw(rng, (1, 1, 4, 3))], kind
    if op == "max_pool2d":
        return (lambda x: F.max_pool2d(x)), [x], kind
    if op == "upsample_bilinear":
        size = (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        return (lambda x, s: F.upsample_bilinear(x, size, skip=s)), [x, draw(rng, (n, *size, c))], kind
    if op == "attention_mix":
        residual, from_logits = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        return (lambda m, t: F.attention_mix(m, t, residual, from_logits)), [x, draw(rng, x.shape)], kind
    if op == "add":
        return F.add, [x, draw(rng, x.shape, kind)], kind
    if op == "linear":
        return F.linear, [x.reshape(n, h * w * c), draw(rng, (h * w * c, 3)), draw(rng, 3)], kind
    if op == "cross_entropy":
        logits = x.reshape(n, h * w * c)
        labels = rng.integers(0, max(logits.shape[1], 1), n)
        return (lambda logits: F.cross_entropy(logits, backend.asarray(labels))), [logits], kind
    return getattr(F, op), [x], kind  # sigmoid, channel_attention, spatial_attention, relu, global_avg_pool


OPS = ("conv2d", "batch_norm", "conv_bn_relu", "conv_chain", "max_pool2d", "upsample_bilinear", "sigmoid",
       "attention_mix", "channel_attention", "spatial_attention", "add", "relu", "global_avg_pool", "linear",
       "cross_entropy")


def run(fn, arrays, on, dtype=np.float32):
    """[output, gradient per input (None where there is none)] of ``fn`` on backend ``on``, the
    float inputs cast to ``dtype``, as host float64 arrays; or the class of the error it raised.
    The gradients are those of sum(output * weights), with fixed weights cos(0), cos(1), ..."""
    with backend.use_backend(on), np.errstate(all="ignore"):
        inputs = [Tensor(backend.asarray(a.astype(dtype)), requires_grad=a.ndim > 1 or i > 0)
                  for i, a in enumerate(arrays)]
        try:
            out = fn(*inputs)
        except (ValueError, TypeError) as error:
            return type(error)
        weights = np.cos(np.arange(out.data.size)).astype(dtype).reshape(out.shape)
        out.backward(backend.asarray(weights))
        return [backend.to_numpy(t.data).astype(np.float64) for t in [out]] + \
            [None if t.grad is None else backend.to_numpy(t.grad).astype(np.float64) for t in inputs]


def float32_error(fn, arrays, rng):
    """[per output and gradient: the numpy backend's largest float32 error against float64, or None],
    the largest of three samples: the inputs as given and twice perturbed by about an ulp. Where
    the values are mostly rounding (gradients that cancel to nearly 0, as batch norm's over 2
    values) it is the error of the terms, not of the result, and one sample can be lucky."""
    errors = None
    for sample in range(3):
        inputs = arrays if sample == 0 else [
            a * (1 + rng.uniform(-1, 1, a.shape) * 2.0**-22).astype(a.dtype) if a.dtype.kind == "f" else a
            for a in arrays]
        low, high = run(fn, inputs, "numpy"), run(fn, inputs, "numpy", np.float64)
        with np.errstate(invalid="ignore"):
            sample_errors = [None if w is None else
                             np.abs(np.where(np.isfinite(w) & np.isfinite(t), w - t, 0.0)).max(initial=0.0)
                             for w, t in zip(low, high)]
        errors = sample_errors if errors is None else [None if e is None else max(e, f)
                                                       for e, f in zip(errors, sample_errors)]
    return errors


def assert_close(got, want, error, what):
    """``got`` against ``want`` (the numpy backend in float32): NaN and +-inf at the same places,
    and finite values within 2e-4 of the largest finite magnitude (sums of a few dozen float32
    terms in another order round to ~1e-6 of them) plus 8 times numpy's own float32 ``error``."""
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: infinities")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{what}: finite positions")
    if finite.any():
        allowed = 2e-4 * np.abs(want[finite]).max() + 8 * error
        assert np.all(np.abs(got[finite] - want[finite]) <= allowed), \
            f"{what}: got {got[finite]}, numpy {want[finite]}, allowed difference {allowed:.3g}"


@pytest.mark.parametrize("op", OPS)
def test_backends_agree_on_edge_shapes_and_values(rng, op, triton_backend):
    for _ in range(10):
        fn, arrays, kind = case(rng, op)
        what = f"{op}, {kind} inputs of shapes {[a.shape for a in arrays]}"
        want, got = run(fn, arrays, "numpy"), run(fn, arrays, triton_backend)
        if isinstance(want, type) or isinstance(got, type):
            assert got == want, f"{what}: numpy gives {want}, {triton_backend} {got}"
            continue
        errors = float32_error(fn, arrays, rng)
        for i, (g, w, e) in enumerate(zip(got, want, errors)):
            assert (g is None) == (w is None), f"{what}: gradient {i - 1} on one backend only"
            if w is not None:
                assert_close(g, w, e, f"{what}: {'output' if i == 0 else f'gradient {i - 1}'}")


# --------------------------------------------------------------------------- single decisions

def empty_calls():
    """(op, call) for every op of the contract with one empty input."""
    x0, x_no_rows = np.zeros((0, 4, 4, 3), np.float32), np.zeros((2, 0, 4, 3), np.float32)
    c3 = [np.ones(3, np.float32)] * 4
    return [
        ("conv2d", lambda: F.conv2d(backend.asarray(x0), backend.asarray(np.ones((1, 1, 3, 2), np.float32)))),
        ("batch_norm", lambda: F.batch_norm(backend.asarray(x0), *map(backend.asarray, c3))),
        ("conv_bn_relu", lambda: F.conv_bn_relu(backend.asarray(x_no_rows),
                                                backend.asarray(np.ones((1, 1, 3, 3), np.float32)),
                                                *map(backend.asarray, c3))),
        ("conv_chain", lambda: F.conv_chain(backend.asarray(x_no_rows), [
            (backend.asarray(np.ones((1, 1, 3, 3), np.float32)), 1, 0, tuple(map(backend.asarray, c3))),
            (backend.asarray(np.ones((1, 1, 3, 2), np.float32)), 1, 0, None)])),
        ("max_pool2d", lambda: F.max_pool2d(backend.asarray(x_no_rows))),
        ("upsample_bilinear", lambda: F.upsample_bilinear(backend.asarray(x_no_rows), (8, 8))),
        ("sigmoid", lambda: F.sigmoid(backend.asarray(np.zeros(0, np.float32)))),
        ("attention_mix", lambda: F.attention_mix(backend.asarray(x0), backend.asarray(x0))),
        ("channel_attention", lambda: F.channel_attention(backend.asarray(np.zeros((2, 4, 4, 0), np.float32)))),
        ("spatial_attention", lambda: F.spatial_attention(backend.asarray(x_no_rows))),
        ("add", lambda: F.add(backend.asarray(x0), backend.asarray(x0))),
        ("relu", lambda: F.relu(backend.asarray(x0))),
        ("global_avg_pool", lambda: F.global_avg_pool(backend.asarray(x_no_rows))),
        ("linear", lambda: F.linear(*map(backend.asarray, (np.zeros((0, 3), np.float32), np.ones((3, 2), np.float32),
                                                          np.ones(2, np.float32))))),
        ("cross_entropy", lambda: F.cross_entropy(backend.asarray(np.zeros((0, 10), np.float32)),
                                                  backend.asarray(np.zeros(0, np.int64)))),
    ]


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_empty_arrays_are_one_clear_error_on_every_backend(on):
    # Before: an IndexError (numpy), garbage (interpret), ZeroDivisionError in triton.cdiv, NaN.
    with backend.use_backend(on):
        for op, call in empty_calls():
            with pytest.raises(ValueError, match=rf"^{op}: \w+ is empty \(shape .*0.*\); ops take arrays without"):
                call()
    assert [op for op, _ in empty_calls()] == list(OPS)  # every op of the contract


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_numpy_scalars_are_numbers(rng, on):
    # Before: "failed to specialize argument of type numpy.int64" compiled, a conversion error interpreted.
    x, w = draw(rng, (2, 5, 5, 3)), draw(rng, (3, 3, 3, 4))
    gamma, beta, mean, var = bn_state(rng, 4)
    with backend.use_backend(on):
        def both(call):
            """call(numbers) with Python numbers and with NumPy scalars: the same result."""
            python = call(int, float, bool)
            numpy = call(np.int64, np.float32, np.bool_)
            np.testing.assert_array_equal(backend.to_numpy(numpy.data), backend.to_numpy(python.data))

        a = [backend.asarray(v) for v in (x, w, gamma, beta)]
        both(lambda i, f, b: F.conv2d(a[0], a[1], stride=i(2), padding=i(1)))
        both(lambda i, f, b: F.conv_bn_relu(a[0], a[1], a[2], a[3], backend.asarray(mean), backend.asarray(var),
                                            i(1), i(1), training=b(True), momentum=f(0.5), eps=f(1e-3),
                                            relu=b(True)))
        both(lambda i, f, b: F.max_pool2d(a[0], kernel_size=i(3), stride=i(2), padding=i(1)))
        both(lambda i, f, b: F.upsample_bilinear(a[0], (i(7), i(9))))
        both(lambda i, f, b: F.attention_mix(a[0], a[0], residual=b(False), from_logits=b(True)))


def test_scalar_options_are_checked():
    x = np.ones((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="attention_mix: residual must be True or False, got 'yes'"):
        F.attention_mix(x, x, residual="yes")
    with pytest.raises(ValueError, match=r"batch_norm: momentum must be a finite number in \[0, 1\], got inf"):
        F.batch_norm(x, *bn_state(np.random.default_rng(), 1), momentum=10 ** 400)  # beyond float's range
    for eps in (np.float32(0), float("inf")):  # an infinite eps would make every output 0
        with pytest.raises(ValueError, match=rf"batch_norm: eps must be a finite number > 0, got {eps:g}"):
            F.batch_norm(x, *bn_state(np.random.default_rng(), 1), eps=eps)


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_normalisations_do_not_overflow(rng, on):
    # Before: channel attention gave 0 and spatial attention 0.5 at |x| ~ 1e30 (a squared
    # sum overflowing to inf), with only a warning.
    x = draw(rng, (2, 3, 3, 5)).astype(np.float64) * 1e30
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    z = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    with backend.use_backend(on):
        x32 = backend.asarray(x.astype(np.float32))
        channel = backend.to_numpy(F.channel_attention(x32).data)
        spatial = backend.to_numpy(F.spatial_attention(x32).data)
    np.testing.assert_allclose(channel, x / norm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial, 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_batch_norm_whose_variance_overflows_is_nan(rng, on):
    # The batch variance of values ~1e30 (1e60) is no float32: the output is NaN, which the
    # training loop reports, never beta (rstd = 1/inf = 0), as before.
    x = draw(rng, (2, 3, 3, 4)) * np.float32(1e30)
    gamma, beta, mean, var = bn_state(rng, 4)
    with backend.use_backend(on), np.errstate(over="ignore", invalid="ignore"):  # NumPy may warn too
        args = [backend.asarray(a) for a in (x, gamma, beta, mean, var)]
        training = backend.to_numpy(F.batch_norm(*args, training=True).data)
        args[4] = backend.asarray(np.full(4, np.inf, np.float32))  # a running variance that overflowed
        evaluation = backend.to_numpy(F.batch_norm(*args, training=False).data)
    assert np.isnan(training).all() and np.isnan(evaluation).all()


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_nan_propagates_as_in_pytorch(rng, on):
    x = draw(rng, (1, 5, 5, 2))
    x[0, 2, 2, 1] = np.nan
    gamma, beta, mean, var = bn_state(rng, 2)
    with backend.use_backend(on):
        xt = Tensor(backend.asarray(x), requires_grad=True)
        relu = backend.to_numpy(F.relu(xt).data)
        pooled = F.max_pool2d(xt, kernel_size=3, stride=1, padding=1)
        pooled.backward(backend.asarray(np.ones(pooled.shape, np.float32)))
        pool_grad = backend.to_numpy(xt.grad)
        bn_eval = backend.to_numpy(F.batch_norm(backend.asarray(x), *map(backend.asarray, (gamma, beta, mean, var)),
                                                training=False, relu=True).data)
    assert np.isnan(relu[0, 2, 2, 1]) and np.isnan(relu).sum() == 1
    # A NaN wins each of the 9 windows around it, and takes their 9 gradients.
    assert pool_grad[0, 2, 2, 1] == 9
    assert np.isnan(bn_eval[0, 2, 2, 1]) and np.isnan(bn_eval).sum() == 1


@pytest.mark.parametrize("on", ALL_BACKENDS)
def test_max_pool_of_tied_signed_zeros_is_its_first_zero(rng, on):
    """-0.0 == +0.0, so a window of zeros of both signs is a tie: its first zero wins, its value
    (sign included) is y and it takes the gradient, as in PyTorch, on every backend."""
    signs = rng.integers(0, 2, (1, 4, 4, 3)).astype(bool)
    x = np.where(signs, np.float32(-0.0), np.float32(0.0))
    with backend.use_backend(on):
        xt = Tensor(backend.asarray(x), requires_grad=True)
        y = F.max_pool2d(xt, kernel_size=2, stride=2, padding=0)
        y.backward(backend.asarray(np.ones(y.shape, np.float32)))
        pooled, grad = backend.to_numpy(y.data), backend.to_numpy(xt.grad)
    first = x[:, ::2, ::2]  # each 2x2 window's first tap, in row-major order
    np.testing.assert_array_equal(np.signbit(pooled), np.signbit(first))
    np.testing.assert_array_equal(grad, np.pad(np.ones((1, 2, 1, 2, 1, 3), np.float32),
                                               ((0, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0))).reshape(x.shape))
