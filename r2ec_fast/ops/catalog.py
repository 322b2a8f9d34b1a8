"""Full-catalog scoring and the catalog log-probability (DESIGN §4.1-4.2).

Three implementations behind each public function (DESIGN §3):
- ``reference``: materialises the N x |V| score matrix (the oracle; float64 with upcast=True);
- ``torch``: streams the catalog in chunks, memory O(N * chunk) beyond the inputs;
- ``triton``: the kernels of ``r2ec_fast.kernels.catalog`` (split catalog + merge).

Rank rule (§4.1): the number of non-excluded items with a higher score than the target, plus
those with an equal score and a smaller id; 0 is the top. A dropped target (only with
``mask_excluded_target=True``) has score -inf and ranks below every remaining item.
Rows whose statistics are NaN (NaN in the user row or in the table) get rank -1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from r2ec_fast.ops._backend import resolve_backend
from r2ec_fast.ops.item_table import SIMILARITIES, ItemTable

MAX_TOPK = 256
EPS = 1e-12  # F.normalize's: a zero row scores 0, not NaN
# scores chunk of the torch backend: 2^18 fp32 elements (1 MiB), also the bound on chunk x d.
# At N = 256, d = 128, |V| = 1e6 on this 2-core CPU, 1 MiB chunks (which stay in cache) ran in
# 1.7-1.9 s against 2.9 s with 4 MiB chunks, and a repeated call added 2.5 MiB of peak memory
# against 5 MiB. On CUDA 64x that (16M elements), where launch overhead, not cache, decides
# (chunks of 910 items took 575 ms at N = 64, d = 2304, |V| = 1e6 on an H100).
CHUNK_ELEMS = 1 << 18
CUDA_CHUNK_FACTOR = 64
EMPTY_KEY = ((0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)) << 32  # (score -inf, id 2^32 - 1)


@dataclass
class CatalogScores:
    """Per-row statistics of a user's scores over the catalog (fp32 / int64)."""

    lse: torch.Tensor  # [N] log-sum-exp of the non-excluded scores
    target_score: torch.Tensor | None  # [N] score of the target (-inf when dropped)
    rank: torch.Tensor | None  # [N] int64, 0 = top, -1 where the row is NaN
    topk_scores: torch.Tensor | None = None  # [N, k], -inf where fewer than k items remain
    topk_ids: torch.Tensor | None = None  # [N, k] int64, -1 where fewer than k items remain

    def target_prob(self) -> torch.Tensor:
        """R_c: softmax probability of the target over the catalog."""
        return torch.exp(self.target_score - self.lse)

    def ndcg(self, k: int) -> torch.Tensor:
        """NDCG@k of a single relevant item: 1/log2(rank + 2) if rank < k else 0 (NaN rows NaN)."""
        r = self.rank.to(torch.float32)
        val = torch.where(self.rank < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
        return torch.where(self.rank < 0, torch.full_like(r, float("nan")), val)

    def hit(self, k: int) -> torch.Tensor:
        r = (self.rank < k).to(torch.float32)
        return torch.where(self.rank < 0, torch.full_like(r, float("nan")), r)


# ----------------------------------------------------------------------------- validation


@dataclass
class _Call:
    user: torch.Tensor  # [N, d] as given
    items: torch.Tensor  # [V, d] rows to stream
    items_normalized: bool  # rows already L2-normalised (an ItemTable with cosine)
    target: torch.Tensor | None  # [N] int64
    exclude: torch.Tensor | None  # [N, L] int64, -1 where the id must stay in the catalog
    dropped: torch.Tensor | None  # [N] bool: target removed (mask_excluded_target)
    scale: float  # 1 / temperature
    cosine: bool
    # (name, low, high, min, max) per id tensor: checked in one host sync by `_check_ranges`,
    # after the work that does not depend on it is queued (measured on an H100: checking each
    # tensor up front left the GPU idle for ~1.3 ms of Python before the 1.8 ms kernel)
    ranges: list = field(default_factory=list)


def _check_id_dtype(name: str, ids: torch.Tensor) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got {ids.dtype}")


def _check_ranges(ranges: list) -> None:
    """One host sync for every id range of the call; raises ValueError naming the argument."""
    ranges = [r for r in ranges if r[3] is not None]
    if not ranges:
        return
    values = torch.stack([v for r in ranges for v in r[3:]]).tolist()
    for i, (name, low, high, _, _) in enumerate(ranges):
        lo, hi = values[2 * i], values[2 * i + 1]
        if lo < low or hi >= high:
            raise ValueError(f"{name} has ids outside [{low}, {high}): min {lo}, max {hi}")


def _id_range(name: str, ids: torch.Tensor, low: int, high: int) -> tuple:
    _check_id_dtype(name, ids)
    if ids.numel() == 0:
        return (name, low, high, None, None)
    return (name, low, high, ids.min(), ids.max())


def _prepare(user_h, items, target, exclude, temperature, similarity, topk,
             mask_excluded_target) -> _Call:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}; choose one of {SIMILARITIES}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    normalized = False
    if isinstance(items, ItemTable):
        if items.similarity != similarity:
            raise ValueError(f"the ItemTable was built for similarity={items.similarity!r} but "
                             f"similarity={similarity!r} was asked")
        normalized, items = items.normalized, items.weight
    for name, t in (("user_h", user_h), ("items", items)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(t.shape)}")
    n_rows, n_items = user_h.shape[0], items.shape[0]
    if user_h.shape[1] != items.shape[1]:
        raise ValueError(f"user_h has d={user_h.shape[1]} but items has d={items.shape[1]}")
    if user_h.device != items.device:
        raise ValueError(f"user_h is on {user_h.device} but items is on {items.device}")
    if not (isinstance(topk, int) and 0 <= topk <= MAX_TOPK):
        raise ValueError(f"topk must be an int in [0, {MAX_TOPK}], got {topk!r}")
    if topk > n_items:
        raise ValueError(f"topk={topk} exceeds the catalog size {n_items}")
    ranges = []
    if target is not None:
        if target.shape != (n_rows,):
            raise ValueError(f"target must have shape [{n_rows}], got {tuple(target.shape)}")
        if target.device != user_h.device:
            raise ValueError(f"target is on {target.device} but user_h is on {user_h.device}")
        ranges.append(_id_range("target", target, 0, n_items))
        target = target.to(torch.int64).contiguous()
    dropped = None
    if exclude is not None:
        if exclude.dim() != 2 or exclude.shape[0] != n_rows:
            raise ValueError(f"exclude must have shape [{n_rows}, L], got {tuple(exclude.shape)}")
        if exclude.device != user_h.device:
            raise ValueError(f"exclude is on {exclude.device} but user_h is on {user_h.device}")
        ranges.append(_id_range("exclude", exclude, -1, n_items))
        exclude = exclude.to(torch.int64)
        if target is not None:
            hits = exclude == target[:, None]
            if mask_excluded_target:
                dropped = hits.any(dim=1)
            else:  # the target stays in the catalog: un-exclude it
                exclude = exclude.masked_fill(hits, -1)
        if exclude.shape[1] == 0:
            exclude = None
    return _Call(user_h, items, normalized, target, exclude, dropped, 1.0 / float(temperature),
                 similarity == "cosine", ranges)


