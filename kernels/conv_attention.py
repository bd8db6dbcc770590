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

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune_configs

SQRT_HALF = math.sqrt(0.5)
LOG2E = 1.4426950408889634
# Scores are scaled by sqrt(0.5) (the query's scale) and by log2(e) so the softmax can use exp2.
QK_SCALE_LOG2 = SQRT_HALF * LOG2E

# The one config of every kernel under TRITON_INTERPRET=1 (kernels/_common.py): small tiles, so that small test
# shapes still span several target tiles, source tiles and E-chunks. Without the interpreter, with autotuning off
# (CONVS2S_TRITON_AUTOTUNE=0), each kernel runs its first GPU config.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_EK": 16, "BLOCK_EO": 16}, num_warps=4,
                                 num_stages=1)
INTERPRET_DS_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_EK": 16}, num_warps=4, num_stages=1)


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
    if named_args["q_ptr"].dtype == torch.float32:
        kept = kept[:1]
    return kept


def _tuned(fn, configs, interpret_config=INTERPRET_CONFIG):
    """`fn` autotuned over kernels/_common.py's config list: `configs` on a GPU (their first with autotuning off),
    `interpret_config` in the interpreter. A test forces one config by setting the tuner's `configs`."""
    return triton.autotune(autotune_configs(configs, interpret_config if INTERPRET else None),
                           key=["E", "tt_bucket", "ts_bucket"], prune_configs_by={"early_config_prune": _prune})(fn)


