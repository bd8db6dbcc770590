"""The paper's Table 3, replicated: generation speed of an fconv_wmt_en_fr-sized model (random weights).

    python -m bench.bench_table3 [--device cuda] [--sentences 6003] [--beams 5 1] [--batch 128] [--int8]
                                 [--threads N] [--out PATH]

Gehring et al. 2017, Table 3: translating WMT'14 En-Fr newstest2012+2013 (6003 sentences) with beam 5 took 256 s
on a GTX-1080ti and 406 s on an M40 GPU (142 s and 221 s with beam 1). Here: the fconv_wmt_en_fr preset
(15 + 15 layers up to 4096 channels, 176 M parameters at a 40k vocabulary), random weights, batches of up to 128
sentences sorted by length, bf16 on GPU; on CPU fp32, or int8 weights with --int8 (convs2s.quantize), and the
rate per CPU thread beside the total (the paper's CPU row is per core).

Length profile (an ASSUMPTION, not measured on the test sets, which this project does not have): source lengths in
BPE tokens, EOS included, from a log-normal with median 27 and sigma 0.5, clipped to [3, 150] (newstest sentences
average roughly 22-25 words and a 40k joint BPE splits about 1.2 subwords per word); target length = source length
times N(1.15, 0.10) (French runs longer than English). Random weights never stop on their own, so each hypothesis is
forced to its sentence's drawn target length (EOS banned before it, forced at it), so the work matches a real
translation of that length. The paper's figures are printed beside ours for orientation only: different hardware,
software and weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

try:
    from . import common
    from .bench_generate import decode_all, make_batches
except ImportError:
    import common  # type: ignore
    from bench_generate import decode_all, make_batches  # type: ignore

from convs2s.model import ConvS2S

PAPER_SECONDS = {5: {"GTX-1080ti": 256, "M40": 406}, 1: {"GTX-1080ti": 142, "M40": 221}}
VOCAB = 40000


def newstest_like_lengths(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) source and target lengths in tokens, EOS included (the assumed profile of the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.exp(torch.randn(n, generator=g) * 0.5 + torch.log(torch.tensor(27.0))).round().clamp(3, 150).long()
    tgt = (src * (torch.randn(n, generator=g) * 0.10 + 1.15)).round().clamp(min=2).long()
    return src, tgt


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sentences", type=int, default=6003)
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--batch", type=int, default=128, help="sentences per batch (the paper's setting)")
    ap.add_argument("--preset", default="fconv_wmt_en_fr")
    ap.add_argument("--quick", action="store_true", help="64 sentences of the tiny preset (a dry run)")
    ap.add_argument("--int8", action="store_true", help="int8 weights (CPU only; convs2s.quantize)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sentences, args.preset = min(args.sentences, 64), "tiny"
    torch.manual_seed(0)
    vocab = 512 if args.quick else VOCAB
    model = ConvS2S.from_preset(args.preset, vocab, vocab).to(device).eval()
    if args.int8:
        from convs2s.quantize import quantize_for_inference
        model = quantize_for_inference(model, inplace=True)
    src_len, tgt_len = newstest_like_lengths(args.sentences)
    if args.quick:
        src_len, tgt_len = src_len.clamp(max=100), tgt_len.clamp(max=100)
    batches = make_batches(src_len, tgt_len, vocab, args.batch, device)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    rows = []
    with torch.inference_mode(), autocast():
        decode_all(model, batches[:1], 1, True)                       # warm-up: lazy init, kernel compilation
        for beam in args.beams:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = decode_all(model, batches, beam, True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            threads = torch.get_num_threads() if device.type == "cpu" else None
            rows.append({"op": "table3", "preset": args.preset,
                         "impl": f"beam{beam}-incremental" + ("-int8" if args.int8 else ""), "beam": beam,
                         "sentences": args.sentences, "batch": args.batch, "wall_s": wall,
                         "sentences_per_s": args.sentences / wall, "target_tokens_per_s": tokens / wall,
                         "threads": threads,
                         "sentences_per_s_per_thread": args.sentences / wall / threads if threads else None,
                         "paper_s": PAPER_SECONDS.get(beam), "src_len_mean": statistics.fmean(src_len.tolist()),
                         "tgt_len_mean": statistics.fmean(tgt_len.tolist())})
            print(f"beam {beam}: {args.sentences} sentences in {wall:.1f} s "
                  f"(paper: {PAPER_SECONDS.get(beam)} s on its GPUs)")
    if args.out:
        common.write_json(args.out, "table3", rows, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
