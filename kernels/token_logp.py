"""Triton kernels for fused linear token log-probabilities (DESIGN §4.3) and their launchers.

    x[t, v] = h[t] . w[v]
    y[t, v] = tanh(x / softcap)   (x without softcap),   z = z_scale y
    z_scale = softcap / temperature   (1 / temperature without softcap)
    logp[t] = (y[t, tgt[t]] - y_max[t]) z_scale - log L[t]
    entropy[t] = log L[t] - E_p[z - z_max][t]
    L = sum_v exp(z - z_max),   E_p[z - z_max] = sum_v exp(z - z_max) (z - z_max) / L  (<= 0)

Everything is anchored at the row max, an actual logit, so z - z_max is exact near the max: for
a peaked row (entropy ~1e-6) the absolute lse and E_p[z] (~30 under Gemma's softcap) would
carry an error of ulp(30) ~ 2e-6 into `z_tgt - lse` and `lse - E_p[z]`: 100 % of the result,
seen on an H200, whose many vocabulary splits changed the rounding. The max is taken over y
and z - z_max computed as (y - y_max) z_scale: on the GPU (Triton's default enable_fp_fusion)
`y z_scale - z_max` may become one fma, leaving the max's own term off zero by ulp(30) / 2.

Forward, flash-decoding style as in kernels/catalog.py: the grid is (token blocks, vocabulary
splits); each program streams its split in BLOCK_V tiles (`tl.dot` over d, softcap applied in
the tile) and keeps a running (y_max, L - 1, sum exp(z - z_max) (z - z_max), target's y); a
small kernel merges the splits at their common max into logp, entropy and the row statistics
[3, T] = (y_max, log L, E_p[z] - z_max). L - 1 is carried without the max's exact
exp(0) = 1 and log L = log1p(L - 1): adding each tile into L ~ 1 + 1e-6 rounds away ~5 % of
a peaked row's log L (twice plain PyTorch's logp error in the interpreter with an H200's 132
SMs' splits; 1e-4 of it with L - 1).

Backward recomputes every tile from the saved row statistics:

    z - z_max = (y - y_max) z_scale,   p = exp((z - z_max) - log L)
    dL/dz = g_logp (1[v = tgt] - p) - g_ent p ((z - z_max) - E_p[z - z_max])
    dz/dx = (1 - y^2) / temperature   (1 / temperature without softcap)

in two passes, each output element owned by exactly one program: no atomics, so the result is
the same bit for bit on every run.
- grad_hidden: grid (token blocks, vocabulary splits); each program adds into its own fp32
  partial [T, d] slice; the partials are summed in a fixed order. Splits are only used while
  the partials stay small (short sequences), since they cost splits x T x d x 4 bytes.
- grad_weight: persistent programs; each owns one vocabulary tile at a time, loops over all
  tokens accumulating into an fp32 scratch [BLOCK_V, d] of its own, then writes the tile in
  the weight's dtype. Beyond the gradient itself this needs programs x BLOCK_V x d x 4 bytes,
  not an fp32 copy of the [Vocab, d] gradient (2.4 GB for Gemma-2-2B). Not launched at all
  when the weight is frozen.

Those two fused passes are kept as BACKWARD = "fused". The default, "chunked", streams the
vocabulary in chunks sized from DZ_BUDGET_BYTES, each chunk in a fixed order:

    dZ_c = coef(H W_c^T)   one Triton kernel: the logits tile (tl.dot) and every elementwise
                           step (softcap, temperature, p from the saved statistics, the target's
                           one-hot, the entropy term, the per-token upstream gradients, ignored
                           tokens) in its epilogue; dZ_c in the weight's dtype (16-bit operands)
    dH32 += dZ_c W_c       cuBLAS (fp32 output and accumulation)
    dW[c] = dZ_c^T H       cuBLAS, written once per chunk; skipped for a frozen weight

Why (DESIGN §8.1, H200 at T = 8192, d = 2304, V = 256,000): the fused passes own an output
block and walk the other axis, so their [BLOCK, d] fp32 accumulators (1.2 MB at d = 2304)
cannot stay on chip and are re-read and re-written per tile, about 600 GB in all, and they
recompute the logits twice: 429 ms measured for the backward against 3 GEMMs' 43 ms. The
chunked design recomputes the logits once and leaves the two gradient products to cuBLAS's
tensor-core GEMMs, whose speed needs no tuning here; the only T x V-sized memory is one
chunk of dZ. Determinism: each dW slice is written once, dH accumulates over the chunks in
a fixed order, and cuBLAS is bitwise reproducible on one stream for a fixed toolkit and GPU.
Not yet timed on a GPU (no GPU was lent to the session that wrote it): `bench --op token_logp`
times both designs side by side, so the default can be checked against the fused passes.

With grad_filter = eps the forward also records each tile's row maxima of y, and the
chunked backward skips the dZ kernel and both GEMMs for every (FILTER_ROWS tokens, chunk)
block whose mass bound (`_filter_plan`) is below eps for all its tokens and which holds no
token's target; the decision reads forward outputs only, so it is deterministic. Not yet
timed on a GPU.

Targets are int64 with -1 for ignored tokens: they get logp = entropy = 0 and no gradient.
Offsets into the weight are int64 (Vocab x d passes 2^31 for large vocabularies).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _empty, _interpreting, _mma, _num_sms, _splits, chunk_width

# the backward's design (module docstring): "chunked" (default) or "fused"
BACKWARD = "chunked"
BACKWARDS = ("chunked", "fused")
# the chunked backward's dZ chunk [T, Vc] stays under this many bytes; Vc a multiple of
# CHUNK_MULTIPLE (tests lower both to cross chunk boundaries on small shapes). Beyond the two
# gradients the backward holds dZ, the fp32 grad hidden and a copy of H with ignored rows
# zeroed: at Gemma-2-2B, T = 8192, 64 + 72 + 36 MiB against 1,161 MiB of gradients (1.15x;
# the benchmark's check is 1.2x), and Vc = 4,096 keeps each GEMM large (0.15 TFLOP)
DZ_BUDGET_BYTES = 64 << 20
CHUNK_MULTIPLE = 256
# the filtered backward (grad_filter): tokens decided together, and what the last call did
FILTER_ROWS = 256
last_filter: dict = {}
# fp32 partial sums of grad_hidden over vocabulary splits stay under this many bytes
SPLIT_PARTIAL_BYTES = 64 << 20


@triton.jit
def _tanh(y):
    # sign(y) (1 - e) / (1 + e), e = exp(-2|y|): never overflows; runs in the interpreter too
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd, stride_wv,
                 stride_wd, inv_cap, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr):
    """y [BLOCK_T, BLOCK_V] fp32: tanh(x / softcap), or the raw logits x without a softcap;
    the sampled distribution's logits are z = z_scale y."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_mask = dd < D
        h = tl.load(H + rows.to(tl.int64)[:, None] * stride_ht + dd[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None] * stride_wv + dd[None, :] * stride_wd,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_F32)
    if SOFTCAP:
        return _tanh(acc * inv_cap)
    else:
        return acc


