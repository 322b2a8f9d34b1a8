"""Rollout: paged KV cache, scheduler, sampler."""
