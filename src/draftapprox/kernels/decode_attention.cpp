// Attention of one query per head over every cached key, reading the keys and values once: a decode step.
//
// A decode step's attention is bound by the bytes of the cache. As two batched matrix products it read them well
// below the memory bandwidth on an AMX Xeon: oneDNN's bfloat16 product with six query rows ran at 6 GB/s, and a
// transposed key operand was first copied (about 0.9 ms a layer of the 1.5B at 4k cached tokens, against 0.2 ms
// for reading its 4 MB once). Here each KV head's query heads (the rows of one group) are scored against a block
// of keys together, so each key is read once for all of them; the blocks of all heads are spread over the
// threads, each keeps its own softmax maximum and sum, and the blocks are merged by their log-sum-exps (as flash
// decoding does). Scores, the softmax and the weighted sum are float32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kBlock = 256;  // keys a task scores: a few blocks per head keep both cores busy at batch 1
constexpr int kRows = 8;         // query rows scored at once: their sums fill the registers

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

using namespace draftapprox;

// The block's maximum of a row's scores, the scores replaced by e^(score - maximum), and their sum.
inline void softmax_state(float* x, int64_t count, float* maximum, float* sum) {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;
  int64_t j = 0;
  V mv = set1(m);
  for (; j + W <= count; j += W) mv = max(mv, load(x + j));
  m = std::max(m, reduce_max(mv));
  for (; j < count; ++j) m = std::max(m, x[j]);
  j = 0;
  const V mm = set1(m);
  V sv = zero();
  for (; j + W <= count; j += W) {
    const V e = expv(sub(load(x + j), mm));
    store(x + j, e);
    sv = add(sv, e);
  }
  s = reduce_add(sv);
  for (; j < count; ++j) s += (x[j] = std::exp(x[j] - m));
  *maximum = m;
  *sum = s;
}

// The scores of R query rows (float32, stride d) against keys [from, to) (stride ks) into scores[j * R + r]. R is a
// compile-time constant so that each row's sum is its own register: the R chains are independent, so one key's
// FMAs do not wait on each other's latency.
template <int R, typename T>
void score_block(const float* q, const T* k, int64_t ks, int64_t from, int64_t to, int64_t d, float scale,
                 float* scores) {  // scores[r * kBlock + j - from]
  for (int64_t j = from; j < to; ++j) {
    const T* kj = k + j * ks;
    float sum[R];
    int64_t c = 0;
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = zero();
    for (; c + W <= d; c += W) {
      const V kc = load(kj + c);
      for (int r = 0; r < R; ++r) acc[r] = fma(load(q + r * d + c), kc, acc[r]);
    }
    for (int r = 0; r < R; ++r) sum[r] = reduce_add(acc[r]);
    for (; c < d; ++c)
      for (int r = 0; r < R; ++r) sum[r] += q[r * d + c] * to_float(kj[c]);
    for (int r = 0; r < R; ++r) scores[r * kBlock + j - from] = sum[r] * scale;
  }
}

// acc[r * d + c] += sum over keys j of p[r * kBlock + j] * v[j][c]: column chunk by column chunk, so that the R sums of
// a chunk stay in registers while the block's values (in cache by then) stream past them.
template <int R, typename T>
void weigh_block(const float* p, const T* v, int64_t vs, int64_t count, int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + W <= d; c += W) {
    V sum[R];
    for (int r = 0; r < R; ++r) sum[r] = load(acc + r * d + c);
    for (int64_t j = 0; j < count; ++j) {
      const V vc = load(v + j * vs + c);
      for (int r = 0; r < R; ++r) sum[r] = fma(set1(p[r * kBlock + j]), vc, sum[r]);
    }
    for (int r = 0; r < R; ++r) store(acc + r * d + c, sum[r]);
  }
  for (; c < d; ++c)
    for (int64_t j = 0; j < count; ++j)
      for (int r = 0; r < R; ++r) acc[r * d + c] += p[r * kBlock + j] * to_float(v[j * vs + c]);
}

// One block of keys for rows [r0, r0 + R) of a group of `rows` query rows: scores, then weighted values.
template <int R, typename T>
void block_rows(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t from, int64_t to, int64_t d,
                float scale, float* scores, float* acc, float* maxima, float* sums) {
  score_block<R>(q, k, ks, from, to, d, scale, scores);
  const int64_t count = to - from;
  for (int r = 0; r < R; ++r) softmax_state(scores + r * kBlock, count, maxima + r, sums + r);
  weigh_block<R>(scores, v + from * vs, vs, count, d, acc);
}

