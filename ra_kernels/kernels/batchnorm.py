"""Batch norm over N, H, W per channel of NHWC activations, with an optional ReLU.

Besides ``batch_norm`` / ``batch_norm_backward`` this module holds the statistics,
coefficient and apply code that ``conv.py`` fuses into its conv kernels, so that
both ops run the same arithmetic.

Layouts (C-contiguous): x, y, dy, dx are (N, H, W, C), float32 or bfloat16 (computed in
float32, kernels/storage.py), seen as M = N*H*W rows of C channels; gamma, beta,
running_mean, running_var, dgamma, dbeta are (C,) float32, and so are the buffers below.
Buffers passed between the kernels:

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
combination of tiles in ``finalize_statistics`` only adds non-negative terms, so
the variance keeps float32 relative accuracy at any M. It costs no memory
traffic: the second pass runs over a tile already in registers, and the
partials are as large as (sum, sum of squares) would be.

Rounding: every division and square root is correctly rounded (``div_rn``, ``sqrt_rn``), so the
compiled kernels round as the interpreter does; ``/`` would compile to the approximate
``div.full.f32`` (tests/test_aot.py holds the PTX to this).

Determinism: every reduction is per-tile partials written to memory, then
reduced in a fixed order, in the same launch, by the last program to finish
(``last_to_arrive``: one integer atomic per program counts the arrivals; no
float atomics), so results do not depend on which program is last.
"""
import numpy as np
import triton.language as tl

from ..backend import empty, get_backend, host_reads_refused, xp
from ..launch import after_interrupted_launch, device_function, kernel, launch
from . import elementwise, storage
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
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean, rstd, scale, shift = load_stats(stats_ptr, ch, ch_ok, C)
    mean_g = inv_count * tl.load(sums_ptr + ch, mask=ch_ok, other=0.0)
    mean_gx = inv_count * tl.load(sums_ptr + C + ch, mask=ch_ok, other=0.0)
    g, xhat = bn_backward_terms(dy, x, mean, rstd, scale, shift, RELU)
    # In eval the correction is left out, not multiplied by 0: a NaN in x (xhat, and so the
    # sum of g * xhat) would otherwise make the whole channel's dx NaN, where dx = scale * g.
    return tl.where(ok, scale * tl.where(inv_count > 0.0, g - mean_g - xhat * mean_gx, g), 0.0)


@device_function
def last_to_arrive(counter_ptr, arrivals):
    """True in the last of the ``arrivals`` programs that call this with the same int32 counter (from
    ``arrival_counters``), which it then resets to 0 for the next launch (and the next replay of a
    CUDA graph). Every store a program made before the call is visible to that last program: a
    barrier of the program's threads, then one gpu-scope acquire-release atomic increment (the
    threadfence-reduction pattern; the PTX is bar.sync, atom.acq_rel.gpu, bar.sync). The last
    program should read what the others wrote with ``cache_modifier=".cg"`` (from L2)."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    tl.store(counter_ptr, 0, mask=last)
    return last


@device_function
def finalize_statistics(partials_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, stats_ptr,
                        ch, ch_ok, C, T, TILE_M, M, momentum, eps,
                        TRAINING: tl.constexpr, BLOCK_T: tl.constexpr):
    """stats (4, C) of the channels ``ch`` (a vector; mask ``ch_ok``).

    Training: mean and biased variance from the T (mean, M2) partials (T, 2, C) of tiles of
    TILE_M rows (the last may be shorter), combined in chunks of BLOCK_T tiles with Chan et al.'s
    parallel formula, in a fixed order; then the running statistics are updated in place:
    running = (1 - momentum) * running + momentum * (mean, M2 / (M - 1)).
    Eval (partials unused): mean and variance are the running statistics.
    """
    if TRAINING:
        count = 0.0
        mean = tl.zeros(ch.shape, tl.float32)
        m2 = tl.zeros(ch.shape, tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tiles = t0 + tl.arange(0, BLOCK_T)
            # rows in each tile: TILE_M, fewer in the last, 0 past the end
            tile_count = tl.minimum(tl.maximum(M - tiles * TILE_M, 0), TILE_M).to(tl.float32)
            ok = (tiles < T)[:, None] & ch_ok[None, :]
            offs = tiles[:, None] * 2 * C + ch[None, :]
            tile_mean = tl.load(partials_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
            tile_m2 = tl.load(partials_ptr + offs + C, mask=ok, other=0.0, cache_modifier=".cg")
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


@device_function
def finalize_sums(partials_ptr, sums_ptr, dgamma_ptr, dbeta_ptr, ch, ch_ok, C, T,
                  ADD_INTO: tl.constexpr, BLOCK_T: tl.constexpr):
    """sums (2, C) of the channels ``ch``: the backward partials (T, 2, C) summed over T in a fixed
    order; with ADD_INTO also added into the gradient buffers dbeta (the sum of g) and dgamma (of g * xhat)."""
    first = tl.zeros(ch.shape, tl.float32)
    second = tl.zeros(ch.shape, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        ok = (tiles < T)[:, None] & ch_ok[None, :]
        offs = tiles[:, None] * 2 * C + ch[None, :]
        first += tl.sum(tl.load(partials_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg"), 0)
        second += tl.sum(tl.load(partials_ptr + offs + C, mask=ok, other=0.0, cache_modifier=".cg"), 0)
    tl.store(sums_ptr + ch, first, mask=ch_ok)
    tl.store(sums_ptr + C + ch, second, mask=ch_ok)
    if ADD_INTO:
        storage.store_or_add(dbeta_ptr + ch, first, ch_ok, True)
        storage.store_or_add(dgamma_ptr + ch, second, ch_ok, True)


@device_function
def _store_partials(partials_ptr, first, second, ch, ch_ok, C):
    """This program's row of partials (T, 2, C): row program_id(0), channels ``ch``."""
    out = partials_ptr + tl.program_id(0) * 2 * C + ch
    tl.store(out, first, mask=ch_ok)
    tl.store(out + C, second, mask=ch_ok)


