"""Training under faults: ranks that must agree, runs killed while saving, diverging losses, every stop reason.

The two-process cases launch torchrun (gloo, CPU) on the tiny preset; each takes tens of seconds on a 2-core
machine, and each has a timeout that turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from convs2s.checkpoint import load_checkpoint
from convs2s.data import TokenBatchSampler
from convs2s.train import TrainArgs, TrainingDiverged, train
from tests.multi30k import multi30k_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(preset="tiny", train_subset=64, val_subset=8, vocab_size=200, max_tokens=200, log_interval=1,
            val_bleu_sentences=0, progress=False, num_threads=1)


def _records(run, kind):
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _torchrun(tmp_path, script: str, *args, timeout: float = 240):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.time() - t0


# ------------------------------------------------------------------------------------------ ranks agree

_SKEWED_CLOCK = """
    import os, sys, time
    import convs2s.train as T

    # Rank 1's clock runs an hour ahead after its first reading: it alone would pass the --max-minutes deadline.
    if os.environ["RANK"] == "1":
        real, calls = time.time, [0]
        def skewed():
            calls[0] += 1
            return real() + (3600 if calls[0] > 1 else 0)
        T.time = type("Clock", (), {"time": staticmethod(skewed)})
    r = T.train(T.TrainArgs(preset="tiny", data=sys.argv[2], save_dir=sys.argv[1] + "/run", train_subset=64,
                            val_subset=8, vocab_size=200, max_tokens=200, max_updates=50, max_minutes=30,
                            log_interval=1, val_bleu_sentences=0, progress=False))
    # One file per rank: two ranks printing to one stdout pipe can interleave their lines.
    with open(f"{sys.argv[1]}/stop{os.environ['RANK']}", "w") as f:
        f.write(f"{os.environ['RANK']} {r.metrics['stop_reason']} {r.metrics['updates']}")
"""


def test_max_minutes_stop_is_agreed_by_every_rank(tmp_path):
    """The regression test for the hang: one rank past the deadline, the other not; both stop at the same update."""
    data = multi30k_dir()
    proc, _ = _torchrun(tmp_path, _SKEWED_CLOCK, tmp_path, data, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stops = sorted((tmp_path / f"stop{r}").read_text().split() for r in (0, 1) if (tmp_path / f"stop{r}").exists())
    assert stops == [["0", "max_minutes", "1"], ["1", "max_minutes", "1"]], proc.stdout


_RANK0_FAILS = """
    import os, sys, time
    from convs2s.train import TrainArgs, train

    try:
        train(TrainArgs(preset="tiny", data=sys.argv[2], save_dir=sys.argv[1] + "/run", max_updates=2,
                        progress=False))
    except Exception as e:
        with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.err", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        time.sleep(1)   # leave the other rank time to write its file before torchrun stops the group
        raise
