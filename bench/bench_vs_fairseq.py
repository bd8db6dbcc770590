"""convs2s against real fairseq: the same fconv model generating the same sentences with beam 5 (needs fairseq).

    make bench-vs-fairseq                      (builds .venv-fairseq, then runs this with the defaults below)
    python -m bench.bench_vs_fairseq [--arch fconv_wmt_en_de] [--sentences 16] [--batch-sentences 8]
                                     [--threads 1] [--repeats 2] [--quick] [--out PATH]

One fairseq-format checkpoint (bench_fairseq.fairseq_checkpoint: fairseq's keys, layouts and initialisation,
random weights, ASSUMED 40000-symbol dictionaries) is loaded strictly into fairseq's own FConvModel (which checks
that layout) and converted with convs2s.convert.from_fairseq for each convs2s backend usable here. Each then
translates the same batches:
  * fairseq: fairseq.sequence_generator.SequenceGenerator (incremental LinearizedConvolution decoding), beam 5,
    on the model prepared as fairseq-generate prepares it (make_generation_fast_: weight norm removed, BeamableMM);
  * convs2s: convs2s.search.beam_search, beam 5, incremental; with --int8 also the native backend with int8
    weights (convs2s.quantize.quantize_for_inference), whose `agree` then measures int8's drift from fp32.
Random weights never end a sentence, so every batch is forced to one length L (fairseq's min_len = max_len_b = L,
max_len_a = 0, which convs2s's beam_search takes as min_len = max_len = L): L tokens + EOS per hypothesis. The
batches are bench_fairseq's newstest-like sentences sorted by target length, L = the batch's mean target length.
Timing: fp32, one untimed warm-up batch, then the median wall time of --repeats passes over all batches;
process CPU time alongside (the machine may be shared). `agree` is the fraction of sentences whose best
hypothesis is token-for-token fairseq's (the models are equal to rounding, so this should be 1.0 unless a near-tie
flips).
"""

from __future__ import annotations

import argparse
import sys
import types

import torch

try:
    from . import common
    from .bench_fairseq import VOCAB, fairseq_checkpoint, newstest_en_de_lengths, parameter_count
except ImportError:
    import common  # type: ignore
    from bench_fairseq import VOCAB, fairseq_checkpoint, newstest_en_de_lengths, parameter_count  # type: ignore

from convs2s.convert import ARCH_DEFAULTS, from_fairseq
from convs2s.ops import available_backends
from convs2s.quantize import quantize_for_inference
from convs2s.search import beam_search

PAD, EOS = 1, 2


def fairseq_model(ckpt: dict, beam: int):
    """fairseq's FConvModel for the checkpoint, its state loaded strictly (fp32, eval) and prepared for generation
    as fairseq-generate / fairseq-interactive prepare it, and its target dictionary."""
    from fairseq.data import Dictionary
    from fairseq.models.fconv import FConvModel

    def dictionary(size: int):
        d = Dictionary()                                   # <s> <pad> </s> <unk>
        for i in range(size - len(d)):
            d.add_symbol(f"w{i}")
        return d

    sd = ckpt["model"]
    task = types.SimpleNamespace(source_dictionary=dictionary(sd["encoder.embed_tokens.weight"].shape[0]),
                                 target_dictionary=dictionary(sd["decoder.embed_tokens.weight"].shape[0]))
    # fairseq 0.12's fconv allocates exactly max_positions rows for the learned positions; bench_fairseq's
    # checkpoint has the max_positions + padding_idx + 1 rows of older fairseq (from_fairseq reads either).
    args = argparse.Namespace(**{**vars(ckpt["args"]), "encoder_embed_path": None, "decoder_embed_path": None,
                                 "max_source_positions": sd["encoder.embed_positions.weight"].shape[0],
                                 "max_target_positions": sd["decoder.embed_positions.weight"].shape[0]})
    model = FConvModel.build_model(args, task)
    model.load_state_dict(sd, strict=True)
    # What fairseq's prepare_for_inference_ does with generate's defaults (beam `beam`, no alignment printing):
    # weight norm folded away, the attention's bmm replaced by BeamableMM. Without it fairseq recomputes every
    # weight-normed weight at every step and would be timed slower than its users see it.
    model = model.float().eval()              # before: make_generation_fast_ replaces train() with a stub
    model.make_generation_fast_(beamable_mm_beam_size=beam, need_attn=False)
    return model, task.target_dictionary


def make_batches(n: int, batch_sentences: int, vocab: int, seed: int, max_len: int | None):
    """[(src (B, Ts) left-padded ids + EOS, src_lengths (B,), L)] sorted by target length; L forced per batch."""
    src_len, tgt_len = newstest_en_de_lengths(n, seed, max_len)
    order = torch.argsort(tgt_len, stable=True)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for start in range(0, n, batch_sentences):
        idx = order[start:start + batch_sentences]
        lens = src_len[idx]
        src = torch.full((len(idx), int(lens.max())), PAD, dtype=torch.long)
        for row, s in enumerate(lens.tolist()):
            src[row, src.shape[1] - s:-1] = torch.randint(4, vocab, (s - 1,), generator=g)
            src[row, -1] = EOS
        L = max(1, round(float(tgt_len[idx].float().mean())) - 1)         # tokens before EOS
        batches.append((src, lens, L))
    return batches


