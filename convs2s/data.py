"""Multi30k task 1: finding (or downloading) the raw files, reading sentence pairs, token-count batching.

    data_dir = find_data(data)                   --data DIR, else $CONVS2S_DATA, else ~/.cache/convs2s/multi30k
                                                 (downloaded from the multi30k/dataset repository on first use)
    src, tgt = load_pair(data_dir, "train", "de", "en")          lists of str, one per sentence
    ds = PairDataset(tok.encode_src(src), tok.encode_tgt(tgt))   EOS appended to both sides
    sampler = TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, max_tokens=4000, seed=1, rank=r, world_size=w)
    for indices in sampler: batch = ds.collate(indices)        Batch(src_tokens (B, Ts), ..., target (B, Tt))
    ds.filter(max_src=1024, max_tgt=1024, max_len_ratio=1.5) -> {reason: pairs dropped}      (length_filter)

One's own corpora (--train PREFIX) go through convs2s.corpus instead: the same batching and Batch, over an
encoded on-disk cache.

Every file read is checked against its SHA-256 (the sums of the official raw files are embedded below), so a
truncated copy or a partial download is an error saying where the file was and what to do, never silent
garbage.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr")
LANGS = ("de", "en", "fr", "cs")
# The official raw files: https://github.com/multi30k/dataset/tree/master/data/task1/raw
BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convs2s" / "multi30k"

SHA256 = {
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2017_flickr.de.gz": "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
    "test_2017_flickr.en.gz": "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
    "test_2017_flickr.fr.gz": "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}


class DataError(RuntimeError):
    """A Multi30k file is missing or corrupt; the message says where it looked and what to do."""


def file_name(split: str, lang: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; Multi30k task 1 has {', '.join(SPLITS)}")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; Multi30k task 1 has {', '.join(LANGS)}")
    name = f"{split}.{lang}.gz"
    if name not in SHA256:
        raise ValueError(f"Multi30k has no {split} split for {lang!r} (test_2017_flickr exists for de, en, fr)")
    return name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path) -> None:
    """Raise DataError unless `path` exists and has the official SHA-256 of its file name."""
    expected = SHA256[path.name]
    if not path.is_file():
        raise DataError(f"{path} is missing. Pass --data DIR (or set CONVS2S_DATA) to a folder holding the "
                        f"Multi30k task-1 raw files, or leave both unset to download them into {CACHE_DIR}.")
    got = sha256(path)
    if got != expected:
        raise DataError(f"{path} is corrupt: SHA-256 {got}, expected {expected}. Delete it and download it "
                        f"again ({BASE_URL}{path.name}), or point --data / CONVS2S_DATA at a good copy.")


def download(names: Sequence[str], cache_dir: Path = CACHE_DIR, base_url: str = BASE_URL) -> Path:
    """Fetch the files in `names` missing from `cache_dir` from `base_url` (https:// or file://), verified.

    A file is written under a temporary name and renamed only once its checksum is right, so an interrupted or
    corrupted download never leaves a file that looks complete.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for name in names:
        dest = cache_dir / name
        if dest.is_file() and sha256(dest) == SHA256[name]:
            continue
        url = base_url + name
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=60) as resp:
                        shutil.copyfileobj(resp, out)
                except OSError as e:
                    raise DataError(f"could not download {url} ({e}). Check the network, or pass --data DIR "
                                    "(or set CONVS2S_DATA) to a folder holding the Multi30k task-1 raw files.") from e
            got = sha256(Path(tmp))
            if got != SHA256[name]:
                raise DataError(f"{url} has SHA-256 {got}, expected {SHA256[name]}: the download is corrupt or "
                                "the source changed. Nothing was saved; retry, or pass --data DIR with good files.")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return cache_dir


def find_data(data: str | os.PathLike | None = None, *, files: Sequence[str] = (), cache_dir: Path = CACHE_DIR,
              base_url: str = BASE_URL) -> Path:
    """The folder holding the Multi30k raw files: `data`, else $CONVS2S_DATA, else the download cache.

    An explicit folder (argument or environment) is used as it is: nothing is downloaded into it. Without one,
    the files in `files` (names like "train.de.gz") are downloaded into `cache_dir` when missing.
    """
    explicit = data if data not in (None, "") else os.environ.get("CONVS2S_DATA") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            source = "--data" if data not in (None, "") else "CONVS2S_DATA"
            raise DataError(f"{source} points at {path}, which is not a folder. Point it at a folder holding the "
                            "Multi30k task-1 raw files (train.de.gz, ...), or unset it to download them into "
                            f"{cache_dir}.")
        return path
    return download(files, cache_dir, base_url)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a plain or gzip-compressed UTF-8 text file, without their line ends."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def load_split(data_dir: Path, split: str, lang: str) -> list[str]:
    """The sentences of one Multi30k file, checksum-verified."""
    path = Path(data_dir) / file_name(split, lang)
    verify(path)
    return read_lines(path)


