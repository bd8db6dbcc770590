"""The ConvS2S model: causality, padding invariance, GradMultiply, init statistics, presets, bad inputs."""

import math

import pytest
import torch

from convs2s.model import PRESETS, ConvS2S, ConvS2SConfig, GradMultiply, positions, upgrade_decoder_key
from convs2s.nn import GLUConv1d, WNLinear

PAD = 1


def tiny(**overrides):
    torch.manual_seed(0)
    m = ConvS2S.from_preset("tiny", 40, 50, backend="reference", **overrides).double()
    return m.eval()


def tokens(B, T, vocab, lengths=None):
    t = torch.randint(4, vocab, (B, T))
    if lengths is not None:
        for b, n in enumerate(lengths):
            t[b, n:] = PAD
    return t


def test_causality():
    m = tiny()
    src, tgt = tokens(2, 7, 40), tokens(2, 9, 50)
    base = m(src, None, tgt)
    for t in (0, 3, 8):
        changed = tgt.clone()
        changed[:, t + 1:] = torch.randint(4, 50, changed[:, t + 1:].shape)
        changed[:, t] = (tgt[:, t] + 1 - 4) % 46 + 4
        out = m(src, None, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_source_right_padding_invariance():
    m = tiny()
    src, tgt = tokens(2, 6, 40, lengths=[6, 4]), tokens(2, 5, 50)
    base = m(src, None, tgt)
    padded = torch.cat([src, torch.full((2, 5), PAD)], dim=1)
    torch.testing.assert_close(m(padded, None, tgt), base, rtol=1e-12, atol=1e-12)


def test_source_left_and_right_padding_agree():
    m = tiny()
    right = tokens(2, 6, 40, lengths=[6, 3])
    left = right.clone()
    left[1] = torch.cat([torch.full((3,), PAD), right[1, :3]])
    tgt = tokens(2, 5, 50)
    torch.testing.assert_close(m(left, None, tgt), m(right, None, tgt), rtol=1e-12, atol=1e-12)


def test_target_right_padding_invariance():
    m = tiny()
    src, tgt = tokens(2, 6, 40), tokens(2, 5, 50, lengths=[5, 3])
    base = m(src, None, tgt)
    padded = torch.cat([tgt, torch.full((2, 4), PAD)], dim=1)
    out = m(src, None, padded)
    torch.testing.assert_close(out[0, :5], base[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1, :3], base[1, :3], rtol=1e-12, atol=1e-12)


def test_sentence_alone_equals_sentence_in_padded_batch():
    m = tiny()
    src = tokens(3, 8, 40, lengths=[8, 2, 5])
    tgt = tokens(3, 6, 50, lengths=[6, 4, 1])
    batch = m(src, None, tgt)
    for b, (s, t) in enumerate([(8, 6), (2, 4), (5, 1)]):
        alone = m(src[b:b + 1, :s], None, tgt[b:b + 1, :t])
        torch.testing.assert_close(batch[b:b + 1, :t], alone, rtol=1e-12, atol=1e-12)


def test_positions_count_from_first_real_token():
    t = torch.tensor([[5, 6, 7, PAD], [PAD, PAD, 8, 9]])
    assert positions(t, PAD).tolist() == [[1, 2, 3, 0], [0, 0, 1, 2]]


def test_grad_multiply_scales_gradient_not_value():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = GradMultiply.apply(x, 0.125)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.125))


def test_encoder_gradient_is_scaled_by_attention_layer_count():
    """With GradMultiply removed (scale 1), the encoder's parameter gradients are 2 * n_attention times larger."""
    m = tiny(dropout=0.0)
    n_att = sum(m.config.decoder_attention)
    assert m.encoder.num_attention_layers == n_att == 2
    src, tgt = tokens(2, 6, 40), tokens(2, 5, 50)
    m(src, None, tgt).square().sum().backward()
    g_scaled = m.encoder.fc2.weight_v.grad.clone()
    m.zero_grad()
    m.encoder.num_attention_layers = 0  # disables GradMultiply, nothing else
    m(src, None, tgt).square().sum().backward()
    torch.testing.assert_close(g_scaled * (2 * n_att), m.encoder.fc2.weight_v.grad, rtol=1e-10, atol=1e-12)


