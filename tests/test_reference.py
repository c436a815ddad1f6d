"""Tests of reference/, the NumPy ground truth (docs/design.md §5, rung 1).

Every backward against central finite differences in float64, every forward
against an independent direct formula, float32 against float64, and the details
kernels will be held to (tie-breaking, stability, purity, dtypes, layout).
Each test draws a fresh seed and names it on failure; REFERENCE_TEST_SEED=<int>
replays one.
"""
import os
import secrets
import warnings
from dataclasses import dataclass
from itertools import product
from typing import Callable

import numpy as np
import pytest
from scipy import ndimage, special

import reference as ref

# Central differences in float64: truncation O(h^2) ~ 1e-12 and rounding
# O(eps * |loss| / h) ~ 1e-16 * 1e2 / 1e-6 = 1e-8 for these small shapes, so a
# correct backward agrees to ~1e-8..1e-10 relative; 1e-6 leaves margin and still
# catches any wrong term.
FD_STEP = 1e-6
FD_RTOL = 1e-6
# float32 against float64 on identical (float32-representable) inputs: a few
# float32 ulps (6e-8) amplified by short sums and normalisation (seen: < 1e-6).
F32_RTOL = 1e-5
# Forward semantics against direct formulas in float64: only summation order differs.
EXACT_RTOL = 1e-12


@pytest.fixture
def seed():
    """A fresh random seed, or REFERENCE_TEST_SEED's; printed, so pytest shows it with any failure."""
    value = int(os.environ.get("REFERENCE_TEST_SEED") or secrets.randbits(63))
    print(f"REFERENCE_TEST_SEED={value}")
    return value


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|: measured against the largest entry, so near-zero entries don't
    turn rounding noise into a huge ratio."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max(initial=0.0)
    return np.abs(actual - expected).max(initial=0.0) / (scale if scale > 0 else 1.0)


def numerical_gradient(loss, a, h=FD_STEP):
    """Central-difference gradient of the scalar loss() in every element of `a` (perturbed in place, then restored)."""
    grad = np.empty_like(a)
    for idx in np.ndindex(a.shape):
        original = a[idx]
        a[idx] = plus = original + h
        loss_plus = loss()
        a[idx] = minus = original - h
        loss_minus = loss()
        a[idx] = original
        grad[idx] = (loss_plus - loss_minus) / (plus - minus)  # the step actually taken, after rounding
    return grad


# --------------------------------------------------------------------------- input builders

def distinct(rng, shape):
    """Values of magnitude ~1, pairwise at least 3e-3 apart: no ties, so max-pool's argmax is stable under FD steps."""
    size = int(np.prod(shape))
    grid = (rng.permutation(size) - size / 2) * 4e-3
    return (grid + rng.uniform(0, 1e-3, size)).reshape(shape)


def away_from_zero(rng, shape):
    """Random signs and magnitudes in [0.05, 2): ReLU's kink stays far from any FD step."""
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.05, 2.0, shape)


def bn_params(rng, channels):
    """gamma, beta, running_mean, running_var for `channels` channels.

    |gamma| >= 0.5 and modest beta and running mean, so that after a ReLU every
    channel keeps active outputs (no vacuous all-zero gradients); running_var > 0.
    """
    return (rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels), 0.5 * rng.standard_normal(channels),
            0.5 * rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels))


def kink_free(draw, preactivation):
    """Redraw until no ReLU pre-activation lies within 1e-3 of 0: the mask then holds under FD steps and in float32."""
    while True:
        inputs, fixed = draw()
        if np.abs(preactivation(*inputs, **fixed)).min() > 1e-3:
            return inputs, fixed


# --------------------------------------------------------------------------- the op cases

@dataclass
class Case:
    forward: Callable   # (*inputs, **fixed) -> (out, saved); `inputs` are the differentiable arguments
    backward: Callable  # (dy, saved) -> one gradient per input (trailing None for an absent optional input)
    make: Callable      # rng -> (inputs, fixed), float64 arrays


def conv_case(x_shape, w_shape, stride, padding):
    return Case(lambda x, w: ref.conv2d(x, w, stride, padding), ref.conv2d_backward,
                lambda rng: ([rng.standard_normal(x_shape), rng.standard_normal(w_shape)], {}))


def drop_running_stats(result):
    y, _, _, saved = result
    return y, saved


def bn_case(x_shape, training, relu):
    def forward(x, gamma, beta, running_mean, running_var):
        return drop_running_stats(ref.batch_norm(x, gamma, beta, running_mean, running_var, training, relu=relu))

    def draw(rng):
        gamma, beta, running_mean, running_var = bn_params(rng, x_shape[-1])
        return [rng.standard_normal(x_shape), gamma, beta], {"running_mean": running_mean, "running_var": running_var}

    def preactivation(x, gamma, beta, running_mean, running_var):
        return ref.batch_norm(x, gamma, beta, running_mean, running_var, training)[0]

    make = (lambda rng: kink_free(lambda: draw(rng), preactivation)) if relu else draw
    return Case(forward, ref.batch_norm_backward, make)


