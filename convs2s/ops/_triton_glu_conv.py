"""The Triton backend of glu_conv, bound as torch.library custom ops (so torch.compile(fullgraph=True) traces it).

    convs2s_triton::glu_conv_fwd(x, weight, bias?, residual?, causal, save_h) -> (y, h)
    convs2s_triton::glu_conv_bwd(dy, x, weight, bias?, h?, has_residual, causal,
                                 need_dx, need_dw, need_db, need_dres) -> (dx, dweight, dbias, dresidual)

Shapes as in convs2s.ops.glu_conv; h is the pre-GLU activation (B, T, 2*C_out) saved for backward (an empty
tensor when save_h is False: backward then recomputes it). Gradients not asked for come back as empty tensors
(a custom op cannot return None). The kernels and launchers are in kernels/glu_conv.py (convs2s.kernels.glu_conv).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from convs2s.kernels import glu_conv as _k

from ._backend import register

# Save h in forward (True) or recompute it in backward (False). Measured on an H200 (kernels/glu_conv.py's
# docstring): recomputing made forward+backward 14-28 % slower to save 2*C_out activations per position.
SAVE_PRE_GLU = True


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("convs2s_triton::glu_conv_fwd", mutates_args=())
def glu_conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], causal: bool,
                 save_h: bool) -> tuple[Tensor, Tensor]:
    y, h = _k.glu_conv_fwd(x, weight, bias, residual, causal, store_h=save_h)
    return y, (h if save_h else _empty(x))


@glu_conv_fwd.register_fake
def _(x, weight, bias, residual, causal, save_h):
    B, T, _ = x.shape
    c2 = weight.shape[2]
    h = x.new_empty(B, T, c2) if save_h else _empty(x)
    return x.new_empty(B, T, c2 // 2), h


@torch.library.custom_op("convs2s_triton::glu_conv_bwd", mutates_args=())
def glu_conv_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], h: Optional[Tensor],
                 has_residual: bool, causal: bool, need_dx: bool, need_dw: bool, need_db: bool,
                 need_dres: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, db, dres = _k.glu_conv_bwd(dy, x, weight, bias, h, has_residual, causal, need_dx=need_dx,
                                       need_dw=need_dw, need_db=need_db, need_dres=need_dres)
    return tuple(t if t is not None else _empty(x) for t in (dx, dw, db, dres))


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


def _backward(ctx, dy, _dh):
    x, weight, bias, h = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
    dx, dw, db, dres = glu_conv_bwd(dy, x, weight, bias, h, ctx.has_residual, ctx.causal,
                                    need_dx, need_dw, need_db, need_dres)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dres if need_dres else None, None, None)


glu_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


@register("glu_conv", "triton")
def glu_conv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    causal: bool) -> Tensor:
    """x (B, T, C_in), weight (k, C_in, 2*C_out), bias (2*C_out,) | None, residual (B, T, C_out) | None
    -> y (B, T, C_out), through the Triton kernels (validated inputs, any strides)."""
    # Nothing to save for backward when no gradient will flow (inference, decoding).
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    y, _ = glu_conv_fwd(x, weight, bias, residual, causal, SAVE_PRE_GLU and grad)
    return y
