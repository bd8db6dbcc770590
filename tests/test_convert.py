"""fairseq fconv checkpoint -> ConvS2S: the converted model's logits against an independent fp64 re-implementation
of fairseq's fconv forward written here from the raw fairseq tensors (weight norm, ConvTBC as per-tap matmuls with
fairseq's padding, AttentionLayer, learned positions offset by padding_idx)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from convs2s.convert import ARCH_DEFAULTS, from_fairseq, parse_layer_string, read_fairseq_dict

PAD, EOS = 1, 2
ENC_LAYERS = "[(8, 3)] + [(12, 2)] * 2 + [(12, 3, 2), (16, 1, 0), (16, 4)]"
DEC_LAYERS = "[(8, 3), (12, 2), (12, 1, 2), (16, 3, 0)] + [(16, 4)]"
DEC_ATTENTION = "[True, False, True, True, False]"
MAX_POS = 20


def _args(share=False, **over) -> argparse.Namespace:
    return argparse.Namespace(**{
        "arch": "fconv", "dropout": 0.2, "encoder_embed_dim": 10, "encoder_layers": ENC_LAYERS,
        "decoder_embed_dim": 10, "decoder_layers": DEC_LAYERS, "decoder_out_embed_dim": 10 if share else 6,
        "decoder_attention": DEC_ATTENTION, "share_input_output_embed": share, "max_source_positions": MAX_POS,
        "max_target_positions": MAX_POS, **over})


def _attention_flags(args, n):
    flags = parse_layer_string(args.decoder_attention)
    return [flags] * n if isinstance(flags, bool) else flags


def _linear(sd, prefix, n_in, n_out, g):
    sd[prefix + "weight_g"] = torch.rand(n_out, 1, generator=g, dtype=torch.float64) + 0.5
    sd[prefix + "weight_v"] = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    sd[prefix + "bias"] = 0.1 * torch.randn(n_out, generator=g, dtype=torch.float64)


def _embedding(rows, dim, pad_row, g):
    w = 0.3 * torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w[pad_row] = 0.0
    return w


def _fairseq_state_dict(args, src_vocab=13, tgt_vocab=11, old_decoder_wn=False, seed=0) -> dict:
    """Random tensors with fairseq fconv's key names and shapes (positions table: max + padding_idx + 1 rows;
    the rows below padding_idx are never used by fairseq, so they are random here)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for side, vocab in (("encoder", src_vocab), ("decoder", tgt_vocab)):
        E = getattr(args, f"{side}_embed_dim")
        layers = [s + (1,) if len(s) == 2 else s for s in parse_layer_string(getattr(args, f"{side}_layers"))]
        sd[f"{side}.embed_tokens.weight"] = _embedding(vocab, E, PAD, g)
        sd[f"{side}.embed_positions.weight"] = _embedding(MAX_POS + PAD + 1, E, PAD, g)
        _linear(sd, f"{side}.fc1.", E, layers[0][0], g)
        widths = [layers[0][0]]
        attention = _attention_flags(args, len(layers))
        for i, (c, k, r) in enumerate(layers):
            res_dim = c if r == 0 else widths[-r]
            if res_dim != c:
                _linear(sd, f"{side}.projections.{i}.", res_dim, c, g)
            if side == "decoder" and old_decoder_wn:
                sd[f"{side}.convolutions.{i}.weight_g"] = 0.5 + torch.rand(k, 1, 1, generator=g,
                                                                           dtype=torch.float64)
            else:
                sd[f"{side}.convolutions.{i}.weight_g"] = 0.5 + torch.rand(1, 1, 2 * c, generator=g,
                                                                           dtype=torch.float64)
            sd[f"{side}.convolutions.{i}.weight_v"] = torch.randn(k, widths[-1], 2 * c, generator=g,
                                                                   dtype=torch.float64)
            sd[f"{side}.convolutions.{i}.bias"] = 0.1 * torch.randn(2 * c, generator=g, dtype=torch.float64)
            if side == "decoder" and attention[i]:
                _linear(sd, f"decoder.attention.{i}.in_projection.", c, E, g)
                _linear(sd, f"decoder.attention.{i}.out_projection.", E, c, g)
            widths.append(c)
        if side == "encoder":
            _linear(sd, "encoder.fc2.", widths[-1], E, g)
        else:
            _linear(sd, "decoder.fc2.", widths[-1], args.decoder_out_embed_dim, g)
            if args.share_input_output_embed:
                sd["decoder.fc3.weight"] = sd["decoder.embed_tokens.weight"]
                sd["decoder.fc3.bias"] = 0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)
            else:
                _linear(sd, "decoder.fc3.", args.decoder_out_embed_dim, vocab, g)
    sd["decoder.version"] = torch.tensor([1.0 if old_decoder_wn else 2.0])
    return sd


