"""Apply and remove subword-nmt BPE (the codes files fairseq's fconv archives ship as `bpecodes`).

    bpe = BPE.from_file("bpecodes")
    bpe.apply("the lowest")        # "the lo@@ west"      (each subword but a word's last ends with "@@")
    remove_bpe("the lo@@ west")    # "the lowest"         (fairseq's --remove-bpe "@@ ")

Codes file: an optional "#version: ..." header, then one merge "left right" per line; rank = line order.
Segmentation follows subword-nmt's version 0.2 convention: a word is split into characters, the end-of-word
marker "</w>" is glued to the last one, then the lowest-ranked adjacent pair present is merged (every occurrence,
left to right) until no ranked pair remains. Characters no merge mentions pass through as single symbols.
Not supported: version 0.1 codes (a separate "</w>" symbol), glossaries, vocabulary thresholds.
"""

from __future__ import annotations

import os

_EOW = "</w>"


class BPE:
    """merges: (left, right) pairs, highest priority first. Segmentations are cached per word."""

    def __init__(self, merges: list[tuple[str, str]], separator: str = "@@"):
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self.ranks.setdefault(tuple(pair), rank)  # a repeated pair keeps its first (lowest) rank
        self.separator = separator
        self._cache: dict[str, tuple[str, ...]] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike, separator: str = "@@") -> BPE:
        merges = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if n == 1 and line.startswith("#version"):
                    continue
                if not line.strip():
                    continue
                parts = line.split(" ")
                if len(parts) != 2 or not all(parts):
                    raise ValueError(f"{path}:{n}: expected a merge 'left right', got {line!r}")
                merges.append((parts[0], parts[1]))
        return cls(merges, separator)

    def segment_word(self, word: str) -> tuple[str, ...]:
        """One word (no spaces) -> its subwords, "</w>" stripped, without separators."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + _EOW]
        while len(symbols) > 1:
            ranked = [(self.ranks[p], p) for p in zip(symbols, symbols[1:]) if p in self.ranks]
            if not ranked:
                break
            _, (left, right) = min(ranked)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        last = symbols[-1][: -len(_EOW)]
        out = tuple(symbols[:-1]) + ((last,) if last else ())
        self._cache[word] = out
        return out

    def apply(self, line: str) -> str:
        """A whitespace-tokenized sentence -> subwords joined by spaces, "@@" ending every non-final subword."""
        out = []
        for word in line.split():
            pieces = self.segment_word(word)
            out.extend(p + self.separator for p in pieces[:-1])
            out.append(pieces[-1])
        return " ".join(out)


def remove_bpe(line: str, marker: str = "@@ ") -> str:
    """Undo BPE as fairseq's --remove-bpe does: drop every "@@ ", and a trailing "@@"."""
    return (line + " ").replace(marker, "").rstrip()
