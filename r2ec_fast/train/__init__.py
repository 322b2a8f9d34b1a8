"""RecPO training loop, FSDP, checkpoints, metrics."""