// Rows of a group in runs of at most kRows; 1-8 rows per KV head cover every grouped-query model in use.
template <typename T>
void block(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t from, int64_t to, int64_t d,
           int64_t rows, float scale, float* scores, float* acc, float* maxima, float* sums) {
  static_assert(kRows == 8, "the cases below instantiate 1..kRows rows");
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const float* qr = q + r0 * d;
    float* ar = acc + r0 * d;
    switch (std::min<int64_t>(kRows, rows - r0)) {
      case 1: block_rows<1>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 2: block_rows<2>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 3: block_rows<3>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 4: block_rows<4>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 5: block_rows<5>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 6: block_rows<6>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      case 7: block_rows<7>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
      default: block_rows<8>(qr, k, v, ks, vs, from, to, d, scale, scores, ar, maxima + r0, sums + r0); break;
    }
  }
}

// acc += p * v over d columns (the merge of the blocks).
inline void axpy(float p, const float* v, float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += p * v[i];
}

struct Partial {  // one block's softmax state per query row: its maximum and its sum of exponentials
  float max, sum;
};

template <typename T>
void attend(const float* Q, const T* K, const T* V, float* O, int64_t B, int64_t G, int64_t R, int64_t n, int64_t d,
            const int64_t ks[3], const int64_t vs[3], float scale) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t tasks = B * G * blocks;
  std::vector<Partial> partial(tasks * R);
  std::vector<float> sums(tasks * R * d, 0.f);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kBlock * kRows), maxima(R), total(R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bg = t / blocks, blk = t % blocks, b = bg / G, g = bg % G;
      const int64_t from = blk * kBlock, to = std::min(n, from + kBlock);
      block(Q + bg * R * d, K + b * ks[0] + g * ks[1], V + b * vs[0] + g * vs[1], ks[2], vs[2], from, to, d, R, scale,
            scores.data(), sums.data() + t * R * d, maxima.data(), total.data());
      for (int64_t r = 0; r < R; ++r) partial[t * R + r] = {maxima[r], total[r]};
    }
  });
  at::parallel_for(0, B * G * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (b * G + g) * R + r
      const int64_t bg = row / R, r = row % R;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t blk = 0; blk < blocks; ++blk) m = std::max(m, partial[(bg * blocks + blk) * R + r].max);
      float total = 0.f;
      float* out = O + row * d;
      std::fill(out, out + d, 0.f);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t t = bg * blocks + blk;
        const float w = std::exp(partial[t * R + r].max - m);
        total += w * partial[t * R + r].sum;
        axpy(w, sums.data() + (t * R + r) * d, out, d);
      }
      for (int64_t i = 0; i < d; ++i) out[i] /= total;
    }
  });
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                               double scale) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.dim() == 4,
              "decode_attention takes query (b, H, d) and key/value (b, G, n, d)");
  TORCH_CHECK(query.scalar_type() == torch::kFloat32, "decode_attention: the query must be float32");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "decode_attention: keys and values must share a dtype");
  TORCH_CHECK(key.sizes() == value.sizes(), "decode_attention: keys and values must have the same shape");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "decode_attention: rows of keys and values contiguous");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "decode_attention runs on the CPU");
  const int64_t B = key.size(0), G = key.size(1), n = key.size(2), d = key.size(3), H = query.size(1);
  TORCH_CHECK(query.size(0) == B && query.size(2) == d && H % G == 0 && n > 0,
              "decode_attention: query ", query.sizes(), " does not fit keys ", key.sizes());
  auto q = query.contiguous();
  auto out = torch::empty({B, H, d}, q.options());
  const int64_t ks[3] = {key.stride(0), key.stride(1), key.stride(2)};
  const int64_t vs[3] = {value.stride(0), value.stride(1), value.stride(2)};
  const float s = static_cast<float>(scale);
  if (key.scalar_type() == torch::kBFloat16) {
    attend(q.data_ptr<float>(), key.data_ptr<at::BFloat16>(), value.data_ptr<at::BFloat16>(), out.data_ptr<float>(),
           B, G, H / G, n, d, ks, vs, s);
  } else {
    TORCH_CHECK(key.scalar_type() == torch::kFloat32, "decode_attention takes bfloat16 or float32 keys");
    attend(q.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(), out.data_ptr<float>(), B, G, H / G, n,
           d, ks, vs, s);
  }
  return out;
}
