"""EquiLM on small GPT-2 and Llama models built from configs (no download)."""
import inspect
import types

import pytest
import torch

import equitune_ext as E

transformers = pytest.importorskip("transformers")

V = 64


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


GROUP = E.TokenGroup.from_cycles(V, [[5, 9], [11, 12], [20, 30]])


def naive_logits(model, ids, g):
    outs = [model(input_ids=g.act(ids, k)).logits[..., g.perms[k]] for k in range(len(g))]
    return torch.stack(outs).mean(0)


def naive_greedy(model, ids, g, n):
    """The public code's way: no cache, |G| calls on the whole prefix per token."""
    for _ in range(n):
        nxt = naive_logits(model, ids, g)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


@pytest.mark.parametrize("make", [gpt2, llama])
def test_logits_match_definition_and_are_equivariant(make):
    model = make()
    eq = E.EquiLM(model, GROUP)
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        out = eq(ids)
        torch.testing.assert_close(out.logits, naive_logits(model, ids, GROUP), atol=1e-5, rtol=1e-5)
        assert E.check_equivariance(lambda t: eq(t).logits, ids, GROUP, equivariant=True) < 1e-5


class PastKeyValuesLM(torch.nn.Module):
    """A causal LM with the transformers-4 interface (the KV cache goes in and
    comes out as past_key_values), over whichever the inner model takes."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.inner_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        kwargs = {} if past_key_values is None else {self.inner_arg: past_key_values}
        inner = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **kwargs)
        return types.SimpleNamespace(logits=inner.logits, past_key_values=getattr(inner, self.inner_arg, None))


def old_interface_gpt2():
    return PastKeyValuesLM(gpt2()).eval()


@pytest.mark.parametrize("make", [gpt2, llama, old_interface_gpt2])
def test_greedy_generation_cached_equals_recompute_and_is_equivariant(make):
    model = make()
    eq = E.EquiLM(model, GROUP)
    # Each prompt holds a token the group moves: a prompt the group fixes gives
    # logits that tie exactly within each cycle, and argmax breaks such ties by
    # the lowest id, not equivariantly.
    ids = torch.randint(0, V, (2, 5))
    ids[:, 2] = torch.tensor([9, 20])
    gen = eq.generate(ids, max_new_tokens=8)
    assert gen.shape == (2, 13) and torch.equal(gen[:, :5], ids)
    with torch.no_grad():
        assert torch.equal(gen, naive_greedy(model, ids, GROUP, 8))
    moved = eq.generate(GROUP.act(ids, 1), max_new_tokens=8)
    assert torch.equal(moved, GROUP.act(gen, 1))


def test_left_padded_batch_matches_single_prompts():
    model = gpt2()
    eq = E.EquiLM(model, GROUP)
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 4))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    gen = eq.generate(padded, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(gen[0, 6:], eq.generate(a, max_new_tokens=5)[0, 6:])
    assert torch.equal(gen[1, 6:], eq.generate(b, max_new_tokens=5)[0, 4:])


def test_relaxed_tokens_come_from_identity_stream():
    model = gpt2()
    eq = E.EquiLM(model, GROUP, relaxed=[5, 9])
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        out = eq(ids).logits
        base = model(input_ids=ids).logits
        full = naive_logits(model, ids, GROUP)
    torch.testing.assert_close(out[..., [5, 9]], base[..., [5, 9]])
    others = [v for v in range(V) if v not in (5, 9)]
    torch.testing.assert_close(out[..., others], full[..., others], atol=1e-5, rtol=1e-5)


def test_training_reduces_loss():
    model = gpt2().train()
    eq = E.EquiLM(model, GROUP)
    ids = torch.randint(0, V, (4, 10))
    opt = torch.optim.Adam(eq.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = eq(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_sampling_and_bad_input():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    g = torch.Generator().manual_seed(0)
    out = eq.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, generator=g)
    assert out.shape == (2, 8) and int(out.max()) < V
    with pytest.raises(TypeError, match="TokenGroup"):
        E.EquiLM(gpt2(), "c4")
    with pytest.raises(ValueError, match="relaxed token id"):
        E.EquiLM(gpt2(), GROUP, relaxed=[V])
    with pytest.raises(ValueError, match="temperature"):
        eq.generate(ids, do_sample=True, temperature=0.0)


def test_generation_stops_at_eos_and_pads_finished_rows():
    """Against the run without eos: each row keeps its tokens up to its first
    eos, then pad; the output ends once every row has finished."""
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    full = eq.generate(ids, max_new_tokens=10)
    for eos in {int(full[0, 7]), int(full[1, 5])}:
        pad = 63 if eos != 63 else 62
        got = eq.generate(ids, max_new_tokens=10, eos_token_id=[eos], pad_token_id=pad)
        expected, ends = full.clone(), []
        for r in range(3):
            hits = (full[r, 5:] == eos).nonzero().flatten()
            if hits.numel():
                end = 5 + int(hits[0]) + 1
                expected[r, end:] = pad
                ends.append(end)
        length = max(ends) if len(ends) == 3 else full.shape[1]
        assert torch.equal(got, expected[:, :length]), (eos, got, expected)
    # the first eos id pads by default; one id or several; every row finished at once
    first = int(full[0, 5])
    assert torch.equal(eq.generate(ids[:1], max_new_tokens=10, eos_token_id=first), full[:1, :6])
    assert torch.equal(eq.generate(ids[:1], max_new_tokens=10, eos_token_id=(V - 1, first)), full[:1, :6])


def test_generation_input_checks_and_top_k_zero():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    g = torch.Generator().manual_seed(0)
    off = eq.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, generator=g)  # 0: no top-k, as in HF
    assert torch.equal(off, eq.generate(ids, max_new_tokens=3, do_sample=True, generator=torch.Generator().manual_seed(0)))
    for bad, match in ((ids[0], "shape \\[B, T\\]"), (ids[:0], "B >= 1"), (ids[:, :0], "prompts are empty")):
        with pytest.raises(ValueError, match=match):
            eq.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        eq.generate(ids, max_new_tokens=2, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="shape \\[B, T\\]"):
        eq(ids[0])
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        eq.generate(ids, do_sample=True, top_k=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        eq.generate(ids, do_sample=True, top_p=1.5)


def test_generation_stop_token_bad_input():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="eos_token_id 64 is out of range"):
        eq.generate(ids, max_new_tokens=2, eos_token_id=V)
    with pytest.raises(ValueError, match="pad_token_id -1 is out of range"):
        eq.generate(ids, max_new_tokens=2, eos_token_id=3, pad_token_id=-1)
    with pytest.raises(TypeError, match="integer token id"):
        eq.generate(ids, max_new_tokens=2, eos_token_id=2.5)
    with pytest.raises(ValueError, match="non-empty"):
        eq.generate(ids, max_new_tokens=2, eos_token_id=[])
    with pytest.raises(ValueError, match="pad_token_id needs eos_token_id"):
        eq.generate(ids, max_new_tokens=2, pad_token_id=0)


# -- the fused head and shared rows (issue #20), against the definition: |G| separate model calls --

GROUP3 = E.TokenGroup.from_cycles(V, [[5, 9, 40], [11, 12, 13]])


def gemma2(softcap=30.0):
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=64, sliding_window=4, final_logit_softcapping=softcap)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def gemma2_uncapped():
    return gemma2(softcap=None)


class AfterHead(torch.nn.Module):
    """A model whose logits are not its head's output (nothing in the config
    says so): ``edit(out)`` changes them."""

    def __init__(self, model, edit):
        super().__init__()
        self.inner, self.edit = model, edit

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, cache=None, **kwargs):
        out = self.inner(cache=cache, **kwargs)
        self.edit(out)
        return out


def scale_logits(out):
    out.logits = 2 * out.logits


def ban_token_zero(out):  # in place, as a bad-token ban does
    out.logits[..., 0] = float("-inf")


def scaled_gpt2():
    return AfterHead(gpt2(), scale_logits).eval()


# model -> the path EquiLM takes
PATHS = {gpt2: "fused", llama: "fused", gemma2: "full", gemma2_uncapped: "fused", scaled_gpt2: "full"}
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def definition(model, ids, g, mask=None):
    kwargs = {} if mask is None else {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    outs = [model(input_ids=g.act(ids, k), **kwargs).logits[..., g.perms[k]] for k in range(len(g))]
    return torch.stack(outs).mean(0)


def prompts(g, batch=4, length=7, seed=0):
    """Rows 0 and 2 hold a moved token, rows 1 and 3 none (one backbone row each)."""
    gen = torch.Generator().manual_seed(seed)
    moved = (g.perms != torch.arange(V)).any(0)
    fixed = (~moved).nonzero().flatten()
    ids = fixed[torch.randint(0, fixed.numel(), (batch, length), generator=gen)]
    ids[0::2, 2] = moved.nonzero().flatten()[: (batch + 1) // 2]
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
@pytest.mark.parametrize("make", list(PATHS))
def test_forward_paths_match_definition(make, g, dtype):
    model = make().to(dtype)
    eq = E.EquiLM(model, g, relaxed=[9, 7])
    ids = prompts(g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :3] = 0  # left padding, on a shared row and a split one
    with torch.no_grad():
        for m in (None, mask):
            got = eq(ids, attention_mask=m).logits
            assert eq.head_path == PATHS[make] and got.dtype == dtype
            want = definition(model, ids, g, m)
            base = model(input_ids=ids, **({} if m is None else {"attention_mask": m,
                                                                  "position_ids": (m.cumsum(-1) - 1).clamp(min=0)})).logits
            want[..., [9, 7]] = base[..., [9, 7]]  # relaxed: the identity stream's logits
            real = slice(None) if m is None else m.bool()
            # equal_nan: Gemma-2 itself gives NaN rows in float64 with left padding (transformers 5.24)
            torch.testing.assert_close(got[real], want[real], equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
@pytest.mark.parametrize("make", [gpt2, llama, gemma2])
def test_loss_and_gradients_match_definition(make, g):
    model = make().double()  # eval(): GPT-2's dropout off
    eq = E.EquiLM(model, g)
    ids = prompts(g)
    labels = ids.clone()
    labels[1, 4:] = -100
    loss = eq(ids, labels=labels).loss
    got = torch.autograd.grad(loss, list(model.parameters()))
    logits = definition(model, ids, g)
    want_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(loss, want_loss, atol=1e-12, rtol=1e-12)
    # Llama's and Gemma-2's RMSNorm compute in float32 even in a float64 model, and
    # a shared row sums its copies' gradients before the backbone: float32 rounding.
    rel = 1e-12 if make is gpt2 else 1e-6
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=rel * float(b.abs().max()), rtol=0)


def definition_generate(model, ids, g, n, choose=lambda s: s.argmax(-1), mask=None, eos=None, pad=None):
    """No cache, no sharing: |G| calls on the whole prefix per token."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    mask = torch.ones_like(ids) if mask is None else mask
    for _ in range(n):
        nxt = choose(definition(model, ids, g, mask)[:, -1].float())
        if eos is not None:
            nxt = torch.where(finished, torch.tensor(pad), nxt)
            finished |= nxt == eos
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
@pytest.mark.parametrize("make", [gpt2, llama, gemma2, old_interface_gpt2])
def test_generation_with_shared_rows_matches_definition(make, g):
    model = make()
    eq = E.EquiLM(model, g)
    ids = prompts(g, length=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :1] = 0
    moved = (g.perms != torch.arange(V)).any(0)
    with torch.no_grad():
        for m in (mask, None):
            gen = eq.generate(ids, max_new_tokens=8, attention_mask=m)
            assert torch.equal(gen, definition_generate(model, ids, g, 8, mask=m))
        # eos on the first token of row 1 (shared), padding with a moved token: that row splits mid-generation
        eos, pad = int(gen[1, 5]), int(moved.nonzero()[0])
        got = eq.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
        want = definition_generate(model, ids, g, 8, eos=eos, pad=pad)
        assert torch.equal(got, want[:, :got.shape[1]]) and got[1, 6] == pad
        assert not moved[ids[1]].any()
        # sampling with a generator draws the same tokens
        choose = lambda s: eq._choose(s, True, 0.7, 20, 0.95, gen_b)  # noqa: E731
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        got = eq.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.95, generator=gen_a)
        assert torch.equal(got, definition_generate(model, ids, g, 6, choose=choose))
    assert eq.head_path == ("full" if make in (gemma2, old_interface_gpt2) else "fused")


