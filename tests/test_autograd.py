"""The autograd engine on its own, with small Functions defined here (NumPy)."""
import re

import numpy as np
import pytest

from ra_kernels.autograd import Function, Tensor, no_grad


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved
        return dy * b, dy * a


class Scale(Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.factor, None  # no gradient for the constant factor


class SplitHalves(Function):
    """Two outputs: the first and second half of a vector."""

    @staticmethod
    def forward(ctx, x):
        ctx.half = x.shape[0] // 2
        return x[:ctx.half].copy(), x[ctx.half:].copy()

    @staticmethod
    def backward(ctx, d_first, d_second):
        zeros = np.zeros(ctx.half)
        return (np.concatenate([zeros if d_first is None else d_first,
                                zeros if d_second is None else d_second]),)


class Sum(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return np.asarray(x.sum())

    @staticmethod
    def backward(ctx, dy):
        return (np.broadcast_to(dy, ctx.shape).copy(),)


def test_diamond_accumulates(rng):
    # y = (x * w) * (x * v): x feeds two branches that meet again.
    x, w, v = (Tensor(rng.standard_normal(5), requires_grad=True) for _ in range(3))
    left, right = Mul.apply(x, w), Mul.apply(x, v)
    Sum.apply(Mul.apply(left, right)).backward()
    np.testing.assert_allclose(x.grad, 2 * x.data * w.data * v.data, rtol=1e-13)
    np.testing.assert_allclose(w.grad, x.data ** 2 * v.data, rtol=1e-13)
    np.testing.assert_allclose(v.grad, x.data ** 2 * w.data, rtol=1e-13)


def test_same_tensor_twice_in_one_op(rng):
    x = Tensor(rng.standard_normal(4), requires_grad=True)
    Sum.apply(Mul.apply(x, x)).backward()
    np.testing.assert_allclose(x.grad, 2 * x.data, rtol=1e-14)


def test_leaf_grads_accumulate_over_backward_calls(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    Sum.apply(Scale.apply(x, 2.0)).backward()
    Sum.apply(Scale.apply(x, 3.0)).backward()
    np.testing.assert_allclose(x.grad, np.full(3, 5.0))


def test_leaf_grad_accumulates_in_place_into_an_existing_array(rng):
    # An optimizer keeps every gradient as a view of one flat buffer: backward must fill it.
    flat = np.zeros(5)
    x = Tensor(rng.standard_normal(5), requires_grad=True)
    x.grad = flat[:]
    Sum.apply(Scale.apply(x, 3.0)).backward()
    np.testing.assert_array_equal(flat, np.full(5, 3.0))
    assert x.grad.base is flat


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, dy):
        return dy, dy  # the same array for both: not new


class Identity(Function):
    @staticmethod
    def forward(ctx, x):
        return x.copy()

    @staticmethod
    def backward(ctx, dy):
        return (dy,)  # passed through: not new


class ScaleNew(Scale):
    """Scale, declaring that its backward always returns a new array (``new_grads``)."""
    new_grads = (0,)


class ScaleInto(ScaleNew):
    """ScaleNew that adds its gradient into the array the engine offers, and records the offer."""
    offers = []

    @staticmethod
    def backward(ctx, dy):
        into = ctx.grad_into[0]
        ScaleInto.offers.append(into)
        if into is None:
            return dy * ctx.factor, None
        into += dy * ctx.factor
        return into, None


def test_a_second_consumer_adds_into_the_first_ones_new_gradient(rng):
    # h feeds ScaleNew and ScaleInto; whichever runs backward first, the gradient is 2 + 3 = 5 per
    # element, and when ScaleNew's (a new array, so the engine's own) is there first, ScaleInto is
    # offered that very array and adds into it: so in one of the two orders of the sum's operands.
    used = []
    for new_first in (True, False):
        ScaleInto.offers.clear()
        x = Tensor(rng.standard_normal(4), requires_grad=True)
        h = Scale.apply(x, 1.0)
        a, b = ScaleNew.apply(h, 2.0), ScaleInto.apply(h, 3.0)
        Sum.apply(Add.apply(a, b) if new_first else Add.apply(b, a)).backward()
        np.testing.assert_allclose(x.grad, np.full(4, 5.0), rtol=1e-15)
        (offer,) = ScaleInto.offers
        if offer is not None:
            np.testing.assert_allclose(offer, np.full(4, 5.0), rtol=1e-15)
            used.append(new_first)
    assert len(used) == 1, "ScaleInto runs second in one order, and is then offered ScaleNew's array"


@pytest.mark.parametrize("pass_first", [True, False])
def test_a_gradient_an_op_passes_through_is_never_added_into(rng, pass_first):
    # Add hands the caller's grad to both branches, Identity passes it on to h: that array is not the
    # engine's, so ScaleInto must not be offered it (it would overwrite the caller's array).
    ScaleInto.offers.clear()
    x = Tensor(rng.standard_normal(4), requires_grad=True)
    h = Scale.apply(x, 1.0)
    a, b = Identity.apply(h), ScaleInto.apply(h, 3.0)
    y = Add.apply(a, b) if pass_first else Add.apply(b, a)
    grad = rng.standard_normal(4)
    kept = grad.copy()
    y.backward(grad)
    np.testing.assert_array_equal(grad, kept)
    np.testing.assert_allclose(x.grad, 4 * kept, rtol=1e-15)
    assert all(o is not grad for o in ScaleInto.offers)


def test_long_chain_has_no_recursion_limit(rng):
    # 2,000 recorded ops, far deeper than Python's default recursion limit of 1,000.
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    y = x
    for i in range(2000):
        y = Scale.apply(y, 1.0 + (-1) ** i * 1e-3)
    Sum.apply(y).backward()
    factor = np.prod([1.0 + (-1) ** i * 1e-3 for i in range(2000)])
    np.testing.assert_allclose(x.grad, np.full(3, factor), rtol=1e-12)


def test_no_grad_records_nothing(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    with no_grad():
        y = Scale.apply(x, 2.0)
    assert y.node is None and not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        Sum.apply(y).backward()
    z = Scale.apply(x, 2.0)  # recording is back on after the block
    assert z.requires_grad and z.node is not None


def test_inputs_without_grad_are_not_recorded(rng):
    y = Scale.apply(Tensor(rng.standard_normal(3)), 2.0)
    assert y.node is None and not y.requires_grad


def test_non_leaf_grads_are_freed_unless_retained(rng):
    x = Tensor(rng.standard_normal(4), requires_grad=True)
    hidden = Scale.apply(x, 3.0)
    kept = Scale.apply(hidden, 2.0).retain_grad()
    Sum.apply(kept).backward()
    assert hidden.grad is None
    np.testing.assert_array_equal(kept.grad, np.ones(4))
    np.testing.assert_allclose(x.grad, np.full(4, 6.0))


def test_constant_inputs_get_no_grad(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    c = Tensor(rng.standard_normal(3))
    Sum.apply(Mul.apply(x, c)).backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, c.data)


def test_multiple_outputs_one_used(rng):
    x = Tensor(rng.standard_normal(6), requires_grad=True)
    first, second = SplitHalves.apply(x)
    Sum.apply(Scale.apply(second, 4.0)).backward()
    np.testing.assert_allclose(x.grad, np.r_[np.zeros(3), np.full(3, 4.0)])


def test_multiple_outputs_both_used(rng):
    x = Tensor(rng.standard_normal(6), requires_grad=True)
    first, second = SplitHalves.apply(x)
    Sum.apply(Mul.apply(first, second)).backward()
    np.testing.assert_allclose(x.grad, np.r_[x.data[3:], x.data[:3]])


def test_backward_needs_explicit_grad_for_non_scalars(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    y = Scale.apply(x, 2.0)
    with pytest.raises(RuntimeError, match="single-element"):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        y.backward(np.ones(4))
    dy = rng.standard_normal(3)
    y.backward(dy)
    np.testing.assert_allclose(x.grad, 2.0 * dy)


def test_backward_of_wrong_arity_is_reported(rng):
    class Broken(Add):
        @staticmethod
        def backward(ctx, dy):
            return (dy,)  # one gradient for two inputs

    a, b = (Tensor(rng.standard_normal(2), requires_grad=True) for _ in range(2))
    with pytest.raises(RuntimeError, match="Broken.backward returned 1 gradients for 2 inputs"):
        Sum.apply(Broken.apply(a, b)).backward()


def test_saved_state_is_freed_after_backward(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    y = Scale.apply(x, 2.0)
    Sum.apply(y).backward()
    assert y.node.ctx is None


def test_repr_shows_small_values_like_pytorch(rng):
    def shown(text):
        return [float(v) for v in re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", text)]

    value = rng.standard_normal(2).astype(np.float32)
    loss = Tensor(value.sum(dtype=np.float32), requires_grad=True)
    assert re.fullmatch(r"Tensor\(\S+, requires_grad=True\)", repr(loss))
    assert shown(repr(loss)) == pytest.approx([value.sum()], abs=1e-4)
    small = repr(Tensor(value.astype(np.float64)))
    assert small.startswith("Tensor([") and small.endswith("], dtype=float64)")
    assert shown(small) == pytest.approx(value.tolist(), abs=1e-4)
    assert repr(Tensor(np.zeros((8, 9), np.float32))) == "Tensor(shape=(8, 9), dtype=float32)"


def test_a_backward_seed_must_fit_the_tensor(rng):
    """Kernels index gradients as C-contiguous arrays of the tensor's dtype: a transposed view or an
    integer seed was read wrongly (interpret backend) instead of refused."""
    x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    y = Scale.apply(x, 2.0)
    seed = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"grad must be a C-contiguous array .* \(3, 4\) .*, not C-contiguous"):
        y.backward(seed.T)
    with pytest.raises(ValueError, match=r"dtype float64, got shape \(3, 4\) and dtype int64"):
        y.backward(np.ones((3, 4), np.int64))
    with pytest.raises(TypeError, match=r"backward\(\): grad must be a NumPy or CuPy array"):
        y.backward(Tensor(seed.T.copy()))
    assert x.grad is None                               # nothing ran
    y.backward(seed.T.copy())
    np.testing.assert_array_equal(x.grad, 2.0 * seed.T)


def test_a_leaf_grad_that_does_not_fit_is_refused_before_anything_is_added(rng):
    a, b = (Tensor(rng.standard_normal((2, 3)), requires_grad=True) for _ in range(2))
    a.grad, b.grad = np.zeros((2, 3)), np.zeros((3, 2)).T  # b's: the right shape, strided
    with pytest.raises(ValueError, match=r"a leaf's grad must be a C-contiguous array .* not C-contiguous"):
        Sum.apply(Mul.apply(a, b)).backward()
    assert not a.grad.any() and not b.grad.any()
    b.grad = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) .* got shape \(3, 2\)"):
        Sum.apply(Mul.apply(a, b)).backward()


def test_a_second_backward_through_a_freed_graph_is_refused_and_adds_nothing(rng):
    a, b = (Tensor(rng.standard_normal(3), requires_grad=True) for _ in range(2))
    y = Mul.apply(a, b)
    loss = Sum.apply(y)
    loss.backward()
    first = a.grad.copy()
    for again in (loss, Sum.apply(Scale.apply(y, 3.0))):  # the same loss, and a new one on the same trunk
        with pytest.raises(RuntimeError, match="differentiated already.*compute the forward again"):
            again.backward()
        np.testing.assert_array_equal(a.grad, first)


class Square(Function):
    """x * x computed as NumPy computes on 0-d arrays: scalars out, forward and backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved
        return 2 * x * dy


def test_numpy_scalars_from_an_op_become_0d_arrays_that_accumulate(rng):
    """On 0-d arrays NumPy's arithmetic returns scalars, which are immutable: the engine makes them
    0-d arrays, so that a leaf's gradient accumulates over backward calls."""
    value = rng.standard_normal()
    x = Tensor(np.array(value), requires_grad=True)
    y = Square.apply(x)
    assert type(y.data) is np.ndarray and y.data.shape == ()
    for calls in (1, 2):
        Square.apply(x).backward()
        assert type(x.grad) is np.ndarray
        np.testing.assert_allclose(x.grad, calls * 2 * value, rtol=1e-15)


def test_a_read_only_leaf_grad_is_refused_before_anything_is_added(rng):
    a, b = (Tensor(rng.standard_normal(3), requires_grad=True) for _ in range(2))
    a.grad, b.grad = np.zeros(3), np.zeros(3)
    a.grad.flags.writeable = False
    with pytest.raises(ValueError, match="a leaf's grad is a read-only array"):
        Sum.apply(Mul.apply(a, b)).backward()
    assert not a.grad.any() and not b.grad.any()
