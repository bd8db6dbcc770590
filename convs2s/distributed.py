"""Multi-process training (torchrun): the process group, and decisions every rank takes together.

Ranks wait for each other in every collective, so a decision that one rank takes alone hangs the others: a rank
that stops on its own clock validates while another starts an update, and a rank that raises before a broadcast
leaves the others waiting in it. Here every such decision is agreed:

    d, device = init_distributed("auto")          # joins the group torchrun describes (WORLD_SIZE > 1)
    if agree(local_stop, d, device): ...          # True on every rank when any rank says True
    value = on_main(lambda: find_data(...), d)    # rank 0 computes, every rank gets the value or the error
    run_agreed(lambda: load(...), d, device)      # every rank computes; if one fails, all raise

Single-process runs (world size 1) pay nothing: no collective is issued.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .device import resolve_device

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class RankError(RuntimeError):
    """Another rank failed; the message is that rank's error."""


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over ranks in place (identity for one process)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce of one number)."""
    if not d.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def on_main(fn: Callable[[], T], d: Dist) -> T:
    """fn() on rank 0, its (picklable) result on every rank. If fn raises on rank 0, rank 0 re-raises it and every
    other rank raises RankError with the same message, instead of waiting for a value that never comes."""
    if not d.enabled:
        return fn()
    box: list = [None]
    error: BaseException | None = None
    if d.main:
        try:
            box = [("ok", fn())]
        except Exception as e:  # sent to the other ranks, then re-raised here
            error = e
            box = [("error", _error_text(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise RankError(f"rank 0 failed: {value}")
    return value


def run_agreed(fn: Callable[[], T], d: Dist, device: torch.device) -> T:
    """fn() on every rank; if it raises on any rank, every rank raises (the failing rank its own error, the others
    RankError naming the first failing rank's message)."""
    if not d.enabled:
        return fn()
    error: BaseException | None = None
    value = None
    try:
        value = fn()
    except Exception as e:
        error = e
    texts: list = [None] * d.world_size
    dist.all_gather_object(texts, None if error is None else _error_text(error))
    if error is not None:
        raise error
    failed = [(r, t) for r, t in enumerate(texts) if t is not None]
    if failed:
        r, t = failed[0]
        raise RankError(f"rank {r} failed: {t}")
    return value
