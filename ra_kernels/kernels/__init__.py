"""Triton kernels, one module per fused op family: arrays in, arrays out.

Importing this package imports every family, so that each kernel registers
itself in ``ra_kernels.launch.KERNELS`` for the ahead-of-time compile check.
"""
from . import attention, augment, batchnorm, conv, elementwise, linear, loss, metrics, optim, pool, resize  # noqa: F401