@triton.jit
def _grad_logits(y, cols, col_mask, tgt, m, log_l, mean_zm, g_lp, g_ent, z_scale, inv_temp,
                 SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr):
    """dL/dx [BLOCK_T, BLOCK_V] fp32 for upstream gradients g_lp (of logp) and g_ent (of the
    entropy), both already zero on ignored and out-of-range tokens."""
    zm = (y - m[:, None]) * z_scale  # z - z_max; exactly 0 at the max (module docstring)
    p = tl.exp(zm - log_l[:, None])
    coef = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
    if ENTROPY:
        coef -= p * (zm - mean_zm[:, None]) * g_ent[:, None]
    if SOFTCAP:
        coef = coef * ((1.0 - y * y) * inv_temp)
    else:
        coef = coef * inv_temp
    # ignored tokens (tgt < 0): exactly 0, even where their row is NaN (0 x NaN otherwise)
    return tl.where(col_mask[None, :] & (tgt >= 0)[:, None], coef, 0.0)


@triton.jit
def _load_token_grads(TGT, STATS, G_LP, G_ENT, T, rows, row_mask, ENTROPY: tl.constexpr):
    """Per token: target, row statistics (y_max, log L, E_p[z] - z_max; STATS is contiguous
    [3, T]) and the upstream gradients."""
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    m = tl.load(STATS + rows, mask=row_mask, other=0.0)
    log_l = tl.load(STATS + T + rows, mask=row_mask, other=0.0)
    g_lp = tl.where(tgt >= 0, tl.load(G_LP + rows, mask=row_mask, other=0.0), 0.0)
    if ENTROPY:
        mean_zm = tl.load(STATS + 2 * T + rows, mask=row_mask, other=0.0)
        g_ent = tl.where(tgt >= 0, tl.load(G_ENT + rows, mask=row_mask, other=0.0), 0.0)
    else:
        mean_zm = log_l
        g_ent = g_lp
    return tgt, m, log_l, mean_zm, g_lp, g_ent


