"""`convs2s translate --fairseq DIR` and convs2s.fairseq_translate on a tiny random fairseq fconv folder (the
checkpoint builders of tests/test_convert.py): BPE in and out, dictionary mapping, equivalence with beam_search
on the converted model, fairseq's generate defaults, the n-best format, clear errors for incomplete folders."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import convs2s.fairseq_translate as ft
import convs2s.generate as gen
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

    def recording(model, src, lengths, *a, **k):
        fed.append((src.clone(), lengths.clone()))
        return beam_search(model, src, lengths, *a, **k)
    monkeypatch.setattr(gen, "beam_search", recording)
    tr = ft.FairseqTranslator.from_dir(folder, backend="reference")     # languages inferred: de -> en
    assert tr.src_symbols[4:] == SRC_WORDS and tr.tgt_symbols[4:] == TGT_WORDS
    got = tr.translate(LINES, beam=3, nbest=2, max_len_a=0.5, max_len_b=7)

    # One length-sorted batch, left-padded like fairseq's sources. "lower newest" -BPE-> "low@@ er ne@@ we@@ s@@ t":
    # er ne@@ we@@ t are source symbols 6 7 9 11; low@@ and s@@ are not (unk 3).
    assert len(fed) == 1
    src, lengths = fed[0]
    rows = {tuple(r[r.ne(1)].tolist()) for r in src}
    assert (3, 6, 7, 9, 3, 11, 2) in rows and len(rows) == len(LINES)
    assert all(r[-1].item() == 2 and r[: src.shape[1] - n].eq(1).all() for r, n in zip(src, lengths.tolist()))

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
            # fp64 model: the padded batch and the sentence alone differ by rounding only
            assert score == pytest.approx(h.score, abs=1e-9)
            assert "@@" not in text and _made_of_target_words(text), text
    assert any(h[0][0] for h in got)            # not every translation is empty


def test_batches_do_not_change_translations(folder):
    tr = ft.FairseqTranslator.from_dir(folder, backend="reference")
    lines = LINES * 3 + ["low", "newest newest lower low low"]
    one_by_one = tr.translate(lines, beam=4, nbest=3, max_tokens=1)     # every batch a single sentence
    batched = tr.translate(lines, beam=4, nbest=3)
    assert [[t for t, _ in hs] for hs in batched] == [[t for t, _ in hs] for hs in one_by_one]
    for hs, ref in zip(batched, one_by_one):
        assert [s for _, s in hs] == pytest.approx([s for _, s in ref], abs=1e-9)


def test_moses_tokenizer_in_and_detokenizer_out(folder, monkeypatch):
    """fairseq's --tokenizer moses settings: aggressive dash splits and escaping on the way in, detokenizing on
    the way out (sacremoses; install it with pip install sacremoses)."""
    pytest.importorskip("sacremoses")
    tr = ft.FairseqTranslator.from_dir(folder, backend="reference", tokenizer="moses")
    assert tr.tokenizer.encode("lower-newest, \"low\"!") == "lower @-@ newest , &quot; low &quot; !"
    assert tr.decode([tr.tgt_symbols.index(w) for w in ("the", "ca@@", "t", "on")] + [2]) == "the cat on"
    assert tr.tokenizer.decode("the cat &apos;s mat .") == "the cat's mat."

    fed = []
    monkeypatch.setattr(gen, "beam_search", lambda m, src, lengths, **k: fed.append(src) or beam_search(
        m, src, lengths, **k))
    tr.translate(["low,low"])
    # "low,low" -Moses-> "low , low" -BPE-> "lo@@ w , lo@@ w" (no merge makes "low</w>"): lo@@ is source symbol
    # 8, w 5, "," unknown (3)
    assert fed[0].tolist() == [[8, 5, 3, 8, 5, 2]]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        ft.FairseqTranslator.from_dir(folder, tokenizer="spm")


def test_cli_tokenizer_moses(folder, monkeypatch, capsys):
    pytest.importorskip("sacremoses")
    lines = ["low,low", "lower-newest \"low\""]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(lines) + "\n"))
    assert cli.main(["translate", "--fairseq", str(folder), "--tokenizer", "moses", "--beam", "2",
                     "--backend", "reference", "--device", "cpu"]) == 0
    tr = ft.FairseqTranslator.from_dir(folder, backend="reference", tokenizer="moses")
    assert capsys.readouterr().out.splitlines() == [hs[0][0] for hs in tr.translate(lines, beam=2)]


def test_cli_defaults_output_and_nbest_format(folder, monkeypatch, capsys, tmp_path):
    calls = []

    def recording(model, src, *a, **k):
        calls.append(k)
        return beam_search(model, src, *a, **k)
    monkeypatch.setattr(gen, "beam_search", recording)
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
    # The command prints one line and exits with status 2 (convs2s.cli.main).
    assert cli.main(["translate", "--fairseq", str(folder), "--source-lang", "de", "--target-lang", "en"]) == 2
    assert re.search(f"{folder}.*dict.en.txt", capsys.readouterr().err)
    assert cli.main(["translate", "--fairseq", str(folder)]) == 2
    assert re.search(f"{folder}.*exactly two dict", capsys.readouterr().err)
    with pytest.raises(ValueError, match="no checkpoint other.pt"):
        ft.FairseqTranslator.from_dir(folder, checkpoint="other.pt")
    assert cli.main(["translate"]) == 2
    assert "either --checkpoint FILE or --fairseq DIR" in capsys.readouterr().err


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


def test_cli_bf16_autocast(folder, monkeypatch, capsys):
    """--bf16 runs the search under bf16 autocast and still prints one line each (an fp32 checkpoint, as fairseq
    saves them; autocast leaves the fixture's fp64 weights alone)."""
    ckpt = torch.load(folder / "model.pt", weights_only=False)
    ckpt["model"] = {k: v.float() for k, v in ckpt["model"].items()}
    torch.save(ckpt, folder / "model.pt")
    seen = []
    real = gen.beam_search

    def recording(model, src, lengths, **k):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(model, src, lengths, **k)
    monkeypatch.setattr(gen, "beam_search", recording)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(LINES) + "\n"))
    assert cli.main(["translate", "--fairseq", str(folder), "--bf16", "--beam", "2", "--backend", "reference",
                     "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(LINES) and seen == [True]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(LINES) + "\n"))
    assert cli.main(["translate", "--fairseq", str(folder), "--beam", "2", "--backend", "reference",
                     "--device", "cpu"]) == 0
    assert seen == [True, False]
