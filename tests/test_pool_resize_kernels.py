"""Max pooling, global average pooling and bilinear resize kernels against reference/.

Interpret backend (cuda too on a GPU); the reference runs in float64 on the same
float32 values. Outputs are NaN-poisoned before each kernel runs (conftest), so
an element a kernel fails to write fails the comparison. Shapes are small (the
interpreter runs programs one by one) but cover the edges: batch 1, odd H and W,
channel counts below, at and above the 64-channel block (3, 5, 67), windows
hanging over the padding, and resizes by non-integer factors, down and to 1 pixel.
"""
import numpy as np
import pytest

import reference as ref
from ra_kernels import backend
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor
from ra_kernels.kernels import pool, resize


def _host(a):
    return backend.to_numpy(a)


def _run(op, *args, **kwargs):
    """op on the current backend, with each NumPy argument as a float32 array of it."""
    return op(*(backend.asarray(a.astype(np.float32)) if isinstance(a, np.ndarray) else a for a in args),
              **kwargs)


def _ref(op, *args, **kwargs):
    """The reference op, with each NumPy argument as float64."""
    return op(*(a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args), **kwargs)


def _signed_integers(rng, shape):
    """Nonzero small integers as float32: any sum of a few of them is exact in float32,
    so a gradient made of such sums can be compared exactly, and a misrouted term shows."""
    return (rng.integers(1, 9, shape) * rng.choice([-1, 1], shape)).astype(np.float32)


# --------------------------------------------------------------------------- max pooling

# (kernel_size, stride, padding, ceil_mode): the network's; tiling; overlapping; gaps between
# windows; the ImageNet stem's (Caffe's ceil mode: on 7x9 the last windows reach past the input).
POOL_GEOMETRIES = [(3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False), (2, 3, 0, False), (3, 2, 0, True)]
POOL_SHAPES = [(1, 7, 9, 67), (2, 7, 9, 3)]


