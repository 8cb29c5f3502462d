"""``posttrain eval``: gold answers score 1 and corrupted ones 0 on every data set through the path the eval
uses, pass@k equals the unbiased estimator, bad data and options are clear errors, and a real run on a tiny
model writes results that match the engine's completions and the rewards' scores."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys

import pytest

from posttrain.cli import main
from posttrain.eval import (
    TASKS,
    DataError,
    EngineCompletions,
    EvalConfig,
    EvalSampling,
    eval_rewards,
    evaluate,
    pass_at_k,
    score_completions,
    summarize,
)
from posttrain.eval.completions import render_prompt
from posttrain.rollout import EngineError
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.vllm import VllmEngine


class ScriptedEngine:
    """A completion source that answers each item with the texts a test chose for it (by item id)."""

    name = "scripted"

    def __init__(self, answer):
        self.answer = answer  # item -> list of n texts
        self.prompt_format = "plain"

    def generate(self, items, sampling, progress=None):
        out = [list(self.answer(item)) for item in items]
        if progress is not None:
            progress(len(items))
        return out


def run(shared_data, tasks, answer, n, ks=(1,), limit=None):
    config = EvalConfig(data_dir=str(shared_data), tasks=tasks, limit=limit, ks=list(ks),
                        sampling=EvalSampling(n=n, temperature=1.0))
    return evaluate(config, ScriptedEngine(answer), show_progress=False)


# -- pass@k -----------------------------------------------------------------------------------------------------
def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The definition: the fraction of k-subsets of the samples holding at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 0, 3) == 0.0 and pass_at_k(4, 2, 3) == 1.0  # n - c < k: every k-subset has a correct one
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 9)
        correct = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(correct), k) == pytest.approx(brute_force_pass_at_k(correct, k))
    with pytest.raises(ValueError, match="k"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def test_pass_at_k_through_the_eval_on_a_hand_made_example(shared_data):
    """Four GSM8K items with 5 samples each, a chosen number of them right: the eval's pass@1/2/5 equal the
    estimator averaged by hand."""
    right_per_item = [0, 1, 3, 5]
    items = TASKS["gsm8k"].load(shared_data, "test", 4)
    plan = {item.id: right for item, right in zip(items, right_per_item)}

    def answer(item):
        wrong = item.gold.rsplit("####", 1)[0] + "#### 123456789"
        return [item.gold] * plan[item.id] + [wrong] * (5 - plan[item.id])

    (result,) = run(shared_data, ["gsm8k"], answer, n=5, ks=(1, 2, 5), limit=4)
    for k in (1, 2, 5):
        expected = sum(1 - math.comb(5 - c, k) / math.comb(5, k) if 5 - c >= k else 1.0
                       for c in right_per_item) / 4
        assert result.metrics[f"pass@{k}"] == pytest.approx(expected)
    assert result.metrics["pass@1"] == pytest.approx((0 + 1 / 5 + 3 / 5 + 1) / 4)
    assert result.metrics["pass@5"] == pytest.approx(3 / 4)
    assert result.unscored == 0
    assert summarize([[True, False]], [1])["pass@1_stderr"] == 0.0


# -- gold 1, corrupted 0, on every data set -----------------------------------------------------------------
def corrupt_number(text: str) -> str:
    head, final = text.rsplit("####", 1)
    return f"{head}#### {int(final.strip().replace(',', '')) + 1}"


def test_gsm8k_gold_scores_one_and_corrupted_zero(shared_data):
    (result,) = run(shared_data, ["gsm8k"], lambda item: [item.gold, corrupt_number(item.gold)], n=2, ks=(1, 2))
    assert result.items == 1319
    assert all(s["scores"] == [1.0, 0.0] for s in result.samples), [s for s in result.samples
                                                                    if s["scores"] != [1.0, 0.0]][:3]
    assert result.metrics["pass@1"] == 0.5 and result.metrics["pass@2"] == 1.0


def test_humaneval_gold_scores_one_and_corrupted_zero(shared_data):
    def answer(item):
        wrong_value = f"    return {item.columns['entry_point']}\n"  # returns the function itself: never right
        broken = item.gold.replace("return", "return not", 1) if "return" in item.gold else "    pass\n"
        return [item.gold, wrong_value, broken]

    (result,) = run(shared_data, ["humaneval"], answer, n=3, limit=40)
    assert result.items == 40
    bad = [s for s in result.samples if s["scores"][0] != 1.0 or s["scores"][1] != 0.0]
    assert not bad, bad[:2]
    # a negated return may still pass a weak test suite; it must fail on most
    assert sum(s["scores"][2] == 0.0 for s in result.samples) >= 36
    assert result.unscored == 0


def test_bfcl_gold_scores_one_and_corrupted_zero(shared_data):
    def answer(item):
        first_call = item.gold.split("</tool_call>")[0] + "</tool_call>"
        wrong_name = item.gold.replace('{"name": "', '{"name": "not_', 1)
        return [item.gold, wrong_name, item.gold + first_call]  # right, wrong function, one call too many

    results = run(shared_data, ["bfcl"], answer, n=3)
    assert [r.task for r in results] == ["bfcl_simple_python", "bfcl_multiple", "bfcl_parallel",
                                         "bfcl_parallel_multiple"]
    assert [r.items for r in results] == [400, 200, 200, 200]
    for r in results:
        bad = [s for s in r.samples if s["scores"] != [1.0, 0.0, 0.0]]
        assert not bad, (r.task, bad[:2])


def test_a_score_of_none_is_reported_as_unscored(shared_data):
    items = TASKS["gsm8k"].load(shared_data, "test", 2)
    items[1].columns["answer"] = None  # a gold answer the reward cannot use
    scores = score_completions("gsm8k", items, [[items[0].gold], [items[1].gold]])
    assert scores == [[1.0], [None]]


def test_the_rewards_and_their_pool_come_from_one_rewards_config(shared_data):
    """One reward per task under the task's name (the code reward in-process, its sandbox bounds it), and reward
    processes only when some task's reward runs in them."""
    config = eval_rewards(["gsm8k", "humaneval", "bfcl_multiple"], workers=3, timeout_s=5.0)
    assert [(s.label, s.name, s.options, s.in_process) for s in config.rewards] == [
        ("gsm8k", "math", {}, False), ("humaneval", "code", {"binary": True}, True),
        ("bfcl_multiple", "tool_call", {"mode": "binary"}, False)]
    assert (config.num_workers, config.timeout_s) == (3, 5.0)
    assert eval_rewards(["humaneval"], workers=3).num_workers == 0
    rewards, pool = eval_rewards(["humaneval"], workers=3).build()
    assert pool is None
    items = TASKS["gsm8k"].load(shared_data, "test", 1)
    with pytest.raises(ValueError, match=r"gsm8k: the reward set has no reward for this task; it has \['humaneval'\]"):
        score_completions("gsm8k", items, [[items[0].gold]], rewards=rewards)


