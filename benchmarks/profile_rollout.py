"""Per-decode-step cost of each rollout-engine configuration, against HF `generate`.

    python -m r2ec_fast.benchmarks.profile_rollout [--device cuda] [--configs eager,all]
        [--steps 16,48,80] [--repeats 3] [--kernels all]

The rollout benchmark (`bench_rollout.py`) times whole `generate` calls; this tool separates a
decode step from the rest: each configuration generates N_1 < N_2 < ... new tokens (no stop
token), every length `--repeats` times (interleaved, so that drift of the machine spreads over
all lengths), and a least-squares line t = a + s x N through all the timed calls gives its
decode step s (with its standard error) and its prefill and per-call set-up a (CUDA-graph
captures included). A difference of two noisy times can come out negative on a busy machine;
the fit says "not measurable" instead when the slope is not positive or its standard error
exceeds a quarter of it, and no speed-up is printed from such a step. The first, untimed call
compiles or captures (its time is printed as "warmup"). Shapes: CUDA the rollout benchmark's
Gemma-2-2B-shaped random weights (26 layers, bf16), B = 16 prompts of 1,024 tokens, G = 4; CPU
its tiny Gemma-2, B = 8 prompts of 256 tokens, G = 4. Greedy samples of every configuration are
compared with the first one's (bf16 rounding may legitimately split them after many steps), and
`--kernels NAME` prints a profiler table of one more call of that configuration.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

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
MAX_RELATIVE_ERROR = 0.25  # a decode step whose standard error exceeds this is not reported


@dataclass
class StepFit:
    """The least-squares line t = intercept + step x N through timed calls."""

    step: float  # seconds per decode step (the slope)
    stderr: float  # its standard error (inf with too few points)
    intercept: float  # prefill and per-call set-up, seconds
    points: int

    @property
    def measurable(self) -> bool:
        return self.step > 0 and self.stderr <= MAX_RELATIVE_ERROR * self.step

    def why_not(self) -> str:
        if self.step <= 0:
            return (f"slope {self.step * 1e3:.2f} ms per token is not positive (the calls' "
                    "noise is larger than the decode steps between the lengths)")
        return (f"standard error {self.stderr * 1e3:.2f} ms is over "
                f"{MAX_RELATIVE_ERROR:.0%} of the slope {self.step * 1e3:.2f} ms")


def fit_decode_step(lengths: list[int], times: list[float]) -> StepFit:
    """Ordinary least squares of `times` (seconds) on `lengths` (new tokens per call); at least
    two distinct lengths. The slope's standard error is sqrt(residual variance / Sxx) with
    points - 2 degrees of freedom (inf when there are none left)."""
    if len(lengths) != len(times) or len(set(lengths)) < 2:
        raise ValueError("need timed calls at two or more distinct lengths")
    n = len(lengths)
    mean_x, mean_y = sum(lengths) / n, sum(times) / n
    sxx = sum((x - mean_x) ** 2 for x in lengths)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, times)) / sxx
    intercept = mean_y - slope * mean_x
    if n <= 2:
        return StepFit(slope, math.inf, intercept, n)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(lengths, times))
    return StepFit(slope, math.sqrt(residual / (n - 2) / sxx), intercept, n)


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


def profile(device: str, configs: list[str], lengths: list[int], kernels: str | None,
            group: int = 4, greedy_tokens: int = 32, repeats: int = 3) -> dict[str, StepFit]:
    """Prints one line per configuration (and HF); returns {name: its decode-step fit}."""
    model, prompts = _model_and_prompts(device)
    runs = {name: _engine_run(model, prompts, device, group, CONFIGS[name]) for name in configs}
    runs["hf_generate"] = _hf_run(model, prompts, device, group)
    fits = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run(min(8, lengths[0]))
        warmup = time.perf_counter() - start
        calls = [(n, run(n)) for _ in range(repeats) for n in lengths]
        fit = fits[name] = fit_decode_step(*zip(*calls))
        stats = getattr(run, "engine", None) and run.engine.stats
        if fit.measurable:
            step = (f"decode step {fit.step * 1e3:6.2f} ms +- {fit.stderr * 1e3:.2f} | prefill "
                    f"and set-up ~{fit.intercept * 1e3:5.0f} ms")
        else:
            step = f"decode step not measurable: {fit.why_not()}"
        print(f"{name:13s} warmup {warmup:6.1f} s | {len(lengths)} lengths x {repeats}, "
              f"N={lengths[0]}..{lengths[-1]} | {step}"
              + (f" | graphs captured {stats.graph_captures}" if stats else ""), flush=True)
    hf = fits["hf_generate"]
    for name in configs:
        if hf.measurable and fits[name].measurable:
            print(f"decode step speed-up {name} vs HF generate: "
                  f"{hf.step / fits[name].step:.2f}x")
        else:
            print(f"decode step speed-up {name} vs HF generate: not measurable (raise "
                  "--steps or --repeats)")
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
            runs[kernels](lengths[-1])
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)} (the first is the "
                             "greedy reference; default: all)")
    parser.add_argument("--steps", default="16,48,80",
                        help="new tokens per call, two or more increasing lengths (default "
                             "16,48,80)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per length (default 3)")
    parser.add_argument("--kernels", default=None, metavar="CONFIG",
                        help="print a profiler table of one more call of this configuration")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if not configs or unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        lengths = [int(x) for x in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps must be integers N1,N2,..., got {args.steps!r}")
    if len(lengths) < 2 or lengths[0] < 1 or any(a >= b for a, b in zip(lengths, lengths[1:])):
        parser.error(f"--steps needs two or more increasing lengths >= 1, got {args.steps}")
    if args.repeats < 1 or args.repeats * len(lengths) < 3:
        parser.error(f"--repeats must be >= 1 and give at least 3 timed calls "
                     f"({len(lengths)} lengths x {args.repeats})")
    if args.kernels is not None and args.kernels not in configs + ["hf_generate"]:
        parser.error(f"--kernels must name one of the profiled configurations {configs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    profile(args.device, configs, lengths, args.kernels, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