def conv_bn_relu_case(x_shape, w_shape, stride, padding, training, relu):
    def forward(x, w, gamma, beta, running_mean, running_var):
        return drop_running_stats(ref.conv_bn_relu(x, w, gamma, beta, running_mean, running_var, stride, padding,
                                                   training, relu=relu))

    def draw(rng):
        gamma, beta, running_mean, running_var = bn_params(rng, w_shape[-1])
        return ([rng.standard_normal(x_shape), rng.standard_normal(w_shape), gamma, beta],
                {"running_mean": running_mean, "running_var": running_var})

    def preactivation(x, w, gamma, beta, running_mean, running_var):
        return ref.conv_bn_relu(x, w, gamma, beta, running_mean, running_var, stride, padding, training,
                                relu=False)[0]

    make = (lambda rng: kink_free(lambda: draw(rng), preactivation)) if relu else draw
    return Case(forward, ref.conv_bn_relu_backward, make)


def conv_chain_case(x_shape, w_shapes, strides, skip_shape=None, input_bn=False, residual=False):
    """conv_chain over convs of the given HWIO shapes and strides (padding KH // 2), a BN-ReLU after
    each but the last, a BN-ReLU of x first with ``input_bn``, plus a skip input of ``skip_shape`` if
    given, or x with ``residual``. Inputs: x, then per conv w (and gamma, beta), then the input's
    gamma and beta, then skip; running statistics fixed."""
    layers = tuple((stride, shape[0] // 2) for shape, stride in zip(w_shapes, strides))
    n = len(w_shapes)
    options = dict(layers=layers, input_bn=input_bn, residual=residual)

    def arguments(x, inputs, running):
        args = [x]
        for i in range(n):
            args.append(inputs[3 * i])
            if i < n - 1:
                args += [inputs[3 * i + 1], inputs[3 * i + 2], *running[2 * i:2 * i + 2]]
        if input_bn:
            args += [inputs[3 * n - 2], inputs[3 * n - 1], *running[-2:]]
        return args

    def forward(x, *inputs, **running):
        skip = inputs[-1] if skip_shape else None
        params = inputs[:-1] if skip_shape else inputs
        y, _, saved = ref.conv_chain(*arguments(x, params, list(running.values())), skip=skip, **options)
        return y, saved

    def backward(dy, saved):
        *grads, dskip = ref.conv_chain_backward(dy, saved)
        kept = tuple(g for i, g in enumerate(grads) if i == 0 or (i - 1) % 5 < 3)
        return kept + ((dskip,) if skip_shape else ())

    def draw(rng):
        inputs, running = [], {}
        for i, shape in enumerate(w_shapes):
            inputs.append(rng.standard_normal(shape))
            if i < n - 1:
                gamma, beta, running[f"mean{i}"], running[f"var{i}"] = bn_params(rng, shape[-1])
                inputs += [gamma, beta]
        if input_bn:
            gamma, beta, running["mean_in"], running["var_in"] = bn_params(rng, x_shape[-1])
            inputs += [gamma, beta]
        return [rng.standard_normal(x_shape), *inputs, *([rng.standard_normal(skip_shape)] if skip_shape else [])], \
            running

    def preactivation(x, *inputs, **running):
        running, lowest, h = list(running.values()), np.inf, x
        inputs = inputs[:-1] if skip_shape else inputs
        if input_bn:
            args = (h, inputs[3 * n - 2], inputs[3 * n - 1], *running[-2:], True)
            lowest = np.abs(ref.batch_norm(*args, relu=False)[0]).min()
            h = ref.batch_norm(*args, relu=True)[0]
        for i in range(n - 1):
            w, gamma, beta = inputs[3 * i:3 * i + 3]
            args = (h, w, gamma, beta, *running[2 * i:2 * i + 2], *layers[i], True)
            lowest = min(lowest, np.abs(ref.conv_bn_relu(*args, relu=False)[0]).min())
            h = ref.conv_bn_relu(*args, relu=True)[0]
        return np.array([lowest])

    return Case(forward, backward, lambda rng: kink_free(lambda: draw(rng), preactivation))


def pool_case(x_shape, kernel_size, stride, padding):
    return Case(lambda x: ref.max_pool2d(x, kernel_size, stride, padding), ref.max_pool2d_backward,
                lambda rng: ([distinct(rng, x_shape)], {}))


def upsample_case(x_shape, size, with_skip):
    def make(rng):
        inputs = [rng.standard_normal(x_shape)]
        if with_skip:
            inputs.append(rng.standard_normal((x_shape[0], *size, x_shape[3])))
        return inputs, {}
    return Case(lambda x, skip=None: ref.upsample_bilinear(x, size, skip), ref.upsample_bilinear_backward, make)


def normal_case(forward, backward, *shapes):
    return Case(forward, backward, lambda rng: ([rng.standard_normal(s) for s in shapes], {}))


def cross_entropy_make(rng):
    labels = rng.integers(0, 7, 5)
    return [2 * rng.standard_normal((5, 7))], {"labels": labels}


CASES = {
    "conv3x3_s1_p1": conv_case((2, 7, 9, 3), (3, 3, 3, 4), 1, 1),
    "conv3x3_s2_p1_batch1": conv_case((1, 7, 9, 3), (3, 3, 3, 5), 2, 1),
    "conv3x3_s2_p0_uncovered_edge": conv_case((2, 8, 8, 2), (3, 3, 2, 3), 2, 0),
    "conv3x3_s1_p0": conv_case((1, 5, 6, 3), (3, 3, 3, 2), 1, 0),
    "conv1x1_s1": conv_case((2, 5, 6, 4), (1, 1, 4, 3), 1, 0),
    "conv1x1_s2": conv_case((1, 7, 9, 3), (1, 1, 3, 2), 2, 0),
    "conv2x3_s1_p1": conv_case((1, 5, 7, 2), (2, 3, 2, 3), 1, 1),
    "bn_train": bn_case((2, 3, 5, 4), training=True, relu=False),
    "bn_train_relu": bn_case((2, 3, 5, 4), training=True, relu=True),
    "bn_eval": bn_case((2, 3, 5, 4), training=False, relu=False),
    "bn_eval_relu": bn_case((1, 3, 5, 4), training=False, relu=True),
    "conv_bn_relu_train": conv_bn_relu_case((2, 5, 7, 3), (3, 3, 3, 4), 1, 1, training=True, relu=True),
    "conv_bn_train_1x1_s2": conv_bn_relu_case((2, 7, 9, 3), (1, 1, 3, 4), 2, 0, training=True, relu=False),
    "conv_bn_relu_eval_s2": conv_bn_relu_case((1, 7, 9, 3), (3, 3, 3, 4), 2, 1, training=False, relu=True),
    "conv_chain_bottleneck_s2": conv_chain_case((2, 5, 7, 3), [(1, 1, 3, 4), (3, 3, 4, 4), (1, 1, 4, 5)], (1, 2, 1)),
    "conv_chain_residual": conv_chain_case((2, 5, 6, 4), [(1, 1, 4, 3), (3, 3, 3, 3), (1, 1, 3, 4)], (1, 1, 1),
                                           skip_shape=(2, 5, 6, 4)),
    "conv_chain_two": conv_chain_case((1, 6, 5, 4), [(3, 3, 4, 3), (1, 1, 3, 2)], (1, 1)),
    "conv_chain_preactivation_unit": conv_chain_case((2, 5, 6, 4), [(1, 1, 4, 3), (3, 3, 3, 3), (1, 1, 3, 4)],
                                                     (1, 1, 1), input_bn=True, residual=True),
    "conv_chain_input_bn_s2": conv_chain_case((2, 5, 7, 3), [(1, 1, 3, 4), (3, 3, 4, 2)], (1, 2), input_bn=True),
    "maxpool3_s2_p1": pool_case((2, 7, 9, 3), 3, 2, 1),
    "maxpool3_s2_p1_even": pool_case((1, 8, 8, 2), 3, 2, 1),
    "maxpool2_s2_p0": pool_case((2, 8, 6, 3), 2, 2, 0),
    "maxpool3_s1_p1": pool_case((1, 5, 6, 2), 3, 1, 1),
    "upsample_4to8_skip": upsample_case((2, 4, 4, 3), (8, 8), with_skip=True),
    "upsample_5x7to9x13": upsample_case((1, 5, 7, 2), (9, 13), with_skip=False),
    "upsample_down_9x13to5x7_skip": upsample_case((1, 9, 13, 2), (5, 7), with_skip=True),
    "upsample_mixed_4x6to7x3": upsample_case((2, 4, 6, 2), (7, 3), with_skip=False),
    "upsample_to_1x1": upsample_case((2, 3, 4, 2), (1, 1), with_skip=False),
    "upsample_from_1x1_skip": upsample_case((1, 1, 1, 3), (3, 5), with_skip=True),
    "sigmoid": Case(ref.sigmoid, ref.sigmoid_backward, lambda rng: ([3 * rng.standard_normal((3, 4, 5))], {})),
    "attention_mix_residual": normal_case(lambda m, t: ref.attention_mix(m, t, residual=True),
                                          ref.attention_mix_backward, (2, 3, 4, 5), (2, 3, 4, 5)),
    "attention_mix_naive": normal_case(lambda m, t: ref.attention_mix(m, t, residual=False),
                                       ref.attention_mix_backward, (2, 3, 4, 5), (2, 3, 4, 5)),
    "attention_mix_given_mask_residual": normal_case(
        lambda m, t: ref.attention_mix(m, t, residual=True, from_logits=False),
        ref.attention_mix_backward, (2, 3, 4, 5), (2, 3, 4, 5)),
    "attention_mix_given_mask_naive": normal_case(
        lambda m, t: ref.attention_mix(m, t, residual=False, from_logits=False),
        ref.attention_mix_backward, (2, 3, 4, 5), (2, 3, 4, 5)),
    "channel_attention": normal_case(ref.channel_attention, ref.channel_attention_backward, (2, 3, 4, 5)),
    "spatial_attention": normal_case(ref.spatial_attention, ref.spatial_attention_backward, (2, 4, 5, 3)),
    "add": normal_case(ref.add, ref.add_backward, (2, 3, 4, 5), (2, 3, 4, 5)),
    "relu": Case(ref.relu, ref.relu_backward, lambda rng: ([away_from_zero(rng, (2, 3, 4, 5))], {})),
    "global_avg_pool": normal_case(ref.global_avg_pool, ref.global_avg_pool_backward, (2, 3, 5, 4)),
    "linear": normal_case(ref.linear, ref.linear_backward, (3, 5), (5, 4), (4,)),
    "cross_entropy": Case(ref.cross_entropy, ref.cross_entropy_backward, cross_entropy_make),
}


def copy_all(inputs, fixed):
    return [a.copy() for a in inputs], {k: v.copy() for k, v in fixed.items()}


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_finite_differences(name, seed):
    case, rng = CASES[name], np.random.default_rng(seed)
    inputs, fixed = case.make(rng)
    inputs_before, fixed_before = copy_all(inputs, fixed)
    out, saved = case.forward(*inputs, **fixed)
    dy = rng.standard_normal(np.shape(out))
    dy_before = dy.copy()
    grads = case.backward(dy, saved)

    # Pure: neither the forward nor the backward wrote to its arguments.
    for a, before in zip([*inputs, *fixed.values(), dy], [*inputs_before, *fixed_before.values(), dy_before]):
        np.testing.assert_array_equal(a, before, err_msg=f"{name}: an argument was modified, seed={seed}")
    assert len(grads) >= len(inputs) and all(g is None for g in grads[len(inputs):]), name

    def loss():
        return np.sum(case.forward(*inputs, **fixed)[0] * dy)

    for i, (a, grad) in enumerate(zip(inputs, grads)):
        assert grad.shape == a.shape and grad.dtype == a.dtype, f"{name}: gradient {i} is {grad.shape} {grad.dtype}"
        error = relative_error(grad, numerical_gradient(loss, a))
        assert error < FD_RTOL, f"{name}: gradient {i} off by {error:.2e} relative, seed={seed}"


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_float64(name, seed):
    case, rng = CASES[name], np.random.default_rng(seed)
    inputs, fixed = case.make(rng)

    def cast(arrays, dtype):
        # Float arrays only: labels stay integer.
        return [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays]

    inputs32 = cast(inputs, np.float32)
    fixed32 = dict(zip(fixed, cast(fixed.values(), np.float32)))
    out32, saved32 = case.forward(*inputs32, **fixed32)
    dy32 = rng.standard_normal(np.shape(out32)).astype(np.float32)
    grads32 = case.backward(dy32, saved32)[:len(inputs)]

    # The float64 truth on the very same (float32-representable) values.
    out64, saved64 = case.forward(*cast(inputs32, np.float64), **dict(zip(fixed, cast(fixed32.values(), np.float64))))
    grads64 = case.backward(dy32.astype(np.float64), saved64)[:len(inputs)]

    results = [("output", out32, out64), *((f"gradient {i}", g32, g64)
                                           for i, (g32, g64) in enumerate(zip(grads32, grads64)))]
    # Errors relative to the largest value the op produces: float32 rounding is set by
    # the size of the intermediates, not by a result that happens to cancel to near 0
    # (e.g. BN's dgamma = sum(dy * xhat), or ReLU outputs just above the kink).
    scale = max(np.abs(a64).max() for _, _, a64 in results) or 1.0
    for what, a32, a64 in results:
        a32 = np.asarray(a32)
        assert a32.dtype == np.float32, f"{name}: {what} is {a32.dtype}"
        assert a32.flags.c_contiguous, f"{name}: {what} is not C-contiguous"
        error = np.abs(a32 - a64).max() / scale
        assert error < F32_RTOL, f"{name}: float32 {what} off by {error:.2e} relative, seed={seed}"


# --------------------------------------------------------------------------- conv2d

def naive_conv2d(x, w, stride, padding):
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    y = np.zeros((n, (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1, cout))
    for b, i, j, co in product(*map(range, y.shape)):
        for di, dj in product(range(kh), range(kw)):
            r, c = i * stride + di - padding, j * stride + dj - padding
            if 0 <= r < h and 0 <= c < wd:
                y[b, i, j, co] += x[b, r, c, :] @ w[di, dj, :, co]
    return y


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((2, 7, 9, 3), (3, 3, 3, 2), 1, 1),
    ((1, 7, 9, 3), (3, 3, 3, 2), 2, 1),
    ((2, 8, 8, 2), (3, 3, 2, 3), 2, 0),
    ((1, 5, 6, 4), (1, 1, 4, 3), 1, 0),
    ((1, 7, 9, 3), (1, 1, 3, 2), 2, 0),
    ((1, 5, 7, 2), (2, 3, 2, 3), 1, 1),
    ((1, 4, 4, 2), (3, 3, 2, 2), 3, 2),
])
def test_conv2d_matches_naive_loop(x_shape, w_shape, stride, padding, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y, _ = ref.conv2d(x, w, stride, padding)
    expected = naive_conv2d(x, w, stride, padding)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=f"seed={seed}")


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="conv2d"):
        ref.conv2d(np.ones((1, 4, 4, 3)), np.ones((3, 3, 2, 4)))


