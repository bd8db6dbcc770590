// glu_conv_step: argument checks, the step's one GEMM (ATen: MKL/OpenBLAS on CPU, cuBLAS on CUDA), and dispatch of
// the kernels around it (glu_conv_step_cpu.cpp, glu_conv_step_cuda.cu) by device and dtype; the op's schema
// (a TORCH_LIBRARY_FRAGMENT of the convs2s namespace) at the end.
//
// One step: pack + shift (window (B, k*C_in) <- [conv_state, x]; conv_state <- its last k-1 inputs including x),
// h = window @ W.view(k*C_in, 2*C_out) (one GEMM with K = k*C_in, the reshape a view of the TBC weight), then the
// fused epilogue y = GLU(h + bias) (+ residual, * sqrt(0.5)). For k = 1 the GEMM reads x itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "glu_conv_step.h"

#ifdef CONVS2S_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace convs2s {
namespace {

constexpr double kStepSqrtHalf = 0.70710678118654752440;

void check_same_as_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "glu_conv_step: ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == x.device(), "glu_conv_step: ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all inputs must share one device");
}

void check_inputs(const at::Tensor& x, const at::Tensor& state, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2, "glu_conv_step: x must be (B, C_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "glu_conv_step: weight must be (k, C_in, 2*C_out), got shape ", weight.sizes());
  TORCH_CHECK(x.is_floating_point(), "glu_conv_step: x must be a floating-point tensor, got ", x.scalar_type());
  const int64_t B = x.size(0), c_in = x.size(1), k = weight.size(0);
  TORCH_CHECK(k >= 1, "glu_conv_step: weight must have kernel width k >= 1, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == c_in, "glu_conv_step: weight has C_in = ", weight.size(1),
              " (dim 1 of (k, C_in, 2*C_out)) but x has C_in = ", c_in, " (dim 1 of (B, C_in))");
  TORCH_CHECK(c_in >= 1, "glu_conv_step: x must have C_in >= 1 channels, got shape ", x.sizes());
  TORCH_CHECK(weight.size(2) > 0 && weight.size(2) % 2 == 0,
              "glu_conv_step: weight's last dimension must be 2*C_out (even, > 0) for the GLU, got ", weight.size(2));
  const int64_t c_out = weight.size(2) / 2;
  TORCH_CHECK(state.dim() == 3 && state.size(0) == B && state.size(1) == k - 1 && state.size(2) == c_in,
              "glu_conv_step: conv_state must be (B, k-1, C_in) = (", B, ", ", k - 1, ", ", c_in, "), got shape ",
              state.sizes());
  TORCH_CHECK(state.is_contiguous(), "glu_conv_step: conv_state must be contiguous (it is updated in place), got "
              "strides ", state.strides());
  check_same_as_x("weight", weight, x);
  check_same_as_x("conv_state", state, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 2 * c_out, "glu_conv_step: bias must be (2*C_out,) = (",
                2 * c_out, ",), got shape ", bias->sizes());
    check_same_as_x("bias", *bias, x);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == B && residual->size(1) == c_out,
                "glu_conv_step: residual must be (B, C_out) = (", B, ", ", c_out, "), got shape ", residual->sizes());
    check_same_as_x("residual", *residual, x);
  }
}

#ifdef CONVS2S_WITH_CUDA
const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

int cuda_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "glu_conv_step: unsupported dtype ", t, " (float, double, half, bfloat16 only)");
  }
}
#endif

// The window (B, k*C_in); conv_state shifted in place.
at::Tensor pack(const at::Tensor& x, const at::Tensor& state, const GluConvStepSizes& s) {
  at::Tensor window = at::empty({s.B, s.k * s.C_in}, x.options());
  if (x.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_step_pack_cuda(cuda_dtype_code(x.scalar_type()), x.data_ptr(), state.data_ptr(), window.data_ptr(), s,
                            c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return window;
#else
    TORCH_CHECK(false, "glu_conv_step: the extension was built without CUDA kernels");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "glu_conv_step_pack", [&] {
    glu_conv_step_pack_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), state.mutable_data_ptr<scalar_t>(),
                                     window.mutable_data_ptr<scalar_t>(), s);
  });
  return window;
}

void epilogue(const at::Tensor& h, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& res,
              at::Tensor& y, const GluConvStepSizes& s) {
  if (y.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_step_epilogue_cuda(cuda_dtype_code(y.scalar_type()), h.data_ptr(), ptr_or_null(bias),
                                ptr_or_null(res), y.data_ptr(), s, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "glu_conv_step: the extension was built without CUDA kernels");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "glu_conv_step_epilogue", [&] {
    glu_conv_step_epilogue_cpu<scalar_t>(h.const_data_ptr<scalar_t>(),
                                         bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                         res.has_value() ? res->const_data_ptr<scalar_t>() : nullptr,
                                         y.mutable_data_ptr<scalar_t>(), s);
  });
}

// Rows of a 2-D tensor with contiguous channels: t itself when its last stride is 1, else a contiguous copy.
at::Tensor unit_channel_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace

// y (B, C_out); conv_state (B, k-1, C_in) updated in place (see glu_conv_step.h).
at::Tensor glu_conv_step_native(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  check_inputs(x, conv_state, weight, bias, residual);
  const at::OptionalDeviceGuard guard(x.device());
  const int64_t B = x.size(0), c_in = x.size(1), k = weight.size(0), c_out = weight.size(2) / 2;
  at::Tensor y = at::empty({B, c_out}, x.options());
  if (B == 0) return y;
  const at::Tensor xr = unit_channel_stride(x);
  std::optional<at::Tensor> res =
      residual.has_value() ? std::optional<at::Tensor>(unit_channel_stride(*residual)) : std::nullopt;
  const GluConvStepSizes s{B, c_in, c_out, k, xr.stride(0), res.has_value() ? res->stride(0) : 0,
                           res.has_value() ? kStepSqrtHalf : 1.0};
  const at::Tensor window = k == 1 ? xr : pack(xr, conv_state, s);
  const at::Tensor h = at::mm(window, weight.reshape({k * c_in, 2 * c_out}));       // (B, 2*C_out)
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  epilogue(h, b, res, y, s);
  return y;
}

}  // namespace convs2s

TORCH_LIBRARY_FRAGMENT(convs2s, m) {
  m.def("glu_conv_step_native(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, Tensor? residual) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(convs2s, CPU, m) { m.impl("glu_conv_step_native", &convs2s::glu_conv_step_native); }

#ifdef CONVS2S_WITH_CUDA
TORCH_LIBRARY_IMPL(convs2s, CUDA, m) { m.impl("glu_conv_step_native", &convs2s::glu_conv_step_native); }
#endif
