"""What every Triton kernel file shares: the interpreter flag and the one way autotuning is set up.

    INTERPRET         TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors (no GPU needed).
    AUTOTUNE          autotune over a kernel's GPU config list; off in the interpreter and with
                      CONVS2S_TRITON_AUTOTUNE=0 (a GPU test run then compiles each kernel variant once, not once
                      per config).
    autotune_configs  the config list to hand to @triton.autotune.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("CONVS2S_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET


def autotune_configs(gpu: list[triton.Config], fixed: triton.Config | None = None) -> list[triton.Config]:
    """`gpu` when AUTOTUNE, else the single config `fixed` (default gpu[0]).

    A single config is required in the interpreter: @triton.autotune with two or more configs fails without a GPU
    driver ("0 active drivers"); with one config the autotuner runs it without timing.
    """
    if not gpu:
        raise ValueError("autotune_configs needs at least one GPU config")
    return list(gpu) if AUTOTUNE else [fixed if fixed is not None else gpu[0]]
