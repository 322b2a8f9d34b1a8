"""Package layout and the optional ahead-of-time CUDA build.

`kernels/` is installed as `r2ec_fast.kernels` (DESIGN §2): a different PyPI package owns the
top-level name `kernels`, so ours is never importable under it.
Set R2EC_BUILD_CUDA=1 to compile `csrc/` ahead of time (needs nvcc and a CUDA torch); without
it the CUDA sources are JIT-built on first use on CUDA machines.
"""
import os

from setuptools import find_packages, setup

packages = (["r2ec_fast"] + [f"r2ec_fast.{p}" for p in find_packages("r2ec_fast")]
            + ["r2ec_fast.kernels", "r2ec_fast.benchmarks"])
package_dir = {"r2ec_fast": "r2ec_fast", "r2ec_fast.kernels": "kernels",
               "r2ec_fast.benchmarks": "benchmarks"}

ext_modules, cmdclass = [], {}
if os.environ.get("R2EC_BUILD_CUDA") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if sources:
        ext_modules = [CUDAExtension("r2ec_fast._C", sources)]
        cmdclass = {"build_ext": BuildExtension}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
