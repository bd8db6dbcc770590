"""conv_attention benchmark: forward, backward and forward+backward of every implementation usable here.

Implementations: eager (conv_attention_ref), compile (torch.compile(conv_attention_ref)), sdpa (the same op
written on torch.nn.functional.scaled_dot_product_attention, below), triton and native (when
convs2s.ops.available_backends says they run here), triton-flash: triton with its flash backward forced
(kernels/conv_attention.py BACKWARD; "triton" runs the default, which materializes dS at these sizes), and
triton-core: the Triton attention kernels alone, without the two projection GEMMs around them, which shows how
the time of the fused op splits between the kernels and cuBLAS (speedup_vs_eager is left empty for it: it
computes less).

    python -m bench.bench_conv_attention [--device cuda] [--dtype bfloat16] [--quick] [--out PATH]

Shapes (B, Tt, Ts, C, E): B=64 Tt=Ts=32 and B=16 Tt=Ts=256, C=512, E=256 and 768; source lengths differ per
sentence (the longest sentence fills Ts, the others are 50-100 % of it). FLOPs count the four matrix products of
the contract, 4*B*Tt*E*(C + Ts) forward, twice that backward (recomputation inside kernels is not counted);
pct_of_gemm compares with one (B*Tt, 2*(C + Ts)) @ (2*(C + Ts), E) product of the forward's FLOPs measured in
the same run (bf16 on CUDA, the benchmark's dtype on CPU).

Timing on CUDA, as bench_glu_conv.py: ms (and its quantiles) is the GPU time, each pass replayed from a CUDA
graph, because at these sizes launching from Python costs more than the kernels (on an H200 every
implementation's fwd+bwd took 1-2.5 ms with launches, eager's ~20 launches included); ms_with_launch times the
same pass called from Python. An implementation that cannot be captured is timed with launches only
(graph: false). The fused backends are timed through the public op (argument checks included: host time only,
the all-padding check is a device-side assert on CUDA); eager and compile run conv_attention_ref.

Rows: op, shape, pass (fwd | bwd | fwd+bwd), impl, ms, ms_p20, ms_p80, ms_with_launch, graph, speedup_vs_eager,
peak_mem_bytes, tflops, pct_of_gemm, max_abs_diff_vs_eager (forward output, a sanity check of each
implementation).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore

from convs2s.ops import BackendUnavailableError, available_backends, conv_attention, conv_attention_ref, resolve_backend
from convs2s.ops.conv_attention import source_lengths_scale

SQRT_HALF = math.sqrt(0.5)
SHAPES = [(64, 32, 32, 512, 256), (64, 32, 32, 512, 768), (16, 256, 256, 512, 256), (16, 256, 256, 512, 768)]
QUICK_SHAPES = [(2, 8, 8, 16, 24), (2, 12, 10, 16, 40)]


def conv_attention_sdpa(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in, w_out,
                        b_out, need_weights: bool = False):
    """conv_attention on F.scaled_dot_product_attention: one head of width E, scale 1 (the query carries its
    sqrt(0.5)), padding as an additive -inf mask; then sqrt(s) and the output projection. Shapes as the op's."""
    if need_weights:
        raise ValueError("scaled_dot_product_attention does not return the attention weights")
    B, Ts = encoder_keys.shape[:2]
    q = (F.linear(x, w_in, b_in) + target_embedding) * SQRT_HALF                 # (B, Tt, E)
    mask = None
    if src_padding_mask is not None:
        mask = torch.zeros(B, 1, 1, Ts, device=x.device, dtype=x.dtype)
        mask = mask.masked_fill(src_padding_mask[:, None, None, :], float("-inf"))  # (B, 1, 1, Ts)
    ctx = F.scaled_dot_product_attention(q[:, None], encoder_keys[:, None], encoder_values[:, None],
                                         attn_mask=mask, scale=1.0)[:, 0]           # (B, Tt, E)
    scale = source_lengths_scale(src_padding_mask, Ts, B, x.device)
    ctx = ctx * scale.to(ctx.dtype)[:, None, None]
    return (F.linear(ctx, w_out, b_out) + x) * SQRT_HALF, None


def _triton_core():
    """(fn(q0, k, v, mask) -> ctx with autograd through the Triton attention kernels alone)."""
    from convs2s.kernels import conv_attention as k

    class Core(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q0, keys, values, mask):
            out, lse, root_s, _ = k.attention_forward(q0, keys, values, mask, False)
            ctx.save_for_backward(q0, keys, values, mask, out, lse, root_s)
            return out

        @staticmethod
        def backward(ctx, dout):
            q0, keys, values, mask, out, lse, root_s = ctx.saved_tensors
            dq, dk, dv = k.attention_backward(q0, keys, values, mask, out, dout.contiguous(), lse, root_s)
            return dq, dk, dv, None

    return Core.apply


