// bfloat16 to float32 with AVX-512, shared by the kernels: a bfloat16 is a float32's high half, so widening is a
// zero-extension and a 16-bit shift.
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

}  // namespace draftapprox
#endif
