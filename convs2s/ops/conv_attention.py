"""conv_attention: one ConvS2S decoder layer's attention (paper section 3.3, fairseq's AttentionLayer)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import autocast_inputs, check_same, check_shape, check_tensor

SQRT_HALF = math.sqrt(0.5)

_DOC = """
    x                (B, Tt, C)   decoder conv-block output (after the GLU)
    target_embedding (B, Tt, E)   decoder input embedding (token + position)
    encoder_keys     (B, Ts, E)   encoder output z
    encoder_values   (B, Ts, E)   (z + source embedding) * sqrt(0.5)
    src_padding_mask (B, Ts) bool, True = padding; or None (no padding). Every sentence needs >= 1 real token.
    Tt, Ts, C, E >= 1; B = 0 gives empty results (and gradients: zero for the weights).
    w_in (E, C), b_in (E,), w_out (C, E), b_out (C,)              nn.Linear convention (y = x @ w.T + b)
    q    = (x @ w_in.T + b_in + target_embedding) * sqrt(0.5)                    (B, Tt, E)
    p    = softmax(q @ encoder_keys.T) over Ts, padding masked to probability 0  (B, Tt, Ts), fp32 softmax
    ctx  = (p @ encoder_values) * sqrt(s)     s = number of real source tokens of each sentence
    out  = (ctx @ w_out.T + b_out + x) * sqrt(0.5)                                (B, Tt, C)
    returns (out, p if need_weights else None)
"""


def _validate(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out):
    check_tensor("x", x, 3)
    B, Tt, C = x.shape
    check_tensor("target_embedding", target_embedding, 3)
    E = target_embedding.shape[2]
    check_shape("target_embedding", target_embedding, (B, Tt, None), "(B, Tt, E)")
    check_tensor("encoder_keys", encoder_keys, 3)
    Ts = encoder_keys.shape[1]
    check_shape("encoder_keys", encoder_keys, (B, None, E), "(B, Ts, E)")
    check_tensor("encoder_values", encoder_values, 3)
    check_shape("encoder_values", encoder_values, (B, Ts, E), "(B, Ts, E)")
    if C < 1 or E < 1:
        raise ValueError(f"need at least one channel, got C = {C} (x), E = {E} (target_embedding)")
    if Tt < 1 or Ts < 1:
        raise ValueError(f"need at least one target and one source position, got Tt = {Tt}, Ts = {Ts}")
    check_tensor("w_in", w_in, 2)
    check_shape("w_in", w_in, (E, C), "(E, C)")
    check_tensor("b_in", b_in, 1)
    check_shape("b_in", b_in, (E,), "(E,)")
    check_tensor("w_out", w_out, 2)
    check_shape("w_out", w_out, (C, E), "(C, E)")
    check_tensor("b_out", b_out, 1)
    check_shape("b_out", b_out, (C,), "(C,)")
    check_same("x", x, target_embedding=target_embedding, encoder_keys=encoder_keys,
               encoder_values=encoder_values, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out)
    if src_padding_mask is not None:
        check_tensor("src_padding_mask", src_padding_mask, 2, floating=False)
        if src_padding_mask.dtype != torch.bool:
            raise TypeError(f"src_padding_mask must be a bool tensor (True = padding), got dtype "
                            f"{src_padding_mask.dtype}")
        check_shape("src_padding_mask", src_padding_mask, (B, Ts), "(B, Ts)")
        if src_padding_mask.device != x.device:
            raise ValueError(f"src_padding_mask is on {src_padding_mask.device} but x is on {x.device}")
        # A sentence with no real source token has no defined attention (softmax over nothing). On CPU the check
        # is cheap and raises a ValueError; on a GPU a host-side check would sync the device once per decoder
        # layer and step, so it is a device-side assert there (the model checks once per batch, on the host, in
        # ConvS2S.encode, with the readable error).
        if not torch.compiler.is_compiling():
            if src_padding_mask.device.type == "cpu":
                empty = src_padding_mask.all(dim=1)
                if bool(empty.any()):
                    bad = empty.nonzero().flatten().tolist()
                    raise ValueError(f"src_padding_mask marks every source position as padding for sentence(s) "
                                     f"{bad}; each sentence needs at least one real source token")
            else:
                torch._assert_async(~src_padding_mask.all(dim=1).any(),
                                    "src_padding_mask marks every source position as padding for a sentence")


def source_lengths_scale(src_padding_mask: torch.Tensor | None, Ts: int, B: int, device, dtype=torch.float32):
    """sqrt(s) per sentence, s = number of real source tokens: (B,) in `dtype`."""
    if src_padding_mask is None:
        return torch.full((B,), math.sqrt(Ts), device=device, dtype=dtype)
    s = (~src_padding_mask).sum(dim=1).to(dtype)
    return s.sqrt()


def conv_attention_ref(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out,
                       b_out, *, need_weights: bool = False):
    # Plain PyTorch, as fairseq's AttentionLayer computes it; the softmax runs in at least fp32.
    residual = x
    q = (F.linear(x, w_in, b_in) + target_embedding) * SQRT_HALF             # (B, Tt, E)
    scores = torch.bmm(q, encoder_keys.transpose(1, 2))                       # (B, Tt, Ts)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if src_padding_mask is not None:
        scores = scores.masked_fill(src_padding_mask.unsqueeze(1), float("-inf"))
    p = torch.softmax(scores, dim=-1).to(x.dtype)                             # (B, Tt, Ts)
    ctx = torch.bmm(p, encoder_values)                                        # (B, Tt, E)
    scale = source_lengths_scale(src_padding_mask, encoder_keys.shape[1], x.shape[0], x.device,
                                 torch.promote_types(ctx.dtype, torch.float32))
    ctx = ctx * scale.to(ctx.dtype)[:, None, None]
    out = (F.linear(ctx, w_out, b_out) + residual) * SQRT_HALF                # (B, Tt, C)
    return out, (p if need_weights else None)


conv_attention_ref.__doc__ = "PyTorch reference for conv_attention (autograd through plain ops).\n" + _DOC


@_backend.register("conv_attention", "reference")
def _conv_attention_reference(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in,
                              w_out, b_out, need_weights):
    return conv_attention_ref(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in,
                              w_out, b_out, need_weights=need_weights)


def conv_attention(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out,
                   *, need_weights: bool = False, backend: str = "auto"):
    # Cast first: under autocast a model hands bf16 activations with fp32 weights, one dtype once cast.
    x, target_embedding, encoder_keys, encoder_values, w_in, b_in, w_out, b_out = autocast_inputs(
        x, target_embedding, encoder_keys, encoder_values, w_in, b_in, w_out, b_out)
    _validate(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out)
    _, fn = _backend.resolve("conv_attention", backend, x.device)
    return fn(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out, b_out,
              need_weights)


conv_attention.__doc__ = ("Fused ConvS2S decoder attention; `backend` is 'auto' | 'reference' | 'triton' | "
                          "'native'.\n" + _DOC)
