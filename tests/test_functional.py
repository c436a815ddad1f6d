"""ra_kernels.functional on the numpy backend: the wiring from ops to reference/.

reference/ is proven by its own finite-difference tests; here the question is
whether each Function passes the right arguments to it, returns the gradients in
the right order and updates running statistics in place. The last test checks a
whole small graph of every op against central finite differences in float64.
"""
import numpy as np
import pytest

import reference as ref
from ra_kernels import backend, launch
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor


def leaf(rng, *shape):
    return Tensor(rng.standard_normal(shape), requires_grad=True)


def test_conv_bn_relu_forward_backward_and_running_stats(rng):
    x, w, gamma, beta = leaf(rng, 2, 7, 9, 3), leaf(rng, 3, 3, 3, 5), leaf(rng, 5), leaf(rng, 5)
    rm, rv = rng.standard_normal(5), rng.random(5) + 0.5
    rm_before, rv_before = rm.copy(), rv.copy()
    y = F.conv_bn_relu(x, w, gamma, beta, rm, rv, stride=2, padding=1, momentum=0.3)
    want, want_rm, want_rv, saved = ref.conv_bn_relu(x.data, w.data, gamma.data, beta.data, rm_before,
                                                     rv_before, stride=2, padding=1, momentum=0.3)
    np.testing.assert_array_equal(y.data, want)
    np.testing.assert_array_equal(rm, want_rm)  # updated in place
    np.testing.assert_array_equal(rv, want_rv)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    for tensor, grad in zip((x, w, gamma, beta), ref.conv_bn_relu_backward(dy, saved)):
        np.testing.assert_array_equal(tensor.grad, grad)


def test_batch_norm_eval_leaves_running_stats(rng):
    x, gamma, beta = leaf(rng, 2, 3, 3, 4), leaf(rng, 4), leaf(rng, 4)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    rm_before, rv_before = rm.copy(), rv.copy()
    y = F.batch_norm(x, gamma, beta, rm, rv, training=False, relu=True)
    np.testing.assert_array_equal(rm, rm_before)
    np.testing.assert_array_equal(rv, rv_before)
    want = np.maximum((x.data - rm) / np.sqrt(rv + 1e-5) * gamma.data + beta.data, 0)
    # the terms reach ~10 and may cancel (seed 1964606314: a result of 2.1e-4 one float64 ulp of 1
    # away, 1.1e-12 relative), so the bound has an absolute part of a few ulps of such terms
    np.testing.assert_allclose(y.data, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_skip", [False, True])
def test_upsample_passes_size_and_skip(rng, with_skip):
    x = leaf(rng, 1, 5, 7, 2)
    skip = leaf(rng, 1, 9, 13, 2) if with_skip else None
    y = F.upsample_bilinear(x, (9, 13), skip=skip)
    want, saved = ref.upsample_bilinear(x.data, (9, 13), None if skip is None else skip.data)
    np.testing.assert_array_equal(y.data, want)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    dx, dskip = ref.upsample_bilinear_backward(dy, saved)
    np.testing.assert_array_equal(x.grad, dx)
    if with_skip:
        np.testing.assert_array_equal(skip.grad, dskip)


def test_cross_entropy_is_a_scalar_loss(rng):
    logits = leaf(rng, 4, 10)
    labels = rng.integers(0, 10, 4)
    loss = F.cross_entropy(logits, labels)
    assert loss.shape == ()
    loss.backward()
    p = np.exp(logits.data - logits.data.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), labels] -= 1
    np.testing.assert_allclose(logits.grad, p / 4, rtol=1e-10, atol=1e-15)


