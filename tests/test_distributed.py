"""Data-parallel training under MPI on the numpy backend: ``mpiexec -n 2`` running
tests/distributed_worker.py (each rank a process, as ``mpirun -n 2 python -m train.cifar`` runs).

Skipped without mpi4py and an MPI launcher (``pip install -e '.[mpi]'`` brings both: mpi4py and
MPICH's wheel). Each launch takes a couple of seconds to start; the runs are a few steps of a
tiny network on a synthetic CIFAR-10.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ra_kernels import backend, distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec (pip install -e '.[mpi]' brings both)")

#: Seconds any one launch may take before the test calls it hung.
LAUNCH_TIMEOUT_S = 120


def _launch(*args, ranks=2, timeout=LAUNCH_TIMEOUT_S, program=(str(WORKER),)):
    """``mpiexec -n ranks python WORKER args`` (or another ``program``): (the result, its seconds)."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    started = time.monotonic()
    result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *program, *map(str, args)],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


@needs_mpi
def test_two_ranks_take_the_step_of_one_process_averaging_their_gradients(tmp_path, rng):
    result_path = tmp_path / "step.json"
    result, _ = _launch("step", result_path, int(rng.integers(1 << 30)))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result_path.read_text())
    assert report["slices_differ"]
    for name in ("params", "grads", "statistics"):  # on both ranks, bit for bit
        assert report[name] == [True, True], (name, report["max_difference"])


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    from bench.gpu_check import write_synthetic_cifar10
    return write_synthetic_cifar10(tmp_path_factory.mktemp("cifar"), 80, 20, np.random.default_rng(0))


def _train_args(data, out, *extra):
    return ["--data-dir", data, "--no-download", "--out", out, "--stem", "4", "--widths", "8", "16", "32",
            "--batch-size", "4", "--limit-train", "40", "--epochs", "2", "--backend", "numpy", "--log-every", "2",
            *extra]


def _arrays(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist() if name != "meta.npy"}


@needs_mpi
def test_a_two_rank_run_stops_together_and_resumes_exactly(tiny_cifar, tmp_path):
    """Ctrl-C on one rank stops both after the same step, with a checkpoint; resumed on two ranks
    the run ends with the bits of an uninterrupted one; on one process it is refused."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result, _ = _launch("train", 0, 0, *_train_args(tiny_cifar, whole))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, global batch 8" in result.stdout
    assert result.stdout.count("final test accuracy") == 1  # rank 0 alone prints

    result, _ = _launch("train", 1, 7, *_train_args(tiny_cifar, parts))  # rank 1's Ctrl-C, mid-epoch 2
    assert result.returncode == 130, result.stderr[-3000:]
    assert "epoch 2, after batch 2 of 5, iteration 7" in result.stderr
    assert "mpirun -n 2 python -m train.cifar --out" in result.stderr
    result, _ = _launch("train", 0, 0, "--out", parts, "--resume", ranks=1)
    assert result.returncode == 2 and "trained by 2 processes and this is 1" in result.stderr
    result, _ = _launch("train", 0, 0, "--out", parts, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = _arrays(whole / "last.npz"), _arrays(parts / "last.npz")
    assert sorted(got) == sorted(want) and all(got[name] == want[name] for name in want)
    metrics = [[line.split(",")[:-2] for line in (run / "metrics.csv").read_text().splitlines()]  # no timings
               for run in (whole, parts)]
    assert metrics[0] == metrics[1]


@needs_mpi
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_failed_rank_stops_every_rank(tiny_cifar, tmp_path, how):
    """A rank killed or hung after its second step: the job ends within the collective timeout (plus
    start-up), not never, and says why: MPICH's launcher reports a killed process itself; a hung
    one is found by the other ranks' watchdogs."""
    result, seconds = _launch("fail", 1, 2, how, *_train_args(tiny_cifar, tmp_path / "out", "--collective-timeout",
                                                                 "5"))
    assert result.returncode != 0
    said = result.stdout + result.stderr
    if how == "hang":
        assert "no step completed in 5 s: another rank has failed or hangs" in said
        assert "or a step, evaluation or checkpoint write takes longer than that (then give a larger " \
               "--collective-timeout)" in said   # it cannot tell a slow step from a hung peer
        assert result.returncode == 3
    else:
        assert "no step completed in 5 s" in said or "BAD TERMINATION" in said or "KILLED BY SIGNAL" in said
    assert seconds < 60