def test_post_head_change_falls_back_once():
    model = scaled_gpt2()
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP)
    with torch.no_grad():
        torch.testing.assert_close(eq(ids).logits, definition(model, ids, GROUP), **TOL[torch.float32])
        assert eq.head_path == "full" and eq._fusable is False
        assert torch.equal(eq.generate(ids, max_new_tokens=4), definition_generate(model, ids, GROUP, 4))


def test_identity_group_gives_the_model():
    """The fairness example's "base LM": |G| = 1, no token moved, every row shared."""
    model = gpt2()
    eq = E.EquiLM(model, E.TokenGroup(torch.arange(V)[None]))
    ids = prompts(GROUP)
    with torch.no_grad():
        torch.testing.assert_close(eq(ids).logits, model(input_ids=ids).logits, **TOL[torch.float32])
        assert eq.head_path == "fused"
        assert torch.equal(eq.generate(ids, max_new_tokens=5), definition_generate(model, ids, eq.group, 5))


def gpt2_biased_head():
    model = gpt2()
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(32, V, bias=True)  # untied, with a bias
    return model.eval()


@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
@pytest.mark.parametrize("make", [gpt2, gpt2_biased_head, llama, gemma2])
def test_chunked_loss_without_logits_matches_definition(make, g, monkeypatch):
    """return_logits=False: the fused head's loss over chunks of 5 tokens (the
    full path's loss for Gemma-2), gradients included, relaxed tokens too."""
    monkeypatch.setattr(E.lm_head, "_LOSS_CHUNK_LOGITS", 5 * V)
    model = make().double()
    eq = E.EquiLM(model, g, relaxed=[9, 7])
    ids = prompts(g)
    labels = ids.clone()
    labels[1, 4:] = -100
    out = eq(ids, labels=labels, return_logits=False)
    assert out.logits is None and eq.head_path == ("full" if make is gemma2 else "fused")
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    with_logits = eq(ids, labels=labels)
    want = torch.autograd.grad(with_logits.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, with_logits.loss, atol=1e-12, rtol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12 * float(b.abs().max()), rtol=0)
    with torch.no_grad():  # no gradients computed, the same loss
        torch.testing.assert_close(eq(ids, labels=labels, return_logits=False).loss, with_logits.loss.detach(),
                                   atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="needs labels"):
        eq(ids, return_logits=False)


