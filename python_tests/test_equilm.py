"""EquiLM on small GPT-2 and Llama models built from configs (no download): forward,
loss and gradients against the definition; the models, the definition and the
reference generator (transformers' generate on the definition) that
test_equilm_generate.py shares."""
import copy
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


def test_bad_arguments():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(TypeError, match="TokenGroup"):
        E.EquiLM(gpt2(), "c4")
    with pytest.raises(ValueError, match="relaxed token id"):
        E.EquiLM(gpt2(), GROUP, relaxed=[V])
    with pytest.raises(ValueError, match="shape \\[B, T\\]"):
        eq(ids[0])
    with pytest.raises(ValueError, match="labels must have input_ids' shape \\(2, 4\\)"):
        eq(ids, labels=ids[:, :3])  # a user's bug: a raw size error from the loss before
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        eq(ids, labels=ids[:, :3], return_logits=False)


# -- the fused head and shared rows, against the definition: |G| separate model calls --

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


class Averaged(transformers.PreTrainedModel, transformers.GenerationMixin):
    """A model whose forward returns the definition's logits (|G| separate calls
    on the whole sequence, no cache; ``relaxed`` tokens from the identity's),
    for transformers' own generate; the backbone's generation defaults."""

    config_class = transformers.PretrainedConfig

    def __init__(self, model, g, relaxed=()):
        super().__init__(transformers.PretrainedConfig(vocab_size=g.vocab_size))
        self.model, self.g, self.relaxed = model, g, list(relaxed)
        if hasattr(model, "generation_config"):
            self.generation_config = copy.deepcopy(model.generation_config)
            self.generation_config.cache_implementation = None  # this model has no cache (Gemma-2 names one)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        given = {"attention_mask": attention_mask, "position_ids": position_ids}
        outs = [self.model(input_ids=self.g.act(input_ids, k), **{n: t for n, t in given.items() if t is not None}).logits
                for k in range(len(self.g))]
        logits = torch.stack([out[..., self.g.perms[k]] for k, out in enumerate(outs)]).mean(0)
        logits[..., self.relaxed] = outs[0][..., self.relaxed]
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)


def reference_generate(model, g, ids, relaxed=(), **kwargs):
    """transformers' generate on the averaged logits."""
    return Averaged(model, g, relaxed).generate(ids, use_cache=False, **kwargs)


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


def test_post_head_change_falls_back_once():
    model = scaled_gpt2()
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP)
    with torch.no_grad():
        torch.testing.assert_close(eq(ids).logits, definition(model, ids, GROUP), **TOL[torch.float32])
        assert eq.head_path == "full" and eq._fusable is False
        assert torch.equal(eq.generate(ids, max_new_tokens=4), reference_generate(model, GROUP, ids, max_new_tokens=4))


def test_identity_group_gives_the_model():
    """The fairness example's "base LM": |G| = 1, no token moved, every row shared."""
    model = gpt2()
    eq = E.EquiLM(model, E.TokenGroup(torch.arange(V)[None]))
    ids = prompts(GROUP)
    with torch.no_grad():
        torch.testing.assert_close(eq(ids).logits, model(input_ids=ids).logits, **TOL[torch.float32])
        assert eq.head_path == "fused"
        assert torch.equal(eq.generate(ids, max_new_tokens=5), model.generate(ids, max_new_tokens=5))


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
        assert torch.equal(eq.generate(ids, max_new_tokens=5), reference_generate(model, GROUP, ids, max_new_tokens=5))
        assert eq.head_path == "full"
