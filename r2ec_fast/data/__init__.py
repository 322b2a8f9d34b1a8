"""Datasets, prompts and synthetic data (DESIGN §6). Knows tokenizers only."""
