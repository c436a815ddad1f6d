"""ra_kernels: the Residual Attention Network on hand-written Triton kernels.

Layers, each using only those before it: ``backend`` (which backend runs, array helpers),
``launch`` (kernel registration, the Triton adapters, launches), ``kernels`` (Triton kernels and
their launchers), ``autograd`` (Tensor, Function), ``functional`` (differentiable ops), ``nn``
(modules); docs/design.md §1 has the whole table.
"""
from . import autograd, backend, functional, nn  # noqa: F401
from .autograd import Function, Tensor, no_grad  # noqa: F401
from .backend import get_backend, get_precision, set_backend, set_precision, use_backend, use_precision  # noqa: F401

__version__ = "0.1.0"
