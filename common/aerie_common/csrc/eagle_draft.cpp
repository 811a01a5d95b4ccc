// The EAGLE head's drafting on a CPU in C++: its forward (aerie_drafter/eagle.py,
// EagleHead.forward and fuse) and the dynamic tree's growth (aerie_drafter/proposer.py,
// grow_tree), for a head whose linear layers are all packed (aerie_drafter/loading.py,
// head_for_drafting). Like lean_layers.cpp it calls the ATen operations the Python calls, in
// the same order and with the same arguments, so the trees are the same bit for bit (tests/
// unit/test_native_draft.py); what it saves is the Python around a few hundred small
// operations a tree, and the Python's copies of the whole context's keys and values at
// every step: here each step writes its own into the session's buffers and attends over
// them, the same values. A draft took 3.35 against 4.84 ms in the engine on 2 cores
// (docs/benchmarks.md, session 24).
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using aerie::Projection;
using aerie::rms_norm;
using torch::Tensor;

// What one head step returns: the hidden state fed to the next step, and the normed output
// the logits read.
using Step = std::tuple<Tensor, Tensor>;

// aerie_drafter.eagle.causal_mask: each new position sees the past, itself and the new
// positions before it.
Tensor causal_mask(int64_t tokens, int64_t past, torch::ScalarType dtype) {
  const Tensor allowed = torch::ones({tokens, past + tokens}, torch::kBool).tril(past);
  return torch::zeros(allowed.sizes(), dtype)
      .masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity())
      .unsqueeze(0)
      .unsqueeze(0);
}

class EagleDraftHead {
 public:
  EagleDraftHead(std::vector<Tensor> fc_norms, Projection fc, Tensor hidden_norm, Tensor input_norm,
                 Tensor post_norm, Tensor final_norm, double eps, Projection qkv, Projection o, Projection gate_up,
                 Projection down, Projection lm_head, Tensor embed_tokens, Tensor d2t, Tensor inv_freq,
                 double attention_scaling, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 bool norm_output, bool norm_before_residual)
      : fc_norms_(std::move(fc_norms)),
        fc_(std::move(fc)),
        hidden_norm_(std::move(hidden_norm)),
        input_norm_(std::move(input_norm)),
        post_norm_(std::move(post_norm)),
        final_norm_(std::move(final_norm)),
        eps_(eps),
        qkv_(std::move(qkv)),
        o_(std::move(o)),
        gate_up_(std::move(gate_up)),
        down_(std::move(down)),
        lm_head_(std::move(lm_head)),
        embed_tokens_(std::move(embed_tokens)),
        d2t_(std::move(d2t)),
        inv_freq_(std::move(inv_freq)),
        attention_scaling_(attention_scaling),
        num_heads_(num_heads),
        num_kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        norm_output_(norm_output),
        norm_before_residual_(norm_before_residual) {
    TORCH_CHECK(fc_norms_.empty() || fc_norms_.size() == 3, "3.1 heads norm each of the 3 captured states");
    TORCH_CHECK(qkv_.sizes.size() == 3 && gate_up_.sizes.size() == 2, "q/k/v and gate/up come fused");
  }

  // EagleHead.fuse: [T, 3 Ht] captured states -> [T, H].
  Tensor fuse(const Tensor& target_hidden) const {
    if (fc_norms_.empty()) return fc_.multiply(target_hidden);
    const auto parts = target_hidden.chunk(3, -1);
    std::vector<Tensor> normed;
    for (size_t i = 0; i < 3; ++i) normed.push_back(rms_norm(parts[i], fc_norms_[i], eps_));
    return fc_.multiply(at::cat(normed, -1));
  }

