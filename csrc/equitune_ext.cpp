// Module init: every op schema of the library, declared once, and build_info().
// Backends add kernels in cpu/*.cpp and cuda/*.cu (TORCH_LIBRARY_IMPL); fake
// kernels and autograd are registered from Python (equitune_ext/contract.py),
// the Triton backend in equitune_ext/triton/.
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/cpu_isa.h"
#include "index.h"
#ifndef EQUITUNE_NO_PYTHON  // the CMake build for C++ users has no Python module
#include <Python.h>
#include <pybind11/stl.h>
#include <torch/extension.h>
#endif

#include <string>

namespace equitune_ext {

TORCH_LIBRARY(equitune_ext, m) {
  // out[g*B + b] = scale * w[g, b] * Γ(elements[g]) x[b]; elements are D4 codes
  // (index.h), Γ acting on the last two dims, w = weights [G, B] (λ-equitune) or 1.
  m.def("group_transform(Tensor x, int[] elements, float scale=1.0, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // out[b] = scale * Σ_g w[g, b] * Γ(elements[g]) y[g*B + b]; the adjoint of
  // group_transform with the inverse codes.
  m.def("group_average(Tensor y, int[] elements, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Per-row elements: codes [k, B] int64 D4 codes, one per (row block j, batch row b).
  // out[j*B + b] = scale * w[j, b] * Γ(codes[j, b]) x[b]
  m.def("group_transform_rows(Tensor x, Tensor codes, float scale=1.0, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // out[b] = scale * Σ_j w[j, b] * Γ(codes[j, b]) y[j*B + b]; the adjoint of
  // group_transform_rows with the element-wise inverse codes.
  m.def("group_average_rows(Tensor y, Tensor codes, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Volume groups: the four ops above on [N, *, D, H, W] with cube codes
  // (index.h: code = 8 * perm + flip bits), Γ acting on the last three dims.
  m.def("volume_transform(Tensor x, int[] elements, float scale=1.0, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("volume_average(Tensor y, int[] elements, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("volume_transform_rows(Tensor x, Tensor codes, float scale=1.0, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("volume_average_rows(Tensor y, Tensor codes, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Token groups (token_ops.h): perms [G, V] int64 permutation tables.
  // out[k*B + b, ...] = perms[k][ids[b, ...]]
  m.def("token_transform(Tensor ids, Tensor perms) -> Tensor", {at::Tag::pt2_compliant_tag});
  // out[k*B + b, ..., v] = scale * w[k, b] * x[b, ..., perms[k][v]]
  m.def("vocab_transform(Tensor x, Tensor perms, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // out[b, ..., v] = scale * Σ_k w[k, b] * y[k*B + b, ..., perms[k][v]]; the adjoint of
  // vocab_transform with the inverse tables.
  m.def("vocab_average(Tensor y, Tensor perms, float scale, Tensor? weights=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

#ifndef EQUITUNE_NO_PYTHON
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
  info["cpu_kernels"] = std::string(cpu_kernel_isa());  // the build of the CPU kernels this machine runs
#ifdef EQUITUNE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(EQUITUNE_CUDA_ARCHS);
  info["cuda_toolkit"] = std::string(EQUITUNE_CUDA_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_toolkit"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);  // the headers built against
  return info;
}

}  // namespace
#endif
}  // namespace equitune_ext

#ifndef EQUITUNE_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "equitune_ext C++/CUDA kernels; the ops live in torch.ops.equitune_ext";
  module.def("build_info", &equitune_ext::build_info,
             "What this build of the extension contains: CPU, CUDA (and its archs), OpenMP.");
  // The geometry of index.h, for the Python side (groups.py, conv.py, triton/):
  // every backend and module moves pixels by one formula. spatial_dims picks
  // the code space: 2, D4 codes; 3, cube codes.
  namespace py = pybind11;
  auto checked = [](const char* what, int code, int spatial_dims) {
    TORCH_CHECK(spatial_dims == 2 || spatial_dims == 3, what, ": spatial_dims must be 2 or 3, got ", spatial_dims);
    TORCH_CHECK(equitune_ext::code_is_valid(code, spatial_dims), what, ": code ", code, " out of range [0, ",
                equitune_ext::num_codes(spatial_dims), ")");
    return code;
  };
  module.def(
      "source_coords",
      [checked](int code, int64_t H, int64_t W) {
        const equitune_ext::CoordMap m = equitune_ext::source_coords(checked("source_coords", code, 2), H, W);
        return std::vector<int64_t>{m.a0, m.ai, m.aj, m.b0, m.bi, m.bj};
      },
      "Input coords (a0, ai, aj, b0, bi, bj) of output (i, j) of Γ(code)x for an H x W input: "
      "a = a0 + ai*i + aj*j, b = b0 + bi*i + bj*j.");
  module.def(
      "strided_map",
      [checked](int code, const std::vector<int64_t>& extent, const std::vector<int64_t>& stride) {
        const int n = static_cast<int>(extent.size());
        TORCH_CHECK(stride.size() == extent.size(), "strided_map: extent and stride differ in length");
        checked("strided_map", code, n);
        if (n == 3) {
          const auto m = equitune_ext::strided_map(equitune_ext::cube_element(code), extent.data(), stride.data());
          return std::vector<int64_t>{m.offset, m.step[0], m.step[1], m.step[2]};
        }
        const auto m = equitune_ext::strided_map(equitune_ext::d4_element(code), extent.data(), stride.data());
        return std::vector<int64_t>{m.offset, m.step[0], m.step[1]};
      },
      py::arg("code"), py::arg("extent"), py::arg("stride"),
      "(offset, step...) of Γ(code) on a tensor of sizes `extent` and strides `stride` over its last 2 or 3 dims: "
      "output position o reads input element offset + Σ_s o[s] * step[s].");
  module.def(
      "signed_perm",
      [checked](int code, int spatial_dims) {
        checked("signed_perm", code, spatial_dims);
        auto as_lists = [](const auto& p, int n) {
          return std::make_pair(std::vector<int>(p.axis, p.axis + n), std::vector<bool>(p.reversed, p.reversed + n));
        };
        return spatial_dims == 3 ? as_lists(equitune_ext::cube_element(code), 3)
                                 : as_lists(equitune_ext::d4_element(code), 2);
      },
      py::arg("code"), py::arg("spatial_dims") = 2,
      "(axis, reversed) of Γ(code): input axis r is read from output axis axis[r], reversed if reversed[r].");
  module.def(
      "code_inverse",
      [checked](int code, int spatial_dims) {
        checked("code_inverse", code, spatial_dims);
        return spatial_dims == 3 ? equitune_ext::cube_code_inverse(code) : equitune_ext::code_inverse(code);
      },
      py::arg("code"), py::arg("spatial_dims") = 2, "The code of Γ(code)⁻¹.");
  module.def(
      "code_compose",
      [checked](int a, int b, int spatial_dims) {
        checked("code_compose", a, spatial_dims);
        checked("code_compose", b, spatial_dims);
        return spatial_dims == 3 ? equitune_ext::cube_code_compose(a, b) : equitune_ext::code_compose(a, b);
      },
      py::arg("a"), py::arg("b"), py::arg("spatial_dims") = 2, "The code of Γ(a)Γ(b) (b acts first).");
  module.def("set_cpu_kernel_isa", &equitune_ext::set_cpu_kernel_isa,
             "'default' forces the baseline build of the CPU kernels, 'auto' (the default) picks AVX2 where the CPU has it.");
}
#endif
