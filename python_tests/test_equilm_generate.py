"""EquiLM.generate against transformers' own generate on the definition
(test_equilm.Averaged: |G| separate calls on the whole sequence per token, no
cache), token for token, in every decoding mode; equivariance with logits
processors; the package's own draws (generator=, sampler="orbit")."""
import pytest
import torch

import equitune_ext as E

transformers = pytest.importorskip("transformers")

from test_equilm import (GROUP, GROUP3, V, definition, gemma2, gpt2, llama, old_interface_gpt2,  # noqa: E402
                         prompts, reference_generate)

from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

MOVED = {id(g): (g.perms != torch.arange(V)).any(0) for g in (GROUP, GROUP3)}


def left_padded(ids):
    """A mask padding row 1 (shared) and row 2 (split) on the left."""
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :1] = 0
    return mask


def fixed_token(g, tokens):
    """The first of ``tokens`` that no element moves."""
    return next(int(t) for t in tokens if not MOVED[id(g)][t])


# name -> generate kwargs; "eos" stands for a fixed token the model produces early in row 0
CONFIGS = {
    "greedy, repetition penalty, n-gram ban": dict(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2),
    "min_new_tokens, eos": dict(max_new_tokens=10, min_new_tokens=3, eos_token_id="eos", pad_token_id=0),
    "beam search, 2 beams": dict(max_new_tokens=8, num_beams=2, num_return_sequences=2),
    "beam search, 3 beams, eos": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id="eos",
                                      pad_token_id=0, length_penalty=0.5),
}


def resolve(kwargs, eq, ids):
    if kwargs.get("eos_token_id") != "eos":
        return kwargs
    free = eq.generate(ids, max_new_tokens=6)
    return {**kwargs, "eos_token_id": fixed_token(eq.group, free[0, ids.shape[1] + 1:])}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("make", [gpt2, llama, gemma2, old_interface_gpt2])
def test_generate_equals_transformers_on_the_averaged_logits(make, config):
    """Fused head (GPT-2, Llama) and full path (Gemma-2's soft-capping); the KV
    cache as ``cache`` and as ``past_key_values``; a GenerationConfig and the
    same fields as kwargs; left padding; rows shared and split."""
    model = make()
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP)
    kwargs = resolve(CONFIGS[config], eq, ids)
    for mask in (None, left_padded(ids)):
        extra = {} if mask is None else {"attention_mask": mask}
        want = reference_generate(model, GROUP, ids, **kwargs, **extra)
        assert torch.equal(eq.generate(ids, generation_config=GenerationConfig(**kwargs), **extra), want)
        assert torch.equal(eq.generate(ids, **kwargs, **extra), want)
    assert eq.head_path == ("full" if make in (gemma2, old_interface_gpt2) else "fused")


@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
@pytest.mark.parametrize("make", [gpt2, llama])
def test_shared_rows_split_mid_generation(make, g):
    """Rows 1 and 3 hold no moved token: one backbone row each until one
    arrives. Eos on row 1's first token, padded with a moved token, splits it."""
    model = make()
    eq = E.EquiLM(model, g, relaxed=[9])
    ids = prompts(g, length=5)
    free = eq.generate(ids, max_new_tokens=8)
    eos, pad = int(free[1, 5]), int(MOVED[id(g)].nonzero()[0])
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    got = eq.generate(ids, **kwargs)
    assert got[1, 6] == pad and not MOVED[id(g)][ids[1]].any()
    assert torch.equal(got, reference_generate(model, g, ids, relaxed=[9], **kwargs))
    assert torch.equal(eq.generate(ids, use_cache=False, **kwargs), got)
    out = eq.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        want = definition(model, ids, g)[:, -1]
        want[:, 9] = model(input_ids=ids).logits[:, -1, 9]
    torch.testing.assert_close(out.scores[0], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("make", [gpt2, llama])
def test_beam_search_reorders_shared_and_split_rows(make, monkeypatch):
    """A quarter of the vocabulary moved: the beams of a shared prompt split at
    different steps, and beam search moves each beam's |G| cache rows
    together, shared or split."""
    g = E.TokenGroup.from_cycles(V, [[t, t + 1] for t in range(48, 64, 2)])
    model = make()
    eq = E.EquiLM(model, g)
    ids = prompts(g, length=5)
    beams, mixed = 3, []
    reorder = E.lm._Rows.reorder

    def spy(rows, beam_idx):  # does some prompt have shared and split beams?
        shared = rows.is_single.view(-1, beams) if rows.single else torch.zeros(1, beams, dtype=torch.bool)
        mixed.append(bool((shared.any(1) & ~shared.all(1)).any()))
        return reorder(rows, beam_idx)

    monkeypatch.setattr(E.lm._Rows, "reorder", spy)
    kwargs = dict(max_new_tokens=8, num_beams=beams, num_return_sequences=2)
    assert torch.equal(eq.generate(ids, **kwargs), reference_generate(model, g, ids, **kwargs))
    assert any(mixed)


class Bias(LogitsProcessor):
    def __init__(self):
        self.bias = torch.linspace(0, 3, V)

    def __call__(self, input_ids, scores):
        return scores + self.bias


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_user_processors_and_stopping_criteria():
    model = gpt2()
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP)
    free = eq.generate(ids, max_new_tokens=10, logits_processor=LogitsProcessorList([Bias()]))
    token = int(free[0, 9])
    lists = lambda: dict(logits_processor=LogitsProcessorList([Bias()]),  # noqa: E731
                         stopping_criteria=StoppingCriteriaList([StopAfterToken(token)]))
    got = eq.generate(ids, max_new_tokens=10, pad_token_id=0, **lists())
    stop = int((free[0, 7:] == token).int().argmax()) + 7
    assert got[0, stop] == token and (got[0, stop + 1:] == 0).all()  # row 0 stopped there, then padding
    assert torch.equal(got, reference_generate(model, GROUP, ids, max_new_tokens=10, pad_token_id=0, **lists()))


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_the_new_tokens():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = prompts(GROUP)[:1]
    streamer = Recorder()
    out = eq.generate(ids, max_new_tokens=6, streamer=streamer)
    assert streamer.ended and torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.cat([p.reshape(-1) for p in streamer.puts[1:]]), out[0, ids.shape[1]:])


