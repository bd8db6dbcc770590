"""The ConvS2S model (Gehring et al. 2017), with fairseq fconv's exact semantics, in (B, T, C) layout.

Read top to bottom: the config, the presets, the encoder, the decoding state, the decoder layer, the decoder,
the model. The hot ops are calls into convs2s.ops (through convs2s.nn for training): glu_conv for every
convolution block, conv_attention for each decoder layer's attention, glu_conv_step for a decoder layer's conv
one token at a time.

    src_tokens (B, Ts) -> Encoder -> keys z (B, Ts, E), values (z + e) * sqrt(0.5) (B, Ts, E), mask (B, Ts)
    prev_output_tokens (B, Tt) -> Decoder(keys, values, mask) -> logits (B, Tt, V_tgt)
    tokens (B,) + DecoderState -> Decoder.step -> logits (B, V_tgt)              incremental decoding

Each DecoderLayer computes itself over a whole prefix (forward) and one token at a time (step); the Decoder runs
one loop over its layers for both.

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
from .ops import conv_attention, glu_conv_step, resolve_backend

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
        for side, layers in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
            for i, (_, _, res) in enumerate(layers):
                if res > i + 1:                   # the first layer's input counts as the output of layer -1
                    raise ValueError(f"{side} layer {i} has residual distance {res}, but only {i + 1} earlier "
                                     "output(s) exist")

    def to_dict(self) -> dict:
        """Plain Python types only (checkpoints are loaded with torch.load(weights_only=True))."""
        d = asdict(self)
        d["encoder_layers"] = [list(s) for s in self.encoder_layers]
        d["decoder_layers"] = [list(s) for s in self.decoder_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConvS2SConfig:
        return cls(**d)


def _layer_spec(spec) -> tuple[int, int, int]:
    """(channels, k) or (channels, k, residual distance) -> (channels, k, residual distance)."""
    spec = tuple(int(v) for v in spec)
    if len(spec) == 2:
        spec = spec + (1,)
    if len(spec) != 3 or spec[0] < 1 or spec[1] < 1 or spec[2] < 0:
        raise ValueError(f"a layer is (channels >= 1, kernel width >= 1[, residual distance >= 0]), got {spec}")
    return spec


_WMT_EN_FR_LAYERS = [(512, 3)] * 6 + [(768, 3)] * 4 + [(1024, 3)] * 3 + [(2048, 1)] + [(4096, 1)]

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
    "fconv_wmt_en_fr": dict(encoder_embed_dim=768, encoder_layers=_WMT_EN_FR_LAYERS, decoder_embed_dim=768,
                            decoder_layers=_WMT_EN_FR_LAYERS, decoder_out_embed_dim=512, dropout=0.1),
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
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point()
            or tokens.dtype == torch.bool):
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


class StepLinear(NamedTuple):
    """A linear layer's weights for step(), weight norm applied and cast: x (..., in) -> (..., out)."""
    weight: torch.Tensor                    # (out, in)
    bias: torch.Tensor                      # (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _step_linear(module: nn.Module, dtype: torch.dtype):
    """A linear module's form for step(): its own prepare_step(dtype) where it has one (int8 layers, see
    convs2s.quantize), else a StepLinear of its effective weight."""
    if hasattr(module, "prepare_step"):
        return module.prepare_step(dtype)
    return StepLinear(module.weight.detach().to(dtype), module.bias.detach().to(dtype))


@dataclass
class LayerStepWeights:
    """One DecoderLayer's weights for step(), in the compute dtype."""
    conv_weight: torch.Tensor               # (k, C_in, 2*C) TBC, weight norm applied
    conv_bias: torch.Tensor                 # (2*C,)
    proj: StepLinear | None                 # C_res -> C where the residual's width differs
    attention: tuple | None                 # (w_in (E, C), b_in (E,), w_out (C, E), b_out (C,)) or None
    conv_backend: str                       # the resolved backends of glu_conv_step and conv_attention
    attention_backend: str


