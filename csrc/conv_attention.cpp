// conv_attention: argument checks, the GEMMs (ATen), and dispatch of the fused softmax kernels
// (conv_attention_cpu.cpp, conv_attention_cuda.cu). The op schemas are in module.cpp.
//
// Forward (B sentences, Tt target steps, Ts source positions; sigma[b] = sqrt(real source tokens of b)):
//   q   = sqrt(.5) * (x @ w_in^T + b_in + te)                 GEMM, then one fused in-place pass for the rest
//   S   = q @ K^T                                              batched GEMM, fp32 (fp64 for fp64)  (B, Tt, Ts)
//   P~  = sigma * masked_softmax(S), lse = row log-sum-exp      fused kernel, P~ in the inputs' dtype
//   ctx = P~ @ V                                               batched GEMM (the sqrt(s) scale rides on P~)
//   out = sqrt(.5) * (ctx @ w_out^T + b_out + x)               GEMM, then the same fused pass
// Saved for the backward: q, ctx (B, Tt, E) and lse (B, Tt) fp64; no (B, Tt, Ts) tensor unless need_weights asks
// for the probabilities. The backward recomputes S from q and K, and P from S and lse (flash-attention's recipe). S
// is in the softmax's precision in both directions (see scores() below); lse is fp64 (see conv_attention.h).
// On CUDA without need_weights, S, P~ and ctx come from one flash-style kernel instead (conv_attention_cuda.cu),
// which never writes S: the forward then has no (B, Tt, Ts) temporary either.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

#include "common.h"
#include "conv_attention.h"

#ifdef CONVS2S_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

namespace convs2s {
namespace {

constexpr const char* kOp = "conv_attention";

void check_same(const char* name, const at::Tensor& t, const at::Tensor& x) { convs2s::check_same(kOp, name, t, x); }

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* what) {
  convs2s::check_shape(kOp, name, t, expected, what);
}

// Sizes (B, Tt, C, Ts, E) after checking every input against x and the keys.
std::array<int64_t, 5> check_inputs(const at::Tensor& x, const at::Tensor& te, const at::Tensor& keys,
                                    const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                    const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
                                    const at::Tensor& b_out) {
  TORCH_CHECK(x.dim() == 3, "conv_attention: x must be (B, Tt, C), got shape ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "conv_attention: x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(keys.dim() == 3, "conv_attention: encoder_keys must be (B, Ts, E), got shape ", keys.sizes());
  const int64_t B = x.size(0), Tt = x.size(1), C = x.size(2), Ts = keys.size(1), E = keys.size(2);
  TORCH_CHECK(C >= 1 && E >= 1, "conv_attention: need C >= 1 and E >= 1 channels, got C = ", C, ", E = ", E);
  TORCH_CHECK(Tt >= 1 && Ts >= 1, "conv_attention: need at least one target and one source position, got Tt = ",
              Tt, ", Ts = ", Ts);
  check_shape("encoder_keys", keys, {B, Ts, E}, "(B, Ts, E)");
  check_shape("target_embedding", te, {B, Tt, E}, "(B, Tt, E)");
  check_shape("encoder_values", values, {B, Ts, E}, "(B, Ts, E)");
  check_shape("w_in", w_in, {E, C}, "(E, C)");
  check_shape("b_in", b_in, {E}, "(E,)");
  check_shape("w_out", w_out, {C, E}, "(C, E)");
  check_shape("b_out", b_out, {C}, "(C,)");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"target_embedding", &te},
                         {"encoder_keys", &keys}, {"encoder_values", &values}, {"w_in", &w_in}, {"b_in", &b_in},
                         {"w_out", &w_out}, {"b_out", &b_out}})
    check_same(name, *t, x);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "conv_attention: src_padding_mask must be a bool tensor (True = ",
                "padding), got ", mask->scalar_type());
    check_shape("src_padding_mask", *mask, {B, Ts}, "(B, Ts)");
    TORCH_CHECK(mask->device() == x.device(), "conv_attention: src_padding_mask is on ", mask->device(),
                " but x is on ", x.device());
  }
  return {B, Tt, C, Ts, E};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// sigma[b] = sqrt(number of real source tokens of sentence b), (B,) in the softmax's precision.
