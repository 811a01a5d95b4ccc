// The kernels one C++ file of the module calls in another (lean_layers.cpp calls the others).
#pragma once
#include <torch/extension.h>

namespace aerie {

// x @ W.T with W packed (packed_linear.cpp; packed_weights.py has the formats)
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);
torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d);
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor weight);
bool vectorised();

// transformers' rotary embedding over [B, T, H, D] (rotary.cpp)
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

}  // namespace aerie
