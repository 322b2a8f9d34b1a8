"""process_logits / sample (DESIGN §4.5) against HF's own logits processors, a float64
inverse CDF, and frequencies; the CUDA kernel of csrc/sampling.cu against the torch path."""
import math
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from r2ec_fast.ops import sampling
from r2ec_fast.ops.sampling import process_logits, sample
from r2ec_fast.testing import assert_close_verbose

F32, BF16 = torch.float32, torch.bfloat16
NEG_INF = float("-inf")


def make_case(b, v, dtype=F32, seed=0, ties=False, prev_len=9):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, v, generator=g)
    if ties:  # a coarse grid: equal values at the top-k and top-p cuts
        logits = (logits * 2).round() / 2
    prev = torch.randint(0, v, (b, prev_len), generator=g)
    prev[:, 1] = prev[:, 0]  # repeats are penalised once
    prev[0, -3:] = -1  # padding
    if b > 1:
        prev[1] = -1  # a row with no previous token
    if b > 2:
        prev[2, -1] = v + 3  # an id past the logits' width: ignored, as HF does
    return logits.to(dtype), prev


def hf_process(logits, prev, temperature, top_k, top_p, penalty):
    """HF generate's processors, added only when active (as generate does), row by row with
    the row's ids without padding as input_ids."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(penalty)))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p))
    rows = []
    for b in range(logits.shape[0]):
        ids = prev[b][prev[b] != -1][None]  # [1, L_b]
        rows.append(procs(ids, logits[b:b + 1].float().clone()))
    return torch.cat(rows)


# (temperature, top_k, top_p, repetition_penalty)
SETTINGS = [
    (1.0, 0, 1.0, 1.0),  # nothing: the raw logits
    (0.7, 0, 1.0, 1.0),
    (1.3, 5, 1.0, 1.0),
    (1.0, 1000, 1.0, 1.0),  # k >= V: off
    (0.8, 0, 0.9, 1.0),
    (1.0, 0, 1e-6, 1.0),  # tiny top_p: one token left (HF keeps one of a tied top)
    (2.0, 10, 0.95, 1.3),  # the reference rollout's temperature with everything on
    (0.5, 3, 0.5, 0.7),  # a penalty < 1 favours repeats
    (1.0, 0, 1.0, 1.5),
    (1.1, 36, 0.99, 2.0),  # k = V - 1
]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "T{}-k{}-p{}-rp{}".format(*s))
def test_process_logits_matches_hf_processors(settings, dtype, ties):
    temperature, top_k, top_p, penalty = settings
    logits, prev = make_case(6, 37, dtype, seed=len(str(settings)), ties=ties)
    ours = process_logits(logits, temperature, top_k, top_p, penalty, prev)
    theirs = hf_process(logits, prev, temperature, top_k, top_p, penalty)
    assert ours.dtype == torch.float32 and ours.shape == logits.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "kept sets differ"
    assert_close_verbose(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), atol=1e-6,
                         name="log_softmax")
    assert (ours > NEG_INF).sum(-1).min() >= 1
    if top_k == 5:  # the grid really has ties at the k-th value: more than k kept somewhere
        assert not ties or (ours > NEG_INF).sum(-1).max() > 5


def test_process_logits_strided_and_half_inputs():
    logits, prev = make_case(5, 40, seed=3)
    strided = logits.T.contiguous().T  # column-major
    settings = (0.9, 7, 0.8, 1.2)
    ref = process_logits(logits, *settings, prev_tokens=prev)
    assert torch.equal(process_logits(strided, *settings, prev_tokens=prev.int()), ref)
    half = logits.half()
    assert torch.equal(process_logits(half, *settings, prev_tokens=prev),
                       process_logits(half.float(), *settings, prev_tokens=prev))


def inverse_cdf_float64(processed, u):
    """Token ids by the contract's rule, in float64: the first id whose cumulative kept
    probability exceeds u (the last kept id when none does)."""
    probs = torch.softmax(processed.double(), -1)
    cdf = probs.cumsum(-1)
    first = (cdf > u.double()[:, None] * cdf[:, -1:]).int().argmax(-1)
    none = ~(cdf > u.double()[:, None] * cdf[:, -1:]).any(-1)
    last = torch.where(probs > 0, torch.arange(processed.shape[1]), -1).amax(-1)
    return torch.where(none, last, first)


@pytest.mark.parametrize("settings", SETTINGS[1:], ids=lambda s: "T{}-k{}-p{}-rp{}".format(*s))
def test_sample_follows_the_inverse_cdf(settings):
    temperature, top_k, top_p, penalty = settings
    logits, prev = make_case(64, 37, seed=5, ties=True)
    u = torch.rand(64, generator=torch.Generator().manual_seed(6))
    tokens, logprobs = sample(logits, *settings, prev_tokens=prev, uniform=u)
    processed = process_logits(logits, *settings, prev_tokens=prev)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert (processed.gather(1, tokens[:, None]) > NEG_INF).all(), "a removed token was drawn"
    assert torch.equal(tokens, inverse_cdf_float64(processed, u))
    expect = torch.log_softmax(processed, -1).gather(1, tokens[:, None])[:, 0]
    assert_close_verbose(logprobs, expect, atol=1e-6, name="logprobs")


@pytest.mark.parametrize("settings", [(0.8, 5, 1.0, 1.0), (1.5, 0, 0.8, 1.0)],
                         ids=["topk", "topp"])
def test_sample_frequencies_match_the_probabilities(settings):
    """20000 draws from one V = 7 row: each frequency within 5 standard errors of its
    probability (a false alarm at most 7 x 6e-7 a run), removed tokens never."""
    n = 20000
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.3, -2.0, 1.2, 0.0]]).expand(n, 7)
    gen = torch.Generator().manual_seed(7)
    tokens, _ = sample(logits, *settings, generator=gen)
    probs = torch.softmax(process_logits(logits[:1], *settings), -1)[0].double()
    freq = torch.bincount(tokens, minlength=7).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1 / n).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all() and (probs == 0).any()
    chi2 = ((freq - probs)[probs > 0] ** 2 / probs[probs > 0]).sum().item() * n
    dof = int((probs > 0).sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2
    again, _ = sample(logits, *settings, generator=torch.Generator().manual_seed(7))
    assert torch.equal(tokens, again)


def test_uniform_draws_are_reproducible_and_independent_of_batching():
    logits, prev = make_case(16, 50, seed=8)
    settings = dict(temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.1,
                    prev_tokens=prev)
    u = torch.rand(16, generator=torch.Generator().manual_seed(9))
    tokens, logprobs = sample(logits, uniform=u, **settings)
    again = sample(logits, uniform=u.double(), **settings)
    assert torch.equal(tokens, again[0]) and torch.equal(logprobs, again[1])
    for rows in ([3], [15, 0, 7]):  # any subset, in any order, draws the same tokens
        sub = dict(settings, prev_tokens=prev[rows])
        part, part_lp = sample(logits[rows], uniform=u[rows], **sub)
        assert torch.equal(part, tokens[rows]) and torch.equal(part_lp, logprobs[rows])


def test_uniform_at_the_ends_picks_the_first_and_last_kept_token():
    logits, prev = make_case(8, 30, seed=10)
    settings = (0.9, 12, 1.0, 1.3)
    kept = process_logits(logits, *settings, prev_tokens=prev) > NEG_INF
    ids = torch.arange(30).expand(8, 30)
    first = torch.where(kept, ids, 30).amin(-1)
    last = torch.where(kept, ids, -1).amax(-1)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))  # 1 - 2^-24
    for u, expect in ((torch.zeros(8), first), (torch.full((8,), below_one.item()), last),
                      (torch.full((8,), 1 - 1e-12, dtype=torch.float64), last),  # fp32: 1.0
                      (torch.ones(8), last)):
        tokens, _ = sample(logits, *settings, prev_tokens=prev, uniform=u)
        assert torch.equal(tokens, expect), (u[0].item(), tokens, expect)


def test_greedy_is_the_argmax_of_the_penalised_logits():
    logits, prev = make_case(6, 25, seed=11)
    logits[4, [3, 9]] = logits[4].max() + 1  # a tie at the top: the first id wins
    prev[4] = -1
    tokens, logprobs = sample(logits, temperature=0, top_k=3, top_p=0.5,
                              repetition_penalty=1.4, prev_tokens=prev)
    penalised = hf_process(logits, prev, 1.0, 0, 1.0, 1.4)
    assert torch.equal(tokens, penalised.argmax(-1)) and tokens[4] == 3
    expect = torch.log_softmax(penalised, -1).gather(1, tokens[:, None])[:, 0]
    assert_close_verbose(logprobs, expect, atol=1e-6, name="greedy logprobs")
    assert torch.equal(process_logits(logits, 0, 3, 0.5, 1.4, prev), penalised)


def test_the_torch_path_sorts_only_for_top_p(monkeypatch):
    """Every decode step runs this: top-k uses topk's k-th value, no full sort."""
    logits, prev = make_case(32, 4096, seed=12, prev_len=64)

    def no_sort(*args, **kwargs):
        raise AssertionError("sorted without top_p")

    monkeypatch.setattr(torch, "sort", no_sort)
    for top_k in (0, 200):
        tokens, _ = sample(logits, 2.0, top_k, 1.0, 1.1, prev, uniform=torch.rand(32))
        assert tokens.shape == (32,)
    with pytest.raises(AssertionError, match="sorted"):
        sample(logits, 1.0, 0, 0.9, uniform=torch.rand(32))


