"""append_kv / prefill_attention / decode_attention against float64 (DESIGN §4.4).

Every case crosses page boundaries (block sizes 4, 5 and 16 against contexts up to 50) and
the interpreter's 16-key tiles; page ids are shuffled and the block tables padded with -1."""
import sys
import types

import pytest
import torch

from r2ec_fast.ops import paged_attention as mod
from r2ec_fast.ops.paged_attention import (
    append_kv,
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)
from r2ec_fast.testing import (TOLERANCE, assert_close_verbose, assert_three_way,
                               poisoned_empty, rel_error)

F32, BF16 = torch.float32, torch.bfloat16


def make_case(q_lens, ctx_lens, h_q, h_kv, d, block_size, dtype=F32, seed=0, packed=False,
              shared_pages=0):
    """Random paged caches (the new tokens' slots with stale values, unwritten slots NaN) and
    the new tokens of sequences with cache lengths ctx_lens whose last q_lens positions are
    new. packed: query/key/value are column slices of one [T, H_q + 2 H_kv, D] tensor (not
    contiguous). shared_pages: every sequence's first pages are sequence 0's (a group's
    shared prompt)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    n_pages = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(n_pages) + 3  # spare pages that nobody reads
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((batch, max(n_pages) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(n_pages):
        table[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    if shared_pages:
        table[1:, :shared_pages] = table[0, :shared_pages]
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=g)
    # slots that no sequence has written hold NaN, as fresh memory may: never to be read,
    # nor multiplied by a zero weight
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, ctx in enumerate(ctx_lens):
        for pos in range(ctx):
            written[table[b, pos // block_size], pos % block_size] = True
    k_cache[~written], v_cache[~written] = float("nan"), float("nan")
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    n_tokens = sum(q_lens)
    if packed:
        qkv = torch.randn(n_tokens, h_q + 2 * h_kv, d, generator=g).to(dtype)
        query, key, value = qkv[:, :h_q], qkv[:, h_q:h_q + h_kv], qkv[:, h_q + h_kv:]
    else:
        query = torch.randn(n_tokens, h_q, d, generator=g).to(dtype)
        key = torch.randn(n_tokens, h_kv, d, generator=g).to(dtype)
        value = torch.randn(n_tokens, h_kv, d, generator=g).to(dtype)
    slots = []
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        for pos in range(ctx - q_len, ctx):
            slots.append(int(table[b, pos // block_size]) * block_size + pos % block_size)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(query=query, key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                block_table=table, cu_seqlens_q=cu,
                cache_seqlens=torch.tensor(ctx_lens, dtype=torch.int32),
                slot_mapping=torch.tensor(slots, dtype=torch.int64))


def _cast(case, dtype):
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
            for k, v in case.items()}


def run_prefill(fn, case, **kw):
    """fn on fresh copies of the caches: (out, k_cache, v_cache)."""
    c = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    out = fn(**c, **kw)
    return out, c["k_cache"], c["v_cache"]


def as_decode(case):
    """The same case as a decode step (one new token per sequence)."""
    return {k: v for k, v in case.items() if k != "cu_seqlens_q"}


def run_decode(fn, case, **kw):
    c = dict(as_decode(case), k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    return fn(**c, **kw), c["k_cache"], c["v_cache"]


# (q_lens, ctx_lens, H_q, H_kv, D, block_size, options): together every feature, each case
# small enough for the interpreter
PREFILL_CASES = {
    "mha-bs5": ([1, 7, 37], [1, 7, 37], 2, 2, 16, 5, {}),
    "gqa2-chunked-softcap": ([7, 37, 1], [20, 50, 9], 4, 2, 32, 4,
                             dict(softcap=5.0, scale=0.37)),
    "gqa4-window": ([37, 7], [37, 41], 4, 1, 16, 16, dict(sliding_window=11)),
    "gqa2-window-softcap-packed": ([1, 7, 37], [3, 30, 44], 4, 2, 64, 5,
                                   dict(sliding_window=6, softcap=2.0, packed=True)),
}


def _prefill_case(name, dtype, seed=0):
    q_lens, ctx_lens, h_q, h_kv, d, bs, opts = PREFILL_CASES[name]
    opts = dict(opts)
    case = make_case(q_lens, ctx_lens, h_q, h_kv, d, bs, dtype, seed=seed,
                     packed=opts.pop("packed", False))
    opts.setdefault("scale", d ** -0.5)
    return case, opts


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_matches_float64(backend, dtype, name):
    case, opts = _prefill_case(name, dtype, seed=len(name))
    ours, k_ours, v_ours = run_prefill(prefill_attention, case, backend=backend, **opts)
    ref, _, _ = run_prefill(prefill_attention_reference, _cast(case, torch.float64), **opts)
    plain, k_plain, v_plain = run_prefill(prefill_attention_reference, case, upcast=False,
                                          **opts)
    assert ours.dtype == dtype and ours.shape == case["query"].shape
    assert_three_way(ours, ref, plain, f"{backend} prefill", tol=TOLERANCE[dtype])
    # the cache after the call: the new rows at their slots, every other slot untouched
    assert_close_verbose(k_ours, k_plain, name="k_cache")
    assert_close_verbose(v_ours, v_plain, name="v_cache")


DECODE_CASES = {
    "mha-bs5": ([1, 7, 37, 16], 2, 2, 16, 5, {}),
    "gqa2-softcap-scale": ([50, 1, 33], 4, 2, 32, 4, dict(softcap=5.0, scale=0.29)),
    "gqa4-window-packed": ([37, 9, 48], 8, 2, 16, 16, dict(sliding_window=20, packed=True)),
    "gqa2-window-softcap": ([5, 44], 4, 2, 64, 5, dict(sliding_window=7, softcap=3.0)),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_float64(backend, dtype, name):
    ctx_lens, h_q, h_kv, d, bs, opts = DECODE_CASES[name]
    opts = dict(opts)
    case = make_case([1] * len(ctx_lens), ctx_lens, h_q, h_kv, d, bs, dtype, seed=len(name),
                     packed=opts.pop("packed", False))
    opts.setdefault("scale", d ** -0.5)
    ours, k_ours, v_ours = run_decode(decode_attention, case, backend=backend, **opts)
    ref, _, _ = run_decode(decode_attention_reference, _cast(case, torch.float64), **opts)
    plain, k_plain, v_plain = run_decode(decode_attention_reference, case, upcast=False,
                                         **opts)
    assert ours.dtype == dtype and ours.shape == case["query"].shape
    assert_three_way(ours, ref, plain, f"{backend} decode", tol=TOLERANCE[dtype])
    assert_close_verbose(k_ours, k_plain, name="k_cache")
    assert_close_verbose(v_ours, v_plain, name="v_cache")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_equals_last_row_of_prefill(backend):
    """Prefill whole sequences; decode their last token again with the rest already cached
    (key/value None: nothing new to write)."""
    case = make_case([9, 37], [9, 37], 4, 2, 16, 5, seed=3)
    full, k_cache, v_cache = run_prefill(prefill_attention, case, scale=0.3, softcap=4.0,
                                         sliding_window=8, backend=backend)
    last = case["cu_seqlens_q"][1:].long() - 1
    out = decode_attention(case["query"][last], None, None, k_cache, v_cache,
                           case["block_table"], case["cache_seqlens"], None, 0.3, 4.0, 8,
                           backend=backend)
    assert rel_error(out, full[last]) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_prompt_pages(backend):
    """Three samples of one group share the prompt's first pages and write their own tokens:
    each decodes over the shared prefix plus its own pages."""
    case = make_case([1, 1, 1], [23, 23, 23], 4, 2, 16, 4, seed=4, shared_pages=5)
    ours, _, _ = run_decode(decode_attention, case, scale=0.25, backend=backend)
    ref, _, _ = run_decode(decode_attention_reference, _cast(case, torch.float64), scale=0.25)
    assert rel_error(ours, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_append_kv_writes_exactly_and_skips_negative_slots(backend):
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(6, 5, 2, 16, generator=g).to(BF16)
    v_cache = torch.randn(6, 5, 2, 16, generator=g).to(BF16)
    key = torch.randn(16, 4, 7, generator=g).permute(2, 1, 0)[:, :2]  # [7, 2, 16] strided fp32
    value = torch.randn(7, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 29, 0, 14, -5, 27], dtype=torch.int32)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // 5, s % 5] = key[t].to(BF16)
            expect_v[s // 5, s % 5] = value[t].to(BF16)
    append_kv(key, value, k_cache, v_cache, slots, backend=backend)
    assert_close_verbose(k_cache, expect_k, name="k_cache")
    assert_close_verbose(v_cache, expect_v, name="v_cache")


@pytest.mark.parametrize("name", ["gqa2-window-softcap-packed", "gqa2-chunked-softcap"])
def test_torch_batching_does_not_change_results(monkeypatch, name):
    """Whole sequences in one batch, against: chunks of at most 5 query rows (each over the
    keys it sees) batched by key span (several batches), and a small score budget that cuts
    the 37-token prefill into chunks of 8 queries and those into several batches."""
    case, opts = _prefill_case(name, F32, seed=6)
    ref, _, _ = run_prefill(prefill_attention_reference, _cast(case, torch.float64), **opts)
    monkeypatch.setattr(mod, "PREFILL_ROWS", 1 << 30)
    monkeypatch.setattr(mod, "SPAN_GROWTH", float("inf"))
    whole, _, _ = run_prefill(prefill_attention, case, backend="torch", **opts)
    batches = []
    monkeypatch.setattr(mod, "_batches", lambda *a, f=mod._batches: (
        b for b in f(*a) if not batches.append(len(b[0]))))
    for setting in (dict(PREFILL_ROWS=5, SPAN_GROWTH=1.3),
                    dict(PREFILL_ROWS=1 << 30, SPAN_GROWTH=float("inf"), SCORE_ELEMS=1500)):
        for key, value in setting.items():
            monkeypatch.setattr(mod, key, value)
        batches.clear()
        cut, _, _ = run_prefill(prefill_attention, case, backend="torch", **opts)
        assert len(batches) >= 3, (setting, batches)
        assert rel_error(cut, whole) < 1e-6
        assert_three_way(cut, ref, whole, f"torch prefill {setting}", tol=TOLERANCE[F32])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must fully write starts as NaN (integers: their minimum)."""
    from r2ec_fast.kernels import paged_attention as kern

    monkeypatch.setattr(kern, "_empty", poisoned_empty)
    return kern


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_decode_splits(poisoned, num_splits):
    """One split (the decode kernel writes the output), and several merged, some of them
    empty for the short sequence."""
    case = make_case([1, 1, 1], [45, 3, 30], 4, 2, 16, 4, seed=7)
    c = dict(as_decode(case), key=None, value=None, slot_mapping=None)  # launcher: no writes
    ref = decode_attention_reference(**_cast(c, torch.float64), scale=0.3, softcap=10.0)
    out = poisoned.paged_decode(c["query"], c["k_cache"], c["v_cache"], c["block_table"],
                                c["cache_seqlens"], 0.3, 10.0, None,
                                config=dict(num_splits=num_splits))
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_padding_rows_give_zeros(poisoned, num_splits):
    """A batch padded with cache_seqlens 0 rows (as a CUDA-graph batch would be; the op
    itself rejects them on CPU): those rows are 0, the others unaffected."""
    case = make_case([1, 1], [13, 30], 2, 1, 16, 4, seed=17)
    lens = torch.tensor([13, 0], dtype=torch.int32)
    out = poisoned.paged_decode(case["query"], case["k_cache"], case["v_cache"],
                                case["block_table"], lens, 0.3, None, None,
                                config=dict(num_splits=num_splits))
    c = dict(as_decode(case), key=None, value=None, slot_mapping=None)
    ref = decode_attention_reference(**_cast(c, torch.float64), scale=0.3)
    assert rel_error(out[0], ref[0]) < 1e-5 and torch.equal(out[1], torch.zeros_like(out[1]))


