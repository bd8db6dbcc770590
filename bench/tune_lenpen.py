"""Greedy vs beam search with a sweep of length penalties, scored on Multi30k VALIDATION only (sacreBLEU).

    python -m bench.tune_lenpen --checkpoint runs/x/best.pt --data ../shared/data/multi30k \
        --beam 5 --lenpens 0.6 0.8 1.0 1.2 1.4 --out val.json

One beam search per checkpoint serves every length penalty: the search (fairseq's) finishes the same hypotheses
whatever the penalty (it ranks candidates by cumulative log-probability; the penalty only divides a finished
hypothesis's score by length ** lenpen), so the search runs once with lenpen 0 (score = the log-probability sum)
and keeping all `beam` finished hypotheses, and each penalty re-ranks them. That picks what a search with that
penalty picks, up to the order of exactly tied scores (tests/test_tune_lenpen.py checks it against direct
searches). The test sets are not accepted here: they are read once, at the end, with `convs2s evaluate`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from convs2s import data as data_mod
from convs2s.checkpoint import load_checkpoint, model_from_checkpoint
from convs2s.evaluate import score
from convs2s.generate import autocast_for, translate_batched
from convs2s.tokenizer import EOS_ID


def rerank(nbest, lenpens) -> dict[float, list]:
    """nbest: per sentence, hypotheses searched with len_penalty 0 (score = log-prob sum); -> per lenpen, per
    sentence, the hypothesis a search with that penalty ranks first."""
    out = {}
    for lp in lenpens:
        # max() keeps the first of equal scores, as the search's stable sort does.
        out[lp] = [max(hs, key=lambda h: h.score / float(len(h.tokens)) ** lp) for hs in nbest]
    return out


def sweep(model, tok, src: list[str], ref: list[str], *, beam: int, lenpens, greedy: bool = True,
          max_tokens: int = 4000) -> dict:
    """{"greedy": scores, "beam": {lenpen: scores}} of one model on (src, ref); scores as convs2s.evaluate.score
    plus the seconds of the search."""
    device = next(model.parameters()).device
    sources = [ids + [EOS_ID] for ids in tok.encode_src(src)]
    result = {}

    def search(k: int, lp: float):
        t0 = time.time()
        with autocast_for(device):
            hyps = translate_batched(model, sources, max_tokens=max_tokens, beam=k, nbest=k, len_penalty=lp)
        return hyps, time.time() - t0

    def scored(best, seconds) -> dict:
        s = score([tok.decode_tgt(h.tokens.tolist()) for h in best], ref)
        return {k: v for k, v in s.items() if k != "bleu_str"} | {"search_s": round(seconds, 1)}

    if greedy:
        hyps, secs = search(1, 1.0)
        result["greedy"] = scored([hs[0] for hs in hyps], secs)
    nbest, secs = search(beam, 0.0)
    result["beam"] = {str(lp): scored(best, secs) for lp, best in rerank(nbest, lenpens).items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_lenpen", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, nargs="+")
    p.add_argument("--data", default=None, help="Multi30k folder (default: $CONVS2S_DATA, else the cache)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpens", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2, 1.4])
    p.add_argument("--no-greedy", dest="greedy", action="store_false", help="skip the greedy row")
    p.add_argument("--max-sentences", type=int, default=0, help="first N validation sentences only (0 = all)")
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    a = p.parse_args(argv)
    if a.beam < 2:
        p.error("--beam must be >= 2 (the greedy row is always there)")
    torch.set_num_threads(a.num_threads)
    rows = {}
    for path in a.checkpoint:
        ckpt = load_checkpoint(path)
        model, tok = model_from_checkpoint(ckpt, "cpu")
        args = ckpt.get("args") or {}
        src_lang, tgt_lang = args.get("src_lang", "de"), args.get("tgt_lang", "en")
        names = [data_mod.file_name("val", src_lang), data_mod.file_name("val", tgt_lang)]
        src, ref = data_mod.load_pair(data_mod.find_data(a.data, files=names), "val", src_lang, tgt_lang)
        if a.max_sentences:
            src, ref = src[:a.max_sentences], ref[:a.max_sentences]
        rows[path] = {"n": len(src), "averaged_from": ckpt.get("averaged_from"),
                      "updates": (ckpt.get("train_state") or {}).get("updates"),
                      **sweep(model, tok, src, ref, beam=a.beam, lenpens=a.lenpens, greedy=a.greedy,
                              max_tokens=a.max_tokens)}
        r = rows[path]
        line = " ".join(f"lp{lp} {s['bleu']:.2f}" for lp, s in r["beam"].items())
        greedy = f"greedy {r['greedy']['bleu']:.2f}  " if "greedy" in r else ""
        print(f"{path} (val, {r['n']} sentences): {greedy}beam {a.beam}: {line}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"split": "val", "beam": a.beam, "lenpens": a.lenpens, "rows": rows},
                                          indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
