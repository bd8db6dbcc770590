"""Generation speed of a converted fairseq fconv_wmt_en_de model (random weights), beam 5, per backend.

    python -m bench.bench_fairseq [--device cpu|cuda] [--arch fconv_wmt_en_de] [--src-vocab 40000] [--tgt-vocab 40000]
                                  [--sentences N] [--batch-sentences N] [--beam 5] [--backends reference native triton]
                                  [--dtype fp32 bf16] [--max-len N] [--width-divisor 1] [--quick] [--out PATH]

What runs: `fairseq_checkpoint` builds what fairseq saves for the architecture — {"args": argparse.Namespace,
"model": state dict} with fairseq's key names and layouts (weight-normed Linear g (out, 1); ConvTBC v (k, C_in,
2*C_out) with g (1, 1, 2*C_out); positions tables of max_positions + padding_idx + 1 rows, the padding row zero
-- older fairseq's size; fairseq 0.12's fconv allocates max_positions rows, and from_fairseq reads either;
decoder.version) and fairseq's initialisation (a freshly built fairseq model, seeded) — then
`convs2s.convert.from_fairseq(ckpt, backend=b)` converts it for every backend usable on the device (reference
always; native when the extension is built; triton on CUDA only: on CPU it would be the interpreter), and each
converted model translates the same sentences with beam 5, incremental decoding (convs2s.search.beam_search).

Assumptions (stated, not measured: this project has neither the released model nor newstest2014):
  * vocabularies: 40000 symbols each, source (En) and target (De). fairseq's recipe for this model
    (examples/translation/prepare-wmt14en2de.sh --icml17) learns a joint BPE with BPE_TOKENS=40000 and builds
    separate dictionaries; the released wmt14.en-de.fconv-py dictionaries are of about that size, but their exact
    counts were not found in a public source, so 40000 is an assumption (--src-vocab / --tgt-vocab change it).
  * source lengths in BPE tokens, EOS included: log-normal with median 25 and sigma 0.45 (mean 27.7), clipped to
    [3, 150] — newstest2014 En-De sentences average roughly 25-30 BPE tokens; target (De) length = source length
    times N(1.05, 0.12), at least 2 (mean 29.0). One public anchor: a fairseq-lua user's generation log on the
    2737-sentence newstest2014 En-De (facebookresearch/fairseq-lua issue #116) reads "Translated 2737 sentences
    (74534 tokens)", 27.2 generated German tokens per sentence under that user's BPE. Token ids are uniform over
    the non-special symbols.
  * forced target lengths: random weights never emit EOS when a trained model would, so every hypothesis is forced
    to its sentence's target length (min_len = max_len = target length - 1: EOS banned before, forced at that
    step), as in bench_generate: the search does its real work (beam bookkeeping, reordering, finished sentences
    leaving the batch), only the lengths are set.
  * batches of --batch-sentences sentences sorted by source length (CUDA: 128, the paper's Table 3 setting).

Reported per (backend, dtype): `target_tokens` = tokens of the BEST hypothesis of each sentence, EOS included
(= the sum of the forced target lengths; the search scores beam times as many), `target_tokens_per_s`, `wall_s`
(median of --repeats timed passes after one untimed warm-up batch, CUDA synchronised), `cpu_s` (process CPU time),
`sentences_per_s`, `peak_mem_mib` on CUDA (peak allocated during the timed passes: the one converted model
resident, its weights and the decoder's cached normalised weights included),
`speedup_vs_reference` (reference wall / this wall, same dtype), `params` (the fairseq checkpoint's parameter
count, g and v both counted as fairseq does) and `convert_s` (from_fairseq's time). dtype fp32, and on CUDA also
bf16 autocast (as convs2s.generate does on CUDA).

--quick: 3 sentences of at most 12 tokens on the full-size model (a dry run); --width-divisor D divides every
channel and embedding width by D (tests convert every architecture at reduced width this way).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch

try:
    from . import common
    from .bench_generate import decode_all, make_batches, step_backends
except ImportError:
    import common  # type: ignore
    from bench_generate import decode_all, make_batches, step_backends  # type: ignore

from convs2s.convert import ARCH_DEFAULTS, from_fairseq, parse_layer_string

PAD = 1                       # fairseq Dictionary's padding_idx (also the positions table's)
VOCAB = 40000                 # assumed size of each wmt14 en-de dictionary (module docstring)
MAX_POSITIONS = 1024          # fairseq's --max-source-positions / --max-target-positions defaults for fconv


# ---- the fairseq-format checkpoint ----------------------------------------------------------------------------

def _scaled_layers(text: str, divisor: int) -> str:
    """A fairseq layer string with every channel count divided by `divisor`, written back in fairseq's run-length
    form ("[(32, 3)] * 9 + [(64, 3)] * 4 + ...")."""
    if divisor == 1:
        return text
    runs: list[list] = []
    for spec in parse_layer_string(text):
        if spec[0] % divisor:
            raise ValueError(f"width divisor {divisor} does not divide the {spec[0]} channels of layer {spec}")
        spec = (spec[0] // divisor,) + tuple(spec[1:])
        if runs and runs[-1][0] == spec:
            runs[-1][1] += 1
        else:
            runs.append([spec, 1])
    return " + ".join(f"[{spec}] * {n}" for spec, n in runs)


def fairseq_args(arch: str, width_divisor: int = 1, max_positions: int = MAX_POSITIONS) -> argparse.Namespace:
    """The model fields of the `args` fairseq saves for `arch` (its architecture defaults, written out as fairseq's
    base_architecture does), widths divided by `width_divisor`."""
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown fairseq architecture {arch!r}; choose one of {', '.join(ARCH_DEFAULTS)}")
    d = ARCH_DEFAULTS[arch]
    dims = {}
    for key in ("encoder_embed_dim", "decoder_embed_dim", "decoder_out_embed_dim"):
        if d[key] % width_divisor:
            raise ValueError(f"width divisor {width_divisor} does not divide {key} = {d[key]}")
        dims[key] = d[key] // width_divisor
    return argparse.Namespace(
        arch=arch, task="translation", source_lang="en", target_lang="de", dropout=d["dropout"],
        encoder_layers=_scaled_layers(d["encoder_layers"], width_divisor),
        decoder_layers=_scaled_layers(d["decoder_layers"], width_divisor),
        decoder_attention=d["decoder_attention"], share_input_output_embed=d["share_input_output_embed"],
        normalization_constant=d["normalization_constant"], max_source_positions=max_positions,
        max_target_positions=max_positions, **dims)


def fairseq_checkpoint(arch: str = "fconv_wmt_en_de", src_vocab: int = VOCAB, tgt_vocab: int = VOCAB, *,
                       width_divisor: int = 1, max_positions: int = MAX_POSITIONS, seed: int = 0) -> dict:
    """{"args": Namespace, "model": state dict} as fairseq saves a freshly initialised fconv model (fp32).

    fairseq's fconv init: embeddings (tokens and positions) N(0, 0.1) with the padding row zero; weight-normed
    Linear v ~ N(0, sqrt((1 - dropout) / in)) for fc1 / fc3 (dropout before them), N(0, sqrt(1 / in)) otherwise;
    weight-normed ConvTBC v ~ N(0, sqrt(4 (1 - dropout) / (k C_in))); biases 0; g = |v| (so the weight is v).
    """
    args = fairseq_args(arch, width_divisor, max_positions)
    if args.share_input_output_embed:
        raise ValueError(f"{arch} ties the output embedding (share_input_output_embed): not generated here")
    attention = parse_layer_string(args.decoder_attention)
    g = torch.Generator().manual_seed(seed)
    p = args.dropout
    sd: dict[str, torch.Tensor] = {}

    def embedding(key, rows, dim):
        w = torch.randn(rows, dim, generator=g) * 0.1
        w[PAD] = 0.0
        sd[key] = w

    def linear(prefix, n_in, n_out, dropout=0.0):
        v = torch.randn(n_out, n_in, generator=g) * math.sqrt((1.0 - dropout) / n_in)
        sd[prefix + "weight_g"] = v.pow(2).sum(dim=1, keepdim=True).sqrt()          # (out, 1): weight_norm dim=0
        sd[prefix + "weight_v"] = v
        sd[prefix + "bias"] = torch.zeros(n_out)

    def conv_tbc(prefix, k, c_in, c_out):
        v = torch.randn(k, c_in, 2 * c_out, generator=g) * math.sqrt(4.0 * (1.0 - p) / (k * c_in))
        sd[prefix + "weight_g"] = v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()    # (1, 1, 2C): weight_norm dim=2
        sd[prefix + "weight_v"] = v
        sd[prefix + "bias"] = torch.zeros(2 * c_out)

    for side, vocab in (("encoder", src_vocab), ("decoder", tgt_vocab)):
        E = getattr(args, f"{side}_embed_dim")
        layers = [tuple(s) + (1,) if len(s) == 2 else tuple(s)           # (channels, k, residual distance)
                  for s in parse_layer_string(getattr(args, f"{side}_layers"))]
        flags = [attention] * len(layers) if isinstance(attention, bool) else list(attention)
        embedding(f"{side}.embed_tokens.weight", vocab, E)
        embedding(f"{side}.embed_positions.weight", max_positions + PAD + 1, E)
        linear(f"{side}.fc1.", E, layers[0][0], dropout=p)
        widths = [layers[0][0]]
        for i, (c, k, r) in enumerate(layers):
            res_dim = c if r == 0 else widths[-r]
            if res_dim != c:
                linear(f"{side}.projections.{i}.", res_dim, c)
            conv_tbc(f"{side}.convolutions.{i}.", k, widths[-1], c)
            if side == "decoder" and flags[i]:
                linear(f"decoder.attention.{i}.in_projection.", c, E)
                linear(f"decoder.attention.{i}.out_projection.", E, c)
            widths.append(c)
        if side == "encoder":
            linear("encoder.fc2.", widths[-1], E)
        else:
            linear("decoder.fc2.", widths[-1], args.decoder_out_embed_dim)
            linear("decoder.fc3.", args.decoder_out_embed_dim, vocab, dropout=p)
    sd["decoder.version"] = torch.tensor([2.0])     # FConvDecoder's buffer: 2 = weight norm over dim 2
    return {"args": args, "model": sd}


def parameter_count(ckpt: dict) -> int:
    """Parameters of the fairseq model (weight_g and weight_v both counted, buffers not)."""
    return sum(t.numel() for k, t in ckpt["model"].items() if not k.endswith(".version"))


# ---- the sentences ------------------------------------------------------------------------------------------

def newstest_en_de_lengths(n: int, seed: int = 0, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) source and target lengths in BPE tokens, EOS included (the assumed profile of the module docstring),
    both clipped to `max_len` when given."""
    g = torch.Generator().manual_seed(seed)
    src = torch.exp(torch.randn(n, generator=g) * 0.45 + math.log(25.0)).round().clamp(3, 150).long()
    tgt = (src * (torch.randn(n, generator=g) * 0.12 + 1.05)).round().clamp(min=2).long()
    if max_len is not None:
        src, tgt = src.clamp(max=max_len), tgt.clamp(max=max_len)
    return src, tgt


