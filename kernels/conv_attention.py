"""Triton kernels and host launchers for conv_attention (one ConvS2S decoder layer's attention).

Contract (convs2s.ops.conv_attention has the full docstring):
    x (B, Tt, C), target_embedding (B, Tt, E), encoder_keys (B, Ts, E), encoder_values (B, Ts, E),
    src_padding_mask (B, Ts) bool or None, w_in (E, C), b_in (E,), w_out (C, E), b_out (C,)
    q0   = x @ w_in.T + b_in + target_embedding                      (B, Tt, E)   [q = q0 * sqrt(0.5)]
    p    = softmax(sqrt(0.5) * q0 @ K.T), padding masked              (B, Tt, Ts)
    ctx  = (p @ V) * sqrt(s)                                          (B, Tt, E)
    out  = (ctx @ w_out.T + b_out + x) * sqrt(0.5)                    (B, Tt, C)

Split of the work:
  - The two projections are cuBLAS GEMMs with their bias/residual folded into addmm (q0 = addmm(te + b_in, x,
    w_in.T); out = addmm(x + b_out, ctx, w_out.T, beta=alpha=sqrt(0.5))). They carry 2*B*Tt*C*E FLOPs each,
    as much as the whole attention core (4*B*Tt*Ts*E) when Ts = C/2, and cuBLAS runs them near the GEMM
    ceiling. Fusing them into the attention kernel would save only the round trips of q0 and ctx
    (2 * B*Tt*E elements each, ~6 MB in bf16 at B=16, Tt=256, E=768: ~2 us at 3 TB/s) but would put a
    (BLOCK_M, C) x (C, E) product inside every program, and with E split over programs (below) it would be
    recomputed per E-chunk. So this is not a flag: the fused variant would be a different kernel design.
    bench/bench_conv_attention.py times the attention core alone ("triton-core") so a GPU run shows what share
    the GEMMs take.
  - The attention core is flash-attention style: one pass over the source per (target tile, sentence,
    E-chunk), online softmax in fp32 (exp2, log2-domain statistics), no (B, Tt, Ts) tensor unless need_weights.
  - Backward recomputes p from the saved per-row log-sum-exp (never from a saved p), with two strategies
    (BACKWARD below), both deterministic (no atomics):
      "materialize": one GEMM-like kernel per (source tile, target tile, sentence) writes sqrt(s) * p and dS,
        then three cuBLAS batched GEMMs give dV, dK and dq0; two transient (B, Tt, Ts) tensors.
      "flash": one kernel per (target tile, sentence, E-chunk) for dq (it also writes delta = rowsum(dctx *
        ctx)), one per (source tile, sentence, E-chunk) for dK and dV that iterates over target tiles; memory
        O(B * (Tt + Ts) * E), but the scores and dP are recomputed once per E-chunk.

E up to 768 and not a power of two (300): E is split into BLOCK_EO-wide chunks across programs for everything
that has E as its *output* dimension (ctx, dq, dK, dV accumulators), and looped over in BLOCK_EK-wide chunks for
the contractions over E (scores q0 @ K.T, dP = dctx @ V.T). A padded power-of-two E block instead would need
(BLOCK_M, 1024) fp32 accumulators for E = 768 (256 KB at BLOCK_M = 64: the whole register file of an SM, twice
over in the dK/dV kernel) and would waste 25-70 % of the MMA work on padding for E = 768 / 300. The price is
that the scores (and dP in the flash backward) are recomputed once per E-chunk; BLOCK_EO is autotuned (64 to
256), so E = 256 can run in one chunk. Splitting E also multiplies the grid, which the small shape (B = 64,
Tt = 32: 64 target tiles) needs to fill 132 SMs.

Masked scores are -inf and the running max is clamped to 0 while a row has seen only padding, so padded source
positions get exactly zero probability and exactly zero dK/dV, whether the padding is at the end, the start or
in the middle of a sentence.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

SQRT_HALF = math.sqrt(0.5)
LOG2E = 1.4426950408889634
# Scores are scaled by sqrt(0.5) (the query's scale) and by log2(e) so the softmax can use exp2.
QK_SCALE_LOG2 = SQRT_HALF * LOG2E

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CONVS2S_TRITON_AUTOTUNE=0 runs the first config of each kernel instead of tuning (quick GPU test runs, where
# every new shape would otherwise compile and time all configs).
AUTOTUNE = os.environ.get("CONVS2S_TRITON_AUTOTUNE", "1") != "0"

# The one config used under TRITON_INTERPRET=1 (autotune needs a GPU driver). Small tiles so that small test
# shapes still span several target tiles, source tiles and E-chunks. Tests may swap in another dict.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_EK": 16, "BLOCK_EO": 16, "num_warps": 4, "num_stages": 1}


def _configs(own: str, shapes) -> list[triton.Config]:
    """GPU configs from (rows, cols, BLOCK_EO, num_warps): `own` names the tile a program owns ("M": target rows,
    forward and dq; "N": source rows, dK/dV), the other block is the one looped over."""
    loop = "N" if own == "M" else "M"
    return [triton.Config({f"BLOCK_{own}": rows, f"BLOCK_{loop}": cols, "BLOCK_EK": 64, "BLOCK_EO": eo},
                          num_warps=warps, num_stages=2) for rows, cols, eo, warps in shapes]


# Chosen among configs compiled for sm_90 (triton 3.8, bf16) as those that do not spill registers: e.g. the dK/dV
# kernel at (BLOCK_N, BLOCK_M, BLOCK_EO) = (64, 64, 128) with 4 warps spills 1.6 KB per thread, with its two
# fp32 (BLOCK_N, BLOCK_EO) accumulators beside two (BLOCK_N, BLOCK_M) score tiles.
_FWD_CONFIGS = _configs("M", [(64, 64, 128, 4), (64, 64, 256, 8), (64, 32, 128, 8), (32, 64, 128, 4),
                              (128, 64, 64, 8), (128, 32, 128, 8)])
_DQ_CONFIGS = _configs("M", [(64, 64, 128, 8), (64, 64, 256, 8), (64, 32, 128, 8), (32, 64, 128, 4),
                             (64, 64, 64, 8), (32, 32, 64, 4)])
_DKDV_CONFIGS = _configs("N", [(64, 32, 128, 8), (64, 64, 64, 8), (32, 32, 64, 4)])
# The materializing backward's dS kernel: a GEMM-like tile over (target, source), E innermost and pipelined
# (same no-spill selection; 128 x 128 tiles spill 200-700 bytes per thread).
_DS_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_EK": ek}, num_warps=w, num_stages=st)
               for m, n, ek, w, st in [(64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 128, 32, 8, 3),
                                       (128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 64, 4, 3)]]


def _prune(configs, named_args, **kwargs):
    """Keep the configs worth timing for these arguments.

    fp32 keeps one: it is the full-precision correctness path (products in ieee fp32), not a speed path, and
    tuning its variants costs minutes of compilation (10-30 s each, measured on this project's CI machine).
    Configs whose E-chunk is wider than E needs are dropped (E = 128 gains nothing from BLOCK_EO = 256).
    """
    E = named_args["E"]
    need = max(16, triton.next_power_of_2(E))
    kept = [c for c in configs if c.kwargs.get("BLOCK_EO", 0) <= need] or configs[:1]
    if named_args["q_ptr"].dtype == torch.float32 or not AUTOTUNE:
        kept = kept[:1]
    return kept


def _tuned(fn, configs):
    """Autotune over `configs` on GPU; under the interpreter the launcher passes INTERPRET_CONFIG instead."""
    if _INTERPRET:
        return fn
    return triton.autotune(configs, key=["E", "tt_bucket", "ts_bucket"],
                           prune_configs_by={"early_config_prune": _prune})(fn)


def _meta(*drop: str) -> dict:
    """Launch meta-parameters: INTERPRET_CONFIG (less the names in `drop`) under the interpreter, else none."""
    return {k: v for k, v in INTERPRET_CONFIG.items() if k not in drop} if _INTERPRET else {}


def _bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two ceiling, capped, so varying batch lengths reuse one tuning."""
    return min(triton.next_power_of_2(n), 2048)


@triton.jit
def _dot_rows_cols(a_ptr, b_ptr, offs_a, offs_b, a_valid, b_valid, E,
                   stride_ar, stride_ae, stride_br, stride_be,
                   ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_EK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a[offs_a, :] @ b[offs_b, :].T, contracted over all of E in BLOCK_EK chunks: (ROWS, COLS) fp32."""
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_EK):
        offs_e = e0 + tl.arange(0, BLOCK_EK)
        e_valid = offs_e < E
        a = tl.load(a_ptr + offs_a[:, None] * stride_ar + offs_e[None, :] * stride_ae,
                    mask=a_valid[:, None] & e_valid[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_b[None, :] * stride_br + offs_e[:, None] * stride_be,
                     mask=b_valid[None, :] & e_valid[:, None], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: inside the source and not padding."""
    valid = offs_n < T_SRC
    if HAS_MASK:
        pad = tl.load(mask_ptr + offs_n * stride_maskn, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit
def _fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, ctx_ptr, lse_ptr, rs_ptr, attn_ptr,
    # dimensions
    T_TGT, T_SRC, E,
    # strides
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_maskb, stride_maskn,
    stride_cb, stride_cm, stride_ce,
    stride_ab, stride_am, stride_an,
    # autotune key only
    tt_bucket, ts_bucket,
    # meta-parameters
    QK_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, NEED_WEIGHTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (target tile, sentence, E-chunk): ctx[:, chunk] = softmax(q0 K.T * sqrt(.5)) V[:, chunk] * sqrt(s).

    Program (pid_m, pid_b, 0) also writes the row statistics lse (log2 domain), sqrt(s) and, with NEED_WEIGHTS,
    the probabilities (a second pass over the source once lse is known).
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_e = tl.program_id(2)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    mask_ptr += pid_b * stride_maskb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < T_TGT
    offs_eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_valid = offs_eo < E

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_EO), dtype=tl.float32)
    n_real = 0.0
    for n0 in range(0, T_SRC, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
        n_real += tl.sum(valid.to(tl.float32), axis=0)
        s = _dot_rows_cols(q_ptr, k_ptr, offs_m, offs_n, m_valid, offs_n < T_SRC, E,
                           stride_qm, stride_qe, stride_kn, stride_ke, BLOCK_M, BLOCK_N, BLOCK_EK, DOT_PRECISION)
        s = tl.where(valid[None, :], s * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only padding so far has max -inf; clamp so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_eo[None, :] * stride_ve,
                    mask=(offs_n < T_SRC)[:, None] & eo_valid[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Every sentence has a real token, so l_i > 0 for every row; rows past T_TGT are never stored.
    root_s = tl.sqrt(n_real)
    ctx = acc * (root_s / l_i)[:, None]
    tl.store(ctx_ptr + pid_b * stride_cb + offs_m[:, None] * stride_cm + offs_eo[None, :] * stride_ce,
             ctx.to(ctx_ptr.dtype.element_ty), mask=m_valid[:, None] & eo_valid[None, :])
    lse = m_i + tl.math.log2(l_i)
    tl.store(lse_ptr + pid_b * T_TGT + offs_m, lse, mask=m_valid & (pid_e == 0))
    tl.store(rs_ptr + pid_b, root_s, mask=(pid_m == 0) & (pid_e == 0))

    if NEED_WEIGHTS:
        if pid_e == 0:
            attn_ptr += pid_b * stride_ab
            for n0 in range(0, T_SRC, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
                s = _dot_rows_cols(q_ptr, k_ptr, offs_m, offs_n, m_valid, offs_n < T_SRC, E,
                                   stride_qm, stride_qe, stride_kn, stride_ke,
                                   BLOCK_M, BLOCK_N, BLOCK_EK, DOT_PRECISION)
                p = tl.where(valid[None, :], tl.math.exp2(s * QK_SCALE - lse[:, None]), 0.0)
                tl.store(attn_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an,
                         p.to(attn_ptr.dtype.element_ty), mask=m_valid[:, None] & (offs_n < T_SRC)[None, :])


@triton.jit
def _bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, ctx_ptr, do_ptr, lse_ptr, rs_ptr, da_ptr, dextra_ptr, delta_ptr, dq_ptr,
    # dimensions
    T_TGT, T_SRC, E,
    # strides (ctx, do and dq share the contiguous (B, Tt, E) layout of q0)
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_maskb, stride_maskn,
    stride_dab, stride_dam, stride_dan,
    # autotune key only
    tt_bucket, ts_bucket,
    # meta-parameters
    QK_SCALE: tl.constexpr, Q_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (target tile, sentence, E-chunk): dq0[:, chunk] = sqrt(.5) * dS @ K[:, chunk].

    do = dL/dctx (B, Tt, E); dP = sqrt(s) * do @ V.T (+ dL/dp when HAS_DA); dS = p * (dP - delta);
    delta = rowsum(do * ctx) (+ dextra = rowsum(dL/dp * p)), written by the E-chunk-0 programs for the dK/dV
    kernel.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_e = tl.program_id(2)
    q_ptr += pid_b * stride_qb
    ctx_ptr += pid_b * stride_qb
    do_ptr += pid_b * stride_qb
    dq_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    mask_ptr += pid_b * stride_maskb
    da_ptr += pid_b * stride_dab

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < T_TGT
    offs_eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_valid = offs_eo < E
    root_s = tl.load(rs_ptr + pid_b)
    lse = tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)

    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_EK):
        offs_e = e0 + tl.arange(0, BLOCK_EK)
        tile = offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe
        tmask = m_valid[:, None] & (offs_e < E)[None, :]
        do = tl.load(do_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
        c = tl.load(ctx_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
        delta += tl.sum(do * c, axis=1)
    if HAS_DA:
        delta += tl.load(dextra_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)
    tl.store(delta_ptr + pid_b * T_TGT + offs_m, delta, mask=m_valid & (pid_e == 0))

    acc = tl.zeros((BLOCK_M, BLOCK_EO), dtype=tl.float32)
    for n0 in range(0, T_SRC, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < T_SRC
        valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
        live = m_valid[:, None] & valid[None, :]
        s = _dot_rows_cols(q_ptr, k_ptr, offs_m, offs_n, m_valid, n_in, E,
                           stride_qm, stride_qe, stride_kn, stride_ke, BLOCK_M, BLOCK_N, BLOCK_EK, DOT_PRECISION)
        p = tl.where(live, tl.math.exp2(s * QK_SCALE - lse[:, None]), 0.0)
        dp = _dot_rows_cols(do_ptr, v_ptr, offs_m, offs_n, m_valid, n_in, E,
                            stride_qm, stride_qe, stride_vn, stride_ve, BLOCK_M, BLOCK_N, BLOCK_EK, DOT_PRECISION)
        dp = dp * root_s
        if HAS_DA:
            dp += tl.load(da_ptr + offs_m[:, None] * stride_dam + offs_n[None, :] * stride_dan,
                          mask=m_valid[:, None] & n_in[None, :], other=0.0).to(tl.float32)
        ds = p * (dp - delta[:, None])
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_eo[None, :] * stride_ke,
                    mask=n_in[:, None] & eo_valid[None, :], other=0.0)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=DOT_PRECISION)

    tl.store(dq_ptr + offs_m[:, None] * stride_qm + offs_eo[None, :] * stride_qe,
             (acc * Q_SCALE).to(dq_ptr.dtype.element_ty), mask=m_valid[:, None] & eo_valid[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, rs_ptr, da_ptr, delta_ptr, dk_ptr, dv_ptr,
    # dimensions
    T_TGT, T_SRC, E,
    # strides (do shares q0's layout; dk and dv are contiguous (B, Ts, E))
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_maskb, stride_maskn,
    stride_dab, stride_dam, stride_dan,
    stride_dkb, stride_dkn, stride_dke,
    # autotune key only
    tt_bucket, ts_bucket,
    # meta-parameters
    QK_SCALE: tl.constexpr, Q_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (source tile, sentence, E-chunk), looping over all target tiles (transposed: rows are sources):
    dV[:, chunk] = sqrt(s) * p.T @ do[:, chunk],  dK[:, chunk] = sqrt(.5) * dS.T @ q0[:, chunk]."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_e = tl.program_id(2)
    q_ptr += pid_b * stride_qb
    do_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    mask_ptr += pid_b * stride_maskb
    da_ptr += pid_b * stride_dab

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < T_SRC
    valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
    offs_eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_valid = offs_eo < E
    root_s = tl.load(rs_ptr + pid_b)

    dk = tl.zeros((BLOCK_N, BLOCK_EO), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EO), dtype=tl.float32)
    for m0 in range(0, T_TGT, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < T_TGT
        live = valid[:, None] & m_valid[None, :]
        lse = tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(delta_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)
        st = _dot_rows_cols(k_ptr, q_ptr, offs_n, offs_m, n_in, m_valid, E,
                            stride_kn, stride_ke, stride_qm, stride_qe, BLOCK_N, BLOCK_M, BLOCK_EK, DOT_PRECISION)
        pt = tl.where(live, tl.math.exp2(st * QK_SCALE - lse[None, :]), 0.0)          # (BLOCK_N, BLOCK_M)
        do = tl.load(do_ptr + offs_m[:, None] * stride_qm + offs_eo[None, :] * stride_qe,
                     mask=m_valid[:, None] & eo_valid[None, :], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = _dot_rows_cols(v_ptr, do_ptr, offs_n, offs_m, n_in, m_valid, E,
                             stride_vn, stride_ve, stride_qm, stride_qe, BLOCK_N, BLOCK_M, BLOCK_EK, DOT_PRECISION)
        dpt = dpt * root_s
        if HAS_DA:
            dpt += tl.load(da_ptr + offs_m[None, :] * stride_dam + offs_n[:, None] * stride_dan,
                           mask=n_in[:, None] & m_valid[None, :], other=0.0).to(tl.float32)
        dst = pt * (dpt - delta[None, :])
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_eo[None, :] * stride_qe,
                    mask=m_valid[:, None] & eo_valid[None, :], other=0.0)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    tile = offs_n[:, None] * stride_dkn + offs_eo[None, :] * stride_dke
    tmask = n_in[:, None] & eo_valid[None, :]
    tl.store(dk_ptr + pid_b * stride_dkb + tile, (dk * Q_SCALE).to(dk_ptr.dtype.element_ty), mask=tmask)
    tl.store(dv_ptr + pid_b * stride_dkb + tile, (dv * root_s).to(dv_ptr.dtype.element_ty), mask=tmask)


@triton.jit
def _bwd_ds_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, ctx_ptr, do_ptr, lse_ptr, rs_ptr, da_ptr, dextra_ptr, p_ptr, ds_ptr,
    # dimensions
    T_TGT, T_SRC, E,
    # strides (ctx and do share q0's layout; p and ds are contiguous (B, Tt, Ts))
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_maskb, stride_maskn,
    stride_dab, stride_dam, stride_dan,
    stride_pb, stride_pm, stride_pn,
    # autotune key only
    tt_bucket, ts_bucket,
    # meta-parameters
    QK_SCALE: tl.constexpr, Q_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr,
):
    """One (source tile, target tile, sentence) of the materializing backward, both contractions over E in one
    pipelined loop: p_s = sqrt(s) * p and ds = sqrt(.5) * p * (dP - delta), so that dV = p_s.T @ do,
    dK = ds.T @ q0 and dq0 = ds @ K are plain batched GEMMs. delta = rowsum(do * ctx) (+ dextra) is recomputed
    by every source tile of a row from the same loads' neighbours (ctx is the one extra read)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    q_ptr += pid_b * stride_qb
    ctx_ptr += pid_b * stride_qb
    do_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    mask_ptr += pid_b * stride_maskb
    da_ptr += pid_b * stride_dab

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < T_TGT
    n_in = offs_n < T_SRC
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_EK):
        offs_e = e0 + tl.arange(0, BLOCK_EK)
        e_valid = offs_e < E
        row_tile = offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe
        row_mask = m_valid[:, None] & e_valid[None, :]
        col_mask = n_in[None, :] & e_valid[:, None]
        q = tl.load(q_ptr + row_tile, mask=row_mask, other=0.0)
        do = tl.load(do_ptr + row_tile, mask=row_mask, other=0.0)
        c = tl.load(ctx_ptr + row_tile, mask=row_mask, other=0.0)
        kt = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke, mask=col_mask, other=0.0)
        vt = tl.load(v_ptr + offs_n[None, :] * stride_vn + offs_e[:, None] * stride_ve, mask=col_mask, other=0.0)
        s = tl.dot(q, kt, s, input_precision=DOT_PRECISION)
        dp = tl.dot(do, vt, dp, input_precision=DOT_PRECISION)
        delta += tl.sum(do.to(tl.float32) * c.to(tl.float32), axis=1)
    if HAS_DA:
        delta += tl.load(dextra_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)

    root_s = tl.load(rs_ptr + pid_b)
    lse = tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)
    valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
    p = tl.where(m_valid[:, None] & valid[None, :], tl.math.exp2(s * QK_SCALE - lse[:, None]), 0.0)
    dp = dp * root_s
    tile = offs_m[:, None] * stride_dam + offs_n[None, :] * stride_dan
    tmask = m_valid[:, None] & n_in[None, :]
    if HAS_DA:
        dp += tl.load(da_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
    ds = p * (dp - delta[:, None]) * Q_SCALE
    out = pid_b * stride_pb + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(p_ptr + out, (p * root_s).to(p_ptr.dtype.element_ty), mask=tmask)
    tl.store(ds_ptr + out, ds.to(ds_ptr.dtype.element_ty), mask=tmask)


_fwd = _tuned(_fwd_kernel, _FWD_CONFIGS)
_bwd_dq = _tuned(_bwd_dq_kernel, _DQ_CONFIGS)
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, _DKDV_CONFIGS)
_bwd_ds = _tuned(_bwd_ds_kernel, _DS_CONFIGS)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products: the fp32 reference (and cuBLAS with allow_tf32 off) does not
    # round to tf32, whose 10-bit mantissa would put the error ~1000x above it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: torch.Tensor | None, dummy: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, HAS_MASK); a bool mask is read through a uint8 view (same bytes)."""
    if mask is None:
        return dummy, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def attention_forward(q0: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      need_weights: bool):
    """The attention core. q0 (B, Tt, E) contiguous, k / v (B, Ts, E) any strides, mask (B, Ts) bool or None.

    Returns ctx (B, Tt, E) = softmax(sqrt(.5) q0 K.T) V * sqrt(s) in q0's dtype, lse (B, Tt) fp32 (log2 domain,
    scores scaled by sqrt(.5) * log2(e)), root_s (B,) fp32, attn (B, Tt, Ts) or an empty tensor.
    """
    B, Tt, E = q0.shape
    Ts = k.shape[1]
    ctx = torch.empty_like(q0, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Tt, device=q0.device, dtype=torch.float32)
    root_s = torch.empty(B, device=q0.device, dtype=torch.float32)
    attn = (torch.empty(B, Tt, Ts, device=q0.device, dtype=q0.dtype) if need_weights
            else q0.new_empty(0))
    a_strides = attn.stride() if need_weights else (0, 0, 0)
    mask_t, stride_mb, stride_mn, has_mask = _mask_args(mask, lse)

    def grid(meta):
        return triton.cdiv(Tt, meta["BLOCK_M"]), B, triton.cdiv(E, meta["BLOCK_EO"])

    _fwd[grid](
        q0, k, v, mask_t, ctx, lse, root_s, attn,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *ctx.stride(), *a_strides,
        _bucket(Tt), _bucket(Ts),
        QK_SCALE=QK_SCALE_LOG2, HAS_MASK=has_mask, NEED_WEIGHTS=need_weights,
        DOT_PRECISION=_dot_precision(q0.dtype), **_meta())
    return ctx, lse, root_s, attn


# Backward strategy: "materialize" runs the dS kernel and three cuBLAS batched GEMMs (dV = p_s.T @ do,
# dK = ds.T @ q0, dq0 = ds @ K) and holds two (B, Tt, Ts) tensors for the length of one attention backward;
# "flash" runs the dq and dK/dV kernels in O(B * (Tt + Ts) * E) memory but recomputes the scores and dP once per
# E-chunk (E / BLOCK_EO times: 6x at E = 768 with the 128-wide chunks the dK/dV kernel fits without spilling).
# "auto" materializes up to MATERIALIZE_MAX_BYTES (256 MiB: e.g. B = 32, Tt = Ts = 1024 in bf16), where the
# eager reference keeps several such tensors alive until its backward ends.
BACKWARD = "auto"
MATERIALIZE_MAX_BYTES = 256 << 20


def backward_strategy(B: int, Tt: int, Ts: int, dtype: torch.dtype) -> str:
    if BACKWARD != "auto":
        return BACKWARD
    nbytes = 2 * B * Tt * Ts * dtype.itemsize
    return "materialize" if nbytes <= MATERIALIZE_MAX_BYTES else "flash"


def attention_backward(q0, k, v, mask, ctx, do, lse, root_s, dattn=None, attn=None):
    """Gradients of the attention core from saved statistics (p is recomputed from lse, never saved).

    q0, ctx, do: (B, Tt, E) contiguous, do = dL/dctx; k, v (B, Ts, E) any strides; lse (B, Tt), root_s (B,)
    from attention_forward; dattn = dL/dp (B, Tt, Ts) with attn = p, or both None.
    Returns dq0 (B, Tt, E) (= dL/dq0, the sqrt(.5) included), dk, dv (B, Ts, E), in q0's dtype.
    """
    B, Tt, E = q0.shape
    Ts = k.shape[1]
    assert ctx.stride() == q0.stride() and do.stride() == q0.stride(), "q0, ctx, do must share one layout"
    has_da = dattn is not None
    stats = torch.empty(B, Tt, device=q0.device, dtype=torch.float32)     # delta, written by the flash dq kernel
    if has_da:
        # rowsum(dL/dp * p): the softmax-backward term of a loss that uses the weights themselves.
        dextra = (dattn.float() * attn.float()).sum(-1)
        da, da_strides = dattn, dattn.stride()
    else:
        dextra, da, da_strides = stats, stats, (0, 0, 0)
    mask_t, stride_mb, stride_mn, has_mask = _mask_args(mask, stats)
    common = dict(QK_SCALE=QK_SCALE_LOG2, Q_SCALE=SQRT_HALF, HAS_MASK=has_mask, HAS_DA=has_da,
                  DOT_PRECISION=_dot_precision(q0.dtype))

    if backward_strategy(B, Tt, Ts, q0.dtype) == "materialize":
        p_s = torch.empty(B, Tt, Ts, device=q0.device, dtype=q0.dtype)
        ds = torch.empty_like(p_s)

        def grid_ds(meta):
            return triton.cdiv(Ts, meta["BLOCK_N"]), triton.cdiv(Tt, meta["BLOCK_M"]), B

        _bwd_ds[grid_ds](
            q0, k, v, mask_t, ctx, do, lse, root_s, da, dextra, p_s, ds,
            Tt, Ts, E,
            *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides, *p_s.stride(),
            _bucket(Tt), _bucket(Ts), **common, **_meta("BLOCK_EO"))
        return torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q0), torch.bmm(p_s.transpose(1, 2), do)

    dq0 = torch.empty_like(q0)
    dk = torch.empty(B, Ts, E, device=q0.device, dtype=q0.dtype)
    dv = torch.empty_like(dk)

    def grid_q(meta):
        return triton.cdiv(Tt, meta["BLOCK_M"]), B, triton.cdiv(E, meta["BLOCK_EO"])

    _bwd_dq[grid_q](
        q0, k, v, mask_t, ctx, do, lse, root_s, da, dextra, stats, dq0,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides,
        _bucket(Tt), _bucket(Ts), **common, **_meta())

    def grid_kv(meta):
        return triton.cdiv(Ts, meta["BLOCK_N"]), B, triton.cdiv(E, meta["BLOCK_EO"])

    _bwd_dkdv[grid_kv](
        q0, k, v, mask_t, do, lse, root_s, da, stats, dk, dv,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides, *dk.stride(),
        _bucket(Tt), _bucket(Ts), **common, **_meta())
    return dq0, dk, dv


def conv_attention_forward(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in,
                           w_out, b_out, need_weights: bool):
    """The whole op: shapes as in the module docstring (inputs validated by the public op, any strides).

    Returns out (B, Tt, C), attn (B, Tt, Ts) or an empty tensor, and what backward needs: ctx (B, Tt, E),
    q0 (B, Tt, E), lse (B, Tt) fp32, root_s (B,) fp32.
    """
    B, Tt, C = x.shape
    E = target_embedding.shape[2]
    x2 = x.reshape(B * Tt, C)
    q0 = torch.addmm(target_embedding.reshape(B * Tt, E) + b_in, x2, w_in.t()).view(B, Tt, E)
    ctx, lse, root_s, attn = attention_forward(q0, encoder_keys, encoder_values, src_padding_mask, need_weights)
    out = torch.addmm(x2 + b_out, ctx.view(B * Tt, E), w_out.t(), beta=SQRT_HALF, alpha=SQRT_HALF)
    return out.view(B, Tt, C), attn, ctx, q0, lse, root_s


def conv_attention_backward(dout, dattn, x, encoder_keys, encoder_values, src_padding_mask, w_in, w_out,
                            ctx, q0, lse, root_s, attn):
    """Gradients of conv_attention_forward: dout (B, Tt, C) (any strides), dattn (B, Tt, Ts) or None.

    Returns dx, dtarget_embedding, dkeys, dvalues, dw_in, db_in, dw_out, db_out.
    """
    B, Tt, C = x.shape
    E = q0.shape[2]
    x2 = x.reshape(B * Tt, C)
    g = dout.reshape(B * Tt, C) * SQRT_HALF                                  # dL/d(ctx @ w_out.T + b_out + x)
    do = (g @ w_out).view(B, Tt, E)                                          # dL/dctx
    dw_out = g.t() @ ctx.view(B * Tt, E)
    db_out = g.sum(0)
    dq0, dk, dv = attention_backward(q0, encoder_keys, encoder_values, src_padding_mask, ctx, do, lse, root_s,
                                     dattn, attn)
    dq2 = dq0.view(B * Tt, E)
    dx = torch.addmm(g, dq2, w_in).view(B, Tt, C)
    dw_in = dq2.t() @ x2
    db_in = dq2.sum(0)
    return dx, dq0, dk, dv, dw_in, db_in, dw_out, db_out
