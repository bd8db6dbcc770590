"""glu_conv's Triton backend against the fp64 PyTorch reference: outputs and the gradients of every input.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1): fp32 and
fp16 there, plus one bf16 case that exercises the interpreter's fp32 upcast of bf16 dots. With a GPU the same
grid runs on CUDA with bf16 added. Errors follow tests/tolerance.py: fused vs fp64 within 2x the error of the
same-precision PyTorch reference, plus a floor.
"""

import math
import os

import pytest
import torch

from convs2s.ops import glu_conv, glu_conv_ref
from tests.tolerance import assert_close_rule

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()

# CPU tensors run only in the interpreter; CUDA tensors only on a GPU (the interpreter would run them on the CPU).
_SKIP = {"cpu": pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1"),
         "cuda": pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a GPU (not interpreted)")}


def on(device, *values):
    """A parametrize entry (device, *values), skipped where `device` cannot run Triton."""
    return pytest.param(device, *values, marks=_SKIP[device])


DEVICES = [on("cpu"), on("cuda")]
# bf16 only on a GPU: its CPU reference is the yardstick, but the interpreter's bf16 dot needs a workaround
# (tested once below).
DEVICE_DTYPES = ([on("cpu", d) for d in (torch.float32, torch.float16)]
                 + [on("cuda", d) for d in (torch.float32, torch.float16, torch.bfloat16)])


def make_inputs(B, T, c_in, c_out, k, *, bias, residual, dtype, device, sliced):
    """Inputs in `dtype`; sliced=True takes each out of a larger buffer (non-unit or permuted strides)."""
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + k + c_in + 7 * c_out)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    wscale = 1.0 / math.sqrt(k * c_in)
    if sliced:
        x = rnd(B, T + 3, c_in + 5)[:, 2:T + 2, 3:c_in + 3]                     # strides (.., c_in+5, 1), offset
        w = rnd(k, 2 * c_out, c_in, scale=wscale).transpose(1, 2)              # (k, C_in, 2C_out), C_in unit stride
        b = rnd(4 * c_out)[::2] if bias else None                              # stride 2
        r = rnd(B, T, 2 * c_out)[..., c_out:] if residual else None            # row stride 2*c_out
        dy = rnd(T, B, c_out).transpose(0, 1)                                  # (B, T, C_out), batch stride C_out
    else:
        x = rnd(B, T, c_in)
        w = rnd(k, c_in, 2 * c_out, scale=wscale)
        b = rnd(2 * c_out) if bias else None
        r = rnd(B, T, c_out) if residual else None
        dy = rnd(B, T, c_out)
    return x, w, b, r, dy


