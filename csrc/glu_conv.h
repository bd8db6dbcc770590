// glu_conv kernels: the elementwise parts around the per-tap GEMMs (which run through ATen in glu_conv.cpp).
//
// Layout shared by every kernel here (the "padded-flat" layout, see glu_conv.cpp):
//   the input is zero-padded to L = T + k - 1 steps per sentence and flattened to (B*L, C_in) rows, so one GEMM per
//   tap j covers every sentence: h_flat[r] = sum_j x_flat[r + j] @ W[j] for r in [0, N), N = B*L - (k-1).
//   Row r = b*L + t holds output step t of sentence b when t < T; rows with t >= T mix two sentences and are
//   ignored (forward) or given zero gradient (backward).
//   h_flat (N, 2*C_out) holds conv(x) without the bias; the kernels add the bias.
//
// No torch headers: this file is included by the .cu file, which must stay cheap to compile.
#pragma once

#include <cstdint>

namespace convs2s {

struct GluConvSizes {
  int64_t B, T, L, C_out;  // L = T + k - 1 rows per sentence in h_flat; rows = B*L - (k-1)
  double scale;            // sqrt(0.5) with a residual, else 1 (double: a float sqrt(0.5) is off by 2e-8)
};

// y[b, t, c] = (glu(h_flat[b*L + t] + bias)[c] + residual[b, t, c]) * scale      (residual term only if given)
//   h_flat (rows, 2*C_out), bias (2*C_out,) or null, residual (B, T, C_out) contiguous or null,
//   y (B, T, C_out) contiguous.
template <typename scalar_t>
void glu_conv_epilogue_cpu(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                           const GluConvSizes& s);

// The GLU gradient, written in the padded-flat layout of h_flat:
//   dh[b*L + t] = d glu / d h at (h_flat + bias) applied to grad_y[b, t] * scale; rows with t >= T are zero.
//   grad_residual[b, t, c] = grad_y[b, t, c] * scale when grad_residual is not null.
//   grad_y (B, T, C_out) contiguous, dh (rows, 2*C_out).
template <typename scalar_t>
void glu_conv_prologue_cpu(const scalar_t* grad_y, const scalar_t* h, const scalar_t* bias, scalar_t* dh,
                           scalar_t* grad_residual, const GluConvSizes& s);

// The same two kernels on a CUDA stream (passed as void* so that this header needs no CUDA headers).
// dtype: 0 float, 1 double, 2 half, 3 bfloat16. Errors surface through cudaGetLastError() after the call.
void glu_conv_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                            const GluConvSizes& s, void* stream);
void glu_conv_prologue_cuda(int dtype, const void* grad_y, const void* h, const void* bias, void* dh,
                            void* grad_residual, const GluConvSizes& s, void* stream);

}  // namespace convs2s
