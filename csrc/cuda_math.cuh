// Element access for the CUDA kernels: loads widen to the compute type (float; double for double), stores round
// to nearest. Overloads with the conversion intrinsics, since torch builds with __CUDA_NO_HALF_CONVERSIONS__ (no
// implicit half <-> float).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace convs2s {
namespace cuda_math {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace cuda_math
}  // namespace convs2s
