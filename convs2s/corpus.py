"""Parallel corpora from one's own files, at WMT scale: checks, a sampled tokenizer, an encoded on-disk cache.

    pair = find_pair("data/train", "en", "de")       PairFiles(src=data/train.en[.gz], tgt=data/train.de[.gz])
    n = check_pair(pair, cache_dir)                  line count; CorpusError on a mismatch, bad UTF-8, empty file
    tok = train_tokenizer(pair, cache_dir, vocab_size=8000, sample=1_000_000)    cached by content and options
    ds = encode_pair(pair, tok, cache_dir)           CorpusDataset over memory-mapped token ids
    report = ds.filter(max_src=1024, max_tgt=1024, max_len_ratio=1.5)            {reason: pairs dropped}
    sampler = TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, ...); ds.collate(indices) -> data.Batch

The cache (default $CONVS2S_CACHE, else ~/.cache/convs2s/corpus) holds, per encoded corpus, a folder named by a
hash of (the files' SHA-256, the tokenizer models' SHA-256, the format):
    src.ids, tgt.ids          every sentence's token ids back to back (no EOS), uint16 when the vocabulary has at
                              most 65,536 entries, else int32; read with np.memmap, so the process holds none of it
    src.offsets.npy, ...      (n + 1,) int64: sentence i is ids[offsets[i]:offsets[i + 1]]
    meta.json                 dtype, counts, the source files and hashes
A folder is written under a temporary name and renamed when complete, so a killed run never leaves a half cache.
Files are identified by the SHA-256 of their bytes (compressed bytes for .gz), not by size and modification time
alone: copies made with cp -p, rsync -a or tar keep both while the content may differ, and a stale cache would
train on the wrong text silently. Hashing reads every byte (172 MB/s for two files on two busy cores, measured by
bench/bench_corpus.py), so each file's hash is remembered in the cache under its identity including ctime, which
every write changes (file_sha256): a second run pays a stat per file. The line checks run once per file content
and leave a stamp, so a second run skips them too.

Multi30k (`--data`) keeps its in-memory path (convs2s.data: 29k pairs, files checked against embedded
checksums); the same files given as --train/--valid prefixes go through this cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .data import Batch, length_filter
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

FORMAT = 1
CHUNK_BYTES = 4 << 20          # text per encoding task (~25k WMT-like lines): large enough to amortise the pipe
_LANG = re.compile(r"[A-Za-z0-9_-]+")


class CorpusError(ValueError):
    """A corpus file is missing, unreadable or inconsistent; the message names the file (and line)."""


def default_cache_dir() -> Path:
    explicit = os.environ.get("CONVS2S_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convs2s" / "corpus"


# ----------------------------------------------------------------------------------------------- files

class PairFiles(NamedTuple):
    src: Path
    tgt: Path


def find_side(prefix: str | os.PathLike, lang: str, what: str = "corpus") -> Path:
    """PREFIX.lang or PREFIX.lang.gz (exactly one of them must exist)."""
    if not _LANG.fullmatch(lang or ""):
        raise CorpusError(f"language code {lang!r} must be letters, digits, '_' or '-' (it names PREFIX.{lang})")
    plain = Path(f"{prefix}.{lang}")
    gz = Path(f"{plain}.gz")
    found = [p for p in (plain, gz) if p.is_file()]
    if not found:
        raise CorpusError(f"the {what} has no {lang} side: neither {plain} nor {gz} exists")
    if len(found) == 2:
        raise CorpusError(f"both {plain} and {gz} exist for the {what}'s {lang} side; keep one")
    return found[0]


def find_pair(prefix: str | os.PathLike, src_lang: str, tgt_lang: str, what: str = "corpus") -> PairFiles:
    if src_lang == tgt_lang:
        raise CorpusError(f"source and target language are both {src_lang!r}")
    return PairFiles(find_side(prefix, src_lang, what), find_side(prefix, tgt_lang, what))


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_blocks(path: Path, block_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The file's bytes (decompressed) in blocks that end at a line end (the last one maybe not), never split
    inside a line."""
    rest = b""
    try:
        with _open_binary(path) as f:
            while True:
                data = f.read(block_bytes)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                rest = data[cut:]
                yield data[:cut]
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorpusError(f"cannot read {path}: {e}") from None
    if rest:
        yield rest


def _lines(block: bytes) -> list[str]:
    """A block's lines as str, without line ends ("\\n" or "\\r\\n")."""
    lines = block.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [s[:-1] if s.endswith("\r") else s for s in lines]


def iter_lines(path: Path) -> Iterator[str]:
    for block in iter_blocks(path):
        yield from _lines(block)


