"""Incremental decoding: one decoder step at a time, O(1) work in the target length per step.

    state = init_state(model.decoder, model.encode(src_tokens))        encoder outputs computed once per batch
    logits, attn = forward_step(model.decoder, tokens, state)          tokens (B,) -> logits (B, V_tgt)
    reorder_state(state, order)                                        order (B',) rows to keep (beams, finished)

The first call takes BOS (position 1), the n-th call the (n-1)-th generated token (position n): the same positions
the full forward gives an unpadded prefix. Step-by-step logits equal `model.decoder(prefix, enc)[:, -1]`.

Each decoder layer is a causal GLU conv of width k (output t sees inputs t-k+1..t) -> optional attention ->
optional residual. The state keeps, per layer, a rolling window of that layer's last k-1 inputs (B, k-1, C_in);
a step concatenates the new input, W = (B, k, C_in), and computes the conv's last output only. Flattening W to
(B, 1, k*C_in) and the TBC weight (k, C_in, 2*C_out) to (1, k*C_in, 2*C_out) turns that output into a k = 1
glu_conv — one (B, k*C_in) @ (k*C_in, 2*C_out) product with bias, GLU and residual fused — the same sum over
taps and channels as the full conv's last step, at 1/k of the FLOPs of running the causal conv on W and keeping
its last step. Measured by bench/bench_generate.py (multi30k layer, 64 rows, fp32, one thread of this project's
shared 2-core CPU machine): 3.7 ms vs 35.4 ms on the reference backend, 2.6 ms vs 13.1 ms on native.
Attention is conv_attention with Tt = 1.

Inference only: the step runs in eval semantics (no dropout), with the weight-normalised weights computed once
(cached per decoder until a parameter changes), in the compute dtype (the autocast dtype when autocast is on, else the decoder's parameter dtype).
The fused ops are called through their resolved backend with inputs that are valid by construction (checked
once in init_state): the public ops' per-call checks include a host sync on the padding mask, which one step per
layer per token would pay every time.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Decoder, EncoderOut
from .ops import _backend

SQRT_HALF = math.sqrt(0.5)


@dataclass
class _Layer:
    """One decoder layer's inference weights, in the compute dtype."""
    kernel_size: int
    in_channels: int
    conv_weight: torch.Tensor               # (1, k*C_in, 2*C_out): the TBC weight with its taps flattened
    conv_bias: torch.Tensor                 # (2*C_out,)
    residual_distance: int                  # 0: none, 1: previous layer's output, 2: two layers back
    proj: tuple | None                      # (weight (C_out, C_res), bias (C_out,)) where the widths differ
    attention: tuple | None                 # (w_in (E, C), b_in (E,), w_out (C, E), b_out (C,)) or None


@dataclass
class StepWeights:
    """A decoder's weights, weight norm applied and cast once, for many steps (see freeze)."""
    dtype: torch.dtype
    embed_tokens: torch.Tensor              # (V_tgt, E) parameter dtype (rows are cast after the lookup)
    embed_positions: torch.Tensor           # (max_target_positions + 1, E)
    fc1: tuple                              # (weight (C_0, E), bias (C_0,))
    layers: list                            # [_Layer]
    fc2: tuple                              # (weight (E_out, C_L), bias (E_out,))
    fc3: tuple                              # (weight (V_tgt, E_out), bias (V_tgt,))
    glu_conv: object                        # the resolved backend functions of the two fused ops
    conv_attention: object
    backend: str


@dataclass
class IncrementalState:
    """Everything a step needs besides the new token; B rows (sentences or beams)."""
    weights: StepWeights
    keys: torch.Tensor                      # (B, Ts, E) encoder output z, compute dtype
    values: torch.Tensor                    # (B, Ts, E) (z + source embedding) * sqrt(0.5)
    padding_mask: torch.Tensor | None       # (B, Ts) bool, True = padding; None when the batch has no padding
    windows: list                           # per layer (B, k-1, C_in) last k-1 inputs, or None for k = 1
    step: int = 0                           # tokens consumed so far; the next token sits at position step + 1

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]


