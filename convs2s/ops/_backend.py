"""Backend discovery and dispatch for the fused ops.

Backends:
  "reference"  plain PyTorch (convs2s.ops.<op>_ref); always usable.
  "triton"     Triton kernels (kernels/<op>.py); needs `import triton` and either a CUDA tensor or
               TRITON_INTERPRET=1 (the interpreter runs the same kernels on CPU tensors).
  "native"     the compiled extension convs2s._C (csrc/): C++ CPU kernels, plus CUDA kernels when it was built
               with nvcc against a CUDA build of torch.
  "auto"       CUDA tensors -> the fastest backend (SPEED_ORDER) that GPU_VALIDATED records as having passed its
                               GPU test suite on this GPU's architecture, else reference;
               CPU tensors  -> native if built, else reference.
               The environment variable CONVS2S_BACKEND overrides "auto" (an explicit argument is not overridden).
               explain_auto(op, device) says what auto picks and why each other backend is not picked.

An explicit backend that cannot run the given tensors raises BackendUnavailableError; there is no silent
fallback.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "native")

# The record of GPU test runs: (op, backend) -> the runs in which that backend's whole GPU test suite for the op
# passed, one entry per GPU architecture ("sm_90": H100, H200). `auto` on a CUDA tensor picks only a backend
# recorded for the device's architecture: kernels that never passed on a GPU are not chosen for the user.
# bench/device_check.sh prints the entries to add after a green test step; add them in a commit of their own.
GPU_VALIDATED: dict[tuple[str, str], list[dict[str, str]]] = {
    ("glu_conv", "triton"): [
        {"arch": "sm_90", "gpu": "NVIDIA H200", "commit": "183ad48", "date": "2026-11-26",
         "versions": "torch 2.11.0+cu130, triton 3.6.0",
         "tests": "tests/test_glu_conv_triton.py, CONVS2S_TRITON_AUTOTUNE=0: 80 passed, 1 failed, 51 skipped "
                  "(bench/results/2026-11-26-h200-dev2-tests.log). The failure was the test's hand tolerance "
                  "(1e-5 between two fp32 summation orders of dW, 7.8e-5 apart), not the kernels; the test now "
                  "holds both orders to fp64 under the tolerance rule and awaits a GPU rerun (issue 15)."},
    ],
}

# On CUDA, fastest first, among the backends GPU_VALIDATED records. glu_conv: Triton measured on an H200
# (bench/results/2026-11-26-h200-dev5-glu_conv.json), native never timed on a GPU. conv_attention and
# glu_conv_step: neither fused backend timed on a GPU yet; the order is the one to try first.
SPEED_ORDER: dict[str, tuple[str, ...]] = {
    "glu_conv": ("triton", "native"),
    "conv_attention": ("native", "triton"),
    "glu_conv_step": ("native", "triton"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(e).__name__}: {e})"
    try:
        importlib.import_module("convs2s.kernels")
    except Exception as e:
        return f"the Triton kernels failed to import ({type(e).__name__}: {e})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _native_module():
    """The compiled extension, or the error string saying why it is missing."""
    try:
        return importlib.import_module("convs2s._C"), None
    except Exception as e:
        return None, (f"the compiled extension convs2s._C is not importable ({type(e).__name__}: {e}); "
                      "build it with `pip install -e . --no-build-isolation`")


def native_has_cuda() -> bool:
    mod, _ = _native_module()
    return bool(mod is not None and getattr(mod, "has_cuda", lambda: False)())


def why_not(backend: str, device: torch.device | str | None = None) -> str | None:
    """None if `backend` can run tensors on `device` (None: on any device this machine has), else the reason."""
    dev = torch.device(device) if device is not None else None
    if backend == "reference":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if dev is None:
            if torch.cuda.is_available() or _interpreting():
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU)"
        if dev.type == "cuda":
            return None
        if dev.type == "cpu" and _interpreting():
            return None
        return (f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                f"got {dev.type} tensors")
    if backend == "native":
        mod, err = _native_module()
        if mod is None:
            return err
        if dev is not None and dev.type == "cuda" and not native_has_cuda():
            return "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if dev is not None and dev.type not in ("cpu", "cuda"):
            return f"the extension has CPU and CUDA kernels only; got {dev.type} tensors"
        return None
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """{backend: None if usable here, else the reason it is not}, for `device` (default: any device here).

    Usable is not picked: on CUDA, auto also needs a GPU test record (GPU_VALIDATED); explain_auto says which."""
    return {b: why_not(b, device) for b in BACKENDS}


def cuda_arch(device: torch.device | str) -> str:
    """"sm_90" for a compute-capability 9.0 device: the architecture GPU_VALIDATED is keyed by."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"sm_{major}{minor}"


