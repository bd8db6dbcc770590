"""Model-level benchmark: one training step (forward + backward + optimizer step) per backend.

Rows (impl): eager (the reference backend), compile (reference + torch.compile(model, fullgraph=True), inductor),
native, native+compile, and on CUDA triton, triton+compile; each with target tokens/s and peak memory. bf16
autocast on GPU, fp32 on CPU, as `convs2s train` runs.

Peak memory is what one step allocates beyond what was allocated before it: torch.cuda.max_memory_allocated on
CUDA; on CPU (no allocator statistics) the running sum of the step's allocations and frees recorded by
torch.profiler(profile_memory=True), at its maximum.

Contenders are timed interleaved: --rounds rounds, each timing every impl once (in a fresh order per round), and
the median over rounds is reported, so a machine whose load changes during the run slows every impl alike.
On CPU --threads runs the whole table once per torch thread count.

    python -m bench.bench_train --device cuda --presets multi30k fconv_wmt_en_de --out bench/out/train.json
    python -m bench.bench_train --device cpu --presets small --threads 1 2 --out bench/out/train-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s.model import ConvS2S
from convs2s.ops import available_backends

# Multi30k-like batch: ~4k target tokens, sentence lengths ~ 13 (source) / 14 (target) subwords on average;
# B=128, T=32 gives the padded shape of a --max-tokens 4096 bucket. small: the CPU preset of `convs2s train`, at
# a quarter of that batch (1k target tokens: a step takes seconds on this project's shared 2-core CPU).
SHAPES = {"multi30k": (128, 32, 32), "fconv_wmt_en_de": (32, 64, 64), "small": (32, 32, 32), "tiny": (16, 16, 16)}
QUICK_SHAPES = {"multi30k": (8, 12, 12), "fconv_wmt_en_de": (2, 8, 8), "small": (8, 12, 12), "tiny": (4, 8, 8)}
VOCAB = 8000
IMPLS = ("eager", "compile", "native", "native+compile", "triton", "triton+compile")


def backend_of(impl: str) -> str:
    """The model's backend for an impl name: eager and compile run the reference backend."""
    name = impl.split("+")[0]
    return "reference" if name in ("eager", "compile") else name


def compiled(impl: str) -> bool:
    return impl == "compile" or impl.endswith("+compile")


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
    """The impls that run here: Triton only on CUDA (its CPU interpreter is a correctness tool, not a speed)."""
    avail = available_backends(device)
    usable = {"reference": True, "native": avail["native"] is None,
              "triton": device.type == "cuda" and avail["triton"] is None}
    return [i for i in IMPLS if usable[backend_of(i)]]


def cpu_peak_memory(fn) -> int:
    """Peak bytes one fn() call allocates on the CPU beyond what was allocated before it: the maximum of the
    running sum of the allocations (positive) and frees (negative) that torch.profiler records during the call."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    events.sort()
    return max(itertools.accumulate((size for _, size in events), initial=0))


def peak_memory(fn, device: torch.device) -> int:
    return common.peak_memory(fn, device) if device.type == "cuda" else cpu_peak_memory(fn)


def bench_preset(preset: str, device: torch.device, quick: bool, impl_list: list[str], rounds: int,
                 min_run_time: float) -> list[dict]:
    B, Ts, Tt = (QUICK_SHAPES if quick else SHAPES)[preset]
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (B, Ts), generator=g).to(device)
    tgt = torch.randint(4, VOCAB, (B, Tt + 1), generator=g).to(device)
    tgt_in, tgt_out = tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    base = {"op": "train_step", "preset": preset, "shape": f"B{B} Ts{Ts} Tt{Tt}", "threads": threads,
            "pass": "fwd+bwd+step"}
    rows, steps, extra = {}, {}, {}
    for impl in impl_list:                    # build and warm up every contender first (compile, allocator)
        torch.manual_seed(0)
        model = ConvS2S.from_preset(preset, VOCAB, VOCAB, backend=backend_of(impl)).to(device).train()
        fwd = torch.compile(model, fullgraph=True) if compiled(impl) else model
        opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.99, nesterov=True)
        step = _step_fn(fwd, opt, src, tgt_in, tgt_out, device)
        try:
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            extra[impl] = {"warmup_s": time.perf_counter() - t0, "peak_mem_bytes": peak_memory(step, device)}
            steps[impl] = step
        except Exception as e:  # one failing implementation must not hide the others' figures
            print(f"  {preset} {impl}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows[impl] = {**base, "impl": impl, "error": f"{type(e).__name__}: {e}"}
    times: dict[str, list[dict]] = {i: [] for i in steps}
    order = list(steps)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for impl in order:
            times[impl].append(common.timeit(steps[impl], device, min_run_time=min_run_time))
            print(f"  {preset} threads={threads} round {r + 1}/{rounds} {impl}: {times[impl][-1]['ms']:.1f} ms",
                  flush=True)
    for impl, ts in times.items():
        ms = statistics.median(t["ms"] for t in ts)
        rows[impl] = {**base, "impl": impl, "ms": ms, "ms_rounds": [t["ms"] for t in ts],
                      "ms_p20": statistics.median(t["ms_p20"] for t in ts),
                      "ms_p80": statistics.median(t["ms_p80"] for t in ts),
                      "tokens_per_s": B * Tt / (ms * 1e-3), **extra[impl]}
    out = [rows[i] for i in impl_list if i in rows]
    ref = rows.get("eager")
    for r in out:
        if ref is not None and "ms" in r and "ms" in ref:
            r["speedup_vs_eager"] = ref["ms"] / r["ms"]
            if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                r["mem_vs_eager"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="default: multi30k fconv_wmt_en_de on CUDA, small on CPU")
    ap.add_argument("--impls", nargs="+", default=None, help=f"subset of {' '.join(IMPLS)}")
    ap.add_argument("--threads", nargs="+", type=int, default=None,
                    help="CPU: run the table once per torch thread count (default: torch's current count)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds, median reported (default 3; 1 with --quick)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="CPU: seconds of timing per impl per round (default 1; 0.2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny batches (a dry run)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    min_run_time = args.min_run_time or (0.2 if args.quick else 1.0)
    device = torch.device(args.device)
    presets = args.presets or (["multi30k", "fconv_wmt_en_de"] if device.type == "cuda" else ["small"])
    usable = impls(device)
    impl_list = [i for i in (args.impls or usable) if i in usable]
    for i in (args.impls or []):
        if i not in IMPLS:
            ap.error(f"unknown impl {i!r}; choose from {' '.join(IMPLS)}")
        if i not in usable:
            print(f"{i}: not usable on {device} ({available_backends(device).get(backend_of(i))}), skipped")
    thread_counts = args.threads if device.type == "cpu" and args.threads else [torch.get_num_threads()]
    rows = []
    for n in thread_counts:
        torch.set_num_threads(n)
        for preset in presets:
            rows += bench_preset(preset, device, args.quick, impl_list, rounds, min_run_time)
    common.print_table(rows, ["preset", "shape", "threads", "impl", "ms", "ms_p20", "ms_p80", "tokens_per_s",
                              "speedup_vs_eager", "peak_mem_bytes", "mem_vs_eager", "warmup_s", "error"])
    if args.out:
        common.write_json(args.out, "train_step", rows, quick=args.quick, rounds=rounds,
                          command="python -m bench.bench_train " + " ".join(
                              argv if argv is not None else sys.argv[1:]))
    return rows


if __name__ == "__main__":
    main()
