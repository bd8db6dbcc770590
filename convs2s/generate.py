"""Translation with a trained ConvS2S: greedy decoding for now (beam search and incremental decoding come later).

    hyps = translate(model, src_tokens, src_lengths)      src_tokens (B, Ts) right-padded, ids + EOS
    hyps[i][0].tokens     target ids ending with EOS, no BOS, 1-D int64 on the model's device
    hyps[i][0].score      mean log-probability per token (fairseq's length-normalised score)

    translate_lines(model, tokenizer, ["Ein Hund läuft."]) -> ["A dog runs."]    batched, detokenized

Greedy decoding here recomputes the decoder over the whole prefix at every step: O(T^2) work per sentence, which
Multi30k's short sentences (~13 words) afford; incremental decoding will replace that loop.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .data import PairDataset, token_batches
from .tokenizer import Tokenizer


class Hypothesis(NamedTuple):
    tokens: torch.Tensor             # (L,) target ids ending with EOS, no BOS
    score: float                     # sum of positional_scores / L
    positional_scores: torch.Tensor  # (L,) log-probability of each token


@torch.no_grad()
def translate(model, src_tokens: torch.Tensor, src_lengths: torch.Tensor | None = None, *, beam: int = 1,
              max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1) -> list[list[Hypothesis]]:
    """Per sentence, a list of `beam` hypotheses, best first.

    src_tokens (B, Ts) right- or left-padded source ids + EOS; src_lengths (B,) real lengths (None: counted from
    the padding). A sentence gets at most floor(max_len_a * src_length + max_len_b) tokens before its EOS (EOS
    is forced there), and at least `min_len` tokens before EOS. PAD and BOS are never generated.
    """
    if beam != 1:
        raise NotImplementedError("beam search comes with incremental decoding; use beam=1 (greedy) for now")
    cfg = model.config
    pad, bos, eos = cfg.pad_idx, cfg.bos_idx, cfg.eos_idx
    was_training = model.training
    model.eval()
    try:
        B = src_tokens.shape[0]
        if src_lengths is None:
            src_lengths = src_tokens.ne(pad).sum(dim=1)
        # The decoder input is BOS + tokens, so a hypothesis of L tokens (EOS included) needs L positions.
        limit = cfg.max_target_positions - 1
        max_lens = (src_lengths.to(src_tokens.device).double() * max_len_a + max_len_b).floor().long()
        max_lens = max_lens.clamp(min=max(min_len, 1), max=limit)                 # (B,) tokens before EOS
        enc = model.encode(src_tokens)
        tokens = torch.full((B, 1), bos, dtype=torch.long, device=src_tokens.device)   # (B, 1 + step)
        scores = torch.zeros(B, 0, device=src_tokens.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src_tokens.device)
        for step in range(int(max_lens.max()) + 1):
            logits = model.decoder(tokens, enc)[:, -1]                            # (B, V)
            lprobs = F.log_softmax(logits.float(), dim=-1)
            lprobs[:, pad] = float("-inf")
            lprobs[:, bos] = float("-inf")
            if step < min_len:
                lprobs[:, eos] = float("-inf")
            forced = step >= max_lens                                             # (B,) at the length limit
            lprobs[forced] = torch.where(torch.arange(lprobs.shape[1], device=lprobs.device) == eos,
                                         0.0, float("-inf")).to(lprobs.dtype)
            score, nxt = lprobs.max(dim=-1)                                       # (B,), (B,)
            nxt = nxt.masked_fill(finished, pad)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            scores = torch.cat([scores, score.masked_fill(finished, 0.0)[:, None]], dim=1)
            finished |= nxt.eq(eos)
            if bool(finished.all()):
                break
        out = []
        for i in range(B):
            row = tokens[i, 1:]
            length = int(row.eq(eos).nonzero()[0, 0]) + 1
            pos = scores[i, :length]
            out.append([Hypothesis(row[:length].clone(), float(pos.sum()) / length, pos.clone())])
        return out
    finally:
        model.train(was_training)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def translate_lines(model, tokenizer: Tokenizer, lines: Sequence[str], *, max_tokens: int = 4000, beam: int = 1,
                    max_len_a: float = 1.2, max_len_b: int = 10) -> list[str]:
    """Detokenized translations of `lines`, in input order; batched by source length on the model's device."""
    if not lines:
        return []
    device = next(model.parameters()).device
    ds = PairDataset(tokenizer.encode_src(lines))
    limit = model.config.max_source_positions
    ds.src = [s if len(s) <= limit else s[:limit - 1] + s[-1:] for s in ds.src]  # keep EOS when truncating
    # Leave room in the token budget for the decoder's prefix (up to max_len_a x the source length + max_len_b).
    sizes = [int(s * max(max_len_a, 1.0) + max_len_b) for s in ds.src_sizes]
    out: list[str] = [""] * len(lines)
    with autocast_for(device):
        for idx in token_batches(sizes, [0] * len(sizes), max(max_tokens, max(sizes))):
            batch = ds.collate(idx).to(device)
            for i, hyps in zip(batch.indices.tolist(), translate(model, batch.src_tokens, batch.src_lengths, beam=beam,
                                                                 max_len_a=max_len_a, max_len_b=max_len_b)):
                out[i] = tokenizer.decode_tgt(hyps[0].tokens.tolist())
    return out
