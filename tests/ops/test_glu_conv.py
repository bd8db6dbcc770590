"""glu_conv on every backend: the reference against independent formulations, and the fused backends (native: the
compiled extension's C++/CUDA kernels; triton: kernels/glu_conv.py) against the reference.

Values and gradients follow tests/tolerance.py's rule: the fused op vs the fp64 reference, within 2x the error of
the same-dtype PyTorch reference (plus a floor on the max error). Without a GPU, Triton runs in the interpreter on
CPU tensors (conftest.py sets TRITON_INTERPRET=1) in fp32 and fp16, and bf16 once through the interpreter's
fp32-upcast dots; CUDA cases run where a GPU is. Triton's interpreter takes ~0.1-1 s per case, so its grids cover
each axis rather than the full cross product.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from convs2s.ops import (
    available_backends,
    conv1d_weight_to_tbc,
    glu_conv,
    glu_conv_ref,
    resolve_backend,
    tbc_weight_to_conv1d,
)
from tests.conftest import backend_param
from tests.ops.sm90 import run_script
from tests.tolerance import assert_close_rule

FUSED = ("native", "triton")
# dtypes each fused backend is held to, per device (triton on CPU: bf16 has its own test, see below).
DTYPES = {("native", "cpu"): (torch.float32, torch.bfloat16, torch.float16),
          ("native", "cuda"): (torch.float32, torch.bfloat16, torch.float16),
          ("triton", "cpu"): (torch.float32, torch.float16),
          ("triton", "cuda"): (torch.float32, torch.float16, torch.bfloat16)}


def _id(value):
    """Readable test ids for dtypes and shapes."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None


def params(backends, devices=("cpu", "cuda"), values=((),)):
    """backend_param(backend, device, *v) for each backend, device and tuple v in `values`."""
    return [backend_param(b, d, *v) for b in backends for d in devices for v in values]


def dtype_params(backends=FUSED, values=((),)):
    """(backend, device, dtype, *v) for each backend's dtypes on each device."""
    return [backend_param(b, d, dt, *v) for b in backends for d in ("cpu", "cuda") for dt in DTYPES[(b, d)]
            for v in values]


def make_inputs(B, T, c_in, c_out, k, *, bias=True, residual=True, dtype=torch.float64, device="cpu",
                sliced=False):
    """(x (B, T, C_in), weight (k, C_in, 2*C_out), bias (2*C_out,) | None, residual (B, T, C_out) | None,
    dy (B, T, C_out)) in `dtype` on `device`, the same values for every dtype (drawn in fp64 from a generator
    seeded by the shape). sliced=True takes each out of a larger buffer: x with an offset and its channels at
    stride 2, weight transposed (C_in at unit stride), bias at stride 2, residual with row stride 2*C_out, dy with
    batch stride C_out."""
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + k + c_in + 7 * c_out)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    wscale = 1.0 / math.sqrt(k * c_in)
    if sliced:
        x = rnd(B, T + 3, 2 * c_in + 5)[:, 2:T + 2, 3:3 + 2 * c_in:2]
        w = rnd(k, 2 * c_out, c_in, scale=wscale).transpose(1, 2)
        b = rnd(4 * c_out)[::2] if bias else None
        r = rnd(B, T, 2 * c_out)[..., c_out:] if residual else None
        dy = rnd(T, B, c_out).transpose(0, 1)
    else:
        x = rnd(B, T, c_in)
        w = rnd(k, c_in, 2 * c_out, scale=wscale)
        b = rnd(2 * c_out) if bias else None
        r = rnd(B, T, c_out) if residual else None
        dy = rnd(B, T, c_out)
    return x, w, b, r, dy


