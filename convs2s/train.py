"""Training ConvS2S on Multi30k or one's own corpus: `convs2s train` (or `python -m convs2s train`), 1+ processes.

    train(TrainArgs(preset="small", src_lang="de", tgt_lang="en", save_dir="runs/x", max_minutes=20))

What one run does, in order:
  1. torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU; one device per rank.
  2. Data: Multi30k train + val from --data / $CONVS2S_DATA / the download cache (convs2s.data), or one's own
     files --train PREFIX --valid PREFIX (convs2s.corpus: checked, then encoded once into an on-disk cache).
  3. Tokenizer: sentencepiece trained on (a sample of) the training split by rank 0 and broadcast (or taken
     from --resume).
  4. Model: --arch, a preset of convs2s.model or a fairseq fconv architecture (auto: "multi30k" on a GPU,
     "small" on a CPU), with fairseq-style overrides (--encoder-layers "[(512, 3)] * 9 + ..."); DDP when
     distributed. The config is stored in the checkpoint.
  5. Updates on token-count batches (--max-tokens): label-smoothed cross-entropy (0.1) normalised by the
     number of target tokens of the whole step (all ranks), gradient-norm clip 0.1, Nesterov momentum 0.99
     (lr 0.25, the paper's) or Adam (lr 5e-4, the default: it learned faster in a measured short run);
     bf16 autocast on CUDA, fp32 on CPU.
  6. After each epoch: validation loss and greedy BLEU; lr x 0.1 when the validation loss did not improve
     (fairseq's reduce-on-plateau with lr_shrink 0.1); checkpoints `last.pt` and `best.pt` (rank 0 only).
  7. Stops at --max-epochs, --max-updates, --max-minutes, or when lr falls below --min-lr; a stop inside an
     epoch validates and saves too, and --resume continues from that exact batch.

Checkpoints hold the model config, the tokenizer's model protos, weights, optimizer, schedule state and every
rank's RNG state, all plain Python / tensors (loaded with torch.load(weights_only=True)); they are written to a
temporary file and renamed, so a crash mid-write leaves the previous checkpoint intact. With --deterministic
(deterministic algorithms, same seed and settings) the losses after --resume equal those of an uninterrupted run.

Logs: tqdm progress bars (loss, perplexity, target tokens/s) and `<save-dir>/train_log.jsonl` (one JSON object per
--log-interval updates and per validation); --metrics-json writes the run's final numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import corpus as corpus_mod
from . import data as data_mod
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from .convert import ARCH_DEFAULTS, parse_layer_string
from .device import autocast_for
from .distributed import agree, all_reduce_sum, init_distributed, on_main, run_agreed
from .generate import translate_lines
from .model import PRESETS, ConvS2S, ConvS2SConfig
from .tokenizer import PAD_ID, Tokenizer


@dataclass
class TrainArgs:
    preset: str = "auto"              # a convs2s.model preset; auto = multi30k on CUDA, small on CPU
    data: str | None = None           # folder of Multi30k raw files (None: $CONVS2S_DATA, else download cache)
    train: str | None = None          # one's own corpus instead: PREFIX.<src_lang>, PREFIX.<tgt_lang> (or .gz)
    valid: str | None = None          # its validation set's PREFIX (required with train)
    cache_dir: str | None = None      # encoded-corpus cache (None: $CONVS2S_CACHE, else ~/.cache/convs2s/corpus)
    encode_workers: int = 0           # processes encoding a corpus into the cache (0 = every core)
    spm_sample: int = 1_000_000       # sentencepiece trains on at most this many lines per model (0 = all)
    max_len_ratio: float = 0.0        # drop training pairs whose longer side has more than this x the shorter
                                      # side's subwords (0 = keep all; fairseq's WMT scripts clean with 1.5)
    src_lang: str = "de"
    tgt_lang: str = "en"
    save_dir: str = "checkpoints"
    max_epochs: int = 0               # 0 = no limit
    max_updates: int = 0              # 0 = no limit
    max_minutes: float = 0.0          # wall-clock cap on this process's training (0 = no limit)
    max_tokens: int = 4000            # padded tokens per batch per rank (fairseq's --max-tokens)
    seed: int = 1
    resume: str | None = None         # checkpoint to continue from ("" = <save_dir>/last.pt)
    backend: str = "auto"             # fused-op backend: auto | reference | triton | native
    device: str = "auto"              # auto = cuda if available, else cpu
    optimizer: str = "adam"           # adam | nag (SGD with Nesterov momentum, the paper's); adam won on
                                      # Multi30k de-en, small preset, 115 updates: valid loss 5.17 vs 5.60
    lr: float | None = None           # None: 0.25 for nag, 5e-4 for adam
    momentum: float = 0.99
    weight_decay: float = 0.0
    clip_norm: float = 0.1
    label_smoothing: float = 0.1
    lr_scheduler: str = "plateau"     # plateau (x lr_shrink at epoch ends without improvement) | inverse_sqrt |
                                      # cosine (to 0 at max_updates); each after warmup_updates of linear warmup
    warmup_updates: int = 0           # lr rises linearly from lr / warmup_updates to lr over these updates
    lr_shrink: float = 0.1            # plateau: lr multiplier when the validation loss did not improve
    min_lr: float | None = None       # plateau: stop below this lr; None = lr * 1e-4 (four plateaus)
    dropout: float | None = None      # None: the preset's
    # Architecture overrides (None: the arch's), fairseq's option names; layer strings as fairseq writes them.
    encoder_layers: str | None = None          # e.g. "[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2"
    decoder_layers: str | None = None
    decoder_attention: str | None = None       # "True", "False" or one flag per decoder layer "[True, False]"
    encoder_embed_dim: int | None = None
    decoder_embed_dim: int | None = None
    decoder_out_embed_dim: int | None = None
    share_decoder_input_output_embed: bool | None = None
    max_source_positions: int | None = None
    max_target_positions: int | None = None
    vocab_size: int = 8000
    spm_type: str = "bpe"             # bpe | unigram
    joint_vocab: bool = False         # one sentencepiece model for both languages; separate won on de-en,
                                      # small preset, Adam: valid BLEU 14.10 vs 12.28 after 2 epochs (1 seed)
    train_subset: int = 0             # use only the first N training pairs (0 = all)
    val_subset: int = 0               # use only the first N validation pairs (0 = all)
    val_bleu_sentences: int = -1      # greedy-decode this many validation sentences for BLEU (-1 = all, 0 = none)
    log_interval: int = 50            # updates between JSONL train records
    update_freq: int = 1              # batches per update (gradient accumulation, fairseq's --update-freq)
    save_interval_updates: int = 0   # also save last.pt every N updates (0 = at epoch ends and at the stop)
    keep_interval_checkpoints: int = 0   # also write checkpoint_<update>.pt at those updates and keep the newest
                                         # N of them (for convs2s.average; 0 = none, -1 = all)
    deterministic: bool = False       # torch.use_deterministic_algorithms (exact resume on CUDA too)
    metrics_json: str | None = None   # write the final metrics here (rank 0)
    progress: bool = True             # tqdm bars (rank 0)
    num_threads: int = 0              # torch CPU threads (0 = torch's default); 1 wins on a shared, busy CPU


# ----------------------------------------------------------------------------------------------- architecture

ARCHS = list(PRESETS) + [name for name in ARCH_DEFAULTS if name not in PRESETS]
ARCH_OVERRIDES = ("encoder_layers", "decoder_layers", "decoder_attention", "encoder_embed_dim", "decoder_embed_dim",
                  "decoder_out_embed_dim", "share_decoder_input_output_embed", "dropout", "max_source_positions",
                  "max_target_positions")


def parse_layers(text: str, option: str = "--encoder-layers") -> list[tuple[int, ...]]:
    """A fairseq layer string -> [(channels, kernel width[, residual distance]), ...] (convert's safe parser)."""
    value = parse_layer_string(text)
    if not (isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (list, tuple)) and len(v) in (2, 3) and all(type(x) is int for x in v) for v in value)):
        raise ValueError(f"{option} {text!r} is not a non-empty list of (channels, kernel width[, residual]) "
                         "tuples, e.g. \"[(512, 3)] * 9 + [(1024, 3)] * 4\"")
    return [tuple(v) for v in value]


