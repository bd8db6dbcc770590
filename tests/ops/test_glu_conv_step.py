"""glu_conv_step on every backend (a parametrize axis) against the PyTorch reference and the whole-sequence op.

One test body per property: values over k, B (0 included), C_in != C_out, optional bias and residual (fp64 to
1e-12 on reference and native; fp32 under the tolerance rule on triton, which accumulates in fp32 and refuses
fp64); low precision under tests/tolerance.py's rule (the yardstick: the full causal glu_conv's last step computed
in that precision); the in-place state update (exact); step-by-step outputs equal glu_conv(causal=True) over the
whole sequence; non-contiguous inputs; bad inputs; inputs requiring grad; the custom ops' registration.
Backends and CUDA are conftest.py's needs_backend / needs_cuda marks. Without a GPU the Triton kernels run in the
interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
"""

import math

import pytest
import torch

from convs2s.ops import glu_conv, glu_conv_ref, glu_conv_step, glu_conv_step_ref
from tests.conftest import backend_param
from tests.ops.sm90 import run_script
from tests.tolerance import assert_close_rule

BACKENDS = ("reference", "native", "triton")
DEVICES = ("cpu", "cuda")
# The most precise dtype each backend runs (triton accumulates in fp32 and refuses fp64), and the low-precision
# dtypes it is held to per device (bf16 Triton on CUDA only: the interpreter's bf16 dot is not exact).
PRECISE = {"reference": torch.float64, "native": torch.float64, "triton": torch.float32}
LOW = {(b, d): (torch.float32, torch.float16, torch.bfloat16) for b in BACKENDS for d in DEVICES}
LOW[("triton", "cpu")] = (torch.float32, torch.float16)


def params(backends=BACKENDS, devices=DEVICES):
    """backend_param(backend, device) for each backend and device."""
    return [backend_param(b, d) for b in backends for d in devices]


def dtype_params(dtypes_of):
    """backend_param(backend, device, dtype) for each backend, device and dtype in dtypes_of(backend, device)."""
    return [backend_param(b, d, dt) for b in BACKENDS for d in DEVICES for dt in dtypes_of(b, d)]


def _id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def make_inputs(B, c_in, c_out, k, *, bias=True, residual=True, dtype=torch.float64, device="cpu"):
    """(x (B, C_in), conv_state (B, k-1, C_in) random, weight, bias or None, residual or None), in `dtype`."""
    g = torch.Generator().manual_seed(1000 * B + 100 * k + 10 * c_in + c_out)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return (rnd(B, c_in), rnd(B, k - 1, c_in), rnd(k, c_in, 2 * c_out, scale=1 / math.sqrt(k * c_in)),
            rnd(2 * c_out) if bias else None, rnd(B, c_out) if residual else None)


