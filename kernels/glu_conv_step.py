"""Triton kernels for glu_conv_step (convs2s.ops.glu_conv_step): one decoding step of a causal glu_conv.

Notation: B rows (sentences or beams), k taps, C_in, C_out; weight (k, C_in, 2*C_out) in TBC layout; conv_state
(B, k-1, C_in) contiguous, the last k-1 inputs of each row, oldest first.

    step   h = [state[b, 0], ..., state[b, k-2], x[b]] @ W.view(k*C_in, 2*C_out) + bias    (B, 2*C_out)
           y = a * sigmoid(g) [+ residual, * sqrt(0.5)]           a, g = h[:, :C_out], h[:, C_out:]
    shift  state[b] <- [state[b, 1], ..., state[b, k-2], x[b]]

_step_kernel is one GEMM with K = k*C_in whose A operand is read in place: the state row (k-1)*C_in contiguous
elements, then x[b]; no window is materialised. It tiles B x C_out with both GLU halves per program (two
accumulators), so the GLU is local, as kernels/glu_conv.py's forward does. The shift is a second launch
(_shift_kernel): the step's programs along C_out all read the same state rows, so none may overwrite them before
all have run.

Offsets are int64 where they scale with B or with a stride.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET, autotune_configs

_SQRT_HALF = tl.constexpr(0.7071067811865476)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# GPU autotune candidates, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N counts channels of each GLU
# half. Decoding has few rows (B = beams x sentences, 1 to a few hundred), so the tiles are short in M and the
# narrower N tiles give more programs to fill the GPU. tl.dot tiles are >= 16 in every dimension.
STEP_CONFIGS = [_config(16, 64, 64, 4, 3), _config(16, 32, 128, 4, 3), _config(32, 64, 64, 4, 3),
                _config(64, 64, 64, 4, 3), _config(64, 128, 32, 8, 3)]
# The single config (interpreter, CONVS2S_TRITON_AUTOTUNE=0).
ONE_CONFIG = _config(16, 64, 64, 4, 1 if INTERPRET else 2)
# The shift: one row per program, BLOCK_C channels of each of its k-1 slots.
SHIFT_BLOCK_C = 256


@triton.jit
def _accumulate(acc_a, acc_g, a, w_ptr, w_off, k_ok, offs_n, n_ok, C_out, stride_wn,
                DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc_a += a @ W[rows, :C_out] tile, acc_g += a @ W[rows, C_out:] tile; w_off (BLOCK_K,) int64 row offsets.

    DOT_FP32 upcasts the operands: the interpreter's bf16 tl.dot multiplies raw bit patterns."""
    w_ptrs = w_ptr + w_off[:, None] + offs_n[None, :] * stride_wn
    w_mask = k_ok[:, None] & n_ok[None, :]
    wa = tl.load(w_ptrs, mask=w_mask, other=0.0)
    wg = tl.load(w_ptrs + C_out * stride_wn, mask=w_mask, other=0.0)
    if DOT_FP32:
        a = a.to(tl.float32)
        wa = wa.to(tl.float32)
        wg = wg.to(tl.float32)
    acc_a = tl.dot(a, wa, acc_a, input_precision=INPUT_PRECISION)
    acc_g = tl.dot(a, wg, acc_g, input_precision=INPUT_PRECISION)
    return acc_a, acc_g


