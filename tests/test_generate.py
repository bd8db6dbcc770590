"""Incremental decoding, beam search and attention plots.

Incremental == full forward for every preset (fp64 to 1e-10, fp32 to 1e-5, sentences leaving the batch at
different steps); a DecoderLayer's step == the last position of its forward on every backend here; beam = 1 ==
greedy argmax of the full forward; a beam wide enough to hold every candidate == exhaustive search (every
hypothesis and its score); scores agree with the model; n-best order, lengths, EOS; step weights follow the
parameters; fp64 under autocast, NaN logits and empty batches; the plot writes a PNG.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from convs2s.model import PRESETS, ConvS2S, DecoderLayer, EncoderOut
from convs2s.ops import BackendUnavailableError, available_backends, resolve_backend
from convs2s.search import beam_search
from tests.tolerance import assert_close_rule

PAD, BOS, EOS = 1, 0, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")     # see tests/conftest.py


def model_for(preset, dtype, src_vocab=30, tgt_vocab=40, backend="reference", eos_bias=0.0, **overrides):
    """A seeded random model; eos_bias raises EOS's logit so that some sentences end before their length limit."""
    torch.manual_seed(0)
    model = ConvS2S.from_preset(preset, src_vocab, tgt_vocab, backend=backend, **overrides).to(dtype).eval()
    with torch.no_grad():
        model.decoder.fc3.bias[EOS] += eos_bias
    return model


def source(lengths, vocab=30, width=None):
    """Right-padded source ids + EOS (B, max(lengths)), real lengths `lengths` (EOS included)."""
    width = max(lengths) if width is None else width
    src = torch.full((len(lengths), width), PAD)
    for b, n in enumerate(lengths):
        src[b, :n - 1] = torch.randint(4, vocab, (n - 1,))
        src[b, n - 1] = EOS
    return src


def step_through(model, src, tgt, lengths):
    """Step the decoder over tgt (B, T) (BOS first), sentence b leaving the batch after lengths[b] inputs; the
    surviving rows are reversed at every drop, to exercise the reorder. -> {b: (lengths[b], V) logits}."""
    enc = model.encode(src)
    state = model.decoder.init_state(enc)
    rows = list(range(src.shape[0]))                              # state row -> sentence
    out = {b: [] for b in rows}
    for t in range(max(lengths)):
        logits, _ = model.decoder.step(tgt[rows, t].to(src.device), state)
        for r, b in enumerate(rows):
            out[b].append(logits[r])
        keep = [r for r, b in enumerate(rows) if lengths[b] > t + 1][::-1]
        if len(keep) < len(rows):
            model.decoder.reorder_state(state, torch.tensor(keep, dtype=torch.long, device=src.device))
            rows = [rows[r] for r in keep]
    return {b: torch.stack(v) for b, v in out.items()}


