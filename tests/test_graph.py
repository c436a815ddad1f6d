"""The captured step (ra_kernels/graph.py, ra_kernels/steps.py): on the interpret backend the graph is
the recorded launches, so captured and eager steps are compared bit for bit on a CPU."""
import numpy as np
import pytest

import ra_kernels.functional as F
from ra_kernels import backend, graph, launch, models, steps
from ra_kernels.metrics import TOTALS
from ra_kernels.nn import BatchNorm2d, ConvBnRelu, Linear, Module
from ra_kernels.optim import SGD


class Small(Module):
    """Every kind of op of the network at 4x4: conv+BN+ReLU, a projected residual unit (fan-out and
    add), an attention module of depth 1 (max-pool, upsample, mask head, mix), BN-ReLU, pooling, linear."""

    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.stem = ConvBnRelu(3, 4, 3, 1, 1, rng=rng)
        self.unit = models.ResidualUnit(4, 8, rng=rng)
        self.attention = models.AttentionModule(8, depth=1, p=0, t=1, r=0, rng=rng)
        self.head = BatchNorm2d(8, relu=True)
        self.classifier = Linear(8, 3, rng=rng)

    def forward(self, x):
        x = self.stem(F.to_precision(x))
        return self.classifier(F.global_avg_pool(self.head(self.attention(self.unit(x)))))


def _trainer(seed, capture, warmup=1):
    model = Small(seed)
    optimizer = SGD(model.parameters(), lr=0.1)
    totals = backend.asarray(np.zeros(len(TOTALS), np.float32))
    return model, optimizer, steps.TrainStep(model, optimizer, totals, capture=capture, warmup=warmup)


def _batches(rng, sizes):
    return [(backend.asarray(rng.standard_normal((n, 4, 4, 3)).astype(np.float32)),
             backend.asarray(rng.integers(0, 3, n).astype(np.int64))) for n in sizes]


def _state(model, optimizer, step):
    state = {name: backend.to_numpy(a) for name, a in model.state_dict().items()}
    state.update(velocity=backend.to_numpy(optimizer.velocity), totals=backend.to_numpy(step.totals))
    return state


def _train(seed, capture, batches, lrs, patch=None):
    model, optimizer, step = _trainer(seed, capture)
    if patch is not None:
        patch(optimizer)
    outputs = []
    for (x, y), lr in zip(batches, lrs):
        optimizer.set_lr(lr)
        logits, loss = step(x, y)
        outputs.append((backend.to_numpy(logits).copy(), backend.to_numpy(loss).copy()))
    return _state(model, optimizer, step), outputs, step


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_captured_training_steps_equal_eager_ones_bit_for_bit(triton_backend, rng, precision):
    """Warm-up, capture, replays with new batches and a new learning rate: every parameter,
    velocity, running statistic, the metrics and each step's logits and loss as eager (on cuda a
    real CUDA graph: the same kernels in the same order), in float32 and with bfloat16 activations."""
    seed = int(rng.integers(1 << 30))
    batches, lrs = _batches(rng, [4, 4, 4, 4]), [0.1, 0.1, 0.05, 0.05]
    with backend.use_precision(precision):
        eager, eager_outputs, _ = _train(seed, False, batches, lrs)
        captured, captured_outputs, step = _train(seed, True, batches, lrs)
    shapes, state = step._run.signatures()[0]
    assert step.captured and len(step._run.signatures()) == 1 and shapes == (((4, 4, 4, 3), "<f4"), ((4,), "<i8"))
    assert state == (True, precision, 0.9, 1e-4, True)  # mode, precision, SGD's launch scalars
    for name in eager:
        np.testing.assert_array_equal(captured[name], eager[name], err_msg=name)
    for (a_logits, a_loss), (b_logits, b_loss) in zip(captured_outputs, eager_outputs):
        np.testing.assert_array_equal(a_logits, b_logits)
        np.testing.assert_array_equal(a_loss, b_loss)
    assert eager["totals"][2] == 16 and np.isfinite(eager["totals"]).all()


