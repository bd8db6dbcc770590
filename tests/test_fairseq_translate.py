"""`convs2s translate --fairseq DIR` and convs2s.fairseq_translate on a tiny random fairseq fconv folder (the
checkpoint builders of tests/test_convert.py): BPE in and out, dictionary mapping, equivalence with beam_search
on the converted model, fairseq's generate defaults, the n-best format, clear errors for incomplete folders."""

from __future__ import annotations

import shutil

import pytest
import torch

import convs2s.fairseq_translate as ft
from convs2s import cli
from convs2s.bpe import BPE, remove_bpe
from convs2s.convert import from_fairseq
from convs2s.search import beam_search
from tests.test_convert import _args, _fairseq_state_dict

SRC_WORDS = ["lo", "w", "er", "ne@@", "lo@@", "we@@", "s", "t", "low"]        # 4 specials + 9 = 13 rows
TGT_WORDS = ["the", "ca@@", "t", "sa@@", "t@@", "on", "mat"]                   # 4 specials + 7 = 11 rows
CODES = "#version: 0.2\nl o\nlo w\nw e\ne r</w>\nn e\n"
LINES = ["lower newest", "low low xyz", "  newest lower low  "]


@pytest.fixture()
def folder(tmp_path):
    args = _args()
    d = tmp_path / "fconv"
    d.mkdir()
    torch.save({"args": args, "model": _fairseq_state_dict(args, seed=3)}, d / "model.pt")
    (d / "dict.de.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(SRC_WORDS)), encoding="utf-8")
    (d / "dict.en.txt").write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(TGT_WORDS)), encoding="utf-8")
    (d / "bpecodes").write_text(CODES, encoding="utf-8")
    return d


def _made_of_target_words(text: str) -> bool:
    """Every word is a run of "@@" target symbols (marker dropped) closed by one symbol without the marker."""
    inner = [w[:-2] for w in TGT_WORDS if w.endswith("@@")]
    final = [w for w in TGT_WORDS if not w.endswith("@@")]

    def ok(word):
        return word in final or any(word.startswith(p) and ok(word[len(p):]) for p in inner if len(word) > len(p))
    return all(ok(w) for w in text.split())


def test_pipeline_matches_beam_search_on_converted_model(folder, monkeypatch):
    fed = []

    def recording(model, src, *a, **k):
        fed.append(src.clone())
        return beam_search(model, src, *a, **k)
    monkeypatch.setattr(ft, "beam_search", recording)
    tr = ft.FairseqTranslator.from_dir(folder, backend="reference")     # languages inferred: de -> en
    assert tr.src_symbols[4:] == SRC_WORDS and tr.tgt_symbols[4:] == TGT_WORDS
    got = tr.translate(LINES, beam=3, nbest=2, max_len_a=0.5, max_len_b=7)

    # "lower newest" -BPE-> "low@@ er ne@@ we@@ s@@ t": er ne@@ we@@ t are source symbols 6 7 9 11; low@@ and
    # s@@ are not (unk 3).
    assert fed[0].tolist() == [[3, 6, 7, 9, 3, 11, 2]]
    assert all(src[0, -1].item() == 2 for src in fed) and len(fed) == len(LINES)

    model = from_fairseq(torch.load(folder / "model.pt", weights_only=False), backend="reference")
    bpe = BPE.from_file(folder / "bpecodes")
    for line, hyps in zip(LINES, got):
        ids = [tr.src_symbols.index(t) if t in tr.src_symbols else 3 for t in bpe.apply(line).split()] + [2]
        ref = beam_search(model, torch.tensor([ids]), torch.tensor([len(ids)]), beam=3, nbest=2, max_len_a=0.5,
                          max_len_b=7)[0]
        assert len(hyps) == 2
        for (text, score), h in zip(hyps, ref):
            assert h.tokens[-1].item() == 2
            assert text == remove_bpe(" ".join(tr.tgt_symbols[i] for i in h.tokens[:-1].tolist()))
            assert score == pytest.approx(h.score, abs=1e-6)
            assert "@@" not in text and _made_of_target_words(text), text
    assert any(h[0][0] for h in got)            # not every translation is empty


def test_cli_defaults_output_and_nbest_format(folder, monkeypatch, capsys, tmp_path):
    calls = []

    def recording(model, src, *a, **k):
        calls.append(k)
        return beam_search(model, src, *a, **k)
    monkeypatch.setattr(ft, "beam_search", recording)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(LINES) + "\n"))
    assert cli.main(["translate", "--fairseq", str(folder), "--backend", "reference", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {(k["beam"], k["len_penalty"], k["max_len_a"], k["max_len_b"], k["nbest"]) for k in calls} == \
        {(5, 1.0, 0.0, 200, 1)}                                          # fairseq generate's defaults
    tr = ft.FairseqTranslator.from_dir(folder, source_lang="de", target_lang="en", backend="reference")
    assert out == [hs[0][0] for hs in tr.translate(LINES)]

    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert cli.main(["translate", "--fairseq", str(folder), "--source-lang", "de", "--target-lang", "en",
                     "--input", str(src), "--beam", "3", "--nbest", "2", "--max-len-b", "6", "--backend",
                     "reference", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    want = tr.translate(LINES, beam=3, nbest=2, max_len_b=6)
    # The existing translate's n-best format: "rank<TAB>score<TAB>text", ranks 0.. per input line.
    assert out == [f"{r}\t{s:.4f}\t{t}" for hs in want for r, (t, s) in enumerate(hs)]


def test_incomplete_folders_give_clear_errors(folder, tmp_path, capsys):
    (folder / "dict.en.txt").unlink()
    with pytest.raises(SystemExit, match=f"{folder}.*dict.en.txt"):
        cli.main(["translate", "--fairseq", str(folder), "--source-lang", "de", "--target-lang", "en"])
    with pytest.raises(SystemExit, match=f"{folder}.*exactly two dict"):
        cli.main(["translate", "--fairseq", str(folder)])
    with pytest.raises(ValueError, match="no checkpoint other.pt"):
        ft.FairseqTranslator.from_dir(folder, checkpoint="other.pt")
    with pytest.raises(SystemExit, match="either --checkpoint FILE or --fairseq DIR"):
        cli.main(["translate"])


def test_equal_dictionary_sizes_need_explicit_languages(tmp_path):
    """With dictionaries of one size the direction cannot be inferred, so it is not guessed."""
    args = _args()
    d = tmp_path / "same"
    d.mkdir()
    torch.save({"args": args, "model": _fairseq_state_dict(args, src_vocab=11, tgt_vocab=11)}, d / "model.pt")
    for lang in ("de", "en"):
        (d / f"dict.{lang}.txt").write_text("".join(f"{w} 5\n" for w in TGT_WORDS), encoding="utf-8")
    with pytest.raises(ValueError, match="cannot tell the source language"):
        ft.FairseqTranslator.from_dir(d)
    tr = ft.FairseqTranslator.from_dir(d, source_lang="en", target_lang="de", backend="reference")
    assert tr.bpe is None and tr.encode("the cat zzz") == [4, 3, 3, 2]       # no codes: tokens as given
    shutil.rmtree(d)
