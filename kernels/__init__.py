"""Triton kernels of r2ec-fast: pure kernels and their launchers (no autograd, no dispatch).

Installed as `r2ec_fast.kernels`; import it under that name only (DESIGN §2).
"""
if __name__ != "r2ec_fast.kernels":
    raise ImportError(
        "the r2ec-fast kernels are installed as `r2ec_fast.kernels`; the bare name `kernels` "
        "belongs to another PyPI package. Use `import r2ec_fast.kernels`."
    )