def _normalize_user(call: _Call) -> torch.Tensor:
    u = call.user.float()
    return F.normalize(u, dim=-1, eps=EPS) if call.cosine else u


def _operand_dtype(user_dtype: torch.dtype, items_dtype: torch.dtype) -> torch.dtype:
    """The user side's dtype in the streaming pass: the table's, except that user rows of
    another dtype against a 16-bit table stay fp32 (the kernels split them into two 16-bit
    parts): rounding fp16 rows to bf16, or fp32 rows to either, lost up to 4e-2 of a score."""
    if user_dtype != items_dtype and items_dtype != torch.float32:
        return torch.float32
    return items_dtype


def _target_score(u_k: torch.Tensor, items: torch.Tensor, target: torch.Tensor, scale: float,
                  normalize: bool) -> torch.Tensor:
    """[N] fp32 target scores from the same operands the streaming pass multiplies."""
    rows = items[target.clamp(0, items.shape[0] - 1)].float()  # [N, d]; ids checked after
    factor = scale / rows.norm(dim=-1).clamp_min(EPS) if normalize else scale
    return (u_k.float() * rows).sum(-1) * factor


# ----------------------------------------------------------------------------- top-k keys


def score_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the ranking order: higher score first, then smaller id."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # -0.0 -> +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - ids.to(torch.int64))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = (keys >> 32).to(torch.int32)
    scores = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return scores, torch.where(scores == float("-inf"), torch.full_like(ids, -1), ids)


