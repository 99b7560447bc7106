// AVX-512 helpers shared by the kernels: bfloat16 widening and rounding (a bfloat16 is a float32's high half), and
// a vectorised e^x for the softmaxes.
#pragma once

#include <torch/extension.h>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace draftapprox {

inline __m512 widen16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __m512 load16(const at::BFloat16* p) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// 16 float32 to bfloat16, rounded to nearest even as c10::BFloat16 rounds finite values.
inline __m256i round16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// 16 float32 to bfloat16 by the fastest rounding to nearest even here: one instruction with AVX-512 BF16 (which
// flushes float32 denormals, below 1.2e-38, to zero), else `round16`.
inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return round16(v);
#endif
}

// 2^t for t <= 0, 16 at a time: 2^n (scalef) times a degree-D polynomial for 2^f = e^(f ln 2), |f| <= 1/2, n the
// nearest integer to t. Degree 6 is within 2e-7 relative of std::exp2, degree 4 within 5e-5 (below a bfloat16's
// rounding, 2e-3). A block's scalar std::exp calls were most of the decode kernel's time.
template <int D = 6>
inline __m512 exp2_16(__m512 t) {
  static_assert(D >= 2 && D <= 6, "degrees 2 to 6");
  constexpr float c[7] = {1.f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                          0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f};  // ln2^k / k!
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(c[D]);
  for (int k = D - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

// e^x for x <= 0, 16 at a time, within 2e-7 relative of std::exp.
inline __m512 exp16(__m512 x) { return exp2_16<6>(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f))); }

}  // namespace draftapprox
#endif