def parse_attention(text: str) -> bool | list[bool]:
    """"True" / "False" / "[True, False, ...]" (fairseq's --decoder-attention) -> a bool or a list of them."""
    value = parse_layer_string(text)
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"--decoder-attention {text!r} must be True, False or a list of them, one per decoder layer")


def arch_fields(name: str) -> dict:
    """The config fields of --arch `name`: a convs2s.model preset or a fairseq fconv architecture."""
    if name in PRESETS:
        return dict(PRESETS[name])
    if name in ARCH_DEFAULTS:
        a = ARCH_DEFAULTS[name]
        return dict(encoder_embed_dim=a["encoder_embed_dim"], encoder_layers=parse_layers(a["encoder_layers"]),
                    decoder_embed_dim=a["decoder_embed_dim"], decoder_layers=parse_layers(a["decoder_layers"]),
                    decoder_out_embed_dim=a["decoder_out_embed_dim"],
                    decoder_attention=parse_attention(a["decoder_attention"]),
                    share_decoder_input_output_embed=a["share_input_output_embed"], dropout=a["dropout"])
    raise ValueError(f"unknown --arch {name!r}; choose auto or one of {', '.join(ARCHS)}")


def model_fields(args: TrainArgs, arch: str) -> dict:
    """--arch's config fields with the command line's overrides, checked together (before any data is read)."""
    fields = arch_fields(arch)
    for name in ARCH_OVERRIDES:
        value = getattr(args, name)
        if value is None:
            continue
        if name in ("encoder_layers", "decoder_layers"):
            value = parse_layers(value, "--" + name.replace("_", "-"))
        elif name == "decoder_attention":
            value = parse_attention(value)
        fields[name] = value
    try:
        cfg = ConvS2SConfig(src_vocab_size=8, tgt_vocab_size=8, **fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--arch {arch} with these overrides is not a valid model: {e}") from None
    if any(cfg.decoder_attention) and cfg.encoder_embed_dim != cfg.decoder_embed_dim:
        # Attention scores are decoder states (projected to decoder_embed_dim) x encoder outputs
        # (encoder_embed_dim), as in fairseq's fconv: the two widths must agree.
        raise ValueError(f"--arch {arch} with these overrides is not a valid model: decoder attention needs "
                         f"encoder_embed_dim == decoder_embed_dim (got {cfg.encoder_embed_dim} and "
                         f"{cfg.decoder_embed_dim})")
    return fields


# ----------------------------------------------------------------------------------------------- lr schedule

LR_SCHEDULERS = ("plateau", "inverse_sqrt", "cosine")


def scheduled_lr(kind: str, base: float, update: int, warmup: int, max_updates: int) -> float:
    """The lr of update number `update` (1-based) under schedule `kind`, `base` being the peak lr (for plateau:
    the lr after its shrinks so far). Warmup: linear, base * update / warmup for update <= warmup. Then plateau
    keeps base; inverse_sqrt gives base * sqrt(warmup / update) (fairseq's, base from update 1 if warmup is 0);
    cosine falls from base to 0 at max_updates (half a cosine period)."""
    if warmup > 0 and update <= warmup:
        return base * update / warmup
    if kind == "plateau":
        return base
    if kind == "inverse_sqrt":
        return base * math.sqrt(max(warmup, 1) / update)
    if kind == "cosine":
        progress = min(1.0, (update - warmup) / max(max_updates - warmup, 1))
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------- RNG state

def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------- loss

def label_smoothed_nll_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_idx: int = PAD_ID):
    """(loss sum, nll sum) over the non-padding targets, in fp32.

    logits (B, T, V), target (B, T). fairseq's label smoothing: (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum
    over the vocabulary of -log p, i.e. eps spread uniformly over the other V - 1 classes.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)                                   # (B, T, V)
    mask = target.ne(pad_idx)                                                        # (B, T)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].sum()
    smooth = -lprobs.sum(dim=-1)[mask].sum()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


# ----------------------------------------------------------------------------------------------- training

def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class _JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def validate(model, ds: data_mod.PairDataset, max_tokens: int, device: torch.device, epsilon: float) -> dict:
    """Label-smoothed and nll loss per target token on `ds` (every rank computes the whole set)."""
    model.eval()
    loss = nll = 0.0
    ntokens = 0
    with autocast_for(device):
        for idx in data_mod.token_batches(ds.src_sizes, ds.tgt_sizes, max_tokens):
            b = ds.collate(idx).to(device)
            batch_loss, batch_nll = label_smoothed_nll_loss(model(b.src_tokens, b.src_lengths, b.prev_output_tokens),
                                                            b.target, epsilon)
            loss, nll, ntokens = loss + float(batch_loss), nll + float(batch_nll), ntokens + b.ntokens
    model.train()
    return {"loss": loss / ntokens, "nll_loss": nll / ntokens, "ppl": math.exp(nll / ntokens)}


def val_bleu(model, tok: Tokenizer, src: list[str], ref: list[str], max_tokens: int) -> dict:
    import sacrebleu
    hyps = translate_lines(model, tok, src, max_tokens=max_tokens)
    bleu = sacrebleu.metrics.BLEU()
    return {"bleu": bleu.corpus_score(hyps, [ref]).score, "bleu_signature": str(bleu.get_signature())}


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN/inf; the run stopped without saving the diverged weights."""


