"""Translation with a trained ConvS2S: batched beam search (beam = 1: greedy) over incremental decoder steps.

    hyps = translate(model, src_tokens, src_lengths, beam=5, nbest=2)    src_tokens (B, Ts) padded, ids + EOS
    hyps[i][0].tokens     target ids ending with EOS, no BOS, 1-D int64 on the model's device
    hyps[i][0].score      sum of log-probabilities / length ** len_penalty (fairseq's length-normalised score)
    hyps[i][0].attention  (n_attention_layers, L, S) over the S real source tokens, with need_attention=True

    translate_lines(model, tokenizer, ["Ein Hund läuft."]) -> ["A dog runs."]    batched, detokenized
    nbest_lines(model, tokenizer, lines, beam=5, nbest=3) -> per line [(translation, score)], best first

The search is convs2s.search.beam_search; incremental=False recomputes the decoder over the whole prefix at every
step (O(T^2) per sentence), kept for comparison and tests.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .data import PairDataset, token_batches
from .search import Hypothesis, beam_search
from .tokenizer import Tokenizer

__all__ = ["Hypothesis", "translate", "translate_lines", "nbest_lines", "autocast_for"]


@torch.no_grad()
def translate(model, src_tokens: torch.Tensor, src_lengths: torch.Tensor | None = None, *, beam: int = 5,
              max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1, len_penalty: float = 1.0,
              nbest: int = 1, incremental: bool = True, need_attention: bool = False) -> list[list[Hypothesis]]:
    """Per sentence, at most `nbest` hypotheses, best first; beam = 1 is greedy decoding.

    src_tokens (B, Ts) right- or left-padded source ids + EOS; src_lengths (B,) real lengths (None: counted from
    the padding). A sentence gets at most floor(max_len_a * src_length + max_len_b) tokens before its EOS (EOS
    is forced there), and at least `min_len` tokens before EOS. PAD and BOS are never generated.
    """
    return beam_search(model, src_tokens, src_lengths, beam=beam, max_len_a=max_len_a, max_len_b=max_len_b,
                       min_len=min_len, len_penalty=len_penalty, nbest=nbest, incremental=incremental,
                       need_attention=need_attention)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def translate_lines(model, tokenizer: Tokenizer, lines: Sequence[str], *, max_tokens: int = 4000, beam: int = 1,
                    max_len_a: float = 1.2, max_len_b: int = 10, len_penalty: float = 1.0) -> list[str]:
    """Detokenized translations of `lines`, in input order; batched by source length on the model's device."""
    return [hyps[0][0] for hyps in nbest_lines(model, tokenizer, lines, max_tokens=max_tokens, beam=beam,
                                               max_len_a=max_len_a, max_len_b=max_len_b, len_penalty=len_penalty)]


def nbest_lines(model, tokenizer: Tokenizer, lines: Sequence[str], *, max_tokens: int = 4000, beam: int = 1,
                nbest: int = 1, max_len_a: float = 1.2, max_len_b: int = 10,
                len_penalty: float = 1.0) -> list[list[tuple[str, float]]]:
    """Per line of `lines` (in input order), at most `nbest` (detokenized translation, score), best first."""
    if not lines:
        return []
    device = next(model.parameters()).device
    ds = PairDataset(tokenizer.encode_src(lines))
    limit = model.config.max_source_positions
    ds.src = [s if len(s) <= limit else s[:limit - 1] + s[-1:] for s in ds.src]  # keep EOS when truncating
    # Leave room in the token budget for the decoder's prefix (up to max_len_a x the source length + max_len_b).
    sizes = [int(s * max(max_len_a, 1.0) + max_len_b) for s in ds.src_sizes]
    out: list[list[tuple[str, float]]] = [[] for _ in lines]
    with autocast_for(device):
        for idx in token_batches(sizes, [0] * len(sizes), max(max_tokens, max(sizes))):
            batch = ds.collate(idx).to(device)
            hyps = translate(model, batch.src_tokens, batch.src_lengths, beam=beam, nbest=nbest,
                             max_len_a=max_len_a, max_len_b=max_len_b, len_penalty=len_penalty)
            for i, hs in zip(batch.indices.tolist(), hyps):
                out[i] = [(tokenizer.decode_tgt(h.tokens.tolist()), h.score) for h in hs]
    return out
