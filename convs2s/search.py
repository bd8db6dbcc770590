"""Batched beam search (beam = 1: greedy) over incremental steps or full-prefix recomputation.

    hyps = beam_search(model, src_tokens, src_lengths, beam=5, nbest=2)
    hyps[i]                 the n-best hypotheses of sentence i, best first (at most nbest)
    hyps[i][0].tokens       (L,) int64 target ids ending with EOS, no BOS, on the model's device
    hyps[i][0].score        sum(positional_scores) / L ** len_penalty          (fairseq's normalisation)
    hyps[i][0].attention    (n_attention_layers, L, S) over the sentence's S real source tokens, or None

The search is fairseq's SequenceGenerator, batched over sentences and beams (rows = sentence * beam + beam index):
each step scores every (beam, token) continuation by cumulative log-probability, takes the best 2*beam; an EOS
among the best `beam` finishes a hypothesis (normalised by its length), the best `beam` non-EOS continuations go
on. A sentence is done when it has `beam` finished hypotheses or reaches its maximum length, where EOS is forced;
done sentences leave the batch (their decoder rows are dropped), so sentences finish independently.
tests/test_fairseq_search.py holds it to an oracle of fairseq's algorithm (hypotheses, order, scores), down to
its corners: k = min(2*beam, entries - 1) candidates (beam 0's V entries at step 0), and the slot fairseq keeps
an ended hypothesis in when fewer than `beam` continuations remain (beam = V - 1 with min_len 0).

Lengths: a hypothesis has at most max_len tokens before its EOS, max_len = floor(max_len_a * src_length +
max_len_b) per sentence (or given), clamped to max_target_positions - 1 (the decoder input is BOS + tokens) and
to at least min_len; EOS is banned before min_len tokens. PAD (and BOS where it differs from EOS) is never
generated. fairseq takes one max_len per batch from the PADDED source width: with max_len_a = 0 (its default)
the two agree; with max_len_a != 0 they agree for batches of one sentence, and in a padded batch each sentence
gets the hypotheses fairseq gives it alone. For fairseq's batch-wide limit, pass
max_len=int(max_len_a * src_tokens.shape[1] + max_len_b).

incremental=True steps the decoder with Decoder.step (O(1) per token); False recomputes the decoder over the whole
prefix at every step (the bentrevett notebook's way: O(T) per token), kept for comparison and tests.

The step weights (weight norm applied, cast to the compute dtype) are prepared once per call from the current
parameters, so a search never sees stale weights. For the multi30k preset on one CPU thread that costs about one
greedy step of 64 sentences (32-70 ms vs 60-64 ms; a beam-5 step of them: 213-235 ms); a caller translating many
batches passes step_weights=model.decoder.prepare_step(device) (under the autocast setting of the search) to pay
it once.

Non-finite logits (a diverged model) raise FloatingPointError; a batch of 0 sentences gives [].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .model import EncoderOut, StepWeights


class Hypothesis(NamedTuple):
    tokens: torch.Tensor                    # (L,) target ids ending with EOS, no BOS
    score: float                            # sum(positional_scores) / L ** len_penalty
    positional_scores: torch.Tensor         # (L,) log-probability of each token
    attention: torch.Tensor | None = None   # (n_attention_layers, L, S) over the S real source tokens


class _IncrementalStepper:
    """Rows of decoder state advanced one token at a time (Decoder.step)."""

    def __init__(self, decoder, enc: EncoderOut, weights: StepWeights | None):
        self.decoder = decoder
        self.state = decoder.init_state(enc, weights)

    def step(self, tokens: torch.Tensor, need_attention: bool):
        """tokens (N,) -> logits (N, V), attention (N, n_attention_layers, Ts) or None."""
        logits, attn = self.decoder.step(tokens, self.state, need_weights=need_attention)
        if not need_attention:
            return logits, None
        return logits, _stack_layers(attn, self.state.enc.keys)

    def reorder(self, order: torch.Tensor, same_sources: bool) -> None:
        self.decoder.reorder_state(self.state, order, same_sources=same_sources)


class _FullStepper:
    """The decoder run over the whole prefix at every step, keeping the last position's output."""

    def __init__(self, decoder, enc: EncoderOut, weights: StepWeights | None):
        self.decoder, self.enc, self.prefix = decoder, enc, None

    def step(self, tokens: torch.Tensor, need_attention: bool):
        col = tokens[:, None]
        self.prefix = col if self.prefix is None else torch.cat([self.prefix, col], dim=1)   # (N, t)
        if not need_attention:
            return self.decoder(self.prefix, self.enc)[:, -1], None
        logits, attn = self.decoder(self.prefix, self.enc, return_attention=True)
        return logits[:, -1], _stack_layers([a[:, -1] for a in attn], self.enc.keys)

    def reorder(self, order: torch.Tensor, same_sources: bool) -> None:
        self.prefix = self.prefix.index_select(0, order)
        if not same_sources:
            self.enc = EncoderOut(*(t.index_select(0, order) for t in self.enc))


