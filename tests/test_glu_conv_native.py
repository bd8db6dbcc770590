"""glu_conv on the native backend (the compiled extension's CPU and CUDA kernels) against the PyTorch reference.

Values and gradients: fp64 gradcheck; fp32/bf16 grids (odd channel counts, T = 1, T < k, even and odd k, causal
and not, optional bias/residual, non-contiguous inputs and output gradients) under the tolerance rule of
tests/tolerance.py; torch.library.opcheck on both ops; torch.compile(fullgraph=True); bad inputs reaching the C++
checks directly. CUDA cases skip without a GPU.
"""

import math

import pytest
import torch

from convs2s.ops import available_backends, glu_conv, glu_conv_ref
from tests.tolerance import assert_close_rule

_WHY = available_backends("cpu")["native"]
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"native backend unavailable: {_WHY}")
if _WHY is None:
    import convs2s.ops._native_glu_conv  # noqa: F401  (fake and autograd registrations of the ops used directly)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def native(x, w, b, r, causal):
    return glu_conv(x, w, b, r, causal=causal, backend="native")


def reference(x, w, b, r, causal):
    return glu_conv_ref(x, w, b, r, causal=causal)


def make_inputs(B, T, c_in, c_out, k, *, bias=True, residual=True, device="cpu"):
    """fp64 inputs (x, weight, bias or None, residual or None)."""
    x = torch.randn(B, T, c_in, dtype=torch.float64, device=device)
    w = torch.randn(k, c_in, 2 * c_out, dtype=torch.float64, device=device) / math.sqrt(k * c_in)
    b = torch.randn(2 * c_out, dtype=torch.float64, device=device) if bias else None
    r = torch.randn(B, T, c_out, dtype=torch.float64, device=device) if residual else None
    return x, w, b, r


def strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose last dimension has stride 2 (every other element of a larger buffer)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def leaves(tensors, dtype, contiguous=True):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(dtype)
        out.append((t.clone() if contiguous else strided(t)).requires_grad_())
    return out


def run(fn, inputs, grad_y, causal):
    y = fn(*inputs, causal)
    grads = torch.autograd.grad(y, [t for t in inputs if t is not None], grad_y)
    return y, grads


def compare(B, T, c_in, c_out, k, causal, dtype, device, *, bias=True, residual=True, contiguous=True):
    """Output and every input gradient of the native op under the tolerance rule (fp64 and same-dtype reference)."""
    base = make_inputs(B, T, c_in, c_out, k, bias=bias, residual=residual, device=device)
    grad_y = torch.randn(B, c_out, T, dtype=torch.float64, device=device).transpose(1, 2)  # non-contiguous
    y64, g64 = run(reference, leaves(base, torch.float64), grad_y, causal)
    y_lp, g_lp = run(reference, leaves(base, dtype), grad_y.to(dtype), causal)
    inputs = leaves(base, dtype, contiguous)
    if not contiguous:
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    y, g = run(native, inputs, grad_y.to(dtype), causal)
    assert y.dtype == dtype and y.shape == (B, T, c_out) and y.device.type == device
    assert_close_rule("y", y, y_lp, y64, dtype)
    names = [n for n, t in zip(("grad_x", "grad_w", "grad_b", "grad_res"), base) if t is not None]
    for name, a, lp, r64 in zip(names, g, g_lp, g64):
        assert a.shape == r64.shape, name
        assert_close_rule(name, a, lp, r64, dtype)


# ---- values and gradients ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 2, 6])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False), (False, True)])
def test_gradcheck_fp64(device, causal, k, T, bias, residual):
    inputs = leaves(make_inputs(2, T, 3, 2, k, bias=bias, residual=residual, device=device), torch.float64)
    inputs = [t for t in inputs if t is not None]
    def fn(*a):
        it = iter(a)
        return native(next(it), next(it), next(it) if bias else None, next(it) if residual else None, causal)
    def ref(*a):
        it = iter(a)
        return reference(next(it), next(it), next(it) if bias else None, next(it) if residual else None, causal)
    torch.testing.assert_close(fn(*inputs), ref(*inputs), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 3, 4, 7])
@pytest.mark.parametrize("T", [1, 2, 5, 37])
def test_grid(device, dtype, causal, k, T):
    compare(3, T, 13, 11, k, causal, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (False, True)])
