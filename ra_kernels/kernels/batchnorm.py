"""Batch norm over N, H, W per channel of NHWC activations, with an optional ReLU.

Besides ``batch_norm`` / ``batch_norm_backward`` this module holds the statistics,
coefficient and apply code that ``conv.py`` fuses into its conv kernels, so that
both ops run the same arithmetic.

Layouts (all float32, C-contiguous): x, y, dy, dx are (N, H, W, C), seen as
M = N*H*W rows of C channels; gamma, beta, running_mean, running_var, dgamma,
dbeta are (C,). Buffers passed between the kernels:

* ``partials`` (T, 2, C): one row per tile of ``TILE_M`` consecutive rows of x
  (T = cdiv(M, TILE_M)). Forward: the tile's mean and M2 (sum of squared
  deviations from the tile's own mean). Backward: the tile's sums of g and
  g * xhat, where g = dy * [y > 0] (dy itself without ReLU) and xhat = (x - mean) * rstd.
* ``stats`` (4, C): mean, rstd = 1/sqrt(var + eps), scale = gamma * rstd,
  shift = beta - mean * scale; forward y = relu(x * scale + shift).
* ``sums`` (2, C): sum of g (= dbeta) and sum of g * xhat (= dgamma) over all M rows.

Why per-tile (mean, M2) partials rather than float32 sums of x and x**2: the
variance from E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std: with
mean 100 and std 1, E[x^2] = 10001 carries a float32 rounding of ~5e-4, already
5e-4 of the variance, and every one of M additions adds more. M2 about the
tile's own mean sums small squared deviations (no cancellation), and Chan's
combination of tiles in ``bn_finalize_kernel`` only adds non-negative terms, so
the variance keeps float32 relative accuracy at any M. It costs no memory
traffic: the second pass runs over a tile already in registers, and the
partials are as large as (sum, sum of squares) would be.

Rounding: every division and square root is correctly rounded (``div_rn``, ``sqrt_rn``), so the
compiled kernels round as the interpreter does; ``/`` would compile to the approximate
``div.full.f32`` (tests/test_aot.py holds the PTX to this).

Determinism: every reduction is per-tile partials written to memory, then a
second kernel reducing them in a fixed order; no atomics.
"""
import triton.language as tl

from ..backend import empty
from ..launch import device_function, kernel, launch
from . import elementwise
from .tiles import cdiv, channel_tile

# --------------------------------------------------------------------------- device functions
# Shared with the conv kernels' epilogues and operand loads (conv.py).


@device_function
def bn_coefficients(mean, var, gamma, beta, eps):
    """rstd, scale, shift of y = x * scale + shift = gamma * (x - mean) * rstd + beta.

    A variance that overflowed float32 (inf: deviations beyond ~1e19) gives rstd = NaN rather
    than 1 / inf = 0, which would silently turn every output into beta (docs/design.md §2).
    """
    rstd = tl.where(var == float("inf"), float("nan"), tl.div_rn(1.0, tl.sqrt_rn(var + eps)))
    scale = gamma * rstd
    return rstd, scale, beta - mean * scale


@device_function
def affine_relu(x, scale, shift, RELU: tl.constexpr):
    """x * scale + shift, then max(., 0) if RELU. Also the backward's ReLU mask, so both agree bit for bit.

    NaN stays NaN, as in PyTorch: tl.maximum's default (PropagateNan.NONE) compiles to max.f32,
    which returns the number, so a diverging run would be zeroed at every ReLU on the GPU."""
    y = x * scale + shift
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return y


@device_function
def load_stats(stats_ptr, ch, ch_ok, C):
    """mean, rstd, scale, shift of channels ``ch`` (any shape) from a (4, C) stats buffer."""
    mean = tl.load(stats_ptr + ch, mask=ch_ok, other=0.0)
    rstd = tl.load(stats_ptr + C + ch, mask=ch_ok, other=0.0)
    scale = tl.load(stats_ptr + 2 * C + ch, mask=ch_ok, other=0.0)
    shift = tl.load(stats_ptr + 3 * C + ch, mask=ch_ok, other=0.0)
    return mean, rstd, scale, shift


