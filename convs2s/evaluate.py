"""Scoring a checkpoint: translate a test set, detokenize, and score with sacreBLEU (BLEU with its signature, chrF).

    evaluate("runs/x/best.pt", split="test_2016_flickr")           Multi30k split, languages from the checkpoint
    evaluate("runs/x/best.pt", src="in.de.gz", ref="ref.en")        any plain or .gz files, one sentence a line

The hypotheses are written to a file (default: beside the checkpoint, <split or source file name>.<tgt>.hyp), and
the metrics returned (and written as JSON with metrics_json=PATH).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import sacrebleu

from . import data as data_mod
from .checkpoint import load_checkpoint, model_from_checkpoint
from .device import resolve_device
from .generate import translate_lines


def score(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU corpus BLEU and chrF of detokenized hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "bleu_str": str(b), "bleu_signature": str(bleu.get_signature()),
            "chrf": c.score, "chrf_signature": str(chrf.get_signature())}


def evaluate(checkpoint: str, *, split: str | None = None, src: str | None = None, ref: str | None = None,
             data: str | None = None, src_lang: str | None = None, tgt_lang: str | None = None,
             output: str | None = None, device: str = "auto", backend: str | None = None, max_tokens: int = 4000,
             beam: int = 1, lenpen: float = 1.0, examples: int = 0, metrics_json: str | None = None,
             quiet: bool = False, int8: bool = False) -> dict:
    """Translate and score; returns {bleu, chrf, signatures, n, output, ...}. Exactly one of split / (src, ref).
    lenpen: the beam search's length penalty (score = log-prob / length ** lenpen; no effect with beam 1).
    int8: translate with int8 weights (convs2s.quantize; CPU only)."""
    if (split is None) == (src is None):
        raise ValueError("give either a Multi30k split (--split) or a source file (--src, with --ref)")
    if src is not None and ref is None:
        raise ValueError("--src needs --ref (the reference translations, one per line)")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    model, tok = model_from_checkpoint(ckpt, dev, backend)
    if int8:
        from .quantize import quantize_for_inference
        model = quantize_for_inference(model, inplace=True)
    saved = ckpt.get("args") or {}                 # the training arguments: the run's languages
    src_lang = src_lang or saved.get("src_lang")
    tgt_lang = tgt_lang or saved.get("tgt_lang")
    if split is not None and not (src_lang and tgt_lang):
        raise ValueError(f"{checkpoint} holds no training arguments to take the languages from: give --src-lang "
                         "and --tgt-lang with --split")
    if split is not None:
        names = [data_mod.file_name(split, src_lang), data_mod.file_name(split, tgt_lang)]
        data_dir = data_mod.find_data(data, files=names)
        src_lines, ref_lines = data_mod.load_pair(data_dir, split, src_lang, tgt_lang)
        name = split
    else:
        src_lines, ref_lines = data_mod.read_lines(src), data_mod.read_lines(ref)
        name = Path(src).name.removesuffix(".gz")
    if len(src_lines) != len(ref_lines):
        raise ValueError(f"{len(src_lines)} source lines but {len(ref_lines)} reference lines")
    t0 = time.time()
    hyps = translate_lines(model, tok, src_lines, max_tokens=max_tokens, beam=beam, len_penalty=lenpen)
    seconds = time.time() - t0
    out_path = Path(output) if output else Path(checkpoint).with_name(f"{name}.{tgt_lang or 'out'}.hyp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    metrics = {"checkpoint": str(checkpoint), "set": name, "src_lang": src_lang, "tgt_lang": tgt_lang,
               "n": len(hyps), "beam": beam, "lenpen": lenpen, "int8": int8, "device": str(dev),
               "translate_s": round(seconds, 2),
               "sentences_per_s": len(hyps) / max(seconds, 1e-9), "output": str(out_path), **score(hyps, ref_lines)}
    if not quiet:
        print(f"{name} {src_lang}->{tgt_lang}: {len(hyps)} sentences translated in {seconds:.1f} s; "
              f"hypotheses in {out_path}")
        print(f"sacreBLEU: {metrics['bleu_str']}")
        print(f"  signature: {metrics['bleu_signature']}")
        print(f"chrF: {metrics['chrf']:.2f}  ({metrics['chrf_signature']})")
        for i in range(min(examples, len(hyps))):
            print(f"\n[{i}] src: {src_lines[i]}\n    ref: {ref_lines[i]}\n    hyp: {hyps[i]}")
    if metrics_json:
        Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