# ---- the independent fairseq fconv forward (fp64, eval mode; sources may be right-padded, targets not) ----

def _wn_linear(sd, prefix):
    v, g = sd[prefix + "weight_v"], sd[prefix + "weight_g"]
    w = g * v / v.pow(2).sum(dim=1, keepdim=True).sqrt()
    return lambda x: x @ w.T + sd[prefix + "bias"]


def _conv_tbc(sd, prefix, x, padding):
    """fairseq ConvTBC: x (T, B, C_in), weight (k, C_in, 2C); out[t] = bias + sum_j x_pad[t + j] @ W[j]."""
    v, g = sd[prefix + "weight_v"], sd[prefix + "weight_g"]
    dims = (0, 1) if g.shape[2] == v.shape[2] else (1, 2)  # weight_norm dim=2, or the old decoders' dim=0
    w = g * v / v.pow(2).sum(dim=dims, keepdim=True).sqrt()
    k = w.shape[0]
    xp = F.pad(x, (0, 0, 0, 0, padding, padding))
    t_out = xp.shape[0] - k + 1
    return sd[prefix + "bias"] + sum(xp[j:j + t_out] @ w[j] for j in range(k))


def _glu(x):
    a, b = x.chunk(2, dim=-1)
    return a * torch.sigmoid(b)


