// The Python module of the compiled kernels: one binding per kernel, each defined in its own file.
#include <torch/extension.h>

torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w,
                          const c10::optional<torch::Tensor>& bias);
std::string isa();
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                               double scale);
torch::Tensor prefill_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                                double scale);
torch::Tensor silu_mul_(torch::Tensor& gate, const torch::Tensor& up);
std::vector<torch::Tensor> rope(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                const torch::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "float32 or bfloat16 rows times bfloat16 weights, products in float32",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("isa", &isa, "the instruction-set level this build was compiled for");
  m.def("rms_norm", &rms_norm, "RMSNorm of the last dimension, as transformers' Llama/Qwen norms round it");
  m.def("decode_attention", &decode_attention, "one query per head over every cached key, float32 softmax");
  m.def("prefill_attention", &prefill_attention, "causal attention of the newest queries over every key up to each");
  m.def("silu_mul_", &silu_mul_, "gate = silu(gate) * up in place, bfloat16, as PyTorch rounds the two steps");
  m.def("rope", &rope, "rotary embedding of bfloat16 q and k, as transformers' Llama family rounds it");
}