def test_triton_prefill_small_tiles(poisoned):
    """Tiles of 32 rows = 8 tokens x 4 heads and 32 keys (the interpreter's default is 16 x
    16); the cache already holds the new tokens."""
    case, opts = _prefill_case("gqa4-window", F32, seed=8)
    ref, k64, v64 = run_prefill(prefill_attention_reference, _cast(case, torch.float64),
                                **opts)
    out = poisoned.paged_prefill(case["query"], k64.float(), v64.float(), case["block_table"],
                                 case["cu_seqlens_q"], case["cache_seqlens"], opts["scale"],
                                 None, opts["sliding_window"], config=dict(block_m=32, block_n=32))
    assert rel_error(out, ref) < 1e-5


def test_torch_prefill_handles_empty_sequences():
    """A sequence with no new tokens in the batch (q_len 0) is skipped."""
    case = make_case([3, 0, 5], [3, 4, 9], 2, 1, 16, 4, seed=9)
    ours, _, _ = run_prefill(prefill_attention, case, scale=0.25, backend="torch")
    ref, _, _ = run_prefill(prefill_attention_reference, _cast(case, torch.float64),
                            scale=0.25)
    assert rel_error(ours, ref) < 1e-5


def test_backend_selection(monkeypatch):
    case = make_case([1, 1], [5, 9], 2, 1, 16, 4, seed=10)
    calls = []
    real = mod._torch_decode
    monkeypatch.setattr(mod, "_torch_decode", lambda *a: calls.append(1) or real(*a))
    run_decode(decode_attention, case, scale=0.25)
    assert calls  # CPU tensors: the torch path
    monkeypatch.setenv("R2EC_BACKEND", "reference")
    calls.clear()
    run_decode(decode_attention, case, scale=0.25)
    assert not calls
    monkeypatch.setenv("R2EC_BACKEND", "flash_attn")
    with pytest.raises(ValueError, match="flash_attn"):
        run_decode(decode_attention, case, scale=0.25)
    monkeypatch.delenv("R2EC_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        run_decode(decode_attention, case, scale=0.25, backend="cuda")


def test_validation_errors():
    case = make_case([2, 3], [4, 6], 4, 2, 16, 4, seed=11)

    def bad(match, scale=0.25, **changes):
        with pytest.raises(ValueError, match=match):
            run_prefill(prefill_attention, dict(case, **changes), scale=scale)

    bad("query", query=case["query"][..., None])
    bad("D=", query=torch.randn(5, 4, 8))
    bad("multiple of H_kv", query=torch.randn(5, 3, 16))
    bad("key", key=case["key"][:, :1])
    bad("both", value=None)
    bad("slot_mapping", slot_mapping=case["slot_mapping"][:4])
    bad("slot_mapping", slot_mapping=case["slot_mapping"].float())
    bad("slot_mapping", slot_mapping=torch.full((5,), 10_000))
    bad("cu_seqlens_q", cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32))
    bad("cu_seqlens_q", cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32))
    bad(">= each", cache_seqlens=torch.tensor([1, 6], dtype=torch.int32))
    bad("capacity", cache_seqlens=torch.tensor([4, 60], dtype=torch.int32))
    bad("block_table", block_table=case["block_table"][:1])
    bad("block_table", block_table=case["block_table"].float())
    bad("v_cache", v_cache=case["v_cache"].to(BF16))
    bad("k_cache", k_cache=case["k_cache"][0])
    bad("is on", query=case["query"].to("meta"))
    bad("scale", scale=True)
    with pytest.raises(ValueError, match="softcap"):
        run_prefill(prefill_attention, case, scale=0.25, softcap=0.0)
    with pytest.raises(ValueError, match="sliding_window"):
        run_prefill(prefill_attention, case, scale=0.25, sliding_window=0)
    dec = make_case([1, 1], [4, 6], 4, 2, 16, 4, seed=12)
    with pytest.raises(ValueError, match="rows"):
        run_decode(decode_attention, dict(dec, query=dec["query"][:1]), scale=0.25)
    with pytest.raises(ValueError, match=">= 1"):
        run_decode(decode_attention, dict(dec, cache_seqlens=torch.tensor([0, 6]).int(),
                                          key=None, value=None), scale=0.25)
    table = dec["block_table"].clone()
    table[0, 0] = 99
    with pytest.raises(ValueError, match="page ids"):
        run_decode(decode_attention, dict(dec, block_table=table), scale=0.25,
                   backend="torch")


