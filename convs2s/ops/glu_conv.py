"""glu_conv: 1-D convolution over time + GLU + optional scaled residual, in (B, T, C) layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import autocast_inputs, check_same, check_shape, check_tensor

SQRT_HALF = math.sqrt(0.5)

_DOC = """
    x        (B, T, C_in)
    weight   (k, C_in, 2*C_out)   "TBC" layout: h[t] = sum_j x[t + j - pad_left] @ weight[j]
    bias     (2*C_out,) or None
    residual (B, T, C_out) or None
    causal   False: (k-1)//2 zeros on the left and k//2 on the right (symmetric for odd k, fairseq's convention
                    for even k; the encoder);
             True:  k-1 zeros on the left (the decoder: output t sees inputs <= t only)
    h = conv(x) + bias                                   (B, T, 2*C_out)
    g = h[..., :C_out] * sigmoid(h[..., C_out:])         (torch.nn.functional.glu convention)
    returns (g + residual) * sqrt(0.5) if residual is given, else g       (B, T, C_out)
    B = 0 gives an empty (0, T, C_out) result (and zero weight and bias gradients); T, C_in and C_out must be >= 1.
"""


def padding(kernel_size: int, causal: bool) -> tuple[int, int]:
    """(left, right) zero padding along T for a kernel of width `kernel_size`."""
    if causal:
        return kernel_size - 1, 0
    return (kernel_size - 1) // 2, kernel_size // 2


def _validate(x, weight, bias, residual):
    check_tensor("x", x, 3)
    check_tensor("weight", weight, 3)
    B, T, c_in = x.shape
    k, w_in, c2 = weight.shape
    if k < 1:
        raise ValueError("weight must have kernel width k >= 1 in dim 0 of (k, C_in, 2*C_out), got "
                         f"{tuple(weight.shape)}")
    if w_in != c_in:
        raise ValueError(f"weight has C_in = {w_in} (dim 1 of (k, C_in, 2*C_out) = {tuple(weight.shape)}) but x "
                         f"has C_in = {c_in} (dim 2 of (B, T, C_in) = {tuple(x.shape)})")
    if c2 % 2 != 0 or c2 == 0:
        raise ValueError(f"weight's last dimension must be 2*C_out (even, > 0) for the GLU, got {c2}")
    if T < 1:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)}")
    if c_in < 1:
        raise ValueError(f"x must have at least one input channel (C_in >= 1), got shape {tuple(x.shape)}")
    c_out = c2 // 2
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_shape("bias", bias, (c2,), "(2*C_out,)")
    if residual is not None:
        check_tensor("residual", residual, 3)
        check_shape("residual", residual, (B, T, c_out), "(B, T, C_out)")
    check_same("x", x, weight=weight, bias=bias, residual=residual)


def glu_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
    # The PyTorch reference: one matrix product per tap on shifted views (fairseq's ConvTBC does the same).
    k = weight.shape[0]
    T = x.shape[1]
    pad_l, pad_r = padding(k, causal)
    xp = F.pad(x, (0, 0, pad_l, pad_r))                         # (B, T + k - 1, C_in)
    h = xp[:, 0:T] @ weight[0]                                  # (B, T, 2*C_out)
    for j in range(1, k):
        h = h + xp[:, j:j + T] @ weight[j]
    if bias is not None:
        h = h + bias
    g = F.glu(h, dim=-1)                                        # (B, T, C_out)
    if residual is not None:
        g = (g + residual) * SQRT_HALF
    return g


glu_conv_ref.__doc__ = "PyTorch reference for glu_conv (autograd through plain ops).\n" + _DOC


@_backend.register("glu_conv", "reference")
def _glu_conv_reference(x, weight, bias, residual, causal):
    return glu_conv_ref(x, weight, bias, residual, causal=causal)


def glu_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, *, causal: bool = False,
             backend: str = "auto") -> torch.Tensor:
    # Cast first: under autocast a model hands bf16 activations with fp32 weights, one dtype once cast.
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    _validate(x, weight, bias, residual)
    _, fn = _backend.resolve("glu_conv", backend, x.device)
    return fn(x, weight, bias, residual, causal)


glu_conv.__doc__ = ("Fused GLU convolution block; `backend` is 'auto' | 'reference' | 'triton' | 'native'.\n"
                    + _DOC)


def conv1d_weight_to_tbc(weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d weight (2*C_out, C_in, k) -> TBC weight (k, C_in, 2*C_out) (a contiguous copy)."""
    if weight.dim() != 3:
        raise ValueError(f"weight must be (2*C_out, C_in, k), got shape {tuple(weight.shape)}")
    return weight.permute(2, 1, 0).contiguous()


def tbc_weight_to_conv1d(weight: torch.Tensor) -> torch.Tensor:
    """TBC weight (k, C_in, 2*C_out) -> nn.Conv1d weight (2*C_out, C_in, k) (a contiguous copy)."""
    if weight.dim() != 3:
        raise ValueError(f"weight must be (k, C_in, 2*C_out), got shape {tuple(weight.shape)}")
    return weight.permute(2, 1, 0).contiguous()
