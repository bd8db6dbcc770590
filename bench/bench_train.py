"""Model-level benchmark: one training step (forward + backward + optimizer step) per backend.

Reports target tokens/s and peak memory for a preset, for each fused backend usable here, against the eager
reference and torch.compile(reference). bf16 autocast on GPU, fp32 on CPU — as `convs2s train` runs.

    python -m bench.bench_train --device cuda --presets multi30k fconv_wmt_en_de --out bench/out/train.json
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s.model import ConvS2S
from convs2s.ops import available_backends

# Multi30k-like batch: ~4k target tokens, sentence lengths ~ 13 (source) / 14 (target) subwords on average;
# B=128, T=32 gives the padded shape of a --max-tokens 4096 bucket.
SHAPES = {"multi30k": (128, 32, 32), "fconv_wmt_en_de": (32, 64, 64)}
QUICK_SHAPES = {"multi30k": (8, 12, 12), "fconv_wmt_en_de": (2, 8, 8)}
VOCAB = 8000


def _step_fn(model, opt, src, tgt_in, tgt_out, device):
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(src, None, tgt_in)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(),
                                                     ignore_index=model.config.pad_idx, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return loss

    return step


def impls(device: torch.device) -> list[str]:
    out = ["eager", "compile"]
    avail = available_backends(device)
    out += [b for b in ("triton", "native") if avail[b] is None]
    return out


def bench_preset(preset: str, device: torch.device, quick: bool, impl_list: list[str]) -> list[dict]:
    B, Ts, Tt = (QUICK_SHAPES if quick else SHAPES)[preset]
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (B, Ts), generator=g).to(device)
    tgt = torch.randint(4, VOCAB, (B, Tt + 1), generator=g).to(device)
    tgt_in, tgt_out = tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()
    rows = []
    for impl in impl_list:
        backend = "reference" if impl in ("eager", "compile") else impl
        torch.manual_seed(0)
        model = ConvS2S.from_preset(preset, VOCAB, VOCAB, backend=backend).to(device).train()
        fwd = torch.compile(model) if impl == "compile" else model
        opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.99, nesterov=True)
        step = _step_fn(fwd, opt, src, tgt_in, tgt_out, device)
        try:
            for _ in range(2):  # warm-up: compile, autotune, allocator
                step()
            t = common.timeit(step, device)
            mem = common.peak_memory(step, device)
        except Exception as e:  # one failing implementation must not hide the others' figures
            print(f"  {preset} {impl}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"op": "train_step", "preset": preset, "impl": impl, "error": f"{type(e).__name__}: {e}"})
            continue
        tokens = B * Tt
        rows.append({"op": "train_step", "preset": preset, "shape": f"B{B} Ts{Ts} Tt{Tt}", "impl": impl,
                     "pass": "fwd+bwd+step", **t, "tokens_per_s": tokens / (t["ms"] * 1e-3),
                     "peak_mem_bytes": mem})
        del model, opt, fwd
    base = {r["preset"]: r for r in rows if r.get("impl") == "eager" and "ms" in r}
    for r in rows:
        if "ms" in r and r["preset"] in base:
            r["speedup_vs_eager"] = base[r["preset"]]["ms"] / r["ms"]
            if r.get("peak_mem_bytes") and base[r["preset"]].get("peak_mem_bytes"):
                r["mem_vs_eager"] = r["peak_mem_bytes"] / base[r["preset"]]["peak_mem_bytes"]
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=["multi30k", "fconv_wmt_en_de"])
    ap.add_argument("--impls", nargs="+", default=None, help="subset of eager compile triton native")
    ap.add_argument("--quick", action="store_true", help="tiny batches (a dry run)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    usable = impls(device)
    impl_list = [i for i in (args.impls or usable) if i in usable]
    for i in set(args.impls or []) - set(usable):
        print(f"{i}: not usable on {device} ({available_backends(device).get(i)}), skipped")
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, device, args.quick, impl_list)
    common.print_table(rows, ["preset", "shape", "impl", "ms", "ms_p20", "ms_p80", "tokens_per_s",
                              "speedup_vs_eager", "peak_mem_bytes", "mem_vs_eager", "error"])
    if args.out:
        common.write_json(args.out, "train_step", rows, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