# --------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_norm_training_matches_textbook(relu, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    gamma, beta, running_mean, running_var = (p.astype(dtype) for p in bn_params(rng, 4))
    momentum, eps = 0.3, 1e-3
    y, new_mean, new_var, _ = ref.batch_norm(x, gamma, beta, running_mean, running_var, True, momentum, eps, relu)

    rows = x.astype(np.float64).reshape(-1, 4)
    mean = rows.mean(0)
    var = ((rows - mean) ** 2).mean(0)
    expected = (gamma * (x - mean) / np.sqrt(var + eps) + beta).astype(np.float64)
    if relu:
        expected = np.maximum(expected, 0)
    rtol = EXACT_RTOL if dtype == np.float64 else F32_RTOL
    for got, want in [(y, expected),
                      (new_mean, (1 - momentum) * running_mean + momentum * mean),
                      (new_var, (1 - momentum) * running_var + momentum * np.var(rows, axis=0, ddof=1))]:
        assert got.dtype == dtype
        assert relative_error(got, want) < rtol, f"seed={seed}"


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_eval_uses_running_stats(relu, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 5, 4))
    gamma, beta, running_mean, running_var = bn_params(rng, 4)
    y, new_mean, new_var, _ = ref.batch_norm(x, gamma, beta, running_mean, running_var, training=False, relu=relu)
    assert new_mean is running_mean and new_var is running_var
    expected = gamma * (x - running_mean) / np.sqrt(running_var + 1e-5) + beta
    if relu:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(y, expected, rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=f"seed={seed}")