# fp64 where a preset is cheap enough; the big presets in fp32 with short inputs (CPU time).
EXACTNESS = [("tiny", torch.float64), ("tiny", torch.float32), ("small", torch.float64),
             ("fconv_iwslt_de_en", torch.float64), ("multi30k", torch.float64), ("multi30k", torch.float32),
             ("fconv_wmt_en_de", torch.float32), ("fconv_wmt_en_fr", torch.float32)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def test_exactness_grid_covers_every_preset():
    assert {p for p, _ in EXACTNESS} == set(PRESETS)


@pytest.mark.parametrize("preset,dtype", EXACTNESS, ids=[f"{p}-{str(d)[6:]}" for p, d in EXACTNESS])
def test_incremental_equals_full_forward(preset, dtype):
    model = model_for(preset, dtype)
    src = source([7, 4, 5])
    lengths = [5, 2, 4]                                           # sentences finish at different steps
    tgt = torch.randint(4, 40, (3, 5))
    tgt[:, 0] = BOS
    with torch.no_grad():
        full = model(src, None, tgt)                              # (3, 5, V); a row's prefix is all it sees
        steps = step_through(model, src, tgt, lengths)
    worst = 0.0
    for b, n in enumerate(lengths):
        worst = max(worst, (steps[b] - full[b, :n]).abs().max().item())
    scale = full.abs().max().item()
    print(f"{preset} {dtype}: max |step - full| = {worst:.3e}, max |logits| = {scale:.3e}")
    assert worst <= TOL[dtype] * max(1.0, scale)


def test_incremental_under_autocast():
    """Under bf16 autocast (what generation does on CUDA; CPU autocast here) the step runs in bf16 and its error
    against the fp64 full forward is within the tolerance rule of the full forward's own autocast error."""
    model = model_for("tiny", torch.float32)
    model64 = model_for("tiny", torch.float64)
    src, lengths = source([7, 4, 5]), [5, 2, 4]
    tgt = torch.randint(4, 40, (3, 5))
    tgt[:, 0] = BOS
    with torch.no_grad():
        ref64 = model64(src, None, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(src, None, tgt)
            state = model.decoder.init_state(model.encode(src))
            assert state.enc.keys.dtype == torch.bfloat16 and state.weights.dtype == torch.bfloat16
            steps = step_through(model, src, tgt, lengths)
    for b, n in enumerate(lengths):
        assert_close_rule(f"sentence {b}", steps[b].float(), full[b, :n].float(), ref64[b, :n], torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_incremental_on_cuda(autocast):
    """The multi30k preset on CUDA with the default backends: steps == full forward (fp32: 1e-5; bf16 autocast:
    the tolerance rule against the fp64 CPU forward); beam search incremental == full recompute (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_for("multi30k", torch.float32, backend="auto").cuda()
    src, lengths = source([9, 4, 6]).cuda(), [6, 2, 5]
    tgt = torch.randint(4, 40, (3, 6), device="cuda")
    tgt[:, 0] = BOS
    with torch.no_grad():
        if not autocast:
            full = model(src, None, tgt)
            steps = step_through(model, src, tgt, lengths)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(steps[b], full[b, :n], rtol=0, atol=1e-5)
            inc = beam_search(model, src, beam=4, nbest=4, max_len=8)
            rec = beam_search(model, src, beam=4, nbest=4, max_len=8, incremental=False)
            for hi, hr in zip(inc, rec):
                assert [h.tokens.tolist() for h in hi] == [h.tokens.tolist() for h in hr]
            return
        ref64 = model_for("multi30k", torch.float64)(src.cpu(), None, tgt.cpu())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            full = model(src, None, tgt)
            steps = step_through(model, src, tgt, lengths)
            hyps = beam_search(model, src, beam=5, max_len=8, need_attention=True)
    for b, n in enumerate(lengths):
        assert_close_rule(f"sentence {b}", steps[b].float().cpu(), full[b, :n].float().cpu(), ref64[b, :n],
                          torch.bfloat16)
    assert all(h[0].tokens.is_cuda and len(h[0].tokens) <= 9 for h in hyps)


def test_incremental_tied_embeddings_without_attention():
    """Config variants the presets do not cover: tied output embedding, no attention layer at all."""
    model = model_for("tiny", torch.float64, share_decoder_input_output_embed=True, decoder_attention=False)
    src, lengths = source([5, 3]), [4, 2]
    tgt = torch.randint(4, 40, (2, 4))
    tgt[:, 0] = BOS
    with torch.no_grad():
        full = model(src, None, tgt)
    steps = step_through(model, src, tgt, lengths)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(steps[b], full[b, :n], rtol=0, atol=1e-10)
    hyps = beam_search(model, src, beam=2, max_len=3, need_attention=True)
    assert hyps[0][0].attention.shape == (0, len(hyps[0][0].tokens), 5)


def fused_backends():
    """The fused backends, each skipped where it cannot run both decoding ops (glu_conv_step, conv_attention) here."""
    out = []
    for b in ("triton", "native"):
        reason = available_backends("cpu")[b]
        if reason is None:
            try:
                for op in ("glu_conv_step", "conv_attention"):
                    resolve_backend(op, b, "cpu")
            except BackendUnavailableError as e:
                reason = str(e)
        out.append(pytest.param(b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


@pytest.mark.parametrize("backend", ["reference"] + fused_backends())
@pytest.mark.parametrize("k,c_in,c_out,res_dim,attention", [
    (3, 24, 16, 24, True),            # projected residual, attention after the conv
    (3, 16, 16, 16, False),           # residual fused in the conv
    (2, 16, 32, None, True),          # even kernel, no residual
    (1, 16, 16, 8, False)])           # k = 1 (no conv state), projected residual from two layers back
def test_layer_step_is_the_last_position_of_its_forward(backend, k, c_in, c_out, res_dim, attention):
    """DecoderLayer.step over a prefix, token by token == DecoderLayer.forward over the whole prefix."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    B, T, E, Ts = 3, 5, 8, 6
    torch.manual_seed(0)
    layer = DecoderLayer(c_in, c_out, k, residual_distance=0 if res_dim is None else 1,
                         residual_channels=res_dim or c_out, attention=attention, embed_dim=E, dropout=0.0,
                         backend=backend).to(dtype).eval()
    x, emb = torch.randn(B, T, c_in, dtype=dtype), torch.randn(B, T, E, dtype=dtype)
    residual = None if res_dim is None else torch.randn(B, T, res_dim, dtype=dtype)
    mask = torch.arange(Ts)[None] >= torch.tensor([[6], [2], [4]])
    enc = EncoderOut(torch.randn(B, Ts, E, dtype=dtype), torch.randn(B, Ts, E, dtype=dtype), mask)
    with torch.no_grad():
        full, full_attn = layer(x, emb, enc, residual, need_weights=True)
        weights = layer.prepare_step(dtype, resolve_backend("glu_conv_step", backend, "cpu"),
                                     resolve_backend("conv_attention", backend, "cpu"))
        conv_state = torch.zeros(B, k - 1, c_in, dtype=dtype) if k > 1 else None
        for t in range(T):
            y, attn = layer.step(x[:, t], emb[:, t], enc, None if residual is None else residual[:, t], weights,
                                 conv_state, need_weights=True)
            err = (y - full[:, t]).abs().max().item()
            print(f"{backend} k={k} t={t}: max error {err:.3e}")
            assert err <= TOL[dtype]
            if attention:
                torch.testing.assert_close(attn, full_attn[:, t], rtol=0, atol=TOL[dtype])
            else:
                assert attn is None and full_attn is None


@pytest.mark.parametrize("backend", fused_backends())
def test_incremental_with_fused_backend(backend):
    """The tiny preset stepped on a fused backend == the full forward on the reference backend (fp32)."""
    ref = model_for("tiny", torch.float32)
    fused = model_for("tiny", torch.float32, backend=backend)
    src, lengths = source([6, 3]), [3, 2]
    tgt = torch.randint(4, 40, (2, 3))
    tgt[:, 0] = BOS
    with torch.no_grad():
        full = ref(src, None, tgt)
        steps = step_through(fused, src, tgt, lengths)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(steps[b], full[b, :n], rtol=0, atol=1e-5)


def greedy_by_full_forward(model, src, max_len):
    """Independent greedy decoder: argmax of the full forward over the prefix, PAD/BOS banned, EOS banned at the
    first step (min_len 1) and forced after max_len tokens. -> [(tokens, sum of log-probs)] per sentence."""
    out = []
    for b in range(src.shape[0]):
        prefix, total = [BOS], 0.0
        while True:
            with torch.no_grad():
                lp = F.log_softmax(model(src[b:b + 1], None, torch.tensor([prefix]))[0, -1], dim=-1)
            lp[PAD] = lp[BOS] = -math.inf
            if len(prefix) == 1:
                lp[EOS] = -math.inf
            tok = EOS if len(prefix) - 1 >= max_len[b] else int(lp.argmax())
            prefix.append(tok)
            total += lp[tok].item()
            if tok == EOS:
                break
        out.append((prefix[1:], total))
    return out


@pytest.mark.parametrize("incremental", [True, False])
def test_beam_1_is_greedy_argmax_of_full_forward(incremental):
    model = model_for("tiny", torch.float64, tgt_vocab=12, eos_bias=0.1)
    lengths = [7, 3, 5, 2]
    src = source(lengths)
    hyps = beam_search(model, src, beam=1, max_len_a=0.5, max_len_b=3, incremental=incremental)
    expected = greedy_by_full_forward(model, src, [int(n * 0.5 + 3) for n in lengths])
    assert any(len(t) - 1 < int(n * 0.5 + 3) for (t, _), n in zip(expected, lengths)), "no sentence chose EOS"
    for (h,), (tokens, total) in zip(hyps, expected):
        assert h.tokens.tolist() == tokens
        assert h.score == pytest.approx(total / len(tokens), abs=1e-10)
        assert h.positional_scores.sum().item() == pytest.approx(total, abs=1e-10)


def sequence_log_probs(model, src_row, seqs):
    """[sum of log p(seq | source)] under one full forward of the right-padded batch; each seq ends with EOS."""
    T = max(map(len, seqs))
    prefix = torch.full((len(seqs), T), PAD)
    target = torch.full((len(seqs), T), PAD)
    for i, s in enumerate(seqs):
        prefix[i, :len(s)] = torch.tensor([BOS] + list(s[:-1]))
        target[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        lp = F.log_softmax(model(src_row.expand(len(seqs), -1), None, prefix), dim=-1)   # (N, T, V)
    lp = lp.gather(2, target[:, :, None])[:, :, 0].masked_fill(target.eq(PAD), 0.0)
    return lp.sum(dim=1).tolist()


@pytest.mark.parametrize("len_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_equals_exhaustive_search(len_penalty):
    """Target vocabulary {EOS, UNK, 4, 5} (PAD and BOS are never generated), at most 4 tokens before EOS: 120
    sequences. A beam of 128 holds every candidate at every step, so its n-best list must be the exhaustive
    ranking, scores included."""
    model = model_for("tiny", torch.float64, tgt_vocab=6)
    src = source([5])
    max_len, words = 4, (3, 4, 5)
    seqs = [list(p) + [EOS] for n in range(1, max_len + 1) for p in itertools.product(words, repeat=n)]
    totals = sequence_log_probs(model, src[0], seqs)
    scored = sorted(((t / len(s) ** len_penalty, s) for t, s in zip(totals, seqs)), reverse=True)
    hyps = beam_search(model, src, beam=128, nbest=128, max_len=max_len, len_penalty=len_penalty)[0]
    assert len(hyps) == len(seqs) == 120
    assert [h.tokens.tolist() for h in hyps] == [s for _, s in scored]
    assert [h.score for h in hyps] == pytest.approx([sc for sc, _ in scored], abs=1e-10)


def test_scores_are_the_models_and_nbest_is_sorted():
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    src = source([6, 3, 8])
    max_len = 6
    for lp in (1.0, 0.5):
        hyps = beam_search(model, src, beam=5, nbest=5, max_len=max_len, len_penalty=lp)
        for b, hs in enumerate(hyps):
            assert len(hs) == 5
            assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
            totals = sequence_log_probs(model, src[b], [h.tokens.tolist() for h in hs])
            for h, total in zip(hs, totals):
                toks = h.tokens.tolist()
                assert toks[-1] == EOS and EOS not in toks[:-1]
                assert PAD not in toks and BOS not in toks
                assert 2 <= len(toks) <= max_len + 1               # min_len 1 token, then EOS
                assert h.positional_scores.shape == (len(toks),)
                assert h.positional_scores.sum().item() == pytest.approx(total, abs=1e-10)
                assert h.score == pytest.approx(total / len(toks) ** lp, abs=1e-10)


@pytest.mark.parametrize("beam", [1, 4])
def test_incremental_and_full_recompute_search_agree(beam):
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    src = source([6, 2, 4])
    inc = beam_search(model, src, beam=beam, nbest=beam, need_attention=True)
    full = beam_search(model, src, beam=beam, nbest=beam, need_attention=True, incremental=False)
    for hi, hf in zip(inc, full):
        assert [h.tokens.tolist() for h in hi] == [h.tokens.tolist() for h in hf]
        for a, b in zip(hi, hf):
            assert a.score == pytest.approx(b.score, abs=1e-10)
            torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-10)


def test_attention_shape_and_rows_sum_to_one():
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    lengths = [6, 2, 4]
    hyps = beam_search(model, source(lengths), beam=3, nbest=3, need_attention=True)
    for n, hs in zip(lengths, hyps):
        for h in hs:
            L = len(h.tokens)
            assert h.attention.shape == (2, L, n)                  # tiny: 2 attention layers; real source only
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(2, L, dtype=torch.float64))


def test_sentences_finish_independently_of_their_batch():
    """A sentence decoded in a padded batch (where others finish earlier or later) == decoded alone."""
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    lengths = [8, 2, 5, 3]
    src = source(lengths, width=10)
    batch = beam_search(model, src, beam=3, nbest=3, max_len_a=1.0, max_len_b=2)
    steps = {len(hs[0].tokens) for hs in batch}
    assert len(steps) > 1, "all sentences ended at the same step: the batch tests nothing"
    for b, n in enumerate(lengths):
        alone = beam_search(model, src[b:b + 1, :n], beam=3, nbest=3, max_len_a=1.0, max_len_b=2)[0]
        assert [h.tokens.tolist() for h in batch[b]] == [h.tokens.tolist() for h in alone]
        assert [h.score for h in batch[b]] == pytest.approx([h.score for h in alone], abs=1e-10)


def test_left_and_right_padded_sources_give_the_same_hypotheses():
    model = model_for("tiny", torch.float64, tgt_vocab=12, eos_bias=0.1)
    lengths = [6, 3, 4]
    right = source(lengths)
    left = torch.full_like(right, PAD)
    for b, n in enumerate(lengths):
        left[b, right.shape[1] - n:] = right[b, :n]
    a = beam_search(model, right, beam=3, nbest=3, need_attention=True)
    b = beam_search(model, left, beam=3, nbest=3, need_attention=True)
    for ha, hb in zip(a, b):
        assert [h.tokens.tolist() for h in ha] == [h.tokens.tolist() for h in hb]
        for x, y in zip(ha, hb):
            assert x.score == pytest.approx(y.score, abs=1e-10)
            torch.testing.assert_close(x.attention, y.attention, rtol=0, atol=1e-10)


def test_length_limits_and_forced_length():
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    src = source([6, 3, 8])
    hyps = beam_search(model, src, beam=3, nbest=3, max_len_a=0.0, max_len_b=2)
    assert all(len(h.tokens) <= 3 for hs in hyps for h in hs)
    # min_len == max_len per sentence forces each hypothesis to that length (what bench_generate does).
    target = torch.tensor([4, 1, 7])
    hyps = beam_search(model, src, beam=2, max_len=target, min_len=target)
    assert [len(hs[0].tokens) for hs in hyps] == (target + 1).tolist()
    # the decoder's positions bound the length whatever max_len_b asks for
    small = model_for("tiny", torch.float64, tgt_vocab=12, max_target_positions=5)
    hyps = beam_search(small, src, beam=2, max_len_b=100, min_len=100)
    assert all(len(hs[0].tokens) == 5 for hs in hyps)


def test_bad_arguments_and_training_mode():
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, source([3]), beam=2, nbest=3)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.decoder.prepare_step()
    beam_search(model, source([3]), beam=2)                        # the search switches to eval and back
    assert model.training


def test_steps_follow_in_place_parameter_updates():
    """The step weights are prepared from the parameters as they are (an optimizer step changes them in place)."""
    model = model_for("tiny", torch.float64)
    src, tgt = source([4]), torch.tensor([[BOS, 5]])
    before = step_through(model, src, tgt, [2])[0]
    with torch.no_grad():
        model.decoder.layers[1].conv.weight_v.mul_(1.5)           # in place, as an optimizer step
        model.decoder.fc3.bias.add_(0.25)
        full = model(src, None, tgt)
    assert not torch.allclose(before, full)
    steps = step_through(model, src, tgt, [2])
    torch.testing.assert_close(steps[0], full[0], rtol=0, atol=1e-10)


def test_search_follows_weights_copied_through_data():
    """Writes through p.data (EMA, weight swapping, averaged checkpoints) do not bump a tensor's _version: the
    search must still decode with the new weights, exactly as a model built with them does."""
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    torch.manual_seed(1)
    other = ConvS2S.from_preset("tiny", 30, 12, backend="reference").double().eval()
    src = source([6, 3, 5])
    before = beam_search(model, src, beam=3, nbest=3)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)
    want = beam_search(other, src, beam=3, nbest=3)
    got = beam_search(model, src, beam=3, nbest=3)
    assert [[h.tokens.tolist() for h in hs] for hs in before] != [[h.tokens.tolist() for h in hs] for hs in want]
    for hg, hw in zip(got, want):
        assert [h.tokens.tolist() for h in hg] == [h.tokens.tolist() for h in hw]
        assert [h.score for h in hg] == pytest.approx([h.score for h in hw], abs=1e-10)


def test_prepared_step_weights_are_used_and_checked(monkeypatch):
    """beam_search(step_weights=...) decodes with the weights it is given (prepared once for many batches)
    without preparing again, and refuses weights prepared for another compute dtype."""
    model = model_for("tiny", torch.float32, tgt_vocab=12)
    src = source([6, 3, 5])
    weights = model.decoder.prepare_step()
    want = beam_search(model, src, beam=3, nbest=3)
    monkeypatch.setattr(model.decoder, "prepare_step", lambda *a, **k: pytest.fail("prepared again"))
    got = beam_search(model, src, beam=3, nbest=3, step_weights=weights)
    assert [[(h.tokens.tolist(), h.score) for h in hs] for hs in got] == \
        [[(h.tokens.tolist(), h.score) for h in hs] for hs in want]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="prepared for torch.float32"):
        beam_search(model, src, beam=3, step_weights=weights)


