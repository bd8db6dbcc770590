"""Training: the loss falls, greedy translation and evaluation run end to end, exact resume, atomic checkpoints,
and two-process torchrun (gloo) training ending with identical parameters on both ranks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from convs2s import data as D
from convs2s.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from convs2s.evaluate import evaluate
from convs2s.generate import translate
from convs2s.train import TrainArgs, label_smoothed_nll_loss, scheduled_lr, train
from tests.multi30k import multi30k_dir

pytestmark = pytest.mark.usefixtures("one_thread")     # see tests/conftest.py


def _records(save_dir: Path, kind: str) -> list[dict]:
    lines = (Path(save_dir) / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _args(save_dir, **kw) -> TrainArgs:
    base = dict(preset="tiny", data=str(multi30k_dir()), save_dir=str(save_dir), vocab_size=300, max_tokens=500,
                progress=False, num_threads=1, val_subset=16, val_bleu_sentences=0)
    return TrainArgs(**{**base, **kw})


# ------------------------------------------------------------------------------------------ learning

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model memorising 64 training pairs with the paper's optimizer (Nesterov momentum 0.99, lr 0.25):
    300 updates (~10 s here), no dropout, constant lr."""
    save_dir = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    result = train(_args(save_dir, train_subset=64, max_updates=300, dropout=0.0, lr_shrink=1.0, log_interval=10,
                         optimizer="nag", val_bleu_sentences=8, metrics_json=str(save_dir / "metrics.json")))
    return save_dir, result


def test_loss_falls_by_half(trained):
    save_dir, result = trained
    losses = [r["loss"] for r in _records(save_dir, "train")]
    first, last = losses[0], sum(losses[-3:]) / 3
    print(f"train loss {first:.3f} -> {last:.3f} over {result.metrics['updates']} updates")
    assert result.metrics["updates"] == 300 and result.metrics["stop_reason"] == "max_updates"
    assert last < 0.5 * first
    valid = _records(save_dir, "valid")
    assert valid and all("bleu" in v and "bleu_signature" in v for v in valid)
    assert json.loads((save_dir / "metrics.json").read_text())["updates"] == 300
    # The commit is read once, at the start, so the record names the code that trained.
    assert _records(save_dir, "start")[0]["commit"] == result.metrics["commit"]


def test_checkpoint_holds_config_tokenizer_weights_optimizer_rng(trained):
    save_dir, result = trained
    ckpt = load_checkpoint(save_dir / "last.pt")                 # torch.load(weights_only=True) inside
    assert set(ckpt) >= {"config", "tokenizer", "model", "optimizer", "train_state", "rng", "args"}
    assert isinstance(ckpt["tokenizer"]["src_proto"], bytes)
    model, tok = model_from_checkpoint(ckpt)
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert tok.state() == result.tokenizer.state()
    assert ckpt["train_state"]["updates"] == 300
    assert (save_dir / "best.pt").is_file()


def test_greedy_translation_is_the_models_argmax_and_batch_independent(trained):
    _, result = trained
    model, tok = result.model.eval(), result.tokenizer
    src, _ = D.load_pair(multi30k_dir(), "train", "de", "en")
    ds = D.PairDataset(tok.encode_src(src[:6]))
    batch = ds.collate(range(6))
    hyps = translate(model, batch.src_tokens, batch.src_lengths, beam=1, max_len_a=1.0, max_len_b=5)
    eos = model.config.eos_idx
    for i, (h,) in enumerate(hyps):
        n = int(batch.src_lengths[i])
        assert h.tokens[-1] == eos and (h.tokens[:-1] != eos).all()
        assert len(h.tokens) <= int(1.0 * n + 5) + 1
        # Teacher-forcing the hypothesis gives back the same tokens as the argmax, except where forced (EOS at
        # the length limit) -- and the scores are those tokens' log-probabilities.
        prev = torch.cat([torch.tensor([model.config.bos_idx]), h.tokens[:-1]])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(batch.src_tokens[i:i + 1, :n], None, prev).float(), -1)[0]
        forced = len(h.tokens) == int(1.0 * n + 5) + 1
        picked = lp.gather(-1, h.tokens[:, None])[:, 0]
        torch.testing.assert_close(h.positional_scores, picked, atol=1e-5, rtol=1e-5)
        assert h.score == pytest.approx(float(picked.mean()), abs=1e-5)
        lp[:, [model.config.pad_idx, model.config.bos_idx]] = float("-inf")
        argmax = lp.argmax(-1)
        upto = len(h.tokens) - 1 if forced else len(h.tokens)
        assert torch.equal(argmax[:upto], h.tokens[:upto])
        # Alone, the sentence gets the same translation as inside the padded batch.
        alone = translate(model, batch.src_tokens[i:i + 1, :n], beam=1, max_len_a=1.0, max_len_b=5)[0][0]
        assert torch.equal(alone.tokens, h.tokens)
    with pytest.raises(ValueError, match="nbest"):
        translate(model, batch.src_tokens, beam=2, nbest=3)


