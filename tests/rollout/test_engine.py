"""RolloutEngine against HF generate, a fresh full forward and the trainer's log-probs; block
accounting, preemption and seeding (issue 6, STYLE.md engine tests)."""
import pytest
import torch

from r2ec_fast.ops import linear_log_probs
from r2ec_fast.rollout.block_manager import BlockManager
from r2ec_fast.rollout.engine import RolloutEngine, SamplingParams, parse_budget
from r2ec_fast.rollout.sampler import Sampler
from r2ec_fast.rollout.scheduler import Scheduler
from r2ec_fast.rollout.sequence import Group, Sequence, sample_generator

ARCHS = ("gemma2", "qwen2")
LENGTHS = [45, 7, 33, 64]  # around and across the block size 8 and the sliding window 32


def make_prompts(model, lengths, seed=0) -> list[list[int]]:
    """Random prompts of the given lengths (ids above the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm_head_weight.shape[0]
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, new_tokens):
    from transformers import GenerationConfig

    ids = torch.tensor([prompt], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0, bos_token_id=None)
    out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate(models, arch):
    model = models[arch]
    prompts = make_prompts(model, LENGTHS)
    engine = RolloutEngine(model, block_size=8)
    outs = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=24))
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 24), f"prompt {i}"
        assert out.samples[0].finish_reason == "length"
    assert model.config._attn_implementation != "r2ec_paged"  # restored after the call


@pytest.fixture
def recorded_draws(monkeypatch):
    """Every (sequence tokens so far, logits row) the sampler sees."""
    draws = []
    original = Sampler.__call__

    def spy(self, batch, logits):
        seqs, index = self.draw_index(batch)
        for seq, row in zip(seqs, index):
            draws.append((seq.prompt + seq.output, logits[row].clone()))
        return original(self, batch, logits)

    monkeypatch.setattr(Sampler, "__call__", spy)
    return draws


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_logits_equal_a_fresh_forward(models, arch, recorded_draws):
    model = models[arch]
    prompts = make_prompts(model, [40, 9], seed=1)
    RolloutEngine(model, block_size=8).generate(
        prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5))
    assert len(recorded_draws) == 2 * 3 * 12
    worst = 0.0
    for tokens, logits in recorded_draws:
        with torch.no_grad():
            full = model.lm(input_ids=torch.tensor([tokens])).logits[0, -1].float()
        worst = max(worst, ((logits - full).norm() / full.norm()).item())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_equal_the_trainers_linear_log_probs(models, arch):
    model = models[arch]
    prompts = make_prompts(model, [37, 12], seed=2)
    temperature = 0.7
    outs = RolloutEngine(model, block_size=8).generate(
        prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3))
    for prompt, out in zip(prompts, outs):
        for s in out.samples:
            tokens = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                hidden = model.decoder()(input_ids=tokens, use_cache=False).last_hidden_state[0]
            p = len(prompt)
            want = linear_log_probs(hidden[p - 1:-1], model.lm_head_weight,
                                    torch.tensor(s.token_ids), softcap=model.softcap,
                                    temperature=temperature)
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                       want.double(), rtol=0, atol=2e-5)


def test_group_holds_its_prompt_blocks_once():
    bs, p, g = 8, 37, 4  # 4 full prompt blocks and a partial one
    blocks = BlockManager(64, bs)
    scheduler = Scheduler(blocks, max_num_seqs=64, max_prefill_tokens=1024)
    group = Group(0, list(range(100, 100 + p)))
    group.samples = [Sequence(j, group, j, sample_generator(0, j)) for j in range(g)]
    scheduler.add(group)
    batch = scheduler.schedule()
    assert batch.prefill and len(batch.rows) == 1 and batch.rows[0].draw_for == group.samples
    assert blocks.num_used == 5  # the prompt, once
    tables = blocks.fork(group.block_table, g)
    for seq, table in zip(group.samples, tables):
        seq.block_table = table
        seq.output.append(7)
    assert blocks.num_used == 5 and all(blocks.ref_count[b] == g for b in tables[0])
    decode = scheduler.schedule()  # every sample writes position 37 in the partial block
    assert not decode.prefill and len(decode.rows) == g
    assert len(decode.copies) == g - 1  # copy on write; the last holder writes in place
    held = {b for s in group.samples for b in s.block_table}
    assert len(held) == 4 + g  # the full blocks still once
    assert all(blocks.ref_count[b] == g for b in group.samples[0].block_table[:4])
    assert len({r.slots[0] for r in decode.rows}) == g


def test_engine_reports_prompt_kv_at_one_over_g(models):
    model = models["qwen2"]
    prompts = make_prompts(model, [32, 32, 32], seed=4)
    engine = RolloutEngine(model, block_size=8)
    engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=5))
    s = engine.stats
    assert (s.prompt_blocks, s.prompt_blocks_per_copy) == (3 * 4, 3 * 4 * 4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_preemption_gives_the_same_outputs(models, temperature):
    model = models["gemma2"]
    prompts = make_prompts(model, [30, 21, 44, 17, 26], seed=5)
    params = SamplingParams(n=3, temperature=temperature, top_k=50, max_new_tokens=20, seed=9)
    roomy = RolloutEngine(model, block_size=4)
    ref = roomy.generate(prompts, params)
    assert roomy.stats.preemptions == 0
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # k+v, 2 layers, 4 slots, 2 kv heads of 16, fp32
    tight = RolloutEngine(model, block_size=4, kv_budget=70 * per_block)
    got = tight.generate(prompts, params)
    assert tight.stats.num_blocks == 70 and tight.stats.preemptions > 0
    counted = RolloutEngine(model, block_size=4, kv_budget="70 blocks")
    assert [[s.token_ids for s in o.samples] for o in counted.generate(prompts, params)] == \
        [[s.token_ids for s in o.samples] for o in got]
    assert counted.stats.num_blocks == 70
    for r, o in zip(ref, got):
        for a, b in zip(r.samples, o.samples):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                       rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_batching(models):
    model = models["qwen2"]
    prompts = make_prompts(model, [20, 31, 9], seed=6)
    params = SamplingParams(n=4, temperature=1.3, top_p=0.9, repetition_penalty=1.2,
                            max_new_tokens=16)
    engine = RolloutEngine(model, block_size=8)
    a = engine.generate(prompts, params, seeds=[11, 12, 13])
    b = engine.generate(prompts, params, seeds=[11, 12, 13])
    alone = engine.generate(prompts[1:2], params, seeds=[12])
    other = engine.generate(prompts, params, seeds=[21, 22, 23])
    ids = lambda outs: [[s.token_ids for s in o.samples] for o in outs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(alone)[0] == ids(a)[1]
    assert ids(other) != ids(a)
    assert len({tuple(t) for t in ids(a)[0]}) > 1  # the G samples differ


def test_stop_tokens_end_a_sample_and_are_kept(models):
    model = models["qwen2"]
    prompt = make_prompts(model, [25], seed=7)
    free = RolloutEngine(model).generate(prompt, SamplingParams(n=1, temperature=0,
                                                                max_new_tokens=12))
    tokens = free[0].samples[0].token_ids
    stop = tokens[5]
    cut = tokens.index(stop)
    out = RolloutEngine(model).generate(prompt, SamplingParams(
        n=1, temperature=0, max_new_tokens=12, stop_token_ids=[stop]))[0].samples[0]
    assert out.token_ids == tokens[:cut + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)


def test_triton_attention_backend_gives_the_same_greedy_tokens(models):
    model = models["gemma2"]
    prompts = make_prompts(model, [36, 10], seed=8)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=6)
    want = RolloutEngine(model, block_size=8, attn_backend="torch").generate(prompts, params)
    got = RolloutEngine(model, block_size=8, attn_backend="triton").generate(prompts, params)
    assert [[s.token_ids for s in o.samples] for o in got] == \
        [[s.token_ids for s in o.samples] for o in want]


def test_bad_input_is_refused_clearly(models):
    model = models["qwen2"]
    engine = RolloutEngine(model, block_size=8, kv_budget="1KiB")
    params = SamplingParams(n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="KV budget holds 0 blocks"):
        engine.generate([[11, 12, 13]], params)
    engine = RolloutEngine(model)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[11], []], params)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[11, 10**6]], params)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        engine.generate([[11], [12]], params, seeds=[1])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="block_size"):
        RolloutEngine(model, block_size=0)
    with pytest.raises(ValueError, match="kv_budget"):
        RolloutEngine(model, kv_budget="lots")
    assert parse_budget("1.5KiB") == (1536, "bytes") and parse_budget(100) == (100, "bytes")
    assert parse_budget("512 blocks") == (512, "blocks")
    with pytest.raises(ValueError, match="kv_budget"):
        RolloutEngine(model, kv_budget="1.5 blocks")


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_rollout_greedy_equals_the_hf_rollout(models, arch):
    from r2ec_fast.data.prompts import PromptConfig
    from r2ec_fast.rollout.engine import EngineRollout
    from r2ec_fast.rollout.hf import HFRollout

    model = models[arch]
    answer_id = model.tokenizer.convert_tokens_to_ids(PromptConfig().answer_start)
    prompts = make_prompts(model, [30, 12], seed=9)
    ours = EngineRollout(model, answer_id, max_new_tokens=9, block_size=8).greedy(prompts)
    theirs = HFRollout(model, answer_id, max_new_tokens=9).greedy(prompts)
    assert ours == theirs
    samples = EngineRollout(model, answer_id, max_new_tokens=9).sample(prompts, [1, 2], 3)
    assert len(samples) == 6 and all(t.completion[-1] == answer_id for t in samples)
    assert [t.prompt for t in samples] == [prompts[0]] * 3 + [prompts[1]] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_on_cuda_greedy_equals_hf_generate(models, arch):
    """Triton attention kernels and the CUDA sampler inside the engine, fp32 on the GPU."""
    import copy

    model = copy.deepcopy(models[arch])
    model.lm.to("cuda")
    prompts = make_prompts(model, LENGTHS, seed=10)
    engine = RolloutEngine(model, block_size=16)
    outs = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=16))
    assert engine.stats.graph_captures > 0  # the decode steps replayed CUDA graphs
    for prompt, out in zip(prompts, outs):
        want = hf_greedy(model, prompt, 16)
        assert [s.token_ids for s in out.samples] == [want, want]
    params = SamplingParams(n=4, temperature=1.0, top_k=50, max_new_tokens=16, seed=3)
    sampled = RolloutEngine(model, block_size=16).generate(prompts, params)
    again = RolloutEngine(model, block_size=16).generate(prompts, params)
    eager = RolloutEngine(model, block_size=16, decode_graphs=False).generate(prompts, params)
    for o in (again, eager):
        assert [[s.token_ids for s in x.samples] for x in sampled] == \
            [[s.token_ids for s in x.samples] for x in o]


def test_padded_sizes():
    from r2ec_fast.rollout.graph_runner import SIZES, padded_size

    assert [padded_size(n) for n in (1, 2, 3, 5, 17, 64, 65, 256, 257, 300)] == \
        [1, 2, 4, 8, 24, 64, 96, 256, 320, 320]
    assert list(SIZES) == sorted(SIZES)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_path_equals_the_eager_one(models, arch):
    """The CUDA-graph decode path (padded batch, static metadata buffers), run eagerly on CPU:
    the same tokens and log-probs as eager decoding while sequences stop at different steps
    (the padded size shrinks), under a budget that preempts, and with the norms routed through
    `fused_rms_norms` (its torch path here)."""
    model = models[arch]
    prompts = make_prompts(model, [30, 21, 44, 17, 26], seed=5)
    vocab = model.lm_head_weight.shape[0]
    stops = list(range(10, vocab, 40))  # a 40th of the vocabulary ends a sample
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=20, seed=4,
                            stop_token_ids=stops)
    runs = {}
    for graphs, budget, fuse in ((False, None, False), (True, None, False),
                                 (True, "50 blocks", False), (True, None, True)):
        # cascade: the shared-prefix hints, checked against the block tables by the op on CPU
        engine = RolloutEngine(model, block_size=4, kv_budget=budget, decode_graphs=graphs,
                               fuse_norms=fuse, cascade=graphs)
        outs = engine.generate(prompts, params)
        runs[graphs, budget, fuse] = outs
        if budget:
            assert engine.stats.preemptions > 0
        assert engine.stats.graph_captures == 0  # nothing is captured off CUDA
    want = runs[False, None, False]
    lengths = {len(s.token_ids) for o in want for s in o.samples}
    assert len(lengths) >= 4, lengths  # the batch shrank through several padded sizes
    for key, outs in runs.items():
        for o, w in zip(outs, want):
            assert [s.token_ids for s in o.samples] == [s.token_ids for s in w.samples], key
            assert [s.finish_reason for s in o.samples] == [s.finish_reason for s in w.samples]
            for s, t in zip(o.samples, w.samples):
                torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs),
                                           rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="decode_graphs"):
        RolloutEngine(model, decode_graphs="yes")


def test_shared_prefixes_name_each_groups_prompt_pages():
    from r2ec_fast.rollout.scheduler import shared_prefixes

    bs, g = 8, 3
    blocks = BlockManager(64, bs)
    scheduler = Scheduler(blocks, max_num_seqs=64, max_prefill_tokens=1024)
    groups = []
    for i, p in enumerate((37, 5)):  # 4 full prompt blocks and a partial one; none full
        group = Group(i, list(range(100, 100 + p)))
        group.samples = [Sequence(g * i + j, group, j, sample_generator(0, j)) for j in range(g)]
        scheduler.add(group)
        groups.append(group)
    scheduler.schedule()
    for group in groups:
        for seq, table in zip(group.samples, blocks.fork(group.block_table, g)):
            seq.block_table = table
            seq.output.append(7)
        group.block_table = []
    rows = scheduler.schedule().rows
    members, lens = shared_prefixes(rows, bs, 4)
    first = [i for i, r in enumerate(rows) if r.draw_for[0].group is groups[0]]
    assert members == [first + [-1]]  # the 5-token prompt has no full block to share
    assert [lens[i] for i in first] == [32] * g and sum(lens) == 32 * g


def test_cascade_through_the_triton_kernels(models, monkeypatch):
    """The whole decode path as on a GPU (triton attention in the interpreter, padded static
    batches, cascade hints): greedy tokens equal HF generate's."""
    from r2ec_fast.kernels import paged_attention as kern

    hinted = []
    real = kern.paged_decode
    monkeypatch.setattr(kern, "paged_decode", lambda *a, prefix=None, **k: hinted.append(
        prefix is not None and bool((prefix[1] > 0).any())) or real(*a, prefix=prefix, **k))
    model = models["gemma2"]
    prompts = make_prompts(model, [45, 21], seed=8)
    engine = RolloutEngine(model, block_size=8, attn_backend="triton", decode_graphs=True,
                           cascade=True)
    outs = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=6))
    for prompt, out in zip(prompts, outs):
        want = hf_greedy(model, prompt, 6)
        assert [s.token_ids for s in out.samples] == [want, want]
    assert len(hinted) == 5 * 2 and all(hinted)  # 5 decode steps x 2 layers, all cascaded


