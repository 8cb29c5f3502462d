"""The math reward on the real GSM8K test split, math-verify equivalences, extraction order, threads, and
pathological inputs through the worker pool."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from posttrain.rewards import RewardConfigError, RewardPool, RewardSet, WeightedReward, get
from posttrain.rewards.math import MathReward, extract_answer, gold_answer_text, last_boxed


@pytest.fixture(scope="module")
def gsm8k_test(shared_data: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    assert len(rows) == 1319
    return rows


def _change_final_number(solution: str) -> str:
    head, tail = solution.rsplit("####", 1)
    number = int(tail.strip().replace(",", ""))
    return f"{head}#### {number + 1}"


def test_every_gsm8k_test_solution_scores_1_and_0_once_its_final_number_changes(gsm8k_test: list[dict]) -> None:
    reward = get("math")
    solutions = [row["answer"] for row in gsm8k_test]
    golds = [gold_answer_text(s) for s in solutions]
    start = time.monotonic()
    right = reward(["q"] * len(solutions), solutions, answer=golds)
    wrong = reward(["q"] * len(solutions), [_change_final_number(s) for s in solutions], answer=golds)
    elapsed = time.monotonic() - start
    assert right == [1.0] * 1319
    assert wrong == [0.0] * 1319
    # the full solution as the gold column works the same (the answer after '####' is taken)
    assert reward(["q"] * 50, solutions[:50], answer=solutions[:50]) == [1.0] * 50
    assert elapsed < 10, f"2 x 1319 GSM8K scores took {elapsed:.1f} s: the plain-number path should skip sympy"


@pytest.mark.parametrize(
    ("gold", "completion"),
    [
        ("0.5", r"The result is $\boxed{\frac12}$."),
        ("1000", "The answer is 1,000."),
        ("18", r"She makes \$18 a day. The answer is \$18."),
        ("5", r"Solving gives $x = 5$. The answer is x = 5"),
        ("18", r"First I got 16 eggs, then 9 left, so the total is \boxed{18}. Check: 17 was wrong."),
        (r"\frac{1}{3}", r"\boxed{0.333333}"),
        (r"\sqrt{2}", r"\boxed{2^{1/2}}"),
        ("2", r"\boxed{\frac{4}{2}}"),
        ("1,234,567", "#### 1234567"),
        ("-3", r"\boxed{-3}"),
        ("50", "The answer is 50%."),
        (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}"),
        ("(1,2)", r"\boxed{(1, 2)}"),
        ("1+x^2", r"\boxed{x^2+1}"),
        (r"\sqrt{12}", r"\boxed{2\sqrt{3}}"),
        ("18", r"\boxed{18 \text{ dollars}}"),
        ("18", r"\boxed{\$18.00}"),
        ("1000", r"\boxed{1{,}000}"),
        ("-4", "\\boxed{\u22124}"),  # a unicode minus sign
    ],
)
def test_equivalent_answers_score_1(gold: str, completion: str) -> None:
    assert MathReward().score(completion, gold) == 1.0


@pytest.mark.parametrize(
    ("gold", "completion"),
    [
        ("12", r"\boxed{1.2}"),
        ("18", r"\boxed{180}"),
        ("1450000", "#### 1450001"),
        ("0.5", r"\boxed{\frac{1}{3}}"),
        ("18", "I could not solve it."),
        ("5", r"\boxed{x = 6}"),
        ("x^2+1", r"\boxed{x^2+2}"),
        ("(1,2)", r"\boxed{(2, 1)}"),
    ],
)
def test_near_misses_and_missing_answers_score_0(gold: str, completion: str) -> None:
    assert MathReward().score(completion, gold) == 0.0


def test_unparseable_gold_is_none_not_zero() -> None:
    reward = MathReward()
    assert reward(["q"] * 3, ["5", "5", "5"], answer=["", r"\frac{", None]) == [None, None, None]


def test_which_candidate_the_extractor_picks() -> None:
    # boxed beats everything, and the last complete box wins; nested braces are kept
    assert extract_answer(r"\boxed{1} then \boxed{\frac{2}{3}} #### 9 The answer is 7. 8") == r"\frac{2}{3}"
    assert last_boxed(r"\boxed{a{b{c}}d} and an unclosed \boxed{x") == "a{b{c}}d"
    assert extract_answer(r"\fbox{12}") == "12"
    # then '####', then 'The answer is', then the last number
    assert extract_answer("The answer is 7.\n#### 9\n10 more") == "9"
    assert extract_answer("I think 3, no 4. The final answer is: 42. Then 5 more words 6") == "42"
    assert extract_answer("first 3, then 4, finally 5 apples") == "5"
    assert extract_answer("first 3, then 4,000 pens.") == "4,000"
    # the fallback is configurable
    assert extract_answer("first 3, then 5", last_number_fallback=False) is None
    assert MathReward(last_number_fallback=False).score("it is 5", "5") == 0.0
    assert MathReward().score("it is 5", "5") == 1.0


def test_scoring_from_8_threads_at_once(gsm8k_test: list[dict]) -> None:
    reward = MathReward()
    cases = [
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{2^{1/2}}", r"\sqrt{2}", 1.0),
        (r"\boxed{0.4}", "0.5", 0.0),
    ]
    cases += [(row["answer"], gold_answer_text(row["answer"]), 1.0) for row in gsm8k_test[:40]]
    results: dict[int, list[float | None]] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(k: int) -> None:
        try:
            barrier.wait()
            results[k] = [reward.score(c, g) for c, g, _ in cases]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(results[k] == [e for _, _, e in cases] for k in range(8))


def test_pathological_inputs_return_within_5_s_through_the_pool() -> None:
    tower = r"The answer is \boxed{9^{9^{9^{9}}}}"
    huge = "blah 7 " * 15_000  # over 100 KB
    nested = r"\boxed{" * 15_000  # 105 KB of unclosed boxes
    completions = [tower, huge, nested, r"\boxed{18}"]
    assert len(huge) > 100_000 and len(nested) > 100_000
    rewards = RewardSet([WeightedReward("math", get("math"))])
    with RewardPool(num_workers=2, timeout_s=4.0) as pool:
        warm = rewards.score(["q"] * 2, [r"\boxed{1}"] * 2, pool=pool, answer=["1", "1"])  # both workers load sympy
        assert warm.total == [1.0, 1.0]
        start = time.monotonic()
        result = rewards.score(["q"] * 4, completions, pool=pool, answer=["5", "7", "5", "18"])
        elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert result.values["math"] == [0.0, 1.0, 0.0, 1.0]
    assert result.errors == []


def test_a_stuck_sympy_call_is_bounded_by_the_pool() -> None:
    """math-verify with its timeout off can hang in sympy (C code, no signal helps): the pool kills it."""
    with RewardPool(num_workers=1, timeout_s=2.0) as pool:
        stuck = get("posttrain.rewards.math:MathReward", max_digits=None)  # size guard off
        assert pool.run({"math": stuck}, ["q"], [r"\boxed{1}"], {"answer": ["1"]}) == ({"math": [1.0]}, [])  # warm
        start = time.monotonic()
        values, errors = pool.run(
            {"math": stuck}, ["q"] * 2, [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{3}"], {"answer": ["5", "3"]}
        )
        elapsed = time.monotonic() - start
    assert values == {"math": [None, 1.0]}
    assert [(e.sample, e.kind) for e in errors] == [(0, "timeout")]
    assert elapsed < 5.0, f"took {elapsed:.1f} s with a 2 s limit"


def test_gold_column_name_is_an_option() -> None:
    reward = get("math", answer_column="solution")
    assert reward(["q"], [r"\boxed{4}"], solution=["4"]) == [1.0]
    with pytest.raises(RewardConfigError, match="column 'solution'"):
        reward(["q"], [r"\boxed{4}"], answer=["4"])
