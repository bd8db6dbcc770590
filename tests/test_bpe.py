"""convs2s.bpe: subword-nmt (version 0.2) segmentation against segmentations worked out by hand."""

from __future__ import annotations

import pytest

from convs2s.bpe import BPE, remove_bpe

# Ranks 0..4. Hand derivation for "lower": l o w e r</w> -> (rank 0 "l o") lo w e r</w> -> (rank 1 "lo w")
# low e r</w> -> (rank 3 "e r</w>") low er</w> -> no ranked pair left ("low er</w>" is not a merge) -> low@@ er.
CODES = "#version: 0.2\nl o\nlo w\nw e\ne r</w>\nn e\n"


@pytest.fixture()
def bpe(tmp_path):
    path = tmp_path / "bpecodes"
    path.write_text(CODES, encoding="utf-8")
    return BPE.from_file(path)


@pytest.mark.parametrize("word, pieces", [
    ("lower", ("low", "er")),
    # n e w e s t</w>: rank 2 "w e" first -> n e we s t</w>; "n e" (rank 4) -> ne we s t</w>; nothing else.
    ("newest", ("ne", "we", "s", "t")),
    ("low", ("lo", "w")),       # l o w</w>: "l o" -> lo w</w>; "lo w" does not match "w</w>" -> lo w
    ("a", ("a",)),
    ("xyz", ("x", "y", "z")),   # characters no merge mentions pass through
    ("weer", ("we", "er")),     # w e e r</w>: "w e" (2) before "e r</w>" (3) -> we e r</w> -> we er</w>
])
def test_segment_word_by_hand(bpe, word, pieces):
    assert bpe.segment_word(word) == pieces


def test_apply_marks_non_final_subwords_and_round_trips(bpe):
    line = "lower newest ä xyz low"
    assert bpe.apply(line) == "low@@ er ne@@ we@@ s@@ t ä x@@ y@@ z lo@@ w"
    assert remove_bpe(bpe.apply(line)) == line
    assert bpe.apply("  lower \t a ") == "low@@ er a"                  # whitespace tokenization


def test_header_optional_and_bad_line(tmp_path):
    (tmp_path / "c").write_text("l o\nlo w\n", encoding="utf-8")
    assert BPE.from_file(tmp_path / "c").segment_word("lowlow") == ("low", "lo", "w")
    (tmp_path / "bad").write_text("#version: 0.2\nl o x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad:2"):
        BPE.from_file(tmp_path / "bad")


def test_remove_bpe_trailing_marker():
    assert remove_bpe("ab@@ c d@@") == "abc d"
    assert remove_bpe("plain words") == "plain words"