def test_batch_norm_training_needs_two_values_per_channel():
    with pytest.raises(ValueError, match="batch_norm"):
        ref.batch_norm(np.ones((1, 1, 1, 3)), *bn_params(np.random.default_rng(0), 3))


@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu_is_the_composition(training, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((2, 7, 9, 3)), rng.standard_normal((3, 3, 3, 4))
    params = bn_params(rng, 4)
    y, mean, var, saved = ref.conv_bn_relu(x, w, *params, stride=2, padding=1, training=training)
    z, conv_saved = ref.conv2d(x, w, 2, 1)
    y_ref, mean_ref, var_ref, bn_saved = ref.batch_norm(z, *params, training=training, relu=True)
    for got, want in [(y, y_ref), (mean, mean_ref), (var, var_ref)]:
        np.testing.assert_array_equal(got, want)
    dy = rng.standard_normal(y.shape)
    dz, dgamma, dbeta = ref.batch_norm_backward(dy, bn_saved)
    for got, want in zip(ref.conv_bn_relu_backward(dy, saved), [*ref.conv2d_backward(dz, conv_saved), dgamma, dbeta]):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- max pool

def naive_max_pool(x, dy, kernel_size, stride, padding):
    """Output, and the input gradient with each dy sent to the first row-major maximum of its window
    among the inputs it covers (the first of them when all are -inf)."""
    n, h, w, c = x.shape
    y, dx = np.empty(dy.shape), np.zeros(x.shape)
    for b, i, j, ch in product(*map(range, dy.shape)):
        best, best_at = -np.inf, None
        for di, dj in product(range(kernel_size), repeat=2):  # row-major window order
            r, col = i * stride + di - padding, j * stride + dj - padding
            # Strict: the first maximum wins.
            if 0 <= r < h and 0 <= col < w and (best_at is None or x[b, r, col, ch] > best):
                best, best_at = x[b, r, col, ch], (b, r, col, ch)
        y[b, i, j, ch] = best
        dx[best_at] += dy[b, i, j, ch]
    return y, dx


@pytest.mark.parametrize("x_shape, kernel_size, stride, padding", [
    ((2, 7, 9, 3), 3, 2, 1),
    ((1, 8, 8, 2), 3, 2, 1),
    ((2, 8, 6, 3), 2, 2, 0),
    ((1, 5, 6, 2), 3, 1, 1),
    ((1, 7, 7, 2), 2, 2, 1),
    ((2, 8, 7, 2), 3, 2, 0),
])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("values", ["distinct", "ties", "minus_inf"])
def test_max_pool_matches_naive_loop(x_shape, kernel_size, stride, padding, ceil_mode, values, seed):
    rng = np.random.default_rng(seed)
    # Small integers tie often, which checks the first-maximum rule; distinct values check plain routing;
    # -inf in two thirds of the places (and in a whole corner) makes windows of nothing but -inf, which
    # tie with the padding. The naive loop takes the output size from dy and skips taps outside the
    # input, so in ceil mode it checks the windows that run past the input.
    x = distinct(rng, x_shape) if values == "distinct" else rng.integers(0, 3, x_shape).astype(np.float64)
    if values == "minus_inf":
        x[rng.random(x_shape) < 2 / 3] = -np.inf
        x[:, :3, :3] = -np.inf
    y, saved = ref.max_pool2d(x, kernel_size, stride, padding, ceil_mode)
    dy = rng.standard_normal(y.shape)
    expected_y, expected_dx = naive_max_pool(x, dy, kernel_size, stride, padding)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(ref.max_pool2d_backward(dy, saved)[0], expected_dx, rtol=EXACT_RTOL,
                               atol=EXACT_RTOL, err_msg=f"seed={seed}")


@pytest.mark.parametrize("kernel_size, stride, padding", [(2, 2, 0), (3, 2, 1)])
def test_max_pool_constant_windows_route_to_first_element(kernel_size, stride, padding, seed):
    """Every window is one big tie: its gradient goes to its first non-padding element in row-major order."""
    rng = np.random.default_rng(seed)
    x = np.full((2, 7, 8, 3), 0.5)
    y, saved = ref.max_pool2d(x, kernel_size, stride, padding)
    dy = rng.standard_normal(y.shape)
    (dx,) = ref.max_pool2d_backward(dy, saved)
    expected_dx = np.zeros_like(x)
    expected_argmax = np.empty(y.shape, np.int8)
    for i, j in product(range(y.shape[1]), range(y.shape[2])):
        top, left = i * stride - padding, j * stride - padding  # the window's corner, maybe in the padding
        expected_dx[:, max(top, 0), max(left, 0)] += dy[:, i, j]
        expected_argmax[:, i, j] = (max(top, 0) - top) * kernel_size + (max(left, 0) - left)
    np.testing.assert_array_equal(y, 0.5)
    np.testing.assert_array_equal(saved[0], expected_argmax)  # the argmax as a row-major tap index
    np.testing.assert_allclose(dx, expected_dx, rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=f"seed={seed}")


def test_max_pool_ceil_mode_sizes_are_pytorchs_and_caffes():
    """Output sizes in ceil mode: PyTorch's (where it is installed) over a range of sizes and
    geometries, and the ImageNet stem's, 112 -> 56 with 3x3/2 and no padding (Caffe's ceil((112 - 3)
    / 2) + 1; floor mode would give 55)."""
    assert ref.max_pool2d(np.zeros((1, 112, 112, 1)), 3, 2, 0, ceil_mode=True)[0].shape == (1, 56, 56, 1)
    assert ref.max_pool2d(np.zeros((1, 112, 112, 1)), 3, 2, 0)[0].shape == (1, 55, 55, 1)
    torch = pytest.importorskip("torch")
    for size, kernel_size, stride, padding in product(range(3, 12), (2, 3), (1, 2, 3), (0, 1)):
        if 2 * padding > kernel_size:
            continue
        ours = ref.max_pool2d(np.zeros((1, size, size, 1)), kernel_size, stride, padding, ceil_mode=True)[0].shape[1]
        theirs = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), kernel_size, stride, padding,
                                                ceil_mode=True).shape[2]
        assert ours == theirs, (size, kernel_size, stride, padding)


