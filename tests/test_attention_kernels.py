"""sigmoid, attention_mix, channel and spatial attention kernels against reference/ in float64.

Each kernel runs on float32 inputs (interpret backend; cuda too on a GPU) with
NaN-poisoned outputs (conftest), so an unwritten element fails; the reference
runs in float64 on the same values, so every difference is the kernel's float32
arithmetic or a bug. Shapes are drawn around the kernels' blocks: batch 1, odd
H and W, H * W above and below the spatial sweep's 64 positions, C in
{1, 3, 5, 67, 130} (not multiples of any block).
"""
import inspect

import numpy as np
import pytest

import reference as ref
from ra_kernels import backend
from ra_kernels.kernels import attention

# float32 results of short chains of correctly rounded operations agree with float64
# to a few ulps (6e-8); 1e-5 leaves room for the GPU's exp (ex2.approx of x * log2(e):
# relative error about |x| * 6e-8, 6e-6 at |x| = 100) and sqrt/division approximations.
RTOL = 1e-5
# Below float32's smallest normal value results are denormals (absolute precision 1.4e-45),
# which a GPU may flush to 0: such values match only absolutely.
F32_TINY = float(np.finfo(np.float32).tiny)
# The float64 reference forms 1 - s by subtraction, absolute error 1.1e-16 once s is near 1
# (the kernel forms it as e / (1 + e), relatively exact), so s * (1 - s) terms match to
# 1e-15 * |their factor|, which is ~1e-15 for the O(1) dy and t used here.
ONE_MINUS_S_ATOL = 1e-15

NHWC_SHAPES = [(1, 3, 5, 1), (2, 9, 11, 3), (1, 7, 13, 5), (3, 5, 3, 67), (2, 11, 7, 130), (1, 1, 1, 3)]
FLAT_SHAPES = [(1,), (1023,), (1025,), (3, 7, 5, 67)]


def _random_nhwc_shape(rng):
    """A fresh shape: batch 1..3, H and W 1..12, C from the awkward channel counts."""
    return (int(rng.integers(1, 4)), int(rng.integers(1, 13)), int(rng.integers(1, 13)),
            int(rng.choice([1, 3, 5, 67, 130])))


def _f32(a):
    return np.asarray(a, np.float32)


def _dev(a):
    return backend.asarray(_f32(a))


