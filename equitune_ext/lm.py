"""EquiLM: equi-tuning of a causal language model over a token group.

    logits_G(ids) = (1/|G|) Σ_k Γ(k)⁻¹ LM(Γ(k) ids)      (the paper averages logits)

with Γ(k) ids = perms[k][ids] and (Γ(k)⁻¹ s)[v] = s[perms[k][v]] on scores.
One batched backbone call on the |G|·B transformed rows; generation keeps a KV
cache for every row, each with its own transformed context, and feeds row k
the k-th transform of the chosen token, so one backbone step per new token
serves the whole group. R-EquiLM (``relaxed=`` ids): those tokens' logits come
from the identity element's stream alone; every other token's are averaged.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .ops import group_average, group_transform
from .token_groups import TokenGroup

__all__ = ["EquiLM", "EquiLMOutput"]


@dataclass
class EquiLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


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

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> EquiLMOutput:
        self._check_ids(input_ids, attention_mask, "forward")
        batch = input_ids.shape[0]
        ids = group_transform(input_ids, self.group)
        mask = None if attention_mask is None else attention_mask.repeat(self.group.order, 1)
        kwargs = {} if mask is None else {"attention_mask": mask, "position_ids": self._positions(mask)}
        logits = self._average(self.model(input_ids=ids, **kwargs).logits, batch)
        loss = None
        if labels is not None:  # next-token loss on the averaged logits, -100 ignored (HF convention)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return EquiLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 attention_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None) -> torch.Tensor:
        """The prompt followed by up to ``max_new_tokens`` new tokens (as HF
        generate returns), decoded from the group-averaged logits with a KV cache.

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
        self._check_ids(input_ids, attention_mask, "generate")
        if input_ids.shape[1] == 0:
            raise ValueError("EquiLM.generate: the prompts are empty (input_ids of shape [B, 0]); give at least one token")
        eos, pad = self._stop_tokens(eos_token_id, pad_token_id, input_ids.device)
        batch, order = input_ids.shape[0], self.group.order
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.repeat(order, 1)
        out = self.model(input_ids=group_transform(input_ids, self.group), attention_mask=mask,
                         position_ids=self._positions(mask), use_cache=True)
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        tokens = []
        for step in range(max_new_tokens):
            scores = self._average(out.logits[:, -1, :], batch).float()
            nxt = self._choose(scores, do_sample, temperature, top_k, top_p, generator)
            if eos is not None:  # finished rows continue with padding
                nxt = torch.where(finished, pad, nxt)
                finished |= torch.isin(nxt, eos)
            tokens.append(nxt)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            # nxt indexes the averaged logits, whose last dim is the group's
            # vocabulary (group_average checked it), so its ids are in range: a
            # gather of the tables, without group_transform's id range check,
            # which on a GPU waits for the step to finish (min/max to the host).
            new_ids = self.group.tables(nxt.device)[:, nxt].reshape(-1, 1)  # block k: perms[k][nxt]
            out = self.model(input_ids=new_ids, attention_mask=mask,
                             position_ids=self._positions(mask)[:, -1:], use_cache=True,
                             **{cache_arg: getattr(out, cache_arg)})
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

    @staticmethod
    def _choose(scores, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
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
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
