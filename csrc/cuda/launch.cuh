// Launch helpers shared by the CUDA kernels of the image ops
// (group_ops_cuda.cu) and the volume ops (volume_ops_cuda.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>

#include "../group_ops.h"

namespace equitune_ext {

// Codes travel by value in the kernel parameters; larger lists are rejected
// with an error (the image groups have at most 8 elements, the volume groups 48).
constexpr int kMaxCodes = 64;

struct CodeList {
  int n;
  int8_t code[kMaxCodes];
};

inline CodeList make_code_list(const GroupOpPlan& plan, const char* op_name) {
  TORCH_CHECK(plan.group_size <= kMaxCodes, op_name, ": the CUDA kernels take at most ", kMaxCodes,
              " group elements, got ", plan.group_size);
  CodeList list{};
  list.n = static_cast<int>(plan.group_size);
  for (int g = 0; g < list.n; ++g) list.code[g] = static_cast<int8_t>(plan.codes[g]);
  return list;
}

// Blocks for a grid-stride loop over `work_items` blocks' worth of work: at
// most 32 per SM, enough to fill the device.
inline int64_t grid_size(int64_t work_items) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t cap = int64_t(sm_count) * 32;
  return std::max<int64_t>(1, std::min(work_items, cap));
}

}  // namespace equitune_ext
