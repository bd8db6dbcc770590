// What every op's C++ shares: constants, the dtype codes of the CUDA launchers, and (in host C++ files only) the
// argument checks, the CPU dtype dispatch and the CUDA stream handed to the launchers.
//
// The .cu files include this header too; they see only the part above the `#ifndef __CUDACC__` line, which needs
// no torch headers (a .cu file that includes torch/extension.h took ~1m50s to compile here).
#pragma once

#include <cstdint>

namespace convs2s {

constexpr double kSqrtHalf = 0.70710678118654752440;

// dtype codes: the `int dtype` argument of every *_cuda launcher (void* interfaces keep CUDA headers out of the
// host files and torch headers out of the .cu files). cuda_math.cuh's dispatch_dtype maps them to storage types.
enum DTypeCode : int { kDTypeFloat = 0, kDTypeDouble = 1, kDTypeHalf = 2, kDTypeBFloat16 = 3 };

}  // namespace convs2s

#ifndef __CUDACC__
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#ifdef CONVS2S_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

// The CPU kernels' dtype dispatch: float, double, half, bfloat16 (scalar_t inside the lambda).
#define CONVS2S_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace convs2s {

// The launcher code of a tensor's dtype; `op` prefixes the error for any other dtype.
inline int dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return kDTypeFloat;
    case at::kDouble: return kDTypeDouble;
    case at::kHalf: return kDTypeHalf;
    case at::kBFloat16: return kDTypeBFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float, double, half, bfloat16 only)");
  }
}

// t shares x's dtype and device.
inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; all floating inputs must share one dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all inputs must share one device");
}

// t has exactly the sizes `expected`; `what` names the dimensions, e.g. "(B, T, C_out)".
inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                        const char* what) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must be ", what, " = ", expected, ", got shape ", t.sizes());
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

#ifdef CONVS2S_WITH_CUDA
// The current stream of the current device, as the launchers take it.
inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

}  // namespace convs2s
#endif  // __CUDACC__
