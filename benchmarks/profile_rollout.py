"""Per-decode-step cost of each rollout-engine configuration, against HF `generate`.

    python -m r2ec_fast.benchmarks.profile_rollout [--device cuda] [--configs eager,all]
        [--steps 16,80] [--kernels all]

The rollout benchmark (`bench_rollout.py`) times whole `generate` calls; this tool separates a
decode step from the rest: each configuration generates N1 and then N2 new tokens (no stop
token), and (t(N2) - t(N1)) / (N2 - N1) is its decode step, t(N1) - N1 x step its prefill and
per-call set-up (CUDA-graph captures included). The first, untimed call compiles or captures
(its time is printed as "warmup"). Shapes: CUDA the rollout benchmark's Gemma-2-2B-shaped
random weights (26 layers, bf16), B = 16 prompts of 1,024 tokens, G = 4; CPU its tiny Gemma-2,
B = 8 prompts of 256 tokens, G = 4. Greedy samples of every configuration are compared with
the eager one's (bf16 rounding may legitimately split them after many steps), and `--kernels
NAME` prints a profiler table of one more call of that configuration.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..rollout.engine import RolloutEngine, SamplingParams

# engine keywords of each configuration (on CPU "graphs" is the padded static path, eagerly)
CONFIGS = {
    "eager": dict(decode_graphs=False, fuse_norms=False, cascade=False),
    "graphs": dict(decode_graphs=True, fuse_norms=False, cascade=False),
    "graphs+norms": dict(decode_graphs=True, fuse_norms=True, cascade=False),
    "all": dict(decode_graphs=True, fuse_norms=True, cascade=True),
    "compiled": dict(decode_graphs=True, fuse_norms=False, cascade=True, compile_decode=True),
}
BLOCK_SIZE = 16


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _model_and_prompts(device: str):
    from .bench_rollout import _gemma2_2b_shaped, _tiny

    if device == "cuda":
        model, (b, p) = _gemma2_2b_shaped(26, 0), (16, 1024)
    else:
        model, (b, p) = _tiny("gemma2", 0), (8, 256)
    vocab = model.lm_head_weight.shape[0]
    prompts = torch.randint(10, vocab, (b, p), generator=torch.Generator().manual_seed(0))
    return model, prompts


def _engine_run(model, prompts, device: str, group: int, keywords: dict):
    engine = RolloutEngine(model, block_size=BLOCK_SIZE, **keywords)
    ids = prompts.tolist()

    def run(new_tokens: int) -> float:
        params = SamplingParams(n=group, temperature=1.0, max_new_tokens=new_tokens, seed=0)
        _sync(device)
        start = time.perf_counter()
        engine.generate(ids, params)
        _sync(device)
        return time.perf_counter() - start

    run.engine = engine
    return run


def _hf_run(model, prompts, device: str, group: int):
    from transformers import GenerationConfig

    ids = prompts.to(model.device)

    def run(new_tokens: int) -> float:
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  num_return_sequences=group, eos_token_id=None,
                                  pad_token_id=0, bos_token_id=None)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              generation_config=config)
        _sync(device)
        return time.perf_counter() - start

    return run


def profile(device: str, configs: list[str], steps: tuple[int, int], kernels: str | None,
            group: int = 4, greedy_tokens: int = 32) -> dict[str, float]:
    """Prints one line per configuration (and HF); returns {name: decode step in seconds}."""
    model, prompts = _model_and_prompts(device)
    n1, n2 = steps
    runs = {name: _engine_run(model, prompts, device, group, CONFIGS[name]) for name in configs}
    runs["hf_generate"] = _hf_run(model, prompts, device, group)
    step = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run(min(8, n1))
        warmup = time.perf_counter() - start
        t1, t2 = run(n1), run(n2)
        step[name] = (t2 - t1) / (n2 - n1)
        stats = getattr(run, "engine", None) and run.engine.stats
        print(f"{name:13s} warmup {warmup:6.1f} s | N={n1}: {t1 * 1e3:7.0f} ms, N={n2}: "
              f"{t2 * 1e3:7.0f} ms | decode step {step[name] * 1e3:6.2f} ms | prefill and "
              f"set-up ~{(t1 - n1 * step[name]) * 1e3:5.0f} ms"
              + (f" | graphs captured {stats.graph_captures}" if stats else ""), flush=True)
    for name in configs:
        print(f"decode step speed-up {name} vs HF generate: "
              f"{step['hf_generate'] / step[name]:.2f}x")
    reference = None
    for name in configs:
        outs = RolloutEngine(model, block_size=BLOCK_SIZE, **CONFIGS[name]).generate(
            prompts[:4].tolist(), SamplingParams(n=2, temperature=0, max_new_tokens=greedy_tokens))
        tokens = [s.token_ids for o in outs for s in o.samples]
        reference = reference or tokens
        same = sum(a == b for a, b in zip(tokens, reference))
        print(f"greedy {name}: {same}/{len(tokens)} samples equal to {configs[0]}'s")
    if kernels:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda"
                                               else [])
        with torch_profile(activities=activities) as prof:
            runs[kernels](n1)
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)} (the first is the "
                             "greedy reference; default: all)")
    parser.add_argument("--steps", default="16,80", help="N1,N2 new tokens (default 16,80)")
    parser.add_argument("--kernels", default=None, metavar="CONFIG",
                        help="print a profiler table of one more call of this configuration")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if not configs or unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        n1, n2 = (int(x) for x in args.steps.split(","))
    except ValueError:
        parser.error(f"--steps must be two integers N1,N2, got {args.steps!r}")
    if not 1 <= n1 < n2:
        parser.error(f"--steps needs 1 <= N1 < N2, got {n1},{n2}")
    if args.kernels is not None and args.kernels not in configs + ["hf_generate"]:
        parser.error(f"--kernels must name one of the profiled configurations {configs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    profile(args.device, configs, (n1, n2), args.kernels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
