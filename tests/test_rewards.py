"""The reward registry, the weighted RewardSet, the worker pool (real processes), format/overlong and the plugin.

Rewards run in worker processes that import them by name, so the test rewards live in a real module written
to a temporary folder put on ``sys.path`` (workers inherit it), which also exercises ``module:function`` paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from posttrain.rewards import (
    RewardConfigError,
    RewardCountError,
    RewardLoadError,
    RewardNotPicklableError,
    RewardOptionError,
    RewardPool,
    RewardsConfig,
    RewardSet,
    RewardSpec,
    UnknownRewardError,
    WeightedReward,
    available,
    combine,
    combine_values,
    completion_text,
    get,
)
from posttrain.rewards.format import FormatReward, OverlongReward

REPO = Path(__file__).resolve().parent.parent

REWARDS_MODULE = '''
"""Rewards for the pool tests: each behaves according to the sample's `mode` column."""
import asyncio
import os
import subprocess
import time


def by_mode(prompts, completions, mode, **columns):
    out = []
    for completion, m in zip(completions, mode):
        if m == "hang":
            while True:  # busy loop: no signal-based limit would stop C code either
                pass
        if m == "raise":
            raise ValueError("boom on purpose")
        if m == "exit":
            os._exit(7)
        if m.startswith("spawn_and_hang:"):
            child = subprocess.Popen(["sleep", "60"])
            with open(m.split(":", 1)[1], "w") as fh:
                fh.write(str(child.pid))
            while True:
                pass
        if m == "nan":
            out.append(float("nan"))
        elif m == "none":
            out.append(None)
        else:
            out.append(float(len(completion)))
    return out


def two_values(prompts, completions, **columns):
    return [1.0, 2.0]


def record_interval(prompts, completions, log_dir, **columns):
    start = time.monotonic()
    time.sleep(0.4)
    end = time.monotonic()
    with open(os.path.join(log_dir[0], f"{os.getpid()}-{start}.json"), "w") as fh:
        fh.write(f'{{"pid": {os.getpid()}, "start": {start}, "end": {end}}}')
    return [1.0]


async def async_len(prompts, completions, **columns):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def with_option(prompts, completions, *, scale=1.0, **columns):
    return [scale * len(c) for c in completions]
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("reward_module")
    (folder / "posttrain_test_pool_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(folder))
    yield "posttrain_test_pool_rewards"
    sys.path.remove(str(folder))
    sys.modules.pop("posttrain_test_pool_rewards", None)


@pytest.fixture(scope="module")
def pool(reward_module: str) -> RewardPool:
    with RewardPool(num_workers=2, timeout_s=1.5) as pool:
        yield pool


# ---------------------------------------------------------------------------------------------- registry


def test_builtins_resolve_lazily_and_unknown_names_list_what_exists() -> None:
    code = (
        "import sys, posttrain.rewards as r; "
        "assert 'sympy' not in sys.modules and 'math_verify' not in sys.modules; "
        "assert 'posttrain.rewards.code' not in sys.modules and 'posttrain.rewards.sandbox' not in sys.modules; "
        "print('ok')"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
    assert set(available()) >= {"math", "code", "tool_call", "format", "overlong"}
    with pytest.raises(UnknownRewardError) as err:
        get("maths")
    assert "maths" in str(err.value) and "math" in str(err.value) and "tool_call" in str(err.value)
    with pytest.raises(UnknownRewardError, match="cannot import module"):
        get("no_such_module_xyz:fn")
    with pytest.raises(UnknownRewardError, match="has no attribute"):
        get("posttrain.rewards.math:nope")


def test_options_are_validated(reward_module: str) -> None:
    overlong = get("overlong", max_len=100, cache_len=20)
    assert overlong([""] * 3, [""] * 3, completion_ids=[[0] * 80, [0] * 90, [0] * 120]) == [0.0, -0.5, -1.0]
    with pytest.raises(RewardOptionError, match="max_len"):
        get("overlong", max_length=100)
    with pytest.raises(ValueError, match="cache_len"):
        get("overlong", max_len=10, cache_len=20)
    code = get("code", binary=True)  # a function's keyword-only parameters are its options
    assert code.func.__module__ == "posttrain.rewards.code" and code.keywords == {"binary": True}
    with pytest.raises(RewardOptionError, match="binaryy"):
        get("code", binaryy=True)
    scaled = get(f"{reward_module}:with_option", scale=2.0)
    assert scaled(["p"], ["abc"]) == [6.0]
    with pytest.raises(RewardOptionError, match="scaling"):
        get(f"{reward_module}:with_option", scaling=2.0)


def test_completion_text_takes_the_last_assistant_message() -> None:
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "first"},
        {"role": "tool", "content": "out"},
        {"role": "assistant", "content": [{"type": "text", "text": "fin"}, {"type": "text", "text": "al"}]},
    ]
    assert completion_text(chat) == "final"
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "user", "content": "q"}]) == ""
    math_reward = get("math")
    assert math_reward(["q"], [[{"role": "assistant", "content": r"so \boxed{7}"}]], answer=["7"]) == [1.0]


