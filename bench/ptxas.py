"""What ptxas makes of the matrix-product kernels a training step launches: registers, spills, and
wgmma instructions it had to serialise. Runs on a CPU (Triton ships ptxas).

    python -m bench.ptxas                                  # attention92, batch 64, sm_90
    python -m bench.ptxas --models attention56 attention92 --verbose

The step is ``bench.host``'s (the eager attention training step on the interpret backend, launches
recorded and not run). Each launch of the chosen kernels is turned into the specialisation Triton
would compile for it (``aot.launch_spec``: its constexprs, types, the integers equal to 1 and those
divisible by 16), each distinct one is compiled for ``sm_<capability>`` past Triton's cache, and
ptxas's own report is read (``aot.ptxas_report``). Counts are of launches per step. The compiler is
the installed Triton's: a GPU machine with another Triton release may differ, so run it there too.

"Serialised wgmma" is ptxas's warning C7515 ("wgmma.mma_async instructions are serialized due to
non wgmma instructions defining accumulator registers of a wgmma between start and end of the
pipeline stage"): the asynchronous matrix products of a K step then run one after another instead
of overlapping. Whether it costs time is for a GPU to say (``bench.kernels``); this finds where.
"""
from __future__ import annotations

import argparse
import collections
import sys

from tqdm import tqdm

from ra_kernels import aot, backend, launch, models

from .common import markdown_table
from .host import step_on_stubs

GEMM_KERNELS = ("conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel", "matmul_kernel")


def step_launches(name: str, batch: int) -> list:
    """The launches of one eager training step of ``name`` at ``batch``, recorded and not run."""
    step, inputs, allocator = step_on_stubs(name, batch)
    allocator.new_step()
    with backend.use_allocator(allocator), launch.record_launches(run=False) as launches:
        step(*inputs)
    return launches


def audit(launches, kernels=GEMM_KERNELS, capability: int = 90, progress: bool = False) -> list:
    """[(kernel name, constexprs, launch count, PtxasReport)], one per distinct specialisation of
    ``launches`` whose kernel is in ``kernels``, in order of first launch; ``progress``: a bar on
    stderr over the compiles (about a second each)."""
    counts, first = collections.Counter(), {}
    for call in launches:
        if call.kernel_fn.__name__ in kernels:
            spec, divisible = aot.launch_spec(call)
            key = (call.kernel_fn, tuple(sorted(spec.items())), frozenset(divisible), call.num_warps)
            counts[key] += 1
            first.setdefault(key, call)
    rows = []
    for key, n in tqdm(counts.items(), desc="compiling", unit="kernel", disable=not progress, leave=False):
        kernel_fn, spec, divisible, num_warps = key
        report = aot.ptxas_report(kernel_fn, dict(spec), capability, divisible=divisible, num_warps=num_warps)
        rows.append((kernel_fn.__name__, first[key].constexprs, n, report))
    return rows


def summary(rows) -> list:
    """Per kernel: [name, launches, specialisations, most registers, launches spilling, launches with
    serialised wgmma]."""
    table = {}
    for name, _, n, report in rows:
        entry = table.setdefault(name, [name, 0, 0, 0, 0, 0])
        entry[1] += n
        entry[2] += 1
        entry[3] = max(entry[3], report.registers)
        entry[4] += n * (report.spill_bytes > 0)
        entry[5] += n * report.serialized_wgmma
    return list(table.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ptxas", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(models.MODELS), default=["attention92"])
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--capability", type=int, default=90, choices=[80, 90],
                        help="compute capability compiled for (default: 90, the H100/H200)")
    parser.add_argument("--verbose", action="store_true", help="also one row per specialisation")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be at least 2 (batch norm in training)")
    for name in args.models:
        rows = audit(step_launches(name, args.batch), capability=args.capability, progress=True)
        print(f"\n{name}, batch {args.batch}, sm_{args.capability}, triton {aot.triton.__version__}:\n")
        print(markdown_table(["kernel", "launches", "specialisations", "most registers", "launches spilling",
                              "launches with serialised wgmma"], summary(rows)))
        if args.verbose:
            print()
            print(markdown_table(["kernel", "launches", "registers", "spill bytes", "serialised", "constexprs"],
                                 [[k, n, r.registers, r.spill_bytes, "yes" if r.serialized_wgmma else "",
                                   " ".join(f"{c}={v}" for c, v in consts.items() if c != "BLOCK_T")]
                                  for k, consts, n, r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
