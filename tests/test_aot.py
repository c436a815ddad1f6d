"""Every registered Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

The interpreter runs plain Python, so it accepts code the compiler rejects; this
test is what catches such code in CI. Kernels register themselves through
``ra_kernels.launch.kernel``, so new kernels are covered without editing this file.
"""
import pytest

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
