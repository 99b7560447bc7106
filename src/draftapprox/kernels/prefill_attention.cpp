// Causal attention of a prefill chunk: the q newest positions of n keys, each query over every key up to its own
// position, in one flash-style pass (no n x n scores, no mask, no repeat_kv copy of the keys).
//
// CPU SDPA ran at a fifth to a third of the GEMM rate on our machines (130 GFLOP/s in bfloat16 on the EPYC, whose
// GEMM ran at 420) and grew to a third of the draft's forward at 8k tokens. Its tiles go through a general GEMM
// call per block plus separate softmax passes; here a tile of query rows is scored against a block of keys in
// registers, its online-softmax update is applied to the same tile while it is in L1, and the weighted values
// accumulate into the tile's float32 sums. All query heads of a KV head share its keys, so a task takes every head
// of a group for a run of positions: each packed key block is read by R x 32 rows. On the EPYC this ran at 295-370
// GFLOP/s in bfloat16 at 1k-4k tokens (docs/results/prefill-attention.md); the first version's dot products alone
// (the softmax left out) at 360-380.
//
// Keys and values are packed into blocks once per call. bfloat16 inputs use AVX-512 BF16 dot products (vdpbf16ps:
// pairs of bfloat16 products summed in float32) on pair-interleaved blocks, and the probabilities are rounded to
// bfloat16 before they weigh the values, as SDPA's CPU kernel does; float32 inputs use FMAs, keys transposed.
// The softmax, its running maximum and sum, and the accumulated output are float32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using namespace draftapprox;

constexpr int64_t kKeys = 128;      // keys per block: one online-softmax step
constexpr int64_t kPositions = 32;  // query positions per task; times a group's heads, the task's rows
constexpr int kTile = 6;            // query rows per register tile
// vectors per tile row (keys scored, output columns weighed at once): 6 x 4 accumulators, 4 operands and a
// broadcast in AVX-512's 32 registers; 6 x 2, 2 and 1 in the 16 of AVX2 (and of SSE2 or NEON)
constexpr int kVectors = W >= 16 ? 4 : 2;
constexpr int kScores = kKeys / W;  // vectors of one row's scores in a block

// How the products read their operands. A step of a dot product covers P elements of one 32-bit lane: float32
// one (an FMA), bfloat16 a pair (an AVX-512 BF16 dot product, the pair's two products summed in float32). So keys
// are packed per block as [d/P][kKeys][P] (float32: transposed) and values as [kKeys/P][d][P] (float32: as they
// are), and one code serves both.
template <typename E>
struct Dot;

template <>
struct Dot<float> {
  using Vec = V;
  static constexpr int P = 1;
  static Vec load(const float* p) { return draftapprox::load(p); }
  static Vec broadcast(const float* p) { return set1(*p); }
  static V madd(V acc, Vec a, Vec b) { return fma(a, b, acc); }
  static void store(float* p, V x) { draftapprox::store(p, x); }
};

