"""The Triton backend of conv_attention as torch.library custom ops (forward, backward, autograd, fake tensors).

    convs2s::conv_attention_triton_fwd(x, target_embedding, encoder_keys, encoder_values, src_padding_mask?,
                                       w_in, b_in, w_out, b_out, need_weights)
        -> (out (B, Tt, C), attn (B, Tt, Ts) or (0,), ctx (B, Tt, E), q0 (B, Tt, E), lse (B, Tt) fp64,
            root_s (B,) fp32)
    convs2s::conv_attention_triton_bwd(dout, dattn?, x, encoder_keys, encoder_values, src_padding_mask?, w_in,
                                       w_out, ctx, q0, lse, root_s, attn?)
        -> (dx, dtarget_embedding, dkeys, dvalues, dw_in, db_in, dw_out, db_out)

ctx, q0, lse and root_s are returned only for backward (not differentiable). Both ops are opaque to
torch.compile, which traces them through their fake implementations (fullgraph=True works). Eager calls run the
same launchers through _EagerFunction, or bare when no gradient will flow (the eager fast path,
convs2s/ops/_binding.py). float32, float16 and bfloat16 only; the gradient of a loss on the attention weights is
supported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convs2s.kernels import conv_attention as _k

from ._backend import register
from ._binding import device_guard, grad_needed

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _forward_impl(x, *args):
    with device_guard(x):
        return _k.conv_attention_forward(x, *args)


def _backward_impl(dout, dattn, x, *args):
    with device_guard(x):
        return _k.conv_attention_backward(dout, dattn, x, *args)


@torch.library.custom_op("convs2s::conv_attention_triton_fwd", mutates_args=())
def _fwd(x: Tensor, target_embedding: Tensor, encoder_keys: Tensor, encoder_values: Tensor,
         src_padding_mask: Tensor | None, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor,
         need_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out,
                         b_out, need_weights)


@_fwd.register_fake
def _(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out,
      need_weights):
    B, Tt, C = x.shape
    E = target_embedding.shape[2]
    Ts = encoder_keys.shape[1]
    out = x.new_empty(B, Tt, C)
    attn = x.new_empty(B, Tt, Ts) if need_weights else x.new_empty(0)
    return (out, attn, x.new_empty(B, Tt, E), x.new_empty(B, Tt, E),
            torch.empty(B, Tt, device=x.device, dtype=torch.float64),
            torch.empty(B, device=x.device, dtype=torch.float32))


@torch.library.custom_op("convs2s::conv_attention_triton_bwd", mutates_args=())
def _bwd(dout: Tensor, dattn: Tensor | None, x: Tensor, encoder_keys: Tensor, encoder_values: Tensor,
         src_padding_mask: Tensor | None, w_in: Tensor, w_out: Tensor, ctx: Tensor, q0: Tensor, lse: Tensor,
         root_s: Tensor, attn: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                          Tensor]:
    return _backward_impl(dout, dattn, x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, ctx, q0, lse,
                          root_s, attn)


@_bwd.register_fake
def _(dout, dattn, x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, ctx, q0, lse, root_s, attn):
    B, Ts, E = encoder_keys.shape
    return (x.new_empty(x.shape), q0.new_empty(q0.shape), q0.new_empty(B, Ts, E), q0.new_empty(B, Ts, E),
            w_in.new_empty(w_in.shape), w_in.new_empty(w_in.shape[0]), w_out.new_empty(w_out.shape),
            w_out.new_empty(w_out.shape[0]))


def _setup_context(ctx, inputs, output):
    x, _, encoder_keys, encoder_values, src_padding_mask, w_in, _, w_out, _, need_weights = inputs
    _, attn, ctx_, q0, lse, root_s = output
    ctx.need_weights = need_weights
    ctx.save_for_backward(x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, ctx_, q0, lse, root_s,
                          attn if need_weights else None)
    ctx.mark_non_differentiable(*([] if need_weights else [attn]), *output[2:])
    # Unused outputs get None rather than a zero tensor (a (B, Tt, Ts) zero gradient for unused weights).
    ctx.set_materialize_grads(False)


def _gradients(ctx, dout, dattn, backward):
    """The 10 input gradients from the saved tensors; `backward` is _bwd (the custom op) or _backward_impl."""
    x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, ctx_, q0, lse, root_s, attn = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(x.shape, device=x.device, dtype=x.dtype)
    if not ctx.need_weights:
        dattn = None
    dx, dq0, dk, dv, dw_in, db_in, dw_out, db_out = backward(
        dout, dattn, x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, ctx_, q0, lse, root_s, attn)
    # dL/dtarget_embedding is dL/dq0 itself (q0 = x @ w_in.T + b_in + target_embedding).
    return dx, dq0, dk, dv, None, dw_in, db_in, dw_out, db_out, None


_fwd.register_autograd(lambda ctx, dout, dattn, *_: _gradients(ctx, dout, dattn, _bwd),
                       setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """The same forward and backward without the custom-op layer, for eager calls (convs2s/ops/_binding.py): at
    B = 64, Tt = Ts = 32 the whole eager reference forward takes ~240 us on an H200, host-bound."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0], output[1]

    @staticmethod
    def backward(ctx, dout, dattn):
        return _gradients(ctx, dout, dattn, _backward_impl)


@register("conv_attention", "triton")
def conv_attention_triton(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out,
                          b_out, need_weights):
    if x.dtype not in _DTYPES:
        # The kernels accumulate and keep their softmax statistics in fp32: an fp64 result would be fp32-accurate.
        raise TypeError(f"the triton backend of conv_attention runs {', '.join(map(str, _DTYPES))}; got {x.dtype} "
                        "(backend='reference' runs any floating dtype)")
    args = (x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out,
            need_weights)
    if torch.compiler.is_compiling():
        out, attn, *_ = _fwd(*args)
    elif grad_needed(x, target_embedding, encoder_keys, encoder_values, w_in, b_in, w_out, b_out):
        out, attn = _EagerFunction.apply(*args)
    else:                               # nothing to save for a backward (inference, decoding)
        out, attn, *_ = _forward_impl(*args)
    return out, (attn if need_weights else None)