def _whole_graph(x, w, gamma, beta, rm, rv, w_fc, b_fc, labels, mix_residual):
    """Every op of the contract in one float64 graph, ending in a scalar loss."""
    h = F.conv_bn_relu(x, w, gamma, beta, rm, rv, padding=1, relu=False)       # (2, 6, 7, 4)
    trunk = F.add(F.relu(h), h)
    pooled = F.max_pool2d(h)                                                    # (2, 3, 4, 4)
    mask = F.upsample_bilinear(pooled, (6, 7), skip=h)
    mixed = F.attention_mix(mask, trunk, residual=mix_residual)
    attended = F.add(F.channel_attention(mixed), F.spatial_attention(mixed))
    feature = F.add(F.sigmoid(attended), F.batch_norm(attended, gamma, beta, rm, rv))
    return F.cross_entropy(F.linear(F.global_avg_pool(feature), w_fc, b_fc), labels)


@pytest.mark.parametrize("mix_residual", [True, False])
def test_whole_graph_against_finite_differences(rng, mix_residual):
    # Steps of 1e-6 move the conv output h by far less than 1e-4, so inputs whose h lies 1e-4 or
    # more from every ReLU and max-pool kink keep each difference quotient on one smooth piece
    # (drawn freely, about one run in a few hundred put a kink inside a step: seen once in a
    # run of the suite, 2026-11-30).
    shapes = [(2, 6, 7, 3), (3, 3, 3, 4), (4,), (4,), None, None, (4, 5), (5,)]
    params = [None if v is None else Tensor(v.astype(np.float64), requires_grad=True)
              for v in _away_from_kinks(rng, shapes)]
    labels = rng.integers(0, 5, 2)

    def loss_value(*arrays):
        # Running stats do not affect training-mode outputs; fresh ones each call keep it pure.
        args = [Tensor(a) if a is not None else None for a in arrays]
        args[4], args[5] = np.zeros(4), np.ones(4)
        return float(_whole_graph(*args, labels, mix_residual).data)

    args = list(params)
    args[4], args[5] = np.zeros(4), np.ones(4)
    _whole_graph(*args, labels, mix_residual).backward()

    arrays = [p.data if p is not None else None for p in params]
    h = 1e-6
    for p, a in zip(params, arrays):
        if p is None:
            continue
        numeric = np.empty_like(a)
        for i in np.ndindex(a.shape):
            keep = a[i]
            a[i] = keep + h
            up = loss_value(*arrays)
            a[i] = keep - h
            down = loss_value(*arrays)
            a[i] = keep
            numeric[i] = (up - down) / (2 * h)
        # Central differences in float64: truncation O(h^2) ~ 1e-12 and rounding
        # O(1e-16 / h) ~ 1e-10 on a loss of order 1, so 1e-6 is a wide but clear margin.
        np.testing.assert_allclose(p.grad, numeric, rtol=1e-6, atol=1e-8)


def _away_from_kinks(rng, shapes, margin=1e-4, draws=20):
    """Values for _whole_graph whose float64 conv output h (what the ReLU and the max-pool see)
    lies at least ``margin`` from the ReLU's kink, and whose max-pool windows each have one winner
    by at least ``margin``. Float32 computations of h are ~1e-6 from it here, so then every side
    takes the float64 branch at every kink, and the gradients differ by rounding alone."""
    for _ in range(draws):
        values = [None if s is None else rng.standard_normal(s).astype(np.float32) for s in shapes]
        x, w, gamma, beta = (v.astype(np.float64) for v in values[:4])
        h = ref.conv_bn_relu(x, w, gamma, beta, np.zeros(4), np.ones(4), padding=1, relu=False)[0]
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)  # max_pool2d's 3x3/2/1
        windows = np.sort(np.stack([padded[:, i:i + 6:2, j:j + 8:2] for i in range(3) for j in range(3)], -1), -1)
        if np.abs(h).min() >= margin and (windows[..., -1] - windows[..., -2]).min() >= margin:
            return values
    pytest.fail(f"no draw in {draws} kept {margin} away from every ReLU and max-pool kink")


