"""The `convs2s` command (also `python -m convs2s`).

    convs2s train     --preset auto --data DIR --src-lang de --tgt-lang en --save-dir runs/x --max-minutes 20
    convs2s translate --checkpoint runs/x/best.pt [--input FILE] [--beam 5 --nbest 2]    stdin -> stdout
    convs2s translate --fairseq wmt14.en-fr.fconv-py --tokenizer moses   a fairseq fconv folder, raw stdin
    convs2s plot-attention --checkpoint runs/x/best.pt --sentence "Ein Hund läuft." --out a.png [--layer all]
    convs2s evaluate  --checkpoint runs/x/best.pt --split test_2016_flickr   (or --src FILE --ref FILE)

The benchmark suite is not a subcommand: it runs from a source checkout as `python -m bench.run` (`make bench`).

Each subcommand is one entry of SUBCOMMANDS: a function that adds its parser to the subparsers and sets
`func` (called with the parsed arguments, returns the exit status). New subcommands add an entry there.

Bad input never ends in a traceback: a bad option, file, checkpoint or data folder prints one line
`convs2s <command>: error: <what>` on stderr and exits with status 2 (CONVS2S_TRACEBACK=1 shows the traceback
too); errors this module does not expect (bugs) keep their traceback. Translation prints exactly one output line
per input line (--nbest K: K lines): blank lines give empty translations, invalid UTF-8 is replaced (U+FFFD) and
lines longer than the model's source positions are cut, each reported on stderr with its line number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `convs2s translate: error: ...` and status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(minimum, kind=int):
    """argparse type: a number of `kind` >= minimum."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-tokens", type=_at_least(1), default=4000, help="padded tokens per batch (default 4000)")
    p.add_argument("--num-threads", type=_at_least(0), default=0,
                   help="torch CPU threads (0 = torch's default: one per core, or $OMP_NUM_THREADS)")


