"""Build checks of the native extension (setup.py, csrc/): what was built is importable and consistent, and
setup.py's CUDA detection behaves (finds the real toolkit behind a wrapper nvcc; warns, never fails, without nvcc).

The CPU-only torch check (a fresh venv with torch==2.13.0, building the CPU part and running the native CPU tests)
costs minutes: it runs only with CONVS2S_TEST_CPU_TORCH_BUILD=1.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from convs2s.ops import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _defined_ops() -> list[str]:
    """The op names csrc/module.cpp defines (its m.def("<name>(...) lines)."""
    with open(os.path.join(CSRC, "module.cpp")) as f:
        return re.findall(r'm\.def\(\s*"(\w+)\(', f.read())


def _extension():
    reason = available_backends("cpu")["native"]
    if reason is not None:
        pytest.skip(f"native backend unavailable: {reason}")
    import convs2s._C
    return convs2s._C


def test_extension_is_built_and_usable():
    assert available_backends("cpu")["native"] is None, available_backends("cpu")["native"]


def test_one_bindings_file():
    """Every op schema and registration is in csrc/module.cpp, none in the op files; both ops are defined there."""
    for name in os.listdir(CSRC):
        if name != "module.cpp" and name.endswith((".cpp", ".cu", ".h", ".cuh")):
            with open(os.path.join(CSRC, name)) as f:
                assert "TORCH_LIBRARY" not in f.read(), f"csrc/{name} registers ops; they belong in csrc/module.cpp"
    ops = _defined_ops()
    assert {"glu_conv_native_fwd", "glu_conv_native_bwd", "conv_attention_native_fwd",
            "conv_attention_native_bwd"} <= set(ops), ops


def test_ops_registered_for_the_devices_built():
    """What the built extension registers matches csrc/module.cpp (a stale build fails here)."""
    ext = _extension()
    assert isinstance(ext.has_cuda(), bool)
    for op in _defined_ops():
        name = f"convs2s::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == ext.has_cuda(), name


def test_cuda_kernels_built_where_they_can_be():
    # With nvcc on PATH and a CUDA build of torch (CI), setup.py must have compiled the CUDA kernels: a CUDA
    # compile error then fails the build instead of silently producing a CPU-only extension.
    ext = _extension()
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no nvcc or a CPU-only torch: a CPU-only extension is expected")
    if os.environ.get("CONVS2S_SKIP_CUDA_BUILD", "0") == "1":
        pytest.skip("CONVS2S_SKIP_CUDA_BUILD=1")
    assert ext.has_cuda()


def _run_setup(env_changes, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_changes)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_setup_without_nvcc_warns_and_goes_on():
    path = os.pathsep.join(p for p in ("/usr/bin", "/bin") if os.path.isdir(p))
    if shutil.which("nvcc", path=path) is not None:
        pytest.skip("nvcc is in /usr/bin here")
    r = _run_setup({"PATH": path}, drop=("CUDA_HOME", "CUDA_PATH", "CONVS2S_SKIP_CUDA_BUILD"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("convs2s")
    if torch.version.cuda is None:
        assert "CPU-only build" in r.stderr
    else:
        assert "nvcc not found" in r.stderr and "building the CPU kernels only" in r.stderr


def test_setup_finds_the_real_toolkit_behind_nvcc():
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    r = _run_setup({}, drop=("CUDA_HOME", "CUDA_PATH", "CONVS2S_SKIP_CUDA_BUILD", "TORCH_CUDA_ARCH_LIST",
                             "CONVS2S_CUDA_ARCHS"))
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if "building CUDA kernels with CUDA_HOME=" in x)
    home = line.split("CUDA_HOME=")[1].split(",")[0]
    assert os.path.isfile(os.path.join(home, "bin", "nvcc")), line
    assert any(os.path.exists(os.path.join(home, d)) for d in ("lib64", "lib", "targets")), line
    if not torch.cuda.is_available():
        assert "TORCH_CUDA_ARCH_LIST=8.0;9.0" in line


def test_skip_cuda_build_variable():
    r = _run_setup({"CONVS2S_SKIP_CUDA_BUILD": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "building the CPU kernels only" in r.stdout + r.stderr


@pytest.mark.skipif(os.environ.get("CONVS2S_TEST_CPU_TORCH_BUILD", "0") != "1",
                    reason="minutes-long: set CONVS2S_TEST_CPU_TORCH_BUILD=1")
def test_cpu_only_torch_builds_and_passes(tmp_path):
    """A fresh venv with the CPU-only torch 2.13.0: setup.py builds the CPU part and the native CPU tests pass."""
    venv, src = tmp_path / "venv", tmp_path / "src"
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    src.mkdir()
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    py = str(venv / "bin" / "python")

    def sh(*cmd, cwd=None):
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
        assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    sh(sys.executable, "-m", "venv", str(venv))
    sh(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    sh(py, "-m", "pip", "install", "-q", "torch==2.13.0", "numpy", "pytest", "ninja", "setuptools", "wheel")
    out = sh(py, "-m", "pip", "install", "-v", "-e", ".", "--no-build-isolation", "--no-deps", cwd=src)
    assert "CPU-only build" in out
    sh(py, "-c", "import torch, convs2s._C as c; assert not c.has_cuda()", cwd=src)
    sh(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops", "-k", "native", cwd=src)