def forward_backward(fn, inputs, dy):
    """[y, grad of each non-None input] of fn(x, weight, bias, residual) with upstream gradient dy; the inputs
    keep their strides."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return [y.detach(), *grads]


def op(backend, causal):
    return lambda *a: glu_conv(*a, causal=causal, backend=backend)


def check_case(backend, device, dtype, B, T, c_in, c_out, k, *, causal, bias=True, residual=True, sliced=False):
    """Output and every input gradient of `backend` vs the fp64 reference, under the tolerance rule."""
    x, w, b, r, dy = make_inputs(B, T, c_in, c_out, k, bias=bias, residual=residual, dtype=dtype, device=device,
                                 sliced=sliced)
    inputs = (x, w, b, r)
    assert not sliced or not (x.is_contiguous() or w.is_contiguous())
    fused = forward_backward(op(backend, causal), inputs, dy)
    lowp = forward_backward(op("reference", causal), inputs, dy)
    ref64 = forward_backward(op("reference", causal), [t.double() if t is not None else None for t in inputs],
                             dy.double())
    names = ["y"] + [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), inputs) if t is not None]
    for name, f, lo, hi in zip(names, fused, lowp, ref64):
        assert f.dtype == dtype and f.device == x.device, (name, f.dtype, f.device)
        assert_close_rule(name, f, lo, hi, dtype)


# ---- the reference against independent formulations --------------------------------------------------------

def conv1d_glu(x, weight, bias, residual, causal):
    """Independent formulation: F.conv1d on (B, C, T) with the contract's padding, then F.glu."""
    k = weight.shape[0]
    pad_l, pad_r = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)
    xc = F.pad(x.transpose(1, 2), (pad_l, pad_r))                     # (B, C_in, T + k - 1)
    h = F.conv1d(xc, tbc_weight_to_conv1d(weight), bias)              # (B, 2*C_out, T)
    g = F.glu(h, dim=1).transpose(1, 2)                               # (B, T, C_out)
    return (g + residual) * math.sqrt(0.5) if residual is not None else g


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("T", [1, 2, 6, 37])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
def test_reference_matches_conv1d(causal, k, T, bias, residual):
    x, w, b, r, _ = make_inputs(3, T, 5, 4, k, bias=bias, residual=residual)
    got = glu_conv_ref(x, w, b, r, causal=causal)
    assert got.shape == (3, T, 4)
    torch.testing.assert_close(got, conv1d_glu(x, w, b, r, causal), rtol=1e-12, atol=1e-12)


def test_even_kernel_padding_is_fairseqs():
    # k = 4, non-causal: one zero on the left, two on the right; output t sees x[t-1 .. t+2].
    x, w, _, _, _ = make_inputs(1, 6, 2, 2, 4, bias=False, residual=False)
    y = glu_conv_ref(x, w)
    xp = F.pad(x, (0, 0, 1, 2))
    t = 2
    h = sum(xp[:, t + j] @ w[j] for j in range(4))
    torch.testing.assert_close(y[:, t], F.glu(h, dim=-1), rtol=1e-12, atol=1e-12)


def test_weight_layout_helpers_round_trip():
    conv = torch.nn.Conv1d(5, 8, 3, padding=1, dtype=torch.float64)
    tbc = conv1d_weight_to_tbc(conv.weight)
    assert tbc.shape == (3, 5, 8)
    torch.testing.assert_close(tbc_weight_to_conv1d(tbc), conv.weight.detach())
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    want = F.glu(conv(x.transpose(1, 2)), dim=1).transpose(1, 2)
    torch.testing.assert_close(glu_conv(x, tbc, conv.bias, backend="reference"), want)


def test_public_op_reference_backend_equals_ref():
    x, w, b, r, _ = make_inputs(2, 5, 3, 4, 3)
    torch.testing.assert_close(glu_conv(x, w, b, r, causal=True, backend="reference"),
                               glu_conv_ref(x, w, b, r, causal=True), rtol=0, atol=0)


# ---- fp64: exact agreement and gradcheck --------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", params(["reference"], ["cpu"]) + params(["native"]))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 2, 6])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False), (False, True)])
def test_gradcheck_fp64(backend, device, causal, k, T, bias, residual):
    """The fp64 backends (triton refuses fp64): values equal the reference to 1e-12, gradients pass gradcheck."""
    x, w, b, r, _ = make_inputs(2, T, 3, 2, k, bias=bias, residual=residual, device=device)
    inputs = [t.requires_grad_() for t in (x, w, b, r) if t is not None]

    def call(fn, *a):
        it = iter(a)
        return fn(next(it), next(it), next(it) if bias else None, next(it) if residual else None)

    torch.testing.assert_close(call(op(backend, causal), *inputs), call(op("reference", causal), *inputs),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: call(op(backend, causal), *a), inputs)


# ---- fused backends vs the reference under the tolerance rule ------------------------------------------------

# Time steps and taps: T = 1, T < k, T >> k, even and odd k, both paddings; channels not multiples of 16.
GRID = ([("native", d, dt, (3, 13, 11), k, T) for d in ("cpu", "cuda") for dt in DTYPES[("native", d)]
         for k in (1, 3, 4, 7) for T in (1, 2, 5, 37)]
        + [("triton", d, torch.float32, (2, 24, 20), k, T) for d in ("cpu", "cuda") for k in (1, 3, 5)
           for T in sorted({1, 2, max(k - 1, 1), 37, 129})])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend,device,dtype,shape,k,T", [backend_param(b, d, *v) for b, d, *v in GRID], ids=_id)
