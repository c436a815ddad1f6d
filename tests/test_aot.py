"""Every registered Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

The interpreter runs plain Python, so it accepts code the compiler rejects; this
test is what catches such code in CI. Kernels register themselves through
``ra_kernels.launch.kernel``, so new kernels are covered without editing this file.
"""
import re

import numpy as np
import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ra_kernels import aot
from ra_kernels.launch import KERNELS

SPECIALISATIONS = aot.specialisations()


def _id(case):
    kernel_fn, spec = case
    consts = ",".join(f"{k}={v}" for k, v in aot.constexpr_values(kernel_fn, spec).items())
    return f"{kernel_fn.__name__}[{consts}]"


def test_every_kernel_has_a_specialisation():
    assert KERNELS, "no kernel registered"
    for kernel_fn in KERNELS:
        assert kernel_fn.aot_specs, f"{kernel_fn.__name__} registers no AOT specialisation"


@pytest.mark.parametrize("capability, aligned", aot.TARGETS, ids=[f"sm_{c}{'_aligned' if a else ''}"
                                                                  for c, a in aot.TARGETS])
@pytest.mark.parametrize("case", SPECIALISATIONS, ids=[_id(c) for c in SPECIALISATIONS])
def test_compiles(case, capability, aligned):
    kernel_fn, spec = case
    compiled = aot.compile_kernel(kernel_fn, spec, capability, aligned)
    assert compiled.metadata.name == kernel_fn.__name__
    assert compiled.metadata.target.arch == capability
    assert len(compiled.asm["cubin"]) > 0
    assert f".target sm_{capability}" in compiled.asm["ptx"]


@pytest.mark.parametrize("case", SPECIALISATIONS, ids=[_id(c) for c in SPECIALISATIONS])
def test_compiles_with_integer_arguments_equal_to_one(case):
    # A batch of 1, a 1x1 map: Triton makes such an argument a constexpr int, and code that
    # treats it as a tensor (n.to(tl.float32)) compiles for every other value and fails on this one.
    kernel_fn, spec = case
    compiled = aot.compile_kernel(kernel_fn, aot.with_integers_one(kernel_fn, spec), 90, aligned=True)
    assert compiled.metadata.name == kernel_fn.__name__


def test_alignment_reaches_the_compiler():
    # The elementwise kernel's loads vectorise to 128 bits only when the compiler may
    # assume 16-aligned pointers and sizes: proof that the aligned variant is a different build.
    kernel_fn = next(k for k in KERNELS if k.__name__ == "elementwise_kernel")
    spec = kernel_fn.aot_specs[0]
    assert "ld.global.v4" not in aot.compile_kernel(kernel_fn, spec, 90, aligned=False).asm["ptx"]
    assert "ld.global.v4" in aot.compile_kernel(kernel_fn, spec, 90, aligned=True).asm["ptx"]


def test_a_spec_must_name_every_parameter():
    kernel_fn = KERNELS[0]
    spec = dict(kernel_fn.aot_specs[0])
    spec.pop(next(iter(spec)))
    with pytest.raises(ValueError, match="AOT spec names"):
        aot.compile_kernel(kernel_fn, spec, 80)


@pytest.mark.parametrize("name, switches", [("elementwise_kernel", dict(OP="relu")),
                                            ("bn_apply_kernel", dict(BACKWARD=False, RELU=True)),
                                            ("conv2d_fwd_kernel", dict(EPILOGUE="bn_eval", RELU=True))])
def test_compiled_relus_keep_nan(name, switches):
    # tl.maximum's default (PropagateNan.NONE) compiles to max.f32, which returns the number
    # beside a NaN: relu(NaN) was 0 on the GPU while NaN on numpy, hiding a diverging run.
    # Every ReLU must compile to the NaN-propagating max.NaN.f32, and no bare max.f32 remains.
    kernel_fn = next(k for k in KERNELS if k.__name__ == name)
    spec = next(s for s in kernel_fn.aot_specs if switches.items() <= s.items())
    ptx = aot.compile_kernel(kernel_fn, spec, 90, aligned=True).asm["ptx"]
    assert "max.NaN.f32" in ptx
    assert "max.f32" not in ptx


