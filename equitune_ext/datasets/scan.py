"""SCAN (Lake & Baroni, ICML 2018, https://github.com/brendenlake/SCAN),
generated from its phrase-structure grammar and interpretation rules.

    C -> S and S | S after S | S          "x1 and x2" -> x1 x2,  "x1 after x2" -> x2 x1
    S -> V twice | V thrice | V           "x twice" -> x x,      "x thrice" -> x x x
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump         walk -> I_WALK, ..., turn left -> I_TURN_LEFT

    "u left" -> I_TURN_LEFT u           "u opposite left" -> I_TURN_LEFT I_TURN_LEFT u
    "u around left" -> (I_TURN_LEFT u) x4, and "turn ..." drops the u (same for right).

34 phrases V, 3·34 = 102 phrases S and 102 + 2·102² = 20,910 commands, each
given once by ``load("all")``. The splits reproduce the line counts of the
public files (the lines themselves; the public files are shuffled, these are in
generation order). The rule behind each count, worked out from the grammar:

add_jump       test: every command containing "jump" except the bare "jump"
               (7,707 - 1 = 7,706). train: the 13,203 commands without "jump",
               plus the bare "jump" repeated 1,467 times, so that it makes up
               10% of the file (13,203 + 1,467 = 14,670).
add_turn_left  test: every command containing the phrase "turn left" (D -> turn
               left; "turn opposite left" and "turn around left" do not count)
               except the bare "turn left" (1,209 - 1 = 1,208). train: the 19,701
               other commands plus "turn left" repeated 2,189 times, again 10%
               of the file (19,701 + 2,189 = 21,890).
around_right   (the template split of Loula, Baroni & Lake 2018.) train: every
               command without "around right" (20,910 - 5,685 = 15,225). test:
               the commands with "<walk|look|run|jump> around right" and without
               "turn around right" (4,476). The 1,209 commands containing "turn
               around right" are in neither file. (Checked against the
               alternatives: all 5,685 "around right" commands, or the 4,620 with
               "<primitive> around right" whatever else they contain, miss 4,476.)
length         train: commands whose action sequence has at most 22 actions
               (16,990); test: the 3,920 longer ones (24 to 48 actions; no
               command has 23).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

__all__ = ["SPLITS", "SUBSETS", "SYMMETRIES", "load", "all_commands", "token_groups"]

SPLITS = ("all", "add_jump", "add_turn_left", "around_right", "length")
SUBSETS = ("train", "test")

PRIMITIVES = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURNS = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
# Share of the add-primitive train files taken by copies of the bare primitive.
BARE_PRIMITIVE_SHARE = 0.10
LENGTH_SPLIT_MAX_TRAIN_ACTIONS = 22

Pair = Tuple[str, str]

# Word swaps that map the task onto itself, as (command cycles, action cycles), for
# EquiSeq2Seq: the swap carries the held-out primitive or phrase onto one seen in training.
SYMMETRIES = {
    "add_jump": ([["jump", "run"]], [["I_JUMP", "I_RUN"]]),
    "add_turn_left": ([["left", "right"]], [["I_TURN_LEFT", "I_TURN_RIGHT"]]),
    "around_right": ([["left", "right"]], [["I_TURN_LEFT", "I_TURN_RIGHT"]]),
}


def _phrases_v() -> List[Tuple[str, List[str]]]:
    """The 34 phrases V with their action sequences."""
    phrases = [(u, [a]) for u, a in PRIMITIVES.items()]
    for direction, turn in TURNS.items():
        # D[1] is a primitive U or "turn" (which contributes no action of its own).
        for u, actions in [("turn", [])] + [(u, [a]) for u, a in PRIMITIVES.items()]:
            phrases.append((f"{u} {direction}", [turn] + actions if actions else [turn]))
            phrases.append((f"{u} opposite {direction}", [turn, turn] + actions))
            phrases.append((f"{u} around {direction}", ([turn] + actions) * 4 if actions else [turn] * 4))
    return phrases


@functools.lru_cache(maxsize=None)
def all_commands() -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """Every command once, with its action sequence as a tuple (cached)."""
    phrases_s = []
    for v, actions in _phrases_v():
        phrases_s += [(v, actions), (f"{v} twice", actions * 2), (f"{v} thrice", actions * 3)]
    commands = [(s, tuple(a)) for s, a in phrases_s]
    for s1, a1 in phrases_s:
        for s2, a2 in phrases_s:
            commands.append((f"{s1} and {s2}", tuple(a1 + a2)))
            commands.append((f"{s1} after {s2}", tuple(a2 + a1)))
    return tuple(commands)


def _has_phrase(command: str, phrase: str) -> bool:
    return f" {phrase} " in f" {command} "


def _add_primitive(commands: List[Pair], primitive: str) -> Dict[str, List[Pair]]:
    bare = next(p for p in commands if p[0] == primitive)
    others = [p for p in commands if not _has_phrase(p[0], primitive)]
    test = [p for p in commands if _has_phrase(p[0], primitive) and p[0] != primitive]
    # copies / (len(others) + copies) = 10%  =>  copies = len(others) / 9.
    copies = round(len(others) * BARE_PRIMITIVE_SHARE / (1 - BARE_PRIMITIVE_SHARE))
    return {"train": others + [bare] * copies, "test": test}


@functools.lru_cache(maxsize=None)
def _splits() -> Dict[str, Dict[str, Tuple[Pair, ...]]]:
    commands = [(c, " ".join(a)) for c, a in all_commands()]
    lengths = {c: len(a) for c, a in all_commands()}
    primitive_around_right = [f"{u} around right" for u in PRIMITIVES]
    splits = {
        "add_jump": _add_primitive(commands, "jump"),
        "add_turn_left": _add_primitive(commands, "turn left"),
        "around_right": {
            "train": [p for p in commands if not _has_phrase(p[0], "around right")],
            "test": [p for p in commands
                     if any(_has_phrase(p[0], x) for x in primitive_around_right)
                     and not _has_phrase(p[0], "turn around right")],
        },
        "length": {
            "train": [p for p in commands if lengths[p[0]] <= LENGTH_SPLIT_MAX_TRAIN_ACTIONS],
            "test": [p for p in commands if lengths[p[0]] > LENGTH_SPLIT_MAX_TRAIN_ACTIONS],
        },
    }
    out = {name: {k: tuple(v) for k, v in parts.items()} for name, parts in splits.items()}
    out["all"] = {"all": tuple(commands)}
    return out


def load(split: str, subset: str = "train") -> List[Pair]:
    """(command, actions) pairs of a SCAN split, e.g. ("jump twice", "I_JUMP I_JUMP").

    split: "all" (every command once; ``subset`` is ignored), "add_jump",
    "add_turn_left", "around_right" or "length"; subset: "train" or "test".
    Returns a new list each call (the generated data are cached).
    """
    if split not in SPLITS:
        raise ValueError(f"scan.load: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "all":
        return list(_splits()["all"]["all"])
    if subset not in SUBSETS:
        raise ValueError(f"scan.load: unknown subset {subset!r} for split {split!r}; expected 'train' or 'test'")
    return list(_splits()[split][subset])


def token_groups(split: str, in_vocab, out_vocab):
    """(in_group, out_group) TokenGroups of the split's symmetry over the given
    vocabularies (``equitune_ext.examples.seq2seq_model.Vocab``): for add_jump jump<->run with
    I_JUMP<->I_RUN; for add_turn_left and around_right left<->right with
    I_TURN_LEFT<->I_TURN_RIGHT. ValueError naming a word missing from a vocabulary."""
    if split not in SYMMETRIES:
        raise ValueError(f"scan.token_groups: no symmetry defined for split {split!r}; "
                         f"expected one of {', '.join(SYMMETRIES)}")
    in_cycles, out_cycles = SYMMETRIES[split]
    return in_vocab.token_group(in_cycles), out_vocab.token_group(out_cycles)