def test_time_steps_and_taps(backend, device, dtype, shape, k, T, causal):
    B, c_in, c_out = shape
    check_case(backend, device, dtype, B, T, c_in, c_out, k, causal=causal)


# Channels: 16, 24, 100, 256 (multiples of 16 and not, C_in != C_out), each dtype, sliced (strided) inputs.
@pytest.mark.parametrize("backend,device,dtype,c_in,c_out",
                         dtype_params(values=[(16, 16), (24, 100), (100, 24), (256, 256)]), ids=_id)
def test_channels_dtypes_sliced(backend, device, dtype, c_in, c_out):
    B, T = (1, 13) if max(c_in, c_out) > 128 else (2, 37)      # the interpreter's time grows with the tile count
    check_case(backend, device, dtype, B, T, c_in, c_out, 3, causal=c_in < c_out, sliced=True)


# Optional inputs: every bias/residual combination, both paddings, contiguous and sliced, each dtype.
@pytest.mark.parametrize("backend,device,dtype", dtype_params(), ids=_id)
@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("causal,sliced", [(False, True), (True, False)])
def test_bias_residual(backend, device, dtype, bias, residual, causal, sliced):
    check_case(backend, device, dtype, 3, 9, 16, 24, 5, causal=causal, bias=bias, residual=residual, sliced=sliced)


def test_bf16_in_the_interpreter():
    """The interpreter's bf16 tl.dot multiplies bit patterns; the Triton kernels upcast their operands there."""
    if available_backends("cpu")["triton"] is not None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter-only path")
    check_case("triton", "cpu", torch.bfloat16, 2, 13, 24, 20, 3, causal=True, sliced=True)


# Larger shapes: many rows per thread and channels beyond one vector width (native); several tiles in every
# dimension at the GPU configs' block sizes, k = 7 (triton, GPU only: the interpreter would take minutes).
@pytest.mark.parametrize("backend,device,dtype,shape", [
    *[backend_param("native", d, torch.float32, (4, 130, 96, 80, 5)) for d in ("cpu", "cuda")],
    *[backend_param("triton", "cuda", dt, (4, 300, 384, 320, 7))
      for dt in (torch.float32, torch.float16, torch.bfloat16)]], ids=_id)
def test_larger_shape(backend, device, dtype, shape):
    B, T, c_in, c_out, k = shape
    check_case(backend, device, dtype, B, T, c_in, c_out, k, causal=True, sliced=True)


@pytest.mark.parametrize("backend,device", params(FUSED))
def test_hypothesis_random_shapes(backend, device):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(B=st.integers(1, 3), T=st.integers(1, 20), c_in=st.integers(1, 40), c_out=st.integers(1, 40),
                      k=st.integers(1, 7), causal=st.booleans(), bias=st.booleans(), residual=st.booleans(),
                      sliced=st.booleans())
    def prop(B, T, c_in, c_out, k, causal, bias, residual, sliced):
        check_case(backend, device, torch.float32, B, T, c_in, c_out, k, causal=causal, bias=bias,
                   residual=residual, sliced=sliced)

    prop()


# ---- properties on every backend --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", params(["reference", "native", "triton"]))
def test_causal_output_ignores_the_future(backend, device):
    x, w, b, _, _ = make_inputs(2, 9, 4, 3, 3, residual=False, dtype=torch.float32, device=device)
    y = glu_conv(x, w, b, causal=True, backend=backend)
    x2 = x.clone()
    x2[:, 5:] = torch.randn_like(x2[:, 5:])
    y2 = glu_conv(x2, w, b, causal=True, backend=backend)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=0)
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


