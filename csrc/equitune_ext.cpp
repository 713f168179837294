// Module init: every op schema of the library, declared once, and build_info().
// Backends add kernels in cpu/*.cpp and cuda/*.cu (TORCH_LIBRARY_IMPL); fake
// kernels, autograd and the Triton backend are registered from Python
// (equitune_ext/ops.py).
#include <Python.h>
#include <torch/library.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

namespace equitune_ext {

TORCH_LIBRARY(equitune_ext, m) {
  // out[g*B + b] = scale * Γ(elements[g]) x[b]; elements are D4 codes (index.h).
  m.def("group_transform(Tensor x, int[] elements, float scale=1.0) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // out[b] = scale * Σ_g Γ(elements[g]) y[g*B + b]; the adjoint of group_transform
  // with the inverse codes.
  m.def("group_average(Tensor y, int[] elements, float scale) -> Tensor", {at::Tag::pt2_compliant_tag});
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
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
}  // namespace equitune_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "equitune_ext C++/CUDA kernels; the ops live in torch.ops.equitune_ext";
  module.def("build_info", &equitune_ext::build_info,
             "What this build of the extension contains: CPU, CUDA (and its archs), OpenMP.");
}