def _stack_layers(attn: list, keys: torch.Tensor) -> torch.Tensor:
    """Per-layer (N, Ts) probabilities -> (N, n_attention_layers, Ts) (n may be 0)."""
    if not attn:
        return keys.new_zeros(keys.shape[0], 0, keys.shape[1])
    return torch.stack(attn, dim=1)


def max_lengths(src_lengths: torch.Tensor, max_len_a: float, max_len_b: int, min_len: int, limit: int,
                max_len: torch.Tensor | int | None = None) -> torch.Tensor:
    """(B,) int64 tokens allowed before EOS: floor(a * src_length + b) or `max_len`, in [max(min_len, 1), limit]."""
    if max_len is None:
        lens = (src_lengths.double() * max_len_a + max_len_b).floor().long()
    else:
        lens = torch.as_tensor(max_len, dtype=torch.long, device=src_lengths.device).expand(src_lengths.shape)
    return lens.clamp(min=max(min_len, 1), max=limit)


@torch.no_grad()
def beam_search(model, src_tokens: torch.Tensor, src_lengths: torch.Tensor | None = None, *, beam: int = 5,
                max_len_a: float = 1.2, max_len_b: int = 10, max_len: torch.Tensor | int | None = None,
                min_len: int | torch.Tensor = 1, len_penalty: float = 1.0, nbest: int = 1,
                incremental: bool = True, need_attention: bool = False,
                step_weights: StepWeights | None = None) -> list[list[Hypothesis]]:
    """Per sentence of src_tokens (B, Ts) (right- or left-padded ids + EOS), at most `nbest` hypotheses, best first.

    src_lengths (B,) real source lengths (None: counted from the padding); max_len (B,) or int overrides
    max_len_a/b; min_len int or (B,) tokens before EOS may be generated. The model is run in eval mode.
    step_weights: model.decoder.prepare_step(...) of the current parameters, for incremental decoding (default:
    prepared in this call). Raises FloatingPointError where the model's logits are NaN/inf.
    """
    if beam < 1 or not 1 <= nbest <= beam:
        raise ValueError(f"need beam >= 1 and 1 <= nbest <= beam, got beam={beam}, nbest={nbest}")
    was_training = model.training
    model.eval()
    try:
        return _search(model, src_tokens, src_lengths, beam, max_len_a, max_len_b, max_len, min_len, len_penalty,
                       nbest, incremental, need_attention, step_weights)
    finally:
        model.train(was_training)


