// Argument rules that the image ops (group_ops.h) and the token ops (token_ops.h)
// share, each written once; equitune_ext/contract.py holds the same rules for the
// Python side (the public API and the Triton ops).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace equitune_ext {

inline void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": `scale` must be finite, got ", scale);
}

// B, the batch: an average's n_in rows are |G| blocks of B, a transform's n_in rows are B.
inline int64_t group_batch(int64_t n_in, int64_t group_size, bool is_average, const char* op) {
  if (!is_average) return n_in;
  TORCH_CHECK(n_in % group_size == 0, op, ": the leading dim (", n_in, ") must be a multiple of the group order (",
              group_size, ")");
  return n_in / group_size;
}

// λ-weights [|G|, B], floating, on the input's device: returned contiguous in the
// accumulation dtype (float64 for float64 inputs, else float32); undefined if absent.
inline at::Tensor checked_weights(const std::optional<at::Tensor>& weights, const at::Tensor& input, int64_t group_size,
                                  int64_t batch, const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const at::Tensor& w = *weights;
  TORCH_CHECK(w.device() == input.device(), op, ": `weights` is on ", w.device(), " but the input is on ", input.device());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": `weights` must be floating-point, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == group_size && w.size(1) == batch, op,
              ": `weights` must have shape [|G|, B] = [", group_size, ", ", batch, "], got ", w.sizes());
  return w.to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace equitune_ext
