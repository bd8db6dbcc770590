// The GLU epilogue of glu_conv's and glu_conv_step's CPU kernels: rows of the conv output h (rows, 2*C), bias,
// GLU, optional scaled residual, into y (rows, C). glu_conv calls it on its B*T positions, glu_conv_step on its B
// rows (whose residual may be strided).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_math.h"

namespace convs2s {

// Rows per task: about 32K elements, enough to amortize a task's start-up.
inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems));
}

template <typename scalar_t, bool HAS_BIAS, bool HAS_RES>
void glu_rows(const scalar_t* h, const scalar_t* bias, const scalar_t* residual, int64_t residual_row_stride,
              scalar_t* y, int64_t rows, int64_t C, double scale_d) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t scale = static_cast<acc_t>(scale_d);
  at::parallel_for(0, rows, grain_rows(3 * C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* h_lin = h + r * 2 * C;    // the GLU's linear half
      const scalar_t* h_gate = h_lin + C;       // and its gate half
      const scalar_t* res = HAS_RES ? residual + r * residual_row_stride : nullptr;
      scalar_t* out = y + r * C;
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

// y = (glu(h + bias) [+ residual]) * scale, the loop specialised on which of bias and residual are given.
template <typename scalar_t>
void glu_epilogue_rows(const scalar_t* h, const scalar_t* bias, const scalar_t* residual,
                       int64_t residual_row_stride, scalar_t* y, int64_t rows, int64_t C, double scale) {
  if (bias && residual) glu_rows<scalar_t, true, true>(h, bias, residual, residual_row_stride, y, rows, C, scale);
  else if (bias) glu_rows<scalar_t, true, false>(h, bias, residual, residual_row_stride, y, rows, C, scale);
  else if (residual) glu_rows<scalar_t, false, true>(h, bias, residual, residual_row_stride, y, rows, C, scale);
  else glu_rows<scalar_t, false, false>(h, bias, residual, residual_row_stride, y, rows, C, scale);
}

}  // namespace convs2s