def test_max_pool_gradient_of_minus_inf_windows_is_pytorchs(seed):
    """Windows whose inputs are all -inf (an overflowed activation) tie with the padding: PyTorch
    sends their gradient to the first input, and so do we; none of it is dropped on the padding."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 7, 9, 3))
    x[rng.random(x.shape) < 0.5] = -np.inf
    x[:, :4, :4] = -np.inf
    for kernel_size, stride, padding, ceil_mode in [(3, 2, 1, False), (3, 1, 1, False), (3, 2, 0, True)]:
        y, saved = ref.max_pool2d(x, kernel_size, stride, padding, ceil_mode)
        dy = rng.integers(1, 9, y.shape).astype(np.float64)   # sums of a few of them are exact
        (dx,) = ref.max_pool2d_backward(dy, saved)
        x_torch = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
        y_torch = torch.nn.functional.max_pool2d(x_torch, kernel_size, stride, padding, ceil_mode=ceil_mode)
        y_torch.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
        np.testing.assert_array_equal(y, y_torch.detach().numpy().transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(dx, x_torch.grad.numpy().transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(dx.sum(axis=(1, 2)), dy.sum(axis=(1, 2)))  # every dy lands on an input


def test_max_pool_padding_is_minus_infinity():
    x = -np.arange(1.0, 1 + 4 * 4).reshape(1, 4, 4, 1)  # all negative: zero padding would win
    y, _ = ref.max_pool2d(x, 3, 2, 1)
    np.testing.assert_array_equal(y[0, :, :, 0], [[-1, -2], [-5, -6]])


def test_max_pool_rejects_padding_over_half_the_kernel():
    with pytest.raises(ValueError, match="max_pool2d"):
        ref.max_pool2d(np.ones((1, 4, 4, 1)), 2, 2, 2)


# --------------------------------------------------------------------------- bilinear upsample

def naive_bilinear(x, size):
    n, h, w, c = x.shape
    out = np.empty((n, *size, c))
    for i, j in product(range(size[0]), range(size[1])):
        sy = i * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
        sx = j * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = sy - y0, sx - x0
        out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                        + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


UPSAMPLE_SHAPES = [((2, 4, 4, 3), (8, 8)), ((1, 5, 7, 2), (9, 13)), ((1, 9, 13, 2), (5, 7)),
                   ((2, 4, 6, 2), (7, 3)), ((2, 3, 4, 2), (1, 1)), ((1, 1, 1, 3), (3, 5)), ((1, 16, 16, 2), (32, 32))]


@pytest.mark.parametrize("x_shape, size", UPSAMPLE_SHAPES)
def test_upsample_matches_per_pixel_formula(x_shape, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    skip = rng.standard_normal((x_shape[0], *size, x_shape[3]))
    y, _ = ref.upsample_bilinear(x, size)
    y_skip, _ = ref.upsample_bilinear(x, size, skip)
    np.testing.assert_allclose(y, naive_bilinear(x, size), rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=f"seed={seed}")
    np.testing.assert_allclose(y_skip, y + skip, rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=f"seed={seed}")


@pytest.mark.parametrize("x_shape, size", UPSAMPLE_SHAPES)
def test_upsample_matches_scipy_map_coordinates(x_shape, size, seed):
    """An independent linear interpolator sampled at the align_corners source coordinates."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    (n, h, w, c), (oh, ow) = x_shape, size
    rows = np.arange(oh) * ((h - 1) / (oh - 1) if oh > 1 else 0.0)
    cols = np.arange(ow) * ((w - 1) / (ow - 1) if ow > 1 else 0.0)
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    expected = np.stack([np.stack([ndimage.map_coordinates(x[b, :, :, ch], coords, order=1, mode="nearest")
                                   for ch in range(c)], axis=-1) for b in range(n)])
    np.testing.assert_allclose(ref.upsample_bilinear(x, size)[0], expected, rtol=1e-12, atol=1e-12,
                               err_msg=f"seed={seed}")


