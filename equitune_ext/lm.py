"""EquiLM: equi-tuning of a causal language model over a token group.

    logits_G(ids) = (1/|G|) Σ_k Γ(k)⁻¹ LM(Γ(k) ids)      (the paper averages logits)

with Γ(k) ids = perms[k][ids] and (Γ(k)⁻¹ s)[v] = s[perms[k][v]] on scores.
One batched backbone call on the transformed rows; generation (transformers'
generate, lm_generate.py) keeps a KV cache for every row, each with its own
transformed context, and feeds row k the k-th transform of the chosen token,
so one backbone step per new token serves the whole group. R-EquiLM (``relaxed=`` ids): those tokens' logits come from the
identity element's stream alone; every other token's are averaged.

Two exact identities keep the cost near the backbone's own:

* Linear head. When the logits are W h + b of the output embedding's input h
  and nothing follows it, the head runs once on B rows and only the columns
  of the moved tokens take the average over k (lm_head.py); ``head_path``
  says which path the latest call took ("fused" or "full"). With ``labels``
  and ``return_logits=False`` the loss is taken over chunks of tokens, so
  that [B, T, V] is never resident.
* Shared rows. A context holding no moved token is fixed by every element, so
  its |G| copies are one backbone row; generation splits that row's KV cache
  into |G| rows when a moved token arrives.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lm_head import fused_head_loss, fused_logits
from .ops import group_average, group_transform
from .token_groups import TokenGroup

__all__ = ["EquiLM", "EquiLMOutput"]

# Config fields of Hugging Face models that put something after the output
# embedding (Gemma-2/3 soft-capping, Cohere and Granite logit scales): the full
# path, without a trial call. Anything else that follows the head is caught by
# _call's check that the model returned the head's output itself.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class EquiLMOutput:
    logits: Optional[torch.Tensor]  # None: forward(..., return_logits=False)
    loss: Optional[torch.Tensor] = None


# A pytree node, so that torch.export (and torch.onnx.export) can return it: logits, then loss.
torch.export.register_dataclass(EquiLMOutput, serialized_type_name="equitune_ext.EquiLMOutput")


@contextlib.contextmanager
def _head_inputs(head: nn.Linear):
    """Within: calling ``head`` records its input and returns a stand-in of the
    logits' shape (one element, expanded: no [.., V] product, no memory)."""
    seen: List[tuple] = []

    def forward(x):
        stand_in = x.new_empty(1).expand(*x.shape[:-1], head.out_features)
        seen.append((x, stand_in))
        return stand_in

    head.forward = forward  # an instance attribute over the class's forward; _fusable_head checked there was none
    try:
        yield seen
    finally:
        del head.forward


class _Rows:
    """Which backbone row computes copy k of prompt b (the flat index f = k·B + b
    of the |G|·B transformed prompts): ``src[f]``; ``rows[r]`` is the flat index
    that backbone row r computes (the k = 0 one for a shared row). Block 0 is
    always rows 0..B-1; a prompt with no moved token has no other rows until it
    splits. ``rows is None``: every copy has its own row, in flat order (also
    when ``split`` is None)."""

    def __init__(self, split: Optional[torch.Tensor], order: int, batch: int):
        self.batch, self.order, self.single = batch, order, 0 if split is None else int((~split).sum())
        if not self.single:
            self.rows = self.src = None
            return
        keep = torch.cat([torch.ones_like(split), split.repeat(order - 1)])
        self.rows = keep.nonzero().squeeze(1)
        own = torch.arange(batch, device=split.device).repeat(order)
        self.src = torch.where(keep, keep.cumsum(0) - 1, own)
        self.is_single = ~split

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """x over the |G|·B flat copies -> x over the backbone rows."""
        return x if self.rows is None else x[self.rows]

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """x over the backbone rows -> x over the |G|·B flat copies."""
        return x if self.src is None else x[self.src]

    def prompt_of_row(self, x: torch.Tensor) -> torch.Tensor:
        """x over the B prompts -> x over the backbone rows."""
        return x.repeat(self.order, *([1] * (x.dim() - 1))) if self.rows is None else x[self.rows % self.batch]

    def split(self, which: torch.Tensor) -> torch.Tensor:
        """Gives the shared prompts ``which`` (bool [B]) their |G| rows; returns
        the new rows' sources among the old rows (for the KV cache)."""
        n = self.rows.shape[0]
        b = which.nonzero().squeeze(1)
        new = (torch.arange(1, self.order, device=b.device)[:, None] * self.batch + b).flatten()
        sel = torch.cat([torch.arange(n, device=b.device), self.src[b].repeat(self.order - 1)])
        self.rows = torch.cat([self.rows, new])
        self.src[new] = torch.arange(n, n + new.shape[0], device=b.device)
        self.is_single = self.is_single & ~which
        self.single -= b.shape[0]
        return sel

    def reorder(self, beam_idx: torch.Tensor):
        """Beam search: prompt b continues prompt beam_idx[b] (int [B]). The new
        layout, and its rows' sources among the old rows (for the KV cache)."""
        shared = self.is_single[beam_idx] if self.single else torch.zeros_like(beam_idx, dtype=torch.bool)
        new = _Rows(~shared, self.order, self.batch)
        flat = new.rows if new.rows is not None else torch.arange(self.order * self.batch, device=beam_idx.device)
        b = flat % self.batch
        old = flat - b + beam_idx[b]  # the same copy k of the old prompt
        return new, (old if self.src is None else self.src[old])


