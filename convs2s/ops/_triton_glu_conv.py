"""The Triton backend of glu_conv as torch.library custom ops (forward, backward, autograd, fake tensors).

    convs2s::glu_conv_triton_fwd(x, weight, bias?, residual?, causal, save_h) -> (y, h)
    convs2s::glu_conv_triton_bwd(dy, x, weight, bias?, h?, has_residual, causal,
                                 need_dx, need_dw, need_db, need_dres) -> (dx, dweight, dbias, dresidual)

Shapes as in convs2s.ops.glu_conv; h is the pre-GLU activation (B, T, 2*C_out) saved for backward (an empty
tensor when save_h is False: backward then recomputes it). Gradients not asked for come back as empty tensors
(a custom op cannot return None). torch.compile traces the custom ops through their fake implementations
(fullgraph=True works); eager calls run the same launchers through _EagerFunction (the eager fast path,
convs2s/ops/_binding.py). float32, float16 and bfloat16 only. The kernels and launchers are in kernels/glu_conv.py
(convs2s.kernels.glu_conv).
"""

from __future__ import annotations

import torch
from torch import Tensor

from convs2s.kernels import glu_conv as _k

from ._backend import register
from ._binding import device_guard, grad_needed

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Save h in forward (True) or recompute it in backward (False). Measured on an H200 (kernels/glu_conv.py's
# docstring): recomputing made forward+backward 14-28 % slower to save 2*C_out activations per position.
SAVE_PRE_GLU = True


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _forward_impl(x, weight, bias, residual, causal, save_h):
    with device_guard(x):
        y, h = _k.glu_conv_fwd(x, weight, bias, residual, causal, store_h=save_h)
    return y, (h if save_h else _empty(x))


def _backward_impl(dy, x, weight, bias, h, has_residual, causal, need_dx, need_dw, need_db, need_dres):
    with device_guard(x):
        grads = _k.glu_conv_bwd(dy, x, weight, bias, h, has_residual, causal, need_dx=need_dx, need_dw=need_dw,
                                need_db=need_db, need_dres=need_dres)
    return tuple(t if t is not None else _empty(x) for t in grads)


@torch.library.custom_op("convs2s::glu_conv_triton_fwd", mutates_args=())
def glu_conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, causal: bool,
                 save_h: bool) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, weight, bias, residual, causal, save_h)


@glu_conv_fwd.register_fake
def _(x, weight, bias, residual, causal, save_h):
    B, T, _ = x.shape
    c2 = weight.shape[2]
    h = x.new_empty(B, T, c2) if save_h else _empty(x)
    return x.new_empty(B, T, c2 // 2), h


@torch.library.custom_op("convs2s::glu_conv_triton_bwd", mutates_args=())
def glu_conv_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor | None,
                 has_residual: bool, causal: bool, need_dx: bool, need_dw: bool, need_db: bool,
                 need_dres: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(dy, x, weight, bias, h, has_residual, causal, need_dx, need_dw, need_db, need_dres)


@glu_conv_bwd.register_fake
def _(dy, x, weight, bias, h, has_residual, causal, need_dx, need_dw, need_db, need_dres):
    B, T, _ = x.shape
    c_out = weight.shape[2] // 2
    return (x.new_empty(x.shape) if need_dx else _empty(x),
            x.new_empty(weight.shape) if need_dw else _empty(x),
            x.new_empty(weight.shape[2]) if need_db and bias is not None else _empty(x),
            x.new_empty(B, T, c_out) if need_dres and has_residual else _empty(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, causal, save_h = inputs
    _, h = output
    ctx.save_for_backward(x, weight, bias, h if save_h else None)
    ctx.causal = causal
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)    # else autograd fills a zero gradient for h, (B, T, 2*C_out), every backward


def _gradients(ctx, dy, backward):
    """The 6 input gradients from the saved tensors; `backward` is glu_conv_bwd (the custom op) or _backward_impl."""
    if dy is None:                      # y does not reach the loss
        return (None,) * 6
    x, weight, bias, h = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
    dx, dw, db, dres = backward(dy, x, weight, bias, h, ctx.has_residual, ctx.causal, need_dx, need_dw, need_db,
                                need_dres)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dres if need_dres else None, None, None)


glu_conv_fwd.register_autograd(lambda ctx, dy, _dh: _gradients(ctx, dy, glu_conv_bwd), setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """The same forward and backward without the custom-op layer, for eager calls (convs2s/ops/_binding.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, causal, save_h):
        output = _forward_impl(x, weight, bias, residual, causal, save_h)
        _setup_context(ctx, (x, weight, bias, residual, causal, save_h), output)
        return output

    @staticmethod
    def backward(ctx, dy, _dh):
        return _gradients(ctx, dy, _backward_impl)


@register("glu_conv", "triton")
def glu_conv_triton(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                    causal: bool) -> Tensor:
    """x (B, T, C_in), weight (k, C_in, 2*C_out), bias (2*C_out,) | None, residual (B, T, C_out) | None
    -> y (B, T, C_out), through the Triton kernels (validated inputs, any strides)."""
    if x.dtype not in _DTYPES:
        # The kernels accumulate in fp32 (tf32 dots where torch allows them): an fp64 result would be fp32-accurate.
        raise TypeError(f"the triton backend of glu_conv runs {', '.join(map(str, _DTYPES))}; got {x.dtype} "
                        "(backend='reference' or 'native' runs float64)")
    grad = grad_needed(x, weight, bias, residual)
    if torch.compiler.is_compiling():
        y, _ = glu_conv_fwd(x, weight, bias, residual, causal, SAVE_PRE_GLU and grad)
    elif grad:
        y, _ = _EagerFunction.apply(x, weight, bias, residual, causal, SAVE_PRE_GLU)
    else:                               # nothing to save for a backward (inference, decoding)
        y, _ = _forward_impl(x, weight, bias, residual, causal, False)
    return y
