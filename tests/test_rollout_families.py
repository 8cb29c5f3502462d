"""Every model family through every command that samples, each on the engine the registry picks for it: the Granite
4.0-H hybrid saved by posttrain's in-tree class and by transformers' ``GraniteMoeHybridForCausalLM`` (with experts),
dense Granite (those three on ``native``), Llama and Qwen2 (on ``transformers``), all tiny and random, with the
in-tree tokenizer and vocab_size matched.

Per family: ``posttrain grpo`` (2 steps, a reward with variance, so the weights move), ``posttrain pairs`` (reward
verdicts), ``posttrain generate``, ``posttrain serve`` (one chat completion from a real server on 127.0.0.1) and
``posttrain eval`` (GSM8K, one item). The policy GRPO trains is the class its engine decodes: the in-tree model on
``native``, transformers' own class on ``transformers``.
"""

from __future__ import annotations

import json
import os
import sys

import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GraniteConfig, LlamaConfig, Qwen2Config

from posttrain.cli import main
from posttrain.rollout.registry import choose_engine
from posttrain.synthetic import arithmetic_corpus
from posttrain.tokenizer import build_tokenizer

FAMILIES = {  # family -> the engine the registry picks
    "hybrid": "native",
    "granitemoehybrid": "native",
    "granite": "native",
    "llama": "transformers",
    "qwen2": "transformers",
}

