"""glu_conv_step on the native backend: the compiled extension's op (csrc/glu_conv_step*.{h,cpp,cu}).

    torch.ops.convs2s.glu_conv_step_native(x, conv_state, weight, bias, residual) -> y
        x (B, C_in), conv_state (B, k-1, C_in) contiguous, mutated in place (schema `Tensor(a!) conv_state`),
        weight (k, C_in, 2*C_out), bias (2*C_out,) | None, residual (B, C_out) | None -> y (B, C_out)

The op is defined in C++ (TORCH_LIBRARY); this module adds its fake (meta) implementation, so that
torch.compile(fullgraph=True) traces it. An inference op: no autograd formula.
"""

from __future__ import annotations

import torch

import convs2s._C  # noqa: F401  (loading the extension registers torch.ops.convs2s.*)

from ._backend import register


@torch.library.register_fake("convs2s::glu_conv_step_native")
def _step_fake(x, conv_state, weight, bias, residual):
    return x.new_empty(x.shape[0], weight.shape[2] // 2)


@register("glu_conv_step", "native")
def _glu_conv_step_native(x, conv_state, weight, bias, residual):
    return torch.ops.convs2s.glu_conv_step_native(x, conv_state, weight, bias, residual)
