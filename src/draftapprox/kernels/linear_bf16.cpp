// y (M, N) float32 = x (M, K) float32 @ w (N, K) bfloat16 ^T, for the few rows of a decode step.
//
// A decode step streams every weight once, so its speed is the bytes of the weights over the memory bandwidth.
// Weights held in bfloat16 halve those bytes; on a CPU without bfloat16 instructions the libraries emulate
// bfloat16 products at a fraction of their float32 rate, but widening a bfloat16 to a float32 is only a 16-bit
// shift, so this kernel widens each weight vector in registers and multiplies in float32: the weights are read
// once, at their compact size, and every product and sum is float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DRAFTAPPROX_AVX512 1
#endif

namespace {

constexpr int64_t kRowBlock = 4;  // x rows multiplied with one widened weight vector (registers, not memory)

inline float widen(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

#ifdef DRAFTAPPROX_AVX512
inline __m512 widen16(const uint16_t* w) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// R rows of x (stride K) times NB consecutive weight rows (stride K) into out[j * N + i]. R and NB are
// compile-time constants so that the R * NB accumulators live in registers; NB weight rows are NB independent
// memory streams and FMA chains, which is what keeps a core's loads in flight.
template <int R, int NB>
inline void dot_tile(const float* x, const uint16_t* w, int64_t K, float* out, int64_t N) {
  __m512 acc[R][NB];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < NB; ++i) acc[j][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xs[R];
    for (int j = 0; j < R; ++j) xs[j] = _mm512_loadu_ps(x + j * K + k);
    for (int i = 0; i < NB; ++i) {
      // Each weight row is its own stream; the hardware prefetcher follows only a few of them at once, so ask
      // for 1 KiB ahead explicitly (+12-18% GEMV bandwidth measured at M=1), and for the same column of the next
      // tile's row into L2: short rows (K of 1536) end before a 1 KiB-ahead stream gets going, and that took
      // the 1536x1536 and 8960x1536 products of the 1.5B from 17-19 to 21-24 GB/s at M=1. A prefetch never
      // faults past the end.
      _mm_prefetch(reinterpret_cast<const char*>(w + i * K + k + 512), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + (i + NB) * K + k), _MM_HINT_T1);
      __m512 wide = widen16(w + i * K + k);
      for (int j = 0; j < R; ++j) acc[j][i] = _mm512_fmadd_ps(xs[j], wide, acc[j][i]);
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < NB; ++i) {
      float sum = _mm512_reduce_add_ps(acc[j][i]);
      for (int64_t t = k; t < K; ++t) sum += x[j * K + t] * widen(w[i * K + t]);
      out[j * N + i] = sum;
    }
  }
}

template <int NB>
inline void dot_rows_nb(const float* x, const uint16_t* w, int64_t K, int64_t rows, float* out, int64_t N) {
  switch (rows) {
    case 1: dot_tile<1, NB>(x, w, K, out, N); break;
    case 2: dot_tile<2, NB>(x, w, K, out, N); break;
    case 3: dot_tile<3, NB>(x, w, K, out, N); break;
    default: dot_tile<4, NB>(x, w, K, out, N); break;
  }
}

// Weight rows [n, n + count) against every x row, in tiles of up to 4 x rows by 4 weight rows.
inline void dot_range(const float* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, int64_t n, int64_t count,
                      float* out) {
  for (int64_t m = 0; m < M; m += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m);
    int64_t i = 0;
    for (; i + 4 <= count; i += 4) dot_rows_nb<4>(x + m * K, w + (n + i) * K, K, rows, out + m * N + n + i, N);
    for (; i < count; ++i) dot_rows_nb<1>(x + m * K, w + (n + i) * K, K, rows, out + m * N + n + i, N);
  }
}
#else
inline void dot_range(const float* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, int64_t n, int64_t count,
                      float* out) {
  for (int64_t j = 0; j < M; ++j) {
    for (int64_t i = n; i < n + count; ++i) {
      float sum = 0.f;
      for (int64_t t = 0; t < K; ++t) sum += x[j * K + t] * widen(w[i * K + t]);
      out[j * N + i] = sum;
    }
  }
}
#endif

}  // namespace

torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& w_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2, "linear_bf16 takes x (M, K) and w (N, K)");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32, "linear_bf16: x must be float32");
  TORCH_CHECK(w_in.scalar_type() == torch::kBFloat16, "linear_bf16: w must be bfloat16");
  TORCH_CHECK(x_in.size(1) == w_in.size(1), "linear_bf16: x has ", x_in.size(1), " columns, w ", w_in.size(1));
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "linear_bf16 runs on the CPU");
  auto x = x_in.contiguous();
  auto w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* O = out.data_ptr<float>();
  // Blocks of 64 weight rows: a block's x rows stay in L1/L2 while its weights stream through once.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += 64) dot_range(X, W, M, K, N, n, std::min<int64_t>(64, end - n), O);
  });
  return out;
}

bool vectorised() {
#ifdef DRAFTAPPROX_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "float32 rows times bfloat16 weights, products in float32");
  m.def("vectorised", &vectorised, "whether the AVX-512 path was compiled");
}
