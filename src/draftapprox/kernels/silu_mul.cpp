// SwiGLU's elementwise middle, gate = silu(gate) * up, in place over bfloat16 rows in one pass.
//
// PyTorch runs it as two vectorised passes (SiLU in place, then the product), each widening and rounding on its
// own; on the EPYC they made 2% of the 0.5B draft's 2k-token prefill, at 2 billion elements a second on two
// threads. Here each element is read and written once, with the reference's roundings (silu(gate) rounded to
// bfloat16, then its product with up rounded again) and AVX-512 BF16's one-instruction rounding, at about twice
// that rate.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace {

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

void silu_mul_range(at::BFloat16* gate, const at::BFloat16* up, int64_t from, int64_t to) {
  using namespace draftapprox;
  int64_t i = from;
  const V one = set1(1.f);
  for (; i + W <= to; i += W) {
    const V g = load(gate + i);
    // sigmoid from e^-|g| <= 1, which never overflows: 1 / (1 + t) for g >= 0, t / (1 + t) below
    const V t = expv(sub(zero(), abs(g)));
    const V inv = div(one, add(one, t));
    const V sigmoid = negative_select(g, mul(inv, t), inv);
    const V silu_g = widen(to_bf16(mul(g, sigmoid)));
    store(gate + i, mul(silu_g, load(up + i)));
  }
  for (; i < to; ++i) {
    const at::BFloat16 s = static_cast<at::BFloat16>(silu(static_cast<float>(gate[i])));
    gate[i] = static_cast<at::BFloat16>(static_cast<float>(s) * static_cast<float>(up[i]));
  }
}

}  // namespace

torch::Tensor silu_mul_(torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "silu_mul_ runs on the CPU");
  TORCH_CHECK(gate.scalar_type() == torch::kBFloat16 && up.scalar_type() == torch::kBFloat16,
              "silu_mul_ takes bfloat16 gate and up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.is_contiguous() && up.is_contiguous(),
              "silu_mul_: gate and up must be contiguous and of one shape");
  at::BFloat16* g = gate.data_ptr<at::BFloat16>();
  const at::BFloat16* u = up.data_ptr<at::BFloat16>();
  at::parallel_for(0, gate.numel(), 1 << 15, [&](int64_t begin, int64_t end) { silu_mul_range(g, u, begin, end); });
  return gate;
}