class EquiLM(nn.Module):
    """Wraps a Hugging Face causal LM (anything called as
    ``model(input_ids=..., attention_mask=..., position_ids=..., past_key_values=..., use_cache=...)``
    returning ``.logits`` and ``.past_key_values``; a model whose forward names a
    ``cache`` argument, as transformers 5 models do, gets and returns its KV cache
    as ``cache`` instead)."""

    def __init__(self, model: nn.Module, group: TokenGroup, *, relaxed: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(group, TokenGroup):
            raise TypeError(f"EquiLM needs a TokenGroup, got {type(group).__name__}")
        self.model = model
        self.group = group
        relaxed = [] if relaxed is None else [int(t) for t in relaxed]
        for t in relaxed:
            if not 0 <= t < group.vocab_size:
                raise ValueError(f"EquiLM: relaxed token id {t} is out of range [0, {group.vocab_size})")
        self.register_buffer("relaxed", torch.tensor(relaxed, dtype=torch.int64), persistent=False)
        is_moved = (group.perms != torch.arange(group.vocab_size)).any(0)
        moved = is_moved.nonzero().squeeze(1)
        self.register_buffer("_is_moved", is_moved, persistent=False)
        self.register_buffer("_moved", moved, persistent=False)  # the tokens S some element moves
        at = torch.full((group.vocab_size,), -1, dtype=torch.int64)
        at[moved] = torch.arange(moved.shape[0])
        # [|G|, S]: where perms[k][v] stands in S, for v in S (each element maps S onto itself)
        self.register_buffer("_moved_at", at[group.perms[:, moved]], persistent=False)
        self._fusable = True  # False once a model turned out to do something after its head
        self.head_path: Optional[str] = None  # "fused" or "full": the path the latest forward/generate took

    # -- the head ---------------------------------------------------------------------------------

    def _fusable_head(self) -> Optional[nn.Linear]:
        """The output embedding when the logits are an affine map of its input
        that the model returns as is; None: the full path."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if self._fusable and callable(get) else None
        if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
            return None  # not a plain Linear (quantized layers subclass it with their own forward)
        if head.out_features != self.group.vocab_size or not head.weight.is_floating_point():
            return None  # the full path raises group_average's error on a vocabulary mismatch
        if head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__:
            return None  # hooked or patched (accelerate's device hooks): leave its call alone
        config = getattr(self.model, "config", None)
        if any(getattr(config, name, None) is not None for name in _AFTER_HEAD):
            return None
        return head

    def _call(self, head: Optional[nn.Linear], retry: bool, **kwargs):
        """(the model's output, the head's input or None). With a head: the head
        is not run; its input comes back when the model returned the head's
        output untouched, else (something followed it: a new tensor, an edit
        in place, an error on the stand-in) the model runs again in full when
        ``retry``, and this EquiLM uses the full path from then on."""
        if head is None:
            return self.model(**kwargs), None
        out = None
        with _head_inputs(head) as seen:
            try:
                out = self.model(**kwargs)
            except RuntimeError:  # e.g. out.logits[..., 0] = -inf: the expanded stand-in refuses writes
                if not (seen and retry):
                    raise
        if out is not None and len(seen) == 1 and out.logits is seen[0][1] and out.logits._version == 0:
            return out, seen[0][0]
        self._fusable = False
        if not retry:  # a cached step: the cache has taken this step already
            raise RuntimeError("EquiLM: the model stopped returning its output embedding's result mid-generation")
        return self.model(**kwargs), None

    def _fused_average(self, head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """h: the head's inputs [|G|, B, …, D] -> the averaged logits [B, …, V]."""
        return fused_logits(h, head.weight, head.bias, self._moved, self._moved_at, self.relaxed)

    def _average(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """[|G|·B, …, V] -> [B, …, V]; relaxed tokens from the identity rows."""
        avg = group_average(logits, self.group, equivariant=True)
        if self.relaxed.numel():
            avg = avg.clone()
            avg[..., self.relaxed] = logits[:batch][..., self.relaxed].to(avg.dtype)
        return avg

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        # Left padding: positions count only the real tokens, as HF generate does.
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _rows(self, input_ids: torch.Tensor, share: bool = True) -> _Rows:
        # Which prompts hold a moved token (padding included: its logits differ
        # between the copies); one host sync to lay the rows out. An exported
        # graph cannot depend on the ids' values: there every copy has its own
        # row (the same logits, shared rows only save work).
        split = None if not share or torch.compiler.is_exporting() else self._is_moved[input_ids].any(1)
        return _Rows(split, self.group.order, input_ids.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_logits: bool = True) -> EquiLMOutput:
        """``return_logits=False`` with ``labels``: only the loss (``logits`` None);
        on the fused head path it is computed over chunks of tokens, so that the
        [B, T, V] logits are never resident (training memory below the plain
        model's)."""
        self._check_ids(input_ids, attention_mask, "forward")
        if not return_logits and labels is None:
            raise ValueError("EquiLM.forward: return_logits=False needs labels (there is nothing else to return)")
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"EquiLM.forward: labels must have input_ids' shape {tuple(input_ids.shape)} (the "
                             f"targets of every position, -100 ignored), got {tuple(labels.shape)}")
        batch, order = input_ids.shape[0], self.group.order
        ids = group_transform(input_ids, self.group)
        rows = self._rows(input_ids)
        kwargs = {"input_ids": rows.pick(ids)}
        if attention_mask is not None:
            mask = rows.prompt_of_row(attention_mask)
            kwargs.update(attention_mask=mask, position_ids=self._positions(mask))
        head = self._fusable_head()
        out, h = self._call(head, True, **kwargs)
        if h is not None and not return_logits:
            self.head_path = "fused"
            h = rows.expand(h).unflatten(0, (order, batch)).flatten(1, -2)  # [|G|, B·T, D]
            target = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
            loss = fused_head_loss(h, head.weight, head.bias, target, self._moved, self._moved_at, self.relaxed)
            return EquiLMOutput(logits=None, loss=loss)
        if h is not None:
            self.head_path = "fused"
            logits = self._fused_average(head, rows.expand(h).unflatten(0, (order, batch)))
        else:
            self.head_path = "full"
            logits = self._average(rows.expand(out.logits), batch)
        loss = None
        if labels is not None:  # next-token loss on the averaged logits, -100 ignored (HF convention)
            # Shift the labels, not the logits (as transformers' ForCausalLMLoss): no [B, T-1, V] copy.
            target = F.pad(labels[:, 1:], (0, 1), value=-100)
            flat = logits.flatten(0, 1)
            loss = F.cross_entropy(flat if flat.dtype in (torch.float32, torch.float64) else flat.float(),
                                   target.flatten(), ignore_index=-100)
        return EquiLMOutput(logits=logits if return_logits else None, loss=loss)

    def generate(self, input_ids: torch.Tensor, generation_config=None, logits_processor=None, stopping_criteria=None,
                 streamer=None, *, generator: Optional[torch.Generator] = None, sampler: str = "multinomial", **kwargs):
        """transformers' ``generate`` on the group-averaged logits: the same
        arguments with the same meaning (a ``GenerationConfig``, its fields as
        kwargs: ``max_new_tokens``, ``min_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``eos_token_id``, ``pad_token_id``,
        ``num_beams``, ``num_return_sequences``, ``return_dict_in_generate``,
        …; ``attention_mask``; a ``LogitsProcessorList``, a
        ``StoppingCriteriaList``, a streamer), the same defaults (the backbone's
        ``generation_config``, else transformers'), and the tokens transformers'
        generate gives on a model whose forward returns EquiLM's logits. The
        KV cache is group-batched: one backbone step per new token for the whole
        group (lm_generate.py has the design). Needs transformers.

        ``generator`` (with ``do_sample``): the draws come from it instead of
        torch's global generator. ``sampler="orbit"`` (with ``do_sample``)
        samples by Gumbel-max with the noise indexed through the group, so that
        sampling is equivariant path by path, not only in distribution: with
        the same generator seed, generate(perms[k][ids]) == perms[k][generate(ids)]
        for every context that no group element other than the identity fixes
        (one holding a moved token, for a group of swaps); same distribution
        as "multinomial". Row b's noise is drawn on the representative of its
        context's orbit (the lexicographically smallest of its |G| transforms)
        and carried to the row's own frame by the element that maps it there,
        so paired prompts (man / woman) share their random numbers: a
        comparison between them has no sampling noise left. One host sync per
        token. Neither applies to beam sampling (num_beams > 1 with do_sample).
        With either, ``output_scores`` shows the drawn token's score as 0 and
        every other as -inf.

        Equivariance, generate(perms[k][ids]) == perms[k][generate(ids)]: greedy
        and beam search, with any processor that commutes with a vocabulary
        permutation — temperature, top-k, top-p, repetition penalty, n-gram
        bans — and with eos ids, min length, bad words, suppressed or forced
        tokens only when the group maps those token sets to themselves (eos ids
        fixed by the group; a bad-words list holding "man" but not "woman" is
        not equivariant). Exact ties break it: a context that the group fixes
        gives equal logits to the tokens of each cycle, and argmax takes the
        lowest id."""
        from .lm_generate import generate  # transformers is needed for generation only

        return generate(self, input_ids, generation_config, logits_processor, stopping_criteria, streamer,
                        generator, sampler, **kwargs)

    @staticmethod
    def _check_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], method: str) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"EquiLM.{method}: input_ids must be a tensor of shape [B, T] with B >= 1, got {shape}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"EquiLM.{method}: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
