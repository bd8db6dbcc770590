"""One table of training runs that differ in one setting each: the validation curve of every run and what its
arguments change against the first (the baseline), from each run folder's train_log.jsonl.

    python -m bench.train_levers --runs baseline=runs/a lr1e3=runs/b --out levers.json

Validation only (loss and greedy BLEU at each epoch end and at the stop): the test sets are read once, at the end,
with `convs2s evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from convs2s.train import TrainArgs

# Arguments that name files or bookkeeping, not the recipe.
_NOT_RECIPE = {"data", "save_dir", "metrics_json", "resume", "progress", "num_threads", "max_minutes",
               "save_interval_updates", "keep_interval_checkpoints", "log_interval", "cache_dir"}


def read_run(folder: str | Path) -> dict:
    """A run folder (or its train_log.jsonl) -> {"args", "valid": [{update, epoch, loss, bleu, wall_s}], "end": the
    end record or None}. A resumed run appends to the same log: the recipe is its first start's arguments (a
    resume writes the resolved preset and its own file names), completed with today's TrainArgs defaults for
    options an older log does not name."""
    path = Path(folder)
    path = path / "train_log.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    starts = [r for r in records if r["type"] == "start"]
    if not starts:
        raise ValueError(f"{folder}: no start record in train_log.jsonl")
    valid = [{k: r.get(k) for k in ("update", "epoch", "loss", "bleu", "wall_s")}
             for r in records if r["type"] == "valid"]
    ends = [r for r in records if r["type"] == "end"]
    args = dataclasses.asdict(TrainArgs()) | starts[0]["args"]
    return {"args": args, "valid": valid, "end": ends[-1] if ends else None}


def table(runs: dict[str, dict]) -> list[dict]:
    """runs: name -> read_run(...), the first being the baseline -> one row per run: the recipe arguments that
    differ from the baseline's, the last validation, the best validation loss and the update count."""
    names = list(runs)
    base = {k: v for k, v in runs[names[0]]["args"].items() if k not in _NOT_RECIPE}
    rows = []
    for name in names:
        r = runs[name]
        args = {k: v for k, v in r["args"].items() if k not in _NOT_RECIPE}
        last = r["valid"][-1] if r["valid"] else {}
        rows.append({
            "run": name,
            "changes": {k: v for k, v in args.items() if base.get(k) != v},
            "updates": last.get("update"),
            "val_loss": last.get("loss"),
            "val_greedy_bleu": last.get("bleu"),
            "best_val_loss": min((v["loss"] for v in r["valid"]), default=None),
            "finished": r["end"] is not None,
            "curve": r["valid"],
        })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=FOLDER", help="the first is the baseline")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--note", default=None, help="stored in the JSON (how and where the runs were made)")
    a = p.parse_args(argv)
    runs = {}
    for item in a.runs:
        name, sep, folder = item.partition("=")
        if not sep:
            p.error(f"--runs takes NAME=FOLDER, got {item!r}")
        runs[name] = read_run(folder)
    rows = table(runs)
    print(f"{'run':<16} {'updates':>7} {'val loss':>9} {'greedy BLEU':>11}  changes")
    for r in rows:
        bleu = f"{r['val_greedy_bleu']:.2f}" if r["val_greedy_bleu"] is not None else "-"
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{r['run']:<16} {r['updates'] or 0:>7} {loss:>9} {bleu:>11}  {r['changes'] or '(baseline)'}")
    if a.out:
        Path(a.out).write_text(json.dumps({"note": a.note, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