def test_evaluate_end_to_end_prints_bleu(trained, tmp_path, capsys):
    save_dir, _ = trained
    src, ref = D.load_pair(multi30k_dir(), "train", "de", "en")
    (tmp_path / "src.de").write_text("\n".join(src[:64]) + "\n")
    (tmp_path / "ref.en").write_text("\n".join(ref[:64]) + "\n")
    m = evaluate(str(save_dir / "last.pt"), src=str(tmp_path / "src.de"), ref=str(tmp_path / "ref.en"),
                 output=str(tmp_path / "hyp.en"), device="cpu", examples=2)
    out = capsys.readouterr().out
    assert "sacreBLEU: BLEU = " in out and "signature: nrefs:1|case:mixed|eff:no|tok:13a" in out and "chrF:" in out
    assert len((tmp_path / "hyp.en").read_text().splitlines()) == 64
    # The model memorised these 64 pairs; a broken decoder or detokenizer would score near 0.
    print(m["bleu_str"])
    assert m["bleu"] > 10


def test_label_smoothed_loss_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    target = torch.tensor([[4, 5, 1], [6, 1, 1]])                # 1 = PAD
    loss, nll = label_smoothed_nll_loss(logits, target, 0.0)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 7), target.view(-1), ignore_index=1, reduction="sum")
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(nll, ce)
    loss, _ = label_smoothed_nll_loss(logits, target, 0.1)
    lp = torch.log_softmax(logits, -1)[target.ne(1)]              # (3, 7)
    t = target[target.ne(1)]
    q = torch.full((3, 7), 0.1 / 6)
    q[torch.arange(3), t] = 0.9
    torch.testing.assert_close(loss, -(q * lp).sum())


# ------------------------------------------------------------------------------------------ lr schedules