def _add_train(sub) -> None:
    from .train import ARCHS, LR_SCHEDULERS, TrainArgs
    d = TrainArgs()
    p = sub.add_parser("train", help="train on Multi30k or one's own parallel corpus", description=(
        "Train ConvS2S on Multi30k task 1 (--data) or on one's own files (--train PREFIX --valid PREFIX: "
        "PREFIX.<src-lang> and PREFIX.<tgt-lang>, plain or .gz, one sentence a line). Launch with torchrun "
        "--nproc-per-node N for N processes (gloo on CPU, NCCL on GPU)."))
    p.add_argument("--arch", "--preset", dest="preset", default=d.preset, metavar="ARCH",
                   help=f"model: auto (multi30k on a GPU, small on a CPU), {', '.join(ARCHS)}")
    p.add_argument("--data", default=None, help="folder of the Multi30k raw files (default: $CONVS2S_DATA, else "
                   "downloaded into ~/.cache/convs2s/multi30k)")
    p.add_argument("--train", default=None, metavar="PREFIX",
                   help="one's own training corpus: PREFIX.<src-lang> and PREFIX.<tgt-lang> (plain or .gz, UTF-8)")
    p.add_argument("--valid", default=None, metavar="PREFIX", help="its validation set (with --train)")
    p.add_argument("--src-lang", default=d.src_lang, help="de, en, fr, cs with Multi30k; any code with --train")
    p.add_argument("--tgt-lang", default=d.tgt_lang)
    p.add_argument("--cache-dir", default=None, help="encoded-corpus cache for --train (default: $CONVS2S_CACHE, "
                   "else ~/.cache/convs2s/corpus)")
    p.add_argument("--encode-workers", type=int, default=0, help="processes encoding a corpus (0 = every core)")
    p.add_argument("--spm-sample", type=int, default=d.spm_sample,
                   help="sentencepiece trains on at most this many lines per model, drawn uniformly (0 = all)")
    p.add_argument("--max-len-ratio", type=float, default=d.max_len_ratio,
                   help="drop training pairs whose longer side has more than this x the shorter side's subwords "
                   "(0 = keep all; fairseq's WMT scripts use 1.5)")
    g = p.add_argument_group("architecture overrides (fairseq's names; default: the --arch's)")
    g.add_argument("--encoder-layers", type=_layers_arg, default=None, metavar="LAYERS",
                   help='fairseq layer string, e.g. "[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2"')
    g.add_argument("--decoder-layers", type=_layers_arg, default=None, metavar="LAYERS")
    g.add_argument("--decoder-attention", type=_attention_arg, default=None, metavar="ATTN",
                   help='"True", "False" or one flag per decoder layer, e.g. "[True, False, True]"')
    g.add_argument("--encoder-embed-dim", type=int, default=None)
    g.add_argument("--decoder-embed-dim", type=int, default=None)
    g.add_argument("--decoder-out-embed-dim", type=int, default=None)
    g.add_argument("--share-decoder-input-output-embed", action="store_true", default=None,
                   help="tie the output projection to the decoder embedding (needs equal dims)")
    g.add_argument("--max-source-positions", type=int, default=None)
    g.add_argument("--max-target-positions", type=int, default=None)
    p.add_argument("--save-dir", default=d.save_dir, help="checkpoints (last.pt, best.pt) and train_log.jsonl")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs, help="0 = no limit")
    p.add_argument("--max-updates", type=_at_least(0), default=d.max_updates, help="0 = no limit")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="wall-clock cap (0 = no limit)")
    p.add_argument("--max-tokens", type=_at_least(1), default=d.max_tokens, help="padded tokens per batch and rank")
    p.add_argument("--update-freq", type=_at_least(1), default=d.update_freq,
                   help="batches per update (gradient accumulation, fairseq's --update-freq)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: <save-dir>/last.pt)")
    p.add_argument("--backend", default=d.backend, choices=("auto", "reference", "triton", "native"))
    p.add_argument("--device", default=d.device, help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--optimizer", default=d.optimizer, choices=("nag", "adam"),
                   help="adam (default: learned faster in a measured short run) or nag: SGD with Nesterov "
                   "momentum 0.99 (the paper's)")
    p.add_argument("--lr", type=float, default=None, help="default 0.25 (nag) or 5e-4 (adam)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=LR_SCHEDULERS,
                   help="plateau (default: x --lr-shrink when the validation loss stops improving), inverse_sqrt, "
                   "or cosine (to 0 at --max-updates); each after --warmup-updates of linear warmup")
    p.add_argument("--warmup-updates", type=_at_least(0), default=d.warmup_updates,
                   help="linear lr warmup over the first N updates (default 0)")
    p.add_argument("--lr-shrink", type=float, default=d.lr_shrink,
                   help="plateau: lr multiplier when the validation loss stops improving")
    p.add_argument("--min-lr", type=float, default=None,
                   help="plateau: stop below this lr (default lr * 1e-4)")
    g.add_argument("--dropout", type=float, default=None, help="override the arch's dropout")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="sentencepiece vocabulary per model")
    p.add_argument("--spm-type", default=d.spm_type, choices=("bpe", "unigram"))
    p.add_argument("--joint-vocab", action="store_true", help="one sentencepiece model for both languages")
    p.add_argument("--train-subset", type=int, default=0, help="first N training pairs only (0 = all)")
    p.add_argument("--val-subset", type=int, default=0, help="first N validation pairs only (0 = all)")
    p.add_argument("--val-bleu-sentences", type=int, default=d.val_bleu_sentences,
                   help="validation sentences decoded for BLEU each epoch (-1 = all, 0 = no BLEU)")
    p.add_argument("--log-interval", type=int, default=d.log_interval, help="updates between JSONL records")
    p.add_argument("--save-interval-updates", type=int, default=0, help="also save last.pt every N updates")
    p.add_argument("--keep-interval-checkpoints", type=_at_least(-1), default=0, metavar="N",
                   help="also write checkpoint_<update>.pt every --save-interval-updates and keep the newest N "
                   "(for convs2s average; 0 = none, -1 = all)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    p.add_argument("--metrics-json", default=None, help="write the final metrics to this JSON file")
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.set_defaults(func=_run_train)


def _layers_arg(text: str) -> str:
    """argparse type: a fairseq layer string, checked here, kept as text (TrainArgs holds plain values)."""
    from .train import parse_layers
    try:
        parse_layers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--encoder-layers ", "")) from None
    return text


def _attention_arg(text: str) -> str:
    from .train import parse_attention
    try:
        parse_attention(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--decoder-attention ", "")) from None
    return text


def _run_train(a: argparse.Namespace) -> int:
    from .corpus import CorpusError
    from .data import LANGS
    from .train import TrainArgs, model_fields, train
    if a.train is None and a.valid is not None or a.train is not None and a.valid is None:
        raise SystemExit("convs2s train: --train PREFIX and --valid PREFIX go together")
    if a.train is not None and a.data is not None:
        raise SystemExit("convs2s train: give either --data (Multi30k) or --train/--valid (one's own files)")
    if a.train is None:
        for option, lang in (("--src-lang", a.src_lang), ("--tgt-lang", a.tgt_lang)):
            if lang not in LANGS:
                raise SystemExit(f"convs2s train: {option} {lang!r}: Multi30k has {', '.join(LANGS)}; other "
                                 "languages need one's own files (--train PREFIX --valid PREFIX)")
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    args = TrainArgs(**{k: v for k, v in vars(a).items() if k in fields})
    if args.resume is None:
        import torch
        arch = args.preset
        if arch == "auto":                           # as train() resolves it
            arch = "multi30k" if args.device != "cpu" and torch.cuda.is_available() else "small"
        try:
            model_fields(args, arch)                 # a bad architecture fails here, before any data is read
        except ValueError as e:
            raise SystemExit(f"convs2s train: {e}") from None
    try:
        train(args)
    except CorpusError as e:
        raise SystemExit(f"convs2s train: {e}") from None
    return 0


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate text with a checkpoint (beam search; beam 1 = greedy)",
                       description="Translate one sentence per line, from --input (default stdin) to stdout. "
                                   "With --nbest K > 1, each input line gives K lines 'rank<TAB>score<TAB>text'.")
    p.add_argument("--checkpoint", default=None, help="a convs2s checkpoint (required unless --fairseq)")
    p.add_argument("--fairseq", default=None, metavar="DIR",
                   help="translate with a fairseq fconv folder instead: model.pt, dict.<src>.txt, dict.<tgt>.txt, "
                        "optional bpecodes (applied and removed here). Input must be tokenized the way the model "
                        "was trained, or give --tokenizer moses (fairseq's released fconv archives expect Moses "
                        "tokenization). Defaults become fairseq's: --beam 5 --max-len-a 0 --max-len-b 200")
    p.add_argument("--tokenizer", default="none", choices=("none", "moses"),
                   help="with --fairseq: 'moses' tokenizes the input and detokenizes the output as fairseq's "
                        "--tokenizer moses does (needs sacremoses); 'none' (default) takes tokenized input")
    p.add_argument("--bf16", action="store_true",
                   help="with --fairseq: search under bf16 autocast (faster on a GPU; the default fp32 is what "
                        "fairseq computes). Without --fairseq, CUDA always uses bf16 autocast")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights on the CPU (convs2s.quantize): faster CPU decoding, results within int8 "
                        "quantization error of fp32; also with --fairseq")
    p.add_argument("--fairseq-checkpoint", default="model.pt", help="checkpoint file name inside --fairseq DIR")
    p.add_argument("--source-lang", default=None, help="with --fairseq (default: inferred)")
    p.add_argument("--target-lang", default=None, help="with --fairseq (default: inferred)")
    p.add_argument("--input", default="-", help="plain or .gz file, one sentence a line ('-' = stdin)")
    p.add_argument("--output", default="-", help="'-' = stdout")
    p.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "native"))
    p.add_argument("--beam", type=_at_least(1), default=None,
                   help="beam size (1 = greedy; default 1, 5 with --fairseq)")
    p.add_argument("--nbest", type=_at_least(1), default=1, help="hypotheses per sentence (<= --beam)")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty: score = log-prob / length ** lenpen")
    p.add_argument("--max-len-a", type=_at_least(0.0, float), default=None, help="default 1.2 (0 with --fairseq)")
    p.add_argument("--max-len-b", type=_at_least(0), default=None, help="default 10 (200 with --fairseq)")
    _add_common(p)
    p.set_defaults(func=_run_translate)