"""


def test_an_error_on_rank_0_before_a_collective_ends_every_rank(tmp_path):
    """Rank 0 finds no data folder; rank 1 would wait for it in a broadcast. Both end, with the message."""
    missing = tmp_path / "no-such-folder"
    proc, wall = _torchrun(tmp_path, _RANK0_FAILS, tmp_path, missing, timeout=120)
    assert proc.returncode != 0
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in (0, 1) if (tmp_path / f"rank{r}.err").exists()}
    assert set(errors) == {0, 1}, (errors, proc.stderr[-3000:])
    assert str(missing) in errors[0] and str(missing) in errors[1], errors
    assert "rank 0 failed" in errors[1]
    assert wall < 60, f"took {wall:.0f} s"


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    data = multi30k_dir()
    run = tmp_path / "run"
    train(TrainArgs(data=str(data), save_dir=str(run), max_updates=2, **TINY))
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["rng"] = ckpt["rng"] * 2                                 # as written by a two-process run
    torch.save(ckpt, run / "two.pt")
    with pytest.raises(ValueError, match="written by 2 process"):
        train(TrainArgs(data=str(data), save_dir=str(run), resume=str(run / "two.pt"), max_updates=4, **TINY))


def test_resume_from_the_old_decoder_layout_is_refused(tmp_path):
    from convs2s.model import upgrade_decoder_key
    data = multi30k_dir()
    run = tmp_path / "run"
    train(TrainArgs(data=str(data), save_dir=str(run), max_updates=1, **TINY))
    ckpt = load_checkpoint(run / "last.pt")
    old = {}
    for k, v in ckpt["model"].items():       # the inverse of upgrade_decoder_key for conv weights
        if k.startswith("decoder.layers.") and ".conv." in k:
            i, leaf = k[len("decoder.layers."):].split(".conv.")
            k = f"decoder.convolutions.{i}.{leaf}"
            assert "decoder." + upgrade_decoder_key(k[len("decoder."):]) in ckpt["model"]
        old[k] = v
    ckpt["model"] = old
    torch.save(ckpt, run / "old.pt")
    with pytest.raises(ValueError, match="predates the DecoderLayer layout"):
        train(TrainArgs(data=str(data), save_dir=str(run), resume=str(run / "old.pt"), max_updates=2, **TINY))


def test_ranks_batches_are_disjoint_and_cover_the_epoch():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 30, (500,), generator=g).tolist()
    tgt = torch.randint(3, 30, (500,), generator=g).tolist()
    def batches(sampler):                                         # index arrays -> lists of ints
        return [[int(i) for i in b] for b in sampler]
    shares = [batches(TokenBatchSampler(src, tgt, 300, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1                    # every rank runs the same number of steps
    for e in (1, 2):
        for r in range(3):
            sampler = TokenBatchSampler(src, tgt, 300, seed=3, rank=r, world_size=3)
            sampler.set_epoch(e)
            shares[r] = batches(sampler)
        merged = [b for step in zip(*shares) for b in step]
        one_e = TokenBatchSampler(src, tgt, 300, seed=3)
        one_e.set_epoch(e)
        one = batches(one_e)
        assert merged[:len(one)] == one                          # rank r takes batches r, r + 3, ...
        seen = [i for s in shares for b in s for i in b][:sum(map(len, one))]
        assert sorted(seen) == list(range(500))                  # disjoint: each pair once in the epoch


_TWO_RANK_RUN = """
    import os, sys
    from convs2s.train import TrainArgs, train
    out, data, updates = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    train(TrainArgs(preset="tiny", data=data, save_dir=out, train_subset=64, val_subset=8, vocab_size=200,
                    max_tokens=200, max_updates=updates, log_interval=1, val_bleu_sentences=0, progress=False,
                    deterministic=True, resume=resume))
"""


_EQUIVALENT_RUN = """
    import os, sys
    import torch
    from convs2s.train import TrainArgs, train
    out, data, update_freq = sys.argv[1], sys.argv[2], int(sys.argv[3])
    r = train(TrainArgs(preset="tiny", data=data, save_dir=out, train_subset=64, val_subset=8, vocab_size=200,
                        max_tokens=200, max_updates=4, log_interval=1, val_bleu_sentences=0, progress=False,
                        dropout=0.0, update_freq=update_freq, num_threads=1))
    if os.environ.get("RANK", "0") == "0":
        torch.save(r.model.state_dict(), out + "/final.pt")
