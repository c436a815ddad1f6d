"""The fully connected layer: one tiled matmul kernel for the forward and both weight products.

Layouts: x (N, in), w (in, out), b (out,), y and dy (N, out); float32, C-contiguous, NumPy
(interpret backend) or CuPy (cuda backend). x (and dx) may be bfloat16 (kernels/storage.py): the
products then take both operands in bfloat16, while y, the logits, stay float32 for the loss.

``matmul_kernel`` computes C (M, N) = A (M, K) @ B (K, N) with A and B given by
pointer and strides, so each of the three products is the same kernel:

    forward  y  = x @ w      A = x  (N, in),  strides (in, 1)   B = w    (in, out), strides (out, 1)
    dgrad    dx = dy @ w^T   A = dy (N, out), strides (out, 1)  B = w^T  (out, in), strides (1, out)
    wgrad    dw = x^T @ dy   A = x^T (in, N), strides (1, in)   B = dy   (N, out),  strides (out, 1)

A transpose is a stride swap, never a copy. The bias is added in the forward's
epilogue; db = column sums of dy is fused into the wgrad, whose B operand *is*
dy: every program sums the dy tiles it loads anyway (BLOCK_K adds per column
per slice, next to the tile's dot product) and the first row of C tiles, which
covers all columns, stores them. So db costs no extra read of dy and no extra
launch, and the sum runs in a fixed order (deterministic, no atomics).

Bytes per call, float32, for the attention92 head at batch 64 (N = 64, in = 256),
counting each array once:

    out = 10:   forward 78,376 B (x 65,536 + w 10,240 + b 40 + y 2,560)
                backward 156,712 B (dgrad: dy 2,560 + w 10,240 + dx 65,536;
                                    wgrad: x 65,536 + dy 2,560 + dw 10,240 + db 40)
    out = 100:  forward 193,936 B (x 65,536 + w 102,400 + b 400 + y 25,600)
                backward 387,472 B (dgrad: dy 25,600 + w 102,400 + dx 65,536;
                                    wgrad: x 65,536 + dy 25,600 + dw 102,400 + db 400)

A program reads its rows of A and its columns of B, so A is read once per
column of C tiles and B once per row: the forward reads everything once (one
tile column covers out <= 128); the dgrad reads dy twice (in = 256 is two
BLOCK_N = 128 columns) and the wgrad reads dy four times (in = 256 is four
BLOCK_M = 64 rows). Those re-reads are of dy, at most 25.6 kB, and hit L2.
Offsets are int32: fine below 2**31 elements per operand.
"""
import numpy as np
import triton.language as tl

from ..backend import dot_precision, empty
from ..launch import kernel, launch
from . import elementwise, storage
from .tiles import cdiv, next_power_of_2

# tl.dot needs every block dimension >= 16; the caps keep the float32
# accumulator (BLOCK_M x BLOCK_N) and the operand tiles within registers.
MIN_BLOCK = 16
MAX_BLOCK_M, MAX_BLOCK_N, MAX_BLOCK_K = 64, 128, 32


def _block(size, cap):
    """The smallest power of two >= size, clamped to [MIN_BLOCK, cap]."""
    return min(max(next_power_of_2(size), MIN_BLOCK), cap)


def _blocks(m, n, k):
    return dict(BLOCK_M=_block(m, MAX_BLOCK_M), BLOCK_N=_block(n, MAX_BLOCK_N),
                BLOCK_K=_block(k, MAX_BLOCK_K))


def _aot_specs():
    """The launches of the attention92 head at batch 64: out = 10 and 100 in TF32 (training, dw and
    db added into the gradient buffers), out = 100 (the larger tiles) in IEEE too (the tests),
    out = 10 with bfloat16 x (and so bfloat16 A of the forward and wgrad, and C of the dgrad)."""
    batch, n_in = 64, 256
    specs = []
    for n_out, x_type in ((10, "*fp32"), (100, "*fp32"), (10, "*bf16")):
        for (m, n, k), epilogue, a, c in (((batch, n_out, n_in), "bias", x_type, "*fp32"),            # forward
                                          ((batch, n_in, n_out), "none", "*fp32", x_type),            # dgrad
                                          ((n_in, n_out, batch), "b_column_sums", x_type, "*fp32")):  # wgrad + db
            for precision in ("tf32", "ieee") if n_out == 100 else ("tf32",):
                specs.append(dict(a_ptr=a, b_ptr="*fp32", c_ptr=c, vec_ptr="*fp32",
                                  M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32",
                                  stride_bk="i32", stride_bn="i32", EPILOGUE=epilogue, PRECISION=precision,
                                  ACCUMULATE=epilogue == "b_column_sums" and precision == "tf32",
                                  **_blocks(m, n, k)))
    return specs


