"""bench/tune_lenpen.py's one-search sweep picks what a search with each length penalty picks; evaluate --lenpen
reaches the search."""

import pytest
import torch

from bench.tune_lenpen import rerank
from convs2s import evaluate as evaluate_mod
from convs2s.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from convs2s.generate import translate_batched
from convs2s.model import ConvS2S
from convs2s.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")     # see tests/conftest.py

DE = ["ein hund läuft im park", "zwei männer spielen fußball", "eine frau liest ein buch"] * 4
EN = ["a dog runs in the park", "two men play soccer", "a woman reads a book"] * 4


@pytest.fixture(scope="module")
def model_and_tok():
    tok = Tokenizer.train(DE, EN, vocab_size=40)
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", tok.src_vocab_size, tok.tgt_vocab_size, backend="reference").eval()
    return model, tok


def test_rerank_matches_a_search_per_lenpen(model_and_tok):
    model, _ = model_and_tok
    g = torch.Generator().manual_seed(1)
    V = model.config.src_vocab_size
    # Source ids >= 4 (past the special symbols), + EOS (2); lengths 2..9; max_len_a 2 lets lengths vary widely.
    sizes = torch.randint(1, 9, (24,), generator=g).tolist()
    sources = [torch.randint(4, V, (n,), generator=g).tolist() + [2] for n in sizes]
    search = dict(beam=4, max_len_a=2.0, max_len_b=3)
    lenpens = [0.0, 0.6, 1.0, 1.4, 3.0]
    picked = rerank(translate_batched(model, sources, nbest=4, len_penalty=0.0, **search), lenpens)
    lengths = set()
    for lp in lenpens:
        direct = translate_batched(model, sources, nbest=1, len_penalty=lp, **search)
        for i, (hs, mine) in enumerate(zip(direct, picked[lp])):
            assert torch.equal(hs[0].tokens, mine.tokens), (lp, i)
            lengths.add((i, len(mine.tokens)))
    # The penalties really pick different hypotheses for some sentences (else the check above proves little).
    assert len(lengths) > len(sources)


def test_evaluate_passes_lenpen_to_the_search(model_and_tok, tmp_path, monkeypatch):
    model, tok = model_and_tok
    ckpt = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "tokenizer": tok.state(),
            "model": model.state_dict()}
    save_checkpoint(ckpt, tmp_path / "m.pt")
    (tmp_path / "src.de").write_text("\n".join(DE[:3]) + "\n")
    (tmp_path / "ref.en").write_text("\n".join(EN[:3]) + "\n")
    seen = []
    real = evaluate_mod.translate_lines

    def spy(*args, **kwargs):
        seen.append((kwargs["beam"], kwargs["len_penalty"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate_mod, "translate_lines", spy)
    m = evaluate_mod.evaluate(str(tmp_path / "m.pt"), src=str(tmp_path / "src.de"), ref=str(tmp_path / "ref.en"),
                              beam=3, lenpen=0.7, quiet=True)
    assert seen == [(3, 0.7)] and (m["beam"], m["lenpen"]) == (3, 0.7)
