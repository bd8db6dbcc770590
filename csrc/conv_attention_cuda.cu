// CUDA kernels of conv_attention: the fused masked softmax and its gradient between the batched GEMMs (cuBLAS,
// called through ATen in conv_attention.cpp). See conv_attention.h for what each computes.
//
// One warp per (sentence, target step) row; lanes stride over the Ts source positions (any Ts >= 1), statistics
// in fp32 (fp64 for fp64) reduced with warp shuffles. A row is read a few times, from L1/L2: rows are short
// (Ts ~ 10-100 in translation), and the kernels are memory-bound passes next to the GEMMs.
//
// The forward without need_weights runs attn_flash_fwd instead: no scores tensor at all. One warp per target
// row, kFlashWarps rows of one sentence per block; the block stages tiles of source rows of K and V in shared
// memory (each tile then serves all of the block's rows), and each warp keeps its row's q and the ctx accumulator
// in registers, VPL values per lane (lane l holds channels l, l+32, ...), with an online softmax (running max and
// sum, fp32) across tiles. Scores are fp32 dot products (CUDA cores, no tensor cores: a row's work is a
// matrix-vector product, too thin for an MMA tile when Tt is small as in decoding).
//
// No torch headers here (one .cu including torch/extension.h costs ~2 minutes of nvcc per arch on the CI machine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "conv_attention.h"
#include "cuda_math.cuh"

namespace convs2s {
namespace {

constexpr int kWarps = 4;  // rows per block of 128 threads

using cuda_math::Acc;
using cuda_math::dispatch_dtype;
using cuda_math::load;
using cuda_math::store;

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// scores and p_scaled may alias (when T is A): no __restrict__ on them.
template <typename T, typename A>
__global__ void softmax_fwd_kernel(const A* scores, T* p_scaled, double* __restrict__ lse, T* __restrict__ attn,
                                   const bool* __restrict__ mask, const A* __restrict__ sigma, AttnSizes s) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= s.B * s.Tt) return;  // a whole warp leaves together: the shuffles below see full warps only
  const int64_t b = r / s.Tt, Ts = s.Ts;
  const bool* pad = mask ? mask + b * Ts : nullptr;
  const A* row = scores + r * Ts;
  T* out = p_scaled + r * Ts;
  const A neg_inf = -INFINITY;
  A m = neg_inf;
  for (int64_t j = lane; j < Ts; j += 32)
    if (!(pad && pad[j])) m = fmax(m, row[j]);
  m = warp_max(m);
  A sum = 0;
  if (m != neg_inf)
    for (int64_t j = lane; j < Ts; j += 32)
      if (!(pad && pad[j])) sum += exp_acc(row[j] - m);
  sum = warp_sum(sum);
  const A inv = sum > 0 ? A(1) / sum : A(0);
  if (lane == 0) lse[r] = sum > 0 ? double(m) + log(double(sum)) : -INFINITY;
  const A sg = sigma[b];
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(row[j] - m) * inv;
    store(out + j, sg * p);
    if (attn) store(attn + r * Ts + j, p);
  }
}

template <typename T, typename A>
__global__ void softmax_bwd_kernel(const A* scores, T* p_scaled, T* __restrict__ dpt,
                                   const T* __restrict__ grad_attn, const double* __restrict__ lse,
                                   const bool* __restrict__ mask, const A* __restrict__ sigma, AttnSizes s) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= s.B * s.Tt) return;
  const int64_t b = r / s.Tt, Ts = s.Ts;
  const bool* pad = mask ? mask + b * Ts : nullptr;
  const A* row = scores + r * Ts;
  T* out = p_scaled + r * Ts;
  T* drow = dpt + r * Ts;
  const T* ga = grad_attn ? grad_attn + r * Ts : nullptr;
  const double l = lse[r];
  const A sg = sigma[b];
  A dot = 0;
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(A(row[j] - l));
    dot += p * (sg * A(load(drow + j)) + (ga ? A(load(ga + j)) : A(0)));
  }
  dot = warp_sum(dot);
  for (int64_t j = lane; j < Ts; j += 32) {
    const A p = (pad && pad[j]) ? A(0) : exp_acc(A(row[j] - l));
    const A dp = sg * A(load(drow + j)) + (ga ? A(load(ga + j)) : A(0));
    store(out + j, sg * p);
    store(drow + j, p * (dp - dot));
  }
}

