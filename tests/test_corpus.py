"""One's own parallel corpora (convs2s.corpus): file checks and their errors, the sampled tokenizer, the encoded
on-disk cache (equal to encoding in memory, reused, never half-written), length filtering, batching from it."""

import gzip
import random
import re

import numpy as np
import pytest
import torch

from convs2s import corpus as C
from convs2s import data as D
from convs2s.tokenizer import Tokenizer

WORDS = ("ein mann hund läuft über die straße zwei frauen sitzen auf einer bank kinder spielen im park "
         "der die das und mit vor hinter neben grün rot blau").split()


def make_corpus(prefix, n=300, src="xx", tgt="yy", gz_tgt=False, seed=0) -> C.PairFiles:
    """n random sentence pairs (1-30 words); the target side reverses and upper-cases the source's words."""
    rng = random.Random(seed)
    src_lines, tgt_lines = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
        src_lines.append(" ".join(words))
        tgt_lines.append(" ".join(w.upper() for w in reversed(words)))
    write(f"{prefix}.{src}", src_lines)
    write(f"{prefix}.{tgt}" + (".gz" if gz_tgt else ""), tgt_lines)
    return C.find_pair(prefix, src, tgt)


def write(path, lines, end="\n"):
    data = "".join(line + end for line in lines).encode("utf-8")
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
        f.write(data)


# ------------------------------------------------------------------------------------------ files and errors

def test_find_pair_plain_and_gzip_any_language_code(tmp_path):
    pair = make_corpus(tmp_path / "train", src="en-GB", tgt="pt_br", gz_tgt=True)
    assert pair.src.name == "train.en-GB" and pair.tgt.name == "train.pt_br.gz"
    assert C.count_lines(pair.src) == C.count_lines(pair.tgt) == 300