@needs_mpi
@pytest.mark.parametrize("option, value, says", [
    ("--data-dir", "/nonexistent", "(rank 1): error: cannot load cifar10 from /nonexistent"),
    ("--lr", "0.5", "the ranks disagree on the run: rank 1 has --lr 0.5 against 0.1 (rank 0's second)"),
])
def test_a_usage_error_on_one_rank_stops_every_rank_at_once(tiny_cifar, tmp_path, option, value, says):
    """Rank 1 alone with other data or other options: the job ends with code 2 at once, saying why,
    not after the collective timeout."""
    result, seconds = _launch("differ", 1, option, value, *_train_args(tiny_cifar, tmp_path / "out"))
    assert result.returncode == 2 and says in result.stderr, result.stderr[-3000:]
    assert seconds < 30


@needs_mpi
def test_ranks_whose_models_drift_apart_are_stopped(tiny_cifar, tmp_path):
    """The models' bits are compared at each epoch end: an exchange that gives one rank other bits
    stops the job there, before a checkpoint of one rank's model passes for the job's."""
    result, _ = _launch("drift", *_train_args(tiny_cifar, tmp_path / "out"))
    assert result.returncode == 3 and "after epoch 1 the ranks' models differ" in result.stderr
    assert not (tmp_path / "out" / "last.npz").exists()


@needs_mpi
def test_the_exchange_benchmark_times_each_network_and_writes_nothing(tmp_path):
    before = (REPO / "bench" / "RESULTS.md").read_text()
    result, _ = _launch("--dry-run", "--backend", "numpy", program=("-m", "bench.allreduce"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| attention56 |") == 1 and "over 2 processes" in result.stdout  # rank 0 alone
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_one_process_is_a_world_of_one(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    world = distributed.World()
    assert (world.rank, world.size, world.distributed) == (0, 1, False)
    values = np.arange(4, dtype=np.float32)
    assert world.allreduce_mean(values) is values and values.tolist() == [0, 1, 2, 3]
    assert world.gather_host(values).shape == (1, 4) and world.any(True) and not world.any(False)


@pytest.mark.gpu
def test_nccl_inside_the_captured_step_gives_the_single_process_step(rng):
    """One rank of NCCL in the captured step: the all-reduce is recorded in the graph and, over one
    rank, changes nothing, so the parameters are those of the step without it, bit for bit."""
    from ra_kernels.metrics import TOTALS
    from ra_kernels.models import ResidualAttentionNet
    from ra_kernels.optim import SGD
    from ra_kernels.steps import TrainStep

    class OneRankOfNccl(distributed.World):
        distributed = True  # take the NCCL path with one rank

    seed = int(rng.integers(1 << 30))
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 4)
    params = []
    with backend.use_backend("cuda"):
        for world in (None, OneRankOfNccl()):
            model = ResidualAttentionNet(1, stem=4, widths=(8, 16, 32), num_classes=5, seed=seed)
            optimizer = SGD(model.parameters(), lr=0.1)
            exchange = None if world is None else distributed.DataParallel(model, optimizer, world).exchange
            step = TrainStep(model, optimizer, backend.asarray(np.zeros(len(TOTALS), np.float32)), capture=True,
                             exchange=exchange)
            for _ in range(4):  # two eager warm-up steps, then the captured graph twice
                step(backend.asarray(x), backend.asarray(labels))
            params.append(backend.to_numpy(optimizer.flat_params))
    assert np.array_equal(*params)