#if defined(DRAFTAPPROX_AVX512) && defined(__AVX512BF16__)
template <>
struct Dot<at::BFloat16> {
  using Vec = __m512bh;
  static constexpr int P = 2;
  static Vec load(const at::BFloat16* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }
  static Vec broadcast(const at::BFloat16* p) {  // one pair to every lane
    int32_t bits;
    std::memcpy(&bits, p, 4);
    return reinterpret_cast<__m512bh>(_mm512_set1_epi32(bits));
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
  static void store(at::BFloat16* p, __m512 x) {  // rounded to nearest even, as c10::BFloat16 rounds
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
  }
};
#endif

template <typename E>
struct Rows {  // the rows of one register tile: their query rows and where their scores, weights and sums live
  const E* query[kTile];
  float* scores;  // [kTile][kKeys]
  E* probs;       // [kTile][kKeys]
  float* sums;    // [kTile][d]
};

// Scores of T rows against keys [h, h + W kVectors) of a packed key block, in registers.
template <typename E, int T>
void score_part(const Rows<E>& rows, const E* kp, int64_t h, int64_t d) {
  using D = Dot<E>;
  V acc[T][kVectors];
  for (int r = 0; r < T; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = zero();
  for (int64_t c = 0; c < d / D::P; ++c) {
    typename D::Vec k[kVectors];
    for (int v = 0; v < kVectors; ++v) k[v] = D::load(kp + (c * kKeys + h + W * v) * D::P);
    for (int r = 0; r < T; ++r) {
      const typename D::Vec q = D::broadcast(rows.query[r] + D::P * c);
      for (int v = 0; v < kVectors; ++v) acc[r][v] = D::madd(acc[r][v], q, k[v]);
    }
  }
  for (int r = 0; r < T; ++r)
    for (int v = 0; v < kVectors; ++v) store(rows.scores + r * kKeys + h + W * v, acc[r][v]);
}

// sums[r][c0, c0 + W U) += sum over keys j of probs[r][j] v[j][c0, c0 + W U): U and T fixed at compile time so
// that the T x V sums stay in registers while the block's packed values (from column c0 on) stream past them.
template <typename E, int T, int U>
void weigh_chunk(const Rows<E>& rows, const E* vp, int64_t steps, int64_t c0, int64_t d) {
  using D = Dot<E>;
  float* sums = rows.sums + c0;
  V acc[T][U];
  for (int r = 0; r < T; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = load(sums + r * d + W * u);
  for (int64_t j = 0; j < steps; ++j) {
    typename D::Vec x[U];
    for (int u = 0; u < U; ++u) x[u] = D::load(vp + (j * d + c0 + W * u) * D::P);
    for (int r = 0; r < T; ++r) {
      const typename D::Vec w = D::broadcast(rows.probs + r * kKeys + D::P * j);
      for (int u = 0; u < U; ++u) acc[r][u] = D::madd(acc[r][u], w, x[u]);
    }
  }
  for (int r = 0; r < T; ++r)
    for (int u = 0; u < U; ++u) store(sums + r * d + W * u, acc[r][u]);
}

// One row's online-softmax step over a block of its unscaled scores: keys past `last` (its own position) get no
// weight; the row's running maximum (unscaled) and its W lanes of partial sums are updated, its accumulated output
// rescaled when the maximum grew, and the block's weights e^(scale (score - maximum)) = 2^(c score - c maximum),
// c = scale log2(e), written in the product's input type (rounded to nearest even for bfloat16). The
// probabilities that weigh bfloat16 values are rounded to bfloat16, so a degree-4 polynomial is exact enough there.
template <typename E>
void softmax_row(const float* s, int64_t last, float c, float* maximum, float* total, float* sums, int64_t d,
                 E* probs) {
  constexpr int kDegree = std::is_same_v<E, float> ? 6 : 4;
  constexpr float minus_inf = -std::numeric_limits<float>::infinity();
  const bool whole = last >= kKeys - 1;  // the row sees every key of the block: no masks
  V x[kScores];
  int seen[kScores];  // how many lanes of each vector the row sees
  V m = set1(minus_inf);
  for (int v = 0; v < kScores; ++v) {
    if (whole) {
      x[v] = load(s + W * v);
    } else {
      seen[v] = static_cast<int>(std::clamp<int64_t>(last + 1 - W * v, 0, W));
      x[v] = load_first(s + W * v, seen[v], minus_inf);
    }
    m = max(m, x[v]);
  }
  V sum = load(total);
  const float grown = std::max(*maximum, reduce_max(m));
  if (grown > *maximum) {
    const V a = set1(std::exp2(c * (*maximum - grown)));  // 0 on the row's first block
    sum = mul(a, sum);
    for (int64_t k = 0; k < d; k += W) store(sums + k, mul(a, load(sums + k)));
    *maximum = grown;
  }
  const V cv = set1(c), shift = set1(c * grown);
  for (int v = 0; v < kScores; ++v) {
    V e = exp2v<kDegree>(fms(x[v], cv, shift));
    if (!whole) e = keep_first(e, seen[v]);  // exp2v(-inf) is not 0 on AVX-512
    sum = add(sum, e);
    Dot<E>::store(probs + W * v, e);
  }
  store(total, sum);
}

// What a call shares with its tasks.
struct Problem {
  const void* query;  // (B, H, q, d) at strides qs
  int64_t qs[3];
  void* out;       // (B, q, H, d), contiguous
  const void* kp;  // packed keys, blocks * kKeys * d elements per (b, g), one block after another
  const void* vp;  // packed values, likewise
  int64_t B, G, R, q, n, d, blocks;
  float scale;
};

// A register tile of T rows against one key block: scores, each row's softmax step, weighted values. `lasts[r]` is
// the last key of the block row r may see, relative to the block's first.
template <typename E, int T>
void tile(const Problem& p, const Rows<E>& rows, int64_t bg, int64_t block, int64_t count, const int64_t* lasts,
          float* maxima, float* totals) {
  constexpr int P = Dot<E>::P;
  const int64_t packed = (bg * p.blocks + block) * kKeys * p.d;
  const E* kp = static_cast<const E*>(p.kp) + packed;
  // rows are in nondecreasing order of position, so the last sees the most keys: none sees a key from `seen` on,
  // and the scores and weighted values of those keys (on a block at the diagonal) are neither computed nor used
  const int64_t seen = std::min(lasts[T - 1], count - 1) + 1;
  for (int64_t h = 0; h < seen; h += W * kVectors) score_part<E, T>(rows, kp, h, p.d);
  const float c = p.scale * 1.4426950408889634f;
  for (int r = 0; r < T; ++r)
    softmax_row(rows.scores + r * kKeys, std::min(lasts[r], count - 1), c, maxima + r, totals + W * r,
                rows.sums + r * p.d, p.d, rows.probs + r * kKeys);
  const E* vp = static_cast<const E*>(p.vp) + packed;
  const int64_t steps = (seen + P - 1) / P;  // an odd last key pairs with a zero weight
  int64_t c0 = 0;
  for (; c0 + W * kVectors <= p.d; c0 += W * kVectors) weigh_chunk<E, T, kVectors>(rows, vp, steps, c0, p.d);
  for (; c0 < p.d; c0 += W) weigh_chunk<E, T, 1>(rows, vp, steps, c0, p.d);
}

template <typename E>
void any_tile(int t, const Problem& p, const Rows<E>& rows, int64_t bg, int64_t block, int64_t count,
              const int64_t* lasts, float* maxima, float* totals) {
  static_assert(kTile == 6, "the cases below instantiate 1..kTile rows");
  switch (t) {
    case 1: tile<E, 1>(p, rows, bg, block, count, lasts, maxima, totals); break;
    case 2: tile<E, 2>(p, rows, bg, block, count, lasts, maxima, totals); break;
    case 3: tile<E, 3>(p, rows, bg, block, count, lasts, maxima, totals); break;
    case 4: tile<E, 4>(p, rows, bg, block, count, lasts, maxima, totals); break;
    case 5: tile<E, 5>(p, rows, bg, block, count, lasts, maxima, totals); break;
    default: tile<E, 6>(p, rows, bg, block, count, lasts, maxima, totals); break;
  }
}

// One task: every head of KV head g of batch b, for query positions [first, first + kPositions) of the chunk. Its
// rows are ordered by position, then head, so a tile's rows see nondecreasing numbers of keys.
template <typename E>
void task(const Problem& p, int64_t bg, int64_t first, std::vector<float>& scratch) {
  const int64_t positions = std::min(kPositions, p.q - first), rows = positions * p.R, d = p.d;
  const int64_t offset = p.n - p.q + first;  // the key position of the task's first query
  scratch.resize(rows * (d + 1 + W) + 2 * kTile * kKeys);  // per row: sums, maximum, W lanes of total
  float* sums = scratch.data();
  float* maxima = sums + rows * d;
  float* totals = maxima + rows;
  float* scores = totals + W * rows;
  E* probs = reinterpret_cast<E*>(scores + kTile * kKeys);  // kTile * kKeys floats hold them in either type
  std::fill(sums, sums + rows * d, 0.f);
  std::fill(maxima, maxima + rows, -std::numeric_limits<float>::infinity());
  std::fill(totals, totals + W * rows, 0.f);
  const int64_t b = bg / p.G, g = bg % p.G;
  const E* q = static_cast<const E*>(p.query);
  for (int64_t block = 0; block <= (offset + positions - 1) / kKeys; ++block) {
    const int64_t from = block * kKeys, count = std::min(kKeys, p.n - from);
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int t = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
      if (offset + (r0 + t - 1) / p.R < from) continue;  // no row of this tile sees a key of the block
      Rows<E> tile{{}, scores, probs, sums + r0 * d};
      int64_t lasts[kTile];
      for (int r = 0; r < t; ++r) {
        const int64_t row = r0 + r, pos = first + row / p.R;
        tile.query[r] = q + b * p.qs[0] + (g * p.R + row % p.R) * p.qs[1] + pos * p.qs[2];
        lasts[r] = offset + row / p.R - from;
      }
      any_tile<E>(t, p, tile, bg, block, count, lasts, maxima + r0, totals + W * r0);
    }
  }
  E* out = static_cast<E*>(p.out);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t pos = first + row / p.R, h = g * p.R + row % p.R;
    E* o = out + ((b * p.q + pos) * p.G * p.R + h) * d;
    const V inv = set1(1.f / reduce_add(load(totals + W * row)));
    for (int64_t c = 0; c < d; c += W) Dot<E>::store(o + c, mul(inv, load(sums + row * d + c)));
  }
}

// Keys of each (b, g) into blocks of kKeys, [d/P][kKeys][P], and values into [kKeys/P][d][P] (see Dot). Past the
// last key, zeros.
template <typename E>
void pack(const E* src, const int64_t s[3], E* dst, int64_t B, int64_t G, int64_t n, int64_t d, int64_t blocks,
          bool values) {
  constexpr int64_t P = Dot<E>::P;
  at::parallel_for(0, B * G * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bg = t / blocks, block = t % blocks, b = bg / G, g = bg % G;
      E* out = dst + t * kKeys * d;
      std::fill(out, out + kKeys * d, E(0));
      for (int64_t j = 0; j < std::min(kKeys, n - block * kKeys); ++j) {
        const E* row = src + b * s[0] + g * s[1] + (block * kKeys + j) * s[2];
        for (int64_t c = 0; c < d; ++c)
          out[values ? ((j / P) * d + c) * P + j % P : ((c / P) * kKeys + j) * P + c % P] = row[c];
      }
    }
  });
}