@pytest.mark.parametrize("backend,device,requires", params(["native", "triton"], values=[("x",), ("weight",)]))
def test_only_requested_gradients(backend, device, requires):
    """Only x (a frozen layer) or only the weight (a frozen embedding below) needs a gradient: the others stay
    None and the one asked for is right."""
    x, w, b, r, dy = make_inputs(2, 7, 16, 16, 3, dtype=torch.float32, device=device)
    leaf = {"x": x, "weight": w}[requires].requires_grad_()
    (got,) = torch.autograd.grad(glu_conv(x, w, b, r, backend=backend), [leaf], dy)
    assert x.grad is None and w.grad is None and b.grad is None and r.grad is None
    ref_leaf = leaf.detach().double().requires_grad_()
    args = [ref_leaf if t is leaf else t.detach().double() for t in (x, w, b, r)]
    (want,) = torch.autograd.grad(glu_conv_ref(*args), [ref_leaf], dy.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", params(FUSED))
def test_backward_is_deterministic(backend, device):
    x, w, b, r, dy = make_inputs(2, 100, 24, 20, 3, dtype=torch.float32, device=device)
    g1 = forward_backward(op(backend, False), (x, w, b, r), dy)
    g2 = forward_backward(op(backend, False), (x, w, b, r), dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend,device", params(["reference", "native", "triton"]))
@pytest.mark.parametrize("causal", [False, True])
def test_zero_batch_is_an_empty_result(backend, device, causal):
    """B = 0 (an empty batch: the last shard of a split, a filtered beam): empty output and input gradients, zero
    weight and bias gradients, with and without autograd."""
    x, w, b, r, _ = make_inputs(0, 5, 3, 4, 3, dtype=torch.float32, device=device)
    with torch.no_grad():
        assert glu_conv(x, w, b, r, causal=causal, backend=backend).shape == (0, 5, 4)
    y, dx, dw, db, dr = forward_backward(op(backend, causal), (x, w, b, r), torch.zeros(0, 5, 4, device=device))
    assert y.shape == (0, 5, 4) and dx.shape == (0, 5, 3) and dr.shape == (0, 5, 4)
    assert dw.shape == w.shape and db.shape == b.shape
    assert not dw.any() and not db.any()


@pytest.mark.parametrize("backend,device", params(["reference", "native", "triton"]))
@pytest.mark.parametrize("x_shape,w_shape,match", [
    ((2, 5, 0), (3, 0, 8), r"at least one input channel \(C_in >= 1\), got shape \(2, 5, 0\)"),
    ((2, 5, 3), (3, 3, 0), r"2\*C_out \(even, > 0\)"),
    ((2, 0, 3), (3, 3, 8), r"at least one time step"),
])
def test_zero_size_dims_refused(backend, device, x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        glu_conv(torch.randn(x_shape, device=device), torch.randn(w_shape, device=device), backend=backend)


@pytest.mark.parametrize("backend,device", params(["reference", "native", "triton"], ["cpu"]))
def test_autocast_runs_in_bf16(backend, device):
    """Under CPU bf16 autocast (fp32 weights, as a model hands them) the op runs in bf16, held by the rule to the
    bf16 reference on the cast inputs."""
    x, w, b, r, _ = make_inputs(2, 5, 8, 4, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv(x, w, b, r, backend=backend)
    assert y.dtype == torch.bfloat16
    lowp = glu_conv_ref(*(t.bfloat16() for t in (x, w, b, r)))
    assert_close_rule("y", y, lowp, glu_conv_ref(*(t.double() for t in (x, w, b, r))), torch.bfloat16)


@pytest.mark.parametrize("backend,device", params(["reference", "native"], ["cpu"]))
def test_autocast_leaves_float64_alone(backend, device):
    """As torch's autocast and custom_fwd do: an fp64 model under autocast keeps computing in fp64."""
    x, w, b, r, _ = make_inputs(2, 5, 8, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv(x, w, b, r, backend=backend)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, glu_conv_ref(x, w, b, r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", params(["triton"]))
def test_triton_refuses_float64(backend, device):
    """The Triton kernels accumulate in fp32 (tf32 dots where allowed): an fp64 result would be fp32-accurate."""
    x, w, b, r, _ = make_inputs(2, 5, 3, 4, 3, device=device)
    with pytest.raises(TypeError, match=r"triton backend of glu_conv runs .*got torch.float64"):
        glu_conv(x, w, b, r, backend=backend)


@pytest.mark.needs_backend("native", "cpu")
def test_auto_picks_native_on_cpu():
    assert resolve_backend("glu_conv", "auto", "cpu") == "native"
    x, w, b, r, _ = make_inputs(2, 5, 3, 4, 3)
    torch.testing.assert_close(glu_conv(x, w, b, r, causal=True), glu_conv(x, w, b, r, causal=True, backend="native"),
                               rtol=0, atol=0)


# ---- op registration: opcheck, torch.compile -------------------------------------------------------------------

def _opcheck_native(x, w, b, r, causal, dy):
    torch.library.opcheck(torch.ops.convs2s.glu_conv_native_fwd.default, (x, w, b, r, causal))
    _, h = torch.ops.convs2s.glu_conv_native_fwd(x, w, b, r, causal)
    leaves = [t.detach() if t is not None else None for t in (x, w, b)]
    torch.library.opcheck(torch.ops.convs2s.glu_conv_native_bwd.default,
                          (dy, *leaves, h.detach(), r is not None, causal, [True, True, b is not None, r is not None]))


def _opcheck_triton(x, w, b, r, causal, dy):
    import convs2s.ops._triton_glu_conv as binding
    save_h = b is not None                      # the saved-h and the recomputing backward, one each
    torch.library.opcheck(binding.glu_conv_fwd, (x, w, b, r, causal, save_h))
    _, h = binding.glu_conv_fwd(x, w, b, r, causal, True)
    leaves = [t.detach() if t is not None else None for t in (x, w, b)]
    torch.library.opcheck(binding.glu_conv_bwd, (dy, *leaves, h if save_h else None, r is not None, causal,
                                                 True, True, True, True))


@pytest.mark.parametrize("backend,device,bias_residual,causal", [
    *params(["native"], values=[(br, c) for br in (True, False) for c in (False, True)]),
    *params(["triton"], values=[(True, True), (False, True)])])
def test_opcheck(backend, device, bias_residual, causal):
    x, w, b, r, dy = make_inputs(2, 5, 16, 8, 3, bias=bias_residual, residual=bias_residual, dtype=torch.float32,
                                 device=device, sliced=backend == "triton")
    x, w, b, r = (t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r))
    {"native": _opcheck_native, "triton": _opcheck_triton}[backend](x, w, b, r, causal, dy)


@pytest.mark.parametrize("backend,device", params(FUSED))
def test_torch_compile_fullgraph(backend, device):
    """torch.compile(fullgraph=True) traces the public op (validation, dispatch) down to the custom op, forward and
    backward; the compiled results equal eager bitwise (inductor wraps the opaque op; aot_eager for native: its
    C++ ops need no codegen), and eager is held to the reference."""
    x, w, b, r, dy = make_inputs(2, 11, 16, 24, 3, dtype=torch.float32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(op(backend, True), fullgraph=True,
                             backend="aot_eager" if backend == "native" else "inductor")
    got = forward_backward(compiled, (x, w, b, r), dy)
    eager = forward_backward(op(backend, True), (x, w, b, r), dy)
    ref = forward_backward(op("reference", True), (x, w, b, r), dy)
    for a, e, rf in zip(got, eager, ref):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(e, rf, rtol=1e-5, atol=1e-5)


# ---- native: bad inputs reaching the C++ checks (the public op's Python checks bypassed) ------------------------

def _native_fwd(x, w, b=None, r=None, causal=False):
    return torch.ops.convs2s.glu_conv_native_fwd(x, w, b, r, causal)


@pytest.mark.needs_backend("native", "cpu")
@pytest.mark.parametrize("args,match", [
    ((torch.randn(5, 3), torch.randn(3, 3, 8)), r"x must be \(B, T, C_in\), got shape \[5, 3\]"),
    ((torch.randn(2, 5, 3), torch.randn(3, 8)), r"weight must be \(k, C_in, 2\*C_out\), got shape \[3, 8\]"),
    ((torch.randn(2, 5, 6), torch.randn(3, 3, 8)), r"weight has C_in = 3 .* x has C_in = 6"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 7)), r"2\*C_out \(even, > 0\) for the GLU, got 7"),
    ((torch.randn(2, 0, 3), torch.randn(3, 3, 8)), r"at least one time step"),
    ((torch.randn(2, 5, 0), torch.randn(3, 0, 8)), r"at least one input channel \(C_in >= 1\)"),
    ((torch.randn(2, 5, 3), torch.randn(0, 3, 8)), r"kernel width k >= 1"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8).double()), r"weight has dtype Double but x has dtype Float"),
    ((torch.ones(2, 5, 3, dtype=torch.long), torch.ones(3, 3, 8, dtype=torch.long)), r"floating-point"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), torch.randn(4)), r"bias must be \(2\*C_out,\) = \(8,\)"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), None, torch.randn(2, 5, 3)),
     r"residual must be \(B, T, C_out\) = \(2, 5, 4\), got shape \[2, 5, 3\]"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), torch.randn(8).half()), r"bias must have x's dtype"),
])
def test_native_bad_inputs_reach_cpp_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        _native_fwd(*args)


