"""The training tools of bench/: train_levers (the table of runs that differ in one setting, from their train
logs) and profile_train (where a training step's time goes)."""

import json

import pytest

from bench import profile_train
from bench.train_levers import main, read_run, table


def _log(folder, starts, valids, end=True):
    folder.mkdir()
    recs = [{"type": "start", "args": a} for a in starts[:1]]
    recs += [{"type": "valid", "update": u, "epoch": e, "loss": lo, "bleu": b, "wall_s": 1.0} for u, e, lo, b in valids]
    recs += [{"type": "start", "args": a} for a in starts[1:]]
    if end:
        recs.append({"type": "end", "updates": valids[-1][0]})
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


def test_changes_against_the_baseline_and_the_last_validation(tmp_path, capsys):
    base = _log(tmp_path / "base", [{"preset": "auto", "lr": None, "save_dir": "a"},
                                    {"preset": "small", "lr": None, "save_dir": "a", "resume": "a/last.pt"}],
                [(10, 1, 5.0, 1.0), (20, 2, 4.0, 3.5)])
    other = _log(tmp_path / "other", [{"preset": "auto", "lr": 0.001, "lr_scheduler": "cosine", "save_dir": "b"}],
                 [(10, 1, 4.5, 2.0), (15, 1, 4.2, 2.5)], end=False)
    runs = {"base": read_run(base), "other": read_run(other / "train_log.jsonl")}
    rows = table(runs)
    # The resume's resolved preset and file names are not recipe changes; a missing option is today's default.
    assert rows[0]["changes"] == {} and rows[0]["finished"]
    assert rows[1]["changes"] == {"lr": 0.001, "lr_scheduler": "cosine"} and not rows[1]["finished"]
    assert (rows[0]["updates"], rows[0]["val_loss"], rows[0]["val_greedy_bleu"]) == (20, 4.0, 3.5)
    assert rows[1]["best_val_loss"] == 4.2 and [v["update"] for v in rows[1]["curve"]] == [10, 15]
    out = tmp_path / "t.json"
    main(["--runs", f"base={base}", f"other={other}", "--out", str(out), "--note", "n"])
    assert json.loads(out.read_text())["rows"][1]["run"] == "other"
    assert "(baseline)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--runs", str(base)])


def test_profile_train_ranks_the_ops_of_a_training_step(tmp_path):
    out = tmp_path / "p.json"
    profile_train.main(["--preset", "tiny", "--batch", "3", "7", "5", "--steps", "2", "--top", "4", "--out", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["batch"] == [3, 7, 5] and r["step_s_profiled"] > 0
    assert r["target_tokens_per_s_profiled"] == pytest.approx(15 / r["step_s_profiled"])
    shares = [o["self_cpu_share"] for o in r["ops"]]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
