// Helpers of the CPU row passes (infonce, gist, matryoshka): vectorizable loops, shared by every kernel file.
//
// The row passes are vectorized loops; the extension is compiled for baseline x86-64 (SSE2), so their per-row entry
// points are cloned for AVX-512 and AVX2 (GCC target_clones, picked once at load time by the CPU's features) and
// every helper they call is force-inlined into each clone. Clones need GNU ifunc (glibc); elsewhere one baseline
// build.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define EMBEDLOSS_INLINE inline __attribute__((always_inline))
#define EMBEDLOSS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EMBEDLOSS_INLINE inline
#define EMBEDLOSS_CLONES
#endif

namespace embedloss {

// exp(x) in float, branch-free so the loop vectorizes (Cephes-style: 2^n * poly(r), |r| <= ln2 / 2, ~1 ulp).
// Arguments are shifted logits (<= 0 up to rounding); below -87 the result is 0, as for masked (-inf) cells.
EMBEDLOSS_INLINE float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

// x[j] = exp(x[j] - m) in place; returns the sum (float: exp_approx, vectorized; double: std::exp).
template <typename T>
T exp_shift_sum(T* __restrict__ x, int64_t n, T m);

template <>
EMBEDLOSS_INLINE float exp_shift_sum<float>(float* __restrict__ x, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

template <>
EMBEDLOSS_INLINE double exp_shift_sum<double>(double* __restrict__ x, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::exp(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

// The max of an `omp simd reduction(max : m)` loop: GCC vectorizes this ternary (vmaxps) but not std::max, which it
// leaves as a scalar vmaxss chain (one dependent max per element: ~45% of the Matryoshka row pass before).
template <typename T>
EMBEDLOSS_INLINE T simd_max(T m, T v) {
  return v > m ? v : m;
}

}  // namespace embedloss
