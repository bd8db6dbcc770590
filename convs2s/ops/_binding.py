"""Helpers shared by the binding layers (convs2s/ops/_<backend>_<op>.py), so every op binds the same way.

    device_guard(t)      the CUDA device guard: kernels launch on t's GPU, whatever the current device is
    grad_needed(*ts)     whether autograd will ask for a gradient of any of ts (the eager fast path's test)

The eager fast path, the same for every fused op and backend: under torch.compile the public function calls the
op's custom op (traced through its fake implementation); in eager mode it skips the op's autograd registration:
through an autograd.Function when a gradient is needed (a torch.library custom op with autograd costs ~63 us of
host time per call against ~15 us for an autograd.Function, measured on the CI machine), and straight to the
kernels, saving nothing for a backward, when none is. Triton: the launchers of kernels/<op>.py; native: the C++ op
below the autograd layer (torch._C._AutoDispatchBelowAutograd).
"""

from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """torch.cuda.device(t.device) for a CUDA tensor, else a no-op context."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def grad_needed(*tensors) -> bool:
    """True iff grad mode is on and any of `tensors` (None allowed) requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