@triton.jit
def _log1p(x):
    # Goldberg: log(u) x / (u - 1) cancels the rounding of u = 1 + x; tl.log is the precise log
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _token_logp_fwd_kernel(
    H, W, TGT, PART_M, PART_R, PART_EZR, PART_YT, TILE_MAX,
    T, V, D, tiles_per_split, n_tiles, inv_cap, z_scale,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, DOT_F32: tl.constexpr,
    RECORD_TILES: tl.constexpr,
):
    """Per split: y_max m, r = L - 1, sum exp(z - z_max) (z - z_max), target's y; with
    RECORD_TILES each tile's row maxima of y into TILE_MAX [T, n_tiles] (the filtered
    backward's bound)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    r = tl.full((BLOCK_T,), -1.0, tl.float32)  # L - 1 without the max's exact 1 (docstring)
    ezr = tl.zeros((BLOCK_T,), tl.float32)  # sum exp(z - z_max) (z - z_max), <= 0
    y_tgt = tl.zeros((BLOCK_T,), tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        y = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd,
                         stride_wv, stride_wd, inv_cap, BLOCK_T, BLOCK_V, BLOCK_D, SOFTCAP,
                         DOT_F32)
        y_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], y, 0.0), axis=1)
        # the first tile of a split always holds a column < V, so m is finite from then on
        tile_max = tl.max(tl.where(col_mask[None, :], y, float("-inf")), axis=1)
        if RECORD_TILES:
            tile = pid_s * tiles_per_split + it
            tl.store(TILE_MAX + rows.to(tl.int64) * n_tiles + tile, tile_max,
                     mask=row_mask & (tile < n_tiles))
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp((m - m_new) * z_scale)  # 0 on the first tile
        ym = y - m_new[:, None]
        zm = ym * z_scale
        at_max = col_mask[None, :] & (ym == 0.0)
        # the exact ones of the maxima are counted, not summed: e holds the other terms
        e = tl.where(col_mask[None, :] & (ym != 0.0), tl.exp(zm), 0.0)
        e_sum = tl.sum(e, axis=1)
        if ENTROPY:
            # re-anchor: sum e (z - z_old) = sum e (z - z_new) + L (z_new - z_old); the first
            # tile has L = 0 and m_old = -inf, hence the guard
            shift = tl.where(r > -1.0, (m - m_new) * z_scale, 0.0)
            # (columns past V: zm may be NaN there, 0 x inf of an infinite hidden entry)
            ezr = alpha * (ezr + (1.0 + r) * shift) + tl.sum(
                e * tl.where(col_mask[None, :], zm, 0.0), axis=1)
        n_max = tl.sum(at_max.to(tl.float32), axis=1)
        r = tl.where(tile_max >= m, alpha * (1.0 + r) + e_sum + (n_max - 1.0), r + e_sum)
        m = m_new
    out = pid_s * T + rows
    tl.store(PART_M + out, m, mask=row_mask)
    tl.store(PART_R + out, r, mask=row_mask)
    tl.store(PART_YT + out, y_tgt, mask=row_mask)
    if ENTROPY:
        tl.store(PART_EZR + out, ezr, mask=row_mask)


@triton.jit
def _token_logp_merge_kernel(PART_M, PART_R, PART_EZR, PART_YT, TGT, LOGP, ENT, STATS,
                             T, num_splits, z_scale, BLOCK: tl.constexpr,
                             ENTROPY: tl.constexpr):
    """Splits -> logp, entropy and STATS [3, T] = (y_max, log L, E_p[z] - z_max) at the
    common max."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(PART_M + s * T + rows, mask=mask, other=float("-inf")))
    m = tl.where(mask, m, 0.0)
    r = tl.zeros((BLOCK,), tl.float32)  # L - 1
    found = tl.zeros((BLOCK,), tl.int32)  # the split whose exact 1 stands for L's 1 was seen
    ezr = tl.zeros((BLOCK,), tl.float32)
    y_tgt = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, num_splits):
        m_s = tl.load(PART_M + s * T + rows, mask=mask, other=0.0)
        r_s = tl.load(PART_R + s * T + rows, mask=mask, other=0.0)
        shift = (m_s - m) * z_scale
        scale = tl.exp(shift)
        first_max = (m_s == m) & (found == 0)
        # an empty split (r_s = -1, m_s = -inf) adds nothing
        r += tl.where(first_max, r_s, scale * (1.0 + r_s))
        found = tl.where(first_max, 1, found)
        y_tgt += tl.load(PART_YT + s * T + rows, mask=mask, other=0.0)
        if ENTROPY:
            ezr_s = tl.load(PART_EZR + s * T + rows, mask=mask, other=0.0)
            ezr += tl.where(r_s > -1.0, scale * (ezr_s + (1.0 + r_s) * shift), 0.0)
    log_l = _log1p(r)
    valid = tl.load(TGT + rows, mask=mask, other=-1) >= 0
    tl.store(STATS + rows, m, mask=mask)
    tl.store(STATS + T + rows, log_l, mask=mask)
    tl.store(LOGP + rows, tl.where(valid, (y_tgt - m) * z_scale - log_l, 0.0), mask=mask)
    if ENTROPY:
        mean_zm = ezr / (1.0 + r)
        tl.store(STATS + 2 * T + rows, mean_zm, mask=mask)
        tl.store(ENT + rows, tl.where(valid, log_l - mean_zm, 0.0), mask=mask)
    else:
        tl.store(STATS + 2 * T + rows, tl.zeros((BLOCK,), tl.float32), mask=mask)