  // EagleHead.forward over a KV cache held in buffers: hidden [1, T, H], token_ids and
  // positions [1, T]; mask: additive [1, 1, T, S + T], or None for causal; key_buffer and
  // value_buffer [1, KV heads, room, D], the first S = ``past`` entries filled. Writes the
  // step's keys and values after them and attends over the S + T entries: the values the
  // Python's concatenation of the past with the new ones gives, without copying the past.
  Step step(const Tensor& hidden, const Tensor& token_ids, const Tensor& positions,
            const std::optional<Tensor>& mask, const Tensor& key_buffer, const Tensor& value_buffer,
            int64_t past) const {
    const Tensor embeds = at::embedding(embed_tokens_, token_ids).to(hidden.scalar_type());
    // LlamaRotaryEmbedding.forward (older transformers take the product as a matmul over
    // one term: the same single rounding)
    const Tensor freqs = positions.unsqueeze(-1).to(torch::kFloat32) * inv_freq_.to(torch::kFloat32);
    const Tensor angles = at::cat({freqs, freqs}, -1);
    const Tensor cos = (angles.cos() * attention_scaling_).to(hidden.scalar_type());
    const Tensor sin = (angles.sin() * attention_scaling_).to(hidden.scalar_type());
    // EagleDecoderLayer.forward
    Tensor residual, normed_hidden;
    if (norm_before_residual_) {
      normed_hidden = rms_norm(hidden, hidden_norm_, eps_);
      residual = normed_hidden;
    } else {
      residual = hidden;
      normed_hidden = rms_norm(hidden, hidden_norm_, eps_);
    }
    const Tensor x = at::cat({rms_norm(embeds, input_norm_, eps_), normed_hidden}, -1);
    // EagleAttention.forward; the rotary kernel gives apply_rotary_pos_emb's values
    const int64_t tokens = hidden.size(1);
    const std::vector<int64_t> head_shape{1, tokens, -1, head_dim_};
    const auto qkv = qkv_.split(x);
    const Tensor query = aerie::rotary(qkv[0].view(head_shape), cos, sin).transpose(1, 2);
    const int64_t end = past + tokens;
    TORCH_CHECK(key_buffer.size(2) >= end && value_buffer.size(2) >= end, "no room in the KV buffers");
    key_buffer.slice(2, past, end).copy_(aerie::rotary(qkv[1].view(head_shape), cos, sin).transpose(1, 2));
    value_buffer.slice(2, past, end).copy_(qkv[2].view(head_shape).transpose(1, 2));
    const Tensor keys = key_buffer.slice(2, 0, end), values = value_buffer.slice(2, 0, end);
    std::optional<Tensor> attention_mask = mask;
    if (!attention_mask.has_value() && tokens > 1) attention_mask = causal_mask(tokens, past, query.scalar_type());
    const Tensor attended = at::scaled_dot_product_attention(query, keys, values, attention_mask, 0.0, false,
                                                             std::nullopt, num_kv_heads_ != num_heads_);
    Tensor out = residual + o_.multiply(attended.transpose(1, 2).reshape({1, tokens, -1}));
    const auto gate_up = gate_up_.split(rms_norm(out, post_norm_, eps_));
    out = out + down_.multiply(torch::silu(gate_up[0]) * gate_up[1]);
    const Tensor normed = rms_norm(out, final_norm_, eps_);
    return {norm_output_ ? normed : out, normed};
  }

