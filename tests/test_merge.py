"""``posttrain merge``: linear and SLERP merges of same-architecture checkpoints, refusal of different ones, and the
staged context-extension recipe that merges after each stage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main as cli
from posttrain.merge import MergeError, merge_checkpoints, slerp
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    tok = build_tokenizer(arithmetic_corpus(200), vocab_size=300)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, bos_token_id=None))
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(str(root / f"m{seed}"))
    torch.manual_seed(2)
    HybridForCausalLM(preset("tiny-moe", vocab_size=len(tok))).save_pretrained(root / "moe")
    return root, tok


def test_linear_merge_is_the_weighted_sum(checkpoints, tmp_path):
    root, _ = checkpoints
    assert cli(["merge", str(root / "m0"), str(root / "m1"), "--weights", "0.25", "0.75", "--out",
                str(tmp_path / "lin")]) == 0
    a, b = load_file(str(root / "m0" / "model.safetensors")), load_file(str(root / "m1" / "model.safetensors"))
    m = load_file(str(tmp_path / "lin" / "model.safetensors"))
    assert set(m) == set(a)
    for k in a:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6, rtol=1e-6)
    model = HybridForCausalLM.from_pretrained(tmp_path / "lin")  # a loadable checkpoint, tokenizer beside it
    assert model.num_parameters() > 0 and (tmp_path / "lin" / "tokenizer.json").is_file()
    manifest = json.loads((tmp_path / "lin" / "merge_manifest.json").read_text())
    assert manifest["method"] == "linear" and len(manifest["sources"]) == 2


def test_slerp_endpoints_and_norm(checkpoints, tmp_path):
    root, _ = checkpoints
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5]))  # on the circle, not the chord
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear
    for t, src in ((0.0, "m0"), (1.0, "m1")):
        merge_checkpoints([root / "m0", root / "m1"], tmp_path / f"s{t}", method="slerp", t=t)
        got, want = load_file(str(tmp_path / f"s{t}" / "model.safetensors")), load_file(
            str(root / src / "model.safetensors"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    merge_checkpoints([root / "m0", root / "m1"], tmp_path / "half", method="slerp", t=0.5)
    a, b = load_file(str(root / "m0" / "model.safetensors")), load_file(str(root / "m1" / "model.safetensors"))
    m = load_file(str(tmp_path / "half" / "model.safetensors"))
    k = "model.layers.0.mamba.in_proj.weight"  # two random matrices: ~orthogonal, so the norm is kept
    assert float(m[k].norm()) == pytest.approx(float(a[k].norm()), rel=0.05)
    assert float((0.5 * a[k] + 0.5 * b[k]).norm()) < 0.8 * float(a[k].norm())


def test_different_architectures_do_not_merge(checkpoints, tmp_path):
    root, _ = checkpoints
    with pytest.raises(MergeError, match="tensor"):
        merge_checkpoints([root / "m0", root / "moe"], tmp_path / "x")
    with pytest.raises(MergeError, match="exactly two"):
        merge_checkpoints([root / "m0", root / "m1", root / "m0"], tmp_path / "x", method="slerp")
    assert cli(["merge", str(root / "m0"), str(root / "moe"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_staged_context_extension_merges_after_each_stage(checkpoints, tmp_path):
    from posttrain.config import load_config
    from posttrain.train.config import TrainConfig
    from posttrain.train.run import run_training

    root, _ = checkpoints
    texts = [" ".join(arithmetic_corpus(6, seed=i)) for i in range(12)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = tmp_path / "ctx.yaml"
    recipe.write_text(
        f"model: {{path: {root / 'm0'}}}\n"
        f"data: {{train_files: [{tmp_path / 'text.jsonl'}], packing: true}}\n"
        "optim: {lr: 1.0e-3, per_device_batch_size: 2, schedule: wsd}\n"
        f"checkpoint: {{output_dir: {tmp_path / 'run'}, every_steps: 0}}\n"
        "logging: {progress: false}\n"
        "stages:\n"
        "  - {max_length: 64, max_steps: 2, merge_weight: 0.5}\n"
        "  - {max_length: 128, max_steps: 2, merge_weight: 0.5, merge_method: slerp}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(load_config(TrainConfig, recipe), "pretrain")
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    start = load_file(str(root / "m0" / "model.safetensors"))
    trained = load_file(str(run / "stage-1" / "final" / "model.safetensors"))
    merged = load_file(str(run / "stage-1" / "merged" / "model.safetensors"))
    for k in start:
        torch.testing.assert_close(merged[k], 0.5 * start[k] + 0.5 * trained[k], atol=1e-6, rtol=1e-6)
    stage2 = json.loads((run / "stage-2" / "final" / "training_manifest.json").read_text())
    assert stage2["config"]["data"]["max_length"] == 128
    assert stage2["base"]["path"] == str((run / "stage-1" / "merged").resolve())
    final = load_file(str(run / "final" / "model.safetensors"))
    again = load_file(str(run / "stage-2" / "merged" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert json.loads((run / "final" / "merge_manifest.json").read_text())["method"] == "slerp"
