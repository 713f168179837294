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
