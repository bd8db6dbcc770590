"""Translation with a trained ConvS2S: batched beam search (beam = 1: greedy) over incremental decoder steps.

    hyps = translate(model, src_tokens, src_lengths, beam=5, nbest=2)    src_tokens (B, Ts) padded, ids + EOS
    hyps[i][0].tokens     target ids ending with EOS, no BOS, 1-D int64 on the model's device
    hyps[i][0].score      sum of log-probabilities / length ** len_penalty (fairseq's length-normalised score)
    hyps[i][0].attention  (n_attention_layers, L, S) over the S real source tokens, with need_attention=True

    translate_batched(model, [[5, 9, 2], [7, 2]], beam=5) -> per source, in input order, its hypotheses
    translate_lines(model, tokenizer, ["Ein Hund läuft."]) -> ["A dog runs."]    batched, detokenized
    nbest_lines(model, tokenizer, lines, beam=5, nbest=3) -> per line [(translation, score)], best first

translate_batched is the one batching path: `convs2s translate`, `convs2s evaluate`, validation BLEU in training
(through translate_lines / nbest_lines) and the fairseq path (convs2s.fairseq_translate) all go through it.
The search is convs2s.search.beam_search; incremental=False recomputes the decoder over the whole prefix at every
step (O(T^2) per sentence), kept for comparison and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import token_batches
from .device import autocast_for
from .search import Hypothesis, beam_search
from .tokenizer import EOS_ID, Tokenizer

__all__ = ["Hypothesis", "translate", "translate_batched", "translate_lines", "nbest_lines", "autocast_for"]


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


@torch.no_grad()
def translate_batched(model, sources: Sequence[Sequence[int]], *, max_tokens: int = 4000, left_pad: bool = False,
                      beam: int = 5, nbest: int = 1, max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1,
                      len_penalty: float = 1.0, need_attention: bool = False) -> list[list[Hypothesis]]:
    """Per source, in input order, at most `nbest` hypotheses, best first (beam_search's, see `translate`).

    sources: source id lists, each ending with EOS; one longer than the model's max_source_positions is cut to
    its first max_source_positions - 1 ids + its EOS. They are sorted by length and grouped into batches of at
    most max(max_tokens, longest source) padded source tokens (batch size x its longest source, fairseq-generate's
    --max-tokens), padded on the left (left_pad, as fairseq pads sources) or right, and each batch is searched
    on the model's device (in eval mode; the model's mode is restored). Each sentence's length limit comes from
    its own length, so a sentence's hypotheses do not depend on its batch beyond floating-point rounding of the
    padded computation. The decoder's step weights are prepared once for all batches, under the caller's
    autocast setting.
    """
    if not sources:
        return []
    limit = model.config.max_source_positions
    sources = [list(s) if len(s) <= limit else list(s[:limit - 1]) + [s[-1]] for s in sources]
    sizes = [len(s) for s in sources]
    if min(sizes) == 0:
        raise ValueError("every source needs at least its EOS; got an empty id list")
    was_training = model.training
    model.eval()
    try:
        return _search_batches(model, sources, sizes, max_tokens, left_pad, beam=beam, nbest=nbest,
                               max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len, len_penalty=len_penalty,
                               need_attention=need_attention)
    finally:
        model.train(was_training)


def _search_batches(model, sources, sizes, max_tokens, left_pad, **search) -> list[list[Hypothesis]]:
    """translate_batched's loop over token batches, the model in eval mode; `search`: beam_search's options."""
    cfg = model.config
    device = next(model.parameters()).device
    weights = model.decoder.prepare_step(device)
    out: list[list[Hypothesis]] = [[] for _ in sources]
    for batch in token_batches(sizes, sizes, max(max_tokens, max(sizes))):
        idx = [int(i) for i in batch]
        width = max(sizes[i] for i in idx)
        src = torch.full((len(idx), width), cfg.pad_idx, dtype=torch.long)
        for row, i in enumerate(idx):
            ids = torch.tensor(sources[i], dtype=torch.long)
            if left_pad:
                src[row, width - sizes[i]:] = ids
            else:
                src[row, :sizes[i]] = ids
        lengths = torch.tensor([sizes[i] for i in idx], dtype=torch.long)
        hyps = beam_search(model, src.to(device), lengths.to(device), step_weights=weights, **search)
        for i, hs in zip(idx, hyps):
            out[i] = hs
    return out


def translate_lines(model, tokenizer: Tokenizer, lines: Sequence[str], *, max_tokens: int = 4000, beam: int = 1,
                    max_len_a: float = 1.2, max_len_b: int = 10, len_penalty: float = 1.0) -> list[str]:
    """Detokenized translations of `lines`, in input order (the best hypothesis of nbest_lines)."""
    return [hyps[0][0] for hyps in nbest_lines(model, tokenizer, lines, max_tokens=max_tokens, beam=beam,
                                               max_len_a=max_len_a, max_len_b=max_len_b, len_penalty=len_penalty)]


def nbest_lines(model, tokenizer: Tokenizer, lines: Sequence[str], *, max_tokens: int = 4000, beam: int = 1,
                nbest: int = 1, max_len_a: float = 1.2, max_len_b: int = 10,
                len_penalty: float = 1.0) -> list[list[tuple[str, float]]]:
    """Per line of `lines` (in input order), at most `nbest` (detokenized translation, score), best first.

    Encoded with the tokenizer (+ EOS), searched by translate_batched (right-padded) under autocast_for(device)."""
    if not lines:
        return []
    device = next(model.parameters()).device
    sources = [ids + [EOS_ID] for ids in tokenizer.encode_src(lines)]
    with autocast_for(device):
        hyps = translate_batched(model, sources, max_tokens=max_tokens, beam=beam, nbest=nbest, max_len_a=max_len_a,
                                 max_len_b=max_len_b, len_penalty=len_penalty)
    return [[(tokenizer.decode_tgt(h.tokens.tolist()), h.score) for h in hs] for hs in hyps]