def test_sampling_draws_what_transformers_draws():
    """Without generator=: torch's global generator, as transformers; with
    one: the same draws from it."""
    model = gpt2()
    eq = E.EquiLM(model, GROUP)
    ids = prompts(GROUP, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.95, num_return_sequences=2)
    torch.manual_seed(3)
    want = reference_generate(model, GROUP, ids, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(eq.generate(ids, **kwargs), want)
    torch.manual_seed(0)
    assert torch.equal(eq.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs), want)


PROCESSORS = {
    "repetition penalty, n-gram ban, min_new_tokens": dict(max_new_tokens=10, repetition_penalty=1.5,
                                                           no_repeat_ngram_size=2, min_new_tokens=3,
                                                           eos_token_id="eos", pad_token_id=0),
    "beam search": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
    "orbit sampling, temperature, top-k, top-p": dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20,
                                                      top_p=0.9, sampler="orbit"),
}


@pytest.mark.parametrize("config", list(PROCESSORS))
@pytest.mark.parametrize("g", [GROUP, GROUP3], ids=["G2", "G3"])
def test_generation_is_equivariant_with_processors(g, config):
    """generate(perms[k][ids]) == perms[k][generate(ids)] for processors that
    commute with a vocabulary permutation (eos fixed by the group). Every
    prompt holds a moved token: no exact ties."""
    eq = E.EquiLM(gpt2(), g)
    ids = prompts(g, batch=2)
    ids[1, 4] = int(MOVED[id(g)].nonzero()[-1])
    kwargs = resolve(PROCESSORS[config], eq, ids)
    run = lambda x: eq.generate(x, generator=torch.Generator().manual_seed(7), **kwargs)  # noqa: E731
    base = run(ids)
    for k in range(1, len(g)):
        assert torch.equal(run(g.act(ids, k)), g.act(base, k))


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
    sample = lambda prompts, **kw: eq.generate(prompts, max_new_tokens=12, do_sample=True, temperature=1.5,  # noqa: E731
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
        eq.generate(ids, max_new_tokens=2, do_sample=True, sampler="gumbel")
    with pytest.raises(ValueError, match="beam sampling"):
        eq.generate(ids, max_new_tokens=2, do_sample=True, num_beams=2, sampler="orbit")


def test_left_padded_batch_matches_single_prompts():
    eq = E.EquiLM(gpt2(), GROUP)
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 4))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    gen = eq.generate(padded, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(gen[0, 6:], eq.generate(a, max_new_tokens=5)[0, 6:])
    assert torch.equal(gen[1, 6:], eq.generate(b, max_new_tokens=5)[0, 4:])


def test_generation_input_checks():
    eq = E.EquiLM(gpt2(), GROUP)
    ids = torch.randint(0, V, (2, 4))
    for bad, match in ((ids[0], "shape \\[B, T\\]"), (ids[:0], "B >= 1"), (ids[:, :0], "prompts are empty")):
        with pytest.raises(ValueError, match=match):
            eq.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        eq.generate(ids, max_new_tokens=2, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="not used by the model"):  # transformers' own checks apply
        eq.generate(ids, max_new_token=2)