def test_upsample_keeps_corners_and_identity(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 7, 3))
    y, _ = ref.upsample_bilinear(x, (9, 13))
    np.testing.assert_array_equal(y[:, [0, 0, -1, -1], [0, -1, 0, -1]], x[:, [0, 0, -1, -1], [0, -1, 0, -1]])
    np.testing.assert_array_equal(ref.upsample_bilinear(x, (5, 7))[0], x)


def test_upsample_without_skip_has_no_skip_gradient(seed):
    rng = np.random.default_rng(seed)
    y, saved = ref.upsample_bilinear(rng.standard_normal((1, 4, 4, 2)), (8, 8))
    dy = rng.standard_normal(y.shape)
    dx, dskip = ref.upsample_bilinear_backward(dy, saved)
    assert dskip is None and dx.shape == (1, 4, 4, 2)
    # Each output is a convex combination of inputs, so the total gradient is conserved.
    np.testing.assert_allclose(dx.sum((1, 2)), dy.sum((1, 2)), rtol=EXACT_RTOL, atol=EXACT_RTOL)


def test_upsample_rejects_wrong_skip_shape():
    with pytest.raises(ValueError, match="upsample_bilinear"):
        ref.upsample_bilinear(np.ones((2, 4, 4, 3)), (8, 8), skip=np.ones((1, 8, 8, 3)))  # would broadcast


