"""pytest-benchmark entry points for regression tracking: `pytest bench/ --benchmark-only`.

One small, fixed workload per (op, backend usable here), forward + backward, so `--benchmark-compare` shows a
change in any backend. The full measurements (shapes, passes, torch.compile, ceilings) are `python -m bench.run`.
"""

import math

import pytest
import torch

from convs2s.ops import available_backends, conv_attention, glu_conv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# Triton on CPU means the interpreter: far too slow to be a benchmark.
BACKENDS = [b for b, why in available_backends(DEVICE).items()
            if why is None and not (b == "triton" and DEVICE.type == "cpu")]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_conv_fwd_bwd(benchmark, backend):
    B, T, C, k = (64, 32, 512, 3) if DEVICE.type == "cuda" else (8, 32, 256, 3)
    x = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(k, C, 2 * C, device=DEVICE, dtype=DTYPE) / math.sqrt(k * C)).requires_grad_()
    b = torch.zeros(2 * C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    gy = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE)

    def step():
        y = glu_conv(x, w, b, x, causal=True, backend=backend)
        y.backward(gy)
        _sync()

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_attention_fwd_bwd(benchmark, backend):
    B, T, C, E = (64, 32, 512, 256) if DEVICE.type == "cuda" else (8, 32, 256, 128)
    t = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, requires_grad=True)  # noqa: E731
    args = [t(B, T, C), t(B, T, E), t(B, T, E), t(B, T, E)]
    mask = torch.arange(T, device=DEVICE)[None] >= torch.randint(1, T + 1, (B, 1), device=DEVICE)
    params = [t(E, C), t(E), t(C, E), t(C)]
    g = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE)

    def step():
        out, _ = conv_attention(*args, mask, *params, backend=backend)
        out.backward(g)
        _sync()

    benchmark(step)
