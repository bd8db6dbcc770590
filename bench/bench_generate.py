"""Generation speed: sentences/s of greedy and beam search, incremental vs full-prefix recomputation.

    python -m bench.bench_generate [--device cpu|cuda] [--preset multi30k] [--sentences 1000] [--quick]
                                   [--impls greedy-incremental greedy-full beam5-incremental beam5-full] [--out PATH]

Inputs are test_2016_flickr-like: 1000 sentences whose source lengths (EOS included) are drawn from N(14.65, 4.92)
clipped to [6, 36] and target lengths from the source length times N(1.016, 0.159) — the statistics of
test_2016_flickr.{de,en} under an 8000-piece BPE model trained on the training split (measured with
convs2s.tokenizer). Token ids are random and so are the weights: a random model does not emit EOS when a real one
would, so every hypothesis is FORCED to its sentence's target length (min_len = max_len = target length - 1: EOS
banned before, forced at that step). The search does all its real work (beam bookkeeping, reordering, sentences
leaving the batch as they finish), only the lengths are set.

Timing: one untimed pass first (lazy init, Triton compilation), then the median wall time of `--repeats` passes
(CUDA synchronised). Also, for the first batch: what Decoder.prepare_step (weight norm + cast, paid once per
beam_search call) costs against one Decoder.step of its rows (greedy and beam 5); and a micro benchmark of one
decoder layer's step (multi30k widths) per backend: glu_conv_step, the causal glu_conv run on the k-wide window
keeping its last step, the k = 1 glu_conv on the flattened window, and conv_attention with Tt = 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from functools import partial

import torch

try:
    from . import common
except ImportError:
    import common  # type: ignore

from convs2s.model import ConvS2S
from convs2s.ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    conv_attention,
    glu_conv,
    glu_conv_step,
    resolve_backend,
)
from convs2s.search import beam_search

IMPLS = ("greedy-incremental", "greedy-full", "beam5-incremental", "beam5-full")
PAD, EOS = 1, 2


def flickr_like_lengths(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) source and (n,) target lengths in tokens, EOS included (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    src = (torch.randn(n, generator=g) * 4.92 + 14.65).round().clamp(6, 36).long()
    ratio = torch.randn(n, generator=g) * 0.159 + 1.016
    tgt = (src * ratio).round().clamp(min=2).long()
    return src, tgt


def make_batches(src_len, tgt_len, vocab: int, batch_sentences: int, device, seed: int = 0):
    """[(src_tokens (B, Ts) right-padded ids + EOS, forced (B,) tokens before EOS)], sorted by source length."""
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(src_len, stable=True)
    batches = []
    for start in range(0, len(order), batch_sentences):
        idx = order[start:start + batch_sentences]
        s = src_len[idx]
        src = torch.randint(4, vocab, (len(idx), int(s.max())), generator=g)
        src = src.masked_fill(torch.arange(src.shape[1])[None] >= s[:, None], PAD)
        src[torch.arange(len(idx)), s - 1] = EOS
        batches.append((src.to(device), (tgt_len[idx] - 1).to(device)))
    return batches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_all(model, batches, beam: int, incremental: bool, step_weights=None) -> int:
    """Decode every batch; returns the number of target tokens of the best hypotheses (EOS included).
    step_weights: the decoder's prepared step weights, shared by every batch as one translate call shares them."""
    tokens = 0
    for src, forced in batches:
        hyps = beam_search(model, src, beam=beam, max_len=forced, min_len=forced, incremental=incremental,
                           step_weights=step_weights if incremental else None)
        tokens += sum(len(h[0].tokens) for h in hyps)
    return tokens


def bench_decoding(model, batches, impl: str, device, autocast, repeats: int) -> dict:
    beam = 1 if impl.startswith("greedy") else int(impl.split("-")[0][4:])
    incremental = impl.endswith("incremental")
    with autocast():
        # Prepared once, untimed, as a translate call prepares them once for all its batches (bench_step times
        # preparing against a step).
        weights = model.decoder.prepare_step(device) if incremental else None
        decode_all(model, batches[:1], beam, incremental, weights)   # warm-up: lazy init, kernel compilation
        t = common.timed_runs(lambda: decode_all(model, batches, beam, incremental, weights), device, repeats)
    n = sum(src.shape[0] for src, _ in batches)
    wall, tokens = t["wall_s"], t["result"]
    return {"impl": impl, "beam": beam, "sentences": n, "wall_s": wall, "wall_s_min": t["wall_s_min"],
            "cpu_s": t["cpu_s"], "sentences_per_s": n / wall, "target_tokens_per_s": tokens / wall}