@pytest.mark.needs_backend("native", "cpu")
def test_native_bad_saved_tensor_in_backward():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 3, 8)
    with pytest.raises(RuntimeError, match=r"h must be the contiguous \(B\*T, 2\*C_out\) = \(10, 8\) tensor saved"):
        torch.ops.convs2s.glu_conv_native_bwd(torch.randn(2, 5, 4), x, w, None, torch.randn(12, 8), False, False,
                                              [True, True, False, False])
    with pytest.raises(RuntimeError, match=r"grad_y must be \(B, T, C_out\) = \(2, 5, 4\)"):
        torch.ops.convs2s.glu_conv_native_bwd(torch.randn(2, 5, 3), x, w, None, torch.randn(10, 8), False, False,
                                              [True, True, False, False])


@pytest.mark.needs_cuda
@pytest.mark.needs_backend("native", "cuda")
def test_native_mixed_devices_reach_cpp_checks():
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but x is on cpu"):
        _native_fwd(torch.randn(2, 5, 3), torch.randn(3, 3, 8, device="cuda"))


# ---- public-op validation: each error names the argument, the expected and the actual ----------------------------

def _good():
    x, w, b, r, _ = make_inputs(2, 5, 3, 4, 3, dtype=torch.float32)
    return x, w, b, r