@device_function
def tile_mean_m2(values, row_ok, count):
    """Per-column mean and M2 of the ``count`` (int32) valid rows (``row_ok``, [ROWS]) of a [ROWS, COLS] tile."""
    mean = tl.div_rn(tl.sum(tl.where(row_ok[:, None], values, 0.0), 0), tl.cast(count, tl.float32))
    deviation = tl.where(row_ok[:, None], values - mean[None, :], 0.0)
    return mean, tl.sum(deviation * deviation, 0)


@device_function
def bn_backward_terms(dy, x, mean, rstd, scale, shift, RELU: tl.constexpr):
    """g = dy * [affine_relu(x) > 0] (dy without ReLU) and xhat = (x - mean) * rstd, elementwise."""
    g = dy
    if RELU:
        # y > 0 exactly where the pre-ReLU value is > 0: recomputed from x, so y need not be kept.
        g = tl.where(affine_relu(x, scale, shift, False) > 0.0, dy, 0.0)
    return g, (x - mean) * rstd


@device_function
def bn_backward_tile(dy_ptr, x_ptr, offs, ok, ch, ch_ok, stats_ptr, sums_ptr, C, inv_count,
                     RELU: tl.constexpr):
    """dx of batch norm (+ReLU) at offsets ``offs`` (mask ``ok``; 0 where masked), channel ``ch`` per element.

    dx = scale * (g - inv_count * sum(g) - xhat * inv_count * sum(g * xhat)), with
    inv_count = 1/M in training (the gradient flows through the batch mean and
    variance) and 0 in eval (the running statistics are constants: dx = scale * g).
    ``ch`` / ``ch_ok`` broadcast against ``offs``: a row [1, COLS] when channels run along columns.
    """
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    mean, rstd, scale, shift = load_stats(stats_ptr, ch, ch_ok, C)
    mean_g = inv_count * tl.load(sums_ptr + ch, mask=ch_ok, other=0.0)
    mean_gx = inv_count * tl.load(sums_ptr + C + ch, mask=ch_ok, other=0.0)
    g, xhat = bn_backward_terms(dy, x, mean, rstd, scale, shift, RELU)
    # In eval the correction is left out, not multiplied by 0: a NaN in x (xhat, and so the
    # sum of g * xhat) would otherwise make the whole channel's dx NaN, where dx = scale * g.
    return tl.where(ok, scale * tl.where(inv_count > 0.0, g - mean_g - xhat * mean_gx, g), 0.0)


# --------------------------------------------------------------------------- kernels

_F32, _I32 = "*fp32", "i32"
# The elementwise and tile-reduction kernels see (M, C) as [BLOCK_M, BLOCK_C] tiles:
# channels are contiguous, so a tile row is one coalesced run. AOT with the largest
# channel block of the table below.
_TILE_SPEC = dict(BLOCK_M=64, BLOCK_C=64)


@kernel(aot=[dict(x_ptr=_F32, dy_ptr=_F32, stats_ptr=_F32, partials_ptr=_F32, M=_I32, C=_I32,
                  BACKWARD=backward, RELU=relu, **_TILE_SPEC)
             for backward, relu in ((False, False), (True, True), (True, False))])
