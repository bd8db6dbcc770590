"""glu_conv_step: one decoding step of a causal glu_conv, with a rolling window of the last k-1 inputs per row."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import autocast_inputs, check_same, check_shape, check_tensor

SQRT_HALF = math.sqrt(0.5)

_DOC = """
    x          (B, C_in)          the newest input of each row (sentence or beam)
    conv_state (B, k-1, C_in)     the row's last k-1 inputs, oldest first (zeros at the start = the causal left
                                  padding); UPDATED IN PLACE: becomes the last k-1 inputs including x.
                                  For k == 1 it is a (B, 0, C_in) tensor (None also accepted for k == 1).
    weight     (k, C_in, 2*C_out) TBC layout, as glu_conv
    bias       (2*C_out,) or None
    residual   (B, C_out) or None
    window = cat(conv_state, x[:, None])                   (B, k, C_in)
    h = sum_j window[:, j] @ weight[j] + bias              (B, 2*C_out)
    g = h[:, :C_out] * sigmoid(h[:, C_out:])
    returns (g + residual) * sqrt(0.5) if residual is given, else g          (B, C_out)

    Equal to the last time step of glu_conv(..., causal=True) over the whole prefix. An inference op: no autograd
    (an input requiring grad under grad mode is refused). x, conv_state, weight, bias, residual share one dtype and
    device; conv_state must be contiguous. B = 0 gives an empty (0, C_out) result; C_in and C_out must be >= 1.
    Under autocast x, weight, bias, residual are cast as glu_conv casts them; conv_state is not (it is written in
    place), so its owner keeps it in the autocast dtype.
"""


def _validate(x, conv_state, weight, bias, residual) -> torch.Tensor:
    """Checks the inputs against the contract; returns conv_state ((B, 0, C_in) for a None with k == 1)."""
    check_tensor("x", x, 2)
    check_tensor("weight", weight, 3)
    B, c_in = x.shape
    k, w_in, c2 = weight.shape
    if k < 1:
        raise ValueError(f"weight must have kernel width k >= 1 in dim 0 of (k, C_in, 2*C_out), "
                         f"got {tuple(weight.shape)}")
    if w_in != c_in:
        raise ValueError(f"weight has C_in = {w_in} (dim 1 of (k, C_in, 2*C_out) = {tuple(weight.shape)}) but x "
                         f"has C_in = {c_in} (dim 1 of (B, C_in) = {tuple(x.shape)})")
    if c_in == 0:
        raise ValueError(f"x must have C_in >= 1 channels, got shape {tuple(x.shape)}")
    if c2 % 2 != 0 or c2 == 0:
        raise ValueError(f"weight's last dimension must be 2*C_out (even, > 0) for the GLU, got {c2}")
    c_out = c2 // 2
    if conv_state is None:
        if k != 1:
            raise ValueError(f"conv_state is None but the kernel width is k = {k}: pass the (B, k-1, C_in) = "
                             f"({B}, {k - 1}, {c_in}) window of each row's last k-1 inputs (zeros at the start)")
        conv_state = x.new_empty(B, 0, c_in)
    elif not (isinstance(conv_state, torch.Tensor) and conv_state.shape == (B, k - 1, c_in)):
        # A call per layer per decoded token: the full checks (and their messages) only when the quick one fails;
        # the dtypes (hence floating point) are compared by check_same below.
        check_tensor("conv_state", conv_state, 3)
        check_shape("conv_state", conv_state, (B, k - 1, c_in), "(B, k-1, C_in)")
    if not conv_state.is_contiguous():
        raise ValueError(f"conv_state must be contiguous (it is updated in place), got strides "
                         f"{conv_state.stride()} for shape {tuple(conv_state.shape)}")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.shape == (c2,)):
        check_tensor("bias", bias, 1)
        check_shape("bias", bias, (c2,), "(2*C_out,)")
    if residual is not None and not (isinstance(residual, torch.Tensor) and residual.shape == (B, c_out)):
        check_tensor("residual", residual, 2)
        check_shape("residual", residual, (B, c_out), "(B, C_out)")
    check_same("x", x, conv_state=conv_state, weight=weight, bias=bias, residual=residual)
    return conv_state


def _check_no_grad(**tensors) -> None:
    if not torch.is_grad_enabled():
        return
    wanting = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if wanting:
        raise RuntimeError(f"glu_conv_step is an inference op without autograd, but {', '.join(wanting)} "
                           "require(s) grad: call it under torch.no_grad() or torch.inference_mode(), or detach "
                           "the inputs (training runs glu_conv over the whole sequence)")


def glu_conv_step_ref(x: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    # The PyTorch reference: one (B, k*C_in) @ (k*C_in, 2*C_out) product on the concatenated window.
    k, c_in, c2 = weight.shape
    B = x.shape[0]
    window = x[:, None] if k == 1 else torch.cat([conv_state, x[:, None]], dim=1)     # (B, k, C_in)
    w = weight.reshape(k * c_in, c2)
    xw = window.reshape(B, k * c_in)
    h = xw @ w if bias is None else torch.addmm(bias, xw, w)                            # (B, 2*C_out)
    g = F.glu(h, dim=-1)                                                                # (B, C_out)
    if residual is not None:
        g = (g + residual) * SQRT_HALF
    if k > 1:
        conv_state.copy_(window[:, 1:])                                                 # (B, k-1, C_in)
    return g


glu_conv_step_ref.__doc__ = "PyTorch reference for glu_conv_step (plain ops; conv_state updated in place).\n" + _DOC


@_backend.register("glu_conv_step", "reference")
def _glu_conv_step_reference(x, conv_state, weight, bias, residual):
    return glu_conv_step_ref(x, conv_state, weight, bias, residual)


def glu_conv_step(x: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    conv_state = _validate(x, conv_state, weight, bias, residual)
    _check_no_grad(x=x, conv_state=conv_state, weight=weight, bias=bias, residual=residual)
    _, fn = _backend.resolve("glu_conv_step", backend, x.device)
    return fn(x, conv_state, weight, bias, residual)


glu_conv_step.__doc__ = ("One decoding step of the fused GLU convolution block (causal); `backend` is 'auto' | "
                         "'reference' | 'triton' | 'native'.\n" + _DOC)