# -- errors ---------------------------------------------------------------------------------------------------
def test_bad_data_and_options_are_clear_errors(tmp_path, shared_data):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        TASKS["gsm8k"].load(tmp_path, "test", None)
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: missing field 'answer'"):
        TASKS["gsm8k"].load(tmp_path, "test", None)
    with pytest.raises(DataError, match="not found"):
        TASKS["humaneval"].load(tmp_path, "test", None)
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        EvalConfig(data_dir=str(shared_data), tasks=["mmlu"])
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples"):
        EvalConfig(data_dir=str(shared_data), tasks=["gsm8k"], ks=[4], sampling=EvalSampling(n=2, temperature=1))
    with pytest.raises(ValueError, match="greedy"):
        EvalSampling(n=2, temperature=0)


def test_vllm_engine_without_vllm_is_a_clear_error(tiny_checkpoint, shared_data, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vllm: importing it fails
    folder = tiny_checkpoint[2]
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(folder), "--data-dir", str(shared_data), "--tasks", "gsm8k", "--limit", "1",
                 "--engine", "vllm", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "--engine: vllm needs the vllm package" in err and "use native" in err
    with pytest.raises(EngineError, match="use native"):
        VllmEngine(folder, field="--engine", alternatives="native")


# -- a real run -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(save_tiny_checkpoint):
    return save_tiny_checkpoint("tiny")


def test_posttrain_eval_on_a_tiny_model(tiny_checkpoint, shared_data, tmp_path, capsys):
    tokenizer, model, folder = tiny_checkpoint
    out = tmp_path / "results" / "tiny.json"
    code = main(["eval", "--model", str(folder), "--data-dir", str(shared_data),
                 "--tasks", "gsm8k,humaneval,bfcl_simple_python", "--limit", "2", "--max-new-tokens", "6",
                 "--prompt-format", "plain", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "bfcl_simple_python" in printed
    summary = json.loads(out.read_text())
    assert summary["engine"] == "native" and summary["prompt_format"] == "plain"
    assert list(summary["tasks"]) == ["gsm8k", "humaneval", "bfcl_simple_python"]
    samples = [json.loads(line) for line in (tmp_path / "results" / "tiny.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    # the completions are the native engine's greedy ones, and the scores are the rewards' on them
    engine = EngineCompletions(NativeEngine(model), tokenizer, model.config, "plain")
    sampling = EvalSampling(max_new_tokens=6)
    for task in summary["tasks"]:
        items = TASKS[task].load(shared_data, "test", 2)
        recorded = [s for s in samples if s["task"] == task]
        assert [s["id"] for s in recorded] == [item.id for item in items]
        expected = engine.generate(items, sampling)
        assert [s["completions"] for s in recorded] == expected
        assert [s["scores"] for s in recorded] == score_completions(task, items, expected)
        stats = summary["tasks"][task]
        correct = sum(s["scores"][0] == 1.0 for s in recorded)
        assert stats["items"] == 2 and stats["pass@1"] == correct / 2
    # prompts in the two formats are what the tokenizer makes of the item
    item = TASKS["bfcl_simple_python"].load(shared_data, "test", 1)[0]
    chat = render_prompt(engine.generator, item, "chat")
    assert tokenizer.decode(chat).endswith("<|start_of_role|>assistant<|end_of_role|>")
    assert '"name": "calculate_triangle_area"' in tokenizer.decode(chat)
