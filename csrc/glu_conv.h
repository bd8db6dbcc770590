// glu_conv kernels: the data movement and elementwise parts around the convolution's GEMMs (which run through
// ATen in glu_conv.cpp).
//
// The convolution is one GEMM on "im2col" rows: xcol (B*T, k*C_in), row (b, t) = [x[b, t + j - pad_left] for
// j < k] with zeros outside [0, T); h = xcol @ W.view(k*C_in, 2*C_out). Backward: dW = xcol^T @ dh (one GEMM),
// dcol = dh @ W^T, and col2im sums dcol's k taps back into dx.
//
// No torch headers: this file is included by the .cu files, which must stay cheap to compile.
#pragma once

#include <cstdint>

namespace convs2s {

struct GluConvSizes {
  int64_t B, T, C_in, C_out, k, pad_left;
  int64_t sx_b, sx_t, sx_c;  // strides of x (elements): im2col reads x in place, contiguous or not
  double scale;              // sqrt(0.5) with a residual, else 1 (double: a float sqrt(0.5) is off by 2e-8)
};

// xcol (B*T, k*C_in) <- the im2col rows of x (B, T, C_in) (strided as sizes says).
template <typename scalar_t>
void glu_conv_im2col_cpu(const scalar_t* x, scalar_t* xcol, const GluConvSizes& s);

// dx (B, T, C_in) contiguous <- dx[b, t] = sum_j dcol[b, t + pad_left - j, j] over the taps j that read x[b, t].
template <typename scalar_t>
void glu_conv_col2im_cpu(const scalar_t* dcol, scalar_t* dx, const GluConvSizes& s);

// y[b, t, c] = (glu(h[b, t] + bias)[c] + residual[b, t, c]) * scale      (residual term only if given)
//   h (B*T, 2*C_out) = conv(x) without the bias, bias (2*C_out,) or null, residual (B, T, C_out) contiguous or
//   null, y (B, T, C_out) contiguous.
template <typename scalar_t>
void glu_conv_epilogue_cpu(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                           const GluConvSizes& s);

// The GLU gradient: dh[b, t] = d glu / d h at (h + bias), applied to grad_y[b, t] * scale;
//   grad_residual = grad_y * scale when grad_residual is not null. grad_y (B, T, C_out) contiguous.
template <typename scalar_t>
void glu_conv_prologue_cpu(const scalar_t* grad_y, const scalar_t* h, const scalar_t* bias, scalar_t* dh,
                           scalar_t* grad_residual, const GluConvSizes& s);

// The same kernels on a CUDA stream (passed as void* so that this header needs no CUDA headers).
// dtype: 0 float, 1 double, 2 half, 3 bfloat16. Errors surface through cudaGetLastError() after the call.
void glu_conv_im2col_cuda(int dtype, const void* x, void* xcol, const GluConvSizes& s, void* stream);
void glu_conv_col2im_cuda(int dtype, const void* dcol, void* dx, const GluConvSizes& s, void* stream);
void glu_conv_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                            const GluConvSizes& s, void* stream);
void glu_conv_prologue_cuda(int dtype, const void* grad_y, const void* h, const void* bias, void* dh,
                            void* grad_residual, const GluConvSizes& s, void* stream);

}  // namespace convs2s
