"""convs2s.checkpoint: save / load round trip, and one clear error type (CheckpointError, a ValueError) for a
missing file, a truncated or empty one, and files that are not convs2s checkpoints."""

import argparse
import pickle

import pytest
import torch

from convs2s.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from convs2s.model import ConvS2S
from convs2s.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny():
    """(checkpoint dict, model): a random tiny model and a small tokenizer."""
    de = ["ein hund läuft im park", "zwei männer spielen fußball", "eine frau liest ein buch"] * 4
    en = ["a dog runs in the park", "two men play soccer", "a woman reads a book"] * 4
    tok = Tokenizer.train(de, en, vocab_size=40)
    torch.manual_seed(0)
    model = ConvS2S.from_preset("tiny", tok.src_vocab_size, tok.tgt_vocab_size, backend="reference").eval()
    ckpt = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "tokenizer": tok.state(),
            "model": model.state_dict()}
    return ckpt, model


def test_round_trip_gives_the_same_model_and_tokenizer(tiny, tmp_path):
    ckpt, model = tiny
    save_checkpoint(ckpt, tmp_path / "sub" / "m.pt")               # creates the folder
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.pt"]   # no temporary file left
    loaded, tok = model_from_checkpoint(load_checkpoint(tmp_path / "sub" / "m.pt"))
    assert not loaded.training
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    assert tok.state() == Tokenizer.from_state(ckpt["tokenizer"]).state()
    src = torch.tensor([[5, 6, 7, 2]])
    prev = torch.tensor([[2, 8, 9]])
    assert torch.equal(model(src, torch.tensor([4]), prev), loaded(src, torch.tensor([4]), prev))


def test_backend_override(tiny):
    loaded, _ = model_from_checkpoint(tiny[0], backend="reference")
    assert loaded.config.backend == "reference"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope\.pt: the file does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_truncated_and_empty_files(tiny, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(tiny[0], path)
    data = path.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("half.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=rf"cannot read .*{name} as a checkpoint \(truncated") as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)                                 # one line, for the CLI


def test_files_that_are_not_convs2s_checkpoints(tmp_path):
    # A plain pickle of an object weights_only refuses (a fairseq checkpoint holds an argparse.Namespace).
    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump({"args": argparse.Namespace(arch="fconv")}, f, protocol=2)
    torch.save({"args": argparse.Namespace(arch="fconv"), "model": {}}, tmp_path / "fairseq.pt")
    (tmp_path / "text.pt").write_text("hello\n")
    for name in ("pickle.pt", "fairseq.pt", "text.pt"):
        with pytest.raises(CheckpointError, match=f"cannot read .*{name} as a checkpoint"):
            load_checkpoint(tmp_path / name)
    # Readable by torch.load(weights_only=True), but not a convs2s checkpoint.
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "dict.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("dict.pt", "list.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is not a convs2s checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"format": CHECKPOINT_FORMAT + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"format {CHECKPOINT_FORMAT + 1}; this convs2s reads format"):
        load_checkpoint(tmp_path / "future.pt")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_model_from_a_checkpoint_without_a_model(tiny):
    with pytest.raises(CheckpointError, match="no 'config', 'model' entry"):
        model_from_checkpoint({"format": CHECKPOINT_FORMAT, "tokenizer": tiny[0]["tokenizer"]})


def test_weights_that_do_not_fit_the_config(tiny):
    ckpt = dict(tiny[0])
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match="weights do not fit its config: RuntimeError: Error"):
        model_from_checkpoint(ckpt)
    ckpt = dict(tiny[0], config={**tiny[0]["config"], "no_such_field": 1})
    with pytest.raises(CheckpointError, match="model config is not valid here"):
        model_from_checkpoint(ckpt)
