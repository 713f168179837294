"""EquiSeq2Seq: equi-tuning of a sequence-to-sequence model over token groups.

Element k of the group acts on source tokens by ``in_group.perms[k]`` and on
target tokens by ``out_group.perms[k]``; the decoder's log-probabilities are
averaged over the group,

    logp_G(y_t | x, y_<t)[v] = (1/|G|) Σ_k logp(· | π_k x, π_k y_<t)[π_k v]

(``group_average(logp, out_group)``: copy k predicts the transformed target
π_k y_t, so the score of token v is that copy's score of π_k v). Greedy
decoding feeds copy k the transformed choice π_k ŷ, so that

    decode(π_k x) == π_k decode(x)

as long as argmax meets no exact tie (see ``EquiSeq2Seq``).

The wrapped model is an ``EncoderDecoder`` over ids with the special tokens
PAD, SOS, EOS below, such as the SCAN baseline in
``equitune_ext.examples.seq2seq_model``.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import group_average, group_transform
from .token_groups import TokenGroup

__all__ = ["EncoderDecoder", "EquiSeq2Seq", "PAD", "SOS", "EOS"]

# The ids greedy decoding starts from, stops at and pads with; the groups must fix them.
PAD, SOS, EOS = 0, 1, 2


class EncoderDecoder(nn.Module):
    """A model over ``encode(src [N, S], lengths [N]) -> (state, memory)`` and
    ``decode(tgt_in [N, T], state, memory) -> (log-probs [N, T, V], state)``,
    with ``src_vocab_size`` and ``tgt_vocab_size``.

    forward(src, lengths, tgt_in) -> log-probs [N, T, V] (teacher forcing:
    tgt_in is <sos> followed by the target shifted right)."""

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        state, memory = self.encode(src, lengths)
        return self.decode(tgt_in, state, memory)[0]

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, lengths: torch.Tensor, max_len: int = 60) -> torch.Tensor:
        """Output ids [B, ≤ max_len]: each row up to and including its <eos>, then <pad>."""
        state, memory = self.encode(src, lengths)
        tokens = torch.full((src.shape[0], 1), SOS, dtype=torch.int64, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            logp, state = self.decode(tokens, state, memory)
            nxt = logp[:, -1].argmax(-1).masked_fill(done, PAD)
            out.append(nxt)
            done |= nxt == EOS
            if bool(done.all()):
                break
            tokens = nxt[:, None]
        return torch.stack(out, 1) if out else src.new_empty(src.shape[0], 0)


class EquiSeq2Seq(EncoderDecoder):
    """Equi-tuned EncoderDecoder: element k acts on sources by ``in_group.perms[k]``
    and on targets by ``out_group.perms[k]`` (same |G|, same element order).

    Every call runs the wrapped model once on the |G|·B transformed rows
    (``group_transform``) and averages the log-probs back with
    ``group_average(logp, out_group)``. Teacher-forced training feeds copy k
    π_k x and π_k y_<t and scores the averaged log-probs against y. Since every
    copy's log-probs are normalized, the negative log-likelihood is the mean
    over the group of the plain model's on the transformed pairs.

    ``greedy_decode`` makes one encoder call and one decoder call per step on
    the |G|·B rows and is equivariant except at an exact tie: a source and
    prefix that the group fixes give e.g. I_JUMP and I_RUN the same averaged
    score, argmax then takes the lower id, and no choice there is equivariant.
    """

    def __init__(self, model: EncoderDecoder, in_group: TokenGroup, out_group: TokenGroup):
        super().__init__()
        for name, g in (("in_group", in_group), ("out_group", out_group)):
            if not isinstance(g, TokenGroup):
                raise TypeError(f"EquiSeq2Seq: {name} must be a TokenGroup, got {type(g).__name__}")
        if len(in_group) != len(out_group):
            raise ValueError(f"EquiSeq2Seq: in_group and out_group must have the same order, got "
                             f"{len(in_group)} and {len(out_group)}")
        specials = torch.tensor([PAD, SOS, EOS])
        for name, g, size in (("in_group", in_group, model.src_vocab_size),
                              ("out_group", out_group, model.tgt_vocab_size)):
            if g.vocab_size != size:
                raise ValueError(f"EquiSeq2Seq: {name} acts on {g.vocab_size} tokens but the model's vocabulary has {size}")
            if not torch.equal(g.perms[:, specials], specials.expand(len(g), 3)):
                raise ValueError(f"EquiSeq2Seq: {name} must fix <pad>, <sos> and <eos> (ids 0, 1, 2)")
        self.model, self.in_group, self.out_group = model, in_group, out_group
        self.src_vocab_size, self.tgt_vocab_size = model.src_vocab_size, model.tgt_vocab_size

    def encode(self, src: torch.Tensor, lengths: torch.Tensor):
        """The wrapped model's (state, memory) of the |G|·B transformed sources."""
        return self.model.encode(group_transform(src, self.in_group), lengths.repeat(len(self.in_group)))

    def decode(self, tgt_in: torch.Tensor, state, memory):
        """tgt_in [B, T] in the untransformed frame: copy k is fed π_k(tgt_in);
        the averaged log-probs [B, T, V] and the |G|·B rows' state."""
        logp, state = self.model.decode(group_transform(tgt_in, self.out_group), state, memory)
        return group_average(logp, self.out_group), state