@device_function
def reduce_statistics(values, row_ok, partials_ptr, counters_ptr, gamma_ptr, beta_ptr, running_mean_ptr,
                      running_var_ptr, stats_ptr, ch, ch_ok, C, M, momentum, eps,
                      TILE_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Batch-norm training statistics of a [TILE_M rows, channels ``ch``] tile of ``values`` (grid: row tiles,
    channel blocks): its mean and M2 go into partials, and the last tile of the column finishes stats
    and the running statistics (``finalize_statistics``)."""
    tile, tiles = tl.program_id(0), tl.num_programs(0)
    mean, m2 = tile_mean_m2(values, row_ok, tl.minimum(TILE_M, M - tile * TILE_M))
    _store_partials(partials_ptr, mean, m2, ch, ch_ok, C)
    if last_to_arrive(counters_ptr + tl.program_id(1), tiles):
        finalize_statistics(partials_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, stats_ptr,
                            ch, ch_ok, C, tiles, TILE_M, M, momentum, eps, True, BLOCK_T)


@device_function
def reduce_backward_sums(g, xhat, partials_ptr, counters_ptr, sums_ptr, dgamma_ptr, dbeta_ptr, ch, ch_ok, C,
                         ADD_INTO: tl.constexpr, BLOCK_T: tl.constexpr):
    """Batch-norm backward sums of a tile of g (0 where masked) and xhat, channels ``ch`` (grid: row tiles,
    channel blocks): its sums of g and g * xhat go into partials, and the last tile of the column finishes
    sums (and dbeta, dgamma with ADD_INTO; ``finalize_sums``)."""
    _store_partials(partials_ptr, tl.sum(g, 0), tl.sum(g * xhat, 0), ch, ch_ok, C)
    tiles = tl.num_programs(0)
    if last_to_arrive(counters_ptr + tl.program_id(1), tiles):
        finalize_sums(partials_ptr, sums_ptr, dgamma_ptr, dbeta_ptr, ch, ch_ok, C, tiles, ADD_INTO, BLOCK_T)


# --------------------------------------------------------------------------- kernels

_F32, _BF16, _I32 = "*fp32", "*bf16", "i32"
# The elementwise and tile-reduction kernels see (M, C) as [BLOCK_M, BLOCK_C] tiles:
# channels are contiguous, so a tile row is one coalesced run. AOT with the largest
# channel block of the table below.
_TILE_SPEC = dict(BLOCK_M=64, BLOCK_C=64)
_FINALIZE_TYPES = dict(gamma_ptr=_F32, beta_ptr=_F32, running_mean_ptr=_F32, running_var_ptr=_F32,
                       momentum="fp32", eps="fp32", counters_ptr="*i32")


@kernel(aot=[dict(x_ptr=t, dy_ptr=t, stats_ptr=_F32, partials_ptr=_F32, sums_ptr=_F32, dgamma_ptr=_F32,
                  dbeta_ptr=_F32, **_FINALIZE_TYPES, M=_I32, C=_I32, BACKWARD=backward, RELU=relu,
                  ADD_INTO=add_into, BLOCK_T=32, **_TILE_SPEC)
             for backward, relu, add_into, t in ((False, False, False, _F32), (True, True, True, _F32),
                                                 (True, False, False, _F32), (False, False, False, _BF16),
                                                 (True, True, True, _BF16))])
def bn_tile_reduce_kernel(x_ptr, dy_ptr, stats_ptr, partials_ptr, sums_ptr, dgamma_ptr, dbeta_ptr,
                          gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, momentum, eps, counters_ptr,
                          M, C, BACKWARD: tl.constexpr, RELU: tl.constexpr, ADD_INTO: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel reductions over the M rows of x (grid: cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)), finished in
    the same launch: each program writes partials[t, :, c] for its tile of rows t*BLOCK_M.. and channels
    c, and the last program of each column of tiles combines them (``reduce_statistics``,
    ``reduce_backward_sums``; counter: the column).

    Forward (BACKWARD=False; dy, sums, dgamma, dbeta unused): the tiles' mean and M2 of x, finished by
    ``finalize_statistics`` (training) into stats, the running statistics updated in place.
    Backward (stats from the forward): the tiles' sums of g and g * xhat, finished by ``finalize_sums``
    into sums (and into dgamma, dbeta with ADD_INTO); the finalize arguments are unused.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, ch_ok = rows < M, ch < C
    ok = row_ok[:, None] & ch_ok[None, :]
    offs = rows[:, None] * C + ch[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean, rstd, scale, shift = load_stats(stats_ptr, ch[None, :], ch_ok[None, :], C)
        g, xhat = bn_backward_terms(dy, x, mean, rstd, scale, shift, RELU)  # g = 0 on masked elements
        reduce_backward_sums(g, xhat, partials_ptr, counters_ptr, sums_ptr, dgamma_ptr, dbeta_ptr, ch, ch_ok, C,
                             ADD_INTO, BLOCK_T)
    else:
        reduce_statistics(x, row_ok, partials_ptr, counters_ptr, gamma_ptr, beta_ptr, running_mean_ptr,
                          running_var_ptr, stats_ptr, ch, ch_ok, C, M, momentum, eps, BLOCK_M, BLOCK_T)


@kernel(aot=[dict(gamma_ptr=_F32, beta_ptr=_F32, running_mean_ptr=_F32, running_var_ptr=_F32, stats_ptr=_F32,
                  C=_I32, eps="fp32", BLOCK_C=32)])
def bn_eval_coefficients_kernel(gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, stats_ptr, C, eps,
                                BLOCK_C: tl.constexpr):
    """stats (4, C) from the running statistics (eval), for a block of channels (grid: cdiv(C, BLOCK_C))."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_statistics(gamma_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, stats_ptr,
                        ch, ch < C, C, 0, 1, 1, 0.0, eps, False, 1)


