"""A synthetic parallel corpus with WMT-like sentence lengths, for timing the corpus pipeline (not for learning).

    python bench/make_synthetic_corpus.py --pairs 4500000 --out /tmp/synth/train --src-lang en --tgt-lang de

writes OUT.en and OUT.de (add --gzip for .gz), one sentence a line. Never commit the output: write it under /tmp
or the git-ignored data/ folder.

Assumed statistics (assumptions, not measured from WMT data; they set the amount of text per pair, which is what
the timings depend on):
  * source length in words ~ lognormal, median 23, sigma 0.55 -> mean 26.7 words, clipped to [1, 200]: the
    order of WMT'14 En-De's newstest sentences (the brief's "mean ~27 words"), with a long tail;
  * target length = source length x a lognormal ratio (median 1.0, sigma 0.15), clipped to [1, 200];
  * words drawn from a Zipf law (exponent 1, Zipf's law for word frequencies) over 100,000 word types per
    language; a type is 1-4 syllables (more for rarer types); the first word is capitalised and every sentence
    ends with " .". Letters: ASCII plus umlauts.
With an 8k sentencepiece BPE these sentences become ~1.5 subwords a word (40 a sentence), like real text.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np

MEDIAN_WORDS, SIGMA_WORDS, MAX_WORDS = 23.0, 0.55, 200
RATIO_SIGMA = 0.15
VOCAB = 100_000


def vocabulary(rng: np.random.Generator, n: int = VOCAB) -> np.ndarray:
    """n word spellings, rank 0 the most frequent: 1-4 syllables (more for rarer types, as in text), each syllable
    drawn Zipf-like from an inventory of consonant-vowel(-consonant) syllables, so that subword models find
    reusable pieces as they do in real words (random letters would split into ~2.6 BPE pieces a word)."""
    onsets, vowels = list("bdfghklmnprstvwz") + ["st", "sch", "tr"], list("aeiouäöü")
    codas = ["", "n", "r", "s", "t"]
    syllables = np.array([o + v + c for o in onsets for v in vowels for c in codas], dtype=object)
    pick = zipf_sampler(rng, len(syllables))
    n_syl = np.clip(np.round(1 + np.log1p(np.arange(n)) * 0.25 + rng.normal(0, 0.7, n)), 1, 4).astype(int)
    parts = syllables[pick(int(n_syl.sum()))]
    ends = np.cumsum(n_syl)
    return np.array(["".join(parts[e - k:e]) for e, k in zip(ends.tolist(), n_syl.tolist())], dtype=object)


def zipf_sampler(rng: np.random.Generator, n: int = VOCAB):
    cdf = np.cumsum(1.0 / np.arange(1, n + 1))
    cdf /= cdf[-1]
    return lambda size: np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def write_side(words: np.ndarray, ids: np.ndarray, lengths: np.ndarray, out) -> None:
    ends = np.cumsum(lengths)
    starts = ends - lengths
    tokens = words[ids]
    lines = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        sent = tokens[s:e].tolist()
        sent[0] = sent[0].capitalize()
        lines.append(" ".join(sent) + " .\n")
    out.write("".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, required=True, help="number of sentence pairs")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.<src-lang> and OUT.<tgt-lang>")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--gzip", action="store_true", help="write OUT.<lang>.gz")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    rng = np.random.default_rng(a.seed)
    vocab = {a.src_lang: vocabulary(rng), a.tgt_lang: vocabulary(rng)}
    sample = zipf_sampler(rng)
    prefix = Path(a.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if a.gzip else ""
    opener = (lambda f: gzip.open(f, "wt", encoding="utf-8", compresslevel=1)) if a.gzip else \
        (lambda f: open(f, "w", encoding="utf-8"))
    t0 = time.time()
    words = n_pairs = 0
    with opener(f"{prefix}.{a.src_lang}{suffix}") as fs, opener(f"{prefix}.{a.tgt_lang}{suffix}") as ft:
        for start in range(0, a.pairs, 100_000):
            n = min(100_000, a.pairs - start)
            src_len = np.clip(np.round(rng.lognormal(np.log(MEDIAN_WORDS), SIGMA_WORDS, n)), 1, MAX_WORDS).astype(int)
            tgt_len = np.clip(np.round(src_len * rng.lognormal(0.0, RATIO_SIGMA, n)), 1, MAX_WORDS).astype(int)
            write_side(vocab[a.src_lang], sample(int(src_len.sum())), src_len, fs)
            write_side(vocab[a.tgt_lang], sample(int(tgt_len.sum())), tgt_len, ft)
            words += int(src_len.sum() + tgt_len.sum())
            n_pairs += n
    print(f"wrote {n_pairs} pairs ({words / n_pairs / 2:.1f} words per sentence on average) to "
          f"{prefix}.{{{a.src_lang},{a.tgt_lang}}}{suffix} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