def bn_tile_reduce_kernel(x_ptr, dy_ptr, stats_ptr, partials_ptr, M, C,
                          BACKWARD: tl.constexpr, RELU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials[t, :, c] for the tile of rows t*BLOCK_M.. and channels c (grid: cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)).

    Forward (BACKWARD=False; dy, stats unused): the tile mean and M2 of x.
    Backward: the tile sums of g and g * xhat, from dy, x and the forward's stats.
    """
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, ch_ok = rows < M, ch < C
    ok = row_ok[:, None] & ch_ok[None, :]
    offs = rows[:, None] * C + ch[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if BACKWARD:
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0)
        mean, rstd, scale, shift = load_stats(stats_ptr, ch[None, :], ch_ok[None, :], C)
        g, xhat = bn_backward_terms(dy, x, mean, rstd, scale, shift, RELU)
        first, second = tl.sum(g, 0), tl.sum(g * xhat, 0)  # g = 0 on masked elements
    else:
        first, second = tile_mean_m2(x, row_ok, tl.minimum(BLOCK_M, M - pid_m * BLOCK_M))
    out = partials_ptr + pid_m * 2 * C + ch
    tl.store(out, first, mask=ch_ok)
    tl.store(out + C, second, mask=ch_ok)


@kernel(aot=[dict(partials_ptr=_F32, gamma_ptr=_F32, beta_ptr=_F32, running_mean_ptr=_F32,
                  running_var_ptr=_F32, stats_ptr=_F32, C=_I32, T=_I32, TILE_M=_I32, M=_I32,
                  momentum="fp32", eps="fp32", TRAINING=training, BLOCK_T=32, BLOCK_C=32)
             for training in (True, False)])
def bn_finalize_kernel(partials_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, stats_ptr,
                       C, T, TILE_M, M, momentum, eps,
                       TRAINING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """stats (4, C) for a block of channels (grid: cdiv(C, BLOCK_C)).

    Training: mean and biased variance from the T (mean, M2) partials of tiles of
    TILE_M rows (the last may be shorter), combined in chunks of BLOCK_T tiles
    with Chan et al.'s parallel formula; then the running statistics are updated
    in place: running = (1 - momentum) * running + momentum * (mean, M2 / (M - 1)).
    Eval (partials unused): mean and variance are the running statistics.
    """
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    if TRAINING:
        count = 0.0
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tiles = t0 + tl.arange(0, BLOCK_T)
            # rows in each tile: TILE_M, fewer in the last, 0 past the end
            tile_count = tl.minimum(tl.maximum(M - tiles * TILE_M, 0), TILE_M).to(tl.float32)
            ok = (tiles < T)[:, None] & ch_ok[None, :]
            offs = tiles[:, None] * 2 * C + ch[None, :]
            tile_mean = tl.load(partials_ptr + offs, mask=ok, other=0.0)
            tile_m2 = tl.load(partials_ptr + offs + C, mask=ok, other=0.0)
            # the chunk of BLOCK_T tiles as one group: its mean, and its M2 = the tiles' M2
            # plus their spread about the chunk mean
            chunk_count = tl.sum(tile_count, 0)
            chunk_mean = tl.div_rn(tl.sum(tile_count[:, None] * tile_mean, 0), chunk_count)
            spread = tile_mean - chunk_mean[None, :]
            chunk_m2 = tl.sum(tile_m2 + tile_count[:, None] * spread * spread, 0)
            # merge the chunk into the running (count, mean, m2)
            total = count + chunk_count
            delta = chunk_mean - mean
            mean += delta * tl.div_rn(chunk_count, total)
            m2 += chunk_m2 + delta * delta * tl.div_rn(count * chunk_count, total)
            count = total
        var = tl.div_rn(m2, tl.cast(M, tl.float32))
        old_mean = tl.load(running_mean_ptr + ch, mask=ch_ok)
        old_var = tl.load(running_var_ptr + ch, mask=ch_ok)
        tl.store(running_mean_ptr + ch, (1.0 - momentum) * old_mean + momentum * mean, mask=ch_ok)
        unbiased = tl.div_rn(m2, tl.cast(M - 1, tl.float32))
        tl.store(running_var_ptr + ch, (1.0 - momentum) * old_var + momentum * unbiased, mask=ch_ok)
    else:
        mean = tl.load(running_mean_ptr + ch, mask=ch_ok)
        var = tl.load(running_var_ptr + ch, mask=ch_ok)
    gamma = tl.load(gamma_ptr + ch, mask=ch_ok)
    beta = tl.load(beta_ptr + ch, mask=ch_ok)
    rstd, scale, shift = bn_coefficients(mean, var, gamma, beta, eps)
    tl.store(stats_ptr + ch, mean, mask=ch_ok)
    tl.store(stats_ptr + C + ch, rstd, mask=ch_ok)
    tl.store(stats_ptr + 2 * C + ch, scale, mask=ch_ok)
    tl.store(stats_ptr + 3 * C + ch, shift, mask=ch_ok)


@kernel(aot=[dict(x_ptr=_F32, dy_ptr=_F32, stats_ptr=_F32, sums_ptr=_F32, inv_count="fp32", out_ptr=_F32,
                  M=_I32, C=_I32, BACKWARD=backward, RELU=relu, **_TILE_SPEC)
             for backward in (False, True) for relu in (True, False)])
def bn_apply_kernel(x_ptr, dy_ptr, stats_ptr, sums_ptr, inv_count, out_ptr, M, C,
                    BACKWARD: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_M, BLOCK_C] tile of (M, C) (grid: cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)).

    Forward (dy, sums, inv_count unused): out = y = affine_relu(x). Backward: out = dx
    from dy, x, stats and sums (see ``bn_backward_tile``).
    """
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = (ch < C)[None, :]
    ok = (rows < M)[:, None] & ch_ok
    offs = rows[:, None] * C + ch[None, :]
    if BACKWARD:
        out = bn_backward_tile(dy_ptr, x_ptr, offs, ok, ch[None, :], ch_ok, stats_ptr, sums_ptr, C, inv_count,
                               RELU)
    else:
        _, _, scale, shift = load_stats(stats_ptr, ch[None, :], ch_ok, C)
        out = affine_relu(tl.load(x_ptr + offs, mask=ok), scale, shift, RELU)
    tl.store(out_ptr + offs, out, mask=ok)