def test_compiled_decode_equals_eager(models):
    """compile_decode: the padded decode step through torch.compile (inductor, CPU here) gives
    HF's greedy tokens and the eager path's sampled tokens and log-probs (drawn in the compiled
    step); the engine keeps the compiled step for its next call. 3 and 6 rows: padded to 4 and
    8, so padding rows (which write the spare block) run in the compiled step."""
    model = models["gemma2"]
    prompts = make_prompts(model, [45, 21, 30], seed=12)
    engine = RolloutEngine(model, block_size=8, compile_decode=True)
    outs = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=6))
    for prompt, out in zip(prompts, outs):
        assert [s.token_ids for s in out.samples] == [hf_greedy(model, prompt, 6)]
    step = engine._step
    # drawn inside the compiled step (top-k and top-p included)
    params = SamplingParams(n=2, temperature=1.3, top_k=50, top_p=0.9, max_new_tokens=6,
                            seed=2)
    got = engine.generate(prompts, params)
    assert engine._step is step and engine.compile_decode
    assert_same_samples(got, RolloutEngine(model, block_size=8).generate(prompts, params))
    first = got
    # within a call, steps after the first of each size skip Dynamo's guards; the first still
    # checks them all: a model changed between calls recompiles (the final softcap is a
    # constant of the compiled graph)
    config = model.lm.config.get_text_config()
    before = config.final_logit_softcapping
    config.final_logit_softcapping = 0.5
    try:
        got = engine.generate(prompts, params)
        want = RolloutEngine(model, block_size=8).generate(prompts, params)
    finally:
        config.final_logit_softcapping = before
    assert_same_samples(got, want)
    assert [s.logprobs for o in got for s in o.samples] != [s.logprobs for o in first
                                                           for s in o.samples]


def assert_same_samples(got, want):
    for o, w in zip(got, want, strict=True):
        assert [s.token_ids for s in o.samples] == [s.token_ids for s in w.samples]
        for s, t in zip(o.samples, w.samples):
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(t.logprobs),
                                       rtol=0, atol=1e-5)


def test_a_failing_compiler_falls_back(models, monkeypatch):
    from r2ec_fast.rollout import engine as engine_mod

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(engine_mod, "compiled_step", lambda: broken)
    model = models["qwen2"]
    prompts = make_prompts(model, [20, 9], seed=13)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    engine = RolloutEngine(model, block_size=8, compile_decode=True)
    with pytest.warns(RuntimeWarning, match="compiled decode step failed"):
        outs = engine.generate(prompts, params)
    assert not engine.compile_decode  # no second try
    want = RolloutEngine(model, block_size=8).generate(prompts, params)
    assert [[s.token_ids for s in o.samples] for o in outs] == \
        [[s.token_ids for s in o.samples] for o in want]
    with pytest.raises(ValueError, match="fuses the norms itself"):
        RolloutEngine(model, compile_decode=True, fuse_norms=True)
