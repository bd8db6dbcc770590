// glu_conv_step kernels: the data movement and elementwise parts around the step's one GEMM (which runs through
// ATen in glu_conv_step.cpp).
//
// One decoding step of a causal glu_conv of width k for B rows: window = [conv_state[b], x[b]] (B, k*C_in),
// h = window @ W.view(k*C_in, 2*C_out), y = GLU(h + bias) (+ residual, * sqrt(0.5)). conv_state (B, k-1, C_in)
// holds each row's last k-1 inputs and is shifted in place by one input (the oldest dropped, x appended).
//
// No torch headers: this file is included by the .cu file, which must stay cheap to compile.
#pragma once

#include <cstdint>

namespace convs2s {

struct GluConvStepSizes {
  int64_t B, C_in, C_out, k;
  int64_t sx_b;     // row stride of x (elements); its channels are contiguous
  int64_t sr_b;     // row stride of residual; its channels are contiguous
  double scale;     // sqrt(0.5) with a residual, else 1 (double: a float sqrt(0.5) is off by 2e-8)
};

// window (B, k*C_in) contiguous <- [state[b, 0], ..., state[b, k-2], x[b]] per row b; then, in the same pass,
// state (B, k-1, C_in) contiguous <- window[b, C_in:] (the last k-1 inputs including x). The GEMM reads only the
// window, so the state may be shifted before it runs.
template <typename scalar_t>
void glu_conv_step_pack_cpu(const scalar_t* x, scalar_t* state, scalar_t* window, const GluConvStepSizes& s);

// y[b, c] = (glu(h[b] + bias)[c] + residual[b, c]) * scale      (residual term only if given)
//   h (B, 2*C_out) contiguous = window @ W without the bias, bias (2*C_out,) contiguous or null, residual rows
//   strided as sizes says or null, y (B, C_out) contiguous.
template <typename scalar_t>
void glu_conv_step_epilogue_cpu(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                                const GluConvStepSizes& s);

// The same kernels on a CUDA stream (passed as void* so that this header needs no CUDA headers).
// dtype: a DTypeCode (common.h). Errors surface through cudaGetLastError() after the call.
void glu_conv_step_pack_cuda(int dtype, const void* x, void* state, void* window, const GluConvStepSizes& s,
                             void* stream);
void glu_conv_step_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                                 const GluConvStepSizes& s, void* stream);

}  // namespace convs2s