// The tasks, largest first (the last positions see the most keys), taken by the threads as they come free.
template <typename E>
void attend(const Problem& p) {
  const int64_t spans = (p.q + kPositions - 1) / kPositions, tasks = spans * p.B * p.G;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t span = spans - 1 - t / (p.B * p.G), bg = t % (p.B * p.G);
      task<E>(p, bg, span * kPositions, scratch);
    }
  });
}

// Keys and values packed once per call, then the tasks.
template <typename E>
void run(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& out,
         double scale) {
  const int64_t B = key.size(0), G = key.size(1), n = key.size(2), d = key.size(3);
  const int64_t blocks = (n + kKeys - 1) / kKeys;
  auto kp = torch::empty({B * G * blocks * kKeys * d}, key.options());
  auto vp = torch::empty_like(kp);
  const int64_t ks[3] = {key.stride(0), key.stride(1), key.stride(2)};
  const int64_t vs[3] = {value.stride(0), value.stride(1), value.stride(2)};
  pack(key.data_ptr<E>(), ks, kp.data_ptr<E>(), B, G, n, d, blocks, false);
  pack(value.data_ptr<E>(), vs, vp.data_ptr<E>(), B, G, n, d, blocks, true);
  attend<E>({query.data_ptr(), {query.stride(0), query.stride(1), query.stride(2)}, out.data_ptr(), kp.data_ptr(),
             vp.data_ptr(), B, G, query.size(1) / G, query.size(2), n, d, blocks, static_cast<float>(scale)});
}

}  // namespace

