"""Triton kernels for glu_conv (convs2s.ops.glu_conv): implicit-GEMM convolution over time with the GLU fused.

Notation: M = B*T positions (rows), k taps, C_in, C_out; weight (k, C_in, 2*C_out) in TBC layout;
pad_l = (k-1)//2 (encoder) or k-1 (causal decoder); x_j[m] = x[b, t + j - pad_l] (zero outside [0, T)).

    forward   h = sum_j x_j @ W[j] + bias                      (M, 2*C_out)
              y = a * sigmoid(g) [+ residual, * sqrt(0.5)]      a, g = h[:, :C_out], h[:, C_out:]
    backward  dh = GLU'(h) * dy                                 (M, 2*C_out)   _glu_bwd_kernel (+ db, dresidual)
              dx[s] = sum_j dh[s + pad_l - j] @ W[j]^T          (M, C_in)      _dx_kernel (flipped taps)
              dW[j] = sum_m x_j[m]^T dh[m]                      (C_in, 2*C_out) _dw_kernel (split over M)

Why the forward saves h (the pre-GLU activation) instead of recomputing it in backward, measured (H200, bf16,
GPU time from CUDA-graph replays, bench/bench_glu_conv.py --recompute): recomputing is one more implicit GEMM
with the forward's FLOPs; it made forward+backward 14-28 % slower (B=16 T=512 C=512: 0.308 vs 0.265 ms;
C=1024: 0.977 vs 0.766 ms; B=64 T=32 C=512: 0.119 vs 0.104 ms) while saving 2*M*C_out elements per layer (the
forward's peak memory 8.4 vs 25.2 MB at B=16 T=512 C=512). Writing h costs the forward nothing measurable
(68.7 us with h, 66.4 us without). Both paths exist: `glu_conv_fwd(..., store_h=False)` + `glu_conv_bwd(...,
h=None)` recomputes (the binding's SAVE_PRE_GLU switch).

Why dh is materialised once instead of being recomputed inside the dx / dW GEMMs' operand loads: each GEMM
program would redo the sigmoid for its operand tile, i.e. C_in/BLOCK_N times per element per tap; at C_in = 512
that is ~100 M special-function ops for M = 8192, C_out = 512, k = 3 (~24 us at 16 SFU ops/clk/SM on 132 SMs),
more than the dx GEMM itself (~20 us). One elementwise pass costs ~10 us of HBM traffic and also yields db and
the residual gradient.

Determinism: no atomics. dW splits the M reduction into SPLIT chunks that write fp32 partials, summed by the
host in a fixed order; db partials per row block likewise.

Offsets are int64 where they scale with M (rows) or with a stride, so tensors beyond 2**31 elements work.

Where the time goes (H200, bf16, B=16 T=512 C=512->512 k=3, CUDA-graph replays, autotuned): forward 68.7 us
(375 TFLOP/s; one cuBLAS GEMM of the same FLOPs 39.5 us, 652 TFLOP/s); backward 193 us = GLU pass ~33 us +
dx ~54 us + dW ~106 us (243 TFLOP/s: the weakest kernel, with its split-M fp32 partials summed by torch).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._common import AUTOTUNE, INTERPRET, autotune_configs, cast_for_store

# CONVS2S_TRITON_DW=gemm: dW by k cuBLAS GEMMs over row-shifted views of x and dh (_dw_gemm) instead of
# _dw_kernel. Why a candidate: _dw_kernel ran at 243 TFLOP/s on the H200 where one cuBLAS GEMM of the same FLOPs
# reaches 652 (module docstring), so at B*T = 8192, C = 512, k = 3 the GEMMs would take ~40 us of its ~106 us.
# Not yet timed on a GPU (bench_glu_conv's triton-dwgemm rows measure it), hence not the default.
DW_IMPL = os.environ.get("CONVS2S_TRITON_DW", "kernel")
if DW_IMPL not in ("kernel", "gemm"):
    raise ValueError(f"CONVS2S_TRITON_DW={DW_IMPL!r}: expected 'kernel' or 'gemm'")

_SQRT_HALF = tl.constexpr(0.7071067811865476)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# GPU autotune candidates, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). tl.dot tiles are >= 16 in every
# dimension (NVIDIA's minimum). Configs that overflow shared memory (fp32 with deep pipelines) are skipped by the
# autotuner. The forward's BLOCK_N counts channels of each GLU half: its tile is BLOCK_M x 2*BLOCK_N.
# Every config compiles for sm_90 without register spills (Triton 3.8's ptxas, bf16, contiguous 512 channels;
# tests/ops/test_glu_conv.py checks it). The forward's two fp32 accumulators take 2*BLOCK_M*BLOCK_N/threads registers
# per thread: (128, 64) on 4 warps (128 of them) spilled 72-104 bytes per thread, as did (128, 128) and (256, 64) on
# 8 warps; (128, 64) on 8 warps uses 128 registers, (64, 128) on 4 warps 255 without spilling.
FWD_CONFIGS = [_config(128, 64, 64, 8, 3), _config(64, 128, 64, 4, 3), _config(64, 64, 64, 4, 4),
               _config(128, 32, 64, 4, 4)]
DX_CONFIGS = [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4),
              _config(128, 256, 64, 8, 3)]
DW_CONFIGS = [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4),
              _config(128, 128, 32, 4, 4)]
# The single config when not autotuning (_common.AUTOTUNE): in the interpreter (64-wide tiles run ~3x faster there
# than 32-wide ones) and with CONVS2S_TRITON_AUTOTUNE=0 (2 stages: fits shared memory in fp32 too).
ONE_CONFIG = _config(64, 64, 64, 4, 1 if INTERPRET else 2)


@triton.jit
def _mma(acc, a, b, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += a @ b. DOT_FP32 upcasts the operands: the interpreter's bf16 tl.dot multiplies raw bit patterns."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) from a 1-D grid, grouped along M so that programs running together share weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------------------------
# forward: y = GLU(conv(x) + bias) [+ residual, * sqrt(0.5)], optionally storing h = conv(x) + bias
# ----------------------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=autotune_configs(FWD_CONFIGS, ONE_CONFIG),
    key=["C_in", "C_out", "KSIZE", "M_BUCKET"],
)
@triton.jit
def _fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, h_ptr,
    # dimensions
    M, T, C_in, C_out, M_BUCKET,
    # strides (x, weight, residual may be any views; y (M, C_out) and h (M, 2*C_out) are contiguous)
    stride_xb, stride_xt, stride_xc,
    stride_wk, stride_wc, stride_wn,
    stride_rb, stride_rt, stride_rc,
    # meta-parameters
    KSIZE: tl.constexpr, PAD_L: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STORE_Y: tl.constexpr, STORE_H: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    # One program: BLOCK_M rows x BLOCK_N channels of BOTH GLU halves (two accumulators), so the GLU is local.
    pid_m, pid_n = _tile_ids(M, C_out, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    b = (offs_m // T).to(tl.int64)
    t = offs_m % T
    offs_n64 = offs_n.to(tl.int64)

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, C_in block) so the software pipeliner sees all k * ceil(C_in / BLOCK_K) steps.
    num_kb = tl.cdiv(C_in, BLOCK_K)
    for it in range(0, KSIZE * num_kb):
        j = it // num_kb
        offs_c = (it - j * num_kb) * BLOCK_K + offs_k
        c_ok = offs_c < C_in
        ts = t + j - PAD_L                      # input time step of tap j; the zero padding is this mask
        row_ok = m_ok & (ts >= 0) & (ts < T)
        x_ptrs = (x_ptr + b[:, None] * stride_xb + ts.to(tl.int64)[:, None] * stride_xt
                  + offs_c.to(tl.int64)[None, :] * stride_xc)
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w_ptrs = (w_ptr + j.to(tl.int64) * stride_wk + offs_c.to(tl.int64)[:, None] * stride_wc
                  + offs_n64[None, :] * stride_wn)
        w_mask = c_ok[:, None] & n_ok[None, :]
        wa = tl.load(w_ptrs, mask=w_mask, other=0.0)
        wg = tl.load(w_ptrs + C_out * stride_wn, mask=w_mask, other=0.0)
        acc_a = _mma(acc_a, xt, wa, DOT_FP32, INPUT_PRECISION)
        acc_g = _mma(acc_g, xt, wg, DOT_FP32, INPUT_PRECISION)

    if HAS_BIAS:
        acc_a += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bias_ptr + C_out + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)
    if STORE_H:
        h_ptrs = h_ptr + rows[:, None] * (2 * C_out) + offs_n64[None, :]
        tl.store(h_ptrs, cast_for_store(acc_a, h_ptr), mask=out_mask)
        tl.store(h_ptrs + C_out, cast_for_store(acc_g, h_ptr), mask=out_mask)
    if STORE_Y:
        y = acc_a * tl.sigmoid(acc_g)
        if HAS_RES:
            r_ptrs = (res_ptr + b[:, None] * stride_rb + t.to(tl.int64)[:, None] * stride_rt
                      + offs_n64[None, :] * stride_rc)
            y = (y + tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)) * _SQRT_HALF
        tl.store(y_ptr + rows[:, None] * C_out + offs_n64[None, :], cast_for_store(y, y_ptr), mask=out_mask)


# ----------------------------------------------------------------------------------------------------------------
# backward 1: dh = GLU'(h) * dy (one pass over dy and h), dresidual = dy * sqrt(0.5), per-row-block db partials
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _glu_bwd_kernel(
    # pointers
    dy_ptr, h_ptr, dh_ptr, dres_ptr, dbp_ptr,
    # dimensions
    M, T, C_out,
    # strides (dy may be any view; h, dh (M, 2*C_out), dres (M, C_out), dbp (cdiv(M, BLOCK_M), 2*C_out) contiguous)
    stride_dyb, stride_dyt, stride_dyc,
    # meta-parameters
    HAS_RES: tl.constexpr, STORE_DB: tl.constexpr, STORE_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = offs_m < M
    mask = m_ok[:, None] & (offs_n < C_out)[None, :]
    b = (offs_m // T).to(tl.int64)
    t = (offs_m % T).to(tl.int64)
    rows = offs_m.to(tl.int64)

    dy = tl.load(dy_ptr + b[:, None] * stride_dyb + t[:, None] * stride_dyt + offs_n[None, :] * stride_dyc,
                 mask=mask, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + rows[:, None] * (2 * C_out) + offs_n[None, :]
    a = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptrs + C_out, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        dy = dy * _SQRT_HALF                   # d/dg of (g + r) * sqrt(0.5); also the residual's gradient
        if STORE_DRES:
            tl.store(dres_ptr + rows[:, None] * C_out + offs_n[None, :], cast_for_store(dy, dres_ptr),
                     mask=mask)
    sig = tl.sigmoid(g)
    da = dy * sig
    dg = dy * a * sig * (1.0 - sig)
    dh_ptrs = dh_ptr + rows[:, None] * (2 * C_out) + offs_n[None, :]
    tl.store(dh_ptrs, cast_for_store(da, dh_ptr), mask=mask)
    tl.store(dh_ptrs + C_out, cast_for_store(dg, dh_ptr), mask=mask)
    if STORE_DB:
        # db from the fp32 dh (masked rows hold zeros); row blocks are summed on the host in a fixed order.
        dbp = dbp_ptr + pid_m.to(tl.int64) * (2 * C_out) + offs_n
        tl.store(dbp, tl.sum(da, axis=0), mask=offs_n < C_out)
        tl.store(dbp + C_out, tl.sum(dg, axis=0), mask=offs_n < C_out)


# ----------------------------------------------------------------------------------------------------------------
# backward 2: dx[s] = sum_j dh[s + pad_l - j] @ W[j]^T   (the transposed implicit GEMM: taps flipped)
# ----------------------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=autotune_configs(DX_CONFIGS, ONE_CONFIG),
    key=["C_in", "C_out", "KSIZE", "M_BUCKET"],
)
@triton.jit
def _dx_kernel(
    # pointers
    dh_ptr, w_ptr, dx_ptr,
    # dimensions
    M, T, C_in, C_out, M_BUCKET,
    # strides (dh (M, 2*C_out) and dx (M, C_in) are contiguous)
    stride_wk, stride_wc, stride_wn,
    # meta-parameters
    KSIZE: tl.constexpr, PAD_L: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    pid_m, pid_n = _tile_ids(M, C_in, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # input positions s
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)        # input channels
    offs_k = tl.arange(0, BLOCK_K)                          # over the 2*C_out channels of dh
    m_ok = offs_m < M
    c_ok = offs_c < C_in
    t = offs_m % T
    N2 = 2 * C_out

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_kb = tl.cdiv(N2, BLOCK_K)
    for it in range(0, KSIZE * num_kb):
        j = it // num_kb
        offs_n = (it - j * num_kb) * BLOCK_K + offs_k
        n_ok = offs_n < N2
        shift = PAD_L - j                                   # output step t = s + pad_l - j used input s at tap j
        row_ok = m_ok & (t + shift >= 0) & (t + shift < T)
        dh_ptrs = dh_ptr + (offs_m + shift).to(tl.int64)[:, None] * N2 + offs_n.to(tl.int64)[None, :]
        dh = tl.load(dh_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w_ptrs = (w_ptr + j.to(tl.int64) * stride_wk + offs_n.to(tl.int64)[:, None] * stride_wn
                  + offs_c.to(tl.int64)[None, :] * stride_wc)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & c_ok[None, :], other=0.0)      # W[j]^T tile (BLOCK_K, BLOCK_N)
        acc = _mma(acc, dh, wt, DOT_FP32, INPUT_PRECISION)

    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * C_in + offs_c.to(tl.int64)[None, :]
    tl.store(dx_ptrs, cast_for_store(acc, dx_ptr), mask=m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# backward 3: dW[j] = sum_m x_j[m]^T dh[m], the M reduction split into SPLIT chunks (partials summed on the host)
# ----------------------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=autotune_configs(DW_CONFIGS, ONE_CONFIG),
    key=["C_in", "C_out", "KSIZE", "M_BUCKET"],
)
@triton.jit
def _dw_kernel(
    # pointers
    x_ptr, dh_ptr, dw_ptr,
    # dimensions
    M, T, C_in, C_out, M_BUCKET, ROWS_PER_SPLIT,
    # strides (x any view; dh (M, 2*C_out) contiguous; dw: (SPLIT, k, C_in, 2*C_out) partials or (k, C_in, 2*C_out))
    stride_xb, stride_xt, stride_xc,
    stride_ds, stride_dk, stride_dc, stride_dn,
    # meta-parameters
    KSIZE: tl.constexpr, PAD_L: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    N2 = 2 * C_out
    pid_c, pid_n = _tile_ids(C_in, N2, BLOCK_M, BLOCK_N, GROUP_M)
    j = tl.program_id(1)
    split = tl.program_id(2)
    offs_c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)        # input channels (rows of dW[j])
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)        # 2*C_out channels (columns of dW[j])
    offs_k = tl.arange(0, BLOCK_K)                          # positions m (the reduction)
    c_ok = offs_c < C_in
    n_ok = offs_n < N2
    offs_c64 = offs_c.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    row_start = split * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        offs_r = r0 + offs_k
        b = (offs_r // T).to(tl.int64)
        ts = offs_r % T + j - PAD_L
        r_ok = (offs_r < row_end) & (ts >= 0) & (ts < T)
        x_ptrs = (x_ptr + b[None, :] * stride_xb + ts.to(tl.int64)[None, :] * stride_xt
                  + offs_c64[:, None] * stride_xc)
        xt = tl.load(x_ptrs, mask=c_ok[:, None] & r_ok[None, :], other=0.0)      # x_j^T tile (BLOCK_M, BLOCK_K)
        dh_ptrs = dh_ptr + offs_r.to(tl.int64)[:, None] * N2 + offs_n64[None, :]
        dh = tl.load(dh_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(acc, xt, dh, DOT_FP32, INPUT_PRECISION)

    dw_ptrs = (dw_ptr + split.to(tl.int64) * stride_ds + j.to(tl.int64) * stride_dk + offs_c64[:, None] * stride_dc
               + offs_n64[None, :] * stride_dn)
    tl.store(dw_ptrs, cast_for_store(acc, dw_ptr), mask=c_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# host launchers: check, allocate, launch
# ----------------------------------------------------------------------------------------------------------------

def _pad_left(k: int, causal: bool) -> int:
    return k - 1 if causal else (k - 1) // 2


def _dot_args(dtype) -> dict:
    import torch
    # fp32 follows torch's own matmul setting (tf32 only when allowed), so the backend matches torch's numerics.
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype != torch.float32:
        precision = "tf32"                      # ignored for 16-bit operands; the default everywhere
    return {"DOT_FP32": INTERPRET and dtype == torch.bfloat16, "INPUT_PRECISION": precision}


def _check(x, weight, bias, residual):
    B, T, C_in = x.shape
    k, w_in, c2 = weight.shape
    assert w_in == C_in and c2 % 2 == 0, (tuple(x.shape), tuple(weight.shape))
    assert bias is None or tuple(bias.shape) == (c2,)
    assert residual is None or tuple(residual.shape) == (B, T, c2 // 2)
    for t in (weight, bias, residual):
        assert t is None or (t.dtype == x.dtype and t.device == x.device)
    return B, T, C_in, c2 // 2, k


def glu_conv_fwd(x, weight, bias=None, residual=None, causal: bool = False, *, store_h: bool = True,
                 store_y: bool = True):
    """x (B, T, C_in), weight (k, C_in, 2*C_out), bias (2*C_out,) | None, residual (B, T, C_out) | None; any strides.

    Returns (y (B, T, C_out) or None, h (B, T, 2*C_out) or None): y if store_y, the pre-GLU activation
    h = conv(x) + bias (in x's dtype) if store_h. Both contiguous. Launches on the current CUDA device (the
    binding sets it to x's).
    """
    import torch
    B, T, C_in, C_out, k = _check(x, weight, bias, residual)
    M = B * T
    y = torch.empty(B, T, C_out, device=x.device, dtype=x.dtype) if store_y else None
    h = torch.empty(B, T, 2 * C_out, device=x.device, dtype=x.dtype) if store_h else None
    if M == 0:                                  # B = 0: empty outputs, nothing to launch
        return y, h
    if bias is not None:
        bias = bias.contiguous()                # the kernel reads bias at unit stride (2*C_out elements: no cost)
    res_strides = residual.stride() if residual is not None else (0, 0, 0)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(C_out, META["BLOCK_N"]),)  # noqa: E731
    _fwd_kernel[grid](
        x, weight, bias if bias is not None else x, residual if residual is not None else x,
        y if y is not None else x, h if h is not None else x,
        M, T, C_in, C_out, triton.next_power_of_2(M),
        *x.stride(), *weight.stride(), *res_strides,
        KSIZE=k, PAD_L=_pad_left(k, causal), HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        STORE_Y=store_y, STORE_H=store_h, **_dot_args(x.dtype),
    )
    return y, h


def _dw_split(M: int, C_in: int, C_out: int, k: int, device) -> int:
    """Rows of M per dW program: enough programs to fill the GPU twice over, each reducing >= 512 rows."""
    import torch
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    min_rows = 512 if device.type == "cuda" else 32     # small in the interpreter, so CPU tests run split > 1
    tiles = triton.cdiv(C_in, 128) * triton.cdiv(2 * C_out, 128) * k
    split = max(1, min(triton.cdiv(2 * n_sm, tiles), triton.cdiv(M, min_rows)))
    granule = 128 if AUTOTUNE else ONE_CONFIG.kwargs["BLOCK_K"]    # a multiple of BLOCK_K: splits align to blocks
    return triton.cdiv(triton.cdiv(M, split), granule) * granule


def _dw_gemm(x, dh, k: int, pad_l: int):
    """dW (k, C_in, 2*C_out) in x's dtype from x (B, T, C_in) any strides and dh (B, T, 2*C_out) contiguous.

    dW[j] = sum over (b, t) of x[b, t + s]^T dh[b, t], s = j - pad_l, x zero outside its sentence. Over the
    flattened rows m = b*T + t that is one GEMM of x rows [s, M) (or [0, M + s)) against dh rows shifted by s --
    contiguous slices, no im2col copy -- minus the (B - 1) * |s| products that pair rows of neighbouring sentences:
    for s > 0 the first s rows of sentences 1.. with the last s rows of dh of sentences ..B-2, for s < 0 the last
    |s| rows of x of sentences ..B-2 with the first |s| rows of dh of sentences 1... addmm subtracts them inside
    the GEMM's epilogue, so dW[j] is rounded to the output dtype once.
    """
    import torch
    B, T, C_in = x.shape
    N2 = dh.shape[2]
    M = B * T
    x2, dh2 = x.reshape(M, C_in), dh.view(M, N2)
    dw = torch.empty(k, C_in, N2, device=x.device, dtype=x.dtype)
    for j in range(k):
        s = j - pad_l
        if abs(s) >= T:                                     # the tap only ever reads padding
            dw[j].zero_()
            continue
        xs, ds = (x2[s:], dh2[:M - s]) if s >= 0 else (x2[:M + s], dh2[-s:])
        if s == 0 or B == 1:
            torch.mm(xs.t(), ds, out=dw[j])
            continue
        if s > 0:
            xa, da = x[1:, :s], dh[:-1, T - s:]
        else:
            xa, da = x[:-1, T + s:], dh[1:, :-s]
        cross = torch.mm(xa.reshape(-1, C_in).t(), da.reshape(-1, N2))
        torch.addmm(cross, xs.t(), ds, beta=-1, out=dw[j])
    return dw


def glu_conv_bwd(dy, x, weight, bias, h, has_residual: bool, causal: bool, *, need_dx: bool = True,
                 need_dw: bool = True, need_db: bool = True, need_dres: bool = True):
    """Gradients of glu_conv. dy (B, T, C_out) any strides; h: the forward's pre-GLU activation (B, T, 2*C_out)
    contiguous, or None to recompute it (one more implicit GEMM).

    Returns (dx (B, T, C_in), dweight (k, C_in, 2*C_out), dbias (2*C_out,), dresidual (B, T, C_out)), each None
    where not asked for (dbias also when bias is None, dresidual when there was no residual). Launches on the
    current CUDA device (the binding sets it to x's).
    """
    import torch
    B, T, C_in, C_out, k = _check(x, weight, bias, None)
    M = B * T
    pad_l = _pad_left(k, causal)
    dot = _dot_args(x.dtype)
    need_db = need_db and bias is not None
    need_dres = need_dres and has_residual
    if h is None:
        _, h = glu_conv_fwd(x, weight, bias, None, causal, store_h=True, store_y=False)
    assert h.is_contiguous() and tuple(h.shape) == (B, T, 2 * C_out)

    if M == 0:                                  # B = 0: empty dx and dresidual, zero dweight and dbias
        zeros = lambda *shape: torch.zeros(*shape, device=x.device, dtype=x.dtype)  # noqa: E731
        return (zeros(B, T, C_in) if need_dx else None, zeros(k, C_in, 2 * C_out) if need_dw else None,
                zeros(2 * C_out) if need_db else None, zeros(B, T, C_out) if need_dres else None)

    dh = torch.empty(B, T, 2 * C_out, device=x.device, dtype=x.dtype)
    dres = torch.empty(B, T, C_out, device=x.device, dtype=x.dtype) if need_dres else None
    # An elementwise pass (memory-bound): 32 x 128 tiles, 4 warps (32 elements per thread per tensor); the db
    # partials get one row per 32 positions (1 MiB of fp32 at M = 8192, 2*C_out = 1024).
    bm = 32
    bn = 32 if INTERPRET else 128
    dbp = torch.empty(triton.cdiv(M, bm), 2 * C_out, device=x.device, dtype=torch.float32) if need_db else None
    _glu_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(C_out, bn))](
        dy, h, dh, dres if dres is not None else dh, dbp if dbp is not None else dh,
        M, T, C_out, *dy.stride(),
        HAS_RES=has_residual, STORE_DB=need_db, STORE_DRES=need_dres, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
    )
    db = dbp.sum(0).to(x.dtype) if need_db else None

    dx = None
    if need_dx:
        dx = torch.empty(B, T, C_in, device=x.device, dtype=x.dtype)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(C_in, META["BLOCK_N"]),)  # noqa: E731
        _dx_kernel[grid](
            dh, weight, dx, M, T, C_in, C_out, triton.next_power_of_2(M), *weight.stride(),
            KSIZE=k, PAD_L=pad_l, **dot,
        )

    dw = None
    if need_dw and DW_IMPL == "gemm":
        dw = _dw_gemm(x, dh, k, pad_l)
    elif need_dw:
        rows = _dw_split(M, C_in, C_out, k, x.device)
        split = triton.cdiv(M, rows)
        if split == 1:
            dw = out = torch.empty(k, C_in, 2 * C_out, device=x.device, dtype=x.dtype)
            out_strides = (0, *out.stride())
        else:
            out = torch.empty(split, k, C_in, 2 * C_out, device=x.device, dtype=torch.float32)
            out_strides = out.stride()
        grid = lambda META: (  # noqa: E731
            triton.cdiv(C_in, META["BLOCK_M"]) * triton.cdiv(2 * C_out, META["BLOCK_N"]), k, split)
        _dw_kernel[grid](
            x, dh, out, M, T, C_in, C_out, triton.next_power_of_2(M), rows,
            *x.stride(), *out_strides,
            KSIZE=k, PAD_L=pad_l, **dot,
        )
        if split > 1:
            dw = out.sum(0).to(x.dtype)     # a fixed-order reduction: deterministic, unlike float atomics
    return dx, dw, db, dres
