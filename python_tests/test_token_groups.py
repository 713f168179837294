"""TokenGroup and the fused token-group ops."""
import pytest
import torch

import equitune_ext as E
from equitune_ext import reference as R

from conftest import DEVICES, FLOAT_DTYPES, TOLERANCES, random_tensor

V = 50


def groups():
    return {
        "swap2": E.TokenGroup.from_cycles(V, [[3, 7], [10, 20]]),
        "cycle3": E.TokenGroup.from_cycles(V, [[1, 2, 3], [30, 31, 32]]),
        "cycle4": E.TokenGroup.from_cycles(V, [[4, 5, 6, 7]]),
    }


def test_from_cycles_powers_and_tables():
    g = E.TokenGroup.from_cycles(V, [[1, 2, 3]])
    assert len(g) == 3 and g.perms.shape == (3, V)
    assert g.perms[1][1] == 2 and g.perms[1][2] == 3 and g.perms[1][3] == 1 and g.perms[1][0] == 0
    assert torch.equal(g.perms[2], g.perms[1][g.perms[1]])
    for k in range(3):
        assert torch.equal(g.perms[k][g.inverse_perms[k]], torch.arange(V))


def test_explicit_perms_validation():
    ident = torch.arange(4)
    swap = torch.tensor([1, 0, 2, 3])
    assert len(E.TokenGroup(torch.stack([ident, swap]))) == 2
    with pytest.raises(ValueError, match="not a permutation"):
        E.TokenGroup(torch.stack([ident, torch.tensor([0, 0, 2, 3])]))
    with pytest.raises(ValueError, match="identity"):
        E.TokenGroup(torch.stack([swap, ident]))
    with pytest.raises(ValueError, match="not closed"):
        E.TokenGroup(torch.stack([ident, torch.tensor([1, 2, 0, 3])]))
    with pytest.raises(ValueError, match="token ids in"):
        E.TokenGroup(torch.tensor([[0, 1, 2, 7]]))
    with pytest.raises(ValueError, match="appears twice"):
        E.TokenGroup.from_cycles(V, [[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="same length"):
        E.TokenGroup.from_cycles(V, [[1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="out of range"):
        E.TokenGroup.from_cycles(V, [[1, 99]])


class FakeTokenizer:
    vocab = {"man": 5, "woman": 6, " man": 7, " woman": 8, "he": 9, "she": 10}

    def __len__(self):
        return 20

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]] if text in self.vocab else [1, 2]


def test_from_words():
    g = E.TokenGroup.from_words(FakeTokenizer(), [["man", "woman"], ["he", "she"]], leading_space=False)
    assert g.perms[1][5] == 6 and g.perms[1][9] == 10
    with pytest.raises(ValueError, match="' he' is not a single token"):
        E.TokenGroup.from_words(FakeTokenizer(), [["man", "woman"], ["he", "she"]], leading_space=True)
    spaced = E.TokenGroup.from_words(FakeTokenizer(), [["man", "woman"]], leading_space="only")
    assert spaced.perms[1][7] == 8 and spaced.perms[1][5] == 5
    with pytest.raises(ValueError, match="'girl' is not a single token"):
        E.TokenGroup.from_words(FakeTokenizer(), [["man", "girl"]])


class SentencePieceLikeTokenizer(FakeTokenizer):
    """Spells a word the same with and without a leading space."""
    def encode(self, text, add_special_tokens=False):
        return super().encode(text.lstrip(), add_special_tokens)


def test_from_words_names_words_that_are_one_token():
    with pytest.raises(ValueError, match="'man' and ' man' are the same token \\(id 5\\).*leading_space=False or 'only'"):
        E.TokenGroup.from_words(SentencePieceLikeTokenizer(), [["man", "woman"]], leading_space=True)
    g = E.TokenGroup.from_words(SentencePieceLikeTokenizer(), [["man", "woman"]], leading_space=False)
    assert g.perms[1][5] == 6


@pytest.mark.parametrize("name", ["swap2", "cycle3", "cycle4"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_token_transform(device_backend, name, dtype):
    device, backend = device_backend
    g = groups()[name]
    ids = torch.randint(0, V, (3, 7), device=device, dtype=dtype)
    out = E.group_transform(ids, g, backend=backend)
    reference = E.group_transform(ids, g, backend="reference")
    assert out.dtype == reference.dtype == dtype  # every backend keeps the ids' dtype
    assert torch.equal(out, reference)
    for k in range(len(g)):
        assert torch.equal(out[3 * k : 3 * (k + 1)], g.act(ids, k))


@pytest.mark.parametrize("name", ["swap2", "cycle3", "cycle4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("equivariant", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_vocab_average_matches_reference(device_backend, name, dtype, equivariant, weighted):
    device, backend = device_backend
    g = groups()[name]
    atol, rtol = TOLERANCES[dtype]
    y = random_tensor((len(g) * 2, 5, V), dtype, device)
    w = torch.rand(len(g), 2, device=device).softmax(0) if weighted else None
    out = E.group_average(y, g, equivariant=equivariant, weights=w, backend=backend)
    ref = R.token_group_average(y.double(), g, equivariant=equivariant, weights=None if w is None else w.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_vocab_ops_gradcheck_and_opcheck(device, weighted):
    g = groups()["cycle3"]
    perms = g.tables(device)
    y = random_tensor((6, 2, V), torch.float64, device).requires_grad_()
    w = torch.rand(3, 2, dtype=torch.float64, device=device).requires_grad_() if weighted else None
    f = lambda y_, *w_: torch.ops.equitune_ext.vocab_average(y_, perms, 1.0 if weighted else 1 / 3, *w_)
    inputs = (y, w) if weighted else (y,)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    torch.library.opcheck(torch.ops.equitune_ext.vocab_average.default, (y, perms, 0.5, w))
    x = random_tensor((2, 3, V), torch.float64, device).requires_grad_()
    torch.library.opcheck(torch.ops.equitune_ext.vocab_transform.default, (x, perms, 1.0, w))
    ids = torch.randint(0, V, (2, 4), device=device)
    torch.library.opcheck(torch.ops.equitune_ext.token_transform.default, (ids, perms))


@pytest.mark.parametrize("weighted", [False, True])
def test_vocab_average_gradcheck_public(device_backend, weighted):
    """Gradients through the public op on every backend (the triton pair has its own registration)."""
    device, backend = device_backend
    g = groups()["cycle3"]
    y = random_tensor((6, 2, V), torch.float64, device).requires_grad_()
    w = torch.rand(3, 2, dtype=torch.float64, device=device).requires_grad_() if weighted else None
    f = lambda *a: E.group_average(a[0], g, weights=a[1] if weighted else None, backend=backend)
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(f, (y, w) if weighted else (y,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (y, w) if weighted else (y,), fast_mode=fast)


def test_equivariant_lm_like_model_and_compile():
    """A toy 'LM' (embedding -> linear over the vocabulary) equi-tuned over a
    token group is exactly equivariant: f(perm ids) = perm f(ids)."""
    torch.manual_seed(0)
    g = groups()["cycle3"]
    lm = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V)).double()
    ids = torch.randint(0, V, (2, 6))
    f = lambda t: E.equi_average(lm, t, g, equivariant=True)
    assert E.check_equivariance(f, ids, g, equivariant=True) < 1e-12
    assert E.check_equivariance(lm, ids, g, equivariant=True) > 1e-3
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(ids), f(ids))


def test_bad_input():
    g = groups()["swap2"]
    with pytest.raises(ValueError, match="out of range"):
        E.group_transform(torch.tensor([[0, V]]), g)
    with pytest.raises(TypeError, match="int64 or int32"):
        E.group_transform(torch.zeros(2, 3), g)
    with pytest.raises(ValueError, match="vocabulary size"):
        E.group_average(torch.zeros(4, 3, V + 1), g)
    with pytest.raises(ValueError, match="multiple of"):
        E.group_average(torch.zeros(3, 3, V), g)
    with pytest.raises(TypeError, match="floating-point"):
        E.group_average(torch.zeros(4, 3, V, dtype=torch.int64), g)


@pytest.mark.skipif("triton" not in E.available_backends("cpu"), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_token_transform_passes_unchecked_bad_ids_through(monkeypatch):
    """Where the host cannot check the ids (a CUDA graph being captured; here
    simulated on the CPU under the interpreter), the Triton kernel passes an
    out-of-range id through unchanged and reads nothing out of bounds.
    test_cuda_graphs.py checks both GPU kernels in a real capture."""
    from equitune_ext.triton import token as token_kernels

    g = groups()["swap2"]  # swaps 3 and 7
    monkeypatch.setattr(token_kernels, "capturing_cuda_graph", lambda ids: True)
    out = E.group_transform(torch.tensor([[3, V + 3, -1, 7]]), g, backend="triton")
    assert out.tolist() == [[3, V + 3, -1, 7], [7, V + 3, -1, 3]]


@pytest.mark.skipif("triton" not in E.available_backends("cpu"), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_raw_token_transform_checks_its_tables():
    """As the C++ op: the tables must be int64 [|G|, V] on the ids' device."""
    from equitune_ext import triton as T

    with pytest.raises(ValueError, match="int64"):
        T.ops().token_transform(torch.tensor([[1, 2]]), torch.arange(10, dtype=torch.int32).view(1, 10))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.equitune_ext.token_transform(torch.tensor([[1, 2]]), torch.arange(10, dtype=torch.int32).view(1, 10))
