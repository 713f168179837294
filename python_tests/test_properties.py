"""Property-based tests (hypothesis): every public op on backend="cpp" against
backend="reference" over generated groups, shapes, memory layouts, dtypes and
both builds of the CPU kernels (baseline and AVX2), and generated bad input.

Transforms must match bit for bit (NaN payloads, -0.0 and infinities
included); averages within a bound derived from the accumulation: the error
of a sum of n terms in the op's accumulation dtype plus the output's
rounding. Every input lies in a buffer whose unused elements are poison (NaN,
an integer's max, an out-of-range token id), so a kernel that reads outside
the view gives a wrong value; outputs are poisoned too (deterministic
mode fills `empty` with NaN / max int), so an element left unwritten fails.

Settings: conftest.py's hypothesis profiles (with CI set: derandomized, no
deadline). Examples per op on the C++ backend: EXAMPLES; the Triton ones run
under the interpreter (`make test-triton`, TRITON_INTERPRET=1) with
TRITON_EXAMPLES each. Every failure found here is kept in
test_property_findings.py as an ordinary regression test.
"""
import contextlib
import math
import re

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import equitune_ext as E  # noqa: E402
from equitune_ext import _C, contract  # noqa: E402

EXAMPLES = 500
TRITON_EXAMPLES = 20
# The non-temporal-store path (csrc/cpu/group_ops_cpu_kernels.h,
# kStreamingThresholdBytes): outputs of 8 MiB and more whose planes are whole
# 64-byte lines. Those examples are large, so they get a test of their own.
STREAMING_BYTES = 8 * 1024 * 1024
STREAMING_EXAMPLES = 10

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TRANSFORM_DTYPES = FLOAT_DTYPES + [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
                                   torch.complex64, torch.complex128]
GROUP_NAMES = list(E.IMAGE_GROUPS)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # deterministic mode's warn_only notices


def _settings(n):
    return settings(max_examples=n, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _needs_triton():
    return pytest.mark.skipif("triton" not in E.available_backends("cpu"),
                              reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (make test-triton)")


@contextlib.contextmanager
def cpu_kernels(isa):
    """The baseline ("default") or the best ("auto": AVX2 where the CPU has it) build of the
    CPU kernels, with every uninitialized output poisoned (torch fills `empty` with NaN or
    the integer max in deterministic mode)."""
    was_det, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    _C.set_cpu_kernel_isa(isa)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        _C.set_cpu_kernel_isa("auto")
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


# ---------------------------------------------------------------------------
# Values and memory layouts
# ---------------------------------------------------------------------------

def values(shape, dtype, seed, specials=False, high=None):
    """Random values of `shape` (contiguous); `specials`: floats also take NaN,
    ±inf, -0.0 and subnormals (transforms move bits, so they must move these
    too); `high`: integers in [0, high) (token ids)."""
    gen = torch.Generator().manual_seed(seed)
    if high is not None:
        return torch.randint(0, max(high, 1), shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.complex128).to(dtype)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min + 1, -100), min(info.max, 100), shape, generator=gen).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if specials and t.numel():
        tiny = torch.finfo(dtype).tiny
        pool = torch.tensor([math.nan, math.inf, -math.inf, -0.0, tiny / 4, -tiny / 2], dtype=torch.float64).to(dtype)
        which = torch.randint(0, 4 * len(pool), shape, generator=gen)
        t = torch.where(which < len(pool), pool[which.clamp(max=len(pool) - 1)], t)
    return t


def poison_value(dtype, vocab=None):
    if vocab is not None:
        return vocab  # an out-of-range token id
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    return torch.iinfo(dtype).max


