"""Evaluation: full-catalog ranking metrics."""