REWARDS = '''
def parity(completions, **_):
    """1 for an answer of even length, 0 for an odd one: variance within every group of random answers."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(arithmetic_corpus(300), vocab_size=300)


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory):
    """``family_rewards:parity`` importable here and in the reward pool's worker processes."""
    folder = tmp_path_factory.mktemp("rewards_mod")
    (folder / "family_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(folder))
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(folder), before] if p)
    yield "family_rewards:parity"
    sys.path.remove(str(folder))
    if before is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = before


def save_tiny(family: str, tok, folder) -> None:
    torch.manual_seed(0)
    special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    if family in ("hybrid", "granitemoehybrid"):
        from transformers import GraniteMoeHybridForCausalLM

        from posttrain.models.hybrid import HybridConfig, HybridForCausalLM

        config = HybridConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                              layer_types=["mamba", "attention", "mamba"], num_attention_heads=4, num_key_value_heads=2,
                              mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8, intermediate_size=32,
                              shared_intermediate_size=64, **special,
                              **({"num_local_experts": 4, "num_experts_per_tok": 2} if family != "hybrid" else {}))
        model = HybridForCausalLM(config) if family == "hybrid" else GraniteMoeHybridForCausalLM(config.to_transformers())
    else:
        config_cls = {"granite": GraniteConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}[family]
        config = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=family == "qwen2", **special)
        model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    save_tiny(request.param, tok, folder)
    return request.param, folder


def test_the_registry_picks_the_family_engine(family_dir):
    family, folder = family_dir
    assert json.loads((folder / "config.json").read_text())["model_type"] == (
        "granitemoehybrid" if family == "hybrid" else family)
    assert choose_engine(None, folder, field="rollout.engine").name == FAMILIES[family]


def test_grpo_two_steps(family_dir, rewards_module, tmp_path, capsys):
    family, folder = family_dir
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{a}="}]}) + "\n"
                               for a in range(4)))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"""
model: {{path: "{folder}", dtype: float32}}
data: {{path: "{prompts}", max_prompt_tokens: 64}}
rollout: {{prompts_per_step: 2, num_generations: 4, max_new_tokens: 6}}
dynamic_sampling: {{enabled: false}}
rewards: {{rewards: [{{name: "{rewards_module}"}}], num_workers: 0}}
optim: {{lr: 1.0e-2, mini_batches: 1, micro_batch_tokens: 512}}
checkpoint: {{output_dir: "{tmp_path / 'run'}", every_steps: 0}}
run: {{steps: 2, seed: 3}}
logging: {{progress: false, rollouts: true}}
""")
    assert main(["grpo", "--config", str(recipe)]) == 0, capsys.readouterr().err
    assert f"posttrain grpo: 2 steps on the {FAMILIES[family]} engine" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == json.loads(
        (folder / "config.json").read_text())["model_type"]
    rollouts = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 4  # steps x prompts x samples
    assert len({r["rewards"]["family_rewards:parity"] for r in rollouts}) == 2  # the reward varied
    start, trained = (load_file(next(f.glob("*.safetensors"))) for f in (folder, final))
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the updates reached the weights


def test_pairs_generate_serve_and_eval(family_dir, rewards_module, tmp_path, capsys, shared_data):
    family, folder = family_dir
    engine = FAMILIES[family]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question: {a}+{a}=\nAnswer:"}) + "\n" for a in range(4)))
    out = tmp_path / "pairs.jsonl"
    code = main(["pairs", "--prompts_file", str(prompts), "--output", str(out), "--sampling.model", str(folder),
                 "--sampling.num_samples", "4", "--sampling.max_new_tokens", "6", "--verdict.source", "reward",
                 "--verdict.reward", rewards_module])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)

    capsys.readouterr()
    assert main(["generate", str(folder), "1+1=", "2+2=", "--max-new-tokens", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [o["prompt_index"] for o in lines] == [0, 1] and all(1 <= o["num_tokens"] <= 4 for o in lines)

    from posttrain.serving.server import ModelServer, ServeConfig

    with ModelServer.from_config(ServeConfig(model=str(folder), port=0)) as server:
        assert server.scheduler.engine.name == engine
        body = {"model": server.name, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 4,
                "temperature": 0}
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        answer = client.chat.completions.create(**body)
        assert answer.choices[0].message.role == "assistant" and 1 <= answer.usage.completion_tokens <= 4
        assert isinstance(answer.choices[0].message.content, str)

    results = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--data-dir", str(shared_data), "--tasks", "gsm8k", "--limit", "1",
                 "--max-new-tokens", "4", "--out", str(results)]) == 0
    summary = json.loads(results.read_text())
    assert summary["engine"] == engine and summary["tasks"]["gsm8k"]["items"] == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_grpo_packed_logprobs_of_a_transformers_model_match_its_engine(family, tok, tmp_path):
    """GRPO scores a transformers model's completions from one packed row through its last hidden states and the
    fused head kernel; those log-probs are the ones the transformers engine sampled with (its own full forward)."""
    from posttrain.rewards import RewardsConfig, RewardSet, WeightedReward

    from posttrain.grpo.config import CheckpointConfig, GrpoConfig, LoggingConfig, OptimConfig, RolloutConfig, RunConfig
    from posttrain.grpo.trainer import GrpoTrainer

    folder = tmp_path / "model"
    save_tiny(family, tok, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    config = GrpoConfig(rollout=RolloutConfig(prompts_per_step=2, num_generations=4, max_new_tokens=6,
                                              recompute_old_logprobs=True),
                        optim=OptimConfig(lr=1e-2, mini_batches=2, micro_batch_tokens=64),
                        rewards=RewardsConfig(num_workers=0), logging=LoggingConfig(progress=False),
                        checkpoint=CheckpointConfig(output_dir=str(tmp_path / "run")),
                        run=RunConfig(seed=1, steps=1))
    rows = [{"prompt": f"{a}+{a}="} for a in range(4)]
    trainer = GrpoTrainer(config, model=model, tokenizer=tok, rows=rows,
                          reward_set=RewardSet([WeightedReward("len", lambda completions, **_: [
                              float(len(c) % 2) for c in completions])]))
    assert trainer.engine.name == "transformers" and trainer.engine.model is model
    metrics = trainer.step()
    assert metrics["rollout_correction/mismatch_abs_mean"] < 1e-4
    assert metrics["optim/updates"] == 2 and metrics["micro_batches"] >= 2


@pytest.mark.parametrize("family", ["hybrid", "granite"])
def test_an_in_tree_family_reads_the_same_on_both_engines(family, tok, tmp_path, capsys):
    """The in-tree families run on the transformers engine too (as transformers' own classes), and greedy decoding
    gives the same tokens as on the native engine."""
    folder = tmp_path / "model"
    save_tiny(family, tok, folder)
    texts = {}
    for engine in ("native", "transformers"):
        assert main(["generate", str(folder), "1+1=", "Question: 12+7=", "--max-new-tokens", "6", "--json",
                     "--engine", engine]) == 0
        texts[engine] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert texts["native"] == texts["transformers"] and all(t["num_tokens"] == 6 or t["finish_reason"] == "stop"
                                                            for t in texts["native"])
