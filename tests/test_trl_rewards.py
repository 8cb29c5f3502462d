"""Rewards called the TRL way: TRL's own reward functions (``trl.rewards``) and the examples of TRL's documentation
score every sample, by keyword, in this process, in the worker pool and in ``posttrain grpo``; a function gets only
the keywords it names; ``log_metric``/``log_extra`` calls made in workers reach the caller; a reward that keeps
failing stops the run, naming itself.

Rewards for the pool and the CLI live in a real module written to a temporary folder on ``sys.path`` (workers
import them by ``module:function``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from posttrain.rewards import RewardConfigError, RewardPool, RewardSet, WeightedReward, combine
from posttrain.rewards.base import reward_trainer_state
from posttrain.rewards.combine import RewardFailedError
from trl.rewards import accuracy_reward, think_format_reward

# The examples of TRL's GRPO documentation, as a user would copy them, plus a few written for these tests.
USER_REWARDS = r'''
import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def progress_reward(completions, trainer_state, **kwargs):
    return [trainer_state.global_step / trainer_state.max_steps for _ in completions]


def only_completions(completions):
    """No **kwargs: it must be called with `completions` alone."""
    return [float(len(c[0]["content"]) if isinstance(c, list) else len(c)) for c in completions]


def seen_keywords(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, answer):
    log_metric("seen/ids", float(len(completion_ids[0])))
    log_extra("answer_seen", list(answer))
    return [float(trainer_state.global_step) for _ in completions]


def progress_logged(completions, trainer_state, log_metric, **kwargs):
    log_metric("custom/progress", trainer_state.global_step / trainer_state.max_steps + 0.5)
    log_metric("custom/max_steps", float(trainer_state.max_steps))
    return [0.0 for _ in completions]


def always_raises(completions, **kwargs):
    raise ZeroDivisionError("this reward divides by zero")


def fails_on_b(completions, **kwargs):
    if any("b" in (c if isinstance(c, str) else c[0]["content"]) for c in completions):
        raise KeyError("b")
    return [1.0 for _ in completions]
'''


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    folder = tmp_path / "user_mod"
    folder.mkdir()
    (folder / "trl_style_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(folder))
    # no empty entry: one would put the working directory (a checkout's posttrain/) ahead of the installed package
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(folder), os.environ.get("PYTHONPATH", "")] if p))
    import importlib

    sys.modules.pop("trl_style_rewards", None)
    return importlib.import_module("trl_style_rewards")


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_trl_functions_score_conversational_batches_in_process_and_in_workers():
    # TRL's docstring examples: the first completion is well formed / right, the second is not
    completions = [_chat("<think>\nThis is my reasoning.\n</think>\nThis is my answer."),
                   _chat("<think>\nThis is my reasoning.\nThis is my answer.")]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    answers = [_chat(r"My answer is \boxed{\frac{1}{3}}"), _chat(r"My answer is \boxed{\frac{1}{2}}")]
    think = RewardSet([WeightedReward("think", think_format_reward)])
    acc = RewardSet([WeightedReward("acc", accuracy_reward)])
    solutions = [r"\frac{1}{3}", r"\frac{1}{3}"]
    assert think.score(prompts, completions).values["think"] == [1.0, 0.0]
    in_process = acc.score(prompts, answers, solution=solutions)
    assert in_process.values["acc"] == [1.0, 0.0] and not in_process.errors
    # accuracy_reward calls log_extra; TRL gives it to every reward, and so does the score
    assert in_process.logged_extra["solution"] == solutions
    with RewardPool(num_workers=2, timeout_s=60) as pool:
        r1 = think.score(prompts, completions, pool=pool)
        r2 = acc.score(prompts, answers, pool=pool, solution=solutions)
    assert r1.values["think"] == [1.0, 0.0] and r2.values["acc"] == [1.0, 0.0]
    assert not r1.errors and not r2.errors
    assert r2.logged_extra["solution"] == solutions  # recorded in the workers, replayed here in sample order


def test_documentation_examples_and_keyword_selection(user_rewards):
    m = user_rewards
    prompts = ["Solve 1+1.", "Solve 2+2."]
    completions = [r"so \boxed{2}", r"so \boxed{5}"]
    state = reward_trainer_state(global_step=3, max_steps=12, epoch=0.5)
    result = combine(m.reward_len, m.reward_func, m.progress_reward, m.only_completions).score(
        prompts, completions, trainer_state=state, ground_truth=["2", "4"], completion_ids=[[1, 2], [3]])
    assert result.values["reward_len"] == [-abs(20 - len(c)) for c in completions]
    assert result.values["reward_func"] == [1.0, 0.0]
    assert result.values["progress_reward"] == [0.25, 0.25]
    assert result.values["only_completions"] == [float(len(c)) for c in completions]
    assert not result.errors
    # TRL's format example on conversational completions
    fmt = combine(m.format_reward).score(["p", "p"], [_chat("<think>a</think><answer>b</answer>"), _chat("b")])
    assert fmt.values["format_reward"] == [1.0, 0.0]
    # a keyword the batch lacks is a configuration error naming it, not a failure on every sample
    with pytest.raises(RewardConfigError, match="'ground_truth'"):
        combine(m.reward_func).score(prompts, completions)


def test_every_keyword_reaches_a_worker_and_logs_come_back(user_rewards):
    m = user_rewards
    metrics: list[tuple[str, float]] = []
    extra: list[tuple[str, list]] = []
    rewards = RewardSet([WeightedReward("seen", m.seen_keywords)])
    with RewardPool(num_workers=2, timeout_s=30) as pool:
        result = rewards.score(["p0", "p1", "p2"], ["a", "bb", "ccc"], pool=pool,
                               trainer_state=reward_trainer_state(7, 10, 1.5),
                               log_metric=lambda k, v: metrics.append((k, v)),
                               log_extra=lambda k, v: extra.append((k, v)),
                               answer=["x", "y", "z"], completion_ids=[[1], [1, 2], [1, 2, 3]])
    assert result.values["seen"] == [7.0, 7.0, 7.0] and not result.errors
    assert metrics == [("seen/ids", 1.0), ("seen/ids", 2.0), ("seen/ids", 3.0)]  # sample order
    assert extra == [("answer_seen", ["x"]), ("answer_seen", ["y"]), ("answer_seen", ["z"])]
    assert result.logged_metrics == {"seen/ids": [1.0, 2.0, 3.0]}
    assert result.logged_extra == {"answer_seen": ["x", "y", "z"]}


def test_error_fraction_decides_when_failures_stop(user_rewards):
    m = user_rewards
    rewards = RewardSet([WeightedReward("fails_on_b", m.fails_on_b)])
    result = rewards.score(["p"] * 4, ["a", "b", "c", "d"])
    assert result.values["fails_on_b"] == [1.0, None, 1.0, 1.0]
    assert [e.sample for e in result.errors] == [1]
    with pytest.raises(RewardFailedError, match=r"(?s)'fails_on_b' failed on 1 of 4 samples.*KeyError.*Traceback"):
        result.raise_for_errors(0.0)
    result.raise_for_errors(0.25)  # one sample in four is allowed
    with pytest.raises(RewardFailedError):
        result.raise_for_errors(0.2)


def _policy_files(tmp_path: Path) -> tuple[Path, Path]:
    import torch

    from posttrain.models.hybrid import HybridForCausalLM, preset
    from posttrain.tokenizer import build_tokenizer

    tok = build_tokenizer([f"{a}+{b}={a + b} <think></think>" for a in range(20) for b in range(20)], vocab_size=80)
    config = preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    bos_token_id=None, hidden_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                    shared_intermediate_size=128, num_hidden_layers=2, layer_types=["mamba", "attention"],
                    mamba_chunk_size=16)
    torch.manual_seed(0)
    HybridForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    data = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": str(a + b), "ground_truth": str(a + b)}
            for a in range(4) for b in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "m", data


def _grpo_args(model: Path, data: Path, out: Path, rewards: list[str]) -> list[str]:
    args = ["grpo", "--config", "recipes/grpo_dapo.yaml", "--model.path", str(model), "--data.path", str(data),
            "--rollout.prompts_per_step", "2", "--rollout.num_generations", "2", "--rollout.max_new_tokens", "4",
            "--overlong.buffer", "0", "--dynamic_sampling.enabled", "false", "--rewards.num_workers", "1", "--rewards.timeout_s", "60", "--run.steps", "1",
            "--checkpoint.output_dir", str(out), "--logging.progress", "false", "--eval.path", "",
            "--rewards.rewards", json.dumps([{"name": r, "label": r.split(":")[1]} for r in rewards])]
    return args


def test_grpo_scores_every_sample_with_trl_rewards(tmp_path, user_rewards):
    from posttrain.cli import main

    model, data = _policy_files(tmp_path)
    rewards = ["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward", "trl_style_rewards:format_reward",
               "trl_style_rewards:only_completions", "trl_style_rewards:progress_logged"]
    rc = main(_grpo_args(model, data, tmp_path / "run", rewards))
    assert rc == 0
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["rewards/errors"] == 0 and last["rewards/unscored"] == 0
    for name in ("think_format_reward", "accuracy_reward", "format_reward"):  # untrained: well formed never
        assert last[f"rewards/{name}/mean"] == 0.0, name
    assert last["rewards/only_completions/mean"] >= 0
    # log_metric calls made in the reward worker reach the step's metrics (step 0 of 1 while scoring)
    assert last["custom/progress"] == 0.5 and last["custom/max_steps"] == 1.0


def test_grpo_stops_with_the_failing_reward_named(tmp_path, user_rewards):
    model, data = _policy_files(tmp_path)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli",
                           *_grpo_args(model, data, tmp_path / "run", ["trl_style_rewards:always_raises"])],
                          check=False, capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode != 0
    assert "'always_raises'" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert not (tmp_path / "run" / "final").exists()
