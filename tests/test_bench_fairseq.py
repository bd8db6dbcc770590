"""bench/bench_fairseq.py: the fairseq-format checkpoint it builds converts (from_fairseq checks every key and
shape), its lengths follow the stated assumptions, and the benchmark runs end to end and counts tokens exactly."""

import json
import math

import pytest
import torch

from bench import bench_fairseq, run
from convs2s.convert import ARCH_DEFAULTS, from_fairseq, parse_layer_string


@pytest.mark.parametrize("arch", list(ARCH_DEFAULTS))
def test_reduced_width_checkpoint_converts(arch):
    ckpt = bench_fairseq.fairseq_checkpoint(arch, 37, 29, width_divisor=16, max_positions=40)
    args = ckpt["args"]
    for side in ("encoder", "decoder"):
        full = parse_layer_string(ARCH_DEFAULTS[arch][f"{side}_layers"])
        assert parse_layer_string(getattr(args, f"{side}_layers")) == [(c // 16, k) for c, k in full]
    model = from_fairseq(ckpt, backend="reference")      # raises on any unexpected, missing or misshaped key
    cfg = model.config
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size) == (37, 29)
    assert cfg.max_source_positions == cfg.max_target_positions == 40
    assert cfg.encoder_embed_dim == ARCH_DEFAULTS[arch]["encoder_embed_dim"] // 16
    # Ours keeps positions from fairseq's padding row on: one row fewer per side.
    ours = sum(p.numel() for p in model.parameters())
    assert ours == bench_fairseq.parameter_count(ckpt) - cfg.encoder_embed_dim - cfg.decoder_embed_dim
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]])
    assert torch.isfinite(model(src, None, torch.tensor([[2, 4], [2, 5]]))).all()


def test_full_size_fconv_wmt_en_de_converts():
    """The benchmarked model itself: 40k vocabularies, 1024 positions."""
    ckpt = bench_fairseq.fairseq_checkpoint("fconv_wmt_en_de")
    sd = ckpt["model"]
    assert sd["encoder.embed_positions.weight"].shape == (1024 + 2, 768)
    assert sd["decoder.convolutions.13.weight_v"].shape == (1, 1024, 4096)     # ConvTBC (k, C_in, 2*C_out)
    assert sd["decoder.convolutions.13.weight_g"].shape == (1, 1, 4096)
    assert sd["decoder.projections.9.weight_g"].shape == (1024, 1)             # Linear weight_norm dim 0
    assert bench_fairseq.parameter_count(ckpt) == 209_572_992
    model = from_fairseq(ckpt, backend="reference")
    assert sum(p.numel() for p in model.parameters()) == 209_572_992 - 2 * 768
    assert len(model.config.decoder_layers) == 15 and model.config.decoder_out_embed_dim == 512


def test_checkpoint_follows_fairseq_init():
    ckpt = bench_fairseq.fairseq_checkpoint("fconv_iwslt_de_en", 500, 400, width_divisor=2, seed=3)
    sd, p = ckpt["model"], ckpt["args"].dropout
    v = sd["encoder.convolutions.1.weight_v"]                                   # (3, 128, 256)
    assert v.std().item() == pytest.approx(math.sqrt(4 * (1 - p) / (3 * 128)), rel=0.03)
    assert torch.allclose(sd["encoder.convolutions.1.weight_g"].flatten(), v.norm(dim=(0, 1)))   # weight = v
    assert sd["decoder.fc3.weight_v"].std().item() == pytest.approx(math.sqrt((1 - p) / 128), rel=0.03)
    assert sd["decoder.embed_tokens.weight"].std().item() == pytest.approx(0.1, rel=0.03)
    assert not sd["decoder.embed_tokens.weight"][bench_fairseq.PAD].any()
    assert not sd["decoder.embed_positions.weight"][bench_fairseq.PAD].any()
    assert not sd["encoder.convolutions.1.bias"].any()
    again = bench_fairseq.fairseq_checkpoint("fconv_iwslt_de_en", 500, 400, width_divisor=2, seed=3)
    assert all(torch.equal(t, again["model"][k]) for k, t in sd.items())


