"""The engine registry: every command gets its engine from ``posttrain.rollout.registry``, the default follows the
model's family (read from config.json), and every bad choice (an unknown name, an engine that cannot run the
family, one that lacks a capability the command needs) is one line naming the config field or option, exit code 2,
before any work: no traceback, nothing written. And no module outside ``posttrain/rollout/`` defines an engine."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import posttrain
from posttrain.cli import main
from posttrain.rollout import EngineError
from posttrain.rollout.registry import ENGINE_NAMES, ENGINES, build_engine, choose_engine, default_engine
from posttrain.synthetic import tiny_model
from posttrain.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    """The in-tree Granite 4.0-H hybrid, untrained, saved with its tokenizer."""
    tokenizer, model = tiny_model(steps=0)
    folder = tmp_path_factory.mktemp("hybrid") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved by transformers (random init), with the in-tree tokenizer, vocab_size matched."""
    from posttrain.synthetic import arithmetic_corpus

    tok = build_tokenizer(arithmetic_corpus(100), vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    folder = tmp_path_factory.mktemp("llama") / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- names and defaults ---------------------------------------------------------------------------------------------
def test_config_literals_name_the_registry_engines():
    """grpo/config.py and dpo/config.py list the names without importing the registry (no torch there)."""
    from posttrain.dpo.config import PairSamplingSettings
    from posttrain.grpo.config import RolloutConfig

    def names(cls) -> set[str]:
        hint = typing.get_type_hints(cls)["engine"]
        return {a for arg in typing.get_args(hint) for a in (typing.get_args(arg) or (arg,)) if isinstance(a, str)}

    assert names(RolloutConfig) == set(ENGINE_NAMES) == {"native", "transformers", "vllm", "server"}
    assert names(PairSamplingSettings) == {"native", "transformers", "vllm"}  # a pairs run has no trainer to sync


def test_default_engine_follows_the_family(hybrid_dir, llama_dir, tmp_path):
    assert choose_engine(None, hybrid_dir, field="f").name == "native"
    assert choose_engine(None, llama_dir, field="f").name == "transformers"
    assert default_engine("granite") == "native" and default_engine("qwen2") == "transformers"
    assert choose_engine("transformers", hybrid_dir, field="f").name == "transformers"  # any causal LM
    assert choose_engine("server", None, field="f").name == "server"  # the server's engine runs the model
    engine = build_engine(None, hybrid_dir, field="f")
    assert engine.name == "native" and engine.capabilities == ENGINES["native"].capabilities
    assert engine.capabilities.shares_module and engine.capabilities.streaming


def test_bad_choices_raise_before_any_work(hybrid_dir, llama_dir):
    with pytest.raises(EngineError, match=r"^rollout.engine: unknown engine 'nope'; the engines are native, "
                                          r"transformers, vllm, server$"):
        choose_engine("nope", hybrid_dir, field="rollout.engine")
    with pytest.raises(EngineError, match=r"^--engine: engine 'native' runs only granitemoehybrid, granite models, "
                                          r".*config.json has model_type 'llama'; engines that run it: "
                                          r"transformers, vllm$"):
        choose_engine("native", llama_dir, field="--engine")
    with pytest.raises(EngineError, match=r"^--engine: engine 'vllm' cannot stream tokens as they are sampled "
                                          r"\(streaming\), which this needs; engines that can: native, transformers$"):
        choose_engine("vllm", hybrid_dir, field="--engine", needs={"streaming"})
    with pytest.raises(EngineError, match=r"engines that can: transformers$"):  # native cannot run a llama
        choose_engine("vllm", llama_dir, field="--engine", needs={"shares_module"})


# -- through the commands -------------------------------------------------------------------------------------------
def test_generate_refuses_bad_engines_with_one_line(hybrid_dir, llama_dir, capsys):
    unknown = one_line_error(capsys, main(["generate", str(hybrid_dir), "hi", "--engine", "nope"]),
                             "posttrain generate: --engine: unknown engine 'nope'", "native, transformers, vllm, server")
    family = one_line_error(capsys, main(["generate", str(llama_dir), "hi", "--engine", "native"]),
                            "--engine: engine 'native' runs only", "model_type 'llama'",
                            "engines that run it: transformers")
    assert unknown.startswith("posttrain generate: ") and family.startswith("posttrain generate: --engine: ")


def test_generate_on_the_default_engine(hybrid_dir, capsys):
    assert main(["generate", str(hybrid_dir), "Question: 1+1?", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert out["prompt_index"] == 0 and 1 <= out["num_tokens"] <= 3


def _grpo_args(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(4)))
    return ["grpo", "--config", str(Path(__file__).resolve().parent.parent / "recipes" / "grpo_dapo.yaml"),
            "--model.path", str(model_dir), "--data.path", str(prompts), "--checkpoint.output_dir", str(tmp_path / "out"),
            "--run.steps", "1", "--rollout.prompts_per_step", "2", "--rollout.num_generations", "2",
            "--rollout.max_new_tokens", "4", "--overlong.buffer", "0", "--rewards.num_workers", "0",
            "--logging.progress", "false", *extra]


@pytest.mark.parametrize("case", ["unknown", "family", "capability"])
def test_grpo_refuses_bad_engines_before_any_work(case, hybrid_dir, llama_dir, tmp_path, capsys):
    if case == "unknown":
        code = main(_grpo_args(hybrid_dir, tmp_path, "--rollout.engine", "nope"))
        one_line_error(capsys, code, "rollout.engine", "nope")
    elif case == "family":
        code = main(_grpo_args(llama_dir, tmp_path, "--rollout.engine", "native"))
        one_line_error(capsys, code, "posttrain grpo: rollout.engine: engine 'native' runs only", "'llama'",
                       "engines that run it: transformers")
    else:  # asynchronous rollouts decode a copy of the policy in this process: not something vLLM does
        code = main(_grpo_args(hybrid_dir, tmp_path, "--rollout.engine", "vllm", "--async_rollout.enabled", "true"))
        one_line_error(capsys, code, "posttrain grpo: rollout.engine: engine 'vllm' cannot decode with the trainer's "
                                     "own module", "engines that can: native, transformers")
    assert not (tmp_path / "out").exists()


def test_serve_and_eval_refuse_bad_engines(hybrid_dir, tmp_path, capsys):
    one_line_error(capsys, main(["serve", "--model", str(hybrid_dir), "--engine", "vllm", "--port", "0"]),
                   "posttrain serve: --engine: engine 'vllm' cannot stream", "engines that can: native, transformers")
    out = tmp_path / "eval.json"
    one_line_error(capsys, main(["eval", "--model", str(hybrid_dir), "--data-dir", str(tmp_path), "--engine", "nope",
                                 "--out", str(out)]), "posttrain eval: --engine: unknown engine 'nope'")
    assert not out.exists()


def test_pairs_refuses_an_engine_that_cannot_run_the_family(llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    code = main(["pairs", "--prompts_file", str(prompts), "--output", str(out), "--sampling.model", str(llama_dir),
                 "--sampling.engine", "native", "--verdict.source", "reward"])
    one_line_error(capsys, code, "posttrain pairs: sampling.engine: engine 'native' runs only", "'llama'")
    assert not out.exists()


# -- one home ---------------------------------------------------------------------------------------------------------
def test_no_engine_is_defined_outside_posttrain_rollout():
    """Engines (a class named ...Engine, or a token-level ``generate(prompts, params)``) live in posttrain/rollout/;
    serving and eval only wrap one, GRPO only asks for one."""
    root = Path(posttrain.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("rollout/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*class \w*Engine\b", line) or re.match(r"\s*def generate\(self, prompt", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
    for old in ("engine", "grpo/vllm_engine.py", "grpo/weight_sync.py", "grpo/multiturn.py", "grpo/async_rollout.py",
                "serving/batching.py", "eval/engines.py"):
        assert not (root / old).exists(), old


def test_every_capability_is_refused_in_words():
    """A need the engine lacks is an EngineError that names the capability, for every flag of Capabilities."""
    from dataclasses import fields
    from types import SimpleNamespace

    from posttrain.rollout.base import Capabilities
    from posttrain.rollout.registry import check_capabilities

    bare = SimpleNamespace(name="bare", capabilities=Capabilities())
    for flag in fields(Capabilities):
        with pytest.raises(EngineError, match=rf"rollout\.engine: engine 'bare' cannot .*\({flag.name}\), which this"):
            check_capabilities(bare, [flag.name], "rollout.engine")