@torch.no_grad()
def bench_encoder(model, batches, device, autocast) -> dict:
    """Wall and process CPU time of the encoder alone over `batches` (after one warm-up batch)."""
    with autocast():
        model.encode(batches[0][0])
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for src, _ in batches:
            model.encode(src)
        _sync(device)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def step_micro(device, dtype, rows: int, backends) -> list[dict]:
    """One multi30k decoder layer's step (C_in = C_out = 512, k = 3, E = 256, Ts = 16) per backend."""
    B, k, C, E, Ts = rows, 3, 512, 256, 16
    window = torch.randn(B, k, C, device=device, dtype=dtype)
    weight = torch.randn(k, C, 2 * C, device=device, dtype=dtype) / math.sqrt(k * C)
    bias = torch.zeros(2 * C, device=device, dtype=dtype)
    x1 = torch.randn(B, 1, C, device=device, dtype=dtype)
    emb = torch.randn(B, 1, E, device=device, dtype=dtype)
    keys, values = (torch.randn(B, Ts, E, device=device, dtype=dtype) for _ in range(2))
    mask = torch.arange(Ts, device=device)[None] >= torch.randint(Ts // 2, Ts + 1, (B, 1), device=device)
    w_in = torch.randn(E, C, device=device, dtype=dtype) / math.sqrt(C)
    w_out = torch.randn(C, E, device=device, dtype=dtype) / math.sqrt(E)
    b_in, b_out = torch.zeros(E, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype)
    flat_x, flat_w = window.view(B, 1, k * C), weight.view(1, k * C, 2 * C)
    out = []
    shape = f"rows={B} C={C} k={k} E={E} Ts={Ts}"
    conv_state = window[:, 1:].contiguous()
    for backend in backends:
        cases = {
            ("glu_conv_step", "op"): partial(glu_conv_step, x1[:, 0], conv_state, weight, bias, backend=backend),
            ("glu_conv_step", "window-causal-last"): lambda b=backend: glu_conv(window, weight, bias, causal=True,
                                                                                backend=b)[:, -1:],
            ("glu_conv_step", "flattened-k1"): partial(glu_conv, flat_x, flat_w, bias, causal=True, backend=backend),
            ("conv_attention_step", "Tt1"): partial(conv_attention, x1, emb, keys, values, mask, w_in, b_in, w_out,
                                                    b_out, backend=backend),
        }
        for (op, impl), fn in cases.items():
            t = common.timeit(fn, device, min_run_time=0.2)
            out.append({"op": op, "shape": shape, "impl": impl, "backend": backend,
                        "dtype": str(dtype).replace("torch.", ""), **t})
    return out


def step_backends(device) -> list[str]:
    """Backends with the decoding ops for `device`; Triton on CPU only runs in the (far too slow) interpreter:
    skipped."""
    out = []
    for b, reason in available_backends(device).items():
        if reason is not None or (b == "triton" and device.type != "cuda"):
            continue
        try:
            for op in ("glu_conv", "glu_conv_step", "conv_attention"):
                resolve_backend(op, b, device)
        except BackendUnavailableError:
            continue
        out.append(b)
    return out


@torch.no_grad()
def prepare_vs_step(model, src, device, autocast) -> list[dict]:
    """ms of Decoder.prepare_step and of one Decoder.step (the 10th: past the first layers' zero windows) for the
    rows of `src` (B, Ts): greedy (B rows) and beam 5 (5B rows)."""
    rows = []
    with autocast():
        weights = model.decoder.prepare_step(device)
        t = common.timeit(lambda: model.decoder.prepare_step(device), device, min_run_time=0.5)
        rows.append({"op": "prepare_step", "impl": "weight-norm+cast", "shape": f"{len(model.decoder.layers)} layers",
                     **t})
        enc = model.encode(src)
        for beam in (1, 5):
            rep = torch.arange(src.shape[0], device=device).repeat_interleave(beam)
            state = model.decoder.init_state(type(enc)(*(x.index_select(0, rep) for x in enc)), weights)
            tokens = torch.full((rep.shape[0],), model.config.bos_idx, device=device)
            for _ in range(9):
                model.decoder.step(tokens, state)

            def one_step(state=state, tokens=tokens):  # the same position each time; the windows' values do not matter
                state.step = 9
                return model.decoder.step(tokens, state)
            t = common.timeit(one_step, device, min_run_time=0.5)
            rows.append({"op": "decoder_step", "impl": f"beam{beam}", "shape": f"{rep.shape[0]} rows", **t})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="multi30k")
    ap.add_argument("--sentences", type=int, default=None,
                    help="sentences decoded by the incremental impls (default 1000; CPU --quick 8)")
    ap.add_argument("--full-sentences", type=int, default=None,
                    help="sentences for the full-recompute impls (default: CUDA 200, CPU 64)")
    ap.add_argument("--batch-sentences", type=int, default=None, help="sentences per batch (default CUDA 1000, CPU 64)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--vocab", type=int, default=8000, help="source and target vocabulary size")
    ap.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                    help="bf16 = autocast, as convs2s.generate does on CUDA (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default CUDA 3, CPU 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default torch's); 1 on a shared machine, where process CPU time "
                         "(cpu_s) is then the robust measure")
    ap.add_argument("--no-step-micro", dest="step_micro", action="store_false")
    ap.add_argument("--quick", action="store_true",
                    help="a dry run: few sentences on CPU, full recompute on 100 on CUDA")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    sentences = args.sentences or (1000 if cuda else (8 if args.quick else 1000))
    # Full recomputation is O(T^2): a subset keeps the whole run inside device_check's time cap on a GPU.
    full_sentences = min(sentences, args.full_sentences or ((100 if args.quick else 200) if cuda else
                                                            (4 if args.quick else 64)))
    batch_sentences = args.batch_sentences or (1000 if cuda else 64)
    repeats = args.repeats or (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ConvS2S.from_preset(args.preset, args.vocab, args.vocab, backend=args.backend).to(device).eval()
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16"
                else contextlib.nullcontext)
    src_len, tgt_len = flickr_like_lengths(sentences)
    resolved = "/".join(resolve_backend(op, args.backend, device)
                        for op in ("glu_conv", "glu_conv_step", "conv_attention"))
    rows = []
    for impl in args.impls:
        n = sentences if impl.endswith("incremental") else full_sentences
        batches = make_batches(src_len[:n], tgt_len[:n], args.vocab, batch_sentences, device)
        r = bench_decoding(model, batches, impl, device, autocast, repeats)
        r.update(op="generate", preset=args.preset, backend=resolved, dtype=dtype, batch_sentences=batch_sentences,
                 threads=torch.get_num_threads(),
                 shape=f"{n} flickr-like sentences, src {src_len[:n].float().mean():.1f} tgt "
                       f"{tgt_len[:n].float().mean():.1f} tokens (forced), vocab {args.vocab}")
        rows.append(r)
        print(f"{impl:>20}: {r['sentences_per_s']:8.1f} sentences/s  ({n} sentences in {r['wall_s']:.2f} s)")
    # Incremental vs full on the same sentences: rerun the incremental impl on the full-recompute subset.
    for search in ("greedy", "beam5"):
        full = next((r for r in rows if r["impl"] == f"{search}-full"), None)
        if full is None or f"{search}-incremental" not in args.impls:
            continue
        batches = make_batches(src_len[:full["sentences"]], tgt_len[:full["sentences"]], args.vocab,
                               batch_sentences, device)
        same = bench_decoding(model, batches, f"{search}-incremental", device, autocast, repeats)
        enc = bench_encoder(model, batches, device, autocast)
        full["speedup_incremental_vs_full"] = full["wall_s"] / same["wall_s"]
        full["cpu_speedup_incremental_vs_full"] = full["cpu_s"] / same["cpu_s"]
        # Both pay the same encoder pass; without it, the decoders' own ratio (process CPU time).
        full["encoder_cpu_s"] = enc["cpu_s"]
        full["cpu_speedup_decoder_only"] = (full["cpu_s"] - enc["cpu_s"]) / max(same["cpu_s"] - enc["cpu_s"], 1e-9)
        print(f"{search}: incremental {same['wall_s']:.2f} s vs full recompute {full['wall_s']:.2f} s on the same "
              f"{full['sentences']} sentences: {full['speedup_incremental_vs_full']:.1f}x wall, "
              f"{full['cpu_speedup_incremental_vs_full']:.1f}x process CPU time "
              f"({full['cpu_speedup_decoder_only']:.1f}x without the {enc['cpu_s']:.2f} s encoder pass both pay)")
    if args.step_micro:
        first = make_batches(src_len[:batch_sentences], tgt_len[:batch_sentences], args.vocab, batch_sentences,
                             device)[0][0]
        rows += prepare_vs_step(model, first, device, autocast)
        micro_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        rows += step_micro(device, micro_dtype, 5000 if cuda else 64, step_backends(device))
    common.print_table(rows, ["op", "impl", "backend", "sentences", "wall_s", "cpu_s", "sentences_per_s",
                              "speedup_incremental_vs_full", "cpu_speedup_incremental_vs_full",
                              "cpu_speedup_decoder_only",
                              "ms", "ms_p20", "ms_p80"])
    if args.out:
        common.write_json(args.out, "generate", rows, quick=args.quick, preset=args.preset, dtype=dtype,
                          forced_lengths=True)
    return rows


if __name__ == "__main__":
    main()
