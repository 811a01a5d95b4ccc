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

  // hidden: [1, T, H], the new tokens' embeddings, of one request or of several one after
  // another (a ragged batch: request r owns ``rows[r]`` of the T rows); cos, sin: their
  // rotary angles. Per request: ``masks[r]``, its tree's additive [1, 1, rows, past + rows]
  // mask, or None for one token; ``key_buffers[r]`` and ``value_buffers[r]``, each layer's
  // cache buffers [1, KV heads, room, D] with the first ``pasts[r]`` entries filled and room
  // for its rows. Writes each request's new keys and values after its filled ones, and
  // returns the last layer's output (before the final norm), each layer's input where
  // ``keep_layer_inputs`` (for the hidden-state capture), and each request's filled keys
  // and values per layer (views of the buffers). The projections take all the rows at once;
  // only the attention goes request by request.
  std::tuple<torch::Tensor, std::vector<torch::Tensor>, std::vector<std::vector<torch::Tensor>>,
             std::vector<std::vector<torch::Tensor>>>
  forward(torch::Tensor hidden, const torch::Tensor& cos, const torch::Tensor& sin, const std::vector<int64_t>& rows,
          const std::vector<std::optional<torch::Tensor>>& masks,
          const std::vector<std::vector<torch::Tensor>>& key_buffers,
          const std::vector<std::vector<torch::Tensor>>& value_buffers, const std::vector<int64_t>& pasts,
          bool keep_layer_inputs) const {
    const int64_t n = static_cast<int64_t>(layers_.size());
    const size_t requests = rows.size();
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == 1, "the new tokens as one row of a batch, [1, T, H]");
    TORCH_CHECK(requests > 0 && masks.size() == requests && key_buffers.size() == requests &&
                    value_buffers.size() == requests && pasts.size() == requests,
                "rows, masks, buffers and pasts: one entry per request");
    const int64_t tokens = hidden.size(1);
    std::vector<int64_t> starts(requests + 1, 0);
    for (size_t r = 0; r < requests; ++r) {
      TORCH_CHECK(static_cast<int64_t>(key_buffers[r].size()) == n && static_cast<int64_t>(value_buffers[r].size()) == n,
                  "one key and one value buffer per layer");
      starts[r + 1] = starts[r] + rows[r];
    }
    TORCH_CHECK(starts[requests] == tokens, "the requests' rows add up to ", starts[requests], ", not ", tokens);
    std::vector<torch::Tensor> layer_inputs;
    std::vector<std::vector<torch::Tensor>> keys(requests, std::vector<torch::Tensor>(n)), values = keys;
    std::vector<torch::Tensor> attended(requests);
    for (int64_t i = 0; i < n; ++i) {
      const Layer& layer = layers_[i];
      if (keep_layer_inputs) layer_inputs.push_back(hidden);
      const std::vector<int64_t> head_shape{1, tokens, -1, layer.head_dim};
      torch::Tensor normed = rms_norm(hidden, layer.input_norm, layer.eps);
      const auto qkv = layer.qkv.split(normed);
      const torch::Tensor query = aerie::rotary(qkv[0].view(head_shape), cos, sin).transpose(1, 2);
      const torch::Tensor key = aerie::rotary(qkv[1].view(head_shape), cos, sin).transpose(1, 2);
      const torch::Tensor value = qkv[2].view(head_shape).transpose(1, 2);
      for (size_t r = 0; r < requests; ++r) {
        // one request: its rows are all of them, taken as they are
        const auto own = [&](const torch::Tensor& all) {
          return requests == 1 ? all : all.slice(2, starts[r], starts[r + 1]);
        };
        const int64_t past = pasts[r], end = past + rows[r];
        const torch::Tensor &key_buffer = key_buffers[r][i], &value_buffer = value_buffers[r][i];
        TORCH_CHECK(key_buffer.size(2) >= end && value_buffer.size(2) >= end, "no room in the cache buffers");
        // GrowingLayer.update: the new entries after the filled ones, the filled part read
        key_buffer.slice(2, past, end).copy_(own(key));
        value_buffer.slice(2, past, end).copy_(own(value));
        keys[r][i] = key_buffer.slice(2, 0, end);
        values[r][i] = value_buffer.slice(2, 0, end);
        attended[r] = at::scaled_dot_product_attention(own(query), keys[r][i], values[r][i], masks[r], 0.0, false,
                                                       layer.scaling, /*enable_gqa=*/true);
      }
      const torch::Tensor all_attended = requests == 1 ? attended[0] : torch::cat(attended, 2);
      hidden = hidden + layer.o.multiply(all_attended.transpose(1, 2).reshape({1, tokens, -1}).contiguous());
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
