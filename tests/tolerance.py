"""The tolerance rule for fused kernels (flash-attention's).

A fused result in low precision is compared with an fp64 reference; its error may be at most `factor` (2) times
the error of the PyTorch reference run in the same low precision against that fp64 reference, plus a small floor
(for outputs where the low-precision reference happens to be nearly exact). Errors are printed before asserting,
so a failing CI log shows by how much.
"""

from __future__ import annotations

import torch

# Floors per dtype: about a few ulps of a unit-sized value in that precision.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def errors(a: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    # On the CPU: the fp64 reference is often computed there while the fused result lives on the GPU (the
    # conv_attention tests' only GPU run failed 20 cases on exactly that device mismatch).
    d = (a.detach().cpu().double() - ref64.detach().cpu().double()).abs()
    return d.max().item(), d.mean().item()


def assert_close_rule(name: str, fused: torch.Tensor, lowp_ref: torch.Tensor, ref64: torch.Tensor,
                      dtype: torch.dtype, factor: float = 2.0, floor: float | None = None) -> None:
    """max|fused - ref64| <= factor * max|lowp_ref - ref64| + floor, and the same for mean errors."""
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref64.shape)}"
    floor = FLOOR[dtype] if floor is None else floor
    f_max, f_mean = errors(fused, ref64)
    r_max, r_mean = errors(lowp_ref, ref64)
    scale = ref64.abs().max().item()
    print(f"{name:>12} {str(dtype):>15}: fused max {f_max:.3e} mean {f_mean:.3e} | "
          f"torch max {r_max:.3e} mean {r_mean:.3e} | max|ref| {scale:.3e}")
    assert torch.isfinite(fused).all(), f"{name}: non-finite values in the fused result"
    assert f_max <= factor * r_max + floor * max(1.0, scale), (
        f"{name}: max error {f_max:.3e} > {factor} x {r_max:.3e} + floor")
    assert f_mean <= factor * r_mean + floor * max(1.0, scale), (
        f"{name}: mean error {f_mean:.3e} > {factor} x {r_mean:.3e} + floor")