def load_pair(data_dir: Path, split: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    if src_lang == tgt_lang:
        raise ValueError(f"source and target language are both {src_lang!r}")
    src, tgt = load_split(data_dir, split, src_lang), load_split(data_dir, split, tgt_lang)
    if len(src) != len(tgt):
        raise DataError(f"{split}: {len(src)} {src_lang} lines but {len(tgt)} {tgt_lang} lines in {data_dir}")
    return src, tgt


class Batch(NamedTuple):
    src_tokens: torch.Tensor          # (B, Ts) source ids + EOS, right-padded with PAD
    src_lengths: torch.Tensor         # (B,) real source lengths (EOS included)
    prev_output_tokens: torch.Tensor  # (B, Tt) BOS + target ids, right-padded
    target: torch.Tensor              # (B, Tt) target ids + EOS, right-padded
    ntokens: int                      # real target tokens (the loss is normalised by this)
    indices: torch.Tensor             # (B,) the sentences' positions in the dataset

    def to(self, device) -> Batch:
        return self._replace(**{k: getattr(self, k).to(device, non_blocking=True)
                                for k in ("src_tokens", "src_lengths", "prev_output_tokens", "target", "indices")})


def pad_right(seqs: Sequence[Sequence[int]], pad: int = PAD_ID) -> torch.Tensor:
    """(B, max length) int64, each row a sequence followed by `pad`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class PairDataset:
    """Tokenized sentence pairs. Source = ids + EOS (fairseq's convention); target = ids + EOS; the decoder
    input is BOS + ids. Pairs longer than the model's positions are dropped by `filter_long`."""

    def __init__(self, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]] | None = None):
        if tgt_ids is not None and len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} source sentences but {len(tgt_ids)} target sentences")
        self.src = [list(s) + [EOS_ID] for s in src_ids]
        self.tgt = [list(t) + [EOS_ID] for t in tgt_ids] if tgt_ids is not None else None
        self.keep = list(range(len(self.src)))

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def src_sizes(self) -> list[int]:
        return [len(self.src[i]) for i in self.keep]

    @property
    def tgt_sizes(self) -> list[int]:
        return [len(self.tgt[i]) for i in self.keep] if self.tgt is not None else [0] * len(self.keep)

    def filter_long(self, max_src: int, max_tgt: int) -> int:
        """Drop pairs whose source or target (with EOS) exceeds the limits; returns how many were dropped."""
        before = len(self.keep)
        self.keep = [i for i in self.keep
                     if len(self.src[i]) <= max_src and (self.tgt is None or len(self.tgt[i]) <= max_tgt)]
        return before - len(self.keep)

    def filter(self, max_src: int, max_tgt: int, max_len_ratio: float = 0.0) -> dict[str, int]:
        """Drop pairs by length (see length_filter); returns {reason: pairs dropped}."""
        if self.tgt is None:
            raise ValueError("filter needs target sentences; use filter_long for a source-only dataset")
        keep = np.asarray(self.keep, dtype=np.int64)
        mask, counts = length_filter(np.array([len(self.src[i]) - 1 for i in keep], dtype=np.int64),
                                     np.array([len(self.tgt[i]) - 1 for i in keep], dtype=np.int64),
                                     max_src, max_tgt, max_len_ratio)
        self.keep = keep[mask].tolist()
        return counts

    def collate(self, indices: Sequence[int]) -> Batch:
        """A right-padded batch of the pairs at `indices` (positions among the kept pairs)."""
        rows = [self.keep[i] for i in indices]
        src = [self.src[r] for r in rows]
        src_tokens = pad_right(src)
        src_lengths = torch.tensor([len(s) for s in src], dtype=torch.long)
        if self.tgt is None:
            empty = torch.empty(len(rows), 0, dtype=torch.long)
            return Batch(src_tokens, src_lengths, empty, empty, 0, torch.tensor(rows))
        tgt = [self.tgt[r] for r in rows]
        target = pad_right(tgt)
        prev = pad_right([[BOS_ID] + t[:-1] for t in tgt])
        return Batch(src_tokens, src_lengths, prev, target, sum(len(t) for t in tgt), torch.tensor(rows))


