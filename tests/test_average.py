"""convs2s.average (fairseq's average_checkpoints) and train --keep-interval-checkpoints, which feeds it."""

import pytest
import torch

from convs2s import cli
from convs2s.average import average_checkpoints, last_checkpoints
from convs2s.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from convs2s.model import ConvS2S
from convs2s.tokenizer import Tokenizer
from tests.multi30k import multi30k_dir

pytestmark = pytest.mark.usefixtures("one_thread")     # see tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    de = ["ein hund läuft im park", "zwei männer spielen fußball", "eine frau liest ein buch"] * 4
    en = ["a dog runs in the park", "two men play soccer", "a woman reads a book"] * 4
    return Tokenizer.train(de, en, vocab_size=40)


def make_ckpt(tok, seed: int, update: int, scale: float | None = None) -> dict:
    """A training-style checkpoint of a random tiny model (seed), weights times `scale` when given."""
    torch.manual_seed(seed)
    model = ConvS2S.from_preset("tiny", tok.src_vocab_size, tok.tgt_vocab_size, backend="reference")
    # Random values for every float tensor (zero-initialised biases would average to themselves).
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if scale is not None:
        state = {k: v * scale for k, v in state.items()}
    return {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "tokenizer": tok.state(), "model": state,
            "optimizer": {"state": {}, "param_groups": []}, "train_state": {"updates": update},
            "rng": [{"torch": torch.get_rng_state()}], "args": {"src_lang": "de", "tgt_lang": "en", "seed": seed}}


