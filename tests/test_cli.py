"""The `convs2s` command: train, translate (stdin -> stdout), evaluate (--split and --src/--ref), as a user runs it."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from convs2s import cli
from tests.multi30k import REPO, multi30k_dir

pytestmark = pytest.mark.usefixtures("one_thread")     # see tests/conftest.py


def run(*args, stdin=None, timeout=300):
    """`python -m convs2s ARGS` in a fresh process (one thread: the machine is small and shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "convs2s", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"convs2s {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_help_lists_subcommands(capsys):
    out = run("--help").stdout
    for name in ("train", "translate", "evaluate"):
        assert name in out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    train_help = capsys.readouterr().out
    for flag in ("--preset", "--data", "--src-lang", "--tgt-lang", "--save-dir", "--max-epochs", "--max-minutes",
                 "--max-tokens", "--seed", "--resume", "--backend", "--device", "--metrics-json", "--optimizer"):
        assert flag in train_help, flag


def test_parser_maps_train_flags_to_train_args():
    from convs2s.train import TrainArgs
    a = cli.build_parser().parse_args(["train", "--preset", "tiny", "--src-lang", "fr", "--tgt-lang", "cs",
                                       "--resume", "--max-minutes", "1.5", "--joint-vocab", "--no-progress"])
    assert a.func is cli._run_train
    assert (a.preset, a.src_lang, a.tgt_lang, a.resume, a.max_minutes, a.joint_vocab, a.progress) == \
        ("tiny", "fr", "cs", "", 1.5, True, False)
    assert cli.build_parser().parse_args(["train"]).resume is None
    # Every train flag lands in a TrainArgs field (a typo in a dest would be silently dropped otherwise).
    fields = set(TrainArgs.__dataclass_fields__)
    dests = {k for k in vars(a) if k not in ("func", "command")}
    assert dests <= fields, dests - fields
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["evaluate"])              # --checkpoint is required


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    data = multi30k_dir()
    run("train", "--preset", "tiny", "--data", data, "--save-dir", out / "run", "--train-subset", 64,
        "--val-subset", 16, "--vocab-size", 300, "--max-tokens", 500, "--max-updates", 40, "--dropout", 0,
        "--val-bleu-sentences", 4, "--no-progress", "--metrics-json", out / "train.json")
    return out


def test_train_writes_checkpoints_log_and_metrics(checkpoint):
    run_dir = checkpoint / "run"
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    m = json.loads((checkpoint / "train.json").read_text())
    assert m["updates"] == 40 and m["preset"] == "tiny" and m["device"] == "cpu" and m["val_bleu"] is not None
    kinds = {json.loads(line)["type"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()}
    assert kinds == {"start", "train", "valid", "end"}


def test_translate_stdin_to_stdout_and_file(checkpoint, tmp_path):
    src, _ = (multi30k_dir() / "val.de.gz"), None
    lines = gzip.decompress(src.read_bytes()).decode().splitlines()[:5]
    out = run("translate", "--checkpoint", checkpoint / "run" / "last.pt", stdin="\n".join(lines) + "\n").stdout
    hyps = out.splitlines()
    assert len(hyps) == 5 and all(h.strip() for h in hyps)
    assert "▁" not in out, "output is detokenized"
    (tmp_path / "in.de.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    assert cli.main(["translate", "--checkpoint", str(checkpoint / "run" / "last.pt"), "--input",
                     str(tmp_path / "in.de.gz"), "--output", str(tmp_path / "out.en")]) == 0
    assert (tmp_path / "out.en").read_text().splitlines() == hyps


def test_evaluate_split_and_files(checkpoint, tmp_path, capsys):
    ckpt = checkpoint / "run" / "best.pt"
    out = run("evaluate", "--checkpoint", ckpt, "--split", "test_2016_flickr", "--data", multi30k_dir(),
              "--examples", 5, "--metrics-json", tmp_path / "test.json", "--output", tmp_path / "test.hyp").stdout
    assert "sacreBLEU: BLEU = " in out and "signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    assert "chrF:" in out and out.count("    hyp: ") == 5
    m = json.loads((tmp_path / "test.json").read_text())
    assert m["n"] == 1000 and m["set"] == "test_2016_flickr" and 0 <= m["bleu"] <= 100 and m["chrf"] > 0
    assert len((tmp_path / "test.hyp").read_text().splitlines()) == 1000
    # --src/--ref with plain and gzip files: the same sentences give the same score.
    data = multi30k_dir()
    (tmp_path / "ref.en").write_bytes(gzip.decompress((data / "test_2016_flickr.en.gz").read_bytes()))
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--src", str(data / "test_2016_flickr.de.gz"), "--ref",
                     str(tmp_path / "ref.en"), "--metrics-json", str(tmp_path / "files.json")]) == 0
    out2 = capsys.readouterr().out
    assert "sacreBLEU: BLEU = " in out2
    assert json.loads((tmp_path / "files.json").read_text())["bleu"] == m["bleu"]
    assert (ckpt.parent / "test_2016_flickr.de.en.hyp").is_file()   # default output: beside the checkpoint


def test_evaluate_needs_a_split_or_files(tmp_path, capsys):
    for extra in ([], ["--src", "a.de"]):
        assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "x.pt"), *extra]) == 2
        assert "give either --split NAME or --src FILE --ref FILE" in capsys.readouterr().err


def test_bench_is_a_module_of_the_checkout_not_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr[-2000:]