def cast(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def full_last_step(x, state, w, b, r):
    """The independent yardstick: glu_conv_ref(causal=True) over the window, its last time step."""
    window = torch.cat([state, x[:, None]], dim=1)                          # (B, k, C_in)
    return glu_conv_ref(window, w, b, None if r is None else r[:, None].expand(-1, window.shape[1], -1),
                        causal=True)[:, -1]


def check_close(name, y, lowp_ref, ref64):
    """y (any dtype) against the fp64 yardstick ref64: to 1e-12 in fp64; to torch's own fp32 tolerances in fp32
    (outputs of a few elements make the tolerance rule's mean check a coin toss there); in fp16/bf16 under the
    tolerance rule, with lowp_ref the same yardstick computed in y's dtype."""
    assert y.shape == ref64.shape, (name, tuple(y.shape), tuple(ref64.shape))
    if y.dtype == torch.float64:
        torch.testing.assert_close(y, ref64, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    elif y.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref64.double(), rtol=1.3e-6, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        assert_close_rule(name, y, lowp_ref, ref64, y.dtype)


def check_output(name, y, inputs):
    """y against the full op's last step on `inputs` (x, state before the step, weight, bias, residual)."""
    check_close(name, y, full_last_step(*inputs), full_last_step(*cast(inputs, torch.float64)))


# ---- values --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,dtype", dtype_params(lambda b, d: [PRECISE[b]]), ids=_id)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("c_in,c_out", [(5, 3), (16, 24)])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False), (False, True)])
def test_values(backend, device, dtype, k, B, c_in, c_out, bias, residual):
    x, state, w, b, r = make_inputs(B, c_in, c_out, k, bias=bias, residual=residual, dtype=dtype, device=device)
    state0, state_ref = state.clone(), state.clone()
    want = glu_conv_step_ref(x, state_ref, w, b, r)
    got = glu_conv_step(x, state, w, b, r, backend=backend)
    assert got.shape == (B, c_out) and got.dtype == dtype and got.device.type == device
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    check_output("y", got, (x, state0, w, b, r))
    assert torch.equal(state, state_ref)


@pytest.mark.parametrize("backend,device,dtype", dtype_params(lambda b, d: LOW[(b, d)]), ids=_id)
@pytest.mark.parametrize("k", [1, 3])
def test_low_precision(backend, device, dtype, k):
    x, state, w, b, r = make_inputs(5, 40, 24, k, dtype=dtype, device=device)
    state0 = state.clone()
    y = glu_conv_step(x, state, w, b, r, backend=backend)
    assert y.dtype == dtype and y.shape == (5, 24)
    check_output("y", y, (x, state0, w, b, r))
    assert torch.equal(state, torch.cat([state0, x[:, None]], dim=1)[:, 1:])


@pytest.mark.parametrize("backend,device", params())
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_state_update_in_place(backend, device, k):
    x, state, w, b, r = make_inputs(3, 6, 4, k, dtype=torch.float32, device=device)
    before = state.clone()
    ptr = state.data_ptr()
    glu_conv_step(x, state, w, b, r, backend=backend)
    assert state.data_ptr() == ptr and state.shape == (3, k - 1, 6)
    # The oldest input dropped, the others moved one slot towards the front, x appended: exact copies.
    assert torch.equal(state[:, :k - 2], before[:, 1:])
    if k > 1:
        assert torch.equal(state[:, -1], x)


@pytest.mark.parametrize("backend,device", params())
def test_k1_accepts_none_state(backend, device):
    x, _, w, b, r = make_inputs(4, 6, 5, 1, dtype=torch.float32, device=device)
    torch.testing.assert_close(glu_conv_step(x, None, w, b, r, backend=backend),
                               glu_conv_step_ref(x, None, w, b, r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", dtype_params(lambda b, d: [PRECISE[b]] + [torch.float32] * (
    PRECISE[b] != torch.float32)), ids=_id)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_steps_equal_whole_sequence(backend, device, dtype, k):
    """T = 7 steps from a zero state equal glu_conv(causal=True) over the sequence at every position (check_close:
    to 1e-12 in fp64, to torch's fp32 tolerances against the fp64 whole-sequence op in fp32)."""
    B, T, c_in, c_out = 3, 7, 6, 5
    g = torch.Generator().manual_seed(k)
    x, r = (torch.randn(B, T, c, generator=g, dtype=torch.float64) for c in (c_in, c_out))
    w = torch.randn(k, c_in, 2 * c_out, generator=g, dtype=torch.float64) / math.sqrt(k * c_in)
    b = torch.randn(2 * c_out, generator=g, dtype=torch.float64)
    full64 = glu_conv(x, w, b, r, causal=True, backend="reference")
    x, w, b, r = (t.to(device=device, dtype=dtype) for t in (x, w, b, r))
    full = glu_conv(x, w, b, r, causal=True, backend="reference")
    state = x.new_zeros(B, k - 1, c_in)
    for t in range(T):
        y = glu_conv_step(x[:, t], state, w, b, r[:, t], backend=backend)
        check_close(f"step {t}", y, full[:, t], full64[:, t].to(device))
    assert torch.equal(state, x[:, T - k + 1:])


@pytest.mark.parametrize("backend,device,dtype", dtype_params(lambda b, d: [PRECISE[b]]), ids=_id)
def test_non_contiguous_inputs(backend, device, dtype):
    B, c_in, c_out, k = 5, 12, 7, 3
    x, state, w, b, r = make_inputs(B, c_in, c_out, k, dtype=dtype, device=device)
    xs = torch.zeros(2 * B, c_in + 3, dtype=dtype, device=device)
    xs[::2, 2:-1] = x
    xs = xs[::2, 2:-1]                                          # row stride 2*(C_in+3), offset 2
    rs = torch.zeros(c_out, 2 * B, dtype=dtype, device=device)
    rs[:, 1::2] = r.t()
    rs = rs[:, 1::2].t()                                        # (B, C_out) with strides (2, 2*B)
    ws = w.transpose(1, 2).contiguous().transpose(1, 2)         # (k, C_in, 2*C_out), C_in has unit stride
    bs = torch.stack([b, b], dim=1)[:, 0]                       # stride 2
    assert not any(t.is_contiguous() for t in (xs, rs, ws, bs))
    state0, state_ref = state.clone(), state.clone()
    want = glu_conv_step_ref(x, state_ref, w, b, r)
    got = glu_conv_step(xs, state, ws, bs, rs, backend=backend)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    check_output("y", got, (x, state0, w, b, r))
    assert torch.equal(state, state_ref)


@pytest.mark.parametrize("backend,device", params(backends=("reference", "native"), devices=("cpu",)))
def test_autocast(backend, device):
    """Under CPU autocast x, weight, bias, residual run in bf16; the state is kept in bf16 by its owner."""
    x, state, w, b, r = make_inputs(3, 8, 4, 3, dtype=torch.float32)
    state16 = state.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv_step(x, state16, w, b, r, backend=backend)
    assert y.dtype == torch.bfloat16
    check_output("y", y, cast((x, state, w, b, r), torch.bfloat16))
    assert torch.equal(state16[:, -1], x.to(torch.bfloat16))


@pytest.mark.parametrize("backend,device", params(backends=("reference", "native"), devices=("cpu",)))
def test_autocast_leaves_float64_alone(backend, device):
    """As glu_conv (and torch's autocast): an fp64 model under autocast keeps computing in fp64."""
    x, state, w, b, r = make_inputs(3, 8, 4, 3)
    state_ref = state.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv_step(x, state, w, b, r, backend=backend)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, glu_conv_step_ref(x, state_ref, w, b, r), rtol=1e-12, atol=1e-12)
    assert torch.equal(state, state_ref)


