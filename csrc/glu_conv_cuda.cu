// CUDA kernels of glu_conv (see glu_conv.h): im2col and col2im around the convolution's GEMM (cuBLAS, called
// through ATen in glu_conv.cpp), the fused GLU epilogue and the fused GLU-gradient prologue.
//
// Why not an implicit-GEMM kernel with the GLU fused: the GEMM is ~97% of the FLOPs and cuBLAS runs it near peak;
// the other kernels are memory-bound passes at copy speed. A fused implicit-GEMM kernel would save the round trips
// of xcol and h through memory, at the risk of losing more than that to a GEMM slower than cuBLAS, written
// without a GPU to tune on.
//
// Every kernel: one thread per output element, consecutive threads on consecutive channels (coalesced), a
// grid-stride loop with 64-bit indices. No torch headers here (one .cu including torch/extension.h costs ~2
// minutes of nvcc per arch on the CI machine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda_math.cuh"
#include "glu_conv.h"

namespace convs2s {
namespace {

using cuda_math::Acc;
using cuda_math::dispatch_dtype;
using cuda_math::load;
using cuda_math::sigmoid;
using cuda_math::store;

template <typename T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ xcol, GluConvSizes s) {
  const int64_t C = s.C_in;
  GRID_STRIDE_LOOP(i, s.B * s.T * s.k * C) {
    const int64_t c = i % C, j = (i / C) % s.k, bt = i / (C * s.k);
    const int64_t b = bt / s.T, ts = bt % s.T + j - s.pad_left;
    if (ts >= 0 && ts < s.T) xcol[i] = x[b * s.sx_b + ts * s.sx_t + c * s.sx_c];
    else store(xcol + i, typename Acc<T>::type(0));
  }
}

template <typename T>
__global__ void col2im_kernel(const T* __restrict__ dcol, T* __restrict__ dx, GluConvSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_in;
  GRID_STRIDE_LOOP(i, s.B * s.T * C) {
    const int64_t c = i % C, bt = i / C;
    const int64_t b = bt / s.T, t = bt % s.T;
    acc_t acc = 0;
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t tr = t + s.pad_left - j;  // the output row whose tap j read x[b, t]
      if (tr >= 0 && tr < s.T) acc += load(dcol + ((b * s.T + tr) * s.k + j) * C + c);
    }
    store(dx + i, acc);
  }
}

template <typename T>
__global__ void epilogue_kernel(const T* __restrict__ h, const T* __restrict__ bias, const T* __restrict__ residual,
                                T* __restrict__ y, GluConvSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_out;
  GRID_STRIDE_LOOP(i, s.B * s.T * C) {
    const int64_t c = i % C, bt = i / C;
    acc_t a = load(h + bt * 2 * C + c);
    acc_t g = load(h + bt * 2 * C + C + c);
    if (bias) {
      a += load(bias + c);
      g += load(bias + C + c);
    }
    acc_t v = a * sigmoid(g);
    if (residual) v = (v + load(residual + i)) * acc_t(s.scale);
    store(y + i, v);
  }
}

template <typename T>
__global__ void prologue_kernel(const T* __restrict__ grad_y, const T* __restrict__ h, const T* __restrict__ bias,
                                T* __restrict__ dh, T* __restrict__ grad_residual, GluConvSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_out;
  GRID_STRIDE_LOOP(i, s.B * s.T * C) {
    const int64_t c = i % C, bt = i / C;
    acc_t a = load(h + bt * 2 * C + c);
    acc_t g = load(h + bt * 2 * C + C + c);
    if (bias) {
      a += load(bias + c);
      g += load(bias + C + c);
    }
    const acc_t sig = sigmoid(g);
    const acc_t d = load(grad_y + i) * acc_t(s.scale);
    store(dh + bt * 2 * C + c, d * sig);
    store(dh + bt * 2 * C + C + c, d * a * sig * (acc_t(1) - sig));
    if (grad_residual) store(grad_residual + i, d);
  }
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  // Up to 65535 blocks of 256 threads (more than any current GPU holds at once); the grid-stride loop does the rest.
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

}  // namespace

void glu_conv_im2col_cuda(int dtype, const void* x, void* xcol, const GluConvSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    im2col_kernel<T><<<blocks_for(s.B * s.T * s.k * s.C_in), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(xcol), s);
  });
}

void glu_conv_col2im_cuda(int dtype, const void* dcol, void* dx, const GluConvSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    col2im_kernel<T><<<blocks_for(s.B * s.T * s.C_in), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dcol), static_cast<T*>(dx), s);
  });
}

void glu_conv_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                            const GluConvSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    epilogue_kernel<T><<<blocks_for(s.B * s.T * s.C_out), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(h), static_cast<const T*>(bias), static_cast<const T*>(residual), static_cast<T*>(y),
        s);
  });
}

void glu_conv_prologue_cuda(int dtype, const void* grad_y, const void* h, const void* bias, void* dh,
                            void* grad_residual, const GluConvSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    prologue_kernel<T><<<blocks_for(s.B * s.T * s.C_out), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad_y), static_cast<const T*>(h), static_cast<const T*>(bias), static_cast<T*>(dh),
        static_cast<T*>(grad_residual), s);
  });
}

}  // namespace convs2s