# Approximate instructions compiled code may hold, per kernel, each with its reason: tl.exp
# compiles to ex2.approx.f32 (relative error ~2**-22 plus the rounding of x * log2(e)). Every
# division and square root is correctly rounded (div_rn, sqrt_rn), as in the interpreter: a
# plain "/" would compile to div.full.f32 and tl.sqrt to sqrt.approx.f32.
# The instruction stems, without the type and the .ftz flag, which vary with Triton's version.
APPROXIMATE = re.compile(r"\b(div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt\.approx|ex2\.approx|"
                         r"lg2\.approx|sin\.approx|cos\.approx|tanh\.approx)\.")
EXP = {"ex2.approx"}  # the sigmoid's exp(-|x|), documented in kernels/attention.py
MAY_APPROXIMATE = {
    "sigmoid_mix_kernel": EXP, "sigmoid_mix_backward_kernel": EXP,
    "spatial_attention_kernel": EXP, "spatial_attention_backward_kernel": EXP,
    # softmax: exp(x - max), each term <= 1 with the max subtracted (kernels/loss.py)
    "cross_entropy_rows_kernel": EXP, "cross_entropy_backward_kernel": EXP,
}


@pytest.mark.parametrize("case", SPECIALISATIONS, ids=[_id(c) for c in SPECIALISATIONS])
def test_approximate_math_only_where_allowed(case):
    kernel_fn, spec = case
    ptx = aot.compile_kernel(kernel_fn, spec, 90, aligned=True).asm["ptx"]
    found = set(APPROXIMATE.findall(ptx))
    assert found <= MAY_APPROXIMATE.get(kernel_fn.__name__, set()), \
        f"{kernel_fn.__name__} compiles to {sorted(found)}: use tl.div_rn / tl.sqrt_rn, or allow it here with a reason"