# ----------------------------------------------------------------------------- torch backend


def _chunk_size(n_rows: int, d: int, device: torch.device) -> int:
    budget = CHUNK_ELEMS * (CUDA_CHUNK_FACTOR if device.type == "cuda" else 1)
    return max(1, min(budget // n_rows, budget // d))


class _ChunkBuffers:
    """The [N, chunk] buffers of the streaming loop, allocated once and reused: fresh
    allocations per chunk let the CPU heap grow (a first call at N = 256, d = 128, |V| = 1e6
    added 136 MiB of resident memory with them, against 0 for the calls after it)."""

    def __init__(self, n_rows: int, chunk: int, items: torch.Tensor):
        dev = items.device
        self.chunk = chunk
        self.scores = torch.empty(n_rows, chunk, device=dev)  # [N, c] fp32
        self.flags = torch.empty(2, n_rows, chunk, dtype=torch.bool, device=dev)
        # fp32 copy of a 16-bit table's chunk (an fp32 table is used in place)
        self.rows = (None if items.dtype == torch.float32
                     else torch.empty(chunk, items.shape[1], device=dev))

    def get(self, items: torch.Tensor, a: int, b: int):
        """(scores [N, c], flag, flag, fp32 rows [c, d]) for items[a:b]; views when c = chunk."""
        c = b - a
        full = c == self.chunk
        s = self.scores if full else torch.empty(self.scores.shape[0], c, device=items.device)
        f = self.flags if full else torch.empty(2, s.shape[0], c, dtype=torch.bool,
                                                device=items.device)
        if self.rows is None:
            xc = items[a:b]
        else:
            xc = (self.rows if full else torch.empty(c, items.shape[1], device=items.device))
            xc.copy_(items[a:b])
        return s, f[0], f[1], xc


def _chunk_scores(u32, items, a, b, scale, normalize, exclude, bufs):
    """Scores [N, b - a] fp32 of items[a:b] (excluded entries -inf), two bool scratch buffers
    of that shape, the per-item factor [c] and the fp32 rows [c, d]."""
    s, f1, f2, xc = bufs.get(items, a, b)
    factor = scale / xc.norm(dim=-1).clamp_min(EPS) if normalize else torch.full(
        (b - a,), scale, device=xc.device)
    torch.mm(u32, xc.T, out=s)
    s.mul_(factor)
    if exclude is not None:
        inside = (exclude >= a) & (exclude < b)  # [N, L]
        # write -inf at excluded ids, not add it: NaN + -inf is NaN, and an excluded item with
        # a NaN row must drop out of that user's catalog as in the reference and the kernels
        # (found by tests/ops/test_fuzz.py). -1 pads and ids of other chunks are sent to one
        # excluded id of this chunk, so that every write to a column carries the same value
        # (duplicates and order do not matter); a row with none rewrites its column 0 as is.
        col = torch.where(inside, exclude - a, -1)
        col = torch.where(inside, col, col.amax(1, keepdim=True).clamp_min(0))
        s.scatter_(1, col, torch.where(inside.any(1, keepdim=True), float("-inf"),
                                       s.gather(1, col)))
    return s, f1, f2, factor, xc


def _torch_forward(u_k, items, target, t, exclude, scale, normalize, topk):
    n_rows, d = u_k.shape
    u32 = u_k.float()
    lse = torch.full((n_rows,), float("-inf"), device=u_k.device)
    count = torch.zeros(n_rows, dtype=torch.int64, device=u_k.device)
    t_col = t[:, None]
    t_tie = torch.where(t == float("-inf"), float("nan"), t)[:, None]
    tgt = target[:, None]
    best = torch.full((n_rows, topk), EMPTY_KEY, dtype=torch.int64, device=u_k.device)
    chunk = _chunk_size(n_rows, d, u_k.device)
    bufs = _ChunkBuffers(n_rows, chunk, items)
    for a in range(0, items.shape[0], chunk):
        b = min(a + chunk, items.shape[0])
        s, above, scratch, _, _ = _chunk_scores(u32, items, a, b, scale, normalize, exclude,
                                                bufs)  # [N, c]
        ids = torch.arange(a, b, device=u_k.device)
        # above, then ties with a smaller id, then take back the target's own column (its
        # streamed score may round above `t`)
        count += torch.gt(s, t_col, out=above).sum(1)
        torch.eq(s, t_tie, out=above)
        count += above.logical_and_(torch.lt(ids, tgt, out=scratch)).sum(1)
        inside = (target >= a) & (target < b)
        own = s.gather(1, torch.where(inside, target - a, 0)[:, None])[:, 0]
        count -= (inside & (own > t)).to(torch.int64)
        if topk:
            keys = score_keys(s, ids)
            best = torch.topk(torch.cat([best, keys], 1), topk, dim=1, sorted=True).values
        # log-sum-exp in place on s (last use): no second [N, c] buffer
        m = s.amax(dim=1)
        m = torch.where(m == float("-inf"), 0.0, m)  # all excluded: exp(-inf) = 0, not NaN
        lse = torch.logaddexp(lse, m + s.sub_(m[:, None]).exp_().sum(1).log())
    return lse, count, (best if topk else None)


def _torch_backward(u_k, items, target, lse, grad, exclude, scale, normalize, need_u, need_x):
    n_rows, d = u_k.shape
    u32 = u_k.float()
    grad_u = torch.zeros(n_rows, d, device=u_k.device) if need_u else None
    grad_x = torch.empty(items.shape, device=u_k.device) if need_x else None
    chunk = _chunk_size(n_rows, d, u_k.device)
    bufs = _ChunkBuffers(n_rows, chunk, items)
    for a in range(0, items.shape[0], chunk):
        b = min(a + chunk, items.shape[0])
        s, _, _, factor, xc = _chunk_scores(u32, items, a, b, scale, normalize, exclude, bufs)
        coef = s.sub_(lse[:, None]).exp_().neg_()  # -p  [N, c]
        inside = (target >= a) & (target < b)
        coef.scatter_add_(1, torch.where(inside, target - a, 0)[:, None],
                          inside.to(coef.dtype)[:, None])  # + 1[v = target]
        coef.mul_(grad[:, None])
        if need_x:  # before the per-item factor goes in: d s / d x_hat = scale * u
            torch.mm(coef.T, u32, out=grad_x[a:b]).mul_(scale)
        if need_u:
            grad_u.addmm_(coef.mul_(factor), xc)
    return grad_u, grad_x


# ----------------------------------------------------------------------------- triton backend


def _triton_forward(u_k, items, target, t, exclude, scale, normalize, topk):
    from r2ec_fast.kernels import catalog as kern

    lse, count, keys = kern.catalog_forward(u_k, items, target, t.contiguous(), exclude, scale,
                                            normalize, topk)
    if topk:
        keys = torch.topk(keys, topk, dim=1, sorted=True).values
    return lse, count, keys


def _triton_backward(u_k, items, target, lse, grad, exclude, scale, normalize, need_u, need_x):
    from r2ec_fast.kernels import catalog as kern

    return kern.catalog_backward(u_k, items, target, lse, grad.contiguous(), exclude, scale,
                                 normalize, need_u, need_x)


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward}


# ----------------------------------------------------------------------------- references


def _reference_scores(user_h, items, exclude, temperature, similarity, upcast):
    dtype = torch.float64 if upcast else torch.promote_types(user_h.dtype, items.dtype)
    u, x = user_h.to(dtype), items.to(dtype)
    if similarity == "cosine":
        u, x = F.normalize(u, dim=-1, eps=EPS), F.normalize(x, dim=-1, eps=EPS)
    s = (u @ x.T).float() if not upcast else u @ x.T  # [N, V]
    s = s / temperature
    return s, _exclusion_mask(exclude, s.shape, s.device)


def _exclusion_mask(exclude, shape, device) -> torch.Tensor:
    """[N, V] bool, True at excluded ids (the materialised mask the other backends avoid)."""
    hits = torch.zeros(shape, dtype=torch.int32, device=device)
    if exclude is not None:  # add, not assign: -1 pads clamp onto column 0 and add nothing
        ex = exclude.long()
        hits.scatter_add_(1, ex.clamp_min(0), (ex >= 0).to(torch.int32))
    return hits > 0


def score_catalog_reference(user_h, items, target=None, exclude=None, temperature=0.02,
                            similarity="cosine", topk=0, mask_excluded_target=False,
                            upcast=True) -> CatalogScores:
    """Materialise the N x |V| scores (float64 with upcast, else fp32 after the input-dtype
    matmul, i.e. plain PyTorch) and apply §4.1 literally."""
    if isinstance(items, ItemTable):
        items = items.weight
    s, mask = _reference_scores(user_h, items, exclude, temperature, similarity, upcast)
    ids = torch.arange(s.shape[1], device=s.device)
    if target is not None and not mask_excluded_target:
        mask &= ids[None, :] != target[:, None]
    s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=1)
    t = rank = None
    if target is not None:
        tgt = target.long()[:, None]
        t = s.gather(1, tgt)[:, 0]
        tie = (s == t[:, None]) & (ids[None, :] < tgt) & ~mask
        rank = ((s > t[:, None]) | tie).sum(1)
        rank = torch.where(torch.isnan(lse) | torch.isnan(t), -1, rank)
    out = CatalogScores(lse, t, rank)
    if topk:
        order = torch.sort(s, dim=1, descending=True, stable=True)  # ties: smaller id first
        out.topk_scores = order.values[:, :topk]
        out.topk_ids = torch.where(out.topk_scores == float("-inf"), -1, order.indices[:, :topk])
    return out