at::Tensor source_scale(const std::optional<at::Tensor>& mask, int64_t B, int64_t Ts, const at::Tensor& x) {
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  if (!mask.has_value()) return at::full({B}, std::sqrt(static_cast<double>(Ts)), opts);
  return mask->logical_not().sum(1).to(opts.dtype()).sqrt_();
}

const bool* mask_ptr(const std::optional<at::Tensor>& m) { return m.has_value() ? m->const_data_ptr<bool>() : nullptr; }

// The scores q @ K^T (B, Tt, Ts) in the softmax's precision (fp32 for 16-bit inputs). The CUDA flash forward
// forms them as fp32 dot products and saves the log-sum-exp of those; the backward must recompute the same
// scores, since p = exp(score - lse) with a score rounded to 16 bits is off by up to a few percent and the rows of
// p no longer sum to 1 (tests/ops/test_conv_attention.py emulates both on the CPU).
at::Tensor scores(const at::Tensor& q, const at::Tensor& keys) {
  const auto acc = acc_type(q.scalar_type());
  return at::bmm(q.to(acc), keys.to(acc).transpose(1, 2));
}

// A (B, Tt, Ts) buffer for sigma * p in the inputs' dtype: the scores' own storage when that dtype is acc_t.
at::Tensor p_scaled_like(const at::Tensor& s, const at::Tensor& x) {
  return s.scalar_type() == x.scalar_type() ? s : at::empty(s.sizes(), x.options());
}

void softmax_fwd(const at::Tensor& s, at::Tensor& p_scaled, at::Tensor& lse, at::Tensor& attn,
                 const std::optional<at::Tensor>& mask, const at::Tensor& sigma, const AttnSizes& sz) {
  if (s.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    attn_softmax_fwd_cuda(dtype_code(p_scaled.scalar_type(), kOp), s.data_ptr(), p_scaled.data_ptr(), lse.data_ptr(),
                          attn.numel() ? attn.data_ptr() : nullptr, mask_ptr(mask), sigma.data_ptr(), sz,
                          current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "conv_attention: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(p_scaled.scalar_type(), "attn_softmax_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attn_softmax_fwd_cpu<scalar_t, acc_t>(s.const_data_ptr<acc_t>(), p_scaled.mutable_data_ptr<scalar_t>(),
                                          lse.mutable_data_ptr<double>(),
                                          attn.numel() ? attn.mutable_data_ptr<scalar_t>() : nullptr,
                                          mask_ptr(mask), sigma.const_data_ptr<acc_t>(), sz);
  });
}

void softmax_bwd(const at::Tensor& s, at::Tensor& p_scaled, at::Tensor& dpt,
                 const std::optional<at::Tensor>& grad_attn, const at::Tensor& lse,
                 const std::optional<at::Tensor>& mask, const at::Tensor& sigma, const AttnSizes& sz) {
  if (s.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    attn_softmax_bwd_cuda(dtype_code(dpt.scalar_type(), kOp), s.data_ptr(), p_scaled.data_ptr(), dpt.data_ptr(),
                          grad_attn.has_value() ? grad_attn->data_ptr() : nullptr, lse.data_ptr(), mask_ptr(mask),
                          sigma.data_ptr(), sz, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "conv_attention: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(dpt.scalar_type(), "attn_softmax_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attn_softmax_bwd_cpu<scalar_t, acc_t>(s.const_data_ptr<acc_t>(), p_scaled.mutable_data_ptr<scalar_t>(),
                                          dpt.mutable_data_ptr<scalar_t>(),
                                          grad_attn.has_value() ? grad_attn->const_data_ptr<scalar_t>() : nullptr,
                                          lse.const_data_ptr<double>(), mask_ptr(mask),
                                          sigma.const_data_ptr<acc_t>(), sz);
  });
}

// y (rows, n) <- (y + bias + residual) * sqrt(0.5), in place; residual (rows, n) is made contiguous if it is not.
void bias_residual_scale(at::Tensor& y, const at::Tensor& bias, const at::Tensor& residual) {
  const at::Tensor b = bias.contiguous(), res = residual.contiguous();
  const int64_t rows = y.size(0), n = y.size(1);
  if (y.is_cuda()) {
#ifdef CONVS2S_WITH_CUDA
    attn_bias_residual_scale_cuda(dtype_code(y.scalar_type(), kOp), y.data_ptr(), b.data_ptr(), res.data_ptr(),
                                  kSqrtHalf, rows, n, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#else
    TORCH_CHECK(false, "conv_attention: the extension was built without CUDA kernels");
#endif
  }
  CONVS2S_DISPATCH_FLOATING(y.scalar_type(), "attn_bias_residual_scale", [&] {
    attn_bias_residual_scale_cpu<scalar_t>(y.mutable_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                           res.const_data_ptr<scalar_t>(), kSqrtHalf, rows, n);
  });
}

}  // namespace

