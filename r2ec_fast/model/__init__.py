"""The dual-head model: HF decoder + lm_head + item table, attention backends."""
