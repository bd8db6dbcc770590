"""Multi30k files (download, checksums, errors), sentencepiece tokenizer, token-count batching."""

import gzip

import numpy as np
import pytest
import torch

from convs2s import data as D
from convs2s.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from tests.multi30k import multi30k_dir

# ------------------------------------------------------------------------------------------ files, download

def test_file_names_and_embedded_sums_match_shared_sha256sums():
    src = multi30k_dir()
    listed = dict(reversed(line.split()) for line in (src / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert listed == D.SHA256
    assert D.file_name("test_2016_flickr", "cs") == "test_2016_flickr.cs.gz"
    with pytest.raises(ValueError, match="test_2017_flickr exists for de, en, fr"):
        D.file_name("test_2017_flickr", "cs")
    with pytest.raises(ValueError, match="unknown split"):
        D.file_name("dev", "de")


def test_download_from_file_url_verifies_and_caches(tmp_path, monkeypatch):
    src = multi30k_dir()
    monkeypatch.delenv("CONVS2S_DATA", raising=False)
    cache = tmp_path / "cache"
    names = ["val.de.gz", "val.en.gz"]
    out = D.download(names, cache, src.as_uri())
    assert out == cache and sorted(p.name for p in cache.iterdir()) == names
    for n in names:
        assert (cache / n).read_bytes() == (src / n).read_bytes()
    # A second call finds verified files and fetches nothing (an unreachable URL would fail otherwise).
    mtimes = [(cache / n).stat().st_mtime_ns for n in names]
    D.download(names, cache, (tmp_path / "nowhere").as_uri())
    assert [(cache / n).stat().st_mtime_ns for n in names] == mtimes
    # Without --data or CONVS2S_DATA, find_data downloads into (here: finds in) the cache.
    assert D.find_data(None, files=names, cache_dir=cache, base_url=src.as_uri()) == cache
    de, en = D.load_pair(cache, "val", "de", "en")
    assert len(de) == len(en) == 1014


def test_download_of_corrupted_file_is_rejected_and_not_kept(tmp_path):
    src = multi30k_dir()
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    raw = bytearray((src / "val.de.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF                       # one flipped byte
    (mirror / "val.de.gz").write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match=r"val\.de\.gz has SHA-256 [0-9a-f]{64}, expected f0cba2f9.*corrupt"):
        D.download(["val.de.gz"], cache, mirror.as_uri())
    assert list(cache.iterdir()) == []               # neither the file nor a partial download is left
    # A corrupt file already in the cache is replaced by a good download.
    (cache / "val.de.gz").write_bytes(bytes(raw))
    D.download(["val.de.gz"], cache, src.as_uri())
    D.verify(cache / "val.de.gz")


def test_download_of_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(D.DataError, match=r"could not download .*val\.fr\.gz.*--data DIR"):
        D.download(["val.fr.gz"], tmp_path / "cache", (tmp_path / "empty").as_uri())


def test_data_dir_errors_name_the_place_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVS2S_DATA", raising=False)
    with pytest.raises(D.DataError, match=r"--data points at .*nope, which is not a folder"):
        D.find_data(tmp_path / "nope")
    monkeypatch.setenv("CONVS2S_DATA", str(tmp_path / "gone"))
    with pytest.raises(D.DataError, match=r"CONVS2S_DATA points at .*gone"):
        D.find_data(None)
    monkeypatch.setenv("CONVS2S_DATA", str(tmp_path))
    assert D.find_data(None) == tmp_path
    with pytest.raises(D.DataError, match=r"val\.de\.gz is missing\. Pass --data DIR \(or set CONVS2S_DATA\)"):
        D.load_split(tmp_path, "val", "de")
    (tmp_path / "val.de.gz").write_bytes(gzip.compress(b"Ein Hund.\n"))
    with pytest.raises(D.DataError, match=r"val\.de\.gz is corrupt: SHA-256 .*Delete it and download it again"):
        D.load_split(tmp_path, "val", "de")


def test_read_lines_plain_and_gzip(tmp_path):
    text = "Ein Mann läuft.\nZwei Hunde.\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    assert D.read_lines(tmp_path / "a.txt") == D.read_lines(tmp_path / "a.txt.gz") == ["Ein Mann läuft.",
                                                                                     "Zwei Hunde."]


@pytest.mark.parametrize("split,n", [("train", 29000), ("val", 1014), ("test_2016_flickr", 1000),
                                     ("test_2017_flickr", 1000)])
def test_load_pair_every_split(split, n):
    src, tgt = D.load_pair(multi30k_dir(), split, "de", "en")
    assert len(src) == len(tgt) == n and all(src) and all(tgt)


# ------------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def pairs():
    return D.load_pair(multi30k_dir(), "train", "de", "en")


@pytest.mark.parametrize("joint", [False, True])
def test_tokenizer_special_ids_round_trip_and_state(pairs, joint):
    src, tgt = pairs[0][:2000], pairs[1][:2000]
    tok = Tokenizer.train(src, tgt, vocab_size=400, joint=joint)
    assert tok.joint == joint
    assert 100 < tok.src_vocab_size <= 400 and 100 < tok.tgt_vocab_size <= 400
    for sp in (tok.src, tok.tgt):
        assert (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (BOS_ID, PAD_ID, EOS_ID, UNK_ID)
    ids = tok.encode_tgt(tgt[:50])
    assert all(i not in (BOS_ID, PAD_ID, EOS_ID) for s in ids for i in s)
    # Detokenization restores the text (sentencepiece is lossless up to whitespace normalisation).
    assert [tok.decode_tgt([BOS_ID] + s + [EOS_ID, PAD_ID]) for s in ids] == [" ".join(t.split()) for t in tgt[:50]]
    again = Tokenizer.from_state(tok.state())
    assert again.encode_src(src[:50]) == tok.encode_src(src[:50]) and again.joint == joint
    # Trained again on the same text: the same model (checkpoints and ranks rely on it).
    assert Tokenizer.train(src, tgt, vocab_size=400, joint=joint).state() == tok.state()


def test_tokenizer_rejects_other_special_ids():
    import io

    import sentencepiece as spm
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["ein hund", "zwei katzen"] * 50), model_writer=proto,
                                   vocab_size=30, hard_vocab_limit=False, minloglevel=2)   # unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match=r"special ids \(bos, pad, eos, unk\) = \(1, -1, 2, 0\)"):
        Tokenizer(proto.getvalue(), proto.getvalue())


# ------------------------------------------------------------------------------------------ batching

def _sizes(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 40, (n,), generator=g).tolist(), torch.randint(2, 45, (n,), generator=g).tolist()


def test_token_batches_cover_once_and_respect_max_tokens():
    src, tgt = _sizes()
    batches = D.token_batches(src, tgt, 300, torch.Generator().manual_seed(3))
    assert sorted(i for b in batches for i in b) == list(range(500))
    padded = real = 0
    for b in batches:
        longest = max(max(src[i], tgt[i]) for i in b)
        assert longest * len(b) <= 300
        padded += longest * len(b)
        real += sum(max(src[i], tgt[i]) for i in b)
    assert real / padded > 0.9, "bucketing by length keeps padding low"
    as_lists = lambda bs: [b.tolist() for b in bs]                   # noqa: E731
    again = D.token_batches(src, tgt, 300, torch.Generator().manual_seed(3))
    other = D.token_batches(src, tgt, 300, torch.Generator().manual_seed(4))
    assert as_lists(again) == as_lists(batches) and as_lists(other) != as_lists(batches)
    assert as_lists(D.token_batches(src, tgt, 300)) == as_lists(D.token_batches(src, tgt, 300))
    with pytest.raises(ValueError, match="more than --max-tokens 20"):
        D.token_batches(src, tgt, 20)


def _token_batches_one_by_one(src_sizes, tgt_sizes, max_tokens, generator=None):
    """The batching rule written as a loop adding one sentence at a time (the specification)."""
    n = len(src_sizes)
    sizes = torch.tensor([max(s, t) for s, t in zip(src_sizes, tgt_sizes)], dtype=torch.long)
    tie = torch.rand(n, generator=generator) if generator is not None else torch.arange(n, dtype=torch.float) / n
    order = torch.argsort(sizes.double() + tie.double()).tolist()
    batches, batch, longest = [], [], 0
    for i in order:
        size = int(sizes[i])
        if batch and max(longest, size) * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, size)
    batches.append(batch)
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@pytest.mark.parametrize("max_tokens", [45, 46, 100, 300, 4000])
@pytest.mark.parametrize("seed", [None, 7])
def test_token_batches_equal_the_one_by_one_rule(max_tokens, seed):
    src, tgt = _sizes(2000, seed=1)
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    got = [b.tolist() for b in D.token_batches(src, tgt, max_tokens, gen())]
    assert got == _token_batches_one_by_one(src, tgt, max_tokens, gen())
    assert all(b.dtype == np.int64 for b in D.token_batches(src, tgt, max_tokens, gen()))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_distributed_sampler_splits_epoch_evenly(world):
    src, tgt = _sizes()
    samplers = [D.TokenBatchSampler(src, tgt, 300, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shares = [[b.tolist() for b in s] for s in samplers]
    assert len({len(sh) for sh in shares}) == 1                      # the same number of steps on every rank
    flat = [i for sh in shares for b in sh for i in b]
    assert set(flat) == set(range(500))
    if world == 1:
        assert len(flat) == 500
    samplers[0].set_epoch(3)
    assert [b.tolist() for b in samplers[0]] != shares[0]
    samplers[0].set_epoch(2, skip=2)
    assert [b.tolist() for b in samplers[0]] == shares[0][2:] and len(samplers[0]) == len(shares[0]) - 2


def test_collate_right_pads_and_shifts():
    ds = D.PairDataset([[10, 11, 12], [13]], [[20, 21], [22, 23, 24, 25]])
    b = ds.collate([0, 1])
    P, E, B = PAD_ID, EOS_ID, BOS_ID
    assert b.src_tokens.tolist() == [[10, 11, 12, E], [13, E, P, P]]
    assert b.src_lengths.tolist() == [4, 2]
    assert b.target.tolist() == [[20, 21, E, P, P], [22, 23, 24, 25, E]]
    assert b.prev_output_tokens.tolist() == [[B, 20, 21, P, P], [B, 22, 23, 24, 25]]
    assert b.ntokens == 8 and b.indices.tolist() == [0, 1]
    assert ds.filter_long(max_src=3, max_tgt=10) == 1 and len(ds) == 1
    assert ds.collate([0]).src_tokens.tolist() == [[13, E]]