def make_inputs(B, Tt, Ts, C, E, device, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    lengths = torch.randint(max(1, Ts // 2), Ts + 1, (B,), generator=g)
    lengths[0] = Ts
    mask = (torch.arange(Ts)[None, :] >= lengths[:, None]).to(device)
    return [randn(B, Tt, C), randn(B, Tt, E), randn(B, Ts, E, scale=E ** -0.5), randn(B, Ts, E), mask,
            randn(E, C, scale=C ** -0.5), randn(E), randn(C, E, scale=E ** -0.5), randn(C)]


def impls(device: torch.device) -> list[str]:
    avail = available_backends(device)
    out = ["eager", "compile", "sdpa"]
    if avail["triton"] is None:
        out += ["triton", "triton-flash", "triton-core"]
    if avail["native"] is None:
        out.append("native")
    return out


def _ref(*a):
    return conv_attention_ref(*a)[0]


def _ref_retained(*a):
    """_ref under another code object: dynamo caches graphs per code object, and this one's graphs are compiled
    without donated buffers (see bench_shape)."""
    return conv_attention_ref(*a)[0]


def _op(impl: str, device: torch.device, retained: bool = False):
    """fn(*inputs) -> out (B, Tt, C)."""
    if impl == "eager":
        return _ref
    if impl == "compile":
        return torch.compile(_ref_retained if retained else _ref, dynamic=False)  # static: its best case
    if impl == "sdpa":
        return lambda *a: conv_attention_sdpa(*a)[0]
    # The public op on the resolved backend (raises BackendUnavailableError when it cannot run here). Its
    # validation adds host time only: on CUDA the all-padding check is a device-side assert, no sync.
    backend = resolve_backend("conv_attention", impl.split("-")[0], device)
    return lambda *a: conv_attention(*a, backend=backend)[0]


@contextlib.contextmanager
def _backward_strategy(impl: str):
    """Force the flash backward for "triton-flash"; leave the default otherwise."""
    if impl != "triton-flash":
        yield
        return
    from convs2s.kernels import conv_attention as k
    before, k.BACKWARD = k.BACKWARD, "flash"
    try:
        yield
    finally:
        k.BACKWARD = before


def _bench_impl(impl, args, leaves, gout, flops_fwd, shape_s, want, eager_ms, device, dtype, B, Tt, Ts, E, gemm):
    """Rows of one implementation on one shape (eager_ms: {pass: ms} of eager, filled when impl is eager)."""
    if impl == "triton-core":
        core = _triton_core()
        x, te, keys, values, mask, w_in, b_in = args[:7]
        with torch.no_grad():
            q0 = (F.linear(x, w_in, b_in) + te).contiguous()
        q0.requires_grad_()
        fwd = lambda: core(q0, keys, values, mask)  # noqa: E731
        grad_leaves = [q0, keys, values]
        gctx = torch.randn(B, Tt, E, device=device, dtype=dtype)
        flops, diff = 4.0 * B * Tt * Ts * E, None
    else:
        op = _op(impl, device)
        fwd = lambda: op(*args)  # noqa: E731
        grad_leaves, gctx, flops = leaves, gout, flops_fwd
        try:
            with torch.no_grad():
                diff = (op(*args).float() - want).abs().max().item()
        except (BackendUnavailableError, NotImplementedError) as e:
            print(f"  {shape_s} {impl}: skipped ({e})", file=sys.stderr)
            return []
        except Exception as e:  # one failing implementation must not hide the others' figures
            print(f"  {shape_s} {impl}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            return [{"op": "conv_attention", "shape": shape_s, "impl": impl, "error": f"{type(e).__name__}: {e}"}]
    if impl == "compile":
        # Donated buffers (saved activations freed inside the compiled backward) forbid running one
        # backward twice, which the "bwd" timing does: its graph is compiled without them (a difference in
        # memory only, the same kernels run), the fwd and fwd+bwd rows keep the default.
        from torch._functorch import config
        op_retained = _op(impl, device, retained=True)
        with config.patch(donated_buffer=False):
            out = op_retained(*args)
            torch.autograd.grad(out, grad_leaves, gctx, retain_graph=True)
    else:
        out = fwd()

    def bwd():
        return torch.autograd.grad(out, grad_leaves, gctx, retain_graph=True)

    def both():
        return torch.autograd.grad(fwd(), grad_leaves, gctx)

    rows = []
    for pname, fn, mult in (("fwd", fwd, 1.0), ("bwd", bwd, 2.0), ("fwd+bwd", both, 3.0)):
        try:
            t, launched, mem, was_graphed = common.time_pass(fn, device)
        except Exception as e:
            print(f"  {shape_s} {impl} {pname}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"op": "conv_attention", "shape": shape_s, "pass": pname, "impl": impl,
                         "error": f"{type(e).__name__}: {e}"})
            continue
        if impl == "eager":
            eager_ms[pname] = t["ms"]
        speedup = (eager_ms[pname] / t["ms"] if pname in eager_ms and impl != "triton-core" else None)
        tflops = mult * flops / (t["ms"] * 1e-3) / 1e12
        rows.append({"op": "conv_attention", "shape": shape_s, "pass": pname, "impl": impl, **t,
                     "ms_with_launch": launched["ms"], "graph": was_graphed, "speedup_vs_eager": speedup,
                     "peak_mem_bytes": mem, "tflops": tflops,
                     "pct_of_gemm": 100.0 * tflops / gemm if impl != "triton-core" else None,
                     "max_abs_diff_vs_eager": diff})
        # progress, so a run cut short at its time limit still shows what it measured
        print(f"  {shape_s} {pname:>7} {impl:>12}: {t['ms']:.4g} ms ({launched['ms']:.4g} with launches), "
              f"speedup {speedup or float('nan'):.2f}, {tflops:.3g} TFLOP/s, peak {mem} B", file=sys.stderr)
    return rows


def bench_shape(shape, device, dtype, impl_list) -> list[dict]:
    B, Tt, Ts, C, E = shape
    args = make_inputs(B, Tt, Ts, C, E, device, dtype)
    leaves = [a for a in args if a.requires_grad]
    gout = torch.randn(B, Tt, C, device=device, dtype=dtype)
    flops_fwd = 4.0 * B * Tt * E * (C + Ts)
    # Compulsory bytes (each input read once, each output written once): the floor of any implementation's traffic.
    isz = torch.tensor([], dtype=dtype).element_size()
    n_in = (B * Tt * C + B * Tt * E + 2 * B * Ts * E + 2 * E * C + E + C) * isz + B * Ts        # + the bool mask
    n_out = B * Tt * C * isz
    nbytes = {"fwd": n_in + n_out, "bwd": n_in + n_out + (n_in - B * Ts)}                       # + gout, + grads
    nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
    shape_s = f"B{B} Tt{Tt} Ts{Ts} C{C} E{E}"
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else dtype     # CPUs have no fast bf16 GEMM to compare
    gemm = common.gemm_rate(device, gemm_dtype, B * Tt, E, 2 * (C + Ts))
    print(f"{shape_s}: {gemm_dtype} GEMM of the forward's FLOPs {gemm:.3g} TFLOP/s", file=sys.stderr)
    torch._dynamo.reset()       # each shape compiles afresh (static shapes)
    with torch.no_grad():
        want = conv_attention_ref(*args)[0].float()
    rows, eager_ms = [], {}
    for impl in impl_list:
        with _backward_strategy(impl):
            new = _bench_impl(impl, args, leaves, gout, flops_fwd, shape_s, want, eager_ms, device, dtype,
                              B, Tt, Ts, E, gemm)
        for r in new:
            if "ms" in r and impl != "triton-core":
                r["bytes_min"] = nbytes[r["pass"]]
                r["gb_per_s"] = nbytes[r["pass"]] / (r["ms"] * 1e-3) / 1e9
        rows += new
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a dry run of the benchmark on CPU)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--impls", nargs="+", default=None, help="subset of implementations to run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    impl_list = args.impls or impls(device)
    rows = []
    for shape in (QUICK_SHAPES if args.quick else SHAPES):
        rows += bench_shape(shape, device, dtype, impl_list)
    common.print_table(rows, ["shape", "pass", "impl", "ms", "ms_p20", "ms_p80", "ms_with_launch",
                              "speedup_vs_eager", "peak_mem_bytes", "tflops", "pct_of_gemm",
                              "max_abs_diff_vs_eager"])
    if args.out:
        common.write_json(args.out, "conv_attention", rows, dtype=str(dtype).replace("torch.", ""),
                          quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
