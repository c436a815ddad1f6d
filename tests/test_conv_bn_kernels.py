"""conv2d, batch_norm and conv_bn_relu kernels (interpret backend; cuda too on a GPU) against reference/.

Every kernel output and gradient is compared with reference/ run in float64 on
the same float32 values. Outputs are NaN-poisoned before each kernel runs
(conftest, through backend.empty), so an element a kernel fails to write fails.

Error measure: max |kernel - reference| / max |reference| per array, scale-aware
so that near-zero entries do not dominate. Tolerances:

* IEEE float32 (every test but the TF32 one): 1e-5. Each output is a float32
  dot product or a batch reduction of at most a few thousand terms: rounding of
  ~6e-8 per operation grows to ~1e-7..1e-6 (seen: below 1e-6), and batch norm's
  backward subtracts per-channel means (g - mean(g) - xhat * mean(g * xhat)),
  which costs another small factor. 1e-5 keeps that margin and still catches any
  wrong term, a missing mask or an unwritten tile.
* TF32 (the default on the GPU): 2e-3. TF32 keeps 10 mantissa bits, so each
  matrix-product input is rounded by up to 2**-11 = 4.9e-4 relative; over a dot
  product these errors partly average out, giving ~5e-4 of the largest output.
  On the interpreter tl.dot is exact float32, so there this test checks the
  plumbing; on a GPU it checks the TF32 path itself.

The ReLU mask is decided by the sign of the pre-activation; where the reference
pre-activation lies within a band of 0, float32 (or TF32) may decide it the
other way, and the backward would differ by a whole dy element. The tests zero
dy there (``_kink_free_dy``): the mask still matters everywhere else, where a
dropped or wrong mask fails the comparison.
"""
import numpy as np
import pytest

import reference as ref
from ra_kernels import backend
from ra_kernels import functional as F
from ra_kernels.kernels import batchnorm, conv, elementwise

IEEE_RTOL = 1e-5
BF16_U, F32_U = backend.BFLOAT16_ROUNDOFF, 2.0 ** -24  # unit roundoffs: one rounding is off by <= u relative
# Values near 100 with std 1: float32 holds their mean only to its spacing at 100,
# 7.6e-6 of the std (seen: ~2e-5 after the tile sums), an offset every xhat carries
# whatever the method; y passes it on and dgamma = sum(dy * xhat) collects it, so
# those are held to 1e-4 there. The statistics themselves keep IEEE_RTOL.
LARGE_MEAN_RTOL = 1e-4
TF32_RTOL = 2e-3
# Bands around the ReLU kink, well above each precision's error on the pre-activation (~1e-6 / ~1e-3).
IEEE_KINK_BAND = 1e-3
TF32_KINK_BAND = 3e-2


def relative_error(actual, expected):
    actual, expected = np.asarray(backend.to_numpy(actual), np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def assert_close(name, actual, expected, rtol):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    error = relative_error(actual, expected)
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:.1g}"


def f32(rng, shape, scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


def bn_params(rng, channels):
    """gamma (either sign, |gamma| >= 0.5), beta, running_mean, running_var > 0, float32."""
    gamma = rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels)
    return tuple(a.astype(np.float32) for a in (gamma, 0.5 * rng.standard_normal(channels),
                                                 0.5 * rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)))


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def on_backend(*arrays):
    return [backend.asarray(a) for a in arrays]


def _gradient_buffers(rng, shapes, into):
    """Gradient buffers already holding values (a gradient being accumulated), for the backwards'
    ``*_into`` options; None each without ``into``."""
    return [f32(rng, shape) if into else None for shape in shapes]


def assert_added_into(name, got, buffer, before, want, rtol):
    """The backward returned ``buffer`` itself, now ``before`` + the gradient."""
    assert got is buffer, f"{name}: the gradient must be added into the buffer given and returned"
    assert_close(name, backend.to_numpy(got) - before, want, rtol)


def assert_counters_released():
    """Every arrival counter is back at 0 (batchnorm.last_to_arrive), ready for the next launch."""
    assert not backend.to_numpy(batchnorm.arrival_counters(1)).any()


def _kink_free_dy(rng, preactivation, band):
    """A random dy, zero where the reference pre-activation lies within ``band`` of the ReLU's kink."""
    dy = f32(rng, preactivation.shape)
    dy[np.abs(preactivation) < band] = 0.0
    return dy


# --------------------------------------------------------------------------- conv2d