def _bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two ceiling, capped, so varying batch lengths reuse one tuning."""
    return min(triton.next_power_of_2(n), 2048)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32 upcasts the operands first (exact for 16-bit values): the interpreter's bf16 tl.dot
    multiplies raw bit patterns, so bf16 runs there on fp32 products, accumulated in fp32 as the GPU's MMA does."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dot_rows_cols(a_ptr, b_ptr, offs_a, offs_b, a_valid, b_valid, E,
                   stride_ar, stride_ae, stride_br, stride_be,
                   ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_EK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    """a[offs_a, :] @ b[offs_b, :].T, contracted over all of E in BLOCK_EK chunks: (ROWS, COLS) fp32."""
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_EK):
        offs_e = e0 + tl.arange(0, BLOCK_EK)
        e_valid = offs_e < E
        a = tl.load(a_ptr + offs_a[:, None] * stride_ar + offs_e[None, :] * stride_ae,
                    mask=a_valid[:, None] & e_valid[None, :], other=0.0)
        bt = tl.load(b_ptr + offs_b[None, :] * stride_br + offs_e[:, None] * stride_be,
                     mask=b_valid[None, :] & e_valid[:, None], other=0.0)
        acc = _mma(a, bt, acc, DOT_PRECISION, DOT_FP32)
    return acc


@triton.jit
def _lse_split(lse):
    """(hi, lo) fp32 with hi + lo = lse (fp64, (rows,)) to ~fp64 precision: see _prob."""
    hi = lse.to(tl.float32)
    return hi, (lse - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _prob(s, lse_hi, lse_lo, QK_SCALE: tl.constexpr):
    """p = exp2(s * QK_SCALE - lse) from unscaled fp32 scores s and lse = lse_hi + lse_lo (_lse_split, broadcast
    to s's shape). lse = m + log2(l) reaches ~20, and an fp32 lse would carry its own ulp (~1e-6) into every p of
    the row, which made the fp32 gradients' mean error twice the PyTorch reference's; s * QK_SCALE - lse_hi is
    exact where p matters (Sterbenz), so only fp32 tiles are needed (an fp64 tile spilled the dK/dV kernel)."""
    return tl.math.exp2((s * QK_SCALE - lse_hi) - lse_lo)


@triton.jit
def _split_pid(pid, T, BLOCK: tl.constexpr):
    """(sentence as int64, tile) from a program id = sentence * cdiv(T, BLOCK) + tile."""
    n_tiles = tl.cdiv(T, BLOCK)
    return (pid // n_tiles).to(tl.int64), pid % n_tiles


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
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (target tile, sentence, E-chunk): ctx[:, chunk] = softmax(q0 K.T * sqrt(.5)) V[:, chunk] * sqrt(s).

    Grid: rows_grid (program_id(0) = sentence * target tiles + target tile, program_id(1) = E-chunk). E-chunk 0
    also writes the row statistics lse (log2 domain), sqrt(s) and, with NEED_WEIGHTS, the probabilities (a second
    pass over the source once lse is known).
    """
    pid_b, pid_m = _split_pid(tl.program_id(0), T_TGT, BLOCK_M)
    pid_e = tl.program_id(1)
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
                           stride_qm, stride_qe, stride_kn, stride_ke, BLOCK_M, BLOCK_N, BLOCK_EK,
                           DOT_PRECISION, DOT_FP32)
        s = tl.where(valid[None, :], s * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only padding so far has max -inf; clamp so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_eo[None, :] * stride_ve,
                    mask=(offs_n < T_SRC)[:, None] & eo_valid[None, :], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, DOT_FP32)
        m_i = m_new

    # Every sentence has a real token, so l_i > 0 for every row; rows past T_TGT are never stored.
    root_s = tl.sqrt(n_real)
    ctx = acc * (root_s / l_i)[:, None]
    tl.store(ctx_ptr + pid_b * stride_cb + offs_m[:, None] * stride_cm + offs_eo[None, :] * stride_ce,
             ctx.to(ctx_ptr.dtype.element_ty), mask=m_valid[:, None] & eo_valid[None, :])
    lse = m_i.to(tl.float64) + tl.math.log2(l_i.to(tl.float64))
    lse_hi, lse_lo = _lse_split(lse)
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
                                   BLOCK_M, BLOCK_N, BLOCK_EK, DOT_PRECISION, DOT_FP32)
                p = tl.where(valid[None, :], _prob(s, lse_hi[:, None], lse_lo[:, None], QK_SCALE), 0.0)
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
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (target tile, sentence, E-chunk): dq0[:, chunk] = sqrt(.5) * dS @ K[:, chunk].

    do = dL/dctx (B, Tt, E); dP = sqrt(s) * do @ V.T (+ dL/dp when HAS_DA); dS = p * (dP - delta);
    delta = rowsum(do * ctx) (+ dextra = rowsum(dL/dp * p)), written by the E-chunk-0 programs for the dK/dV
    kernel. Grid: rows_grid over target tiles.
    """
    pid_b, pid_m = _split_pid(tl.program_id(0), T_TGT, BLOCK_M)
    pid_e = tl.program_id(1)
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
    lse_hi, lse_lo = _lse_split(tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0))

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
                           stride_qm, stride_qe, stride_kn, stride_ke, BLOCK_M, BLOCK_N, BLOCK_EK,
                           DOT_PRECISION, DOT_FP32)
        p = tl.where(live, _prob(s, lse_hi[:, None], lse_lo[:, None], QK_SCALE), 0.0)
        dp = _dot_rows_cols(do_ptr, v_ptr, offs_m, offs_n, m_valid, n_in, E,
                            stride_qm, stride_qe, stride_vn, stride_ve, BLOCK_M, BLOCK_N, BLOCK_EK,
                            DOT_PRECISION, DOT_FP32)
        dp = dp * root_s
        if HAS_DA:
            dp += tl.load(da_ptr + offs_m[:, None] * stride_dam + offs_n[None, :] * stride_dan,
                          mask=m_valid[:, None] & n_in[None, :], other=0.0).to(tl.float32)
        ds = p * (dp - delta[:, None])
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_eo[None, :] * stride_ke,
                    mask=n_in[:, None] & eo_valid[None, :], other=0.0)
        acc = _mma(ds.to(k.dtype), k, acc, DOT_PRECISION, DOT_FP32)

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
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """One (source tile, sentence, E-chunk), looping over all target tiles (transposed: rows are sources):
    dV[:, chunk] = sqrt(s) * p.T @ do[:, chunk],  dK[:, chunk] = sqrt(.5) * dS.T @ q0[:, chunk].
    Grid: rows_grid over source tiles."""
    pid_b, pid_n = _split_pid(tl.program_id(0), T_SRC, BLOCK_N)
    pid_e = tl.program_id(1)
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
        lse_hi, lse_lo = _lse_split(tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0))
        delta = tl.load(delta_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)
        st = _dot_rows_cols(k_ptr, q_ptr, offs_n, offs_m, n_in, m_valid, E,
                            stride_kn, stride_ke, stride_qm, stride_qe, BLOCK_N, BLOCK_M, BLOCK_EK,
                            DOT_PRECISION, DOT_FP32)
        pt = tl.where(live, _prob(st, lse_hi[None, :], lse_lo[None, :], QK_SCALE), 0.0)  # (BLOCK_N, BLOCK_M)
        do = tl.load(do_ptr + offs_m[:, None] * stride_qm + offs_eo[None, :] * stride_qe,
                     mask=m_valid[:, None] & eo_valid[None, :], other=0.0)
        dv = _mma(pt.to(do.dtype), do, dv, DOT_PRECISION, DOT_FP32)
        dpt = _dot_rows_cols(v_ptr, do_ptr, offs_n, offs_m, n_in, m_valid, E,
                             stride_vn, stride_ve, stride_qm, stride_qe, BLOCK_N, BLOCK_M, BLOCK_EK,
                             DOT_PRECISION, DOT_FP32)
        dpt = dpt * root_s
        if HAS_DA:
            dpt += tl.load(da_ptr + offs_m[None, :] * stride_dam + offs_n[:, None] * stride_dan,
                           mask=n_in[:, None] & m_valid[None, :], other=0.0).to(tl.float32)
        dst = pt * (dpt - delta[None, :])
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_eo[None, :] * stride_qe,
                    mask=m_valid[:, None] & eo_valid[None, :], other=0.0)
        dk = _mma(dst.to(q.dtype), q, dk, DOT_PRECISION, DOT_FP32)

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
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_EK: tl.constexpr,
):
    """One (source tile, target tile, sentence) of the materializing backward, both contractions over E in one
    pipelined loop: p_s = sqrt(s) * p and ds = sqrt(.5) * p * (dP - delta), so that dV = p_s.T @ do,
    dK = ds.T @ q0 and dq0 = ds @ K are plain batched GEMMs. delta = rowsum(do * ctx) (+ dextra) is recomputed
    by every source tile of a row from the same loads' neighbours (ctx is the one extra read).
    Grid: tiles_grid (program_id(0) = (sentence * target tiles + target tile) * source tiles + source tile)."""
    n_n = tl.cdiv(T_SRC, BLOCK_N)
    pid_n = tl.program_id(0) % n_n
    pid_b, pid_m = _split_pid(tl.program_id(0) // n_n, T_TGT, BLOCK_M)
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
        s = _mma(q, kt, s, DOT_PRECISION, DOT_FP32)
        dp = _mma(do, vt, dp, DOT_PRECISION, DOT_FP32)
        delta += tl.sum(do.to(tl.float32) * c.to(tl.float32), axis=1)
    if HAS_DA:
        delta += tl.load(dextra_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0)

    root_s = tl.load(rs_ptr + pid_b)
    lse_hi, lse_lo = _lse_split(tl.load(lse_ptr + pid_b * T_TGT + offs_m, mask=m_valid, other=0.0))
    valid = _source_valid(mask_ptr, offs_n, T_SRC, stride_maskn, HAS_MASK)
    p = tl.where(m_valid[:, None] & valid[None, :], _prob(s, lse_hi[:, None], lse_lo[:, None], QK_SCALE),
                 0.0)
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
_bwd_ds = _tuned(_bwd_ds_kernel, _DS_CONFIGS, INTERPRET_DS_CONFIG)


def _dots(dtype: torch.dtype) -> dict:
    """The dot meta-parameters for `dtype`. fp32 inputs get full-precision products: the fp32 reference (and
    cuBLAS with allow_tf32 off) does not round to tf32, whose 10-bit mantissa would put the error ~1000x above it.
    DOT_FP32: bf16 in the interpreter (see _mma)."""
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_FP32": INTERPRET and dtype == torch.bfloat16}


# Launch grids. Sentences share grid axis 0 with the tiles (up to 2**31 - 1 programs): axes 1 and 2 stop at 65535,
# and B reaches that in beam search (beam 5 over a 13k-sentence test set in one batch: B = 65k).
def rows_grid(B: int, T: int, E: int, block: str):
    """(B * tiles of `block` rows over T, E-chunks): the forward, dq and dK/dV kernels."""
    return lambda meta: (B * triton.cdiv(T, meta[block]), triton.cdiv(E, meta["BLOCK_EO"]))


def tiles_grid(B: int, Tt: int, Ts: int):
    """(B * target tiles * source tiles,): the materializing backward's dS kernel."""
    return lambda meta: (B * triton.cdiv(Tt, meta["BLOCK_M"]) * triton.cdiv(Ts, meta["BLOCK_N"]),)