def read_input_lines(path: str, prog: str = "convs2s translate") -> list[str]:
    """The lines of `path` ('-' = stdin; plain or .gz), without line ends (LF or CRLF). A line that is not valid
    UTF-8 is decoded with U+FFFD for its bad bytes and reported on stderr by line number."""
    if path == "-":
        stdin = sys.stdin
        raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    else:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()                                  # the final line end
    out = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix(b"\r")
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            print(f"{prog}: warning: line {number} is not valid UTF-8 (byte {e.start}): bad bytes replaced by "
                  "U+FFFD", file=sys.stderr)
            out.append(line.decode("utf-8", errors="replace"))
    return out


def translate_text_lines(model, tok, lines: Sequence[str], *, prog: str = "convs2s translate", nbest: int = 1,
                         **search) -> list[list[tuple[str, float]]]:
    """Per line, exactly `nbest` (translation, score), best first: blank lines give empty translations without
    running the model; a line with more subwords than the model's source positions is cut to them (reported on
    stderr by line number); fewer hypotheses than nbest (a tiny vocabulary) are repeated to fill the count.
    `search`: convs2s.generate.nbest_lines's options."""
    from .generate import nbest_lines
    todo = [i for i, line in enumerate(lines) if line.strip()]
    limit = model.config.max_source_positions
    for i, ids in zip(todo, tok.encode_src([lines[i] for i in todo])):
        if len(ids) + 1 > limit:
            print(f"{prog}: warning: line {i + 1} has {len(ids) + 1} source subwords (EOS included), more than "
                  f"the model's {limit} positions: only its first {limit - 1} are translated", file=sys.stderr)
    out: list[list[tuple[str, float]]] = [[("", 0.0)] * nbest for _ in lines]
    hyps = nbest_lines(model, tok, [lines[i] for i in todo], nbest=nbest, **search)
    for i, hs in zip(todo, hyps):
        out[i] = (hs * nbest)[:nbest] if hs else out[i]
    return out