@triton.jit
def _token_logp_bwd_hidden_kernel(
    H, W, TGT, STATS, G_LP, G_ENT, PART_GH,
    T, V, D, tiles_per_split, inv_cap, z_scale, inv_temp,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, CAST_COEF: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """PART_GH[split, t] = sum over the split's vocabulary of dL/dx[t, v] w[v]  (fp32, zeroed)."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt, m, log_l, mean_zm, g_lp, g_ent = _load_token_grads(TGT, STATS, G_LP, G_ENT, T, rows,
                                                            row_mask, ENTROPY)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = PART_GH + (pid_s * T + rows.to(tl.int64))[:, None] * D
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        y = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd,
                         stride_wv, stride_wd, inv_cap, BLOCK_T, BLOCK_V, BLOCK_D, SOFTCAP,
                         DOT_F32)
        coef = _grad_logits(y, cols, col_mask, tgt, m, log_l, mean_zm, g_lp, g_ent, z_scale,
                            inv_temp, SOFTCAP, ENTROPY)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            w = tl.load(W + cols.to(tl.int64)[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            o_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(out_base + dd[None, :], mask=o_mask, other=0.0)
            if CAST_COEF:  # both operands 16-bit: keep the tensor-core dot
                acc = _mma(coef.to(w.dtype), w, acc, DOT_F32)
            else:
                acc = _mma(coef, w, acc, DOT_F32)
            tl.store(out_base + dd[None, :], acc, mask=o_mask)
        tl.debug_barrier()  # the next tile's loads see every thread's stores


@triton.jit
def _token_logp_bwd_weight_kernel(
    H, W, TGT, STATS, G_LP, G_ENT, GW, SCRATCH,
    T, V, D, n_tiles, inv_cap, z_scale, inv_temp,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, CAST_COEF: tl.constexpr,
    USE_SCRATCH: tl.constexpr, DOT_F32: tl.constexpr,
):
    """GW[v] = sum over all tokens of dL/dx[t, v] h[t]; GW is contiguous [V, d]. Without
    USE_SCRATCH, GW is fp32 and accumulates in place."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        cols = tile * BLOCK_V + offs_v
        col_mask = cols < V
        out_base = GW + cols.to(tl.int64)[:, None] * D
        if USE_SCRATCH:
            acc_base = SCRATCH + (pid * BLOCK_V + offs_v).to(tl.int64)[:, None] * D
        else:
            acc_base = out_base
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            tl.store(acc_base + dd[None, :], tl.zeros((BLOCK_V, BLOCK_D), tl.float32),
                     mask=col_mask[:, None] & (dd < D)[None, :])
        tl.debug_barrier()
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_mask = rows < T
            tgt, m, log_l, mean_zm, g_lp, g_ent = _load_token_grads(TGT, STATS, G_LP, G_ENT, T,
                                                                    rows, row_mask, ENTROPY)
            y = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd,
                             stride_wv, stride_wd, inv_cap, BLOCK_T, BLOCK_V, BLOCK_D, SOFTCAP,
                             DOT_F32)
            coef = tl.trans(_grad_logits(y, cols, col_mask, tgt, m, log_l, mean_zm, g_lp, g_ent,
                                         z_scale, inv_temp, SOFTCAP, ENTROPY))  # [BLOCK_V, BLOCK_T]
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < D
                # ignored tokens' rows are not read: a NaN there must not reach GW (0 x NaN)
                h = tl.load(H + rows.to(tl.int64)[:, None] * stride_ht + dd[None, :] * stride_hd,
                            mask=(row_mask & (tgt >= 0))[:, None] & d_mask[None, :], other=0.0)
                a_mask = col_mask[:, None] & d_mask[None, :]
                acc = tl.load(acc_base + dd[None, :], mask=a_mask, other=0.0)
                if CAST_COEF:
                    acc = _mma(coef.to(h.dtype), h, acc, DOT_F32)
                else:
                    acc = _mma(coef, h, acc, DOT_F32)
                tl.store(acc_base + dd[None, :], acc, mask=a_mask)
            tl.debug_barrier()
        if USE_SCRATCH:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                a_mask = col_mask[:, None] & (dd < D)[None, :]
                acc = tl.load(acc_base + dd[None, :], mask=a_mask, other=0.0)
                tl.store(out_base + dd[None, :], acc.to(GW.dtype.element_ty), mask=a_mask)
            tl.debug_barrier()  # the scratch is zeroed again for the next tile


