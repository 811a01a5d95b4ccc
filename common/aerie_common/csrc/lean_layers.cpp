// The lean forward's loop over a Llama target's decoder layers (aerie_verifier/lean_forward.py)
// in C++, for a target whose projections are all packed. It calls the very ATen operations
// the Python loop calls, in the same order, with the same arguments, so the results are the
// same bit for bit; what it saves is the Python around some fifty small operations a layer
// (a 1-token step of SmolLM2-135M on 2 cores took 11.7 ms against 14.7; docs/benchmarks.md).
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using aerie::Projection;
using aerie::rms_norm;

struct Layer {
  torch::Tensor input_norm, post_norm;
  double eps;
  Projection qkv, o, gate_up, down;
  int64_t head_dim;
  double scaling;
};

Projection projection(const std::string& format, std::vector<torch::Tensor> tensors, std::vector<int64_t> sizes,
                      std::optional<torch::Tensor> bias) {
  TORCH_CHECK(format == "q4_1" || format == "q8_0" || format == "bf16", "unknown packed format ", format);
  return Projection{format, std::move(tensors), std::move(sizes), std::move(bias)};
}

class LeanLayers {
 public:
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, double eps, Projection qkv, Projection o,
                 Projection gate_up, Projection down, int64_t head_dim, double scaling) {
    TORCH_CHECK(qkv.sizes.size() == 3 && gate_up.sizes.size() == 2, "q/k/v and gate/up come fused");
    layers_.push_back(Layer{input_norm, post_norm, eps, std::move(qkv), std::move(o), std::move(gate_up),
                            std::move(down), head_dim, scaling});
  }

  // hidden: [1, T, H], the new tokens' embeddings; cos, sin: their rotary angles; mask: a
  // tree's additive [1, 1, T, S + T] mask, or None for one token; key_buffers and
  // value_buffers: each layer's cache buffers [1, KV heads, room, D] with the first
  // ``past`` entries filled and room for T more. Writes the new keys and values after them
  // and returns the last layer's output (before the final norm), each layer's input where
  // ``keep_layer_inputs`` (for the hidden-state capture), and each layer's filled keys and
  // values (views of the buffers).
  std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>>
  forward(torch::Tensor hidden, const torch::Tensor& cos, const torch::Tensor& sin,
          const std::optional<torch::Tensor>& mask, const std::vector<torch::Tensor>& key_buffers,
          const std::vector<torch::Tensor>& value_buffers, int64_t past, bool keep_layer_inputs) const {
    const int64_t n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == 1, "one request's new tokens, [1, T, H]");
    TORCH_CHECK(static_cast<int64_t>(key_buffers.size()) == n && static_cast<int64_t>(value_buffers.size()) == n,
                "one key and one value buffer per layer");
    const int64_t tokens = hidden.size(1), end = past + tokens;
    std::vector<torch::Tensor> layer_inputs, keys(n), values(n);
    for (int64_t i = 0; i < n; ++i) {
      const Layer& layer = layers_[i];
      TORCH_CHECK(key_buffers[i].size(2) >= end && value_buffers[i].size(2) >= end, "no room in the cache buffers");
      if (keep_layer_inputs) layer_inputs.push_back(hidden);
      const std::vector<int64_t> head_shape{1, tokens, -1, layer.head_dim};
      torch::Tensor normed = rms_norm(hidden, layer.input_norm, layer.eps);
      const auto qkv = layer.qkv.split(normed);
      const torch::Tensor query = aerie::rotary(qkv[0].view(head_shape), cos, sin).transpose(1, 2);
      const torch::Tensor key = aerie::rotary(qkv[1].view(head_shape), cos, sin).transpose(1, 2);
      const torch::Tensor value = qkv[2].view(head_shape).transpose(1, 2);
      // GrowingLayer.update: the new entries after the filled ones, the filled part read
      key_buffers[i].slice(2, past, end).copy_(key);
      value_buffers[i].slice(2, past, end).copy_(value);
      keys[i] = key_buffers[i].slice(2, 0, end);
      values[i] = value_buffers[i].slice(2, 0, end);
      const torch::Tensor attended = at::scaled_dot_product_attention(query, keys[i], values[i], mask, 0.0, false,
                                                                      layer.scaling, /*enable_gqa=*/true);
      hidden = hidden + layer.o.multiply(attended.transpose(1, 2).reshape({1, tokens, -1}).contiguous());
      normed = rms_norm(hidden, layer.post_norm, layer.eps);
      const auto gate_up = layer.gate_up.split(normed);
      hidden = hidden + layer.down.multiply(torch::silu(gate_up[0]) * gate_up[1]);
    }
    return {hidden, layer_inputs, keys, values};
  }

 private:
  std::vector<Layer> layers_;
};

// tree_verify.keep_cache_entries over the loop's cache buffers: after a tree verification
// of ``past`` cached entries, the root and the tree's nodes, keep the root and the accepted
// nodes (tree indices, root to leaf), moving the accepted ones' keys and values after the
// root's, and return each layer's kept entries (views of its buffers). In one call, not some
// hundred small operations over 30 layers.
std::tuple<std::vector<torch::Tensor>, std::vector<torch::Tensor>> keep_entries(
    const std::vector<torch::Tensor>& key_buffers, const std::vector<torch::Tensor>& value_buffers, int64_t past,
    const std::vector<int64_t>& accepted) {
  const int64_t kept = past + 1 + static_cast<int64_t>(accepted.size());
  bool moves = false;  // a first-child chain is already in place
  int64_t needed = kept;
  std::vector<int64_t> sources;
  for (size_t i = 0; i < accepted.size(); ++i) {
    moves |= accepted[i] != static_cast<int64_t>(i);
    sources.push_back(past + 1 + accepted[i]);
    needed = std::max(needed, sources.back() + 1);
  }
  const torch::Tensor source = torch::tensor(sources, torch::kLong);  // the buffers are on the CPU
  const auto keep = [&](const std::vector<torch::Tensor>& buffers) {
    std::vector<torch::Tensor> kept_entries;
    for (const torch::Tensor& buffer : buffers) {
      TORCH_CHECK(buffer.size(2) >= needed, "an accepted node lies beyond the cache buffer");
      if (moves) buffer.slice(2, past + 1, kept).copy_(buffer.index_select(2, source));
      kept_entries.push_back(buffer.slice(2, 0, kept));
    }
    return kept_entries;
  };
  return {keep(key_buffers), keep(value_buffers)};
}

}  // namespace

void define_lean_layers(pybind11::module& module) {
  // A packed projection, or several fused (their output sizes, in order).
  // module_local: a second build of the module (other flags) registers its own
  pybind11::class_<Projection>(module, "Projection", pybind11::module_local())
      .def(pybind11::init(&projection), pybind11::arg("format"), pybind11::arg("tensors"),
           pybind11::arg("sizes") = std::vector<int64_t>{}, pybind11::arg("bias") = std::nullopt);
  pybind11::class_<LeanLayers>(module, "LeanLayers")
      .def(pybind11::init<>())
      .def("add_layer", &LeanLayers::add_layer)
      .def("forward", &LeanLayers::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("keep_entries", &keep_entries, pybind11::call_guard<pybind11::gil_scoped_release>());
}