@pytest.mark.parametrize("change,exc,match", [
    (lambda x, w, b, r: (torch.randn(2, 5, 6), w, b, r), ValueError, r"weight has C_in = 3 .* x has C_in = 6"),
    (lambda x, w, b, r: (x, w, b, torch.randn(2, 5, 3)), ValueError,
     r"residual must have shape \(B, T, C_out\) = \(2, 5, 4\), got \(2, 5, 3\)"),
    (lambda x, w, b, r: (x, w, torch.randn(4), r), ValueError,
     r"bias must have shape \(2\*C_out,\) = \(8,\), got \(4,\)"),
    (lambda x, w, b, r: (x, torch.randn(3, 3, 7), None, None), ValueError, r"2\*C_out"),
    (lambda x, w, b, r: (torch.randn(5, 3), w, b, r), ValueError, r"x must have 3 dimensions, got shape \(5, 3\)"),
    (lambda x, w, b, r: (torch.ones(2, 5, 3, dtype=torch.long), w, b, r), TypeError,
     "x must be a floating-point tensor, got dtype torch.int64"),
    (lambda x, w, b, r: (x, w.double(), b, r), TypeError,
     "weight has dtype torch.float64 but x has dtype torch.float32"),
    (lambda x, w, b, r: (x, w, b.to("meta"), r), ValueError, "bias is on meta but x is on cpu"),
    (lambda x, w, b, r: ([[1.0]], w, b, r), TypeError, "x must be a torch.Tensor, got list"),
    (lambda x, w, b, r: (torch.randn(2, 0, 3), w, b, None), ValueError, "at least one time step"),
], ids=["channels", "residual_shape", "bias_shape", "odd_glu_width", "rank", "integer", "mixed_dtypes",
        "mixed_devices", "not_a_tensor", "empty_time"])
def test_bad_inputs(change, exc, match):
    with pytest.raises(exc, match=match):
        glu_conv(*change(*_good()))


# ---- Triton: every GPU autotune config, the sm_90 compile, the dW paths ------------------------------------------

KERNEL_CONFIGS = ("FWD_CONFIGS", "_fwd_kernel"), ("DX_CONFIGS", "_dx_kernel"), ("DW_CONFIGS", "_dw_kernel")


def _every_gpu_config():
    from convs2s.kernels import glu_conv as K
    return [(kernel, i) for configs, kernel in KERNEL_CONFIGS for i in range(len(getattr(K, configs)))]


def _force_config(monkeypatch, kernel, index):
    """Run `kernel` with its GPU config number `index` alone (one config: the autotuner runs it untimed)."""
    from convs2s.kernels import glu_conv as K
    configs = getattr(K, dict((k, c) for c, k in KERNEL_CONFIGS)[kernel])
    tuner = getattr(K, kernel)
    monkeypatch.setattr(tuner, "configs", [configs[index]])
    monkeypatch.setattr(tuner, "cache", {})


@pytest.mark.needs_backend("triton", "cpu")
@pytest.mark.parametrize("kernel,index", _every_gpu_config())
def test_every_gpu_config_in_the_interpreter(kernel, index, monkeypatch):
    """Autotuning may pick any config for some shape: each, forced in turn, is right in the interpreter at a small
    ragged shape (tiles partly masked in every dimension; dW split over several chunks), against fp64."""
    _force_config(monkeypatch, kernel, index)
    check_case("triton", "cpu", torch.float32, 3, 23, 40, 36, 3, causal=True, sliced=True)