@dataclass
class StepWeights:
    """A Decoder's weights for step(), from Decoder.prepare_step: weight norm applied and cast once.

    Valid while the decoder's parameters stay as they are: prepare again after changing them. beam_search
    prepares them per call unless it is given some (a caller translating many batches prepares once).
    """
    device: torch.device
    dtype: torch.dtype                      # the compute dtype (see Decoder.step_dtype)
    embed_tokens: torch.Tensor              # (V_tgt, E) parameter dtype: rows are cast after the lookup
    embed_positions: torch.Tensor           # (max_target_positions + 1, E)
    fc1: StepLinear                         # E -> C_0
    layers: list                            # [LayerStepWeights] per decoder layer
    fc2: StepLinear                         # C_L -> E_out
    fc3: StepLinear                         # E_out -> V_tgt


@dataclass
class DecoderState:
    """What Decoder.step needs besides the new token, for B rows (sentences or beams); Decoder.init_state makes it.

    Row r's next token sits at position step + 1; reorder rows with Decoder.reorder_state.
    """
    weights: StepWeights
    enc: EncoderOut                         # keys, values (B, Ts, E) in the compute dtype; padding_mask (B, Ts)
                                            # bool, or None when no sentence has padding
    conv_states: list                       # per layer (B, k-1, C_in): its last k-1 inputs, oldest first;
                                            # None for k = 1
    step: int = 0                           # tokens consumed so far

    @property
    def batch_size(self) -> int:
        return self.enc.keys.shape[0]


class DecoderLayer(nn.Module):
    """One decoder layer: causal GLU conv -> attention (optional) -> + residual (optional), paper section 3.

    in_channels C_in, channels C, kernel width k; residual_channels C_res, the width of the output
    `residual_distance` layers back (a weight-normalised projection maps it to C where C_res != C); attention:
    whether the layer attends to the source (embed_dim E is the attention width).

    forward(x (B, Tt, C_in), target_embedding (B, Tt, E), enc, residual (B, Tt, C_res) or None, need_weights)
      -> (y (B, Tt, C), attention (B, Tt, Ts) or None)                          over a whole prefix
    step(x (B, C_in), target_embedding (B, E), enc, residual (B, C_res) or None, weights, conv_state,
         need_weights) -> (y (B, C), attention (B, Ts) or None)                 one token per row
      == the last position of forward() over the prefix; conv_state (B, k-1, C_in) holds the prefix's last k-1
      inputs (None for k = 1) and is updated in place; weights: this layer's LayerStepWeights.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, *, residual_distance: int,
                 residual_channels: int, attention: bool, embed_dim: int, dropout: float, backend: str):
        super().__init__()
        self.residual_distance = residual_distance
        self.conv = GLUConv1d(in_channels, channels, kernel_size, causal=True, dropout=dropout, residual=False,
                              backend=backend)
        self.attention = ConvAttention(channels, embed_dim, backend=backend) if attention else None
        needs_proj = residual_distance > 0 and residual_channels != channels
        self.proj = WNLinear(residual_channels, channels) if needs_proj else None

    def _block(self, x, residual, project, conv, attend):
        """The layer's data flow, shared by forward and step: `project`, `conv` (with the residual fused where
        no attention follows) and `attend` are the whole-prefix or the one-step computations."""
        if residual is not None and self.proj is not None:
            residual = project(residual)
        if self.attention is None:
            return conv(x, residual), None
        x, attn = attend(conv(x, None))
        if residual is not None:
            x = (x + residual) * SQRT_HALF
        return x, attn

    def forward(self, x, target_embedding, enc: EncoderOut, residual=None, need_weights: bool = False):
        def attend(h):
            return self.attention(h, target_embedding, enc.keys, enc.values, enc.padding_mask,
                                  need_weights=need_weights)
        return self._block(x, residual, self.proj, self.conv, attend)

    def step(self, x, target_embedding, enc: EncoderOut, residual, weights: LayerStepWeights,
             conv_state: torch.Tensor | None, need_weights: bool = False):
        def conv(h, res):
            return glu_conv_step(h, conv_state, weights.conv_weight, weights.conv_bias, res,
                                 backend=weights.conv_backend)                   # (B, C)

        def attend(h):
            out, attn = conv_attention(h[:, None], target_embedding[:, None], enc.keys, enc.values,
                                       enc.padding_mask, *weights.attention, need_weights=need_weights,
                                       backend=weights.attention_backend)       # (B, 1, C), (B, 1, Ts)
            return out[:, 0], (attn[:, 0] if need_weights else None)
        return self._block(x, residual, weights.proj, conv, attend)

    @torch.no_grad()
    def prepare_step(self, dtype: torch.dtype, conv_backend: str, attention_backend: str) -> LayerStepWeights:
        """This layer's weights for step(): weight norm applied, cast to `dtype`, detached."""
        attention = None if self.attention is None else (
            *_step_linear(self.attention.in_projection, dtype), *_step_linear(self.attention.out_projection, dtype))
        return LayerStepWeights(
            conv_weight=self.conv.weight.detach().to(dtype), conv_bias=self.conv.bias.detach().to(dtype),
            proj=None if self.proj is None else _step_linear(self.proj, dtype), attention=attention,
            conv_backend=conv_backend, attention_backend=attention_backend)