@pytest.mark.parametrize("values", ["ties", "normal"])
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_max_pool2d(triton_backend, rng, geometry, shape, values):
    kernel_size, stride, padding, ceil_mode = geometry
    if values == "ties":
        # Windows full of equal values: the gradient must go to the first maximum in row-major
        # order. All negative, so a window over the padding only gets it right if padding is -inf.
        x = rng.integers(-3, 0, shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    y, saved = _run(pool.max_pool2d, x, **geometry)
    want_y, want_saved = _ref(ref.max_pool2d, x, **geometry)
    # A max only selects values: exact.
    np.testing.assert_array_equal(_host(y), want_y)
    argmax, want_argmax = _host(saved[0]), want_saved[0]
    assert argmax.dtype == np.int8 == want_argmax.dtype
    np.testing.assert_array_equal(argmax, want_argmax)

    dy = _signed_integers(rng, want_y.shape)
    (dx,) = pool.max_pool2d_backward(backend.asarray(dy), saved)
    (want_dx,) = ref.max_pool2d_backward(dy.astype(np.float64), want_saved)
    # Exact: each dx element is a sum of at most 9 small integers, exact in float32, so any
    # difference is a gradient sent to the wrong input.
    np.testing.assert_array_equal(_host(dx), want_dx)
    # Added into x's gradient from its other consumers (the engine's dx_into): still exact on integers.
    before = _signed_integers(rng, x.shape)
    into = backend.asarray(before.copy())
    (dx_into,) = pool.max_pool2d_backward(backend.asarray(dy), saved, dx_into=into)
    assert dx_into is into
    np.testing.assert_array_equal(_host(dx_into), before + want_dx)


def test_max_pool2d_int32_argmax_above_128_taps(triton_backend, rng):
    # 12x12 = 144 taps do not fit int8: the argmax is int32, as in the reference.
    x = rng.integers(-3, 0, (1, 5, 6, 3)).astype(np.float32)
    y, saved = _run(pool.max_pool2d, x, kernel_size=12, stride=1, padding=6)
    want_y, want_saved = _ref(ref.max_pool2d, x, kernel_size=12, stride=1, padding=6)
    np.testing.assert_array_equal(_host(y), want_y)
    assert _host(saved[0]).dtype == np.int32 == want_saved[0].dtype
    np.testing.assert_array_equal(_host(saved[0]), want_saved[0])
    dy = _signed_integers(rng, want_y.shape)
    (dx,) = pool.max_pool2d_backward(backend.asarray(dy), saved)
    # Exact up to 144 terms of at most 8 in size: every partial sum is an integer below 2**24.
    np.testing.assert_array_equal(_host(dx), ref.max_pool2d_backward(dy.astype(np.float64), want_saved)[0])


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_max_pool2d_all_minus_inf_windows_keep_their_gradient(triton_backend, rng, geometry):
    # -inf in half the places and in a whole corner: windows of nothing but -inf tie with the
    # padding, and must point at their first input (the backward drops what lands on padding).
    kernel_size, stride, padding, ceil_mode = geometry
    x = rng.standard_normal((2, 7, 9, 5)).astype(np.float32)
    x[rng.random(x.shape) < 0.5] = -np.inf
    x[:, :4, :4] = -np.inf
    y, saved = _run(pool.max_pool2d, x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)
    want_y, want_saved = _ref(ref.max_pool2d, x, kernel_size, stride, padding, ceil_mode)
    np.testing.assert_array_equal(_host(y), want_y)
    np.testing.assert_array_equal(_host(saved[0]), want_saved[0])
    dy = _signed_integers(rng, want_y.shape)
    (dx,) = pool.max_pool2d_backward(backend.asarray(dy), saved)
    np.testing.assert_array_equal(_host(dx), ref.max_pool2d_backward(dy.astype(np.float64), want_saved)[0])
    # Exact integer sums: every window's gradient reaches an input.
    np.testing.assert_array_equal(_host(dx).sum(axis=(1, 2)), dy.sum(axis=(1, 2)))


def test_max_pool2d_propagates_nan(triton_backend, rng):
    # A NaN is the max of every window holding it, and the argmax points at the first NaN (as
    # in PyTorch), so the gradient reaches the input that made it.
    x = rng.standard_normal((1, 5, 5, 3)).astype(np.float32)
    x[0, 2, 2, 1] = x[0, 2, 3, 1] = np.nan
    y, saved = _run(pool.max_pool2d, x, kernel_size=3, stride=1, padding=1)
    want_y, _ = _ref(ref.max_pool2d, x, kernel_size=3, stride=1, padding=1)
    np.testing.assert_array_equal(_host(y), want_y)        # NaNs in the same places
    # (The reference's argmax is unspecified for NaN windows: it matches taps equal to the max.)
    argmax = _host(saved[0])
    for oh in (1, 2, 3):    # the windows holding x[2, 2] (columns 2 and 3 hold x[2, 3] too)
        for ow in (1, 2, 3):
            assert argmax[0, oh, ow, 1] == (3 - oh) * 3 + (3 - ow)   # tap of (2, 2) in the window


# --------------------------------------------------------------------------- global average pooling

# H*W below, at and above one tile of positions (16 rows at 64 channels, 256 at 4), and H = W = 1.
@pytest.mark.parametrize("shape", [(1, 7, 9, 67), (3, 5, 3, 3), (2, 1, 1, 5), (2, 4, 4, 64)])
def test_global_avg_pool(triton_backend, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    y, saved = _run(pool.global_avg_pool, x)
    want_y, want_saved = _ref(ref.global_avg_pool, x)
    # A float32 sum of at most 63 values of size ~1 (per-lane partial sums, then a tree), divided
    # once: errors of a few float32 ulps of the sum.
    np.testing.assert_allclose(_host(y), want_y, rtol=1e-6, atol=1e-6)

    dy = rng.standard_normal(want_y.shape).astype(np.float32)
    (dx,) = pool.global_avg_pool_backward(backend.asarray(dy), saved)
    (want_dx,) = ref.global_avg_pool_backward(dy.astype(np.float64), want_saved)
    # Exact: one correctly rounded float32 division of float32 values equals the float64
    # quotient rounded to float32.
    np.testing.assert_array_equal(_host(dx), want_dx.astype(np.float32))


# --------------------------------------------------------------------------- bilinear resize

RESIZES = [
    ((1, 4, 4, 5), (8, 8)),      # the network's 2x upsamples, small C
    ((2, 8, 8, 3), (16, 16)),
    ((1, 16, 16, 3), (32, 32)),
    ((2, 5, 7, 67), (9, 13)),    # non-integer factors, two channel blocks
    ((1, 9, 13, 5), (5, 7)),     # downsizing
    ((2, 5, 7, 3), (1, 1)),      # one output pixel: src = 0
    ((1, 1, 1, 5), (4, 3)),      # one input pixel: every output reads it
    ((1, 3, 4, 5), (7, 2)),      # up in H, down in W
]


@pytest.mark.parametrize("with_skip", [False, True], ids=["no_skip", "skip"])
@pytest.mark.parametrize("shape,size", RESIZES, ids=[f"{s[1]}x{s[2]}->{o[0]}x{o[1]}" for s, o in RESIZES])
def test_upsample_bilinear(triton_backend, rng, shape, size, with_skip):
    x = rng.standard_normal(shape).astype(np.float32)
    skip = rng.standard_normal((shape[0], *size, shape[3])).astype(np.float32) if with_skip else None
    y, saved = _run(resize.upsample_bilinear, x, size, skip)
    want_y, want_saved = _ref(ref.upsample_bilinear, x, size, skip)
    # Each output is a convex combination of 4 inputs (+ skip): a few float32 roundings of values
    # of size ~1. A wrong source index or weight is off by far more.
    np.testing.assert_allclose(_host(y), want_y, rtol=1e-6, atol=2e-6)

    dy = rng.standard_normal(want_y.shape).astype(np.float32)
    dy_backend = backend.asarray(dy)
    dx, dskip = resize.upsample_bilinear_backward(dy_backend, saved)
    want_dx, _ = ref.upsample_bilinear_backward(dy.astype(np.float64), want_saved)
    # Each dx element sums weighted dy over up to 5 x 5 outputs (12 for the 1-pixel input):
    # float32 rounding grows with that count and with the size of the sum.
    np.testing.assert_allclose(_host(dx), want_dx, rtol=1e-5, atol=1e-5)
    if with_skip:
        assert dskip is dy_backend  # the skip add's gradient is dy itself, not a copy
    else:
        assert dskip is None


# --------------------------------------------------------------------------- through the op layer

def test_ops_through_functional(triton_backend, rng):
    # Through ra_kernels.functional: a small pool -> upsample + skip -> pool -> mean graph, on
    # the numpy backend and on this one, agrees in output and every input gradient.
    x_np = rng.standard_normal((2, 9, 9, 5)).astype(np.float32)
    skip_np = rng.standard_normal((2, 9, 9, 5)).astype(np.float32)
    results = []
    for name in ("numpy", triton_backend):
        with backend.use_backend(name):
            x, skip = (Tensor(backend.asarray(a), requires_grad=True) for a in (x_np, skip_np))
            low = F.max_pool2d(x)                                   # 9x9 -> 5x5
            up = F.upsample_bilinear(low, (9, 9), skip=skip)        # 5x5 -> 9x9, + skip
            y = F.global_avg_pool(F.max_pool2d(up, kernel_size=3, stride=1, padding=1))
            y.backward(backend.asarray(np.ones(y.data.shape, np.float32)))
            results.append([_host(a) for a in (y.data, x.grad, skip.grad)])
    # float32 on both paths, different summation orders: a few ulps of values of size ~1.
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bfloat16 storage (issue 14)

BF16_U, F32_U = backend.BFLOAT16_ROUNDOFF, 2.0 ** -24  # unit roundoffs: one rounding is off by <= u relative


def _bf16(a):
    return backend.asarray(a.astype(backend.BFLOAT16))


def _within(got, want, bound, what):
    got = _host(got).astype(np.float64)
    assert got.shape == want.shape and (np.abs(got - want) <= bound).all(), \
        f"{what}: worst {np.abs(got - want).max():.3e} " \
        f"(bound there {np.broadcast_to(bound, want.shape).flat[np.argmax(np.abs(got - want))]:.3e})"


@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 3, 0)])
def test_max_pool2d_in_bfloat16(triton_backend, rng, geometry):
    # A max selects a value and its gradient sums small integers (exact in float32 and, up to 256,
    # in bfloat16): the bf16 kernels must agree exactly with the reference on the same values.
    kernel_size, stride, padding = geometry
    x = rng.standard_normal((2, 7, 9, 67)).astype(backend.BFLOAT16)
    y, saved = pool.max_pool2d(_bf16(x), kernel_size, stride, padding)
    want_y, want_saved = ref.max_pool2d(x.astype(np.float64), kernel_size, stride, padding)
    assert y.dtype == backend.BFLOAT16
    np.testing.assert_array_equal(_host(y).astype(np.float64), want_y)
    np.testing.assert_array_equal(_host(saved[0]), want_saved[0])
    dy = _signed_integers(rng, want_y.shape)
    (dx,) = pool.max_pool2d_backward(_bf16(dy), saved)
    (want_dx,) = ref.max_pool2d_backward(dy.astype(np.float64), want_saved)
    assert dx.dtype == backend.BFLOAT16
    np.testing.assert_array_equal(_host(dx).astype(np.float64), want_dx)