@triton.jit
def _token_logp_dz_kernel(
    H, W, TGT, STATS, G_LP, G_ENT, DZ,
    T, V, D, v_begin, v_end, row_begin, row_end, inv_cap, z_scale, inv_temp,
    stride_ht, stride_hd, stride_wv, stride_wd, stride_zt,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, DOT_F32: tl.constexpr,
):
    """DZ[t, v - v_begin] = dL/dx[t, v] for the vocabulary chunk [v_begin, v_end) and the
    tokens [row_begin, row_end), in DZ's dtype; ignored tokens' rows are exactly 0."""
    rows = row_begin + tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = v_begin + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < row_end
    col_mask = cols < v_end
    tgt, m, log_l, mean_zm, g_lp, g_ent = _load_token_grads(TGT, STATS, G_LP, G_ENT, T, rows,
                                                            row_mask, ENTROPY)
    y = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd, stride_wv,
                     stride_wd, inv_cap, BLOCK_T, BLOCK_V, BLOCK_D, SOFTCAP, DOT_F32)
    coef = _grad_logits(y, cols, col_mask, tgt, m, log_l, mean_zm, g_lp, g_ent, z_scale,
                        inv_temp, SOFTCAP, ENTROPY)
    out = DZ + rows.to(tl.int64)[:, None] * stride_zt + (cols - v_begin)[None, :]
    tl.store(out, coef.to(DZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- launchers


def _dot_modes(hidden, weight) -> tuple[bool, bool]:
    """(DOT_F32, CAST_COEF). Same 16-bit dtype on both sides: tensor-core dots, the gradient
    coefficients rounded to that dtype as plain PyTorch rounds its logits' gradient. Any fp32
    side (or a fp16/bf16 mix): exact fp32 dots. The interpreter always multiplies in fp32
    (DESIGN §3) but rounds the coefficients as the GPU would."""
    same16 = hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16)
    return (not same16) or _interpreting(), same16


def _blocks(n_tokens: int, d: int, dot_f32: bool):
    """(BLOCK_T, BLOCK_V, BLOCK_D, launch options). GPU values follow the catalog kernels'
    H100 measurements (kernels/catalog.py), not yet tuned for this op on a GPU."""
    if _interpreting():
        return 16, 32, min(64, max(16, triton.next_power_of_2(d))), {}
    if dot_f32:  # fp32 tiles: twice the bytes per element
        block_t, block_v, block_d, launch = 64, 64, 32, dict(num_warps=4, num_stages=3)
    elif n_tokens <= 64:
        block_t, block_v, block_d, launch = max(16, triton.next_power_of_2(n_tokens)), 64, 128, \
            dict(num_warps=4, num_stages=4)
    else:
        block_t, block_v, block_d, launch = 128, 128, 64, dict(num_warps=8, num_stages=3)
    return block_t, block_v, min(block_d, max(16, triton.next_power_of_2(d))), launch


def _config(n_tokens, d, dot_f32, config):
    block_t, block_v, block_d, launch = _blocks(n_tokens, d, dot_f32)
    config = dict(config or {})  # overrides, for tests and tuning scripts
    block_t, block_v = config.pop("block_t", block_t), config.pop("block_v", block_v)
    block_d = config.pop("block_d", block_d)
    programs = config.pop("programs", None)
    launch.update(config)
    return block_t, block_v, block_d, programs, launch


def _check_operands(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must "
                         "be [T, d] and [Vocab, d]")
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError("targets must be int64 [T], with -1 for ignored tokens")


def _scales(softcap, temperature):
    """(inv_cap, z_scale, inv_temp) as the kernels take them."""
    if softcap is None:
        return 1.0, 1.0 / temperature, 1.0 / temperature
    return 1.0 / softcap, softcap / temperature, 1.0 / temperature


def tile_columns(hidden, weight, config: dict | None = None) -> int:
    """Vocabulary columns of the forward's tiles (the unit of its recorded tile maxima)."""
    dot_f32, _ = _dot_modes(hidden, weight)
    return _config(hidden.shape[0], hidden.shape[1], dot_f32, config)[1]


def token_logp_forward(hidden, weight, targets, softcap, temperature: float,
                       want_entropy: bool, config: dict | None = None,
                       tile_max: torch.Tensor | None = None):
    """(logp [T], entropy [T] or None, row statistics [3, T] = (y_max, log L, E_p[z] - z_max;
    the last zero without the entropy)), all fp32: what the backward takes. `tile_max`: an
    fp32 [T, ceil(V / tile_columns)] buffer that receives every tile's row maxima of y (for
    the filtered backward)."""
    _check_operands(hidden, weight, targets)
    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    dot_f32, _ = _dot_modes(hidden, weight)
    block_t, block_v, block_d, _, launch = _config(n_tokens, d, dot_f32, config)
    n_blocks = triton.cdiv(n_tokens, block_t)
    n_tiles = triton.cdiv(vocab, block_v)
    splits, tiles_per_split = _splits(n_blocks, n_tiles, hidden.device)
    dev = hidden.device
    if tile_max is not None and (tile_max.shape != (n_tokens, n_tiles) or not
                                 tile_max.is_contiguous() or tile_max.dtype != torch.float32):
        raise ValueError(f"tile_max must be contiguous fp32 [{n_tokens}, {n_tiles}]")
    part = [_empty((splits, n_tokens), torch.float32, dev) for _ in range(4)]
    inv_cap, z_scale, _ = _scales(softcap, temperature)
    _token_logp_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, *part, part[0] if tile_max is None else tile_max, n_tokens,
        vocab, d, tiles_per_split, n_tiles, inv_cap, z_scale, hidden.stride(0),
        hidden.stride(1), weight.stride(0), weight.stride(1), BLOCK_T=block_t,
        BLOCK_V=block_v, BLOCK_D=block_d, SOFTCAP=softcap is not None, ENTROPY=want_entropy,
        DOT_F32=dot_f32, RECORD_TILES=tile_max is not None, **launch)
    logp = _empty((n_tokens,), torch.float32, dev)
    stats = _empty((3, n_tokens), torch.float32, dev)
    entropy = _empty((n_tokens,), torch.float32, dev) if want_entropy else None
    merge_block = 128
    _token_logp_merge_kernel[(triton.cdiv(n_tokens, merge_block),)](
        *part, targets, logp, entropy if want_entropy else logp, stats, n_tokens, splits,
        z_scale, BLOCK=merge_block, ENTROPY=want_entropy)
    return logp, entropy, stats


