"""glu_conv benchmark: forward, backward and forward+backward of every implementation usable here.

Implementations: eager (glu_conv_ref), compile (torch.compile(glu_conv_ref)), triton and native (when
convs2s.ops.resolve_backend says the op has that backend and it runs here). With --recompute also
triton-recompute: the Triton backend with the pre-GLU activation recomputed in backward instead of saved (the
measurement behind kernels/glu_conv.py's choice; not part of the default rows). On CUDA also triton-dwgemm: the
Triton backend with dW from cuBLAS GEMMs over shifted views (kernels/glu_conv.py CONVS2S_TRITON_DW=gemm), the
candidate to replace the dW kernel, which the first H200 run found slowest.

    python -m bench.bench_glu_conv [--device cuda] [--dtype bfloat16] [--quick] [--out PATH] [--recompute]

Shapes (B, T, C_in, C_out, k): Multi30k-like B=64 T=32 and WMT-like B=16 T=512, C = 512->512 and 1024->1024,
k = 3, with bias and residual (an encoder block, causal=False). FLOPs: forward 2*B*T*k*C_in*2*C_out, backward
twice that. pct_of_gemm compares with one bf16 (M, K) @ (K, N) product of the forward's FLOPs (M = B*T,
K = k*C_in, N = 2*C_out) measured in the same run (in the benchmark's dtype on CPU).

Timing on CUDA: ms (and its quantiles) is the GPU time, each pass replayed from a CUDA graph, because at these
sizes launching from Python costs more than the kernels (measured on an H200: eager fwd+bwd 1.5 ms with launches
against ~0.1-0.3 ms of GPU work); ms_with_launch times the same pass called from Python, as a training loop
without graphs sees it. An implementation that cannot be captured is timed with launches only (graph: false).

Rows: op, shape, pass (fwd | bwd | fwd+bwd), impl, ms, ms_p20, ms_p80, ms_with_launch, graph, speedup_vs_eager,
peak_mem_bytes, tflops, pct_of_gemm, max_abs_diff_vs_eager (forward output, a sanity check of each
implementation).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s.ops import BackendUnavailableError, glu_conv, glu_conv_ref, resolve_backend

SHAPES = [(64, 32, 512, 512, 3), (16, 512, 512, 512, 3), (64, 32, 1024, 1024, 3), (16, 512, 1024, 1024, 3)]
QUICK_SHAPES = [(2, 8, 16, 16, 3), (2, 12, 24, 24, 5)]


def _runs_here(backend: str, device: torch.device) -> bool:
    """Whether glu_conv has `backend` and it runs `device` tensors here."""
    try:
        return resolve_backend("glu_conv", backend, device) == backend
    except BackendUnavailableError:
        return False


def impls(device: torch.device, recompute: bool = False) -> list[str]:
    out = ["eager", "compile"]
    if _runs_here("triton", device):
        out += ["triton"] + (["triton-dwgemm"] if device.type == "cuda" else [])
        out += ["triton-recompute"] if recompute else []
    if _runs_here("native", device):
        out.append("native")
    return out


def make_inputs(B, T, c_in, c_out, k, device, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    return [randn(B, T, c_in), randn(k, c_in, 2 * c_out, scale=1.0 / math.sqrt(k * c_in)), randn(2 * c_out),
            randn(B, T, c_out)]


def _op(impl: str, retain_graph: bool = False):
    """fn(x, w, b, r) -> y. retain_graph: the backward will be run repeatedly on one graph (the "bwd" timing)."""
    if impl == "eager":
        return glu_conv_ref
    if impl == "compile":
        if not retain_graph:
            return torch.compile(glu_conv_ref, dynamic=False)
        # Donated buffers (saved activations freed inside the compiled backward) forbid running one backward
        # twice; the "bwd" rows of compile are timed on a second compilation without them (a memory-only
        # difference: the same kernels run). A function of its own, so dynamo does not reuse the first graph.
        from torch._functorch import config

        def ref_retained(*a):
            return glu_conv_ref(*a)

        compiled = torch.compile(ref_retained, dynamic=False)

        def run(*a):
            with config.patch(donated_buffer=False):
                return compiled(*a)
        return run
    if impl == "triton-dwgemm":              # bench_shape sets kernels.glu_conv.DW_IMPL for this impl's rows
        return lambda *a: glu_conv(*a, backend="triton")
    if impl == "triton-recompute":
        import convs2s.ops._triton_glu_conv as binding

        def run(*a):
            saved, binding.SAVE_PRE_GLU = binding.SAVE_PRE_GLU, False
            try:
                return glu_conv(*a, backend="triton")
            finally:
                binding.SAVE_PRE_GLU = saved
        return run
    return lambda *a: glu_conv(*a, backend=impl)


def bench_shape(shape, device, dtype, impl_list) -> list[dict]:
    B, T, c_in, c_out, k = shape
    args = make_inputs(B, T, c_in, c_out, k, device, dtype)
    dy = torch.randn(B, T, c_out, device=device, dtype=dtype)
    flops_fwd = 2.0 * B * T * k * c_in * 2 * c_out
    # Compulsory bytes (each input read once, each output written once): the floor of any implementation's traffic.
    isz = torch.tensor([], dtype=dtype).element_size()
    io_fwd = (B * T * c_in + k * c_in * 2 * c_out + 2 * c_out + 2 * B * T * c_out) * isz       # x, w, b, res, y
    io_bwd = (B * T * c_out + B * T * c_in + k * c_in * 2 * c_out                               # dy, x, w
              + B * T * c_in + k * c_in * 2 * c_out + 2 * c_out + B * T * c_out) * isz          # dx, dw, db, dres
    nbytes = {"fwd": io_fwd, "bwd": io_bwd, "fwd+bwd": io_fwd + io_bwd}
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else dtype     # CPUs have no fast bf16 GEMM to compare
    gemm = common.gemm_rate(device, gemm_dtype, B * T, 2 * c_out, k * c_in)
    shape_s = f"B{B} T{T} C{c_in}->{c_out} k{k}"
    print(f"{shape_s}: {gemm_dtype} GEMM of the forward's FLOPs {gemm:.3g} TFLOP/s", file=sys.stderr)
    torch._dynamo.reset()       # each shape compiles afresh (static shapes), as the first one did
    with torch.no_grad():
        want = glu_conv_ref(*args).float()
    rows, eager_ms = [], {}
    kernels = _triton_kernels(impl_list)
    dw_default = kernels.DW_IMPL if kernels else None
    for impl in impl_list:
        if kernels:                          # read at backward time, so it holds for all of this impl's passes
            kernels.DW_IMPL = "gemm" if impl == "triton-dwgemm" else dw_default
        op = _op(impl)
        fwd = lambda op=op: op(*args)  # noqa: E731
        try:
            with torch.no_grad():
                diff = (op(*args).float() - want).abs().max().item()
            out = _op(impl, retain_graph=True)(*args) if impl == "compile" else fwd()
        except (BackendUnavailableError, NotImplementedError) as e:
            print(f"  {shape_s} {impl}: skipped ({e})", file=sys.stderr)
            continue
        except Exception as e:  # one failing implementation must not hide the others' figures
            print(f"  {shape_s} {impl}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"op": "glu_conv", "shape": shape_s, "impl": impl, "error": f"{type(e).__name__}: {e}"})
            continue

        def bwd(out=out):
            return torch.autograd.grad(out, args, dy, retain_graph=True)

        def both(fwd=fwd):
            return torch.autograd.grad(fwd(), args, dy)

        for pname, fn, mult in (("fwd", fwd, 1.0), ("bwd", bwd, 2.0), ("fwd+bwd", both, 3.0)):
            try:
                t, launched, mem, was_graphed = common.time_pass(fn, device)
            except Exception as e:
                print(f"  {shape_s} {impl} {pname}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"op": "glu_conv", "shape": shape_s, "pass": pname, "impl": impl,
                             "error": f"{type(e).__name__}: {e}"})
                continue
            if impl == "eager":
                eager_ms[pname] = t["ms"]
            tflops = mult * flops_fwd / (t["ms"] * 1e-3) / 1e12
            rows.append({"op": "glu_conv", "shape": shape_s, "pass": pname, "impl": impl, **t,
                         "ms_with_launch": launched["ms"], "graph": was_graphed,
                         "speedup_vs_eager": eager_ms[pname] / t["ms"] if pname in eager_ms else None,
                         "peak_mem_bytes": mem, "tflops": tflops, "pct_of_gemm": 100.0 * tflops / gemm,
                         "bytes_min": nbytes[pname], "gb_per_s": nbytes[pname] / (t["ms"] * 1e-3) / 1e9,
                         "max_abs_diff_vs_eager": diff})
            # progress, so a run cut short at its time limit still shows what it measured
            print(f"  {shape_s} {pname} {impl}: {t['ms']:.4g} ms ({launched['ms']:.4g} with launches), "
                  f"{tflops:.3g} TFLOP/s", file=sys.stderr)
        del out, bwd, fn
    if kernels:
        kernels.DW_IMPL = dw_default
    return rows


def _triton_kernels(impl_list):
    """convs2s.kernels.glu_conv when a Triton implementation is benchmarked, else None."""
    if not any(i.startswith("triton") for i in impl_list):
        return None
    from convs2s.kernels import glu_conv as kernels
    return kernels


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a dry run of the benchmark on CPU)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--impls", nargs="+", default=None, help="subset of implementations to run")
    ap.add_argument("--recompute", action="store_true",
                    help="also time triton-recompute (pre-GLU activation recomputed in backward, not saved)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    impl_list = args.impls or impls(device, args.recompute)
    rows = []
    for shape in (QUICK_SHAPES if args.quick else SHAPES):
        rows += bench_shape(shape, device, dtype, impl_list)
    common.print_table(rows, ["shape", "pass", "impl", "ms", "ms_p20", "ms_p80", "ms_with_launch", "speedup_vs_eager",
                              "peak_mem_bytes", "tflops", "pct_of_gemm", "max_abs_diff_vs_eager"])
    if args.out:
        common.write_json(args.out, "glu_conv", rows, dtype=str(dtype).replace("torch.", ""), quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
