"""Bad input gets a clear exception naming the problem."""
import pytest
import torch

import equitune_ext as E


def test_unknown_group():
    with pytest.raises(ValueError, match="unknown image group 'c5'"):
        E.group_transform(torch.zeros(1, 2, 2, 2), "c5")


def test_too_few_dims():
    with pytest.raises(ValueError, match="at least 3 dims"):
        E.group_transform(torch.zeros(4, 4), "hflip")
    with pytest.raises(ValueError, match="at least 3 dims"):
        E.group_average(torch.zeros(4, 4), "hflip")


def test_non_square_for_rotations():
    for op, t in ((E.group_transform, torch.zeros(1, 2, 3, 4)), (E.group_average, torch.zeros(8, 2, 3, 4))):
        with pytest.raises(ValueError, match="square"):
            op(t, "c4")
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.equitune_ext.group_transform(torch.zeros(1, 2, 3, 4), [0, 1], 1.0)


def test_leading_dim_not_multiple():
    with pytest.raises(ValueError, match="multiple of \\|G\\| = 4"):
        E.group_average(torch.zeros(6, 2, 3, 3), "c4")
    with pytest.raises(RuntimeError, match="multiple of the group order"):
        torch.ops.equitune_ext.group_average(torch.zeros(6, 2, 3, 3), [0, 1, 2, 3], 0.25)


def test_integer_average():
    with pytest.raises(TypeError, match="floating-point"):
        E.group_average(torch.zeros(4, 2, 3, 3, dtype=torch.int64), "c4")
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.equitune_ext.group_average(torch.zeros(4, 2, 3, 3, dtype=torch.uint8), [0, 1, 2, 3], 0.25)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        E.group_transform([[1.0]], "c4")


def test_raw_op_bad_codes_and_scale():
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.equitune_ext.group_transform(torch.zeros(1, 2, 3, 3), [0, 8], 1.0)
    with pytest.raises(RuntimeError, match="at least one"):
        torch.ops.equitune_ext.group_transform(torch.zeros(1, 2, 3, 3), [], 1.0)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.equitune_ext.group_average(torch.zeros(2, 2, 3, 3), [0, 4], float("nan"))
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.equitune_ext.group_transform(torch.zeros(1, 2, 3, 3, dtype=torch.int32), [0, 4], 0.5)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        E.group_transform(torch.zeros(1, 2, 3, 3), "c4", backend="cuda-graph")
    with pytest.raises(ValueError, match="unknown backend"):
        with E.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU exists")
def test_unavailable_cuda_backend_message():
    # No CUDA device here: a CUDA tensor cannot even be made, so check the
    # backend check directly through a meta tensor claiming another device type.
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        E.group_transform(torch.zeros(1, 2, 3, 3, device="meta"), "c4", backend="cpp")


def test_non_integer_group_codes_and_ids():
    """Codes, vocabulary sizes and ids must be integers: 2.7 is not silently read as 2."""
    with pytest.raises(TypeError, match="element codes must be integers"):
        E.ImageGroup("g", [0, 2.7])
    assert E.ImageGroup("g", [0, torch.tensor(2)]).codes == (0, 2)
    with pytest.raises(TypeError, match="must be integers"):
        E.TokenGroup.from_cycles(10.0, [[1, 2]])
    with pytest.raises(TypeError, match="must be integers"):
        E.TokenGroup.from_cycles(10, [[1, 2.5]])


def test_check_equivariance_needs_the_same_outputs_for_every_element():
    fn = lambda x: (x,) if bool(x[0, 0, 0, 0] > x[0, 0, 0, -1]) else (x, x)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = 1.0  # hflip moves it to the other end: fn gives two leaves there
    with pytest.raises(ValueError, match="1 output leaves on x but 2"):
        E.check_equivariance(fn, x, "hflip")


def test_token_group_invariant_average_of_any_shape():
    """Like image groups: equivariant=False is the plain mean, 1-D inputs too."""
    tg = E.TokenGroup.from_cycles(10, [[1, 2]])
    y = torch.arange(4.0)
    torch.testing.assert_close(E.group_average(y, tg, equivariant=False), y.view(2, 2).mean(0))
    with pytest.raises(ValueError, match=r"\[\|G\|·B, \*, V\]"):
        E.group_average(y, tg)
