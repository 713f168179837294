"""Shared fixtures: the device list, per-dtype tolerances, the Triton kernels' availability,
the hypothesis profiles."""
import importlib.util
import os

import pytest
import torch

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:
    pass  # test_properties.py skips itself
else:
    # CI (CI set): derandomized, so a run is reproducible and a failure is the commit's, not the seed's.
    # No deadline anywhere: a shared 2-core machine (or the sanitizer build) times examples unevenly.
    _hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
    _hypothesis_settings.register_profile("dev", deadline=None)
    _hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOAT_DTYPES + [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]

# Absolute/relative tolerance of an average of a few values against float64,
# about 2x the rounding of the output dtype (accumulation is in float32/64).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def random_tensor(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=gen) > 0.5
    elif dtype.is_complex:
        t = torch.randn(shape, generator=gen, dtype=torch.complex64)
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen)
    return t.to(dtype=dtype, device=device)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    import equitune_ext

    return (
        f"equitune_ext build_info: {equitune_ext.build_info()}; devices: {DEVICES}; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}; _C: {equitune_ext._C.__file__}"
    )


def backends_for(device):
    import equitune_ext

    return [b for b in ("cpp", "triton") if b in equitune_ext.available_backends(device)]


def _cases():
    cases = []
    for d in DEVICES:
        for b in backends_for(d):
            cases.append((d, b, "auto"))
            if d == "cpu" and b == "cpp":
                cases.append((d, b, "default"))  # the baseline build of the CPU kernels too
    return cases


DEVICE_BACKENDS = _cases()


@pytest.fixture(params=DEVICE_BACKENDS, ids=[f"{d}-{b}" + ("-baseline" if isa == "default" else "") for d, b, isa in DEVICE_BACKENDS])
def device_backend(request):
    """(device, backend) pairs: the C++ kernels (on the CPU both the AVX2 and
    the baseline build), and Triton where it runs (on CUDA, or on the CPU
    under TRITON_INTERPRET=1)."""
    from equitune_ext import _C

    device, backend, isa = request.param
    _C.set_cpu_kernel_isa(isa)
    yield device, backend
    _C.set_cpu_kernel_isa("auto")


def _triton_kernels_import():
    """Why equitune_ext.triton.image cannot be imported here ("" if it can):
    Triton missing or broken, or Triton < 3.3 (torch 2.6's 3.2) on a machine
    without a GPU outside the interpreter, whose autotuners look the GPU driver
    up when they are made ("0 active drivers")."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        import equitune_ext.triton.image  # noqa: F401
    except Exception as e:  # a broken triton install must not stop the tests of the other backends
        return f"equitune_ext.triton.image does not import here: {type(e).__name__}: {e}"
    return ""


# Tests of the Triton kernels' host side (plans, packing, offline compiles) that
# need the kernels module but no Triton device.
needs_triton_kernels = pytest.mark.skipif(bool(_triton_kernels_import()), reason=_triton_kernels_import() or "-")


# Under TRITON_INTERPRET=1 each Triton kernel runs as Python, element by element: there every kernel path
# runs once, at small shapes, and the full matrix of groups, dtypes and shapes runs on the C++ backend (and
# on CUDA, where Triton is compiled). The paths: d4 and oh hold every 2-D / 3-D code, hflip and flip3d take
# non-square shapes; one dtype per way the kernels load and accumulate (triton/launch.py as_kernel_dtype,
# acc_dtype). A test marked interpreter_groups(...) keeps fewer groups (its subject is not the kernels'
# maps: autograd wiring, torch.func), and tests shrink their shapes where interpreted() says so.
INTERPRETER_GROUPS = ("d4", "hflip", "oh", "flip3d")
INTERPRETER_DTYPES = {torch.float64, torch.float32, torch.bfloat16, torch.int32, torch.bool, torch.complex64}


def interpreted(device, backend) -> bool:
    """Whether (device, backend) runs the Triton kernels in the interpreter."""
    return INTERPRETING and str(device) == "cpu" and backend == "triton"


def interpreter_sized(shapes, device, backend):
    """shapes, less the planes over 33 x 33 (one past a 32-wide tile) under the interpreter."""
    return [s for s in shapes if not interpreted(device, backend) or s[-1] * s[-2] <= 33 * 33]


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter_groups(*names): the groups this test keeps under the Triton "
                                       "interpreter (default: conftest.INTERPRETER_GROUPS)")


def _interpreter_repeats_a_path(item) -> bool:
    """A Triton test case on the CPU whose group or dtype takes a kernel path another case takes."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    device, backend = params.get("device_backend", (params.get("device", "cpu"), None))[:2]
    if device != "cpu" or (backend != "triton" and "triton" not in getattr(item, "originalname", item.name)):
        return False
    marker = item.get_closest_marker("interpreter_groups")
    groups = marker.args if marker else INTERPRETER_GROUPS
    group, dtype = params.get("group"), params.get("dtype")
    return (isinstance(group, str) and group not in groups) or (
        isinstance(dtype, torch.dtype) and dtype not in INTERPRETER_DTYPES)


def pytest_collection_modifyitems(config, items):
    if not INTERPRETING:
        return
    repeats = [_interpreter_repeats_a_path(item) for item in items]
    if any(repeats):
        config.hook.pytest_deselected(items=[item for item, r in zip(items, repeats) if r])
        items[:] = [item for item, r in zip(items, repeats) if not r]