def test_init_statistics():
    torch.manual_seed(0)
    p = 0.8
    conv = GLUConv1d(512, 256, 3, dropout=1 - p)
    assert abs(conv.weight.std().item() - math.sqrt(4 * p / (3 * 512))) < 0.02 * math.sqrt(4 * p / (3 * 512))
    assert torch.equal(conv.bias, torch.zeros(512))
    lin = WNLinear(1024, 512, dropout=1 - p)
    assert abs(lin.weight.std().item() - math.sqrt(p / 1024)) < 0.02 * math.sqrt(p / 1024)
    m = ConvS2S.from_preset("multi30k", 1000, 1000)
    emb = m.encoder.embed_tokens.weight
    assert abs(emb[torch.arange(1000) != PAD].std().item() - 0.1) < 0.003
    assert torch.equal(emb[PAD], torch.zeros(256))
    assert torch.equal(m.encoder.embed_positions.weight[0], torch.zeros(256))
    # weight norm: g = ||v|| at init, so the effective weight is v itself
    torch.testing.assert_close(conv.weight, conv.weight_v.detach())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_forward_and_backward(name):
    torch.manual_seed(0)
    m = ConvS2S.from_preset(name, 30, 40, backend="reference")
    src, tgt = tokens(2, 5, 30, lengths=[5, 3]), tokens(2, 4, 40)
    logits, attn = m(src, None, tgt, return_attention=True)
    assert logits.shape == (2, 4, 40)
    assert len(attn) == sum(m.config.decoder_attention)
    assert all(a.shape == (2, 4, 5) for a in attn)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    # padding rows get no gradient but still have a .grad tensor; every parameter takes part
    assert not missing, missing


def test_tied_output_embedding():
    m = tiny(share_decoder_input_output_embed=True)
    assert m.decoder.fc3.weight is m.decoder.embed_tokens.weight
    assert m(tokens(1, 3, 40), None, tokens(1, 2, 50)).shape == (1, 2, 50)


def test_residual_distance_and_projection_layout():
    cfg = ConvS2SConfig(src_vocab_size=10, tgt_vocab_size=10, encoder_layers=[(8, 3), (12, 3), (12, 3, 2), (8, 1, 0)],
                        decoder_layers=[(8, 3)])
    m = ConvS2S(cfg)
    # layer 1: residual 8 -> 12 needs a projection; layer 2: from two back (width 8) -> 12; layer 3: none
    assert m.encoder.has_projection == [False, True, True, False]
    assert m.encoder.residual_distances == [1, 1, 2, 0]
    m = ConvS2S(ConvS2SConfig(src_vocab_size=10, tgt_vocab_size=10, decoder_layers=cfg.encoder_layers))
    assert [layer.proj is not None for layer in m.decoder.layers] == [False, True, True, False]
    assert [layer.residual_distance for layer in m.decoder.layers] == [1, 1, 2, 0]


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_residual_distance_beyond_the_first_layer_is_an_error(side):
    with pytest.raises(ValueError, match=f"{side} layer 1 has residual distance 3, but only 2 earlier output"):
        ConvS2SConfig(src_vocab_size=10, tgt_vocab_size=10, **{f"{side}_layers": [(8, 3), (8, 3, 3)]})