def _compute_dtype(decoder: Decoder, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return decoder.embed_tokens.weight.dtype


def _linear(module, dtype) -> tuple:
    return module.weight.detach().to(dtype), module.bias.detach().to(dtype)


# decoder -> (key, StepWeights): weight norm costs as much as ~5 decoder steps of a 32-sentence batch on a CPU
# (multi30k: 0.11 s vs 0.85 s for all its ~36 steps), so a translation of many batches pays it once.
_FROZEN: "weakref.WeakKeyDictionary[Decoder, tuple]" = weakref.WeakKeyDictionary()


def _freeze_key(decoder: Decoder, device: torch.device, dtype: torch.dtype) -> tuple:
    """Changes whenever a parameter does: in-place updates (optimizer steps, load_state_dict) bump `_version`,
    replacing a parameter's data changes its data_ptr."""
    params = tuple((p.data_ptr(), p._version) for p in decoder.parameters())
    return (str(device), dtype, decoder.cfg.backend, os.environ.get("CONVS2S_BACKEND", ""), params)


@torch.no_grad()
def freeze(decoder: Decoder, device: torch.device | None = None) -> StepWeights:
    """The decoder's weights for stepping: weight norm applied once, cast to the compute dtype once.

    Cached per decoder until one of its parameters changes (see _freeze_key).
    """
    if decoder.training:
        raise RuntimeError("incremental decoding runs in eval mode (no dropout); call model.eval() first")
    device = decoder.embed_tokens.weight.device if device is None else torch.device(device)
    dtype = _compute_dtype(decoder, device)
    key = _freeze_key(decoder, device, dtype)
    cached = _FROZEN.get(decoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    weights = _freeze(decoder, device, dtype)
    _FROZEN[decoder] = (key, weights)
    return weights


def _freeze(decoder: Decoder, device: torch.device, dtype: torch.dtype) -> StepWeights:
    cfg = decoder.cfg
    layers = []
    for conv, attn, has_attn, proj, has_proj, res in zip(
            decoder.convolutions, decoder.attention, cfg.decoder_attention, decoder.projections,
            decoder.has_projection, decoder.residual_distances):
        w = conv.weight.detach().to(dtype)                                      # (k, C_in, 2*C_out)
        k, c_in, c2 = w.shape
        layers.append(_Layer(
            kernel_size=k, in_channels=c_in, conv_weight=w.reshape(1, k * c_in, c2),
            conv_bias=conv.bias.detach().to(dtype), residual_distance=res,
            proj=_linear(proj, dtype) if has_proj else None,
            attention=(_linear(attn.in_projection, dtype) + _linear(attn.out_projection, dtype)) if has_attn else None))
    _, glu_fn = _backend.resolve("glu_conv", cfg.backend, device)
    backend, attn_fn = _backend.resolve("conv_attention", cfg.backend, device)
    return StepWeights(dtype=dtype, embed_tokens=decoder.embed_tokens.weight.detach(),
                       embed_positions=decoder.embed_positions.weight.detach(), fc1=_linear(decoder.fc1, dtype),
                       layers=layers, fc2=_linear(decoder.fc2, dtype), fc3=_linear(decoder.fc3, dtype),
                       glu_conv=glu_fn, conv_attention=attn_fn, backend=backend)


@torch.no_grad()
def init_state(decoder: Decoder, enc: EncoderOut, weights: StepWeights | None = None) -> IncrementalState:
    """A fresh state for the batch `enc` describes (B sentences); `weights` from freeze() may be shared."""
    weights = freeze(decoder, enc.keys.device) if weights is None else weights
    mask = enc.padding_mask
    if mask is not None:
        if bool(mask.all(dim=1).any()):
            bad = mask.all(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"sentence(s) {bad} have no real source token")
        if not bool(mask.any()):
            mask = None                     # no padding: the ops skip the masking and take s = Ts
    B = enc.keys.shape[0]
    windows = [None if layer.kernel_size == 1 else
               enc.keys.new_zeros(B, layer.kernel_size - 1, layer.in_channels, dtype=weights.dtype)
               for layer in weights.layers]       # zeros: the causal conv's left padding
    return IncrementalState(weights=weights, keys=enc.keys.detach().to(weights.dtype),
                            values=enc.values.detach().to(weights.dtype), padding_mask=mask, windows=windows)


@torch.no_grad()
def forward_step(decoder: Decoder, tokens: torch.Tensor, state: IncrementalState, need_weights: bool = False):
    """tokens (B,) or (B, 1), the newest decoder input per row -> (logits (B, V_tgt), attention).

    attention: per attention layer, the probabilities (B, Ts) when need_weights, else an empty list.
    Advances `state` by one position (its windows and step count change in place).
    """
    w = state.weights
    tokens = tokens.reshape(-1)
    B = tokens.shape[0]
    if B != state.batch_size:
        raise ValueError(f"tokens has {B} rows but the state has {state.batch_size}; reorder_state first")
    position = state.step + 1
    if position > decoder.cfg.max_target_positions:
        raise ValueError(f"step {state.step} reaches position {position} > max_target_positions = "
                         f"{decoder.cfg.max_target_positions}")
    emb = F.embedding(tokens, w.embed_tokens) + w.embed_positions[position]
    emb = emb.to(w.dtype)[:, None]                                              # (B, 1, E) target embedding
    x = F.linear(emb, *w.fc1)                                                   # (B, 1, C_0)
    residuals, attentions = [x], []
    for i, layer in enumerate(w.layers):
        residual = None
        if layer.residual_distance > 0:
            residual = residuals[-layer.residual_distance]
            residual = F.linear(residual, *layer.proj) if layer.proj is not None else residual
        k = layer.kernel_size
        if k > 1:
            window = torch.cat([state.windows[i], x], dim=1)                    # (B, k, C_in)
            state.windows[i] = window[:, 1:]                                    # (B, k-1, C_in) view
            x = window.view(B, 1, k * layer.in_channels)                        # (B, 1, k*C_in)
        if layer.attention is None:
            x = w.glu_conv(x, layer.conv_weight, layer.conv_bias, residual, True)   # (B, 1, C_l)
        else:
            x = w.glu_conv(x, layer.conv_weight, layer.conv_bias, None, True)
            x, a = w.conv_attention(x, emb, state.keys, state.values, state.padding_mask, *layer.attention,
                                    need_weights)
            if need_weights:
                attentions.append(a[:, 0])                                      # (B, Ts)
            if residual is not None:
                x = (x + residual) * SQRT_HALF
        residuals.append(x)
    x = F.linear(x[:, 0], *w.fc2)                                               # (B, E_out)
    logits = F.linear(x, *w.fc3)                                                # (B, V_tgt)
    state.step += 1
    return logits, attentions


def reorder_state(state: IncrementalState, order: torch.Tensor, *, windows_only: bool = False) -> IncrementalState:
    """Keep rows `order` (B',) int64 of the state, in that order (beam reordering and finished sentences).

    windows_only: the caller knows every row keeps its encoder output (beams of one sentence reordered among
    themselves share it), so keys, values and mask are left as they are.
    """
    state.windows = [None if win is None else win.index_select(0, order) for win in state.windows]
    if windows_only:
        return state
    state.keys = state.keys.index_select(0, order)
    state.values = state.values.index_select(0, order)
    if state.padding_mask is not None:
        state.padding_mask = state.padding_mask.index_select(0, order)
    return state