def catalog_log_prob_reference(user_h, items, target, exclude=None, temperature=0.02,
                               similarity="cosine", upcast=True) -> torch.Tensor:
    """log softmax of the target over the non-excluded catalog, by autograd on the full matrix."""
    if isinstance(items, ItemTable):
        items = items.weight
    s, mask = _reference_scores(user_h, items, exclude, temperature, similarity, upcast)
    ids = torch.arange(s.shape[1], device=s.device)
    mask &= ids[None, :] != target[:, None]
    s = s.masked_fill(mask, float("-inf"))
    return s.gather(1, target.long()[:, None])[:, 0] - torch.logsumexp(s, dim=1)


def reference_trainer_rewards(user_h, items, target, exclude=None, temperature=0.02,
                              similarity="cosine", k=1000, beta=0.05,
                              mask_excluded_target=True) -> dict[str, torch.Tensor]:
    """The reference trainer's reward recipe in plain PyTorch (DESIGN §5 step 3): materialise
    the masked similarity, softmax for R_c, ``topk(k)`` for NDCG@k. The benchmark's "plain"
    path and the tests' check of the derived rewards."""
    if isinstance(items, ItemTable):
        items = items.weight
    ex = None if exclude is None else exclude.long()
    if ex is not None and not mask_excluded_target:
        ex = ex.masked_fill(ex == target[:, None], -1)
    s, mask = _reference_scores(user_h, items, ex, temperature, similarity, upcast=False)
    s = s.masked_fill(mask, float("-inf"))  # [N, V]
    rc = torch.softmax(s, dim=1).gather(1, target.long()[:, None])[:, 0]
    top = torch.topk(s, min(k, s.shape[1]), dim=1).indices  # [N, k]
    where = top == target[:, None]
    pos = where.float().argmax(dim=1).float()
    ndcg = torch.where(where.any(dim=1), 1.0 / torch.log2(pos + 2.0), torch.zeros_like(pos))
    return {"ndcg": ndcg, "rc": rc, "reward": (1 - beta) * ndcg + beta * rc}


