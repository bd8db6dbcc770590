// CPU kernels of glu_conv_step (see glu_conv_step.h): the window pack with the state shift, and the fused GLU
// epilogue. Rows are split across threads with at::parallel_for; within a row the channel loops vectorize.
#include "glu_conv_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

#include "cpu_math.h"
#include "glu_cpu.h"

namespace convs2s {

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
  glu_epilogue_rows(h, bias, residual, s.sr_b, y, s.B, s.C_out, s.scale);
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
