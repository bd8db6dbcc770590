// glu_conv: argument checks, the convolution's GEMMs (ATen), and dispatch of the kernels around them
// (glu_conv_cpu.cpp, glu_conv_cuda.cu) by device and dtype. The op schemas are in module.cpp.
//
// The convolution is one GEMM on im2col rows (see glu_conv.h): h = xcol (B*T, k*C_in) @ W (k*C_in, 2*C_out).
// Measured on the 2-core CI CPU at B=32 T=64 C=512->512 k=3 (fp32), one GEMM with K = k*C_in beat k per-tap
// GEMMs accumulated in place (beta = 1) on shifted views by ~10% forward, and the single dW GEMM beat k per-tap
// ones by ~20%: the per-tap versions re-read and re-write the output k times. xcol costs k times x in memory, so
// it is rebuilt in the backward rather than saved; h (conv(x) without the bias, (B*T, 2*C_out)) is saved.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "common.h"
#include "glu_conv.h"

#ifdef CONVS2S_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

namespace convs2s {
namespace {

constexpr const char* kOp = "glu_conv";

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 3, "glu_conv: x must be (B, T, C_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "glu_conv: weight must be (k, C_in, 2*C_out), got shape ", weight.sizes());
  TORCH_CHECK(x.is_floating_point(), "glu_conv: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "glu_conv: weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(weight.device() == x.device(), "glu_conv: weight is on ", weight.device(), " but x is on ",
              x.device(), "; all inputs must share one device");
  TORCH_CHECK(x.size(1) >= 1, "glu_conv: x must have at least one time step, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1, "glu_conv: x must have at least one input channel (C_in >= 1), got shape ",
              x.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "glu_conv: weight must have kernel width k >= 1, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(2), "glu_conv: weight has C_in = ", weight.size(1),
              " (dim 1 of (k, C_in, 2*C_out)) but x has C_in = ", x.size(2), " (dim 2 of (B, T, C_in))");
  TORCH_CHECK(weight.size(2) > 0 && weight.size(2) % 2 == 0,
              "glu_conv: weight's last dimension must be 2*C_out (even, > 0) for the GLU, got ", weight.size(2));
  const int64_t c_out = weight.size(2) / 2;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(2), "glu_conv: bias must be (2*C_out,) = (",
                weight.size(2), ",), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "glu_conv: bias must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                bias->scalar_type(), ", ", bias->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == x.size(0) && residual->size(1) == x.size(1) &&
                    residual->size(2) == c_out,
                "glu_conv: residual must be (B, T, C_out) = (", x.size(0), ", ", x.size(1), ", ", c_out,
                "), got shape ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                "glu_conv: residual must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
                "), got ", residual->scalar_type(), ", ", residual->device());
  }
}

int64_t pad_left(int64_t k, bool causal) { return causal ? k - 1 : (k - 1) / 2; }

GluConvSizes sizes_of(const at::Tensor& x, const at::Tensor& weight, bool has_residual, bool causal) {
  const int64_t k = weight.size(0);
  return GluConvSizes{x.size(0), x.size(1), x.size(2), weight.size(2) / 2, k, pad_left(k, causal),
                      x.stride(0), x.stride(1), x.stride(2), has_residual ? kSqrtHalf : 1.0};
}

#ifdef CONVS2S_WITH_CUDA
const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }
#endif

at::Tensor im2col(const at::Tensor& x, const GluConvSizes& s) {
  at::Tensor xcol = at::empty({s.B * s.T, s.k * s.C_in}, x.options());
  if (x.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_im2col_cuda(dtype_code(x.scalar_type(), kOp), x.data_ptr(), xcol.data_ptr(), s,
                         current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return xcol;
#else
    TORCH_CHECK(false, "glu_conv: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(x.scalar_type(), "glu_conv_im2col", [&] {
    glu_conv_im2col_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), xcol.mutable_data_ptr<scalar_t>(), s);
  });
  return xcol;
}

at::Tensor col2im(const at::Tensor& dcol, const GluConvSizes& s) {
  at::Tensor dx = at::empty({s.B, s.T, s.C_in}, dcol.options());
  if (dcol.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_col2im_cuda(dtype_code(dcol.scalar_type(), kOp), dcol.data_ptr(), dx.data_ptr(), s,
                         current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return dx;
#else
    TORCH_CHECK(false, "glu_conv: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(dcol.scalar_type(), "glu_conv_col2im", [&] {
    glu_conv_col2im_cpu<scalar_t>(dcol.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), s);
  });
  return dx;
}