def assert_close(got, want, rtol=RTOL, atol=0.0, name=""):
    """|got - want| <= rtol * |want| + atol elementwise (atol may be an array), and got all finite."""
    got = backend.to_numpy(got).astype(np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: {np.sum(~np.isfinite(got))} non-finite elements"
    excess = np.abs(got - want) - (rtol * np.abs(want) + atol)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert np.all(excess <= 0), (f"{name}: {np.sum(excess > 0)} of {excess.size} elements off; worst at "
                                 f"{worst}: got {got[worst]!r}, expected {want[worst]!r}")


@pytest.mark.parametrize("op", ["sigmoid", "attention_mix", "channel_attention", "spatial_attention"])
def test_launchers_mirror_reference(op):
    for name in (op, op + "_backward"):
        assert inspect.signature(getattr(attention, name)) == inspect.signature(getattr(ref, name)), name


# --------------------------------------------------------------------------- sigmoid

@pytest.mark.parametrize("shape", FLAT_SHAPES)
def test_sigmoid(triton_backend, rng, shape):
    x = _f32(4 * rng.standard_normal(shape))
    # The tails: 1 - s rounds to 0 in float32 from 17, exp(-|x|) leaves the normal
    # range at 87 and underflows to 0 near 104.
    extremes = [0.0, -17.5, 17.5, -30.0, 30.0, -88.0, 88.0, -100.0, 100.0, -1000.0, 1000.0]
    x.flat[:len(extremes)] = extremes[:x.size]
    dy = _f32(rng.standard_normal(shape))
    y, saved = attention.sigmoid(_dev(x))
    (dx,) = attention.sigmoid_backward(_dev(dy), saved)
    want_y, ref_saved = ref.sigmoid(x.astype(np.float64))
    (want_dx,) = ref.sigmoid_backward(dy.astype(np.float64), ref_saved)
    assert_close(y, want_y, atol=F32_TINY, name="y")
    assert_close(dx, want_dx, atol=ONE_MINUS_S_ATOL, name="dx")
    y = backend.to_numpy(y)
    if x.size >= len(extremes):  # exact saturation far out, 0.5 at 0
        assert y.flat[0] == 0.5 and y.flat[9] == 0 and y.flat[10] == 1  # x = 0, -1000, 1000
        assert backend.to_numpy(dx).flat[9] == backend.to_numpy(dx).flat[10] == 0


# --------------------------------------------------------------------------- attention_mix

@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", FLAT_SHAPES[1:] + [None])
def test_attention_mix(triton_backend, rng, shape, residual):
    shape = shape or _random_nhwc_shape(rng)
    # Mask logits from moderate to saturated: half N(0, 9), half uniform up to |m| = 100.
    m = np.where(rng.random(shape) < 0.5, 3 * rng.standard_normal(shape), rng.uniform(-100, 100, shape))
    m, t, dy = _f32(m), _f32(rng.standard_normal(shape)), _f32(rng.standard_normal(shape))
    y, saved = attention.attention_mix(_dev(m), _dev(t), residual=residual)
    dm, dt = attention.attention_mix_backward(_dev(dy), saved)
    want_y, ref_saved = ref.attention_mix(m.astype(np.float64), t.astype(np.float64), residual=residual)
    want_dm, want_dt = ref.attention_mix_backward(dy.astype(np.float64), ref_saved)
    # s alone (naive y, dt) may be denormal; dm also carries the reference's 1 - s error.
    assert_close(y, want_y, atol=F32_TINY, name="y")
    assert_close(dt, want_dt, atol=F32_TINY, name="dt")
    assert_close(dm, want_dm, atol=ONE_MINUS_S_ATOL * np.abs(t * dy), name="dm")


@pytest.mark.parametrize("residual", [True, False])
def test_attention_mix_in_bfloat16(triton_backend, rng, residual):
    # bfloat16 m, t, dy (issue 14): computed in float32 as above, then one rounding to bfloat16 of
    # each result, <= 2**-8 of it (bfloat16's unit roundoff) on top of the float32 bounds. Values
    # below bfloat16's smallest normal (its exponent is float32's) match only absolutely, as above.
    shape = (3, 7, 5, 67)
    m = np.where(rng.random(shape) < 0.5, 3 * rng.standard_normal(shape), rng.uniform(-100, 100, shape))
    m, t, dy = (a.astype(backend.BFLOAT16) for a in (m, rng.standard_normal(shape), rng.standard_normal(shape)))
    y, saved = attention.attention_mix(backend.asarray(m), backend.asarray(t), residual=residual)
    dm, dt = attention.attention_mix_backward(backend.asarray(dy), saved)
    want_y, ref_saved = ref.attention_mix(m.astype(np.float64), t.astype(np.float64), residual=residual)
    want_dm, want_dt = ref.attention_mix_backward(dy.astype(np.float64), ref_saved)
    bf16_u = backend.BFLOAT16_ROUNDOFF
    for name, got, want, atol in (("y", y, want_y, F32_TINY), ("dt", dt, want_dt, F32_TINY),
                                  ("dm", dm, want_dm, ONE_MINUS_S_ATOL * np.abs(t.astype(np.float64) * dy) + F32_TINY)):
        assert backend.to_numpy(got).dtype == backend.BFLOAT16, name
        assert_close(got, want, rtol=RTOL + bf16_u, atol=atol, name=name)


@pytest.mark.parametrize("residual", [True, False])
def test_attention_mix_with_a_given_mask(triton_backend, rng, residual):
    # from_logits=False: the mask is used as it is (the channel / spatial attention ablations).
    shape = _random_nhwc_shape(rng)
    m, t, dy = (_f32(rng.standard_normal(shape)) for _ in range(3))
    y, saved = attention.attention_mix(_dev(m), _dev(t), residual=residual, from_logits=False)
    dm, dt = attention.attention_mix_backward(_dev(dy), saved)
    want_y, ref_saved = ref.attention_mix(*(a.astype(np.float64) for a in (m, t)), residual=residual, from_logits=False)
    want_dm, want_dt = ref.attention_mix_backward(dy.astype(np.float64), ref_saved)
    # One or two float32 roundings of products of O(1) values: within a few ulps.
    assert_close(y, want_y, atol=F32_TINY, name="y")
    assert_close(dt, want_dt, atol=F32_TINY, name="dt")
    assert_close(dm, want_dm, atol=F32_TINY, name="dm")


def test_attention_mix_rejects_different_shapes(triton_backend):
    with pytest.raises(ValueError, match="attention_mix"):
        attention.attention_mix(_dev(np.ones((2, 3))), _dev(np.ones((3, 2))))


# --------------------------------------------------------------------------- channel attention

@pytest.mark.parametrize("shape", NHWC_SHAPES + [None])
def test_channel_attention(triton_backend, rng, shape):
    shape = shape or _random_nhwc_shape(rng)
    x = _f32(rng.standard_normal(shape) * rng.uniform(0.1, 10, shape[:-1] + (1,)))  # norms of many sizes
    x[0, 0, 0] = 0  # an all-zero pixel: eps keeps y = 0 and dx = dy / sqrt(eps) finite
    dy = _f32(rng.standard_normal(shape))
    y, saved = attention.channel_attention(_dev(x))
    (dx,) = attention.channel_attention_backward(_dev(dy), saved)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want_y, ref_saved = ref.channel_attention(x64)
    (want_dx,) = ref.channel_attention_backward(dy64, ref_saved)
    # y: a sum of C <= 130 squares, a square root and a product, no cancellation.
    assert_close(y, want_y, name="y")
    # dx = (dy - y * dot) / norm cancels: the error is relative to the terms' size.
    y64, norm = ref_saved
    terms = (np.abs(dy64) + np.abs(y64) * np.abs(dy64 * y64).sum(-1, keepdims=True)) / norm
    assert_close(dx, want_dx, atol=RTOL * terms, name="dx")
    assert np.all(backend.to_numpy(y)[0, 0, 0] == 0)


def test_channel_and_spatial_attention_in_bfloat16(triton_backend, rng):
    # bfloat16 x and dy (issue 14): computed in float32 as in the tests above, then one rounding of
    # y and dx to bfloat16, <= 2**-8 of each value (bfloat16's unit roundoff) on top of their bounds.
    shape, bf16_u = (2, 5, 7, 67), backend.BFLOAT16_ROUNDOFF
    stats_shape = (shape[0], 1, 1, shape[3])
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, stats_shape)).astype(backend.BFLOAT16)
    dy = rng.standard_normal(shape).astype(backend.BFLOAT16)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)

    y, saved = attention.channel_attention(backend.asarray(x))
    (dx,) = attention.channel_attention_backward(backend.asarray(dy), saved)
    want_y, (y64, norm) = ref.channel_attention(x64)
    (want_dx,) = ref.channel_attention_backward(dy64, (y64, norm))
    terms = (np.abs(dy64) + np.abs(y64) * np.abs(dy64 * y64).sum(-1, keepdims=True)) / norm
    assert_close(y, want_y, rtol=RTOL + bf16_u, name="channel y")
    assert_close(dx, want_dx, rtol=bf16_u, atol=RTOL * terms, name="channel dx")

    y, saved = attention.spatial_attention(backend.asarray(x))
    (dx,) = attention.spatial_attention_backward(backend.asarray(dy), saved)
    want_y, ref_saved = ref.spatial_attention(x64)
    (want_dx,) = ref.spatial_attention_backward(dy64, ref_saved)
    z, rstd, _ = ref_saved
    terms = rstd * np.abs(dy64).max((1, 2), keepdims=True) * (1 + np.abs(z)) / 2
    assert_close(y, want_y, rtol=bf16_u, atol=1e-6, name="spatial y")
    assert_close(dx, want_dx, rtol=RTOL + bf16_u, atol=RTOL * terms, name="spatial dx")
    for out in (y, dx):
        assert backend.to_numpy(out).dtype == backend.BFLOAT16


