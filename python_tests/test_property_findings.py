"""What the property tests (test_properties.py) and the sanitizer build (`make
test-sanitize`) found, kept as ordinary regression tests."""
import pytest
import torch

import equitune_ext as E

from conftest import backends_for

V = 10


@pytest.mark.parametrize("backend", ["reference"] + backends_for("cpu"))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("bad_id", [-1, V, 2**31 - 1])
def test_out_of_range_token_id_is_a_value_error_on_every_backend(backend, dtype, bad_id):
    """Found by hypothesis: the reference and Triton backends raised ValueError
    for a token id outside [0, V), the C++ kernels RuntimeError."""
    tg = E.TokenGroup.from_cycles(V, [[1, 2]])
    ids = torch.tensor([[1, bad_id, 2]], dtype=dtype)
    with pytest.raises(ValueError, match="token ids? .*(must be in|out of range)"):
        E.group_transform(ids, tg, backend=backend)


@pytest.mark.parametrize("op", ["vocab_average", "vocab_transform"])
@pytest.mark.parametrize("bad_entry", [-1, V, 100000])
def test_raw_vocab_ops_reject_out_of_range_tables(op, bad_entry):
    """Found under AddressSanitizer: the raw vocabulary ops read the logits
    through the permutation tables unchecked, so an entry outside [0, V) read
    out of bounds (a SEGV at 100000). The C++ CPU ops now check the tables."""
    perms = torch.stack([torch.arange(V), torch.arange(V)])
    perms[1, 3] = bad_entry
    x = torch.randn(2, 1, V)
    with pytest.raises(RuntimeError, match=r"`perms` holds .*out of range \[0, 10\)"):
        getattr(torch.ops.equitune_ext, op)(x, perms, 0.5)


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("group, shape", [("c4", (2, 3, 5, 5)), ("trivial", (1, 1, 1)), ("flip3d", (1, 2, 2, 3, 4))])
def test_complex128_transform_without_gradient_on_every_backend(backend, group, shape):
    """Found by hypothesis (Triton): group_transform of a complex128 tensor that
    needs no gradient raised a TypeError on Triton (no 128-bit loads) while the
    same tensor requiring a gradient ran through its real view. Both take the
    real view now; the C++ kernels move complex128 directly."""
    from equitune_ext import reference as R

    x = torch.randn(shape, dtype=torch.complex128)
    assert torch.equal(E.group_transform(x, group, backend=backend), R.group_transform(x, group))
