"""int8 inference on the CPU: per-output-channel symmetric int8 weights, dynamically quantized activations.

    int8_model = quantize_for_inference(model)          a new model (or `inplace=True`); `model` is unchanged
    hyps = beam_search(int8_model, src_tokens, ...)     decoding as with the fp32 model

Every matrix product with a weight runs as fbgemm's dynamic-quantized linear (torch.ops.quantized.linear_dynamic):
the weight (after weight norm) is quantized once, per output channel and symmetric, w ~ s_n * q (q in [-127, 127],
s_n = max|w_n| / 127); the activation is quantized per call, per tensor and asymmetric, to 7 bits (see
_REDUCE_RANGE); products accumulate in int32 and are rescaled to fp32 with the bias added. Quantized:

    encoder fc1, fc2, residual projections, convolutions (im2col: one (B*T, k*C_in) @ (k*C_in, 2*C_out) product)
    decoder fc1, fc2, residual projections, convolutions (the step: the window (B, k*C_in) @ (k*C_in, 2*C_out)),
            attention in/out projections, the output projection fc3 (also when tied to the embedding: the lookup
            keeps the fp32 embedding, fc3 gets an int8 copy of it)

The embeddings, the attention's score and context products (activations times activations), the GLU, softmax and
residual sums stay fp32. Decoding a step streams every weight once; int8 weights are a quarter of the bytes.

The activation scale is per tensor, so a sentence's result depends (within the quantization error) on the other
sentences of its batch. int8 models live on the CPU, in eval mode, without autograd, in fp32; their weights are
not parameters (state_dict() holds only the fp32 embeddings): quantize after loading a checkpoint.

int8_linear_ref is the plain-PyTorch emulation of one quantized product (equal to fbgemm's result to fp32
rounding); quantize_for_inference(model, kernel="reference") builds a model that computes with it, for tests.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ConvS2S, DecoderLayer
from .nn import ConvAttention, GLUConv1d, WNLinear
from .ops.conv_attention import source_lengths_scale

SQRT_HALF = 0.5 ** 0.5
QMAX_WEIGHT = 127                # symmetric int8 weights: q in [-127, 127]
# fbgemm's AVX2 kernel (CPUs without AVX512-VNNI) multiplies u8 activations by s8 weights with vpmaddubsw,
# which sums pairs into a saturating int16: 255 * 127 * 2 overflows it, 127 * 127 * 2 does not. Full-range
# (8-bit) activations measured a max error of 1.37 against 0.061 for 7-bit ones on a (16, 32) @ (32, 256) product.
_REDUCE_RANGE = True
QMAX_ACTIVATION = 127 if _REDUCE_RANGE else 255
KERNELS = ("fbgemm", "reference")


def _check_engine() -> None:
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm"):
        raise RuntimeError(f"int8 inference needs PyTorch's x86 or fbgemm quantized engine, but "
                           f"torch.backends.quantized.engine is {engine!r} (supported here: "
                           f"{torch.backends.quantized.supported_engines})")


def _check_input(name: str, x: torch.Tensor, training: bool) -> None:
    if training:
        raise RuntimeError(f"{name} is an int8 inference layer: it has no training mode (call .eval())")
    if x.device.type != "cpu":
        raise ValueError(f"{name} runs on the CPU (fbgemm), got an input on {x.device}")
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        raise ValueError(f"{name} computes in float32 (int8 weights): got a {x.dtype} input"
                         + (" under CPU autocast" if torch.is_autocast_enabled("cpu") else "")
                         + "; run int8 models in float32, without autocast")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} has no autograd: call it under torch.no_grad() or torch.inference_mode()")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) fp32 -> (q (N, K) int8 in [-127, 127], scale (N,) fp32) with weight ~ scale[:, None] * q.

    scale = max|weight_n| / 127 per output channel n (1 for an all-zero row, e.g. the tied embedding's padding).
    """
    amax = weight.detach().abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX_WEIGHT, torch.ones_like(amax))
    q = torch.round(weight.detach() / scale[:, None]).clamp(-QMAX_WEIGHT, QMAX_WEIGHT).to(torch.int8)
    return q, scale


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of an int8 weight (N, K) with per-channel scales (N,) and an fp32 bias (N,)."""
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # The quantized-tensor constructors warn that they are deprecated; linear_prepack takes nothing else.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().contiguous())


def quantize_activation_ref(x: torch.Tensor) -> torch.Tensor:
    """x (...) fp32 -> its dynamic per-tensor quantization, dequantized (same shape), as fbgemm computes it.

    The range [min(x, 0), max(x, 0)] maps to QMAX_ACTIVATION + 1 levels: scale = range / QMAX_ACTIVATION,
    zero point = round(-min / scale); each element rounds to the nearest level (error <= scale / 2).
    """
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / QMAX_ACTIVATION
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, QMAX_ACTIVATION)
    return (torch.round(x / scale) + zero).clamp(0, QMAX_ACTIVATION).sub(zero).mul(scale)


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The plain-PyTorch emulation of Int8Linear (fp64 arithmetic, fp32 result).

    x (..., K) fp32, q (N, K) int8, scale (N,), bias (N,) or None -> (..., N) fp32:
        quantize_activation_ref(x) @ (scale[:, None] * q).T + bias
    """
    w = q.double() * scale.double()[:, None]
    y = F.linear(quantize_activation_ref(x.double()), w, None if bias is None else bias.double())
    return y.float()


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W quantized per output channel to int8 and x quantized per call (fbgemm).

    weight (N, K) fp32 (weight norm already applied), bias (N,) or None.
    forward(x (..., K) fp32, CPU) -> (..., N) fp32. Also the decoder's prepared step form (prepare_step).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, kernel: str = "fbgemm"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel
        q, scale = quantize_weight(weight.float())
        bias = None if bias is None else bias.detach().float().clone()
        if kernel == "fbgemm":
            self._packed = _pack(q, scale, bias)
        else:
            self._q, self._scale, self._bias = q, scale, bias

    @classmethod
    def from_float(cls, module: nn.Module, *, kernel: str = "fbgemm") -> Int8Linear:
        """From a WNLinear or an nn.Linear (a tied output projection: the embedding itself stays fp32)."""
        return cls(module.weight.detach(), module.bias, kernel=kernel)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q (N, K) int8, scale (N,) fp32, bias (N,) fp32 or None): what the layer computes with."""
        if self.kernel == "reference":
            return self._q, self._scale, self._bias
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float(), bias

    def weight_bytes(self) -> int:
        """Bytes of the weights as stored: int8 values, fp32 scales and bias."""
        return self.out_features * (self.in_features + 4 + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("Int8Linear", x, self.training)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        if self.kernel == "reference":
            return int8_linear_ref(x, self._q, self._scale, self._bias)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).contiguous(), self._packed,
                                               _REDUCE_RANGE)
        return y.view(*x.shape[:-1], self.out_features)

    def prepare_step(self, dtype: torch.dtype) -> Int8Linear:
        """The decoder's prepared form of this layer for step(): itself (the weights are prepared already)."""
        if dtype != torch.float32:
            raise ValueError(f"int8 layers step in float32, not {dtype} (run int8 models without autocast)")
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel}"