# (x shape NHWC, w shape HWIO, stride, padding): every conv shape class of the network
# and the edges: the stem's Cin = 3 (K = 27: below one BLOCK_K of 32 and not a multiple
# of 16), batch 1, odd H and W, Cout that is not a multiple of any block (20, 40, 130:
# the last spans two 128-channel tiles), 1x1 stride 2, 3x3 stride 2 on an odd input
# (K = 180 straddles taps inside a K block), enough positions (512) for the weight
# gradient to split its reduction over four programs (summed by the last), and the
# widest layer class (Cin = 1024: a K loop of 32 blocks; Cout = 1000: eight channel tiles); the
# ImageNet stem (7x7 stride 2 padding 3 on 3 channels: K = 147, taps past every border) and a
# 2048-channel 1x1 conv on a 7x7 map (the ImageNet tail: K = 2048, 64 blocks).
CONV_SHAPES = [
    ((2, 7, 9, 3), (3, 3, 3, 20), 1, 1),
    ((1, 8, 7, 16), (1, 1, 16, 24), 2, 0),
    ((2, 9, 9, 20), (3, 3, 20, 16), 2, 1),
    ((2, 16, 16, 24), (1, 1, 24, 40), 1, 0),
    ((1, 5, 6, 8), (3, 3, 8, 130), 1, 1),
    ((1, 3, 2, 1024), (1, 1, 1024, 1000), 1, 0),
    ((2, 13, 11, 3), (7, 7, 3, 16), 2, 3),
    ((1, 7, 7, 2048), (1, 1, 2048, 24), 1, 0),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [CONV_SHAPES[0], CONV_SHAPES[3]])
def test_conv2d_weight_gradient_added_into_a_buffer(triton_backend, rng, x_shape, w_shape, stride, padding):
    # The optimizer's flat gradient buffer: dw is added into it by the last kernel (one split, and
    # a split reduction whose last program adds), and nothing else changes.
    x, w = f32(rng, x_shape), f32(rng, w_shape)
    y, saved = conv.conv2d(*on_backend(x, w), stride, padding)
    _, saved_ref = ref.conv2d(*f64(x, w), stride, padding)
    dy = f32(rng, y.shape)
    before = f32(rng, w_shape)
    buffer = backend.asarray(before.copy())
    dx, dw = conv.conv2d_backward(backend.asarray(dy), saved, dw_into=buffer)
    dx_ref, dw_ref = ref.conv2d_backward(*f64(dy), saved_ref)
    assert_close("dx", dx, dx_ref, IEEE_RTOL)
    assert_added_into("dw", dw, buffer, before, dw_ref, IEEE_RTOL)
    assert_counters_released()


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_SHAPES)
def test_conv2d_forward_backward(triton_backend, rng, x_shape, w_shape, stride, padding):
    x, w = f32(rng, x_shape), f32(rng, w_shape)
    y, saved = conv.conv2d(*on_backend(x, w), stride, padding)
    y_ref, saved_ref = ref.conv2d(*f64(x, w), stride, padding)
    assert_close("y", y, y_ref, IEEE_RTOL)
    dy = f32(rng, y_ref.shape)
    dx, dw = conv.conv2d_backward(backend.asarray(dy), saved)
    dx_ref, dw_ref = ref.conv2d_backward(*f64(dy), saved_ref)
    assert_close("dx", dx, dx_ref, IEEE_RTOL)
    assert_close("dw", dw, dw_ref, IEEE_RTOL)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [CONV_SHAPES[0], CONV_SHAPES[2]])
def test_conv2d_in_bfloat16(triton_backend, rng, x_shape, w_shape, stride, padding):
    """bfloat16 x and dy, float32 w (the master weights), rounded to bfloat16 as the kernels load it:
    the products are those of bfloat16 operands, exact in float32, summed in float32. Against
    float64 from the same operands (x, dy and w rounded to bfloat16), each element is off by the
    float32 sums, at most K roundings of the running sum (K = the GEMM's reduction length) times
    the sum of |products|, plus one rounding to bfloat16 for y and dx (BF16_U of the value); dw
    is float32. A kernel that truncated w instead, or multiplied in float32, is off by ~2**-9 of
    the sum of |products|, far above that."""
    x = f32(rng, x_shape).astype(backend.BFLOAT16)
    w = f32(rng, w_shape)
    x64, w64 = x.astype(np.float64), w.astype(backend.BFLOAT16).astype(np.float64)
    y, saved = conv.conv2d(backend.asarray(x), backend.asarray(w), stride, padding)
    y_ref, saved_ref = ref.conv2d(x64, w64, stride, padding)
    magnitude = ref.conv2d(np.abs(x64), np.abs(w64), stride, padding)[0]
    k_fwd = w_shape[0] * w_shape[1] * w_shape[2]
    _within_bound("y", y, y_ref, BF16_U * np.abs(y_ref) + k_fwd * F32_U * magnitude, backend.BFLOAT16)

    dy = f32(rng, y_ref.shape).astype(backend.BFLOAT16)
    dy64 = dy.astype(np.float64)
    dx, dw = conv.conv2d_backward(backend.asarray(dy), saved)
    dx_ref, dw_ref = ref.conv2d_backward(dy64, saved_ref)
    dx_magnitude, dw_magnitude = ref.conv2d_backward(np.abs(dy64), (np.abs(x64), np.abs(w64), stride, padding))
    k_dgrad = w_shape[0] * w_shape[1] * w_shape[3]
    positions = y_ref.shape[0] * y_ref.shape[1] * y_ref.shape[2]
    _within_bound("dx", dx, dx_ref, BF16_U * np.abs(dx_ref) + k_dgrad * F32_U * dx_magnitude, backend.BFLOAT16)
    _within_bound("dw", dw, dw_ref, positions * F32_U * dw_magnitude, np.float32)