class Decoder(nn.Module):
    """prev_output_tokens (B, Tt) + EncoderOut -> logits (B, Tt, V_tgt) [, per-layer attention (B, Tt, Ts)].

    Incremental decoding (eval mode, one token per row and call, O(1) in the prefix length):
        state = decoder.init_state(enc)                       enc: EncoderOut of B rows
        logits, attn = decoder.step(tokens, state)            tokens (B,) -> logits (B, V_tgt)
        decoder.reorder_state(state, order)                   order (B',): the rows to keep, in that order
    The first step takes BOS (position 1), the n-th the (n-1)-th generated token: step-by-step logits equal
    decoder(prefix, enc)[:, -1] of the unpadded prefix.
    """

    def __init__(self, cfg: ConvS2SConfig):
        super().__init__()
        self.cfg = cfg
        E, p = cfg.decoder_embed_dim, cfg.dropout
        self.embed_tokens = _embedding(cfg.tgt_vocab_size, E, cfg.pad_idx)
        self.embed_positions = _embedding(cfg.max_target_positions + 1, E, 0)
        widths = [cfg.decoder_layers[0][0]]                                       # outputs' widths, fc1's first
        self.fc1 = WNLinear(E, widths[0], dropout=p)
        layers = []
        for (c, k, res), attention in zip(cfg.decoder_layers, cfg.decoder_attention):
            layers.append(DecoderLayer(widths[-1], c, k, residual_distance=res,
                                       residual_channels=widths[-res] if res > 0 else c, attention=attention,
                                       embed_dim=E, dropout=p, backend=cfg.backend))
            widths.append(c)
        self.layers = nn.ModuleList(layers)
        self.fc2 = WNLinear(widths[-1], cfg.decoder_out_embed_dim)
        if cfg.share_decoder_input_output_embed:
            self.fc3 = nn.Linear(cfg.decoder_out_embed_dim, cfg.tgt_vocab_size)
            nn.init.zeros_(self.fc3.bias)
            self.fc3.weight = self.embed_tokens.weight
        else:
            self.fc3 = WNLinear(cfg.decoder_out_embed_dim, cfg.tgt_vocab_size, dropout=p)
        self.register_load_state_dict_pre_hook(_upgrade_decoder_state_dict)

    def _run_layers(self, x, run_layer):
        """The loop over the layers, for forward and step: run_layer(i, layer, x, residual) -> (y, attention);
        residual = the output `residual_distance` layers back (fc1's output counts as layer -1's), None for
        distance 0. -> (the last layer's output, the attention layers' attentions)."""
        outputs, attentions = [x], []
        for i, layer in enumerate(self.layers):
            d = layer.residual_distance
            x, attn = run_layer(i, layer, x, outputs[-d] if d > 0 else None)
            if layer.attention is not None:
                attentions.append(attn)
            outputs.append(x)
        return x, attentions

    def forward(self, prev_output_tokens: torch.Tensor, enc: EncoderOut, return_attention: bool = False):
        cfg = self.cfg
        x = self.embed_tokens(prev_output_tokens) + self.embed_positions(positions(prev_output_tokens, cfg.pad_idx))
        x = F.dropout(x, p=cfg.dropout, training=self.training)                   # (B, Tt, E)
        target_embedding = x
        x = self.fc1(x)                                                           # (B, Tt, C_0)
        x, attentions = self._run_layers(x, lambda i, layer, x, residual: layer(
            x, target_embedding, enc, residual, need_weights=return_attention))   # (B, Tt, C_L)
        x = self.fc2(x)                                                           # (B, Tt, E_out)
        x = F.dropout(x, p=cfg.dropout, training=self.training)
        logits = self.fc3(x)                                                      # (B, Tt, V_tgt)
        return (logits, attentions) if return_attention else logits

    def step_dtype(self, device: torch.device | str) -> torch.dtype:
        """The dtype step() computes in on `device`: autocast's where autocast is on there (fp64 excepted, which
        autocast leaves alone, as the ops do), else the parameters'."""
        dtype, device_type = self.embed_tokens.weight.dtype, torch.device(device).type
        if torch.is_autocast_enabled(device_type) and dtype != torch.float64:
            return torch.get_autocast_dtype(device_type)
        return dtype

    @torch.no_grad()
    def prepare_step(self, device: torch.device | str | None = None) -> StepWeights:
        """The weights step() uses, weight norm applied and cast to step_dtype(device) once (under the autocast
        setting the steps will run under). Costs about one decoding step (see convs2s.search)."""
        if self.training:
            raise RuntimeError("incremental decoding runs in eval mode (no dropout); call model.eval() first")
        device = self.embed_tokens.weight.device if device is None else torch.device(device)
        dtype = self.step_dtype(device)
        conv_backend = resolve_backend("glu_conv_step", self.cfg.backend, device)
        attention_backend = resolve_backend("conv_attention", self.cfg.backend, device)
        return StepWeights(
            device=device, dtype=dtype, embed_tokens=self.embed_tokens.weight.detach(),
            embed_positions=self.embed_positions.weight.detach(), fc1=_step_linear(self.fc1, dtype),
            layers=[layer.prepare_step(dtype, conv_backend, attention_backend) for layer in self.layers],
            fc2=_step_linear(self.fc2, dtype), fc3=_step_linear(self.fc3, dtype))

    @torch.no_grad()
    def init_state(self, enc: EncoderOut, weights: StepWeights | None = None) -> DecoderState:
        """A fresh state for the B sentences `enc` describes; `weights` from prepare_step (default: prepared now)
        may be shared by many states."""
        device = enc.keys.device
        weights = self.prepare_step(device) if weights is None else weights
        if len(weights.layers) != len(self.layers):
            raise ValueError(f"weights were prepared for {len(weights.layers)} decoder layers, this decoder has "
                             f"{len(self.layers)}")
        same_device = weights.device.type == device.type and weights.device.index in (None, device.index)
        if not same_device or weights.dtype != self.step_dtype(device):
            raise ValueError(f"weights were prepared for {weights.dtype} on {weights.device}, but steps on {device} "
                             f"here run in {self.step_dtype(device)}: prepare them under the same device and "
                             "autocast setting")
        mask = enc.padding_mask
        if mask is not None:
            empty = mask.all(dim=1)
            if bool(empty.any()):
                raise ValueError(f"sentence(s) {empty.nonzero().flatten().tolist()} have no real source token")
            if not bool(mask.any()):
                mask = None                     # no padding: the ops skip the masking and take s = Ts
        B = enc.keys.shape[0]
        conv_states = [None if layer.conv.kernel_size == 1 else       # zeros: the causal conv's left padding
                       enc.keys.new_zeros(B, layer.conv.kernel_size - 1, layer.conv.in_channels, dtype=weights.dtype)
                       for layer in self.layers]
        enc = EncoderOut(enc.keys.detach().to(weights.dtype), enc.values.detach().to(weights.dtype), mask)
        return DecoderState(weights=weights, enc=enc, conv_states=conv_states)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: DecoderState, need_weights: bool = False):
        """tokens (B,) or (B, 1), the newest decoder input per row -> (logits (B, V_tgt), attention).

        attention: per attention layer the probabilities (B, Ts) when need_weights, else an empty list.
        Advances `state` by one position (its conv states, in place, and its step count).
        """
        w = state.weights
        tokens = tokens.reshape(-1)
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens has {tokens.shape[0]} rows but the state has {state.batch_size}; "
                             "reorder_state first")
        position = state.step + 1
        if position > self.cfg.max_target_positions:
            raise ValueError(f"step {state.step} reaches position {position} > max_target_positions = "
                             f"{self.cfg.max_target_positions}")
        emb = (F.embedding(tokens, w.embed_tokens) + w.embed_positions[position]).to(w.dtype)   # (B, E)
        x = w.fc1(emb)                                                            # (B, C_0)
        x, attentions = self._run_layers(x, lambda i, layer, x, residual: layer.step(
            x, emb, state.enc, residual, w.layers[i], state.conv_states[i], need_weights))     # (B, C_L)
        x = w.fc2(x)                                                              # (B, E_out)
        logits = w.fc3(x)                                                         # (B, V_tgt)
        state.step += 1
        return logits, (attentions if need_weights else [])

    def reorder_state(self, state: DecoderState, order: torch.Tensor, *, same_sources: bool = False) -> DecoderState:
        """Keep rows `order` (B',) int64 of the state, in that order (beam reordering, finished sentences).

        With B' == B the conv states are reordered in place (the same tensors), else replaced by new ones.
        same_sources: the caller knows each kept row keeps its encoder output (beams of one sentence reordered
        among themselves share it), so the encoder tensors are left as they are.
        """
        if order.shape[0] == state.batch_size:
            for conv_state in state.conv_states:
                if conv_state is not None:
                    conv_state.copy_(conv_state.index_select(0, order))
        else:
            state.conv_states = [None if s is None else s.index_select(0, order) for s in state.conv_states]
        if not same_sources:
            state.enc = EncoderOut(*(None if t is None else t.index_select(0, order) for t in state.enc))
        return state


def upgrade_decoder_key(key: str) -> str:
    """A decoder state-dict key (relative to the decoder) of the layout before DecoderLayer -> today's:
    convolutions.N.* -> layers.N.conv.*, attention.N.* -> layers.N.attention.*, projections.N.* ->
    layers.N.proj.* (fairseq's fconv uses the old layout). Other keys are returned unchanged."""
    head, _, rest = key.partition(".")
    new = {"convolutions": "conv", "attention": "attention", "projections": "proj"}.get(head)
    index, _, leaf = rest.partition(".")
    if new is None or not index.isdigit() or not leaf:
        return key
    return f"layers.{index}.{new}.{leaf}"


def _upgrade_decoder_state_dict(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: renames keys of the old decoder layout (see upgrade_decoder_key) in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + upgrade_decoder_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


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
                      dtype: torch.dtype | None = None) -> ConvS2S:
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
    def from_preset(cls, name: str, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> ConvS2S:
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