def test_optional_inputs(device, dtype, bias, residual):
    compare(2, 9, 6, 5, 3, True, dtype, device, bias=bias, residual=residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(device, dtype, causal):
    compare(3, 10, 7, 6, 3, causal, dtype, device, contiguous=False)


@pytest.mark.parametrize("device", DEVICES)
def test_larger_shape(device):
    # Many rows per thread and channels beyond one vector width; T much larger than k.
    compare(4, 130, 96, 80, 5, True, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_half(device):
    compare(2, 9, 8, 6, 3, False, torch.float16, device)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_gradients(device):
    # Only the weight needs a gradient (x frozen, e.g. a frozen embedding): the backward skips the others.
    x, w, b, r = make_inputs(2, 7, 5, 4, 3, device=device)
    w = w.requires_grad_()
    (gw,) = torch.autograd.grad(native(x, w, b, r, True).sum(), [w])
    (gw_ref,) = torch.autograd.grad(reference(x, w, b, r, True).sum(), [w])
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)


def test_auto_picks_native_on_cpu():
    x, w, b, r = make_inputs(2, 5, 3, 4, 3)
    torch.testing.assert_close(glu_conv(x, w, b, r, causal=True), native(x, w, b, r, True), rtol=0, atol=0)


def test_causal_output_ignores_the_future():
    x, w, b, _ = make_inputs(2, 9, 4, 3, 3, residual=False)
    y = native(x, w, b, None, True)
    x2 = x.clone()
    x2[:, 5:] = torch.randn_like(x2[:, 5:])
    torch.testing.assert_close(native(x2, w, b, None, True)[:, :5], y[:, :5], rtol=0, atol=0)


# ---- op registration: opcheck, torch.compile ---------------------------------------------------------------------

@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(bias, residual, causal):
    x, w, b, r = leaves(make_inputs(2, 5, 3, 4, 3, bias=bias, residual=residual), torch.float32)
    torch.library.opcheck(torch.ops.convs2s.glu_conv_native_fwd.default, (x, w, b, r, causal))
    y, h = torch.ops.convs2s.glu_conv_native_fwd(x, w, b, r, causal)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.convs2s.glu_conv_native_bwd.default,
                          (gy, x.detach(), w.detach(), None if b is None else b.detach(), h.detach(),
                           residual, causal, [True, True, bias, residual]))


def test_torch_compile_fullgraph():
    x, w, b, r = leaves(make_inputs(2, 6, 4, 3, 3), torch.float32)
    compiled = torch.compile(lambda *a: native(*a, True).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b, r)
    grads = torch.autograd.grad(loss, [x, w, b, r])
    loss_ref = reference(x, w, b, r, True).square().sum()
    grads_ref = torch.autograd.grad(loss_ref, [x, w, b, r])
    torch.testing.assert_close(loss, loss_ref)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e)


# ---- bad inputs reaching the C++ checks (the public op's Python checks are bypassed) -----------------------------

def _fwd(x, w, b=None, r=None, causal=False):
    return torch.ops.convs2s.glu_conv_native_fwd(x, w, b, r, causal)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(5, 3), torch.randn(3, 3, 8)), r"x must be \(B, T, C_in\), got shape \[5, 3\]"),
    ((torch.randn(2, 5, 3), torch.randn(3, 8)), r"weight must be \(k, C_in, 2\*C_out\), got shape \[3, 8\]"),
    ((torch.randn(2, 5, 6), torch.randn(3, 3, 8)), r"weight has C_in = 3 .* x has C_in = 6"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 7)), r"2\*C_out \(even, > 0\) for the GLU, got 7"),
    ((torch.randn(2, 0, 3), torch.randn(3, 3, 8)), r"at least one time step"),
    ((torch.randn(2, 5, 3), torch.randn(0, 3, 8)), r"kernel width k >= 1"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8).double()), r"weight has dtype Double but x has dtype Float"),
    ((torch.ones(2, 5, 3, dtype=torch.long), torch.ones(3, 3, 8, dtype=torch.long)), r"floating-point"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), torch.randn(4)), r"bias must be \(2\*C_out,\) = \(8,\)"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), None, torch.randn(2, 5, 3)),
     r"residual must be \(B, T, C_out\) = \(2, 5, 4\), got shape \[2, 5, 3\]"),
    ((torch.randn(2, 5, 3), torch.randn(3, 3, 8), torch.randn(8).half()), r"bias must have x's dtype"),
])
def test_bad_inputs_reach_cpp_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        _fwd(*args)


def test_bad_saved_tensor_in_backward():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 3, 8)
    with pytest.raises(RuntimeError, match=r"h must be the contiguous \(B\*T, 2\*C_out\) = \(10, 8\) tensor saved"):
        torch.ops.convs2s.glu_conv_native_bwd(torch.randn(2, 5, 4), x, w, None, torch.randn(12, 8), False, False,
                                              [True, True, False, False])
    with pytest.raises(RuntimeError, match=r"grad_y must be \(B, T, C_out\) = \(2, 5, 4\)"):
        torch.ops.convs2s.glu_conv_native_bwd(torch.randn(2, 5, 3), x, w, None, torch.randn(10, 8), False, False,
                                              [True, True, False, False])


@CUDA
def test_mixed_devices_reach_cpp_checks():
    with pytest.raises(RuntimeError, match=r"weight is on cuda:0 but x is on cpu"):
        _fwd(torch.randn(2, 5, 3), torch.randn(3, 3, 8, device="cuda"))
