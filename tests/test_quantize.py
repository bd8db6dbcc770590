"""int8 inference (convs2s.quantize): each layer kind exact where quantization is exact, products within their
quantization error bound, models within the rule of tests/tolerance.py against an emulation of the quantization,
search results mostly unchanged on a trained model, bad combinations refused.

The tolerances, and where they come from:
  * fbgemm vs int8_linear_ref (the emulation: quantize x per tensor to 7 bits, W per output channel, multiply in
    fp64): the same integers, so equal to fp32 rounding.
  * one product vs exact arithmetic: x rounds to its grid with error <= s_x / 2, each weight row n to its grid
    with error <= s_n / 2, so |dy_mn| <= s_x / 2 * ||w_n||_1 + s_n / 2 * ||x_m||_1 + K * s_x * s_n / 4.
  * a layer whose inputs and weights lie on their int8 grids loses nothing to quantization: it equals the fp32
    layer to fp32 rounding (this checks im2col, the padding, the step window, GLU and residuals exactly).
  * a whole model: its error against the fp64 model is at most 2x that of the emulated int8 model plus a floor
    (tests/tolerance.py's rule), i.e. the quantization steps are the only source of error.
"""

import copy

import pytest
import torch
import torch.nn as nn

from convs2s.model import ConvS2S, DecoderLayer, EncoderOut
from convs2s.nn import ConvAttention, GLUConv1d, WNLinear
from convs2s.ops import conv_attention_ref, glu_conv_ref, glu_conv_step_ref
from convs2s.quantize import (
    QMAX_ACTIVATION,
    Int8ConvAttention,
    Int8DecoderLayer,
    Int8GLUConv1d,
    Int8Linear,
    int8_linear_ref,
    is_quantized,
    quantize_for_inference,
    quantize_weight,
    weight_bytes,
)
from convs2s.search import beam_search
from tests.tolerance import assert_close_rule

RTOL32 = 1e-5          # fp32 rounding of sums of a few hundred terms, relative to the output's largest value


def assert_close(name, got, want, rtol=RTOL32):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    print(f"{name}: max err {err:.3e}, max|ref| {scale:.3e}")
    assert err <= rtol * max(scale, 1.0), f"{name}: max error {err:.3e} > {rtol} x {max(scale, 1.0):.3e}"


def on_grid_activation(*shape, zero_point=60, scale=0.05, generator=None):
    """Values already on the 7-bit activation grid: quantizing them is exact (the min and max levels occur)."""
    q = torch.randint(0, QMAX_ACTIVATION + 1, shape, generator=generator)
    q.view(-1)[0], q.view(-1)[-1] = 0, QMAX_ACTIVATION
    return (q - zero_point).float() * scale


def on_grid_weight(*shape, generator=None):
    """(..., N) weights whose output channel (last dim) is scale_n * integers in [-127, 127] with 127 reached."""
    q = torch.randint(-127, 128, shape, generator=generator).float()
    q.view(-1, shape[-1])[0] = 127.0
    scale = torch.rand(shape[-1], generator=generator) * 0.02 + 0.005
    return q * scale


def set_weight_norm(module, weight, dims):
    """Makes module's effective weight g * v / ||v|| equal `weight`."""
    with torch.no_grad():
        module.weight_v.copy_(weight)
        module.weight_g.copy_(weight.pow(2).sum(dim=dims, keepdim=module.weight_g.dim() > 1).sqrt()
                              .reshape(module.weight_g.shape))


# ---- one product ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,k,n", [((1,), 1, 1), ((3,), 5, 7), ((2, 3), 17, 40), ((9,), 700, 33),
                                       ((4, 1), 64, 300)])
def test_linear_equals_its_emulation(shape, k, n):
    g = torch.Generator().manual_seed(k * n)
    w, b = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    x = torch.randn(*shape, k, generator=g) * 2 + 0.5
    layer = Int8Linear(w, b).eval()
    with torch.no_grad():
        y = layer(x)
    q, scale, bias = layer.int8_weight()
    assert y.shape == (*shape, n) and q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert_close("fbgemm vs emulation", y, int8_linear_ref(x, q, scale, bias))


