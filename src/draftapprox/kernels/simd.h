// The vector layer every kernel is written against: W float32 lanes, their bfloat16 widening and rounding (a
// bfloat16 is a float32's high half), a vectorised 2^x for the softmaxes, and loads of a first few lanes.
//
// One build targets one instruction-set level (kernels/__init__.py passes its compiler flags): AVX-512 (16 lanes,
// with AVX-512 BF16 where the CPU has it), AVX2 with FMA (8 lanes), or portable C++ on GCC/Clang vector extensions
// (4 lanes: SSE2 on any x86-64, NEON on ARM), so that each kernel is written once and runs on every CPU.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define DRAFTAPPROX_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define DRAFTAPPROX_AVX2 1
#include <immintrin.h>
#endif

namespace draftapprox {

// The level this build was compiled for, as kernels/__init__.py names it.
inline const char* isa() {
#if defined(DRAFTAPPROX_AVX512) && defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(DRAFTAPPROX_AVX512)
  return "avx512";
#elif defined(DRAFTAPPROX_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// Prefetch for reading: into L1 (`near`) or into L2.
inline void prefetch(const void* p, bool near = true) {
  if (near)
    __builtin_prefetch(p, 0, 3);
  else
    __builtin_prefetch(p, 0, 2);
}

#if defined(DRAFTAPPROX_AVX512)
constexpr int W = 16;
using V = __m512;     // W float32
using Half = __m256i;  // W bfloat16 bits
using Wide = __m512i;  // 2W bfloat16 bits: one load split into even and odd lanes

inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V abs(V a) { return _mm512_abs_ps(a); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a b + c, one rounding
inline V fms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }  // a b - c, one rounding
inline V negative_select(V x, V a, V b) {  // a where x < 0, else b
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
}
inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
inline __mmask16 first_mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline V load_first(const float* p, int n, float fill) {  // lanes from n on hold `fill`
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_mask(n), p);
}
inline V keep_first(V v, int n) { return _mm512_maskz_mov_ps(first_mask(n), v); }  // lanes from n on zero

inline V widen(Half bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
inline Half load_half(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store_half(void* p, Half h) { _mm256_storeu_si256(static_cast<__m256i*>(p), h); }
inline Half round_bits(V v) {  // to nearest even, as c10::BFloat16 rounds finite values
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline Wide load_wide(const void* p) { return _mm512_loadu_si512(p); }
inline V even_lanes(Wide w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
inline V odd_lanes(Wide w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// 2^n for integral n (t rounded), times p: scalef takes n as a float.
inline V round_nearest(V t) { return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V scale2(V p, V n) { return _mm512_scalef_ps(p, n); }

#elif defined(DRAFTAPPROX_AVX2)
constexpr int W = 8;
using V = __m256;
using Half = __m128i;
using Wide = __m256i;

inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V fms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
inline V negative_select(V x, V a, V b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ)); }
inline float reduce_add(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(V v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline __m256i first_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V load_first(const float* p, int n, float fill) {
  const __m256i m = first_mask(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline V keep_first(V v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_mask(n))); }

inline V widen(Half bits) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)); }
inline Half load_half(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void store_half(void* p, Half h) { _mm_storeu_si128(static_cast<__m128i*>(p), h); }
inline Half round_bits(V v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // the 32-bit lanes now hold 0..65535: pack them to 16 bits (per 128-bit half), then gather the halves' words
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0xD8));
}
inline Wide load_wide(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline V even_lanes(Wide w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
inline V odd_lanes(Wide w) {
  return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline V round_nearest(V t) { return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^n for integral -150 <= n <= 127, through the exponent field in two factors 2^(n - n/2) 2^(n/2), each
// a normal float32, so that results down in float32's denormals come out as scalef gives them.
inline V scale2(V p, V n) {
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

#else
// Portable: GCC/Clang vector extensions, 16 bytes wide (SSE2 on x86-64, NEON on ARM).
constexpr int W = 4;
typedef float V __attribute__((vector_size(16)));
typedef int32_t VI __attribute__((vector_size(16)));
typedef uint32_t VU __attribute__((vector_size(16)));
typedef uint16_t Half __attribute__((vector_size(8)));
using Wide = VU;

inline V zero() { return V{0.f, 0.f, 0.f, 0.f}; }
inline V set1(float x) { return V{x, x, x, x}; }
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
inline V add(V a, V b) { return a + b; }
inline V sub(V a, V b) { return a - b; }
inline V mul(V a, V b) { return a * b; }
inline V div(V a, V b) { return a / b; }
inline V max(V a, V b) { return a > b ? a : b; }
inline V abs(V a) { return a < 0.f ? -a : a; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline V fms(V a, V b, V c) { return a * b - c; }
inline V negative_select(V x, V a, V b) { return x < 0.f ? a : b; }
inline float reduce_add(V v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline float reduce_max(V v) { return std::fmax(std::fmax(v[0], v[2]), std::fmax(v[1], v[3])); }
inline VI first_mask(int n) { return VI{0, 1, 2, 3} < n; }
inline V load_first(const float* p, int n, float fill) {
  V v = set1(fill);
  for (int i = 0; i < n && i < W; ++i) v[i] = p[i];
  return v;
}
inline V keep_first(V v, int n) { return first_mask(n) ? v : zero(); }

inline V widen(Half bits) {
  const VU wide = __builtin_convertvector(bits, VU) << 16;
  V v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
inline Half load_half(const void* p) {
  Half h;
  std::memcpy(&h, p, sizeof(h));
  return h;
}
inline void store_half(void* p, Half h) { std::memcpy(p, &h, sizeof(h)); }
inline Half round_bits(V v) {
  VU bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return __builtin_convertvector((bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16, Half);
}
inline Wide load_wide(const void* p) {
  Wide w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}
inline V even_lanes(Wide w) {  // little-endian: element 2t is the low half of 32-bit word t
  const VU e = w << 16;
  V v;
  std::memcpy(&v, &e, sizeof(v));
  return v;
}
inline V odd_lanes(Wide w) {
  const VU o = w & 0xFFFF0000u;
  V v;
  std::memcpy(&v, &o, sizeof(v));
  return v;
}
inline V round_nearest(V t) {  // |t| < 2^22: adding and removing 1.5 2^23 rounds to nearest even
  const V magic = set1(12582912.f);
  return (t + magic) - magic;
}
inline V scale2(V p, V n) {  // as AVX2's
  const VI ni = __builtin_convertvector(n, VI), half = ni >> 1;
  const VI ea = (ni - half + 127) << 23, eb = (half + 127) << 23;
  V a, b;
  std::memcpy(&a, &ea, sizeof(a));
  std::memcpy(&b, &eb, sizeof(b));
  return p * a * b;
}
#endif

// W bfloat16 or float32 values as float32 lanes.
inline V load(const at::BFloat16* p) { return widen(load_half(p)); }

// W float32 lanes to bfloat16, rounded to nearest even: one instruction with AVX-512 BF16 (which flushes float32
// denormals, below 1.2e-38, to zero), else the integer rounding of `round_bits`.
inline Half to_bf16(V v) {
#if defined(DRAFTAPPROX_AVX512) && defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return round_bits(v);
#endif
}
inline void store(at::BFloat16* p, V v) { store_half(p, to_bf16(v)); }

// 2^t for t <= 0, W at a time: 2^n times a degree-D polynomial for 2^f = e^(f ln 2), |f| <= 1/2, n the nearest
// integer to t. Degree 6 is within 2e-7 relative of std::exp2, degree 4 within 5e-5 (below a bfloat16's rounding,
// 2e-3), float32's denormals included. t = -inf gives 0, but NaN on AVX-512: callers mask it.
template <int D = 6>
inline V exp2v(V t) {
  static_assert(D >= 2 && D <= 6, "degrees 2 to 6");
  constexpr float c[7] = {1.f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                          0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f};  // ln2^k / k!
#if !defined(DRAFTAPPROX_AVX512)
  t = max(t, set1(-150.f));  // 2^-150 rounds to 0: below it, as std::exp2 gives, 0
#endif
  const V n = round_nearest(t);
  const V f = sub(t, n);
  V p = set1(c[D]);
  for (int k = D - 1; k >= 0; --k) p = fma(p, f, set1(c[k]));
  return scale2(p, n);
}

// e^x for x <= 0, W at a time, within 2e-7 relative of std::exp.
inline V expv(V x) { return exp2v<6>(mul(x, set1(1.4426950408889634f))); }

}  // namespace draftapprox
