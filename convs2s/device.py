"""Device choice for the application layer (train, translate, evaluate, plot-attention).

    resolve_device("auto")     cuda when torch sees a GPU, else cpu
    resolve_device("cuda:1")   checked: a clear ValueError when CUDA or that GPU is missing
    autocast_for(device)       bf16 autocast on CUDA, nothing elsewhere (CPU runs fp32)
"""

from __future__ import annotations

import contextlib

import torch

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> torch.device, checked here so that a missing GPU
    is one readable ValueError rather than a failure deep inside the first CUDA call."""
    name = device.strip().lower() if isinstance(device, str) else device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU"
            raise ValueError(f"device {device!r} requested but CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} requested but only {count} GPU(s) are visible "
                             f"(cuda:0 to cuda:{count - 1})")
    return dev


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
