"""Triton kernels for full-catalog scoring (DESIGN §4.1-4.2) and their launchers.

Scores are s[n, v] = (u[n] . x[v]) * item_scale[v] * scale, where item_scale is 1/||x[v]|| when
NORMALIZE (cosine on raw rows, computed inside the tile from the same loads) and 1 otherwise;
`scale` is 1/temperature. User rows arrive already normalised by the op layer.

Forward, flash-decoding style: the grid is (row blocks, catalog splits); each program streams
its split in BLOCK_V tiles and writes partial (max, sum-exp, count-above[, top-k keys]); a second
small kernel merges the partials. Backward streams the catalog again with the saved lse; every
output element is owned by exactly one program (no atomics), so results are deterministic.

The backward's default design (BACKWARD = "chunked", DESIGN §8.1) streams the catalog in
chunks of at most DS_BUDGET_BYTES of dS: per chunk one Triton kernel writes
dS = g (1[v = target] - p) item_scale in the table's dtype, then cuBLAS adds dS X_c into an
fp32 user gradient and writes scale dS^T U into the chunk's rows of the item gradient. The
former per-output-tile passes ("fused") re-read and re-wrote their fp32 partial sums per
tile (a 618 MB partial buffer and ~74 GB of traffic at N = 512, |V| = 1e6, d = 2304; 0.71x
plain PyTorch on an H100) and are kept for comparison. Not yet timed on a GPU.

Offsets into the table are int64: |V| * d passes 2^31 at |V| = 1e6, d = 2304 (an int32
product wrapped and faulted there).

Top-k keys pack (score, id) into one int64 whose integer order is the ranking order of §4.1
(higher score first, then smaller id): the float's bits mapped to an order-preserving int32 in
the high word, 0xFFFFFFFF - id in the low word.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _empty, _interpreting, _mma, _splits, chunk_width

# the backward's design (module docstring): "chunked" (default) or "fused"
BACKWARD = "chunked"
BACKWARDS = ("chunked", "fused")
# the chunked backward's dS chunk [N, Vc] stays under this many bytes, Vc a multiple of
# CHUNK_MULTIPLE (N = 512, bf16: 65,536 items per chunk)
DS_BUDGET_BYTES = 64 << 20
CHUNK_MULTIPLE = 256
# key of a score of -inf with id 0xFFFFFFFF: below every real (score, id) key
EMPTY_KEY = ((0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)) << 32


@triton.jit
def _tile_scores(U, U_LO, X, rows, cols, row_mask, col_mask, D, stride_un, stride_ud,
                 stride_xv, stride_xd, scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr, SPLIT_U: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 scores and the [BLOCK_V] per-item factor applied to them.

    SPLIT_U: fp32 user rows against a 16-bit table arrive as hi + lo 16-bit parts (U, U_LO);
    two dots keep ~16 mantissa bits of the user side instead of 8 at twice the tensor-core
    work, which is free while the pass is bound by reading the table."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    sumsq = tl.zeros((BLOCK_V,), tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_mask = dd < D
        u = tl.load(U + rows[:, None] * stride_un + dd[None, :] * stride_ud,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        x = tl.load(X + cols.to(tl.int64)[:, None] * stride_xv + dd[None, :] * stride_xd,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if NORMALIZE:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
        acc = _mma(u, tl.trans(x), acc, DOT_F32)
        if SPLIT_U:
            u_lo = tl.load(U_LO + rows[:, None] * stride_un + dd[None, :] * stride_ud,
                           mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            acc = _mma(u_lo, tl.trans(x), acc, DOT_F32)
    if NORMALIZE:
        item_scale = scale / tl.maximum(tl.sqrt(sumsq), 1e-12)  # F.normalize's eps
    else:
        item_scale = tl.zeros((BLOCK_V,), tl.float32) + scale
    return acc * item_scale[None, :], item_scale


@triton.jit
def _load_exclusions(EXCL, rows, row_mask, L, stride_en, stride_el, HAS_EXCL: tl.constexpr,
                     EXCL_PAD: tl.constexpr):
    """[BLOCK_N, EXCL_PAD] excluded ids held in registers for the per-tile skip test."""
    if HAS_EXCL and EXCL_PAD > 0:
        j = tl.arange(0, EXCL_PAD)
        return tl.load(EXCL + rows[:, None] * stride_en + j[None, :] * stride_el,
                       mask=row_mask[:, None] & (j[None, :] < L), other=-1)
    else:
        return tl.full((1, 1), -1, tl.int64)


@triton.jit
def _valid_mask(EXCL, ex_block, rows, cols, v0, row_mask, col_mask, L, stride_en, stride_el,
                BLOCK_V: tl.constexpr, HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr):
    valid = row_mask[:, None] & col_mask[None, :]
    if HAS_EXCL:
        # Most tiles hold none of the block's excluded ids (20 per row against 1e6 items): test
        # that on the ids in registers and skip the masking. Masking every tile cost 2.9 ms
        # against 1.7 ms without exclusion at N = 64, d = 2304, |V| = 1e6 on an H100.
        if EXCL_PAD > 0:
            inside = (ex_block >= v0) & (ex_block < v0 + BLOCK_V)
            hit = tl.sum(inside.to(tl.int32)) > 0
        else:
            hit = True
        if hit:  # L compares per tile instead of an N x |V| mask; -1 pads never match
            for j in range(0, L):
                ex = tl.load(EXCL + rows * stride_en + j * stride_el, mask=row_mask, other=-1)
                valid = valid & (cols[None, :] != ex[:, None])
    return valid


@triton.jit
def _score_keys(s, cols, valid):
    s = tl.where(valid, s, float("-inf")) + 0.0  # -0.0 -> +0.0 so equal scores tie on id
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))[None, :]


@triton.jit
def _catalog_fwd_kernel(
    U, U_LO, X, TGT, TSCORE, EXCL, PART_M, PART_L, PART_CNT, PART_KEYS,
    N, V, D, L, tiles_per_split, scale, empty_key,
    stride_un, stride_ud, stride_xv, stride_xd, stride_en, stride_el,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr,
    TOPK: tl.constexpr, SPLIT_U: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    t = tl.load(TSCORE + rows, mask=row_mask, other=0.0)
    # a dropped target (t = -inf) ranks below every valid item: its tie term must never fire
    t_tie = tl.where(t == float("-inf"), float("nan"), t)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    count = tl.zeros((BLOCK_N,), tl.int32)
    if TOPK > 0:
        best = tl.full((BLOCK_N, TOPK), empty_key, tl.int64)
    ex_block = _load_exclusions(EXCL, rows, row_mask, L, stride_en, stride_el, HAS_EXCL,
                                EXCL_PAD)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        v0 = v_begin + it * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s, _ = _tile_scores(U, U_LO, X, rows, cols, row_mask, col_mask, D, stride_un,
                            stride_ud, stride_xv, stride_xd, scale, BLOCK_N, BLOCK_V, BLOCK_D,
                            NORMALIZE, SPLIT_U, DOT_F32)
        valid = _valid_mask(EXCL, ex_block, rows, cols, v0, row_mask, col_mask, L, stride_en,
                            stride_el, BLOCK_V, HAS_EXCL, EXCL_PAD)
        s_valid = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s_valid, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s_valid - m_safe[:, None]), axis=1)
        m = m_new
        above = (s > t[:, None]) | ((s == t_tie[:, None]) & (cols[None, :] < tgt[:, None]))
        above = above & valid & (cols[None, :] != tgt[:, None])
        count += tl.sum(above.to(tl.int32), axis=1)
        if TOPK > 0:
            # BLOCK_V == TOPK here: merge two sorted-able halves, keep the upper half
            keys = _score_keys(s, cols, valid)
            both = tl.reshape(tl.join(best, keys), (BLOCK_N, 2 * TOPK))
            both = tl.sort(both, dim=1, descending=True)
            both = tl.permute(tl.reshape(both, (BLOCK_N, 2, TOPK)), (0, 2, 1))
            best, _ = tl.split(both)
    out = pid_s * N + rows
    tl.store(PART_M + out, m, mask=row_mask)
    tl.store(PART_L + out, l, mask=row_mask)
    tl.store(PART_CNT + out, count, mask=row_mask)
    if TOPK > 0:
        k_offs = tl.arange(0, TOPK)
        tl.store(PART_KEYS + (rows[:, None] * num_splits + pid_s) * TOPK + k_offs[None, :], best,
                 mask=row_mask[:, None])


@triton.jit
def _catalog_merge_kernel(PART_M, PART_L, PART_CNT, LSE, COUNT, N, num_splits,
                          BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(PART_M + s * N + rows, mask=mask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int64)
    for s in range(0, num_splits):
        pm = tl.load(PART_M + s * N + rows, mask=mask, other=float("-inf"))
        l += tl.load(PART_L + s * N + rows, mask=mask, other=0.0) * tl.exp(pm - m_safe)
        count += tl.load(PART_CNT + s * N + rows, mask=mask, other=0).to(tl.int64)
    tl.store(LSE + rows, m_safe + tl.log(l), mask=mask)
    tl.store(COUNT + rows, count, mask=mask)


@triton.jit
def _load_row_terms(TGT, LSE, G, EXCL, rows, row_mask, L, stride_en, stride_el,
                    HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr):
    """Per row of a block: target, saved lse, upstream gradient and the excluded ids held in
    registers (see _load_exclusions)."""
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    ex_block = _load_exclusions(EXCL, rows, row_mask, L, stride_en, stride_el, HAS_EXCL,
                                EXCL_PAD)
    return tgt, lse, g, ex_block


@triton.jit
def _catalog_bwd_user_kernel(
    U, U_LO, X, TGT, LSE, G, EXCL, PART_GU,
    N, V, D, L, tiles_per_split, scale,
    stride_un, stride_ud, stride_xv, stride_xd, stride_en, stride_el,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr,
    SPLIT_U: tl.constexpr, DOT_F32: tl.constexpr,
):
    """PART_GU[split, n] = sum over the split of g[n] * (1[v = tgt] - p[n, v]) * x_hat[v]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt, lse, g, ex_block = _load_row_terms(TGT, LSE, G, EXCL, rows, row_mask, L, stride_en,
                                            stride_el, HAS_EXCL, EXCL_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = PART_GU + (pid_s * N + rows[:, None]) * D
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        v0 = v_begin + it * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        s, item_scale = _tile_scores(U, U_LO, X, rows, cols, row_mask, col_mask, D,
                                     stride_un, stride_ud, stride_xv, stride_xd, scale, BLOCK_N,
                                     BLOCK_V, BLOCK_D, NORMALIZE, SPLIT_U, DOT_F32)
        valid = _valid_mask(EXCL, ex_block, rows, cols, v0, row_mask, col_mask, L, stride_en,
                            stride_el, BLOCK_V, HAS_EXCL, EXCL_PAD)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        coef = (cols[None, :] == tgt[:, None]).to(tl.float32) - p
        coef = coef * g[:, None] * item_scale[None, :]
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            x = tl.load(X + cols.to(tl.int64)[:, None] * stride_xv + dd[None, :] * stride_xd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            o_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(out_base + dd[None, :], mask=o_mask, other=0.0)
            acc = _mma(coef.to(x.dtype), x, acc, DOT_F32)
            tl.store(out_base + dd[None, :], acc, mask=o_mask)


@triton.jit
def _catalog_bwd_items_kernel(
    U, U_LO, X, TGT, LSE, G, EXCL, GX,
    N, V, D, L, scale,
    stride_un, stride_ud, stride_xv, stride_xd, stride_en, stride_el,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr, SPLIT_U: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """GX[v] = sum over all rows n of g[n] * (1[v = tgt[n]] - p[n, v]) * scale * u[n]."""
    v0 = tl.program_id(0) * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    offs_d = tl.arange(0, BLOCK_D)
    out_base = GX + cols.to(tl.int64)[:, None] * D
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tgt, lse, g, ex_block = _load_row_terms(TGT, LSE, G, EXCL, rows, row_mask, L, stride_en,
                                                stride_el, HAS_EXCL, EXCL_PAD)
        s, _ = _tile_scores(U, U_LO, X, rows, cols, row_mask, col_mask, D, stride_un,
                            stride_ud, stride_xv, stride_xd, scale, BLOCK_N, BLOCK_V, BLOCK_D,
                            False, SPLIT_U, DOT_F32)
        valid = _valid_mask(EXCL, ex_block, rows, cols, v0, row_mask, col_mask, L, stride_en,
                            stride_el, BLOCK_V, HAS_EXCL, EXCL_PAD)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        coef = ((cols[None, :] == tgt[:, None]).to(tl.float32) - p) * (g * scale)[:, None]
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            u = tl.load(U + rows[:, None] * stride_un + dd[None, :] * stride_ud,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            o_mask = col_mask[:, None] & d_mask[None, :]
            acc = tl.load(out_base + dd[None, :], mask=o_mask, other=0.0)
            acc = _mma(tl.trans(coef.to(u.dtype)), u, acc, DOT_F32)
            if SPLIT_U:
                u_lo = tl.load(U_LO + rows[:, None] * stride_un + dd[None, :] * stride_ud,
                               mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                acc = _mma(tl.trans(coef.to(u_lo.dtype)), u_lo, acc, DOT_F32)
            tl.store(out_base + dd[None, :], acc, mask=o_mask)


@triton.jit
def _catalog_ds_kernel(
    U, U_LO, X, TGT, LSE, G, EXCL, DS,
    N, V, D, L, v_begin, v_end, scale,
    stride_un, stride_ud, stride_xv, stride_xd, stride_en, stride_el, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_EXCL: tl.constexpr, EXCL_PAD: tl.constexpr,
    SPLIT_U: tl.constexpr, DOT_F32: tl.constexpr,
):
    """DS[n, v - v_begin] = g[n] (1[v = tgt[n]] - p[n, v]) item_scale[v] for the catalog chunk
    [v_begin, v_end), in DS's dtype: the gradient of the user rows is DS X_c."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    v0 = v_begin + tl.program_id(1) * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < v_end
    tgt, lse, g, ex_block = _load_row_terms(TGT, LSE, G, EXCL, rows, row_mask, L, stride_en,
                                            stride_el, HAS_EXCL, EXCL_PAD)
    s, item_scale = _tile_scores(U, U_LO, X, rows, cols, row_mask, col_mask, D, stride_un,
                                 stride_ud, stride_xv, stride_xd, scale, BLOCK_N, BLOCK_V,
                                 BLOCK_D, NORMALIZE, SPLIT_U, DOT_F32)
    valid = _valid_mask(EXCL, ex_block, rows, cols, v0, row_mask, col_mask, L, stride_en,
                        stride_el, BLOCK_V, HAS_EXCL, EXCL_PAD)
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    coef = ((cols[None, :] == tgt[:, None]).to(tl.float32) - p) * g[:, None] * item_scale[None, :]
    out = DS + rows.to(tl.int64)[:, None] * stride_sn + (cols - v_begin)[None, :]
    tl.store(out, coef.to(DS.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------- launchers


def _split_user(user, items):
    """(hi, lo, split): user rows in the table's dtype, plus the rounding residue when the user
    side is fp32 against a 16-bit table (see _tile_scores)."""
    if user.dtype == items.dtype:
        return user, user, False
    if user.dtype != torch.float32 or items.dtype == torch.float32:
        raise ValueError(f"user dtype {user.dtype} must be the table's ({items.dtype}) or fp32")
    hi = user.to(items.dtype)
    return hi, (user - hi.float()).to(items.dtype), True


def _excl_pad(excl: torch.Tensor) -> int:
    """Width of the in-register exclusion block; 0 (mask every tile) past 64 ids per row."""
    pad = triton.next_power_of_2(max(1, excl.shape[1]))
    return pad if pad <= 64 else 0


def _check_operands(user, items, target, exclude):
    if user.dim() != 2 or items.dim() != 2 or user.shape[1] != items.shape[1]:
        raise ValueError(f"user {tuple(user.shape)} and items {tuple(items.shape)} must be [N, d] and [V, d]")
    if target.shape != (user.shape[0],) or target.dtype != torch.int64:
        raise ValueError("target must be int64 [N]")
    if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != user.shape[0]
                                or exclude.dtype != torch.int64):
        raise ValueError("exclude must be int64 [N, L]")


def _blocks(n_rows: int, d: int, dtype: torch.dtype, topk_pad: int):
    """(BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, launch options) for a pass over the catalog.

    Measured on an H100 at d = 2304, |V| = 1e6, bf16, 20 excluded ids per row
    (scripts/tune_catalog_gpu.py; benchmarks/results/catalog-kernel-tuning-h100-*.md): N = 64
    ran fastest with 64 x 64 tiles, BLOCK_D 128 and 4 stages (1.84 ms; 128-wide item tiles
    2.0 ms, 32-row tiles 5.1 ms); N = 512 with 128 x 128 tiles, BLOCK_D 64 and 4 warps
    (5.2 ms without exclusion; the same tiles with 8 warps spilled: 33 ms with exclusion)."""
    dot_f32 = dtype == torch.float32 or _interpreting()
    if _interpreting():
        return 16, (topk_pad or 32), min(64, max(16, triton.next_power_of_2(d))), dot_f32, {}
    if n_rows <= 64:
        block_n, block_v, block_d, launch = max(16, triton.next_power_of_2(n_rows)), 64, 128, dict(
            num_warps=4, num_stages=4)
    else:
        block_n, block_v, block_d, launch = 128, 128, 64, dict(num_warps=4, num_stages=3)
    if dtype == torch.float32:  # twice the bytes per element: halve the depth of a stage
        block_d, launch = 64, dict(num_warps=4, num_stages=3)
    if topk_pad:  # the running top-k is merged one tile at a time: tiles of exactly k
        block_n, block_v, launch = min(block_n, 64), topk_pad, dict(
            num_warps=8 if topk_pad >= 128 else 4, num_stages=2)
    block_d = min(block_d, max(16, triton.next_power_of_2(d)))
    return block_n, block_v, block_d, dot_f32, launch


def catalog_forward(user, items, target, target_score, exclude, scale: float, normalize: bool,
                    topk: int = 0, config: dict | None = None):
    """lse [N] fp32, count-above [N] int64 and, when topk > 0, int64 keys [N, splits * topk_pad].

    `user` [N, d] is normalised already, in `items`' dtype or fp32; `target_score` [N] fp32 is the
    target's score (-inf where it is dropped); `exclude` is int64 [N, L] or None, with the ids
    that must stay in the catalog already replaced by -1.
    """
    _check_operands(user, items, target, exclude)
    n_rows, d = user.shape
    n_items = items.shape[0]
    topk_pad = 0 if topk == 0 else max(16, triton.next_power_of_2(topk))
    block_n, block_v, block_d, dot_f32, launch = _blocks(n_rows, d, items.dtype, topk_pad)
    config = dict(config or {})  # block-size overrides, for tuning scripts
    block_n, block_v = config.pop("block_n", block_n), config.pop("block_v", block_v)
    block_d = config.pop("block_d", block_d)
    launch.update(config)
    n_blocks = triton.cdiv(n_rows, block_n)
    splits, tiles_per_split = _splits(n_blocks, triton.cdiv(n_items, block_v), user.device)
    dev = user.device
    part_m = _empty((splits, n_rows), torch.float32, dev)
    part_l = _empty((splits, n_rows), torch.float32, dev)
    part_cnt = _empty((splits, n_rows), torch.int32, dev)
    part_keys = _empty((n_rows, splits, max(topk_pad, 1)), torch.int64, dev)
    excl = exclude if exclude is not None else target.view(-1, 1)  # never read when absent
    user, user_lo, split_u = _split_user(user, items)
    _catalog_fwd_kernel[(n_blocks, splits)](
        user, user_lo, items, target, target_score, excl, part_m, part_l, part_cnt, part_keys,
        n_rows, n_items, d, excl.shape[1], tiles_per_split, scale, EMPTY_KEY,
        user.stride(0), user.stride(1), items.stride(0), items.stride(1),
        excl.stride(0), excl.stride(1),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, NORMALIZE=normalize,
        HAS_EXCL=exclude is not None, EXCL_PAD=_excl_pad(excl), TOPK=topk_pad,
        SPLIT_U=split_u, DOT_F32=dot_f32,
        **launch,
    )
    lse = _empty((n_rows,), torch.float32, dev)
    count = _empty((n_rows,), torch.int64, dev)
    merge_block = 128
    _catalog_merge_kernel[(triton.cdiv(n_rows, merge_block),)](
        part_m, part_l, part_cnt, lse, count, n_rows, splits, BLOCK=merge_block)
    keys = part_keys.view(n_rows, -1) if topk else None
    return lse, count, keys


def catalog_backward(user, items, target, lse, grad, exclude, scale: float,
                     normalize: bool, need_user: bool, need_items: bool,
                     config: dict | None = None, design: str | None = None):
    """Gradients of sum_n g[n] * log p(target[n]) w.r.t. `user` ([N, d] fp32) and `items`
    ([V, d] fp32, only with normalize=False); g = `grad` is the upstream gradient [N] fp32.
    `design`: "chunked" or "fused" (module docstring), else BACKWARD."""
    _check_operands(user, items, target, exclude)
    design = BACKWARD if design is None else design
    if design not in BACKWARDS:
        raise ValueError(f"design={design!r}; choose one of {BACKWARDS}")
    if need_items and normalize:
        raise ValueError("item gradients need pre-normalised items (normalize=False)")
    run = _chunked_backward if design == "chunked" else _fused_backward
    return run(user, items, target, lse, grad, exclude, scale, normalize, need_user,
               need_items, config)


def chunk_columns(n_rows: int, n_items: int, itemsize: int) -> int:
    """Items of one dS chunk [N, Vc]: a multiple of CHUNK_MULTIPLE under DS_BUDGET_BYTES (at
    least one multiple), never more than the catalog."""
    return chunk_width(n_rows, n_items, itemsize, DS_BUDGET_BYTES, CHUNK_MULTIPLE)


def _chunked_backward(user, items, target, lse, grad, exclude, scale, normalize, need_user,
                      need_items, config):
    """The catalog-chunked design (module docstring): dS per chunk by `_catalog_ds_kernel`,
    the gradient products by `r2ec_fast.ops._gemm`."""
    from r2ec_fast.ops._gemm import addmm_f32_, mm_into

    n_rows, d = user.shape
    n_items = items.shape[0]
    block_n, block_v, block_d, dot_f32, launch = _blocks(n_rows, d, items.dtype, 0)
    config = dict(config or {})
    block_n, block_v = config.pop("block_n", block_n), config.pop("block_v", block_v)
    block_d = config.pop("block_d", block_d)
    config.pop("programs_per_sm", None)
    launch.update(config)
    excl = exclude if exclude is not None else target.view(-1, 1)
    hi, lo, split_u = _split_user(user, items)
    ds_dtype = items.dtype  # 16-bit tables: tensor-core GEMMs, as the fused passes cast
    cols = chunk_columns(n_rows, n_items, items.element_size())
    ds = _empty((n_rows, cols), ds_dtype, user.device)
    grad_user = torch.zeros(n_rows, d, device=user.device) if need_user else None
    grad_items = _empty((n_items, d), torch.float32, user.device) if need_items else None
    for v0 in range(0, n_items, cols):
        v1 = min(v0 + cols, n_items)
        chunk = ds[:, :v1 - v0]
        _catalog_ds_kernel[(triton.cdiv(n_rows, block_n), triton.cdiv(v1 - v0, block_v))](
            hi, lo, items, target, lse, grad, excl, chunk, n_rows, n_items, d, excl.shape[1],
            v0, v1, scale, hi.stride(0), hi.stride(1), items.stride(0), items.stride(1),
            excl.stride(0), excl.stride(1), chunk.stride(0), BLOCK_N=block_n, BLOCK_V=block_v,
            BLOCK_D=block_d, NORMALIZE=normalize, HAS_EXCL=exclude is not None,
            EXCL_PAD=_excl_pad(excl), SPLIT_U=split_u, DOT_F32=dot_f32, **launch)
        if need_user:
            addmm_f32_(grad_user, chunk, items[v0:v1])
        if need_items:  # normalize=False: item_scale is `scale` for every item
            mm_into(grad_items[v0:v1], chunk.T, user)
    return grad_user, grad_items


def _fused_backward(user, items, target, lse, grad, exclude, scale, normalize, need_user,
                    need_items, config):
    """The per-output-tile passes (module docstring)."""
    n_rows, d = user.shape
    n_items = items.shape[0]
    block_n, block_v, block_d, dot_f32, launch = _blocks(n_rows, d, items.dtype, 0)
    depth = 4
    if n_rows <= 64 and items.dtype != torch.float32 and not _interpreting():
        # user-gradient kernel on an H100, N = 64, d = 2304, |V| = 1e6, bf16: 7.4 ms with
        # 128-item tiles and 8 warps against 11.4 ms with the forward's 64-item tiles; one
        # program per SM was as fast as four and keeps the partial sums 4x smaller
        block_v, block_d, launch, depth = 128, min(block_d, 128), dict(num_warps=8,
                                                                       num_stages=3), 1
    config = dict(config or {})  # overrides, for tuning scripts
    block_n, block_v = config.pop("block_n", block_n), config.pop("block_v", block_v)
    block_d = config.pop("block_d", block_d)
    depth = config.pop("programs_per_sm", depth)
    launch.update(config)
    excl = exclude if exclude is not None else target.view(-1, 1)
    user, user_lo, split_u = _split_user(user, items)
    common = (user.stride(0), user.stride(1), items.stride(0), items.stride(1),
              excl.stride(0), excl.stride(1))
    grad_user = grad_items = None
    if need_user:
        n_blocks = triton.cdiv(n_rows, block_n)
        splits, tiles_per_split = _splits(n_blocks, triton.cdiv(n_items, block_v), user.device,
                                          depth)
        part = torch.zeros(splits, n_rows, d, device=user.device, dtype=torch.float32)
        _catalog_bwd_user_kernel[(n_blocks, splits)](
            user, user_lo, items, target, lse, grad, excl, part,
            n_rows, n_items, d, excl.shape[1], tiles_per_split, scale, *common,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, NORMALIZE=normalize,
            HAS_EXCL=exclude is not None, EXCL_PAD=_excl_pad(excl), SPLIT_U=split_u,
            DOT_F32=dot_f32, **launch)
        grad_user = part.sum(0)  # fixed-order reduction over splits: deterministic
    if need_items:
        grad_items = torch.zeros(n_items, d, device=user.device, dtype=torch.float32)
        _catalog_bwd_items_kernel[(triton.cdiv(n_items, block_v),)](
            user, user_lo, items, target, lse, grad, excl, grad_items,
            n_rows, n_items, d, excl.shape[1], scale, *common,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            HAS_EXCL=exclude is not None, EXCL_PAD=_excl_pad(excl), SPLIT_U=split_u,
            DOT_F32=dot_f32, **launch)
    return grad_user, grad_items