def test_chunked_loss_trains_the_head_bias_alone():
    """Only the head's bias trainable: the chunked loss still has a gradient
    (it raised "computed without gradients" on backward), the full path's."""
    model = gpt2_biased_head().double()
    model.requires_grad_(False)
    model.lm_head.bias.requires_grad_(True)
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP)
    eq(ids, labels=ids, return_logits=False).loss.backward()
    got, model.lm_head.bias.grad = model.lm_head.bias.grad, None
    eq(ids, labels=ids).loss.backward()
    torch.testing.assert_close(got, model.lm_head.bias.grad, atol=1e-12, rtol=1e-12)


def test_in_place_logit_edit_takes_the_full_path():
    """The fused path crashed on it: its stand-in for the logits refuses writes."""
    model = AfterHead(gpt2(), ban_token_zero).eval()
    ids = prompts(GROUP)
    with torch.no_grad():
        eq = E.EquiLM(model, GROUP)
        got = eq(ids).logits
        assert eq.head_path == "full" and torch.isneginf(got[..., 0]).all()
        torch.testing.assert_close(got, definition(model, ids, GROUP), **TOL[torch.float32])
        eq = E.EquiLM(model, GROUP)  # generation finds it out on its first step
        assert torch.equal(eq.generate(ids, max_new_tokens=5), definition_generate(model, ids, GROUP, 5))
        assert eq.head_path == "full"