def run_fairseq(model, tgt_dict, batches, beam):
    from fairseq.sequence_generator import SequenceGenerator
    best = []
    for src, lens, L in batches:
        gen = SequenceGenerator([model], tgt_dict, beam_size=beam, max_len_a=0, max_len_b=L, min_len=L)
        hyps = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lens}})
        best += [h[0]["tokens"].tolist() for h in hyps]
    return best


def run_convs2s(model, batches, beam):
    best = []
    for src, lens, L in batches:
        hyps = beam_search(model, src, lens, beam=beam, max_len=L, min_len=L)
        best += [h[0].tokens.tolist() for h in hyps]
    return best


def timed(fn, batches, repeats: int) -> tuple[dict, list]:
    with torch.no_grad():
        fn(batches[:1])                                     # warm-up
        t = common.timed_runs(lambda: fn(batches), torch.device("cpu"), repeats)
    tokens = sum(src.shape[0] * (L + 1) for src, _, L in batches)
    return {"target_tokens": tokens, "wall_s": t["wall_s"], "wall_s_min": t["wall_s_min"], "cpu_s": t["cpu_s"],
            "target_tokens_per_s": tokens / t["wall_s"]}, t["result"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="fconv_wmt_en_de", choices=list(ARCH_DEFAULTS))
    ap.add_argument("--vocab", type=int, default=VOCAB, help="each dictionary's size (assumed 40000)")
    ap.add_argument("--sentences", type=int, default=16)
    ap.add_argument("--batch-sentences", type=int, default=8)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--width-divisor", type=int, default=1, help="divide every width by this (tests)")
    ap.add_argument("--quick", action="store_true", help="2 sentences of at most 8 tokens, width / 16, vocab 1000")
    ap.add_argument("--int8", action="store_true",
                    help="also convs2s native with int8 weights (convs2s.quantize), a row of its own")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.sentences, args.batch_sentences, args.repeats = 2, 2, 1
        args.width_divisor, args.vocab = max(args.width_divisor, 16), min(args.vocab, 1000)
    torch.set_num_threads(args.threads)
    try:
        import fairseq
    except ImportError:
        sys.exit("bench_vs_fairseq needs fairseq: run it with `make bench-vs-fairseq` (.venv-fairseq)")

    ckpt = fairseq_checkpoint(args.arch, args.vocab, args.vocab, width_divisor=args.width_divisor)
    batches = make_batches(args.sentences, args.batch_sentences, args.vocab, 0, 8 if args.quick else None)
    theirs, tgt_dict = fairseq_model(ckpt, args.beam)
    info = {"op": "generate-vs-fairseq", "arch": args.arch, "params": parameter_count(ckpt), "vocab": args.vocab,
            "sentences": args.sentences, "batch_sentences": args.batch_sentences, "beam": args.beam,
            "dtype": "fp32", "threads": args.threads, "fairseq": fairseq.__version__}
    rows = []
    result, ref_best = timed(lambda b, m=theirs: run_fairseq(m, tgt_dict, b, args.beam), batches, args.repeats)
    rows.append({**info, "impl": "fairseq", **result, "agree": 1.0})
    del theirs
    print(f"fairseq: {result['target_tokens_per_s']:.1f} target tokens/s", file=sys.stderr)
    impls = [(b, False) for b in ("reference", "native")] + ([("native", True)] if args.int8 else [])
    for backend, int8 in impls:
        if available_backends("cpu")[backend] is not None:
            continue
        model = from_fairseq(ckpt, backend=backend)
        if int8:
            model = quantize_for_inference(model, inplace=True)
        result, best = timed(lambda b, m=model: run_convs2s(m, b, args.beam), batches, args.repeats)
        agree = sum(a == b for a, b in zip(best, ref_best)) / len(ref_best)
        rows.append({**info, "impl": f"convs2s-{backend}" + ("-int8" if int8 else ""), **result, "agree": agree,
                     "speedup_vs_fairseq": rows[0]["wall_s"] / result["wall_s"]})
        print(f"{rows[-1]['impl']}: {result['target_tokens_per_s']:.1f} target tokens/s, agree {agree:.2f}",
              file=sys.stderr)
        del model
    common.print_table(rows, ["impl", "target_tokens", "wall_s", "cpu_s", "target_tokens_per_s",
                              "speedup_vs_fairseq", "agree"])
    if args.out:
        common.write_json(args.out, "generate-vs-fairseq", rows, device="cpu", **info)
    return rows


if __name__ == "__main__":
    main()
