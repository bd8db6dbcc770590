"""int8 vs fp32 CPU translation (convs2s.quantize): speed, memory, agreement, and whether bf16 weights would help.

    python -m bench.bench_int8 [--presets fconv_wmt_en_de fconv_wmt_en_fr] [--sentences 8] [--beams 1 5]
                               [--repeats 3] [--threads 1] [--sections matmul generate memory agreement] [--out PATH]

Sections (each prints a table; --out writes them all to one JSON):
  matmul     one decoding step's weight products of a preset (fc1, each layer's flattened conv window, residual
             projection and attention projections, fc2, fc3) at the step's row counts (sentences x beam), timed as
             fp32 F.linear, bf16 F.linear (x and W in bf16), fbgemm int8 (linear_dynamic) and fbgemm fp16 weights
             (linear_dynamic_fp16); the sum over a step's products, median of --repeats interleaved rounds.
  generate   target tokens/s of fp32 and int8 models of the same random weights (bench_table3's protocol: forced
             newstest-like lengths, one batch of --sentences sorted by length), beam 1 and 5, fp32 and int8 runs
             interleaved, medians of --repeats.
  memory     parameter bytes and the process's RSS growth when building the fp32 model, and after converting it
             in place to int8 (a child process per preset, so the measurements do not see each other).
  agreement  fairseq-layout random checkpoints (bench_fairseq.fairseq_checkpoint) converted with from_fairseq: top-1
             agreement of int8 with fp32 logits over teacher-forced target positions, the largest logit difference.

The machine may be shared: runs are interleaved and repeated, and medians reported.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

try:
    from . import common
    from .bench_fairseq import fairseq_checkpoint, newstest_en_de_lengths
    from .bench_generate import decode_all, make_batches
    from .bench_table3 import newstest_like_lengths
except ImportError:
    import common  # type: ignore
    from bench_fairseq import fairseq_checkpoint, newstest_en_de_lengths  # type: ignore
    from bench_generate import decode_all, make_batches  # type: ignore
    from bench_table3 import newstest_like_lengths  # type: ignore

from convs2s.convert import from_fairseq
from convs2s.model import PRESETS, ConvS2S, ConvS2SConfig
from convs2s.nn import GLUConv1d, WNLinear
from convs2s.quantize import Int8Linear, quantize_for_inference, weight_bytes

VOCAB = 40000
LENGTHS = {"fconv_wmt_en_de": newstest_en_de_lengths, "fconv_wmt_en_fr": newstest_like_lengths}
SECTIONS = ("matmul", "generate", "memory", "agreement")


# ---- matmul: a decoding step's products -----------------------------------------------------------------------

def step_products(preset: str, vocab: int = VOCAB) -> list[tuple[int, int]]:
    """(N out, K in) of every weight product of one decoder step of `preset`, repeats kept; convs flattened to
    (2*C_out, k*C_in)."""
    model = ConvS2S.uninitialized(ConvS2SConfig(src_vocab_size=vocab, tgt_vocab_size=vocab, **PRESETS[preset]),
                                  device="meta")
    shapes = []
    for m in model.decoder.modules():
        if isinstance(m, GLUConv1d):
            shapes.append((2 * m.out_channels, m.kernel_size * m.in_channels))
        elif isinstance(m, (WNLinear, torch.nn.Linear)):
            shapes.append((m.out_features, m.in_features))
    return shapes


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_matmul(preset: str, rows: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, int], int] = {}
    for shape in step_products(preset):
        counts[shape] = counts.get(shape, 0) + 1
    totals = {"fp32": 0.0, "bf16": 0.0, "int8": 0.0, "fp16_weights": 0.0}
    for (n, k), count in counts.items():
        w, b = torch.randn(n, k, generator=g) / k ** 0.5, torch.zeros(n)
        x = torch.randn(rows, k, generator=g)
        int8 = Int8Linear(w, b).eval()
        fp16 = torch.ops.quantized.linear_prepack_fp16(w, b)
        wb, bb = w.bfloat16(), b.bfloat16()
        fns = {"fp32": partial(F.linear, x, w, b), "bf16": lambda x=x, wb=wb, bb=bb: F.linear(x.bfloat16(), wb, bb),
               "int8": partial(int8, x), "fp16_weights": partial(torch.ops.quantized.linear_dynamic_fp16, x, fp16)}
        for kind, fn in fns.items():
            totals[kind] += count * _median_ms(fn, repeats)
    row = {"section": "matmul", "preset": preset, "rows": rows, "products": sum(counts.values()),
           **{f"{k}_ms": v for k, v in totals.items()}}
    row.update({f"{k}_speedup": totals["fp32"] / v for k, v in totals.items() if k != "fp32"})
    return row


# ---- generate: int8 vs fp32 tokens/s ---------------------------------------------------------------------------

def bench_generate(preset: str, sentences: int, beams: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    fp32 = ConvS2S.from_preset(preset, VOCAB, VOCAB).eval()
    int8 = quantize_for_inference(fp32)
    src_len, tgt_len = LENGTHS.get(preset, newstest_like_lengths)(sentences)
    batches = make_batches(src_len, tgt_len, VOCAB, sentences, torch.device("cpu"))
    rows = []
    with torch.inference_mode():
        for beam in beams:
            walls = {"fp32": [], "int8": []}
            tokens = {}
            for model in (fp32, int8):                                    # warm-up
                decode_all(model, batches[:1], beam, True)
            for _ in range(repeats):                                      # interleaved
                for name, model in (("fp32", fp32), ("int8", int8)):
                    t0 = time.perf_counter()
                    tokens[name] = decode_all(model, batches, beam, True)
                    walls[name].append(time.perf_counter() - t0)
            assert tokens["fp32"] == tokens["int8"], "forced lengths give both the same number of tokens"
            row = {"section": "generate", "preset": preset, "beam": beam, "sentences": sentences,
                   "target_tokens": tokens["fp32"]}
            for name in walls:
                row[f"{name}_wall_s"] = statistics.median(walls[name])
                row[f"{name}_wall_s_all"] = [round(w, 3) for w in walls[name]]
                row[f"{name}_tokens_per_s"] = tokens[name] / row[f"{name}_wall_s"]
            row["speedup"] = row["fp32_wall_s"] / row["int8_wall_s"]
            rows.append(row)
            print(f"{preset} beam {beam}: fp32 {row['fp32_tokens_per_s']:.1f} tok/s, int8 "
                  f"{row['int8_tokens_per_s']:.1f} tok/s, x{row['speedup']:.2f}", flush=True)
    return rows


# ---- memory: a child process per preset ------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_rss_bytes() -> int:
    """RSS after returning the allocator's free memory to the system (glibc keeps freed blocks of up to 32 MiB on
    its heap, which would count the conversion's temporaries)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss_bytes()


