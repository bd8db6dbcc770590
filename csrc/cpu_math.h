// Scalar math for the CPU kernels, written so that gcc -O3 vectorizes loops that call it.
// std::exp is not vectorized without -ffast-math (glibc declares its SIMD variants only then), and a scalar expf
// per element cost about as much as the GLU's whole memory traffic; exp_approx below is Cephes' expf (about 1 ulp
// over the clamped range), branch-free so that it vectorizes. double keeps std::exp: it is the gradcheck path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace convs2s {

inline float exp_approx(float x) {
  x = x < 88.3762626647949f ? x : 88.3762626647949f;    // exp overflows float above this
  x = x > -87.3365447504f ? x : -87.3365447504f;        // and is denormal below (the result is then ~1e-38)
  // round(x / ln 2) by the 1.5 * 2^23 trick: floor/nearbyint do not vectorize on baseline x86-64 (no SSE4.1)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;      // x - n ln 2, ln 2 split into hi and lo parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;     // 2^n
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

inline float exp_fast(float x) { return exp_approx(x); }
inline double exp_fast(double x) { return std::exp(x); }

// acc_t: the type the kernels compute in (float for float/half/bfloat16 storage, double for double).
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

}  // namespace convs2s