void epilogue(const at::Tensor& h, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& res,
              at::Tensor& y, const GluConvSizes& s) {
  if (y.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_epilogue_cuda(dtype_code(y.scalar_type(), kOp), h.data_ptr(), ptr_or_null(bias), ptr_or_null(res),
                           y.data_ptr(), s, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "glu_conv: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(y.scalar_type(), "glu_conv_epilogue", [&] {
    glu_conv_epilogue_cpu<scalar_t>(h.const_data_ptr<scalar_t>(),
                                    bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                    res.has_value() ? res->const_data_ptr<scalar_t>() : nullptr,
                                    y.mutable_data_ptr<scalar_t>(), s);
  });
}

void prologue(const at::Tensor& grad_y, const at::Tensor& h, const std::optional<at::Tensor>& bias, at::Tensor& dh,
              at::Tensor& grad_res, const GluConvSizes& s) {
  void* dres = grad_res.numel() > 0 ? grad_res.data_ptr() : nullptr;
  if (dh.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    glu_conv_prologue_cuda(dtype_code(dh.scalar_type(), kOp), grad_y.data_ptr(), h.data_ptr(), ptr_or_null(bias),
                           dh.data_ptr(), dres, s, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "glu_conv: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(dh.scalar_type(), "glu_conv_prologue", [&] {
    glu_conv_prologue_cpu<scalar_t>(grad_y.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                    bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                    dh.mutable_data_ptr<scalar_t>(), static_cast<scalar_t*>(dres), s);
  });
}

}  // namespace

// Forward: (y (B, T, C_out), h (B*T, 2*C_out) = conv(x) without the bias, saved for the backward).
std::tuple<at::Tensor, at::Tensor> glu_conv_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual, bool causal) {
  check_inputs(x, weight, bias, residual);
  const at::OptionalDeviceGuard guard(x.device());
  const GluConvSizes s = sizes_of(x, weight, residual.has_value(), causal);
  const at::Tensor h = at::mm(im2col(x, s), weight.reshape({s.k * s.C_in, 2 * s.C_out}));   // (B*T, 2*C_out)
  const std::optional<at::Tensor> b = contiguous_or_none(bias), res = contiguous_or_none(residual);
  at::Tensor y = at::empty({s.B, s.T, s.C_out}, x.options());
  epilogue(h, b, res, y, s);
  return {y, h};
}

// Backward: (grad_x, grad_weight, grad_bias, grad_residual); a gradient not asked for by output_mask
// (x, weight, bias, residual) is returned as an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_conv_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& h, bool has_residual, bool causal, std::array<bool, 4> output_mask) {
  check_inputs(x, weight, bias, std::nullopt);
  const at::OptionalDeviceGuard guard(x.device());
  const GluConvSizes s = sizes_of(x, weight, has_residual, causal);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({s.B, s.T, s.C_out}) && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "glu_conv backward: grad_y must be (B, T, C_out) = (", s.B, ", ", s.T, ", ", s.C_out, ") with x's ",
              "dtype and device, got ", grad_y.sizes(), " ", grad_y.scalar_type(), " on ", grad_y.device());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == s.B * s.T && h.size(1) == 2 * s.C_out && h.is_contiguous() &&
                  h.scalar_type() == x.scalar_type() && h.device() == x.device(),
              "glu_conv backward: h must be the contiguous (B*T, 2*C_out) = (", s.B * s.T, ", ", 2 * s.C_out,
              ") tensor saved by the forward, got ", h.sizes());
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const std::optional<at::Tensor> b = contiguous_or_none(bias);
  at::Tensor dh = at::empty({s.B * s.T, 2 * s.C_out}, x.options());
  at::Tensor grad_res = has_residual && output_mask[3] ? at::empty({s.B, s.T, s.C_out}, x.options()) : empty();
  prologue(grad_y.contiguous(), h, b, dh, grad_res, s);

  const at::Tensor w = weight.reshape({s.k * s.C_in, 2 * s.C_out});
  at::Tensor grad_x = empty(), grad_w = empty(), grad_b = empty();
  if (output_mask[0]) grad_x = col2im(at::mm(dh, w.t()), s);                      // dcol (B*T, k*C_in)
  if (output_mask[1]) grad_w = at::mm(im2col(x, s).t(), dh).view(weight.sizes());
  if (bias.has_value() && output_mask[2]) grad_b = dh.sum(0);
  return {grad_x, grad_w, grad_b, grad_res};
}

}  // namespace convs2s
