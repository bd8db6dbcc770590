"""What every Triton kernel file shares: the interpreter flag and the one way autotuning is set up.

    INTERPRET         TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors (no GPU needed).
    AUTOTUNE          autotune over a kernel's GPU config list; off in the interpreter and with
                      CONVS2S_TRITON_AUTOTUNE=0 (a GPU test run then compiles each kernel variant once, not once
                      per config).
    autotune_configs  the config list to hand to @triton.autotune.
    cast_for_store    (jit) a value in a pointer's element type, rounded to nearest as on a GPU, also in the
                      interpreter (whose fp32 -> bf16 cast truncates).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("CONVS2S_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
_ROUND_BF16 = tl.constexpr(INTERPRET)


def autotune_configs(gpu: list[triton.Config], fixed: triton.Config | None = None) -> list[triton.Config]:
    """`gpu` when AUTOTUNE, else the single config `fixed` (default gpu[0]).

    A single config is required in the interpreter: @triton.autotune with two or more configs fails without a GPU
    driver ("0 active drivers"); with one config the autotuner runs it without timing.
    """
    if not gpu:
        raise ValueError("autotune_configs needs at least one GPU config")
    return list(gpu) if AUTOTUNE else [fixed if fixed is not None else gpu[0]]


@triton.jit
def rne_bf16(x):
    """fp32 x rounded to the nearest bfloat16 value (ties to even), still as fp32: a cast to bf16 is then exact."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def cast_for_store(v, ptr):
    """fp32 v in ptr's element type, rounded to nearest. The interpreter's fp32 -> bf16 cast truncates, which
    doubles the mean error of a bf16 result against a GPU's round-to-nearest (measured: 2.3e-3 vs 1.1e-3 on
    randn values): there the value is rounded first."""
    if _ROUND_BF16 and ptr.dtype.element_ty == tl.bfloat16:
        v = rne_bf16(v)
    return v.to(ptr.dtype.element_ty)
