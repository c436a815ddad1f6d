"""The SGD update (momentum, Nesterov, weight decay) as one kernel over flat buffers.

All of a model's parameters live in one flat float32 buffer, its gradients and
velocities in two more of the same length, so one launch updates the whole
model. param and velocity are updated in place. The learning rate is a
1-element float32 array of the backend read inside the kernel: a captured CUDA
graph then uses whatever value a schedule last wrote there.

Memory-bound: per element it reads param, grad, velocity and writes param and
velocity, 20 bytes; for attention92's ~1.96M parameters, 39.2 MB per step
(about 9 us at 4.3 TB/s). A flat 1-D sweep in BLOCK_N-element tiles
(1,024 over 4 warps: 8 contiguous float32 per thread, vectorised loads).
Offsets are int32: fine below 2**31 parameters.
"""
import triton.language as tl

from ..launch import kernel, launch
from .tiles import cdiv, FLAT_BLOCK



@kernel(aot=[dict(param_ptr="*fp32", grad_ptr="*fp32", velocity_ptr="*fp32", lr_ptr="*fp32", n="i32",
                  momentum="fp32", weight_decay="fp32", NESTEROV=nesterov, BLOCK_N=FLAT_BLOCK)
             for nesterov in (False, True)])
def sgd_kernel(param_ptr, grad_ptr, velocity_ptr, lr_ptr, n, momentum, weight_decay,
               NESTEROV: tl.constexpr, BLOCK_N: tl.constexpr):
    """One SGD step over n float32 elements, param and velocity in place; lr = lr_ptr[0].

    Exactly reference.sgd_step's order: g = grad + weight_decay * param;
    v = momentum * velocity + g; step = g + momentum * v if NESTEROV else v;
    param -= lr * step. (The compiler may contract a multiply-add into an FMA,
    which rounds once instead of twice: the last bit can differ from NumPy.)
    """
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = offs < n
    lr = tl.load(lr_ptr)
    param = tl.load(param_ptr + offs, mask=in_bounds)
    g = tl.load(grad_ptr + offs, mask=in_bounds) + weight_decay * param
    v = momentum * tl.load(velocity_ptr + offs, mask=in_bounds) + g
    if NESTEROV:
        step = g + momentum * v
    else:
        step = v
    tl.store(param_ptr + offs, param - lr * step, mask=in_bounds)
    tl.store(velocity_ptr + offs, v, mask=in_bounds)


# The launcher mirrors reference/optim.py, except that it updates in place and lr is a device array.

def sgd_step(param, grad, velocity, lr, momentum=0.9, weight_decay=0.0, nesterov=False):
    """One SGD step with momentum, as torch.optim.SGD (dampening 0); returns (param, velocity).

    param, grad, velocity: float32 arrays of one shape (flat buffers, typically);
    param and velocity are updated in place and returned. lr: a 1-element
    float32 array of the backend. momentum, weight_decay: Python floats.
    """
    n = param.size
    launch(sgd_kernel, (cdiv(n, FLAT_BLOCK),), param, grad, velocity, lr, n,
           float(momentum), float(weight_decay), NESTEROV=bool(nesterov), BLOCK_N=FLAT_BLOCK)
    return param, velocity