# --------------------------------------------------------------------------- spatial attention

def _check_spatial(x, dy, y_atol, dx_rtol):
    y, saved = attention.spatial_attention(_dev(x))
    (dx,) = attention.spatial_attention_backward(_dev(dy), saved)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want_y, ref_saved = ref.spatial_attention(x64)
    (want_dx,) = ref.spatial_attention_backward(dy64, ref_saved)
    assert_close(y, want_y, atol=y_atol, name="y")
    # dx = rstd * (dz - mean(dz) - z * mean(dz z)) cancels; |dz| <= |dy| / 4, so the terms
    # are at most rstd * max|dy| * (1 + |z|) / 2 per (sample, channel).
    z, rstd, _ = ref_saved
    terms = rstd * np.abs(dy64).max((1, 2), keepdims=True) * (1 + np.abs(z)) / 2
    assert_close(dx, want_dx, rtol=dx_rtol, atol=dx_rtol * terms, name="dx")


@pytest.mark.parametrize("shape", NHWC_SHAPES + [None])
def test_spatial_attention(triton_backend, rng, shape):
    shape = shape or _random_nhwc_shape(rng)
    # Per (sample, channel) offsets and scales of a few units, like conv outputs.
    stats_shape = (shape[0], 1, 1, shape[3])
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, stats_shape) + rng.uniform(-3, 3, stats_shape)
    # y: sums of <= 144 values (mean, variance), in float32 per-lane partials and a tree.
    _check_spatial(_f32(x), _f32(rng.standard_normal(shape)), y_atol=1e-6, dx_rtol=RTOL)


@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (1, 13, 15, 67), (1, 32, 32, 19)])  # the last: stage 1's H * W
def test_spatial_attention_large_mean(triton_backend, rng, shape):
    # Mean 100, std 1: E[x^2] - E[x]^2 in float32 would lose about 1e-3 of the variance
    # (sums near 1e4, ulp 1e-3); two passes keep it. What remains is the mean rounded to
    # float32 (half an ulp at 100: 3.8e-6), which moves z by that times rstd ~ 1 and y by
    # at most a quarter of it.
    x = _f32(100 + rng.standard_normal(shape))
    _check_spatial(x, _f32(rng.standard_normal(shape)), y_atol=2e-6, dx_rtol=RTOL)