# --------------------------------------------------------------------------- conv_bn_relu

def _check_conv_bn_relu(rng, x_shape, w_shape, stride, padding, training, relu, rtol, band, x_offset=0.0,
                        into=False):
    x, w = f32(rng, x_shape, offset=x_offset), f32(rng, w_shape)
    gamma, beta, running_mean, running_var = bn_params(rng, w_shape[-1])
    ref_args = (*f64(x, w, gamma, beta, running_mean, running_var), stride, padding, training, 0.1, 1e-5)
    y_ref, mean_ref, var_ref, saved_ref = ref.conv_bn_relu(*ref_args, relu=relu)
    preactivation = ref.conv_bn_relu(*ref_args, relu=False)[0]

    args = on_backend(x, w, gamma, beta, running_mean, running_var)
    y, new_mean, new_var, saved = conv.conv_bn_relu(*args, stride, padding, training, 0.1, 1e-5, relu)
    assert new_mean is args[4] and new_var is args[5], "the running arrays are updated in place and returned"
    assert_close("y", y, y_ref, rtol)
    assert_close("running_mean", new_mean, mean_ref, rtol)
    assert_close("running_var", new_var, var_ref, rtol)

    dy = _kink_free_dy(rng, preactivation, band) if relu else f32(rng, y_ref.shape)
    before = _gradient_buffers(rng, (w_shape, w_shape[-1:], w_shape[-1:]), into)
    buffers = [None if b is None else backend.asarray(b.copy()) for b in before]
    grads = conv.conv_bn_relu_backward(backend.asarray(dy), saved, True, *buffers)
    grads_ref = ref.conv_bn_relu_backward(*f64(dy), saved_ref)
    assert_close("dx", grads[0], grads_ref[0], rtol)
    for name, got, want, buffer, old in zip(("dw", "dgamma", "dbeta"), grads[1:], grads_ref[1:], buffers, before):
        if into:
            assert_added_into(name, got, buffer, old, want, rtol)
        else:
            assert_close(name, got, want, rtol)
    assert_counters_released()