# ---- timing -------------------------------------------------------------------------------------------------

def time_generation(model, batches, beam: int, device, autocast, repeats: int) -> dict:
    """One untimed warm-up batch, then `repeats` timed passes over all batches (median wall)."""
    with autocast():
        decode_all(model, batches[:1], beam, True)             # lazy init, Triton compilation
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = common.timed_runs(lambda: decode_all(model, batches, beam, True), device, repeats)
    wall, tokens = t["wall_s"], t["result"]
    sentences = sum(src.shape[0] for src, _ in batches)
    return {"sentences": sentences, "target_tokens": tokens, "wall_s": wall, "wall_s_min": t["wall_s_min"],
            "cpu_s": t["cpu_s"], "sentences_per_s": sentences / wall,
            "target_tokens_per_s": tokens / wall,
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="fconv_wmt_en_de", choices=list(ARCH_DEFAULTS))
    ap.add_argument("--src-vocab", type=int, default=VOCAB, help="source dictionary size (assumed 40000)")
    ap.add_argument("--tgt-vocab", type=int, default=VOCAB, help="target dictionary size (assumed 40000)")
    ap.add_argument("--sentences", type=int, default=None, help="default CUDA 500, CPU 8 (--quick: 3)")
    ap.add_argument("--batch-sentences", type=int, default=None, help="sentences per batch (default CUDA 128, CPU 8)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--backends", nargs="+", choices=("reference", "triton", "native"), default=None,
                    help="default: every backend usable on the device (Triton on CUDA only)")
    ap.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="bf16 autocast and/or fp32 (default: CUDA bf16 then fp32, CPU fp32)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="clip source and target lengths to this many tokens (--quick: 12)")
    ap.add_argument("--width-divisor", type=int, default=1, help="divide every width by this (tests)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default CUDA 3, CPU 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a dry run: 3 sentences of at most 12 tokens")
    ap.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sentences = args.sentences or (3 if args.quick else (500 if cuda else 8))
    batch_sentences = args.batch_sentences or (128 if cuda else 8)
    max_len = args.max_len or (12 if args.quick else None)
    # bf16 first on CUDA: the setting convs2s.generate uses there, kept if a time limit cuts the run short.
    dtypes = args.dtype or (["bf16", "fp32"] if cuda else ["fp32"])
    repeats = args.repeats or (3 if cuda else 1)
    if min(sentences, batch_sentences, repeats) < 1 or (max_len is not None and max_len < 2):
        raise SystemExit("need --sentences, --batch-sentences, --repeats >= 1 and --max-len >= 2 (a token and EOS)")
    if args.threads:
        torch.set_num_threads(args.threads)
    usable = step_backends(device)
    backends = args.backends or usable
    missing = [b for b in backends if b not in usable]
    if missing:
        raise SystemExit(f"backend(s) {missing} not usable on {device.type} here (usable: {usable})")
    backends = sorted(backends, key=lambda b: b != "reference")      # reference first: the speedups' base

    t0 = time.perf_counter()
    ckpt = fairseq_checkpoint(args.arch, args.src_vocab, args.tgt_vocab, width_divisor=args.width_divisor,
                              seed=args.seed)
    params = parameter_count(ckpt)
    print(f"{args.arch} (width / {args.width_divisor}), vocab {args.src_vocab} -> {args.tgt_vocab}: "
          f"{params:,} parameters ({params / 1e6:.1f} M), fairseq checkpoint built in {time.perf_counter() - t0:.1f} s")
    src_len, tgt_len = newstest_en_de_lengths(sentences, args.seed, max_len)
    batches = make_batches(src_len, tgt_len, args.src_vocab, batch_sentences, device, args.seed)
    shape = (f"{sentences} newstest-like sentences, src {src_len.float().mean():.1f} tgt {tgt_len.float().mean():.1f} "
             f"tokens (forced), vocab {args.src_vocab}/{args.tgt_vocab}")
    meta = dict(arch=args.arch, width_divisor=args.width_divisor, src_vocab=args.src_vocab, tgt_vocab=args.tgt_vocab,
                params=params, forced_lengths=True, quick=args.quick, beam=args.beam,
                batch_sentences=batch_sentences, src_len_mean=float(src_len.float().mean()),
                tgt_len_mean=float(tgt_len.float().mean()), sentences=sentences)
    rows, reference_wall = [], {}
    for backend in backends:
        t0 = time.perf_counter()
        model = from_fairseq(ckpt, backend=backend).to(device)
        convert_s = time.perf_counter() - t0
        for dtype in dtypes:
            autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16"
                        else contextlib.nullcontext)
            r = time_generation(model, batches, args.beam, device, autocast, repeats)
            if backend == "reference":
                reference_wall[dtype] = r["wall_s"]
            r = {"op": "generate-fairseq", "impl": f"beam{args.beam}-incremental", "backend": backend,
                 "dtype": dtype, "shape": shape, **meta, **r, "convert_s": convert_s,
                 "speedup_vs_reference": reference_wall[dtype] / r["wall_s"] if dtype in reference_wall else None,
                 "threads": torch.get_num_threads()}
            rows.append(r)
            print(f"{backend:>9} {dtype}: {r['target_tokens_per_s']:8.1f} target tokens/s, "
                  f"{r['sentences_per_s']:.2f} sentences/s ({r['target_tokens']} tokens in {r['wall_s']:.2f} s)")
            if args.out:      # after every row: a run killed at its time limit keeps what it finished
                common.write_json(args.out, "fairseq", rows, **meta)
        del model
        if cuda:
            torch.cuda.empty_cache()
    common.print_table(rows, ["backend", "dtype", "sentences", "target_tokens", "wall_s", "cpu_s",
                              "target_tokens_per_s", "sentences_per_s", "peak_mem_mib", "speedup_vs_reference"])
    return rows


if __name__ == "__main__":
    main()
