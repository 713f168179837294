"""Backend choice: backend=, use_backend(), "auto", and clear errors."""
import os

import pytest
import torch

import equitune_ext as E

from conftest import random_tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_use_backend_context_and_default():
    x = random_tensor((2, 3, 4, 4), torch.float32)
    assert E.get_backend() == "auto"
    with E.use_backend("reference"):
        assert E.get_backend() == "reference"
        assert torch.equal(E.group_transform(x, "c4"), E.reference.group_transform(x, "c4"))
    assert E.get_backend() == "auto"


def test_backends_agree_on_cpu():
    x = random_tensor((2, 3, 6, 6), torch.float32)
    outs = {b: E.group_transform(x, "d4", backend=b) for b in E.available_backends("cpu")}
    for b, out in outs.items():
        assert torch.equal(out, outs["reference"]), b


@pytest.mark.skipif(INTERPRETING, reason="the interpreter makes triton usable on CPU")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        E.group_transform(random_tensor((1, 1, 2, 2), torch.float32), "c4", backend="triton")


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
def test_triton_listed_under_interpreter():
    assert "triton" in E.available_backends("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_opcheck_and_compile_cuda():
    """opcheck and torch.compile of the triton ops (not possible under the interpreter)."""
    from equitune_ext import triton as T

    transform, average, token_transform, vocab_transform, vocab_average = T._register()
    perms = E.TokenGroup.from_cycles(16, [[1, 2]]).tables("cuda")
    torch.library.opcheck(vocab_average, (random_tensor((4, 3, 16), torch.float32, "cuda").requires_grad_(), perms, 0.5))
    torch.library.opcheck(vocab_transform, (random_tensor((2, 3, 16), torch.float32, "cuda").requires_grad_(), perms, 1.0))
    torch.library.opcheck(token_transform, (torch.randint(0, 16, (2, 5), device="cuda"), perms))
    x = random_tensor((2, 3, 8, 8), torch.float32, "cuda").requires_grad_()
    torch.library.opcheck(transform, (x, [0, 1, 2, 3], 1.0))
    torch.library.opcheck(average, (random_tensor((8, 3, 8, 8), torch.float32, "cuda").requires_grad_(), [0, 3, 2, 1], 0.25))
    f = lambda t: E.group_average(E.group_transform(t, "d4", backend="triton") * 2, "d4", backend="triton")
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_triton_scale_split_carries_float64():
    """Triton passes Python floats as fp32; the launchers pass scale as fp32
    hi + lo parts, whose sum must hold a float64 scale such as 1/3 (|G| = 3)."""
    pytest.importorskip("triton")
    from equitune_ext.triton.kernels import split_scale

    for scale in (1 / 3, 1 / 5, 1 / 6, 0.1, 1.0, 0.125, 7.3e-3):
        hi, lo = split_scale(scale)
        assert abs((hi + lo) - scale) <= 1e-14 * scale
        assert hi == float(torch.tensor(scale, dtype=torch.float32))


def test_triton_packed_units_decode_to_the_header_maps():
    """The planar Triton kernels specialize on each element's unit coefficients,
    packed from _C.source_coords; decoding them (as _unit does) and rebuilding
    the offsets by the kernels' rule must give the header's maps back."""
    pytest.importorskip("triton")
    from equitune_ext import _C
    from equitune_ext.triton.kernels import _pack_units

    for H, W in ((5, 5), (4, 7), (1, 3)):
        codes = list(range(8)) if H == W else [0, 2, 4, 6]  # odd rotations need square planes
        for inverse in (False, True):
            packed = _pack_units(codes, H, W, H, W, inverse)  # square, or no odd rotation: output plane = input's
            for g, code in enumerate(codes):
                units = []
                for t in range(4):
                    d = (packed >> (2 * (4 * g + t))) & 3
                    units.append(d - 4 * (d >> 1))
                if inverse:
                    Ho, Wo = (W, H) if code % 2 else (H, W)
                    expected = _C.source_coords(_C.code_inverse(code), Ho, Wo)
                    Di, Dj = H, W
                else:
                    expected = _C.source_coords(code, H, W)
                    Di, Dj = (W, H) if code % 2 else (H, W)
                ai, aj, bi, bj = units
                a0 = (ai < 0) * (Di - 1) + (aj < 0) * (Dj - 1)
                b0 = (bi < 0) * (Di - 1) + (bj < 0) * (Dj - 1)
                assert tuple(expected) == (a0, ai, aj, b0, bi, bj), (H, W, code, inverse)
