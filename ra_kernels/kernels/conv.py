"""2-D convolution as implicit GEMM, and conv + batch norm + ReLU with BN fused into the conv kernels.

Layouts (float32, C-contiguous): x (N, H, W, Cin), w HWIO (KH, KW, Cin, Cout),
y (N, OH, OW, Cout). The forward is the GEMM y[M, Cout] = A[M, K] @ w[K, Cout]
with M = N*OH*OW output positions, K = KH*KW*Cin, and A the im2col matrix of x,
never built: each [BLOCK_M, BLOCK_K] tile of A is gathered from x inside the K
loop (zero where a window hangs over the padding). The backward is two more
implicit GEMMs:

* dgrad: dx[N*H*W, Cin] = B[N*H*W, KH*KW*Cout] @ w^T, where B gathers dy at
  oh = (h + padding - kh) / stride (zero when that is not an integer in range);
  it runs the forward's K loop with the gather turned around (TRANSPOSED).
* wgrad: dw[K, Cout] = A^T[K, M] @ dy[M, Cout]: the same im2col gather as the
  forward, reduced over the M positions, split in chunks of positions across
  programs (split-K), the chunks' partial dw summed by the last program of each
  tile (``batchnorm.last_to_arrive``), in the same launch.

conv_bn_relu (batch norm over the conv output z, then ReLU), kernels per call:

* training forward: conv2d_fwd (EPILOGUE="stats": stores z and the per-tile
  mean / M2 of its own tile of z, from the accumulator in registers; the last
  program of each column of tiles combines them into mean, rstd, scale/shift
  and updates the running statistics in place), then bn_apply
  (y = relu(z * scale + shift), ``batchnorm.normalize``).
* eval forward: conv2d_fwd (EPILOGUE="bn_eval": scale/shift from the running
  statistics, ReLU, store y): one kernel.
* backward: bn_tile_reduce (per channel sums of g = dy * [y > 0]
  and g * xhat from dy and z: these are dbeta and dgamma), then conv2d_dgrad
  and conv2d_wgrad, which load dy and z and turn them into dz (BN backward and
  ReLU mask, ``batchnorm.bn_backward_tile``) while loading their operand, so dz
  is never written to memory. Eval backward first recomputes z with one plain
  conv2d_fwd: the eval forward stores only y (inference keeps its single
  kernel) and recovering xhat from y would divide by gamma.

Precision: tl.dot takes ``backend.dot_precision()`` ("tf32" by default, "ieee"
on request) as a constexpr; accumulation is float32. Offsets are int32:
``launch`` refuses an array of 2**31 elements or more (ImageNet's largest activation at batch 256,
256x56x56x256, is 2.1e8).
"""
import triton.language as tl

from ..backend import dot_precision, empty
from ..launch import device_function, kernel, launch
from . import batchnorm as bn, elementwise, storage
from .tiles import cdiv, next_power_of_2, out_size, positions

# --------------------------------------------------------------------------- device functions


@device_function
def _im2col_offsets(img, top, left, pos_ok, kh, kw, c, k_ok, H, W, C):
    """Offsets into NHWC x (H, W, C) of im2col entries, and where they are inside x.

    A position (img, top, left: the window's top-left corner, may be negative
    inside the padding) meets a reduction index (kh, kw, c). Arguments broadcast:
    positions as a column and reductions as a row give a [positions, K] tile,
    and the other way round its transpose.
    """
    h = top + kh
    w = left + kw
    ok = pos_ok & k_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return ((img * H + h) * W + w) * C + c, ok


@device_function
def _load_output_grad(dy_ptr, z_ptr, offs, ok, ch, ch_ok, stats_ptr, sums_ptr, C, inv_count,
                      BN_BACKWARD: tl.constexpr, RELU: tl.constexpr):
    """The gradient of the conv output at ``offs`` (0 where not ``ok``), channel ``ch`` per element.

    Plain conv: dy itself. Under batch norm (+ReLU): dz from dy and the conv output
    z, computed here and never stored.
    """
    if BN_BACKWARD:
        return bn.bn_backward_tile(dy_ptr, z_ptr, offs, ok, ch, ch_ok, stats_ptr, sums_ptr, C, inv_count, RELU)
    else:
        return tl.load(dy_ptr + offs, mask=ok, other=0.0)  # in dy's storage type


@device_function
def _activated(x, ok, stats_ptr, ch, ch_ok, C):
    """relu(x * scale + shift) with scale and shift of channels ``ch`` from a (4, C) stats buffer, 0 where
    not ``ok``: a batch-norm + ReLU applied by the conv that consumes its output, as it loads it."""
    _, _, scale, shift = bn.load_stats(stats_ptr, ch, ch_ok, C)
    return tl.where(ok, bn.affine_relu(x.to(tl.float32), scale, shift, True), 0.0)