@pytest.mark.parametrize("mix_residual", [True, False])
def test_whole_graph_kernels_match_numpy_backend(triton_backend, rng, mix_residual):
    """The graph of every op through the kernels in float32, against the numpy backend in float64
    (the truth): each array within 1e-4 of its scale plus ten times the error of the numpy
    backend in float32 (the yardstick) on the same instance, as bench.step holds a whole step.

    The test used to compare the kernels with the numpy backend in float32 directly, at 1e-4 of
    the scale, and failed now and then (seed 87574639). The cause is not a kink but
    conditioning: dgamma is a sum over positions of terms that cancel, and when spatial attention
    standardises a channel of small spread it amplifies rounding in those terms, so float32 gets
    some dgamma elements only to ~1e-4 of the array's scale, whoever computes it. At that seed the
    numpy backend in float32 was 2.0e-4 of the scale from float64, the interpreter 2.8e-5: the
    excess was reference/'s own. Against float64 with twice the yardstick, 1 of 400 instances
    still failed (seed 1246917527: interpreter 3.0e-4, numpy float32 9.4e-5, the spatial std of one
    channel 0.06 against 3 to 6 for the others); a wrong kernel (a 0.1% slip) is ~1e-3 off
    everywhere, well-conditioned arrays included.
    """
    shapes = [(2, 6, 7, 3), (3, 3, 3, 4), (4,), (4,), None, None, (4, 5), (5,)]
    values = _away_from_kinks(rng, shapes)
    labels = rng.integers(0, 5, 2)
    results = {}
    for side, name, dtype in (("truth", "numpy", np.float64), ("yardstick", "numpy", np.float32),
                              ("kernels", triton_backend, np.float32)):
        with backend.use_backend(name):
            params = [None if v is None else Tensor(backend.asarray(v.astype(dtype)), requires_grad=True)
                      for v in values]
            args = list(params)
            args[4], args[5] = backend.asarray(np.zeros(4, dtype)), backend.asarray(np.ones(4, dtype))
            loss = _whole_graph(*args, backend.asarray(labels), mix_residual)
            loss.backward()
            results[side] = [backend.to_numpy(a).astype(np.float64) for a in
                             [loss.data] + [p.grad for p in params if p is not None] + [args[4], args[5]]]
    for i, (truth, yardstick, kernels) in enumerate(zip(*(results[s] for s in ("truth", "yardstick", "kernels")))):
        scale = np.abs(truth).max()
        yardstick_error, kernel_error = np.abs(yardstick - truth).max(), np.abs(kernels - truth).max()
        assert kernel_error <= 1e-4 * scale + 10 * yardstick_error, \
            f"array {i}: kernels {kernel_error:.2e}, numpy float32 {yardstick_error:.2e}, scale {scale:.2e}"


def test_backward_follows_the_backend_and_precision_of_the_forward(triton_backend, rng):
    """A backward called under another backend and precision than its forward's (numpy and IEEE here)
    runs each op as its forward ran: the same kernels, in the same precision, as a backward under
    the forward's, so the same bits."""
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 5, 3), (3, 3, 3, 4)))
    dy = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)

    def forward():
        xt, wt = Tensor(backend.asarray(x), requires_grad=True), Tensor(backend.asarray(w), requires_grad=True)
        return xt, wt, F.relu(F.conv2d(xt, wt, padding=1))

    with backend.use_backend(triton_backend), backend.use_precision("tf32"):
        x_in, w_in, y = forward()
        with launch.record_launches() as inside:
            y.backward(backend.asarray(dy))
        x_out, w_out, y = forward()
        seed = backend.asarray(dy)
    with backend.use_backend("numpy"), backend.use_precision("ieee"), launch.record_launches() as outside:
        y.backward(seed)
    assert [c.kernel_fn.__name__ for c in outside] == [c.kernel_fn.__name__ for c in inside]
    assert {c.constexprs.get("INPUT_PRECISION") for c in outside} == {None, "tf32"}
    for inner, outer in ((x_in, x_out), (w_in, w_out)):
        np.testing.assert_array_equal(backend.to_numpy(outer.grad), backend.to_numpy(inner.grad))


