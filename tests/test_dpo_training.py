"""DPO learns, resumes exactly and uses the right reference.

Learning: pairs come from a verifiable task through the reward path of pair building: for each arithmetic
question two candidate answers (the right operation, and the wrong one), the math reward verifies one and refutes
the other, and ``pairs_from_rewards`` turns the verdicts into rows. DPO on 128 such pairs must lift the held-out
reward accuracy well above chance (0.5) and raise the chosen answers' log-probability relative to the rejected
ones on the held-out pairs. Resume: a run stopped after its step-2 checkpoint and restarted equals an
uninterrupted run, metrics and weights. Reference: on-the-fly and precomputed give the same step; with LoRA the
reference is the adapter-disabled model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.dpo.config import DpoConfig
from posttrain.dpo.pairs import pairs_from_rewards, score_answers
from posttrain.dpo.run import run_dpo
from posttrain.dpo.trainer import REFERENCE_FILE
from posttrain.models.hybrid import HybridForCausalLM, preset
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer


def candidates(rng: random.Random) -> tuple[dict, list[str]]:
    """A question with its gold answer, and two answers: the right operation and the wrong one (shuffled)."""
    a, b = rng.randint(0, 49), rng.randint(1, 49)
    name, noun = rng.choice(["Ada", "Ben", "Cleo"]), rng.choice(["apples", "coins"])
    if rng.random() < 0.5:
        q, gold = f"{name} has {a} {noun} and gets {b} more. How many {noun} does {name} have?", a + b
        right, wrong = f"{name} has {a} + {b} = {a + b} {noun}.\n#### {a + b}", f"{name} has {a} - {b} = {a - b} {noun}.\n#### {a - b}"
    else:
        q, gold = f"{name} has {a} {noun} and gives away {b}. How many {noun} are left?", a - b
        right, wrong = f"{name} has {a} - {b} = {a - b} {noun} left.\n#### {a - b}", f"{name} has {a} + {b} = {a + b} {noun} left.\n#### {a + b}"
    answers = [" " + right, " " + wrong]
    rng.shuffle(answers)
    return {"prompt": f"Question: {q}\nAnswer:", "answer": str(gold)}, answers


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    tok = build_tokenizer(arithmetic_corpus(300), vocab_size=300)
    torch.manual_seed(0)
    model = HybridForCausalLM(preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, bos_token_id=None))
    model.save_pretrained(root / "base")
    tok.save_pretrained(str(root / "base"))
    rng = random.Random(0)
    prompts, answers = zip(*(candidates(rng) for _ in range(160)))
    scores = score_answers("math", {}, prompts, "prompt", answers)
    rows = pairs_from_rewards([p["prompt"] for p in prompts], answers, scores, reward_name="math")
    assert len(rows) == 160 and all(r["provenance"]["scores"] == [1.0, 0.0] for r in rows)
    assert all(r["chosen"].split("= ")[1].split(" ")[0] == p["answer"] for r, p in zip(rows, prompts))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    return root


def config(root: Path, out: str, *overrides: str) -> DpoConfig:
    return load_config(DpoConfig, None, [
        f"--model.path={root / 'base'}", f"--data.train_files=[{root / 'train.jsonl'}]", "--data.max_length=96",
        "--optim.lr=1e-3", "--optim.per_device_batch_size=8", "--optim.schedule=constant", "--loss.beta=0.1",
        f"--checkpoint.output_dir={root / out}", "--checkpoint.every_steps=0", "--logging.progress=false",
        "--eval.batch_size=32", *overrides])


def metrics(root: Path, out: str) -> list[dict]:
    return [json.loads(line) for line in (root / out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dpo_on_verified_pairs_beats_chance_on_held_out_pairs(setup):
    result = run_dpo(config(setup, "learn", f"--data.eval_files=[{setup / 'eval.jsonl'}]", "--optim.max_steps=16"))
    log = metrics(setup, "learn")
    before, after = log[0], log[-1]
    assert before["step"] == 0 and after["step"] == 16
    assert before["eval/rewards/accuracy"] == 0.0 and before["eval/rewards/margin"] == 0.0  # policy == reference
    assert after["eval/rewards/accuracy"] >= 0.75, after  # chance is 0.5 (32 held-out pairs)
    assert after["eval/rewards/margin"] > 0.2
    # the rejected answers' log-probability falls relative to the chosen ones (nats, summed over the answer)
    assert after["eval/logps/margin"] - before["eval/logps/margin"] > 3.0
    assert after["eval/loss"] < before["eval/loss"] - 0.1
    manifest = json.loads((setup / "learn" / "final" / "training_manifest.json").read_text())
    assert manifest["eval"]["eval/rewards/accuracy"] == result.eval_metrics["eval/rewards/accuracy"]
    table = (setup / "learn" / REFERENCE_FILE).read_text().splitlines()
    assert len(table) == 1 + 128 + 32  # a header, then every train and held-out pair once


class Stop(Exception):
    pass


def test_a_stopped_run_resumes_exactly(setup):
    common = ("--optim.max_steps=4", "--checkpoint.every_steps=2", "--logging.record_samples=true",
              "--optim.per_device_batch_size=4", "--optim.grad_accumulation_steps=2", "--data.max_samples=32",
              "--eval.batch_size=8")
    run_dpo(config(setup, "straight", *common))

    def stop_after_three(step, _):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        run_dpo(config(setup, "stopped", *common), on_step=stop_after_three)
    assert [m["step"] for m in metrics(setup, "stopped")] == [1, 2, 3]
    # the reference table was cut mid-line by the "kill": the restart recomputes only what is missing
    table = setup / "stopped" / REFERENCE_FILE
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:20]) + "\n" + lines[20][:20])
    run_dpo(config(setup, "stopped", *common))
    assert table.read_text() == (setup / "straight" / REFERENCE_FILE).read_text()
    a, b = metrics(setup, "straight"), metrics(setup, "stopped")
    assert [m["step"] for m in b] == list(range(1, 5))  # step 3's line was logged past the checkpoint: cut, not doubled
    for x, y in zip(a, b):
        assert y["samples"] == x["samples"], x["step"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
    wa = load_file(str(setup / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(setup / "stopped" / "final" / "model.safetensors"))
    assert any(not torch.equal(wa[k], load_file(str(setup / "base" / "model.safetensors"))[k]) for k in wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)


def test_a_bad_checkpoint_to_resume_stops_the_run_before_anything_is_written(setup):
    from posttrain.train.checkpointing import CheckpointError

    common = ("--optim.max_steps=2", "--checkpoint.every_steps=1", "--optim.per_device_batch_size=4",
              "--data.max_samples=8")
    run_dpo(config(setup, "damaged", *common))
    out = setup / "damaged"
    bad = out / "checkpoints" / f"step-{1:08d}"
    weights = next(p for p in bad.iterdir() if p.name.startswith(("model", "pytorch_model")))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (out / "config.yaml").write_text("# the config of the run, as it was\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="sha256"):
        run_dpo(config(setup, "damaged", *common, f"--run.resume={bad}"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # config.yaml and logs as they were


def test_reference_on_the_fly_equals_precomputed_and_lora_uses_the_disabled_adapter(setup):
    common = ("--optim.max_steps=2", "--optim.per_device_batch_size=4", "--run.resume=null",
              "--data.max_samples=8")
    run_dpo(config(setup, "pre", *common))
    run_dpo(config(setup, "fly", *common, "--loss.reference=on_the_fly"))
    for x, y in zip(metrics(setup, "pre"), metrics(setup, "fly")):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["rewards/margin"] == pytest.approx(x["rewards/margin"], abs=1e-5)
    assert metrics(setup, "fly")[1]["rewards/margin"] != 0.0
    lora = ("--lora.enabled=true", "--lora.r=4", "--optim.lr=1e-2")
    run_dpo(config(setup, "lora", *common, *lora))
    run_dpo(config(setup, "lora_fly", *common, *lora, "--loss.reference=on_the_fly"))
    first = metrics(setup, "lora")[0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # a fresh adapter is the identity: policy == ref
    # the precomputed table with adapters disabled equals the base model's (the same pairs, the same weights)
    assert (setup / "lora" / REFERENCE_FILE).read_text().splitlines()[1:] == \
        (setup / "pre" / REFERENCE_FILE).read_text().splitlines()[1:]
    for x, y in zip(metrics(setup, "lora"), metrics(setup, "lora_fly")):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
    assert metrics(setup, "lora_fly")[1]["rewards/margin"] != 0.0  # the adapter moved the policy off the reference
    assert (setup / "lora" / "final" / "adapter" / "adapter_config.json").is_file()


def test_under_bf16_autocast_the_precomputed_reference_starts_equal_to_the_policy(setup, fresh_precision):
    """Mixed precision (bf16 autocast over float32 weights, as on every GPU; here on the CPU): before any update the
    policy is the reference, so every implicit reward is 0, held out and in the first training step, whether the
    reference was precomputed or is scored on the fly. The first micro-batch and the table's first chunk hold the
    same pairs, so the two are scored in the same shapes."""
    common = ("--model.dtype=bfloat16", "--optim.max_steps=1", "--optim.per_device_batch_size=8",
              "--eval.batch_size=8", "--data.shuffle=false", "--data.max_samples=16",
              f"--data.eval_files=[{setup / 'eval.jsonl'}]", "--run.resume=null")
    for reference in ("precomputed", "on_the_fly"):
        out = f"bf16_{reference}"
        fresh_precision()
        result = run_dpo(config(setup, out, *common, f"--loss.reference={reference}"))
        assert str(result.model.dtype) == "torch.float32"  # float32 master weights: the bf16 is the autocast's
        before, first = metrics(setup, out)[:2]
        assert before["step"] == 0 and first["step"] == 1
        for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margin"):
            assert before[key] == 0.0, (reference, key, before[key])
        for key in ("rewards/chosen", "rewards/rejected"):
            assert abs(first[key]) < 1e-6, (reference, key, first[key])
        assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # -log sigmoid(0)
    header = json.loads((setup / "bf16_precomputed" / REFERENCE_FILE).read_text().splitlines()[0])
    assert header["mixed_precision"] == "bf16"
    # the scores are bf16's: they differ from float32's for the same pairs and weights
    fresh_precision()
    run_dpo(config(setup, "f32_precomputed", *common[1:]))
    bf16_rows = (setup / "bf16_precomputed" / REFERENCE_FILE).read_text().splitlines()[1:]
    f32_rows = (setup / "f32_precomputed" / REFERENCE_FILE).read_text().splitlines()[1:]
    assert len(bf16_rows) == len(f32_rows) == 16 + 32 and bf16_rows != f32_rows


@pytest.mark.parametrize("family", ["hybrid", "qwen2_moe"])
def test_a_mixture_of_experts_gets_its_load_balancing_loss(setup, tmp_path, family):
    """The in-tree hybrid's experts, and transformers' Qwen2-MoE (which counts them as ``num_experts``)."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(str(setup / "base"))
    torch.manual_seed(0)
    ids = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "bos_token_id": None}
    if family == "hybrid":
        moe = HybridForCausalLM(preset("tiny-moe", **ids))
    else:
        moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            **ids))
    moe.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(str(tmp_path / "moe"))
    overrides = (f"--model.path={tmp_path / 'moe'}", "--optim.max_steps=1", "--optim.per_device_batch_size=4",
                 "--data.max_samples=4")
    run_dpo(config(setup, f"moe_{family}", *overrides))
    run_dpo(config(setup, f"moe_off_{family}", *overrides, "--model.moe_aux_loss=false"))
    on, off = metrics(setup, f"moe_{family}")[0], metrics(setup, f"moe_off_{family}")[0]
    assert on["aux_loss"] > 0 and "aux_loss" not in off
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)  # the preference loss itself is the same ...
    w_on = load_file(str(setup / f"moe_{family}" / "final" / "model.safetensors"))
    w_off = load_file(str(setup / f"moe_off_{family}" / "final" / "model.safetensors"))
    routers = [k for k in w_on if "router" in k or ".mlp.gate." in k]
    assert routers and any(not torch.equal(w_on[k], w_off[k]) for k in routers)  # ... the router's gradient is not


def test_simpo_needs_no_reference_and_ipo_trains(setup):
    common = ("--optim.max_steps=2", "--optim.per_device_batch_size=4", "--data.max_samples=8",
              "--run.resume=null")
    run_dpo(config(setup, "simpo", *common, "--loss.type=simpo", "--loss.beta=2.0", "--loss.gamma=0.5"))
    assert not (setup / "simpo" / REFERENCE_FILE).exists()
    first = metrics(setup, "simpo")[0]
    # SimPO's rewards are beta times average log-probs: about -2 * ln(vocab) for an untrained model, never 0
    assert -2 * 6.0 < first["rewards/chosen"] < -2 * 5.0 and first["loss"] > 0.5
    run_dpo(config(setup, "ipo", *common, "--loss.type=ipo", "--optim.lr=1e-4"))
    ipo = metrics(setup, "ipo")
    assert ipo[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-4)  # policy == reference: (0 - 1/(2 beta))^2
    assert ipo[1]["loss"] < ipo[0]["loss"]
