"""Translate with a fairseq fconv archive folder (model.pt, dict.<src>.txt, dict.<tgt>.txt, optional bpecodes).

    tr = FairseqTranslator.from_dir("wmt14.en-fr.fconv-py", source_lang="en", target_lang="fr", tokenizer="moses")
    tr.translate(["Hello world!"])           # [[(text, score)]] per line, best first

Per line, fairseq's hub pipeline: strip, Moses-tokenize (tokenizer="moses": sacremoses with fairseq's settings,
aggressive dash splits and escaping on; None: the input is already tokenized), apply BPE (when the folder has
codes), map tokens with the source dictionary (unknown -> <unk>), append </s>; beam search (fairseq's generate
defaults: beam 5, length penalty 1, max length 0 * |src| + 200); then map ids back with the target dictionary,
drop the final </s>, remove BPE ("@@ ") and Moses-detokenize.

Lines are searched by convs2s.generate.translate_batched: batches of similar length (at most max_tokens source
tokens, left-padded as fairseq pads sources). Sentences finish independently in convs2s.search, so a line's
hypotheses do not depend on its batch beyond floating-point rounding of the padded computation (fairseq-generate
batches the same way); with max_len_a != 0 each sentence's length limit comes from its own length
(fairseq-interactive's batch-of-one result).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .bpe import BPE, remove_bpe
from .convert import EOS, UNK, from_fairseq, load_fairseq_checkpoint, read_fairseq_dict
from .generate import translate_batched

BPE_CODE_NAMES = ("bpecodes", "code", "codes")   # names fairseq's released archives use for subword-nmt codes


def _dict_langs(folder: Path) -> list[str]:
    """The <lang> of every dict.<lang>.txt in folder, sorted."""
    return sorted(p.name[len("dict."):-len(".txt")] for p in folder.glob("dict.*.txt"))


def _infer_langs(folder: Path, ckpt, source_lang, target_lang) -> tuple[str, str]:
    """The missing language(s): from the checkpoint's args (source_lang / target_lang) when present, else from
    exactly two dict.<lang>.txt files, oriented by which dictionary fits the encoder's embedding size."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    src, tgt = source_lang or getattr(args, "source_lang", None), target_lang or getattr(args, "target_lang", None)
    if src and tgt:
        return src, tgt
    langs = _dict_langs(folder)
    if len(langs) != 2:
        raise ValueError(f"{folder}: cannot infer the languages: expected exactly two dict.<lang>.txt files, found "
                         f"{len(langs)} ({', '.join(langs) or 'none'}); give --source-lang and --target-lang")
    sd = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
    rows = {side: sd[f"{side}.embed_tokens.weight"].shape[0] for side in ("encoder", "decoder")
            if f"{side}.embed_tokens.weight" in sd}
    sizes = {lang: len(read_fairseq_dict(folder / f"dict.{lang}.txt")) for lang in langs}
    fits = [(a, b) for a, b in (langs, langs[::-1])
            if (src in (None, a)) and (tgt in (None, b))
            and sizes[a] == rows.get("encoder") and sizes[b] == rows.get("decoder")]
    if len(fits) != 1:
        raise ValueError(f"{folder}: cannot tell the source language from the target among {langs} "
                         "(dictionary sizes do not decide it); give --source-lang and --target-lang")
    return fits[0]


class Moses:
    """fairseq's `--tokenizer moses` (sacremoses): tokenize with aggressive dash splits and escaping, as fairseq's
    MosesTokenizer defaults do; detokenize whitespace-split tokens."""

    def __init__(self, source_lang: str, target_lang: str):
        try:
            from sacremoses import MosesDetokenizer, MosesTokenizer
        except ImportError:
            raise ValueError("tokenizer 'moses' needs sacremoses: pip install sacremoses") from None
        self.tok, self.detok = MosesTokenizer(lang=source_lang), MosesDetokenizer(lang=target_lang)

    def encode(self, text: str) -> str:
        return self.tok.tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True)

    def decode(self, text: str) -> str:
        return self.detok.detokenize(text.split())