def test_missing_side_both_forms_and_bad_codes_are_errors(tmp_path):
    make_corpus(tmp_path / "train")
    with pytest.raises(C.CorpusError, match=r"no zz side: neither .*train\.zz nor .*train\.zz\.gz exists"):
        C.find_pair(tmp_path / "train", "xx", "zz")
    write(tmp_path / "train.xx.gz", ["a"])
    with pytest.raises(C.CorpusError, match=r"both .*train\.xx and .*train\.xx\.gz exist"):
        C.find_pair(tmp_path / "train", "xx", "yy")
    with pytest.raises(C.CorpusError, match="language code 'x/y'"):
        C.find_side(tmp_path / "train", "x/y")
    with pytest.raises(C.CorpusError, match="both 'yy'"):
        C.find_pair(tmp_path / "train", "yy", "yy")


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    write(tmp_path / "c.xx", ["a b", "c"] * 5)
    write(tmp_path / "c.yy.gz", ["A B"] * 9)
    with pytest.raises(C.CorpusError, match=r"c\.xx has 10 lines but .*c\.yy\.gz has 9"):
        C.check_pair(C.find_pair(tmp_path / "c", "xx", "yy"), tmp_path / "cache")


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_file_and_line(tmp_path, gz):
    raw = b"erste\nzweite\ndritte\n" + b"caf\xe9 latin-1\nf\xc3\xbcnfte\n"
    path = tmp_path / ("c.xx.gz" if gz else "c.xx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    write(tmp_path / "c.yy", ["a"] * 5)
    with pytest.raises(C.CorpusError, match=r"c\.xx(\.gz)?, line 4: invalid UTF-8 .* at byte 4 of the line"):
        C.check_pair(C.find_pair(tmp_path / "c", "xx", "yy"))


def test_invalid_utf8_in_a_later_block_counts_lines_before_it(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CHUNK_BYTES", 64)
    lines = [f"line {i}" for i in range(100)]
    raw = "".join(s + "\n" for s in lines).encode() + b"\xff\n"
    (tmp_path / "c.xx").write_bytes(raw)
    with pytest.raises(C.CorpusError, match=r"line 101: invalid UTF-8"):
        C.count_lines(tmp_path / "c.xx")
    assert sum(1 for _ in C.iter_blocks(tmp_path / "c.xx", 64)) > 5


def test_empty_file_and_broken_gzip_are_errors(tmp_path):
    (tmp_path / "c.xx").write_bytes(b"")
    write(tmp_path / "c.yy", ["a"])
    with pytest.raises(C.CorpusError, match=r"c\.xx is empty"):
        C.check_pair(C.find_pair(tmp_path / "c", "xx", "yy"))
    (tmp_path / "d.xx.gz").write_bytes(gzip.compress(b"a\nb\n")[:-6])
    with pytest.raises(C.CorpusError, match=r"cannot read .*d\.xx\.gz"):
        C.count_lines(tmp_path / "d.xx.gz")


def test_line_ends_crlf_and_missing_final_newline(tmp_path):
    (tmp_path / "c.xx").write_bytes(b"eins\r\nzwei\r\n\r\ndrei")
    assert C.count_lines(tmp_path / "c.xx") == 4
    assert list(C.iter_lines(tmp_path / "c.xx")) == ["eins", "zwei", "", "drei"]
    assert C.read_head(tmp_path / "c.xx", 2) == ["eins", "zwei"]


def test_check_is_stamped_by_content(tmp_path, monkeypatch):
    pair = make_corpus(tmp_path / "c")
    assert C.check_pair(pair, tmp_path / "cache") == 300
    monkeypatch.setattr(C, "count_lines", lambda path: pytest.fail("the stamp should have been used"))
    assert C.check_pair(pair, tmp_path / "cache") == 300
    write(pair.src, ["changed"] * 300)                    # new content, new hash: checked again
    with pytest.raises(pytest.fail.Exception):
        C.check_pair(pair, tmp_path / "cache")


def test_file_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os
    path = tmp_path / "c.xx"
    path.write_bytes(b"eins\nzwei\n")
    digest = C.file_sha256(path, tmp_path / "cache")
    assert digest == hashlib.sha256(b"eins\nzwei\n").hexdigest()
    real = hashlib.sha256

    def no_file_hashing(*data):              # file_sha256 starts an empty hash; cache keys hash bytes given
        return real(*data) if data else pytest.fail("the remembered hash should have been used")
    monkeypatch.setattr(hashlib, "sha256", no_file_hashing)
    assert C.file_sha256(path, tmp_path / "cache") == digest
    monkeypatch.setattr(hashlib, "sha256", real)
    # Same size, modification time set back (as cp -p would): the ctime still changes, so it is hashed again.
    st = path.stat()
    path.write_bytes(b"eins\ndrei\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert C.file_sha256(path, tmp_path / "cache") == hashlib.sha256(b"eins\ndrei\n").hexdigest()


# ------------------------------------------------------------------------------------------ tokenizer

def test_sampled_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
    pair = make_corpus(tmp_path / "c", n=600)
    a = C.train_tokenizer(pair, tmp_path / "cache", vocab_size=60, sample=150)
    b = C.train_tokenizer(pair, tmp_path / "cache2", vocab_size=60, sample=150)
    assert a.state() == b.state()                          # the same sample on every run
    full = C.train_tokenizer(pair, None, vocab_size=60, sample=0)
    assert full.state() != a.state()
    monkeypatch.setattr(Tokenizer, "train", lambda *a, **k: pytest.fail("the cached tokenizer should be used"))
    assert C.train_tokenizer(pair, tmp_path / "cache", vocab_size=60, sample=150).state() == a.state()
    with pytest.raises(pytest.fail.Exception):            # other options: another tokenizer
        C.train_tokenizer(pair, tmp_path / "cache", vocab_size=61, sample=150)


def test_sample_below_sentencepiece_minimum_is_an_error():
    with pytest.raises(ValueError, match="above 100"):
        Tokenizer.train(["a"], ["b"], vocab_size=10, sample=50)


# ------------------------------------------------------------------------------------------ encoded cache

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    pair = make_corpus(root / "train", n=400, gz_tgt=True)
    tok = C.train_tokenizer(pair, root / "cache", vocab_size=80)
    return root, pair, tok


@pytest.mark.parametrize("workers,block", [(1, C.CHUNK_BYTES), (2, 512)])
def test_cache_holds_what_encoding_in_memory_gives(small, tmp_path, workers, block):
    _, pair, tok = small
    ds = C.encode_pair(pair, tok, tmp_path, workers=workers, block_bytes=block)
    src, tgt = list(C.iter_lines(pair.src)), list(C.iter_lines(pair.tgt))
    mem = D.PairDataset(tok.encode_src(src), tok.encode_tgt(tgt))
    assert len(ds) == len(mem) == 400
    np.testing.assert_array_equal(ds.src_sizes, mem.src_sizes)
    np.testing.assert_array_equal(ds.tgt_sizes, mem.tgt_sizes)
    idx = np.array([5, 0, 399, 17])
    a, b = ds.collate(idx), mem.collate(idx.tolist())
    for name in ("src_tokens", "src_lengths", "prev_output_tokens", "target", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.ntokens == b.ntokens
    # Compact and memory-mapped: uint16 ids for a small vocabulary, nothing held as Python lists.
    assert isinstance(ds._src.ids, np.memmap) and ds._src.ids.dtype == np.uint16
    assert (ds.folder / "src.ids").stat().st_size == 2 * int(ds._src.offsets[-1])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary folder left


def test_cache_is_reused_and_keyed_by_tokenizer_and_content(small, tmp_path, monkeypatch):
    root, pair, tok = small
    first = C.encode_pair(pair, tok, tmp_path, workers=1)
    real = C._encode_file
    monkeypatch.setattr(C, "_encode_file", lambda *a, **k: pytest.fail("the cache should have been used"))
    again = C.encode_pair(pair, tok, tmp_path, workers=1)
    assert again.folder == first.folder
    other = C.train_tokenizer(pair, None, vocab_size=70)
    with pytest.raises(pytest.fail.Exception):
        C.encode_pair(pair, other, tmp_path, workers=1)
    monkeypatch.setattr(C, "_encode_file", real)
    assert C.encode_pair(pair, other, tmp_path, workers=1).folder != first.folder


def test_ids_dtype_follows_vocabulary_size():
    assert C.ids_dtype(8000) == np.uint16 and C.ids_dtype(65536) == np.uint16
    assert C.ids_dtype(65537) == np.int32


def test_a_killed_encoding_leaves_no_cache(small, tmp_path, monkeypatch):
    _, pair, tok = small

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "_encode_file", boom)
    with pytest.raises(KeyboardInterrupt):
        C.encode_pair(pair, tok, tmp_path, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["sha256"]          # the remembered file hashes only


# ------------------------------------------------------------------------------------------ filtering, batching

def test_length_filter_counts_each_reason_once():
    src = np.array([0, 5, 30, 9, 10, 3, 12])
    tgt = np.array([4, 0, 8, 40, 12, 9, 12])
    keep, counts = D.length_filter(src, tgt, max_src=21, max_tgt=31, max_len_ratio=1.5)
    assert keep.tolist() == [False, False, False, False, True, False, True]
    assert counts == {"empty source or target": 2, "source longer than 20 tokens": 1,
                      "target longer than 30 tokens": 1, "length ratio above 1.5": 1}
    keep, counts = D.length_filter(src, tgt, 1000, 1000)
    assert keep.sum() == 5 and set(counts) == {"empty source or target", "source longer than 999 tokens",
                                               "target longer than 999 tokens"}
    assert D.describe_filter(counts, 7) == "dropped 2 of 7 pairs (2 empty source or target)"


def test_dataset_filter_and_head_agree_with_pair_dataset(small, tmp_path):
    _, pair, tok = small
    ds = C.encode_pair(pair, tok, tmp_path, workers=1)
    mem = D.PairDataset(tok.encode_src(list(C.iter_lines(pair.src))), tok.encode_tgt(list(C.iter_lines(pair.tgt))))
    ds.head(300)
    mem.keep = mem.keep[:300]
    assert ds.filter(40, 50, 1.2) == mem.filter(40, 50, 1.2)
    assert ds.keep.tolist() == mem.keep and 0 < len(ds) < 300
    np.testing.assert_array_equal(ds.src_sizes, mem.src_sizes)


def test_sampler_runs_from_the_cache_and_resumes_exactly(small, tmp_path):
    _, pair, tok = small
    ds = C.encode_pair(pair, tok, tmp_path, workers=1)
    sampler = D.TokenBatchSampler(ds.src_sizes, ds.tgt_sizes, 200, seed=3)
    sampler.set_epoch(2)
    batches = [b.tolist() for b in sampler]
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        batch = ds.collate(b)
        assert batch.src_tokens.numel() <= 200 and batch.target.numel() <= 200
    reopened = C.CorpusDataset.open(ds.folder)
    resumed = D.TokenBatchSampler(reopened.src_sizes, reopened.tgt_sizes, 200, seed=3)
    resumed.set_epoch(2, skip=3)
    assert [b.tolist() for b in resumed] == batches[3:]


def test_prepare_checks_every_input_before_training_a_tokenizer(tmp_path, monkeypatch):
    make_corpus(tmp_path / "train", n=200)
    write(tmp_path / "valid.xx", ["a b"] * 4)
    write(tmp_path / "valid.yy", ["A B"] * 3)
    monkeypatch.setattr(Tokenizer, "train", lambda *a, **k: pytest.fail("trained before the checks"))
    with pytest.raises(C.CorpusError, match=r"validation set's sides differ in length: .*valid\.xx has 4 lines"):
        C.prepare(tmp_path / "train", tmp_path / "valid", "xx", "yy", cache_dir=tmp_path / "cache")
    with pytest.raises(C.CorpusError, match=r"validation set \(--valid\) has no xx side"):
        C.prepare(tmp_path / "train", tmp_path / "nope", "xx", "yy", cache_dir=tmp_path / "cache")


def test_prepare_end_to_end(tmp_path):
    make_corpus(tmp_path / "train", n=300)
    make_corpus(tmp_path / "valid", n=20, seed=1)
    logs = []
    c = C.prepare(tmp_path / "train", tmp_path / "valid", "xx", "yy", vocab_size=70, cache_dir=tmp_path / "cache",
                  workers=1, valid_lines=5, log=logs.append)
    assert len(c.train) == 300 and len(c.valid) == 20 and len(c.valid_src) == len(c.valid_tgt) == 5
    assert c.valid_tgt[0] == " ".join(w.upper() for w in reversed(c.valid_src[0].split()))
    assert any(s.startswith("encoded 300 pairs") for s in logs)
    logs.clear()
    again = C.prepare(tmp_path / "train", tmp_path / "valid", "xx", "yy", vocab_size=70,
                      cache_dir=tmp_path / "cache", workers=1, log=logs.append)
    assert again.tokenizer.state() == c.tokenizer.state() and not any(s.startswith("encoded") for s in logs)


# ------------------------------------------------------------------------------------- train, translate, evaluate

@pytest.fixture()
def files(tmp_path):
    make_corpus(tmp_path / "train", n=120, src="xx", tgt="yy", gz_tgt=True)
    make_corpus(tmp_path / "valid", n=12, src="xx", tgt="yy", seed=1)
    return tmp_path


def _train_argv(root, *extra):
    return ["train", "--train", str(root / "train"), "--valid", str(root / "valid"), "--src-lang", "xx",
            "--tgt-lang", "yy", "--arch", "tiny", "--cache-dir", str(root / "cache"), "--vocab-size", "70",
            "--max-tokens", "400", "--num-threads", "1", "--no-progress", "--val-bleu-sentences", "4",
            "--encode-workers", "1", *extra]


@pytest.mark.usefixtures("one_thread")
def test_cli_trains_on_own_files_with_overrides_then_translates_and_evaluates(files, capsys):
    from convs2s.checkpoint import load_checkpoint
    from convs2s.cli import main
    root = files
    assert main(_train_argv(root, "--save-dir", str(root / "run"), "--max-updates", "3",
                            "--encoder-layers", "[(32, 3)] * 2 + [(48, 3, 2)]", "--decoder-layers", "[(32, 3)] * 2",
                            "--decoder-attention", "[True, False]", "--encoder-embed-dim", "20",
                            "--decoder-embed-dim", "20", "--decoder-out-embed-dim", "20",
                            "--share-decoder-input-output-embed", "--dropout", "0.0", "--max-len-ratio", "1.5")) == 0
    out = capsys.readouterr().out
    assert "training pairs (dropped " in out
    ckpt = load_checkpoint(root / "run" / "last.pt")
    cfg = ckpt["config"]
    assert cfg["encoder_layers"] == [[32, 3, 1], [32, 3, 1], [48, 3, 2]] and cfg["decoder_layers"] == [[32, 3, 1]] * 2
    assert cfg["decoder_attention"] == [True, False] and cfg["share_decoder_input_output_embed"]
    assert (cfg["encoder_embed_dim"], cfg["decoder_embed_dim"], cfg["dropout"]) == (20, 20, 0.0)
    assert ckpt["args"]["src_lang"] == "xx" and ckpt["args"]["train"] == str(root / "train")
    # translate and evaluate need only the checkpoint.
    (root / "in.xx").write_text("ein hund\nzwei frauen sitzen\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(root / "run" / "last.pt"), "--input", str(root / "in.xx"),
                 "--output", str(root / "out.yy"), "--device", "cpu"]) == 0
    assert len((root / "out.yy").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["evaluate", "--checkpoint", str(root / "run" / "last.pt"), "--src", str(root / "valid.xx"),
                 "--ref", str(root / "valid.yy"), "--device", "cpu", "--metrics-json", str(root / "m.json")]) == 0
    import json
    m = json.loads((root / "m.json").read_text())
    assert m["n"] == 12 and m["tgt_lang"] == "yy" and 0 <= m["bleu"] <= 100


@pytest.mark.parametrize("problem,message", [
    ("mismatch", r"training corpus's sides differ in length: .*train\.xx has 120 lines but .*train\.yy\.gz has 119"),
    ("utf8", r"valid\.xx, line 3: invalid UTF-8"),
    ("empty", r"valid\.yy is empty"),
    ("missing", r"validation set \(--valid\) has no yy side"),
])
def test_cli_bad_inputs_stop_before_any_training(files, problem, message, capsys):
    root = files
    if problem == "mismatch":
        write(root / "train.yy.gz", [f"zeile {i}" for i in range(119)])
    elif problem == "utf8":
        (root / "valid.xx").write_bytes(b"a\nb\n\xff\n" + b"c\n" * 9)
    elif problem == "empty":
        (root / "valid.yy").write_bytes(b"")
    else:
        (root / "valid.yy").unlink()
    _fails(capsys, message, _train_argv(root, "--save-dir", str(root / "run"), "--max-updates", "1"))
    assert not (root / "run" / "last.pt").exists() and not list((root / "cache").glob("tokenizer-*"))


def _fails(capsys, pattern, argv):
    """`convs2s ARGV` exits with status 2 and a one-line error matching `pattern` (no traceback)."""
    from convs2s.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_option_errors(files, capsys):
    from convs2s.cli import main
    root = files
    _fails(capsys, "go together", ["train", "--train", str(root / "train"), "--src-lang", "xx", "--tgt-lang", "yy"])
    _fails(capsys, "--src-lang 'xx': Multi30k has de, en, fr, cs", ["train", "--src-lang", "xx", "--tgt-lang", "en"])
    _fails(capsys, "decoder_attention has 2 flags for 3 decoder layers",
           _train_argv(root, "--decoder-attention", "[True, False]"))
    _fails(capsys, "attention needs encoder_embed_dim == decoder_embed_dim",
           _train_argv(root, "--encoder-embed-dim", "24"))
    _fails(capsys, "unknown --arch 'fconv_big'", _train_argv(root)[:-2] + ["--arch", "fconv_big"])
    with pytest.raises(SystemExit):
        main(_train_argv(root, "--encoder-layers", "[(512, 3)] * 9 +"))
    assert "cannot parse fairseq layer string" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_train_argv(root, "--decoder-layers", "__import__('os').system('true')"))
    assert "only int/bool literals" in capsys.readouterr().err


def test_arch_fields_and_overrides():
    from convs2s.model import PRESETS, ConvS2SConfig
    from convs2s.train import TrainArgs, arch_fields, model_fields, parse_attention, parse_layers
    wmt = "[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2"
    assert parse_layers(wmt) == PRESETS["fconv_wmt_en_de"]["encoder_layers"]
    for name in ("fconv_wmt_en_de", "fconv_wmt_en_fr", "fconv_iwslt_de_en"):
        assert arch_fields(name) == PRESETS[name]
    fconv = ConvS2SConfig(src_vocab_size=10, tgt_vocab_size=10, **arch_fields("fconv"))   # fairseq's base fconv
    assert len(fconv.encoder_layers) == 20 and fconv.decoder_out_embed_dim == 256
    assert parse_attention("True") is True and parse_attention("[True, False]") == [True, False]
    with pytest.raises(ValueError, match="list of them"):
        parse_attention("[1, 0]")
    with pytest.raises(ValueError, match="non-empty list of"):
        parse_layers("[(512, 3, 1, 4)]")
    with pytest.raises(ValueError, match="non-empty list of"):
        parse_layers("[]")
    fields = model_fields(TrainArgs(decoder_layers="[(64, 5)] * 2", decoder_attention="False", dropout=0.3,
                                    max_source_positions=256), "fconv_wmt_en_de")
    assert fields["decoder_layers"] == [(64, 5)] * 2 and fields["decoder_attention"] is False
    assert fields["encoder_layers"] == PRESETS["fconv_wmt_en_de"]["encoder_layers"]
    assert (fields["dropout"], fields["max_source_positions"]) == (0.3, 256)


@pytest.mark.usefixtures("one_thread")
def test_resume_from_the_cache_is_exact(files):
    from convs2s.train import TrainArgs, train
    root = files
    kw = dict(train=str(root / "train"), valid=str(root / "valid"), src_lang="xx", tgt_lang="yy", preset="tiny",
              cache_dir=str(root / "cache"), vocab_size=70, max_tokens=300, progress=False, num_threads=1,
              val_bleu_sentences=0, deterministic=True, log_interval=1, encode_workers=1, train_subset=40)
    full = train(TrainArgs(save_dir=str(root / "full"), max_updates=9, **kw))
    train(TrainArgs(save_dir=str(root / "split"), max_updates=4, **kw))
    from convs2s.checkpoint import load_checkpoint
    assert load_checkpoint(root / "split" / "last.pt")["train_state"]["batch_in_epoch"] > 0    # stopped mid-epoch
    resumed = train(TrainArgs(save_dir=str(root / "split"), max_updates=9, resume="", **kw))
    assert full.metrics["epochs_completed"] >= 1            # the run crosses an epoch end
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k


_WORKER = """
import os, sys
import torch
from convs2s.train import TrainArgs, train

root = sys.argv[1]
r = train(TrainArgs(preset="tiny", train=root + "/train", valid=root + "/valid", src_lang="xx", tgt_lang="yy",
                    cache_dir=root + "/cache", save_dir=root + "/run", vocab_size=70, max_tokens=300, max_updates=4,
                    log_interval=1, val_bleu_sentences=2, progress=False, num_threads=1))
torch.save(r.model.state_dict(), f"{root}/rank{os.environ['RANK']}.pt")
"""


def test_torchrun_two_processes_share_one_tokenizer_and_cache(files):
    import os
    import subprocess
    import sys
    root = files
    (root / "worker.py").write_text(_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "worker.py"), str(root)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    s0 = torch.load(root / "rank0.pt", weights_only=True)
    s1 = torch.load(root / "rank1.pt", weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert len(list((root / "cache").glob("tokenizer-*"))) == 1
    assert len(list((root / "cache").glob("corpus-*"))) == 2                 # train and valid, built once