# ----------------------------------------------------------------------------- public ops


@torch.no_grad()
def score_catalog(user_h, items, target=None, exclude=None, temperature=0.02,
                  similarity="cosine", topk=0, mask_excluded_target=False,
                  backend=None) -> CatalogScores:
    """Score each user row against the whole catalog in one streaming pass (DESIGN §4.1).

    Args:
        user_h: [N, d] final hidden states (any float dtype, any strides).
        items: [V, d] tensor or ``ItemTable``.
        target: [N] item ids, or None (then only lse and top-k are returned).
        exclude: [N, L] ids to drop per row (the history), -1 pads; the target stays unless
            ``mask_excluded_target``.
        topk: also return the k best (score, id) per row, k <= 256.
    Returns a ``CatalogScores`` (fp32 statistics, int64 ranks and ids).
    """
    call = _prepare(user_h, items, target, exclude, temperature, similarity, topk,
                    mask_excluded_target)
    backend = resolve_backend(backend, user_h, call.items)
    if backend == "reference":
        _check_ranges(call.ranges)
        out = score_catalog_reference(user_h, call.items, target, exclude, temperature,
                                      similarity, topk, mask_excluded_target, upcast=False)
        out.lse = out.lse.float()
        return out
    normalize = call.cosine and not call.items_normalized
    u_k = _normalize_user(call).to(_operand_dtype(user_h.dtype, call.items.dtype))
    n_rows = u_k.shape[0]
    if call.target is not None:
        tgt = call.target
        t = _target_score(u_k, call.items, tgt, call.scale, normalize)
        if call.dropped is not None:
            t = t.masked_fill(call.dropped, float("-inf"))
    else:  # nothing ranks above an infinite dummy target
        tgt = torch.full((n_rows,), -1, dtype=torch.int64, device=u_k.device)
        t = torch.full((n_rows,), float("inf"), device=u_k.device)
    _check_ranges(call.ranges)
    stats = catalog_stats if torch.compiler.is_compiling() else _stats_impl
    lse, count, keys = stats(u_k, call.items, tgt, t, call.exclude, call.scale, normalize, topk,
                             backend)
    out = CatalogScores(lse, None, None)
    if call.target is not None:
        out.target_score = t
        out.rank = torch.where(torch.isnan(lse) | torch.isnan(t), -1, count)
    if topk:
        out.topk_scores, out.topk_ids = decode_keys(keys)
    return out


