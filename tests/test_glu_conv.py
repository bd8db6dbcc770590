"""glu_conv: the PyTorch reference against independent formulations, gradcheck, weight helpers, bad inputs.

The fused backends are tested against this reference in test_glu_conv_triton.py and test_glu_conv_native.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from convs2s.ops import conv1d_weight_to_tbc, glu_conv, glu_conv_ref, tbc_weight_to_conv1d


def conv1d_glu(x, weight, bias, residual, causal):
    """Independent formulation: F.conv1d on (B, C, T) with the contract's padding, then F.glu."""
    k = weight.shape[0]
    pad_l, pad_r = (k - 1, 0) if causal else ((k - 1) // 2, k // 2)
    xc = F.pad(x.transpose(1, 2), (pad_l, pad_r))                     # (B, C_in, T + k - 1)
    h = F.conv1d(xc, tbc_weight_to_conv1d(weight), bias)              # (B, 2*C_out, T)
    g = F.glu(h, dim=1).transpose(1, 2)                               # (B, T, C_out)
    return (g + residual) * math.sqrt(0.5) if residual is not None else g


def make_inputs(B, T, c_in, c_out, k, *, bias=True, residual=True, dtype=torch.float64, requires_grad=False):
    x = torch.randn(B, T, c_in, dtype=dtype)
    w = torch.randn(k, c_in, 2 * c_out, dtype=dtype) / math.sqrt(k * c_in)
    b = torch.randn(2 * c_out, dtype=dtype) if bias else None
    r = torch.randn(B, T, c_out, dtype=dtype) if residual else None
    ts = [t for t in (x, w, b, r) if t is not None]
    for t in ts:
        t.requires_grad_(requires_grad)
    return x, w, b, r


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("T", [1, 2, 6, 37])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
def test_reference_matches_conv1d(causal, k, T, bias, residual):
    x, w, b, r = make_inputs(3, T, 5, 4, k, bias=bias, residual=residual)
    got = glu_conv_ref(x, w, b, r, causal=causal)
    want = conv1d_glu(x, w, b, r, causal)
    assert got.shape == (3, T, 4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_reference_gradcheck(causal, k, bias, residual):
    inputs = make_inputs(2, 5, 3, 2, k, bias=bias, residual=residual, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: glu_conv_ref(*a, causal=causal), inputs)


def test_causal_output_ignores_the_future():
    x, w, b, _ = make_inputs(2, 9, 4, 3, 3, residual=False)
    y = glu_conv_ref(x, w, b, causal=True)
    x2 = x.clone()
    x2[:, 5:] = torch.randn_like(x2[:, 5:])
    y2 = glu_conv_ref(x2, w, b, causal=True)
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=0)
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_even_kernel_padding_is_fairseqs():
    # k = 4, non-causal: one zero on the left, two on the right; output t sees x[t-1 .. t+2].
    x, w, _, _ = make_inputs(1, 6, 2, 2, 4, bias=False, residual=False)
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
    x, w, b, r = make_inputs(2, 5, 3, 4, 3)
    torch.testing.assert_close(glu_conv(x, w, b, r, causal=True, backend="reference"),
                               glu_conv_ref(x, w, b, r, causal=True), rtol=0, atol=0)


def test_autocast_runs_in_bf16_on_cpu():
    x, w, b, r = make_inputs(2, 5, 8, 4, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv(x, w, b, r, backend="reference")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), glu_conv_ref(x, w, b, r), rtol=0.05, atol=0.05)


def test_autocast_leaves_float64_alone():
    """As torch's autocast and custom_fwd do: an fp64 model under autocast keeps computing in fp64."""
    x, w, b, r = make_inputs(2, 5, 8, 4, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = glu_conv(x, w, b, r, backend="reference")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, glu_conv_ref(x, w, b, r), rtol=0, atol=0)


# ---- bad inputs: each names the argument, the expected and the actual -----------------------------------------

def _good():
    return make_inputs(2, 5, 3, 4, 3, dtype=torch.float32)


def test_bad_channels():
    x, w, b, r = _good()
    with pytest.raises(ValueError, match=r"weight has C_in = 3 .* x has C_in = 6"):
        glu_conv(torch.randn(2, 5, 6), w, b, r)


def test_bad_residual_shape():
    x, w, b, _ = _good()
    with pytest.raises(ValueError, match=r"residual must have shape \(B, T, C_out\) = \(2, 5, 4\), got \(2, 5, 3\)"):
        glu_conv(x, w, b, torch.randn(2, 5, 3))


def test_bad_bias_shape():
    x, w, _, r = _good()
    with pytest.raises(ValueError, match=r"bias must have shape \(2\*C_out,\) = \(8,\), got \(4,\)"):
        glu_conv(x, w, torch.randn(4), r)


def test_odd_glu_width():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="2\\*C_out"):
        glu_conv(x, torch.randn(3, 3, 7))


def test_wrong_rank():
    _, w, b, r = _good()
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(5, 3\)"):
        glu_conv(torch.randn(5, 3), w, b, r)


def test_integer_input():
    _, w, b, r = _good()
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        glu_conv(torch.ones(2, 5, 3, dtype=torch.long), w, b, r)


def test_mixed_dtypes():
    x, w, b, r = _good()
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        glu_conv(x, w.double(), b, r)


def test_mixed_devices():
    x, w, b, r = _good()
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        glu_conv(x, w, b.to("meta"), r)


def test_not_a_tensor():
    _, w, b, r = _good()
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        glu_conv([[1.0]], w, b, r)


def test_empty_time():
    _, w, b, _ = _good()
    with pytest.raises(ValueError, match="at least one time step"):
        glu_conv(torch.randn(2, 0, 3), w, b)
