// CUDA kernels of glu_conv_step (see glu_conv_step.h): the window pack with the state shift before the step's GEMM
// (cuBLAS, called through ATen in glu_conv_step.cpp), and the fused GLU epilogue after it.
//
// Every kernel: one thread per element of a row's channels, consecutive threads on consecutive channels
// (coalesced), a grid-stride loop with 64-bit indices. The pack thread of (b, c) owns column c of row b's state:
// it reads the k-1 old values and writes them back one slot earlier, so no other thread touches them. No torch
// headers here (one .cu including torch/extension.h costs ~2 minutes of nvcc per arch on the CI machine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda_math.cuh"
#include "glu_conv_step.h"

namespace convs2s {
namespace {

using cuda_math::Acc;
using cuda_math::dispatch_dtype;
using cuda_math::load;
using cuda_math::sigmoid;
using cuda_math::store;

template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, T* __restrict__ state, T* __restrict__ window,
                            GluConvStepSizes s) {
  const int64_t C = s.C_in;
  GRID_STRIDE_LOOP(i, s.B * C) {
    const int64_t c = i % C, b = i / C;
    T* st = state + b * (s.k - 1) * C + c;
    T* win = window + b * s.k * C + c;
    for (int64_t j = 0; j < s.k - 1; ++j) {
      const T v = st[j * C];
      win[j * C] = v;
      if (j > 0) st[(j - 1) * C] = v;               // slot j-1 was read in the previous iteration
    }
    const T xv = x[b * s.sx_b + c];
    win[(s.k - 1) * C] = xv;
    if (s.k > 1) st[(s.k - 2) * C] = xv;
  }
}

template <typename T>
__global__ void epilogue_kernel(const T* __restrict__ h, const T* __restrict__ bias, const T* __restrict__ residual,
                                T* __restrict__ y, GluConvStepSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_out;
  GRID_STRIDE_LOOP(i, s.B * C) {
    const int64_t c = i % C, b = i / C;
    acc_t a = load(h + b * 2 * C + c);
    acc_t g = load(h + b * 2 * C + C + c);
    if (bias) {
      a += load(bias + c);
      g += load(bias + C + c);
    }
    acc_t v = a * sigmoid(g);
    if (residual) v = (v + load(residual + b * s.sr_b + c)) * acc_t(s.scale);
    store(y + i, v);
  }
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  // Up to 65535 blocks of 256 threads (more than any current GPU holds at once); the grid-stride loop does the rest.
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

}  // namespace

void glu_conv_step_pack_cuda(int dtype, const void* x, void* state, void* window, const GluConvStepSizes& s,
                             void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pack_kernel<T><<<blocks_for(s.B * s.C_in), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(state), static_cast<T*>(window), s);
  });
}

void glu_conv_step_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                                 const GluConvStepSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    epilogue_kernel<T><<<blocks_for(s.B * s.C_out), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(h), static_cast<const T*>(bias), static_cast<const T*>(residual), static_cast<T*>(y),
        s);
  });
}

}  // namespace convs2s