# ----------------------------------------------------------------------------- custom ops
# Under torch.compile the streaming passes are torch.library custom ops: each stays one node of
# the graph (Dynamo cannot trace a Triton launcher or the chunk loop) and register_fake gives
# its output shapes. Eager calls skip the op dispatcher: its first call imports the compile
# stack (892 modules, 1.6 s and 120 MiB of resident memory on this CPU), which a plain
# scoring call must not pay. Both routes run the same `_*_impl` functions.


def _stats_impl(u_k, items, target, t, exclude, scale, normalize, topk, backend):
    """One streaming pass: lse [N] fp32, count-above [N] int64, top-k keys [N, topk] int64."""
    lse, count, keys = _FORWARD[backend](u_k, items, target, t, exclude, scale, normalize, topk)
    return lse, count, keys if topk else count.new_empty((u_k.shape[0], 0))


def _operand(u_hat: torch.Tensor, items: torch.Tensor, keep_fp32: bool) -> torch.Tensor:
    return u_hat.detach().to(torch.float32 if keep_fp32 else items.dtype)


def _log_prob_impl(u_hat, items, target, exclude, scale, normalize, backend, keep_fp32):
    """(log p(target) [N], lse [N]), fp32, from normalised user rows `u_hat` [N, d] fp32."""
    u_k = _operand(u_hat, items, keep_fp32)
    items = items.detach()
    t = _target_score(u_k, items, target, scale, normalize)
    lse, _, _ = _FORWARD[backend](u_k, items, target, t, exclude, scale, normalize, 0)
    return t - lse, lse


