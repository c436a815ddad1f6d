"""ra_kernels.optim: SGD over flat buffers against reference.sgd_step per parameter; the schedules.

The flat-buffer optimizer must give exactly what a loop of reference.sgd_step
over each parameter gives: bit for bit on the numpy backend (the same float32
operations on the same values, elementwise), and within float32 rounding on the
kernels (see _assert_close). Parameters and gradients must be views of the flat
buffers, so that autograd writes gradients where the single launch reads them.
"""
import math

import numpy as np
import pytest

import reference as ref
import ra_kernels.functional as F
from ra_kernels import backend, nn
from ra_kernels.optim import SGD, cosine_schedule, paper_schedule

SHAPES = [(3, 3, 4, 5), (7,), (4, 6), (1,), (2, 1, 3)]  # conv, vector, matrix, scalar-like, odd


@pytest.fixture(params=["numpy", "interpret", pytest.param("cuda", marks=pytest.mark.gpu)])
def any_backend(request):
    with backend.use_backend(request.param):
        yield request.param


def _parameters(rng):
    return [nn.Parameter(backend.asarray(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]


def _host(a):
    return backend.to_numpy(a)


def _assert_close(got, want, what, exact):
    """Bitwise on numpy; else within 1e-6 of the values' scale.

    The kernel may contract a multiply-add into an FMA (one rounding instead of
    two): each of the 4 multiply-adds of a step can then differ by one float32
    rounding (EPS = 6e-8) of its operands' magnitude, which the parameters and
    gradients here (standard normal, lr <= 0.1) bound by a few units; over
    3 steps that stays well below 1e-6 times the largest value.
    """
    got = _host(got)
    if exact:
        assert np.array_equal(got, want), f"{what}: differs from the reference loop"
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 1e-4), (False, 1e-4), (True, 0.0), (False, 0.0)])
def test_step_matches_reference_loop(any_backend, rng, nesterov, weight_decay):
    params = _parameters(rng)
    want_params = [_host(p.data).copy() for p in params]
    want_velocity = [np.zeros_like(w) for w in want_params]
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    for step, lr in enumerate([0.1, 0.05, 0.01]):
        opt.set_lr(lr)
        opt.zero_grad()
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad[...] = backend.asarray(g)  # in place, as autograd accumulates
        opt.step()
        for i, g in enumerate(grads):
            want_params[i], want_velocity[i] = ref.sgd_step(want_params[i], g, want_velocity[i], np.float32(lr),
                                                            0.9, weight_decay, nesterov)
        exact = any_backend == "numpy"
        for i, p in enumerate(params):
            _assert_close(p.data, want_params[i], f"step {step}: parameter {i}", exact)
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES])
        for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
            _assert_close(opt.velocity[start:stop], want_velocity[i].reshape(-1), f"step {step}: velocity {i}",
                          exact)


def _tiny_net(rng):
    return nn.Sequential(nn.Linear(6, 5, rng=rng), nn.Linear(5, 3, rng=rng))


def _loss(net, x, y):
    return F.cross_entropy(F.relu(net(x)), y)


def test_parameters_and_gradients_are_views_of_the_flat_buffers(rng):
    net, twin = _tiny_net(np.random.default_rng(1)), _tiny_net(np.random.default_rng(1))
    before = [p.data.copy() for p in net.parameters()]
    opt = SGD(net.parameters())
    for p, value in zip(net.parameters(), before):
        assert np.shares_memory(p.data, opt.flat_params) and p.data.flags.c_contiguous
        assert np.shares_memory(p.grad, opt.flat_grads) and p.grad.flags.c_contiguous
        assert np.array_equal(p.data, value)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    grad_views = [p.grad for p in net.parameters()]
    _loss(net, x, y).backward()
    _loss(twin, x, y).backward()  # no optimizer: fresh gradient arrays
    assert all(p.grad is view for p, view in zip(net.parameters(), grad_views))
    want = np.concatenate([p.grad.reshape(-1) for p in twin.parameters()])
    assert np.array_equal(opt.flat_grads, want) and np.abs(want).max() > 0


def test_zero_grad_keeps_the_views(rng):
    net = _tiny_net(rng)
    opt = SGD(net.parameters())
    x, y = rng.standard_normal((4, 6)).astype(np.float32), rng.integers(0, 3, 4)
    _loss(net, x, y).backward()
    first = opt.flat_grads.copy()
    views = [p.grad for p in net.parameters()]
    opt.zero_grad()
    assert not opt.flat_grads.any() and all(p.grad is v for p, v in zip(net.parameters(), views))
    _loss(net, x, y).backward()
    assert np.array_equal(opt.flat_grads, first)  # landed in the buffer again, not accumulated on stale values


