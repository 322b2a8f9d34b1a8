"""Triton kernels for fused linear token log-probabilities (DESIGN §4.3) and their launchers.

    x[t, v] = h[t] . w[v]
    z[t, v] = softcap * tanh(x / softcap) / temperature      (x / temperature without softcap)
    logp[t] = z[t, tgt[t]] - lse[t],   entropy[t] = lse[t] - sum_v p[t, v] z[t, v]

Forward, flash-decoding style as in kernels/catalog.py: the grid is (token blocks, vocabulary
splits); each program streams its split in BLOCK_V tiles (`tl.dot` over d, softcap and
temperature applied in the tile) and keeps a running (max, sum exp, sum exp * z, target
logit); a small kernel merges the splits into logp, entropy, lse and mean z.

Backward recomputes every tile from the saved lse (and mean z for the entropy):

    dL/dz = g_logp (1[v = tgt] - p) - g_ent p (z - mean_z),   dz/dx = (1 - tanh^2) / temperature

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

Targets are int64 with -1 for ignored tokens: they get logp = entropy = 0 and no gradient.
Offsets into the weight are int64 (Vocab x d passes 2^31 for large vocabularies).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _empty, _interpreting, _mma, _num_sms, _splits

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
                 stride_wd, inv_cap, z_scale, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr):
    """(z, tanh) [BLOCK_T, BLOCK_V] fp32: the sampled distribution's logits, and the tanh of
    the capped raw logits that dz/dx needs (the raw logits when there is no softcap)."""
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
        th = _tanh(acc * inv_cap)
        return th * z_scale, th  # z_scale = softcap / temperature
    else:
        return acc * z_scale, acc  # z_scale = 1 / temperature


@triton.jit
def _grad_logits(z, th, cols, col_mask, tgt, lse, mean_z, g_lp, g_ent, inv_temp,
                 SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr):
    """dL/dx [BLOCK_T, BLOCK_V] fp32 for upstream gradients g_lp (of logp) and g_ent (of the
    entropy), both already zero on ignored and out-of-range tokens."""
    p = tl.exp(z - lse[:, None])
    coef = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
    if ENTROPY:
        coef -= p * (z - mean_z[:, None]) * g_ent[:, None]
    if SOFTCAP:
        coef = coef * ((1.0 - th * th) * inv_temp)
    else:
        coef = coef * inv_temp
    return tl.where(col_mask[None, :], coef, 0.0)


@triton.jit
def _load_token_grads(TGT, LSE, MEAN_Z, G_LP, G_ENT, rows, row_mask, ENTROPY: tl.constexpr):
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g_lp = tl.where(tgt >= 0, tl.load(G_LP + rows, mask=row_mask, other=0.0), 0.0)
    if ENTROPY:
        mean_z = tl.load(MEAN_Z + rows, mask=row_mask, other=0.0)
        g_ent = tl.where(tgt >= 0, tl.load(G_ENT + rows, mask=row_mask, other=0.0), 0.0)
    else:
        mean_z = lse
        g_ent = g_lp
    return tgt, lse, mean_z, g_lp, g_ent


@triton.jit
def _token_logp_fwd_kernel(
    H, W, TGT, PART_M, PART_L, PART_EZ, PART_ZT,
    T, V, D, tiles_per_split, inv_cap, z_scale,
    stride_ht, stride_hd, stride_wv, stride_wd,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_T,), tl.float32)
    ez = tl.zeros((BLOCK_T,), tl.float32)  # sum exp(z - m) z
    z_tgt = tl.zeros((BLOCK_T,), tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd,
                            stride_wv, stride_wd, inv_cap, z_scale, BLOCK_T, BLOCK_V, BLOCK_D,
                            SOFTCAP, DOT_F32)
        z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        # the first tile of a split always holds a column < V, so m is finite from then on
        m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.where(col_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(e, axis=1)
        if ENTROPY:
            ez = ez * alpha + tl.sum(e * z, axis=1)
        m = m_new
    out = pid_s * T + rows
    tl.store(PART_M + out, m, mask=row_mask)
    tl.store(PART_L + out, l, mask=row_mask)
    tl.store(PART_ZT + out, z_tgt, mask=row_mask)
    if ENTROPY:
        tl.store(PART_EZ + out, ez, mask=row_mask)


@triton.jit
def _token_logp_merge_kernel(PART_M, PART_L, PART_EZ, PART_ZT, TGT, LOGP, ENT, LSE, MEAN_Z,
                             T, num_splits, BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(PART_M + s * T + rows, mask=mask, other=float("-inf")))
    m_safe = tl.where(mask, m, 0.0)
    l = tl.zeros((BLOCK,), tl.float32)
    ez = tl.zeros((BLOCK,), tl.float32)
    z_tgt = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, num_splits):
        scale = tl.exp(tl.load(PART_M + s * T + rows, mask=mask, other=0.0) - m_safe)
        l += tl.load(PART_L + s * T + rows, mask=mask, other=0.0) * scale
        z_tgt += tl.load(PART_ZT + s * T + rows, mask=mask, other=0.0)
        if ENTROPY:
            ez += tl.load(PART_EZ + s * T + rows, mask=mask, other=0.0) * scale
    l = tl.where(mask, l, 1.0)
    lse = m_safe + tl.log(l)
    valid = tl.load(TGT + rows, mask=mask, other=-1) >= 0
    tl.store(LSE + rows, lse, mask=mask)
    tl.store(LOGP + rows, tl.where(valid, z_tgt - lse, 0.0), mask=mask)
    if ENTROPY:
        mean_z = ez / l
        tl.store(MEAN_Z + rows, mean_z, mask=mask)
        tl.store(ENT + rows, tl.where(valid, lse - mean_z, 0.0), mask=mask)


@triton.jit
def _token_logp_bwd_hidden_kernel(
    H, W, TGT, LSE, MEAN_Z, G_LP, G_ENT, PART_GH,
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
    tgt, lse, mean_z, g_lp, g_ent = _load_token_grads(TGT, LSE, MEAN_Z, G_LP, G_ENT, rows,
                                                      row_mask, ENTROPY)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = PART_GH + (pid_s * T + rows.to(tl.int64))[:, None] * D
    v_begin = pid_s * tiles_per_split * BLOCK_V
    for it in range(0, tiles_per_split):
        cols = v_begin + it * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, th = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht, stride_hd,
                             stride_wv, stride_wd, inv_cap, z_scale, BLOCK_T, BLOCK_V,
                             BLOCK_D, SOFTCAP, DOT_F32)
        coef = _grad_logits(z, th, cols, col_mask, tgt, lse, mean_z, g_lp, g_ent, inv_temp,
                            SOFTCAP, ENTROPY)
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
    H, W, TGT, LSE, MEAN_Z, G_LP, G_ENT, GW, SCRATCH,
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
            tgt, lse, mean_z, g_lp, g_ent = _load_token_grads(TGT, LSE, MEAN_Z, G_LP, G_ENT,
                                                              rows, row_mask, ENTROPY)
            z, th = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_ht,
                                 stride_hd, stride_wv, stride_wd, inv_cap, z_scale, BLOCK_T,
                                 BLOCK_V, BLOCK_D, SOFTCAP, DOT_F32)
            coef = tl.trans(_grad_logits(z, th, cols, col_mask, tgt, lse, mean_z, g_lp, g_ent,
                                         inv_temp, SOFTCAP, ENTROPY))  # [BLOCK_V, BLOCK_T]
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_mask = dd < D
                h = tl.load(H + rows.to(tl.int64)[:, None] * stride_ht + dd[None, :] * stride_hd,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
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


def token_logp_forward(hidden, weight, targets, softcap, temperature: float,
                       want_entropy: bool, config: dict | None = None):
    """(logp [T], entropy [T] or None, lse [T], mean_z [T] or None), all fp32."""
    _check_operands(hidden, weight, targets)
    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    dot_f32, _ = _dot_modes(hidden, weight)
    block_t, block_v, block_d, _, launch = _config(n_tokens, d, dot_f32, config)
    n_blocks = triton.cdiv(n_tokens, block_t)
    splits, tiles_per_split = _splits(n_blocks, triton.cdiv(vocab, block_v), hidden.device)
    dev = hidden.device
    part = [_empty((splits, n_tokens), torch.float32, dev) for _ in range(4)]
    inv_cap, z_scale, _ = _scales(softcap, temperature)
    _token_logp_fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, *part, n_tokens, vocab, d, tiles_per_split, inv_cap, z_scale,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d, SOFTCAP=softcap is not None,
        ENTROPY=want_entropy, DOT_F32=dot_f32, **launch)
    logp, lse = _empty((n_tokens,), torch.float32, dev), _empty((n_tokens,), torch.float32, dev)
    entropy = _empty((n_tokens,), torch.float32, dev) if want_entropy else None
    mean_z = _empty((n_tokens,), torch.float32, dev) if want_entropy else None
    merge_block = 128
    _token_logp_merge_kernel[(triton.cdiv(n_tokens, merge_block),)](
        *part, targets, logp, entropy if want_entropy else lse, lse,
        mean_z if want_entropy else lse, n_tokens, splits, BLOCK=merge_block,
        ENTROPY=want_entropy)
    return logp, entropy, lse, mean_z


def token_logp_backward(hidden, weight, targets, lse, mean_z, grad_logp, grad_entropy,
                        softcap, temperature: float, need_hidden: bool, need_weight: bool,
                        config: dict | None = None):
    """(grad_hidden in hidden's dtype or None, grad_weight in weight's dtype or None) of
    sum_t grad_logp[t] logp[t] + grad_entropy[t] entropy[t]; `grad_entropy` (with `mean_z`)
    may be None. Upstream gradients are fp32 [T]."""
    _check_operands(hidden, weight, targets)
    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    dot_f32, cast_coef = _dot_modes(hidden, weight)
    block_t, block_v, block_d, programs, launch = _config(n_tokens, d, dot_f32, config)
    entropy = grad_entropy is not None
    if entropy and mean_z is None:
        raise ValueError("an entropy gradient needs the forward's mean_z")
    dev = hidden.device
    inv_cap, z_scale, inv_temp = _scales(softcap, temperature)
    common = (n_tokens, vocab, d)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    flags = dict(BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
                 SOFTCAP=softcap is not None, ENTROPY=entropy, CAST_COEF=cast_coef)
    token_args = (targets, lse, mean_z if entropy else lse, grad_logp,
                  grad_entropy if entropy else grad_logp)
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