@st.composite
def layouts(draw, ndim, cheap=False):
    """How a tensor lies in memory: (kind, perm, steps, pads, offset, broadcast dims).
    perm: the order of its dims in memory (outermost first); steps: 2 for a
    dim taken every other element; pads: extra elements after each dim;
    offset: the storage offset; broadcast: dims of stride 0 (expanded).
    cheap: no steps, padding on the last dim only (large tensors)."""
    ident = list(range(ndim))
    kind = draw(st.sampled_from(["contiguous", "channels_last", "transposed", "permuted", "strided", "expanded",
                                 "scalar"]))
    perm, steps, pads, offset, bcast = ident, [1] * ndim, [0] * ndim, 0, ()
    if kind == "channels_last" and ndim == 4:
        perm = [0, 2, 3, 1]
    elif kind == "transposed" and ndim >= 2:
        perm = ident[:-2] + [ndim - 1, ndim - 2]
    elif kind == "permuted":
        perm = draw(st.permutations(ident))
    elif kind == "strided" and cheap:  # rows sliced from wider ones
        pads = [0] * (ndim - 1) + [draw(st.integers(1, 5))]
        offset = draw(st.integers(0, 5))
    elif kind == "strided":  # sliced views: any order, steps, padding and a storage offset
        perm = draw(st.one_of(st.just(ident), st.permutations(ident)))
        steps = draw(st.lists(st.sampled_from([1, 1, 2]), min_size=ndim, max_size=ndim))
        pads = draw(st.lists(st.sampled_from([0, 0, 1, 3]), min_size=ndim, max_size=ndim))
        offset = draw(st.integers(0, 5))
    elif kind == "expanded":  # e.g. a gradient of a sum, a broadcast mask
        bcast = tuple(d for d in ident if draw(st.booleans()))
        offset = draw(st.integers(0, 2))
    elif kind == "scalar":  # torch.ones(()).expand(shape)
        bcast = tuple(ident)
    return kind, perm, steps, pads, offset, bcast


def lay_out(v, layout, poison):
    """v's values in the given layout, in a buffer of poison."""
    _, perm, steps, pads, offset, bcast = layout
    shape = list(v.shape)
    inner = [1 if d in bcast else s for d, s in enumerate(shape)]
    phys = [max(inner[d] - 1, 0) * steps[d] + (1 if inner[d] else 0) + pads[d] for d in perm]
    phys_strides = [math.prod(phys[i + 1:]) for i in range(len(phys))]
    strides = [0] * len(shape)
    for i, d in enumerate(perm):
        strides[d] = steps[d] * phys_strides[i]
    buffer = torch.full((offset + math.prod(phys),), poison, dtype=v.dtype)
    t = buffer.as_strided(inner, strides, offset)
    if v.numel():
        t.copy_(v[tuple(slice(0, 1) if d in bcast else slice(None) for d in range(len(shape)))])
    return t.expand(shape)


