"""The LLM judge against a real OpenAI-compatible server on 127.0.0.1 (posttrain.judges.scripted_server).

Covers: a filter run SIGKILLed midway and resumed (same output as an uninterrupted run, no answered prompt sent
again, at most `concurrency` in-flight prompts resent), 500s / unreadable bodies / slow answers (retried, then a
clear error, the cache keeping what was judged), unparseable verdicts under each policy, pairwise judging with a
judge that always prefers the first position (a tie), the preference set, and the llm_judge reward plugin.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from posttrain.judges.backends import JudgeBackendError
from posttrain.judges.config import config_from_dict
from posttrain.judges.judge import Judge
from posttrain.judges.pipeline import run_filter
from posttrain.judges.rubrics import load_rubric, render
from posttrain.judges.scripted_server import ScriptedJudgeServer, pointwise_score, prompt_key


@pytest.fixture
def server():
    with ScriptedJudgeServer() as s:
        yield s


def gsm8k_chats(shared_data: Path, n: int, path: Path) -> list[dict]:
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": r["answer"]}], "answer": r["answer"]})
            if len(rows) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def judge_config(server: ScriptedJudgeServer, **judge: object) -> dict:
    backend = {"type": "openai", "base_url": server.base_url, "model": "scripted", "api_key_env": None,
               "concurrency": 4, "max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0}
    backend.update(judge.pop("backend", {}))  # type: ignore[arg-type]
    return {"dedup": {"exact": False, "near": {"enabled": False}},
            "judge": {"enabled": True, "min_score": 6, "backend": backend, **judge}}


def judge_prompt(messages: list[dict]) -> str:
    """What the scripted server sees for a chat sample under the shipped pointwise rubric."""
    _, rubric = load_rubric("helpfulness")
    return render(rubric, prompt=f"user: {messages[0]['content']}", response=f"assistant: {messages[1]['content']}")


def test_pointwise_scores_follow_the_server_and_cache_answers(tmp_path, shared_data, server):
    rows = gsm8k_chats(shared_data, 30, tmp_path / "in.jsonl")
    config = config_from_dict(judge_config(server))
    report = run_filter(config, tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    kept = [json.loads(x) for x in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    expected = [pointwise_score(judge_prompt(r["messages"])) for r in rows]
    assert [r["filter_result"]["judge"]["score"] for r in kept] == [s for s in expected if s >= 6]
    assert [r["filter_result"]["judge"]["score"] for r in rejected] == [s for s in expected if s < 6]
    assert all(r["filter_result"]["stage"] == "judge" for r in rejected)
    assert len(server.requests) == 30 and sum(server.requests.values()) == 30
    assert report.judge_requests_sent == 30
    # a rerun is answered entirely from the cache
    report2 = run_filter(config, tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    assert sum(server.requests.values()) == 30
    assert report2.judge_requests_cached == 30 and report2.judge_requests_sent == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["judge"]["model"] == "scripted" and "{{response}}" in manifest["judge"]["rubric"]
    assert manifest["counts"]["rejected_by_filter"]["judge_score"] == len(rejected)


def _run_cli(input_path: Path, out: Path, config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "filter", "--config", str(config_path), "--input", str(input_path),
         "--output", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_midway_then_resume_matches_an_uninterrupted_run(tmp_path, shared_data, server):
    import yaml

    n, concurrency = 120, 4
    gsm8k_chats(shared_data, n, tmp_path / "in.jsonl")
    config_path = tmp_path / "filter.yaml"
    config_path.write_text(yaml.safe_dump(judge_config(server, backend={"concurrency": concurrency})))
    server.delay_s = 0.03

    proc = _run_cli(tmp_path / "in.jsonl", tmp_path / "resumed", config_path)
    deadline = time.time() + 60
    while sum(server.answered.values()) < n // 3:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the filter run never reached the judge"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)  # let the server finish the requests it was serving
    first_run_requests = dict(server.requests)
    assert sum(first_run_requests.values()) < n, "the run finished before it was killed"
    assert not (tmp_path / "resumed" / "kept.jsonl").exists()
    with sqlite3.connect(tmp_path / "resumed" / "judge_cache.sqlite") as db:
        cached = {prompt_key(json.loads(req)["messages"][-1]["content"])
                  for (req,) in db.execute("SELECT request FROM answers")}
    assert len(cached) >= n // 3 - concurrency

    proc = _run_cli(tmp_path / "in.jsonl", tmp_path / "resumed", config_path)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # nothing whose answer had arrived before the kill is asked again; at most `concurrency` prompts are resent
    assert all(server.requests[k] == 1 for k in cached)
    resent = [k for k, c in server.requests.items() if c > 1]
    assert len(resent) <= concurrency
    assert all(server.requests[k] == 2 for k in resent)
    assert len(server.requests) == n

    server.requests.clear()
    proc = _run_cli(tmp_path / "in.jsonl", tmp_path / "straight", config_path)
    assert proc.communicate(timeout=120) and proc.returncode == 0
    for name in ("kept.jsonl", "rejected.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert server.max_in_flight <= concurrency


def test_server_errors_are_retried_then_fail_clearly_keeping_the_cache(tmp_path, shared_data, server):
    gsm8k_chats(shared_data, 12, tmp_path / "in.jsonl")
    config = config_from_dict(judge_config(server))
    # transient 500s: retried with backoff, the run succeeds, every prompt answered once
    server.fail_next = 3
    run_filter(config, tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    assert sum(server.answered.values()) == 12 and sum(server.requests.values()) == 15

    # a server that keeps failing after 8 answers: a clear error naming the endpoint; the 8 answers are cached
    gsm8k_chats(shared_data, 20, tmp_path / "in20.jsonl")
    config1 = config_from_dict(judge_config(server, backend={"concurrency": 1}))
    server.requests.clear()
    server.answered.clear()

    original_verdict = server.verdict

    def verdict_then_break(content: str) -> str:
        if sum(server.answered.values()) >= 7:
            server.always_fail = True
        return original_verdict(content)

    server.verdict = verdict_then_break  # type: ignore[method-assign]
    with pytest.raises(JudgeBackendError, match=r"127\.0\.0\.1.*failed 3 times; last: HTTP 500"):
        run_filter(config1, tmp_path / "in20.jsonl", tmp_path / "out20", show_progress=False)
    assert not (tmp_path / "out20" / "kept.jsonl").exists()
    with sqlite3.connect(tmp_path / "out20" / "judge_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 8
    server.always_fail = False
    server.verdict = original_verdict  # type: ignore[method-assign]
    answered_before = set(server.answered)
    report = run_filter(config1, tmp_path / "in20.jsonl", tmp_path / "out20", show_progress=False)
    assert (report.judge_requests_cached, report.judge_requests_sent) == (8, 12)
    assert all(server.answered[k] == 1 for k in answered_before)  # nothing judged before is asked again
    assert len(server.answered) == 20


def test_unreadable_bodies_and_slow_answers_are_retried_then_reported(tmp_path, shared_data, server):
    gsm8k_chats(shared_data, 3, tmp_path / "in.jsonl")
    server.garbage_body = True
    config = config_from_dict(judge_config(server, backend={"max_retries": 1, "concurrency": 1}))
    with pytest.raises(JudgeBackendError, match="unreadable response body"):
        run_filter(config, tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    assert sum(server.requests.values()) == 2  # one prompt, tried twice, then the run stopped
    server.garbage_body = False
    server.requests.clear()
    server.delay_s = 0.5
    config = config_from_dict(judge_config(server, backend={"max_retries": 1, "concurrency": 1, "timeout_s": 0.1}))
    with pytest.raises(JudgeBackendError, match="timed out after 0.1s"):
        run_filter(config, tmp_path / "in.jsonl", tmp_path / "out2", show_progress=False)
    assert sum(server.requests.values()) == 2


@pytest.mark.parametrize("policy", ["keep", "drop", "retry"])
def test_unparseable_verdicts_follow_the_policy(tmp_path, shared_data, server, policy):
    gsm8k_chats(shared_data, 4, tmp_path / "in.jsonl")
    server.garbage_verdict = True
    config = config_from_dict(judge_config(server, on_unparseable=policy, max_attempts=3))
    report = run_filter(config, tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    assert sum(server.requests.values()) == (12 if policy == "retry" else 4)
    rows = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    if policy == "keep":
        assert report.kept == 4
    else:
        assert report.kept == 0 and len(rows) == 4
        assert all(r["filter_result"]["judge"]["parsed"] is False for r in rows)
        assert all("unparseable" in r["filter_result"]["reasons"][0] for r in rows)
        assert rows[0]["filter_result"]["judge"]["answer"] == "I would rather not say."


def pair_rows(path: Path) -> list[dict]:
    rows = [
        {"prompt": "What is 2 + 3?", "response_a": "5", "response_b": "2 + 3 = 5, so the answer is 5."},
        {"prompt": "Name a prime.", "response_a": "7 is a prime number.", "response_b": "7"},
        {"prompt": "Say hi.", "response_a": "hi", "response_b": "yo"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_pairwise_with_an_always_first_judge_is_a_tie(tmp_path, server):
    pair_rows(tmp_path / "pairs.jsonl")
    server.always_first = True
    config = config_from_dict(judge_config(server, mode="pairwise", rubric="pairwise"))
    report = run_filter(config, tmp_path / "pairs.jsonl", tmp_path / "out", show_progress=False)
    assert report.kept == 0
    assert (tmp_path / "out" / "preferences.jsonl").read_text() == ""
    rows = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["filter_result"]["judge"]["winner"] for r in rows] == ["tie"] * 3
    assert all(r["filter_result"]["judge"]["a_first"] == "A" == r["filter_result"]["judge"]["b_first"] for r in rows)
    assert sum(server.requests.values()) == 6  # each pair judged in both orders


def test_pairwise_preferences_are_written_with_provenance(tmp_path, server):
    rows = pair_rows(tmp_path / "pairs.jsonl")
    config = config_from_dict(judge_config(server, mode="pairwise", rubric="pairwise"))
    report = run_filter(config, tmp_path / "pairs.jsonl", tmp_path / "out", show_progress=False)
    prefs = [json.loads(x) for x in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    # the scripted judge prefers the longer response in either order; "hi" vs "yo" is a tie
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [
        (rows[0]["prompt"], rows[0]["response_b"], rows[0]["response_a"]),
        (rows[1]["prompt"], rows[1]["response_a"], rows[1]["response_b"]),
    ]
    assert prefs[0]["provenance"]["judge_model"] == "scripted" and prefs[0]["provenance"]["source_index"] == 0
    assert report.rejected_by == {"judge_tie": 1}


def test_llm_judge_reward_through_the_rewards_registry(tmp_path, server, monkeypatch):
    import yaml

    from posttrain import rewards

    config_path = tmp_path / "judge.yaml"
    cfg = judge_config(server)
    cfg["judge"]["cache"] = str(tmp_path / "reward_cache.sqlite")
    config_path.write_text(yaml.safe_dump({"judge": cfg["judge"]}))
    monkeypatch.setenv("POSTTRAIN_LLM_JUDGE_CONFIG", str(config_path))
    import posttrain.judges.reward as reward_module

    monkeypatch.setattr(reward_module, "_configured", None)
    fn = rewards.get("llm_judge")
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Capital of France?"}]]
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "Paris"}]]
    scores = fn(prompts, completions)
    _, rubric = load_rubric("helpfulness")
    expected = [(pointwise_score(render(rubric, prompt=f"user: {p[0]['content']}",
                                        response=f"assistant: {c[0]['content']}")) - 1) / 9
                for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected)
    server.garbage_verdict = True
    assert fn([[{"role": "user", "content": "new"}]], [[{"role": "assistant", "content": "x"}]]) == [None]


def test_judge_client_keeps_concurrency_bounded(tmp_path, server):
    server.delay_s = 0.05
    config = config_from_dict(judge_config(server, backend={"concurrency": 3})).judge
    judge = Judge(config, tmp_path / "cache.sqlite")
    verdicts = judge.score([f"question {i}" for i in range(12)], [f"answer {i}" for i in range(12)])
    judge.close()
    assert server.max_in_flight == 3
    assert all(v.score is not None for v in verdicts)
    assert os.path.getsize(tmp_path / "cache.sqlite") > 0


def test_rate_limits_are_retried_and_a_down_endpoint_is_a_clear_error(tmp_path, shared_data, server):
    import socket

    gsm8k_chats(shared_data, 5, tmp_path / "in.jsonl")
    server.fail_status, server.fail_next = 429, 4
    report = run_filter(config_from_dict(judge_config(server, backend={"concurrency": 1, "max_retries": 4})),
                        tmp_path / "in.jsonl", tmp_path / "out", show_progress=False)
    assert report.judge_requests_sent == 5 and sum(server.requests.values()) == 9

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = judge_config(server, backend={"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1})
    with pytest.raises(JudgeBackendError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed 2 times; "
                                                r"last: connection failed: ConnectError"):
        run_filter(config_from_dict(config), tmp_path / "in.jsonl", tmp_path / "out_down", show_progress=False)