# --------------------------------------------------------------------------- sigmoid and attention

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_stable_at_large_magnitude(dtype):
    x = np.array([-1000, -200, -50, -1, 0, 1, 50, 200, 1000], dtype)
    # Overflow, invalid and divide-by-zero are errors; underflow of exp(-1000) to 0 is the correct value.
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        warnings.simplefilter("error")
        s, saved = ref.sigmoid(x)
        (dx,) = ref.sigmoid_backward(np.ones_like(x), saved)
    assert s.dtype == dx.dtype == dtype
    assert s[0] == 0 and s[-1] == 1 and s[4] == 0.5
    assert np.all(np.isfinite(dx)) and dx[0] == dx[-1] == 0
    np.testing.assert_allclose(s, special.expit(x), rtol=1e-15 if dtype == np.float64 else 1e-6)


def test_sigmoid_gradient_keeps_float32_precision_in_the_tails(seed):
    """s * (1 - s) with 1 - s computed as such cancels for large x (float32: 6% off at x = 16, 0
    from 17); with 1 - s as sigmoid(-x) the float32 gradient stays within a few ulps of float64's."""
    x = np.concatenate([[10, 12, 16, 17, 30, -16, -30], np.random.default_rng(seed).uniform(-40, 40, 1000)])
    (dx,) = ref.sigmoid_backward(np.ones(x.size, np.float32), ref.sigmoid(x.astype(np.float32))[1])
    x64 = x.astype(np.float32).astype(np.float64)  # the same inputs, exactly
    # Relative 1e-6, about 8 float32 ulps: exp's rounding, a division, a product.
    np.testing.assert_allclose(dx, special.expit(x64) * special.expit(-x64), rtol=1e-6, err_msg=f"seed={seed}")

def test_sigmoid_matches_expit(seed):
    x = 10 * np.random.default_rng(seed).standard_normal(1000)
    # A few ulps (seen: up to 2 eps over 1e7 samples): exp's own rounding, then one division.
    np.testing.assert_allclose(ref.sigmoid(x)[0], special.expit(x), rtol=1e-15, err_msg=f"seed={seed}")


@pytest.mark.parametrize("residual", [True, False])
def test_attention_mix_formula(residual, seed):
    rng = np.random.default_rng(seed)
    m, t = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    expected = (residual + special.expit(m)) * t
    np.testing.assert_allclose(ref.attention_mix(m, t, residual)[0], expected, rtol=EXACT_RTOL, atol=EXACT_RTOL)
    np.testing.assert_allclose(ref.attention_mix(m, t, residual, from_logits=False)[0], (residual + m) * t,
                               rtol=EXACT_RTOL, atol=EXACT_RTOL)


def test_channel_attention_unit_norm_and_zero_pixel(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 5))
    x[0, 1, 2] = 0  # the eps keeps this pixel's output and gradient finite (both 0 / finite)
    x[1, 2, 3] *= 1e-3  # a pixel of small norm, S ~ 5e-6
    y, saved = ref.channel_attention(x)
    (dx,) = ref.channel_attention_backward(rng.standard_normal(x.shape), saved)
    # Unit norm up to the eps: |y| = sqrt(S / (S + eps)) with S = sum_c x^2, short of 1 by about eps / (2 S):
    # ~1e-7 at the small pixel; a random pixel has S < 0.05 (short by over 1e-11) about one run in 1,500.
    sq = (x * x).sum(-1)
    np.testing.assert_allclose(np.sqrt((y * y).sum(-1)), np.sqrt(sq / (sq + 1e-12)), rtol=EXACT_RTOL)
    np.testing.assert_array_equal(y[0, 1, 2], 0)
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(y, x / np.sqrt((x ** 2).sum(-1, keepdims=True) + 1e-12), rtol=EXACT_RTOL)


