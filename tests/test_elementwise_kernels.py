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