def _batch(rng):
    return rng.standard_normal((4, 6)).astype(np.float32), rng.integers(0, 3, 4)


def test_module_zero_grad_keeps_the_views_too(rng):
    net = _tiny_net(rng)
    opt = SGD(net.parameters())
    _loss(net, *_batch(rng)).backward()
    net.zero_grad()
    assert not opt.flat_grads.any()
    assert all(p.grad.base is opt.flat_grads or p.grad.base is opt.flat_grads.base for p in net.parameters())


def test_rebinding_a_gradient_is_an_error(rng):
    net = _tiny_net(rng)
    opt = SGD(net.parameters())
    net.parameters()[0].grad = None  # the optimizer would no longer see this gradient
    with pytest.raises(RuntimeError, match="had its grad replaced"):
        opt.step()


def test_state_dict_round_trip(any_backend, rng):
    params = _parameters(rng)
    opt = SGD(params, lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=False)
    for _ in range(2):
        for p in params:
            p.grad[...] = backend.asarray(rng.standard_normal(p.shape).astype(np.float32))
        opt.step()
    state = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    clone_params = [nn.Parameter(backend.asarray(_host(p.data).copy())) for p in params]
    clone = SGD(clone_params)  # the defaults: every hyperparameter must come from the state
    clone.load_state_dict(state)
    assert (clone.momentum, clone.weight_decay, clone.nesterov) == (0.8, 1e-3, False)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    for optimizer, ps in ((opt, params), (clone, clone_params)):
        for p, g in zip(ps, grads):
            p.grad[...] = backend.asarray(g)
        optimizer.step()
    assert np.array_equal(_host(clone.flat_params), _host(opt.flat_params))
    assert np.array_equal(_host(clone.velocity), _host(opt.velocity))
    assert np.array_equal(_host(clone.lr), np.float32([0.05]))


@pytest.mark.parametrize("lr, says", [(np.float32([np.nan]), "the learning rate must be a finite number >= 0"),
                                      (np.float32([-0.1]), "the learning rate must be a finite number >= 0"),
                                      (np.float32([]), "lr must be one value, got 0")])
def test_a_state_that_cannot_be_loaded_changes_nothing(rng, lr, says):
    opt = SGD(_parameters(rng), lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=False)
    opt.velocity[...] = backend.asarray(rng.standard_normal(opt.velocity.shape).astype(np.float32))
    before = opt.state_dict()
    other = dict(velocity=rng.standard_normal(opt.velocity.shape).astype(np.float32), lr=lr,
                 momentum=np.array(0.5), weight_decay=np.array(0.0), nesterov=np.array(True))
    with pytest.raises(ValueError, match=says):
        opt.load_state_dict(other)
    after = opt.state_dict()
    assert all(np.array_equal(after[k], before[k]) for k in before), "a failed load changed the optimizer"