def _install_fake_flash_attn(monkeypatch):
    """A stand-in `flash_attn` with the documented semantics of its two entry points
    (causal aligned to the bottom right; keys within [i + sk - sq - left, i + sk - sq +
    right]; paged K/V through block_table; cache_seqlens = cached length without k/v), so
    the glue's arguments are checked without a GPU."""

    def attend(q, k, v, scale, causal, window, softcap):  # q [sq, H, D], k/v [sk, H_kv, D]
        sq, sk, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
        s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None, :]
        keep = j <= i if causal else torch.ones(sq, sk, dtype=torch.bool)
        if window[0] >= 0:
            keep &= j >= i - window[0]
        return torch.einsum("hqk,khd->qhd", torch.softmax(s.masked_fill(~keep, -torch.inf), -1),
                            v).to(q.dtype)

    def paged(cache, table_row, length):
        return cache[table_row.long()].flatten(0, 1)[:length]

    def varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_size, softcap, block_table):
        out = torch.empty_like(q)
        for b in range(block_table.shape[0]):
            lk = int(cu_k[b + 1] - cu_k[b])
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            out[rows] = attend(q[rows], paged(k, block_table[b], lk),
                               paged(v, block_table[b], lk), softmax_scale, causal,
                               window_size, softcap)
        return out

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal,
                     window_size, softcap):
        return torch.stack([attend(q[b], paged(k_cache, block_table[b], int(n)),
                                   paged(v_cache, block_table[b], int(n)), softmax_scale,
                                   causal, window_size, softcap)
                            for b, n in enumerate(cache_seqlens)])

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func, fake.flash_attn_with_kvcache = varlen, with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", fake)


