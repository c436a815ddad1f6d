"""The cost of data parallelism's exchange: one step's all-reduces, timed between processes.

    mpiexec -n 2 python -m bench.allreduce           # the CIFAR and ImageNet networks' buffers
    mpiexec -n 2 python -m bench.allreduce --dry-run # 2 repetitions, nothing written

What a data-parallel step exchanges (ra_kernels/distributed.py): the flat gradient buffer (one
float32 per parameter) and the batch-norm running statistics, each averaged over the ranks by
``World.allreduce_mean``: MPI's Allreduce on host arrays, NCCL on CuPy arrays (the current
backend decides). Each size is timed by wall clock over ``--repeats`` exchanges after two
warm-up ones, median, with a barrier before each so that every rank starts together. Reported
per network: bytes, milliseconds, the algorithm bandwidth (bytes / time) and the bus bandwidth
(x 2 (n - 1) / n, what a ring all-reduce moves over each link: comparable across rank counts).
Rank 0 prints the table and, unless a dry run, appends it to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ra_kernels import backend, distributed, models
from train.common import positive_int

from . import common

#: The networks whose step exchange is timed: CIFAR-10 (10 classes) and ImageNet (1,000).
NETWORKS = {"attention56": lambda: models.attention56(num_classes=10),
            "attention92": lambda: models.attention92(num_classes=10),
            "imagenet56": lambda: models.imagenet_attention56(num_classes=1000),
            "imagenet92": lambda: models.imagenet_attention92(num_classes=1000)}


def exchange_sizes(name: str) -> tuple[int, int]:
    """(parameters, running-statistics values) of network ``name``: the two buffers of its step."""
    with backend.use_backend("numpy"):
        model = NETWORKS[name]()
    return (sum(p.data.size for p in model.parameters()), sum(b.size for _, b in model.named_buffers()))


def time_exchange(world, sizes, repeats: int) -> float:
    """Median seconds of one step's exchange: an all-reduce-mean of each buffer of ``sizes``."""
    xp = backend.xp()
    buffers = [xp.ones(size, dtype=np.float32) for size in sizes]
    samples = []
    for repeat in range(repeats + 2):
        world.comm.Barrier()
        started = time.perf_counter()
        for buffer in buffers:
            world.allreduce_mean(buffer)
        backend.to_numpy(buffers[-1][:1])  # waits for the device
        if repeat >= 2:
            samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="mpiexec -n N python -m bench.allreduce",
                                     description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
                        help="networks whose exchange is timed (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed exchanges per network (default: 20)")
    parser.add_argument("--backend", choices=("auto",) + backend.BACKENDS, default="auto",
                        help="numpy: MPI on host arrays; cuda: NCCL on the GPU (default: cuda when there is one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="RESULTS.md is appended here (default: bench/)")
    parser.add_argument("--dry-run", action="store_true", help="2 repetitions, the CIFAR networks, nothing written")
    args = parser.parse_args(argv)
    if not args.dry_run:  # nothing is written in a dry run
        common.checked_out(parser, args.out)
    if args.dry_run:
        args.repeats, args.networks = 2, [n for n in args.networks if not n.startswith("imagenet")] or ["attention56"]
    args.command = "mpiexec -n N python -m bench.allreduce " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    world = distributed.world()
    if not world.distributed:
        print("bench.allreduce times an exchange between processes: start it with mpiexec -n 2 (or more)",
              file=sys.stderr)
        return 2
    if not common.chosen_backend("python -m bench.allreduce", args.backend):
        return 2
    world.select_device()
    rows = []
    for name in args.networks:
        sizes = exchange_sizes(name)
        seconds = time_exchange(world, sizes, args.repeats)
        nbytes = 4 * sum(sizes)
        algorithm = nbytes / seconds / 1e9
        rows.append([name, f"{sizes[0]:,}", f"{sizes[1]:,}", f"{nbytes / 2**20:.1f}", f"{seconds * 1e3:.2f}",
                     f"{algorithm:.2f}", f"{2 * (world.size - 1) / world.size * algorithm:.2f}"])
    if world.rank != 0:
        return 0
    from mpi4py import MPI
    how = "NCCL" if backend.get_backend() == "cuda" else MPI.Get_library_version().splitlines()[0].strip()
    table = common.markdown_table(["network", "parameters", "statistics", "MiB", "ms", "algorithm GB/s",
                                   "bus GB/s"], rows)
    text = (f"One step's exchange over {world.size} processes ({how}, backend {backend.get_backend()}), median of "
            f"{args.repeats}:\n\n{table}")
    print(text)
    if not args.dry_run:
        env = common.environment(None, args.command.replace("-n N", f"-n {world.size}"))
        common.append_results(args.out / "RESULTS.md", f"## bench.allreduce, {env['date']}\n\n"
                              f"{common.describe_environment(env)}\n\n{text}")
        print(f"\nappended to {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
