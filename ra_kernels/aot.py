"""Ahead-of-time compilation of every registered kernel, without a GPU.

The interpreter accepts code that the compiler rejects (Python control flow on
tensor values, shapes that are not powers of two, unsupported dtypes); compiling
each kernel for real targets catches that on a CPU-only machine. Triton ships its
own ptxas, so this goes all the way to a cubin.

    python -m ra_kernels.aot          # compile everything for sm_80 and sm_90

:func:`ptxas_report` reads what ptxas says of a compiled kernel (registers, spills, wgmma it
had to serialise) and :func:`launch_spec` turns a recorded launch into its specialisation, so
that the kernels a real step launches can be examined on a CPU (bench/ptxas.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import time
from typing import NamedTuple

import numpy as np
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels  # noqa: F401  (imports every family: they register themselves)
from .backend import BFLOAT16
from .launch import KERNELS, Launch

# (compute capability, aligned). A real launch specialises pointers and integers that are
# multiples of 16 as such, and the compiler then vectorises loads (128-bit) where it can;
# odd sizes (C = 3) take the scalar path. Compiling each specialisation unaligned for sm_80
# and aligned for sm_90 covers both code paths and both targets at the cost of two compiles.
TARGETS = ((80, False), (90, True))
CAPABILITIES = tuple(cap for cap, _ in TARGETS)


def compile_kernel(kernel_fn, spec: dict, capability: int, aligned: bool = False, divisible=None, num_warps=4):
    """Compile one specialisation of a registered kernel for ``sm_<capability>``.

    ``spec`` maps every parameter to a Triton type string or, for a constexpr
    parameter, its value (see ``launch.kernel``); an integer value for an integer
    parameter compiles it as that constant, as Triton does at launch with an argument
    equal to 1 (see :func:`with_integers_one`). ``aligned``: every pointer and integer
    argument is taken as a multiple of 16, as Triton specialises them at launch;
    ``divisible`` (names), when given, says which ones instead.
    """
    names = [p.name for p in kernel_fn.params]
    if sorted(spec) != sorted(names):
        raise ValueError(f"{kernel_fn.__name__}: AOT spec names {sorted(spec)}, "
                         f"the kernel takes {names}")
    constexprs = dict(constexpr_values(kernel_fn, spec))
    constexprs.update({n: v for n, v in spec.items() if not isinstance(v, str)})
    signature = {n: "constexpr" if n in constexprs else spec[n] for n in names}
    if divisible is None:
        divisible = {n for n in names if aligned and signature[n][:1] in "*i"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in divisible} or None
    source = ASTSource(kernel_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"enable_fp_fusion": True, "num_warps": num_warps})


_POINTER_TYPES = {np.dtype(np.float32): "*fp32", BFLOAT16: "*bf16", np.dtype(np.int32): "*i32",
                  np.dtype(np.int64): "*i64", np.dtype(np.int8): "*i8", np.dtype(np.uint8): "*u8"}


def launch_spec(call: Launch):
    """(spec, divisible) of a recorded launch: the specialisation Triton compiles for it, in the form
    :func:`compile_kernel` takes. As Triton does at launch: an integer equal to 1 becomes a constant,
    integers and pointers that are multiples of 16 are taken as such (pointers by the address the
    array has here: on the interpret backend, NumPy's), arrays are typed by their dtype, floats are
    fp32."""
    spec, divisible = dict(call.constexprs), set()
    for param, arg in zip([p for p in call.kernel_fn.params if not p.is_constexpr], call.args):
        if hasattr(arg, "data_ptr"):
            spec[param.name] = _POINTER_TYPES[np.dtype(arg.dtype)]
            if arg.data_ptr() % 16 == 0:
                divisible.add(param.name)
        elif isinstance(arg, (int, np.integer)) and not isinstance(arg, bool):
            spec[param.name] = 1 if arg == 1 else "i32"
            if arg != 1 and arg % 16 == 0:
                divisible.add(param.name)
        else:
            spec[param.name] = "fp32"
    return spec, divisible


class PtxasReport(NamedTuple):
    """What ptxas reports of one compiled kernel: registers per thread, bytes of registers spilled to
    local memory (stores), and whether it serialised the kernel's wgmma instructions (Hopper's
    asynchronous matrix products then wait for one another)."""
    registers: int
    spill_bytes: int
    serialized_wgmma: bool


def parse_ptxas_log(text: str) -> PtxasReport:
    """The :class:`PtxasReport` of ``ptxas -v`` output for one kernel."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if registers is None or spills is None:
        raise ValueError(f"not a ptxas -v report: {text[:200]!r}")
    return PtxasReport(int(registers.group(1)), int(spills.group(1)),
                       "wgmma.mma_async instructions are serialized" in text)


def ptxas_report(kernel_fn, spec: dict, capability: int, aligned: bool = False, divisible=None,
                 num_warps=4) -> PtxasReport:
    """Compile as :func:`compile_kernel` does, past Triton's cache, and read the report of the ptxas
    run that Triton makes itself (its ptxas, its options; Triton passes -v and prints the log on
    request)."""
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compile_kernel(kernel_fn, spec, capability, aligned, divisible, num_warps)
    return parse_ptxas_log(log.getvalue())


def constexpr_values(kernel_fn, spec: dict) -> dict:
    """The constexpr part of an AOT spec."""
    return {p.name: spec[p.name] for p in kernel_fn.params if p.is_constexpr}


def with_integers_one(kernel_fn, spec: dict) -> dict:
    """``spec`` with every integer argument equal to 1. Triton passes an int argument equal to 1
    as a constexpr, a Python int inside the kernel (``n.to(...)`` fails there; ``tl.cast`` works)."""
    integers = {p.name for p in kernel_fn.params if not p.is_constexpr and spec[p.name] in ("i32", "i64")}
    return {n: 1 if n in integers else v for n, v in spec.items()}


def specialisations():
    """(kernel, spec) for every registered kernel and each of its AOT specs."""
    return [(k, spec) for k in KERNELS for spec in k.aot_specs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    for kernel_fn, spec in specialisations():
        consts = constexpr_values(kernel_fn, spec)
        for cap, aligned in TARGETS:
            start = time.perf_counter()
            compiled = compile_kernel(kernel_fn, spec, cap, aligned)
            print(f"sm_{cap} {'aligned  ' if aligned else 'unaligned'} {kernel_fn.__name__:<32} {consts}  "
                  f"{len(compiled.asm['cubin'])} B cubin, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