def write(tmp_path, ckpts: dict) -> list:
    paths = []
    for name, c in ckpts.items():
        save_checkpoint(c, tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_mean_is_the_correctly_rounded_mean_of_every_float_weight(tok, tmp_path):
    ckpts = {f"checkpoint_{u}.pt": make_ckpt(tok, seed=u, update=u) for u in (50, 100, 150)}
    paths = write(tmp_path, ckpts)
    avg = average_checkpoints(paths)
    states = [c["model"] for c in ckpts.values()]
    assert avg["model"].keys() == states[0].keys()
    n_float = 0
    for name, t in avg["model"].items():
        assert t.dtype == states[0][name].dtype and t.shape == states[0][name].shape, name
        if t.is_floating_point():
            n_float += 1
            # Three fp32 values sum exactly in fp64, so the fp64 mean rounded once to fp32 is the exact answer.
            ref = torch.stack([s[name].double() for s in states]).mean(0).to(t.dtype)
            assert torch.equal(t, ref), name
            assert not torch.equal(t, states[0][name]), name         # really averaged, not copied
    assert n_float == len([v for v in states[0].values() if v.is_floating_point()]) > 0


def test_scaled_copies_average_to_the_scaled_weights(tok, tmp_path):
    # w * 0.5, w, w * 3 -> w * 1.5 (each product and the fp64 sum are exact; one rounding to fp32 at the end).
    paths = write(tmp_path, {f"c{i}.pt": make_ckpt(tok, seed=0, update=i, scale=s)
                             for i, s in enumerate((0.5, 1.0, 3.0))})
    base = make_ckpt(tok, seed=0, update=0)["model"]
    avg = average_checkpoints(paths)["model"]
    for name, w in base.items():
        assert torch.equal(avg[name], (w.double() * 1.5).to(w.dtype)), name


def test_output_keeps_the_newest_metadata_and_loads_as_a_model(tok, tmp_path):
    ckpts = {f"checkpoint_{u}.pt": make_ckpt(tok, seed=u, update=u) for u in (50, 100)}
    paths = write(tmp_path, ckpts)
    assert cli.main(["average", "--inputs", *map(str, paths), "--output", str(tmp_path / "avg.pt")]) == 0
    avg = load_checkpoint(tmp_path / "avg.pt")
    newest = ckpts["checkpoint_100.pt"]
    for key in ("config", "tokenizer", "args", "train_state"):
        assert avg[key] == newest[key], key
    assert "optimizer" not in avg and "rng" not in avg
    assert avg["averaged_from"] == [str(p) for p in paths]
    model, loaded_tok = model_from_checkpoint(avg)
    assert loaded_tok.state() == tok.state()
    for name, t in model.state_dict().items():
        assert torch.equal(t, avg["model"][name]), name


def test_last_n_picks_the_highest_updates_numerically(tok, tmp_path):
    for u in (50, 100, 550, 600, 1000):
        save_checkpoint(make_ckpt(tok, seed=1, update=u), tmp_path / f"checkpoint_{u}.pt")
    save_checkpoint(make_ckpt(tok, seed=1, update=0), tmp_path / "last.pt")        # not an interval checkpoint
    assert [p.name for p in last_checkpoints(tmp_path, 3)] == \
        ["checkpoint_550.pt", "checkpoint_600.pt", "checkpoint_1000.pt"]
    with pytest.raises(ValueError, match="holds 5 checkpoint_<update>.pt file.*fewer than the 6"):
        last_checkpoints(tmp_path, 6)
    assert cli.main(["average", "--inputs", str(tmp_path), "--last", "2", "--output", str(tmp_path / "a.pt")]) == 0
    assert load_checkpoint(tmp_path / "a.pt")["averaged_from"][-1].endswith("checkpoint_1000.pt")


def test_inputs_of_different_models_are_refused(tok, tmp_path, capsys):
    a, b = make_ckpt(tok, seed=1, update=1), make_ckpt(tok, seed=2, update=2)
    b["config"] = {**b["config"], "dropout": 0.5}
    pa, pb = write(tmp_path, {"a.pt": a, "b.pt": b})
    with pytest.raises(ValueError, match="another model config or tokenizer"):
        average_checkpoints([pa, pb])
    with pytest.raises(ValueError, match="listed twice"):
        average_checkpoints([pa, pa])
    c = make_ckpt(tok, seed=3, update=3)
    c["model"] = {**c["model"], "counter": torch.tensor([1])}
    d = make_ckpt(tok, seed=4, update=4)
    d["model"] = {**d["model"], "counter": torch.tensor([2])}
    pc, pd = write(tmp_path, {"c.pt": c, "d.pt": d})
    with pytest.raises(ValueError, match="non-floating-point tensor counter differs"):
        average_checkpoints([pc, pd])
    # The command: one line on stderr, status 2, no output file.
    assert cli.main(["average", "--inputs", str(pa), str(pb), "--output", str(tmp_path / "o.pt")]) == 2
    assert "another model config" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()
    assert cli.main(["average", "--inputs", str(tmp_path), "--output", str(tmp_path / "o.pt")]) == 2
    assert cli.main(["average", "--inputs", str(pc), "--output", str(pc)]) == 2


def test_train_keeps_interval_checkpoints_for_averaging(tok, tmp_path):
    from convs2s.train import TrainArgs, train
    run = tmp_path / "run"
    # A stale interval checkpoint of an earlier, longer run in the same folder: superseded, deleted.
    save_checkpoint(make_ckpt(tok, seed=1, update=1000), run / "checkpoint_1000.pt")
    args = TrainArgs(preset="tiny", data=str(multi30k_dir()), save_dir=str(run), train_subset=32,
                     val_subset=8, vocab_size=300, max_tokens=300, max_updates=7, save_interval_updates=2,
                     keep_interval_checkpoints=-1, val_bleu_sentences=0, progress=False, dropout=0.0,
                     num_threads=1)
    train(args)
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == \
        ["checkpoint_2.pt", "checkpoint_4.pt", "checkpoint_6.pt"]
    assert load_checkpoint(run / "checkpoint_4.pt")["train_state"]["updates"] == 4
    assert load_checkpoint(run / "last.pt")["train_state"]["updates"] == 7
    avg = average_checkpoints(last_checkpoints(run, 2))
    model_from_checkpoint(avg)
    # keep N: only the newest N stay.
    train(TrainArgs(**{**vars(args), "save_dir": str(tmp_path / "two"), "keep_interval_checkpoints": 2}))
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint_*.pt")) == \
        ["checkpoint_4.pt", "checkpoint_6.pt"]
    # Without the option only last.pt / best.pt are written.
    train(TrainArgs(**{**vars(args), "save_dir": str(tmp_path / "plain"), "keep_interval_checkpoints": 0}))
    assert not list((tmp_path / "plain").glob("checkpoint_*.pt"))
