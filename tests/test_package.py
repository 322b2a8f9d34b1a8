"""Packaging contract (DESIGN §2): layout, kernels mapped into the package, dependencies."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str, cwd, safe_path: bool = False) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd`; unless `safe_path`, with `cwd` on sys.path (as a user at
    that folder gets it: PYTHONSAFEPATH, which the test command sets, removed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    if safe_path:
        env["PYTHONSAFEPATH"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env)


HUB_KERNELS = importlib.util.find_spec("kernels") is not None  # with PYTHONSAFEPATH: the Hub's


def test_kernels_only_under_the_package(tmp_path):
    ok = run_python("import r2ec_fast.kernels.catalog as k; print(k.__name__)", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "r2ec_fast.kernels.catalog"
    # installed, the bare name is not ours: absent, or the Hub's package (a dependency of
    # transformers >= 5.25)
    outside = run_python("import kernels; print(kernels.__file__)", tmp_path)
    if HUB_KERNELS:
        assert outside.returncode == 0, outside.stderr
        assert not outside.stdout.strip().startswith(str(ROOT / "kernels")), outside.stdout
    else:
        assert outside.returncode != 0 and "ModuleNotFoundError" in outside.stderr
    # from the checkout root the folder is found under the bare name: an inert module, with no
    # submodules and a pointer
    inside = run_python("import kernels; kernels.catalog", ROOT)
    assert inside.returncode != 0 and "r2ec_fast.kernels" in inside.stderr
    sub = run_python("import kernels.catalog", ROOT)
    assert sub.returncode != 0 and "No module named 'kernels.catalog'" in sub.stderr
    probe = "import transformers.activations; print('ok')"
    if HUB_KERNELS:
        # transformers imports the Hub's package by name, and from the checkout root our
        # folder shadows it: the documented limitation, which PYTHONSAFEPATH=1 lifts
        shadowed = run_python(probe, ROOT)
        assert shadowed.returncode != 0 and "CUDAProperties" in shadowed.stderr
        safe = run_python(probe, ROOT, safe_path=True)
        assert safe.returncode == 0 and safe.stdout.strip() == "ok", safe.stderr
    else:  # is_kernels_available probes the inert module and says no
        probe = run_python("from transformers.utils import is_kernels_available as a; "
                           "import transformers.activations; print(a())", ROOT)
        assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr


def test_layers_exist():
    for sub in ("ops", "data", "model", "rollout", "train", "eval", "compat"):
        assert (ROOT / "r2ec_fast" / sub / "__init__.py").is_file(), sub
    assert (ROOT / "csrc" / "README.md").is_file()
    assert (ROOT / "benchmarks" / "gpu_suite.sh").is_file()


def test_dependency_ranges():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"])
    assert "torch>=2.11" in deps and "triton>=3.6" in deps
    extras = meta["optional-dependencies"]
    assert {"test", "bench", "gpu"} <= set(extras)
    assert any("liger-kernel" in e for e in extras["bench"])
    assert any("cut-cross-entropy" in e for e in extras["bench"])
    assert {"flash-attn", "bitsandbytes", "liger-kernel"} <= {e.split("[")[0] for e in extras["gpu"]}
    assert meta["scripts"]["r2ec-fast"] == "r2ec_fast.cli:main"


def test_console_script_help(tmp_path):
    out = run_python("from r2ec_fast.cli import main; main(['--help'])", tmp_path)
    assert out.returncode == 0 and "bench" in out.stdout


@pytest.mark.parametrize("script", ["setup_env.sh", "run_tests.sh", "run_main.sh"])
def test_scripts_are_strict_bash(script):
    text = (ROOT / "scripts" / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0