def _run_translate(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .device import resolve_device
    # fairseq generate's defaults with --fairseq, this project's otherwise.
    defaults = (5, 0.0, 200) if a.fairseq else (1, 1.2, 10)
    a.beam, a.max_len_a, a.max_len_b = (d if v is None else v
                                        for v, d in zip((a.beam, a.max_len_a, a.max_len_b), defaults))
    if not 1 <= a.nbest <= a.beam:
        raise SystemExit(f"convs2s translate: need 1 <= --nbest <= --beam, got --nbest {a.nbest} --beam {a.beam}")
    if (a.checkpoint is None) == (a.fairseq is None):
        raise SystemExit("convs2s translate: give either --checkpoint FILE or --fairseq DIR")
    if a.int8 and a.bf16:
        raise SystemExit("convs2s translate: --int8 computes in fp32 with int8 weights; drop --bf16")
    if a.int8 and resolve_device(a.device).type != "cpu":
        raise SystemExit("convs2s translate: --int8 runs on the CPU; add --device cpu")
    if a.fairseq:
        from .fairseq_translate import FairseqTranslator
        try:
            tr = FairseqTranslator.from_dir(a.fairseq, checkpoint=a.fairseq_checkpoint, source_lang=a.source_lang,
                                            target_lang=a.target_lang, backend=a.backend or "auto",
                                            tokenizer=None if a.tokenizer == "none" else a.tokenizer,
                                            device=resolve_device(a.device))
        except ValueError as e:
            raise SystemExit(f"convs2s translate: {e}") from None
        if a.int8:
            from .quantize import quantize_for_inference
            tr.model = quantize_for_inference(tr.model, inplace=True)
        lines = read_input_lines(a.input)
        import contextlib

        import torch
        device = next(tr.model.parameters()).device
        todo = [i for i, line in enumerate(lines) if line.strip()]
        with torch.autocast(device.type, dtype=torch.bfloat16) if a.bf16 else contextlib.nullcontext():
            found = tr.translate([lines[i] for i in todo], beam=a.beam, nbest=a.nbest, len_penalty=a.lenpen,
                                 max_len_a=a.max_len_a, max_len_b=a.max_len_b, max_tokens=a.max_tokens)
        hyps = [[("", 0.0)] * a.nbest for _ in lines]
        for i, hs in zip(todo, found):
            hyps[i] = (hs * a.nbest)[:a.nbest] if hs else hyps[i]
    else:
        model, tok = model_from_checkpoint(load_checkpoint(a.checkpoint), resolve_device(a.device), a.backend)
        if a.int8:
            from .quantize import quantize_for_inference
            model = quantize_for_inference(model, inplace=True)
        lines = read_input_lines(a.input)
        hyps = translate_text_lines(model, tok, lines, max_tokens=a.max_tokens, beam=a.beam, nbest=a.nbest,
                                    len_penalty=a.lenpen, max_len_a=a.max_len_a, max_len_b=a.max_len_b)
    if a.nbest == 1:
        text = "".join(hs[0][0] + "\n" for hs in hyps)
    else:
        text = "".join(f"{rank}\t{score:.4f}\t{h}\n" for hs in hyps for rank, (h, score) in enumerate(hs))
    if a.output == "-":
        sys.stdout.write(text)
    else:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="translate a test set and score it (sacreBLEU, chrF)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default=None, choices=("train", "val", "test_2016_flickr", "test_2017_flickr"),
                   help="a Multi30k split (languages from the checkpoint unless --src-lang/--tgt-lang)")
    p.add_argument("--src", default=None, help="source file (plain or .gz), instead of --split")
    p.add_argument("--ref", default=None, help="reference file (plain or .gz), with --src")
    p.add_argument("--data", default=None, help="Multi30k folder (default: $CONVS2S_DATA, else the cache)")
    p.add_argument("--src-lang", default=None)
    p.add_argument("--tgt-lang", default=None)
    p.add_argument("--output", default=None, help="hypotheses file (default: beside the checkpoint)")
    p.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "native"))
    p.add_argument("--beam", type=_at_least(1), default=1)
    p.add_argument("--lenpen", type=float, default=1.0,
                   help="length penalty with --beam > 1: score = log-prob / length ** lenpen (default 1.0)")
    p.add_argument("--int8", action="store_true", help="int8 weights on the CPU (convs2s.quantize)")
    p.add_argument("--examples", type=_at_least(0), default=0, help="print this many example translations")
    p.add_argument("--metrics-json", default=None, help="write the scores to this JSON file")
    _add_common(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate
    if (a.split is None) == (a.src is None) or (a.src is not None and a.ref is None):
        raise SystemExit("convs2s evaluate: give either --split NAME or --src FILE --ref FILE")
    evaluate(a.checkpoint, split=a.split, src=a.src, ref=a.ref, data=a.data, src_lang=a.src_lang,
             tgt_lang=a.tgt_lang, output=a.output, device=a.device, backend=a.backend, max_tokens=a.max_tokens,
             beam=a.beam, lenpen=a.lenpen, examples=a.examples, metrics_json=a.metrics_json, int8=a.int8)
    return 0


def _add_plot_attention(sub) -> None:
    p = sub.add_parser("plot-attention", help="draw one sentence's attention (source x target heat map)",
                       description="Translate --sentence with beam search and save the best hypothesis' attention "
                                   "(target subwords down, source subwords across) to --out (.png, .pdf, .svg).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sentence", required=True, help="source sentence (plain text)")
    p.add_argument("--out", required=True, help="image file; the format follows its suffix")
    p.add_argument("--layer", default="mean",
                   help="mean (average over the attention layers), all (one panel per layer) or a layer index")
    p.add_argument("--beam", type=_at_least(1), default=5)
    p.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "native"))
    _add_common(p)
    p.set_defaults(func=_run_plot_attention)


