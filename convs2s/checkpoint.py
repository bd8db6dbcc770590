"""convs2s checkpoints: atomic save, checked load, and the model + tokenizer they hold.

    save_checkpoint({"format": CHECKPOINT_FORMAT, ...}, "runs/x/last.pt")
    ckpt = load_checkpoint("runs/x/best.pt")                   a dict; CheckpointError if it is not a checkpoint
    model, tok = model_from_checkpoint(ckpt, device, backend)  model in eval mode on `device`, the tokenizer

A checkpoint is a dict of plain Python values and tensors, read with torch.load(weights_only=True) (no code runs
on load): "format" (CHECKPOINT_FORMAT), "config" (ConvS2SConfig.to_dict()), "tokenizer" (Tokenizer.state()),
"model" (the state dict); training adds "optimizer", "train_state", "rng" and "args" (see convs2s.train).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .model import ConvS2S, ConvS2SConfig
from .tokenizer import Tokenizer

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT_FORMAT = 1
MODEL_KEYS = ("config", "tokenizer", "model")      # what model_from_checkpoint needs


class CheckpointError(ValueError):
    """A file that is missing, unreadable (truncated, corrupted) or not a convs2s checkpoint; the message says
    which, in one line."""


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX):
    a process killed mid-write leaves the previous file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict at `path`, tensors on `map_location`; CheckpointError for a missing file, one torch
    cannot read with weights_only=True (truncated, corrupted, or holding arbitrary objects such as a fairseq
    checkpoint), or one without this format's "format" key."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: it is not a file")
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols before failing on a foreign file
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, KeyError, UnpicklingError...
        raise CheckpointError(f"cannot read {path} as a checkpoint (truncated, corrupted, or not a convs2s "
                              f"checkpoint): {_first_line(e)}") from e
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a convs2s checkpoint (no 'format' entry); a fairseq checkpoint "
                              "is translated with `convs2s translate --fairseq DIR`")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a checkpoint of format {ckpt['format']!r}; this convs2s reads format "
                              f"{CHECKPOINT_FORMAT}")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu", backend: str | None = None):
    """(model in eval mode on `device`, tokenizer) from a loaded checkpoint; `backend` overrides the saved one.

    CheckpointError when an entry is missing or the weights do not fit the saved config."""
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"the checkpoint has no {', '.join(map(repr, missing))} entry: it holds no model")
    cfg = dict(ckpt["config"])
    if backend is not None:
        cfg["backend"] = backend
    try:
        config = ConvS2SConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config is not valid here: {_first_line(e)}") from e
    model = ConvS2S.uninitialized(config, device=device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its config: {_first_line(e)}") from e
    return model.eval(), Tokenizer.from_state(ckpt["tokenizer"])