torch::Tensor prefill_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                                double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "prefill_attention takes query (b, H, q, d) and key/value (b, G, n, d)");
  TORCH_CHECK(key.sizes() == value.sizes(), "prefill_attention: keys and values must have the same shape");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type(),
              "prefill_attention: query, keys and values must share a dtype");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "prefill_attention runs on the CPU");
  const int64_t B = key.size(0), G = key.size(1), n = key.size(2), d = key.size(3), H = query.size(1),
                q = query.size(2);
  TORCH_CHECK(query.size(0) == B && query.size(3) == d && H % G == 0 && q > 0 && q <= n && d % 16 == 0,
              "prefill_attention: query ", query.sizes(), " does not fit keys ", key.sizes(),
              " (head size a multiple of 16, at most as many queries as keys)");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "prefill_attention: rows of queries, keys and values contiguous");
  auto out = torch::empty({B, q, H, d}, query.options());
  const bool bf16 = query.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || query.scalar_type() == torch::kFloat32, "prefill_attention takes bfloat16 or float32");
  if (bf16) {
#if defined(DRAFTAPPROX_AVX512) && defined(__AVX512BF16__)
    run<at::BFloat16>(query, key, value, out, scale);
#else
    // no bfloat16 dot product here: the float32 path on widened copies, rounded back
    return prefill_attention(query.to(torch::kFloat32), key.to(torch::kFloat32), value.to(torch::kFloat32), scale)
        .to(torch::kBFloat16);
#endif
  } else {
    run<float>(query, key, value, out, scale);
  }
  return out;
}
