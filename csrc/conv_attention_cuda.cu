// CUDA kernels of conv_attention: the fused masked softmax and its gradient between the batched GEMMs (cuBLAS,
// called through ATen in conv_attention.cpp). See conv_attention.h for what each computes.
//
// One warp per (sentence, target step) row; lanes stride over the Ts source positions (any Ts >= 1), statistics
// in fp32 (fp64 for fp64) reduced with warp shuffles. A row is read a few times, from L1/L2: rows are short
// (Ts ~ 10-100 in translation), and the kernels are memory-bound passes next to the GEMMs.
//
// No torch headers here (one .cu including torch/extension.h costs ~2 minutes of nvcc per arch on the CI machine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "conv_attention.h"

namespace convs2s {
namespace {

constexpr int kWarps = 4;  // rows per block of 128 threads

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, typename A>
__global__ void softmax_fwd_kernel(T* __restrict__ scores, A* __restrict__ lse, T* __restrict__ attn,
                                   const bool* __restrict__ mask, const A* __restrict__ sigma, AttnSizes s) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= s.B * s.Tt) return;  // a whole warp leaves together: the shuffles below see full warps only
  const int64_t b = r / s.Tt, Ts = s.Ts;
  const bool* pad = mask ? mask + b * Ts : nullptr;
  T* row = scores + r * Ts;
  const A neg_inf = -INFINITY;
  A m = neg_inf;
  for (int64_t j = lane; j < Ts; j += 32)
    if (!(pad && pad[j])) m = fmax(m, A(load(row + j)));
  m = warp_max(m);
  A sum = 0;
  if (m != neg_inf)
    for (int64_t j = lane; j < Ts; j += 32)
      if (!(pad && pad[j])) sum += exp_acc(A(load(row + j)) - m);
  sum = warp_sum(sum);
  const A inv = sum > 0 ? A(1) / sum : A(0);
  if (lane == 0) lse[r] = sum > 0 ? m + log_acc(sum) : neg_inf;
  const A sg = sigma[b];
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(A(load(row + j)) - m) * inv;
    store(row + j, sg * p);
    if (attn) store(attn + r * Ts + j, p);
  }
}

template <typename T, typename A>
__global__ void softmax_bwd_kernel(T* __restrict__ scores, T* __restrict__ dpt, const T* __restrict__ grad_attn,
                                   const A* __restrict__ lse, const bool* __restrict__ mask,
                                   const A* __restrict__ sigma, AttnSizes s) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= s.B * s.Tt) return;
  const int64_t b = r / s.Tt, Ts = s.Ts;
  const bool* pad = mask ? mask + b * Ts : nullptr;
  T* row = scores + r * Ts;
  T* drow = dpt + r * Ts;
  const T* ga = grad_attn ? grad_attn + r * Ts : nullptr;
  const A l = lse[r], sg = sigma[b];
  A dot = 0;
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(A(load(row + j)) - l);
    dot += p * (sg * A(load(drow + j)) + (ga ? A(load(ga + j)) : A(0)));
  }
  dot = warp_sum(dot);
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(A(load(row + j)) - l);
    const A dp = sg * A(load(drow + j)) + (ga ? A(load(ga + j)) : A(0));
    store(row + j, sg * p);
    store(drow + j, p * (dp - dot));
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

template <typename T, typename A>
void launch_fwd(void* scores, void* lse, void* attn, const bool* mask, const void* sigma, const AttnSizes& s,
                cudaStream_t st) {
  softmax_fwd_kernel<T, A><<<blocks_for(s.B * s.Tt), 32 * kWarps, 0, st>>>(
      static_cast<T*>(scores), static_cast<A*>(lse), static_cast<T*>(attn), mask, static_cast<const A*>(sigma), s);
}

template <typename T, typename A>
void launch_bwd(void* scores, void* dpt, const void* grad_attn, const void* lse, const bool* mask, const void* sigma,
                const AttnSizes& s, cudaStream_t st) {
  softmax_bwd_kernel<T, A><<<blocks_for(s.B * s.Tt), 32 * kWarps, 0, st>>>(
      static_cast<T*>(scores), static_cast<T*>(dpt), static_cast<const T*>(grad_attn), static_cast<const A*>(lse),
      mask, static_cast<const A*>(sigma), s);
}

}  // namespace

void attn_softmax_fwd_cuda(int dtype, void* scores, void* lse, void* attn, const bool* mask, const void* sigma,
                           const AttnSizes& s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_fwd<float, float>(scores, lse, attn, mask, sigma, s, st); break;
    case 1: launch_fwd<double, double>(scores, lse, attn, mask, sigma, s, st); break;
    case 2: launch_fwd<__half, float>(scores, lse, attn, mask, sigma, s, st); break;
    case 3: launch_fwd<__nv_bfloat16, float>(scores, lse, attn, mask, sigma, s, st); break;
  }
}

void attn_softmax_bwd_cuda(int dtype, void* scores, void* dpt, const void* grad_attn, const void* lse,
                           const bool* mask, const void* sigma, const AttnSizes& s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_bwd<float, float>(scores, dpt, grad_attn, lse, mask, sigma, s, st); break;
    case 1: launch_bwd<double, double>(scores, dpt, grad_attn, lse, mask, sigma, s, st); break;
    case 2: launch_bwd<__half, float>(scores, dpt, grad_attn, lse, mask, sigma, s, st); break;
    case 3: launch_bwd<__nv_bfloat16, float>(scores, dpt, grad_attn, lse, mask, sigma, s, st); break;
  }
}

}  // namespace convs2s
