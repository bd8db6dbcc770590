// CUDA kernels of glu_conv: the fused GLU epilogue and GLU-gradient prologue around the per-tap GEMMs (cuBLAS,
// called through ATen in glu_conv.cpp). See glu_conv.h for the padded-flat layout.
//
// Why not an implicit-GEMM kernel with the GLU fused: the GEMMs are ~97% of the FLOPs and cuBLAS runs them near
// peak; the epilogue and prologue are memory-bound passes (read h once, write y once), which these kernels do at
// copy speed. A fused implicit-GEMM kernel would save one round trip of h through memory, at the risk of losing
// more than that to a GEMM slower than cuBLAS, written without a GPU to tune on.
//
// No torch headers here (one .cu including torch/extension.h costs ~2 minutes of nvcc per arch on the CI machine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "glu_conv.h"

namespace convs2s {
namespace {

// Loads widen to the compute type (float; double for double), stores round to nearest. Overloads with the
// conversion intrinsics, since torch builds with __CUDA_NO_HALF_CONVERSIONS__ (no implicit half <-> float).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }
__device__ __forceinline__ double sigmoid(double g) { return 1.0 / (1.0 + exp(-g)); }

// One thread per output element (b, t, c); consecutive threads take consecutive channels, so loads of h's two
// halves, bias, residual and the store of y are coalesced. Grid-stride, 64-bit indices.
template <typename T>
__global__ void epilogue_kernel(const T* __restrict__ h, const T* __restrict__ bias, const T* __restrict__ residual,
                                T* __restrict__ y, GluConvSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_out;
  const int64_t n = s.B * s.T * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, bt = i / C;
    const int64_t r = (bt / s.T) * s.L + bt % s.T;
    acc_t a = load(h + r * 2 * C + c);
    acc_t g = load(h + r * 2 * C + C + c);
    if (bias) {
      a += load(bias + c);
      g += load(bias + C + c);
    }
    acc_t v = a * sigmoid(g);
    if (residual) v = (v + load(residual + i)) * acc_t(s.scale);
    store(y + i, v);
  }
}

// One thread per (row of h_flat, channel): writes both halves of dh for that channel (zero on rows that straddle two
// sentences) and the residual's gradient.
template <typename T>
__global__ void prologue_kernel(const T* __restrict__ grad_y, const T* __restrict__ h, const T* __restrict__ bias,
                                T* __restrict__ dh, T* __restrict__ grad_residual, GluConvSizes s) {
  using acc_t = typename Acc<T>::type;
  const int64_t C = s.C_out;
  const int64_t rows = s.B * s.L - (s.L - s.T);
  const int64_t n = rows * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, r = i / C;
    const int64_t b = r / s.L, t = r % s.L;
    if (t >= s.T) {
      store(dh + r * 2 * C + c, acc_t(0));
      store(dh + r * 2 * C + C + c, acc_t(0));
      continue;
    }
    acc_t a = load(h + r * 2 * C + c);
    acc_t g = load(h + r * 2 * C + C + c);
    if (bias) {
      a += load(bias + c);
      g += load(bias + C + c);
    }
    const acc_t sig = sigmoid(g);
    const int64_t o = (b * s.T + t) * C + c;
    const acc_t d = load(grad_y + o) * acc_t(s.scale);
    store(dh + r * 2 * C + c, d * sig);
    store(dh + r * 2 * C + C + c, d * a * sig * (acc_t(1) - sig));
    if (grad_residual) store(grad_residual + o, d);
  }
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  // Enough blocks to fill any current GPU (132 SMs x 8 blocks of 256 threads); the grid-stride loop covers the rest.
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

template <typename T>
void launch_epilogue(const void* h, const void* bias, const void* residual, void* y, const GluConvSizes& s,
                     cudaStream_t stream) {
  const int64_t n = s.B * s.T * s.C_out;
  epilogue_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const T*>(h), static_cast<const T*>(bias),
                                                             static_cast<const T*>(residual), static_cast<T*>(y), s);
}

template <typename T>
void launch_prologue(const void* grad_y, const void* h, const void* bias, void* dh, void* grad_residual,
                     const GluConvSizes& s, cudaStream_t stream) {
  const int64_t n = (s.B * s.L - (s.L - s.T)) * s.C_out;
  prologue_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(h), static_cast<const T*>(bias), static_cast<T*>(dh),
      static_cast<T*>(grad_residual), s);
}

}  // namespace

void glu_conv_epilogue_cuda(int dtype, const void* h, const void* bias, const void* residual, void* y,
                            const GluConvSizes& s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_epilogue<float>(h, bias, residual, y, s, st); break;
    case 1: launch_epilogue<double>(h, bias, residual, y, s, st); break;
    case 2: launch_epilogue<__half>(h, bias, residual, y, s, st); break;
    case 3: launch_epilogue<__nv_bfloat16>(h, bias, residual, y, s, st); break;
  }
}

void glu_conv_prologue_cuda(int dtype, const void* grad_y, const void* h, const void* bias, void* dh,
                            void* grad_residual, const GluConvSizes& s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_prologue<float>(grad_y, h, bias, dh, grad_residual, s, st); break;
    case 1: launch_prologue<double>(grad_y, h, bias, dh, grad_residual, s, st); break;
    case 2: launch_prologue<__half>(grad_y, h, bias, dh, grad_residual, s, st); break;
    case 3: launch_prologue<__nv_bfloat16>(grad_y, h, bias, dh, grad_residual, s, st); break;
  }
}

}  // namespace convs2s