def _search(model, src_tokens, src_lengths, K, max_len_a, max_len_b, max_len, min_len, len_penalty, nbest,
            incremental, need_attention, step_weights):
    cfg = model.config
    pad, bos, eos = cfg.pad_idx, cfg.bos_idx, cfg.eos_idx
    device = src_tokens.device
    B = src_tokens.shape[0]
    if B == 0:
        return []
    if src_lengths is None:
        src_lengths = src_tokens.ne(pad).sum(dim=1)
    limit = cfg.max_target_positions - 1                                        # decoder input = BOS + tokens
    min_lens = torch.as_tensor(min_len, dtype=torch.long, device=device).expand(B).clamp(max=limit)
    max_lens = max_lengths(src_lengths.to(device), max_len_a, max_len_b, 1, limit, max_len)
    max_lens = torch.maximum(max_lens, min_lens)
    max_lens_host = max_lens.tolist()

    enc = model.encode(src_tokens)
    rows = torch.arange(B, device=device).repeat_interleave(K)                 # (B*K,) beam rows -> sentence
    enc = EncoderOut(*(t.index_select(0, rows) for t in enc))
    stepper = (_IncrementalStepper if incremental else _FullStepper)(model.decoder, enc, step_weights)

    sent = list(range(B))                                                       # active row block -> sentence
    row_max, row_min = max_lens[rows], min_lens[rows]                           # (N,) per row, N = len(sent) * K
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=device)      # (N, 1 + step)
    banned = [pad] if bos == eos else [pad, bos]          # fairseq-converted models start from EOS (bos == eos)
    cum, pos_scores, attn_hist = None, None, None
    ignored = None                                    # (n, K) fairseq's cands_to_ignore, once it can be set
    finalized: list[list[Hypothesis]] = [[] for _ in range(B)]
    for step in range(int(max_lens.max()) + 1):
        logits, attn = stepper.step(tokens[:, -1], need_attention)             # (N, V), (N, nL, Ts)
        score_dtype = torch.promote_types(logits.dtype, torch.float32)
        lprobs = F.log_softmax(logits.to(score_dtype), dim=-1)                 # (N, V), a fresh tensor
        N, V = lprobs.shape
        lprobs[:, banned] = -math.inf
        eos_lp = lprobs[:, eos].masked_fill(step < row_min, -math.inf)          # (N,) EOS banned before min_len
        lprobs.masked_fill_((step >= row_max)[:, None], -math.inf)              # EOS forced at the maximum length
        lprobs[:, eos] = eos_lp
        cand = lprobs if cum is None else cum[:, None] + lprobs                  # (N, V) cumulative
        n = N // K
        cand = cand.view(n, K, V)
        # fairseq's BeamSearch.step takes k = min(2K, entries - 1) candidates (one entry fewer: PAD is never
        # chosen), the entries being beam 0's V at step 0 (all beams are BOS) and the K*V of all beams after.
        # Beams wider than V - 1, which fairseq clamps to V - 1, take K at step 0.
        if step == 0:
            cand = cand.clone()
            cand[:, 1:] = -math.inf                                             # all beams are BOS: expand beam 0
            n_cand = min(2 * K, max(K, V - 1))
        else:
            n_cand = min(2 * K, K * V - 1)
        # At most one candidate per live beam ends (1 beam at step 0, K after); with k - that >= K, K others go on
        # and no slot is ignored. Skipping the bookkeeping then saves ~40 us per step (5 small ops, CPU).
        if ignored is None and n_cand - (1 if step == 0 else K) < K:
            ignored = torch.zeros(n, K, dtype=torch.bool, device=device)
        top_scores, top_idx = cand.view(n, K * V).topk(n_cand, dim=1)           # (n, k)
        # A NaN/inf logit makes its row's log-probabilities NaN, which topk ranks first: checking the (n, k)
        # candidates finds any. Unchecked, no hypothesis ever ends and the sentence gets none.
        nan = top_scores.isnan().any(dim=1)
        if bool(nan.any()):
            bad = [sent[i] for i in nan.nonzero().flatten().tolist()]
            raise FloatingPointError(f"the model produced NaN/inf logits at step {step} for sentence(s) {bad} "
                                     "(a diverged model or a non-finite weight): no hypothesis can be scored")
        top_tok = top_idx % V
        top_rows = top_idx // V + torch.arange(n, device=device)[:, None] * K   # (n, k) row in [0, N)
        # fairseq's eos_mask: EOS with a finite score; an ignored slot among the first K neither ends nor goes on.
        ended = top_tok.eq(eos) & top_scores.isfinite()                          # (n, k)
        if ignored is not None:
            ended[:, :K] &= ~ignored

        fin_i, fin_j = ended[:, :K].nonzero(as_tuple=True)
        if fin_i.numel() > 0:
            fin_rows = top_rows[fin_i, fin_j]
            _finalize(finalized, [sent[i] for i in fin_i.tolist()], top_scores[fin_i, fin_j].tolist(), K, step,
                      len_penalty, eos, tokens, pos_scores, lprobs, fin_rows, attn_hist, attn, src_tokens, pad)
        done = [len(finalized[s]) >= K or step >= max_lens_host[s] for s in sent]
        if all(done):
            break

        # The best K candidates of each sentence that neither ended nor sit in an ignored slot. The k candidates
        # hold at most one ended EOS per beam, so K others exist except where k = K at step 0 (beam >= V - 1)
        # and EOS ended there. fairseq then fills the last slots with ended candidates anyway, so an ended
        # hypothesis goes on, and marks those slots ignored for the next step (cands_to_ignore): the candidate
        # at that position then neither ends nor continues, which can leave too few again. Reproduced here.
        if ignored is not None:
            ended[:, :K] |= ignored
        key = torch.arange(n_cand, device=device).expand(n, n_cand) + ended * (2 * K)
        key, sel = key.topk(K, dim=1, largest=False)                             # (n, K), best first
        new_rows, new_tok, new_cum = top_rows.gather(1, sel), top_tok.gather(1, sel), top_scores.gather(1, sel)
        if ignored is not None:
            ignored = key >= 2 * K
        same_sources = not any(done)
        if not same_sources:
            keep = torch.tensor([not d for d in done], device=device)
            new_rows, new_tok, new_cum = new_rows[keep], new_tok[keep], new_cum[keep]
            ignored = None if ignored is None else ignored[keep]
            sent = [s for s, d in zip(sent, done) if not d]
        order = new_rows.reshape(-1)                                            # (N',) rows kept, reordered
        new_tok, cum = new_tok.reshape(-1), new_cum.reshape(-1)
        if not (K == 1 and same_sources):                                       # greedy, nobody done: identity
            stepper.reorder(order, same_sources)
            tokens, row_max, row_min = tokens[order], row_max[order], row_min[order]
            pos_scores = None if pos_scores is None else pos_scores[order]
            attn_hist = None if attn_hist is None else attn_hist[order]
            attn = None if attn is None else attn[order]
        new_pos = lprobs[order, new_tok][:, None]                               # (N', 1) the chosen log-probs
        tokens = torch.cat([tokens, new_tok[:, None]], dim=1)
        pos_scores = new_pos if pos_scores is None else torch.cat([pos_scores, new_pos], dim=1)
        if need_attention:
            attn = attn[:, None]                                                # (N', 1, nL, Ts)
            attn_hist = attn if attn_hist is None else torch.cat([attn_hist, attn], dim=1)
    return [sorted(h, key=lambda hyp: -hyp.score)[:nbest] for h in finalized]


