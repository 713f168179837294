"""EquiLM.generate on transformers' generation machinery.

transformers' ``GenerationMixin.generate`` runs unchanged on ``_GroupAveraged``,
a thin model around the EquiLM whose forward returns the group-averaged
next-token logits of its N sequences, [N, 1, V], and whose cache object
(``_GroupCache``) holds EquiLM's group-batched KV cache:

* one backbone step per new token for the whole group: backbone row k of
  sequence b holds the transform Γ(k) of b's context and is fed perms[k][token];
* a sequence with no moved token is one backbone row, fixed by every element,
  until a moved token arrives and its cache row splits into |G| rows (lm.py,
  _Rows);
* beam search's ``reorder_cache(beam_idx)`` moves the |G| rows of each beam
  together.

Everything else is transformers' own: the GenerationConfig and its kwargs,
logits processors and warpers, stopping criteria, the streamer, the greedy,
sampling and beam-search loops, num_return_sequences, return_dict_in_generate.
So EquiLM.generate yields exactly the tokens transformers' generate yields on
a model whose forward returns the averaged logits.

The package's own draws (``generator=``, ``sampler="orbit"``) are the last
logits processor, after transformers' warpers: ``_Draw`` draws the token and
leaves it the only finite score, which transformers' multinomial then takes.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationConfig, LogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from .ops import group_transform

# transformers 5 passes and returns the KV cache as ``cache``, transformers 4 as ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _splittable(cache) -> bool:
    """A transformers Cache (reorder_cache, which beam search uses) or the
    legacy tuple of per-layer (key, value, ...) tensors."""
    return callable(getattr(cache, "reorder_cache", None)) or (
        isinstance(cache, (tuple, list)) and all(isinstance(layer, (tuple, list)) and
                                                 all(isinstance(t, torch.Tensor) for t in layer) for layer in cache))


def _select_cache(cache, index: torch.Tensor):
    """The KV cache with its batch rows taken by ``index`` (repeats allowed)."""
    if callable(getattr(cache, "reorder_cache", None)):  # in place
        cache.reorder_cache(index)
        return cache
    return type(cache)(type(layer)(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)


class _GroupCache:
    """The state transformers' loop carries between steps: the backbone's KV
    cache over the backbone rows, their layout (_Rows) and the head path."""

    is_compileable = False  # transformers compiles the forward only for its static caches
    is_croppable = False

    def __init__(self, decoder: "_GroupAveraged", rows, cache, head, tables: torch.Tensor):
        self.decoder, self.rows, self.cache, self.head, self.tables = decoder, rows, cache, head, tables

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if callable(getattr(self.cache, "get_seq_length", None)):
            return self.cache.get_seq_length(layer_idx)
        return self.cache[layer_idx][0].shape[-2]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: sequence b continues sequence beam_idx[b]."""
        if not _splittable(self.cache):
            raise ValueError("EquiLM.generate: beam search needs a KV cache that can be reordered (a transformers "
                             f"Cache or a tuple of per-layer tensors), got {type(self.cache).__name__}")
        self.rows, index = self.rows.reorder(beam_idx)
        self.cache = _select_cache(self.cache, index)

    def step(self, tokens: torch.Tensor, attention_mask, position_ids) -> torch.Tensor:
        """Feeds each sequence's new token [N] (row k: its transform by element k): the averaged logits [N, V]."""
        lm, rows = self.decoder.lm, self.rows
        if rows.single:  # a shared sequence that gets a moved token splits into |G| rows (one host sync per token)
            which = rows.is_single & lm._is_moved[tokens]
            if bool(which.any()):
                self.cache = _select_cache(self.cache, rows.split(which))
        # A gather of the tables, without group_transform's id range check, which on a GPU waits for the
        # step to finish; index_select still refuses an out-of-range pad id, as the plain model's embedding.
        ids = rows.pick(self.tables.index_select(1, tokens).reshape(-1, 1))
        out, h = lm._call(self.head, False, **self.decoder._inputs(rows, ids, attention_mask, position_ids, True),
                          **{self.decoder.cache_arg: self.cache})
        self.cache = getattr(out, self.decoder.cache_arg)
        return self.decoder._averaged(rows, self.head, out, h)


