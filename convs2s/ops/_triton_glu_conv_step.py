"""The Triton backend of glu_conv_step as a torch.library custom op (mutating, with a fake implementation).

    convs2s::glu_conv_step_triton(x, conv_state, weight, bias?, residual?) -> y      conv_state mutated in place

Shapes as in convs2s.ops.glu_conv_step. torch.compile traces the custom op through its fake implementation
(mutates_args tells it conv_state changes); eager calls run the launcher directly (the eager fast path,
convs2s/ops/_binding.py; an inference op has no autograd). float32, float16 and bfloat16 only. The kernels and
the launcher are in kernels/glu_conv_step.py (convs2s.kernels.glu_conv_step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from convs2s.kernels import glu_conv_step as _k

from ._backend import register
from ._binding import device_guard

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _step_impl(x, conv_state, weight, bias, residual):
    with device_guard(x):
        return _k.glu_conv_step(x, conv_state, weight, bias, residual)


@torch.library.custom_op("convs2s::glu_conv_step_triton", mutates_args=("conv_state",))
def glu_conv_step_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                     residual: Tensor | None) -> Tensor:
    return _step_impl(x, conv_state, weight, bias, residual)


@glu_conv_step_op.register_fake
def _(x, conv_state, weight, bias, residual):
    return x.new_empty(x.shape[0], weight.shape[2] // 2)


@register("glu_conv_step", "triton")
def glu_conv_step_triton(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                         residual: Tensor | None) -> Tensor:
    """x (B, C_in), conv_state (B, k-1, C_in) contiguous (shifted in place), weight (k, C_in, 2*C_out),
    bias (2*C_out,) | None, residual (B, C_out) | None -> y (B, C_out), through the Triton kernels (validated
    inputs, any strides but the state's)."""
    if x.dtype not in _DTYPES:
        # The kernels accumulate in fp32 (tf32 dots where torch allows them): an fp64 result would be fp32-accurate.
        raise TypeError(f"the triton backend of glu_conv_step runs {', '.join(map(str, _DTYPES))}; got {x.dtype} "
                        "(backend='reference' or 'native' runs float64)")
    if torch.compiler.is_compiling():
        return glu_conv_step_op(x, conv_state, weight, bias, residual)
    return _step_impl(x, conv_state, weight, bias, residual)