def test_float64_model_under_autocast_decodes_in_float64():
    """autocast leaves fp64 alone (torch's rule, the ops' too): an fp64 model's steps under CPU bf16 autocast
    stay fp64, and incremental and full-recompute search agree as they do without autocast."""
    model = model_for("tiny", torch.float64, tgt_vocab=12)
    src = source([6, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decoder.init_state(model.encode(src)).weights.dtype == torch.float64
        inc = beam_search(model, src, beam=4, nbest=4, need_attention=True)
        full = beam_search(model, src, beam=4, nbest=4, need_attention=True, incremental=False)
    for hi, hf in zip(inc, full):
        assert [h.tokens.tolist() for h in hi] == [h.tokens.tolist() for h in hf]
        for a, b in zip(hi, hf):
            assert a.score == pytest.approx(b.score, abs=1e-10)
            torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-10)


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "full-recompute"])
@pytest.mark.parametrize("beam", [1, 3])
def test_non_finite_logits_are_an_error(incremental, beam):
    """A diverged model (a NaN weight) gives NaN logits: the search says so instead of returning no hypotheses."""
    model = model_for("tiny", torch.float32, tgt_vocab=12)
    with torch.no_grad():
        model.decoder.fc2.weight_v[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/inf logits at step 0 for sentence\(s\) \[0, 1\]"):
        beam_search(model, source([5, 3]), beam=beam, incremental=incremental)
    with torch.no_grad():
        model.decoder.fc2.weight_v[0, 0] = 0.0
        model.decoder.fc3.bias[7] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN/inf logits"):
        beam_search(model, source([5, 3]), beam=beam, incremental=incremental)


@pytest.mark.parametrize("backend", ["reference"] + fused_backends())
def test_batch_of_zero_sentences(backend):
    """B = 0 is defined: encode gives empty tensors, the decoder empty logits (forward and step), search []."""
    model = model_for("tiny", torch.float32, backend=backend)
    src = torch.zeros(0, 5, dtype=torch.long)
    with torch.no_grad():
        enc = model.encode(src)
        assert [tuple(t.shape) for t in enc] == [(0, 5, 16), (0, 5, 16), (0, 5)]
        assert model(src, None, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 40)
        state = model.decoder.init_state(enc)
        logits, attn = model.decoder.step(torch.zeros(0, dtype=torch.long), state, need_weights=True)
    assert logits.shape == (0, 40) and [tuple(a.shape) for a in attn] == [(0, 5), (0, 5)]
    for incremental in (True, False):
        assert beam_search(model, src, beam=3, incremental=incremental) == []


def test_reorder_state_in_place_for_beams_new_tensors_when_rows_leave():
    model = model_for("tiny", torch.float64)
    src = source([5, 4, 3])
    state = model.decoder.init_state(model.encode(src))
    model.decoder.step(torch.full((3,), BOS), state)
    before = [s.clone() for s in state.conv_states if s is not None]
    ptrs = [s.data_ptr() for s in state.conv_states if s is not None]
    order = torch.tensor([2, 0, 1])
    model.decoder.reorder_state(state, order)
    after = [s for s in state.conv_states if s is not None]
    assert [s.data_ptr() for s in after] == ptrs                    # same tensors: reordered in place
    for b, a in zip(before, after):
        assert torch.equal(a, b[order])
    keys = state.enc.keys.clone()
    model.decoder.reorder_state(state, torch.tensor([1]))           # two sentences finished
    assert [tuple(s.shape[:1]) for s in state.conv_states if s is not None] == [(1,)] * len(ptrs)
    assert torch.equal(state.enc.keys, keys[1:2]) and state.enc.padding_mask.shape == (1, 5)


def test_plot_attention_writes_png(tmp_path):
    from convs2s.plot import plot_attention
    att = torch.softmax(torch.randn(3, 4, 5), dim=-1)
    src, tgt = [f"s{i}" for i in range(5)], [f"t{i}" for i in range(4)]
    for layer in ("mean", "all", 1):
        out = plot_attention(att, src, tgt, str(tmp_path / f"a_{layer}.png"), layer=layer)
        with open(out, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
    with pytest.raises(ValueError, match="labels"):
        plot_attention(att, src[:4], tgt, str(tmp_path / "bad.png"))


def test_plot_sentence_with_a_tokenizer(tmp_path):
    from convs2s.plot import plot_sentence
    from convs2s.tokenizer import Tokenizer
    de = ["ein hund läuft im park", "zwei männer spielen fußball", "eine frau liest ein buch"] * 4
    en = ["a dog runs in the park", "two men play soccer", "a woman reads a book"] * 4
    tok = Tokenizer.train(de, en, vocab_size=40)
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", tok.src_vocab_size, tok.tgt_vocab_size, backend="reference").eval()
    translation, out = plot_sentence(model, tok, "ein hund liest", str(tmp_path / "s.png"), beam=2, max_len_b=4)
    assert isinstance(translation, str)
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_bench_generate_runs_and_writes_json(tmp_path):
    """The benchmark's machinery on a tiny model: forced lengths decode to exactly those lengths, rows and JSON."""
    import json

    from bench import bench_generate
    src_len, tgt_len = bench_generate.flickr_like_lengths(6)
    (src, forced), = bench_generate.make_batches(src_len, tgt_len, 50, 8, "cpu")
    assert (src.ne(PAD).sum(1) == src_len.sort(stable=True).values).all()
    out = tmp_path / "gen.json"
    rows = bench_generate.main(["--device", "cpu", "--preset", "tiny", "--vocab", "50", "--sentences", "6",
                                "--full-sentences", "3", "--impls", "greedy-incremental", "greedy-full",
                                "--no-step-micro", "--out", str(out)])
    assert [r["impl"] for r in rows] == ["greedy-incremental", "greedy-full"]
    assert rows[0]["sentences"] == 6 and rows[1]["sentences"] == 3
    assert rows[0]["sentences_per_s"] > 0 and rows[1]["speedup_incremental_vs_full"] > 0
    assert rows[0]["target_tokens_per_s"] * rows[0]["wall_s"] == pytest.approx(int(tgt_len.sum()))
    assert json.loads(out.read_text())["results"][0]["op"] == "generate"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny model + a small tokenizer saved as a convs2s checkpoint (no training needed)."""
    from convs2s.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from convs2s.tokenizer import Tokenizer
    de = ["ein hund läuft im park", "zwei männer spielen fußball", "eine frau liest ein buch"] * 4
    en = ["a dog runs in the park", "two men play soccer", "a woman reads a book"] * 4
    tok = Tokenizer.train(de, en, vocab_size=40)
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", tok.src_vocab_size, tok.tgt_vocab_size, backend="reference")
    path = tmp_path / "tiny.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "tokenizer": tok.state(),
                     "model": model.state_dict()}, path)
    return path


def test_cli_translate_beam_and_nbest(tiny_checkpoint, tmp_path, capsys):
    from convs2s import cli
    from convs2s.checkpoint import load_checkpoint, model_from_checkpoint
    from convs2s.generate import nbest_lines
    src = tmp_path / "in.de"
    src.write_text("ein hund liest\nzwei frauen spielen im park\n")
    out = tmp_path / "out.en"
    args = ["translate", "--checkpoint", str(tiny_checkpoint), "--input", str(src), "--device", "cpu"]
    assert cli.main(args + ["--beam", "4", "--nbest", "3", "--output", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 0, 1, 2]
    for sent in (rows[:3], rows[3:]):
        scores = [float(r[1]) for r in sent]
        assert scores == sorted(scores, reverse=True)
    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    expected = nbest_lines(model, tok, src.read_text().splitlines(), beam=4, nbest=3)
    assert [r[2] for r in rows] == [text for hs in expected for text, _ in hs]
    assert cli.main(args + ["--beam", "4", "--output", str(out)]) == 0          # nbest 1: plain lines
    assert out.read_text().splitlines() == [hs[0][0] for hs in expected]
    capsys.readouterr()
    assert cli.main(args + ["--beam", "2", "--nbest", "3"]) == 2                # a usage error, said on stderr
    assert "--nbest" in capsys.readouterr().err


def test_cli_plot_attention_writes_png(tiny_checkpoint, tmp_path, capsys):
    from convs2s import cli
    for layer in ("mean", "all", "1"):
        out = tmp_path / f"att_{layer}.png"
        assert cli.main(["plot-attention", "--checkpoint", str(tiny_checkpoint), "--sentence", "ein hund liest",
                         "--out", str(out), "--layer", layer, "--beam", "2", "--device", "cpu"]) == 0
        with open(out, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
    assert "wrote" in capsys.readouterr().err


def test_decoder_starting_from_eos_can_still_end():
    """fairseq-style models start the decoder from </s> (bos_idx == eos_idx): EOS must stay selectable."""
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", 20, 12, bos_idx=2, backend="reference").eval()
    src = torch.randint(4, 20, (3, 5))
    src[:, -1] = 2
    for beam in (1, 4):
        hyps = beam_search(model, src, beam=beam, nbest=2 if beam > 1 else 1, max_len_a=0, max_len_b=6)
        for sentence in hyps:
            assert sentence, "every sentence must get hypotheses"
            for h in sentence:
                assert h.tokens[-1].item() == 2 and (h.tokens[:-1] != 2).all()