def forward_backward(fn, inputs, dy):
    """(y, [grad of each non-None input]) of fn(x, w, b, r) with upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves if t is not None]


def check_case(B, T, c_in, c_out, k, *, causal, bias=True, residual=True, dtype, device, sliced=False):
    x, w, b, r, dy = make_inputs(B, T, c_in, c_out, k, bias=bias, residual=residual, dtype=dtype, device=device,
                                 sliced=sliced)
    inputs = (x, w, b, r)
    assert not sliced or not x.is_contiguous()
    fused = forward_backward(lambda *a: glu_conv(*a, causal=causal, backend="triton"), inputs, dy)
    lowp = forward_backward(lambda *a: glu_conv_ref(*a, causal=causal), inputs, dy)
    ref64 = forward_backward(lambda *a: glu_conv_ref(*a, causal=causal),
                             [t.double() if t is not None else None for t in inputs], dy.double())
    names = ["y"] + [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), inputs) if t is not None]
    outs = [fused[0]] + fused[1], [lowp[0]] + lowp[1], [ref64[0]] + ref64[1]
    for name, f, lo, hi in zip(names, *outs):
        assert f.dtype == dtype and f.device == x.device, (name, f.dtype, f.device)
        assert_close_rule(name, f, lo, hi, dtype)


# --- the grid: each axis covered, not the full cross product (the interpreter runs ~0.1-1 s per case) -----------

# T in {1, 2, k-1, 37, 129} for each k in {1, 3, 5}, both paddings; small channels (not multiples of 16).
T_CASES = sorted({(k, T) for k in (1, 3, 5) for T in (1, 2, max(k - 1, 1), 37, 129)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k,T", T_CASES)
def test_time_steps_and_taps(device, causal, k, T):
    check_case(2, T, 24, 20, k, causal=causal, dtype=torch.float32, device=device)


# Channels: 16, 24, 100, 256 (multiples of 16 and not, C_in != C_out), each dtype, sliced inputs.
CHANNELS = [(16, 16), (24, 100), (100, 24), (256, 256)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_channels_dtypes_sliced(device, dtype, c_in, c_out):
    B, T = (1, 13) if max(c_in, c_out) > 128 else (2, 37)      # the interpreter's time grows with the tile count
    check_case(B, T, c_in, c_out, 3, causal=c_in < c_out, dtype=dtype, device=device, sliced=True)


# Optional inputs: every bias/residual combination, both paddings, contiguous and sliced, each dtype.
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("causal,sliced", [(False, True), (True, False)])
def test_bias_residual(device, dtype, bias, residual, causal, sliced):
    check_case(3, 9, 16, 24, 5, causal=causal, bias=bias, residual=residual, dtype=dtype, device=device,
               sliced=sliced)


def test_bf16_in_the_interpreter():
    # The interpreter's bf16 tl.dot is broken (it multiplies bit patterns); the kernels upcast there.
    if not INTERPRET:
        pytest.skip("interpreter-only workaround")
    check_case(2, 13, 24, 20, 3, causal=True, dtype=torch.bfloat16, device="cpu", sliced=True)


@pytest.mark.parametrize("device", [on("cuda")])
def test_larger_shape_cuda(device):
    # Several tiles in every dimension at the GPU configs' block sizes (64-256), k = 7.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_case(4, 300, 384, 320, 7, causal=True, dtype=dtype, device=device, sliced=True)


def _every_gpu_config():
    import convs2s.kernels.glu_conv as K
    lists = {"_fwd_kernel": K.FWD_CONFIGS, "_dx_kernel": K.DX_CONFIGS, "_dw_kernel": K.DW_CONFIGS}
    return [on("cuda", name, i) for name, configs in lists.items() for i in range(len(configs))]


@pytest.mark.parametrize("device,kernel,index", _every_gpu_config())
def test_every_gpu_config(device, kernel, index, monkeypatch):
    # Autotuning may pick any config for some shape: each must be right, at ragged sizes over several tiles.
    import convs2s.kernels.glu_conv as K
    tuner = getattr(K, kernel)
    configs = {"_fwd_kernel": K.FWD_CONFIGS, "_dx_kernel": K.DX_CONFIGS, "_dw_kernel": K.DW_CONFIGS}[kernel]
    monkeypatch.setattr(tuner, "configs", [configs[index]])
    monkeypatch.setattr(tuner, "cache", {})
    for dtype in (torch.bfloat16, torch.float16):
        check_case(3, 77, 200, 136, 3, causal=True, dtype=dtype, device=device, sliced=True)


# --- properties ------------------------------------------------------------------------------------------------

def _device():
    return "cuda" if CUDA and not INTERPRET else "cpu"


def test_hypothesis_random_shapes():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(B=st.integers(1, 3), T=st.integers(1, 20), c_in=st.integers(1, 40), c_out=st.integers(1, 40),
                      k=st.integers(1, 7), causal=st.booleans(), bias=st.booleans(), residual=st.booleans(),
                      sliced=st.booleans())
    def prop(B, T, c_in, c_out, k, causal, bias, residual, sliced):
        check_case(B, T, c_in, c_out, k, causal=causal, bias=bias, residual=residual, dtype=torch.float32,
                   device=_device(), sliced=sliced)

    prop()


def test_backward_is_deterministic_and_dw_split_agrees(monkeypatch):
    # dW reduces over B*T in SPLIT chunks summed in a fixed order: bitwise repeatable. The single-chunk path sums
    # in another order, so both are held to the fp64 reference by the tolerance rule (not to each other bitwise).
    import convs2s.kernels.glu_conv as K
    T = 1000 if _device() == "cuda" else 100        # splits need >= 512 rows each on a GPU, 32 in the interpreter
    x, w, b, r, dy = make_inputs(2, T, 24, 20, 3, bias=True, residual=True, dtype=torch.float32,
                                 device=_device(), sliced=False)
    assert triton.cdiv(2 * T, K._dw_split(2 * T, 24, 20, 3, x.device)) > 1, "the test shape must split dW"
    fn = lambda *a: glu_conv(*a, causal=False, backend="triton")  # noqa: E731
    _, g1 = forward_backward(fn, (x, w, b, r), dy)
    _, g2 = forward_backward(fn, (x, w, b, r), dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    monkeypatch.setattr(K, "_dw_split", lambda M, *_: triton.cdiv(M, 128) * 128)
    _, g3 = forward_backward(fn, (x, w, b, r), dy)
    _, lowp = forward_backward(lambda *a: glu_conv_ref(*a), (x, w, b, r), dy)
    _, ref64 = forward_backward(lambda *a: glu_conv_ref(*a), (x.double(), w.double(), b.double(), r.double()),
                                dy.double())
    assert_close_rule("dW split", g1[1], lowp[1], ref64[1], torch.float32)
    assert_close_rule("dW 1 chunk", g3[1], lowp[1], ref64[1], torch.float32)


def test_recompute_pre_glu_matches_saved(monkeypatch):
    import convs2s.ops._triton_glu_conv as binding
    x, w, b, r, dy = make_inputs(2, 21, 24, 20, 3, bias=True, residual=True, dtype=torch.float32,
                                 device=_device(), sliced=True)
    fn = lambda *a: glu_conv(*a, causal=True, backend="triton")  # noqa: E731
    y1, g1 = forward_backward(fn, (x, w, b, r), dy)
    monkeypatch.setattr(binding, "SAVE_PRE_GLU", False)
    y2, g2 = forward_backward(fn, (x, w, b, r), dy)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def check_tail_window(B, T, c_in, c_out, k, window, device, dtype):
    """Non-causal glu_conv on a long input whose upstream gradient is zero except in the last `window` steps.

    Then every output and gradient there (and dweight, dbias, which sum only over nonzero dh) equals the op on the
    window plus (k-1)//2 steps of left context, so a window-sized fp64 reference checks a tensor of any size.
    """
    pad = (k - 1) // 2
    s = T - window                                        # first step with a nonzero upstream gradient
    x = torch.randn(B, T, c_in, device=device, dtype=dtype)
    w = (torch.randn(k, c_in, 2 * c_out, device=device) / math.sqrt(k * c_in)).to(dtype)
    b = torch.randn(2 * c_out, device=device, dtype=dtype)
    r = torch.randn(B, T, c_out, device=device, dtype=dtype)
    dy = torch.zeros(B, T, c_out, device=device, dtype=dtype)
    dy[:, s:] = torch.randn(B, window, c_out, device=device, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    y = glu_conv(*leaves, backend="triton")
    y.backward(dy)
    got = [y.detach()[:, s:], x.grad[:, s - pad:], w.grad, b.grad, r.grad[:, s:]]
    del y

    def window_op(dt):
        # The window with `pad` steps of left context; outputs before s are dropped (their left padding differs).
        xs, rs = x.detach()[:, s - pad:].to(dt), r.detach()[:, s - pad:].to(dt)
        ws, bs = w.detach().to(dt), b.detach().to(dt)
        dys = torch.cat([torch.zeros_like(dy[:, :pad]), dy[:, s:]], dim=1).to(dt)
        outs, grads = forward_backward(lambda *a: glu_conv_ref(*a), (xs, ws, bs, rs), dys)
        return [outs[:, pad:], grads[0], grads[1], grads[2], grads[3][:, pad:]]

    for name, f, lo, hi in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, window_op(dtype),
                               window_op(torch.float64)):
        assert_close_rule(name, f, lo, hi, dtype)


def test_tail_window_check_small():
    # The window construction of the int64 test below, at a size the interpreter runs.
    check_tail_window(2, 300, 24, 20, 3, 9, _device(), torch.float32)


@pytest.mark.parametrize("device", [on("cuda")])
def test_int64_offsets_cuda(device):
    # x and h hold more than 2**31 elements (4.4 GB each in bf16; ~25 GB in all with the gradients).
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with >= 48 GiB")
    B, T, c_in, c_out = 2, 8_500_000, 128, 64
    assert B * T * c_in > 2**31 and B * T * 2 * c_out > 2**31
    check_tail_window(B, T, c_in, c_out, 3, 16, device, torch.bfloat16)


def test_only_requested_gradients():
    x, w, b, r, dy = make_inputs(2, 7, 16, 16, 3, bias=True, residual=True, dtype=torch.float32,
                                 device=_device(), sliced=False)
    x.requires_grad_()
    y = glu_conv(x, w, b, r, backend="triton")
    y.backward(dy)
    ref = x.detach().double().requires_grad_()
    glu_conv_ref(ref, w.double(), b.double(), r.double()).backward(dy.double())
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
    assert w.grad is None and b.grad is None and r.grad is None


def test_opcheck():
    import convs2s.ops._triton_glu_conv as binding
    dev = _device()
    for bias, residual, save_h in [(True, True, True), (False, False, False)]:
        x, w, b, r, dy = make_inputs(2, 5, 16, 8, 3, bias=bias, residual=residual, dtype=torch.float32, device=dev,
                                     sliced=True)
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
        torch.library.opcheck(binding.glu_conv_fwd, (*leaves, True, save_h))
        _, h = binding.glu_conv_fwd(x, w, b, r, True, True)
        torch.library.opcheck(binding.glu_conv_bwd, (dy, x, w, b, h if save_h else None, residual, True,
                                                     True, True, True, True))


def test_torch_compile_fullgraph():
    # Dynamo traces the public op (validation, dispatch) down to the custom op; inductor wraps the opaque op.
    dev = _device()
    x, w, b, r, dy = make_inputs(2, 11, 16, 24, 3, bias=True, residual=True, dtype=torch.float32, device=dev,
                                 sliced=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: glu_conv(*a, causal=True, backend="triton"), fullgraph=True)
    y_c, g_c = forward_backward(compiled, (x, w, b, r), dy)
    y_e, g_e = forward_backward(lambda *a: glu_conv(*a, causal=True, backend="triton"), (x, w, b, r), dy)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, c in zip(g_c, g_e):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("k,T", [(1, 4), (2, 1), (3, 2), (3, 9), (4, 3), (5, 2), (5, 11)])
@pytest.mark.parametrize("causal", [False, True])
def test_dw_gemm_matches_autograd(B, k, T, causal):
    """_dw_gemm (shifted-view GEMMs minus the products across sentence boundaries) against autograd through
    F.conv1d, fp64, on a sliced (non-contiguous) x; T < k covers taps that read only padding."""
    import torch.nn.functional as F
    from convs2s.kernels import glu_conv as K
    c_in, n2 = 6, 10
    pad_l = K._pad_left(k, causal)
    x = torch.randn(B, T, 2 * c_in, dtype=torch.float64)[:, :, ::2]
    w = torch.randn(k, c_in, n2, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(B, T, n2, dtype=torch.float64)
    h = F.conv1d(F.pad(x.transpose(1, 2), (pad_l, k - 1 - pad_l)), w.permute(2, 1, 0)).transpose(1, 2)
    (want,) = torch.autograd.grad((h * dh).sum(), w)
    torch.testing.assert_close(K._dw_gemm(x, dh, k, pad_l), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,T,causal", [(3, 37, False), (5, 9, True), (3, 2, True)])
def test_triton_backward_with_gemm_dw(k, T, causal, monkeypatch):
    """The Triton backend's gradients with CONVS2S_TRITON_DW=gemm, under the same rule as the kernel path."""
    from convs2s.kernels import glu_conv as K
    monkeypatch.setattr(K, "DW_IMPL", "gemm")
    check_case(3, T, 24, 20, k, causal=causal, dtype=torch.float32, device=_device(), sliced=True)
