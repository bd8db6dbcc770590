"""Where a CPU training step's time goes: torch.profiler over a few steps of `convs2s train`'s step (forward,
label-smoothed loss, backward, clip, Adam), the ops ranked by self CPU time.

    python -m bench.profile_train --preset small --batch 128 32 32 --threads 1 --steps 3 --out prof.json

--batch B Ts Tt: random tokens, no padding (128 x 32 x 32 is the padded shape of a --max-tokens 4000 bucket of
Multi30k). One untimed step first (allocations, the extension's first calls).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from convs2s.model import ConvS2S, ConvS2SConfig
from convs2s.train import arch_fields, label_smoothed_nll_loss

VOCAB = 8000


def profile(preset: str, batch: tuple[int, int, int], threads: int, steps: int, backend: str, top: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ConvS2S(ConvS2SConfig(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, backend=backend,
                                  **arch_fields(preset)))
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    B, Ts, Tt = batch
    src = torch.randint(4, VOCAB, (B, Ts))
    tgt = torch.randint(4, VOCAB, (B, Tt + 1))
    lengths = torch.full((B,), Ts)

    def step():
        logits = model(src, lengths, tgt[:, :-1])
        loss, _ = label_smoothed_nll_loss(logits, tgt[:, 1:], 0.1)
        (loss / (B * Tt)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "preset": preset, "batch": list(batch), "threads": threads, "steps": steps, "backend": backend,
        "torch": torch.__version__, "step_s_profiled": wall, "target_tokens_per_s_profiled": B * Tt / wall,
        "ops": [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count // steps,
                 "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in rows],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs=3, default=[128, 32, 32], metavar=("B", "TS", "TT"))
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    results = []
    for n in a.threads:
        r = profile(a.preset, tuple(a.batch), n, a.steps, a.backend, a.top)
        results.append(r)
        print(f"{a.preset} {a.batch} threads {n}: {r['step_s_profiled']:.2f} s/step (profiled), "
              f"{r['target_tokens_per_s_profiled']:.0f} target tokens/s")
        for o in r["ops"]:
            print(f"  {o['self_cpu_share'] * 100:5.1f} %  {o['self_cpu_ms_per_step']:8.1f} ms  {o['calls']:5d}x  "
                  f"{o['op']}")
    if a.out:
        command = "python -m bench.profile_train " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(a.out).write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
