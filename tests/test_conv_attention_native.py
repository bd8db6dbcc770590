"""conv_attention on the native backend (the compiled extension's CPU and CUDA kernels) against the PyTorch
reference: the output, the attention weights and the gradient of every input under the tolerance rule of
tests/tolerance.py (fp64 reference, same-dtype PyTorch reference as yardstick), fp64 gradcheck, mask edge cases
(one real token, all lengths different, Ts = 1, Tt = 1, padding not at the end: padded positions get exactly
zero probability and gradient), non-contiguous inputs, opcheck, torch.compile, and bad inputs reaching the C++
checks. CUDA cases skip without a GPU.
"""


import pytest
import torch

from convs2s.ops import available_backends, conv_attention, conv_attention_ref
from tests.attention_cases import check_against_reference, make_inputs, mask_from, op_args, run
from tests.tolerance import assert_close_rule

_WHY = available_backends("cpu")["native"]
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"native backend unavailable: {_WHY}")
if _WHY is None:
    import convs2s.ops._native_conv_attention  # noqa: F401  (fake and autograd registrations of the ops)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (B, Tt, Ts, C, E, spans, need_weights, attn_in_loss); spans: each sentence's real source positions [lo, hi).
CASES = {
    "all_lengths_different": (3, 37, 29, 24, 40, [(0, 29), (0, 17), (0, 5)], True, True),
    "left_and_inner_padding": (2, 20, 23, 16, 24, [(7, 23), (3, 9)], True, False),
    "one_real_token": (2, 9, 18, 16, 20, [(0, 18), (10, 11)], False, False),
    "one_real_token_weights": (2, 9, 18, 16, 20, [(17, 18), (0, 1)], True, True),
    "Ts_1": (2, 17, 1, 16, 24, None, True, True),
    "Tt_1": (3, 1, 19, 16, 24, [(0, 19), (0, 4), (8, 19)], False, False),
    "Tt_1_Ts_1": (2, 1, 1, 5, 3, None, True, True),
    "no_mask_odd_E": (2, 18, 33, 20, 17, None, False, False),
    "longest_sentence_padded_too": (2, 16, 21, 16, 16, [(0, 15), (2, 11)], True, True),
    "mask_without_padding": (2, 6, 7, 9, 11, [(0, 7), (0, 7)], True, True),
    "long_source": (2, 5, 300, 12, 20, [(0, 300), (100, 233)], True, True),
    # CUDA without need_weights runs the flash-style kernel: E = 768 (its largest register tile, ragged),
    # E = 1100 (beyond it: the batched-GEMM path), Tt beyond one block of rows.
    "E_768_flash": (2, 11, 70, 8, 768, [(0, 70), (3, 41)], False, False),
    "E_1100_fallback": (2, 3, 9, 8, 1100, [(0, 9), (1, 5)], False, False),
    "Tt_many_blocks": (2, 45, 12, 8, 40, [(0, 12), (6, 12)], False, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, device):
    B, Tt, Ts, C, E, spans, need_weights, attn_in_loss = CASES[case]
    check_against_reference("native", make_inputs(B, Tt, Ts, C, E), mask_from(Ts, spans), dtype, device,
                            need_weights, attn_in_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_model_sized(device):
    # The benchmark's layer width and a translation batch's lengths.
    spans = [(0, 32 - (i % 7)) for i in range(8)]
    check_against_reference("native", make_inputs(8, 30, 32, 512, 256), mask_from(32, spans), torch.float32,
                            device, False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["all_lengths_different", "left_and_inner_padding", "Ts_1", "Tt_1"])
def test_gradcheck_fp64(case, device):
    B, Tt, Ts, _, _, spans, need_weights, _ = CASES[case]
    t = make_inputs(B, min(Tt, 5), Ts, 4, 6)
    leaves = [v.to(device).requires_grad_() for v in t.values()]
    mask = mask_from(Ts, spans)
    mask = None if mask is None else mask.to(device)

    def fn(x, te, k, v, w_in, b_in, w_out, b_out):
        out, attn = conv_attention(x, te, k, v, mask, w_in, b_in, w_out, b_out, need_weights=need_weights,
                                   backend="native")
        return (out, attn) if need_weights else out

    def ref(x, te, k, v, w_in, b_in, w_out, b_out):
        out, attn = conv_attention_ref(x, te, k, v, mask, w_in, b_in, w_out, b_out, need_weights=need_weights)
        return (out, attn) if need_weights else out

    for a, e in zip(*(torch.utils._pytree.tree_leaves(f(*leaves)) for f in (fn, ref))):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Every input a strided view: transposed storage for activations and weights, every other column of a
    wider mask."""
    B, Tt, Ts, C, E = 2, 11, 13, 10, 12
    t = make_inputs(B, Tt, Ts, C, E)
    mask = mask_from(Ts, [(0, 13), (4, 9)])
    wide = torch.zeros(B, 2 * Ts, dtype=torch.bool)
    wide[:, ::2] = mask
    strided_mask = wide[:, ::2].to(device)
    gout = torch.randn(B, Tt, C, dtype=torch.float64)

    def strided(v):
        v = v.to(device, torch.float32)
        if v.dim() == 1:
            return torch.stack([v, v], 1)[:, 0].detach().requires_grad_()
        return v.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_()

    leaves = {n: strided(v) for n, v in t.items()}
    assert not any(v.is_contiguous() for v in leaves.values()) and not strided_mask.is_contiguous()
    out, attn = conv_attention(*op_args(leaves, strided_mask), need_weights=True, backend="native")
    grads = torch.autograd.grad((out.double() * gout.to(device)).sum(), list(leaves.values()))
    o64, a64, g64 = run(conv_attention_ref, t, mask, True, gout, None, torch.float64, "cpu")
    ol, al, gl = run(conv_attention_ref, t, mask, True, gout, None, torch.float32, device)
    assert_close_rule("out", out, ol, o64, torch.float32)
    assert_close_rule("attn", attn, al, a64, torch.float32)
    for name, g in zip(leaves, grads):
        assert_close_rule("d" + name, g, gl[name], g64[name], torch.float32)


def test_only_the_weights_reach_the_loss():
    # grad_out is None in the backward (gradients are not materialized): the softmax gradient alone flows back.
    t = make_inputs(2, 6, 9, 8, 10)
    mask = mask_from(9, [(0, 9), (2, 7)])
    leaves = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
    _, attn = conv_attention(*op_args(leaves, mask), need_weights=True, backend="native")
    gattn = torch.randn_like(attn)
    names = ["x", "target_embedding", "encoder_keys", "w_in", "b_in"]  # w_out, b_out, values do not reach attn
    got = torch.autograd.grad((attn * gattn).sum(), [leaves[n] for n in names])
    ref_leaves = {n: v.detach().clone().requires_grad_() for n, v in t.items()}
    _, attn_ref = conv_attention_ref(*op_args(ref_leaves, mask), need_weights=True)
    want = torch.autograd.grad((attn_ref * gattn).sum(), [ref_leaves[n] for n in names])
    for n, a, e in zip(names, got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=n)


def test_auto_picks_native_on_cpu():
    t = make_inputs(2, 3, 4, 5, 6)
    a = conv_attention(*op_args(t, None))
    b = conv_attention(*op_args(t, None), backend="native")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


# ---- op registration: opcheck, torch.compile ---------------------------------------------------------------------

def _op_args(mask=True, requires_grad=True, dtype=torch.float32):
    t = make_inputs(2, 5, 7, 8, 6)
    leaves = {n: v.to(dtype).requires_grad_(requires_grad) for n, v in t.items()}
    return op_args(leaves, mask_from(7, [(0, 7), (1, 4)]) if mask else None)


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_opcheck_forward(mask, need_weights):
    torch.library.opcheck(torch.ops.convs2s.conv_attention_native_fwd.default, (*_op_args(mask), need_weights))


@pytest.mark.parametrize("with_grad_attn", [True, False])
def test_opcheck_backward(with_grad_attn):
    x, te, k, v, mask, w_in, b_in, w_out, b_out = _op_args(requires_grad=False)
    out, attn, q, ctx, lse = torch.ops.convs2s.conv_attention_native_fwd(x, te, k, v, mask, w_in, b_in, w_out,
                                                                         b_out, True)
    gattn = torch.randn_like(attn) if with_grad_attn else None
    torch.library.opcheck(torch.ops.convs2s.conv_attention_native_bwd.default,
                          (torch.randn_like(out), gattn, x, k, v, mask, w_in, w_out, q, ctx, lse))


def test_torch_compile_fullgraph():
    # fp64, so that the compiled graph and the reference agree to rounding of a different summation order.
    x, te, k, v, mask, w_in, b_in, w_out, b_out = _op_args(dtype=torch.float64)

    def loss(fn, **kw):
        out, attn = fn(x, te, k, v, mask, w_in, b_in, w_out, b_out, need_weights=True, **kw)
        return out.square().sum() + attn.square().sum()

    compiled = torch.compile(lambda: loss(conv_attention, backend="native"), fullgraph=True, backend="aot_eager")
    got = compiled()
    want = loss(conv_attention_ref)
    torch.testing.assert_close(got, want)
    leaves = [x, te, k, v, w_in, b_in, w_out, b_out]
    for a, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, e)


# ---- bad inputs reaching the C++ checks (the public op's Python checks are bypassed) -----------------------------

def _fwd(**changes):
    names = ("x", "target_embedding", "encoder_keys", "encoder_values", "src_padding_mask", "w_in", "b_in", "w_out",
             "b_out")
    a = dict(zip(names, _op_args(requires_grad=False)))
    a.update(changes)
    return torch.ops.convs2s.conv_attention_native_fwd(*a.values(), False)


@pytest.mark.parametrize("changes,match", [
    ({"x": torch.randn(2, 5)}, r"x must be \(B, Tt, C\), got shape \[2, 5\]"),
    ({"encoder_keys": torch.randn(2, 7)}, r"encoder_keys must be \(B, Ts, E\), got shape \[2, 7\]"),
    ({"target_embedding": torch.randn(2, 5, 7)}, r"target_embedding must be \(B, Tt, E\) = \[2, 5, 6\], got shape"),
    ({"encoder_values": torch.randn(2, 6, 6)}, r"encoder_values must be \(B, Ts, E\) = \[2, 7, 6\]"),
    ({"w_in": torch.randn(8, 6)}, r"w_in must be \(E, C\) = \[6, 8\], got shape \[8, 6\]"),
    ({"b_out": torch.randn(6)}, r"b_out must be \(C,\) = \[8\]"),
    ({"w_out": torch.randn(8, 6).double()}, r"w_out has dtype Double but x has dtype Float"),
    ({"src_padding_mask": torch.zeros(2, 7)}, r"src_padding_mask must be a bool tensor"),
    ({"src_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, r"src_padding_mask must be \(B, Ts\) = \[2, 7\]"),
    ({"x": torch.randn(2, 0, 8), "target_embedding": torch.randn(2, 0, 6)}, r"at least one target and one source"),
])
def test_bad_inputs_reach_cpp_checks(changes, match):
    with pytest.raises(RuntimeError, match=match):
        _fwd(**changes)


def test_bad_saved_tensor_in_backward():
    x, te, k, v, mask, w_in, b_in, w_out, b_out = _op_args(requires_grad=False)
    out, _, q, ctx, lse = torch.ops.convs2s.conv_attention_native_fwd(x, te, k, v, mask, w_in, b_in, w_out, b_out,
                                                                      False)
    with pytest.raises(RuntimeError, match=r"lse \(saved\) must be \(B, Tt\) = \[2, 5\]"):
        torch.ops.convs2s.conv_attention_native_bwd(out, None, x, k, v, mask, w_in, w_out, q, ctx, lse[:, :3])
    with pytest.raises(RuntimeError, match=r"lse must be the contiguous Float tensor saved by the forward"):
        torch.ops.convs2s.conv_attention_native_bwd(out, None, x, k, v, mask, w_in, w_out, q, ctx, lse.double())


@CUDA
def test_mixed_devices_reach_cpp_checks():
    with pytest.raises(RuntimeError, match=r"encoder_keys is on cuda:0 but x is on cpu"):
        _fwd(encoder_keys=torch.randn(2, 7, 6, device="cuda"))
