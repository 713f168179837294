// CUDA kernels of the token-group ops (see token_ops.h for the semantics):
// one thread per output element, consecutive threads on consecutive vocabulary
// entries (coalesced stores; the gathered loads follow the tables, which are
// the identity almost everywhere, so they are mostly coalesced too).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../token_ops.h"

namespace equitune_ext {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sm_count) * 32));
}

// out[b, m, v] = scale * Σ_k w[k, b] * in[(k*B + b), m, perms[k][v]], idx = (b*M + m)*V + v
template <typename scalar_t>
__global__ void vocab_average_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                     const int64_t* __restrict__ perms, const at::opmath_type<scalar_t>* __restrict__ w,
                                     int64_t G, int64_t B, int64_t M, int64_t V, int64_t numel,
                                     at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = idx % V, r = idx / V, b = r / M, m = r % M;
    acc_t acc = 0;
    for (int64_t k = 0; k < G; ++k) {
      const acc_t wk = w ? w[k * B + b] : acc_t(1);
      acc += wk * static_cast<acc_t>(in[((k * B + b) * M + m) * V + perms[k * V + v]]);
    }
    out[idx] = static_cast<scalar_t>(acc * scale);
  }
}

// out[(k*B + b), m, v] = scale * w[k, b] * in[b, m, perms[k][v]], idx = ((k*B + b)*M + m)*V + v
template <typename scalar_t>
__global__ void vocab_transform_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                       const int64_t* __restrict__ perms, const at::opmath_type<scalar_t>* __restrict__ w,
                                       int64_t B, int64_t M, int64_t V, int64_t numel, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = idx % V, r = idx / V, m = r % M, n = r / M, k = n / B, b = n % B;
    const acc_t f = scale * (w ? w[k * B + b] : acc_t(1));
    out[idx] = static_cast<scalar_t>(f * static_cast<acc_t>(in[(b * M + m) * V + perms[k * V + v]]));
  }
}

template <typename index_t>
__global__ void token_transform_kernel(const index_t* __restrict__ ids, index_t* __restrict__ out,
                                       const int64_t* __restrict__ perms, int64_t G, int64_t V, int64_t N) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    // Range-checked on the host before the launch, except while a CUDA graph is
    // captured: then a bad id passes through unchanged (as in the Triton kernel),
    // for the embedding after it to reject, and nothing is read out of bounds.
    const int64_t t = ids[i];
    const bool in_range = t >= 0 && t < V;
    for (int64_t k = 0; k < G; ++k) out[k * N + i] = in_range ? static_cast<index_t>(perms[k * V + t]) : ids[i];
  }
}

at::Tensor vocab_op_cuda(const at::Tensor& x, const at::Tensor& perms, double scale,
                         const std::optional<at::Tensor>& weights, bool is_average) {
  const char* op = is_average ? "vocab_average" : "vocab_transform";
  TORCH_CHECK(x.is_cuda(), op, ": expected a CUDA tensor, got ", x.device());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  VocabOpPlan plan = plan_vocab_op(x, perms, scale, weights, is_average, op);
  const int64_t numel = plan.out.numel();
  if (numel == 0) return plan.out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vocab_op_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
    if (is_average) {
      vocab_average_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          plan.in.const_data_ptr<scalar_t>(), plan.out.mutable_data_ptr<scalar_t>(), plan.perms.const_data_ptr<int64_t>(),
          w, plan.G, plan.B, plan.M, plan.V, numel, static_cast<acc_t>(scale));
    } else {
      vocab_transform_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          plan.in.const_data_ptr<scalar_t>(), plan.out.mutable_data_ptr<scalar_t>(), plan.perms.const_data_ptr<int64_t>(),
          w, plan.B, plan.M, plan.V, numel, static_cast<acc_t>(scale));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return plan.out;
}

}  // namespace

at::Tensor vocab_transform_cuda(const at::Tensor& x, const at::Tensor& perms, double scale,
                                const std::optional<at::Tensor>& weights) {
  return vocab_op_cuda(x, perms, scale, weights, /*is_average=*/false);
}

at::Tensor vocab_average_cuda(const at::Tensor& y, const at::Tensor& perms, double scale,
                              const std::optional<at::Tensor>& weights) {
  return vocab_op_cuda(y, perms, scale, weights, /*is_average=*/true);
}

at::Tensor token_transform_cuda(const at::Tensor& ids, const at::Tensor& perms) {
  TORCH_CHECK(ids.is_cuda(), "token_transform: expected a CUDA tensor, got ", ids.device());
  const c10::cuda::OptionalCUDAGuard guard(ids.device());
  at::Tensor out = plan_token_transform(ids, perms);
  const int64_t G = perms.size(0), V = perms.size(1), N = ids.numel();
  if (N == 0) return out;
  // A clear error for a bad id costs one sync, which a stream being captured
  // into a CUDA graph does not allow: there the kernel passes bad ids through.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const auto lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < V, "token_transform: token id ", lo < 0 ? lo : hi, " is out of range [0, ", V,
                      ")");
  }
  const at::Tensor in = ids.contiguous(), p = perms.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "token_transform_cuda", [&] {
    token_transform_kernel<index_t><<<blocks_for(N), kThreads, 0, stream>>>(
        in.const_data_ptr<index_t>(), out.mutable_data_ptr<index_t>(), p.const_data_ptr<int64_t>(), G, V, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(equitune_ext, CUDA, m) {
  m.impl("token_transform", &token_transform_cuda);
  m.impl("vocab_transform", &vocab_transform_cuda);
  m.impl("vocab_average", &vocab_average_cuda);
}

}  // namespace equitune_ext
