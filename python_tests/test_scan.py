"""SCAN: the generated dataset, the seq2seq models, EquiSeq2Seq and the example."""
import os

import pytest
import torch

from equitune_ext import EquiSeq2Seq
from equitune_ext.datasets import scan
from equitune_ext.examples import scan as scan_example
from equitune_ext.examples.seq2seq_model import Seq2Seq, Vocab, pad_sequences, sequence_nll

# Line counts of the public files (github.com/brendenlake/SCAN and Loula et al.'s template split).
PUBLIC_COUNTS = {
    ("add_jump", "train"): 14670,
    ("add_jump", "test"): 7706,
    ("add_turn_left", "train"): 21890,
    ("add_turn_left", "test"): 1208,
    ("around_right", "train"): 15225,
    ("around_right", "test"): 4476,
    ("length", "train"): 16990,
    ("length", "test"): 3920,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: a second thread gains nothing and, on a busy machine, spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocabs():
    return scan_example.vocabularies()


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------

def test_all_commands_are_distinct():
    pairs = scan.load("all")
    assert len(pairs) == 20910
    assert len({c for c, _ in pairs}) == 20910
    assert scan.load("all", "test") == pairs  # subset is ignored for "all"


@pytest.mark.parametrize("split,subset", sorted(PUBLIC_COUNTS))
def test_split_sizes_match_the_public_files(split, subset):
    assert len(scan.load(split, subset)) == PUBLIC_COUNTS[split, subset]


@pytest.mark.parametrize("command,actions", [
    ("jump", "I_JUMP"),
    ("jump twice", "I_JUMP I_JUMP"),
    ("turn left", "I_TURN_LEFT"),
    ("turn around left", "I_TURN_LEFT I_TURN_LEFT I_TURN_LEFT I_TURN_LEFT"),
    ("turn opposite right", "I_TURN_RIGHT I_TURN_RIGHT"),
    ("look left", "I_TURN_LEFT I_LOOK"),
    ("run around right", "I_TURN_RIGHT I_RUN I_TURN_RIGHT I_RUN I_TURN_RIGHT I_RUN I_TURN_RIGHT I_RUN"),
    ("walk opposite right thrice after run",
     "I_RUN I_TURN_RIGHT I_TURN_RIGHT I_WALK I_TURN_RIGHT I_TURN_RIGHT I_WALK I_TURN_RIGHT I_TURN_RIGHT I_WALK"),
    ("walk and jump opposite left twice", "I_WALK I_TURN_LEFT I_TURN_LEFT I_JUMP I_TURN_LEFT I_TURN_LEFT I_JUMP"),
    # Lines of the public add_turn_left test file:
    ("turn left after jump twice", "I_JUMP I_JUMP I_TURN_LEFT"),
    ("turn left twice after look opposite left twice",
     "I_TURN_LEFT I_TURN_LEFT I_LOOK I_TURN_LEFT I_TURN_LEFT I_LOOK I_TURN_LEFT I_TURN_LEFT"),
])
def test_sample_lines(command, actions):
    assert dict(scan.load("all"))[command] == actions


def test_add_primitive_splits_hold_out_the_primitive():
    train, test = scan.load("add_jump", "train"), scan.load("add_jump", "test")
    with_jump = [c for c, _ in train if "jump" in c.split()]
    assert set(with_jump) == {"jump"} and len(with_jump) == len(train) // 10  # the bare primitive: 10% of the file
    assert all("jump" in c.split() and c != "jump" for c, _ in test)
    assert {c for c, _ in train}.isdisjoint(c for c, _ in test)
    turn_train = scan.load("add_turn_left", "train")
    assert sum(c == "turn left" for c, _ in turn_train) == len(turn_train) // 10
    assert not any(" turn left" in f" {c} " and c != "turn left" for c, _ in turn_train)


def test_around_right_and_length_splits():
    train, test = scan.load("around_right", "train"), scan.load("around_right", "test")
    assert not any("around right" in c for c, _ in train)
    assert all("around right" in c and "turn around right" not in c for c, _ in test)
    assert any("around left" in c for c, _ in train) and any("right" in c.split() for c, _ in train)
    assert max(len(a.split()) for _, a in scan.load("length", "train")) == 22
    assert min(len(a.split()) for _, a in scan.load("length", "test")) == 24


def test_bad_split_or_subset():
    with pytest.raises(ValueError, match="unknown split 'simple'"):
        scan.load("simple")
    with pytest.raises(ValueError, match="unknown subset 'dev'"):
        scan.load("add_jump", "dev")


def test_load_returns_a_fresh_list():
    pairs = scan.load("add_jump", "test")
    pairs.clear()
    assert len(scan.load("add_jump", "test")) == 7706


# ---------------------------------------------------------------------------
# Vocabularies and groups
# ---------------------------------------------------------------------------

def test_vocab_round_trip(vocabs):
    in_vocab, out_vocab = vocabs
    assert len(in_vocab) == 3 + 13 and len(out_vocab) == 3 + 6
    ids = out_vocab.encode("I_TURN_LEFT I_JUMP")
    assert ids[-1] == Vocab.EOS and out_vocab.decode(ids + [Vocab.PAD]) == "I_TURN_LEFT I_JUMP"


def test_missing_word_error(vocabs):
    in_vocab, _ = vocabs
    with pytest.raises(ValueError, match="'hop' is not in the vocabulary"):
        in_vocab.token_group([["jump", "hop"]])
    walk_only = Vocab(["walk", "run"])
    with pytest.raises(ValueError, match="'jump' is not in the vocabulary"):
        scan.token_groups("add_jump", walk_only, vocabs[1])
    with pytest.raises(ValueError, match="no symmetry defined for split 'length'"):
        scan.token_groups("length", *vocabs)


def test_scan_groups_swap_the_right_tokens(vocabs):
    in_vocab, out_vocab = vocabs
    in_group, out_group = scan.token_groups("add_jump", in_vocab, out_vocab)
    assert in_group.act(torch.tensor(in_vocab.encode("jump after run")), 1).tolist() == in_vocab.encode("run after jump")
    assert out_group.act(torch.tensor(out_vocab.encode("I_JUMP I_WALK")), 1).tolist() == out_vocab.encode("I_RUN I_WALK")


def test_equi_seq2seq_checks_its_groups(vocabs):
    in_vocab, out_vocab = vocabs
    in_group, out_group = scan.token_groups("add_jump", in_vocab, out_vocab)
    model = Seq2Seq(len(in_vocab), len(out_vocab))
    with pytest.raises(ValueError, match="acts on 9 tokens"):
        EquiSeq2Seq(model, out_group, out_group)
    with pytest.raises(TypeError, match="must be a TokenGroup"):
        EquiSeq2Seq(model, "c4", out_group)
    swaps_eos = in_vocab.token_group([["<eos>", "walk"]])
    with pytest.raises(ValueError, match="must fix <pad>, <sos> and <eos>"):
        EquiSeq2Seq(model, swaps_eos, out_group)


# ---------------------------------------------------------------------------
# Models and equivariance
# ---------------------------------------------------------------------------

def _batch(pairs, vocabs):
    return scan_example.encode(pairs, *vocabs)


def _sample(split, subset, n, seed=0):
    pairs = scan.load(split, subset)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n]
    return [pairs[i] for i in idx]


