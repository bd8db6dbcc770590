// glu_conv_step: argument checks, the step's one GEMM (ATen: MKL/OpenBLAS on CPU, cuBLAS on CUDA), and dispatch of
// the kernels around it (glu_conv_step_cpu.cpp, glu_conv_step_cuda.cu) by device and dtype. The op schema is in
// module.cpp.
//
// One step: pack + shift (window (B, k*C_in) <- [conv_state, x]; conv_state <- its last k-1 inputs including x),
// h = window @ W.view(k*C_in, 2*C_out) (one GEMM with K = k*C_in, the reshape a view of the TBC weight), then the
// fused epilogue y = GLU(h + bias) (+ residual, * sqrt(0.5)). For k = 1 the GEMM reads x itself.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "common.h"
#include "glu_conv_step.h"

#ifdef CONVS2S_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

namespace convs2s {
namespace {

constexpr const char* kOp = "glu_conv_step";

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
  check_same(kOp, "weight", weight, x);
  check_same(kOp, "conv_state", state, x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 2 * c_out, "glu_conv_step: bias must be (2*C_out,) = (",
                2 * c_out, ",), got shape ", bias->sizes());
    check_same(kOp, "bias", *bias, x);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == B && residual->size(1) == c_out,
                "glu_conv_step: residual must be (B, C_out) = (", B, ", ", c_out, "), got shape ", residual->sizes());
    check_same(kOp, "residual", *residual, x);
  }
}

#ifdef CONVS2S_WITH_CUDA
const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }
#endif

// The window (B, k*C_in); conv_state shifted in place.
at::Tensor pack(const at::Tensor& x, const at::Tensor& state, const GluConvStepSizes& s) {
  at::Tensor window = at::empty({s.B, s.k * s.C_in}, x.options());
  if (x.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_step_pack_cuda(dtype_code(x.scalar_type(), kOp), x.data_ptr(), state.data_ptr(), window.data_ptr(), s,
                            current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return window;
#else
    TORCH_CHECK(false, "glu_conv_step: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(x.scalar_type(), "glu_conv_step_pack", [&] {
    glu_conv_step_pack_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), state.mutable_data_ptr<scalar_t>(),
                                     window.mutable_data_ptr<scalar_t>(), s);
  });
  return window;
}

void epilogue(const at::Tensor& h, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& res,
              at::Tensor& y, const GluConvStepSizes& s) {
  if (y.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_step_epilogue_cuda(dtype_code(y.scalar_type(), kOp), h.data_ptr(), ptr_or_null(bias),
                                ptr_or_null(res), y.data_ptr(), s, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "glu_conv_step: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(y.scalar_type(), "glu_conv_step_epilogue", [&] {
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
                           res.has_value() ? kSqrtHalf : 1.0};
  const at::Tensor window = k == 1 ? xr : pack(xr, conv_state, s);
  const at::Tensor h = at::mm(window, weight.reshape({k * c_in, 2 * c_out}));       // (B, 2*C_out)
  epilogue(h, contiguous_or_none(bias), res, y, s);
  return y;
}

}  // namespace convs2s