# ---- bad inputs ----------------------------------------------------------------------------------------------

def _bad_cases():
    x, s, w, b, r = make_inputs(2, 3, 4, 3, dtype=torch.float32)
    return [
        ("x rank", (torch.randn(2, 1, 3), s, w, b, r), ValueError, r"x must have 2 dimensions, got shape \(2, 1, 3\)"),
        ("weight rank", (x, s, torch.randn(3, 8), b, r), ValueError, r"weight must have 3 dimensions"),
        ("C_in", (torch.randn(2, 5), s, w, b, r), ValueError, r"weight has C_in = 3 .* x has C_in = 5"),
        ("C_in = 0", (torch.randn(2, 0), torch.randn(2, 2, 0), torch.randn(3, 0, 8), b, r), ValueError,
         r"x must have C_in >= 1 channels, got shape \(2, 0\)"),
        ("C_out = 0", (x, s, torch.randn(3, 3, 0), None, None), ValueError, r"2\*C_out \(even, > 0\).* got 0"),
        ("odd GLU width", (x, s, torch.randn(3, 3, 7), None, None), ValueError, r"2\*C_out \(even, > 0\).* got 7"),
        ("k = 0", (x, s, torch.randn(0, 3, 8), None, None), ValueError, r"kernel width k >= 1"),
        ("state width", (x, torch.zeros(2, 3, 3), w, b, r), ValueError,
         r"conv_state must have shape \(B, k-1, C_in\) = \(2, 2, 3\), got \(2, 3, 3\)"),
        ("state rows", (x, torch.zeros(3, 2, 3), w, b, r), ValueError,
         r"conv_state must have shape .* got \(3, 2, 3\)"),
        ("state rank", (x, torch.zeros(2, 6), w, b, r), ValueError, r"conv_state must have 3 dimensions"),
        ("state None, k = 3", (x, None, w, b, r), ValueError, r"conv_state is None but the kernel width is k = 3"),
        ("state strided", (x, torch.zeros(2, 3, 2).transpose(1, 2), w, b, r), ValueError,
         r"conv_state must be contiguous \(it is updated in place\)"),
        ("bias", (x, s, w, torch.randn(4), r), ValueError, r"bias must have shape \(2\*C_out,\) = \(8,\), got \(4,\)"),
        ("residual", (x, s, w, b, torch.randn(2, 3)), ValueError,
         r"residual must have shape \(B, C_out\) = \(2, 4\), got \(2, 3\)"),
        ("residual rank", (x, s, w, b, torch.randn(2, 1, 4)), ValueError, r"residual must have 2 dimensions"),
        ("state dtype", (x, s.double(), w, b, r), TypeError,
         r"conv_state has dtype torch.float64 but x has dtype torch.float32"),
        ("weight dtype", (x, s, w.half(), b, r), TypeError, r"weight has dtype torch.float16 but x has"),
        ("device", (x, s, w, b, r.to("meta")), ValueError, r"residual is on meta but x is on cpu"),
        ("integer x", (x.long(), s, w, b, r), TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        ("not a tensor", ([[1.0]], s, w, b, r), TypeError, r"x must be a torch.Tensor, got list"),
    ]


@pytest.mark.parametrize("backend,device", params(devices=("cpu",)))
@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(backend, device, case):
    _, args, exc, match = _bad_cases()[case]
    state = args[1]
    before = None if state is None else state.clone()
    with pytest.raises(exc, match=match):
        glu_conv_step(*args, backend=backend)
    assert state is None or torch.equal(state, before), "a rejected call must leave the state alone"


@pytest.mark.parametrize("backend,device", params(devices=("cpu",)))
@pytest.mark.parametrize("which", ["x", "conv_state", "weight", "bias", "residual"])
def test_requires_grad_raises_under_grad_mode(backend, device, which):
    names = ("x", "conv_state", "weight", "bias", "residual")
    inputs = dict(zip(names, make_inputs(2, 3, 4, 3, dtype=torch.float32)))
    inputs[which].requires_grad_()
    with pytest.raises(RuntimeError, match=rf"inference op without autograd, but {which} require"):
        glu_conv_step(**inputs, backend=backend)
    with torch.no_grad():                                       # the same call is fine without grad mode
        y = glu_conv_step(**inputs, backend=backend)
    assert not y.requires_grad


@pytest.mark.parametrize("backend,device", params(backends=("triton",)))
def test_triton_refuses_float64(backend, device):
    with pytest.raises(TypeError, match=r"triton backend of glu_conv_step runs .* got torch.float64"):
        glu_conv_step(*make_inputs(2, 3, 4, 3, device=device), backend=backend)


# ---- op registration: opcheck (schema incl. the mutation of conv_state, fake), torch.compile ---------------------

def _custom_op(backend):
    if backend == "native":
        return torch.ops.convs2s.glu_conv_step_native.default
    import convs2s.ops._triton_glu_conv_step as binding
    return binding.glu_conv_step_op


@pytest.mark.parametrize("backend,device", params(backends=("native", "triton")))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_opcheck(backend, device, k, bias, residual):
    x, state, w, b, r = make_inputs(3, 16, 8, k, bias=bias, residual=residual, dtype=torch.float32, device=device)
    torch.library.opcheck(_custom_op(backend), (x, state, w, b, r))


@pytest.mark.parametrize("backend,device", params())
def test_torch_compile_fullgraph(backend, device):
    """Two steps in one compiled graph: outputs and the state mutation match eager stepping of the reference."""
    x1, state, w, b, r = make_inputs(3, 16, 8, 3, dtype=torch.float32, device=device)
    x2 = torch.randn_like(x1)

    def two_steps(x1, x2, state, w, b, r):
        y1 = glu_conv_step(x1, state, w, b, r, backend=backend)
        return glu_conv_step(x2, state, w, b, y1, backend=backend)

    state_ref = state.clone()
    want = glu_conv_step_ref(x2, state_ref, w, b, glu_conv_step_ref(x1, state_ref, w, b, r))
    torch._dynamo.reset()
    got = torch.compile(two_steps, fullgraph=True, backend="aot_eager")(x1, x2, state, w, b, r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, state_ref)


# ---- Triton: every GPU config compiles for sm_90 without spills ------------------------------------------------

_SM90_COMPILE = """
import triton
from convs2s.kernels import glu_conv_step as K
from tests.ops.sm90 import specialize, usage
# The integer arguments of a launch at B=64 C_in=C_out=512 k=3 on contiguous tensors.
B, C, N2 = 64, 512, 1024
ints = dict(B=B, C_in=C, C_out=C, B_BUCKET=B, stride_xb=C, stride_xc=1, stride_wk=C * N2, stride_wc=N2,
            stride_wn=1, stride_bn=1, stride_rb=C, stride_rc=1)
flags = dict(KSIZE=3, HAS_BIAS=True, HAS_RES=True, DOT_FP32=False, INPUT_PRECISION="tf32")
shift = triton.Config(dict(KSIZE=3, BLOCK_C=K.SHIFT_BLOCK_C), num_warps=4)
for dtype in ("bf16", "fp32"):
    for name, fn, cfgs in (("_step_kernel", K._step_kernel.fn, K.STEP_CONFIGS + [K.ONE_CONFIG]),
                           ("_shift_kernel", K._shift_kernel, [shift])):
        for cfg in cfgs:
            sig, const, attrs = specialize(fn, {**flags, **cfg.kwargs}, ints, lambda n: f"*{dtype}")
            print(name, dtype, cfg.kwargs, cfg.num_warps, cfg.num_stages,
                  usage(fn, sig, const, attrs, cfg.num_warps, cfg.num_stages))
"""


@pytest.mark.needs_backend("triton", "cpu")
def test_every_config_compiles_for_sm90_without_spills():
    """Every GPU config of the step kernel (STEP_CONFIGS and ONE_CONFIG) and the shift kernel, compiled in bf16 and
    fp32 for sm_90 with Triton's own ptxas (no GPU needed): it must compile (the interpreter accepts what the GPU
    compiler may not) and not spill registers (tests/ops/sm90.py)."""
    from convs2s.kernels import glu_conv_step as K
    run_script(_SM90_COMPILE, lines=2 * (len(K.STEP_CONFIGS) + 2))


# ---- bad inputs reaching the native op's C++ checks directly (the public op's Python checks bypassed) -----------

@pytest.mark.needs_backend("native", "cpu")
@pytest.mark.parametrize("case,match", [
    ("x rank", r"x must be \(B, C_in\), got shape \[2, 1, 3\]"),
    ("state shape", r"conv_state must be \(B, k-1, C_in\) = \(2, 2, 3\), got shape \[2, 3, 3\]"),
    ("state strided", r"conv_state must be contiguous \(it is updated in place\)"),
    ("state dtype", r"conv_state has dtype Double but x has dtype Float"),
    ("C_in = 0", r"x must have C_in >= 1 channels"),
    ("odd GLU width", r"2\*C_out \(even, > 0\) for the GLU, got 7"),
    ("residual", r"residual must be \(B, C_out\) = \(2, 4\), got shape \[2, 3\]"),
    ("bias", r"bias must be \(2\*C_out,\) = \(8,\), got shape \[4\]"),
])
def test_native_cpp_checks(case, match):
    x, s, w, b, r = make_inputs(2, 3, 4, 3, dtype=torch.float32)
    args = {"x rank": (torch.randn(2, 1, 3), s, w, b, r),
            "state shape": (x, torch.zeros(2, 3, 3), w, b, r),
            "state strided": (x, torch.zeros(2, 3, 2).transpose(1, 2), w, b, r),
            "state dtype": (x, s.double(), w, b, r),
            "C_in = 0": (torch.randn(2, 0), torch.zeros(2, 2, 0), torch.randn(3, 0, 8), b, r),
            "odd GLU width": (x, s, torch.randn(3, 3, 7), None, None),
            "residual": (x, s, w, b, torch.randn(2, 3)),
            "bias": (x, s, w, torch.randn(4), r)}[case]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.convs2s.glu_conv_step_native(*args)