// Forward: (out (B, Tt, C), attn (B, Tt, Ts) if need_weights else (0,), and for the backward: q (B, Tt, E),
// ctx (B, Tt, E), lse (B, Tt) fp64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_attention_fwd(
    const at::Tensor& x, const at::Tensor& te, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& src_padding_mask, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& w_out, const at::Tensor& b_out, bool need_weights) {
  const auto [B, Tt, C, Ts, E] = check_inputs(x, te, keys, values, src_padding_mask, w_in, b_in, w_out, b_out);
  const at::OptionalDeviceGuard guard(x.device());
  // Each GEMM's precision is chosen here (fp32 scores for 16-bit inputs); autocast, still active when the op is
  // called inside an autocast region, would cast those GEMMs back to 16 bits.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto mask = contiguous_or_none(src_padding_mask);
  const at::Tensor x2 = x.reshape({B * Tt, C});
  at::Tensor q = at::mm(x2, w_in.t());                                                             // (B*Tt, E)
  bias_residual_scale(q, b_in, te.reshape({B * Tt, E}));
  at::Tensor q3 = q.view({B, Tt, E});
  at::Tensor lse = at::empty({B, Tt}, x.options().dtype(at::kDouble));
  at::Tensor attn = need_weights ? at::empty({B, Tt, Ts}, x.options()) : at::empty({0}, x.options());
  const at::Tensor sigma = source_scale(mask, B, Ts, x);
  const AttnSizes sizes{B, Tt, Ts, E};
  at::Tensor ctx;
#ifdef CONVS2S_WITH_CUDA
  if (x.is_cuda() && !need_weights) {  // flash-style: no (B, Tt, Ts) tensor at all
    const at::Tensor k = keys.contiguous(), v = values.contiguous();
    ctx = at::empty({B, Tt, E}, x.options());
    const bool launched = attn_flash_fwd_cuda(dtype_code(x.scalar_type(), kOp), q3.data_ptr(), k.data_ptr(),
                                              v.data_ptr(), mask_ptr(mask), sigma.data_ptr(), ctx.data_ptr(),
                                              lse.data_ptr(), sizes, current_stream());
    if (launched) C10_CUDA_KERNEL_LAUNCH_CHECK();
    else ctx = at::Tensor();
  }
#endif
  if (!ctx.defined()) {
    const at::Tensor s = scores(q3, keys);                                                         // (B, Tt, Ts)
    at::Tensor p = p_scaled_like(s, x);
    softmax_fwd(s, p, lse, attn, mask, sigma, sizes);
    ctx = at::bmm(p, values);                                                                      // (B, Tt, E)
  }
  at::Tensor out = at::mm(ctx.view({B * Tt, E}), w_out.t());                                       // (B*Tt, C)
  bias_residual_scale(out, b_out, x2);
  return {out.view({B, Tt, C}), attn, q3, ctx, lse};
}

