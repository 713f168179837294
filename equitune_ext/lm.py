"""EquiLM: equi-tuning of a causal language model over a token group.

    logits_G(ids) = (1/|G|) Σ_k Γ(k)⁻¹ LM(Γ(k) ids)      (the paper averages logits)

with Γ(k) ids = perms[k][ids] and (Γ(k)⁻¹ s)[v] = s[perms[k][v]] on scores.
One batched backbone call on the transformed rows; generation keeps a KV cache
for every row, each with its own transformed context, and feeds row k the k-th
transform of the chosen token, so one backbone step per new token serves the
whole group. R-EquiLM (``relaxed=`` ids): those tokens' logits come from the
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
import inspect
import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

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

    def _rows(self, input_ids: torch.Tensor) -> _Rows:
        # Which prompts hold a moved token (padding included: its logits differ
        # between the copies); one host sync to lay the rows out. An exported
        # graph cannot depend on the ids' values: there every copy has its own
        # row (the same logits, shared rows only save work).
        split = None if torch.compiler.is_exporting() else self._is_moved[input_ids].any(1)
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

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 attention_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 sampler: str = "multinomial") -> torch.Tensor:
        """The prompt followed by up to ``max_new_tokens`` new tokens (as HF
        generate returns), decoded from the group-averaged logits with a KV cache.

        ``sampler="orbit"`` (with ``do_sample``) samples by Gumbel-max with the
        noise indexed through the group, so that sampling is equivariant path
        by path, not only in distribution: with the same generator seed,
        generate(perms[k][ids]) == perms[k][generate(ids)] for every context
        that no group element other than the identity fixes (one holding a
        moved token, for a group of swaps); same distribution as "multinomial".
        Row b's noise is drawn on the representative of its context's orbit
        (the lexicographically smallest of its |G| transforms) and carried to
        the row's own frame by the element that maps it there, so paired
        prompts (man / woman) share their random numbers: a comparison between
        them has no sampling noise left. One host sync per token.

        With ``eos_token_id`` (an id or a list of ids), a row that has produced
        one continues with ``pad_token_id`` (default: the first eos id), and
        generation stops once every row has (checking that costs one host sync
        per token on a GPU, as in HF generate). Keep eos ids fixed by the group,
        or a transformed prompt may stop at another step.

        Greedy decoding is equivariant, generate(perms[k][ids]) ==
        perms[k][generate(ids)], except at exact ties: a context that the
        group fixes gives equal logits to the tokens of each cycle, and argmax
        then takes the lowest id."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filtering), got {top_k}")
        if top_p is not None and not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if sampler not in ("multinomial", "orbit"):
            raise ValueError(f"sampler must be 'multinomial' or 'orbit', got {sampler!r}")
        self._check_ids(input_ids, attention_mask, "generate")
        if input_ids.shape[1] == 0:
            raise ValueError("EquiLM.generate: the prompts are empty (input_ids of shape [B, 0]); give at least one token")
        eos, pad = self._stop_tokens(eos_token_id, pad_token_id, input_ids.device)
        batch, order = input_ids.shape[0], self.group.order
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # [B, L], per prompt
        ids = group_transform(input_ids, self.group)
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        head = self._fusable_head()
        rows = self._rows(input_ids)
        while True:
            row_mask = rows.prompt_of_row(mask)
            out, h = self._call(head, True, input_ids=rows.pick(ids), attention_mask=row_mask,
                                position_ids=self._positions(row_mask), use_cache=True)
            head = head if h is not None else None
            if not rows.single or _splittable(getattr(out, cache_arg, None)):
                break
            rows = _Rows(None, order, batch)  # a cache we cannot split: no sharing
        self.head_path = "full" if head is None else "fused"
        tokens = []
        for step in range(max_new_tokens):
            if head is not None:
                scores = self._fused_average(head, rows.expand(h[:, -1]).unflatten(0, (order, batch))).float()
            else:
                scores = self._average(rows.expand(out.logits[:, -1, :]), batch).float()
            to_representative = None
            if do_sample and sampler == "orbit":
                context = torch.cat([input_ids, torch.stack(tokens, 1).to(input_ids.dtype)], 1) if tokens else input_ids
                to_representative = self._orbit_elements(context, mask)
            nxt = self._choose(scores, do_sample, temperature, top_k, top_p, generator, to_representative)
            if eos is not None:  # finished rows continue with padding
                nxt = torch.where(finished, pad, nxt)
                finished |= torch.isin(nxt, eos)
            tokens.append(nxt)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            cache = getattr(out, cache_arg)
            if rows.single:  # a shared prompt that gets a moved token splits into |G| rows (one host sync per token)
                which = rows.is_single & self._is_moved[nxt]
                if bool(which.any()):
                    cache = _select_cache(cache, rows.split(which))
            # nxt indexes the averaged logits, whose last dim is the group's
            # vocabulary (group_average checked it), so its ids are in range: a
            # gather of the tables, without group_transform's id range check,
            # which on a GPU waits for the step to finish (min/max to the host).
            new_ids = rows.pick(self.group.tables(nxt.device)[:, nxt].reshape(-1, 1))  # copy k: perms[k][nxt]
            row_mask = rows.prompt_of_row(mask)
            out, h = self._call(head, False, input_ids=new_ids, attention_mask=row_mask,
                                position_ids=self._positions(row_mask)[:, -1:], use_cache=True, **{cache_arg: cache})
        new = torch.stack(tokens, dim=1) if tokens else input_ids.new_empty(batch, 0)
        return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)

    @staticmethod
    def _check_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], method: str) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"EquiLM.{method}: input_ids must be a tensor of shape [B, T] with B >= 1, got {shape}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"EquiLM.{method}: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")

    def _stop_tokens(self, eos_token_id, pad_token_id, device):
        """(eos ids, pad id) as tensors on device, checked; (None, None) without eos."""
        if eos_token_id is None:
            if pad_token_id is not None:
                raise ValueError("pad_token_id needs eos_token_id: only rows that produced an eos token are padded")
            return None, None
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.flatten().tolist()
        eos = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
        if not eos:
            raise ValueError("eos_token_id: expected an id or a non-empty list of ids, got an empty list")
        eos = [self._token_id("eos_token_id", t) for t in eos]
        pad = eos[0] if pad_token_id is None else self._token_id("pad_token_id", pad_token_id)
        return torch.tensor(eos, device=device), torch.tensor(pad, device=device)

    def _token_id(self, name: str, t) -> int:
        try:
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"{name}: expected an integer token id, got {t!r}") from None
        if not 0 <= t < self.group.vocab_size:
            raise ValueError(f"{name} {t} is out of range [0, {self.group.vocab_size})")
        return t

    def _orbit_elements(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B] indices k such that perms[k] maps row b's context (its real
        tokens) to the lexicographically smallest of its |G| transforms."""
        perms = self.group.tables(context.device)
        seqs = perms[:, context].masked_fill(mask == 0, -1).transpose(0, 1)  # [B, |G|, T]: transform k of each row
        candidates = torch.ones(seqs.shape[:2], dtype=torch.bool, device=context.device)
        differing = (seqs != seqs[:, :1]).any(1).any(0)  # positions where some transform differs
        for t in differing.nonzero().flatten().tolist():  # lexicographic: the first differing position decides
            vals = seqs[:, :, t].masked_fill(~candidates, self.group.vocab_size)
            candidates &= vals == vals.min(1, keepdim=True).values
        return candidates.int().argmax(1)  # the first of the elements that tie (those fixing the context)

    def _choose(self, scores, do_sample, temperature, top_k, top_p, generator, to_representative=None) -> torch.Tensor:
        if not do_sample:
            return scores.argmax(-1)
        scores = scores / temperature
        if top_k:  # None or 0: off, as in HF generate
            kth = torch.topk(scores, min(int(top_k), scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None:
            sorted_scores, order = scores.sort(-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        if to_representative is None:
            return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
        # Gumbel-max: argmax(scores + Gumbel noise) is a sample of softmax(scores). Token v of row b
        # takes the noise of its image perms[k_b][v] in the representative's frame.
        gumbel = -torch.empty_like(scores).exponential_(generator=generator).log()
        return (scores + gumbel.gather(1, self.group.tables(scores.device)[to_representative])).argmax(-1)
