"""conv_attention, Triton backend: outputs, attention weights and the gradient of every input against an fp64
reference, under the 2x-low-precision-reference rule (tests/tolerance.py), plus mask edge cases, strides,
opcheck and torch.compile.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) in fp32 and fp16 with small tiles
(kernels/conv_attention.py INTERPRET_CONFIG: 16-wide, so the shapes below span several target tiles, source
tiles and E-chunks, with ragged last tiles). bf16 runs on the GPU only: the interpreter's bf16 tl.dot is broken.
On a GPU every test runs on CUDA tensors with one config per kernel (autotuning off, see _one_config_per_kernel),
and test_cuda_every_config runs each config; pytest-xdist (-n 16) spreads the compilations.
"""


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convs2s.ops import available_backends, conv_attention, conv_attention_ref
from tests.attention_cases import INPUTS, check_against_reference, make_inputs, mask_from, op_args, run
from tests.tolerance import assert_close_rule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(available_backends(DEVICE)["triton"] is not None,
                                reason=f"triton backend unavailable: {available_backends(DEVICE)['triton']}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """On a GPU, run each kernel's first config instead of autotuning every new shape (minutes of compilation);
    test_cuda_every_config checks each config, so whichever the tuner picks is covered."""
    from convs2s.kernels import conv_attention as k
    monkeypatch.setattr(k, "AUTOTUNE", False)


# (B, Tt, Ts, C, E, spans, need_weights, attn_in_loss); spans: each sentence's real source positions [lo, hi).
CASES = {
    "tiles_and_lengths": (3, 37, 29, 24, 40, [(0, 29), (0, 17), (0, 5)], True, True),
    "left_and_inner_padding": (2, 20, 23, 16, 24, [(7, 23), (3, 9)], True, False),
    "one_real_token": (2, 9, 18, 16, 20, [(0, 18), (10, 11)], False, False),
    "Ts_1": (2, 17, 1, 16, 24, None, True, True),
    "Tt_1": (3, 1, 19, 16, 24, [(0, 19), (0, 4), (8, 19)], False, False),
    "no_mask_odd_E": (2, 18, 33, 20, 17, None, False, False),
    "longest_sentence_padded_too": (2, 16, 21, 16, 16, [(0, 15), (2, 11)], True, True),
}


@pytest.fixture(params=["materialize", "flash"])
def strategy(request, monkeypatch):
    """The backward's two strategies (kernels/conv_attention.py BACKWARD), each forced."""
    from convs2s.kernels import conv_attention as k
    monkeypatch.setattr(k, "BACKWARD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, strategy):
    B, Tt, Ts, C, E, spans, need_weights, attn_in_loss = CASES[case]
    t, mask = make_inputs(B, Tt, Ts, C, E), mask_from(Ts, spans)
    check_against_reference("triton", t, mask, dtype, DEVICE, need_weights, attn_in_loss)


@st.composite
def shapes(draw):
    B = draw(st.integers(1, 3))
    Tt, Ts = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    C, E = draw(st.integers(1, 40)), draw(st.integers(1, 48))
    spans = []
    for _ in range(B):
        n = draw(st.integers(1, Ts))
        lo = draw(st.integers(0, Ts - n))
        spans.append((lo, lo + n))
    use_mask = draw(st.booleans())
    return B, Tt, Ts, C, E, (spans if use_mask else None), draw(st.booleans()), draw(st.sampled_from(
        ["materialize", "flash"]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes())
def test_hypothesis_shapes(shape, monkeypatch):
    from convs2s.kernels import conv_attention as k
    B, Tt, Ts, C, E, spans, need_weights, strategy = shape
    monkeypatch.setattr(k, "BACKWARD", strategy)
    t, mask = make_inputs(B, Tt, Ts, C, E), mask_from(Ts, spans)
    check_against_reference("triton", t, mask, torch.float32, DEVICE, need_weights, attn_in_loss=need_weights)


def test_non_contiguous_inputs():
    """Every input a strided view: every other channel of a wider buffer, a transposed (B, E, Ts) storage for the
    keys, transposed weight storage, every other column of a wider mask."""
    B, Tt, Ts, C, E = 2, 19, 22, 12, 20
    t, mask = make_inputs(B, Tt, Ts, C, E), mask_from(Ts, [(0, 22), (5, 14)])
    dtype = torch.float32
    wide_mask = torch.zeros(B, 2 * Ts, dtype=torch.bool, device=DEVICE)
    wide_mask[:, ::2] = mask.to(DEVICE)
    strided_mask = wide_mask[:, ::2]                        # on the device already: .to() would compact it

    def widen(v):                                           # same values, last dimension strided by 2
        buf = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
        buf[..., ::2] = v
        return buf[..., ::2]

    fused_t = {
        "x": widen(t["x"]),
        "target_embedding": widen(t["target_embedding"]),
        "encoder_keys": t["encoder_keys"].transpose(1, 2).contiguous().transpose(1, 2),
        "encoder_values": widen(t["encoder_values"]),
        "w_in": t["w_in"].t().contiguous().t(),
        "b_in": widen(t["b_in"]),
        "w_out": t["w_out"].t().contiguous().t(),
        "b_out": t["b_out"],
    }
    gout = torch.randn(B, Tt, C, dtype=torch.float64)
    o64, a64, g64 = run(conv_attention_ref, t, mask, True, gout, None, torch.float64, "cpu")
    ol, al, gl = run(conv_attention_ref, t, mask, True, gout, None, dtype, DEVICE)
    leaves = {}
    for n, v in fused_t.items():                            # same strides in the test dtype, on the device
        leaves[n] = torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=DEVICE).copy_(v).requires_grad_()
    assert not any(v.is_contiguous() for n, v in leaves.items() if n != "b_out")
    assert not strided_mask.is_contiguous()
    out, attn = conv_attention(*op_args(leaves, strided_mask), need_weights=True, backend="triton")
    grads = torch.autograd.grad((out.double() * gout.to(DEVICE)).sum(), list(leaves.values()))
    assert_close_rule("out", out.cpu(), ol, o64, dtype)
    assert_close_rule("attn", attn.cpu(), al, a64, dtype)
    for name, g in zip(leaves, grads):
        assert_close_rule("d" + name, g.cpu(), gl[name], g64[name], dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="INTERPRET_CONFIG is used only under the interpreter")
def test_other_tile_config(monkeypatch, strategy):
    """Tiles of different widths per dimension (the GPU configs are never the interpreter's 16s)."""
    from convs2s.kernels import conv_attention as k
    monkeypatch.setattr(k, "INTERPRET_CONFIG", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_EK": 32, "BLOCK_EO": 64,
                                                "num_warps": 4, "num_stages": 1})
    t, mask = make_inputs(2, 35, 40, 16, 70), mask_from(40, [(0, 40), (4, 31)])
    check_against_reference("triton", t, mask, torch.float32, DEVICE, need_weights=True, attn_in_loss=True)


def test_backward_is_deterministic(strategy):
    t, mask = make_inputs(2, 21, 34, 16, 24), mask_from(34, [(0, 34), (0, 9)])
    gout = torch.randn(2, 21, 16, dtype=torch.float64)
    _, _, g1 = run(conv_attention, t, mask, False, gout, None, torch.float32, DEVICE, backend="triton")
    _, _, g2 = run(conv_attention, t, mask, False, gout, None, torch.float32, DEVICE, backend="triton")
    for name in INPUTS:
        assert torch.equal(g1[name], g2[name]), name


def test_weights_requested_but_unused_in_loss(strategy):
    """need_weights=True with a loss on `out` only: the weights' gradient is None, not a zero tensor."""
    t, mask = make_inputs(2, 10, 12, 8, 16), mask_from(12, [(0, 12), (2, 7)])
    check_against_reference("triton", t, mask, torch.float32, DEVICE, need_weights=True, attn_in_loss=False)


def test_float64_is_refused():
    t, mask = make_inputs(1, 3, 4, 8, 16), None
    with pytest.raises(TypeError, match="float32, torch.float16, torch.bfloat16; got torch.float64"):
        conv_attention(*op_args({n: v.to(DEVICE) for n, v in t.items()}, mask), backend="triton")


def _op_args(requires_grad=True, dtype=torch.float32):
    t, mask = make_inputs(2, 5, 7, 8, 16), mask_from(7, [(0, 7), (1, 4)])
    leaves = {n: v.to(DEVICE, dtype).requires_grad_(requires_grad) for n, v in t.items()}
    return op_args(leaves, mask.to(DEVICE))


def test_opcheck_forward():
    args = _op_args()
    for need_weights in (False, True):
        torch.library.opcheck(torch.ops.convs2s.conv_attention_triton_fwd.default, (*args, need_weights))


def test_opcheck_backward(strategy):
    x, te, k, v, mask, w_in, b_in, w_out, b_out = _op_args(requires_grad=False)
    out, attn, ctx, q0, lse, root_s = torch.ops.convs2s.conv_attention_triton_fwd(
        x, te, k, v, mask, w_in, b_in, w_out, b_out, True)
    dout, dattn = torch.randn_like(out), torch.randn_like(attn)
    torch.library.opcheck(torch.ops.convs2s.conv_attention_triton_bwd.default,
                          (dout, dattn, x, k, v, mask, w_in, w_out, ctx, q0, lse, root_s, attn))
    torch.library.opcheck(torch.ops.convs2s.conv_attention_triton_bwd.default,
                          (dout, None, x, k, v, None, w_in, w_out, ctx, q0, lse, root_s, None))


def test_custom_op_path_equals_eager_path():
    """The registered function runs an autograd.Function in eager mode and the custom op under torch.compile:
    both must give the same values and gradients (the same kernels run)."""
    x, te, k, v, mask, w_in, b_in, w_out, b_out = _op_args()
    leaves = [x, te, k, v, w_in, b_in, w_out, b_out]
    out, attn = conv_attention(x, te, k, v, mask, w_in, b_in, w_out, b_out, need_weights=True, backend="triton")
    want = torch.autograd.grad(out.sum() + (attn * attn).sum(), leaves)
    out2, attn2, *_ = torch.ops.convs2s.conv_attention_triton_fwd(x, te, k, v, mask, w_in, b_in, w_out, b_out, True)
    got = torch.autograd.grad(out2.sum() + (attn2 * attn2).sum(), leaves)
    assert torch.equal(out, out2) and torch.equal(attn, attn2)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the public op down to the custom op (aot_eager on CPU: the fake
    implementations, the autograd registration and the backward op are what is exercised)."""
    args = _op_args()

    def f(*a):
        out, attn = conv_attention(*a, need_weights=True, backend="triton")
        return out.sum() + (attn * attn).sum()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [a for a in args if a is not None and a.requires_grad]
    want = torch.autograd.grad(f(*args), leaves)
    got = torch.autograd.grad(compiled(*args), leaves)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


_SM90_COMPILE = """
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from convs2s.kernels import conv_attention as k
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
fp32 = ("lse_ptr", "rs_ptr", "delta_ptr", "dextra_ptr")
for name, configs in (("_fwd_kernel", k._FWD_CONFIGS), ("_bwd_ds_kernel", k._DS_CONFIGS),
                      ("_bwd_dq_kernel", k._DQ_CONFIGS), ("_bwd_dkdv_kernel", k._DKDV_CONFIGS)):
  fn, cfg = getattr(k, name), configs[0]
  for optional in (True, False):  # weights / dL/dp on (compiles?), off (the training path: spills?)
    flags = dict(QK_SCALE=k.QK_SCALE_LOG2, Q_SCALE=k.SQRT_HALF, HAS_MASK=True, HAS_DA=optional,
                 NEED_WEIGHTS=optional, DOT_PRECISION="tf32", **cfg.kwargs)
    sig = {n: "constexpr" if n in flags else "*fp32" if n in fp32 else "*u8" if n == "mask_ptr"
           else "*bf16" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    const = {n: flags[n] for n in fn.arg_names if n in flags}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    if optional:
        continue
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    print(name, cfg, " ".join(re.findall(r"(?:REG|STACK):\\d+", usage)))
"""


def test_kernels_compile_for_sm90_without_spills():
    """Compile each kernel's first GPU config in bf16 for sm_90 with triton's own ptxas, no GPU needed: with the
    optional inputs (weights, dL/dp) on, it must compile (the interpreter accepts what the GPU compiler may not:
    tl.dot tiles < 16, layout errors); with them off (the training path) it must not spill registers. In a
    subprocess: triton cannot compile in a process that imported it with TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and all("STACK:" in line for line in lines), r.stdout
    for line in lines:
        assert "STACK:0" in line.split() and line.count("STACK:") == 1, f"register spills: {line}"


# GPU: the sizes the model runs (E = 256..768, C = 512, lengths up to 1024+), bf16 included.
CUDA_CASES = [
    (2, 1, 1, 32, 256, None),
    (3, 129, 151, 64, 300, [(0, 151), (9, 150), (0, 1)]),
    (2, 256, 1030, 512, 768, [(0, 1030), (0, 700)]),
    (4, 1024, 37, 128, 512, [(0, 37), (5, 20), (0, 36), (36, 37)]),
    (8, 33, 64, 512, 256, [(0, 64 - i) for i in range(8)]),
]


@requires_cuda
@pytest.mark.parametrize("kernel", ["_fwd", "_bwd_ds", "_bwd_dq", "_bwd_dkdv"])
def test_cuda_every_config(kernel, monkeypatch):
    """Every autotune config of one kernel, each forced in turn, in bf16 on a shape with ragged tiles and E = 300
    (several E-chunks, a partial last one)."""
    from convs2s.kernels import conv_attention as k
    tuner = getattr(k, kernel)
    monkeypatch.setattr(k, "BACKWARD", "flash" if kernel in ("_bwd_dq", "_bwd_dkdv") else "materialize")
    t, mask = make_inputs(2, 70, 45, 64, 300), mask_from(45, [(0, 45), (3, 30)])
    configs = list(tuner.configs)
    try:
        for cfg in configs:
            print(kernel, cfg)
            tuner.configs = [cfg]            # one config: the autotuner runs it without timing
            tuner.cache.clear()
            check_against_reference("triton", t, mask, torch.bfloat16, "cuda", need_weights=True,
                                    attn_in_loss=True)
    finally:
        tuner.configs = configs
        tuner.cache.clear()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_cuda_matches_reference(case, dtype, strategy):
    B, Tt, Ts, C, E, spans = case
    t, mask = make_inputs(B, Tt, Ts, C, E), mask_from(Ts, spans)
    check_against_reference("triton", t, mask, dtype, "cuda", need_weights=True, attn_in_loss=True)