// Backward: (grad_x, grad_target_embedding, grad_keys, grad_values, grad_w_in, grad_b_in, grad_w_out, grad_b_out).
// grad_attn (B, Tt, Ts) is the gradient wrt the returned probabilities, or None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_attention_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& x,
                   const at::Tensor& keys, const at::Tensor& values,
                   const std::optional<at::Tensor>& src_padding_mask, const at::Tensor& w_in,
                   const at::Tensor& w_out, const at::Tensor& q, const at::Tensor& ctx, const at::Tensor& lse) {
  TORCH_CHECK(x.dim() == 3 && keys.dim() == 3, "conv_attention backward: x must be (B, Tt, C) and encoder_keys ",
              "(B, Ts, E), got shapes ", x.sizes(), " and ", keys.sizes());
  const int64_t B = x.size(0), Tt = x.size(1), C = x.size(2), Ts = keys.size(1), E = keys.size(2);
  TORCH_CHECK(C >= 1 && E >= 1, "conv_attention backward: need C >= 1 and E >= 1 channels, got C = ", C, ", E = ", E);
  check_shape("grad_out", grad_out, {B, Tt, C}, "(B, Tt, C)");
  check_shape("encoder_values", values, {B, Ts, E}, "(B, Ts, E)");
  check_shape("w_in", w_in, {E, C}, "(E, C)");
  check_shape("w_out", w_out, {C, E}, "(C, E)");
  check_shape("q (saved)", q, {B, Tt, E}, "(B, Tt, E)");
  check_shape("ctx (saved)", ctx, {B, Tt, E}, "(B, Tt, E)");
  check_shape("lse (saved)", lse, {B, Tt}, "(B, Tt)");
  TORCH_CHECK(lse.scalar_type() == at::kDouble && lse.is_contiguous(),
              "conv_attention backward: lse must be the contiguous Double tensor saved by the forward, got ",
              lse.scalar_type());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"encoder_keys", &keys},
                         {"encoder_values", &values}, {"w_in", &w_in}, {"w_out", &w_out}, {"q", &q},
                         {"ctx", &ctx}})
    check_same(name, *t, x);
  if (grad_attn.has_value()) {
    check_shape("grad_attn", *grad_attn, {B, Tt, Ts}, "(B, Tt, Ts)");
    check_same("grad_attn", *grad_attn, x);
  }
  if (src_padding_mask.has_value()) {
    TORCH_CHECK(src_padding_mask->scalar_type() == at::kBool, "conv_attention backward: src_padding_mask must be bool");
    check_shape("src_padding_mask", *src_padding_mask, {B, Ts}, "(B, Ts)");
  }
  const at::OptionalDeviceGuard guard(x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);   // as in the forward
  const auto mask = contiguous_or_none(src_padding_mask);
  const auto ga = contiguous_or_none(grad_attn);

  // out = sqrt(.5) * (ctx @ w_out^T + b_out + x): the sqrt(.5) rides on the GEMMs' alpha and beta, not on an
  // activation-sized copy of grad_out. (addmm with beta = 0 ignores its first argument, a 0-dim placeholder.)
  const at::Tensor g2 = grad_out.reshape({B * Tt, C});
  const at::Tensor ctx2 = ctx.reshape({B * Tt, E});
  const at::Tensor unused = at::empty({}, x.options());
  at::Tensor grad_b_out = g2.sum(0).mul_(kSqrtHalf);
  at::Tensor grad_w_out = at::addmm(unused, g2.t(), ctx2, 0.0, kSqrtHalf);            // (C, E)
  const at::Tensor dctx = at::addmm(unused, g2, w_out, 0.0, kSqrtHalf).view({B, Tt, E});
  const at::Tensor s = scores(q, keys);                                    // (B, Tt, Ts): recomputed, as forward's
  at::Tensor p = p_scaled_like(s, x);
  at::Tensor ds = at::bmm(dctx, values.transpose(1, 2));                   // (B, Tt, Ts): d loss / d (sigma * p)
  softmax_bwd(s, p, ds, ga, lse, mask, source_scale(mask, B, Ts, x), AttnSizes{B, Tt, Ts, E});
  at::Tensor grad_values = at::bmm(p.transpose(1, 2), dctx);              // (B, Ts, E)
  at::Tensor grad_keys = at::bmm(ds.transpose(1, 2), q);                  // (B, Ts, E)
  // q = sqrt(.5) * (x @ w_in^T + b_in + te): d loss / d te = d loss / d (x @ w_in^T) = sqrt(.5) * ds @ K
  at::Tensor grad_te = at::baddbmm(unused, ds, keys, 0.0, kSqrtHalf);
  const at::Tensor dlin = grad_te.view({B * Tt, E});
  at::Tensor grad_b_in = dlin.sum(0);
  at::Tensor grad_w_in = at::mm(dlin.t(), x.reshape({B * Tt, C}));        // (E, C)
  at::Tensor grad_x = at::addmm(g2, dlin, w_in, kSqrtHalf, 1.0).view({B, Tt, C});  // residual + input projection
  return {grad_x, grad_te, grad_keys, grad_values, grad_w_in, grad_b_in, grad_w_out, grad_b_out};
}

}  // namespace convs2s