def _finalize(finalized, sents, scores, K, step, len_penalty, eos, tokens, pos_scores, lprobs, rows, attn_hist,
              attn, src_tokens, pad):
    """Add the hypotheses ending with EOS at `step` from rows `rows` (m,) to their sentences' lists (<= K each)."""
    m = rows.shape[0]
    eos_col = torch.full((m, 1), eos, dtype=torch.long, device=rows.device)
    toks = torch.cat([tokens.index_select(0, rows)[:, 1:], eos_col], dim=1)    # (m, step + 1)
    last = lprobs[rows, eos][:, None]
    pos = last if pos_scores is None else torch.cat([pos_scores.index_select(0, rows), last], dim=1)
    att = None
    if attn is not None:
        att = attn.index_select(0, rows)[:, None]                               # (m, 1, nL, Ts)
        att = att if attn_hist is None else torch.cat([attn_hist.index_select(0, rows), att], dim=1)
        att = att.transpose(1, 2)                                               # (m, nL, L, Ts)
    norm = float(step + 1) ** len_penalty
    for i, (s, score) in enumerate(zip(sents, scores)):
        if len(finalized[s]) >= K:
            continue
        a = None if att is None else att[i][:, :, src_tokens[s].ne(pad)]      # (nL, L, S) real source only
        finalized[s].append(Hypothesis(toks[i], score / norm, pos[i], a))