TOKENIZERS = (None, "moses")


class FairseqTranslator:
    """A converted fconv model with its symbol lists (index = id), optional BPE and tokenizer; `translate` does the
    pipeline."""

    def __init__(self, model, src_symbols: list[str], tgt_symbols: list[str], bpe: BPE | None = None,
                 tokenizer: Moses | None = None):
        self.model, self.src_symbols, self.tgt_symbols = model, src_symbols, tgt_symbols
        self.bpe, self.tokenizer = bpe, tokenizer
        self.src_index = {}
        for i, s in enumerate(src_symbols):
            self.src_index.setdefault(s, i)             # a repeated symbol keeps its first id

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, *, checkpoint: str = "model.pt", source_lang: str | None = None,
                 target_lang: str | None = None, tokenizer: str | None = None, backend: str = "auto",
                 device: torch.device | str = "cpu") -> FairseqTranslator:
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"fairseq folder {folder} does not exist")
        ckpt_path = folder / checkpoint
        if not ckpt_path.is_file():
            raise ValueError(f"{folder}: no checkpoint {checkpoint} (choose another with --fairseq-checkpoint)")
        ckpt = load_fairseq_checkpoint(ckpt_path)
        if source_lang is None or target_lang is None:
            source_lang, target_lang = _infer_langs(folder, ckpt, source_lang, target_lang)
        dicts = {}
        for lang in (source_lang, target_lang):
            path = folder / f"dict.{lang}.txt"
            if not path.is_file():
                raise ValueError(f"{folder}: missing dictionary dict.{lang}.txt (the folder must hold "
                                 "dict.<source>.txt and dict.<target>.txt)")
            dicts[lang] = read_fairseq_dict(path)
        model = from_fairseq(ckpt, src_dict=dicts[source_lang], tgt_dict=dicts[target_lang], backend=backend)
        codes = next((folder / n for n in BPE_CODE_NAMES if (folder / n).is_file()), None)
        return cls(model.to(device), dicts[source_lang], dicts[target_lang],
                   BPE.from_file(codes) if codes is not None else None,
                   Moses(source_lang, target_lang) if tokenizer == "moses" else None)

    def encode(self, line: str) -> list[int]:
        """A sentence -> source ids ending with </s>, cut to the model's source positions."""
        text = line.strip()
        if self.tokenizer is not None:
            text = self.tokenizer.encode(text)
        if self.bpe is not None:
            text = self.bpe.apply(text)
        ids = [self.src_index.get(tok, UNK) for tok in text.split()]
        ids = ids[: self.model.config.max_source_positions - 1]
        return ids + [EOS]

    def decode(self, ids: list[int]) -> str:
        """Target ids (ending with </s>) -> text with BPE removed (and detokenized with a tokenizer)."""
        if ids and ids[-1] == EOS:
            ids = ids[:-1]
        text = remove_bpe(" ".join(self.tgt_symbols[i] for i in ids))
        return self.tokenizer.decode(text) if self.tokenizer is not None else text

    @torch.no_grad()
    def translate(self, lines: list[str], *, beam: int = 5, nbest: int = 1, len_penalty: float = 1.0,
                  max_len_a: float = 0.0, max_len_b: int = 200,
                  max_tokens: int = 4000) -> list[list[tuple[str, float]]]:
        """Per line (input order), `nbest` (text, score) best first; lines are searched in length-sorted batches
        of at most `max_tokens` padded source tokens."""
        hyps = translate_batched(self.model, [self.encode(line) for line in lines], max_tokens=max_tokens,
                                 left_pad=True, beam=beam, nbest=nbest, len_penalty=len_penalty, max_len_a=max_len_a,
                                 max_len_b=max_len_b)
        return [[(self.decode(h.tokens.tolist()), h.score) for h in hs] for hs in hyps]