@kernel(aot=_aot_specs())
def matmul_kernel(a_ptr, b_ptr, c_ptr, vec_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  EPILOGUE: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (M, N) = A (M, K) @ B (K, N), C C-contiguous; float32 accumulation.

    Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); one program per [BLOCK_M x BLOCK_N]
    tile of C, stepping over K in BLOCK_K slices; tails are masked (loaded as 0).
    EPILOGUE = "bias": C += vec (N,) broadcast over rows.
    "b_column_sums": also vec (N,) = column sums of B, written by the programs of
    the first row of tiles. "none": C only (vec unused).
    PRECISION: tl.dot's input_precision ("tf32" or "ieee"). ACCUMULATE: C (and the column sums)
    are added into what the arrays hold (gradient buffers).
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    col_sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
        # both operands in A's storage type (kernels/storage.py): a bfloat16 x multiplies in bfloat16
        acc = tl.dot(a, storage.to_type_of(b, a_ptr), acc, input_precision=PRECISION)
        if EPILOGUE == "b_column_sums":
            col_sums += tl.sum(b.to(tl.float32), axis=0)
    if EPILOGUE == "bias":
        acc += tl.load(vec_ptr + cols, mask=col_ok, other=0.0)[None, :]
    c_ptrs, c_ok = c_ptr + rows[:, None] * N + cols[None, :], row_ok[:, None] & col_ok[None, :]
    storage.store_or_add(c_ptrs, acc, c_ok, ACCUMULATE)
    if EPILOGUE == "b_column_sums":
        if pid_m == 0:  # every row of tiles computes the same sums; the first one stores them
            storage.store_or_add(vec_ptr + cols, col_sums, col_ok, ACCUMULATE)


def _matmul(a, a_strides, b, b_strides, m, n, k, epilogue="none", vec=None, into=None, dtype=np.float32):
    """C (m, n) = A @ B with A, B given by array and (row, column) strides in elements; C of
    ``dtype``.

    ``vec``: the bias for epilogue "bias", the output for the column sums of B
    for "b_column_sums". With ``into`` (an (m, n) array) C is added into it, and the column sums
    into vec, and ``into`` is returned.
    """
    c = empty((m, n), dtype) if into is None else into
    blocks = _blocks(m, n, k)
    grid = (cdiv(m, blocks["BLOCK_M"]), cdiv(n, blocks["BLOCK_N"]))
    launch(matmul_kernel, grid, a, b, c, c if vec is None else vec, m, n, k, *a_strides, *b_strides,
           EPILOGUE=epilogue, PRECISION=dot_precision(), ACCUMULATE=into is not None, **blocks)
    return c


# Launchers mirror reference/linear.py: linear(...) -> (y, saved), linear_backward(dy, saved) -> grads.

def linear(x, w, b):
    """y = x @ w + b: x (N, in), w (in, out), b (out,) -> (N, out); saves (x, w)."""
    (n, n_in), n_out = x.shape, w.shape[1]
    y = _matmul(x, (n_in, 1), w, (n_out, 1), n, n_out, n_in, "bias", b)
    return y, (x, w)


def linear_backward(dy, saved, dw_into=None, db_into=None):
    """dy (N, out) -> (dx = dy @ w^T (N, in), dw = x^T @ dy (in, out), db = sum_n dy (out,)). With both
    ``dw_into`` and ``db_into`` (gradient buffers) dw and db are added into them in the same kernel;
    one given alone gets its gradient added by an elementwise kernel."""
    x, w = saved
    (n, n_in), n_out = x.shape, w.shape[1]
    dx = _matmul(dy, (n_out, 1), w, (1, n_out), n, n_in, n_out, dtype=x.dtype)
    if dw_into is not None and db_into is not None:
        dw = _matmul(x, (1, n_in), dy, (n_out, 1), n_in, n_out, n, "b_column_sums", db_into, into=dw_into)
        return dx, dw, db_into
    db = empty((n_out,))
    dw = _matmul(x, (1, n_in), dy, (n_out, 1), n_in, n_out, n, "b_column_sums", db)
    return dx, elementwise.gradient_into(dw, dw_into), elementwise.gradient_into(db, db_into)