class _GroupAveraged(PreTrainedModel, GenerationMixin):
    """The model transformers' generate runs on: forward(input_ids [N, t]) ->
    the group-averaged logits of the last position, [N, 1, V], and a
    _GroupCache. Its generation defaults are the backbone's generation_config."""

    config_class = PretrainedConfig
    main_input_name = "input_ids"

    def __init__(self, lm, draw: Optional["_Draw"]):
        super().__init__(PretrainedConfig(vocab_size=lm.group.vocab_size))  # beam search reads the vocabulary size
        self.lm = lm
        self.draw = draw
        backbone = lm.model
        if isinstance(getattr(backbone, "generation_config", None), GenerationConfig):
            self.generation_config = backbone.generation_config
        if hasattr(backbone, "hf_device_map"):  # offloaded backbones: transformers then leaves compilation off
            self.hf_device_map = backbone.hf_device_map
        params = inspect.signature(backbone.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # The prompt's logits at its last position only, as transformers asks of the plain model.
        self.keep = next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is _GroupCache, made by the first forward

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if self.draw is None or not generation_config.do_sample:
            return processors  # greedy and beam search: nothing is drawn
        if generation_config.num_beams > 1:
            raise ValueError("EquiLM.generate: generator= and sampler='orbit' draw one token per sequence; beam "
                             "sampling (num_beams > 1 with do_sample) is transformers' own draw: leave them out")
        processors.append(self.draw)
        return processors

    def _inputs(self, rows, ids, attention_mask, position_ids, use_cache) -> dict:
        kwargs = {"input_ids": ids, "use_cache": use_cache, **self.keep}
        if attention_mask is not None:
            kwargs["attention_mask"] = rows.prompt_of_row(attention_mask)
        if position_ids is not None:
            kwargs["position_ids"] = rows.prompt_of_row(position_ids)
        return kwargs

    def _averaged(self, rows, head, out, h) -> torch.Tensor:
        """The averaged logits [N, V] of the last position, from the backbone rows' output."""
        lm, batch = self.lm, rows.batch
        if head is not None:
            return lm._fused_average(head, rows.expand(h[:, -1]).unflatten(0, (lm.group.order, batch)))
        return lm._average(rows.expand(out.logits[:, -1]), batch)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, **kwargs):
        state = cache if cache is not None else past_key_values
        if state is not None:
            logits = state.step(input_ids[:, -1], attention_mask, position_ids)
        else:
            logits, state = self._first_step(input_ids, attention_mask, position_ids, bool(use_cache))
        return CausalLMOutputWithPast(logits=logits[:, None], **{_CACHE_FIELD: state})

    def _first_step(self, input_ids, attention_mask, position_ids, use_cache):
        """The whole prompts (or, with use_cache=False, the whole sequences at every step)."""
        lm = self.lm
        ids = group_transform(input_ids, lm.group)
        head = lm._fusable_head()
        rows = lm._rows(input_ids)
        while True:
            out, h = lm._call(head, True, **self._inputs(rows, rows.pick(ids), attention_mask, position_ids, use_cache))
            head = head if h is not None else None
            cache = getattr(out, self.cache_arg, None) if use_cache else None
            if use_cache and cache is None:
                raise ValueError("EquiLM.generate: the model returned no KV cache; pass use_cache=False")
            if not use_cache or not rows.single or _splittable(cache):
                break
            rows = lm._rows(input_ids, share=False)  # a cache that cannot be split: every copy its own row
        lm.head_path = "full" if head is None else "fused"
        logits = self._averaged(rows, head, out, h)
        return logits, (_GroupCache(self, rows, cache, head, lm.group.tables(input_ids.device)) if use_cache else None)


def _orbit_elements(group, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] indices k such that perms[k] maps row b's context (its real tokens)
    to the lexicographically smallest of its |G| transforms."""
    perms = group.tables(context.device)
    seqs = perms[:, context].masked_fill(mask == 0, -1).transpose(0, 1)  # [B, |G|, T]: transform k of each row
    candidates = torch.ones(seqs.shape[:2], dtype=torch.bool, device=context.device)
    differing = (seqs != seqs[:, :1]).any(1).any(0)  # positions where some transform differs
    for t in differing.nonzero().flatten().tolist():  # lexicographic: the first differing position decides
        vals = seqs[:, :, t].masked_fill(~candidates, group.vocab_size)
        candidates &= vals == vals.min(1, keepdim=True).values
    return candidates.int().argmax(1)  # the first of the elements that tie (those fixing the context)


class _Draw(LogitsProcessor):
    """A sample of softmax(scores) drawn with the caller's generator, returned
    as scores that are 0 on the drawn token and -inf elsewhere. ``orbit``:
    Gumbel-max, token v of row b taking the noise of its image perms[k_b][v]
    in the frame of the row's orbit representative (k_b: _orbit_elements)."""

    def __init__(self, group, generator: Optional[torch.Generator], orbit: bool, prompt_mask: Optional[torch.Tensor]):
        self.group, self.generator, self.orbit, self.prompt_mask = group, generator, orbit, prompt_mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.orbit:
            drawn = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)
        else:
            mask = torch.ones_like(input_ids)
            if self.prompt_mask is not None:  # transformers repeats each prompt num_return_sequences times
                prompt = self.prompt_mask.to(input_ids.device)
                mask[:, :prompt.shape[1]] = prompt.repeat_interleave(input_ids.shape[0] // prompt.shape[0], 0)
            to_representative = _orbit_elements(self.group, input_ids, mask)
            gumbel = -torch.empty_like(scores).exponential_(generator=self.generator).log()
            drawn = (scores + gumbel.gather(1, self.group.tables(scores.device)[to_representative])).argmax(-1)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn[:, None], 0.0)


def generate(lm, input_ids: torch.Tensor, generation_config, logits_processor, stopping_criteria, streamer,
             generator: Optional[torch.Generator], sampler: str, **kwargs):
    """EquiLM.generate (its docstring has the contract)."""
    if sampler not in ("multinomial", "orbit"):
        raise ValueError(f"sampler must be 'multinomial' or 'orbit', got {sampler!r}")
    lm._check_ids(input_ids, kwargs.get("attention_mask"), "generate")
    if input_ids.shape[1] == 0:
        raise ValueError("EquiLM.generate: the prompts are empty (input_ids of shape [B, 0]); give at least one token")
    draw = None
    if generator is not None or sampler == "orbit":
        draw = _Draw(lm.group, generator, sampler == "orbit", kwargs.get("attention_mask"))
    return _GroupAveraged(lm, draw).generate(input_ids, generation_config=generation_config,
                                             logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                             streamer=streamer, **kwargs)