@kernel(aot=[dict(partials_ptr=_F32, out_ptr=_F32, into_low_ptr=_F32, into_high_ptr=_F32, T=_I32, L=_I32,
                  SPLIT=_I32, STORE=store, ADD_INTO=add_into, BLOCK_T=16, BLOCK_L=256)
             for store, add_into in ((True, False), (False, True), (True, True))])
def sum_rows_kernel(partials_ptr, out_ptr, into_low_ptr, into_high_ptr, T, L, SPLIT,
                    STORE: tl.constexpr, ADD_INTO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    """s[l] = sum over t of partials[t, l] for (T, L) partials, in a fixed order (grid: cdiv(L, BLOCK_L)).

    STORE: out[l] = s[l]. ADD_INTO: s added into two gradient buffers, into_low[l] += s[l] for
    l < SPLIT and into_high[l - SPLIT] += s[l] beyond (batch norm's sums of g and g * xhat are
    dbeta and dgamma; a split-K weight gradient has SPLIT = L and one buffer).
    """
    cols = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols_ok = cols < L
    acc = tl.zeros([BLOCK_L], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & cols_ok[None, :]
        acc += tl.sum(tl.load(partials_ptr + t[:, None] * L + cols[None, :], mask=ok, other=0.0), 0)
    if STORE:
        tl.store(out_ptr + cols, acc, mask=cols_ok)
    if ADD_INTO:
        low, high = cols_ok & (cols < SPLIT), cols_ok & (cols >= SPLIT)
        tl.store(into_low_ptr + cols, tl.load(into_low_ptr + cols, mask=low) + acc, mask=low)
        tl.store(into_high_ptr + cols - SPLIT, tl.load(into_high_ptr + cols - SPLIT, mask=high) + acc, mask=high)


# --------------------------------------------------------------------------- launch helpers (also used by conv.py)

# Tiles of the (M, C) kernels: BLOCK_C covers the channels up to 64 (a contiguous
# run of 256 B per row), and BLOCK_M makes a tile 4,096 elements (32 per thread
# over 4 warps: enough loads in flight to stream at bandwidth, few enough
# registers). Fixed rather than autotuned: these kernels are memory-bound, and
# the interpreter must not autotune.
_TILE_ELEMENTS = 4096
_FINALIZE_BLOCKS = dict(BLOCK_T=32, BLOCK_C=32)
_SUM_BLOCKS = dict(BLOCK_T=16, BLOCK_L=256)


def _tiles(C):
    return channel_tile(C, _TILE_ELEMENTS, max_block_c=64)


def sum_rows(partials, out=None, into=None):
    """partials (T, L) summed over T, by sum_rows_kernel: into ``out`` (L elements) when given, and
    added into ``into`` when given: one gradient buffer of L elements, or two of L / 2 (low, high),
    the first taking the first half. Returns out."""
    t, length = partials.shape[0], partials.size // partials.shape[0]
    low, high = (into, into) if into is None or not isinstance(into, tuple) else into
    split = length if high is low else low.size
    launch(sum_rows_kernel, ((length + _SUM_BLOCKS["BLOCK_L"] - 1) // _SUM_BLOCKS["BLOCK_L"],), partials,
           partials if out is None else out, partials if low is None else low, partials if high is None else high,
           t, length, split, STORE=out is not None, ADD_INTO=into is not None, **_SUM_BLOCKS)
    return out


def finalize(partials, tile_m, m, gamma, beta, running_mean, running_var, training, momentum, eps):
    """stats (4, C) from forward partials (T, 2, C) of tiles of ``tile_m`` rows (training; running stats
    updated in place) or from the running statistics (eval: ``partials`` unused, pass any float32 array)."""
    c = gamma.shape[0]
    stats = empty((4, c))
    launch(bn_finalize_kernel, (cdiv(c, _FINALIZE_BLOCKS["BLOCK_C"]),), partials, gamma, beta,
           running_mean, running_var, stats, c, partials.shape[0], tile_m, m, momentum, eps,
           TRAINING=training, **_FINALIZE_BLOCKS)
    return stats


def normalize(x, stats, relu):
    """Batch-normalise x (..., C) with the finalized ``stats``: y = relu(x * scale + shift) (ReLU if
    ``relu``), by bn_apply_kernel."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    y = empty(x.shape)
    launch(bn_apply_kernel, (cdiv(m, block_m), cdiv(c, block_c)), x, x, stats, stats, 0.0, y,
           m, c, BACKWARD=False, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    return y


def backward_sums(dy, x, stats, relu, dgamma_into=None, dbeta_into=None):
    """sums (2, C): the sums of g and g * xhat over every row of dy, x (..., C). With both
    ``dgamma_into`` and ``dbeta_into`` (gradient buffers, (C,)) the sums are also added into them,
    by the same launch."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    partials = empty((cdiv(m, block_m), 2, c))
    launch(bn_tile_reduce_kernel, (partials.shape[0], cdiv(c, block_c)), x, dy, stats, partials, m, c,
           BACKWARD=True, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    both = dgamma_into is not None and dbeta_into is not None
    return sum_rows(partials, empty((2, c)), (dbeta_into, dgamma_into) if both else None)


def parameter_gradients(sums, dgamma_into, dbeta_into):
    """(dgamma, dbeta) of batch norm from ``backward_sums``: the buffers themselves when both were
    given (the sums went into them), else the sums' rows (an into given alone gets them added here)."""
    if dgamma_into is not None and dbeta_into is not None:
        return dgamma_into, dbeta_into
    return tuple(g if into is None else elementwise.add_into(into, g)
                 for g, into in ((sums[1], dgamma_into), (sums[0], dbeta_into)))


def inverse_count(m, training):
    """The inv_count of ``bn_backward_tile``: 1/M in training, 0 in eval."""
    return 1.0 / m if training else 0.0


# --------------------------------------------------------------------------- launchers (mirror reference/norm.py)

def batch_norm(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5, relu=False):
    """Batch norm of x (N, H, W, C) per channel, then ReLU if ``relu``: (y, running_mean, running_var, saved).

    Training: batch statistics (biased variance), running statistics updated in
    place with the unbiased variance; eval: the running statistics. The running
    arrays returned are the ones passed in. Kernels: training bn_tile_reduce +
    bn_finalize + bn_apply, eval bn_finalize + bn_apply.
    """
    c = x.shape[-1]
    m = x.size // c  # training needs m >= 2: ra_kernels.functional checks it, for every backend
    if training:
        block_m, block_c = _tiles(c)
        partials = empty((cdiv(m, block_m), 2, c))
        launch(bn_tile_reduce_kernel, (partials.shape[0], cdiv(c, block_c)), x, x, x, partials, m, c,
               BACKWARD=False, RELU=False, BLOCK_M=block_m, BLOCK_C=block_c)
        stats = finalize(partials, block_m, m, gamma, beta, running_mean, running_var, True, momentum, eps)
    else:
        stats = finalize(x, 1, m, gamma, beta, running_mean, running_var, False, momentum, eps)
    return normalize(x, stats, relu), running_mean, running_var, (x, stats, training, relu)


def batch_norm_backward(dy, saved, dgamma_into=None, dbeta_into=None):
    """Gradients of batch_norm: dy (N, H, W, C) -> (dx, dgamma, dbeta); ``*_into`` as in reference/.

    Kernels: bn_tile_reduce (sums of g and g * xhat per tile) + sum_rows, then
    bn_apply (backward) for dx; dgamma and dbeta are those sums.
    """
    x, stats, training, relu = saved
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    sums = backward_sums(dy, x, stats, relu, dgamma_into, dbeta_into)
    dx = empty(x.shape)
    launch(bn_apply_kernel, (cdiv(m, block_m), cdiv(c, block_c)), x, dy, stats, sums,
           inverse_count(m, training), dx, m, c, BACKWARD=True, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    return (dx, *parameter_gradients(sums, dgamma_into, dbeta_into))
