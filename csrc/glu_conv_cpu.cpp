// CPU kernels of glu_conv (see glu_conv.h): im2col and col2im around the GEMMs, the fused GLU epilogue and the fused
// GLU-gradient prologue. Rows (b, t) are split across threads with at::parallel_for; within a row the loops over
// channels vectorize.
#include "glu_conv.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "glu_cpu.h"

namespace convs2s {
namespace {

template <typename scalar_t, bool HAS_BIAS, bool HAS_RES>
void prologue_rows(const scalar_t* grad_y, const scalar_t* h, const scalar_t* bias, scalar_t* dh,
                   scalar_t* grad_residual, const GluConvSizes& s) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = s.C_out;
  const acc_t scale = static_cast<acc_t>(s.scale);
  at::parallel_for(0, s.B * s.T, grain_rows(5 * C), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const scalar_t* h_lin = h + bt * 2 * C;
      const scalar_t* h_gate = h_lin + C;
      scalar_t* d_lin = dh + bt * 2 * C;
      scalar_t* d_gate = d_lin + C;
      const scalar_t* dy = grad_y + bt * C;
      scalar_t* dres = HAS_RES ? grad_residual + bt * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        acc_t a = static_cast<acc_t>(h_lin[c]);
        acc_t g = static_cast<acc_t>(h_gate[c]);
        if (HAS_BIAS) {
          a += static_cast<acc_t>(bias[c]);
          g += static_cast<acc_t>(bias[C + c]);
        }
        const acc_t sig = acc_t(1) / (acc_t(1) + exp_fast(-g));
        const acc_t d = static_cast<acc_t>(dy[c]) * scale;
        d_lin[c] = static_cast<scalar_t>(d * sig);
        d_gate[c] = static_cast<scalar_t>(d * a * sig * (acc_t(1) - sig));
        if (HAS_RES) dres[c] = static_cast<scalar_t>(d);
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void glu_conv_im2col_cpu(const scalar_t* x, scalar_t* xcol, const GluConvSizes& s) {
  const int64_t C = s.C_in;
  at::parallel_for(0, s.B * s.T, grain_rows(s.k * C), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / s.T, t = bt % s.T;
      for (int64_t j = 0; j < s.k; ++j) {
        scalar_t* dst = xcol + (bt * s.k + j) * C;
        const int64_t ts = t + j - s.pad_left;
        if (ts < 0 || ts >= s.T) {
          std::fill(dst, dst + C, scalar_t(0));
          continue;
        }
        const scalar_t* src = x + b * s.sx_b + ts * s.sx_t;
        if (s.sx_c == 1) {
          std::memcpy(dst, src, C * sizeof(scalar_t));
        } else {
          for (int64_t c = 0; c < C; ++c) dst[c] = src[c * s.sx_c];
        }
      }
    }
  });
}

template <typename scalar_t>
void glu_conv_col2im_cpu(const scalar_t* dcol, scalar_t* dx, const GluConvSizes& s) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = s.C_in;
  at::parallel_for(0, s.B * s.T, grain_rows(s.k * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);  // k taps summed once in acc_t: one rounding for half/bfloat16
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / s.T, t = bt % s.T;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t tr = t + s.pad_left - j;  // the output row whose tap j read x[b, t]
        if (tr < 0 || tr >= s.T) continue;
        const scalar_t* src = dcol + ((b * s.T + tr) * s.k + j) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(src[c]);
      }
      scalar_t* dst = dx + bt * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t>
void glu_conv_epilogue_cpu(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                           const GluConvSizes& s) {
  glu_epilogue_rows(h, bias, residual, s.C_out, y, s.B * s.T, s.C_out, s.scale);
}

template <typename scalar_t>
void glu_conv_prologue_cpu(const scalar_t* grad_y, const scalar_t* h, const scalar_t* bias, scalar_t* dh,
                           scalar_t* grad_residual, const GluConvSizes& s) {
  if (bias && grad_residual) prologue_rows<scalar_t, true, true>(grad_y, h, bias, dh, grad_residual, s);
  else if (bias) prologue_rows<scalar_t, true, false>(grad_y, h, bias, dh, grad_residual, s);
  else if (grad_residual) prologue_rows<scalar_t, false, true>(grad_y, h, bias, dh, grad_residual, s);
  else prologue_rows<scalar_t, false, false>(grad_y, h, bias, dh, grad_residual, s);
}

#define CONVS2S_INSTANTIATE(T)                                                                              \
  template void glu_conv_im2col_cpu<T>(const T*, T*, const GluConvSizes&);                                  \
  template void glu_conv_col2im_cpu<T>(const T*, T*, const GluConvSizes&);                                  \
  template void glu_conv_epilogue_cpu<T>(const T*, const T*, const T*, T*, const GluConvSizes&);             \
  template void glu_conv_prologue_cpu<T>(const T*, const T*, const T*, T*, T*, const GluConvSizes&);
CONVS2S_INSTANTIATE(float)
CONVS2S_INSTANTIATE(double)
CONVS2S_INSTANTIATE(c10::Half)
CONVS2S_INSTANTIATE(c10::BFloat16)
#undef CONVS2S_INSTANTIATE

}  // namespace convs2s
