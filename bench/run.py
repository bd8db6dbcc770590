"""The benchmark suite: every op- and model-level benchmark for the backends this machine has.

    python -m bench.run [--device cuda|cpu] [--quick] [--out DIR]
                        [--only glu_conv conv_attention train generate fairseq table3]

Writes one JSON per benchmark into DIR (default bench/out/<device>/), plus suite.json with the measured ceilings
(GEMM rate, copy bandwidth) and every row, and speedups.png (speedup over eager per benchmark row, matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

import torch

try:
    from . import common
except ImportError:
    import common  # type: ignore

BENCHES = {
    "glu_conv": "bench_glu_conv",
    "conv_attention": "bench_conv_attention",
    "train": "bench_train",
    "generate": "bench_generate",
    "fairseq": "bench_fairseq",  # a converted fconv_wmt_en_de generating with beam 5, per backend
    "table3": "bench_table3",   # the paper's Table 3 (minutes on a GPU): only when asked for with --only
}
# fairseq is in the CPU default too: its --quick run (3 short sentences on the full-size model, conversion and
# search included) takes about 16 s on one CPU thread, its CPU default (8 sentences) about 35 s.
DEFAULT = ["glu_conv", "conv_attention", "train", "generate", "fairseq"]


def ceilings(device: torch.device, quick: bool) -> dict:
    """Measured GEMM rate (bf16 on GPU, fp32 on CPU) and copy bandwidth: what kernels are compared with."""
    n = 1024 if quick else (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"gemm_dtype": str(dtype).replace("torch.", ""), "gemm_size": n,
            "gemm_tflops": common.gemm_rate(device, dtype, n, n, n),
            "copy_gb_per_s": common.copy_bandwidth(device, 1 << (24 if quick else 28))}


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = [r for r in rows if r.get("speedup_vs_eager") and r.get("impl") not in ("eager",)]
    if not rows:
        return
    labels = [f"{r.get('bench')}: {r.get('shape', r.get('preset', ''))} {r.get('pass', '')} [{r.get('impl')}]"
              for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["speedup_vs_eager"] for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over eager PyTorch (higher is better)")
    ax.set_title(common.environment()["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes: the whole suite in about 2 minutes")
    ap.add_argument("--out", default=None, help="output folder")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=DEFAULT)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", device.type)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    ceil = ceilings(device, args.quick)
    print(f"ceilings on {common.environment()['device']}: {ceil}")
    all_rows, failed = [], []
    for name in args.only:
        try:
            mod = importlib.import_module(f"bench.{BENCHES[name]}")
        except ModuleNotFoundError as e:
            print(f"== {name}: not available ({e})")
            continue
        print(f"== {name}")
        bargs = ["--device", args.device, "--out", os.path.join(out, f"{name}.json")]
        bargs += ["--quick"] if args.quick else []
        try:
            rows = mod.main(bargs) or []
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for r in rows:
            r["bench"] = name
            if r.get("tflops") and ceil["gemm_tflops"]:
                r["pct_of_measured_gemm"] = 100.0 * r["tflops"] / ceil["gemm_tflops"]
            if r.get("gb_per_s") and ceil["copy_gb_per_s"]:
                r["pct_of_measured_copy"] = 100.0 * r["gb_per_s"] / ceil["copy_gb_per_s"]
        all_rows += rows
    common.write_json(os.path.join(out, "suite.json"), "suite", all_rows, quick=args.quick, ceilings=ceil,
                      failed=failed, wall_s=time.time() - t0)
    _plot(all_rows, os.path.join(out, "speedups.png"))
    print(f"suite: {len(all_rows)} rows in {time.time() - t0:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