def token_logp_backward(hidden, weight, targets, stats, grad_logp, grad_entropy,
                        softcap, temperature: float, need_hidden: bool, need_weight: bool,
                        config: dict | None = None, design: str | None = None,
                        grad_filter: float | None = None, tile_max: torch.Tensor | None = None):
    """(grad_hidden in hidden's dtype or None, grad_weight in weight's dtype or None) of
    sum_t grad_logp[t] logp[t] + grad_entropy[t] entropy[t]; `grad_entropy` may be None.
    `stats` is the forward's [3, T] fp32 (with E_p[z] - z_max when there is an entropy
    gradient); upstream gradients are fp32 [T]. `design`: "chunked" or "fused" (module
    docstring), else BACKWARD. `grad_filter`: skip the work of (FILTER_ROWS tokens, vocabulary
    chunk) blocks whose softmax mass is below it for every token (bounded from the forward's
    `tile_max`; `_filter_plan`), chunked design only."""
    _check_operands(hidden, weight, targets)
    n_tokens = hidden.shape[0]
    if stats.shape != (3, n_tokens) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"stats must be the forward's contiguous fp32 [3, {n_tokens}], got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    design = BACKWARD if design is None else design
    if design not in BACKWARDS:
        raise ValueError(f"design={design!r}; choose one of {BACKWARDS}")
    if grad_filter is not None:
        if design != "chunked" or tile_max is None:
            raise ValueError("grad_filter needs the chunked backward and the forward's tile_max")
        return _chunked_backward(hidden, weight, targets, stats, grad_logp, grad_entropy,
                                 softcap, temperature, need_hidden, need_weight, config,
                                 (grad_filter, tile_max))
    run = _chunked_backward if design == "chunked" else _fused_backward
    return run(hidden, weight, targets, stats, grad_logp, grad_entropy, softcap, temperature,
               need_hidden, need_weight, config)