class TrainResult(NamedTuple):
    metrics: dict          # the final numbers (the same on every rank)
    model: ConvS2S         # this rank's model (not DDP-wrapped), in train mode
    tokenizer: Tokenizer


def train(args: TrainArgs) -> TrainResult:
    """Run training as `args` says.

    The process-wide settings a run changes (torch's CPU thread count, deterministic algorithms,
    CUBLAS_WORKSPACE_CONFIG) are restored on return or error: a caller's process is left as it was found.
    """
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _train(args: TrainArgs) -> TrainResult:
    t_start = time.time()
    commit = _git_commit()            # the code this run started with (a checkout may move on while it trains)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    d, device = init_distributed(args.device)
    if args.deterministic:
        # cuBLAS needs a fixed workspace for deterministic results (set before the first CUDA matmul).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # On CUDA an op without a deterministic kernel warns instead of stopping a long run.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    save_dir = Path(args.save_dir)
    if d.main:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".*.pt.tmp-*"):         # left by a run killed while saving
            stale.unlink()
    log = _JsonlLog(save_dir / "train_log.jsonl" if d.main else None)

    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume or save_dir / "last.pt")
        if len(ckpt["rng"]) != d.world_size:
            # Each rank's RNG stream and its position in its share of the epoch's batches are saved per rank;
            # with another number of processes neither maps onto the new ranks, so the run would not continue
            # as it would have.
            raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} process(es), this run has "
                             f"{d.world_size}: resume with the same number of processes (torchrun "
                             f"--nproc-per-node {len(ckpt['rng'])})")
        if any(k.startswith("decoder.convolutions.") for k in ckpt["model"]):
            # The weights load through the decoder's key upgrade, but the optimizer state is a list in parameter
            # order, and that order changed with DecoderLayer: moments would attach to the wrong parameters.
            raise ValueError("the checkpoint predates the DecoderLayer layout: its weights load for translate and "
                             "evaluate, but its optimizer state is in the old parameter order, so training cannot "
                             "resume from it")
        saved = ckpt["args"]
        # The run's identity comes from the checkpoint; limits, logging and devices from this command line.
        keep = {"max_epochs", "max_updates", "max_minutes", "resume", "save_dir", "device", "backend", "data",
                "metrics_json", "progress", "log_interval", "save_interval_updates", "keep_interval_checkpoints",
                "val_bleu_sentences",
                "num_threads", "cache_dir", "encode_workers"}
        args = dataclasses.replace(args, **{k: v for k, v in saved.items()
                                           if k not in keep and k in TrainArgs.__dataclass_fields__})
    preset = args.preset
    if preset == "auto":
        preset = "multi30k" if device.type == "cuda" else "small"
    fields = model_fields(args, preset) if ckpt is None else None
    if (args.train is None) != (args.valid is None):
        raise ValueError("--train PREFIX and --valid PREFIX go together (one's own training and validation files)")
    if args.train is not None and args.data is not None:
        raise ValueError("give either --data (Multi30k) or --train/--valid (one's own files), not both")
    if args.update_freq < 1:
        raise ValueError(f"update_freq must be >= 1 (batches per update), got {args.update_freq}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {args.lr_scheduler!r}")
    if args.lr_scheduler == "cosine" and args.max_updates <= 0:
        raise ValueError("lr_scheduler cosine decays to 0 at --max-updates: give --max-updates")
    if args.warmup_updates < 0:
        raise ValueError(f"warmup_updates must be >= 0, got {args.warmup_updates}")
    lr0 = args.lr if args.lr is not None else {"nag": 0.25, "adam": 5e-4}[args.optimizer]
    min_lr = args.min_lr if args.min_lr is not None else lr0 * 1e-4

    # Data (every rank reads it; rank 0 trains the tokenizer and sends it to the others). A failure on one rank
    # is every rank's error (convs2s.distributed), never a rank left waiting in a broadcast.
    saved_tok = Tokenizer.from_state(ckpt["tokenizer"]) if ckpt is not None else None
    if args.train is not None:
        n_lines = [n for n in (args.val_subset, args.val_bleu_sentences) if n > 0]

        def prepare(tokenizer: Tokenizer | None) -> corpus_mod.Corpus:
            return corpus_mod.prepare(
                args.train, args.valid, args.src_lang, args.tgt_lang, tokenizer=tokenizer, vocab_size=args.vocab_size,
                model_type=args.spm_type, joint=args.joint_vocab, sample=args.spm_sample, cache_dir=args.cache_dir,
                workers=args.encode_workers or None, valid_lines=min(n_lines) if n_lines else -1,
                log=tqdm.write if d.main else None)
        # Rank 0 checks the files, trains the tokenizer and fills the cache; then every rank opens the cache.
        if d.enabled and saved_tok is None:
            saved_tok = Tokenizer.from_state(on_main(lambda: prepare(None).tokenizer.state(), d))
        corpus = run_agreed(lambda: prepare(saved_tok), d, device)
        tok, train_ds, val_ds = corpus.tokenizer, corpus.train, corpus.valid
        val_src, val_tgt = corpus.valid_src, corpus.valid_tgt
        if args.train_subset:
            train_ds.head(args.train_subset)
        if args.val_subset:
            val_ds.head(args.val_subset)
    else:
        names = [data_mod.file_name(s, lang) for s in ("train", "val") for lang in (args.src_lang, args.tgt_lang)]
        data_dir = Path(on_main(lambda: str(data_mod.find_data(args.data, files=names)), d))
        train_src, train_tgt = run_agreed(
            lambda: data_mod.load_pair(data_dir, "train", args.src_lang, args.tgt_lang), d, device)
        val_src, val_tgt = run_agreed(lambda: data_mod.load_pair(data_dir, "val", args.src_lang, args.tgt_lang), d,
                                      device)
        if args.train_subset:
            train_src, train_tgt = train_src[:args.train_subset], train_tgt[:args.train_subset]
        if args.val_subset:
            val_src, val_tgt = val_src[:args.val_subset], val_tgt[:args.val_subset]
        tok = saved_tok or Tokenizer.from_state(on_main(lambda: Tokenizer.train(
            train_src, train_tgt, vocab_size=args.vocab_size, model_type=args.spm_type, joint=args.joint_vocab,
            sample=args.spm_sample).state(), d))
        train_ds = data_mod.PairDataset(tok.encode_src(train_src), tok.encode_tgt(train_tgt))
        val_ds = data_mod.PairDataset(tok.encode_src(val_src), tok.encode_tgt(val_tgt))

    # Model: the same initial weights on every rank (seeded), then a per-rank stream for dropout.
    torch.manual_seed(args.seed)
    if ckpt is not None:
        cfg = ConvS2SConfig.from_dict({**ckpt["config"], "backend": args.backend})
    else:
        cfg = ConvS2SConfig(src_vocab_size=tok.src_vocab_size, tgt_vocab_size=tok.tgt_vocab_size,
                            backend=args.backend, **fields)
    model = ConvS2S(cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    torch.manual_seed(args.seed + d.rank)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if d.enabled else model

    if args.optimizer == "nag":
        opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=args.momentum, nesterov=True,
                              weight_decay=args.weight_decay)
    elif args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr0, weight_decay=args.weight_decay)
    else:
        raise ValueError(f"optimizer must be nag or adam, got {args.optimizer!r}")

    n_train = len(train_ds)
    dropped = train_ds.filter(cfg.max_source_positions, cfg.max_target_positions, args.max_len_ratio)
    val_ds.filter(cfg.max_source_positions, cfg.max_target_positions)
    sampler = data_mod.TokenBatchSampler(train_ds.src_sizes, train_ds.tgt_sizes, args.max_tokens, seed=args.seed,
                                         rank=d.rank, world_size=d.world_size)
    n_bleu = len(val_src) if args.val_bleu_sentences < 0 else min(args.val_bleu_sentences, len(val_src))

    # Schedule state: `plateau_best` drives the lr (epoch ends only, so a mid-epoch stop does not change the
    # schedule and resume stays exact); `best_val` is the best validation loss saved as best.pt.
    state = {"epoch": 1, "batch_in_epoch": 0, "updates": 0, "lr": lr0, "plateau_best": math.inf,
             "best_val": math.inf}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["train_state"])
        _set_rng_state(ckpt["rng"][d.rank], device)

    def set_lr(update: int) -> float:
        lr = scheduled_lr(args.lr_scheduler, state["lr"], update, args.warmup_updates, args.max_updates)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    def checkpoint() -> dict:
        rng = [_rng_state(device)]
        if d.enabled:
            rng = [None] * d.world_size
            dist.all_gather_object(rng, _rng_state(device))
            rng = [{k: v.cpu() for k, v in r.items()} for r in rng]
        return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "tokenizer": tok.state(),
                "model": model.state_dict(), "optimizer": opt.state_dict(), "train_state": dict(state),
                "rng": rng, "args": dataclasses.asdict(args) | {"preset": preset}}

    def save(best: bool) -> None:
        obj = checkpoint()            # every rank joins the RNG gather; rank 0 writes
        if d.main:
            save_checkpoint(obj, save_dir / "last.pt")
            if best:
                save_checkpoint(obj, save_dir / "best.pt")
            n, u = args.save_interval_updates, state["updates"]
            if args.keep_interval_checkpoints and n and u % n == 0:
                save_checkpoint(obj, save_dir / f"checkpoint_{u}.pt")
                _prune_interval_checkpoints(save_dir, u, args.keep_interval_checkpoints)

    def run_validation() -> dict:
        def compute() -> dict:
            v = validate(model, val_ds, args.max_tokens, device, args.label_smoothing)
            if n_bleu:
                v |= val_bleu(model, tok, val_src[:n_bleu], val_tgt[:n_bleu], args.max_tokens)
            return v
        # Rank 0 validates and sends its numbers: the lr schedule and the min-lr stop then agree on every rank
        # (validation on each rank could differ in the last bit on a GPU, and the ranks would part ways).
        v = on_main(compute, d)
        v = {"type": "valid", "epoch": state["epoch"], "update": state["updates"], **v,
             "wall_s": round(time.time() - t_start, 2)}
        log.write(v)
        if d.main:
            bleu = f", BLEU {v['bleu']:.2f}" if "bleu" in v else ""
            tqdm.write(f"epoch {state['epoch']} update {state['updates']}: valid loss {v['loss']:.4f}, "
                       f"ppl {v['ppl']:.2f}{bleu}")
        return v

    if d.main:
        tqdm.write(f"convs2s train: {args.src_lang}->{args.tgt_lang}, preset {preset} ({n_params / 1e6:.2f}M "
                   f"parameters), {len(train_ds)} training pairs ({data_mod.describe_filter(dropped, n_train)}), vocab "
                   f"{tok.src_vocab_size}/{tok.tgt_vocab_size}, device {device}, world size {d.world_size}, "
                   f"{args.optimizer} lr {state['lr']:g}, {args.lr_scheduler} schedule"
                   + (f", {args.warmup_updates} warmup updates" if args.warmup_updates else ""))
        log.write({"type": "start", "args": dataclasses.asdict(args), "preset": preset, "params": n_params,
                   "train_pairs": len(train_ds), "dropped": dropped,
                   "device": str(device), "world_size": d.world_size, "commit": commit, "resumed_at": state["updates"]
                   if ckpt is not None else None})

    deadline = t_start + args.max_minutes * 60 if args.max_minutes > 0 else math.inf
    # The first update of this run whose loss was NaN/inf (0: none), tracked on the device without a host sync;
    # read at log steps and before every validation and save, so a diverged model is never saved.
    first_bad = torch.zeros((), dtype=torch.long, device=device)

    def check_finite() -> None:
        bad = int(first_bad.item())
        if agree(bad > 0, d, device):
            where = f"at update {bad}" if bad else "on another rank"
            msg = (f"training diverged: the loss became NaN/inf {where}; stopped without saving, the last good "
                   f"checkpoint is {save_dir / 'last.pt'}" + ("" if (save_dir / "last.pt").exists() else
                                                              " (none was saved yet)"))
            log.write({"type": "error", "update": state["updates"], "error": msg})
            raise TrainingDiverged(msg)
    last_valid: dict = {}
    stop_reason = None
    tokens_done, loop_s = 0, 0.0      # this process's target tokens and seconds inside the update loop
    model.train()
    while stop_reason is None:
        if args.max_epochs and state["epoch"] > args.max_epochs:
            stop_reason = "max_epochs"
            break
        sampler.set_epoch(state["epoch"], skip=state["batch_in_epoch"])
        bar = tqdm(total=len(sampler) + state["batch_in_epoch"], initial=state["batch_in_epoch"],
                   desc=f"epoch {state['epoch']}", disable=not (d.main and args.progress), dynamic_ncols=True,
                   leave=False)
        interval = torch.zeros(3, dtype=torch.float64, device=device)   # this rank's loss sum, nll sum, tokens
        t_interval = t_loop = time.time()
        for chunk in _chunks(sampler, args.update_freq):
            batches = [train_ds.collate(indices).to(device) for indices in chunk]
            ntokens = sum(b.ntokens for b in batches)
            ntok = all_reduce_sum(torch.tensor([float(ntokens)], device=device), d)
            update_loss = torch.zeros((), device=device)
            lr_now = set_lr(state["updates"] + 1)
            for i, b in enumerate(batches):
                # Gradients of the update's batches accumulate locally; DDP all-reduces after the last one.
                last = i == len(batches) - 1
                with contextlib.nullcontext() if last or not d.enabled else ddp.no_sync():
                    with autocast_for(device):
                        logits = ddp(b.src_tokens, b.src_lengths, b.prev_output_tokens)
                    loss, nll = label_smoothed_nll_loss(logits, b.target, args.label_smoothing)
                    # DDP averages gradients over ranks: scale so the result is the loss sum over all ranks and
                    # batches of the update / all their target tokens.
                    (loss * (d.world_size / ntok)).backward()
                # Summed on the device and read at log steps only: no host sync per update.
                interval += torch.stack([loss.detach(), nll.detach(),
                                         torch.tensor(float(b.ntokens), device=device)])
                update_loss += loss.detach()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_done += ntokens
            state["updates"] += 1
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(update_loss),
                                    torch.tensor(state["updates"], device=device), first_bad)
            state["batch_in_epoch"] += len(batches)
            bar.update(len(batches))
            if state["updates"] % args.log_interval == 0 or state["updates"] == 1:
                check_finite()
                now = time.time()
                loss_sum, nll_sum, ntok_sum = all_reduce_sum(interval, d).tolist()
                rec = {"type": "train", "epoch": state["epoch"], "update": state["updates"],
                       "loss": loss_sum / ntok_sum, "nll_loss": nll_sum / ntok_sum,
                       "ppl": math.exp(nll_sum / ntok_sum), "lr": lr_now, "gnorm": float(gnorm),
                       "tokens_per_s": ntok_sum / max(now - t_interval, 1e-9),
                       "wall_s": round(now - t_start, 2)}
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['ppl']:.1f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{lr_now:.3g}")
                interval.zero_()
                t_interval = now
            # Every rank must take the same stop decision at the same update, or they wait in different
            # collectives: the update count is the same everywhere, the clocks are not (agree() all-reduces).
            if args.max_updates and state["updates"] >= args.max_updates:
                stop_reason = "max_updates"
            elif deadline < math.inf and agree(time.time() > deadline, d, device):
                stop_reason = "max_minutes"
            if stop_reason:
                break
            if args.save_interval_updates and state["updates"] % args.save_interval_updates == 0:
                check_finite()
                save(best=False)
        bar.close()
        loop_s += time.time() - t_loop
        epoch_done = _epoch_complete(sampler, state)
        check_finite()
        last_valid = run_validation()
        improved = last_valid["loss"] < state["best_val"]
        if improved:
            state["best_val"] = last_valid["loss"]
        if epoch_done:
            if last_valid["loss"] < state["plateau_best"]:
                state["plateau_best"] = last_valid["loss"]
            elif args.lr_scheduler == "plateau":
                state["lr"] *= args.lr_shrink
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if stop_reason is None and args.lr_scheduler == "plateau" and state["lr"] < min_lr:
                stop_reason = "min_lr"
        save(best=improved)

    wall = time.time() - t_start
    tokens_done = int(all_reduce_sum(torch.tensor([tokens_done], dtype=torch.float64, device=device), d).item())
    metrics = {
        "preset": preset, "src_lang": args.src_lang, "tgt_lang": args.tgt_lang, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": d.world_size, "params": n_params, "optimizer": args.optimizer, "stop_reason": stop_reason,
        "epochs_completed": state["epoch"] - 1, "updates": state["updates"], "wall_s": round(wall, 2),
        "train_s": round(loop_s, 2), "train_tokens_per_s": tokens_done / max(loop_s, 1e-9),
        "lr": scheduled_lr(args.lr_scheduler, state["lr"], state["updates"] + 1, args.warmup_updates,
                           args.max_updates),      # what the next update would take (after any plateau cut)
        "best_val_loss": state["best_val"],
        "val_loss": last_valid.get("loss"), "val_ppl": last_valid.get("ppl"), "val_bleu": last_valid.get("bleu"),
        "val_bleu_signature": last_valid.get("bleu_signature"), "torch": torch.__version__,
        "commit": commit, "save_dir": str(save_dir),
    }
    if d.main:
        log.write({"type": "end", **metrics})
        tqdm.write(f"done ({stop_reason}): {state['updates']} updates, {state['epoch'] - 1} epochs, "
                   f"{wall / 60:.1f} min; best valid loss {state['best_val']:.4f}; checkpoints in {save_dir}")
        if args.metrics_json:
            Path(args.metrics_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    if d.enabled:
        dist.barrier()
    return TrainResult(metrics, model, tok)


def _prune_interval_checkpoints(save_dir: Path, update: int, keep: int) -> None:
    """Delete the checkpoint_<v>.pt of `save_dir` with v > update (another run's, or one this run has replayed
    since) and, with keep > 0, all but the newest `keep` of the others (fairseq's --keep-interval-updates)."""
    found = sorted((int(p.stem.removeprefix("checkpoint_")), p) for p in save_dir.glob("checkpoint_*.pt")
                   if p.stem.removeprefix("checkpoint_").isdigit())
    older = [p for v, p in found if v <= update]
    for p in [p for v, p in found if v > update] + (older[:-keep] if keep > 0 else []):
        p.unlink(missing_ok=True)


def _chunks(batches, n: int):
    """Consecutive groups of n batches (the last group of an epoch may be shorter): one update each."""
    group = []
    for b in batches:
        group.append(b)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _epoch_complete(sampler: data_mod.TokenBatchSampler, state: dict) -> bool:
    """Whether this rank has consumed every batch of the current epoch."""
    sampler.set_epoch(state["epoch"], skip=state["batch_in_epoch"])
    return len(sampler) == 0
