"""Checkpoint averaging (fairseq's scripts/average_checkpoints.py): the arithmetic mean of the weights of N
checkpoints of one training run, written as a normal convs2s checkpoint (evaluate / translate load it).

    average_checkpoints(["runs/x/checkpoint_500.pt", "runs/x/checkpoint_550.pt", "runs/x/checkpoint_600.pt"])
    last_checkpoints("runs/x", 3)        -> those three paths: the folder's checkpoint_<update>.pt, newest last
    convs2s average --inputs a.pt b.pt c.pt --output avg.pt
    convs2s average --inputs runs/x --last 5 --output runs/x/average.pt

Every floating-point tensor of the model's state dict is averaged (summed in fp64, divided by N, cast back to its
dtype, so the result is the correctly rounded mean); any other tensor must be equal in every input and is kept.
The inputs must share the model config, the tokenizer and the state dict's names and shapes (one run's
checkpoints). The output keeps the newest input's "format", "config", "tokenizer", "args" and "train_state" and
lists its inputs under "averaged_from"; it holds no optimizer or RNG state, so it is for translation, not for
--resume.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import MODEL_KEYS, load_checkpoint, save_checkpoint

__all__ = ["average_checkpoints", "last_checkpoints"]

_INTERVAL = re.compile(r"checkpoint_(\d+)\.pt")
KEPT = ("format", "config", "tokenizer", "args", "train_state")


def last_checkpoints(folder: str | os.PathLike, n: int) -> list[Path]:
    """The n checkpoint_<update>.pt files of `folder` with the highest updates, oldest first (the files train
    --keep-interval-checkpoints writes). ValueError when the folder holds fewer than n."""
    if n < 1:
        raise ValueError(f"--last must be >= 1, got {n}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of checkpoints")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _INTERVAL.fullmatch(p.name)))
    if len(found) < n:
        raise ValueError(f"{folder} holds {len(found)} checkpoint_<update>.pt file(s), fewer than the {n} to "
                         "average (train with --save-interval-updates N --keep-interval-checkpoints)")
    return [p for _, p in found[-n:]]


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> dict:
    """The averaged checkpoint dict of `paths` (see the module docstring); ValueError / CheckpointError when the
    inputs are not checkpoints of one model."""
    if not paths:
        raise ValueError("no checkpoints to average")
    if len(set(map(str, paths))) != len(paths):
        raise ValueError("a checkpoint is listed twice: the mean would weight it double")
    sums: dict[str, torch.Tensor] = {}
    first = newest = None
    for path in paths:
        ckpt = load_checkpoint(path)
        missing = [k for k in MODEL_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{path} has no {', '.join(map(repr, missing))} entry: it holds no model")
        state = ckpt["model"]
        if first is None:
            first = ckpt
            for name, t in state.items():
                sums[name] = t.double().clone() if t.is_floating_point() else t.clone()
        else:
            if ckpt["config"] != first["config"] or ckpt["tokenizer"] != first["tokenizer"]:
                raise ValueError(f"{path} has another model config or tokenizer than {paths[0]}: only "
                                 "checkpoints of one run can be averaged")
            if state.keys() != sums.keys():
                raise ValueError(f"{path} holds other weights than {paths[0]} (state dict names differ)")
            for name, t in state.items():
                s = sums[name]
                if t.shape != s.shape or t.dtype != first["model"][name].dtype:
                    raise ValueError(f"{path}: weight {name} is {t.dtype} {tuple(t.shape)}, "
                                     f"{first['model'][name].dtype} {tuple(s.shape)} in {paths[0]}")
                if t.is_floating_point():
                    s += t.double()
                elif not torch.equal(t, s):
                    raise ValueError(f"{path}: non-floating-point tensor {name} differs from {paths[0]}'s; "
                                     "it cannot be averaged")
        newest = ckpt
    n = len(paths)
    model = {name: (s / n).to(first["model"][name].dtype) if s.is_floating_point() else s
             for name, s in sums.items()}
    out = {k: newest[k] for k in KEPT if k in newest}
    return out | {"model": model, "averaged_from": [str(p) for p in paths]}


def main(inputs: Sequence[str], output: str, last: int | None = None) -> dict:
    """`convs2s average`: average `inputs` (files, or one folder with last=N) into `output`; returns the dict."""
    if last is not None:
        if len(inputs) != 1:
            raise ValueError("--last N takes one folder as --inputs (its newest N checkpoint_<update>.pt files)")
        paths = last_checkpoints(inputs[0], last)
    else:
        paths = [Path(p) for p in inputs]
        if any(p.is_dir() for p in paths):
            raise ValueError("a folder as --inputs needs --last N (how many of its newest checkpoints)")
    if Path(output).resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--output {output} is one of the inputs: write the average to a new file")
    avg = average_checkpoints(paths)
    save_checkpoint(avg, output)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {output}")
    return avg
