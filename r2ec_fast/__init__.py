"""r2ec-fast: a kernel-optimised training engine for R2ec-style recommenders."""

__version__ = "0.1.0"