@pytest.mark.parametrize("shape", [(1, 7, 9, 67), (2, 4, 4, 64)])
def test_global_avg_pool_in_bfloat16(triton_backend, rng, shape):
    # Summed in float32 (n_hw terms: at most n_hw roundings of the running sum), divided once in
    # float32, then rounded once to bfloat16: <= BF16_U of the mean plus the float32 part.
    x = rng.standard_normal(shape).astype(backend.BFLOAT16)
    x64 = x.astype(np.float64)
    y, saved = pool.global_avg_pool(_bf16(x))
    want_y = x64.mean((1, 2))
    n_hw = shape[1] * shape[2]
    float32_part = (n_hw + 1) * F32_U * np.abs(x64).sum((1, 2)) / n_hw
    _within(y, want_y, BF16_U * (np.abs(want_y) + float32_part) + float32_part, "y")
    dy = rng.standard_normal(want_y.shape).astype(backend.BFLOAT16)
    (dx,) = pool.global_avg_pool_backward(_bf16(dy), saved)
    want_dx = np.broadcast_to((dy.astype(np.float64) / n_hw)[:, None, None, :], shape)
    _within(dx, want_dx, (BF16_U + 2 * F32_U) * np.abs(want_dx), "dx")


@pytest.mark.parametrize("with_skip", [False, True], ids=["no_skip", "skip"])
def test_upsample_bilinear_in_bfloat16(triton_backend, rng, with_skip):
    # Computed in float32 as for float32 storage (a few float32 roundings of values of size ~1: the
    # 4e-6 of test_upsample_bilinear), then rounded once to bfloat16.
    shape, size = (2, 5, 7, 67), (9, 13)
    x = rng.standard_normal(shape).astype(backend.BFLOAT16)
    skip = rng.standard_normal((shape[0], *size, shape[3])).astype(backend.BFLOAT16) if with_skip else None
    y, saved = resize.upsample_bilinear(_bf16(x), size, None if skip is None else _bf16(skip))
    want_y, want_saved = ref.upsample_bilinear(x.astype(np.float64), size,
                                               None if skip is None else skip.astype(np.float64))
    assert y.dtype == backend.BFLOAT16
    _within(y, want_y, BF16_U * (np.abs(want_y) + 4e-6) + 4e-6, "y")
    dy = rng.standard_normal(want_y.shape).astype(backend.BFLOAT16)
    dx, _ = resize.upsample_bilinear_backward(_bf16(dy), saved)
    want_dx, _ = ref.upsample_bilinear_backward(dy.astype(np.float64), want_saved)
    _within(dx, want_dx, BF16_U * (np.abs(want_dx) + 2e-5) + 2e-5, "dx")