@pytest.mark.parametrize("name", ["numpy", "interpret", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_losses_add_and_their_0d_gradients_accumulate(name, rng):
    """Losses are 0-d: a sum of them is an op like any other on every backend (NumPy's arithmetic
    on 0-d arrays returns scalars, which the ops refuse and which cannot be added into), and a
    0-d leaf's gradient accumulates over backward calls."""
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    first, second = rng.integers(0, 4, 3), rng.integers(0, 4, 3)
    value = np.float32(rng.standard_normal())
    with backend.use_backend(name):
        lt = Tensor(backend.asarray(logits), requires_grad=True)
        a, b = F.cross_entropy(lt, backend.asarray(first)), F.cross_entropy(lt, backend.asarray(second))
        total = F.add(F.add(a, b), a)
        total.backward()
        t = Tensor(backend.asarray(np.array(value)), requires_grad=True)
        for _ in range(2):
            F.sigmoid(t).backward()
    assert total.data.shape == () and t.grad.shape == ()
    softmax = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(1, keepdims=True)
    expected = (2 * (softmax - np.eye(4)[first]) + (softmax - np.eye(4)[second])) / 3
    np.testing.assert_allclose(backend.to_numpy(lt.grad), expected, rtol=1e-5, atol=1e-6)
    s = 1 / (1 + np.exp(-float(value)))
    np.testing.assert_allclose(float(backend.to_numpy(t.grad)), 2 * s * (1 - s), rtol=1e-5)


@pytest.mark.parametrize("op", ["conv2d", "conv_bn_relu"])
def test_convs_skip_the_input_gradient_nobody_wants(triton_backend, rng, monkeypatch, op):
    """The stem conv's input is the image: autograd knows nothing wants its gradient, and the conv
    ops then launch no dgrad kernel. The weight's gradient is the same as with it."""
    from ra_kernels.kernels import conv as conv_kernels

    launched, launch = [], conv_kernels.launch
    monkeypatch.setattr(conv_kernels, "launch", lambda kernel, *a, **k: (launched.append(kernel.__name__),
                                                                        launch(kernel, *a, **k))[1])
    x = backend.asarray(rng.standard_normal((2, 6, 7, 3)).astype(np.float32))
    w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((3, 3, 3, 4), (2, 6, 7, 4)))
    gamma, beta = (backend.asarray(rng.uniform(0.5, 1.5, 4).astype(np.float32)) for _ in range(2))

    def backward(x_wants_grad):
        xt = Tensor(x, requires_grad=True) if x_wants_grad else x
        wt = Tensor(backend.asarray(w), requires_grad=True)
        if op == "conv2d":
            y = F.conv2d(xt, wt, padding=1)
        else:
            y = F.conv_bn_relu(xt, wt, gamma, beta, backend.asarray(np.zeros(4, np.float32)),
                               backend.asarray(np.ones(4, np.float32)), padding=1)
        launched.clear()
        y.backward(backend.asarray(dy))
        return backend.to_numpy(wt.grad), list(launched)

    dw_with_dx, kernels_with_dx = backward(True)
    dw, kernels = backward(False)
    assert "conv2d_dgrad_kernel" in kernels_with_dx and "conv2d_dgrad_kernel" not in kernels
    assert "conv2d_wgrad_kernel" in kernels
    np.testing.assert_array_equal(dw, dw_with_dx)


def test_reference_conv_backward_skips_dx_when_asked(rng):
    x, w, dy = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal((2, 3, 3, 4))
    _, saved = ref.conv2d(x, w, stride=2, padding=1)
    dx, dw = ref.conv2d_backward(dy, saved)
    no_dx, same_dw = ref.conv2d_backward(dy, saved, need_dx=False)
    assert dx is not None and no_dx is None
    np.testing.assert_array_equal(same_dw, dw)