def _log_prob_backward_impl(grad, u_hat, items, target, lse, exclude, scale, normalize,
                            backend, keep_fp32, need_user, need_items):
    """(grad u_hat [N, d] fp32, grad items [V, d] in items' dtype); [0]-shaped when not needed.
    The gradient of the 16-bit operand is passed straight through its rounding to `u_hat`."""
    grad_u, grad_x = _BACKWARD[backend](
        _operand(u_hat, items, keep_fp32), items.detach(), target, lse,
        grad.float().contiguous(), exclude, scale, normalize, need_user, need_items)
    empty = u_hat.new_empty(0)
    return (grad_u if need_user else empty,
            grad_x.to(items.dtype) if need_items else empty.to(items.dtype))


@torch.library.custom_op("r2ec_fast::catalog_stats", mutates_args=())
def catalog_stats(u_k: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                  t: torch.Tensor, exclude: Optional[torch.Tensor], scale: float,
                  normalize: bool, topk: int, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _stats_impl(u_k, items, target, t, exclude, scale, normalize, topk, backend)


@catalog_stats.register_fake
def _(u_k, items, target, t, exclude, scale, normalize, topk, backend):
    n_rows = u_k.shape[0]
    return (u_k.new_empty(n_rows, dtype=torch.float32), u_k.new_empty(n_rows, dtype=torch.int64),
            u_k.new_empty((n_rows, topk), dtype=torch.int64))


@torch.library.custom_op("r2ec_fast::catalog_log_prob", mutates_args=())
def catalog_log_prob_op(u_hat: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                        exclude: Optional[torch.Tensor], scale: float, normalize: bool,
                        backend: str, keep_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_impl(u_hat, items, target, exclude, scale, normalize, backend, keep_fp32)


@catalog_log_prob_op.register_fake
def _(u_hat, items, target, exclude, scale, normalize, backend, keep_fp32):
    return u_hat.new_empty(u_hat.shape[0]), u_hat.new_empty(u_hat.shape[0])


@torch.library.custom_op("r2ec_fast::catalog_log_prob_backward", mutates_args=())
def catalog_log_prob_backward(grad: torch.Tensor, u_hat: torch.Tensor, items: torch.Tensor,
                              target: torch.Tensor, lse: torch.Tensor,
                              exclude: Optional[torch.Tensor], scale: float, normalize: bool,
                              backend: str, keep_fp32: bool, need_user: bool,
                              need_items: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_backward_impl(grad, u_hat, items, target, lse, exclude, scale, normalize,
                                   backend, keep_fp32, need_user, need_items)


@catalog_log_prob_backward.register_fake
def _(grad, u_hat, items, target, lse, exclude, scale, normalize, backend, keep_fp32,
      need_user, need_items):
    return (u_hat.new_empty(u_hat.shape if need_user else (0,)),
            items.new_empty(items.shape if need_items else (0,)))


def _log_prob_setup(ctx, inputs, output):
    u_hat, items, target, exclude, scale, normalize, backend, keep_fp32 = inputs
    ctx.save_for_backward(u_hat, items, target, output[1], exclude)
    ctx.args = (scale, normalize, backend, keep_fp32)
    ctx.mark_non_differentiable(output[1])


def _log_prob_grads(ctx, grad_logp, backward):
    u_hat, items, target, lse, exclude = ctx.saved_tensors
    need_user, need_items = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_u, grad_x = backward(grad_logp, u_hat, items, target, lse, exclude, *ctx.args,
                              need_user, need_items)
    return (grad_u if need_user else None, grad_x if need_items else None,
            None, None, None, None, None, None)


def _log_prob_backward(ctx, grad_logp, _grad_lse):  # traced: the backward is an op too
    return _log_prob_grads(ctx, grad_logp, catalog_log_prob_backward)


catalog_log_prob_op.register_autograd(_log_prob_backward, setup_context=_log_prob_setup)


class _EagerLogProb(torch.autograd.Function):
    """The eager route of catalog_log_prob_op, with the same setup and backward."""

    @staticmethod
    def forward(*inputs):  # with setup_context, forward takes no ctx
        return _log_prob_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _log_prob_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse):
        return _log_prob_grads(ctx, grad_logp, _log_prob_backward_impl)


def catalog_log_prob(user_h, items, target, exclude=None, temperature=0.02, similarity="cosine",
                     backend=None) -> torch.Tensor:
    """[N] fp32 log-probability of each target under the softmax over the (non-excluded)
    catalog, differentiable w.r.t. ``user_h`` and, when it requires grad, ``items`` (a tensor).
    The target is never excluded. Backward streams the catalog again with the saved lse."""
    if target is None:
        raise ValueError("catalog_log_prob needs target ids")
    call = _prepare(user_h, items, target, exclude, temperature, similarity, 0, False)
    backend = resolve_backend(backend, user_h, call.items)
    _check_ranges(call.ranges)
    if backend == "reference":
        return catalog_log_prob_reference(user_h, call.items, target, exclude, temperature,
                                          similarity, upcast=False).float()
    x = call.items
    normalize = call.cosine and not call.items_normalized
    if normalize and x.requires_grad:  # let autograd carry the row normalisation
        x = F.normalize(x.float(), dim=-1, eps=EPS).to(x.dtype)
        normalize = False
    keep_fp32 = _operand_dtype(user_h.dtype, x.dtype) == torch.float32
    op = catalog_log_prob_op if torch.compiler.is_compiling() else _EagerLogProb.apply
    logp, _ = op(_normalize_user(call), x, call.target, call.exclude, call.scale, normalize,
                 backend, keep_fp32)
    return logp


def in_batch_log_prob(user_h, item_h, labels, temperature=0.02, similarity="cosine"):
    """The reference trainer's item action (DESIGN §4.2): log softmax over the B items of the
    batch, [N] fp32, ``labels[n]`` indexes ``item_h``. A small matrix: plain PyTorch."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}; choose one of {SIMILARITIES}")
    if user_h.dim() != 2 or item_h.dim() != 2 or user_h.shape[1] != item_h.shape[1]:
        raise ValueError(f"user_h [N, d] and item_h [B, d] must share d, got "
                         f"{tuple(user_h.shape)} and {tuple(item_h.shape)}")
    if labels.shape != (user_h.shape[0],):
        raise ValueError(f"labels must have shape [{user_h.shape[0]}], got {tuple(labels.shape)}")
    if not user_h.device == item_h.device == labels.device:
        raise ValueError(f"user_h, item_h and labels must share a device, got {user_h.device}, "
                         f"{item_h.device} and {labels.device}")
    _check_ranges([_id_range("labels", labels, 0, item_h.shape[0])])
    u, x = user_h.float(), item_h.float()
    if similarity == "cosine":
        u, x = F.normalize(u, dim=-1, eps=EPS), F.normalize(x, dim=-1, eps=EPS)
    logits = u @ x.T / temperature  # [N, B]
    return torch.log_softmax(logits, dim=1).gather(1, labels.long()[:, None])[:, 0]