def test_flash_attn_glue_against_its_documented_semantics(monkeypatch):
    _install_fake_flash_attn(monkeypatch)
    opts = dict(scale=0.3, softcap=3.0, sliding_window=6)
    case = make_case([7, 1, 20], [9, 4, 25], 4, 2, 16, 4, seed=13)
    ref, k_cache, v_cache = run_prefill(prefill_attention_reference,
                                        _cast(case, torch.float64), **opts)
    args = (case["query"].double(), k_cache, v_cache, case["block_table"],
            case["cu_seqlens_q"], case["cache_seqlens"])
    assert rel_error(mod._flash_prefill(*args, *opts.values()), ref) < 1e-10
    last = case["cu_seqlens_q"][1:].long() - 1
    out = mod._flash_decode(case["query"][last].double(), k_cache, v_cache,
                            case["block_table"], case["cache_seqlens"], *opts.values())
    assert rel_error(out, ref[last]) < 1e-10


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("softcap,window", [(None, None), (10.0, 20)], ids=["plain", "window"])
def test_torch_static_decode_matches_float64(dtype, softcap, window):
    """The host-read-free torch decode that torch.compile traces: whole block-table rows
    (pages past a row's length, -1 pads and NaN slots masked), against float64."""
    case = make_case([1] * 4, [45, 3, 30, 17], 4, 2, 16, 4, dtype, seed=21)
    c = dict(as_decode(case), key=None, value=None, slot_mapping=None)
    opts = dict(scale=0.3, softcap=softcap, sliding_window=window)
    ref = decode_attention_reference(**_cast(c, torch.float64), **opts)
    plain = decode_attention(**c, **opts, backend="torch")
    out = mod._torch_decode_static(c["query"], c["k_cache"], c["v_cache"], c["block_table"],
                                   c["cache_seqlens"], 0.3, softcap, window).to(dtype)
    assert_three_way(out, ref, plain, "static torch decode", tol=TOLERANCE[dtype])