def test_work_that_is_not_a_kernel_launch_breaks_the_captured_step(rng):
    """The check can fail: a step that zeroes its gradients with a NumPy fill (not a launch) is not
    replayed whole, so the captured run's gradients pile up and its parameters leave the eager ones.
    (Interpret only: a CUDA graph would record a CuPy fill too. The interpret recorder is the
    stricter check, and it keeps every step kernels only, which the launch counts rely on.)"""
    seed = int(rng.integers(1 << 30))
    batches, lrs = _batches(rng, [4, 4, 4]), [0.1] * 3

    def zero_outside_kernels(optimizer):
        optimizer.zero_grad = lambda: optimizer.flat_grads.fill(0)

    with backend.use_backend("interpret"):
        eager, _, _ = _train(seed, False, batches, lrs, zero_outside_kernels)
        captured, _, _ = _train(seed, True, batches, lrs, zero_outside_kernels)
    assert not np.array_equal(captured["velocity"], eager["velocity"])


def test_captured_evaluation_equals_eager_with_a_partial_batch(triton_backend, rng):
    """An eval step with a last partial batch: each batch size its own graph, totals as eager."""
    seed = int(rng.integers(1 << 30))
    batches = _batches(rng, [4, 3, 4, 3, 4, 3])
    results = {}
    for capture in (False, True):
        model = Small(seed)
        model.head.eval()  # frozen inside a training model
        totals = backend.asarray(np.zeros(len(TOTALS), np.float32))
        step = steps.EvalStep(model, totals, capture=capture, warmup=1)
        logits = [backend.to_numpy(step(x, y)[0]).copy() for x, y in batches]
        assert model.training and not model.head.training  # each module's mode is restored
        results[capture] = (backend.to_numpy(totals), logits,
                            {k: backend.to_numpy(v) for k, v in model.state_dict().items()})
    (eager_totals, eager_logits, eager_state), (totals, logits, state) = results[False], results[True]
    np.testing.assert_array_equal(totals, eager_totals)
    assert eager_totals[2] == 21
    for a, b in zip(logits, eager_logits):
        np.testing.assert_array_equal(a, b)
    for name in eager_state:  # eval leaves the running statistics alone
        np.testing.assert_array_equal(state[name], eager_state[name])


def test_a_read_back_to_the_host_during_capture_is_an_error(triton_backend):
    def step(x):
        return backend.to_numpy(x) + 1

    run = graph.StepGraph(step, warmup=1)
    x = backend.asarray(np.ones(3, np.float32))
    np.testing.assert_array_equal(run(x), 2)  # eager: fine
    with pytest.raises(RuntimeError, match="read back to the host while a step was being captured"):
        run(x)
    np.testing.assert_array_equal(backend.to_numpy(x), 1)  # and allowed again after


def test_two_steps_allocate_the_same_arrays_in_the_same_order(rng):
    """What lets a graph's pool serve every replay: the step's allocations repeat exactly."""
    seed = int(rng.integers(1 << 30))
    with backend.use_backend("interpret"):
        model, optimizer, step = _trainer(seed, capture=False)
        x, y = _batches(rng, [4])[0]
        sequences = []
        for _ in range(2):
            sequence = []

            def allocate(shape, dtype, sequence=sequence):
                sequence.append((tuple(np.atleast_1d(shape)), np.dtype(dtype).str))
                return np.empty(shape, dtype)

            with backend.use_allocator(allocate), launch.record_launches(run=False):
                step(x, y)
            sequences.append(sequence)
    assert len(sequences[0]) > 50 and sequences[0] == sequences[1]


