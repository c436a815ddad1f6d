"""add and relu kernels (interpret backend; cuda too on a GPU) against reference/.

Outputs are NaN-poisoned before each kernel runs (conftest), so an element a
kernel fails to write fails the comparison. The comparisons are exact: float32
addition is correctly rounded on every backend, and relu and its mask only
select values, so any difference is a bug, not rounding.
"""
import numpy as np
import pytest

import reference as ref
from ra_kernels import backend
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor
from ra_kernels.kernels import elementwise

# Flat sizes around the kernel's block of 1,024: partial, exact and multi-block tiles.
SHAPES = [(1,), (7, 9), (1023,), (1024,), (2, 5, 7, 3), (3, 33, 31)]


def _tensor(a):
    return Tensor(backend.asarray(a), requires_grad=True)


def _host(a):
    return backend.to_numpy(a)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_forward_backward(triton_backend, rng, shape):
    a_np, b_np, dy_np = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    a, b = _tensor(a_np), _tensor(b_np)
    y = F.add(a, b)
    expected, saved = ref.add(a_np, b_np)
    np.testing.assert_array_equal(_host(y.data), expected)
    y.backward(backend.asarray(dy_np))
    da, db = ref.add_backward(dy_np, saved)
    np.testing.assert_array_equal(_host(a.grad), da)
    np.testing.assert_array_equal(_host(b.grad), db)


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_forward_backward(triton_backend, rng, shape):
    x_np, dy_np = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    x_np.flat[0] = 0.0  # the kink itself: gradient 0 there, as in the reference
    x = _tensor(x_np)
    y = F.relu(x)
    expected, saved = ref.relu(x_np)
    np.testing.assert_array_equal(_host(y.data), expected)
    y.backward(backend.asarray(dy_np))
    (dx,) = ref.relu_backward(dy_np, saved)
    np.testing.assert_array_equal(_host(x.grad), dx)


def test_kernel_writes_every_element(triton_backend, rng):
    # With poisoning on, a NaN in the output can only come from a missing store.
    x = backend.asarray(rng.standard_normal(4097).astype(np.float32))
    y = F.relu(F.add(x, x)).data
    assert not np.isnan(_host(y)).any()


def test_relu_chain_matches_numpy_backend(triton_backend, rng):
    # The same small graph on both paths: gradients agree exactly.
    x_np = rng.standard_normal((4, 6)).astype(np.float32)
    results = []
    for name in ("numpy", triton_backend):
        with backend.use_backend(name):
            x = _tensor(x_np)
            h = F.relu(x)
            y = F.add(F.relu(F.add(h, x)), h)
            y.backward(backend.asarray(np.ones_like(x_np)))
            results.append((_host(y.data), _host(x.grad)))
    for got, want in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, want)


def test_relu_keeps_nan_and_infinities(triton_backend):
    # As PyTorch: relu(NaN) is NaN (compiled, tl.maximum needs PropagateNan.ALL for that; see
    # test_aot.test_compiled_relus_keep_nan), relu(inf) = inf, relu(-inf) = 0.
    x = np.array([np.nan, -1.0, 2.0, np.inf, -np.inf, -0.0], np.float32)
    y = backend.to_numpy(F.relu(backend.asarray(x)).data)
    np.testing.assert_array_equal(y, [np.nan, 0.0, 2.0, np.inf, 0.0, 0.0])


# --------------------------------------------------------------------------- bfloat16 storage (issue 14)

BF16_U = backend.BFLOAT16_ROUNDOFF


def test_stores_round_to_nearest_even_into_bfloat16(triton_backend, rng):
    # Every class of float32 (random bit patterns: normals, subnormals, infinities, NaN) and the
    # edges: stored into bfloat16, the bits are those of ml_dtypes' round to nearest, ties to even
    # (= cvt.rn.bf16.f32). triton 3.6's interpreter truncates a plain .to(tl.bfloat16), which gets
    # 1.6699 (between 1.6640625 and 1.671875, nearer the latter) and the tie 1.66796875 (to the even
    # 1.671875) wrong: launch._fix_interpreter_bfloat16 mends it.
    edges = np.array([1.6699, -1.6699, 1.66796875, 1.00390625, 3.3961775e38, 3.4028235e38, -3.4028235e38,
                      np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, np.nan], np.float32)
    x = np.concatenate([rng.integers(0, 2 ** 32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32), edges])
    out = backend.empty(x.shape, backend.BFLOAT16)
    elementwise._run("copy", backend.asarray(x), backend.asarray(x), out)
    got = _host(out)
    nan = np.isnan(x)
    with np.errstate(invalid="ignore"):
        want = x.astype(backend.BFLOAT16)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan].astype(np.float32)).all()


@pytest.mark.parametrize("op", ["add", "relu", "relu_backward", "copy", "fill"])
@pytest.mark.parametrize("out_type", ["bfloat16", "float32"])
def test_ops_in_bfloat16(triton_backend, rng, op, out_type):
    # bfloat16 operands, computed in float32, stored as out_type. Against float64 from the same
    # bfloat16 values: the float32 result of add is exact here (two 8-bit significands whose
    # exponents differ by far less than 16), the others only select values, so the one error is
    # the store's rounding, <= BF16_U relative into bfloat16 and none into float32. And bit for bit
    # against ml_dtypes' rounding of the float32 result.
    shape = (3, 33, 31)
    a, b = (rng.standard_normal(shape).astype(backend.BFLOAT16) for _ in range(2))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = {"add": a64 + b64, "relu": np.maximum(a64, 0.0), "relu_backward": np.where(b64 > 0, a64, 0.0),
             "copy": a64, "fill": np.full(shape, 0.3)}[op]
    out = backend.empty(shape, np.dtype(out_type) if out_type == "float32" else backend.BFLOAT16)
    elementwise._run(op, backend.asarray(a), backend.asarray(b), out, value=0.3)
    got = _host(out).astype(np.float64)
    bound = BF16_U * np.abs(exact) if out_type == "bfloat16" else 2.0 ** -24 * np.abs(exact)
    assert (np.abs(got - exact) <= bound).all(), np.abs(got - exact).max()
    np.testing.assert_array_equal(_host(out), exact.astype(np.float32).astype(out.dtype))


def test_cast_rounds_to_nearest_even_and_its_gradient_comes_back_in_the_input_type(triton_backend, rng):
    # F.cast (the network's input under precision "bf16"): forward bit for bit ml_dtypes' rounding of
    # the float32 values; backward the bfloat16 gradient widened to float32, which is exact.
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(backend.BFLOAT16)
    t = Tensor(backend.asarray(x), requires_grad=True)
    y = F.cast(t, backend.BFLOAT16)
    np.testing.assert_array_equal(_host(y.data).view(np.uint16), x.astype(backend.BFLOAT16).view(np.uint16))
    y.backward(backend.asarray(dy))
    assert t.grad.dtype == np.float32
    np.testing.assert_array_equal(_host(t.grad), dy.astype(np.float32))
    back = F.cast(y.data, np.float32).data  # and back: bfloat16 values are float32 values
    np.testing.assert_array_equal(_host(back), x.astype(backend.BFLOAT16).astype(np.float32))


def test_reference_cast_is_numpys_conversion(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y, saved = ref.cast(x, np.float64)
    assert y.dtype == np.float64 and np.array_equal(y, x)
    (dx,) = ref.cast_backward(np.full((3, 4), 1 / 3), saved)
    assert dx.dtype == np.float32 and np.array_equal(dx, np.full((3, 4), 1 / 3, np.float32))