def _equi_model(split, cell, vocabs, seed=0, hidden=32):
    torch.manual_seed(seed)
    model = Seq2Seq(len(vocabs[0]), len(vocabs[1]), cell=cell, hidden=hidden, embedding=hidden)
    return EquiSeq2Seq(model, *scan.token_groups(split, *vocabs)).eval()


def _assert_decoding_is_equivariant(equi, data):
    out = equi.greedy_decode(data.src, data.src_lengths)
    moved = equi.greedy_decode(equi.in_group.act(data.src, 1), data.src_lengths)
    assert out.shape[1] > 1
    assert torch.equal(moved, equi.out_group.act(out, 1))


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("split", ["add_jump", "around_right"])
def test_greedy_decoding_is_exactly_equivariant_untrained(split, cell, vocabs):
    # Test commands contain the moved words, so no source is fixed by the group (no exact ties).
    data = _batch(_sample(split, "test", 64), vocabs)
    equi = _equi_model(split, cell, vocabs)
    with torch.no_grad():  # an untrained model may stop at once; <eos> is fixed by the group, so this keeps it equivariant
        equi.model.output.bias[Vocab.EOS] = -1e4
    _assert_decoding_is_equivariant(equi, data)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_greedy_decoding_is_exactly_equivariant_trained(cell, vocabs):
    train = _batch(_sample("add_jump", "train", 256), vocabs)
    equi = _equi_model("add_jump", cell, vocabs, hidden=16)
    scan_example.train(equi, train, epochs=2, lr=1e-2, seed=0, desc="test", batch_size=64)
    data = _batch(_sample("add_jump", "test", 64, seed=1), vocabs)
    _assert_decoding_is_equivariant(equi.eval(), data)


