// Host-side plumbing of the token-group ops (schemas in equitune_ext.cpp),
// shared by the CPU and CUDA entry points. G = perms.size(0), V = perms.size(1):
//   token_transform(ids, perms):           out[k*B + b, ...] = perms[k][ids[b, ...]]
//   vocab_transform(x, perms, scale, w):   out[k*B + b, ..., v] = scale * w[k, b] * x[b, ..., perms[k][v]]
//   vocab_average(y, perms, scale, w):     out[b, ..., v] = scale * Σ_k w[k, b] * y[k*B + b, ..., perms[k][v]]
// vocab_transform with the inverse tables is the adjoint of vocab_average.
#pragma once

#include <ATen/ATen.h>

#include "op_checks.h"

#include <cmath>
#include <optional>
#include <vector>

namespace equitune_ext {

struct VocabOpPlan {
  at::Tensor in;       // contiguous input viewed as [N_in, M, V]
  at::Tensor perms;    // contiguous int64 [G, V]
  at::Tensor weights;  // undefined, or contiguous [G, B] in the input's opmath dtype
  at::Tensor out;      // contiguous result, final shape
  int64_t G = 0, B = 0, M = 0, V = 0;
};

inline void check_perms(const at::Tensor& perms, const at::Tensor& t, const char* op) {
  TORCH_CHECK(perms.dim() == 2 && perms.size(0) >= 1, op, ": `perms` must have shape [|G|, V], got ", perms.sizes());
  TORCH_CHECK(perms.scalar_type() == at::kLong, op, ": `perms` must be int64, got ", perms.scalar_type());
  TORCH_CHECK(perms.device() == t.device(), op, ": `perms` is on ", perms.device(), " but the input is on ", t.device());
}

inline VocabOpPlan plan_vocab_op(const at::Tensor& input, const at::Tensor& perms, double scale,
                                 const std::optional<at::Tensor>& weights, bool is_average, const char* op) {
  check_perms(perms, input, op);
  check_scale(scale, op);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected floating-point logits, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 2, op, ": expected logits of shape [N, *, V] (at least 2 dims), got ", input.dim(), " dims");
  VocabOpPlan plan;
  plan.G = perms.size(0);
  plan.V = perms.size(1);
  TORCH_CHECK(input.size(-1) == plan.V, op, ": the logits' last dim (", input.size(-1),
              ") must equal the group's vocabulary size (", plan.V, ")");
  const int64_t n_in = input.size(0);
  plan.B = group_batch(n_in, plan.G, is_average, op);
  plan.M = plan.V == 0 || n_in == 0 ? 0 : input.numel() / (n_in * plan.V);
  plan.weights = checked_weights(weights, input, plan.G, plan.B, op);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[0] = is_average ? plan.B : plan.B * plan.G;
  plan.out = at::empty(shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  plan.in = input.contiguous();
  plan.perms = perms.contiguous();
  return plan;
}

// Checks of token_transform, and its output [G*B, *] (contiguous, ids' dtype).
inline at::Tensor plan_token_transform(const at::Tensor& ids, const at::Tensor& perms) {
  check_perms(perms, ids, "token_transform");
  TORCH_CHECK(ids.dim() >= 1, "token_transform: expected ids of shape [B, *], got a 0-dim tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "token_transform: ids must be int64 or int32, got ", ids.scalar_type());
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape[0] *= perms.size(0);
  return at::empty(shape, ids.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace equitune_ext