def _filter_plan(tile_max, stats, targets, z_scale, vocab, cols, block_v, eps):
    """Per vocabulary chunk, the token ranges whose gradient work is done: those FILTER_ROWS
    blocks where some valid token's softmax mass in the chunk may reach `eps` or whose target
    lies in it. The mass bound is rigorous: every p[t, v] = exp((y - y_max) z_scale - log L)
    of the chunk is at most the one of the chunk's largest y (from the forward's tile maxima),
    so the chunk's mass is at most its width times that. NaN anywhere keeps the block."""
    n_tokens, n_tiles = tile_max.shape
    per_chunk = cols // block_v
    n_chunks = -(-vocab // cols)
    pad = n_chunks * per_chunk - n_tiles
    chunk_max = torch.nn.functional.pad(tile_max, (0, pad), value=float("-inf")).view(
        n_tokens, n_chunks, per_chunk).amax(2)  # [T, chunks]
    widths = torch.clamp(vocab - torch.arange(n_chunks, device=tile_max.device) * cols,
                         max=cols).float()
    log_mass = ((chunk_max - stats[0][:, None]) * z_scale - stats[1][:, None]
                + widths.log()[None, :])
    keep = ~(log_mass < math.log(eps))  # NaN: kept
    valid = targets >= 0
    rows = valid.nonzero().flatten()
    keep[rows, targets[rows] // cols] = True  # the target's own chunk (its one-hot term)
    keep &= valid[:, None]
    n_blocks = -(-n_tokens // FILTER_ROWS)
    keep = torch.nn.functional.pad(keep, (0, 0, 0, n_blocks * FILTER_ROWS - n_tokens))
    blocks = keep.view(n_blocks, FILTER_ROWS, n_chunks).any(1).cpu()  # one sync per call
    plan = []
    for c in range(n_chunks):
        ranges, start = [], None
        for b in range(n_blocks + 1):
            on = b < n_blocks and bool(blocks[b, c])
            if on and start is None:
                start = b
            elif not on and start is not None:
                ranges.append((start * FILTER_ROWS, min(b * FILTER_ROWS, n_tokens)))
                start = None
        plan.append(ranges)
    return plan, int(blocks.sum()), n_blocks * n_chunks


def chunk_columns(n_tokens: int, vocab: int, itemsize: int) -> int:
    """Vocabulary columns of one dZ chunk [T, Vc]: a multiple of CHUNK_MULTIPLE under
    DZ_BUDGET_BYTES (at least one multiple), never more than the vocabulary."""
    return chunk_width(n_tokens, vocab, itemsize, DZ_BUDGET_BYTES, CHUNK_MULTIPLE)


def _chunked_backward(hidden, weight, targets, stats, grad_logp, grad_entropy, softcap,
                      temperature, need_hidden, need_weight, config, filtered=None):
    """The vocabulary-chunked design (module docstring): dZ per chunk by
    `_token_logp_dz_kernel`, the two gradient products by `r2ec_fast.ops._gemm`; `filtered`
    = (eps, tile_max): only the token ranges of `_filter_plan` per chunk."""
    from r2ec_fast.ops._gemm import addmm_f32_, mm_into

    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    dot_f32, cast_coef = _dot_modes(hidden, weight)
    block_t, block_v, block_d, _, launch = _config(n_tokens, d, dot_f32, config)
    entropy = grad_entropy is not None
    dz_dtype = weight.dtype if cast_coef else torch.float32
    cols = chunk_columns(n_tokens, vocab, torch.empty((), dtype=dz_dtype).element_size())
    inv_cap, z_scale, inv_temp = _scales(softcap, temperature)
    plan = None
    if filtered is not None:  # chunks of whole forward tiles, whose maxima bound them
        cols = min(max(block_v, cols // block_v * block_v), triton.cdiv(vocab, block_v) * block_v)
        plan, kept, blocks = _filter_plan(filtered[1], stats, targets, z_scale, vocab, cols,
                                          block_v, filtered[0])
        last_filter.clear()
        last_filter.update(blocks=blocks, kept=kept, eps=filtered[0])
    dz = _empty((n_tokens, cols), dz_dtype, dev)
    grad_hidden = torch.zeros((n_tokens, d), dtype=torch.float32, device=dev) \
        if need_hidden else None
    grad_weight = _empty((vocab, d), weight.dtype, dev) if need_weight else None
    # ignored tokens' rows of H are not read into dW: a NaN there (padding) is 0 x NaN
    h_valid = torch.where((targets >= 0)[:, None], hidden, 0) if need_weight else None
    for index, v0 in enumerate(range(0, vocab, cols)):
        v1 = min(v0 + cols, vocab)
        chunk, w_chunk = dz[:, :v1 - v0], weight[v0:v1]
        ranges = [(0, n_tokens)] if plan is None else plan[index]
        for r0, r1 in ranges:
            _token_logp_dz_kernel[(triton.cdiv(r1 - r0, block_t),
                                   triton.cdiv(v1 - v0, block_v))](
                hidden, weight, targets, stats, grad_logp,
                grad_logp if grad_entropy is None else grad_entropy, chunk, n_tokens, vocab,
                d, v0, v1, r0, r1, inv_cap, z_scale, inv_temp, hidden.stride(0),
                hidden.stride(1), weight.stride(0), weight.stride(1), chunk.stride(0),
                BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d, SOFTCAP=softcap is not None,
                ENTROPY=entropy, DOT_F32=dot_f32, **launch)
            if need_hidden:
                addmm_f32_(grad_hidden[r0:r1], chunk[r0:r1], w_chunk)
        if not need_weight:
            continue
        if ranges == [(0, n_tokens)]:
            mm_into(grad_weight[v0:v1], chunk.T, h_valid)
        else:  # the skipped blocks add nothing; the kept ones are summed in a fixed order
            acc = torch.zeros((v1 - v0, d), dtype=torch.float32, device=dev)
            for r0, r1 in ranges:
                addmm_f32_(acc, chunk[r0:r1].T, h_valid[r0:r1])
            grad_weight[v0:v1].copy_(acc)
    return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight


def _fused_backward(hidden, weight, targets, stats, grad_logp, grad_entropy, softcap,
                    temperature, need_hidden, need_weight, config):
    """The two fused passes (module docstring)."""
    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    dot_f32, cast_coef = _dot_modes(hidden, weight)
    block_t, block_v, block_d, programs, launch = _config(n_tokens, d, dot_f32, config)
    entropy = grad_entropy is not None
    dev = hidden.device
    inv_cap, z_scale, inv_temp = _scales(softcap, temperature)
    common = (n_tokens, vocab, d)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    flags = dict(BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
                 SOFTCAP=softcap is not None, ENTROPY=entropy, CAST_COEF=cast_coef)
    token_args = (targets, stats, grad_logp, grad_entropy if entropy else grad_logp)
    n_tiles = triton.cdiv(vocab, block_v)
    grad_hidden = grad_weight = None
    if need_hidden:
        n_blocks = triton.cdiv(n_tokens, block_t)
        splits, tiles_per_split = _splits(n_blocks, n_tiles, dev)
        max_splits = max(1, SPLIT_PARTIAL_BYTES // max(1, n_tokens * d * 4))
        if splits > max_splits:
            splits = max_splits
            tiles_per_split = triton.cdiv(n_tiles, splits)
            splits = triton.cdiv(n_tiles, tiles_per_split)
        part = torch.zeros((splits, n_tokens, d), dtype=torch.float32, device=dev)
        _token_logp_bwd_hidden_kernel[(n_blocks, splits)](
            hidden, weight, *token_args, part, *common, tiles_per_split, inv_cap, z_scale,
            inv_temp, *strides, DOT_F32=dot_f32, **flags, **launch)
        grad_hidden = (part[0] if splits == 1 else part.sum(0)).to(hidden.dtype)
        del part  # freed before the weight pass allocates its scratch
    if need_weight:
        # one program per SM: the scratch is programs x BLOCK_V x d x 4 bytes (156 MB at
        # d = 2304 on an H100), against 1.2 GB for Gemma-2-2B's bf16 weight gradient
        programs = min(n_tiles, programs or _num_sms(dev))
        use_scratch = weight.dtype != torch.float32
        grad_weight = _empty((vocab, d), weight.dtype, dev)
        scratch = (torch.empty((programs * block_v, d), dtype=torch.float32, device=dev)
                   if use_scratch else grad_weight)
        _token_logp_bwd_weight_kernel[(programs,)](
            hidden, weight, *token_args, grad_weight, scratch, *common, n_tiles, inv_cap,
            z_scale, inv_temp, *strides, USE_SCRATCH=use_scratch, DOT_F32=dot_f32, **flags,
            **launch)
    return grad_hidden, grad_weight