@pytest.mark.needs_backend("triton", "cuda")
@pytest.mark.parametrize("kernel,index", _every_gpu_config())
def test_every_gpu_config_cuda(kernel, index, monkeypatch):
    """The same on a GPU in 16-bit, at a shape spanning several tiles of every config."""
    _force_config(monkeypatch, kernel, index)
    for dtype in (torch.bfloat16, torch.float16):
        check_case("triton", "cuda", dtype, 3, 77, 200, 136, 3, causal=True, sliced=True)


_SM90_COMPILE = """
import triton
from convs2s.kernels import glu_conv as K
from tests.ops.sm90 import specialize, usage
flags = dict(KSIZE=3, PAD_L=2, HAS_BIAS=True, HAS_RES=True, STORE_Y=True, STORE_H=True, DOT_FP32=False,
             INPUT_PRECISION="tf32", GROUP_M=8)
# The integer arguments of a launch at B=16 T=512 C_in=C_out=512 k=3 on contiguous tensors.
M, T, C, N2 = 16 * 512, 512, 512, 1024
ints = dict(M=M, T=T, C_in=C, C_out=C, M_BUCKET=M, ROWS_PER_SPLIT=1024,
            stride_xb=T * C, stride_xt=C, stride_xc=1, stride_wk=C * N2, stride_wc=N2, stride_wn=1,
            stride_rb=T * C, stride_rt=C, stride_rc=1, stride_ds=3 * C * N2, stride_dk=C * N2, stride_dc=N2,
            stride_dn=1, stride_dyb=T * C, stride_dyt=C, stride_dyc=1)
# Each autotuned kernel's GPU configs and ONE_CONFIG (CONVS2S_TRITON_AUTOTUNE=0); the GLU-gradient pass's fixed one.
glu_bwd = triton.Config(dict(BLOCK_M=32, BLOCK_N=128, STORE_DB=True, STORE_DRES=True), num_warps=4)
kernels = [(name, getattr(K, name).fn, getattr(K, configs) + [K.ONE_CONFIG])
           for configs, name in (("FWD_CONFIGS", "_fwd_kernel"), ("DX_CONFIGS", "_dx_kernel"),
                                 ("DW_CONFIGS", "_dw_kernel"))] + [("_glu_bwd_kernel", K._glu_bwd_kernel, [glu_bwd])]
for name, fn, cfgs in kernels:
    for cfg in cfgs:
        # bf16 tensors; dW's output is the fp32 split-M partials (its usual case on a GPU), db's partials are fp32
        sig, const, attrs = specialize(fn, {**flags, **cfg.kwargs}, ints,
                                       lambda n: "*fp32" if n in ("dw_ptr", "dbp_ptr") else "*bf16")
        print(name, cfg.kwargs, cfg.num_warps, cfg.num_stages,
              usage(fn, sig, const, attrs, cfg.num_warps, cfg.num_stages))
"""


@pytest.mark.needs_backend("triton", "cpu")
def test_every_config_compiles_for_sm90_without_spills():
    """Every GPU config of every glu_conv kernel (the autotuned ones' lists and ONE_CONFIG, the GLU-gradient pass's
    fixed config), compiled in bf16 for sm_90 with Triton's own ptxas (no GPU needed): it must compile (the
    interpreter accepts what the GPU compiler may not) and not spill registers (tests/ops/sm90.py)."""
    from convs2s.kernels import glu_conv as K
    n_configs = sum(len(getattr(K, c)) + 1 for c, _ in KERNEL_CONFIGS) + 1       # + ONE_CONFIG each, + GLU pass
    run_script(_SM90_COMPILE, lines=n_configs)


@pytest.mark.parametrize("backend,device", params(["triton"]))
def test_dw_split_agrees_with_one_chunk(backend, device, monkeypatch):
    """dW reduces over B*T in SPLIT chunks summed in a fixed order; the single-chunk path sums in another order, so
    both are held to the fp64 reference by the rule (not to each other bitwise)."""
    import triton
    from convs2s.kernels import glu_conv as K
    T = 1000 if device == "cuda" else 100       # splits need >= 512 rows each on a GPU, 32 in the interpreter
    x, w, b, r, dy = make_inputs(2, T, 24, 20, 3, dtype=torch.float32, device=device)
    assert triton.cdiv(2 * T, K._dw_split(2 * T, 24, 20, 3, x.device)) > 1, "the test shape must split dW"
    split = forward_backward(op(backend, False), (x, w, b, r), dy)
    monkeypatch.setattr(K, "_dw_split", lambda M, *_: triton.cdiv(M, 128) * 128)
    one = forward_backward(op(backend, False), (x, w, b, r), dy)
    lowp = forward_backward(op("reference", False), (x, w, b, r), dy)
    ref64 = forward_backward(op("reference", False), [t.double() for t in (x, w, b, r)], dy.double())
    assert_close_rule("dW split", split[2], lowp[2], ref64[2], torch.float32)
    assert_close_rule("dW 1 chunk", one[2], lowp[2], ref64[2], torch.float32)