def test_averaged_log_probs_are_equivariant_and_map_back_by_the_inverse(vocabs):
    equi = _equi_model("around_right", "gru", vocabs)
    data = _batch(_sample("around_right", "test", 16), vocabs)
    in_group, out_group = equi.in_group, equi.out_group
    with torch.no_grad():
        logp = equi(data.src, data.src_lengths, data.tgt_in)
        moved = equi(in_group.act(data.src, 1), data.src_lengths, out_group.act(data.tgt_in, 1))
        # The reference, one copy at a time: copy k sees π_k x, π_k y_<t and scores token v at π_k v.
        reference = sum(
            equi.model(in_group.act(data.src, k), data.src_lengths, out_group.act(data.tgt_in, k))[..., out_group.perms[k]]
            for k in range(len(out_group))) / len(out_group)
    torch.testing.assert_close(logp, reference, rtol=1e-5, atol=1e-5)
    # Equivariance: moving the inputs moves the scores, logp_G(π x)[π v] == logp_G(x)[v].
    torch.testing.assert_close(moved, out_group.act_logits(logp, 1), rtol=1e-5, atol=1e-5)
    mask = data.tgt_out != Vocab.PAD
    assert not torch.allclose(moved[mask], logp[mask])  # ... and it does move them


def test_equi_decoding_batches_the_group(vocabs, monkeypatch):
    equi = _equi_model("add_jump", "lstm", vocabs)
    data = _batch(_sample("add_jump", "test", 8), vocabs)
    calls = {"encode": [], "decode": []}
    for name in calls:
        original = getattr(equi.model, name)

        def counted(first, *rest, _name=name, _original=original):
            calls[_name].append(first.shape[0])
            return _original(first, *rest)

        monkeypatch.setattr(equi.model, name, counted)
    out = equi.greedy_decode(data.src, data.src_lengths, max_len=5)
    assert calls["encode"] == [2 * 8]
    assert calls["decode"] == [2 * 8] * out.shape[1]


@pytest.mark.parametrize("input_feeding", [True, False])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_teacher_forcing_matches_step_by_step_decoding(cell, input_feeding, vocabs):
    # One decode call over the whole target == one call per token carrying the state
    # (with input feeding, the state carries the attentional vector).
    torch.manual_seed(0)
    model = Seq2Seq(len(vocabs[0]), len(vocabs[1]), cell=cell, hidden=16, embedding=8,
                    input_feeding=input_feeding).eval()
    data = _batch(_sample("around_right", "test", 8), vocabs)
    with torch.no_grad():
        whole = model(data.src, data.src_lengths, data.tgt_in)
        state, memory = model.encode(data.src, data.src_lengths)
        steps = []
        for t in range(data.tgt_in.shape[1]):
            logp, state = model.decode(data.tgt_in[:, t : t + 1], state, memory)
            steps.append(logp)
    torch.testing.assert_close(whole, torch.cat(steps, 1), rtol=1e-5, atol=1e-6)
    assert (state.feed is not None) == input_feeding


def test_input_feeding_changes_the_decoder(vocabs):
    sizes = {flag: Seq2Seq(len(vocabs[0]), len(vocabs[1]), hidden=16, embedding=8, input_feeding=flag).decoder.input_size
             for flag in (True, False)}
    assert sizes == {True: 8 + 16, False: 8}
    with pytest.raises(TypeError, match="input_feeding must be a bool"):
        Seq2Seq(len(vocabs[0]), len(vocabs[1]), input_feeding=1)


def test_training_reduces_the_loss(vocabs):
    torch.manual_seed(0)
    data = _batch(_sample("add_jump", "train", 256), vocabs)
    model = Seq2Seq(len(vocabs[0]), len(vocabs[1]), cell="gru", hidden=32, embedding=32)

    def eval_loss():  # the training loss: NLL of the targets, <pad> ignored
        with torch.no_grad():
            return float(sequence_nll(model.eval()(data.src, data.src_lengths, data.tgt_in), data.tgt_out))

    before = eval_loss()
    losses = scan_example.train(model, data, epochs=3, lr=1e-2, seed=0, desc="test", batch_size=32)
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    assert eval_loss() < 0.6 * before


def test_pad_sequences():
    ids, lengths = pad_sequences([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]


def test_example_quick_mode_runs(tmp_path):
    summary, wall = scan_example.main(["--quick", "--out", str(tmp_path)])
    assert set(summary) == {"pretrained", "equi-tuned, zero-shot", "fine-tune", "equi-tune"}
    assert all(0.0 <= v <= 1.0 for values in summary.values() for v in values)
    assert os.path.getsize(tmp_path / "scan_add_jump_gru.png") > 0
    assert "| equi-tune |" in (tmp_path / "scan_add_jump_gru.md").read_text()


def test_example_first_seed(tmp_path):
    scan_example.main(["--quick", "--first-seed", "2", "--out", str(tmp_path)])
    assert "1 seed(s) from 2" in (tmp_path / "scan_add_jump_gru.md").read_text()
    with pytest.raises(SystemExit):
        scan_example.main(["--quick", "--first-seed", "-1", "--out", str(tmp_path)])
