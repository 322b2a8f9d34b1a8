"""Triton kernels of r2ec-fast: pure kernels and their launchers (no autograd, no dispatch).

Installed as `r2ec_fast.kernels`; import it under that name only (DESIGN §2).

In a source checkout whose root is on sys.path (`python -m ...` from the root), this folder is
also found under the bare name `kernels`, which belongs to another PyPI package. Imported that
way it stays an empty module with no submodules: it does not raise, because libraries probe for
that package by importing it (transformers' `is_kernels_available` does, and an ImportError
there broke every model load), and nothing of ours can be used under the wrong name.
"""
if __name__ != "r2ec_fast.kernels":
    __path__ = []  # `import kernels.catalog` finds nothing
    __version__ = "N/A"  # what transformers reads: no usable version, so "not available"

    def __getattr__(name: str):
        raise AttributeError(
            f"module 'kernels' here is r2ec-fast's source folder, not the PyPI package "
            f"`kernels`; it has no {name!r}. Import the kernels as `r2ec_fast.kernels`.")