@pytest.mark.parametrize("backend,device", params(["triton"]))
def test_recompute_pre_glu_matches_saved(backend, device, monkeypatch):
    import convs2s.ops._triton_glu_conv as binding
    x, w, b, r, dy = make_inputs(2, 21, 24, 20, 3, dtype=torch.float32, device=device, sliced=True)
    saved = forward_backward(op(backend, True), (x, w, b, r), dy)
    monkeypatch.setattr(binding, "SAVE_PRE_GLU", False)
    recomputed = forward_backward(op(backend, True), (x, w, b, r), dy)
    for a, c in zip(saved, recomputed):
        assert torch.equal(a, c)


def check_tail_window(backend, B, T, c_in, c_out, k, window, device, dtype):
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
    y = glu_conv(*leaves, backend=backend)
    y.backward(dy)
    got = [y.detach()[:, s:], x.grad[:, s - pad:], w.grad, b.grad, r.grad[:, s:]]
    del y

    def window_op(dt):
        # The window with `pad` steps of left context; outputs before s are dropped (their left padding differs).
        xs, rs = x.detach()[:, s - pad:].to(dt), r.detach()[:, s - pad:].to(dt)
        ws, bs = w.detach().to(dt), b.detach().to(dt)
        dys = torch.cat([torch.zeros_like(dy[:, :pad]), dy[:, s:]], dim=1).to(dt)
        y_, dx_, dw_, db_, dr_ = forward_backward(op("reference", False), (xs, ws, bs, rs), dys)
        return [y_[:, pad:], dx_, dw_, db_, dr_[:, pad:]]

    for name, f, lo, hi in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, window_op(dtype),
                               window_op(torch.float64)):
        assert_close_rule(name, f, lo, hi, dtype)


@pytest.mark.parametrize("backend,device", params(["triton"]))
def test_tail_window_check_small(backend, device):
    # The window construction of the int64 test below, at a size the interpreter runs.
    check_tail_window(backend, 2, 300, 24, 20, 3, 9, device, torch.float32)


@pytest.mark.parametrize("backend,device", params(["triton"], ["cuda"]))
def test_int64_offsets_cuda(backend, device):
    # x and h hold more than 2**31 elements (4.4 GB each in bf16; ~25 GB in all with the gradients).
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with >= 48 GiB")
    B, T, c_in, c_out = 2, 8_500_000, 128, 64
    assert B * T * c_in > 2**31 and B * T * 2 * c_out > 2**31
    check_tail_window(backend, B, T, c_in, c_out, 3, 16, device, torch.bfloat16)


@pytest.mark.needs_backend("triton", "cpu")
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("k,T", [(1, 4), (2, 1), (3, 2), (3, 9), (4, 3), (5, 2), (5, 11)])
@pytest.mark.parametrize("causal", [False, True])
def test_dw_gemm_matches_autograd(B, k, T, causal):
    """_dw_gemm (shifted-view GEMMs minus the products across sentence boundaries) against autograd through
    F.conv1d, fp64, on a sliced (non-contiguous) x; T < k covers taps that read only padding."""
    from convs2s.kernels import glu_conv as K
    c_in, n2 = 6, 10
    pad_l = K._pad_left(k, causal)
    x = torch.randn(B, T, 2 * c_in, dtype=torch.float64)[:, :, ::2]
    w = torch.randn(k, c_in, n2, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(B, T, n2, dtype=torch.float64)
    h = F.conv1d(F.pad(x.transpose(1, 2), (pad_l, k - 1 - pad_l)), w.permute(2, 1, 0)).transpose(1, 2)
    (want,) = torch.autograd.grad((h * dh).sum(), w)
    torch.testing.assert_close(K._dw_gemm(x, dh, k, pad_l), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device,k,T,causal", params(["triton"], values=[(3, 37, False), (5, 9, True),
                                                                                  (3, 2, True)]))
def test_triton_backward_with_gemm_dw(backend, device, k, T, causal, monkeypatch):
    """The Triton backend's gradients with CONVS2S_TRITON_DW=gemm, under the same rule as the kernel path."""
    from convs2s.kernels import glu_conv as K
    monkeypatch.setattr(K, "DW_IMPL", "gemm")
    check_case(backend, device, torch.float32, 3, T, 24, 20, k, causal=causal, sliced=True)