@kernel(aot=[dict(x_ptr=t, dy_ptr=t, stats_ptr=_F32, sums_ptr=_F32, inv_count="fp32", add_ptr=t,
                  out_ptr=t, M=_I32, C=_I32, BACKWARD=backward, RELU=relu, ADD=add, ACCUMULATE=accumulate,
                  **_TILE_SPEC)
             for backward, add, accumulate in ((False, False, False), (True, False, False), (True, True, False),
                                               (True, True, True))
             for relu, t in ((True, _F32), (False, _F32), (True, _BF16))])
def bn_apply_kernel(x_ptr, dy_ptr, stats_ptr, sums_ptr, inv_count, add_ptr, out_ptr, M, C,
                    BACKWARD: tl.constexpr, RELU: tl.constexpr, ADD: tl.constexpr, ACCUMULATE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_M, BLOCK_C] tile of (M, C) (grid: cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)).

    Forward (dy, sums, inv_count unused): out = y = affine_relu(x). Backward: out = dx
    from dy, x, stats and sums (see ``bn_backward_tile``), plus add (M, C) with ADD: the
    gradient of a residual unit's identity shortcut joins its input gradient here; with
    ACCUMULATE all that is added into out (the input's gradient from its other consumers).
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
        if ADD:
            out += tl.load(add_ptr + offs, mask=ok).to(tl.float32)
    else:
        _, _, scale, shift = load_stats(stats_ptr, ch[None, :], ch_ok, C)
        out = affine_relu(tl.load(x_ptr + offs, mask=ok).to(tl.float32), scale, shift, RELU)
    storage.store_or_add(out_ptr + offs, out, ok, ACCUMULATE)


# --------------------------------------------------------------------------- launch helpers (also used by conv.py)

# Tiles of the (M, C) kernels: BLOCK_C covers the channels up to 64 (a contiguous
# run of 256 B per row), and BLOCK_M makes a tile 4,096 elements (32 per thread
# over 4 warps: enough loads in flight to stream at bandwidth, few enough
# registers). Fixed rather than autotuned: these kernels are memory-bound, and
# the interpreter must not autotune.
_TILE_ELEMENTS = 4096
#: Tiles combined per step when a last program finishes a reduction (32 rows of partials).
FINALIZE_BLOCK_T = 32
#: Channels per program of the eval coefficients.
_EVAL_BLOCK_C = 32
#: Arrival counters kept per backend and device (``arrival_counters``): 64k groups, 256 KB; a launch
#: uses one per column of tiles or per weight-gradient tile (9 at most in attention56 and attention92).
ARRIVAL_COUNTERS = 65536
_COUNTERS = {}


def _tiles(C):
    return channel_tile(C, _TILE_ELEMENTS, max_block_c=64)


def arrival_counters(n):
    """int32 counters for ``last_to_arrive``, at least n, all 0: one array of ARRIVAL_COUNTERS per
    backend and device, made at its first use and never replaced (a captured graph keeps its
    address), shared by every launch. Each launch leaves its counters at 0 for the next, so
    launches that run one after another on a stream (the steps) share them; two such launches
    must not run at once on one device. The first use must come before any capture (a step's
    eager warm-up does it): a capture would record the zeroing instead of doing it."""
    if n > ARRIVAL_COUNTERS:
        raise ValueError(f"a launch needs {n} arrival counters, more than the {ARRIVAL_COUNTERS} kept "
                         f"(kernels/batchnorm.py ARRIVAL_COUNTERS)")
    name = get_backend()
    key = (name, xp().cuda.Device().id if name == "cuda" else None)
    counters = _COUNTERS.get(key)
    if counters is None:
        if host_reads_refused():  # a capture is under way (ra_kernels/graph.py)
            raise RuntimeError("the arrival counters are made at their first use, which must not be inside a "
                               "CUDA-graph capture: run the step once eagerly first (graph.StepGraph does)")
        counters = _COUNTERS[key] = xp().zeros(ARRIVAL_COUNTERS, np.int32)
    return counters


@after_interrupted_launch
def _reset_interpreted_counters():
    """An interpreted launch that stopped partway leaves its counters counted: zero them, or every later
    launch would finish its reductions early."""
    counters = _COUNTERS.get(("interpret", None))
    if counters is not None:
        counters.fill(0)


def eval_coefficients(gamma, beta, running_mean, running_var, eps):
    """stats (4, C) of eval batch norm, from the running statistics."""
    c = gamma.shape[0]
    stats = empty((4, c))
    launch(bn_eval_coefficients_kernel, (cdiv(c, _EVAL_BLOCK_C),), gamma, beta, running_mean, running_var, stats,
           c, eps, BLOCK_C=_EVAL_BLOCK_C)
    return stats


def normalize(x, stats, relu):
    """Batch-normalise x (..., C) with the finalized ``stats``: y = relu(x * scale + shift) (ReLU if
    ``relu``), by bn_apply_kernel."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    y = empty(x.shape, x.dtype)
    launch(bn_apply_kernel, (cdiv(m, block_m), cdiv(c, block_c)), x, x, stats, stats, 0.0, x, y,
           m, c, BACKWARD=False, RELU=relu, ADD=False, ACCUMULATE=False, BLOCK_M=block_m, BLOCK_C=block_c)
    return y


def statistics(x, gamma, beta, running_mean, running_var, momentum, eps):
    """stats (4, C) of training batch norm over every row of x (..., C), the running statistics
    updated in place: one launch of bn_tile_reduce_kernel, finished by its last programs."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    partials, stats = empty((cdiv(m, block_m), 2, c)), empty((4, c))
    launch(bn_tile_reduce_kernel, (partials.shape[0], cdiv(c, block_c)), x, x, stats, partials, x, x, x,
           gamma, beta, running_mean, running_var, momentum, eps, arrival_counters(cdiv(c, block_c)), m, c,
           BACKWARD=False, RELU=False, ADD_INTO=False, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_M=block_m, BLOCK_C=block_c)
    return stats


def input_gradient(dy, x, stats, sums, inv_count, relu, add=None, into=None):
    """dx of batch norm (+ReLU) from dy, x (..., C), its stats and backward sums, plus ``add`` (an
    array of x's shape) when given; added into ``into`` (then returned) when given: one launch of
    bn_apply_kernel."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    dx = empty(x.shape, x.dtype) if into is None else into
    launch(bn_apply_kernel, (cdiv(m, block_m), cdiv(c, block_c)), x, dy, stats, sums, inv_count,
           x if add is None else add, dx, m, c, BACKWARD=True, RELU=relu, ADD=add is not None,
           ACCUMULATE=into is not None, BLOCK_M=block_m, BLOCK_C=block_c)
    return dx


def backward_sums(dy, x, stats, relu, dgamma_into=None, dbeta_into=None):
    """sums (2, C): the sums of g and g * xhat over every row of dy, x (..., C), by one launch of
    bn_tile_reduce_kernel. With both ``dgamma_into`` and ``dbeta_into`` (gradient buffers, (C,)) the
    sums are also added into them."""
    c = x.shape[-1]
    m, (block_m, block_c) = x.size // c, _tiles(c)
    partials, sums = empty((cdiv(m, block_m), 2, c)), empty((2, c))
    both = dgamma_into is not None and dbeta_into is not None
    dgamma, dbeta = (dgamma_into, dbeta_into) if both else (sums, sums)
    launch(bn_tile_reduce_kernel, (partials.shape[0], cdiv(c, block_c)), x, dy, stats, partials, sums, dgamma, dbeta,
           x, x, x, x, 0.0, 0.0, arrival_counters(cdiv(c, block_c)), m, c,
           BACKWARD=True, RELU=relu, ADD_INTO=both, BLOCK_T=FINALIZE_BLOCK_T, BLOCK_M=block_m, BLOCK_C=block_c)
    return sums


def parameter_gradients(sums, dgamma_into, dbeta_into):
    """(dgamma, dbeta) of batch norm from ``backward_sums``: the buffers themselves when both were
    given (the sums went into them), else the sums' rows (an into given alone gets them added here)."""
    if dgamma_into is not None and dbeta_into is not None:
        return dgamma_into, dbeta_into
    return elementwise.gradient_into(sums[1], dgamma_into), elementwise.gradient_into(sums[0], dbeta_into)


def inverse_count(m, training):
    """The inv_count of ``bn_backward_tile``: 1/M in training, 0 in eval."""
    return 1.0 / m if training else 0.0


# --------------------------------------------------------------------------- launchers (mirror reference/norm.py)

def batch_norm(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5, relu=False):
    """Batch norm of x (N, H, W, C) per channel, then ReLU if ``relu``: (y, running_mean, running_var, saved).

    Training: batch statistics (biased variance), running statistics updated in
    place with the unbiased variance; eval: the running statistics. The running
    arrays returned are the ones passed in. Kernels: training bn_tile_reduce (statistics, finished by
    its last programs) + bn_apply, eval bn_eval_coefficients + bn_apply.
    """
    # training needs >= 2 rows: ra_kernels.functional checks it, for every backend
    if training:
        stats = statistics(x, gamma, beta, running_mean, running_var, momentum, eps)
    else:
        stats = eval_coefficients(gamma, beta, running_mean, running_var, eps)
    return normalize(x, stats, relu), running_mean, running_var, (x, stats, training, relu)


def batch_norm_backward(dy, saved, dgamma_into=None, dbeta_into=None):
    """Gradients of batch_norm: dy (N, H, W, C) -> (dx, dgamma, dbeta); ``*_into`` as in reference/.

    Kernels: bn_tile_reduce (the sums of g and g * xhat, finished by its last programs), then
    bn_apply (backward) for dx; dgamma and dbeta are those sums.
    """
    x, stats, training, relu = saved
    sums = backward_sums(dy, x, stats, relu, dgamma_into, dbeta_into)
    dx = input_gradient(dy, x, stats, sums, inverse_count(x.size // x.shape[-1], training), relu)
    return (dx, *parameter_gradients(sums, dgamma_into, dbeta_into))
