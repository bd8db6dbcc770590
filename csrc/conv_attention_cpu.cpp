// CPU kernels of conv_attention: the fused masked softmax and its gradient (see conv_attention.h). Rows are split
// across threads with at::parallel_for; within a row the loops over source positions vectorize.
#include "conv_attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace convs2s {
namespace {

int64_t grain_rows(int64_t Ts) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, Ts)); }

}  // namespace

template <typename scalar_t, typename acc_t>
void attn_softmax_fwd_cpu(const acc_t* scores, scalar_t* p_scaled, double* lse, scalar_t* attn, const bool* mask,
                          const acc_t* sigma, const AttnSizes& s) {
  const int64_t Ts = s.Ts;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, s.B * s.Tt, grain_rows(Ts), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(Ts);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / s.Tt;
      const bool* pad = mask ? mask + b * Ts : nullptr;
      const acc_t* row = scores + r * Ts;
      scalar_t* out = p_scaled + r * Ts;
      acc_t m = neg_inf;
      for (int64_t j = 0; j < Ts; ++j) {
        const acc_t v = (pad && pad[j]) ? neg_inf : row[j];
        e[j] = v;
        m = std::max(m, v);
      }
      acc_t sum = 0;
      if (m != neg_inf) {
        // Two loops: the first vectorizes; a sum in it would not (fp adds may not be reordered without -ffast-math).
        for (int64_t j = 0; j < Ts; ++j) e[j] = (pad && pad[j]) ? acc_t(0) : exp_fast(e[j] - m);
        for (int64_t j = 0; j < Ts; ++j) sum += e[j];
      }
      const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
      lse[r] = sum > 0 ? static_cast<double>(m) + std::log(static_cast<double>(sum))
                       : -std::numeric_limits<double>::infinity();
      const acc_t sg = sigma[b];
      scalar_t* out_attn = attn ? attn + r * Ts : nullptr;
      for (int64_t j = 0; j < Ts; ++j) {
        const acc_t p = (pad && pad[j]) ? acc_t(0) : e[j] * inv;
        out[j] = static_cast<scalar_t>(sg * p);
        if (out_attn) out_attn[j] = static_cast<scalar_t>(p);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void attn_softmax_bwd_cpu(const acc_t* scores, scalar_t* p_scaled, scalar_t* dpt, const scalar_t* grad_attn,
                          const double* lse, const bool* mask, const acc_t* sigma, const AttnSizes& s) {
  const int64_t Ts = s.Ts;
  at::parallel_for(0, s.B * s.Tt, grain_rows(Ts), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(Ts), dp(Ts);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / s.Tt;
      const bool* pad = mask ? mask + b * Ts : nullptr;
      const acc_t* row = scores + r * Ts;
      scalar_t* out = p_scaled + r * Ts;
      scalar_t* drow = dpt + r * Ts;
      const scalar_t* ga = grad_attn ? grad_attn + r * Ts : nullptr;
      const double l = lse[r];
      const acc_t sg = sigma[b];
      for (int64_t j = 0; j < Ts; ++j) {
        const bool real = !(pad && pad[j]);
        p[j] = real ? exp_fast(static_cast<acc_t>(row[j] - l)) : acc_t(0);
        dp[j] = sg * static_cast<acc_t>(drow[j]) + (ga ? static_cast<acc_t>(ga[j]) : acc_t(0));
      }
      acc_t dot = 0;
      for (int64_t j = 0; j < Ts; ++j) dot += p[j] * dp[j];
      for (int64_t j = 0; j < Ts; ++j) {
        out[j] = static_cast<scalar_t>(sg * p[j]);
        drow[j] = static_cast<scalar_t>(p[j] * (dp[j] - dot));
      }
    }
  });
}

template <typename scalar_t>
void attn_bias_residual_scale_cpu(scalar_t* y, const scalar_t* bias, const scalar_t* residual, double scale,
                                  int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* yr = y + r * n;
      const scalar_t* res = residual + r * n;
      for (int64_t c = 0; c < n; ++c)
        yr[c] = static_cast<scalar_t>((static_cast<acc_t>(yr[c]) + static_cast<acc_t>(bias[c]) +
                                       static_cast<acc_t>(res[c])) * sc);
    }
  });
}

#define CONVS2S_INSTANTIATE(T, A)                                                                             \
  template void attn_softmax_fwd_cpu<T, A>(const A*, T*, double*, T*, const bool*, const A*, const AttnSizes&);  \
  template void attn_softmax_bwd_cpu<T, A>(const A*, T*, T*, const T*, const double*, const bool*, const A*,     \
                                           const AttnSizes&);                                                   \
  template void attn_bias_residual_scale_cpu<T>(T*, const T*, const T*, double, int64_t, int64_t);
CONVS2S_INSTANTIATE(float, float)
CONVS2S_INSTANTIATE(double, double)
CONVS2S_INSTANTIATE(c10::Half, float)
CONVS2S_INSTANTIATE(c10::BFloat16, float)
#undef CONVS2S_INSTANTIATE

}  // namespace convs2s
