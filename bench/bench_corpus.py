"""The corpus pipeline at scale (convs2s.corpus): checks, tokenizer training, encoding, cache, first update.

    python bench/bench_corpus.py --pairs 1000000 --work /tmp/bench_corpus --out bench/results/X-corpus.json

Generates (once) a synthetic WMT-like corpus with bench/make_synthetic_corpus.py under --work (never commit it),
then runs each step in a fresh child process, which reports its wall time and its peak RSS (ru_maxrss of itself
and of its own children, i.e. the encoding pool's largest worker):
  check      SHA-256 of both files (what a second run pays) and the line / UTF-8 checks (first run only)
  tokenizer  sentencepiece BPE on a --spm-sample line sample per side (two models, the training default)
  encode     both sides into the memory-mapped cache on every core: sentences/s, cache size on disk
  train      `convs2s train --train ... --arch small --max-updates 3` with everything cached (a second run):
             seconds from the process start to the end of the first update, peak RSS
  startup    the same second run's phases: imports, opening the cache, filtering, the epoch's batches, the model,
             the first forward + backward
  replicated the second run's data side at --replicate-pairs (default 4.5 M, WMT'14 En-De's size): the encoded
             corpus repeated into a cache of that size, opened, filtered, batched (time, peak RSS)
  lists      today's in-memory way at --list-pairs: lines read into Python lists, encoded to lists of lists
             (data.PairDataset), batches built: peak RSS over the same process's baseline, vs the cache's
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # Linux: KiB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(kids, 1)}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _files(work: Path):
    from convs2s.corpus import find_pair
    return find_pair(work / "train", "en", "de"), find_pair(work / "valid", "en", "de")


# ----------------------------------------------------------------------------------------------- steps (children)

def step_check(a) -> dict:
    from convs2s import corpus as C
    pair, _ = _files(Path(a.work))
    t0 = time.time()
    C.pair_sha256(pair)
    t_hash = time.time() - t0
    t0 = time.time()
    n = C.check_pair(pair, None)
    t_check = time.time() - t0
    size = sum(p.stat().st_size for p in pair)
    return {"pairs": n, "bytes": size, "sha256_s": round(t_hash, 2), "sha256_mb_per_s": round(size / 2**20 / t_hash),
            "check_s": round(t_check, 2), "check_mb_per_s": round(size / 2**20 / t_check)}


def step_tokenizer(a) -> dict:
    from convs2s import corpus as C
    pair, _ = _files(Path(a.work))
    t0 = time.time()
    tok = C.train_tokenizer(pair, Path(a.work) / "cache", vocab_size=a.vocab_size, sample=a.spm_sample)
    return {"seconds": round(time.time() - t0, 1), "vocab": [tok.src_vocab_size, tok.tgt_vocab_size],
            "sample_lines_per_model": a.spm_sample, "models": 2}


def step_encode(a) -> dict:
    from convs2s import corpus as C
    pair, valid = _files(Path(a.work))
    cache = Path(a.work) / "cache"
    tok = C.train_tokenizer(pair, cache, vocab_size=a.vocab_size, sample=a.spm_sample)
    workers = os.cpu_count() or 1
    t0 = time.time()
    ds = C.encode_pair(pair, tok, cache, workers=workers)
    seconds = time.time() - t0
    C.encode_pair(valid, tok, cache, workers=workers)
    n = len(ds)
    disk = sum(p.stat().st_size for p in ds.folder.iterdir())
    tokens = int(ds._src.offsets[-1] + ds._tgt.offsets[-1])
    return {"pairs": n, "workers": workers, "seconds": round(seconds, 1), "sentences_per_s": round(2 * n / seconds),
            "tokens": tokens, "tokens_per_sentence": round(tokens / 2 / n, 1),
            "ids_dtype": str(ds._src.ids.dtype), "cache_bytes": disk, "cache_mb": round(disk / 2**20, 1),
            "cache_bytes_per_pair": round(disk / n, 1), **_rss_mb()}


def step_train(a) -> dict:
    from convs2s.train import TrainArgs, train
    work = Path(a.work)
    save = work / "run"
    log = save / "train_log.jsonl"
    if log.exists():
        log.unlink()
    t_call = time.time()
    r = train(TrainArgs(train=str(work / "train"), valid=str(work / "valid"), src_lang="en", tgt_lang="de",
                        cache_dir=str(work / "cache"), vocab_size=a.vocab_size, spm_sample=a.spm_sample, preset="small",
                        save_dir=str(save), max_updates=3, log_interval=1, val_subset=100, val_bleu_sentences=0,
                        progress=False, num_threads=1))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    first = next(r for r in records if r["type"] == "train")
    start = next(r for r in records if r["type"] == "start")
    return {"train_called_at": t_call, "first_update_wall_s_after_call": first["wall_s"],
            "train_pairs_after_filter": start["train_pairs"], "updates": r.metrics["updates"], "arch": "small",
            "max_tokens": 4000, **_rss_mb()}


def step_startup(a) -> dict:
    """What a second run spends before its first update, phase by phase (everything cached)."""
    t0 = time.time()
    import torch
    t_torch = time.time() - t0
    from convs2s import corpus as C
    from convs2s import data as D
    from convs2s.model import ConvS2S, ConvS2SConfig
    from convs2s.train import arch_fields, label_smoothed_nll_loss
    phases = {"import_torch_s": t_torch, "import_convs2s_s": time.time() - t0 - t_torch}
    work = Path(a.work)

    def timed(name, fn):
        t = time.time()
        value = fn()
        phases[name] = time.time() - t
        return value
    c = timed("prepare_cached_s", lambda: C.prepare(work / "train", work / "valid", "en", "de", vocab_size=a.vocab_size,
                                                     sample=a.spm_sample, cache_dir=work / "cache", valid_lines=0))
    timed("filter_s", lambda: (c.train.filter(1024, 1024), c.valid.filter(1024, 1024)))
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = timed("build_model_s", lambda: ConvS2S(ConvS2SConfig(src_vocab_size=c.tokenizer.src_vocab_size,
                                                                  tgt_vocab_size=c.tokenizer.tgt_vocab_size,
                                                                  **arch_fields("small"))))
    sampler = D.TokenBatchSampler(c.train.src_sizes, c.train.tgt_sizes, 4000)
    first = timed("epoch_batches_s", lambda: next(iter(sampler)))
    batch = timed("collate_s", lambda: c.train.collate(first))

    def update():
        logits = model(batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)
        label_smoothed_nll_loss(logits, batch.target, 0.1)[0].backward()
    timed("first_forward_backward_s", update)
    phases = {k: round(v, 3) for k, v in phases.items()}
    data = ("prepare_cached_s", "filter_s", "epoch_batches_s", "collate_s")
    return {**phases, "data_side_s": round(sum(phases[k] for k in data), 2), "batches_per_epoch": len(sampler),
            "pairs": len(c.train), **_rss_mb()}


def step_replicated(a) -> dict:
    """The data side of a second run at --replicate-pairs (e.g. WMT'14's 4.5 M) without encoding that many: the
    encoded corpus repeated into a cache folder of that size, then opened, filtered and batched."""
    import numpy as np

    import convs2s.train  # noqa: F401  (what a training process imports: the RSS baseline)
    from convs2s import corpus as C
    from convs2s import data as D
    rss_imports = _rss_mb()["peak_rss_mb"]
    pair, _ = _files(Path(a.work))
    tok = C.train_tokenizer(pair, Path(a.work) / "cache", vocab_size=a.vocab_size, sample=a.spm_sample)
    base = C.encode_pair(pair, tok, Path(a.work) / "cache")
    folder = Path(a.work) / f"replicated-{a.replicate_pairs}"
    if not (folder / "meta.json").is_file():
        folder.mkdir(exist_ok=True)
        meta = json.loads((base.folder / "meta.json").read_text())
        n = len(base)
        for side, s in (("src", base._src), ("tgt", base._tgt)):
            lengths = np.resize(s.lengths, a.replicate_pairs)
            offsets = np.zeros(a.replicate_pairs + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            with open(folder / f"{side}.ids", "wb") as f:
                for start in range(0, a.replicate_pairs, n):
                    end = min(start + n, a.replicate_pairs) - start
                    f.write(np.asarray(s.ids[:int(s.offsets[end])]).tobytes())
            np.save(folder / f"{side}.offsets.npy", offsets)
            meta[side].update(sentences=a.replicate_pairs, tokens=int(offsets[-1]))
        (folder / "meta.json").write_text(json.dumps(meta))
    t0 = time.time()
    ds = C.CorpusDataset.open(folder)
    t_open = time.time() - t0
    t0 = time.time()
    ds.filter(1024, 1024)
    t_filter = time.time() - t0
    t0 = time.time()
    sampler = D.TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, 4000)
    first = next(iter(sampler))
    t_batches = time.time() - t0
    ds.collate(first)
    return {"pairs": len(ds), "open_s": round(t_open, 3), "filter_s": round(t_filter, 3),
            "epoch_batches_s": round(t_batches, 2), "data_side_s": round(t_open + t_filter + t_batches, 2),
            "batches_per_epoch": len(sampler), "peak_rss_after_imports_mb": rss_imports, **_rss_mb()}


def step_lists(a) -> dict:
    import itertools

    import numpy as np
    import torch

    from convs2s import corpus as C
    from convs2s import data as D
    pair, _ = _files(Path(a.work))
    tok = C.train_tokenizer(pair, Path(a.work) / "cache", vocab_size=a.vocab_size, sample=a.spm_sample)
    n = a.list_pairs
    base = _current_rss_mb()
    # The cache's way: the first n pairs of the cached corpus, ready to batch.
    ds = C.encode_pair(pair, tok, Path(a.work) / "cache")
    ds.head(n)
    sampler = D.TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, 4000)
    batches = list(sampler)
    cache_mb = _current_rss_mb() - base
    del ds, sampler, batches
    # Today's way: lines as Python lists, encoded to lists of lists of ints.
    base2 = _current_rss_mb()
    t0 = time.time()
    src = list(itertools.islice(C.iter_lines(pair.src), n))
    tgt = list(itertools.islice(C.iter_lines(pair.tgt), n))
    mem = D.PairDataset(tok.encode_src(src), tok.encode_tgt(tgt))
    sampler = D.TokenBatchSampler(mem.src_sizes, mem.tgt_sizes, 4000)
    batches = list(sampler)
    lists_s = time.time() - t0
    lists_mb = _current_rss_mb() - base2
    assert len(batches) and isinstance(batches[0], np.ndarray) and torch.is_tensor(mem.collate(batches[0]).target)
    return {"pairs": n, "cache_rss_mb": round(cache_mb, 1), "lists_rss_mb": round(lists_mb, 1),
            "cache_bytes_per_pair_in_ram": round(cache_mb * 2**20 / n, 1),
            "lists_bytes_per_pair_in_ram": round(lists_mb * 2**20 / n, 1),
            "lists_encode_s_one_process": round(lists_s, 1), **_rss_mb()}


STEPS = {"check": step_check, "tokenizer": step_tokenizer, "encode": step_encode, "train": step_train,
         "startup": step_startup, "replicated": step_replicated, "lists": step_lists}


# ----------------------------------------------------------------------------------------------- driver

def _child(step: str, a) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--work", a.work, "--vocab-size", str(a.vocab_size),
           "--spm-sample", str(a.spm_sample), "--list-pairs", str(a.list_pairs),
           "--replicate-pairs", str(a.replicate_pairs)]
    load = os.getloadavg()[0]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"step {step} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.time() - t0, 1)
    result["load_avg_1min_before"] = round(load, 2)
    if step == "train":
        result["time_to_first_update_s"] = round(result.pop("train_called_at") - t0
                                                  + result["first_update_wall_s_after_call"], 2)
    print(f"{step}: {json.dumps(result)}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--work", default="/tmp/bench_corpus", help="corpus, cache and run folder (not committed)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--spm-sample", type=int, default=1_000_000)
    p.add_argument("--list-pairs", type=int, default=200_000)
    p.add_argument("--replicate-pairs", type=int, default=4_500_000, help="size of the 'replicated' step")
    p.add_argument("--steps", default="check,tokenizer,encode,train,startup,replicated,lists")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:
        print(json.dumps(STEPS[a.step](a)))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", a.pairs, 1), ("valid", 3000, 2)):
        if not (work / f"{name}.en").is_file():
            subprocess.run([sys.executable, str(ROOT / "bench" / "make_synthetic_corpus.py"), "--pairs", str(n),
                            "--out", str(work / name), "--seed", str(seed)], check=True)
    results = {"command": " ".join([Path(sys.executable).name, "bench/bench_corpus.py", *(argv or sys.argv[1:])]),
               "pairs": a.pairs, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip()}
    for step in a.steps.split(","):
        results[step] = _child(step, a)
    text = json.dumps(results, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
