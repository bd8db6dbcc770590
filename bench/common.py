"""Shared benchmark machinery: timing, ceilings (GEMM rate, copy bandwidth), environment record, JSON output.

Timing: triton.testing.do_bench on GPU (median and 20/80 quantiles, warm-up excluded, L2 flushed between runs);
torch.utils.benchmark.Timer.blocked_autorange on CPU (median and 20/80 quantiles of its measurements).
Every result row is a dict; `write_json` wraps rows with the environment (device, versions, commit, date).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], device: torch.device, *, min_run_time: float = 0.5) -> dict:
    """{'ms': median, 'ms_p20': 20th percentile, 'ms_p80': 80th percentile} of fn() on `device`."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    from torch.utils import benchmark
    fn()  # warm-up (lazy init, caches, compile)
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = sorted(m.times)  # per run (raw_times are per block of number_per_run runs)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3  # noqa: E731
    return {"ms": m.median * 1e3, "ms_p20": q(0.2), "ms_p80": q(0.8)}


def graphed(fn, device: torch.device):
    """fn replayed from a CUDA graph (launch overhead out of the timing), or None where it cannot be captured."""
    if device.type != "cuda":
        return None
    try:
        # Warm-up and capture on one side stream: cuBLAS sets up its per-stream workspace on first use, which a
        # capture forbids (a backward captured first on a fresh stream fails).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
        torch.cuda.synchronize()
        return graph.replay
    except Exception as e:
        print(f"    (no CUDA graph: {type(e).__name__}: {e})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def timed_runs(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Wall and process CPU time of `repeats` calls of fn (device synchronised around each; no warm-up here):
    {'wall_s': median, 'wall_s_min', 'cpu_s': median, 'result': the last call's return value}. For whole-workload
    benchmarks (generation), where one call takes seconds and a median of a few is enough."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": statistics.median(walls), "wall_s_min": min(walls), "cpu_s": statistics.median(cpus),
            "result": result}


def time_pass(fn: Callable[[], object], device: torch.device) -> tuple[dict, dict, int | None, bool]:
    """(timing, timing with Python launches, peak bytes, graphed?) of one benchmark pass after a warm-up call.

    `timing` is the CUDA-graph replay time where fn can be captured (launch overhead out), else the launch timing.
    """
    fn()  # warm-up: compile, autotune
    launched = timeit(fn, device)
    mem = peak_memory(fn, device)
    replay = graphed(fn, device)
    return (timeit(replay, device) if replay is not None else launched), launched, mem, replay is not None


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by fn() beyond what was allocated before (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def gemm_rate(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int) -> float:
    """Measured TFLOP/s of one (M, K) @ (K, N) matrix product: the ceiling a kernel of the same FLOPs is held to."""
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device)["ms"]
    return 2.0 * M * N * K / (t * 1e-3) / 1e12


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device)["ms"]
    return 2.0 * nbytes / (t * 1e-3) / 1e9


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if os.environ.get("CONVS2S_COMMIT"):
        # A copy of the working tree whose .git cannot resolve HEAD: the caller passes the commit.
        env["commit"] = os.environ["CONVS2S_COMMIT"]
        env["dirty"] = os.environ.get("CONVS2S_DIRTY", "unknown")
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def write_json(path: str, name: str, rows: list[dict], **extra) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": environment(), **extra, "results": rows}, f, indent=1)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