def test_width_divisor_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        bench_fairseq.fairseq_checkpoint("fconv_iwslt_de_en", 10, 10, width_divisor=3)


def test_newstest_lengths_follow_the_assumptions():
    src, tgt = bench_fairseq.newstest_en_de_lengths(3003)
    assert 26.5 < src.float().mean().item() < 29.0                             # log-normal median 25, sigma 0.45
    assert src.float().median().item() == pytest.approx(25, abs=1)
    assert src.min().item() >= 3 and src.max().item() <= 150 and tgt.min().item() >= 2
    assert (tgt.float() / src.float()).mean().item() == pytest.approx(1.05, abs=0.02)
    s2, t2 = bench_fairseq.newstest_en_de_lengths(3003, max_len=12)
    assert s2.max().item() == 12 and torch.equal(s2, src.clamp(max=12)) and torch.equal(t2, tgt.clamp(max=12))


def test_bench_runs_and_counts_forced_tokens(tmp_path):
    out = tmp_path / "fairseq.json"
    n, max_len = 5, 9
    rows = bench_fairseq.main(["--device", "cpu", "--arch", "fconv_iwslt_de_en", "--width-divisor", "16",
                               "--src-vocab", "60", "--tgt-vocab", "50", "--sentences", str(n),
                               "--batch-sentences", "2", "--max-len", str(max_len), "--out", str(out)])
    backends = [r["backend"] for r in rows]
    assert backends[0] == "reference" and set(backends) == set(bench_fairseq.step_backends(torch.device("cpu")))
    _, tgt = bench_fairseq.newstest_en_de_lengths(n, max_len=max_len)
    for r in rows:
        assert r["dtype"] == "fp32" and r["beam"] == 5 and r["sentences"] == n
        # The best hypothesis of every sentence has exactly its forced length, EOS included.
        assert r["target_tokens"] == int(tgt.sum())
        assert r["target_tokens_per_s"] * r["wall_s"] == pytest.approx(r["target_tokens"])
        assert r["sentences_per_s"] * r["wall_s"] == pytest.approx(n)
        assert r["peak_mem_mib"] is None and r["params"] > 0 and r["convert_s"] > 0
        assert r["speedup_vs_reference"] == pytest.approx(rows[0]["wall_s"] / r["wall_s"])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "fairseq" and saved["arch"] == "fconv_iwslt_de_en"
    assert [r["backend"] for r in saved["results"]] == backends
    assert {"target_tokens_per_s", "wall_s", "sentences_per_s", "peak_mem_mib", "dtype",
            "speedup_vs_reference"} <= set(saved["results"][0])


def test_unusable_backend_is_refused():
    with pytest.raises(SystemExit, match="triton"):
        bench_fairseq.main(["--device", "cpu", "--backends", "triton", "--width-divisor", "16"])


def test_suite_lists_the_benchmark():
    assert run.BENCHES["fairseq"] == "bench_fairseq" and "fairseq" in run.DEFAULT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_every_backend_and_dtype(tmp_path):
    """On CUDA: Triton joins, bf16 autocast rows come first, peak memory is reported, tokens are still exact."""
    n, max_len = 4, 10
    rows = bench_fairseq.main(["--device", "cuda", "--arch", "fconv_iwslt_de_en", "--width-divisor", "4",
                               "--src-vocab", "300", "--tgt-vocab", "200", "--sentences", str(n),
                               "--batch-sentences", "3", "--max-len", str(max_len), "--repeats", "1",
                               "--out", str(tmp_path / "fairseq.json")])
    backends = bench_fairseq.step_backends(torch.device("cuda"))
    assert "triton" in backends
    assert [(r["backend"], r["dtype"]) for r in rows] == [(b, d) for b in backends for d in ("bf16", "fp32")]
    _, tgt = bench_fairseq.newstest_en_de_lengths(n, max_len=max_len)
    for r in rows:
        assert r["target_tokens"] == int(tgt.sum()) and r["peak_mem_mib"] > 0
        assert r["speedup_vs_reference"] > 0