@triton.autotune(
    configs=autotune_configs(STEP_CONFIGS, ONE_CONFIG),
    key=["C_in", "C_out", "KSIZE", "B_BUCKET"],
)
@triton.jit
def _step_kernel(
    # pointers
    x_ptr, state_ptr, w_ptr, bias_ptr, res_ptr, y_ptr,
    # dimensions
    B, C_in, C_out, B_BUCKET,
    # strides (x, weight, bias, residual may be any views; state (B, k-1, C_in) and y (B, C_out) are contiguous)
    stride_xb, stride_xc,
    stride_wk, stride_wc, stride_wn,
    stride_bn, stride_rb, stride_rc,
    # meta-parameters
    KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < B
    n_ok = offs_n < C_out
    rows = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Taps 0..k-2 from the state: its row is (k-1)*C_in contiguous elements, weight rows r = j*C_in + c.
    K_STATE = (KSIZE - 1) * C_in
    for k0 in range(0, K_STATE, BLOCK_K):
        offs_r = k0 + offs_k
        r_ok = offs_r < K_STATE
        a = tl.load(state_ptr + rows[:, None] * K_STATE + offs_r.to(tl.int64)[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        j = offs_r // C_in
        w_off = j.to(tl.int64) * stride_wk + (offs_r - j * C_in).to(tl.int64) * stride_wc
        acc_a, acc_g = _accumulate(acc_a, acc_g, a, w_ptr, w_off, r_ok, offs_n64, n_ok, C_out, stride_wn,
                                   DOT_FP32, INPUT_PRECISION)
    # Tap k-1: the new input x.
    for k0 in range(0, C_in, BLOCK_K):
        offs_c = k0 + offs_k
        c_ok = offs_c < C_in
        offs_c64 = offs_c.to(tl.int64)
        a = tl.load(x_ptr + rows[:, None] * stride_xb + offs_c64[None, :] * stride_xc,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        w_off = (offs_c64 * 0 + (KSIZE - 1)) * stride_wk + offs_c64 * stride_wc     # int64 tap offset
        acc_a, acc_g = _accumulate(acc_a, acc_g, a, w_ptr, w_off, c_ok, offs_n64, n_ok, C_out, stride_wn,
                                   DOT_FP32, INPUT_PRECISION)

    if HAS_BIAS:
        b_ptrs = bias_ptr + offs_n64 * stride_bn
        acc_a += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptrs + C_out * stride_bn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    y = acc_a * tl.sigmoid(acc_g)
    if HAS_RES:
        r_ptrs = res_ptr + rows[:, None] * stride_rb + offs_n64[None, :] * stride_rc
        y = (y + tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)) * _SQRT_HALF
    tl.store(y_ptr + rows[:, None] * C_out + offs_n64[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _shift_kernel(
    # pointers
    x_ptr, state_ptr,
    # dimensions
    C_in,
    # strides (state (B, k-1, C_in) is contiguous)
    stride_xb, stride_xc,
    # meta-parameters
    KSIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One row b, BLOCK_C channels: slot j <- slot j+1 in increasing j (each element is read before it is
    # overwritten, by the same program), then the last slot <- x[b].
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_in
    base = state_ptr + row * (KSIZE - 1) * C_in + offs_c
    for j in tl.static_range(KSIZE - 2):
        tl.store(base + j * C_in, tl.load(base + (j + 1) * C_in, mask=c_ok), mask=c_ok)
    xv = tl.load(x_ptr + row * stride_xb + offs_c.to(tl.int64) * stride_xc, mask=c_ok)
    tl.store(base + (KSIZE - 2) * C_in, xv, mask=c_ok)


def _dot_args(dtype) -> dict:
    import torch
    # fp32 follows torch's own matmul setting (tf32 only when allowed), so the backend matches torch's numerics.
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype != torch.float32:
        precision = "tf32"                      # ignored for 16-bit operands; the default everywhere
    return {"DOT_FP32": INTERPRET and dtype == torch.bfloat16, "INPUT_PRECISION": precision}


def glu_conv_step(x, state, weight, bias=None, residual=None):
    """x (B, C_in), state (B, k-1, C_in) contiguous, weight (k, C_in, 2*C_out), bias (2*C_out,) | None,
    residual (B, C_out) | None; x, weight, bias, residual any strides.

    Returns y (B, C_out) contiguous; shifts `state` in place (the last k-1 inputs including x). Launches on the
    current CUDA device (the binding sets it to x's).
    """
    import torch
    B, C_in = x.shape
    k, w_in, c2 = weight.shape
    C_out = c2 // 2
    assert w_in == C_in and c2 % 2 == 0 and tuple(state.shape) == (B, k - 1, C_in) and state.is_contiguous()
    assert bias is None or tuple(bias.shape) == (c2,)
    assert residual is None or tuple(residual.shape) == (B, C_out)
    y = torch.empty(B, C_out, device=x.device, dtype=x.dtype)
    if B == 0:                                  # nothing to compute or shift
        return y
    res_strides = residual.stride() if residual is not None else (0, 0)
    # k = 1: the state is an empty (B, 0, C_in) tensor, never read; x stands in for its pointer.
    grid = lambda META: (triton.cdiv(B, META["BLOCK_M"]), triton.cdiv(C_out, META["BLOCK_N"]))  # noqa: E731
    _step_kernel[grid](
        x, state if k > 1 else x, weight, bias if bias is not None else x, residual if residual is not None else x, y,
        B, C_in, C_out, triton.next_power_of_2(B),
        *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0, *res_strides,
        KSIZE=k, HAS_BIAS=bias is not None, HAS_RES=residual is not None, **_dot_args(x.dtype),
    )
    if k > 1:
        _shift_kernel[(B, triton.cdiv(C_in, SHIFT_BLOCK_C))](
            x, state, C_in, *x.stride(), KSIZE=k, BLOCK_C=SHIFT_BLOCK_C, num_warps=4,
        )
    return y
