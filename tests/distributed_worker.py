"""What each rank runs in tests/test_distributed.py, started by ``mpiexec -n N python THIS SCENARIO ...``.

Scenarios:

* ``step RESULT SEED``: one data-parallel training step of a tiny network, in training mode,
  each rank on its slice of a batch; rank 0 then computes the same step in one process (each
  slice's gradient from the same initial state, their mean, the SGD update; the running
  statistics' mean) and writes to RESULT (JSON) whether every rank's parameters, gradients and
  running statistics are those, bit for bit.
* ``train INTERRUPT_RANK INTERRUPT_AT ARGS...``: ``train.cifar.main(ARGS)`` on every rank; rank
  INTERRUPT_RANK sends itself Ctrl-C after iteration INTERRUPT_AT (0: never). Exits with main's code.
* ``differ RANK OPTION VALUE ARGS...``: ``train.cifar.main(ARGS)``, with ``OPTION VALUE`` added on
  rank RANK alone.
* ``drift ARGS...``: ``train.cifar.main(ARGS)`` with rank 1's exchange off by one part in 10**4.
* ``fail RANK AT HOW ARGS...``: as train, but rank RANK, after iteration AT, is killed
  (HOW = "kill": SIGKILL) or stops answering (HOW = "hang": SIGSTOP).
"""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ra_kernels import backend, distributed  # noqa: E402
from ra_kernels import functional as F  # noqa: E402
from ra_kernels.metrics import TOTALS  # noqa: E402
from ra_kernels.models import ResidualAttentionNet  # noqa: E402
from ra_kernels.optim import SGD  # noqa: E402
from ra_kernels.steps import TrainStep  # noqa: E402

TINY = dict(modules_per_stage=1, stem=4, widths=(8, 16, 32), num_classes=5)
PER_RANK = 3  # images per rank: the tiny network's 2x2 mask levels then normalise 12 values


def _model_and_optimizer(seed):
    model = ResidualAttentionNet(**TINY, seed=seed)
    return model, SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)


def step(result_path, seed):
    world = distributed.world()
    backend.set_backend("numpy")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((PER_RANK * world.size, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, TINY["num_classes"], len(x))
    mine = slice(world.rank * PER_RANK, (world.rank + 1) * PER_RANK)

    model, optimizer = _model_and_optimizer(seed)
    parallel = distributed.DataParallel(model, optimizer, world)
    TrainStep(model, optimizer, np.zeros(len(TOTALS), np.float32), capture=False,
              exchange=parallel.exchange)(x[mine], labels[mine])
    gathered = {name: world.gather_host(array) for name, array in
                (("params", optimizer.flat_params), ("grads", optimizer.flat_grads),
                 ("statistics", parallel.flat_statistics))}
    if world.rank != 0:
        return 0

    # One process: each slice's gradient and statistics from the same initial state, then their means.
    model, optimizer = _model_and_optimizer(seed)
    statistics = distributed.DataParallel(model, optimizer, distributed.World()).flat_statistics
    initial = statistics.copy()
    grads, stats = [], []
    for rank in range(world.size):
        statistics[...] = initial
        optimizer.zero_grad()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        F.cross_entropy(model(x[part]), labels[part]).backward()
        grads.append(optimizer.flat_grads.copy())
        stats.append(statistics.copy())
    # The same arithmetic as the all-reduce: a sum in rank order, then one division.
    mean_grad, mean_stats = grads[0].copy(), stats[0].copy()
    for g, s in zip(grads[1:], stats[1:]):
        mean_grad += g
        mean_stats += s
    mean_grad /= world.size
    mean_stats /= world.size
    optimizer.flat_grads[...] = mean_grad
    optimizer.step()
    want = {"params": optimizer.flat_params, "grads": mean_grad, "statistics": mean_stats}
    report = {name: [bool(np.array_equal(row, want[name])) for row in gathered[name]] for name in want}
    report["max_difference"] = {name: float(np.abs(gathered[name] - want[name]).max()) for name in want}
    report["slices_differ"] = not np.array_equal(grads[0], grads[1])  # the comparison means something
    Path(result_path).write_text(json.dumps(report))
    return 0


def _train(argv, hook):
    from train import cifar
    return cifar.main(argv, after_step=hook)


def train(interrupt_rank, interrupt_at, argv):
    world = distributed.world()

    def hook(run):
        if world.rank == interrupt_rank and run.position["iteration"] == interrupt_at:
            signal.raise_signal(signal.SIGINT)
    return _train(argv, hook)


def differ(rank, option, value, argv):
    return _train(argv + [option, value] if distributed.world().rank == rank else argv, None)


def drift(argv):
    world = distributed.world()
    exact = world.allreduce_mean

    def off(array):
        exact(array)
        if world.rank == 1:
            array *= np.float32(1.0001)
        return array
    world.allreduce_mean = off
    return _train(argv, None)


def fail(failing_rank, at, how, argv):
    world = distributed.world()

    def hook(run):
        if world.rank == failing_rank and run.position["iteration"] == at:
            # SIGSTOP freezes every thread, this rank's watchdog too: the others' must find it.
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    return _train(argv, hook)


if __name__ == "__main__":
    scenario, rest = sys.argv[1], sys.argv[2:]
    if scenario == "step":
        sys.exit(step(rest[0], int(rest[1])))
    if scenario == "train":
        sys.exit(train(int(rest[0]), int(rest[1]), rest[2:]))
    if scenario == "differ":
        sys.exit(differ(int(rest[0]), rest[1], rest[2], rest[3:]))
    if scenario == "drift":
        sys.exit(drift(rest))
    if scenario == "fail":
        sys.exit(fail(int(rest[0]), int(rest[1]), rest[2], rest[3:]))
    sys.exit(f"unknown scenario {scenario!r}")
