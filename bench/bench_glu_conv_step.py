"""glu_conv_step benchmark: one decoding step of a causal glu_conv layer, the step op against the window path.

Contenders, per backend (reference and native; triton too on CUDA when usable):
  window        the path convs2s/incremental.py took before the step op: torch.cat of the (B, k-1, C_in) window
                and the new input, the window's last k-1 rows kept as the next state (a view), and a k = 1
                glu_conv (backend=b) on the window flattened to (B, 1, k*C_in) with the weight viewed as
                (1, k*C_in, 2*C_out)
  step          convs2s.ops.glu_conv_step(x, conv_state, weight, bias, residual, backend=b), the state shifted in
                place

    python -m bench.bench_glu_conv_step [--device cpu] [--threads 1] [--reps 200] [--quick] [--out PATH]

Shapes: multi30k decoder widths, C_in = C_out = 512, k = 3, B = 64 (greedy, 64 sentences) and B = 320 (beam 5),
with bias and residual. Timing: every call timed on its own (device synchronised on CUDA), the contenders
interleaved call by call in a rotating order so that machine noise hits all of them alike; median and 20/80
quantiles over --reps calls each after a warm-up, of wall time and (on CPU) of the calling thread's CPU time.
On CPU pin one thread (the default) for a comparison: two OpenMP threads on a shared machine swing timings by up
to 10x.

Rows: op, shape, backend, impl, ms, ms_p20, ms_p80 (wall), on CPU also cpu_ms, cpu_ms_p20, cpu_ms_p80 (the
thread's CPU time: robust where other processes share the cores), speedup_vs_window (window / this, same backend;
from cpu_ms on CPU, ms elsewhere), max_abs_diff_vs_window (outputs of the two paths, a sanity check).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s.ops import available_backends, glu_conv, glu_conv_step

SHAPES = [(64, 512, 512, 3), (320, 512, 512, 3)]          # (B, C_in, C_out, k)
QUICK_SHAPES = [(4, 16, 16, 3), (6, 24, 16, 2)]


def backends(device: torch.device) -> list[str]:
    avail = available_backends(device)
    wanted = ["reference", "native"] + (["triton"] if device.type == "cuda" else [])
    return [b for b in wanted if avail[b] is None]


def make_inputs(B, c_in, c_out, k, device, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    return (randn(B, c_in), randn(B, k - 1, c_in), randn(k, c_in, 2 * c_out, scale=1.0 / math.sqrt(k * c_in)),
            randn(2 * c_out), randn(B, c_out))


class WindowPath:
    """The window path: cat, keep the last k-1 rows as the next state, k = 1 glu_conv on the flattened window."""

    def __init__(self, state, weight, backend):
        k, c_in, c2 = weight.shape
        self.state, self.backend = state.clone(), backend
        self.weight = weight.reshape(1, k * c_in, c2)                           # (1, k*C_in, 2*C_out)

    def __call__(self, x, bias, residual):
        B = x.shape[0]
        window = torch.cat([self.state, x[:, None]], dim=1)                      # (B, k, C_in)
        self.state = window[:, 1:]                                              # (B, k-1, C_in) view
        y = glu_conv(window.view(B, 1, -1), self.weight, bias, residual[:, None], causal=True, backend=self.backend)
        return y[:, 0]                                                          # (B, C_out)


class StepPath:
    def __init__(self, state, weight, backend):
        self.state, self.weight, self.backend = state.clone(), weight, backend

    def __call__(self, x, bias, residual):
        return glu_conv_step(x, self.state, self.weight, bias, residual, backend=self.backend)


def interleaved(fns: dict, device: torch.device, reps: int, warmup: int = 5) -> dict:
    """{name: {'ms', 'ms_p20', 'ms_p80'[, 'cpu_ms', 'cpu_ms_p20', 'cpu_ms_p80']}}: each fn timed call by call, the
    calls of all fns interleaved. On CPU also the calling thread's CPU time (with one torch thread all the work
    runs on it): unlike wall time it does not count the time other processes hold the cores."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:          # rotate who goes first
            sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[n]()
            sync()
            wall[n].append((time.perf_counter() - t0) * 1e3)
            cpu[n].append((time.thread_time() - c0) * 1e3)
    out = {}
    for n in names:
        out[n] = {"ms": statistics.median(wall[n]), "ms_p20": _quantile(wall[n], 0.2),
                  "ms_p80": _quantile(wall[n], 0.8)}
        if device.type == "cpu":
            out[n].update(cpu_ms=statistics.median(cpu[n]), cpu_ms_p20=_quantile(cpu[n], 0.2),
                          cpu_ms_p80=_quantile(cpu[n], 0.8))
    return out


def _quantile(values: list[float], f: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(f * len(ordered)))]


def bench_shape(shape, device, dtype, backend_list, reps) -> list[dict]:
    B, c_in, c_out, k = shape
    x, state, w, b, r = make_inputs(B, c_in, c_out, k, device, dtype)
    shape_s = f"B{B} C{c_in}->{c_out} k{k}"
    fns, diffs = {}, {}
    with torch.no_grad():
        for be in backend_list:
            window, step = WindowPath(state, w, be), StepPath(state, w, be)
            diffs[be] = (window(x, b, r).float() - step(x, b, r).float()).abs().max().item()
            fns[(be, "window")] = lambda p=window: p(x, b, r)
            fns[(be, "step")] = lambda p=step: p(x, b, r)
        timing = interleaved(fns, device, reps)
    rows = []
    for (be, impl), t in timing.items():
        # The speedup from CPU time on CPU (robust to other processes on the machine), else from wall time.
        key = "cpu_ms" if "cpu_ms" in t else "ms"
        rows.append({"op": "glu_conv_step", "shape": shape_s, "backend": be, "impl": impl, **t,
                     "speedup_vs_window": timing[(be, "window")][key] / t[key], "max_abs_diff_vs_window": diffs[be]})
        print(f"  {shape_s} {be} {impl}: {t['ms']:.4g} ms", file=sys.stderr)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see the docstring)")
    ap.add_argument("--reps", type=int, default=200, help="timed calls per contender")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few reps (a dry run)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--backends", nargs="+", default=None, help="subset of backends to run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    backend_list = args.backends or backends(device)
    reps = 5 if args.quick else args.reps
    rows = []
    for shape in (QUICK_SHAPES if args.quick else SHAPES):
        rows += bench_shape(shape, device, dtype, backend_list, reps)
    common.print_table(rows, ["shape", "backend", "impl", "ms", "ms_p20", "ms_p80", "cpu_ms", "cpu_ms_p20",
                              "cpu_ms_p80", "speedup_vs_window", "max_abs_diff_vs_window"])
    if args.out:
        common.write_json(args.out, "glu_conv_step", rows, dtype=args.dtype, threads=args.threads, reps=reps,
                          quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
