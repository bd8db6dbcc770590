"""convs2s.generate.translate_batched, the one batching path of translate, evaluate, validation BLEU and the fairseq
path: length-sorted token batches, results in input order, the same hypotheses as one sentence at a time."""

import pytest
import torch

import convs2s.generate as gen
from convs2s.model import ConvS2S
from convs2s.search import beam_search

EOS = 2
VOCAB = 30


@pytest.fixture(scope="module")
def model():
    """A random tiny model in fp64 (a padded batch and a sentence alone then differ by rounding only, ~1e-15)."""
    torch.manual_seed(0)
    return ConvS2S.from_preset("tiny", VOCAB, VOCAB, backend="reference", dropout=0.0).double().eval()


def _sources(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]


def _recording(monkeypatch):
    fed = []

    def recording(model, src, lengths, **k):
        fed.append((src.clone(), lengths.tolist(), k.get("step_weights")))
        return beam_search(model, src, lengths, **k)
    monkeypatch.setattr(gen, "beam_search", recording)
    return fed


@pytest.mark.parametrize("left_pad", [False, True])
def test_input_order_and_one_by_one_equality_across_sorted_batches(model, monkeypatch, left_pad):
    lengths = [9, 3, 14, 5, 3, 11, 7, 2, 9, 6]
    sources = _sources(lengths)
    fed = _recording(monkeypatch)
    got = gen.translate_batched(model, sources, max_tokens=24, left_pad=left_pad, beam=3, nbest=2, max_len_b=6)
    # Several batches, each of at most max(24, 14) padded source tokens, in increasing length.
    assert len(fed) > 2
    widths = [src.shape[1] for src, *_ in fed]
    assert widths == sorted(widths) and all(src.numel() <= 24 for src, *_ in fed)
    assert sorted(n for _, lens, _ in fed for n in lens) == sorted(lengths)
    for src, lens, _ in fed:
        real = src.ne(model.config.pad_idx)
        pad_first = torch.arange(src.shape[1]) < src.shape[1] - torch.tensor(lens)[:, None]
        assert torch.equal(real, ~pad_first if left_pad else ~torch.flip(pad_first, [1]))
    assert len(got) == len(sources)
    for s, hyps in zip(sources, got):
        ref = beam_search(model, torch.tensor([s]), torch.tensor([len(s)]), beam=3, nbest=2, max_len_b=6)[0]
        assert len(hyps) == len(ref) == 2
        for h, r in zip(hyps, ref):
            assert torch.equal(h.tokens, r.tokens)
            assert h.score == pytest.approx(r.score, abs=1e-9)
        # A source's limit comes from its own length: at most len(s) * 1.2 + 6 tokens before EOS.
        assert all(len(h.tokens) - 1 <= int(len(s) * 1.2 + 6) for h in hyps)


def test_one_batch_when_the_budget_allows(model, monkeypatch):
    fed = _recording(monkeypatch)
    sources = _sources([4, 8, 6])
    gen.translate_batched(model, sources, beam=1)
    assert len(fed) == 1 and fed[0][1] == [4, 6, 8]


def test_a_source_longer_than_the_budget_gets_a_batch_of_its_own(model, monkeypatch):
    fed = _recording(monkeypatch)
    gen.translate_batched(model, _sources([3, 40, 3]), max_tokens=10, beam=1, max_len_b=2)
    assert sorted(lens for _, lens, _ in fed) == [[3, 3], [40]]


def test_long_sources_are_cut_keeping_eos(model, monkeypatch):
    fed = _recording(monkeypatch)
    limit = model.config.max_source_positions
    long = _sources([limit + 9])[0]
    got = gen.translate_batched(model, [long], beam=1, max_len_b=2)
    src, lens, _ = fed[0]
    assert lens == [limit] and src[0].tolist() == long[:limit - 1] + [EOS]
    assert len(got) == 1 and got[0][0].tokens[-1].item() == EOS


def test_empty_input_and_empty_source(model):
    assert gen.translate_batched(model, []) == []
    with pytest.raises(ValueError, match="at least its EOS"):
        gen.translate_batched(model, [[5, EOS], []])


def test_step_weights_prepared_once_for_all_batches_and_mode_restored(model, monkeypatch):
    fed = _recording(monkeypatch)
    prepared = []
    real = model.decoder.prepare_step
    monkeypatch.setattr(model.decoder, "prepare_step", lambda *a, **k: prepared.append(real(*a, **k)) or prepared[-1])
    model.train()                                 # as validation BLEU finds it during training
    try:
        gen.translate_batched(model, _sources([3, 9, 14, 5, 7]), max_tokens=12, beam=2, max_len_b=3)
        assert model.training
    finally:
        model.eval()
    assert len(fed) > 1 and len(prepared) == 1
    assert all(w is prepared[0] for *_, w in fed)