def test_spatial_attention_formula(seed):
    x = np.random.default_rng(seed).standard_normal((2, 4, 5, 3))
    mean = x.mean((1, 2), keepdims=True)
    var = ((x - mean) ** 2).mean((1, 2), keepdims=True)
    np.testing.assert_allclose(ref.spatial_attention(x)[0], special.expit((x - mean) / np.sqrt(var + 1e-5)),
                               rtol=EXACT_RTOL, err_msg=f"seed={seed}")


# --------------------------------------------------------------------------- small ops

def test_small_ops_forward(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(ref.add(a, b)[0], a + b)
    np.testing.assert_array_equal(ref.relu(a)[0], np.where(a > 0, a, 0))
    np.testing.assert_allclose(ref.global_avg_pool(a)[0], a.sum((1, 2)) / 12, rtol=EXACT_RTOL, atol=EXACT_RTOL)
    x, w, bias = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    np.testing.assert_allclose(ref.linear(x, w, bias)[0], np.einsum("ni,io->no", x, w) + bias, rtol=EXACT_RTOL,
                               atol=EXACT_RTOL)
    with pytest.raises(ValueError, match="add"):
        ref.add(a, b[:1])  # would broadcast


def test_relu_gradient_is_zero_at_zero():
    x = np.array([-1.0, 0.0, 2.0])
    y, saved = ref.relu(x)
    np.testing.assert_array_equal(ref.relu_backward(np.array([5.0, 6.0, 7.0]), saved)[0], [0, 0, 7])


# --------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_cross_entropy_matches_log_softmax(label_dtype, seed):
    rng = np.random.default_rng(seed)
    logits, labels = 3 * rng.standard_normal((6, 10)), rng.integers(0, 10, 6).astype(label_dtype)
    loss, _ = ref.cross_entropy(logits, labels)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float64
    expected = -special.log_softmax(logits, axis=1)[np.arange(6), labels].mean()
    np.testing.assert_allclose(loss, expected, rtol=EXACT_RTOL, err_msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_is_stable_for_large_logits(dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (1e3 * rng.standard_normal((4, 5))).astype(dtype)
    labels = rng.integers(0, 5, 4)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        loss, saved = ref.cross_entropy(logits, labels)
        shifted_loss, _ = ref.cross_entropy(logits - dtype(500), labels)  # softmax is shift-invariant
        (dlogits,) = ref.cross_entropy_backward(dtype(1), saved)
    assert loss.dtype == dlogits.dtype == dtype
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    expected = -special.log_softmax(logits.astype(np.float64), axis=1)[np.arange(4), labels].mean()
    # Tolerances on the logits' scale (1e3): the loss is ~0 when every label is its row's argmax.
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(shifted_loss, loss, rtol=1e-6, atol=1e-3)


def test_cross_entropy_rejects_bad_labels():
    logits = np.zeros((2, 3)) + 0.5
    with pytest.raises(TypeError, match="cross_entropy"):
        ref.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="cross_entropy"):
        ref.cross_entropy(logits, np.array([0, 3]))


def test_cross_entropy_backward_keeps_float32_for_a_float64_dloss():
    _, saved = ref.cross_entropy(np.ones((2, 3), np.float32), np.array([0, 2]))
    assert ref.cross_entropy_backward(np.asarray(1.0), saved)[0].dtype == np.float32


# --------------------------------------------------------------------------- SGD

@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sgd_step_matches_the_rule_element_by_element(nesterov, dtype, seed):
    """Four steps against the rule written out per element in scalars of the same dtype: bit-for-bit equal."""
    rng = np.random.default_rng(seed)
    lr, momentum, weight_decay = 0.1, 0.9, 1e-4
    param = rng.standard_normal(7).astype(dtype)
    velocity = np.zeros_like(param)  # PyTorch's first step: the buffer starts as g
    expected_p, expected_v = [dtype(p) for p in param], [dtype(0)] * 7
    lr_s, mom_s, wd_s = dtype(lr), dtype(momentum), dtype(weight_decay)
    for _ in range(4):
        grad = rng.standard_normal(7).astype(dtype)
        arguments = (param, grad, velocity)
        snapshots = [a.copy() for a in arguments]
        param, velocity = ref.sgd_step(param, grad, velocity, lr, momentum, weight_decay, nesterov)
        for a, before in zip(arguments, snapshots):
            np.testing.assert_array_equal(a, before)  # pure: new arrays, arguments untouched
        for k in range(7):
            g = grad[k] + wd_s * expected_p[k]
            v = mom_s * expected_v[k] + g
            step = g + mom_s * v if nesterov else v
            expected_p[k], expected_v[k] = expected_p[k] - lr_s * step, v
        assert param.dtype == velocity.dtype == dtype
        np.testing.assert_array_equal(param, np.array(expected_p, dtype), err_msg=f"seed={seed}")
        np.testing.assert_array_equal(velocity, np.array(expected_v, dtype), err_msg=f"seed={seed}")


def test_sgd_step_numpy_float64_hyperparameters_keep_float32():
    param = np.ones(3, np.float32)
    new_param, new_velocity = ref.sgd_step(param, param, np.zeros(3, np.float32), np.float64(0.1),
                                           np.float64(0.9), np.float64(1e-4), nesterov=True)
    assert new_param.dtype == new_velocity.dtype == np.float32
