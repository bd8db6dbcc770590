"""The ConvS2S model (Gehring et al. 2017), with fairseq fconv's exact semantics, in (B, T, C) layout.

Read top to bottom: the config, the presets, the encoder, the decoder, the model. The two hot ops are calls into
convs2s.ops (through convs2s.nn): glu_conv for every convolution block, conv_attention for each decoder layer's
attention.

    src_tokens (B, Ts) -> Encoder -> keys z (B, Ts, E), values (z + e) * sqrt(0.5) (B, Ts, E), mask (B, Ts)
    prev_output_tokens (B, Tt) -> Decoder(keys, values, mask) -> logits (B, Tt, V_tgt)

Layers are specified as fairseq does: (channels, kernel width[, residual distance]); residual distance 1 (the
default) adds the previous layer's output, 2 the output of two layers back, 0 no residual; a weight-normalised
projection is inserted where the residual's width differs from the layer's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import ConvAttention, GLUConv1d, WNLinear

SQRT_HALF = math.sqrt(0.5)


@dataclass
class ConvS2SConfig:
    src_vocab_size: int                          # source vocabulary size (rows of the encoder embedding)
    tgt_vocab_size: int                          # target vocabulary size (rows of the decoder embedding, logits)
    encoder_embed_dim: int = 256                 # E_enc: encoder token + position embedding width
    encoder_layers: list = field(default_factory=lambda: [(512, 3)] * 20)  # (channels, k[, residual distance])
    decoder_embed_dim: int = 256                 # E_dec: decoder embedding width (= attention width)
    decoder_layers: list = field(default_factory=lambda: [(512, 3)] * 20)
    decoder_out_embed_dim: int = 256             # width before the output projection to the vocabulary
    decoder_attention: bool | list = True        # attention on every decoder layer, or one flag per layer
    share_decoder_input_output_embed: bool = False  # tie the output projection to the decoder embedding
    dropout: float = 0.1                         # dropout on embeddings, conv inputs and before the output layer
    max_source_positions: int = 1024             # longest source sentence (learned position embeddings)
    max_target_positions: int = 1024             # longest target prefix
    pad_idx: int = 1                             # special token ids (fairseq's dictionary convention)
    bos_idx: int = 0                             # first decoder input
    eos_idx: int = 2
    unk_idx: int = 3
    backend: str = "auto"                        # fused-op backend: auto | reference | triton | native

    def __post_init__(self):
        self.encoder_layers = [_layer_spec(s) for s in self.encoder_layers]
        self.decoder_layers = [_layer_spec(s) for s in self.decoder_layers]
        n = len(self.decoder_layers)
        if isinstance(self.decoder_attention, bool):
            self.decoder_attention = [self.decoder_attention] * n
        self.decoder_attention = [bool(a) for a in self.decoder_attention]
        if len(self.decoder_attention) != n:
            raise ValueError(f"decoder_attention has {len(self.decoder_attention)} flags for {n} decoder layers")
        if self.share_decoder_input_output_embed and self.decoder_out_embed_dim != self.decoder_embed_dim:
            raise ValueError("share_decoder_input_output_embed needs decoder_out_embed_dim == decoder_embed_dim "
                             f"(got {self.decoder_out_embed_dim} and {self.decoder_embed_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain Python types only (checkpoints are loaded with torch.load(weights_only=True))."""
        d = asdict(self)
        d["encoder_layers"] = [list(s) for s in self.encoder_layers]
        d["decoder_layers"] = [list(s) for s in self.decoder_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConvS2SConfig":
        return cls(**d)


def _layer_spec(spec) -> tuple[int, int, int]:
    """(channels, k) or (channels, k, residual distance) -> (channels, k, residual distance)."""
    spec = tuple(int(v) for v in spec)
    if len(spec) == 2:
        spec = spec + (1,)
    if len(spec) != 3 or spec[0] < 1 or spec[1] < 1 or spec[2] < 0:
        raise ValueError(f"a layer is (channels >= 1, kernel width >= 1[, residual distance >= 0]), got {spec}")
    return spec


PRESETS: dict[str, dict] = {
    # For tests: every code path (projection, even kernel, k=1, residual distance 2 and 0, attention subset).
    "tiny": dict(encoder_embed_dim=16, encoder_layers=[(24, 3), (24, 2), (32, 3, 2), (32, 1, 0)],
                 decoder_embed_dim=16, decoder_layers=[(24, 3), (32, 3), (32, 2)],
                 decoder_attention=[True, False, True], decoder_out_embed_dim=16, dropout=0.1,
                 max_source_positions=128, max_target_positions=128),
    # A small model that trains in minutes on a CPU (make train without a GPU).
    "small": dict(encoder_embed_dim=128, encoder_layers=[(256, 3)] * 4, decoder_embed_dim=128,
                  decoder_layers=[(256, 3)] * 4, decoder_out_embed_dim=128, dropout=0.2),
    # bentrevett/pytorch-seq2seq notebook 5: emb 256, hidden 512, 10 + 10 layers, k = 3, dropout 0.25.
    "multi30k": dict(encoder_embed_dim=256, encoder_layers=[(512, 3)] * 10, decoder_embed_dim=256,
                     decoder_layers=[(512, 3)] * 10, decoder_out_embed_dim=256, dropout=0.25),
    # fairseq's architectures of the same names.
    "fconv_iwslt_de_en": dict(encoder_embed_dim=256, encoder_layers=[(256, 3)] * 4, decoder_embed_dim=256,
                              decoder_layers=[(256, 3)] * 3, decoder_out_embed_dim=256, dropout=0.1),
    "fconv_wmt_en_de": dict(encoder_embed_dim=768, encoder_layers=[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2,
                            decoder_embed_dim=768, decoder_layers=[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2,
                            decoder_out_embed_dim=512, dropout=0.1),
    "fconv_wmt_en_fr": dict(encoder_embed_dim=768,
                            encoder_layers=[(512, 3)] * 6 + [(768, 3)] * 4 + [(1024, 3)] * 3 + [(2048, 1)] + [(4096, 1)],
                            decoder_embed_dim=768,
                            decoder_layers=[(512, 3)] * 6 + [(768, 3)] * 4 + [(1024, 3)] * 3 + [(2048, 1)] + [(4096, 1)],
                            decoder_out_embed_dim=512, dropout=0.1),
}


class GradMultiply(torch.autograd.Function):
    """Identity in value; multiplies the gradient by `scale` (fairseq scales the encoder output's gradient by
    1 / (2 * number of attention layers), since every attention layer sends gradient into it)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _embedding(num: int, dim: int, padding_idx: int) -> nn.Embedding:
    m = nn.Embedding(num, dim, padding_idx=padding_idx)
    nn.init.normal_(m.weight, 0.0, 0.1)
    with torch.no_grad():
        m.weight[padding_idx].zero_()
    return m


def positions(tokens: torch.Tensor, pad_idx: int) -> torch.Tensor:
    """Learned-position indices (B, T): 1, 2, ... from each sentence's first real token, 0 at padding."""
    real = tokens.ne(pad_idx)
    return torch.cumsum(real, dim=1) * real


def _check_tokens(name: str, tokens, max_positions: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be an integer tensor (B, T), got {got}"
                         + (f" of dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else ""))
    if tokens.shape[1] > max_positions:
        raise ValueError(f"{name} has {tokens.shape[1]} positions, more than max positions = {max_positions}; "
                         "raise max_source_positions / max_target_positions in the config")
    if tokens.shape[1] < 1:
        raise ValueError(f"{name} must have at least one position, got shape {tuple(tokens.shape)}")


class EncoderOut(NamedTuple):
    keys: torch.Tensor           # z: (B, Ts, E)
    values: torch.Tensor         # (z + source embedding) * sqrt(0.5): (B, Ts, E)
    padding_mask: torch.Tensor   # (B, Ts) bool, True = padding


def _residual_projections(in_channels: int, layers) -> tuple[list, list]:
    """Per layer: the projection applied to its residual (or None), and the layers' input widths."""
    projs, widths = [], [in_channels]
    for channels, _, res in layers:
        res_dim = channels if res == 0 else widths[-res]
        projs.append(WNLinear(res_dim, channels) if res_dim != channels else None)
        widths.append(channels)
    return projs, widths


class Encoder(nn.Module):
    """src_tokens (B, Ts) -> EncoderOut(keys (B, Ts, E), values (B, Ts, E), padding_mask (B, Ts))."""

    def __init__(self, cfg: ConvS2SConfig):
        super().__init__()
        self.cfg = cfg
        E, p = cfg.encoder_embed_dim, cfg.dropout
        self.embed_tokens = _embedding(cfg.src_vocab_size, E, cfg.pad_idx)
        self.embed_positions = _embedding(cfg.max_source_positions + 1, E, 0)   # row 0 = padding
        first = cfg.encoder_layers[0][0]
        self.fc1 = WNLinear(E, first, dropout=p)
        projs, widths = _residual_projections(first, cfg.encoder_layers)
        self.projections = nn.ModuleList([pr if pr is not None else nn.Identity() for pr in projs])
        self.has_projection = [pr is not None for pr in projs]
        self.convolutions = nn.ModuleList([
            GLUConv1d(c_in, c, k, causal=False, dropout=p, residual=False, backend=cfg.backend)
            for c_in, (c, k, _) in zip(widths[:-1], cfg.encoder_layers)])
        self.residual_distances = [res for _, _, res in cfg.encoder_layers]
        self.fc2 = WNLinear(widths[-1], E)
        self.num_attention_layers = sum(cfg.decoder_attention)

    def forward(self, src_tokens: torch.Tensor) -> EncoderOut:
        mask = src_tokens.eq(self.cfg.pad_idx)                                    # (B, Ts)
        x = self.embed_tokens(src_tokens) + self.embed_positions(positions(src_tokens, self.cfg.pad_idx))
        x = F.dropout(x, p=self.cfg.dropout, training=self.training)              # (B, Ts, E)
        source_embedding = x
        x = self.fc1(x)                                                           # (B, Ts, C_0)
        residuals = [x]
        pad = mask.unsqueeze(-1)                                                  # (B, Ts, 1)
        for conv, proj, has_proj, res in zip(self.convolutions, self.projections, self.has_projection,
                                             self.residual_distances):
            residual = None
            if res > 0:
                residual = residuals[-res]
                residual = proj(residual) if has_proj else residual
            # Zero the padding before each conv so real positions see zeros there, as the conv's own padding.
            x = conv(x.masked_fill(pad, 0.0), residual)                           # (B, Ts, C_l)
            residuals.append(x)
        x = self.fc2(x).masked_fill(pad, 0.0)                                     # (B, Ts, E)
        if self.num_attention_layers > 0:
            x = GradMultiply.apply(x, 1.0 / (2.0 * self.num_attention_layers))
        values = (x + source_embedding) * SQRT_HALF
        return EncoderOut(x, values, mask)


class Decoder(nn.Module):
    """prev_output_tokens (B, Tt) + EncoderOut -> logits (B, Tt, V_tgt) [, per-layer attention (B, Tt, Ts)]."""

    def __init__(self, cfg: ConvS2SConfig):
        super().__init__()
        self.cfg = cfg
        E, p = cfg.decoder_embed_dim, cfg.dropout
        self.embed_tokens = _embedding(cfg.tgt_vocab_size, E, cfg.pad_idx)
        self.embed_positions = _embedding(cfg.max_target_positions + 1, E, 0)
        first = cfg.decoder_layers[0][0]
        self.fc1 = WNLinear(E, first, dropout=p)
        projs, widths = _residual_projections(first, cfg.decoder_layers)
        self.projections = nn.ModuleList([pr if pr is not None else nn.Identity() for pr in projs])
        self.has_projection = [pr is not None for pr in projs]
        self.convolutions = nn.ModuleList([
            GLUConv1d(c_in, c, k, causal=True, dropout=p, residual=False, backend=cfg.backend)
            for c_in, (c, k, _) in zip(widths[:-1], cfg.decoder_layers)])
        self.attention = nn.ModuleList([
            ConvAttention(c, E, backend=cfg.backend) if a else nn.Identity()
            for (c, _, _), a in zip(cfg.decoder_layers, cfg.decoder_attention)])
        self.residual_distances = [res for _, _, res in cfg.decoder_layers]
        self.fc2 = WNLinear(widths[-1], cfg.decoder_out_embed_dim)
        if cfg.share_decoder_input_output_embed:
            self.fc3 = nn.Linear(cfg.decoder_out_embed_dim, cfg.tgt_vocab_size)
            nn.init.zeros_(self.fc3.bias)
            self.fc3.weight = self.embed_tokens.weight
        else:
            self.fc3 = WNLinear(cfg.decoder_out_embed_dim, cfg.tgt_vocab_size, dropout=p)

    def forward(self, prev_output_tokens: torch.Tensor, enc: EncoderOut, return_attention: bool = False):
        cfg = self.cfg
        x = self.embed_tokens(prev_output_tokens) + self.embed_positions(positions(prev_output_tokens, cfg.pad_idx))
        x = F.dropout(x, p=cfg.dropout, training=self.training)                   # (B, Tt, E)
        target_embedding = x
        x = self.fc1(x)                                                           # (B, Tt, C_0)
        residuals, attentions = [x], []
        for conv, attn, has_attn, proj, has_proj, res in zip(
                self.convolutions, self.attention, cfg.decoder_attention, self.projections, self.has_projection,
                self.residual_distances):
            residual = None
            if res > 0:
                residual = residuals[-res]
                residual = proj(residual) if has_proj else residual
            if not has_attn:
                x = conv(x, residual)                                             # residual fused in the op
            else:
                x = conv(x, None)                                                 # (B, Tt, C_l)
                x, a = attn(x, target_embedding, enc.keys, enc.values, enc.padding_mask,
                            need_weights=return_attention)
                attentions.append(a)
                if residual is not None:
                    x = (x + residual) * SQRT_HALF
            residuals.append(x)
        x = self.fc2(x)                                                           # (B, Tt, E_out)
        x = F.dropout(x, p=cfg.dropout, training=self.training)
        logits = self.fc3(x)                                                      # (B, Tt, V_tgt)
        return (logits, attentions) if return_attention else logits

    # Incremental decoding (inference, eval mode): one token per call, O(1) in the prefix length.
    # The state and the step live in convs2s/incremental.py; these methods are its entry points.
    def init_incremental_state(self, enc: EncoderOut):
        from .incremental import init_state
        return init_state(self, enc)

    def forward_step(self, tokens: torch.Tensor, state, need_weights: bool = False):
        """tokens (B,) newest decoder input per row -> (logits (B, V_tgt), per-layer attention (B, Ts) list)."""
        from .incremental import forward_step
        return forward_step(self, tokens, state, need_weights=need_weights)

    def reorder_incremental_state(self, state, order: torch.Tensor):
        """Keep the state's rows `order` (B',), in that order (beam search)."""
        from .incremental import reorder_state
        return reorder_state(state, order)


class ConvS2S(nn.Module):
    """model(src_tokens (B, Ts), src_lengths (B,), prev_output_tokens (B, Tt)) -> logits (B, Tt, V_tgt).

    Right-padded (or left-padded) batches with cfg.pad_idx; return_attention=True also returns the list of
    per-attention-layer probabilities, each (B, Tt, Ts).
    """

    def __init__(self, cfg: ConvS2SConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @classmethod
    def uninitialized(cls, cfg: ConvS2SConfig, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> "ConvS2S":
        """A ConvS2S whose parameters are allocated but not initialised, to load a state dict into: built on the
        meta device, so an fconv_wmt_en_de-sized model takes 0.05 s instead of 2.8 s of random initialisation
        (2-core CPU)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device)
        if dtype is not None:
            model = model.to(dtype)
        if cfg.share_decoder_input_output_embed:               # to_empty gives each module its own tensor
            model.decoder.fc3.weight = model.decoder.embed_tokens.weight
        return model

    @classmethod
    def from_preset(cls, name: str, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> "ConvS2S":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(ConvS2SConfig(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                                 **{**PRESETS[name], **overrides}))

    def encode(self, src_tokens: torch.Tensor) -> EncoderOut:
        _check_tokens("src_tokens", src_tokens, self.config.max_source_positions)
        empty = src_tokens.eq(self.config.pad_idx).all(dim=1)
        if not torch.compiler.is_compiling() and bool(empty.any()):  # one host sync per batch
            bad = empty.nonzero().flatten().tolist()
            raise ValueError(f"src_tokens has no real (non-padding) token in sentence(s) {bad}")
        return self.encoder(src_tokens)

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor | None, prev_output_tokens: torch.Tensor,
                return_attention: bool = False):
        _check_tokens("prev_output_tokens", prev_output_tokens, self.config.max_target_positions)
        if src_tokens.shape[0] != prev_output_tokens.shape[0]:
            raise ValueError(f"src_tokens has batch size {src_tokens.shape[0]} but prev_output_tokens has "
                             f"{prev_output_tokens.shape[0]}")
        # src_lengths is accepted for fairseq's signature; the padding mask comes from the tokens themselves,
        # which makes left and right padding equivalent.
        enc = self.encode(src_tokens)
        return self.decoder(prev_output_tokens, enc, return_attention=return_attention)
