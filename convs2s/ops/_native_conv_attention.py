"""conv_attention on the native backend: the compiled extension's ops (csrc/conv_attention*.{cpp,cu}) bound to
autograd.

    torch.ops.convs2s.conv_attention_native_fwd(x, target_embedding, encoder_keys, encoder_values,
                                                src_padding_mask, w_in, b_in, w_out, b_out, need_weights)
        -> (out (B, Tt, C), attn (B, Tt, Ts) if need_weights else (0,),
            q (B, Tt, E), ctx (B, Tt, E), lse (B, Tt) fp64)   the last three for the backward
    torch.ops.convs2s.conv_attention_native_bwd(grad_out, grad_attn, x, encoder_keys, encoder_values,
                                                src_padding_mask, w_in, w_out, q, ctx, lse)
        -> (grad_x, grad_target_embedding, grad_keys, grad_values, grad_w_in, grad_b_in, grad_w_out, grad_b_out)

The ops are defined in C++ (TORCH_LIBRARY_FRAGMENT); this module adds their fake (meta) implementations, so that
torch.compile(fullgraph=True) traces them, and the forward op's autograd formula. The returned attention
probabilities are differentiable (their gradient joins the softmax's).
"""

from __future__ import annotations

import torch

import convs2s._C  # noqa: F401  (loading the extension registers torch.ops.convs2s.*)

from ._backend import register


@torch.library.register_fake("convs2s::conv_attention_native_fwd")
def _fwd_fake(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out,
              need_weights):
    B, Tt, _ = x.shape
    Ts, E = encoder_keys.shape[1], encoder_keys.shape[2]
    return (x.new_empty(x.shape), x.new_empty((B, Tt, Ts) if need_weights else (0,)), x.new_empty(B, Tt, E),
            x.new_empty(B, Tt, E), x.new_empty(B, Tt, dtype=torch.float64))


@torch.library.register_fake("convs2s::conv_attention_native_bwd")
def _bwd_fake(grad_out, grad_attn, x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, q, ctx, lse):
    return (x.new_empty(x.shape), q.new_empty(q.shape), encoder_keys.new_empty(encoder_keys.shape),
            encoder_values.new_empty(encoder_values.shape), w_in.new_empty(w_in.shape),
            w_in.new_empty(w_in.shape[0]), w_out.new_empty(w_out.shape), w_out.new_empty(w_out.shape[0]))


def _setup_context(ctx, inputs, output):
    x, _, encoder_keys, encoder_values, src_padding_mask, w_in, _, w_out, _, need_weights = inputs
    _, attn, q, context, lse = output
    ctx.mark_non_differentiable(q, context, lse)
    if not need_weights:
        ctx.mark_non_differentiable(attn)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for q, ctx, lse or unused weights
    ctx.save_for_backward(x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, q, context, lse)
    ctx.need_weights = need_weights


def _backward(ctx, grad_out, grad_attn, _grad_q, _grad_ctx, _grad_lse):
    x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out, q, context, lse = ctx.saved_tensors
    if grad_attn is None and grad_out is None:
        return (None,) * 10
    if grad_out is None:  # only the attention weights reach the loss
        grad_out = torch.zeros_like(x)
    grads = torch.ops.convs2s.conv_attention_native_bwd(
        grad_out, grad_attn if ctx.need_weights else None, x, encoder_keys, encoder_values, src_padding_mask,
        w_in, w_out, q, context, lse)
    g_x, g_te, g_k, g_v, g_w_in, g_b_in, g_w_out, g_b_out = grads
    return g_x, g_te, g_k, g_v, None, g_w_in, g_b_in, g_w_out, g_b_out, None


torch.library.register_autograd("convs2s::conv_attention_native_fwd", _backward, setup_context=_setup_context)


@register("conv_attention", "native")
def _conv_attention_native(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out,
                           b_out, need_weights):
    out, attn, _, _, _ = torch.ops.convs2s.conv_attention_native_fwd(
        x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out, need_weights)
    return out, (attn if need_weights else None)
