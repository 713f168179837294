// Host-side plumbing shared by the CPU and CUDA entry points of the image- and
// volume-group ops: argument checks, the output's shape and memory format, and
// a uniform view [N, C, H, W] (volumes: [N, C, D, H, W]) of input and output
// that the kernels walk.
//
// Op semantics (schemas in equitune_ext.cpp), G = len(elements), w = weights
// ([G, B], 1 when absent):
//   group_transform(x, elements, scale, w):  out[g*B + b] = scale * w[g, b] * Γ(elements[g]) x[b]
//   group_average(y, elements, scale, w):    out[b] = scale * Σ_g w[g, b] * Γ(elements[g]) y[g*B + b]
// The Python layer passes the group's inverse codes to group_average (and
// all-identity codes for an invariant average), so each op is the adjoint of
// the other with the inverse codes.
//
// The per-row ops take a code table codes [k, B] (int64) in place of the list:
//   group_transform_rows(x, codes, scale, w):  out[j*B + b] = scale * w[j, b] * Γ(codes[j, b]) x[b]
//   group_average_rows(y, codes, scale, w):    out[b] = scale * Σ_j w[j, b] * Γ(codes[j, b]) y[j*B + b]
// The kernels are the same: they ask the plan for the code of block (g, b).
//
// The volume ops (volume_transform, volume_average and their _rows forms) are
// the same four ops on [N, *, D, H, W] with cube codes (index.h): a plan with
// spatial_dims = 3.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "index.h"
#include "op_checks.h"

namespace equitune_ext {

struct GroupOpPlan {
  int spatial_dims = 2;      // 2: D4 codes on [.., H, W]; 3: cube codes on [.., D, H, W]
  std::vector<int> codes;    // per-block codes [G]; all identity for per-row ops (only their shape rule is used)
  std::vector<int> row_codes;  // per-row ops on the CPU: codes[g, b] at g*B + b (empty otherwise)
  at::Tensor row_code_table;   // per-row ops: the [G, B] int64 table, contiguous, on the input's device
  int64_t group_size = 0;
  int64_t batch = 0;         // B: input batch of transform, output batch of average
  at::Tensor in_view;        // [N_in, C, H, W] (volumes: [N_in, C, D, H, W]) view of the input (any strides)
  at::Tensor out;            // the result, in its final shape
  at::Tensor out_view;       // the same view of `out`
  bool channels_last = false;  // out_view is laid out channels last: [N_out, (D,) H, W, C]
  at::Tensor weights;          // undefined, or [G, B] contiguous in the opmath dtype of the input

