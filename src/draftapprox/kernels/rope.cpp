// Rotary position embedding of the queries and keys of a bfloat16 chunk, in one pass over each.
//
// transformers applies it as `q * cos + rotate_half(q) * sin`: a negation, a concatenation, two products and a sum,
// each a pass over the chunk's queries that writes a fresh tensor (on the EPYC 5.5 ms a layer of the 0.5B draft at
// 2k tokens, 3% of its prefill). Here each row is read once and written once, with the reference's roundings: both
// products rounded to bfloat16, then their sum. The output keeps the input's layout (queries arrive as a
// transposed view of the projection's output).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace draftapprox;

// out = round(round(x * c) + round(y * s)) for W columns.
inline void rotate_lanes(at::BFloat16* out, V x, V c, V y, V s) {
  const V a = widen(to_bf16(mul(x, c)));
  const V b = widen(to_bf16(mul(y, s)));
  store(out, add(a, b));
}

// One (b, h, n, d) tensor: row (b, h, i) rotated by cos/sin row (b or 0, i); the first half of a row pairs with the
// second: out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2.
void rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), d = x.size(3), half = d / 2;
  const auto* src = x.data_ptr<at::BFloat16>();
  auto* dst = out.data_ptr<at::BFloat16>();
  const auto* c = cos.data_ptr<at::BFloat16>();
  const auto* s = sin.data_ptr<at::BFloat16>();
  const int64_t cb = cos.size(0) == 1 ? 0 : n * d;  // cos/sin shared by the batch, or one row set per sequence
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)}, ys[3] = {out.stride(0), out.stride(1), out.stride(2)};
  at::parallel_for(0, B * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n, i = t % n;
      const at::BFloat16* cr = c + b * cb + i * d;
      const at::BFloat16* sr = s + b * cb + i * d;
      for (int64_t h = 0; h < H; ++h) {
        const at::BFloat16* xr = src + b * xs[0] + h * xs[1] + i * xs[2];
        at::BFloat16* yr = dst + b * ys[0] + h * ys[1] + i * ys[2];
        for (int64_t k = 0; k < half; k += W) {
          const V x1 = load(xr + k), x2 = load(xr + half + k);
          const V minus_x2 = sub(zero(), x2);  // exact, as is rotate_half's negation
          rotate_lanes(yr + k, x1, load(cr + k), minus_x2, load(sr + k));
          rotate_lanes(yr + half + k, x2, load(cr + half + k), x1, load(sr + half + k));
        }
      }
    }
  });
}

}  // namespace

std::vector<torch::Tensor> rope(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                const torch::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && sin.dim() == 3,
              "rope takes q, k (b, heads, n, d) and cos, sin (b or 1, n, d)");
  for (const auto* t : {&q, &k, &cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kBFloat16, "rope takes bfloat16 CPU tensors");
  const int64_t B = q.size(0), n = q.size(2), d = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == n && k.size(3) == d && d % 32 == 0,
              "rope: q ", q.sizes(), " and k ", k.sizes(), " must share batch, length and a head size that is a "
              "multiple of 32");
  TORCH_CHECK(cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == n &&
                  cos.size(2) == d && cos.is_contiguous() && sin.is_contiguous(),
              "rope: cos and sin must be contiguous (b or 1, n, d) for q ", q.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "rope: rows of q and k contiguous");
  auto q_out = torch::empty_like(q);  // the input's layout
  auto k_out = torch::empty_like(k);
  rotate(q, cos, sin, q_out);
  rotate(k, cos, sin, k_out);
  return {q_out, k_out};
}