@device_function
def _conv_k_loop(src_ptr, z_ptr, w_ptr, stats_ptr, sums_ptr, inv_count, pre_stats_ptr,
                 img, base_h, base_w, pos_ok, SRC_H, SRC_W, SRC_C, OUT_C, K, KW, stride, cols,
                 TRANSPOSED: tl.constexpr, BN_BACKWARD: tl.constexpr, RELU: tl.constexpr, PRE_BN: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] accumulator of an implicit-GEMM conv: sum over k < K of A[pos, k] * B[k, col].

    The reduction index k runs over (kh, kw, c) of a source tensor src (SRC_H, SRC_W, SRC_C).
    Forward (TRANSPOSED=False): src = x, A = im2col(x) with windows at (base_h, base_w) =
    (oh, ow) * stride - padding, B = w as (K, OUT_C). Dgrad (TRANSPOSED): src = dy (the
    output gradient), positions are input pixels with (base_h, base_w) = (h, w) + padding,
    A[pos, (kh, kw, co)] = dy[img, (base_h - kh) / stride, (base_w - kw) / stride, co] when
    those divide exactly, B[(kh, kw, co), ci] = w[kh, kw, ci, co], and with BN_BACKWARD the
    dy loads become dz (see ``_load_output_grad``). PRE_BN (forward only): A is im2col of
    relu(x * scale + shift), scale and shift per channel of x from pre_stats (4, SRC_C), applied
    as x loads (zero where a window hangs over the padding, as for the activation itself).
    Both operands are taken in src's storage type (``storage.to_type_of``): bfloat16 storage
    multiplies in bfloat16 (w, kept in float32, rounded as it loads), float32 in float32.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    cols_ok = cols < OUT_C
    if TRANSPOSED:
        # base - k divides by the stride iff both leave the same remainder; then the
        # quotient is base // stride - k // stride. Division only on 1-D vectors.
        base_h_div, base_h_rem = base_h // stride, base_h % stride
        base_w_div, base_w_rem = base_w // stride, base_w % stride
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        tap, c = k // SRC_C, k % SRC_C
        kh, kw = tap // KW, tap % KW
        if TRANSPOSED:
            oh = base_h_div[:, None] - (kh // stride)[None, :]
            ow = base_w_div[:, None] - (kw // stride)[None, :]
            ok = (pos_ok[:, None] & k_ok[None, :]
                  & (base_h_rem[:, None] == (kh % stride)[None, :]) & (oh >= 0) & (oh < SRC_H)
                  & (base_w_rem[:, None] == (kw % stride)[None, :]) & (ow >= 0) & (ow < SRC_W))
            a = _load_output_grad(src_ptr, z_ptr, ((img[:, None] * SRC_H + oh) * SRC_W + ow) * SRC_C + c[None, :],
                                  ok, c[None, :], k_ok[None, :], stats_ptr, sums_ptr, SRC_C, inv_count,
                                  BN_BACKWARD=BN_BACKWARD, RELU=RELU)
            w_offs = (tap[:, None] * OUT_C + cols[None, :]) * SRC_C + c[:, None]
        else:
            offs, ok = _im2col_offsets(img[:, None], base_h[:, None], base_w[:, None], pos_ok[:, None],
                                       kh[None, :], kw[None, :], c[None, :], k_ok[None, :], SRC_H, SRC_W, SRC_C)
            a = tl.load(src_ptr + offs, mask=ok, other=0.0)
            if PRE_BN:
                a = _activated(a, ok, pre_stats_ptr, c[None, :], k_ok[None, :], SRC_C)
            w_offs = k[:, None] * OUT_C + cols[None, :]
        b = tl.load(w_ptr + w_offs, mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = tl.dot(storage.to_type_of(a, src_ptr), storage.to_type_of(b, src_ptr), acc,
                     input_precision=INPUT_PRECISION)
    return acc


# --------------------------------------------------------------------------- kernels

_F32, _BF16, _I32 = "*fp32", "*bf16", "i32"
_SHAPE_TYPES = dict(H=_I32, W=_I32, C_in=_I32, OH=_I32, OW=_I32, C_out=_I32, M=_I32, K=_I32, KW=_I32,
                    stride=_I32, padding=_I32)
_BN_BACKWARD_TYPES = dict(z_ptr=_F32, stats_ptr=_F32, sums_ptr=_F32, inv_count="fp32")
# AOT: every code path (constexpr switches), each precision and each tile class of
# the tables below at least once; not their full product (each GEMM compile takes seconds).
_TILE_CLASSES = [dict(BLOCK_M=128, BLOCK_N=16), dict(BLOCK_M=128, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=128),
                 dict(BLOCK_M=64, BLOCK_N=32)]


def _activations_in(spec, storage_type, *names):
    """An AOT spec with the activation pointers ``names`` in ``storage_type`` (kernels/storage.py)."""
    return {**spec, **{name: storage_type for name in names}}


@kernel(aot=[dict(x_ptr=t, w_ptr=_F32, y_ptr=t, partials_ptr=_F32, gamma_ptr=_F32, beta_ptr=_F32,
                  running_mean_ptr=_F32, running_var_ptr=_F32, stats_ptr=_F32, momentum="fp32", eps="fp32",
                  counters_ptr="*i32", pre_stats_ptr=_F32, skip_ptr=t, **_SHAPE_TYPES,
                  EPILOGUE=epilogue, RELU=relu, PRE_BN=pre_bn, ADD_SKIP=add_skip, INPUT_PRECISION=precision,
                  BLOCK_K=32, BLOCK_T=32, **tiles)
             for (epilogue, relu, pre_bn, add_skip, precision, t), tiles in zip(
                 [("store", False, True, True, "tf32", _F32), ("stats", False, True, False, "tf32", _F32),
                  ("bn_eval", True, False, False, "ieee", _F32), ("bn_eval", False, False, False, "tf32", _F32),
                  ("stats", False, False, False, "ieee", _F32), ("store", False, False, False, "ieee", _F32),
                  ("stats", False, True, False, "tf32", _BF16), ("store", False, True, True, "tf32", _BF16)],
                 _TILE_CLASSES * 2)])
def conv2d_fwd_kernel(x_ptr, w_ptr, y_ptr, partials_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
                      stats_ptr, momentum, eps, counters_ptr, pre_stats_ptr, skip_ptr,
                      H, W, C_in, OH, OW, C_out, M, K, KW, stride, padding,
                      EPILOGUE: tl.constexpr, RELU: tl.constexpr, PRE_BN: tl.constexpr, ADD_SKIP: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """One [BLOCK_M positions, BLOCK_N output channels] tile of y (grid: cdiv(M, BLOCK_M), cdiv(C_out, BLOCK_N)).

    EPILOGUE "store": y = conv(x, w). "stats": y = z = conv(x, w), plus this tile's
    mean and M2 of z per channel into partials (cdiv(M, BLOCK_M), 2, C_out); the last
    program of each column of tiles (``batchnorm.last_to_arrive`` on counter pid_n)
    combines them into stats (4, C_out) and updates the running statistics
    (``batchnorm.finalize_statistics``, BLOCK_T tiles a step). "bn_eval": y = relu(z * scale + shift)
    (ReLU if RELU) with scale/shift from gamma, beta and the running statistics;
    the programs of the first row of tiles also store them as stats (4, C_out) for
    the backward. PRE_BN: the conv's input is relu(x * scale + shift), from pre_stats (4, C_in),
    applied as x loads. ADD_SKIP ("store"): y = conv(x, w) + skip, skip of y's shape (a residual
    unit's shortcut). Pointers an epilogue does not use may be any float32 array.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, cols_ok = m < M, cols < C_out
    img, oh, ow = positions(m, OH, OW)
    # A plain forward GEMM: no BN backward, so the dy-to-dz operands are never read (x_ptr stands in).
    z = _conv_k_loop(src_ptr=x_ptr, w_ptr=w_ptr, img=img, base_h=oh * stride - padding, base_w=ow * stride - padding,
                     pos_ok=m_ok, SRC_H=H, SRC_W=W, SRC_C=C_in, OUT_C=C_out, K=K, KW=KW, stride=stride, cols=cols,
                     z_ptr=x_ptr, stats_ptr=x_ptr, sums_ptr=x_ptr, inv_count=0.0, pre_stats_ptr=pre_stats_ptr,
                     TRANSPOSED=False, BN_BACKWARD=False, RELU=False, PRE_BN=PRE_BN, INPUT_PRECISION=INPUT_PRECISION,
                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    ok = m_ok[:, None] & cols_ok[None, :]
    y_offs = m[:, None] * C_out + cols[None, :]
    if EPILOGUE == "bn_eval":
        mean = tl.load(running_mean_ptr + cols, mask=cols_ok)
        var = tl.load(running_var_ptr + cols, mask=cols_ok)
        gamma = tl.load(gamma_ptr + cols, mask=cols_ok)
        beta = tl.load(beta_ptr + cols, mask=cols_ok)
        rstd, scale, shift = bn.bn_coefficients(mean, var, gamma, beta, eps)
        storage.store(y_ptr + y_offs, bn.affine_relu(z, scale[None, :], shift[None, :], RELU), ok)
        first_row = cols < tl.where(pid_m == 0, C_out, 0)  # cols_ok in the first row of tiles, else none
        tl.store(stats_ptr + cols, mean, mask=first_row)
        tl.store(stats_ptr + C_out + cols, rstd, mask=first_row)
        tl.store(stats_ptr + 2 * C_out + cols, scale, mask=first_row)
        tl.store(stats_ptr + 3 * C_out + cols, shift, mask=first_row)
    else:
        if ADD_SKIP:
            z += tl.load(skip_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        z = storage.store(y_ptr + y_offs, z, ok)  # the statistics are those of z as stored
        if EPILOGUE == "stats":
            bn.reduce_statistics(z, m_ok, partials_ptr, counters_ptr, gamma_ptr, beta_ptr, running_mean_ptr,
                                 running_var_ptr, stats_ptr, cols, cols_ok, C_out, M, momentum, eps, BLOCK_M, BLOCK_T)


_INPUT_SUMS_TYPES = dict(in_z_ptr=_F32, in_stats_ptr=_F32, partials_ptr=_F32, in_sums_ptr=_F32, dgamma_ptr=_F32,
                         dbeta_ptr=_F32, counters_ptr="*i32")


@kernel(aot=[_activations_in(dict(dy_ptr=_F32, w_ptr=_F32, dx_ptr=_F32, **_BN_BACKWARD_TYPES, **_INPUT_SUMS_TYPES,
                                   **_SHAPE_TYPES, BN_BACKWARD=bn_backward, RELU=relu, INPUT_SUMS=input_sums,
                                   ADD_INTO=input_sums, ACCUMULATE=accumulate, INPUT_PRECISION=precision, BLOCK_K=32,
                                   BLOCK_T=32, **tiles), t, "dy_ptr", "dx_ptr", "z_ptr", "in_z_ptr")
             for (bn_backward, relu, input_sums, accumulate, precision, t), tiles in zip(
                 [(False, False, False, True, "tf32", _F32), (True, True, True, False, "ieee", _F32),
                  (True, False, False, False, "tf32", _F32), (False, False, True, False, "tf32", _F32),
                  (True, True, True, False, "tf32", _BF16)], _TILE_CLASSES * 2)])
def conv2d_dgrad_kernel(dy_ptr, w_ptr, dx_ptr, z_ptr, stats_ptr, sums_ptr, inv_count,
                        in_z_ptr, in_stats_ptr, partials_ptr, in_sums_ptr, dgamma_ptr, dbeta_ptr, counters_ptr,
                        H, W, C_in, OH, OW, C_out, M, K, KW, stride, padding,
                        BN_BACKWARD: tl.constexpr, RELU: tl.constexpr, INPUT_SUMS: tl.constexpr,
                        ADD_INTO: tl.constexpr, ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """One [BLOCK_M input positions, BLOCK_N input channels] tile of dx (grid: cdiv(M, BLOCK_M), cdiv(C_in, BLOCK_N)).

    Here M = N*H*W input positions and K = KH*KW*C_out. With BN_BACKWARD the
    operand is dz = BN+ReLU backward of dy (z the conv output, stats (4, C_out)
    and sums (2, C_out) from the forward and the backward reduction, inv_count
    1/(N*OH*OW) in training, 0 in eval); else dy itself (z, stats, sums unused).

    INPUT_SUMS: the conv's input was relu(bn(in_z)) (applied as it loaded, in_stats (4, C_in)),
    so dx is the gradient of that activation, and the epilogue also adds up the batch-norm
    backward sums of g = dx * [activation > 0] and g * xhat over its tile, into partials
    (cdiv(M, BLOCK_M), 2, C_in); the last program of each column of tiles finishes them into
    in_sums (2, C_in) and, with ADD_INTO, adds them into the gradient buffers dbeta and dgamma.
    ACCUMULATE: dx holds x's gradient from its other consumers, and this one is added into it
    (the sums are then those of the total).
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    img, h, w = positions(m, H, W)
    dx = _conv_k_loop(src_ptr=dy_ptr, w_ptr=w_ptr, img=img, base_h=h + padding, base_w=w + padding,
                      pos_ok=m < M, SRC_H=OH, SRC_W=OW, SRC_C=C_out, OUT_C=C_in, K=K, KW=KW, stride=stride, cols=cols,
                      z_ptr=z_ptr, stats_ptr=stats_ptr, sums_ptr=sums_ptr, inv_count=inv_count, pre_stats_ptr=z_ptr,
                      TRANSPOSED=True, BN_BACKWARD=BN_BACKWARD, RELU=RELU, PRE_BN=False,
                      INPUT_PRECISION=INPUT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    cols_ok = cols < C_in
    ok = (m < M)[:, None] & cols_ok[None, :]
    offs = m[:, None] * C_in + cols[None, :]
    dx = storage.store_or_add(dx_ptr + offs, dx, ok, ACCUMULATE)
    if INPUT_SUMS:
        mean, rstd, scale, shift = bn.load_stats(in_stats_ptr, cols[None, :], cols_ok[None, :], C_in)
        in_z = tl.load(in_z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g, xhat = bn.bn_backward_terms(dx, in_z, mean, rstd, scale, shift, True)  # dx as stored
        bn.reduce_backward_sums(tl.where(ok, g, 0.0), xhat, partials_ptr, counters_ptr, in_sums_ptr, dgamma_ptr,
                                dbeta_ptr, cols, cols_ok, C_in, ADD_INTO, BLOCK_T)


@kernel(aot=[_activations_in(dict(x_ptr=_F32, dy_ptr=_F32, dw_ptr=_F32, partials_ptr=_F32, counters_ptr="*i32",
                                   pre_stats_ptr=_F32, **_BN_BACKWARD_TYPES, **_SHAPE_TYPES,
                                   positions_per_split=_I32, BN_BACKWARD=bn_backward, RELU=relu, PRE_BN=pre_bn,
                                   INPUT_PRECISION=precision, SPLIT=split, ACCUMULATE=accumulate, BLOCK_K=64,
                                   BLOCK_M=32, BLOCK_N=block_n), t, "x_ptr", "dy_ptr", "z_ptr")
             for (bn_backward, relu, precision, block_n, t), (split, accumulate, pre_bn) in zip(
                 [(False, False, "tf32", 16, _F32), (True, True, "ieee", 64, _F32), (True, False, "tf32", 128, _F32),
                  (False, False, "ieee", 32, _F32), (True, True, "tf32", 64, _BF16)],
                 [(True, True, True), (True, False, False), (False, True, True), (False, False, False),
                  (True, True, True)])])
def conv2d_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, partials_ptr, counters_ptr, pre_stats_ptr, z_ptr, stats_ptr, sums_ptr,
                        inv_count, H, W, C_in, OH, OW, C_out, M, K, KW, stride, padding, positions_per_split,
                        BN_BACKWARD: tl.constexpr, RELU: tl.constexpr, PRE_BN: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """A [BLOCK_K rows (kh, kw, ci), BLOCK_N output channels] tile of dw, summed over one split of positions.

    Grid: cdiv(K, BLOCK_K), cdiv(C_out, BLOCK_N), splits; split s sums positions
    [s * positions_per_split, (s + 1) * positions_per_split) (a multiple of BLOCK_M). Without
    SPLIT (one split) the sum is dw's tile. With SPLIT each program writes its sum into
    partials[s] of (splits, K, C_out), and the last of a tile's splits (``batchnorm.last_to_arrive``
    on the tile's counter) adds them up in split order into dw's tile. ACCUMULATE: dw is a
    gradient buffer, and the tile is added into it. The dy operand is dz under BN_BACKWARD, as in
    ``conv2d_dgrad_kernel``; PRE_BN: the x operand is relu(bn(x)), from pre_stats (4, C_in), as in
    the forward.
    """
    pid_k, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, cols_ok = k < K, cols < C_out
    tap, ci = k // C_in, k % C_in
    kh, kw = tap // KW, tap % KW
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    start = pid_s * positions_per_split
    for m0 in range(start, tl.minimum(start + positions_per_split, M), BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        img, oh, ow = positions(m, OH, OW)
        # A^T tile [BLOCK_K, BLOCK_M]: the forward's im2col gather with the roles of the axes swapped
        x_offs, x_ok = _im2col_offsets(img[None, :], (oh * stride - padding)[None, :],
                                       (ow * stride - padding)[None, :], m_ok[None, :],
                                       kh[:, None], kw[:, None], ci[:, None], k_ok[:, None], H, W, C_in)
        a_t = tl.load(x_ptr + x_offs, mask=x_ok, other=0.0)
        if PRE_BN:
            a_t = _activated(a_t, x_ok, pre_stats_ptr, ci[:, None], k_ok[:, None], C_in)
        g = _load_output_grad(dy_ptr, z_ptr, m[:, None] * C_out + cols[None, :], m_ok[:, None] & cols_ok[None, :],
                              cols[None, :], cols_ok[None, :], stats_ptr, sums_ptr, C_out, inv_count,
                              BN_BACKWARD=BN_BACKWARD, RELU=RELU)
        # both operands in x's storage type, as in the forward (``_conv_k_loop``)
        acc = tl.dot(storage.to_type_of(a_t, x_ptr), storage.to_type_of(g, x_ptr), acc,
                     input_precision=INPUT_PRECISION)
    dw_offs, dw_ok = k[:, None] * C_out + cols[None, :], k_ok[:, None] & cols_ok[None, :]
    if SPLIT:
        tl.store(partials_ptr + pid_s * K * C_out + dw_offs, acc, mask=dw_ok)
        splits = tl.num_programs(2)
        if bn.last_to_arrive(counters_ptr + pid_k * tl.num_programs(1) + pid_n, splits):
            total = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
            for s in range(0, splits):
                total += tl.load(partials_ptr + s * K * C_out + dw_offs, mask=dw_ok, other=0.0, cache_modifier=".cg")
            storage.store_or_add(dw_ptr + dw_offs, total, dw_ok, ACCUMULATE)
    else:
        storage.store_or_add(dw_ptr + dw_offs, acc, dw_ok, ACCUMULATE)


# --------------------------------------------------------------------------- tile tables
# Fixed tables rather than triton.autotune: the interpreter must not autotune, autotune
# on the GPU machine needs torch, and a table keeps a CUDA-graph capture free of
# first-call benchmarking.

def _gemm_tiles(positions, channels):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a forward or dgrad conv GEMM.

    BLOCK_N follows the output channels (16, 32, 64, then 128): the network's
    convs have 16 to 256 output channels, and a 64-wide tile on 16 channels would
    waste 3/4 of every MMA. BLOCK_M is 128 when there are at least 16,384
    positions (batch 64 at 16x16: 128+ tiles, enough to fill the GPU) and 64
    below, so that small late-stage layers still spread over the SMs; 64 too for
    128-wide channel tiles, keeping the accumulator at 64 registers per thread
    over 4 warps. BLOCK_K = 32: 4 TF32 MMA k-steps per load, and three pipeline
    stages of 128x32 + 32x64 float32 stay near 72 KB of shared memory.
    """
    block_n = min(max(next_power_of_2(channels), 16), 128)
    block_m = 128 if positions >= 16384 and block_n <= 64 else 64
    return block_m, block_n, 32, 4


# wgrad: dw rows (kh, kw, ci) in blocks of 64, channels as in _gemm_tiles, and the
# positions (the reduction) 32 per step.
_WGRAD_BLOCK_K, _WGRAD_BLOCK_M = 64, 32
_WGRAD_TARGET_PROGRAMS = 264  # two waves over the H200's 132 SMs


def _wgrad_split(positions, k, c_out, tiles):
    """Positions per split (a multiple of the reduction block) and the number of splits.

    Enough splits for ``tiles`` output tiles to make two waves of programs, but
    few enough that writing and re-reading the partial dw (2 * splits * k * c_out
    floats) stays under a quarter of the operands the kernel loads
    (positions * (k + c_out) floats): late 1x1 layers have a large dw and few positions.
    """
    by_traffic = positions * (k + c_out) // (8 * k * c_out)
    splits = max(1, min(_WGRAD_TARGET_PROGRAMS // tiles, by_traffic, cdiv(positions, _WGRAD_BLOCK_M)))
    per_split = cdiv(cdiv(positions, splits), _WGRAD_BLOCK_M) * _WGRAD_BLOCK_M
    return per_split, cdiv(positions, per_split)


# --------------------------------------------------------------------------- launch helpers


def _shape_args(x, w, stride, padding):
    """Batch, input, output and kernel sizes of a conv."""
    n, h, wd, c_in = x.shape
    kh, kw, _, c_out = w.shape
    oh, ow = out_size(h, kh, stride, padding), out_size(wd, kw, stride, padding)
    return dict(n=n, H=h, W=wd, C_in=c_in, OH=oh, OW=ow, C_out=c_out, KH=kh, KW=kw)


def _forward(x, w, stride, padding, epilogue, bn_args=None, relu=False, pre_stats=None, skip=None):
    """Launch conv2d_fwd_kernel: y ("store"), or (y, stats) ("stats", "bn_eval"), with
    bn_args = (gamma, beta, running_mean, running_var, momentum, eps) for those two. With
    ``pre_stats`` (4, C_in) the conv's input is relu(x * scale + shift) (PRE_BN); with ``skip``
    ("store") y is the conv plus skip (ADD_SKIP)."""
    s = _shape_args(x, w, stride, padding)
    m, k = s["n"] * s["OH"] * s["OW"], s["KH"] * s["KW"] * s["C_in"]
    block_m, block_n, block_k, warps = _gemm_tiles(m, s["C_out"])
    grid = (cdiv(m, block_m), cdiv(s["C_out"], block_n))
    y = empty((s["n"], s["OH"], s["OW"], s["C_out"]), x.dtype)
    partials = empty((grid[0], 2, s["C_out"])) if epilogue == "stats" else x
    stats = empty((4, s["C_out"])) if epilogue != "store" else x
    gamma, beta, running_mean, running_var, momentum, eps = bn_args or (x, x, x, x, 0.0, 0.0)
    launch(conv2d_fwd_kernel, grid, x, w, y, partials, gamma, beta, running_mean, running_var, stats, momentum, eps,
           bn.arrival_counters(grid[1]), x if pre_stats is None else pre_stats, x if skip is None else skip,
           s["H"], s["W"], s["C_in"], s["OH"], s["OW"], s["C_out"], m, k, s["KW"], stride, padding,
           num_warps=warps, EPILOGUE=epilogue, RELU=relu, PRE_BN=pre_stats is not None, ADD_SKIP=skip is not None,
           INPUT_PRECISION=dot_precision(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
           BLOCK_T=bn.FINALIZE_BLOCK_T)
    return y if epilogue == "store" else (y, stats)


def _backward(dy, x, w, stride, padding, bn_args=None, relu=False, need_dx=True, dw_into=None, pre_stats=None,
              input_bn_into=(None, None), dx_into=None):
    """(dx, dw, input_sums) of a conv; with bn_args = (z, stats, sums, inv_count) dy is first taken through
    BN (+ReLU). Without ``need_dx`` the dgrad kernel is not launched and dx is None. With ``dw_into``
    (a gradient buffer of w's shape) dw is added into it, which is returned as dw; ``dx_into`` (x's
    gradient from its other consumers) likewise for dx.

    ``pre_stats`` (4, C_in): the forward took relu(bn(x)) with these statistics (PRE_BN). The weight
    gradient loads x so too, dx is the gradient of that activation, and dgrad's epilogue adds up
    the input batch norm's backward sums, input_sums (2, C_in) (else None), also added into
    ``input_bn_into`` = (dgamma_into, dbeta_into) when both are buffers."""
    s = _shape_args(x, w, stride, padding)
    bn_backward = bn_args is not None
    z, stats, sums, inv_count = bn_args if bn_backward else (dy, dy, dy, 0.0)
    precision = dot_precision()
    shapes = (s["H"], s["W"], s["C_in"], s["OH"], s["OW"], s["C_out"])

    # dgrad: M = N*H*W input positions, K = KH*KW*C_out
    dx = input_sums = None
    if need_dx:
        m, k = s["n"] * s["H"] * s["W"], s["KH"] * s["KW"] * s["C_out"]
        block_m, block_n, block_k, warps = _gemm_tiles(m, s["C_in"])
        grid = (cdiv(m, block_m), cdiv(s["C_in"], block_n))
        dx = empty(x.shape, x.dtype) if dx_into is None else dx_into
        input_sums = empty((2, s["C_in"])) if pre_stats is not None else None
        partials = empty((grid[0], 2, s["C_in"])) if pre_stats is not None else dx
        add_into = input_bn_into[0] is not None and input_bn_into[1] is not None
        dgamma, dbeta = input_bn_into if add_into else (dx, dx)
        launch(conv2d_dgrad_kernel, grid, dy, w, dx, z, stats, sums, inv_count,
               x, dx if pre_stats is None else pre_stats, partials, dx if input_sums is None else input_sums,
               dgamma, dbeta, bn.arrival_counters(grid[1]), *shapes, m, k, s["KW"], stride, padding,
               num_warps=warps, BN_BACKWARD=bn_backward, RELU=relu, INPUT_SUMS=pre_stats is not None,
               ADD_INTO=add_into, ACCUMULATE=dx_into is not None, INPUT_PRECISION=precision, BLOCK_M=block_m,
               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_T=bn.FINALIZE_BLOCK_T)

    # wgrad: dw (K = KH*KW*C_in, C_out) reduced over M = N*OH*OW positions, split-K
    m, k = s["n"] * s["OH"] * s["OW"], s["KH"] * s["KW"] * s["C_in"]
    _, block_n, _, warps = _gemm_tiles(m, s["C_out"])
    tiles = cdiv(k, _WGRAD_BLOCK_K) * cdiv(s["C_out"], block_n)
    per_split, splits = _wgrad_split(m, k, s["C_out"], tiles)
    dw = empty(w.shape) if dw_into is None else dw_into
    partials = empty((splits, k, s["C_out"])) if splits > 1 else dw
    launch(conv2d_wgrad_kernel, (cdiv(k, _WGRAD_BLOCK_K), cdiv(s["C_out"], block_n), splits),
           x, dy, dw, partials, bn.arrival_counters(tiles), x if pre_stats is None else pre_stats,
           z, stats, sums, inv_count, *shapes, m, k, s["KW"], stride, padding, per_split, num_warps=warps,
           BN_BACKWARD=bn_backward, RELU=relu, PRE_BN=pre_stats is not None, INPUT_PRECISION=precision,
           SPLIT=splits > 1, ACCUMULATE=dw_into is not None,
           BLOCK_K=_WGRAD_BLOCK_K, BLOCK_N=block_n, BLOCK_M=_WGRAD_BLOCK_M)
    return dx, dw, input_sums


# --------------------------------------------------------------------------- launchers (mirror reference/conv.py)

def conv2d(x, w, stride=1, padding=0):
    """Convolution without bias: x (N, H, W, Cin), w (KH, KW, Cin, Cout) -> (y (N, OH, OW, Cout), saved)."""
    return _forward(x, w, stride, padding, "store"), (x, w, stride, padding)


def conv2d_backward(dy, saved, need_dx=True, dw_into=None, dx_into=None):
    """Gradients of conv2d: dy (N, OH, OW, Cout) -> (dx, dw). Kernels: conv2d_dgrad (unless not
    ``need_dx``: dx None), conv2d_wgrad. With ``dw_into`` dw is added into it, with ``dx_into`` dx."""
    x, w, stride, padding = saved
    return _backward(dy, x, w, stride, padding, need_dx=need_dx, dw_into=dw_into, dx_into=dx_into)[:2]


def conv_bn_relu(x, w, gamma, beta, running_mean, running_var, stride=1, padding=0, training=True,
                 momentum=0.1, eps=1e-5, relu=True):
    """batch_norm(conv2d(x, w, stride, padding), ...) then ReLU if ``relu``: (y, running_mean, running_var, saved).

    The running arrays are updated in place (training) and returned.
    """
    shape = _shape_args(x, w, stride, padding)
    m = shape["n"] * shape["OH"] * shape["OW"]
    if training and m < 2:
        raise ValueError(f"conv_bn_relu: training needs more than 1 value per channel, got x {tuple(x.shape)} "
                         f"and w {tuple(w.shape)}")
    bn_args = (gamma, beta, running_mean, running_var, momentum, eps)
    if training:
        z, stats = _forward(x, w, stride, padding, "stats", bn_args)
        y = bn.normalize(z, stats, relu)
    else:
        z = None  # not stored: the backward recomputes it
        y, stats = _forward(x, w, stride, padding, "bn_eval", bn_args, relu)
    return y, running_mean, running_var, (x, w, stride, padding, z, stats, training, relu)


def conv_bn_relu_backward(dy, saved, need_dx=True, dw_into=None, dgamma_into=None, dbeta_into=None):
    """Gradients of conv_bn_relu: dy (N, OH, OW, Cout) -> (dx, dw, dgamma, dbeta); dx None when not
    ``need_dx``; each ``*_into`` (a gradient buffer) gets its gradient added and is returned for it."""
    x, w, stride, padding, z, stats, training, relu = saved
    if z is None:
        z = _forward(x, w, stride, padding, "store")
    sums = bn.backward_sums(dy, z, stats, relu, dgamma_into, dbeta_into)
    inv_count = bn.inverse_count(z.size // z.shape[-1], training)
    dx, dw, _ = _backward(dy, x, w, stride, padding, (z, stats, sums, inv_count), relu, need_dx, dw_into)
    return (dx, dw, *bn.parameter_gradients(sums, dgamma_into, dbeta_into))


def conv_chain(x, *params, layers, momentum=0.1, eps=1e-5, skip=None, input_bn=False, residual=False):
    """conv2d, batch_norm + ReLU, conv2d, ..., conv2d, in training mode: every conv but the last is
    followed by batch norm (batch statistics; running statistics updated in place) and ReLU; plus
    ``skip`` (an array of the output's shape, a residual unit's shortcut) when given, or x itself
    when ``residual``. With ``input_bn`` a batch norm + ReLU of x comes first (pre-activation).

    params: w_1, gamma_1, beta_1, running_mean_1, running_var_1, w_2, ..., w_n (HWIO weights, (C,)
    arrays), then with ``input_bn`` gamma_0, beta_0, running_mean_0, running_var_0; layers:
    ((stride, padding), ...), one per conv. Returns (y, ((running_mean, running_var), ...), saved),
    as reference.conv_chain. Kernels: bn_tile_reduce for the input's statistics (``input_bn``), then
    one conv2d_fwd per conv. Each later batch norm's statistics come from its conv's epilogue
    ("stats"), and the next conv applies it, with the ReLU, as it loads its operand (PRE_BN): the
    activations relu(bn(z)) are never written, the input's neither. The last conv adds skip or x
    in its epilogue (ADD_SKIP).
    """
    n = len(layers)
    stats = bn.statistics(x, *params[5 * n - 4:5 * n], momentum, eps) if input_bn else None
    z, inputs = x, []
    for i, (stride, padding) in enumerate(layers):
        w = params[5 * i]
        inputs.append((z, stats))
        if i < n - 1:
            gamma, beta, running_mean, running_var = params[5 * i + 1:5 * i + 5]
            z, stats = _forward(z, w, stride, padding, "stats", (gamma, beta, running_mean, running_var, momentum, eps),
                                pre_stats=stats)
        else:
            z = _forward(z, w, stride, padding, "store", pre_stats=stats, skip=x if residual else skip)
    running = tuple((params[5 * j + 3], params[5 * j + 4]) for j in range(n - 1 + input_bn))
    return z, running, (params[0::5], layers, inputs, skip is not None, residual)


def conv_chain_backward(dy, saved, need_dx=True, into=None, dx_into=None):
    """Gradients of conv_chain: dy (N, OH, OW, C) -> one per input: (dx, dw_1, dgamma_1, dbeta_1, None, None,
    dw_2, ..., dw_n, [dgamma_0, dbeta_0, None, None,] dskip), None for the running statistics; dx None
    when not ``need_dx`` (with ``residual`` it includes dy); dskip is dy itself (None without skip).
    ``into``: per entry of params, a gradient buffer to add that gradient into (returned for it), or None;
    ``dx_into``: the same for dx (x's gradient from its other consumers).

    Kernels: per conv, dgrad and wgrad; then, with an input batch norm, one bn_apply for dx (adding
    dy when ``residual``). Going back, each conv's operand is dz of its batch norm, made from the
    activation gradient, z, the statistics and the sums as it loads (BN_BACKWARD), and its dgrad's
    epilogue adds up the sums of the batch norm before it (INPUT_SUMS), so no kernel of batch norm's
    own is launched for the batch norms between convs.
    """
    weights, layers, inputs, has_skip, residual = saved
    n, input_stats = len(layers), inputs[0][1]
    n_params = 5 * n - 4 + (4 if input_stats is not None else 0)
    into = into or (None,) * n_params
    grads = [None] * n_params
    bn_args, operand = None, dy  # the last conv's operand: dy itself
    for i in reversed(range(n)):
        (stride, padding), (x, pre_stats) = layers[i], inputs[i]
        j = 5 * (i - 1 if i > 0 else n - 1) + 1  # params of the batch norm before conv i, if it has one
        bn_into = (into[j], into[j + 1]) if pre_stats is not None else (None, None)
        into_dx = dx_into if i == 0 and input_stats is None and need_dx else None  # else bn_apply adds into it
        dx, grads[5 * i], sums = _backward(operand, x, weights[i], stride, padding, bn_args, True,
                                           i > 0 or need_dx or pre_stats is not None, into[5 * i], pre_stats, bn_into,
                                           into_dx)
        if pre_stats is not None:  # x is z of batch norm i - 1 (or the input), whose backward comes next
            grads[j:j + 2] = bn.parameter_gradients(sums, *bn_into)
            bn_args, operand = (x, pre_stats, sums, bn.inverse_count(x.size // x.shape[-1], True)), dx
    if not need_dx:
        dx = None
    elif input_stats is not None:  # one kernel: the input batch norm's dx, plus dy, into dx_into
        dx = bn.input_gradient(dx, *bn_args, True, dy if residual else None, dx_into)
    elif residual:
        dx = elementwise.add_into(dx, dy)  # dx is the dgrad's new array, or dx_into
    return (dx, *grads, dy if has_skip else None)