  // The code of block (g, b), host side.
  int code_at(int64_t g, int64_t b) const { return row_codes.empty() ? codes[g] : row_codes[g * batch + b]; }
};

// Whether the element maps the input's shape onto a permutation of it (an odd
// rotation, a permutation of the cube's axes): then all spatial extents must agree.
inline bool permutes_axes(int code, int spatial_dims) {
  return spatial_dims == 3 ? cube_code_permutes(code) : code_transposes(code);
}

// Output layout rule, mirrored by the fake kernels in equitune_ext/contract.py:
// channels_last (volumes: channels_last_3d) in gives the same out; everything
// else gives contiguous.
inline bool wants_channels_last(const at::Tensor& t, int spatial_dims = 2) {
  const auto format = spatial_dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  return t.dim() == spatial_dims + 2 && !t.is_contiguous() && t.is_contiguous(format);
}

// [N, *mid, H, W] -> [N, prod(mid), H, W] (a view whenever strides allow it);
// tensors of fewer than 3 dims (allowed for all-identity codes) -> [N, 1, 1, rest].
inline at::Tensor as_planes(const at::Tensor& t) {
  if (t.dim() >= 4) return t.dim() == 4 ? t : t.flatten(1, -3);
  if (t.dim() == 3) return t.unsqueeze(1);
  const int64_t rest = t.dim() == 2 ? t.size(1) : 1;
  return t.reshape({t.size(0), 1, 1, rest});
}

// [N, *mid, D, H, W] -> [N, prod(mid), D, H, W] (at least 5 dims).
inline at::Tensor as_volumes(const at::Tensor& t) { return t.dim() == 5 ? t : t.flatten(1, -4); }

// The checks and the output shared by both kinds of op, once plan.codes (or
// the row table) are known. Every element keeps the input's shape: one that
// permutes axes needs equal spatial extents, checked here.
inline void finish_plan(GroupOpPlan& plan, const at::Tensor& input, double scale,
                        const std::optional<at::Tensor>& weights, bool is_average, bool all_identity,
                        bool any_permutes, const char* op_name) {
  check_scale(scale, op_name);
  const bool volume = plan.spatial_dims == 3;
  if (volume) {
    // A 4-dim tensor is rejected, not read as [N, D, H, W]: it is most likely an
    // image batch [N, C, H, W], whose channels a volume element would move.
    TORCH_CHECK(input.dim() >= 5, op_name, ": expected a tensor of shape [N, C, D, H, W] (at least 5 dims), got ",
                input.dim(), " dims");
  } else {
    TORCH_CHECK(input.dim() >= 3 || (all_identity && input.dim() >= 1), op_name,
                ": expected a tensor of shape [N, *, H, W] (at least 3 dims), got ", input.dim(), " dims");
  }
  TORCH_CHECK(input.numel() < (int64_t(1) << 62), op_name, ": tensor too large");
  const bool weighted = weights.has_value() && weights->defined();
  if (is_average || scale != 1.0 || weighted) {
    TORCH_CHECK(at::isFloatingType(input.scalar_type()), op_name,
                ": expected a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                input.scalar_type());
  }
  if (volume) {
    const int64_t D = input.size(-3), H = input.size(-2), W = input.size(-1);
    TORCH_CHECK(!any_permutes || (D == H && H == W), op_name,
                ": permutations of the axes need cubic inputs (D == H == W), got D=", D, ", H=", H, ", W=", W);
  } else {
    const int64_t H = input.dim() >= 3 ? input.size(-2) : 1;
    const int64_t W = input.dim() >= 3 ? input.size(-1) : 1;
    TORCH_CHECK(!any_permutes || H == W, op_name,
                ": 90-degree rotations need square inputs (H == W), got H=", H, ", W=", W);
  }

  plan.batch = group_batch(input.size(0), plan.group_size, is_average, op_name);
  const int64_t n_out = is_average ? plan.batch : plan.batch * plan.group_size;
  plan.weights = checked_weights(weights, input, plan.group_size, plan.batch, op_name);

  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape[0] = n_out;
  plan.channels_last = wants_channels_last(input, plan.spatial_dims);
  const auto channels_last_format = volume ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  plan.out = at::empty(out_shape, input.options().memory_format(
                                      plan.channels_last ? channels_last_format : at::MemoryFormat::Contiguous));
  plan.in_view = volume ? as_volumes(input) : as_planes(input);
  plan.out_view = volume ? as_volumes(plan.out) : as_planes(plan.out);
}

inline GroupOpPlan plan_group_op(const at::Tensor& input, at::IntArrayRef elements, double scale,
                                 const std::optional<at::Tensor>& weights, bool is_average, const char* op_name,
                                 int spatial_dims = 2) {
  GroupOpPlan plan;
  plan.spatial_dims = spatial_dims;
  TORCH_CHECK(!elements.empty(), op_name, ": `elements` must name at least one group element");
  bool all_identity = true, any_permutes = false;
  for (int64_t e : elements) {
    TORCH_CHECK(code_is_valid(e, spatial_dims), op_name, ": group element code ", e, " is out of range [0, ",
                num_codes(spatial_dims), ")");
    plan.codes.push_back(static_cast<int>(e));
    all_identity = all_identity && e == 0;
    any_permutes = any_permutes || permutes_axes(static_cast<int>(e), spatial_dims);
  }
  plan.group_size = static_cast<int64_t>(plan.codes.size());
  finish_plan(plan, input, scale, weights, is_average, all_identity, any_permutes, op_name);
  return plan;
}

// The per-row ops: `codes` an int64 [k, B] table on the input's device. On the
// CPU every code is checked (in [0, 8), volumes [0, 48); one that permutes
// axes needs equal extents). A CUDA table is not read on the host (that would
// sync): the public API checks the values first (contract.py), and the CUDA
// kernels read each code through row_code() / volume_row_code() (index.h),
// which keep any value in bounds.
inline GroupOpPlan plan_group_rows_op(const at::Tensor& input, const at::Tensor& codes, double scale,
                                      const std::optional<at::Tensor>& weights, bool is_average, const char* op_name,
                                      int spatial_dims = 2) {
  GroupOpPlan plan;
  plan.spatial_dims = spatial_dims;
  TORCH_CHECK(codes.scalar_type() == at::kLong, op_name, ": `codes` must be an int64 tensor, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, op_name, ": `codes` must have shape [k, B] with k >= 1, got ",
              codes.sizes());
  TORCH_CHECK(codes.device() == input.device(), op_name, ": `codes` is on ", codes.device(), " but the input is on ",
              input.device());
  TORCH_CHECK(input.dim() >= 1, op_name, ": expected a tensor of shape [N, *, H, W], got a 0-dim tensor");
  plan.group_size = codes.size(0);
  TORCH_CHECK(!is_average || input.size(0) % plan.group_size == 0, op_name, ": the leading dim (", input.size(0),
              ") must be a multiple of k = codes.size(0) (", plan.group_size, ")");
  const int64_t batch = is_average ? input.size(0) / plan.group_size : input.size(0);
  TORCH_CHECK(batch == codes.size(1), op_name, ": `codes` must have shape [k, B] = [", plan.group_size, ", ", batch,
              "], got ", codes.sizes());
  plan.codes.assign(plan.group_size, 0);
  plan.row_code_table = codes.contiguous();
  bool all_identity = true, any_permutes = false;
  if (codes.device().is_cpu()) {
    const int64_t* c = plan.row_code_table.const_data_ptr<int64_t>();
    plan.row_codes.resize(codes.numel());
    for (int64_t k = 0; k < codes.numel(); ++k) {
      // The public ops map an `elements` index outside [0, |G|) to code num_codes
      // where they cannot read the indices (compiled regions, torch.func).
      TORCH_CHECK(code_is_valid(c[k], spatial_dims), op_name, ": `codes` holds ", c[k], ", out of range [0, ",
                  num_codes(spatial_dims),
                  "): the `elements` passed to group_transform / group_average hold an index outside [0, |G|)");
      plan.row_codes[k] = static_cast<int>(c[k]);
      all_identity = all_identity && c[k] == 0;
      any_permutes = any_permutes || permutes_axes(plan.row_codes[k], spatial_dims);
    }
  } else {
    all_identity = false;
  }
  finish_plan(plan, input, scale, weights, is_average, all_identity, any_permutes, op_name);
  return plan;
}

// Element-wise operation applied while moving data (CPU and CUDA kernels):
// a plain copy of raw bits (every dtype), or a multiply by `scale` in opmath
// (the backward of group_average, float dtypes only).
template <typename T>
struct CopyOp {
  using value_t = T;
  using weight_t = float;  // unused: weighted transforms use ScaleOp
  EQUI_HOST_DEVICE T operator()(T v) const { return v; }
  // Weights need arithmetic: plan_group_op sends weighted calls to ScaleOp.
  template <typename F>
  EQUI_HOST_DEVICE CopyOp with_factor(F) const { return *this; }
};

template <typename scalar_t>
struct ScaleOp {
  using value_t = scalar_t;
  using opmath_t = at::opmath_type<scalar_t>;
  using weight_t = opmath_t;  // plan.weights' dtype for this input dtype
  opmath_t scale;
  EQUI_HOST_DEVICE scalar_t operator()(scalar_t v) const {
    return static_cast<scalar_t>(static_cast<opmath_t>(v) * scale);
  }
  // The op for one (g, b) block of a weighted transform: scale * w[g, b].
  template <typename F>
  EQUI_HOST_DEVICE ScaleOp with_factor(F factor) const { return {static_cast<opmath_t>(scale * factor)}; }
};

// Calls f(T{}) with an unsigned type of the tensor's element size: transform is
// a pure permutation of elements, so one copy kernel per width serves every
// dtype (bool, uint8 images, integers, half, float, double, complex).
struct Bytes16 {  // complex128; only 8-byte aligned in storage
  uint64_t lo, hi;
};

template <typename F>
void dispatch_by_element_size(const at::Tensor& t, const char* op_name, F&& f) {
  switch (t.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    case 16: f(Bytes16{}); break;
    default: TORCH_CHECK(false, op_name, ": unsupported element size ", t.element_size(), " of dtype ", t.scalar_type());
  }
}

// kernel(op) with the op a transform needs: a copy of raw bits per element
// width (every dtype), or a multiply by scale (and the weights) in opmath.
// Host side of every backend (CPU and CUDA, image and volume kernels).
template <typename Kernel>
void dispatch_transform(const GroupOpPlan& plan, double scale, const char* op_name, Kernel&& kernel) {
  if (scale == 1.0 && !plan.weights.defined()) {
    dispatch_by_element_size(plan.in_view, op_name, [&](auto tag) { kernel(CopyOp<decltype(tag)>{}); });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.in_view.scalar_type(), "group_transform", [&] {
      kernel(ScaleOp<scalar_t>{static_cast<at::opmath_type<scalar_t>>(scale)});
    });
  }
}

// kernel(scalar_t{}) for the average's (floating) dtype.
template <typename Kernel>
void dispatch_average(const GroupOpPlan& plan, Kernel&& kernel) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.in_view.scalar_type(), "group_average",
                                  [&] { kernel(scalar_t{}); });
}

}  // namespace equitune_ext