def test_labels_of_the_wrong_shape_raise():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    for return_logits in (True, False):  # a user's bug: a raw size error from the loss before
        with pytest.raises(ValueError, match="labels must have input_ids' shape \\(2, 4\\)"):
            eq(ids, labels=ids[:, :3], return_logits=return_logits)


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("order", [2, 3])
def test_orbit_sampler_is_equivariant_sample_by_sample(make, order):
    """sampler="orbit": with the same generator seed, sampling from a transformed
    prompt gives the transformed sample, token by token (Gumbel-max noise drawn
    on the orbit's representative); top_k=1 is greedy; without the orbit
    sampler the paired prompts draw unrelated samples."""
    g = GROUP if order == 2 else E.TokenGroup.from_cycles(V, [[5, 9, 13], [11, 12, 14]])
    eq = E.EquiLM(make(), g).eval()
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    ids[:, 2] = torch.tensor([5, 9, 11, 12])  # every prompt holds a moved token: no element but the identity fixes it
    sample = lambda prompts, **kw: eq.generate(prompts, max_new_tokens=12, do_sample=True, temperature=1.5,
                                               generator=torch.Generator().manual_seed(7), **kw)
    base = sample(ids, sampler="orbit")
    assert base[:, 6:].unique().numel() > 3  # really sampled
    for k in range(1, order):
        moved = g.act(ids, k)
        torch.testing.assert_close(sample(moved, sampler="orbit"), g.act(base, k), rtol=0, atol=0)
        torch.testing.assert_close(sample(moved, sampler="orbit", top_k=5, top_p=0.9),
                                   g.act(sample(ids, sampler="orbit", top_k=5, top_p=0.9), k), rtol=0, atol=0)
    greedy = eq.generate(ids, max_new_tokens=12)
    assert torch.equal(sample(ids, sampler="orbit", top_k=1), greedy)
    assert not torch.equal(sample(g.act(ids, 1)), g.act(sample(ids), 1))  # multinomial: equivariant in distribution only
    with pytest.raises(ValueError, match="sampler must be"):
        eq.generate(ids, do_sample=True, sampler="gumbel")