def token_batches(src_sizes: Sequence[int], tgt_sizes: Sequence[int], max_tokens: int,
                  generator: torch.Generator | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each holding at most `max_tokens` padded tokens
    (batch size x the longest source or target in it), as fairseq's --max-tokens counts. Each batch is an int64
    array (a view of one permutation: 4.5 M sentences cost 36 MB, not 4.5 M Python ints).

    With a generator, equal-length sentences are ordered at random (so batches differ between epochs) and the
    batch order is shuffled; without one, the order is deterministic (validation, translation).
    """
    sizes = np.maximum(np.asarray(src_sizes, dtype=np.int64), np.asarray(tgt_sizes, dtype=np.int64))
    n = len(sizes)
    if n == 0:
        return []
    if sizes.max() > max_tokens:
        i = int(np.argmax(sizes > max_tokens))
        raise ValueError(f"sentence {i} has {int(sizes[i])} tokens, more than --max-tokens {max_tokens}")
    tie = torch.rand(n, generator=generator) if generator is not None else torch.arange(n, dtype=torch.float) / n
    # Sort by (size, tie): the tie-breaker is in [0, 1), so size dominates and buckets stay tight.
    order = torch.argsort(torch.from_numpy(sizes).double() + tie.double()).numpy()
    ordered = sizes[order]                                       # non-decreasing
    # Greedy, as one pass adding sentences in order would: a batch starting at p holds p..p+k-1 where k is the
    # first count at which the newest (longest) sentence x the count exceeds max_tokens; at most
    # max_tokens // ordered[p] sentences fit, so only that window is looked at.
    batches, p = [], 0
    while p < n:
        window = ordered[p:p + max_tokens // max(int(ordered[p]), 1)]
        over = window * np.arange(1, len(window) + 1) > max_tokens
        k = int(np.argmax(over)) if over.any() else len(window)
        batches.append(order[p:p + k])
        p += k
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def length_filter(src_len: np.ndarray, tgt_len: np.ndarray, max_src: int, max_tgt: int,
                  max_len_ratio: float = 0.0) -> tuple[np.ndarray, dict[str, int]]:
    """Which pairs to keep, and how many are dropped for each reason (each pair counted under its first reason).

    src_len / tgt_len: (n,) token counts without EOS. max_src / max_tgt bound the length with EOS (the model's
    positions); max_len_ratio > 0 drops pairs whose longer side has more than ratio x the shorter side's tokens
    (Moses clean-corpus-n's -ratio, as fairseq's WMT preparation scripts use it, counted in subwords here).
    """
    src_len, tgt_len = np.asarray(src_len, dtype=np.int64), np.asarray(tgt_len, dtype=np.int64)
    reasons = [("empty source or target", (src_len == 0) | (tgt_len == 0)),
               (f"source longer than {max_src - 1} tokens", src_len + 1 > max_src),
               (f"target longer than {max_tgt - 1} tokens", tgt_len + 1 > max_tgt)]
    if max_len_ratio > 0:
        longer, shorter = np.maximum(src_len, tgt_len), np.maximum(np.minimum(src_len, tgt_len), 1)
        reasons.append((f"length ratio above {max_len_ratio:g}", longer > max_len_ratio * shorter))
    keep = np.ones(len(src_len), dtype=bool)
    counts = {}
    for reason, drop in reasons:
        counts[reason] = int((drop & keep).sum())
        keep &= ~drop
    return keep, counts


def describe_filter(counts: dict[str, int], total: int) -> str:
    dropped = sum(counts.values())
    detail = ", ".join(f"{n} {reason}" for reason, n in counts.items() if n)
    return f"dropped {dropped} of {total} pairs" + (f" ({detail})" if detail else "")



class TokenBatchSampler:
    """A distributed sampler of token-count batches: every rank sees a disjoint share of the same epoch's batches.

    The batches of an epoch depend only on (seed, epoch), so every rank builds the same list and takes
    batches[rank::world_size]; the list is first extended by wrapping around to a multiple of world_size, so
    every rank runs the same number of steps (DDP's all-reduce needs it). `skip` (resume) drops the first
    batches of this rank's share.
    """

    def __init__(self, src_sizes: Sequence[int], tgt_sizes: Sequence[int], max_tokens: int, *, shuffle: bool = True,
                 seed: int = 1, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.src_sizes = np.asarray(src_sizes, dtype=np.int64)
        self.tgt_sizes = np.asarray(tgt_sizes, dtype=np.int64)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 1, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build())
        return self._cache[1]

    def _build(self) -> list[np.ndarray]:
        gen = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = token_batches(self.src_sizes, self.tgt_sizes, self.max_tokens, gen)
        if batches and len(batches) % self.world_size:
            extra = self.world_size - len(batches) % self.world_size
            batches += (batches * (extra // len(batches) + 1))[:extra]
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(len(self._batches()) - self.skip, 0)

    def __iter__(self):
        return iter(self._batches()[self.skip:])