def test_scheduled_lr_formulas():
    assert [scheduled_lr("plateau", 1.0, u, 4, 0) for u in (1, 2, 4, 5, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert scheduled_lr("plateau", 0.3, 1, 0, 0) == 0.3
    # inverse_sqrt: continuous at the end of warmup, then base * sqrt(warmup / update)
    assert scheduled_lr("inverse_sqrt", 2.0, 16, 16, 0) == 2.0
    assert scheduled_lr("inverse_sqrt", 2.0, 64, 16, 0) == pytest.approx(1.0)
    assert scheduled_lr("inverse_sqrt", 2.0, 4, 0, 0) == pytest.approx(1.0)
    # cosine: base at the end of warmup, half at the midpoint, 0 at max_updates and after
    assert scheduled_lr("cosine", 1.0, 10, 10, 110) == 1.0
    assert scheduled_lr("cosine", 1.0, 60, 10, 110) == pytest.approx(0.5)
    assert scheduled_lr("cosine", 1.0, 110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr("cosine", 1.0, 200, 10, 110) == pytest.approx(0.0, abs=1e-12)
    lrs = [scheduled_lr("cosine", 1.0, u, 10, 110) for u in range(1, 111)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[9:], lrs[10:]))
    with pytest.raises(ValueError, match="lr_scheduler"):
        scheduled_lr("linear", 1.0, 1, 0, 10)


def test_logged_lr_follows_the_cosine_schedule_and_resume_is_exact(tmp_path):
    kw = dict(train_subset=24, vocab_size=200, max_tokens=300, log_interval=1, deterministic=True, val_subset=8,
              optimizer="adam", lr=0.002, lr_scheduler="cosine", warmup_updates=4)
    full = train(_args(tmp_path / "full", max_updates=14, **kw))
    a = [(r["update"], r["loss"], r["lr"]) for r in _records(tmp_path / "full", "train")]
    assert [lr for _, _, lr in a] == pytest.approx([scheduled_lr("cosine", 0.002, u, 4, 14) for u in range(1, 15)])
    assert full.metrics["stop_reason"] == "max_updates"      # the lr reached 0: no min-lr stop on this schedule
    # Interrupted by an epoch limit: the cosine horizon is --max-updates, so the first part keeps max_updates=14.
    part = train(_args(tmp_path / "split", max_updates=14, max_epochs=2, **kw))
    assert part.metrics["stop_reason"] == "max_epochs" and 0 < part.metrics["updates"] < 14
    resumed = train(_args(tmp_path / "split", max_updates=14, resume="", **kw))
    b = [(r["update"], r["loss"], r["lr"]) for r in _records(tmp_path / "split", "train")]
    assert b == a
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_bad_schedule_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="give --max-updates"):
        train(_args(tmp_path / "a", lr_scheduler="cosine", max_epochs=1))
    with pytest.raises(ValueError, match="lr_scheduler must be"):
        train(_args(tmp_path / "b", lr_scheduler="step", max_updates=1))
    with pytest.raises(ValueError, match="warmup_updates"):
        train(_args(tmp_path / "c", warmup_updates=-1, max_updates=1))


# ------------------------------------------------------------------------------------------ resume

def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    # 3 batches per epoch: the stop at update 7 is mid-epoch, and both runs cross epoch ends (validation, lr
    # schedule: with Adam at lr 0.01 the validation loss rises after epoch 6 and the lr is cut at update 21 here).
    # Dropout stays on, so the RNG state must be restored too; Adam's moments come from the checkpoint.
    kw = dict(train_subset=24, vocab_size=200, max_tokens=300, log_interval=1, deterministic=True,
              val_bleu_sentences=4, val_subset=8, optimizer="adam", lr=0.01)
    full = train(_args(tmp_path / "full", max_updates=24, **kw))
    train(_args(tmp_path / "split", max_updates=7, **kw))
    ckpt = load_checkpoint(tmp_path / "split" / "last.pt")
    assert ckpt["train_state"]["updates"] == 7 and ckpt["train_state"]["batch_in_epoch"] > 0
    resumed = train(_args(tmp_path / "split", max_updates=24, resume="", **kw))
    a = [(r["update"], r["loss"], r["lr"]) for r in _records(tmp_path / "full", "train")]
    b = [(r["update"], r["loss"], r["lr"]) for r in _records(tmp_path / "split", "train")]
    assert [u for u, _, _ in b] == list(range(1, 25)) and b == a
    assert len({lr for _, _, lr in a}) > 1, "the lr schedule should have acted within these updates"
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(v, w), k


# ------------------------------------------------------------------------------------------ atomic saves

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from convs2s import checkpoint as C

    path = sys.argv[1]
    C.save_checkpoint({"format": 1, "step": 1, "w": torch.ones(1000)}, path)

    class DieAfter:
        # A file that dies (SIGKILL, no cleanup) halfway through the first write that crosses 1 MB.
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            if self.n > 1 << 20:
                self.f.write(bytes(b)[:len(b) // 2])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return self.f.write(b)
        def __getattr__(self, name):
            return getattr(self.f, name)

    real_save = torch.save
    C.torch.save = lambda obj, f: real_save(obj, DieAfter(f))
    C.save_checkpoint({"format": 1, "step": 2, "w": torch.zeros(4 << 20)}, path)
""")


def test_save_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers and leftovers[0].stat().st_size > 1 << 20, "the second save was interrupted mid-write"
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(leftovers[0])                                # the partial file is not a checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    save_checkpoint({"format": 1, "step": 3}, path)                 # a later save still works
    assert load_checkpoint(path)["step"] == 3


# ------------------------------------------------------------------------------------------ torchrun

_WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from convs2s.train import TrainArgs, train

    out = sys.argv[1]
    r = train(TrainArgs(preset="tiny", data=sys.argv[2], save_dir=out + "/run", train_subset=64, val_subset=8,
                        vocab_size=200, max_tokens=200, max_updates=6, log_interval=1, val_bleu_sentences=4,
                        progress=False))
    torch.save(r.model.state_dict(), f"{out}/rank{os.environ['RANK']}.pt")
""")


def test_torchrun_two_cpu_processes_end_with_identical_parameters(tmp_path):
    data = multi30k_dir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(tmp_path), str(data)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    records = _records(tmp_path / "run", "train")
    assert [r["update"] for r in records] == list(range(1, 7))
    start = _records(tmp_path / "run", "start")[0]
    assert start["world_size"] == 2
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(ckpt["rng"]) == 2                                   # both ranks' RNG states, for resume
    saved = model_from_checkpoint(ckpt)[0].state_dict()            # rank 0 saved the final parameters
    assert all(torch.equal(saved[k], s0[k]) for k in s0)