def test_bad_inputs_raise_clear_errors():
    logits, prev = make_case(4, 10, seed=13)
    u = torch.rand(4)
    cases = [
        (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=True), "temperature"), (dict(top_k=-1), "top_k"),
        (dict(top_k=2.0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(uniform=torch.rand(3)), "uniform"), (dict(uniform=torch.zeros(4, dtype=torch.long)),
                                                   "uniform"),
        (dict(prev_tokens=prev[:3]), "prev_tokens"), (dict(prev_tokens=prev[0]), "prev_tokens"),
        (dict(prev_tokens=prev.float()), "prev_tokens"), (dict(backend="triton"), "Triton"),
        (dict(backend="nope"), "backend"), (dict(backend="cuda"), "CUDA logits"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sample(logits, **{"uniform": u, **kwargs})
    for bad in (logits[0], logits.long(), torch.zeros(4, 0)):
        with pytest.raises(ValueError, match="logits"):
            sample(bad)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(logits, top_p=0)


def test_backend_selection(monkeypatch):
    logits, prev = make_case(4, 10, seed=14)
    u = torch.rand(4)
    ref = sample(logits, prev_tokens=prev, repetition_penalty=1.2, uniform=u)
    for name in ("torch", "reference"):
        assert torch.equal(sample(logits, prev_tokens=prev, repetition_penalty=1.2, uniform=u,
                                  backend=name)[0], ref[0])
    for env in ("triton", "reference", "cuda", "torch"):  # never an error on CPU tensors
        monkeypatch.setenv("R2EC_BACKEND", env)
        assert sampling._resolve_backend(None, logits, 1.0, 1.0, 1.0) == "torch"
        assert torch.equal(sample(logits, prev_tokens=prev, repetition_penalty=1.2,
                                  uniform=u)[0], ref[0])


@pytest.fixture
def fresh_extension_cache():
    sampling._load_extension.cache_clear()
    yield
    sampling._load_extension.cache_clear()


def test_a_failed_build_warns_once_and_returns_none(fresh_extension_cache, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'r2ec_fast_sampling': nvcc not found")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setitem(sys.modules, "r2ec_fast._C", None)  # no ahead-of-time build either
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert sampling._cuda_extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampling._cuda_extension() is None
    assert "nvcc not found" in sampling._load_extension()[1]


def find_nvcc():
    import torch.utils.cpp_extension as cpp_extension

    found = shutil.which("nvcc")
    home = cpp_extension.CUDA_HOME
    if found is None and home and (Path(home) / "bin" / "nvcc").is_file():
        found = str(Path(home) / "bin" / "nvcc")
    return found


def test_csrc_compiles_with_nvcc(tmp_path):
    """Compile only (no GPU needed) with torch's include paths and its C++ standard: C++20
    from torch 2.13 on (its headers require it), C++17 before. About a minute on 2 cores."""
    import torch.utils.cpp_extension as cpp_extension

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME/bin)")
    try:
        includes = cpp_extension.include_paths(device_type="cuda")  # torch >= 2.6
    except TypeError:
        includes = cpp_extension.include_paths(cuda=True)
    except OSError:  # a CPU torch has no CUDA_HOME; nvcc finds its own headers anyway
        includes = cpp_extension.include_paths()
    stub = tmp_path / "include"
    macros = Path(torch.__file__).parent / "include/c10/cuda/impl/cuda_cmake_macros.h"
    if not macros.is_file():  # CPU wheels ship c10/cuda without this generated header
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    std = "-std=c++20" if version >= (2, 13) else "-std=c++17"
    cmd = [nvcc, "-c", str(sampling.CSRC_SAMPLING), "-o", str(tmp_path / "sampling.o"), std,
           "-Xcompiler", "-fPIC", f"-DTORCH_EXTENSION_NAME={sampling.EXTENSION_NAME}",
           f"-I{stub}", *(f"-I{p}" for p in includes), f"-I{sysconfig.get_paths()['include']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-20000:]}"


# ----------------------------------------------------------------------------- CUDA kernel

GPU_SETTINGS = [(1.0, 0, 1.0, 1.0), (0.7, 50, 1.0, 1.0), (2.0, 200, 1.0, 1.3),
                (0.8, 0, 0.9, 1.0), (1.0, 200, 0.5, 1.2), (1.2, 0, 0.95, 0.8)]


def spiked_case(b, v, dtype, seed):
    """LLM-like rows: a flat tail and 20 spikes that carry most of the mass, some of them
    in prev_tokens (so the penalty moves the cuts)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, v, generator=g)
    spikes = torch.randint(0, v, (b, 20), generator=g)
    logits.scatter_(1, spikes, 12 + 4 * torch.rand(b, 20, generator=g))
    prev = torch.randint(-1, v, (b, 300), generator=g)
    prev[:, :5] = spikes[:, :5]
    u = torch.rand(b, generator=g)
    return logits.to(dtype), prev, u


def check_kept_set(base, kept, processed_torch, top_k, top_p, name):
    """base: [B, V] fp32 penalised / temperature values (CPU, the kernel's bits); kept: the
    kernel's set. Top-k alone: HF's set exactly. Top-p: the tie-consistent rule of
    csrc/sampling.cu in float64, up to fp32 rounding of the masses (1e-4 relative)."""
    if top_p == 1.0:
        assert torch.equal(kept, processed_torch > NEG_INF), f"{name}: kept sets differ"
        return
    x = base.double()
    floor = torch.full_like(x[:, :1], NEG_INF)
    if 0 < top_k < x.shape[1]:
        floor = torch.topk(x, top_k, -1).values[:, -1:]
    w = torch.where(x >= floor, torch.exp(x - x.amax(-1, keepdim=True)), 0.0)
    goal = top_p * w.sum(-1)
    thr = torch.where(kept, x, math.inf).amin(-1, keepdim=True)
    assert (kept == (x >= thr)).all() and (kept <= (x >= floor)).all(), name
    mass_ge = torch.where(x >= thr, w, 0.0).sum(-1)
    mass_gt = torch.where(x > thr, w, 0.0).sum(-1)
    assert (mass_ge >= goal * (1 - 1e-4)).all() and (mass_gt < goal * (1 + 1e-4)).all(), name


def check_kernel_against_torch(logits, prev, u, settings_list, strided=False, min_sure=None):
    """The kernel on the GPU against the float64 inverse CDF of its own kept set, the kept set
    against the torch path's (check_kept_set), and tokens against the torch path on the GPU
    where both kept sets agree and u lies clear of every CDF boundary (at least min_sure rows,
    default B / 8). u = 0 and u = 1 must give the first and the last kept id."""
    ext = sampling._cuda_extension()
    assert ext is not None, sampling._load_extension()[1]
    b, v = logits.shape
    min_sure = max(1, b // 8) if min_sure is None else min_sure
    dev = torch.device("cuda")
    if strided:  # every other column of a wider tensor: the element-load path
        wide = torch.zeros(b, 2 * v, dtype=logits.dtype)
        wide[:, ::2] = logits
        logits_dev = wide.to(dev)[:, ::2]
    else:
        logits_dev = logits.to(dev)
    prev_dev, u_dev = prev.to(dev), u.to(dev)
    rows = torch.arange(b)
    for settings in settings_list:
        temperature, top_k, top_p, penalty = settings
        name = f"{logits.dtype} {tuple(logits.shape)} {settings}"
        base = process_logits(logits, temperature, 0, 1.0, penalty, prev)  # CPU: IEEE division
        thr = ext.kept_threshold(logits_dev, prev_dev, *settings).cpu()
        kept = base >= thr[:, None]
        processed = process_logits(logits, *settings, prev_tokens=prev)
        check_kept_set(base, kept, processed, top_k, top_p, name)
        tokens, logprobs = ext.sample(logits_dev, prev_dev, u_dev, *settings)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        again = ext.sample(logits_dev, prev_dev, u_dev, *settings)
        assert torch.equal(tokens, again[0].cpu()) and torch.equal(logprobs, again[1].cpu())
        # the draw: an inverse CDF of the kernel's kept set, up to fp32 rounding of the sums
        w = torch.where(kept, torch.exp(base.double() - base.double().amax(-1, keepdim=True)),
                        0.0)
        cdf = w.cumsum(-1) / w.sum(-1, keepdim=True)
        assert kept[rows, tokens].all(), f"{name}: a removed token was drawn"
        after = cdf[rows, tokens]
        before = after - (w / w.sum(-1, keepdim=True))[rows, tokens]
        ud = u.double()
        bad = ~((before <= ud + 1e-5) & (after >= ud - 1e-5))
        assert not bad.any(), (f"{name}: rows {bad.nonzero()[:5, 0].tolist()} drew outside "
                               f"u's CDF step")
        expect_lp = torch.log(w[rows, tokens] / w.sum(-1))
        assert_close_verbose(logprobs, expect_lp, atol=1e-4, name=f"{name} logprobs")
        # the ends: the first and the last kept id
        ids = torch.arange(v).expand(b, v)
        for ends, expect in ((torch.zeros(b), torch.where(kept, ids, v).amin(-1)),
                             (torch.ones(b), torch.where(kept, ids, -1).amax(-1))):
            got = ext.sample(logits_dev, prev_dev, ends.to(dev), *settings)[0].cpu()
            assert torch.equal(got, expect), f"{name}: u = {ends[0].item()}"
        # the torch path on the GPU: same token wherever both kept sets agree and u lies
        # clear of every CDF boundary
        t_tok, t_lp = sample(logits_dev, *settings, prev_tokens=prev_dev, uniform=u_dev,
                             backend="torch")
        same_set = (kept == (processed > NEG_INF)).all(-1)
        clear = ((cdf - ud[:, None]).abs() > 1e-4).all(-1)
        sure = same_set & clear
        assert torch.equal(tokens[sure], t_tok.cpu()[sure]), name
        assert_close_verbose(logprobs[sure], t_lp.cpu()[sure], atol=1e-4, name=name)
        assert int(sure.sum()) >= min_sure, f"{name}: only {int(sure.sum())} rows compared"
        auto = sample(logits_dev, *settings, prev_tokens=prev_dev, uniform=u_dev)
        assert torch.equal(auto[0].cpu(), tokens), f"{name}: automatic dispatch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", [(64, 256000), (7, 5000), (5, 777)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_cuda_kernel_matches_the_torch_path(dtype, shape):
    """64 x 256000: 16-byte loads, top-k through the tile maxima (k <= 1000 tiles); 7 x 5000:
    16-byte loads and a partial last tile, k > 20 tiles; 5 x 777: strided element loads."""
    b, v = shape
    logits, prev, u = spiked_case(b, v, dtype, seed=v)
    check_kernel_against_torch(logits, prev, u, GPU_SETTINGS, strided=v < 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_gpu_ties_at_the_top_k_cut(dtype):
    """5000 ids per row tie at the top: more values at or above the k-th largest tile max
    than the kernel holds in shared memory (4096), so top-k reads the tiles again; the whole
    tie is kept. CDF steps of 2e-4 leave few rows clear of u for the torch comparison."""
    b, v = 64, 256000
    logits, prev, u = spiked_case(b, v, F32, seed=17)
    g = torch.Generator().manual_seed(18)
    tied = torch.rand(b, v, generator=g).argsort(-1)[:, :5000]
    logits.scatter_(1, tied, 20.0)
    settings = [(1.0, 0, 1.0, 1.0), (1.0, 200, 1.0, 1.0), (2.0, 200, 1.0, 1.3),
                (1.0, 6000, 1.0, 1.0)]
    check_kernel_against_torch(logits.to(dtype), prev, u, settings, min_sure=0)


@pytest.mark.gpu
def test_gpu_greedy_and_generator_draws():
    logits, prev, _ = spiked_case(8, 5000, BF16, seed=1)
    dev = torch.device("cuda")
    tokens, logprobs = sample(logits.to(dev), 0.0, 50, 0.9, 1.3, prev.to(dev))
    ref = sample(logits, 0.0, 50, 0.9, 1.3, prev)
    assert torch.equal(tokens.cpu(), ref[0])
    assert_close_verbose(logprobs.cpu(), ref[1], atol=1e-5, name="greedy logprobs")
    gen = torch.Generator(device=dev).manual_seed(3)
    first = sample(logits.to(dev), 1.0, 50, generator=gen)[0]
    again = sample(logits.to(dev), 1.0, 50, generator=gen.manual_seed(3))[0]
    assert torch.equal(first, again)