# ---------------------------------------------------------------------------------------------- combination


def test_weighted_sum_skips_none_and_unscorable_samples_stay_none(reward_module: str) -> None:
    assert combine_values({"a": [1.0, None, None], "b": [0.5, 2.0, None]}, {"a": 2.0, "b": -1.0}) == [1.5, -2.0, None]
    rewards = RewardSet(
        [
            WeightedReward("len", get(f"{reward_module}:by_mode"), 0.5),
            WeightedReward("fmt", FormatReward(tags=(), regex=r"a+"), 2.0),
        ]
    )
    result = rewards.score(["p"] * 3, ["aaaa", "bb", "ccc"], mode=["ok", "none", "none"])
    assert result.values == {"len": [4.0, None, None], "fmt": [1.0, 0.0, 0.0]}
    assert result.total == [4.0, 0.0, 0.0]
    only_len = RewardSet([WeightedReward("len", get(f"{reward_module}:by_mode"))])
    result = only_len.score(["p"] * 3, ["aaaa", "bb", "ccc"], mode=["ok", "none", "raise"])
    assert result.total == [4.0, None, None] and result.unscored == [1, 2]
    assert [(e.sample, e.reward, e.kind) for e in result.errors] == [(2, "len", "exception")]
    metrics = result.metrics()
    assert metrics["rewards/len/mean"] == 4.0 and metrics["rewards/len/std"] == 0.0
    assert metrics["rewards/unscored"] == 2.0 and metrics["rewards/errors"] == 1.0
    assert metrics["rewards/len/none_frac"] == pytest.approx(2 / 3)


def test_async_rewards_work_in_process_even_inside_a_running_event_loop(reward_module: str) -> None:
    import asyncio

    rewards = RewardSet([WeightedReward("a", get(f"{reward_module}:async_len"))])
    assert rewards.score(["p", "p"], ["ab", "abc"]).total == [2.0, 3.0]

    async def inside_a_loop() -> list[float | None]:
        return rewards.score(["p"], ["abcd"]).total

    assert asyncio.run(inside_a_loop()) == [4.0]


def test_reward_set_from_config_and_combine(reward_module: str) -> None:
    config = RewardsConfig(
        rewards=[
            {"name": "math", "weight": 1.0},
            {"name": "format", "weight": 0.5, "options": {"tags": ["think"]}},
            {"name": f"{reward_module}:with_option", "label": "len", "weight": 0.0, "options": {"scale": 0.5}},
        ],
        num_workers=0,
    )
    rewards, pool = config.build()
    assert pool is None
    result = rewards.score(["q", "q"], [r"<think>2+2</think> \boxed{4}", "4"], answer=["4", "5"])
    assert result.values["math"] == [1.0, 0.0]
    assert result.values["format"] == [1.0, 0.0]
    assert result.values["len"] == [14.0, 0.5]
    assert result.total == [1.5, 0.0]
    combined = combine(("math", 1.0), (get("format"), 0.2))
    assert [r.name for r in combined.rewards] == ["math", "format"]
    with pytest.raises(ValueError, match="unique"):
        RewardSet.from_specs([RewardSpec("math"), RewardSpec("math")])
    with pytest.raises(UnknownRewardError):
        RewardsConfig(rewards=[{"name": "nope"}]).build()


# ---------------------------------------------------------------------------------------------- the pool


