"""A small, fast workload for compute-sanitizer: every native-backend op, forward and backward, on a few odd
shapes (T=1, T<k, channels not multiples of 16, padded sources), checked against the reference.

    compute-sanitizer --tool memcheck python -m bench.sanitize_cuda --device cuda

Exit status 1 if a result differs from the reference (the sanitizer reports memory errors and races itself).
"""

from __future__ import annotations

import argparse
import sys

import torch

from convs2s.ops import (
    BackendUnavailableError,
    available_backends,
    conv_attention,
    conv_attention_ref,
    glu_conv,
    glu_conv_ref,
)

GLU_SHAPES = [  # B, T, C_in, C_out, k, causal
    (2, 1, 24, 40, 3, True), (3, 2, 16, 16, 5, False), (2, 37, 100, 72, 3, False), (1, 9, 64, 32, 4, False),
    (2, 17, 48, 48, 1, True),
]
ATT_SHAPES = [  # B, Tt, Ts, C, E, source lengths
    (3, 1, 7, 40, 24, [7, 1, 4]), (2, 33, 1, 24, 40, None), (2, 19, 70, 48, 300, [70, 3]),
]


def _grads(out, inputs):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


def check_glu(device, backend) -> float:
    worst = 0.0
    for B, T, ci, co, k, causal in GLU_SHAPES:
        x = torch.randn(B, T, ci, device=device, requires_grad=True)
        w = (torch.randn(k, ci, 2 * co, device=device) / (k * ci) ** 0.5).requires_grad_()
        b = torch.randn(2 * co, device=device, requires_grad=True)
        r = torch.randn(B, T, co, device=device, requires_grad=True)
        torch.manual_seed(1)
        y = glu_conv(x, w, b, r, causal=causal, backend=backend)
        gy = _grads(y, [x, w, b, r])
        torch.manual_seed(1)
        y_ref = glu_conv_ref(x, w, b, r, causal=causal)
        gr = _grads(y_ref, [x, w, b, r])
        for a, c in zip([y, *gy], [y_ref, *gr]):
            worst = max(worst, (a - c).abs().max().item() / (c.abs().max().item() + 1e-6))
    return worst


def check_attention(device, backend) -> float:
    worst = 0.0
    for B, Tt, Ts, C, E, lengths in ATT_SHAPES:
        t = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
        args = [t(B, Tt, C), t(B, Tt, E), t(B, Ts, E), t(B, Ts, E)]
        mask = None if lengths is None else (
            torch.arange(Ts, device=device)[None] >= torch.tensor(lengths, device=device)[:, None])
        params = [(torch.randn(E, C, device=device) / C ** 0.5).requires_grad_(), t(E),
                  (torch.randn(C, E, device=device) / E ** 0.5).requires_grad_(), t(C)]
        out, _ = conv_attention(*args, mask, *params, backend=backend)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, args + params, g)
        out_ref, _ = conv_attention_ref(*args, mask, *params)
        grads_ref = torch.autograd.grad(out_ref, args + params, g)
        for a, c in zip([out, *grads], [out_ref, *grads_ref]):
            worst = max(worst, (a - c).abs().max().item() / (c.abs().max().item() + 1e-6))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="native")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    why = available_backends(device)[args.backend]
    if why is not None:
        print(f"backend {args.backend} unavailable on {device}: {why}")
        return 1
    bad = False
    for name, fn in (("glu_conv", check_glu), ("conv_attention", check_attention)):
        try:
            err = fn(device, args.backend)
        except BackendUnavailableError as e:  # an op without this backend yet is reported, not failed
            print(f"{name}: skipped: {e}")
            continue
        except Exception as e:
            print(f"{name}: {type(e).__name__}: {e}")
            bad = True
            continue
        ok = err < 1e-3  # fp32 against fp32: only summation order differs
        bad |= not ok
        print(f"{name} [{args.backend}, {device}]: max relative error {err:.2e} {'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
