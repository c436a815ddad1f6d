"""Ahead-of-time compilation of every registered kernel, without a GPU.

The interpreter accepts code that the compiler rejects (Python control flow on
tensor values, shapes that are not powers of two, unsupported dtypes); compiling
each kernel for real targets catches that on a CPU-only machine. Triton ships its
own ptxas, so this goes all the way to a cubin.

    python -m ra_kernels.aot          # compile everything for sm_80 and sm_90
"""
from __future__ import annotations

import argparse
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels  # noqa: F401  (imports every family: they register themselves)
from .launch import KERNELS

# (compute capability, aligned). A real launch specialises pointers and integers that are
# multiples of 16 as such, and the compiler then vectorises loads (128-bit) where it can;
# odd sizes (C = 3) take the scalar path. Compiling each specialisation unaligned for sm_80
# and aligned for sm_90 covers both code paths and both targets at the cost of two compiles.
TARGETS = ((80, False), (90, True))
CAPABILITIES = tuple(cap for cap, _ in TARGETS)


def compile_kernel(kernel_fn, spec: dict, capability: int, aligned: bool = False):
    """Compile one specialisation of a registered kernel for ``sm_<capability>``.

    ``spec`` maps every parameter to a Triton type string or, for a constexpr
    parameter, its value (see ``launch.kernel``); an integer value for an integer
    parameter compiles it as that constant, as Triton does at launch with an argument
    equal to 1 (see :func:`with_integers_one`). ``aligned``: every pointer and integer
    argument is taken as a multiple of 16, as Triton specialises them at launch.
    """
    names = [p.name for p in kernel_fn.params]
    if sorted(spec) != sorted(names):
        raise ValueError(f"{kernel_fn.__name__}: AOT spec names {sorted(spec)}, "
                         f"the kernel takes {names}")
    constexprs = dict(constexpr_values(kernel_fn, spec))
    constexprs.update({n: v for n, v in spec.items() if not isinstance(v, str)})
    signature = {n: "constexpr" if n in constexprs else spec[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if aligned and signature[n][:1] in "*i"} or None
    source = ASTSource(kernel_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"enable_fp_fusion": True})


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
