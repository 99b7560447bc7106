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

#include "simd.h"

namespace {

using namespace draftapprox;

constexpr int64_t kRowBlock = 4;   // x rows multiplied with one widened weight vector (registers, not memory)
constexpr int64_t kBlock = 2 * W;  // weights per row and step: one wide load (a 64-byte cache line on AVX-512)
// weight rows streamed at once for one x row: eight in AVX-512's 32 registers, four in AVX2's 16
constexpr int kStreams = W >= 16 ? 8 : 4;
constexpr int64_t kAhead = 1024;  // weights ahead of each row's stream to prefetch (2 KB; 512 bytes streamed slower)

inline float widen_one(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// A bfloat16 is the high half of a float32, so one wide load of 2W weights gives two float32 vectors without a
// shuffle: the even weights shifted up by 16 bits, the odd ones with their low halves masked off. The x rows are
// split the same way once per call (`split_rows`), so each FMA pairs every weight with its own x. Widening
// through `vpmovzxwd` instead puts one shuffle per W weights on the single shuffle port, which bound the AVX-512
// kernel below the memory bandwidth.
inline void split_rows(const float* x, int64_t M, int64_t K, float* out) {
  const int64_t blocks = K / kBlock;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < kBlock / 2; ++t) {
        out[j * K + b * kBlock + t] = x[j * K + b * kBlock + 2 * t];
        out[j * K + b * kBlock + kBlock / 2 + t] = x[j * K + b * kBlock + 2 * t + 1];
      }
}

// R rows of x (split, stride K; `x` the same rows unsplit, for the columns past the last whole block) times NB
// consecutive weight rows (stride K) into out[j * N + i]. R and NB are compile-time constants so that the R * NB
// accumulators live in registers; NB weight rows are NB independent memory streams and FMA chains, which is what
// keeps a core's loads in flight.
template <int R, int NB>
inline void dot_tile(const float* xs, const float* x, const uint16_t* w, int64_t K, float* out, int64_t N) {
  V acc[R][NB];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < NB; ++i) acc[j][i] = zero();
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock) {
    V even[R], odd[R];
    for (int j = 0; j < R; ++j) {
      even[j] = load(xs + j * K + k);
      odd[j] = load(xs + j * K + k + kBlock / 2);
    }
    for (int i = 0; i < NB; ++i) {
      // Each weight row is its own stream; the hardware prefetcher follows only a few of them at once, so ask
      // for kAhead weights ahead explicitly, and for the same line of the next tile's row into L2: short rows (K
      // of 1536) end before a stream gets going. A prefetch never faults past the end.
      prefetch(w + i * K + k + kAhead);
      prefetch(w + (i + NB) * K + k, false);
      const Wide v = load_wide(w + i * K + k);
      const V lo = even_lanes(v), hi = odd_lanes(v);
      for (int j = 0; j < R; ++j) acc[j][i] = fma(odd[j], hi, fma(even[j], lo, acc[j][i]));
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < NB; ++i) {
      float sum = reduce_add(acc[j][i]);
      for (int64_t t = k; t < K; ++t) sum += x[j * K + t] * widen_one(w[i * K + t]);
      out[j * N + i] = sum;
    }
  }
}

// Tiles of R x rows by NB weight rows: kStreams weight streams for a single row, fewer as rows add accumulators
// (R * NB of them, plus 2 R x vectors, within the vector registers).
template <int R>
inline void dot_rows(const float* xs, const float* x, const uint16_t* w, int64_t K, int64_t count, float* out,
                     int64_t N) {
  constexpr int NB = R <= 2 ? kStreams : kStreams / 2;
  int64_t i = 0;
  for (; i + NB <= count; i += NB) dot_tile<R, NB>(xs, x, w + i * K, K, out + i, N);
  for (; i < count; ++i) dot_tile<R, 1>(xs, x, w + i * K, K, out + i, N);
}

// Weight rows [n, n + count) against every x row, in blocks of up to 4 x rows.
inline void dot_range(const float* xs, const float* x, const uint16_t* w, int64_t M, int64_t K, int64_t N,
                      int64_t n, int64_t count, float* out) {
  for (int64_t m = 0; m < M; m += kRowBlock) {
    const float* xm = xs + m * K;
    const float* um = x + m * K;
    const uint16_t* wn = w + n * K;
    float* o = out + m * N + n;
    switch (std::min(kRowBlock, M - m)) {
      case 1: dot_rows<1>(xm, um, wn, K, count, o, N); break;
      case 2: dot_rows<2>(xm, um, wn, K, count, o, N); break;
      case 3: dot_rows<3>(xm, um, wn, K, count, o, N); break;
      default: dot_rows<4>(xm, um, wn, K, count, o, N); break;
    }
  }
}

}  // namespace

// x may be bfloat16 (a bfloat16 model's decode step): its few rows are widened here and the sums rounded back once,
// which saved a decode step of the 1.5B two PyTorch conversions per linear layer (about 400 operators). The bias,
// if any, is added to the float32 sums.
torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& w_in,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2, "linear_bf16 takes x (M, K) and w (N, K)");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 || x_in.scalar_type() == torch::kBFloat16,
              "linear_bf16: x must be float32 or bfloat16");
  TORCH_CHECK(w_in.scalar_type() == torch::kBFloat16, "linear_bf16: w must be bfloat16");
  TORCH_CHECK(x_in.size(1) == w_in.size(1), "linear_bf16: x has ", x_in.size(1), " columns, w ", w_in.size(1));
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "linear_bf16 runs on the CPU");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == w_in.size(0)), "linear_bf16: bias must be (N,)");
  auto x = x_in.to(torch::kFloat32).contiguous();
  auto w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint16_t* Wt = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* O = out.data_ptr<float>();
  auto split = torch::empty_like(x);
  split_rows(X, M, K, split.data_ptr<float>());
  const float* S = split.data_ptr<float>();
  // Blocks of 64 weight rows: a block's x rows stay in L1/L2 while its weights stream through once.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += 64) dot_range(S, X, Wt, M, K, N, n, std::min<int64_t>(64, end - n), O);
  });
  if (bias) {
    auto b = bias->to(torch::kFloat32).contiguous();
    const float* B = b.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) O[m * N + n] += B[n];
  }
  return x_in.scalar_type() == torch::kFloat32 ? out : out.to(x_in.scalar_type());
}

std::string isa() { return draftapprox::isa(); }
