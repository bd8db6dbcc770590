"""The build of convs2s: its packages and compiled extension. Metadata, version and dependencies are in
pyproject.toml.

`pip install -e . --no-build-isolation` (or `pip install . --no-build-isolation`): the isolated build environment
pip would otherwise create pulls a different torch than the one installed, so build against the installed one.

The Triton kernels live in ./kernels and are installed as `convs2s.kernels` (a top-level `kernels` module would
collide with other packages of that name).

The compiled extension convs2s._C (csrc/) holds the native backend's C++ CPU kernels, always built where torch is
importable, and its CUDA kernels, built when nvcc is found and torch is a CUDA build. Without nvcc the package
still builds (CPU kernels only) and says so; without torch it installs without the extension. Environment:
  CONVS2S_SKIP_BUILD=1       no extension at all
  CONVS2S_SKIP_CUDA_BUILD=1  CPU kernels only, even where CUDA could be built
  CONVS2S_CUDA_ARCHS="8.0;9.0"  GPU architectures to compile for (default: TORCH_CUDA_ARCH_LIST if set, else the
                             visible GPUs' archs, else "8.0;9.0" = A100 and H100/H200)
  MAX_JOBS=N                 parallel compile jobs (ninja; read by torch's BuildExtension)
  CUDA_HOME                  the CUDA toolkit root (default: asked of nvcc itself, see _cuda_home)
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg: str) -> None:
    warnings.warn(f"convs2s: {msg}", stacklevel=2)
    print(f"convs2s: WARNING: {msg}", file=sys.stderr)


def _cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else the TOP= line of `nvcc --dryrun` (the nvcc on PATH may be a wrapper
    script, from whose location torch would derive a wrong root and fail to link cudart), else None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    root = os.path.realpath(m.group(1).strip()) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if os.path.exists(os.path.join(root, "bin", "nvcc")) else None


def _pip_cuda_includes() -> list[str]:
    """Include folders of the pip CUDA packages (nvidia/cu13/include, ...): torch's headers include cusparse.h etc.,
    which a CUDA build of torch from pip ships there rather than in the toolkit."""
    dirs = []
    for p in sys.path:
        dirs += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _want_cuda() -> bool:
    """Whether to build the CUDA kernels; sets CUDA_HOME for torch.utils.cpp_extension (which reads it at import)."""
    if _flag("CONVS2S_SKIP_CUDA_BUILD"):
        print("convs2s: CONVS2S_SKIP_CUDA_BUILD=1: building the CPU kernels only")
        return False
    import torch
    if torch.version.cuda is None:
        _warn(f"torch {torch.__version__} is a CPU-only build: building the CPU kernels only")
        return False
    home = _cuda_home()
    if home is None:
        _warn("nvcc not found (set CUDA_HOME or put nvcc on PATH): building the CPU kernels only")
        return False
    os.environ["CUDA_HOME"] = home
    archs = os.environ.get("CONVS2S_CUDA_ARCHS")
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: A100 and H100/H200
    print(f"convs2s: building CUDA kernels with CUDA_HOME={home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPUs)')}")
    return True


def _extensions():
    """(ext_modules, cmdclass) for the native backend."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp or _flag("CONVS2S_SKIP_BUILD"):
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _warn("torch is not importable at build time; installing without the native extension")
        return [], {}
    with_cuda = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -fopenmp: at::parallel_for is inline in ATen's headers; without it the CPU kernels would run on one thread.
    # -fno-trapping-math (as torch itself is built): without it gcc does not vectorize the kernels' exp loops.
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
    if with_cuda:
        ext = CUDAExtension(
            "convs2s._C", cpp + cu, include_dirs=_pip_cuda_includes(),
            define_macros=[("CONVS2S_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])
    else:
        ext = CppExtension("convs2s._C", cpp, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["convs2s", "convs2s.*"]) + ["convs2s.kernels"],
    package_dir={"convs2s.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