def old_decoder_layout(state_dict):
    """A state dict in the decoder layout before DecoderLayer (fairseq's): convolutions.N, attention.N,
    projections.N side by side."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[:2] == ["decoder", "layers"]:
            old = {"conv": "convolutions", "attention": "attention", "proj": "projections"}[parts[3]]
            key = ".".join(["decoder", old, parts[2]] + parts[4:])
        out[key] = value
    return out


def test_upgrade_decoder_key():
    assert upgrade_decoder_key("convolutions.3.weight_v") == "layers.3.conv.weight_v"
    assert upgrade_decoder_key("attention.0.in_projection.bias") == "layers.0.attention.in_projection.bias"
    assert upgrade_decoder_key("projections.12.weight_g") == "layers.12.proj.weight_g"
    for key in ("fc1.weight_v", "embed_tokens.weight", "layers.1.conv.bias", "attention.x.bias"):
        assert upgrade_decoder_key(key) == key


@pytest.mark.parametrize("tied", [False, True])
def test_old_decoder_layout_checkpoint_loads(tied):
    """Checkpoints saved before DecoderLayer (decoder.convolutions.N, decoder.attention.N, decoder.projections.N)
    load strictly into today's layout and give the same outputs."""
    over = dict(share_decoder_input_output_embed=True, decoder_out_embed_dim=16) if tied else {}
    ref = ConvS2S.from_preset("tiny", 20, 24, dropout=0.0, **over).double().eval()
    old = old_decoder_layout(ref.state_dict())
    assert "decoder.projections.1.weight_v" in old and "decoder.convolutions.2.bias" in old
    assert "decoder.attention.2.out_projection.weight_g" in old and not any(".layers." in k for k in old)
    model = ConvS2S.uninitialized(ref.config, dtype=torch.float64)
    model.load_state_dict(old, strict=True)
    decoder = ConvS2S.uninitialized(ref.config, dtype=torch.float64).decoder
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in old.items() if k.startswith("decoder.")})
    src = torch.randint(4, 20, (2, 7))
    src[:, -1] = 2
    prev = torch.randint(4, 24, (2, 5))
    with torch.no_grad():
        want = ref(src, None, prev)
        assert torch.equal(model.eval()(src, None, prev), want)
        assert torch.equal(decoder.eval()(prev, ref.encode(src)), want)


def test_config_round_trips_through_plain_dict():
    cfg = ConvS2S.from_preset("tiny", 11, 12).config
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, bool, list)) for v in d.values())
    assert ConvS2SConfig.from_dict(d) == cfg


def test_too_long_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="src_tokens has 129 positions, more than max positions = 128"):
        m(tokens(1, 129, 40), None, tokens(1, 3, 50))


def test_float_tokens_are_an_error():
    m = tiny()
    with pytest.raises(ValueError, match="src_tokens must be an integer tensor"):
        m(torch.randn(1, 3), None, tokens(1, 3, 50))


def test_batch_mismatch_is_an_error():
    m = tiny()
    with pytest.raises(ValueError, match="src_tokens has batch size 2 but prev_output_tokens has 3"):
        m(tokens(2, 3, 40), None, tokens(3, 3, 50))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        ConvS2S.from_preset("big", 3, 3)


def test_bad_layer_spec():
    with pytest.raises(ValueError, match="a layer is"):
        ConvS2SConfig(src_vocab_size=3, tgt_vocab_size=3, encoder_layers=[(8, 0)])


def test_all_padding_source_sentence_is_an_error():
    m = tiny()
    src = tokens(2, 4, 40, lengths=[4, 0])
    with pytest.raises(ValueError, match=r"src_tokens has no real \(non-padding\) token in sentence\(s\) \[1\]"):
        m(src, None, tokens(2, 3, 50))


@pytest.mark.parametrize("tied", [False, True])
def test_uninitialized_model_loads_a_state_dict_exactly(tied):
    """ConvS2S.uninitialized (meta-device build, for loading checkpoints): same parameters, same tie, and after
    load_state_dict the same outputs as the model the state came from."""
    over = dict(share_decoder_input_output_embed=True, decoder_out_embed_dim=16) if tied else {}
    ref = ConvS2S.from_preset("tiny", 20, 24, dropout=0.0, **over).double().eval()
    model = ConvS2S.uninitialized(ref.config, dtype=torch.float64)
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    assert (model.decoder.fc3.weight is model.decoder.embed_tokens.weight) == tied
    model.load_state_dict(ref.state_dict())
    src = torch.randint(4, 20, (2, 7))
    src[:, -1] = 2
    prev = torch.randint(4, 24, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.eval()(src, None, prev), ref(src, None, prev))


def test_float64_model_under_autocast_stays_float64():
    """autocast leaves float64 alone (torch's rule, which the fused ops' input casting follows): an fp64 model's
    logits are the same with and without a bf16 autocast region (not a mix of fp64 weights and bf16 inputs)."""
    model = ConvS2S.from_preset("tiny", 20, 20, dropout=0.0).double().eval()
    src = torch.randint(4, 20, (2, 6))
    src[:, -1] = 2
    prev = torch.randint(4, 20, (2, 4))
    with torch.no_grad():
        want = model(src, None, prev)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(src, None, prev)
    assert got.dtype == torch.float64 and torch.equal(got, want)