def read_head(path: Path, n: int) -> list[str]:
    """The first n lines of a file (all when n < 0)."""
    out: list[str] = []
    for line in iter_lines(path):
        if 0 <= n <= len(out):
            break
        out.append(line)
    return out


def count_lines(path: Path) -> int:
    """Lines of a UTF-8 text file; CorpusError with the line number at the first invalid byte, or when empty."""
    n = 0
    for block in iter_blocks(path):
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as e:
            line = n + block.count(b"\n", 0, e.start) + 1
            column = e.start - block.rfind(b"\n", 0, e.start)
            raise CorpusError(f"{path}, line {line}: invalid UTF-8 ({e.reason} at byte {column} of the line); "
                              "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        n += block.count(b"\n") + (not block.endswith(b"\n"))
    if n == 0:
        raise CorpusError(f"{path} is empty")
    return n


def file_sha256(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of the file's bytes. With `cache_dir`, remembered there under the file's identity (path, device,
    inode, size, mtime, ctime): any write to the file changes its ctime, which cp -p, rsync -a and touch cannot
    set back, so a changed file is hashed again while an unchanged one costs one stat (git's index does the same)."""
    st = os.stat(path)
    memo = None
    if cache_dir is not None:
        identity = [str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        memo = Path(cache_dir) / "sha256" / _digest(identity)
        if memo.is_file():
            return memo.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)                  # hashlib releases the GIL on large buffers: two files, two threads
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(memo, h.hexdigest())
    return h.hexdigest()


def pair_sha256(pair: PairFiles, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    with ThreadPoolExecutor(2) as pool:
        return tuple(pool.map(lambda p: file_sha256(p, cache_dir), pair))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def check_pair(pair: PairFiles, cache_dir: str | os.PathLike | None = None, what: str = "corpus") -> int:
    """The number of sentence pairs, after checking both files: valid UTF-8, not empty, equal line counts.

    The result is stamped in `cache_dir` by content hash, so the same files are not read again.
    """
    stamp = None
    if cache_dir is not None:
        stamp = Path(cache_dir) / f"checked-{_digest(pair_sha256(pair, cache_dir))}.json"
        if stamp.is_file():
            return json.loads(stamp.read_text())["lines"]
    with ThreadPoolExecutor(2) as pool:
        n_src, n_tgt = pool.map(count_lines, pair)
    if n_src != n_tgt:
        raise CorpusError(f"the {what}'s sides differ in length: {pair.src} has {n_src} lines but {pair.tgt} has "
                          f"{n_tgt}; a parallel corpus needs one line per sentence on both sides")
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(stamp, json.dumps({"lines": n_src, "files": [str(p) for p in pair]}))
    return n_src


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(pair: PairFiles, cache_dir: str | os.PathLike | None, *, vocab_size: int = 8000,
                    model_type: str = "bpe", joint: bool = False, sample: int = 1_000_000) -> Tokenizer:
    """A sentencepiece tokenizer trained on (at most) `sample` lines per model drawn uniformly from the files
    (sentencepiece's input_sentence_size + shuffle_input_sentence), streamed, never all in memory.

    Cached in `cache_dir` by (the files' SHA-256, the options): the same command trains it once.
    """
    path = None
    if cache_dir is not None:
        key = _digest({"files": pair_sha256(pair, cache_dir), "vocab_size": vocab_size, "model_type": model_type,
                       "joint": joint, "sample": sample})
        path = Path(cache_dir) / f"tokenizer-{key}.pt"
        if path.is_file():
            return Tokenizer.from_state(torch.load(path, weights_only=True))
    tok = Tokenizer.train(iter_lines(pair.src), iter_lines(pair.tgt), vocab_size=vocab_size, model_type=model_type,
                          joint=joint, sample=sample)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(tok.state(), buf)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    return tok


# ----------------------------------------------------------------------------------------------- encoding

def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


_WORKER_SP = None


def _worker_init(proto: bytes) -> None:
    global _WORKER_SP
    import sentencepiece as spm
    _WORKER_SP = spm.SentencePieceProcessor()
    _WORKER_SP.LoadFromSerializedProto(proto)


def _encode_block(args) -> tuple[np.ndarray, bytes]:
    """(lengths (lines,) int32, ids as bytes of `dtype`) of one block of text; runs in a worker."""
    block, dtype = args
    ids = _WORKER_SP.encode(_lines(block), out_type=int)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return lengths, flat.tobytes()


def _encode_file(path: Path, proto: bytes, vocab_size: int, out: Path, workers: int,
                 block_bytes: int) -> np.ndarray:
    """Encode `path` into the raw id file `out`; returns the offsets (n + 1,) int64."""
    dtype = ids_dtype(vocab_size)
    lengths: list[np.ndarray] = []
    tasks = ((block, dtype) for block in iter_blocks(path, block_bytes))
    with open(out, "wb") as f:
        if workers > 1:
            import multiprocessing as mp
            # fork: the workers need only sentencepiece and numpy, and a spawned one would import torch again
            # (~2 s and ~300 MB each); torch's own DataLoader forks its workers the same way.
            with mp.get_context("fork").Pool(workers, _worker_init, (proto,)) as pool:
                for lens, ids in pool.imap(_encode_block, tasks):
                    lengths.append(lens)
                    f.write(ids)
        else:
            _worker_init(proto)
            for task in tasks:
                lens, ids = _encode_block(task)
                lengths.append(lens)
                f.write(ids)
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return offsets


def encode_pair(pair: PairFiles, tok: Tokenizer, cache_dir: str | os.PathLike, *, workers: int | None = None,
                block_bytes: int = CHUNK_BYTES, log=None) -> CorpusDataset:
    """The encoded corpus from the cache, encoding it first (on `workers` processes, default all cores) when
    this (files, tokenizer) pair is not there. `log(str)` hears what happened."""
    cache_dir = Path(cache_dir)
    key = _digest({"format": FORMAT, "files": pair_sha256(pair, cache_dir),
                   "tokenizer": [hashlib.sha256(tok.src_proto).hexdigest(), hashlib.sha256(tok.tgt_proto).hexdigest()]})
    folder = cache_dir / f"corpus-{key}"
    if not (folder / "meta.json").is_file():
        t0 = time.time()
        workers = workers if workers is not None else (os.cpu_count() or 1)
        # gzip'd text is ~3-4x smaller than the text itself (Multi30k train.en: 0.57 MB vs 1.8 MB).
        text_bytes = sum(p.stat().st_size * (4 if p.suffix == ".gz" else 1) for p in pair)
        if text_bytes <= block_bytes:
            workers = 1                      # one block: starting a pool (~0.3 s) would cost more than it saves
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".corpus-{key}."))
        try:
            meta = {"format": FORMAT, "files": [str(p) for p in pair], "sha256": list(pair_sha256(pair, cache_dir))}
            for side, path, sp_proto, vocab in (("src", pair.src, tok.src_proto, tok.src_vocab_size),
                                                 ("tgt", pair.tgt, tok.tgt_proto, tok.tgt_vocab_size)):
                offsets = _encode_file(path, sp_proto, vocab, tmp / f"{side}.ids", workers, block_bytes)
                np.save(tmp / f"{side}.offsets.npy", offsets)
                meta[side] = {"dtype": ids_dtype(vocab).name, "sentences": len(offsets) - 1,
                              "tokens": int(offsets[-1])}
            if meta["src"]["sentences"] != meta["tgt"]["sentences"]:
                raise CorpusError(f"{pair.src} has {meta['src']['sentences']} lines but {pair.tgt} has "
                                  f"{meta['tgt']['sentences']}")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, folder)
            except OSError:                  # another process finished the same cache first: use theirs
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        if log is not None:
            log(f"encoded {meta['src']['sentences']} pairs of {pair.src.name}/{pair.tgt.name} in "
                f"{time.time() - t0:.1f} s on {workers} processes into {folder}")
    return CorpusDataset.open(folder)


# ----------------------------------------------------------------------------------------------- dataset

@dataclass
class _Side:
    ids: np.ndarray          # (total tokens,) memory-mapped
    offsets: np.ndarray      # (n + 1,) int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _open_side(folder: Path, side: str, meta: dict) -> _Side:
    dtype = np.dtype(meta[side]["dtype"])
    path = folder / f"{side}.ids"
    # np.memmap refuses an empty file; a corpus of empty lines has no ids at all.
    ids = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    return _Side(ids, np.load(folder / f"{side}.offsets.npy", mmap_mode="r"))


class CorpusDataset:
    """Encoded sentence pairs on disk (memory-mapped), the same interface as data.PairDataset: len, src_sizes,
    tgt_sizes (int64 arrays, EOS included), filter, collate. The process holds only the kept indices."""

    def __init__(self, src: _Side, tgt: _Side, folder: Path | None = None):
        if len(src.offsets) != len(tgt.offsets):
            raise CorpusError(f"{len(src.offsets) - 1} source sentences but {len(tgt.offsets) - 1} target ones")
        self._src, self._tgt, self.folder = src, tgt, folder
        self.keep = np.arange(len(src.offsets) - 1, dtype=np.int64)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> CorpusDataset:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise CorpusError(f"{folder} is a corpus cache of format {meta.get('format')}, not {FORMAT}: delete it")
        return cls(_open_side(folder, "src", meta), _open_side(folder, "tgt", meta), folder)

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def src_sizes(self) -> np.ndarray:
        return self._src.lengths[self.keep] + 1

    @property
    def tgt_sizes(self) -> np.ndarray:
        return self._tgt.lengths[self.keep] + 1

    def head(self, n: int) -> None:
        """Keep only the first n pairs (a subset for quick runs)."""
        self.keep = self.keep[:n]

    def filter(self, max_src: int, max_tgt: int, max_len_ratio: float = 0.0) -> dict[str, int]:
        """Drop pairs by length (see length_filter); returns {reason: pairs dropped}."""
        keep, counts = length_filter(self._src.lengths[self.keep], self._tgt.lengths[self.keep], max_src, max_tgt,
                                     max_len_ratio)
        self.keep = self.keep[keep]
        return counts

    def _rows(self, side: _Side, rows: np.ndarray) -> list[np.ndarray]:
        return [side.ids[side.offsets[r]:side.offsets[r + 1]] for r in rows.tolist()]

    def collate(self, indices: Sequence[int]) -> Batch:
        """A right-padded batch of the pairs at `indices` (positions among the kept pairs); as PairDataset."""
        rows = self.keep[np.asarray(indices, dtype=np.int64)]
        src, tgt = self._rows(self._src, rows), self._rows(self._tgt, rows)
        b, ts, tt = len(rows), max(len(s) for s in src) + 1, max(len(t) for t in tgt) + 1
        src_tokens = np.full((b, ts), PAD_ID, dtype=np.int64)
        target = np.full((b, tt), PAD_ID, dtype=np.int64)
        prev = np.full((b, tt), PAD_ID, dtype=np.int64)
        for i, (s, t) in enumerate(zip(src, tgt)):
            src_tokens[i, :len(s)], src_tokens[i, len(s)] = s, EOS_ID
            target[i, :len(t)], target[i, len(t)] = t, EOS_ID
            prev[i, 0], prev[i, 1:len(t) + 1] = BOS_ID, t
        src_lengths = torch.tensor([len(s) + 1 for s in src], dtype=torch.long)
        ntokens = sum(len(t) + 1 for t in tgt)
        return Batch(torch.from_numpy(src_tokens), src_lengths, torch.from_numpy(prev), torch.from_numpy(target),
                     ntokens, torch.from_numpy(rows.copy()))


# ----------------------------------------------------------------------------------------------- one call

class Corpus(NamedTuple):
    tokenizer: Tokenizer
    train: CorpusDataset
    valid: CorpusDataset
    valid_src: list[str]        # the first validation lines as text (for BLEU)
    valid_tgt: list[str]


def prepare(train_prefix: str, valid_prefix: str, src_lang: str, tgt_lang: str, *,
            tokenizer: Tokenizer | None = None, vocab_size: int = 8000, model_type: str = "bpe", joint: bool = False,
            sample: int = 1_000_000, cache_dir: str | os.PathLike | None = None, workers: int | None = None,
            valid_lines: int = -1, log=None) -> Corpus:
    """Everything `convs2s train --train PREFIX --valid PREFIX` needs, every input checked before any work:
    both sides of both sets found, valid UTF-8 and of equal length; then the tokenizer (given, e.g. from a
    checkpoint, or trained on a sample and cached) and both sets encoded into the cache (or found there)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train_files = find_pair(train_prefix, src_lang, tgt_lang, "training corpus (--train)")
    valid_files = find_pair(valid_prefix, src_lang, tgt_lang, "validation set (--valid)")
    for files, what in ((train_files, "training corpus"), (valid_files, "validation set")):
        t0 = time.time()
        n = check_pair(files, cache_dir, what)
        if log is not None:
            log(f"{what}: {n} pairs in {files.src} / {files.tgt} (checked in {time.time() - t0:.1f} s)")
    if tokenizer is None:
        t0 = time.time()
        tokenizer = train_tokenizer(train_files, cache_dir, vocab_size=vocab_size, model_type=model_type,
                                    joint=joint, sample=sample)
        if log is not None:
            log(f"tokenizer: vocabularies {tokenizer.src_vocab_size}/{tokenizer.tgt_vocab_size} "
                f"({time.time() - t0:.1f} s, trained on at most {sample or 'all'} lines, cached in {cache_dir})")
    train = encode_pair(train_files, tokenizer, cache_dir, workers=workers, log=log)
    valid = encode_pair(valid_files, tokenizer, cache_dir, workers=workers, log=log)
    return Corpus(tokenizer, train, valid, read_head(valid_files.src, valid_lines),
                  read_head(valid_files.tgt, valid_lines))