def test_bad_arguments(rng):
    params = _parameters(rng)
    with pytest.raises(ValueError, match="empty"):
        SGD([])
    with pytest.raises(ValueError, match="more than once"):
        SGD([params[0], params[0]])
    with pytest.raises(TypeError, match="float32"):
        SGD([nn.Parameter(np.zeros(3))])
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(params, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        SGD(params, lr=float("nan"))
    for name, value, says in (("lr", "0.1", "the learning rate must be a number, got '0.1'"),
                              ("lr", True, "the learning rate must be a number, got True"),
                              ("weight_decay", "1e-4", "weight_decay must be a number, got '1e-4'"),
                              ("momentum", None, "momentum must be a number, got None"),
                              ("momentum", float("inf"), "momentum must be a finite number >= 0, got inf"),
                              ("nesterov", "yes", "nesterov must be True or False, got 'yes'")):
        with pytest.raises(ValueError, match=f"SGD.*: {says}"):
            SGD(params, **{name: value})
    with pytest.raises(ValueError, match="total_iterations must be an integer >= 1, got 2.5"):
        paper_schedule(0.1, 2.5)
    opt = SGD(params)
    with pytest.raises(ValueError, match="learning rate"):
        opt.set_lr(-1.0)
    state = opt.state_dict()
    state["velocity"] = state["velocity"][:-1]
    with pytest.raises(ValueError, match="velocity has shape"):
        opt.load_state_dict(state)
    with pytest.raises(KeyError, match="lr"):
        opt.load_state_dict({"velocity": state["velocity"]})


def test_hyperparameters_are_checked_when_assigned_and_the_rate_is_set_by_set_lr(any_backend, rng):
    """SGD.lr is the device array every step reads: assigning a number to it is refused on every
    backend (it had been used silently on numpy and had failed inside the interpreter's launch).
    momentum, weight_decay and nesterov may be assigned between steps: each is checked as the
    constructor checks it, a refused one changes nothing, and an accepted one is what the next step
    uses. A 0-d NumPy array is taken as the number it holds."""
    params = _parameters(rng)
    opt = SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    with pytest.raises(AttributeError, match=r"set_lr\(0.5\)"):
        opt.lr = 0.5
    assert _host(opt.lr).tolist() == [np.float32(0.05)]
    opt.set_lr(np.array(0.25))
    for name, value, says in (("momentum", -1.0, "momentum must be a finite number >= 0, got -1"),
                              ("momentum", 0.0, "Nesterov momentum needs momentum > 0"),
                              ("weight_decay", "0.1", "weight_decay must be a number"),
                              ("nesterov", 1, "nesterov must be True or False, got 1")):
        with pytest.raises(ValueError, match=says):
            setattr(opt, name, value)
    assert (opt.momentum, opt.weight_decay, opt.nesterov) == (0.9, 1e-4, True)
    opt.nesterov, opt.momentum, opt.weight_decay = False, np.float32(0.5), np.array(0.125)
    assert (opt.momentum, opt.weight_decay, opt.nesterov) == (0.5, 0.125, False)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    for p, g in zip(params, grads):
        p.grad[...] = backend.asarray(g)
    before = [_host(p.data).copy() for p in params]
    opt.step()
    for p, w, g in zip(params, before, grads):
        expected, _ = ref.sgd_step(w, g, np.zeros_like(w), 0.25, 0.5, 0.125, False)
        _assert_close(p.data, expected, "a parameter after the step", exact=any_backend == "numpy")


def test_paper_schedule_boundaries():
    lr = paper_schedule(0.1, 160_000)
    values = {it: lr(it) for it in (0, 63_999, 64_000, 95_999, 96_000, 159_999, 200_000)}
    assert values == {0: 0.1, 63_999: 0.1, 64_000: 0.01, 95_999: 0.01, 96_000: 0.001,
                      159_999: 0.001, 200_000: 0.001}
    scaled = paper_schedule(0.2, 1_000)  # milestones at 40% and 60%
    assert [scaled(i) for i in (399, 400, 599, 600)] == [0.2, 0.02, 0.02, 0.002]
    odd = paper_schedule(0.1, 7)  # 2.8 and 4.2 round down to 2 and 4
    assert [odd(i) for i in range(7)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001]


def test_cosine_schedule_values():
    lr = cosine_schedule(0.1, 1_000)
    assert lr(0) == 0.1
    assert math.isclose(lr(500), 0.05, rel_tol=1e-12)
    assert math.isclose(lr(250), 0.05 * (1 + math.cos(math.pi / 4)), rel_tol=1e-12)
    assert lr(1_000) == 0.0 and lr(5_000) == 0.0
    assert all(lr(i) > lr(i + 1) for i in range(999))


@pytest.mark.parametrize("schedule", [paper_schedule, cosine_schedule])
def test_schedule_bad_arguments(schedule):
    with pytest.raises(ValueError, match="total_iterations"):
        schedule(0.1, 0)
    with pytest.raises(ValueError, match="base_lr"):
        schedule(-0.1, 10)
    with pytest.raises(ValueError, match="iteration"):
        schedule(0.1, 10)(-1)


def test_linear_scaling_ramps_to_the_scaled_rate():
    from ra_kernels.optim import linear_scaling, paper_schedule
    base = paper_schedule(0.1, 1000)  # divided by 10 at 400 and 600
    scaled = linear_scaling(base, 4, warmup_iterations=100)
    assert [scaled(i) for i in (0, 50, 100, 399, 400, 999)] == pytest.approx([0.1, 0.25, 0.4, 0.4, 0.04, 0.004])
    assert linear_scaling(base, 1, 100)(50) == base(50) and linear_scaling(base, 2, 0)(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="factor must be a finite number >= 1, got 0.5"):
        linear_scaling(base, 0.5, 10)
    with pytest.raises(ValueError, match="iteration must be an integer >= 0, got -1"):
        base(-1)