def same_bits(a, b):
    """Bitwise equality (NaN payloads and -0.0 included) of two tensors of one dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.is_complex:
        a, b = torch.view_as_real(a.contiguous()), torch.view_as_real(b.contiguous())
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return torch.equal(a, b)


def assert_layout_rule(out, t):
    """channels_last in gives channels_last out; everything else gives contiguous."""
    fmt = torch.channels_last if contract.wants_channels_last(t) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), (out.shape, out.stride(), t.stride())


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_sum_close(out, ref, abs_ref, n_terms, dtype, acc=None):
    """Elementwise |out - ref| <= eps(dtype) |ref| + 2 (n + 3) eps(acc) abs_ref + dtype's smallest
    subnormal. The kernels sum n terms (each value times its weight, the weights rounded to acc) in
    the accumulation dtype `acc` (default: dtype's opmath dtype), scale, and round once to dtype;
    the reference, in float64, has a float64 sum's error, hence twice the sum's bound. ref and
    abs_ref (the same op on |inputs|: the sum of |terms|) in float64."""
    out = out.double()
    eps_out, eps_acc = torch.finfo(dtype).eps, torch.finfo(acc or _opmath(dtype)).eps
    bound = eps_out * ref.abs() + 2 * (n_terms + 3) * eps_acc * abs_ref + torch.finfo(dtype).tiny * eps_out
    err = (out - ref).abs()
    bad = ~(err <= bound)  # NaN fails
    assert not bad.any(), (f"{int(bad.sum())} of {out.numel()} elements off; first at "
                           f"{tuple(bad.nonzero()[0].tolist())}: got {out[bad][0].item()}, want {ref[bad][0].item()}")


# ---------------------------------------------------------------------------
# Strategies: groups, shapes, inputs
# ---------------------------------------------------------------------------

SIDES = st.one_of(st.integers(1, 9), st.sampled_from([15, 16, 17, 31, 32, 33]), st.integers(10, 40))


@st.composite
def image_shapes(draw, group, rows_per_example=1, any_trailing=False):
    """(B, shape): [rows_per_example·B, *mid, H, W] with H == W when the group rotates by 90
    degrees; any_trailing: [rows·B, *] of 1 to 4 dims (invariant averages take any shape)."""
    batch = draw(st.integers(0, 3))
    if any_trailing and draw(st.booleans()):
        rest = draw(st.lists(st.integers(1, 7), min_size=0, max_size=3))
        return batch, (rows_per_example * batch, *rest)
    mid = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    h = draw(SIDES)
    w = h if group.needs_square else draw(st.one_of(st.just(h), SIDES))
    return batch, (rows_per_example * batch, *mid, h, w)


def image_groups():
    return st.sampled_from(GROUP_NAMES).map(E.get_image_group)


@st.composite
def element_indices(draw, group, batch):
    """Per-row element indices [k, B] in [0, |G|), in an integer dtype; k up to 10 (more rows than d4 has elements)."""
    k = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
    seed = draw(st.integers(0, 2**16))
    return torch.randint(0, group.order, (k, batch), generator=torch.Generator().manual_seed(seed)).to(dtype)


@st.composite
def weight_tables(draw, k, batch):
    """None, or λ-weights [k, B] in a floating dtype (positive or of any sign; sometimes a transposed view)."""
    if not draw(st.booleans()):
        return None
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.rand(k, batch, generator=gen, dtype=torch.float64) if draw(st.booleans()) else \
        torch.randn(k, batch, generator=gen, dtype=torch.float64)
    w = w.to(dtype)
    return w.t().contiguous().t() if draw(st.booleans()) else w


def laid_out(draw, shape, dtype, specials=False, vocab=None, cheap=False):
    v = values(shape, dtype, draw(st.integers(0, 2**16)), specials=specials, high=vocab)
    return lay_out(v, draw(layouts(len(shape), cheap)), poison_value(dtype, vocab))


# ---------------------------------------------------------------------------
# Image ops
# ---------------------------------------------------------------------------

def check_transform(data, backend, per_row):
    """group_transform, per block (group_transform) or per row (elements=: group_transform_rows)."""
    g = data.draw(image_groups(), "group")
    batch, shape = data.draw(image_shapes(g), "shape")
    dtype = data.draw(st.sampled_from(TRANSFORM_DTYPES), "dtype")
    x = laid_out(data.draw, shape, dtype, specials=True)
    elements = data.draw(element_indices(g, batch), "elements") if per_row else None
    with cpu_kernels(data.draw(st.sampled_from(["auto", "default"]), "isa")):
        out = E.group_transform(x, g, elements=elements, backend=backend)
    want = E.group_transform(x, g, elements=elements, backend="reference")
    assert same_bits(out, want)
    assert_layout_rule(out, x)


def check_average(data, backend, per_row):
    """group_average, per block (group_average) or per row (elements=: group_average_rows)."""
    g = data.draw(image_groups(), "group")
    equivariant = data.draw(st.booleans(), "equivariant")
    k = data.draw(st.integers(1, 10), "k") if per_row else g.order
    batch, shape = data.draw(image_shapes(g, k, any_trailing=not equivariant), "shape")
    elements = None
    if per_row:
        elements = torch.randint(0, g.order, (k, batch), generator=torch.Generator().manual_seed(data.draw(
            st.integers(0, 2**16), "elements seed")))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    y = laid_out(data.draw, shape, dtype)
    w = data.draw(weight_tables(k, batch), "weights")
    with cpu_kernels(data.draw(st.sampled_from(["auto", "default"]), "isa")):
        out = E.group_average(y, g, equivariant=equivariant, elements=elements, weights=w, backend=backend)
    ref_args = dict(equivariant=equivariant, elements=elements, backend="reference")
    ref = E.group_average(y.double(), g, weights=None if w is None else w.double(), **ref_args)
    abs_ref = E.group_average(y.double().abs(), g, weights=None if w is None else w.double().abs(), **ref_args)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_sum_close(out, ref, abs_ref, k, dtype)
    assert_layout_rule(out, y)


def check_average_backward(data, backend):
    """The backward of group_average is the scaled (and weighted) transform:
    the kernels' other transform path, fed generated gradients (expanded ones
    such as a sum's included)."""
    g = data.draw(image_groups(), "group")
    per_row = data.draw(st.booleans(), "per_row")
    equivariant = data.draw(st.booleans(), "equivariant")
    k = data.draw(st.integers(1, 6), "k") if per_row else g.order
    batch, shape = data.draw(image_shapes(g, k), "shape")
    elements = None
    if per_row:
        elements = torch.randint(0, g.order, (k, batch), generator=torch.Generator().manual_seed(data.draw(
            st.integers(0, 2**16), "elements seed")))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    y = values(shape, dtype, data.draw(st.integers(0, 2**16), "seed")).requires_grad_()
    w = data.draw(weight_tables(k, batch), "weights")
    w = None if w is None else w.detach().requires_grad_()
    grad_out = laid_out(data.draw, (batch, *shape[1:]), dtype)
    inputs = (y,) if w is None else (y, w)
    with cpu_kernels(data.draw(st.sampled_from(["auto", "default"]), "isa")):
        out = E.group_average(y, g, equivariant=equivariant, elements=elements, weights=w, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out)

    def reference(y_, w_, grad_):
        y_ = y_.detach().double().requires_grad_()
        w_ = None if w_ is None else w_.detach().double().requires_grad_()
        out_ = E.group_average(y_, g, equivariant=equivariant, elements=elements, weights=w_, backend="reference")
        return torch.autograd.grad(out_, (y_,) if w_ is None else (y_, w_), grad_.double())

    refs = reference(y, w, grad_out)
    abs_refs = reference(y.abs(), None if w is None else w.abs(), grad_out.abs())
    # grad_y: one product per element (scale · w); grad_w: a block's products, summed in opmath
    assert_sum_close(grads[0], refs[0], abs_refs[0], 1, dtype)
    if w is not None:
        assert grads[1].dtype == w.dtype
        # grad_w[j, b] = Σ grad · Γ y over the block: exact products of values of dtype, summed
        # in float32 at least, rounded to the weights' dtype
        assert_sum_close(grads[1], refs[1], abs_refs[1], math.prod(shape[1:]), w.dtype,
                         acc=torch.promote_types(dtype, torch.float32))


@_settings(EXAMPLES)
@given(st.data())
def test_transform_matches_reference(data):
    check_transform(data, "cpp", per_row=False)


@_settings(EXAMPLES)
@given(st.data())
def test_transform_rows_matches_reference(data):
    check_transform(data, "cpp", per_row=True)


@_settings(EXAMPLES)
@given(st.data())
def test_average_matches_reference(data):
    check_average(data, "cpp", per_row=False)


@_settings(EXAMPLES)
@given(st.data())
def test_average_rows_matches_reference(data):
    check_average(data, "cpp", per_row=True)


@_settings(EXAMPLES)
@given(st.data())
def test_average_backward_matches_reference(data):
    check_average_backward(data, "cpp")


@_settings(STREAMING_EXAMPLES)
@given(st.data())
def test_streaming_outputs_match_reference(data):
    """Outputs past the non-temporal-store threshold, planes of whole lines or
    not, contiguous or sliced inputs."""
    average = data.draw(st.booleans(), "average")
    # the average's input is |G| outputs: groups of order <= 4 keep it at 32 MiB at most
    g = E.get_image_group(data.draw(st.sampled_from(["hflip", "vflip", "rot180", "c4"] if average else GROUP_NAMES)))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    side = data.draw(st.sampled_from([16, 32, 17, 20]), "side")  # whole 64-byte lines per plane or not, by dtype
    h, w = side, side if g.needs_square else data.draw(st.sampled_from([side, 64]), "width")
    plane = h * w * dtype.itemsize
    channels = -(-STREAMING_BYTES // (plane * (1 if average else g.order)))  # output >= the threshold at B = 1
    if average:
        y = laid_out(data.draw, (g.order, channels, h, w), dtype, cheap=True)
        weights = data.draw(weight_tables(g.order, 1), "weights")
        with cpu_kernels(data.draw(st.sampled_from(["auto", "default"]), "isa")):
            out = E.group_average(y, g, weights=weights, backend="cpp")
        assert out.nbytes >= STREAMING_BYTES
        wd = None if weights is None else weights.double()
        ref = E.group_average(y.double(), g, weights=wd, backend="reference")
        abs_ref = E.group_average(y.double().abs(), g, weights=None if wd is None else wd.abs(), backend="reference")
        assert_sum_close(out, ref, abs_ref, g.order, dtype)
    else:
        x = laid_out(data.draw, (1, channels, h, w), dtype, specials=True, cheap=True)
        with cpu_kernels(data.draw(st.sampled_from(["auto", "default"]), "isa")):
            out = E.group_transform(x, g, backend="cpp")
        assert out.nbytes >= STREAMING_BYTES
        assert same_bits(out, E.group_transform(x, g, backend="reference"))


@_needs_triton()
@_settings(TRITON_EXAMPLES)
@given(st.data())
def test_triton_transform_matches_reference(data):
    check_transform(data, "triton", per_row=data.draw(st.booleans(), "per_row"))


@_needs_triton()
@_settings(TRITON_EXAMPLES)
@given(st.data())
def test_triton_average_matches_reference(data):
    check_average(data, "triton", per_row=data.draw(st.booleans(), "per_row"))


# ---------------------------------------------------------------------------
# Token ops
# ---------------------------------------------------------------------------

@st.composite
def token_groups(draw):
    """Cyclic groups of disjoint equal cycles, the Klein four-group of two
    commuting swaps, or the trivial group, over V in [1, 300]."""
    vocab = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["cycles", "klein", "trivial"]))
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))).tolist()
    if kind == "cycles" and vocab >= 2:
        n = draw(st.integers(2, min(4, vocab)))
        m = draw(st.integers(1, vocab // n))
        return E.TokenGroup.from_cycles(vocab, [order[i * n:(i + 1) * n] for i in range(m)])
    if kind == "klein" and vocab >= 4:
        pairs = draw(st.integers(1, vocab // 4))
        a, b = torch.arange(vocab), torch.arange(vocab)
        for i in range(pairs):  # a swaps (p, q) and (r, s), b swaps (p, r) and (q, s): they commute
            p, q, r, s = order[4 * i:4 * i + 4]
            a[[p, q, r, s]] = torch.tensor([q, p, s, r])
            b[[p, q, r, s]] = torch.tensor([r, s, p, q])
        return E.TokenGroup(torch.stack([torch.arange(vocab), a, b, a[b]]))
    return E.TokenGroup(torch.arange(vocab)[None])


def check_token_transform(data, backend):
    tg = data.draw(token_groups(), "group")
    shape = (data.draw(st.integers(0, 4), "B"), *data.draw(st.lists(st.integers(1, 6), max_size=2), "rest"))
    dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), "dtype")
    ids = laid_out(data.draw, shape, dtype, vocab=tg.vocab_size)
    with cpu_kernels("auto"):
        out = E.group_transform(ids, tg, backend=backend)
    want = E.group_transform(ids, tg, backend="reference")
    assert out.dtype == dtype and torch.equal(out, want) and out.is_contiguous()


def check_token_average(data, backend):
    """The average of logits (vocab_average) and its backward (vocab_transform)."""
    tg = data.draw(token_groups(), "group")
    equivariant = data.draw(st.booleans(), "equivariant")
    batch = data.draw(st.integers(0, 3), "B")
    rest = data.draw(st.lists(st.integers(1, 5), max_size=2), "rest")
    shape = (tg.order * batch, *rest, tg.vocab_size) if equivariant or data.draw(st.booleans(), "logits") else \
        (tg.order * batch, *rest)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    y = laid_out(data.draw, shape, dtype).requires_grad_()
    w = data.draw(weight_tables(tg.order, batch), "weights")
    grad_out = laid_out(data.draw, (batch, *shape[1:]), dtype)
    with cpu_kernels("auto"):
        out = E.group_average(y, tg, equivariant=equivariant, weights=w, backend=backend)
        (grad_y,) = torch.autograd.grad(out, y, grad_out)

    def reference(y_, w_, grad_):
        y_ = y_.detach().double().requires_grad_()
        w_ = None if w_ is None else w_.double()
        out_ = E.group_average(y_, tg, equivariant=equivariant, weights=w_, backend="reference")
        return (out_.detach(), *torch.autograd.grad(out_, y_, grad_.double()))

    ref, ref_grad = reference(y, w, grad_out)
    abs_ref, abs_grad = reference(y.abs(), None if w is None else w.abs(), grad_out.abs())
    assert out.dtype == dtype and out.shape == ref.shape
    assert_sum_close(out, ref, abs_ref, tg.order, dtype)
    assert_sum_close(grad_y, ref_grad, abs_grad, 1, dtype)


@_settings(EXAMPLES)
@given(st.data())
def test_token_transform_matches_reference(data):
    check_token_transform(data, "cpp")


@_settings(EXAMPLES)
@given(st.data())
def test_token_average_matches_reference(data):
    check_token_average(data, "cpp")


@_needs_triton()
@_settings(TRITON_EXAMPLES)
@given(st.data())
def test_triton_token_ops_match_reference(data):
    check_token_transform(data, "triton")
    check_token_average(data, "triton")


# ---------------------------------------------------------------------------
# Bad input: each call below gets exactly one bad argument; it must raise
# ValueError or TypeError with a message that names that argument, on every
# backend, and never crash, hang or return.
# ---------------------------------------------------------------------------

NOT_TENSORS = st.sampled_from([None, 1.5, [[1.0]], "x", (2, 3)])
NON_FLOAT_DTYPES = st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool])


