"""The SCAN baseline: ``Seq2Seq``, a bidirectional RNN encoder (cell "rnn", "gru"
or "lstm") and an attention decoder (Luong et al. 2015, "general" score), with
its vocabulary, padding and loss. With input feeding (the default) the decoder
RNN also reads the previous step's attentional vector, so it knows what it last
attended to; teacher forcing is then one RNN step per target token.
``input_feeding=False`` makes teacher forcing one RNN call over the whole
target, but generalizes worse on SCAN's Around Right (the decoder loses count of
repeated sub-sequences whose direction words it has never seen mixed).

Equi-tune it with ``equitune_ext.EquiSeq2Seq``.
"""
from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from equitune_ext import seq2seq
from equitune_ext.token_groups import TokenGroup

__all__ = ["Vocab", "Seq2Seq", "DecoderState", "Memory", "pad_sequences", "sequence_nll", "CELLS"]

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class Vocab:
    """Words <-> ids. Ids 0, 1, 2 are <pad>, <sos>, <eos>; the words follow in sorted order."""

    PAD, SOS, EOS = seq2seq.PAD, seq2seq.SOS, seq2seq.EOS
    SPECIALS = ("<pad>", "<sos>", "<eos>")

    def __init__(self, words: Iterable[str]):
        self.itos: List[str] = list(self.SPECIALS) + sorted(set(words) - set(self.SPECIALS))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_sentences(cls, sentences: Iterable[str]) -> "Vocab":
        return cls(w for s in sentences for w in s.split())

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {' '.join(self.itos)})"

    def index(self, word: str) -> int:
        if word not in self.stoi:
            raise ValueError(f"Vocab: word {word!r} is not in the vocabulary ({' '.join(self.itos[3:])})")
        return self.stoi[word]

    def encode(self, sentence: str) -> List[int]:
        """Word ids of a space-separated sentence, followed by <eos>."""
        return [self.index(w) for w in sentence.split()] + [self.EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """The words up to the first <eos>; <pad> and <sos> are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i not in (self.PAD, self.SOS):
                words.append(self.itos[i])
        return " ".join(words)

    def token_group(self, cycles: Sequence[Sequence[str]]) -> TokenGroup:
        """TokenGroup.from_cycles over this vocabulary from cycles of words,
        e.g. [["jump", "run"]]; ValueError naming any word not in the vocabulary."""
        return TokenGroup.from_cycles(len(self), [[self.index(w) for w in cycle] for cycle in cycles])


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int = Vocab.PAD) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, max_len] (int64) and the lengths [N]."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    ids = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
    return ids, lengths


def sequence_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of targets [N, T] under logp [N, T, V], <pad> ignored."""
    return F.nll_loss(logp.flatten(0, 1), targets.flatten(), ignore_index=Vocab.PAD)


class Memory(NamedTuple):
    """What the decoder attends to: encoder outputs [N, S, 2H], their projection
    for the attention scores [N, S, H], and the padding mask [N, S] (True = real token)."""

    values: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor


class DecoderState(NamedTuple):
    """The decoder's recurrent state (h, or (h, c) for an LSTM; [1, N, H]) and,
    with input feeding, the last attentional vector [N, H] (None without)."""

    rnn: object
    feed: Optional[torch.Tensor]


class Seq2Seq(seq2seq.EncoderDecoder):
    """Bidirectional encoder + attention decoder over id sequences (``forward``
    and ``greedy_decode``: EncoderDecoder's). ``hidden`` is the size of each
    encoder direction and of the decoder; ``input_feeding``: see the module docstring.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, cell: str = "gru", hidden: int = 64,
                 embedding: int = 64, dropout: float = 0.1, input_feeding: bool = True):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"Seq2Seq: cell must be one of {', '.join(CELLS)}, got {cell!r}")
        if not isinstance(input_feeding, bool):
            raise TypeError(f"Seq2Seq: input_feeding must be a bool, got {input_feeding!r}")
        if hidden < 1 or embedding < 1:
            raise ValueError(f"Seq2Seq: hidden and embedding must be >= 1, got {hidden} and {embedding}")
        self.cell, self.hidden, self.input_feeding = cell, hidden, input_feeding
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        rnn = CELLS[cell]
        self.src_embedding = nn.Embedding(src_vocab_size, embedding, padding_idx=Vocab.PAD)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding, padding_idx=Vocab.PAD)
        self.encoder = rnn(embedding, hidden, batch_first=True, bidirectional=True)
        self.decoder = rnn(embedding + hidden * input_feeding, hidden, batch_first=True)
        # The decoder starts from the encoder's two final states (h, and c for an LSTM) through a tanh layer.
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.attention_keys = nn.Linear(2 * hidden, hidden, bias=False)
        self.combine = nn.Linear(3 * hidden, hidden)
        self.output = nn.Linear(hidden, tgt_vocab_size)
        self.dropout = nn.Dropout(dropout)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor):
        """(DecoderState, Memory) for src [N, S] with lengths [N]."""
        emb = self.dropout(self.src_embedding(src))
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, final = self.encoder(packed)
        values, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.shape[1])
        # final: [2 (directions), N, H] (a pair (h, c) for an LSTM) -> [1, N, H]
        bridge = lambda s: torch.tanh(self.bridge(torch.cat([s[0], s[1]], -1)))[None]
        rnn_state = tuple(bridge(s) for s in final) if self.cell == "lstm" else bridge(final)
        feed = values.new_zeros(src.shape[0], self.hidden) if self.input_feeding else None
        mask = torch.arange(src.shape[1], device=src.device)[None] < lengths.to(src.device)[:, None]
        return DecoderState(rnn_state, feed), Memory(values, self.attention_keys(values), mask)

    def attend(self, hiddens: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Attentional vectors [N, T, H] of decoder outputs [N, T, H]."""
        scores = torch.bmm(hiddens, memory.keys.transpose(1, 2))                  # [N, T, S]
        scores = scores.masked_fill(~memory.mask[:, None, :], float("-inf"))
        context = torch.bmm(scores.softmax(-1), memory.values)                    # [N, T, 2H]
        return torch.tanh(self.combine(torch.cat([hiddens, context], -1)))

    def decode(self, tgt_in: torch.Tensor, state: DecoderState, memory: Memory):
        """Log-probs [N, T, V] of the next tokens after each of tgt_in [N, T], and the final DecoderState."""
        emb = self.dropout(self.tgt_embedding(tgt_in))
        rnn_state, feed = state
        if not self.input_feeding:
            hiddens, rnn_state = self.decoder(emb, rnn_state)
            combined = self.attend(hiddens, memory)
        else:  # step by step: each step reads the attentional vector of the one before
            steps = []
            for t in range(tgt_in.shape[1]):
                hidden, rnn_state = self.decoder(torch.cat([emb[:, t : t + 1], feed[:, None]], -1), rnn_state)
                steps.append(self.attend(hidden, memory))
                feed = steps[-1][:, 0]
            combined = torch.cat(steps, 1) if steps else emb.new_zeros(*tgt_in.shape, self.hidden)
        return self.output(self.dropout(combined)).log_softmax(-1), DecoderState(rnn_state, feed)
