"""glu_conv on the native backend: the compiled extension's ops (csrc/glu_conv*.{cpp,cu}) bound to autograd.

    torch.ops.convs2s.glu_conv_native_fwd(x, weight, bias, residual, causal) -> (y, h)
        y (B, T, C_out); h (B*T, 2*C_out): conv(x) without the bias, saved for the backward
    torch.ops.convs2s.glu_conv_native_bwd(grad_y, x, weight, bias, h, has_residual, causal, output_mask)
        -> (grad_x, grad_weight, grad_bias, grad_residual); a gradient that output_mask (x, weight, bias, residual)
        does not ask for, or that has no input (bias None, no residual), is an empty (0,) tensor

The ops are defined in C++ (csrc/module.cpp); this module adds their fake (meta) implementations, so that
torch.compile(fullgraph=True) traces them, and the forward op's autograd formula. Eager calls take the eager fast
path of convs2s/ops/_binding.py: the same formula through an autograd.Function when a gradient is needed, the op
below the autograd layer when none is. Host time per call, measured on the CI machine (one thread, B=1 T=1 C=8,
the binding function against calling the op): forward with grad 66-69 vs 138-153 us, forward + backward 587 vs
729 us, forward without grad 34-36 vs 50-55 us. The C++ op sets the CUDA device itself (it can be called directly
as torch.ops.convs2s.*).
"""

from __future__ import annotations

import torch

import convs2s._C  # noqa: F401  (loading the extension registers torch.ops.convs2s.*)

from ._backend import register
from ._binding import grad_needed


@torch.library.register_fake("convs2s::glu_conv_native_fwd")
def _fwd_fake(x, weight, bias, residual, causal):
    B, T, _ = x.shape
    c2 = weight.shape[2]
    return x.new_empty(B, T, c2 // 2), x.new_empty(B * T, c2)


@torch.library.register_fake("convs2s::glu_conv_native_bwd")
def _bwd_fake(grad_y, x, weight, bias, h, has_residual, causal, output_mask):
    def maybe(wanted, shape):  # a distinct empty tensor each time: fake outputs must not alias
        return x.new_empty(shape if wanted else (0,))
    return (maybe(output_mask[0], x.shape), maybe(output_mask[1], weight.shape),
            maybe(bias is not None and output_mask[2], (weight.shape[2],)),
            maybe(has_residual and output_mask[3], grad_y.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, causal = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for h, (B*T, 2*C_out), every backward
    ctx.save_for_backward(x, weight, bias, h)
    ctx.has_residual = residual is not None
    ctx.causal = causal


def _backward(ctx, grad_y, _grad_h):
    x, weight, bias, h = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    need = ctx.needs_input_grad
    mask = [need[0], need[1], bias is not None and need[2], ctx.has_residual and need[3]]
    grad_x, grad_w, grad_b, grad_res = torch.ops.convs2s.glu_conv_native_bwd(
        grad_y, x, weight, bias, h, ctx.has_residual, ctx.causal, mask)
    return (grad_x if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
            grad_res if mask[3] else None, None)


torch.library.register_autograd("convs2s::glu_conv_native_fwd", _backward, setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """The registered autograd formula without the op's Python autograd layer, for eager calls."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, causal):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.convs2s.glu_conv_native_fwd(x, weight, bias, residual, causal)
        _setup_context(ctx, (x, weight, bias, residual, causal), output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        return _backward(ctx, grad_y, grad_h)


@register("glu_conv", "native")
def _glu_conv_native(x, weight, bias, residual, causal):
    if torch.compiler.is_compiling():
        y, _ = torch.ops.convs2s.glu_conv_native_fwd(x, weight, bias, residual, causal)
    elif grad_needed(x, weight, bias, residual):
        y, _ = _EagerFunction.apply(x, weight, bias, residual, causal)
    else:
        with torch._C._AutoDispatchBelowAutograd():     # no graph to record: straight to the CPU/CUDA kernel
            y, _ = torch.ops.convs2s.glu_conv_native_fwd(x, weight, bias, residual, causal)
    return y