def _bad(call, exc, names):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.search(names, message), f"{type(info.value).__name__}: {message!r} does not name {names!r}"


@st.composite
def bad_group_names(draw):
    return draw(st.one_of(st.text(max_size=8).filter(lambda s: s not in E.IMAGE_GROUPS),
                          st.sampled_from(["C4", "d8", "rot90", " c4", "hflip "])))


@_settings(300)
@given(st.data())
def test_bad_image_input_raises_naming_the_argument(data):
    backend = data.draw(st.sampled_from(["cpp", "reference"]), "backend")
    g = data.draw(image_groups(), "group")
    batch = data.draw(st.integers(1, 3), "B")
    side = data.draw(st.integers(1, 6), "side")
    x = torch.randn(batch, 2, side, side)
    y = torch.randn(g.order * batch, 2, side, side)
    idx = torch.zeros(2, batch, dtype=torch.int64)
    transform = lambda x_=x, group=g, **kw: E.group_transform(x_, group, backend=backend, **kw)
    average = lambda y_=y, group=g, **kw: E.group_average(y_, group, backend=backend, **kw)
    case = data.draw(st.sampled_from([
        "x not a tensor", "x few dims", "x not square", "group name", "group type", "backend", "y dtype",
        "y rows", "elements dtype", "elements shape", "elements values", "elements not a tensor",
        "weights shape", "weights dtype", "weights device", "weights not a tensor"]), "case")
    op = data.draw(st.sampled_from([transform, average]), "op")
    if case == "x not a tensor":
        _bad(lambda: op(data.draw(NOT_TENSORS)), TypeError, r"\b[xy] must be a torch.Tensor")
    elif case == "x few dims":
        t = torch.randn(data.draw(st.lists(st.integers(1, 4), max_size=2)))
        _bad(lambda: op(t), ValueError, r"\b[xy] must have shape \[N, \*, H, W\]")
    elif case == "x not square":
        h, w = data.draw(st.tuples(st.integers(1, 5), st.integers(1, 5)).filter(lambda hw: hw[0] != hw[1]))
        _bad(lambda: op(torch.randn(4 * batch, 2, h, w), group=data.draw(st.sampled_from(["c4", "d4"]))),
             ValueError, r"\b[xy] must be square")
    elif case == "group name":
        _bad(lambda: op(group=data.draw(bad_group_names())), ValueError, "unknown image group")
    elif case == "group type":
        _bad(lambda: op(group=data.draw(st.sampled_from([None, 4, 4.0, [0, 1], ("c4",)]))), TypeError,
             r"group must be a group name")
    elif case == "backend":
        name = data.draw(st.text(max_size=6).filter(lambda s: s not in ("auto", "cpp", "triton", "reference")))
        _bad(lambda: E.group_transform(x, g, backend=name), ValueError, "unknown backend")
    elif case == "y dtype":
        _bad(lambda: average(y.to(data.draw(NON_FLOAT_DTYPES))), TypeError, r"\by must be a floating-point tensor")
    elif case == "y rows":
        if g.order == 1:
            return
        rows = data.draw(st.integers(1, 20).filter(lambda n: n % g.order))
        _bad(lambda: average(torch.randn(rows, 2, side, side)), ValueError, r"leading dim of y .* multiple")
    elif case == "elements dtype":
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bool, torch.complex64]))
        _bad(lambda: op(elements=idx.to(dtype)), TypeError, r"elements must be an integer tensor")
    elif case == "elements shape":
        shape = data.draw(st.one_of(
            st.lists(st.integers(0, 4), max_size=3).filter(lambda s: len(s) != 2),
            st.tuples(st.just(0), st.just(batch)),
            st.tuples(st.integers(1, 3), st.integers(0, 5).filter(lambda b: b != batch))))
        t = torch.zeros(shape, dtype=torch.int64)
        call = (lambda: average(torch.randn(t.shape[0] * batch if t.dim() == 2 and t.shape[0] else batch, 2, side,
                                            side), elements=t)) if op is average else (lambda: transform(elements=t))
        _bad(call, ValueError, r"elements must have shape \[k, B\]")
    elif case == "elements values":
        bad = data.draw(st.one_of(st.integers(-(2**62), -1), st.integers(g.order, 2**62)))
        t = idx.clone()
        t[data.draw(st.integers(0, 1)), data.draw(st.integers(0, batch - 1))] = bad
        call = (lambda: average(torch.randn(2 * batch, 2, side, side), elements=t)) if op is average else \
            (lambda: transform(elements=t))
        _bad(call, ValueError, r"elements must be group element indices in \[0, \|G\|\)")
    elif case == "elements not a tensor":
        _bad(lambda: op(elements=data.draw(st.sampled_from([[[0]], 0, "0", (0,)]))), TypeError,
             r"elements must be a torch.Tensor")
    elif case == "weights shape":
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3).filter(lambda s: tuple(s) != (g.order, batch)))
        _bad(lambda: average(weights=torch.rand(shape)), ValueError, r"weights must have shape \[\|G\|, B\]")
    elif case == "weights dtype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.bool, torch.uint8, torch.complex64]))
        _bad(lambda: average(weights=torch.ones(g.order, batch, dtype=dtype)), TypeError,
             r"weights must be a floating-point tensor")
    elif case == "weights device":
        _bad(lambda: average(weights=torch.rand(g.order, batch, device="meta")), ValueError, r"weights are on meta")
    elif case == "weights not a tensor":
        _bad(lambda: average(weights=data.draw(NOT_TENSORS.filter(lambda v: v is not None))), TypeError,
             r"weights must be a torch.Tensor")