def _run_plot_attention(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .device import resolve_device
    from .plot import plot_sentence
    layer = int(a.layer) if a.layer.lstrip("-").isdigit() else a.layer
    if layer not in ("mean", "all") and not isinstance(layer, int):
        raise SystemExit(f"convs2s plot-attention: --layer must be mean, all or an index, got {a.layer!r}")
    model, tok = model_from_checkpoint(load_checkpoint(a.checkpoint), resolve_device(a.device), a.backend)
    translation, out = plot_sentence(model, tok, a.sentence, a.out, layer=layer, beam=a.beam)
    print(translation)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of a run's checkpoints (fairseq's average_checkpoints)")
    p.add_argument("--inputs", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint files, or one folder with --last N")
    p.add_argument("--last", type=_at_least(1), default=None, metavar="N",
                   help="the folder's newest N checkpoint_<update>.pt (train --keep-interval-checkpoints)")
    p.add_argument("--output", required=True, help="the averaged checkpoint (loadable by evaluate / translate)")
    p.set_defaults(func=_run_average)


def _run_average(a: argparse.Namespace) -> int:
    from .average import main as average
    average(a.inputs, a.output, last=a.last)
    return 0


SUBCOMMANDS = {
    "train": _add_train,
    "translate": _add_translate,
    "evaluate": _add_evaluate,
    "average": _add_average,
    "plot-attention": _add_plot_attention,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convs2s", description="ConvS2S translation with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def _user_errors() -> tuple:
    """The exception types that mean bad input (a file, a checkpoint, data, an option), not a bug here."""
    from .checkpoint import CheckpointError
    from .corpus import CorpusError
    from .data import DataError
    from .distributed import RankError
    from .ops import BackendUnavailableError
    from .train import TrainingDiverged
    return (ValueError, OSError, CheckpointError, CorpusError, DataError, RankError, BackendUnavailableError,
            TrainingDiverged)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    prog = f"convs2s {args.command}"
    if args.command != "train" and getattr(args, "num_threads", 0):    # train sets (and restores) its own
        import torch
        torch.set_num_threads(args.num_threads)
    try:
        return args.func(args)
    except SystemExit as e:
        if isinstance(e.code, str):                 # raise SystemExit("convs2s x: ...") = a usage error
            print(e.code if e.code.startswith("convs2s") else f"{prog}: error: {e.code}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("CONVS2S_TRACEBACK", "") == "1":
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
