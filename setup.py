"""Build and install convs2s.

`pip install -e . --no-build-isolation` (or `pip install . --no-build-isolation`): the isolated build environment
pip would otherwise create pulls a different torch than the one installed, so build against the installed one.

The Triton kernels live in ./kernels and are installed as `convs2s.kernels` (a top-level `kernels` module would
collide with other packages of that name). The compiled extension (csrc/) is added by `_extensions()` when there
are sources to build and torch is importable; without torch, nvcc or a CUDA build of torch the package still
installs and the reference/Triton backends work.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """(ext_modules, cmdclass) for the native backend; empty while csrc/ holds no sources."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("CONVS2S_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("convs2s: torch is not importable at build time; skipping the native extension")
        return [], {}
    ext = CppExtension("convs2s._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="convs2s",
    version="0.1.0",
    description="ConvS2S translation with fused Triton / C++ / CUDA kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["convs2s", "convs2s.*"]) + ["convs2s.kernels"],
    package_dir={"convs2s.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "sacrebleu", "tqdm"],
    extras_require={"triton": ["triton"], "plot": ["matplotlib"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"]},
    entry_points={"console_scripts": ["convs2s = convs2s.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