@pytest.mark.parametrize("k,offset", [(16, 0.0), (512, 0.0), (512, 3.0), (2048, -1.0)])
def test_linear_error_within_the_quantization_bound(k, offset):
    g = torch.Generator().manual_seed(k)
    n, m = 96, 12
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[5] = 0.0                                                         # an all-zero row (tied padding embedding)
    x = torch.randn(m, k, generator=g) + offset                        # offset: a one-sided range
    with torch.no_grad():
        y = Int8Linear(w, None).eval()(x)
    exact = x.double() @ w.double().T
    s_x = (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / QMAX_ACTIVATION
    s_w = quantize_weight(w)[1].double()                               # (n,)
    bound = (s_x / 2 * w.double().abs().sum(1)[None] + s_w[None] / 2 * x.double().abs().sum(1)[:, None]
             + k * s_x * s_w[None] / 4)                                # (m, n)
    err = (y.double() - exact).abs()
    print(f"k={k}: max err {err.max():.3e}, max err / bound {(err / bound.clamp(min=1e-30)).max():.3f}")
    assert (err <= bound * (1 + 1e-4) + 1e-6).all()
    assert err[:, 5].max() == 0.0                                      # a zero row stays exactly zero


# ---- layers: exact where the quantization is -------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_conv_forward_exact_on_the_grid(k, causal, with_residual):
    g = torch.Generator().manual_seed(10 * k + causal)
    c_in, c_out, B, T = 12, 10, 3, 7
    conv = GLUConv1d(c_in, c_out, k, causal=causal, residual=False).eval()
    set_weight_norm(conv, on_grid_weight(k, c_in, 2 * c_out, generator=g), dims=(0, 1))
    with torch.no_grad():
        conv.bias.normal_(generator=g)
    x = on_grid_activation(B, T, c_in, generator=g)
    residual = torch.randn(B, T, c_out, generator=g) if with_residual else None
    with torch.no_grad():
        got = Int8GLUConv1d(conv).eval()(x, residual)
        want = glu_conv_ref(x.double(), conv.weight.double(), conv.bias.double(),
                            None if residual is None else residual.double(), causal=causal)
    assert_close(f"conv k={k}", got, want)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_conv_step_exact_on_the_grid_and_updates_the_state(k):
    g = torch.Generator().manual_seed(k)
    c_in, c_out, B = 8, 6, 4
    conv = GLUConv1d(c_in, c_out, k, causal=True, residual=False).eval()
    set_weight_norm(conv, on_grid_weight(k, c_in, 2 * c_out, generator=g), dims=(0, 1))
    window = on_grid_activation(B, k, c_in, generator=g)               # the state's k-1 inputs and the new one
    state = window[:, :-1].contiguous() if k > 1 else None
    ref_state = None if state is None else state.double().clone()
    residual = torch.randn(B, c_out, generator=g)
    with torch.no_grad():
        got = Int8GLUConv1d(conv).eval().step(window[:, -1], state, residual)
        want = glu_conv_step_ref(window[:, -1].double(), ref_state, conv.weight.double(), conv.bias.double(),
                                 residual.double())
    assert_close(f"conv step k={k}", got, want)
    if k > 1:
        assert torch.equal(state, window[:, 1:])                       # the last k-1 inputs, oldest first


def attention_inputs(B=3, Tt=5, Ts=6, C=10, E=8, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    x = on_grid_activation(B, Tt, C, generator=g)
    emb, keys, values = (torch.randn(B, T, E, generator=g) for T in (Tt, Ts, Ts))
    mask = None
    if padded:
        mask = torch.zeros(B, Ts, dtype=torch.bool)
        mask[0, -2:] = True
        mask[1, :1] = True
    return x, emb, keys, values, mask


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_within_the_rule(padded, need_weights):
    """In-projection exact on the grid; the context (off the grid) costs the out-projection's quantization."""
    x, emb, keys, values, mask = attention_inputs(padded=padded)
    attn = ConvAttention(10, 8).eval()
    set_weight_norm(attn.in_projection, on_grid_weight(10, 8, generator=torch.Generator().manual_seed(1)).T, 1)
    ws = (attn.in_projection.weight, attn.in_projection.bias, attn.out_projection.weight, attn.out_projection.bias)
    with torch.no_grad():
        got, p = Int8ConvAttention(attn).eval()(x, emb, keys, values, mask, need_weights=need_weights)
        emulated, _ = Int8ConvAttention(attn, kernel="reference").eval()(x, emb, keys, values, mask)
        want, p_want = conv_attention_ref(*(t.double() for t in (x, emb, keys, values)), mask,
                                          *(w.double() for w in ws), need_weights=True)
    assert (p is not None) == need_weights
    if need_weights:
        assert_close("probabilities (in-projection on the grid)", p, p_want)
    assert_close_rule("attention", got, emulated, want, torch.float32)


@pytest.mark.parametrize("k,attention,res_dim", [(3, True, 10), (2, False, 6), (1, True, 6), (3, False, 10)])
def test_decoder_layer_step_is_the_last_position_of_its_forward(k, attention, res_dim):
    """Int8DecoderLayer.step over a prefix, one token at a time, vs the fp64 layer's forward over the prefix."""
    g = torch.Generator().manual_seed(k)
    B, T, Ts, c_in, C, E = 3, 5, 4, 6, 10, 8
    layer = DecoderLayer(c_in, C, k, residual_distance=1, residual_channels=res_dim, attention=attention,
                         embed_dim=E, dropout=0.0, backend="reference").eval()
    x, residual = torch.randn(B, T, c_in, generator=g), torch.randn(B, T, res_dim, generator=g)
    emb = torch.randn(B, T, E, generator=g)
    enc = EncoderOut(torch.randn(B, Ts, E, generator=g), torch.randn(B, Ts, E, generator=g), None)
    with torch.no_grad():
        want, _ = copy.deepcopy(layer).double()(x.double(), emb.double(), EncoderOut(*(t.double() for t in enc[:2]),
                                                None), residual.double())
        outs = {}
        for kernel in ("fbgemm", "reference"):
            q = Int8DecoderLayer(layer, kernel=kernel).eval()
            weights = q.prepare_step(torch.float32, "reference", "reference")
            state = torch.zeros(B, k - 1, c_in) if k > 1 else None
            outs[kernel] = torch.stack([q.step(x[:, t], emb[:, t], enc, residual[:, t], weights, state)[0]
                                        for t in range(T)], dim=1)   # (B, T, C)
    assert_close_rule("layer step", outs["fbgemm"], outs["reference"], want, torch.float32)


# ---- models ----------------------------------------------------------------------------------------------------

def tiny(tied=False, seed=0, vocab=40):
    torch.manual_seed(seed)
    return ConvS2S.from_preset("tiny", vocab, vocab, share_decoder_input_output_embed=tied,
                               backend="reference").eval()


def batch(vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (5, 9), generator=g)
    src[:, -1] = 2
    src[1, :3], src[3, :1] = 1, 1                                     # left padding
    prev = torch.randint(4, vocab, (5, 7), generator=g)
    prev[:, 0] = 2
    return src, prev


@pytest.mark.parametrize("tied", [False, True])
def test_every_weight_product_is_int8(tied):
    model = tiny(tied)
    q = quantize_for_inference(model)
    assert not any(isinstance(m, (WNLinear, GLUConv1d, ConvAttention, nn.Linear)) for m in q.modules())
    products = sum(isinstance(m, (WNLinear, GLUConv1d, nn.Linear)) for m in model.modules())   # fc3 tied or not
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == products
    assert isinstance(q.encoder.projections[2], Int8Linear) and isinstance(q.decoder.layers[1].proj, Int8Linear)
    assert isinstance(q.decoder.layers[0].attention, Int8ConvAttention) and isinstance(q.decoder.fc3, Int8Linear)
    assert {m.kernel_size for m in q.modules() if isinstance(m, Int8GLUConv1d)} == {1, 2, 3}
    assert isinstance(q.decoder.embed_tokens, nn.Embedding) and q.decoder.embed_tokens.weight.dtype == torch.float32
    assert weight_bytes(q) < weight_bytes(model) / 2


@pytest.mark.parametrize("tied", [False, True])
def test_model_logits_within_the_rule(tied):
    model = tiny(tied)
    src, prev = batch()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(src, None, prev)
        got = quantize_for_inference(model)(src, None, prev)
        emulated = quantize_for_inference(model, kernel="reference")(src, None, prev)
    assert_close_rule("logits", got, emulated, want, torch.float32)


def test_copy_and_inplace():
    model = tiny()
    src, prev = batch()
    with torch.no_grad():
        before = model(src, None, prev)
        q = quantize_for_inference(model)
        assert q is not model and not is_quantized(model)
        assert torch.equal(model(src, None, prev), before)
        same = quantize_for_inference(model, inplace=True)
        assert same is model and is_quantized(model)
        assert torch.equal(q(src, None, prev), model(src, None, prev))


@pytest.mark.parametrize("tied", [False, True])
def test_incremental_step_within_the_rule(tied):
    model = tiny(tied)
    src, prev = batch()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(src, None, prev)
        outs = {}
        for kernel in ("fbgemm", "reference"):
            q = quantize_for_inference(model, kernel=kernel)
            state = q.decoder.init_state(q.encode(src))
            outs[kernel] = torch.stack([q.decoder.step(prev[:, t], state)[0] for t in range(prev.shape[1])], 1)
    assert_close_rule("step logits", outs["fbgemm"], outs["reference"], want, torch.float32)


# ---- search on a model with real margins -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def reverser():
    """The tiny preset trained to reverse 6-token sentences (100 Adam steps: loss ~0.1, real margins)."""
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", 24, 24, dropout=0.0, backend="reference")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        body = torch.randint(4, 24, (64, 6))
        eos = torch.full((64, 1), 2)
        src, prev, out = torch.cat([body, eos], 1), torch.cat([eos, body.flip(1)], 1), torch.cat([body.flip(1), eos], 1)
        loss = nn.functional.cross_entropy(model(src, None, prev).reshape(-1, 24), out.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def agreement(model, q, beam, incremental):
    g = torch.Generator().manual_seed(1)
    src = torch.cat([torch.randint(4, 24, (40, 6), generator=g), torch.full((40, 1), 2)], 1)
    h32 = beam_search(model, src, beam=beam, incremental=incremental)
    h8 = beam_search(q, src, beam=beam, incremental=incremental)
    same = sum(torch.equal(a[0].tokens, b[0].tokens) for a, b in zip(h32, h8)) / len(h32)
    print(f"beam {beam}: identical best hypotheses {same:.0%}")
    return same


@pytest.mark.parametrize("beam", [1, 4])
def test_search_results_mostly_identical(reverser, beam):
    assert agreement(reverser, quantize_for_inference(reverser), beam, incremental=False) >= 0.9


@pytest.mark.parametrize("beam", [1, 4])
def test_incremental_search_results_mostly_identical(reverser, beam):
    assert agreement(reverser, quantize_for_inference(reverser), beam, incremental=True) >= 0.9


# ---- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_refuses_non_fp32_models(dtype):
    with pytest.raises(ValueError, match="takes a float32 model"):
        quantize_for_inference(tiny().to(dtype))


def test_refuses_models_off_the_cpu():
    with pytest.raises(ValueError, match="runs on the CPU"):
        quantize_for_inference(tiny().to("meta"))


@pytest.mark.needs_cuda
def test_refuses_cuda_models():
    with pytest.raises(ValueError, match="runs on the CPU.*cuda"):
        quantize_for_inference(tiny().cuda())


def test_refuses_training_mode_triton_and_double_quantization():
    with pytest.raises(ValueError, match="eval mode"):
        quantize_for_inference(tiny().train())
    model = tiny()
    model.config.backend = "triton"
    with pytest.raises(ValueError, match="'triton'"):
        quantize_for_inference(model)
    with pytest.raises(ValueError, match="already int8"):
        quantize_for_inference(quantize_for_inference(tiny()))
    with pytest.raises(ValueError, match="ConvS2S"):
        quantize_for_inference(nn.Linear(2, 2))


def test_int8_layers_refuse_training_autocast_grad_and_other_devices():
    layer = Int8Linear(torch.randn(4, 3), torch.zeros(4)).eval()
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="no training mode"):
        copy.deepcopy(layer).train()(x)
    with pytest.raises(ValueError, match="float32.*autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    with pytest.raises(ValueError, match="got a torch.bfloat16 input"):
        layer(x.bfloat16())
    with pytest.raises(RuntimeError, match="no autograd"):
        layer(x.requires_grad_())
    with pytest.raises(ValueError, match="runs on the CPU"):
        layer(torch.randn(2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="step in float32"):
        layer.prepare_step(torch.bfloat16)
    with pytest.raises(ValueError, match="kernel must be"):
        Int8Linear(torch.randn(4, 3), None, kernel="triton")


def test_converted_fairseq_model_within_the_rule():
    """The --fairseq path: a fairseq-layout checkpoint (fconv_wmt_en_de's layer pattern, width / 16) converted."""
    from bench.bench_fairseq import fairseq_checkpoint
    from convs2s.convert import from_fairseq
    model = from_fairseq(fairseq_checkpoint("fconv_wmt_en_de", 50, 60, width_divisor=16, max_positions=64),
                         backend="reference")
    src, prev = batch(vocab=50)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(src, None, prev)
        got = quantize_for_inference(model)(src, None, prev)
        emulated = quantize_for_inference(model, kernel="reference")(src, None, prev)
        hyps = beam_search(quantize_for_inference(model), src, beam=2, max_len=6)
    assert_close_rule("fairseq logits", got, emulated, want, torch.float32)
    assert all(len(h[0].tokens) <= 7 for h in hyps)