def _mask_args(mask: torch.Tensor | None, dummy: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, HAS_MASK); a bool mask is read through a uint8 view (same bytes)."""
    if mask is None:
        return dummy, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def attention_forward(q0: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      need_weights: bool):
    """The attention core. q0 (B, Tt, E) contiguous, k / v (B, Ts, E) any strides, mask (B, Ts) bool or None.

    Returns ctx (B, Tt, E) = softmax(sqrt(.5) q0 K.T) V * sqrt(s) in q0's dtype, lse (B, Tt) fp64 (log2 domain,
    scores scaled by sqrt(.5) * log2(e)), root_s (B,) fp32, attn (B, Tt, Ts) or an empty tensor.
    """
    B, Tt, E = q0.shape
    Ts = k.shape[1]
    if E < 1:  # every E-chunk loop would be empty and lse left unwritten
        raise ValueError(f"conv_attention: need E >= 1, got E = {E}")
    ctx = torch.empty_like(q0, memory_format=torch.contiguous_format)
    lse = torch.empty(B, Tt, device=q0.device, dtype=torch.float64)
    root_s = torch.empty(B, device=q0.device, dtype=torch.float32)
    attn = (torch.empty(B, Tt, Ts, device=q0.device, dtype=q0.dtype) if need_weights
            else q0.new_empty(0))
    if B == 0:  # no sentence: nothing to launch (a grid of 0 programs)
        return ctx, lse, root_s, attn
    a_strides = attn.stride() if need_weights else (0, 0, 0)
    mask_t, stride_mb, stride_mn, has_mask = _mask_args(mask, lse)

    _fwd[rows_grid(B, Tt, E, "BLOCK_M")](
        q0, k, v, mask_t, ctx, lse, root_s, attn,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *ctx.stride(), *a_strides,
        _bucket(Tt), _bucket(Ts),
        QK_SCALE=QK_SCALE_LOG2, HAS_MASK=has_mask, NEED_WEIGHTS=need_weights,
        **_dots(q0.dtype))
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
    if B == 0:  # no sentence: empty gradients, nothing to launch
        return torch.empty_like(q0), k.new_empty(0, Ts, E), v.new_empty(0, Ts, E)
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
                  **_dots(q0.dtype))

    if backward_strategy(B, Tt, Ts, q0.dtype) == "materialize":
        p_s = torch.empty(B, Tt, Ts, device=q0.device, dtype=q0.dtype)
        ds = torch.empty_like(p_s)

        _bwd_ds[tiles_grid(B, Tt, Ts)](
            q0, k, v, mask_t, ctx, do, lse, root_s, da, dextra, p_s, ds,
            Tt, Ts, E,
            *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides, *p_s.stride(),
            _bucket(Tt), _bucket(Ts), **common)
        return torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q0), torch.bmm(p_s.transpose(1, 2), do)

    dq0 = torch.empty_like(q0)
    dk = torch.empty(B, Ts, E, device=q0.device, dtype=q0.dtype)
    dv = torch.empty_like(dk)

    _bwd_dq[rows_grid(B, Tt, E, "BLOCK_M")](
        q0, k, v, mask_t, ctx, do, lse, root_s, da, dextra, stats, dq0,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides,
        _bucket(Tt), _bucket(Ts), **common)

    _bwd_dkdv[rows_grid(B, Ts, E, "BLOCK_N")](
        q0, k, v, mask_t, do, lse, root_s, da, stats, dk, dv,
        Tt, Ts, E,
        *q0.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *da_strides, *dk.stride(),
        _bucket(Tt), _bucket(Ts), **common)
    return dq0, dk, dv


def conv_attention_forward(x, target_embedding, encoder_keys, encoder_values, src_padding_mask, w_in, b_in,
                           w_out, b_out, need_weights: bool):
    """The whole op: shapes as in the module docstring (inputs validated by the public op, any strides).

    Returns out (B, Tt, C), attn (B, Tt, Ts) or an empty tensor, and what backward needs: ctx (B, Tt, E),
    q0 (B, Tt, E), lse (B, Tt) fp64, root_s (B,) fp32.
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
