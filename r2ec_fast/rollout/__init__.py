"""Rollout: the paged generation engine (one file per role) and the HF `generate` rollout.

- `sequence.py`: sampling settings, a group per prompt, a sequence per sample;
- `block_manager.py`: reference-counted KV blocks, a group's prompt held once;
- `scheduler.py`: continuous batching under the KV budget, preemption by recompute;
- `model_runner.py`: the model's own decoder with attention on the paged ops;
- `sampler.py`: one draw per sequence from its own random stream;
- `engine.py`: `RolloutEngine` ties them, `EngineRollout` serves the trainer;
- `hf.py`: the `Rollout` interface, `HFRollout` (transformers `generate`), `NoReasoning`.
Importing this package imports none of them (the trainer imports what it uses).
"""


def __getattr__(name):
    if name in ("RolloutEngine", "SamplingParams", "RequestOutput", "SampleOutput",
                "EngineRollout"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'r2ec_fast.rollout' has no attribute {name!r}")
