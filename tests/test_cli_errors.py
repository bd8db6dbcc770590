"""The command line under bad input: one readable line on stderr, exit status 2, no traceback; and translation
gives exactly one output line per input line, whatever the line holds."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convs2s.cli import main
from convs2s.train import TrainArgs, train
from tests.multi30k import multi30k_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    train(TrainArgs(preset="tiny", data=str(multi30k_dir()), save_dir=str(run), train_subset=64, val_subset=8,
                    vocab_size=200, max_tokens=300, max_updates=2, val_bleu_sentences=0, progress=False,
                    num_threads=1))
    torch.set_num_threads(n)
    return run / "last.pt"


def cli(*args, stdin: str | bytes | None = None, timeout: float = 120, process: bool = False):
    """(exit status, stdout, stderr) of `convs2s ARGS`: in this process through convs2s.cli.main (fast), or with
    process=True as a real `python -m convs2s` (which also shows what torch prints on stderr)."""
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    if process:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.run([sys.executable, "-m", "convs2s", *map(str, args)], input=data, capture_output=True,
                              timeout=timeout, env=env)
        return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8", "replace")
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:                 # argparse's own exits
                rc = e.code
    finally:
        sys.stdin = old_stdin
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("command", ["translate", "evaluate", "plot-attention"])
def test_missing_checkpoint(command, tmp_path):
    extra = {"translate": [], "evaluate": ["--src", tmp_path / "s", "--ref", tmp_path / "r"],
             "plot-attention": ["--sentence", "Ein Hund.", "--out", tmp_path / "a.png"]}[command]
    rc, _, err = cli(command, "--checkpoint", tmp_path / "nope.pt", *extra, stdin="x\n")
    assert_one_line_error(rc, err, "nope.pt")


def test_truncated_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(ckpt.read_bytes()[:5000])
    rc, _, err = cli("translate", "--checkpoint", bad, stdin="ein Hund\n", process=True)
    assert_one_line_error(rc, err, "truncated.pt")


def test_a_pickle_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "other.pt"
    bad.write_bytes(pickle.dumps({"hello": 1}))
    rc, _, err = cli("translate", "--checkpoint", bad, stdin="ein Hund\n", process=True)
    assert_one_line_error(rc, err, "other.pt")
    torch.save({"weights": torch.zeros(3)}, bad)
    rc, _, err = cli("translate", "--checkpoint", bad, stdin="ein Hund\n")
    assert_one_line_error(rc, err, "other.pt")


def test_a_fairseq_checkpoint_points_to_fairseq(tmp_path):
    fs = tmp_path / "model.pt"
    torch.save({"model": {"encoder.embed_tokens.weight": torch.zeros(4, 2)}, "args": None, "cfg": None}, fs)
    rc, _, err = cli("translate", "--checkpoint", fs, stdin="ein Hund\n")
    assert_one_line_error(rc, err, "--fairseq")


def test_checkpoint_without_training_args(ckpt, tmp_path):
    c = torch.load(ckpt, weights_only=True)
    del c["args"]
    bad = tmp_path / "noargs.pt"
    torch.save(c, bad)
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("ein Hund\n")
    ref.write_text("a dog\n")
    rc, out, err = cli("evaluate", "--checkpoint", bad, "--src", src, "--ref", ref)
    # Files need no languages: it works; a Multi30k split needs them, and says which flags give them.
    assert rc == 0, err
    rc, _, err = cli("evaluate", "--checkpoint", bad, "--split", "val", "--data", multi30k_dir())
    assert_one_line_error(rc, err, "--src-lang")


# ------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("args,needle", [
    (["--input", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--device", "cuda"], "cuda"),
    (["--beam", "0"], "--beam"),
    (["--nbest", "0"], "--nbest"),
    (["--max-len-b", "-1"], "--max-len-b"),
    (["--max-len-a", "-0.5"], "--max-len-a"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_translate_bad_options(ckpt, args, needle):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, _, err = cli("translate", "--checkpoint", ckpt, *args, stdin="ein Hund\n")
    assert_one_line_error(rc, err, needle)


def test_train_unknown_preset():
    rc, _, err = cli("train", "--preset", "huge", process=True)
    assert rc == 2 and "Traceback" not in err and "huge" in err


def test_train_max_tokens_below_the_longest_sentence(tmp_path):
    rc, _, err = cli("train", "--preset", "tiny", "--data", multi30k_dir(), "--save-dir", tmp_path / "r",
                     "--train-subset", "64", "--val-subset", "8", "--vocab-size", "200", "--max-tokens", "4",
                     "--max-updates", "1", "--no-progress", timeout=300)
    assert_one_line_error(rc, err, "--max-tokens")


def test_train_unwritable_save_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, _, err = cli("train", "--preset", "tiny", "--data", multi30k_dir(), "--save-dir", blocker / "run",
                     "--max-updates", "1", "--no-progress")
    assert_one_line_error(rc, err, str(blocker))


def test_train_data_folder_missing_a_split(tmp_path):
    src = multi30k_dir()
    for name in ("train.de.gz", "train.en.gz", "val.de.gz"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    rc, _, err = cli("train", "--preset", "tiny", "--data", tmp_path, "--save-dir", tmp_path / "r",
                     "--max-updates", "1", "--no-progress")
    assert_one_line_error(rc, err, "val.en")


def test_resume_without_last_pt(tmp_path):
    rc, _, err = cli("train", "--preset", "tiny", "--data", multi30k_dir(), "--save-dir", tmp_path, "--resume",
                     "--max-updates", "1", "--no-progress")
    assert_one_line_error(rc, err, "last.pt")


# ------------------------------------------------------------------------------------------ input lines

def test_one_output_line_per_input_line(ckpt, tmp_path):
    long_line = " ".join(["Hund"] * 400)                       # more subwords than the tiny preset's 128 positions
    lines = ["ein Hund läuft", "", "   ", "ein Mann\r", long_line, "\t", "eine Frau"]
    rc, out, err = cli("translate", "--checkpoint", ckpt, stdin="\n".join(lines) + "\n")
    assert rc == 0, err
    assert out.count("\n") == len(lines), out
    outs = out.split("\n")[:-1]
    assert outs[1] == outs[2] == outs[5] == ""                  # nothing to translate, nothing printed
    assert "Traceback" not in err and "line 5" in err          # the long line is reported, by number
    # The same through a .gz file and --output.
    gz = tmp_path / "in.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    rc, _, err = cli("translate", "--checkpoint", ckpt, "--input", gz, "--output", tmp_path / "out.txt")
    assert rc == 0, err
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")[:-1] == outs


def test_invalid_utf8_input_line(ckpt):
    rc, out, err = cli("translate", "--checkpoint", ckpt, stdin=b"ein Hund\n\xff\xfe kaputt\neine Katze\n")
    assert rc == 0, err
    assert out.count("\n") == 3, out
    assert "line 2" in err and "UTF-8" in err, err


def test_nbest_lines_per_input_line(ckpt):
    rc, out, err = cli("translate", "--checkpoint", ckpt, "--beam", "3", "--nbest", "2", stdin="ein Hund\n\nMann\n")
    assert rc == 0, err
    assert out.count("\n") == 6, out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c"
                                                "\x1c\x1d\x1e\x85\u2028\u2029"), max_size=30), min_size=1, max_size=6))
def test_fuzz_translate_lines(ckpt, lines):
    """In process (the command's own path, without a process per example): one output per input line."""
    from convs2s.cli import translate_text_lines
    model, tok = _model(ckpt)
    out = translate_text_lines(model, tok, lines, beam=1, nbest=1, max_tokens=300)
    assert len(out) == len(lines)
    for line, hyps in zip(lines, out):
        assert len(hyps) == 1
        if not line.strip():
            assert hyps[0][0] == ""


_MODELS = {}


def _model(ckpt):
    from convs2s.checkpoint import load_checkpoint, model_from_checkpoint
    if ckpt not in _MODELS:
        _MODELS[ckpt] = model_from_checkpoint(load_checkpoint(ckpt))
    return _MODELS[ckpt]


def test_translate_and_evaluate_int8(ckpt, tmp_path):
    rc, out, err = cli("translate", "--checkpoint", ckpt, "--int8", "--device", "cpu", stdin="ein Hund\n\nMann\n")
    assert rc == 0, err
    assert out.count("\n") == 3
    rc, _, err = cli("translate", "--checkpoint", ckpt, "--int8", "--bf16", stdin="ein Hund\n")
    assert_one_line_error(rc, err, "--int8")
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("ein Hund\neine Frau\n")
    ref.write_text("a dog\na woman\n")
    rc, _, err = cli("evaluate", "--checkpoint", ckpt, "--src", src, "--ref", ref, "--int8", "--metrics-json",
                     tmp_path / "m.json")
    assert rc == 0, err
    import json
    assert json.loads((tmp_path / "m.json").read_text())["int8"] is True