def cascade_case(dtype=F32, seed=20, h_q=4, h_kv=2, d=16, block_size=4):
    """Five decode rows whose first 8 pages are row 0's: prefix 0 = rows 0, 1, 2 over 32 keys,
    prefix 1 = row 3 alone over 16 keys, row 4 in no prefix (prefix_lens 0)."""
    case = make_case([1] * 5, [45, 47, 33, 30, 12], h_q, h_kv, d, block_size, dtype, seed=seed,
                     shared_pages=8)
    c = dict(as_decode(case), key=None, value=None, slot_mapping=None)
    members = torch.tensor([[0, 1, 2], [3, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([32, 32, 32, 16, 0], dtype=torch.int32)
    return c, members, lens


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("splits", [(1, 1), (2, 3)], ids=["1+1", "2+3"])
@pytest.mark.parametrize("softcap,window", [(None, None), (10.0, 20)], ids=["plain", "window"])
def test_triton_cascade_decode_matches_float64(poisoned, dtype, splits, softcap, window):
    """Shared prefixes read once per prefix, the rest per row, merged: the same attention (the
    window of 20 leaves part of the shared 32 keys out of some rows' view)."""
    c, members, lens = cascade_case(dtype)
    opts = dict(scale=0.3, softcap=softcap, sliding_window=window)
    ref = decode_attention_reference(**_cast(c, torch.float64), **opts)
    plain = decode_attention(**c, **opts, backend="torch")
    out = poisoned.paged_decode(c["query"], c["k_cache"], c["v_cache"], c["block_table"],
                                c["cache_seqlens"], 0.3, softcap, window, prefix=(members, lens),
                                config=dict(num_splits=splits[0], prefix_splits=splits[1]))
    assert_three_way(out, ref, plain, "cascade decode", tol=TOLERANCE[dtype])
    hinted = decode_attention(**c, **opts, backend="triton", prefix_members=members,
                              prefix_lens=lens)
    assert_three_way(hinted, ref, plain, "cascade decode op", tol=TOLERANCE[dtype])
    ignored = decode_attention(**c, **opts, backend="torch", prefix_members=members,
                               prefix_lens=lens)
    assert torch.equal(ignored, plain)  # a hint the torch path does not need


def test_cascade_hint_is_checked():
    c, members, lens = cascade_case()
    with pytest.raises(ValueError, match="go together"):
        decode_attention(**c, scale=0.3, prefix_members=members)
    bad = [(torch.tensor([[0, 4]], dtype=torch.int32), torch.tensor([32, 0, 0, 0, 32]),
            "share"),  # row 4 holds other pages
           (members, torch.tensor([32, 32, 32, 16, 8], dtype=torch.int32), "exactly one"),
           (members, torch.tensor([30, 30, 30, 16, 0], dtype=torch.int32), "multiple"),
           (members, lens[:3], "int32"),
           (torch.tensor([[-1, 0, 1, 2], [3, -1, -1, -1]]), lens, "pads must come after")]
    for m, n, match in bad:
        with pytest.raises(ValueError, match=match):
            decode_attention(**c, scale=0.3, prefix_members=m, prefix_lens=n.to(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("softcap,window", [(50.0, None), (50.0, 512)])
def test_triton_matches_torch_gemma2_shape_on_gpu(softcap, window):
    """Gemma-2-2B attention: H_q 8, H_kv 4, D 256, bf16, scale 256^-0.5, contexts ~1000 in
    16-token pages; decode and a chunked prefill."""
    ctx = [1000, 1017, 993, 1024, 871, 1100, 960, 1003]
    q_lens = [1000, 17, 1, 64, 871, 3, 100, 250]
    case = make_case(q_lens, ctx, 8, 4, 256, 16, BF16, seed=14)
    case = {k: v.cuda() for k, v in case.items()}
    opts = dict(scale=256 ** -0.5, softcap=softcap, sliding_window=window)
    ref, _, _ = run_prefill(prefill_attention_reference, _cast(case, torch.float64), **opts)
    plain, _, _ = run_prefill(prefill_attention, case, backend="torch", **opts)
    ours, _, _ = run_prefill(prefill_attention, case, backend="triton", **opts)
    assert_three_way(ours, ref, plain, "triton prefill", tol=TOLERANCE[BF16])
    dec = make_case([1] * 8, ctx, 8, 4, 256, 16, BF16, seed=15)
    dec = {k: v.cuda() for k, v in dec.items()}
    ref, _, _ = run_decode(decode_attention_reference, _cast(dec, torch.float64), **opts)
    plain, _, _ = run_decode(decode_attention, dec, backend="torch", **opts)
    ours, _, _ = run_decode(decode_attention, dec, backend="triton", **opts)
    assert_three_way(ours, ref, plain, "triton decode", tol=TOLERANCE[BF16])
    # cascade: 4 groups of 2 rows sharing their first 48 pages (768 keys)
    dec = make_case([1] * 8, ctx, 8, 4, 256, 16, BF16, seed=16)
    for b in range(1, 8, 2):
        dec["block_table"][b, :48] = dec["block_table"][b - 1, :48]  # all written (ctx > 768)
    members = torch.arange(8, dtype=torch.int32).view(4, 2).cuda()
    lens = torch.full((8,), 768, dtype=torch.int32).cuda()
    dec = {k: v.cuda() for k, v in dec.items()}
    ref, _, _ = run_decode(decode_attention_reference, _cast(dec, torch.float64), **opts)
    plain, _, _ = run_decode(decode_attention, dec, backend="torch", **opts)
    ours, _, _ = run_decode(decode_attention, dec, backend="triton", prefix_members=members,
                            prefix_lens=lens, **opts)
    assert_three_way(ours, ref, plain, "triton cascade decode", tol=TOLERANCE[BF16])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_torch_decode_writes_the_cache_inline(backend):
    """Under torch.compile the torch decode writes the new K/V itself (index_copy_, traced):
    the same caches as eager, the same attention within fp32 rounding; a slot < 0, which eager
    skips, raises there (no host read to filter it)."""
    case = make_case([1, 1, 1], [9, 4, 17], 4, 2, 16, 4, seed=17)
    opts = dict(scale=0.3, softcap=4.0, sliding_window=6)
    eager, k_eager, v_eager = run_decode(decode_attention, case, **opts)
    fn = torch.compile(decode_attention, backend=backend, fullgraph=True)
    out, k_out, v_out = run_decode(fn, case, **opts)
    assert_close_verbose(k_out, k_eager, name="k_cache")  # exact (NaN slots stay NaN)
    assert_close_verbose(v_out, v_eager, name="v_cache")
    ref, _, _ = run_decode(decode_attention_reference, _cast(case, torch.float64), **opts)
    assert_three_way(out, ref, eager, "compiled decode", tol=TOLERANCE[F32])
    skipped = dict(case, slot_mapping=case["slot_mapping"].clone())
    skipped["slot_mapping"][1] = -1
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|slot < 0"):
        run_decode(fn, skipped, **opts)


def test_ops_trace_under_torch_compile():
    """fullgraph: validation traces; the prefill is one custom op that mutates the caches (its
    result equals eager's bit for bit), the torch decode is traced inline (the host-read-free
    variant, a different order of fp32 sums: checked against float64) and so is its cache
    write (index_copy_); the caches equal eager's."""
    case = make_case([1, 1, 1], [9, 4, 17], 4, 2, 16, 4, seed=16)
    dec_opts = dict(scale=0.3, softcap=4.0, sliding_window=6)

    def step(c):
        append_kv(c["key"], c["value"], c["k_cache"], c["v_cache"], c["slot_mapping"])
        return decode_attention(c["query"], None, None, c["k_cache"], c["v_cache"],
                                c["block_table"], c["cache_seqlens"], None, **dec_opts)

    def prefill(c):
        return prefill_attention(**c, scale=0.3, sliding_window=5)

    for fn, c in ((step, as_decode(case)), (prefill, case)):
        eager_c = dict(c, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone())
        compiled_c = dict(c, k_cache=c["k_cache"].clone(), v_cache=c["v_cache"].clone())
        eager = fn(eager_c)
        compiled = torch.compile(fn, backend="eager", fullgraph=True)(compiled_c)
        if fn is prefill:
            assert torch.equal(compiled, eager)
        else:
            ref = decode_attention_reference(
                **_cast(dict(eager_c, key=None, value=None, slot_mapping=None),
                        torch.float64), **dec_opts)
            assert_three_way(compiled, ref, eager, "compiled decode", tol=TOLERANCE[F32])
        assert_close_verbose(compiled_c["k_cache"], eager_c["k_cache"], name="k_cache")
        assert_close_verbose(compiled_c["v_cache"], eager_c["v_cache"], name="v_cache")