def test_step_graph_warms_up_captures_once_per_signature_and_copies_inputs(monkeypatch):
    """The bookkeeping with the capture stubbed: eager calls per signature, one capture each, the
    static buffers refilled at each call, the capture's outputs returned."""
    captures, replays = [], []

    def fake_capture(fn, *static):
        captures.append(static)
        out = np.zeros(1, np.float32)

        def replay():
            replays.append([a.copy() for a in static])
            out[0] = fn(*static)
        return graph.Captured(replay, out, ())

    monkeypatch.setattr(graph, "capture", fake_capture)
    calls = []

    def fn(a):
        calls.append(a)
        return float(a.sum())

    mode = ["train"]
    run = graph.StepGraph(fn, warmup=2, state=lambda: mode[0])
    with backend.use_backend("interpret"):
        full = [np.full(4, i, np.float32) for i in range(5)]
        assert run(full[0]) == 0 and run(full[1]) == 4  # eager warm-up: fn on the caller's arrays
        assert calls == [full[0], full[1]] and not captures
        out = run(full[2])
        assert len(captures) == 1 and captures[0][0] is not full[2]  # captured on a static copy
        assert out[0] == 8 and run(full[3])[0] == 12 and run(full[3]) is out
        assert len(captures) == 1 and [r[0][0] for r in replays] == [2, 3, 3]
        assert all(c is captures[0][0] for c in calls[2:])  # every replay reads the static buffer
        partial = np.ones(3, np.float32)
        assert run(partial) == 3 and run(partial) == 3 and len(captures) == 1  # its own warm-up
        assert run(partial)[0] == 3 and len(captures) == 2
        assert len(run.signatures()) == 2
        mode[0] = "other"  # another state (a mode, a hyperparameter): its own warm-up and graph
        assert run(full[4]) == 16 and run(full[4]) == 16 and len(captures) == 2
        assert run(full[4])[0] == 16 and len(captures) == 3 and len(run.signatures()) == 3


def test_capture_needs_kernels():
    model = Small(0)
    with pytest.raises(ValueError, match="numpy backend runs no kernels"):
        steps.TrainStep(model, SGD(model.parameters()), np.zeros(len(TOTALS), np.float32), capture=True)
    with pytest.raises(RuntimeError, match="nothing to capture"):
        graph.capture(lambda: None)
    assert not steps.TrainStep(model, SGD(model.parameters()), np.zeros(len(TOTALS), np.float32)).captured


def test_a_launch_stopped_partway_leaves_the_arrival_counters_at_zero(rng, monkeypatch):
    """An interpreted launch that raises after some programs counted their arrival (Ctrl-C, an
    error) would leave every later reduction finishing early; the counters are zeroed at once."""
    from ra_kernels.kernels import batchnorm
    with backend.use_backend("interpret"):
        x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
        params = [np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32)]
        batchnorm.batch_norm(x, *params)
        counters = batchnorm.arrival_counters(1)

        class Interrupted:
            def __getitem__(self, grid):
                def some_programs_then_stop(*args, **kwargs):
                    counters[:2] += 1  # two programs counted their arrival
                    raise KeyboardInterrupt
                return some_programs_then_stop

        monkeypatch.setattr(launch, "_interpreted", lambda fn: Interrupted())
        with pytest.raises(KeyboardInterrupt):
            batchnorm.batch_norm(x, *params)
        assert not counters.any()


def test_a_train_step_refuses_an_optimizer_of_another_model():
    """An SGD built over another model's parameters (a notebook cell run again) would train nothing
    and say nothing: refused when the step is made."""
    model, stale = Small(0), Small(0)
    with pytest.raises(ValueError, match="the optimizer updates parameters that are not the model's"):
        steps.TrainStep(model, SGD(stale.parameters()), np.zeros(len(TOTALS), np.float32), capture=False)
    steps.TrainStep(model, SGD(model.parameters()), np.zeros(len(TOTALS), np.float32), capture=False)


def test_steps_check_totals_and_capture_before_any_step():
    """A totals array the metrics cannot take used to be found after the optimizer's update (the
    step failed having updated the parameters; a retry updated them twice), and capture="no" was a
    true value: both are refused when the step is made."""
    model = Small(0)
    good, optimizer = np.zeros(len(TOTALS), np.float32), SGD(model.parameters())
    for totals in (np.zeros(len(TOTALS), np.float64), np.zeros(3, np.float32)):
        with pytest.raises(ValueError, match="TrainStep: totals must be a contiguous \\(4,\\) float32 array"):
            steps.TrainStep(model, optimizer, totals, capture=False)
        with pytest.raises(ValueError, match="EvalStep: totals must be a contiguous"):
            steps.EvalStep(model, totals, capture=False)
    for step in (lambda capture: steps.TrainStep(model, optimizer, good, capture=capture),
                 lambda capture: steps.EvalStep(model, good, capture=capture)):
        with pytest.raises(ValueError, match="Step: capture must be True or False, got 'no'"):
            step("no")
        made = step(np.bool_(False))
        assert not made.captured and made.totals is good
        with pytest.raises(AttributeError):  # a captured step adds into the array it was captured with
            made.totals = np.zeros(len(TOTALS), np.float32)
