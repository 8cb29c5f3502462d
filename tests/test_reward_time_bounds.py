"""Every reward call is bounded in time, wherever it runs: the filter's ``verify_answer`` rule and any caller outside
the reward pool go through ``BoundedReward``, whose workers are killed at the limit.

The hostile answers are ones that ran past 30 s in math-verify (sympy computing a huge factorial, binomial or sum,
or expanding an 8x8 symbolic determinant); in this process they would hold the interpreter until done.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time

import pytest
from posttrain.rewards import BoundedReward, get

MATRIX = r"\\".join("&".join(f"a_{{{i}{j}}}" for j in range(1, 9)) for i in range(1, 9))
HOSTILE = {
    "factorial of a factorial": r"(10!)!",
    "huge binomial": r"\binom{10^9}{5\cdot 10^8}",
    "huge sum": r"\sum_{i=1}^{10^{10}} i^i",
    "8x8 symbolic determinant": rf"\det\begin{{pmatrix}}{MATRIX}\end{{pmatrix}}",
}
# answers that need math-verify (not plain numbers) and a plain one, with their true scores
CLEAN = [(r"so \boxed{\frac{1}{2}}", "0.5", 1.0), (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
         (r"\boxed{\sqrt{2}}", "2", 0.0), ("#### 1,234", "1234", 1.0)]


def boxed(expr: str) -> str:
    return f"The answer is \\boxed{{{expr}}}"


def test_hostile_answers_time_out_in_a_killed_worker_and_the_others_are_scored():
    with BoundedReward("math", get("math"), timeout_s=1.5, num_workers=2) as reward:
        reward(["q"], [CLEAN[0][0]], answer=[CLEAN[0][1]])  # workers started and math-verify loaded
        completions = [boxed(e) for e in HOSTILE.values()] + [c for c, _, _ in CLEAN]
        golds = ["5"] * len(HOSTILE) + [g for _, g, _ in CLEAN]
        start = time.monotonic()
        values, errors = reward.score(["q"] * len(completions), completions, {"answer": golds})
        elapsed = time.monotonic() - start
    n = len(HOSTILE)
    assert values[:n] == [None] * n
    assert values[n:] == [s for _, _, s in CLEAN]
    assert sorted((e.sample, e.kind) for e in errors) == [(i, "timeout") for i in range(n)]
    # 4 samples of 1.5 s on 2 workers, plus reloading the replaced workers; each alone ran past 30 s unbounded
    assert elapsed < 25, elapsed


def test_plain_numbers_are_scored_without_starting_any_worker():
    reward = BoundedReward("math", get("math"), timeout_s=1.0)
    values, errors = reward.score(["q"] * 3, ["#### 72", "The answer is 10.", "#### 5"],
                                  {"answer": ["72", "#### 10", "6"]})
    assert (values, errors) == ([1.0, 1.0, 0.0], [])
    assert reward._pool is None  # nothing needed sympy, so no process was started


def test_sixteen_threads_calling_the_verifier_do_not_wedge_the_process():
    reward = BoundedReward("math", get("math"), timeout_s=1.0, num_workers=2)
    hostile = list(HOSTILE.values())
    jobs = [(boxed(hostile[i]), "5", None) if i < len(hostile) else CLEAN[i % len(CLEAN)] for i in range(16)]
    results: dict[int, float | None] = {}
    beats: list[float] = []
    stop = threading.Event()

    def heartbeat():
        while not stop.is_set():
            beats.append(time.monotonic())
            time.sleep(0.02)

    def call(i: int) -> None:
        completion, gold, _ = jobs[i]
        results[i] = reward(["q"], [completion], answer=[gold])[0]

    try:
        reward(["q"], [CLEAN[0][0]], answer=[CLEAN[0][1]])  # start and load before timing
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(16)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - start
        stop.set()
        beat.join()
    finally:
        reward.close()
    assert not any(t.is_alive() for t in threads), "a thread is still stuck in the verifier"
    assert results == {i: expected for i, (_, _, expected) in enumerate(jobs)}
    # this process never stopped: the longest pause of a thread sleeping 20 ms at a time
    assert max(b - a for a, b in itertools.pairwise(beats)) < 1.0
    assert elapsed < 60, elapsed


def run_filter_cli(tmp_path, rows, extra_rule=None, workers=1):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "filter.yaml"
    rule = {"name": "verify_answer", "reward": "math", "timeout_s": 2, **(extra_rule or {})}
    config.write_text(json.dumps({"rules": [rule]}))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "posttrain.cli", "filter", "--config", str(config), "--input",
                          str(data), "--output", str(tmp_path / "out"), "--no-progress", "--workers", str(workers)],
                         capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr
    read = lambda name: [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]
    return read("kept.jsonl"), read("rejected.jsonl"), elapsed


def test_a_two_row_file_with_one_hostile_row_finishes_in_seconds(tmp_path):
    rows = [{"prompt": "What is 6*7?", "completion": "6*7 = \\boxed{42}", "answer": "42"},
            {"prompt": "What is it?", "completion": boxed(HOSTILE["factorial of a factorial"]), "answer": "5"}]
    kept, rejected, elapsed = run_filter_cli(tmp_path, rows)
    assert [r["answer"] for r in kept] == ["42"]
    assert len(rejected) == 1 and rejected[0]["completion"] == rows[1]["completion"]
    assert rejected[0]["filter_result"]["reasons"] == [
        "verify_answer: timeout: reward math ran past the 2 s limit (worker killed)"]
    assert rejected[0]["filter_result"]["scores"] == {"verify_answer.timeout": 1.0}
    assert elapsed < 30, elapsed  # start-up + one 2 s limit; it took 66 s in this process


def test_every_hostile_row_is_rejected_with_timeout_among_many_clean_ones_in_forked_screening(tmp_path):
    """Over 1,000 rows, so the rules run in forked screening processes (``--workers 2``): the reward workers are
    the filter process's own, and the rows after a timeout are still judged."""
    rows = []
    for i in range(1200):
        right = i % 3 != 0
        rows.append({"prompt": f"What is {i}+1?", "completion": f"{i}+1 = {i + 1}.\n#### {i + 1 if right else i}",
                     "answer": str(i + 1), "id": i})
    for k, (name, expr) in enumerate(HOSTILE.items()):
        rows.insert(300 * k + 7, {"prompt": name, "completion": boxed(expr), "answer": "5", "id": name})
    rows.insert(50, {"prompt": "half", "completion": r"\boxed{\frac{1}{2}}", "answer": "0.5", "id": "half"})
    kept, rejected, _ = run_filter_cli(tmp_path, rows, workers=2)
    timeouts = {r["id"] for r in rejected if r["filter_result"]["reasons"][0].startswith("verify_answer: timeout")}
    assert timeouts == set(HOSTILE)
    assert {r["id"] for r in kept} == {i for i in range(1200) if i % 3 != 0} | {"half"}
    assert {r["id"] for r in rejected} - timeouts == {i for i in range(1200) if i % 3 == 0}


@pytest.mark.parametrize("value", [0, -1])
def test_a_bad_time_limit_is_a_config_error_naming_the_field(tmp_path, value):
    from posttrain.judges.config import ConfigError, config_from_dict
    from posttrain.judges.rules import build_rules

    with pytest.raises(ConfigError, match=r"rules\.verify_answer\.timeout_s: must be > 0"):
        build_rules(config_from_dict({"rules": [{"name": "verify_answer", "timeout_s": value}]}).rules)


def test_preference_pair_scoring_bounds_the_models_answers():
    """``posttrain pairs`` scores the model's own answers: a hostile one scores None (no pair), in bounded time."""
    from posttrain.dpo.pairs import score_answers

    rows = [{"prompt": "What is 6*7?", "answer": "42"}, {"prompt": "What is it?", "answer": "5"}]
    answers = [["\\boxed{42}", "\\boxed{\\frac{84}{2}}"], [boxed(HOSTILE["huge binomial"]), "\\boxed{5}"]]
    start = time.monotonic()
    assert score_answers("math", {}, rows, "prompt", answers) == [[1.0, 1.0], [None, 1.0]]
    assert time.monotonic() - start < 40  # the pool's 10 s limit, plus starting and loading its worker