constexpr int kFlashWarps = 8;          // target rows per block
constexpr int kFlashSmemBytes = 48 * 1024;  // K and V tiles; the default per-block limit, no opt-in needed

template <typename T, typename A, int VPL>
__global__ void flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ keys, const T* __restrict__ values,
                                 const bool* __restrict__ mask, const A* __restrict__ sigma, T* __restrict__ ctx,
                                 double* __restrict__ lse, AttnSizes s, int tile) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_tile = reinterpret_cast<T*>(smem_raw);     // (tile, E)
  T* v_tile = k_tile + int64_t(tile) * s.E;       // (tile, E)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * kFlashWarps + warp;
  const bool active = t < s.Tt;                   // inactive warps still help load tiles and reach the barriers
  const int64_t E = s.E;
  const A neg_inf = -INFINITY;
  A qr[VPL], acc[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int64_t e = lane + 32 * i;
    qr[i] = (active && e < E) ? A(load(q + (b * s.Tt + t) * E + e)) : A(0);
    acc[i] = 0;
  }
  A m = neg_inf, l = 0;
  const T* k_b = keys + b * s.Ts * E;
  const T* v_b = values + b * s.Ts * E;
  for (int64_t j0 = 0; j0 < s.Ts; j0 += tile) {
    const int64_t n = min(int64_t(tile), s.Ts - j0);
    __syncthreads();  // the previous tile is consumed
    for (int64_t idx = threadIdx.x; idx < n * E; idx += blockDim.x) {
      k_tile[idx] = k_b[j0 * E + idx];
      v_tile[idx] = v_b[j0 * E + idx];
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t jj = 0; jj < n; ++jj) {
      if (mask && mask[b * s.Ts + j0 + jj]) continue;  // the same for the whole warp
      A dot = 0;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int64_t e = lane + 32 * i;
        if (e < E) dot += qr[i] * A(load(k_tile + jj * E + e));
      }
      const A score = warp_sum(dot);
      const A m_new = fmax(m, score);
      const A corr = exp_acc(m - m_new);  // 0 while m is -inf (no real position seen yet)
      const A p = exp_acc(score - m_new);
      l = l * corr + p;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int64_t e = lane + 32 * i;
        acc[i] = acc[i] * corr + (e < E ? p * A(load(v_tile + jj * E + e)) : A(0));
      }
      m = m_new;
    }
  }
  if (!active) return;
  const A scale = l > 0 ? sigma[b] / l : A(0);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int64_t e = lane + 32 * i;
    if (e < E) store(ctx + (b * s.Tt + t) * E + e, acc[i] * scale);
  }
  if (lane == 0) lse[b * s.Tt + t] = l > 0 ? double(m) + log(double(l)) : -INFINITY;
}

template <typename T, typename A>
bool launch_flash(const void* q, const void* keys, const void* values, const bool* mask, const void* sigma,
                  void* ctx, void* lse, const AttnSizes& s, cudaStream_t st) {
  if (s.E < 1 || s.E > kFlashMaxE || s.B > 65535) return false;  // E >= 1: the tile size divides by the row bytes
  if (s.B == 0 || s.Tt == 0) return true;  // nothing to compute (a grid of 0 blocks would be a launch error)
  const int64_t row_bytes = 2 * s.E * int64_t(sizeof(T));  // one source row of K and of V
  const int tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(64, kFlashSmemBytes / row_bytes)));
  const dim3 grid(static_cast<unsigned>((s.Tt + kFlashWarps - 1) / kFlashWarps), static_cast<unsigned>(s.B));
  const size_t smem = size_t(tile) * row_bytes;
  const int vpl = static_cast<int>((s.E + 31) / 32);
  auto go = [&](auto kernel) {
    kernel<<<grid, 32 * kFlashWarps, smem, st>>>(static_cast<const T*>(q), static_cast<const T*>(keys),
                                                 static_cast<const T*>(values), mask, static_cast<const A*>(sigma),
                                                 static_cast<T*>(ctx), static_cast<double*>(lse), s, tile);
  };
  // Registers per lane grow with VPL; instantiate a few sizes instead of one for the largest E.
  if (vpl <= 4) go(flash_fwd_kernel<T, A, 4>);
  else if (vpl <= 8) go(flash_fwd_kernel<T, A, 8>);
  else if (vpl <= 16) go(flash_fwd_kernel<T, A, 16>);
  else go(flash_fwd_kernel<T, A, 32>);
  return true;
}

