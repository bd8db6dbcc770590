"""Convergence per backend (Liger-Kernel's test): the same updates, same seed, same batches; compare the curves.

Each backend trains the same model (same initial weights, same dropout masks: the modules draw them, not the
ops) for --updates Adam updates on the same Multi30k batches, as `convs2s train` does on CPU (fp32,
label-smoothed cross-entropy 0.1 per target token, clip 0.1, lr 5e-4); the loss of every update is recorded.
Then each model greedily translates the same --bleu-sentences validation sentences (sacreBLEU).

Passes when every backend's loss stays within --loss-rtol of the reference backend's at every update and its
BLEU within --bleu-tol (0.5) of the reference's.

    python -m bench.bench_convergence --data ../shared/data/multi30k --preset small --updates 200 \\
        --backends reference native --out bench/results/convergence.json --plot bench/results/convergence.png

--parallel runs the backends in concurrent processes (one torch thread each): wall time per backend is then
measured under contention and only the curves are comparable, not the speeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    # The Triton backend runs in the interpreter on CPU tensors; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s import data as data_mod
from convs2s.model import PRESETS, ConvS2S, ConvS2SConfig
from convs2s.search import beam_search
from convs2s.tokenizer import EOS_ID, Tokenizer
from convs2s.train import label_smoothed_nll_loss

LABEL_SMOOTHING, CLIP_NORM, LR = 0.1, 0.1, 5e-4


def prepare(args) -> dict:
    """Tokenizer, the training batches of the run (index lists, the same for every backend) and the validation
    sentences to translate: everything the backends share."""
    names = [data_mod.file_name(s, lang) for s in ("train", "val") for lang in ("de", "en")]
    data_dir = data_mod.find_data(args.data, files=names)
    train_src, train_tgt = data_mod.load_pair(data_dir, "train", "de", "en")
    val_src, val_tgt = data_mod.load_pair(data_dir, "val", "de", "en")
    t0 = time.perf_counter()
    tok = Tokenizer.train(train_src, train_tgt, vocab_size=args.vocab_size)
    print(f"tokenizer: {time.perf_counter() - t0:.1f} s, vocab {tok.src_vocab_size}/{tok.tgt_vocab_size}")
    ds = data_mod.PairDataset(tok.encode_src(train_src), tok.encode_tgt(train_tgt))
    cfg = PRESETS[args.preset]
    ds.filter_long(cfg.get("max_source_positions", 1024), cfg.get("max_target_positions", 1024))
    sampler = data_mod.TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, args.max_tokens, seed=args.seed)
    batches, epoch = [], 1
    while len(batches) < args.updates:
        sampler.set_epoch(epoch)
        batches += [ds.collate(idx) for idx in sampler][:args.updates - len(batches)]
        epoch += 1
    n = args.bleu_sentences
    return {"tok": tok.state(), "batches": batches, "val_src_ids": tok.encode_src(val_src[:n]),
            "val_ref": val_tgt[:n], "vocab": (tok.src_vocab_size, tok.tgt_vocab_size)}


def greedy_bleu(model, tok: Tokenizer, src_ids: list[list[int]], refs: list[str], batch_size: int,
                incremental: bool) -> float:
    """sacreBLEU of greedy translations (beam 1; at most 1.2 * source length + 10 tokens) of src_ids."""
    import sacrebleu
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    hyps = [""] * len(src_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        src = data_mod.pad_right([src_ids[i] + [EOS_ID] for i in idx])
        out = beam_search(model, src.to(next(model.parameters()).device), beam=1, incremental=incremental)
        for i, h in zip(idx, out):
            hyps[i] = tok.decode_tgt(h[0].tokens.tolist())
    return sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score


def train_backend(backend: str, shared: dict, args) -> dict:
    """The run for one backend: {"backend", "loss" per update, "nll_loss" per update, "bleu", timings}."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = Tokenizer.from_state(shared["tok"])
    src_v, tgt_v = shared["vocab"]
    torch.manual_seed(args.seed)
    cfg = ConvS2SConfig(src_vocab_size=src_v, tgt_vocab_size=tgt_v, backend=backend, **PRESETS[args.preset])
    model = ConvS2S(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses, nlls = [], []
    t0 = time.perf_counter()
    for i, b in enumerate(shared["batches"]):
        b = b.to(device)
        loss, nll = label_smoothed_nll_loss(model(b.src_tokens, b.src_lengths, b.prev_output_tokens), b.target,
                                            LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        (loss / b.ntokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        losses.append(loss.item() / b.ntokens)
        nlls.append(nll.item() / b.ntokens)
        if (i + 1) % args.log_interval == 0:
            print(f"  {backend}: update {i + 1} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.eval()
    bleu = greedy_bleu(model, tok, shared["val_src_ids"], shared["val_ref"], args.bleu_batch,
                       incremental=not args.full_recompute)
    return {"backend": backend, "loss": losses, "nll_loss": nlls, "bleu": bleu, "train_s": train_s,
            "decode_s": time.perf_counter() - t0}


def compare(runs: list[dict], loss_rtol: float, bleu_tol: float) -> list[dict]:
    """Per non-reference backend: the largest relative loss deviation from the reference over all updates (and
    where), the BLEU difference, and whether both are within tolerance."""
    ref = next(r for r in runs if r["backend"] == "reference")
    out = []
    for r in runs:
        if r is ref:
            continue
        dev = [abs(a - b) / abs(b) for a, b in zip(r["loss"], ref["loss"])]
        worst = max(range(len(dev)), key=dev.__getitem__)
        bleu_diff = r["bleu"] - ref["bleu"]
        out.append({"backend": r["backend"], "max_loss_rel_dev": dev[worst], "at_update": worst + 1,
                    "final_loss_rel_dev": dev[-1], "bleu_diff": bleu_diff,
                    "loss_within_tol": dev[worst] <= loss_rtol, "bleu_within_tol": abs(bleu_diff) <= bleu_tol})
    return out


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = next(r for r in runs if r["backend"] == "reference")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        x = range(1, len(r["loss"]) + 1)
        a.plot(x, r["loss"], label=f"{r['backend']} (BLEU {r['bleu']:.2f})", lw=1)
        if r is not ref:
            b.semilogy(x, [max(abs(p - q) / q, 1e-12) for p, q in zip(r["loss"], ref["loss"])], label=r["backend"],
                       lw=1)
    a.set(xlabel="update", ylabel="training loss (label-smoothed, per token)", title=title)
    b.set(xlabel="update", ylabel="|loss - reference| / reference (0 drawn at 1e-12)", title="deviation from reference")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="Multi30k folder (default: $CONVS2S_DATA, else the download cache)")
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=4000, help="padded tokens per batch (convs2s train's default)")
    ap.add_argument("--backends", nargs="+", default=["reference", "native"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per backend run")
    ap.add_argument("--parallel", action="store_true", help="one process per backend, run concurrently")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--bleu-sentences", type=int, default=200, help="first N validation sentences")
    ap.add_argument("--bleu-batch", type=int, default=50, help="sentences per decoding batch")
    ap.add_argument("--full-recompute", action="store_true",
                    help="decode by recomputing the prefix (incremental=False) instead of incremental steps")
    ap.add_argument("--loss-rtol", type=float, default=1e-3, help="allowed |loss - reference| / reference")
    ap.add_argument("--bleu-tol", type=float, default=0.5)
    ap.add_argument("--log-interval", type=int, default=20)
    ap.add_argument("--note", default="", help="free text stored in the JSON (what was run and why)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--plot", default=None, help="PNG of the loss curves")
    args = ap.parse_args(argv)
    if "reference" not in args.backends:
        ap.error("--backends must include reference (the curves are compared with it)")
    torch.set_num_threads(args.threads)
    shared = prepare(args)
    t0 = time.perf_counter()
    if args.parallel:
        with cf.ProcessPoolExecutor(len(args.backends), mp_context=mp.get_context("spawn")) as ex:
            runs = list(ex.map(train_backend, args.backends, [shared] * len(args.backends),
                               [args] * len(args.backends)))
    else:
        runs = [train_backend(b, shared, args) for b in args.backends]
    wall = time.perf_counter() - t0
    verdict = compare(runs, args.loss_rtol, args.bleu_tol)
    common.print_table([{"backend": r["backend"], "final_loss": r["loss"][-1], "bleu": r["bleu"],
                         "train_s": r["train_s"], "decode_s": r["decode_s"]} for r in runs],
                       ["backend", "final_loss", "bleu", "train_s", "decode_s"])
    common.print_table(verdict, ["backend", "max_loss_rel_dev", "at_update", "final_loss_rel_dev", "bleu_diff",
                                 "loss_within_tol", "bleu_within_tol"])
    passed = all(v["loss_within_tol"] and v["bleu_within_tol"] for v in verdict)
    print("PASS" if passed else "FAIL")
    result = {"config": {"preset": args.preset, "updates": args.updates, "max_tokens": args.max_tokens,
                         "seed": args.seed, "optimizer": f"adam lr {LR}", "clip_norm": CLIP_NORM,
                         "label_smoothing": LABEL_SMOOTHING, "dtype": "float32", "device": args.device,
                         "threads_per_run": args.threads, "parallel": args.parallel,
                         "bleu_sentences": len(shared["val_ref"]), "decoding": "greedy, " + (
                             "full recompute" if args.full_recompute else "incremental"),
                         "tolerance": {"loss_rtol": args.loss_rtol, "bleu_abs": args.bleu_tol}},
              "command": "python -m bench.bench_convergence " + " ".join(argv if argv is not None else sys.argv[1:]),
              "note": args.note, "wall_s": wall, "passed": passed, "comparison": verdict}
    if args.out:
        common.write_json(args.out, "convergence", runs, **result)
    if args.plot:
        plot(runs, args.plot, f"{args.preset}, {args.updates} updates, Multi30k de-en")
    return {**result, "results": runs}


if __name__ == "__main__":
    main()