def test_conv_bn_relu_in_bfloat16(triton_backend, rng):
    """Training, bfloat16 x and dy. The kernels store z in bfloat16 and take the batch-norm
    statistics of that stored z, so each stage is checked against float64 from the kernel's own
    input to it: z against the conv of the same operands (float32 sums plus one bfloat16 rounding,
    as test_conv2d_in_bfloat16), y and the statistics against batch norm of the stored z (one
    bfloat16 rounding of y plus the float32 bound), dx and dw against the conv backward of
    float64 dz: dz enters the products rounded to bfloat16 (<= BF16_U of each product's size,
    the |dz| (*) |w| term) besides the float32 sums; dgamma and dbeta are float32 sums."""
    x_shape, w_shape, stride, padding = (2, 9, 9, 20), (3, 3, 20, 16), 2, 1
    x = f32(rng, x_shape).astype(backend.BFLOAT16)
    w = f32(rng, w_shape)
    gamma, beta, running_mean, running_var = bn_params(rng, w_shape[-1])
    x64, w64 = x.astype(np.float64), w.astype(backend.BFLOAT16).astype(np.float64)
    bn_args = (*f64(gamma, beta, running_mean, running_var), True, 0.1, 1e-5)  # before the kernels update them
    args = on_backend(x, w, gamma, beta, running_mean, running_var)
    y, new_mean, new_var, saved = conv.conv_bn_relu(*args, stride, padding, True, 0.1, 1e-5, True)
    z = backend.to_numpy(saved[4]).astype(np.float64)  # kernels/conv.py saves (x, w, stride, padding, z, ...)
    z_ref = ref.conv2d(x64, w64, stride, padding)[0]
    k_fwd = w_shape[0] * w_shape[1] * w_shape[2]
    _within_bound("z", saved[4], z_ref, BF16_U * np.abs(z_ref)
                  + k_fwd * F32_U * ref.conv2d(np.abs(x64), np.abs(w64), stride, padding)[0], backend.BFLOAT16)
    y_ref, mean_ref, var_ref, bn_saved = ref.batch_norm(z, *bn_args, relu=True)
    _within_bf16("y", y, y_ref, IEEE_RTOL)
    assert_close("running_mean", new_mean, mean_ref, IEEE_RTOL)
    assert_close("running_var", new_var, var_ref, IEEE_RTOL)

    dy = _kink_free_dy(rng, ref.batch_norm(z, *bn_args, relu=False)[0], IEEE_KINK_BAND).astype(backend.BFLOAT16)
    dx, dw, dgamma, dbeta = conv.conv_bn_relu_backward(backend.asarray(dy), saved)
    dz, dgamma_ref, dbeta_ref = ref.batch_norm_backward(dy.astype(np.float64), bn_saved)
    dx_ref, dw_ref = ref.conv2d_backward(dz, (x64, w64, stride, padding))
    dx_size, dw_size = ref.conv2d_backward(np.abs(dz), (np.abs(x64), np.abs(w64), stride, padding))
    k_dgrad, positions = w_shape[0] * w_shape[1] * w_shape[3], z.shape[0] * z.shape[1] * z.shape[2]
    dz_scale = IEEE_RTOL * np.abs(dz).max()  # dz itself: the float32 batch-norm backward's bound
    _within_bound("dx", dx, dx_ref, BF16_U * np.abs(dx_ref) + (BF16_U + k_dgrad * F32_U) * dx_size
                  + k_dgrad * dz_scale * np.abs(w64).max(), backend.BFLOAT16)
    _within_bound("dw", dw, dw_ref, (BF16_U + positions * F32_U) * dw_size
                  + positions * dz_scale * np.abs(x64).max(), np.float32)
    assert_close("dgamma", dgamma, dgamma_ref, IEEE_RTOL)
    assert_close("dbeta", dbeta, dbeta_ref, IEEE_RTOL)
    assert_counters_released()


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((2, 7, 9, 3), (3, 3, 3, 20), 1, 1),     # the stem: Cin = 3, odd H and W, Cout = 20
    ((1, 9, 7, 12), (3, 3, 12, 24), 2, 1),   # batch 1, 3x3 stride 2 on an odd input
])
def test_conv_bn_relu(triton_backend, rng, x_shape, w_shape, stride, padding, training, relu):
    _check_conv_bn_relu(rng, x_shape, w_shape, stride, padding, training, relu, IEEE_RTOL, IEEE_KINK_BAND)


