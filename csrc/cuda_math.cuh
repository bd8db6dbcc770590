// The CUDA kernels' dtype dispatch, element access and shared elementwise helpers. Loads widen to the compute type (float; double for double),
// stores round to nearest: overloads with the conversion intrinsics, since torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ (no implicit half <-> float).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace convs2s {
namespace cuda_math {

// The compute type of a storage type: float, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Calls f with a null pointer of the storage type named by a DTypeCode (common.h); the launchers' dtype dispatch.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kDTypeFloat: f(static_cast<float*>(nullptr)); break;
    case kDTypeDouble: f(static_cast<double*>(nullptr)); break;
    case kDTypeHalf: f(static_cast<__half*>(nullptr)); break;
    case kDTypeBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

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

}  // namespace cuda_math
}  // namespace convs2s

// Elementwise kernels: each thread takes indices i, i + gridDim.x * blockDim.x, ... below n (int64 offsets).
#define GRID_STRIDE_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)