@_settings(300)
@given(st.data())
def test_bad_token_input_raises_naming_the_argument(data):
    backend = data.draw(st.sampled_from(["cpp", "reference"]), "backend")
    tg = data.draw(token_groups(), "group")
    vocab, batch = tg.vocab_size, data.draw(st.integers(1, 3), "B")
    ids = torch.randint(0, vocab, (batch, 4))
    logits = torch.randn(tg.order * batch, 3, vocab)
    average = lambda y_=logits, **kw: E.group_average(y_, tg, backend=backend, **kw)
    case = data.draw(st.sampled_from(["ids dtype", "ids 0-dim", "ids values", "logits dtype", "logits vocab",
                                      "logits dims", "logits rows", "weights shape", "weights dtype", "elements"]))
    if case == "ids dtype":
        dtype = data.draw(st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.bool]))
        _bad(lambda: E.group_transform(ids.to(dtype), tg, backend=backend), TypeError, r"token ids must be")
    elif case == "ids 0-dim":
        _bad(lambda: E.group_transform(torch.tensor(0), tg, backend=backend), ValueError, r"token ids must have shape")
    elif case == "ids values":
        bad = data.draw(st.one_of(st.integers(-(2**40), -1), st.integers(vocab, 2**40)))
        t = ids.clone()
        t[data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, 3))] = bad
        _bad(lambda: E.group_transform(t, tg, backend=backend), ValueError, r"token ids? .*(must be in|out of range)")
    elif case == "logits dtype":
        _bad(lambda: average(logits.to(data.draw(NON_FLOAT_DTYPES))), TypeError, r"logits must be a floating-point")
    elif case == "logits vocab":
        v = data.draw(st.integers(1, 400).filter(lambda n: n != vocab))
        _bad(lambda: average(torch.randn(tg.order * batch, 3, v)), ValueError, r"the logits' last dim")
    elif case == "logits dims":
        _bad(lambda: average(torch.randn(vocab) if vocab > 0 else torch.randn(())), ValueError,
             r"logits must have shape")
    elif case == "logits rows":
        if tg.order == 1:
            return
        rows = data.draw(st.integers(1, 20).filter(lambda n: n % tg.order))
        _bad(lambda: average(torch.randn(rows, 3, vocab)), ValueError, r"leading dim of y .* multiple")
    elif case == "weights shape":
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3).filter(lambda s: tuple(s) != (tg.order, batch)))
        _bad(lambda: average(weights=torch.rand(shape)), ValueError, r"weights must have shape \[\|G\|, B\]")
    elif case == "weights dtype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.bool, torch.complex64]))
        _bad(lambda: average(weights=torch.ones(tg.order, batch, dtype=dtype)), TypeError,
             r"weights must be a floating-point tensor")
    elif case == "elements":  # per-row elements exist for image groups only
        _bad(lambda: E.group_transform(ids, tg, elements=torch.zeros(1, batch, dtype=torch.int64), backend=backend),
             NotImplementedError, r"elements= .* needs an image group")
