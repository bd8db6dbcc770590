// CPU kernels of glu_conv_step (see glu_conv_step.h): the window pack with the state shift, and the fused GLU
// epilogue. Rows are split across threads with at::parallel_for; within a row the channel loops vectorize.
#include "glu_conv_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

#include "cpu_math.h"

namespace convs2s {
namespace {

// Rows per task: about 32K elements, enough to amortize a task's start-up.
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

template <typename scalar_t, bool HAS_BIAS, bool HAS_RES>
void epilogue_rows(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                   const GluConvStepSizes& s) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t C = s.C_out;
  const acc_t scale = static_cast<acc_t>(s.scale);
  at::parallel_for(0, s.B, grain_rows(3 * C), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* h_lin = h + b * 2 * C;    // the GLU's linear half
      const scalar_t* h_gate = h_lin + C;       // and its gate half
      const scalar_t* res = HAS_RES ? residual + b * s.sr_b : nullptr;
      scalar_t* out = y + b * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t a = static_cast<acc_t>(h_lin[c]);
        acc_t g = static_cast<acc_t>(h_gate[c]);
        if (HAS_BIAS) {
          a += static_cast<acc_t>(bias[c]);
          g += static_cast<acc_t>(bias[C + c]);
        }
        acc_t v = a / (acc_t(1) + exp_fast(-g));
        if (HAS_RES) v = (v + static_cast<acc_t>(res[c])) * scale;
        out[c] = static_cast<scalar_t>(v);
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void glu_conv_step_pack_cpu(const scalar_t* x, scalar_t* state, scalar_t* window, const GluConvStepSizes& s) {
  const int64_t C = s.C_in;
  const int64_t kept = (s.k - 1) * C;           // elements of one row's state
  at::parallel_for(0, s.B, grain_rows(2 * s.k * C), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* win = window + b * s.k * C;
      scalar_t* st = state + b * kept;
      std::memcpy(win, st, kept * sizeof(scalar_t));
      std::memcpy(win + kept, x + b * s.sx_b, C * sizeof(scalar_t));
      std::memcpy(st, win + C, kept * sizeof(scalar_t));
    }
  });
}

template <typename scalar_t>
void glu_conv_step_epilogue_cpu(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, scalar_t* y,
                                const GluConvStepSizes& s) {
  if (bias && residual) epilogue_rows<scalar_t, true, true>(h, bias, residual, y, s);
  else if (bias) epilogue_rows<scalar_t, true, false>(h, bias, residual, y, s);
  else if (residual) epilogue_rows<scalar_t, false, true>(h, bias, residual, y, s);
  else epilogue_rows<scalar_t, false, false>(h, bias, residual, y, s);
}

#define CONVS2S_INSTANTIATE(T)                                                                               \
  template void glu_conv_step_pack_cpu<T>(const T*, T*, T*, const GluConvStepSizes&);                        \
  template void glu_conv_step_epilogue_cpu<T>(const T*, const T*, const T*, T*, const GluConvStepSizes&);
CONVS2S_INSTANTIATE(float)
CONVS2S_INSTANTIATE(double)
CONVS2S_INSTANTIATE(c10::Half)
CONVS2S_INSTANTIATE(c10::BFloat16)
#undef CONVS2S_INSTANTIATE

}  // namespace convs2s