def gpu_record(op: str, backend: str, arch: str) -> dict[str, str] | None:
    """The GPU_VALIDATED entry of (op, backend) for `arch`, or None."""
    return next((r for r in GPU_VALIDATED.get((op, backend), []) if r["arch"] == arch), None)


def explain_auto(op: str, device: torch.device | str) -> tuple[str, dict[str, str]]:
    """(the backend `auto` picks for `op` on `device`, {every other backend: why auto does not pick it}).
    CONVS2S_BACKEND is not consulted: this is auto's own choice."""
    device = torch.device(device)
    skipped: dict[str, str] = {}
    if device.type == "cuda":
        arch = cuda_arch(device)
        order = [b for b in SPEED_ORDER.get(op, ()) if b != "reference"]
    else:
        arch, order = None, ["native"]
    chosen = "reference"
    for b in order:
        reason = why_not(b, device)
        if reason is None and _lookup(op, b) is None:
            reason = f"op {op!r} has no {b!r} implementation"
        if reason is None and arch is not None and gpu_record(op, b, arch) is None:
            reason = (f"usable, but its GPU test suite for {op} has not passed on {arch} (no GPU_VALIDATED entry in "
                      "convs2s/ops/_backend.py; bench/device_check.sh records one)")
        if reason is None and chosen == "reference":
            chosen = b
        elif reason is None:
            reason = f"validated, but {chosen!r} is faster (SPEED_ORDER)"
        skipped[b] = reason
    for b in BACKENDS:
        if b not in skipped and b != chosen:
            skipped[b] = "the fallback when no fused backend is picked" if b == "reference" else (
                f"not considered by auto on {device.type} tensors")
    skipped.pop(chosen, None)
    return chosen, skipped


def resolve(op: str, backend: str, device: torch.device):
    """(name, callable) of the backend that runs `op` for `backend` ("auto" or a name) on `device`.

    Raises BackendUnavailableError when an explicitly named backend cannot run here.
    """
    name = _resolve_name(op, backend, str(device))
    return name, _IMPLS[(op, name)]


def resolve_backend(op: str, backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The name of the backend ("reference" | "triton" | "native") that runs `op` for `backend` ("auto" or a
    name) on `device`: what "auto" and CONVS2S_BACKEND pick here. Raises BackendUnavailableError when an
    explicitly named backend cannot run here."""
    return _resolve_name(op, backend, str(torch.device(device)))


# torch.compile cannot trace the discovery below (importlib, lru_cache'd import probes) nor bake a returned
# function into its graph; it can bake a string. So the name is resolved eagerly at trace time, and the
# callable is a plain dict lookup.
@torch.compiler.assume_constant_result
def _resolve_name(op: str, backend: str, device_str: str) -> str:
    device = torch.device(device_str)
    if backend == "auto":
        env = os.environ.get("CONVS2S_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            return explain_auto(op, device)[0]
    reason = why_not(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {device.type} tensors here: {reason}")
    fn = _lookup(op, backend)
    if fn is None:
        raise BackendUnavailableError(f"op {op!r} has no {backend!r} implementation yet")
    return backend


_IMPLS: dict[tuple[str, str], object] = {}


def register(op: str, backend: str):
    """Decorator: register `fn` as the implementation of `op` for `backend`."""
    def deco(fn):
        _IMPLS[(op, backend)] = fn
        return fn
    return deco


def _lookup(op: str, backend: str):
    """The callable registered for (op, backend), or None.

    Each fused backend of an op binds itself in convs2s/ops/_<backend>_<op>.py (custom-op registration, autograd,
    fake tensors), imported here on first use so that `import convs2s` never needs triton or the extension.
    """
    if (op, backend) not in _IMPLS and backend != "reference":
        module = f"convs2s.ops._{backend}_{op}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside the binding module: show it
                raise
    return _IMPLS.get((op, backend))