def test_the_approximation_pattern_sees_plain_division():
    # The pin above must be able to fail: the same pattern finds what "/", tl.sqrt and tl.exp become.
    source = ASTSource(_plain_math_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32"}, constexprs={})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True}).asm["ptx"]
    assert set(APPROXIMATE.findall(ptx)) == {"div.full", "sqrt.approx", "ex2.approx"}


@triton.jit
def _plain_math_kernel(x_ptr, y_ptr):
    x = tl.load(x_ptr)
    tl.store(y_ptr, 1.0 / tl.sqrt(x) + tl.exp(x))


@pytest.mark.parametrize("name, switches", [("bn_tile_reduce_kernel", dict(BACKWARD=True)),
                                            ("bn_tile_reduce_kernel", dict(BACKWARD=False)),
                                            ("conv2d_fwd_kernel", dict(EPILOGUE="stats")),
                                            ("conv2d_wgrad_kernel", dict(SPLIT=True)),
                                            ("conv2d_dgrad_kernel", dict(INPUT_SUMS=True)),
                                            ("cross_entropy_rows_kernel", dict())])
def test_last_program_reductions_publish_before_they_count(name, switches):
    # batchnorm.last_to_arrive: a program's partial results, stored by all its threads, must be
    # visible to the program that arrives last. The compiled order that guarantees it: a barrier of
    # the program's threads, one gpu-scope acquire-release increment, a barrier (the count's
    # broadcast), then the last program's reads of the partials from L2 (.cg), never a stale L1 line.
    # The interpreter runs programs one after another, so only the compiled code can get this wrong.
    kernel_fn = next(k for k in KERNELS if k.__name__ == name)
    spec = next(s for s in kernel_fn.aot_specs if switches.items() <= s.items())
    ptx = aot.compile_kernel(kernel_fn, spec, 90, aligned=True).asm["ptx"]
    events = [re.search(r"bar\.sync|atom\.global\.gpu\.acq_rel\.add|atom\.global|st\.global|ld\.global\.cg", line)
              for line in ptx.splitlines()]
    events = [e.group(0) for e in events if e]
    assert events.count("atom.global.gpu.acq_rel.add") == 1 and events.count("atom.global") == 0, events
    count = events.index("atom.global.gpu.acq_rel.add")
    before, after = events[:count], events[count + 1:]
    last_store = max(i for i, e in enumerate(before) if e == "st.global")
    assert "bar.sync" in before[last_store + 1:], f"{name}: the partials' stores are not behind a barrier"
    assert after[0] == "bar.sync" and "ld.global.cg" in after, f"{name}: {after[:3]}"


@pytest.mark.parametrize("name", ["conv2d_fwd_kernel", "conv2d_dgrad_kernel", "conv2d_wgrad_kernel"])
def test_bfloat16_convs_multiply_on_bfloat16_tensor_cores(name):
    # With bfloat16 activations both dot operands are bfloat16 (w rounded as it loads,
    # kernels/storage.to_type_of): on sm_90 the products are wgmma on bf16, not TF32.
    kernel_fn = next(k for k in KERNELS if k.__name__ == name)
    spec = next(s for s in kernel_fn.aot_specs if "*bf16" in s.values())
    ptx = aot.compile_kernel(kernel_fn, spec, 90, aligned=True).asm["ptx"]
    mmas = set(re.findall(r"wgmma\.mma_async\.\S*?\.f32\.(\w+)\.(\w+)", ptx))
    assert mmas == {("bf16", "bf16")}, mmas


# --------------------------------------------------------------------------- what ptxas reports

_PTXAS_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'k'
ptxas info    : Function properties for k
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used {registers} registers, used 1 barriers
"""


def test_ptxas_log_is_read():
    log = _PTXAS_LOG.format(stack=40, spill=24, registers=255)
    assert aot.parse_ptxas_log(log) == aot.PtxasReport(255, 24, True)
    quiet = "\n".join(line for line in _PTXAS_LOG.splitlines() if "wgmma" not in line and "instructions" not in line)
    assert aot.parse_ptxas_log(quiet.format(stack=0, spill=0, registers=38)) == aot.PtxasReport(38, 0, False)
    with pytest.raises(ValueError, match="not a ptxas -v report"):
        aot.parse_ptxas_log("")


def test_ptxas_report_comes_from_a_compile_past_the_cache():
    # Twice: the second compile would be a cache hit without ptxas (and so without a report) if the
    # cache were not bypassed. A flat elementwise sweep needs a few dozen registers and never spills.
    kernel_fn = next(k for k in KERNELS if k.__name__ == "elementwise_kernel")
    reports = [aot.ptxas_report(kernel_fn, kernel_fn.aot_specs[0], 90, aligned=True) for _ in range(2)]
    assert reports[0] == reports[1]
    assert 8 <= reports[0].registers <= 64 and reports[0].spill_bytes == 0 and not reports[0].serialized_wgmma


def test_launch_spec_is_what_triton_specialises(rng):
    # A 1x1 conv on 7x7: KW and stride are 1 (constants), C_in = 32 and K = 32 are multiples of 16,
    # H = 7 is not; bfloat16 activations are typed as such; the constexprs are the launch's own.
    from ra_kernels import backend, launch
    from ra_kernels.kernels import conv
    with backend.use_backend("interpret"), launch.record_launches(run=False) as calls:
        x = backend.asarray(rng.standard_normal((2, 7, 7, 32)).astype(backend.BFLOAT16))
        conv.conv2d(x, backend.asarray(rng.standard_normal((1, 1, 32, 24)).astype(np.float32)))
    (call,) = calls
    spec, divisible = aot.launch_spec(call)
    assert spec["KW"] == 1 and spec["stride"] == 1
    assert spec["x_ptr"] == "*bf16" and spec["w_ptr"] == "*fp32" and spec["H"] == "i32"
    assert {"C_in", "K", "x_ptr"} <= divisible and not {"H", "W", "C_out", "KW"} & divisible
    assert {k: spec[k] for k in call.constexprs} == call.constexprs
    compiled = aot.compile_kernel(call.kernel_fn, spec, 90, divisible=divisible, num_warps=call.num_warps)
    assert compiled.metadata.name == "conv2d_fwd_kernel" and compiled.metadata.num_warps == call.num_warps