template <typename T, typename A>
__global__ void bias_residual_scale_kernel(T* __restrict__ y, const T* __restrict__ bias,
                                           const T* __restrict__ residual, A scale, int64_t rows, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * n; i += int64_t(gridDim.x) * blockDim.x)
    store(y + i, (A(load(y + i)) + A(load(bias + i % n)) + A(load(residual + i))) * scale);
}

template <typename T, typename A>
void launch_bias_residual_scale(void* y, const void* bias, const void* residual, double scale, int64_t rows,
                                int64_t n, cudaStream_t st) {
  const int64_t blocks = std::min<int64_t>(65535, std::max<int64_t>(1, (rows * n + 255) / 256));
  bias_residual_scale_kernel<T, A><<<static_cast<unsigned>(blocks), 256, 0, st>>>(
      static_cast<T*>(y), static_cast<const T*>(bias), static_cast<const T*>(residual), A(scale), rows, n);
}

// At least one block (an empty grid is a launch error); the kernels' row guard idles it when there are no rows.
unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, (rows + kWarps - 1) / kWarps));
}

template <typename T, typename A>
void launch_fwd(const void* scores, void* p_scaled, void* lse, void* attn, const bool* mask, const void* sigma,
                const AttnSizes& s, cudaStream_t st) {
  softmax_fwd_kernel<T, A><<<blocks_for(s.B * s.Tt), 32 * kWarps, 0, st>>>(
      static_cast<const A*>(scores), static_cast<T*>(p_scaled), static_cast<double*>(lse), static_cast<T*>(attn), mask,
      static_cast<const A*>(sigma), s);
}

template <typename T, typename A>
void launch_bwd(const void* scores, void* p_scaled, void* dpt, const void* grad_attn, const void* lse,
                const bool* mask, const void* sigma, const AttnSizes& s, cudaStream_t st) {
  softmax_bwd_kernel<T, A><<<blocks_for(s.B * s.Tt), 32 * kWarps, 0, st>>>(
      static_cast<const A*>(scores), static_cast<T*>(p_scaled), static_cast<T*>(dpt),
      static_cast<const T*>(grad_attn), static_cast<const double*>(lse), mask, static_cast<const A*>(sigma), s);
}

}  // namespace

void attn_softmax_fwd_cuda(int dtype, const void* scores, void* p_scaled, void* lse, void* attn, const bool* mask,
                           const void* sigma, const AttnSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_fwd<T, typename Acc<T>::type>(scores, p_scaled, lse, attn, mask, sigma, s,
                                         static_cast<cudaStream_t>(stream));
  });
}

void attn_softmax_bwd_cuda(int dtype, const void* scores, void* p_scaled, void* dpt, const void* grad_attn,
                           const void* lse, const bool* mask, const void* sigma, const AttnSizes& s, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_bwd<T, typename Acc<T>::type>(scores, p_scaled, dpt, grad_attn, lse, mask, sigma, s,
                                         static_cast<cudaStream_t>(stream));
  });
}

void attn_bias_residual_scale_cuda(int dtype, void* y, const void* bias, const void* residual, double scale,
                                   int64_t rows, int64_t n, void* stream) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_bias_residual_scale<T, typename Acc<T>::type>(y, bias, residual, scale, rows, n,
                                                         static_cast<cudaStream_t>(stream));
  });
}

bool attn_flash_fwd_cuda(int dtype, const void* q, const void* keys, const void* values, const bool* mask,
                         const void* sigma, void* ctx, void* lse, const AttnSizes& s, void* stream) {
  bool launched = false;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launched = launch_flash<T, typename Acc<T>::type>(q, keys, values, mask, sigma, ctx, lse, s,
                                                      static_cast<cudaStream_t>(stream));
  });
  return launched;
}

}  // namespace convs2s
