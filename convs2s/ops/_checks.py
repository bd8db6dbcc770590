"""Argument validation shared by the ops: readable errors naming the argument, the expected and the actual value."""

from __future__ import annotations

import torch


def check_tensor(name: str, t, ndim: int, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    """`expected` may hold None for a free dimension; `what` names the dimensions, e.g. '(B, T, C_out)'."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        dims = ", ".join("?" if e is None else str(e) for e in expected)
        shown = "(" + dims + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {what} = {shown}, got {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, **others) -> None:
    """All tensors in `others` (None allowed) share ref's device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share "
                             "one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all floating "
                            "inputs must share one dtype")


def autocast_inputs(*tensors):
    """Under autocast, run an op in the autocast dtype (as torch.amp.custom_fwd(cast_inputs=...) would): floating
    tensors other than float64 are cast; float64 stays, as autocast leaves it everywhere (an fp64 model under
    autocast keeps computing in fp64).

    Fused backends need one dtype for all inputs; autocast would otherwise hand them bf16 activations with
    fp32 weights.
    """
    if not isinstance(tensors[0], torch.Tensor):
        return tensors                  # not a tensor: left for the op's checks to name
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