  // grow_tree with every prefix entry visible: the candidate pool as (draft token ids,
  // cumulative log-probabilities, parents in the pool with -1 for the root, depths). The
  // buffers hold the session's ``prefix_len`` entries, with room for (depth - 1) * top_k
  // more after them, where the tree's keys and values go (scratch: the next catch-up
  // writes over them).
  std::tuple<Tensor, Tensor, Tensor, Tensor> grow(int64_t depth, int64_t top_k, const Tensor& key_buffer,
                                                 const Tensor& value_buffer, int64_t prefix_len,
                                                 const Tensor& last_hidden, const Tensor& last_normed) const {
    const auto dtype = torch::kFloat32;  // the head's, over packed weights
    const auto boolean = torch::kBool;
    const int64_t width = prefix_len;
    Tensor logp = at::log_softmax(logits(last_normed.unsqueeze(0)).squeeze(0).to(torch::kFloat32), -1);
    auto [first_values, first_indices] = logp.topk(std::min(top_k, logp.size(-1)));
    std::vector<Tensor> pool_tokens{first_indices}, pool_scores{first_values},
        pool_parents{torch::full_like(first_indices, -1)}, pool_depths{torch::ones_like(first_indices)};
    int64_t pool_size = first_indices.size(0);
    Tensor frontier = torch::arange(pool_size);
    Tensor frontier_scores = first_values;
    Tensor frontier_hidden = last_hidden.expand({frontier.size(0), -1});
    Tensor all_tokens = first_indices;

    Tensor slot_ancestors = torch::zeros({0, 0}, boolean);
    std::optional<Tensor> parent_slots;

    for (int64_t level = 1; level < depth; ++level) {
      const int64_t f = frontier.size(0), slots = slot_ancestors.size(0);
      const Tensor ancestors =
          parent_slots.has_value() ? slot_ancestors.index({*parent_slots}) : torch::zeros({f, slots}, boolean);
      const Tensor visible = at::cat({torch::ones({f, width}, boolean), ancestors, torch::eye(f, boolean)}, 1);
      const Tensor mask = torch::zeros(visible.sizes(), dtype)
                              .masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
      const Tensor token_ids = to_target_ids(all_tokens.index({frontier})).unsqueeze(0);
      const Tensor positions = torch::zeros({1, f}, torch::kLong) + (prefix_len + level - 1);
      const auto [next_hidden, normed] = step(frontier_hidden.unsqueeze(0).to(dtype), token_ids, positions,
                                              mask.unsqueeze(0).unsqueeze(0), key_buffer, value_buffer,
                                              prefix_len + slots);
      slot_ancestors = at::cat({at::cat({slot_ancestors, torch::zeros({slots, f}, boolean)}, 1),
                                visible.slice(1, width)});

      logp = at::log_softmax(logits(normed[0]).to(torch::kFloat32), -1);
      auto [top_values, top_indices] =
          (frontier_scores.unsqueeze(1) + logp).topk(std::min(top_k, logp.size(-1)), -1);
      const int64_t children_count = top_indices.numel(), per_node = top_indices.size(1);
      const Tensor children = torch::arange(pool_size, pool_size + children_count);
      pool_tokens.push_back(top_indices.flatten());
      pool_scores.push_back(top_values.flatten());
      pool_parents.push_back(frontier.repeat_interleave(per_node));
      pool_depths.push_back(torch::full_like(top_indices.flatten(), level + 1));
      pool_size += children_count;
      all_tokens = at::cat(pool_tokens);

      auto [best_values, best_indices] = top_values.flatten().topk(std::min(top_k, children_count));
      frontier = children.index({best_indices});
      frontier_scores = best_values;
      const Tensor parent_rows = best_indices.div(per_node, "floor");
      frontier_hidden = next_hidden[0].index({parent_rows});
      parent_slots = parent_rows + slots;
    }
    return {at::cat(pool_tokens), at::cat(pool_scores), at::cat(pool_parents), at::cat(pool_depths)};
  }

 private:
  Tensor logits(const Tensor& normed) const { return lm_head_.multiply(normed); }

  Tensor to_target_ids(const Tensor& draft_ids) const { return draft_ids + d2t_.index({draft_ids}); }

  std::vector<Tensor> fc_norms_;
  Projection fc_;
  Tensor hidden_norm_, input_norm_, post_norm_, final_norm_;
  double eps_;
  Projection qkv_, o_, gate_up_, down_, lm_head_;
  Tensor embed_tokens_, d2t_, inv_freq_;
  double attention_scaling_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  bool norm_output_, norm_before_residual_;
};

}  // namespace

void define_eagle_draft(pybind11::module& module) {
  namespace py = pybind11;
  py::class_<EagleDraftHead>(module, "EagleDraftHead")
      .def(py::init<std::vector<Tensor>, Projection, Tensor, Tensor, Tensor, Tensor, double, Projection, Projection,
                    Projection, Projection, Projection, Tensor, Tensor, Tensor, double, int64_t, int64_t, int64_t,
                    bool, bool>(),
           py::arg("fc_norms"), py::arg("fc"), py::arg("hidden_norm"), py::arg("input_norm"), py::arg("post_norm"),
           py::arg("final_norm"), py::arg("eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("lm_head"), py::arg("embed_tokens"), py::arg("d2t"), py::arg("inv_freq"),
           py::arg("attention_scaling"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("norm_output"), py::arg("norm_before_residual"))
      .def("fuse", &EagleDraftHead::fuse, py::call_guard<py::gil_scoped_release>())
      .def("step", &EagleDraftHead::step, py::call_guard<py::gil_scoped_release>())
      .def("grow", &EagleDraftHead::grow, py::call_guard<py::gil_scoped_release>());
}
