"""CMakeLists.txt, the C++ users' build of the op library: it configures and builds against the
installed torch wheel, and the library's ops load and compute. A few minutes on 2 cores, so it
runs where asked for (EQUITUNE_TEST_CMAKE=1: `make test-cmake`, which CI runs after `make test`)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.environ.get("EQUITUNE_TEST_CMAKE") != "1",
                                reason="builds the C++ library with CMake (minutes): make test-cmake")

# Run in a fresh process: this one already holds the ops, from equitune_ext._C.
SMOKE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.randn(2, 3, 5, 5)
out = torch.ops.equitune_ext.group_transform(x, [0, 1, 2, 3], 1.0)
torch.testing.assert_close(out, torch.cat([torch.rot90(x, k, (-2, -1)) for k in range(4)]), rtol=0, atol=0)
torch.testing.assert_close(torch.ops.equitune_ext.group_average(out, [0, 3, 2, 1], 0.25), x)
"""


def _torch_cuda_args():
    """The CUDA flags CMakeLists.txt's header describes, for a CUDA build of torch: the toolkit at
    CUDA_HOME, and pip's nvrtc beside torch when the toolkit has none."""
    if torch.version.cuda is None:
        return []
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        pytest.fail(f"torch {torch.__version__} is a CUDA build: its CMake config needs the CUDA toolkit "
                    f"(none at CUDA_HOME={home}), or build against a CPU wheel of torch")
    args = [f"-DCUDA_TOOLKIT_ROOT_DIR={home}"]
    if not glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")):
        site = os.path.dirname(os.path.dirname(torch.__file__))
        pip_nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
        if pip_nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={pip_nvrtc[0]}")
    return args


def _run(cmd):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def test_cmake_builds_the_op_library(tmp_path):
    cmake = shutil.which("cmake") or shutil.which("cmake", path=os.path.dirname(sys.executable))
    if cmake is None:
        pytest.fail("cmake not found: pip install cmake, or apt-get install cmake")
    build = tmp_path / "build"
    _run([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *_torch_cuda_args()])
    _run([cmake, "--build", build, "-j", os.environ.get("MAX_JOBS", "2")])
    _run([sys.executable, "-c", SMOKE, build / "libequitune_ext.so"])