"""


def test_two_ranks_equal_one_process_over_the_same_global_batches(tmp_path):
    """Rank r takes batches r, r + 2, ... of the epoch; one process with two batches per update (update_freq 2)
    takes the same pairs per update. Without dropout the two runs are the same computation up to summation
    order."""
    data = multi30k_dir()
    proc, _ = _torchrun(tmp_path, _EQUIVALENT_RUN, tmp_path / "two", data, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = tmp_path / "one.py"
    script.write_text(textwrap.dedent(_EQUIVALENT_RUN))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(data), "2"], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = _records(tmp_path / "two", "train")
    one = _records(tmp_path / "one", "train")
    assert [r["update"] for r in two] == [r["update"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        print(a["update"], a["loss"], b["loss"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    p2 = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    p1 = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_rank_run_resumed_continues_exactly(tmp_path):
    data = multi30k_dir()
    proc, _ = _torchrun(tmp_path, _TWO_RANK_RUN, tmp_path / "full", data, 6)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, _ = _torchrun(tmp_path, _TWO_RANK_RUN, tmp_path / "part", data, 3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, _ = _torchrun(tmp_path, _TWO_RANK_RUN, tmp_path / "part", data, 6, "")
    assert proc.returncode == 0, proc.stderr[-4000:]
    full = {r["update"]: r["loss"] for r in _records(tmp_path / "full", "train")}
    part = {r["update"]: r["loss"] for r in _records(tmp_path / "part", "train")}
    assert sorted(part) == sorted(full) == list(range(1, 7))
    for u in range(1, 7):
        assert part[u] == full[u], (u, part[u], full[u])


# ------------------------------------------------------------------------------------------ stops and saves

def test_every_stop_reason(tmp_path):
    data = multi30k_dir()
    r = train(TrainArgs(data=str(data), save_dir=str(tmp_path / "u"), max_updates=3, **TINY))
    assert (r.metrics["stop_reason"], r.metrics["updates"]) == ("max_updates", 3)
    r = train(TrainArgs(data=str(data), save_dir=str(tmp_path / "e"), max_epochs=1, **TINY))
    assert r.metrics["stop_reason"] == "max_epochs" and r.metrics["epochs_completed"] == 1
    r = train(TrainArgs(data=str(data), save_dir=str(tmp_path / "m"), max_minutes=1e-6, **TINY))
    assert (r.metrics["stop_reason"], r.metrics["updates"]) == ("max_minutes", 1)
    # lr floor: a floor above the starting lr stops the run at the first epoch end.
    r = train(TrainArgs(data=str(data), save_dir=str(tmp_path / "l"), max_epochs=5, min_lr=1.0, **TINY))
    assert r.metrics["stop_reason"] == "min_lr" and r.metrics["epochs_completed"] == 1
    for run in ("u", "e", "m", "l"):
        assert (tmp_path / run / "last.pt").exists() and (tmp_path / run / "best.pt").exists()


def test_save_interval_updates_saves_mid_epoch(tmp_path):
    data = multi30k_dir()
    seen = []
    import convs2s.train as T
    real = T.save_checkpoint

    def spy(obj, path):
        seen.append((obj["train_state"]["updates"], os.path.basename(path)))
        return real(obj, path)
    T.save_checkpoint = spy
    try:
        train(TrainArgs(data=str(data), save_dir=str(tmp_path), max_updates=5, save_interval_updates=2, **TINY))
    finally:
        T.save_checkpoint = real
    updates = [u for u, name in seen if name == "last.pt"]
    assert {2, 4} <= set(updates) and updates[-1] == 5, updates


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(Exception, match="last.pt"):
        train(TrainArgs(data=str(multi30k_dir()), save_dir=str(tmp_path), resume="", max_updates=2, **TINY))


_KILLED_IN_SAVE = """
    import os, signal, sys
    import convs2s.checkpoint as C
    import torch

    # The second save of last.pt dies (SIGKILL) after writing part of the file.
    real_save, calls = torch.save, [0]
    def dying_save(obj, f):
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"x" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f)
    C.torch.save = dying_save
    from convs2s.train import TrainArgs, train
    train(TrainArgs(preset="tiny", data=sys.argv[2], save_dir=sys.argv[1], train_subset=64, val_subset=8,
                    vocab_size=200, max_tokens=200, max_updates=6, save_interval_updates=2, log_interval=1,
                    val_bleu_sentences=0, progress=False, num_threads=1, deterministic=True))
"""


def test_killed_while_saving_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = multi30k_dir()
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_IN_SAVE))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(run), str(data)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert list(run.glob(".*.tmp-*")), "the killed save left its temporary file"
    assert load_checkpoint(run / "last.pt")["train_state"]["updates"] == 2     # the last complete save
    train(TrainArgs(data=str(data), save_dir=str(run), resume="", max_updates=6, save_interval_updates=2,
                    deterministic=True, **TINY))
    assert not list(run.glob(".*.tmp-*")), "resume removes the leftover temporary file"
    train(TrainArgs(data=str(data), save_dir=str(tmp_path / "full"), max_updates=6, save_interval_updates=2,
                    deterministic=True, **TINY))
    full = {r["update"]: r["loss"] for r in _records(tmp_path / "full", "train")}
    resumed = {}
    for r in _records(run, "train"):
        resumed[r["update"]] = r["loss"]                            # the resumed run's records overwrite 3, 4
    assert resumed == full


def test_diverging_run_stops_naming_the_update_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import convs2s.train as T
    real, calls = T.label_smoothed_nll_loss, [0]

    def diverges_at_update_3(logits, target, epsilon, *a, **k):
        loss, nll = real(logits, target, epsilon, *a, **k)
        if torch.is_grad_enabled():                                 # training steps, not validation
            calls[0] += 1
            if calls[0] >= 3:
                loss = loss * float("nan")
        return loss, nll
    monkeypatch.setattr(T, "label_smoothed_nll_loss", diverges_at_update_3)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at update 3; .*last good checkpoint"):
        train(TrainArgs(data=str(multi30k_dir()), save_dir=str(run), max_updates=40, save_interval_updates=2,
                        **TINY))
    after = load_checkpoint(run / "last.pt")
    assert after["train_state"]["updates"] == 2
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    assert _records(run, "error")[0]["update"] == 3


def test_train_leaves_process_settings_as_it_found_them(tmp_path):
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    train(TrainArgs(data=str(multi30k_dir()), save_dir=str(tmp_path), max_updates=1, deterministic=True,
                    **{**TINY, "num_threads": 2 if before[0] == 1 else 1}))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
