"""Triton kernels for attention over a paged KV cache (DESIGN §4.4) and their launchers.

Cache layout (flash-attn's `flash_attn_with_kvcache`): k_cache, v_cache [num_blocks,
block_size, H_kv, D]; key position j of sequence b lives in page block_table[b, j // block_size]
at offset j % block_size. Every kernel looks pages up per key position, so any block size works
and a key tile may span pages.

    s = (q . k) * scale;  s = softcap * tanh(s / softcap)  (SOFTCAP);  keys j <= pos and, with
    WINDOW, j > pos - window;  out = softmax(s) . v,  all accumulated in fp32.

- `_kv_append_kernel`: one program per new token copies its K and V rows to their slots
  (slot < 0: skipped).
- `_paged_prefill_kernel`, FlashAttention-2 style: one program per (query tile, KV head). A
  tile packs TILE_Q query tokens x the GROUP query heads that share the KV head into its
  BLOCK_M rows (row r = token r // GROUP, head r % GROUP), so every K/V tile is read once per
  head group. The key loop only visits [first_pos - window + 1, last_pos] (causal and window
  skip), with an online softmax in the log2 domain. The grid is static: an upper bound on the
  number of tiles, with a tile map built by torch ops on the device (no host sync); spare
  programs find seq = -1 and do nothing.
- `_paged_decode_kernel` + `_paged_decode_merge_kernel`, flash-decoding: one program per
  (sequence, KV head, split); its BLOCK_H rows are the GROUP query heads padded to a tl.dot
  size; each split takes a contiguous slice of the visible context and writes partial
  (max, sum, acc); the merge kernel combines the splits. With one split the decode kernel
  writes the output itself.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _empty, _interpreting, _mma, _num_sms
from .token_logp import _tanh


@triton.jit
def _kv_append_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, SLOTS, n_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,
    BLOCK: tl.constexpr,
):
    """K_CACHE/V_CACHE[slot // block_size, slot % block_size] = KEY/VALUE[t]; both caches share
    strides and the dtype of the rows."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    page = slot // block_size
    off = slot % block_size
    dst = page * stride_cb + off * stride_co
    for i0 in range(0, n_heads * head_dim, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        h = i // head_dim
        d = i % head_dim
        mask = (i < n_heads * head_dim) & (slot >= 0)
        k = tl.load(KEY + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
        v = tl.load(VALUE + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
        c = dst + h * stride_ch + d * stride_cd
        tl.store(K_CACHE + c, k, mask=mask)
        tl.store(V_CACHE + c, v, mask=mask)


@triton.jit
def _attend_tile(q, m, l, acc, K_CACHE, V_CACHE, BT_ROW, stride_btc, k0, k_end, h_kv, pos,
                 row_ok, block_size, head_dim, scale, softcap, window,
                 stride_kb, stride_ko, stride_kh, stride_kd,
                 stride_vb, stride_vo, stride_vh, stride_vd,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """One key tile [k0, k0 + BLOCK_N) (clipped at k_end) of the online softmax: returns the
    updated (m, l, acc) of the rows of q [ROWS, BLOCK_D]; m is in the log2 domain."""
    j = k0 + tl.arange(0, BLOCK_N)
    j_ok = j < k_end
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    page = tl.load(BT_ROW + (j // block_size) * stride_btc, mask=j_ok, other=0).to(tl.int64)
    off = (j % block_size).to(tl.int64)
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(K_CACHE + page[:, None] * stride_kb + off[:, None] * stride_ko
                + h_kv * stride_kh + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    s = _mma(q, tl.trans(k), tl.zeros((ROWS, BLOCK_N), tl.float32), DOT_F32) * scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = s * 1.4426950408889634  # log2(e): exp2 below
    ok = row_ok[:, None] & j_ok[None, :]
    if CAUSAL:
        ok = ok & (j[None, :] <= pos[:, None])
    if WINDOW:
        ok = ok & (j[None, :] > pos[:, None] - window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # rows that have seen no visible key yet keep m = -inf; exponentiate against 0 instead
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_use)
    p = tl.exp2(s - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v = tl.load(V_CACHE + page[:, None] * stride_vb + off[:, None] * stride_vo
                + h_kv * stride_vh + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32)
    return m_new, l, acc


@triton.jit
def _paged_prefill_kernel(
    Q, K_CACHE, V_CACHE, OUT, BLOCK_TABLE, CU_SEQLENS, CACHE_SEQLENS, TILE_MAP,
    scale, softcap, window, head_dim, block_size,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_kb, stride_ko, stride_kh, stride_kd, stride_vb, stride_vo, stride_vh, stride_vd,
    stride_btb, stride_btc,
    GROUP: tl.constexpr, TILE_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):
    tile = tl.program_id(0)
    h_kv = tl.program_id(1)
    seq = tl.load(TILE_MAP + 2 * tile)
    q_start = tl.load(TILE_MAP + 2 * tile + 1)  # first query token of the tile in its chunk
    live = seq >= 0
    seq = tl.maximum(seq, 0)
    row0 = tl.load(CU_SEQLENS + seq)
    q_len = tl.where(live, tl.load(CU_SEQLENS + seq + 1) - row0, 0)
    ctx = tl.load(CACHE_SEQLENS + seq)
    first_pos = ctx - q_len + q_start
    n_tok = tl.minimum(q_len - q_start, TILE_Q)  # <= 0 on a spare program: no rows, no keys

    r = tl.arange(0, BLOCK_M)
    tok = r // GROUP
    head = h_kv * GROUP + r % GROUP
    row_ok = (tok < TILE_Q) & (tok < n_tok)
    pos = first_pos + tok
    rows = (row0 + q_start + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < head_dim)[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + head[:, None] * stride_qh
                + d[None, :] * stride_qd, mask=io_mask, other=0.0)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_end = tl.where(n_tok > 0, first_pos + n_tok, 0)  # last visible key + 1
    k_begin = 0
    if WINDOW:
        k_begin = tl.maximum(first_pos - window + 1, 0)
    bt_row = BLOCK_TABLE + seq.to(tl.int64) * stride_btb
    for k0 in range(k_begin, k_end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, K_CACHE, V_CACHE, bt_row, stride_btc, k0, k_end,
                                 h_kv, pos, row_ok, block_size, head_dim, scale, softcap,
                                 window, stride_kb, stride_ko, stride_kh, stride_kd,
                                 stride_vb, stride_vo, stride_vh, stride_vd,
                                 BLOCK_M, BLOCK_N, BLOCK_D, True, SOFTCAP, WINDOW, DOT_F32)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OUT + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=io_mask)


@triton.jit
def _paged_decode_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLE, CACHE_SEQLENS, PART_M, PART_L, PART_ACC, OUT,
    PREFIX_LENS, scale, softcap, window, head_dim, block_size, num_heads, num_splits,
    split_base, stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ko, stride_kh, stride_kd, stride_vb, stride_vo, stride_vh, stride_vd,
    stride_btb, stride_btc,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr,
    CASCADE: tl.constexpr,
):
    """Split `split` of the visible context [lo, ctx) of sequence b, for the query heads of KV
    head h_kv. DIRECT (one split): OUT[b, head] = acc / l. Otherwise PART_M/PART_L
    [B, H_q, num_splits] and PART_ACC [B, H_q, num_splits, D] (fp32, contiguous) get the
    partials at split_base + split; an empty split writes m = -inf, l = 0, acc = 0. CASCADE:
    the context starts after the row's shared prefix, PREFIX_LENS[b] keys that
    `_paged_decode_prefix_kernel` attends to."""
    b = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CACHE_SEQLENS + b)
    lo = 0
    if WINDOW:
        lo = tl.maximum(ctx - window, 0)
    if CASCADE:
        lo = tl.maximum(lo, tl.load(PREFIX_LENS + b))
    per_split = tl.cdiv(tl.cdiv(ctx - lo, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, ctx)

    g = tl.arange(0, BLOCK_H)
    row_ok = g < GROUP
    head = h_kv * GROUP + g
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < head_dim)[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh
                + d[None, :] * stride_qd, mask=io_mask, other=0.0)
    pos = tl.zeros((BLOCK_H,), tl.int32) + ctx - 1
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    bt_row = BLOCK_TABLE + b.to(tl.int64) * stride_btb
    # every key of [lo, ctx) is visible to the one query: no causal or window test per key
    for k0 in range(s_lo, s_hi, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, K_CACHE, V_CACHE, bt_row, stride_btc, k0, s_hi,
                                 h_kv, pos, row_ok, block_size, head_dim, scale, softcap,
                                 window, stride_kb, stride_ko, stride_kh, stride_kd,
                                 stride_vb, stride_vo, stride_vh, stride_vd,
                                 BLOCK_H, BLOCK_N, BLOCK_D, False, SOFTCAP, False, DOT_F32)
    row = b.to(tl.int64) * num_heads + head  # [BLOCK_H] (b, head) index
    if DIRECT:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(OUT + row[:, None] * head_dim + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=io_mask)
    else:
        part = row * num_splits + split_base + split
        tl.store(PART_M + part, m, mask=row_ok)
        tl.store(PART_L + part, l, mask=row_ok)
        tl.store(PART_ACC + part[:, None] * head_dim + d[None, :], acc, mask=io_mask)


@triton.jit
def _paged_decode_prefix_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLE, CACHE_SEQLENS, MEMBERS, PREFIX_LENS, PART_M, PART_L,
    PART_ACC, scale, softcap, window, head_dim, block_size, num_heads, num_splits,
    members_per, stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ko, stride_kh, stride_kd, stride_vb, stride_vo, stride_vh, stride_vd,
    stride_btb, stride_btc,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Cascade decoding's shared part: split `split` of the prefix [0, PREFIX_LENS[b]) that the
    rows MEMBERS[p, :] (-1: none) hold in the same pages, for all their query heads of KV head
    h_kv at once, so each prefix page is read once per prefix rather than once per row. Row r
    of the tile is member r // GROUP, head r % GROUP. Partials go to splits [0, grid dim 2)."""
    p = tl.program_id(0)
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_H)
    member = r // GROUP
    head = h_kv * GROUP + r % GROUP
    b = tl.load(MEMBERS + p * members_per + member, mask=member < members_per, other=-1)
    row_ok = b >= 0
    b = tl.maximum(b, 0)
    first = tl.load(MEMBERS + p * members_per)
    plen = tl.where(first >= 0, tl.load(PREFIX_LENS + tl.maximum(first, 0)), 0)
    pos = tl.load(CACHE_SEQLENS + b, mask=row_ok, other=1) - 1  # the rows' query positions
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < head_dim)[None, :]
    q = tl.load(Q + b.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh
                + d[None, :] * stride_qd, mask=io_mask, other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    per_split = tl.cdiv(tl.cdiv(plen, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    s_lo = split * per_split
    s_hi = tl.minimum(s_lo + per_split, plen)
    bt_row = BLOCK_TABLE + tl.maximum(first, 0).to(tl.int64) * stride_btb
    # every prefix key precedes every row's query (causal holds); the window is per row
    for k0 in range(s_lo, s_hi, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, K_CACHE, V_CACHE, bt_row, stride_btc, k0, s_hi,
                                 h_kv, pos, row_ok, block_size, head_dim, scale, softcap,
                                 window, stride_kb, stride_ko, stride_kh, stride_kd,
                                 stride_vb, stride_vo, stride_vh, stride_vd,
                                 BLOCK_H, BLOCK_N, BLOCK_D, False, SOFTCAP, WINDOW, DOT_F32)
    part = (b.to(tl.int64) * num_heads + head) * num_splits + split
    tl.store(PART_M + part, m, mask=row_ok)
    tl.store(PART_L + part, l, mask=row_ok)
    tl.store(PART_ACC + part[:, None] * head_dim + d[None, :], acc, mask=io_mask)


@triton.jit
def _paged_decode_merge_kernel(PART_M, PART_L, PART_ACC, OUT, PREFIX_LENS, head_dim, num_heads,
                               num_splits, prefix_splits, BLOCK_S: tl.constexpr,
                               BLOCK_D: tl.constexpr, CASCADE: tl.constexpr):
    """OUT[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for one (b, head) row.
    CASCADE: the first prefix_splits splits count only for rows with a shared prefix (the
    prefix kernel writes no others)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    if CASCADE:
        shared = tl.load(PREFIX_LENS + row // num_heads) > 0
        s_ok = s_ok & ((s >= prefix_splits) | shared)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    part = row * num_splits + s
    m = tl.load(PART_M + part, mask=s_ok, other=float("-inf"))
    l = tl.load(PART_L + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    # -inf only for an empty context (cache_seqlens 0: a padding row), whose output is 0
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    acc = tl.load(PART_ACC + part[:, None] * head_dim + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + row * head_dim + d, out.to(OUT.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------- launchers


def _dot_f32(query, k_cache) -> bool:
    """fp32 operands with ieee products for fp32 (or mixed-dtype) inputs and in the
    interpreter (DESIGN §3); same-dtype 16-bit inputs keep tensor-core dots on a GPU."""
    same16 = query.dtype == k_cache.dtype and query.dtype in (torch.bfloat16, torch.float16)
    return _interpreting() or not same16


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def kv_append(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Scatter key/value [T, H_kv, D] into the caches at slot_mapping [T] (slot < 0: skipped).
    The caches must share strides."""
    n_tokens, n_heads, head_dim = key.shape
    if v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if n_tokens == 0:
        return
    # rows of another dtype are rounded by torch, so that the cache holds the same bits on
    # every backend (the interpreter's fp32 -> bf16 cast truncates)
    key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    block = min(1024, triton.next_power_of_2(n_heads * head_dim))
    _kv_append_kernel[(n_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, n_heads, head_dim, k_cache.shape[1],
        *key.stride(), *value.stride(), *k_cache.stride(), BLOCK=block)


def _prefill_blocks(group: int, head_dim: int, dot_f32: bool):
    """(BLOCK_M, BLOCK_N, launch options). Not yet tuned on a GPU: FlashAttention-2's usual
    64 x 64 tiles, halved on the key side for D > 128 so K, V and the accumulator fit."""
    if _interpreting():
        return max(16, triton.next_power_of_2(group)), 16, {}
    block_m = max(64, triton.next_power_of_2(group))
    if head_dim > 128 or dot_f32:
        return block_m, 32, dict(num_warps=8, num_stages=2)
    return block_m, 64, dict(num_warps=4, num_stages=3)


def _tile_map(cu_seqlens, tile_q: int, n_tiles: int) -> torch.Tensor:
    """[n_tiles, 2] int32 (sequence, first query token in its chunk) of every query tile, by
    sequence; rows past the real tile count hold (-1, 0). Device ops only: no host sync."""
    q_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles = (q_lens + tile_q - 1) // tile_q  # [B]
    ends = torch.cumsum(tiles, 0)
    idx = torch.arange(n_tiles, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, idx, right=True)  # B for spare tiles
    valid = seq < q_lens.numel()
    seq_c = seq.clamp(max=q_lens.numel() - 1)
    start = (idx - (ends - tiles)[seq_c]) * tile_q
    return torch.stack((torch.where(valid, seq_c, -1), torch.where(valid, start, 0)),
                       1).to(torch.int32)


def paged_prefill(query, k_cache, v_cache, block_table, cu_seqlens, cache_seqlens, scale,
                  softcap, sliding_window, config: dict | None = None) -> torch.Tensor:
    """out [T, H_q, D] in query's dtype: varlen causal attention of the packed queries (the
    last q_len positions of each sequence) over the paged cache. Integer tensors int32."""
    n_tokens, n_q_heads, head_dim = query.shape
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    dot_f32 = _dot_f32(query, k_cache)
    block_m, block_n, launch = _prefill_blocks(group, head_dim, dot_f32)
    config = dict(config or {})
    block_m, block_n = config.pop("block_m", block_m), config.pop("block_n", block_n)
    launch.update(config)
    tile_q = block_m // group
    batch = cache_seqlens.shape[0]
    out = _empty((n_tokens, n_q_heads, head_dim), query.dtype, query.device)
    if n_tokens == 0 or batch == 0:
        return out
    # each sequence has at most one partial tile: the grid needs no host sync
    n_tiles = triton.cdiv(n_tokens, tile_q) + batch
    tile_map = _tile_map(cu_seqlens, tile_q, n_tiles)
    _paged_prefill_kernel[(n_tiles, n_kv_heads)](
        query, k_cache, v_cache, out, block_table, cu_seqlens, cache_seqlens, tile_map,
        float(scale), float(softcap or 1.0), int(sliding_window or 0), head_dim,
        k_cache.shape[1], *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), GROUP=group, TILE_Q=tile_q, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_block_d(head_dim), SOFTCAP=softcap is not None,
        WINDOW=sliding_window is not None, DOT_F32=dot_f32, **launch)
    return out


PREFIX_PROGRAMS_PER_SM = 4  # the prefix kernel's grid depth (see paged_decode)


def decode_splits(batch: int, n_kv_heads: int, max_context: int, block_n: int,
                  device: torch.device, programs_per_sm: int = 2) -> int:
    """Context splits per (sequence, KV head): enough programs for two per SM, no more splits
    than the longest possible context (block_table width x block_size) has key tiles of 4 x
    BLOCK_N, at most 64. Each sequence divides its own context among the splits, so short
    ones leave trailing splits empty (they exit at once). The interpreter always takes up to 3
    splits, so that the merge kernel runs in every test."""
    tiles = max(1, math.ceil(max_context / block_n))
    if _interpreting():
        return min(3, tiles)
    want = math.ceil(programs_per_sm * _num_sms(device) / max(1, batch * n_kv_heads))
    return max(1, min(want, math.ceil(tiles / 4), 64))


def paged_decode(query, k_cache, v_cache, block_table, cache_seqlens, scale, softcap,
                 sliding_window, prefix=None, config: dict | None = None) -> torch.Tensor:
    """out [B, H_q, D] in query's dtype: one query per sequence at position cache_seqlens - 1
    attends to its whole (windowed) context in the paged cache.

    prefix: None, or cascade decoding's (members [P, G] int32, prefix_lens [B] int32): the
    rows members[p, :] (-1 pads at the end) hold their first prefix_lens[b] keys (the same
    for all of them, 0 for rows of no prefix) in the same pages, e.g. a group's shared prompt
    blocks.
    Those keys are read once per prefix by `_paged_decode_prefix_kernel` instead of once per
    row (the idea of FlashInfer's cascade inference, Ye et al. 2024); the rest of each context
    by the decode kernel; the merge kernel joins the two sets of partials: the same attention
    but for the order of the fp32 sums."""
    batch, n_q_heads, head_dim = query.shape
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    dot_f32 = _dot_f32(query, k_cache)
    config = dict(config or {})
    if _interpreting():
        block_n, launch = 16, {}
    else:  # not yet tuned on a GPU
        block_n, launch = (32 if head_dim > 128 else 64), dict(num_warps=4, num_stages=2)
    block_n = config.pop("block_n", block_n)
    max_context = block_table.shape[1] * k_cache.shape[1]
    splits = config.pop("num_splits", None) or decode_splits(
        batch, n_kv_heads, max_context, block_n, query.device)
    prefix_splits = 0
    if prefix is not None:
        members = prefix[0]
        # sized for the prefixes there usually are (rows / G; members has room for rows / 2)
        # and 4 programs per SM: each prefix tile is read by one program only
        prefix_splits = config.pop("prefix_splits", None) or decode_splits(
            max(1, batch // max(1, members.shape[1])), n_kv_heads, max_context, block_n,
            query.device, programs_per_sm=PREFIX_PROGRAMS_PER_SM)
    launch.update(config)
    dev = query.device
    out = _empty((batch, n_q_heads, head_dim), query.dtype, dev)
    if batch == 0:
        return out
    direct = splits == 1 and prefix is None
    total = splits + prefix_splits
    if direct:
        part_m = part_l = part_acc = out  # unused
    else:
        part_m = _empty((batch, n_q_heads, total), torch.float32, dev)
        part_l = _empty((batch, n_q_heads, total), torch.float32, dev)
        part_acc = _empty((batch, n_q_heads, total, head_dim), torch.float32, dev)
    block_d = _block_d(head_dim)
    prefix_lens = cache_seqlens if prefix is None else prefix[1]  # unread without CASCADE
    strides = (*k_cache.stride(), *v_cache.stride(), *block_table.stride())
    flags = dict(GROUP=group, BLOCK_N=block_n, BLOCK_D=block_d, SOFTCAP=softcap is not None,
                 WINDOW=sliding_window is not None, DOT_F32=dot_f32)
    numbers = (float(scale), float(softcap or 1.0), int(sliding_window or 0), head_dim,
               k_cache.shape[1], n_q_heads, total)
    if prefix is not None and members.shape[0]:
        g = members.shape[1]
        _paged_decode_prefix_kernel[(members.shape[0], n_kv_heads, prefix_splits)](
            query, k_cache, v_cache, block_table, cache_seqlens, members, prefix_lens, part_m,
            part_l, part_acc, *numbers, g, *query.stride(), *strides,
            BLOCK_H=max(16, triton.next_power_of_2(g * group)), **flags, **launch)
    _paged_decode_kernel[(batch, n_kv_heads, splits)](
        query, k_cache, v_cache, block_table, cache_seqlens, part_m, part_l, part_acc, out,
        prefix_lens, *numbers, prefix_splits, *query.stride(), *strides,
        BLOCK_H=max(16, triton.next_power_of_2(group)), DIRECT=direct,
        CASCADE=prefix is not None, **flags, **launch)
    if not direct:
        _paged_decode_merge_kernel[(batch * n_q_heads,)](
            part_m, part_l, part_acc, out, prefix_lens, head_dim, n_q_heads, total,
            prefix_splits, BLOCK_S=triton.next_power_of_2(total), BLOCK_D=block_d,
            CASCADE=prefix is not None)
    return out