def test_workers_run_concurrently(pool: RewardPool, reward_module: str, tmp_path: Path) -> None:
    fn = get(f"{reward_module}:record_interval")
    pool.run({"warm": fn}, ["p"] * 2, ["c"] * 2, {"log_dir": [str(tmp_path)] * 2})  # load it in both workers
    for f in tmp_path.iterdir():
        f.unlink()
    start = time.monotonic()
    values, errors = pool.run({"rec": fn}, ["p"] * 4, ["c"] * 4, {"log_dir": [str(tmp_path)] * 4})
    elapsed = time.monotonic() - start
    assert values == {"rec": [1.0] * 4} and errors == []
    intervals = [json.loads(f.read_text()) for f in tmp_path.iterdir()]
    assert len(intervals) == 4 and len({i["pid"] for i in intervals}) == 2
    overlapping = [
        (a, b)
        for a in intervals
        for b in intervals
        if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlapping, f"no two executions overlapped in time: {intervals}"
    assert elapsed < 4 * 0.4, f"4 x 0.4 s on 2 workers took {elapsed:.2f} s"


def test_timeout_kills_and_replaces_the_worker_and_the_run_goes_on(pool: RewardPool, reward_module: str) -> None:
    fn = get(f"{reward_module}:by_mode")
    pids_before = set(pool.pids())
    replaced_before = pool.workers_replaced
    start = time.monotonic()
    values, errors = pool.run({"m": fn}, ["p"] * 4, ["a", "bb", "ccc", "dddd"], {"mode": ["ok", "hang", "ok", "ok"]})
    elapsed = time.monotonic() - start
    assert values == {"m": [1.0, None, 3.0, 4.0]}
    assert [(e.sample, e.reward, e.kind) for e in errors] == [(1, "m", "timeout")]
    assert "1.5 s time limit" in errors[0].message
    assert pool.workers_replaced == replaced_before + 1
    assert len(set(pool.pids()) - pids_before) == 1 and len(pool.pids()) == 2
    assert elapsed < 6.0
    # the replacement worker scores the next samples normally
    values, errors = pool.run({"m": fn}, ["p"] * 3, ["xy"] * 3, {"mode": ["ok"] * 3})
    assert values == {"m": [2.0, 2.0, 2.0]} and errors == []


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie waiting for init to reap it is dead


def test_a_timeout_also_kills_what_the_reward_started(pool: RewardPool, reward_module: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    values, errors = pool.run(
        {"m": get(f"{reward_module}:by_mode")}, ["p"], ["c"], {"mode": [f"spawn_and_hang:{pid_file}"]}
    )
    assert values == {"m": [None]} and [e.kind for e in errors] == ["timeout"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"the reward's child process {child} outlived its killed worker"


def test_a_failing_sample_costs_only_itself(pool: RewardPool, reward_module: str) -> None:
    fn = get(f"{reward_module}:by_mode")
    modes = ["ok", "raise", "exit", "nan", "none", "ok"]
    values, errors = pool.run(
        {"m": fn, "a": get(f"{reward_module}:async_len")}, ["p"] * 6, ["abc"] * 6, {"mode": modes}
    )
    assert values["m"] == [3.0, None, None, None, None, 3.0]
    assert values["a"] == [3.0] * 6  # async rewards run in the workers too
    kinds = {e.sample: e.kind for e in errors}
    assert kinds == {1: "exception", 2: "worker_died", 3: "invalid_value"}
    assert "boom on purpose" in next(e.message for e in errors if e.sample == 1)
    assert "exit code 7" in next(e.message for e in errors if e.sample == 2)


def test_wrong_count_and_unpicklable_rewards_are_clear_errors(pool: RewardPool, reward_module: str) -> None:
    with pytest.raises(RewardCountError, match=r"'two' returned 2 values for 1 completions"):
        pool.run({"two": get(f"{reward_module}:two_values")}, ["p"], ["c"])
    with pytest.raises(RewardCountError, match=r"returned 2 values for 3 completions"):
        RewardSet([WeightedReward("two", get(f"{reward_module}:two_values"))]).score(["p"] * 3, ["c"] * 3)
    with pytest.raises(RewardConfigError, match="column 'answer'"):  # a missing column stops the run
        pool.run({"math": get("math")}, ["p"], ["c"], {"solution": ["1"]})
    with pytest.raises(RewardConfigError, match="column 'answer'"):
        RewardSet([WeightedReward("math", get("math"))]).score(["p"], ["c"], solution=["1"])
    with pytest.raises(RewardNotPicklableError, match="module:function"):
        pool.run({"lam": lambda prompts, completions, **kw: [1.0] * len(completions)}, ["p"], ["c"])
    # in-process rewards need no pickling: a lambda works when marked so, beside pooled rewards
    rewards = RewardSet(
        [
            WeightedReward("lam", lambda prompts, completions, **kw: [0.5] * len(completions), in_process=True),
            WeightedReward("m", get(f"{reward_module}:by_mode")),
        ]
    )
    result = rewards.score(["p"] * 2, ["ab", "abc"], pool=pool, mode=["ok", "ok"])
    assert result.total == [2.5, 3.5]
    # and the pool is still usable after those errors
    assert pool.run({"m": get(f"{reward_module}:by_mode")}, ["p"], ["abcd"], {"mode": ["ok"]}) == ({"m": [4.0]}, [])


def test_a_reward_workers_cannot_import_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "posttrain_test_parent_only.py").write_text("def r(prompts, completions, **kw):\n    return [1.0]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        fn = get("posttrain_test_parent_only:r")
    finally:
        sys.path.remove(str(tmp_path))  # workers started from now on cannot import it
    try:
        with RewardPool(num_workers=1, timeout_s=5) as pool:
            with pytest.raises(RewardLoadError, match="could not load reward 'r'") as err:
                pool.run({"r": fn}, ["p"], ["c"])
            assert "posttrain_test_parent_only" in str(err.value)
            assert pool.run({"m": get("format")}, ["p"], ["<think>t</think> a"]) == ({"m": [1.0]}, [])
    finally:
        sys.modules.pop("posttrain_test_parent_only", None)


SCRIPT_WITH_MAIN_REWARD = """
from posttrain.rewards import RewardPool, RewardSet, WeightedReward


def shout(prompts, completions, **columns):
    return [float(c.isupper()) for c in completions]


if __name__ == "__main__":
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        result = RewardSet([WeightedReward("shout", shout)]).score(["p", "p"], ["YES", "no"], pool=pool)
    print(result.total)
"""


def test_rewards_defined_in_main(tmp_path: Path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT_WITH_MAIN_REWARD)
    run = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[1.0, 0.0]"  # a script's functions reach the workers (they re-import it)
    interactive = SCRIPT_WITH_MAIN_REWARD.replace('if __name__ == "__main__":', "if True:")
    run = subprocess.run([sys.executable, "-c", interactive], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "RewardNotPicklableError" in run.stderr and "interactive __main__" in run.stderr


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_closed_pool_leaves_no_worker(reward_module: str, start_method: str) -> None:
    pool = RewardPool(num_workers=2, timeout_s=5, start_method=start_method)
    processes = [w.process for w in pool._workers]
    assert pool.run({"m": get(f"{reward_module}:by_mode")}, ["p"], ["ab"], {"mode": ["ok"]})[0] == {"m": [2.0]}
    pool.close()
    assert all(not p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run({"m": get(f"{reward_module}:by_mode")}, ["p"], ["ab"], {"mode": ["ok"]})
    with pytest.raises(ValueError, match="fork"):
        RewardPool(num_workers=1, start_method="fork")


# ---------------------------------------------------------------------------------------------- format / overlong


def test_format_reward() -> None:
    fmt = FormatReward()
    assert fmt(
        ["p"] * 5,
        ["<think>x</think> 42", "<think>x</think>", "42", "<think>a</think><think>b</think> 1", "<think>x 42"],
    ) == [
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    ordered = FormatReward(tags=("think", "answer"), require_text_after_tags=False)
    assert ordered.score("<think>r</think>\n<answer>4</answer>") == 1.0
    assert ordered.score("<answer>4</answer><think>r</think>") == 0.0
    partial = FormatReward(tags=("think",), regex=r".*\d+", max_chars=30, partial=True)
    assert partial.score("<think>r</think> 42") == 1.0
    assert partial.score("<think>r</think> forty-two") == pytest.approx(2 / 3)
    assert partial.score("no tags, and far too long to pass: it ends in 42") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="does not compile"):
        FormatReward(regex="(")


def test_overlong_reward_follows_dapo() -> None:
    reward = OverlongReward(max_len=20, cache_len=4)
    lengths = [0, 16, 17, 18, 20, 21, 100]
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert reward([""] * 7, [""] * 7, completion_ids=[[1] * n for n in lengths]) == expected

    class WordTokenizer:  # anything with encode(text, add_special_tokens=False)
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [0] * len(text.split())

    with_tokenizer = OverlongReward(max_len=20, cache_len=4, tokenizer=WordTokenizer())
    assert with_tokenizer(["p", "p"], ["w " * 10, "w " * 18]) == [0.0, -0.5]
    with pytest.raises(RewardConfigError, match="completion_ids"):
        reward(["p"], ["text"])


# ---------------------------------------------------------------------------------------------- plugin


def test_example_plugin_installs_and_is_found_by_name(tmp_path: Path) -> None:
    source = tmp_path / "src_plugin"
    shutil.copytree(REPO / "examples" / "reward_plugin", source)  # pip builds in place: keep the repo clean
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    with pytest.raises(UnknownRewardError, match="repetition"):
        get("repetition")
    sys.path.insert(0, str(target))
    try:
        assert "repetition" in available() and "plugin" in available()["repetition"]
        reward = get("repetition")
        assert reward(["p"] * 3, ["a b c d e f", "go go go go go go", "hi"]) == [0.0, -0.75, None]
        assert get("repetition", n=2)(["p"], ["a b a b"]) == [pytest.approx(-1 / 3)]
        with RewardPool(num_workers=1, timeout_s=5) as plugin_pool:  # workers find the plugin too
            values, errors = plugin_pool.run({"rep": reward}, ["p"], ["x y z x y z"])
        assert values == {"rep": [-0.25]} and errors == []
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("posttrain_repetition_reward", None)
    with pytest.raises(UnknownRewardError):
        get("repetition")