def _fairseq_forward(sd, args, src, prev):
    half = math.sqrt(0.5)
    enc_layers = [s + (1,) if len(s) == 2 else s for s in parse_layer_string(args.encoder_layers)]
    dec_layers = [s + (1,) if len(s) == 2 else s for s in parse_layer_string(args.decoder_layers)]
    attention = _attention_flags(args, len(dec_layers))

    def embed(side, tokens):
        real = tokens.ne(PAD)
        pos = torch.cumsum(real, dim=1) * real + PAD                            # fairseq's make_positions
        return sd[f"{side}.embed_tokens.weight"][tokens] + sd[f"{side}.embed_positions.weight"][pos]

    x = embed("encoder", src)
    input_embedding = x
    x = _wn_linear(sd, "encoder.fc1.")(x).transpose(0, 1)
    pad_mask = src.eq(PAD).t().unsqueeze(-1)                                    # (Ts, B, 1)
    residuals = [x]
    for i, (_, k, r) in enumerate(enc_layers):
        residual = None
        if r > 0:
            residual = residuals[-r]
            if f"encoder.projections.{i}.weight_v" in sd:
                residual = _wn_linear(sd, f"encoder.projections.{i}.")(residual)
        x = x.masked_fill(pad_mask, 0.0)
        if k % 2 == 1:
            x = _conv_tbc(sd, f"encoder.convolutions.{i}.", x, k // 2)
        else:
            x = _conv_tbc(sd, f"encoder.convolutions.{i}.", F.pad(x, (0, 0, 0, 0, (k - 1) // 2, k // 2)), 0)
        x = _glu(x)
        if residual is not None:
            x = (x + residual) * half
        residuals.append(x)
    enc_a = _wn_linear(sd, "encoder.fc2.")(x.transpose(0, 1)).masked_fill(pad_mask.transpose(0, 1), 0.0)
    enc_b = (enc_a + input_embedding) * half

    x = embed("decoder", prev)
    target_embedding = x
    x = _wn_linear(sd, "decoder.fc1.")(x).transpose(0, 1)
    residuals = [x]
    for i, (_, k, r) in enumerate(dec_layers):
        residual = None
        if r > 0:
            residual = residuals[-r]
            if f"decoder.projections.{i}.weight_v" in sd:
                residual = _wn_linear(sd, f"decoder.projections.{i}.")(residual)
        x = _conv_tbc(sd, f"decoder.convolutions.{i}.", x, k - 1)               # LinearizedConvolution
        if k > 1:
            x = x[: -(k - 1)]                                                   # remove_future_timesteps
        x = _glu(x)
        if attention[i]:
            x = x.transpose(0, 1)
            attn_residual = x
            q = (_wn_linear(sd, f"decoder.attention.{i}.in_projection.")(x) + target_embedding) * half
            scores = (q @ enc_a.transpose(1, 2)).masked_fill(src.eq(PAD).unsqueeze(1), float("-inf"))
            s = src.ne(PAD).sum(dim=1).to(q.dtype).view(-1, 1, 1)              # source length without padding
            ctx = (torch.softmax(scores, dim=-1) @ enc_b) * (s * s.rsqrt())
            x = (_wn_linear(sd, f"decoder.attention.{i}.out_projection.")(ctx) + attn_residual) * half
            x = x.transpose(0, 1)
        if residual is not None:
            x = (x + residual) * half
        residuals.append(x)
    x = _wn_linear(sd, "decoder.fc2.")(x.transpose(0, 1))
    if args.share_input_output_embed:
        return x @ sd["decoder.fc3.weight"].T + sd["decoder.fc3.bias"]
    return _wn_linear(sd, "decoder.fc3.")(x)


def _batch(src_vocab=13, tgt_vocab=11, B=3, Ts=7, Tt=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, src_vocab, (B, Ts), generator=g)
    src[:, -1] = EOS                                       # fairseq sources end with </s>
    prev = torch.randint(4, tgt_vocab, (B, Tt), generator=g)
    prev[:, 0] = EOS                                       # fairseq's decoder starts from </s>
    return src, prev


CASES = [dict(share=False), dict(share=True), dict(share=False, old_decoder_wn=True)]


@pytest.mark.parametrize("case", CASES, ids=["untied", "tied", "old_decoder_weight_norm"])
def test_logits_match_fairseq_forward(case):
    args = _args(share=case["share"])
    sd = _fairseq_state_dict(args, old_decoder_wn=case.get("old_decoder_wn", False))
    model = from_fairseq({"args": args, "model": sd}, backend="reference")
    assert not model.training and next(model.parameters()).dtype == torch.float64
    cfg = model.config
    assert (cfg.pad_idx, cfg.bos_idx, cfg.eos_idx, cfg.unk_idx) == (1, 2, 2, 3)
    assert cfg.max_source_positions == cfg.max_target_positions == MAX_POS
    src, prev = _batch()
    with torch.no_grad():
        got = model(src, None, prev)
    want = _fairseq_forward(sd, args, src, prev)
    assert got.shape == want.shape == (3, 6, 11)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if case["share"]:
        assert model.decoder.fc3.weight is model.decoder.embed_tokens.weight
        without = {k: v for k, v in sd.items() if k != "decoder.fc3.weight"}   # the tie may be saved once
        with torch.no_grad():
            again = from_fairseq({"args": args, "model": without}, backend="reference")(src, None, prev)
        torch.testing.assert_close(again, want, rtol=0, atol=1e-10)


def test_right_padded_sources_match():
    """fairseq masks source padding before every encoder conv, after fc2 and in attention (which scales by the
    real source length); our model does the same."""
    args = _args()
    sd = _fairseq_state_dict(args, seed=11)
    model = from_fairseq({"args": args, "model": sd}, backend="reference")
    src, prev = _batch(B=3, Ts=7, seed=12)
    for row, length in ((0, 4), (2, 6)):
        src[row, length - 1] = EOS
        src[row, length:] = PAD
    with torch.no_grad():
        got = model(src, None, prev)
    torch.testing.assert_close(got, _fairseq_forward(sd, args, src, prev), rtol=0, atol=1e-10)


def test_full_length_positions_match():
    """The last usable position (row padding_idx + MAX_POS of fairseq's table) maps to ours."""
    args = _args()
    sd = _fairseq_state_dict(args, seed=3)
    model = from_fairseq({"args": args, "model": sd}, backend="reference")
    src, prev = _batch(Ts=MAX_POS, Tt=MAX_POS, B=2, seed=4)
    with torch.no_grad():
        got = model(src, None, prev)
    torch.testing.assert_close(got, _fairseq_forward(sd, args, src, prev), rtol=0, atol=1e-10)


def test_incremental_decoding_matches_full_forward():
    args = _args()
    model = from_fairseq({"args": args, "model": _fairseq_state_dict(args, seed=5)}, backend="reference")
    src, prev = _batch(seed=6)
    with torch.no_grad():
        full = model(src, None, prev)
        state = model.decoder.init_state(model.encode(src))
        steps = [model.decoder.step(prev[:, t], state)[0] for t in range(prev.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-10)


class _NotAllowed:
    pass


def _saved_layouts(args, sd):
    """What fairseq's checkpoints hold around the weights, by era (the entries the converter ignores included)."""
    np = pytest.importorskip("numpy")
    cfg_model = argparse.Namespace(**vars(args))         # legacy archs keep an argparse.Namespace in cfg['model']
    meters = {"default": [(0, "loss", "AverageMeter", {"val": np.array([3.25]), "sum": np.float32(6.5),
                                                       "count": np.int64(2), "round": 3})]}
    return {
        # torch 0.4-era legacy serialization, as the 2018 released fconv models were written
        "fairseq-0.6-legacy-format": ({"args": args, "model": sd, "optimizer_history": [
            {"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqNAG",
             "lr_scheduler_state": {"best": 3.1}, "num_updates": 10}],
            "extra_state": {"epoch": 3, "batch_offset": 0, "val_loss": 3.1}, "last_optimizer_state": {}}, False),
        # val_loss / best as numpy scalars (fairseq issue #5603's failure under weights_only=True)
        "fairseq-0.9": ({"args": args, "model": sd, "extra_state": {
            "val_loss": np.float64(3.1), "best": np.float64(3.0), "train_iterator": {"epoch": 3}}}, True),
        # args None, an omegaconf config saved as plain containers with the Namespace inside, numpy meters
        "fairseq-0.12": ({"args": None, "cfg": {"_name": None, "common": {"seed": 1, "fp16": False},
                                                "model": cfg_model, "task": {"_name": "translation"}},
                          "model": sd, "criterion": None, "extra_state": {"metrics": meters, "best": np.float64(3.0),
                                                                          "previous_training_time": 12.5}}, True),
    }


@pytest.mark.parametrize("era", ["fairseq-0.6-legacy-format", "fairseq-0.9", "fairseq-0.12"])
def test_load_from_file_weights_only(tmp_path, era):
    args = _args()
    sd = _fairseq_state_dict(args, seed=7)
    ckpt, zip_format = _saved_layouts(args, sd)[era]
    path = tmp_path / "checkpoint_best.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    model = from_fairseq(path, backend="reference")
    src, prev = _batch(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(src, None, prev), _fairseq_forward(sd, args, src, prev),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_refuses_other_classes_and_names_them(tmp_path, zip_format):
    args = _args()
    bad = tmp_path / "bad.pt"
    torch.save({"args": args, "model": _fairseq_state_dict(args), "extra_state": _NotAllowed()}, bad,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="weights_only=True") as err:
        from_fairseq(bad)
    assert "_NotAllowed" in str(err.value)


def test_cfg_model_namespace_and_arch_defaults():
    """Newer checkpoints keep the args under cfg['model']; missing fields take the architecture's defaults."""
    args = argparse.Namespace(arch="fconv_iwslt_de_en", dropout=0.1, max_source_positions=MAX_POS,
                              max_target_positions=MAX_POS, share_input_output_embed=False)
    full = _args(encoder_embed_dim=256, encoder_layers="[(256, 3)] * 4", decoder_embed_dim=256,
                 decoder_layers="[(256, 3)] * 3", decoder_out_embed_dim=256, decoder_attention="True")
    sd = _fairseq_state_dict(full, src_vocab=6, tgt_vocab=5, seed=9)
    model = from_fairseq({"cfg": {"model": args}, "model": sd}, backend="reference")
    assert model.config.encoder_layers == [(256, 3, 1)] * 4 and model.config.decoder_layers == [(256, 3, 1)] * 3
    src, prev = _batch(src_vocab=6, tgt_vocab=5, B=1, Ts=3, Tt=2, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(model(src, None, prev), _fairseq_forward(sd, full, src, prev),
                                   rtol=0, atol=1e-10)


def test_half_checkpoint_gives_fp32_model():
    args = _args()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in _fairseq_state_dict(args, seed=13).items()}
    model = from_fairseq({"args": args, "model": sd}, backend="reference")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.encoder.embed_tokens.weight, sd["encoder.embed_tokens.weight"].float())


def test_unknown_arch_and_unexpected_key_raise():
    args = _args()
    sd = _fairseq_state_dict(args)
    with pytest.raises(ValueError, match="fconv_self_att"):
        from_fairseq({"args": _args(arch="fconv_self_att"), "model": sd})
    with pytest.raises(ValueError, match="decoder.gate.weight"):
        from_fairseq({"args": args, "model": {**sd, "decoder.gate.weight": torch.zeros(2)}})
    missing = dict(sd)
    del missing["encoder.fc2.bias"]
    with pytest.raises(ValueError, match="encoder.fc2.bias"):
        from_fairseq({"args": args, "model": missing})
    with pytest.raises(ValueError, match="encoder.convolutions.0.weight_v"):
        from_fairseq({"args": _args(encoder_layers="[(8, 5)]" + ENC_LAYERS[8:]), "model": sd})
    with pytest.raises(ValueError, match="normalization_constant"):
        from_fairseq({"args": _args(normalization_constant=0.4), "model": sd})
    tied = _fairseq_state_dict(_args(share=True))
    tied["decoder.fc3.weight"] = tied["decoder.fc3.weight"] + 1.0
    with pytest.raises(ValueError, match="fc3.weight"):
        from_fairseq({"args": _args(share=True), "model": tied})


def test_parse_layer_string_fairseq_presets():
    assert parse_layer_string(ARCH_DEFAULTS["fconv_wmt_en_de"]["encoder_layers"]) == \
        [(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2
    assert parse_layer_string(ARCH_DEFAULTS["fconv_wmt_en_fr"]["decoder_layers"]) == \
        [(512, 3)] * 6 + [(768, 3)] * 4 + [(1024, 3)] * 3 + [(2048, 1)] + [(4096, 1)]
    assert parse_layer_string("[(256, 3)] * 4") == [(256, 3)] * 4
    gbw = ("[(512, 5)] + [(128, 1, 0), (128, 5, 0), (512, 1, 3)] * 3 + [(512, 1, 0), (512, 5, 0), (1024, 1, 3)] * 3"
           " + [(1024, 1, 0), (1024, 5, 0), (2048, 1, 3)] * 6 + [(1024, 1, 0), (1024, 5, 0), (4096, 1, 3)]")
    parsed = parse_layer_string(gbw)
    assert len(parsed) == 1 + 9 + 9 + 18 + 3 and parsed[-1] == (4096, 1, 3) and parsed[1] == (128, 1, 0)
    assert parse_layer_string("True") is True and parse_layer_string("[True, False] * 2") == [True, False] * 2
    assert parse_layer_string("2 * [(8, 3)]") == [(8, 3)] * 2


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "[(512, 3)] * n", "[1] * [2]",
                                  "(lambda: [1])()", "[(512, 3)] - [(1, 1)]", "[(1, 1)] * 1000000000",
                                  "[x for x in (1, 2)]", "[(512,"])
def test_parse_layer_string_rejects_code(text):
    with pytest.raises(ValueError):
        parse_layer_string(text)


def test_read_fairseq_dict_and_size_check(tmp_path):
    path = tmp_path / "dict.de.txt"
    path.write_text("der 120\nDie 80\n, 70 #fairseq:overwrite\n" + "".join(f"w{i} 1\n" for i in range(4)),
                    encoding="utf-8")
    symbols = read_fairseq_dict(path)
    assert symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and symbols[4:7] == ["der", "Die", ","]
    assert len(symbols) == 11
    args = _args()
    sd = _fairseq_state_dict(args)                         # target vocabulary 11
    from_fairseq({"args": args, "model": sd}, tgt_dict=path)
    with pytest.raises(ValueError, match="src_dict has 11 symbols"):
        from_fairseq({"args": args, "model": sd}, src_dict=path)
    (tmp_path / "bad.txt").write_text("nocount\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_fairseq_dict(tmp_path / "bad.txt")
