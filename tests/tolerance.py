"""The tolerance rule for fused kernels (flash-attention's).

A fused result in low precision is compared with an fp64 reference. Its maximum error may be at most `factor` (2)
times the maximum error of the PyTorch reference run in the same low precision against that fp64 reference, plus a
dtype floor of a few ulps (for outputs where the low-precision reference happens to be nearly exact at its worst
element). Its mean error may be at most `factor` times the reference's mean error, with no dtype floor: a floor
sized for the single worst element would let a result that is uniformly a few ulps (bf16: 2-3 %) off pass on
average. The mean check's only slack is fp64 round-off (MEAN_FLOOR), for outputs the low-precision reference gets
exactly right. It applies to outputs of at least MEAN_MIN_ELEMENTS elements: the mean of a handful of errors is as
noisy as their maximum (one element: the same number), which the max check already bounds, while a systematic
offset shows in any output of that size. Errors are printed before asserting, so a failing CI log shows by how
much.
"""

from __future__ import annotations

import torch

# Floors of the max-error check per dtype: about a few ulps of a unit-sized value in that precision.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The mean-error check's floor, for every dtype: fp64 round-off of a unit-sized value.
MEAN_FLOOR = 1e-12
# Below this many elements only the max check applies. A (1, 1, 1) fp32 attention output 2.6 ulps from fp64 while
# torch's happened to be 0.6 ulps off failed a mean check that, at one element, is the max check without its floor.
MEAN_MIN_ELEMENTS = 64


def errors(a: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    # On the CPU: the fp64 reference is often computed there while the fused result lives on the GPU (the
    # fp64 reference and a GPU result must not be compared across devices).
    d = (a.detach().cpu().double() - ref64.detach().cpu().double()).abs()
    return d.max().item(), d.mean().item()


def assert_close_rule(name: str, fused: torch.Tensor, lowp_ref: torch.Tensor, ref64: torch.Tensor,
                      dtype: torch.dtype, factor: float = 2.0, floor: float | None = None) -> None:
    """max|fused - ref64| <= factor * max|lowp_ref - ref64| + floor * max(1, max|ref64|), and
    mean|fused - ref64| <= factor * mean|lowp_ref - ref64| + MEAN_FLOOR * max(1, max|ref64|)
    (the mean check for outputs of at least MEAN_MIN_ELEMENTS elements).

    floor: the max check's floor (default FLOOR[dtype]).
    """
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref64.shape)}"
    floor = FLOOR[dtype] if floor is None else floor
    assert torch.isfinite(fused).all(), f"{name}: non-finite values in the fused result"
    if fused.numel() == 0:
        return
    f_max, f_mean = errors(fused, ref64)
    r_max, r_mean = errors(lowp_ref, ref64)
    ref_max = ref64.abs().max().item()
    scale = max(1.0, ref_max)
    print(f"{name:>12} {str(dtype):>15}: fused max {f_max:.3e} mean {f_mean:.3e} | "
          f"torch max {r_max:.3e} mean {r_mean:.3e} | max|ref| {ref_max:.3e}")
    assert f_max <= factor * r_max + floor * scale, (
        f"{name}: max error {f_max:.3e} > {factor} x {r_max:.3e} + floor {floor * scale:.3e}")
    assert fused.numel() < MEAN_MIN_ELEMENTS or f_mean <= factor * r_mean + MEAN_FLOOR * scale, (
        f"{name}: mean error {f_mean:.3e} > {factor} x {r_mean:.3e} (no dtype floor on the mean)")
