// What the C++ files of the module share (lean_layers.cpp and eagle_draft.cpp call the others).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace aerie {

// x @ W.T with W packed (packed_linear.cpp; packed_weights.py has the formats)
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d);
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor weight);
bool vectorised();

// transformers' rotary embedding over [B, T, H, D] (rotary.cpp)
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

// One call of the packed kernel for one or more projections of the same input (q, k and v;
// gate and up), their outputs split apart, and their biases added where they have them
// (packed_weights.fused_projection and PackedLinear). Python builds them (the pybind type
// is defined in lean_layers.cpp).
struct Projection {
  std::string format;
  std::vector<torch::Tensor> tensors;
  std::vector<int64_t> sizes;
  std::optional<torch::Tensor> bias;

  torch::Tensor multiply(const torch::Tensor& x) const {
    torch::Tensor out;
    if (format == "q4_1") {
      out = q4_1_linear(x, tensors[0], tensors[1], tensors[2]);
    } else if (format == "q8_0") {
      out = q8_0_linear(x, tensors[0], tensors[1]);
    } else {
      out = bf16_linear(x, tensors[0]);
    }
    return bias.has_value() ? out + *bias : out;
  }

  std::vector<torch::Tensor> split(const torch::Tensor& x) const {
    return multiply(x).split_with_sizes(sizes, -1);
  }
};

// transformers' LlamaRMSNorm, operation for operation (lean_forward._rms_norm).
inline torch::Tensor rms_norm(const torch::Tensor& hidden, const torch::Tensor& weight, double eps) {
  const torch::Tensor h = hidden.to(torch::kFloat32);
  const torch::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * torch::rsqrt(variance + eps)).to(hidden.scalar_type());
}

}  // namespace aerie
