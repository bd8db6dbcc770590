// conv_attention kernels: the fused masked softmax (forward) and its gradient (backward), between the batched
// GEMMs that conv_attention.cpp runs through ATen. All tensors are contiguous rows of Ts source positions, one row
// per (sentence b, target step t), row index b*Tt + t.
//
// No torch headers: this file is included by the .cu file, which must stay cheap to compile.
#pragma once

#include <cstdint>

namespace convs2s {

struct AttnSizes {
  int64_t B, Tt, Ts, E;
};

// acc_t: float for float/half/bfloat16 storage, double for double (the softmax statistics' precision). The scores
// are acc_t in both directions: the CUDA flash forward forms them as fp32 dot products, and a backward that
// recomputed them rounded to 16 bits would form p = exp(rounded score - lse), whose rows do not sum to 1.
// p_scaled may alias scores when scalar_t is acc_t (each element is read before it is written).
// lse is fp64 for every dtype: p = exp(score - lse) in the backward carries the rounding error of lse, an ulp of
// |lse| (up to ~10: m + log Ts) where the forward's exp(score - m) / l carries an ulp of the result; with an fp32
// lse the fp32 gradients' mean error was twice the PyTorch reference's (long_source, Tt_1 in the tests).
//
// Forward, per row (b, t):  p = softmax(scores) over the real (mask false) source positions, 0 on padding;
//   p_scaled <- sigma[b] * p  (the ctx GEMM's left operand, sigma = sqrt(number of real source tokens))
//   lse[b*Tt + t] = log(sum over real positions of exp(score))           (-inf if the row has no real position)
//   attn <- p  (unscaled) when attn is not null.
//   mask (B, Ts) bool, true = padding, or null (no padding).
template <typename scalar_t, typename acc_t>
void attn_softmax_fwd_cpu(const acc_t* scores, scalar_t* p_scaled, double* lse, scalar_t* attn, const bool* mask,
                          const acc_t* sigma, const AttnSizes& s);

// Backward, per row: with p = exp(scores - lse) on real positions (0 on padding), recomputed from the scores, and
//   dp = sigma[b] * dpt + grad_attn     (dpt = dctx @ V^T: the gradient wrt sigma * p; grad_attn may be null),
//   p_scaled <- sigma[b] * p            (the dV GEMM's left operand)
//   dpt      <- p * (dp - sum_j p_j dp_j)  (the gradient wrt the scores; exactly 0 on padding)
template <typename scalar_t, typename acc_t>
void attn_softmax_bwd_cpu(const acc_t* scores, scalar_t* p_scaled, scalar_t* dpt, const scalar_t* grad_attn,
                          const double* lse, const bool* mask, const acc_t* sigma, const AttnSizes& s);

// y <- (y + bias + residual) * scale, elementwise over y (rows, n) contiguous, bias (n,), residual (rows, n)
// contiguous: the projections' epilogue (q from x @ w_in^T and the target embedding, out from ctx @ w_out^T and x).
template <typename scalar_t>
void attn_bias_residual_scale_cpu(scalar_t* y, const scalar_t* bias, const scalar_t* residual, double scale,
                                  int64_t rows, int64_t n);

// The same on a CUDA stream (void*: this header needs no CUDA headers). dtype: a DTypeCode (common.h); scores
// and sigma are double for double, else float; lse is double.
void attn_softmax_fwd_cuda(int dtype, const void* scores, void* p_scaled, void* lse, void* attn, const bool* mask,
                           const void* sigma, const AttnSizes& s, void* stream);
void attn_softmax_bwd_cuda(int dtype, const void* scores, void* p_scaled, void* dpt, const void* grad_attn,
                           const void* lse, const bool* mask, const void* sigma, const AttnSizes& s, void* stream);
void attn_bias_residual_scale_cuda(int dtype, void* y, const void* bias, const void* residual, double scale,
                                   int64_t rows, int64_t n, void* stream);

// Flash-style forward on CUDA, without the (B, Tt, Ts) scores: for each row,
//   ctx[b, t] = sigma[b] * softmax(q[b, t] @ K[b]^T over real positions) @ V[b],   lse as above,
// one pass over source tiles with an online softmax. q (B, Tt, E), K and V (B, Ts, E) contiguous; ctx (B, Tt, E).
// Returns false (launching nothing) for shapes it does not cover: E = 0, E > kFlashMaxE or B > 65535 (the grid's
// y limit); returns true, launching nothing, when there is no row (B = 0 or Tt = 0).
constexpr int64_t kFlashMaxE = 1024;
bool attn_flash_fwd_cuda(int dtype, const void* q, const void* keys, const void* values, const bool* mask,
                         const void* sigma, void* ctx, void* lse, const AttnSizes& s, void* stream);

}  // namespace convs2s
