// CPU kernels of the token-group ops (see token_ops.h for the semantics).
// vocab_average gathers the |G| rows through the permutation tables into one
// opmath row per output row and writes it once: the |G| permuted copies of
// the logits are never materialized.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../token_ops.h"

namespace equitune_ext {
namespace {

template <typename scalar_t>
void vocab_kernel(const VocabOpPlan& plan, double scale_d, bool is_average) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = plan.in.const_data_ptr<scalar_t>();
  scalar_t* out = plan.out.mutable_data_ptr<scalar_t>();
  const int64_t* perms = plan.perms.const_data_ptr<int64_t>();
  const acc_t* w = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
  const int64_t G = plan.G, B = plan.B, M = plan.M, V = plan.V;
  const acc_t scale = static_cast<acc_t>(scale_d);
  if (is_average) {
    // out[b, m, v] = scale * Σ_k w[k, b] * in[(k*B + b), m, perms[k][v]]
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(V);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / M, m = r % M;
        for (int64_t k = 0; k < G; ++k) {
          const scalar_t* src = in + ((k * B + b) * M + m) * V;
          const int64_t* p = perms + k * V;
          const acc_t wk = w ? w[k * B + b] : acc_t(1);
          if (k == 0) {
            for (int64_t v = 0; v < V; ++v) acc[v] = wk * static_cast<acc_t>(src[p[v]]);
          } else {
            for (int64_t v = 0; v < V; ++v) acc[v] += wk * static_cast<acc_t>(src[p[v]]);
          }
        }
        scalar_t* dst = out + r * V;
        for (int64_t v = 0; v < V; ++v) dst[v] = static_cast<scalar_t>(acc[v] * scale);
      }
    });
    return;
  }
  // out[(k*B + b), m, v] = scale * w[k, b] * in[b, m, perms[k][v]]
  at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / M, m = r % M;
      const scalar_t* src = in + r * V;
      for (int64_t k = 0; k < G; ++k) {
        const int64_t* p = perms + k * V;
        const acc_t f = scale * (w ? w[k * B + b] : acc_t(1));
        scalar_t* dst = out + ((k * B + b) * M + m) * V;
        for (int64_t v = 0; v < V; ++v) dst[v] = static_cast<scalar_t>(f * static_cast<acc_t>(src[p[v]]));
      }
    }
  });
}

at::Tensor vocab_op_cpu(const at::Tensor& x, const at::Tensor& perms, double scale,
                        const std::optional<at::Tensor>& weights, bool is_average) {
  const char* op = is_average ? "vocab_average" : "vocab_transform";
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got ", x.device());
  VocabOpPlan plan = plan_vocab_op(x, perms, scale, weights, is_average, op);
  // The tables index the logits: an entry outside [0, V) would read out of
  // bounds. A TokenGroup's tables are checked when it is made; the raw op
  // checks every entry here, O(|G| V) next to the kernel's O(|G| B M V), as
  // plan_group_rows_op checks a CPU code table.
  const int64_t* p = plan.perms.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < plan.perms.numel(); ++k)
    TORCH_CHECK(p[k] >= 0 && p[k] < plan.V, op, ": `perms` holds ", p[k], ", out of range [0, ", plan.V, ")");
  if (plan.out.numel() == 0) return plan.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vocab_op_cpu",
                                  [&] { vocab_kernel<scalar_t>(plan, scale, is_average); });
  return plan.out;
}

}  // namespace

at::Tensor vocab_transform_cpu(const at::Tensor& x, const at::Tensor& perms, double scale,
                               const std::optional<at::Tensor>& weights) {
  return vocab_op_cpu(x, perms, scale, weights, /*is_average=*/false);
}

at::Tensor vocab_average_cpu(const at::Tensor& y, const at::Tensor& perms, double scale,
                             const std::optional<at::Tensor>& weights) {
  return vocab_op_cpu(y, perms, scale, weights, /*is_average=*/true);
}

// out[k*N + i] = perms[k][ids[i]] over the flattened ids.
at::Tensor token_transform_cpu(const at::Tensor& ids, const at::Tensor& perms) {
  TORCH_CHECK(ids.device().is_cpu(), "token_transform: expected a CPU tensor, got ", ids.device());
  at::Tensor out = plan_token_transform(ids, perms);
  const int64_t G = perms.size(0), V = perms.size(1), N = ids.numel();
  const at::Tensor in = ids.contiguous(), p = perms.contiguous();
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> bad_id{0};
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "token_transform_cpu", [&] {
    const index_t* src = in.const_data_ptr<index_t>();
    index_t* dst = out.mutable_data_ptr<index_t>();
    const int64_t* tab = p.const_data_ptr<int64_t>();
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = src[i];
        if (t < 0 || t >= V) {
          bad_id.store(t);
          any_bad.store(true);
          continue;
        }
        for (int64_t k = 0; k < G; ++k) dst[k * N + i] = static_cast<index_t>(tab[k * V + t]);
      }
    });
  });
  // ValueError, as the Triton op and the reference backend raise for a bad id.
  TORCH_CHECK_VALUE(!any_bad.load(), "token_transform: token id ", bad_id.load(), " is out of range [0, ", V, ")");
  return out;
}

TORCH_LIBRARY_IMPL(equitune_ext, CPU, m) {
  m.impl("token_transform", &token_transform_cpu);
  m.impl("vocab_transform", &vocab_transform_cpu);
  m.impl("vocab_average", &vocab_average_cpu);
}

}  // namespace equitune_ext