def _memory_child(preset: str) -> dict:
    with torch.inference_mode():          # fbgemm's code and buffers are loaded by the first call, not per model
        Int8Linear(torch.randn(64, 64), None).eval()(torch.randn(8, 64))
    rss0 = _live_rss_bytes()
    model = ConvS2S.from_preset(preset, VOCAB, VOCAB).eval()
    rss_fp32 = _live_rss_bytes()
    fp32_bytes = weight_bytes(model)
    quantize_for_inference(model, inplace=True)
    rss_int8 = _live_rss_bytes()
    return {"section": "memory", "preset": preset, "fp32_param_bytes": fp32_bytes,
            "int8_weight_bytes": weight_bytes(model), "fp32_rss_delta_bytes": rss_fp32 - rss0,
            "int8_rss_delta_bytes": rss_int8 - rss0}


def bench_memory(preset: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_int8", "--memory-child", preset], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["int8_over_fp32_rss"] = row["int8_rss_delta_bytes"] / row["fp32_rss_delta_bytes"]
    return row


# ---- agreement on converted fairseq-layout models ---------------------------------------------------------------

def bench_agreement(preset: str, sentences: int) -> dict:
    model = from_fairseq(fairseq_checkpoint(preset, VOCAB, VOCAB), backend="reference").eval()
    int8 = quantize_for_inference(model)
    src_len, tgt_len = LENGTHS.get(preset, newstest_like_lengths)(sentences, seed=1)
    g = torch.Generator().manual_seed(1)
    pad, eos = model.config.pad_idx, model.config.eos_idx
    src = torch.randint(4, VOCAB, (sentences, int(src_len.max())), generator=g)
    src = src.masked_fill(torch.arange(src.shape[1])[None] >= src_len[:, None], pad)
    src[torch.arange(sentences), src_len - 1] = eos
    prev = torch.randint(4, VOCAB, (sentences, int(tgt_len.max())), generator=g)
    real = torch.arange(prev.shape[1])[None] < tgt_len[:, None]                 # (B, Tt)
    prev = prev.masked_fill(~real, pad)
    prev[:, 0] = eos                                                            # fairseq's decoder starts at EOS
    with torch.inference_mode():
        a, b = model(src, None, prev)[real], int8(src, None, prev)[real]        # (positions, V)
    diff = (a - b).abs()
    return {"section": "agreement", "preset": preset, "layout": "fairseq (from_fairseq)", "positions": int(real.sum()),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_logit": a.abs().max().item(), "logit_std": a.std().item()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["fconv_wmt_en_de", "fconv_wmt_en_fr"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--sentences", type=int, default=8, help="sentences decoded in one batch (generate)")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--matmul-rows", type=int, nargs="+", default=[8, 40], help="rows of a step (sentences x beam)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child)))
        return []
    rows = []
    for preset in args.presets:
        if "matmul" in args.sections:
            for m in args.matmul_rows:
                rows.append(bench_matmul(preset, m, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
        if "memory" in args.sections:
            rows.append(bench_memory(preset))
            print(json.dumps(rows[-1]), flush=True)
        if "agreement" in args.sections:
            rows.append(bench_agreement(preset, args.sentences))
            print(json.dumps(rows[-1]), flush=True)
        if "generate" in args.sections:
            rows += bench_generate(preset, args.sentences, args.beams, args.repeats)
    if args.out:
        common.write_json(args.out, "int8", rows, command="python -m bench.bench_int8 " + " ".join(
            argv if argv is not None else sys.argv[1:]), threads=args.threads)
    return rows


if __name__ == "__main__":
    main()