class Int8GLUConv1d(nn.Module):
    """GLUConv1d (eval) with the flattened k-tap weight (k*C_in, 2*C_out) as one Int8Linear.

    forward(x (B, T, C_in), residual (B, T, C_out) or None) -> (B, T, C_out): the whole sequence, as im2col
      (each position's window of k inputs, zero-padded like the conv: causal k-1 left, else (k-1)//2 left and
      k//2 right) times the flattened weight, then GLU, then (· + residual) * sqrt(0.5) where a residual is given.
    step(x (B, C_in), conv_state (B, k-1, C_in) or None for k = 1, residual (B, C_out) or None) -> (B, C_out):
      one causal decoding step, glu_conv_step's contract (conv_state, the last k-1 inputs, updated in place).
    """

    def __init__(self, conv: GLUConv1d, *, kernel: str = "fbgemm"):
        super().__init__()
        if conv.residual:
            raise ValueError("Int8GLUConv1d takes convs whose residual the caller passes (residual=False), "
                             "as the encoder's and decoder's are")
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.causal = conv.causal
        w = conv.weight.detach()                                                  # (k, C_in, 2*C_out)
        k, c_in, c2 = w.shape
        self.linear = Int8Linear(w.reshape(k * c_in, c2).t(), conv.bias, kernel=kernel)   # (2*C_out, k*C_in)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _check_input("Int8GLUConv1d", x, self.training)
        B, T, c_in = x.shape
        k = self.kernel_size
        left = k - 1 if self.causal else (k - 1) // 2
        padded = F.pad(x, (0, 0, left, k - 1 - left))                             # (B, T + k - 1, C_in)
        windows = padded.unfold(1, k, 1).transpose(2, 3)                          # (B, T, k, C_in)
        h = self.linear(windows.reshape(B, T, k * c_in))                          # (B, T, 2*C_out)
        return self._glu(h, residual)

    def step(self, x: torch.Tensor, conv_state: torch.Tensor | None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernel_size
        B = x.shape[0]
        window = x[:, None] if k == 1 else torch.cat([conv_state, x[:, None]], dim=1)    # (B, k, C_in)
        h = self.linear(window.reshape(B, k * self.in_channels))                  # (B, 2*C_out)
        if k > 1:
            conv_state.copy_(window[:, 1:])                                       # (B, k-1, C_in)
        return self._glu(h, residual)

    @staticmethod
    def _glu(h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        g = F.glu(h, dim=-1)
        return g if residual is None else (g + residual) * SQRT_HALF

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, causal={self.causal}"


class Int8ConvAttention(nn.Module):
    """ConvAttention with int8 in/out projections; scores, softmax (fp32) and context as conv_attention_ref.

    forward(x (B, Tt, C), target_embedding (B, Tt, E), encoder_keys (B, Ts, E), encoder_values (B, Ts, E),
            src_padding_mask (B, Ts) bool or None, need_weights=False) -> (out (B, Tt, C), attention or None)
    """

    def __init__(self, attention: ConvAttention, *, kernel: str = "fbgemm"):
        super().__init__()
        self.in_projection = Int8Linear.from_float(attention.in_projection, kernel=kernel)
        self.out_projection = Int8Linear.from_float(attention.out_projection, kernel=kernel)

    def forward(self, x, target_embedding, encoder_keys, encoder_values, src_padding_mask,
                need_weights: bool = False):
        q = (self.in_projection(x) + target_embedding) * SQRT_HALF                 # (B, Tt, E)
        scores = torch.bmm(q, encoder_keys.transpose(1, 2))                       # (B, Tt, Ts)
        if src_padding_mask is not None:
            scores = scores.masked_fill(src_padding_mask.unsqueeze(1), float("-inf"))
        p = torch.softmax(scores, dim=-1)                                         # (B, Tt, Ts)
        scale = source_lengths_scale(src_padding_mask, encoder_keys.shape[1], x.shape[0], x.device)
        ctx = torch.bmm(p, encoder_values) * scale[:, None, None]                 # (B, Tt, E)
        out = (self.out_projection(ctx) + x) * SQRT_HALF                          # (B, Tt, C)
        return out, (p if need_weights else None)


class Int8DecoderLayer(DecoderLayer):
    """A DecoderLayer whose conv, attention and projection are int8: forward is DecoderLayer's (through the
    modules); step computes the same one token at a time with the int8 modules' step forms."""

    def __init__(self, layer: DecoderLayer, *, kernel: str = "fbgemm"):
        nn.Module.__init__(self)
        for name, value in vars(layer).items():                  # plain attributes (residual_distance, ...)
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in layer.named_children():
            setattr(self, name, _quantize_module(child, kernel))

    def prepare_step(self, dtype: torch.dtype, conv_backend: str, attention_backend: str):
        """Nothing to prepare (the int8 weights are ready); checks that steps run in float32."""
        if dtype != torch.float32:
            raise ValueError(f"int8 layers step in float32, not {dtype} (run int8 models without autocast)")
        return None

    def step(self, x, target_embedding, enc, residual, weights, conv_state, need_weights: bool = False):
        def conv(h, res):
            return self.conv.step(h, conv_state, res)                            # (B, C)

        def attend(h):
            out, attn = self.attention(h[:, None], target_embedding[:, None], enc.keys, enc.values,
                                       enc.padding_mask, need_weights=need_weights)   # (B, 1, C), (B, 1, Ts)
            return out[:, 0], (attn[:, 0] if need_weights else None)
        return self._block(x, residual, self.proj, conv, attend)


def _quantize_module(module: nn.Module, kernel: str) -> nn.Module:
    """The int8 form of `module` and its children (a new module; the embeddings are shared, not copied)."""
    if isinstance(module, (WNLinear, nn.Linear)):
        return Int8Linear.from_float(module, kernel=kernel)
    if isinstance(module, GLUConv1d):
        return Int8GLUConv1d(module, kernel=kernel)
    if isinstance(module, ConvAttention):
        return Int8ConvAttention(module, kernel=kernel)
    if isinstance(module, DecoderLayer):
        return Int8DecoderLayer(module, kernel=kernel)
    if isinstance(module, nn.Embedding) or isinstance(module, (Int8Linear, Int8GLUConv1d, Int8ConvAttention)):
        return module
    if any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"quantize_for_inference has no int8 form for {type(module).__name__}")
    for name, child in module.named_children():
        setattr(module, name, _quantize_module(child, kernel))
    return module


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds int8 layers (quantize_for_inference's result)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


@torch.no_grad()
def quantize_for_inference(model: ConvS2S, *, inplace: bool = False, kernel: str = "fbgemm") -> ConvS2S:
    """An int8 copy of `model` (fp32, CPU, eval mode) for translation; `model` stays as it is.

    inplace=True converts `model` itself (no copy of the fp32 weights is made: for a large model, the peak
    memory of converting is the fp32 model plus its int8 weights). kernel="reference" computes every quantized
    product with int8_linear_ref instead of fbgemm (tests). The int8 layers refuse to run in training mode.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not isinstance(model, ConvS2S):
        raise ValueError(f"quantize_for_inference takes a ConvS2S model, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("the model is already int8")
    _check_engine()
    params = list(model.parameters())
    devices = sorted({str(p.device) for p in params if p.device.type != "cpu"})
    if devices:
        raise ValueError(f"int8 inference runs on the CPU (fbgemm); the model has parameters on {', '.join(devices)}: "
                         "move it with model.cpu() first")
    dtypes = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"quantize_for_inference takes a float32 model, got parameters in {', '.join(dtypes)}: "
                         "quantize the fp32 weights (model.float())")
    if model.training:
        raise ValueError("quantize_for_inference takes a model in eval mode (int8 layers have no dropout and no "
                         "backward): call model.eval() first")
    if model.config.backend == "triton":
        raise ValueError("the model's backend is 'triton' (a GPU backend), but int8 inference runs on the CPU: "
                         "set config.backend to 'auto', 'native' or 'reference'")
    if not inplace:
        model = copy.deepcopy(model)
    _quantize_module(model, kernel)
    model.requires_grad_(False).eval()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: fp32 parameters (the embeddings) plus int8 layers' weights."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(m.weight_bytes() for m in model.modules() if isinstance(m, Int8Linear))


__all__ = ["quantize_for_inference", "Int8Linear", "Int8GLUConv1d", "Int8ConvAttention", "Int8DecoderLayer",
           "int8_linear_ref", "quantize_activation_ref", "quantize_weight", "weight_bytes", "is_quantized"]