@pytest.mark.parametrize("into", [False, True], ids=["new", "into_buffers"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_conv_bn_relu_1x1_stride_2_with_split_weight_gradient(triton_backend, rng, training, into):
    # 1x1 stride 2 on an odd 23x23 input: 2x12x12 = 288 output positions, enough for the
    # weight gradient to run three splits, summed by the last of them. "into_buffers": dw, dgamma
    # and dbeta are added into gradient buffers (the optimizer's flat buffer).
    _check_conv_bn_relu(rng, (2, 23, 23, 16), (1, 1, 16, 36), 2, 0, training, True, IEEE_RTOL, IEEE_KINK_BAND,
                        into=into)


def test_conv_bn_relu_statistics_over_many_tiles(triton_backend, rng):
    # 2,170 positions: 34 tiles of 64 rows in the conv epilogue's statistics (the last
    # partial), merged by the last program in two chunks of 32; inputs with mean 3
    # give the conv output a mean well away from 0.
    _check_conv_bn_relu(rng, (2, 31, 35, 4), (3, 3, 4, 16), 1, 1, True, True, IEEE_RTOL, IEEE_KINK_BAND,
                        x_offset=3.0)


def test_conv_bn_relu_tf32(triton_backend, rng):
    with backend.use_precision("tf32"):
        _check_conv_bn_relu(rng, (2, 8, 8, 16), (3, 3, 16, 24), 1, 1, True, True, TF32_RTOL, TF32_KINK_BAND)


def test_conv_bn_relu_training_needs_two_values_per_channel(triton_backend, rng):
    x, w = on_backend(f32(rng, (1, 1, 1, 3)), f32(rng, (1, 1, 3, 4)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv.conv_bn_relu(x, w, *on_backend(*bn_params(rng, 4)))


# --------------------------------------------------------------------------- batch_norm

def _check_batch_norm(rng, x, training, relu, momentum=0.1, rtol=IEEE_RTOL, into=False):
    gamma, beta, running_mean, running_var = bn_params(rng, x.shape[-1])
    ref_args = (*f64(x, gamma, beta, running_mean, running_var), training, momentum, 1e-5)
    y_ref, mean_ref, var_ref, saved_ref = ref.batch_norm(*ref_args, relu=relu)
    preactivation = ref.batch_norm(*ref_args, relu=False)[0]

    args = on_backend(x, gamma, beta, running_mean, running_var)
    y, new_mean, new_var, saved = batchnorm.batch_norm(*args, training, momentum, 1e-5, relu)
    assert new_mean is args[3] and new_var is args[4], "the running arrays are updated in place and returned"
    assert_close("y", y, y_ref, rtol)
    assert_close("running_mean", new_mean, mean_ref, IEEE_RTOL)
    assert_close("running_var", new_var, var_ref, IEEE_RTOL)

    dy = _kink_free_dy(rng, preactivation, IEEE_KINK_BAND) if relu else f32(rng, x.shape)
    before = _gradient_buffers(rng, (x.shape[-1:], x.shape[-1:]), into)
    buffers = [None if b is None else backend.asarray(b.copy()) for b in before]
    grads = batchnorm.batch_norm_backward(backend.asarray(dy), saved, *buffers)
    grads_ref = ref.batch_norm_backward(*f64(dy), saved_ref)
    assert_close("dx", grads[0], grads_ref[0], rtol)
    for name, got, want, buffer, old in zip(("dgamma", "dbeta"), grads[1:], grads_ref[1:], buffers, before):
        if into:
            assert_added_into(name, got, buffer, old, want, rtol)
        else:
            assert_close(name, got, want, rtol)
    assert_counters_released()


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape", [
    (1, 7, 9, 5),     # batch 1, odd H and W, 5 channels (one partial channel block)
    (3, 5, 7, 70),    # 70 channels: two channel blocks of 64, the second partial
])
def test_batch_norm(triton_backend, rng, shape, training, relu):
    _check_batch_norm(rng, f32(rng, shape, scale=2.0, offset=1.0), training, relu)


def _within_bound(name, actual, expected, bound, dtype):
    """Each element of ``actual`` (stored as ``dtype``) within ``bound`` of float64 ``expected``."""
    actual = backend.to_numpy(actual)
    assert actual.dtype == dtype, f"{name}: stored as {actual.dtype}, not {np.dtype(dtype)}"
    error = np.abs(actual.astype(np.float64) - expected)
    assert (error <= bound).all(), f"{name}: error {error.max():.3g}, bound there {bound.flat[np.argmax(error)]:.3g}"


def _within_bf16(name, actual, expected, rtol):
    """A bfloat16 result: the float32 computation's error (``rtol`` of the largest value, as for
    float32 storage) plus one rounding to bfloat16 (BF16_U of each value)."""
    _within_bound(name, actual, expected, BF16_U * np.abs(expected) + rtol * np.abs(expected).max(),
                  backend.BFLOAT16)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_batch_norm_in_bfloat16(triton_backend, rng, training):
    # bfloat16 x and dy, statistics and sums in float32: against float64 from the same bfloat16
    # values, y and dx within one bfloat16 rounding plus the float32 bound; the statistics, the
    # running statistics, dgamma and dbeta (float32) within the float32 bound.
    x = f32(rng, (3, 5, 7, 70), scale=2.0, offset=1.0).astype(backend.BFLOAT16)
    gamma, beta, running_mean, running_var = bn_params(rng, 70)
    ref_args = (*f64(x, gamma, beta, running_mean, running_var), training, 0.1, 1e-5)
    y_ref, mean_ref, var_ref, saved_ref = ref.batch_norm(*ref_args, relu=True)
    args = on_backend(x, gamma, beta, running_mean, running_var)
    y, new_mean, new_var, saved = batchnorm.batch_norm(*args, training, 0.1, 1e-5, True)
    _within_bf16("y", y, y_ref, IEEE_RTOL)
    assert_close("running_mean", new_mean, mean_ref, IEEE_RTOL)
    assert_close("running_var", new_var, var_ref, IEEE_RTOL)
    dy = _kink_free_dy(rng, ref.batch_norm(*ref_args, relu=False)[0], IEEE_KINK_BAND).astype(backend.BFLOAT16)
    dx, dgamma, dbeta = batchnorm.batch_norm_backward(backend.asarray(dy), saved)
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_norm_backward(dy.astype(np.float64), saved_ref)
    _within_bf16("dx", dx, dx_ref, IEEE_RTOL)
    assert_close("dgamma", dgamma, dgamma_ref, IEEE_RTOL)
    assert_close("dbeta", dbeta, dbeta_ref, IEEE_RTOL)
    assert_counters_released()


def test_batch_norm_gradients_added_into_buffers(triton_backend, rng):
    _check_batch_norm(rng, f32(rng, (3, 5, 7, 70), scale=2.0, offset=1.0), True, True, into=True)


def test_batch_norm_statistics_survive_a_large_mean(triton_backend, rng):
    # Mean 100, std 1, over N*H*W = 16,335 values per channel: 64 row tiles of 256
    # (the last partial), merged by the last program in two chunks of 32. momentum = 1
    # makes the running statistics the batch mean and unbiased variance, checked directly.
    x = f32(rng, (15, 33, 33, 16), scale=1.0, offset=100.0)
    _check_batch_norm(rng, x, training=True, relu=False, momentum=1.0, rtol=LARGE_MEAN_RTOL)
    # The naive float32 formula E[x^2] - E[x]^2 would fail here: E[x^2] = 10001 has a
    # float32 spacing of 1e-3, already 1e-3 of the variance, and its sum over 16,335
    # terms loses more; here (with NumPy's pairwise sums, kinder than a GPU's) it is
    # typically off by a few 1e-2 in the variance, three orders above the tolerance.
    count = np.float32(x.size // x.shape[-1])
    mean = x.sum((0, 1, 2), dtype=np.float32) / count
    naive_var = (x * x).sum((0, 1, 2), dtype=np.float32) / count - mean * mean
    assert relative_error(naive_var, x.astype(np.float64).var((0, 1, 2))) > 100 * IEEE_RTOL


def test_batch_norm_training_needs_two_values_per_channel(triton_backend, rng):
    # Checked in ra_kernels.functional, for every backend alike (the kernels divide by M - 1).
    with pytest.raises(ValueError, match="batch_norm: training needs more than 1 value per channel"):
        F.batch_norm(*on_backend(f32(rng, (1, 1, 1, 3)), *bn_params(rng, 3)))
    with pytest.raises(ValueError, match="conv_bn_relu: training needs more than 1 value per channel"):
        F.conv_bn_relu(*on_backend(f32(rng, (1, 3, 3, 2)), f32(rng, (3, 3, 2, 3)), *bn_params(rng, 3)))


# --------------------------------------------------------------------------- conv_chain

def _chain_inputs(rng, x_shape, w_shapes, strides, band, beta_offset=0.0, input_bn=False):
    """x, params, layers of a conv_chain (with the input's batch norm last in params when ``input_bn``),
    redrawn until no batch norm's pre-activation lies within ``band`` (relative to its largest) of the
    ReLU's kink: there float32 may take the other branch. Thousands of values per channel always have
    some near the kink; ``beta_offset`` then lifts the pre-activations (gamma * xhat + beta) clear of it."""
    layers = tuple((stride, shape[0] // 2) for shape, stride in zip(w_shapes, strides))
    n = len(w_shapes)
    while True:
        x, params = f32(rng, x_shape), []
        for i, shape in enumerate(w_shapes + ([(1, 1, 1, x_shape[-1])] if input_bn else [])):
            if i < n:
                params.append(f32(rng, shape))
            if i != n - 1:
                gamma, beta, running_mean, running_var = bn_params(rng, shape[-1])
                params += [gamma, beta + np.float32(beta_offset), running_mean, running_var]
        h, pre_activations = np.float64(x), []
        if input_bn:
            pre_activations.append(ref.batch_norm(h, *f64(*params[5 * n - 4:]), True, relu=False)[0])
            h = ref.batch_norm(h, *f64(*params[5 * n - 4:]), True, relu=True)[0]
        for i, (stride, padding) in enumerate(layers[:-1]):
            args = (h, *f64(*params[5 * i:5 * i + 5]), stride, padding, True)
            pre_activations.append(ref.conv_bn_relu(*args, relu=False)[0])
            h = ref.conv_bn_relu(*args, relu=True)[0]
        if all(np.abs(pre).min() >= band * np.abs(pre).max() for pre in pre_activations):
            return x, params, layers


def test_conv_chain_in_bfloat16_agrees_with_its_ops(triton_backend, rng):
    """A whole pre-activation unit in bfloat16 (input batch norm, three convs, x added) against the
    same unit op by op on the bfloat16 kernels each tested above: batch_norm, conv_bn_relu twice,
    conv2d, add. The two paths round at the same points: an activation the chain makes as a conv
    loads it is rounded to bfloat16 for the product as the op-by-op path rounds it for storage,
    so z, the statistics and the ReLU masks agree bit for bit. They differ only where the chain
    rounds once (x added in the conv's epilogue, dy added to the input batch norm's dx) and the
    op-by-op path twice, <= BF16_U of the value, and in the float32 summation order of the batch
    norms' backward sums, which may move a dz across a bfloat16 rounding boundary (another
    BF16_U of a product's size, rarely). So each output within 2 BF16_U of its largest value
    plus the float32 bound; a wrong statistic, mask or operand is off by far more."""
    w_shapes, layers = [(1, 1, 12, 4), (3, 3, 4, 4), (1, 1, 4, 12)], ((1, 0), (1, 1), (1, 0))
    x = f32(rng, (2, 5, 6, 12)).astype(backend.BFLOAT16)
    params = []
    for i, shape in enumerate(w_shapes + [(1, 1, 1, 12)]):
        if i < 3:
            params.append(f32(rng, shape))
        if i != 2:
            params += list(bn_params(rng, shape[-1]))
    chain_args = on_backend(x, *[p.copy() for p in params])
    y, _, saved = conv.conv_chain(*chain_args, layers=layers, input_bn=True, residual=True)

    ops_args = on_backend(x, *[p.copy() for p in params])
    xb, (w1, g1, b1, m1, v1, w2, g2, b2, m2, v2, w3, g0, b0, m0, v0) = ops_args[0], ops_args[1:]
    a0, _, _, s0 = batchnorm.batch_norm(xb, g0, b0, m0, v0, True, 0.1, 1e-5, True)
    a1, _, _, s1 = conv.conv_bn_relu(a0, w1, g1, b1, m1, v1, 1, 0, True, 0.1, 1e-5, True)
    a2, _, _, s2 = conv.conv_bn_relu(a1, w2, g2, b2, m2, v2, 1, 1, True, 0.1, 1e-5, True)
    z3, s3 = conv.conv2d(a2, w3, 1, 0)
    y_ops, _ = elementwise.add(z3, xb)

    def agree(name, got, want):
        got, want = (backend.to_numpy(a).astype(np.float64) for a in (got, want))
        bound = (2 * BF16_U + IEEE_RTOL) * np.abs(want).max()
        assert np.abs(got - want).max() <= bound, f"{name}: {np.abs(got - want).max():.3g} > {bound:.3g}"

    agree("y", y, y_ops)
    for j in (0, 1, 2):  # running statistics: chain_args and ops_args hold them at the same places
        agree(f"running_mean {j}", chain_args[5 * j + 4], ops_args[5 * j + 4])
        agree(f"running_var {j}", chain_args[5 * j + 5], ops_args[5 * j + 5])

    dy = backend.asarray(f32(rng, y.shape).astype(backend.BFLOAT16))
    dx, *grads, _ = conv.conv_chain_backward(dy, saved)
    dz3, dw3 = conv.conv2d_backward(dy, s3)
    da1, dw2, dg2, db2 = conv.conv_bn_relu_backward(dz3, s2)
    da0, dw1, dg1, db1 = conv.conv_bn_relu_backward(da1, s1)
    dx0, dg0, db0 = batchnorm.batch_norm_backward(da0, s0)
    dx_ops, _ = elementwise.add(dx0, dy)
    agree("dx", dx, dx_ops)
    for name, j, want in (("dw1", 0, dw1), ("dgamma1", 1, dg1), ("dbeta1", 2, db1), ("dw2", 5, dw2),
                          ("dgamma2", 6, dg2), ("dbeta2", 7, db2), ("dw3", 10, dw3), ("dgamma0", 11, dg0),
                          ("dbeta0", 12, db0)):
        agree(name, grads[j], want)
    assert_counters_released()


@pytest.mark.parametrize("into", [False, True], ids=["new", "into_buffers"])
@pytest.mark.parametrize("x_shape, w_shapes, strides, need_dx, beta_offset, shortcut, input_bn", [
    # the residual unit's branch: 1x1, 3x3 stride 2 on an odd input, 1x1; channels off every block
    ((2, 9, 7, 20), [(1, 1, 20, 6), (3, 3, 6, 6), (1, 1, 6, 24)], (1, 2, 1), True, 0.0, None, False),
    # the same with its shortcut added in the last conv's epilogue
    ((2, 9, 7, 20), [(1, 1, 20, 6), (3, 3, 6, 6), (1, 1, 6, 24)], (1, 2, 1), True, 0.0, "skip", False),
    # a whole pre-activation unit: the input's batch norm applied as conv 1 loads, x added at the end
    # (60 values per channel: a kink-free draw comes about one time in four)
    ((2, 5, 6, 12), [(1, 1, 12, 4), (3, 3, 4, 4), (1, 1, 4, 12)], (1, 1, 1), True, 0.0, "residual", True),
    # x added without an input batch norm
    ((2, 5, 6, 4), [(1, 1, 4, 3), (3, 3, 3, 4)], (1, 1), True, 0.0, "residual", False),
    # the mask head (1x1, 1x1), without dx (an input that needs no gradient)
    ((1, 5, 6, 8), [(1, 1, 8, 8), (1, 1, 8, 8)], (1, 1), False, 0.0, None, False),
    # the same with its input's batch norm: without dx, its dgamma and dbeta still come from dgrad's sums
    ((1, 5, 6, 8), [(1, 1, 8, 8), (1, 1, 8, 8)], (1, 1), False, 0.0, None, True),
    # 2,178 positions: 35 tiles of 64 in dgrad's batch-norm sums, finished in two chunks of 32
    ((2, 33, 33, 4), [(1, 1, 4, 4), (1, 1, 4, 4)], (1, 1), True, 4.0, None, False),
])
def test_conv_chain(triton_backend, rng, x_shape, w_shapes, strides, need_dx, beta_offset, shortcut, input_bn, into):
    """Every output, running statistic and gradient of the fused chain (each batch norm applied by the
    next conv as it loads, its backward sums taken in that conv's dgrad) against reference/."""
    x, params, layers = _chain_inputs(rng, x_shape, w_shapes, strides, IEEE_KINK_BAND, beta_offset, input_bn)
    options = dict(layers=layers, input_bn=input_bn, residual=shortcut == "residual")
    y_shape = ref.conv_chain(*f64(x, *params), **options)[0].shape
    skip = f32(rng, y_shape) if shortcut == "skip" else None
    y_ref, running_ref, saved_ref = ref.conv_chain(*f64(x, *params), skip=None if skip is None else f64(skip)[0],
                                                   **options)
    args = on_backend(x, *params)
    y, running, saved = conv.conv_chain(*args, skip=None if skip is None else backend.asarray(skip), **options)
    assert_close("y", y, y_ref, IEEE_RTOL)
    n_norms = len(layers) - 1 + input_bn
    assert len(running) == len(running_ref) == n_norms
    for j, ((mean, var), (mean_ref, var_ref)) in enumerate(zip(running, running_ref)):
        assert mean is args[5 * j + 4] and var is args[5 * j + 5], "running statistics are updated in place"
        assert_close(f"running_mean {j}", mean, mean_ref, IEEE_RTOL)
        assert_close(f"running_var {j}", var, var_ref, IEEE_RTOL)

    dy = f32(rng, y_ref.shape)
    running_slots = {5 * j + 3 for j in range(n_norms)} | {5 * j + 4 for j in range(n_norms)}
    before = [None if not into or j in running_slots else f32(rng, p.shape) for j, p in enumerate(params)]
    buffers = [None if b is None else backend.asarray(b.copy()) for b in before]
    dy_on_backend = backend.asarray(dy)
    dx_before = f32(rng, x.shape) if into else None  # x's gradient from another consumer (autograd's dx_into)
    dx_into = None if dx_before is None else backend.asarray(dx_before.copy())
    *grads, dskip = conv.conv_chain_backward(dy_on_backend, saved, need_dx, buffers, dx_into)
    *grads_ref, _ = ref.conv_chain_backward(*f64(dy), saved_ref)
    assert len(grads) == len(grads_ref) == len(params) + 1
    assert dskip is (dy_on_backend if skip is not None else None)  # the shortcut's gradient is dy itself
    if not need_dx:
        assert grads[0] is None
    elif into:
        assert_added_into("dx", grads[0], dx_into, dx_before, grads_ref[0], IEEE_RTOL)
    else:
        assert_close("dx", grads[0], grads_ref[0], IEEE_RTOL)
    for j, (got, want) in enumerate(zip(grads[1:], grads_ref[1:])):
        if j in running_slots:
            assert got is None and want is None
        elif into:
            assert_added_into(f"gradient of parameter {j}", got, buffers[j], before[j], want, IEEE_RTOL)
        else:
            assert_close(f"gradient of parameter {j}", got, want, IEEE_RTOL)
    assert_counters_released()
