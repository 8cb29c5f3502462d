"""``posttrain serve`` as a real HTTP server on 127.0.0.1: OpenAI shapes, sampling options, streaming, tool calls,
request validation, batching of concurrent requests, and the command line in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from posttrain.rollout import Capabilities, SamplingParams
from posttrain.rollout.native import NativeEngine
from posttrain.serving.generation import TextGenerator
from posttrain.serving.server import ModelServer
from posttrain.synthetic import tiny_model

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
TOOL_QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]
TOOL_ANSWER = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
PROMPT = "Question: Ada has 12 apples and gets 7 more. How many apples does Ada have?\nAnswer:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model taught one tool-calling exchange by heart, saved with its tokenizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread avoids contention between torch's own threads
    torch.manual_seed(0)
    tokenizer, model = tiny_model(steps=0)
    prompt = tokenizer.apply_chat_template(TOOL_QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt + TOOL_ANSWER + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :n_prompt] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(x, labels=labels, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("serve_ckpt") / "tiny-tools"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    yield tokenizer, model, folder
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(checkpoint):
    tokenizer, model, _ = checkpoint
    with ModelServer(tokenizer, NativeEngine(model), "tiny-tools", model.config, port=0,
                     max_request_tokens=2048) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=300) as c:
        yield c


def reference_texts(checkpoint, prompt_ids, **kwargs):
    """What the engine itself produces, decoded by the same rules (the server's answer must equal it)."""
    tokenizer, model, _ = checkpoint
    generator = TextGenerator.for_model(tokenizer, model.config, NativeEngine(model).generate)
    stop = kwargs.pop("stop", [])
    params = generator.sampling_params(stop=stop, **kwargs)
    return generator.complete([prompt_ids], params, stop)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def test_models_and_health(client, server):
    models = client.get("/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-tools"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert client.get("/nowhere").status_code == 404
    assert client.get("/completions").status_code == 405


def test_completion_equals_the_engine_and_counts_usage(client, checkpoint):
    tokenizer = checkpoint[0]
    body = {"model": "tiny-tools", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    out = client.post("/completions", json=body).json()
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    (ref,) = reference_texts(checkpoint, prompt_ids, max_new_tokens=24, temperature=0)
    (choice,) = out["choices"]
    assert out["object"] == "text_completion" and out["model"] == "tiny-tools"
    assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": ref.num_generated,
                            "total_tokens": len(prompt_ids) + ref.num_generated}
    # token-id prompts and echo
    echoed = client.post("/completions", json={**body, "prompt": prompt_ids, "echo": True}).json()
    assert echoed["choices"][0]["text"] == tokenizer.decode(prompt_ids) + ref.text


def test_stop_strings_cut_the_text(client):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = client.post("/completions", json=body).json()["choices"][0]
    text = full["text"]
    assert full["finish_reason"] == "length" and len(text) > 6
    stop = text[3:6]  # a piece from inside the completion: the answer must end right before its first occurrence
    cut = client.post("/completions", json={**body, "stop": [stop, "never-generated"]}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_n_seed_and_sampling(client):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 2.0, "top_p": 0.99, "n": 3, "seed": 11,
            "ignore_eos": True}
    first = client.post("/completions", json=body).json()
    again = client.post("/completions", json=body).json()
    other = client.post("/completions", json={**body, "seed": 12}).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]  # the seed decides the samples
    assert texts != [c["text"] for c in other["choices"]]
    assert len(set(texts)) > 1  # n samples, not n copies
    assert first["usage"]["completion_tokens"] == 3 * 16
    # several prompts: choices are prompt-major
    multi = client.post("/completions", json={"prompt": [PROMPT, "Question:"], "max_tokens": 4, "n": 2,
                                              "temperature": 0}).json()
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    assert multi["choices"][0]["text"] == multi["choices"][1]["text"]  # greedy: both samples of a prompt agree


def test_chat_tool_calls_are_parsed(client):
    body = {"model": "tiny-tools", "messages": TOOL_QUESTION, "tools": TOOLS, "temperature": 0, "max_tokens": 64}
    out = client.post("/chat/completions", json=body).json()
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion"
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 2, "b": 3}
    # without tools the same text comes back as content, unparsed
    plain = client.post("/chat/completions", json={**body, "tools": None}).json()["choices"][0]
    assert "tool_calls" not in plain["message"]
    # tool_choice "none": the tools are not offered, so the prompt is shorter
    no_tools = client.post("/chat/completions", json={**body, "tool_choice": "none"}).json()
    assert no_tools["usage"]["prompt_tokens"] < out["usage"]["prompt_tokens"]


def test_streaming_equals_the_plain_answer(client):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    plain = client.post("/completions", json=body).json()
    with client.stream("POST", "/completions", json={**body, "stream": True,
                                                     "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text_chunks = [c for c in chunks if c["choices"]]
    assert len(text_chunks) > 3  # token by token, not one blob
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streaming_sends_tokens_as_they_are_generated(client):
    """The first chunk arrives long before the last token is generated; the streamed text is the plain text,
    with and without a stop string (held back while it could begin one)."""
    body = {"prompt": PROMPT, "max_tokens": 256, "temperature": 0, "ignore_eos": True}
    plain = client.post("/completions", json=body).json()["choices"][0]["text"]
    start = time.perf_counter()
    arrivals, pieces = [], []
    with client.stream("POST", "/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[len("data: "):])["choices"][0]
                if choice["text"]:
                    arrivals.append(time.perf_counter() - start)
                    pieces.append(choice["text"])
    total = time.perf_counter() - start
    print(f"first chunk after {arrivals[0]:.3f}s, last after {arrivals[-1]:.3f}s, {len(pieces)} chunks")
    assert "".join(pieces) == plain
    assert len(pieces) > 100  # token by token
    assert arrivals[0] < 0.2 * total, (arrivals[0], total)
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.2 * total  # spread over the generation, not one burst
    stop = plain[40:44]
    cut = plain[: plain.index(stop)]
    with client.stream("POST", "/completions", json={**body, "stream": True, "stop": [stop]}) as response:
        events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_text_stream_never_splits_a_character_and_matches_finish(checkpoint):
    from posttrain.rollout import Completion

    tokenizer, model, _ = checkpoint
    generator = TextGenerator.for_model(tokenizer, model.config, None)
    text = "Prix: 12€ pour un café naïve ✓ — fin ünd 𝛑"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for stop in ([], ["café"], ["fin ü"]):
        params = generator.sampling_params(max_new_tokens=len(ids), stop=stop)
        stream = generator.text_stream(params, stop)
        deltas = [stream.push(t, "length" if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
        final = generator.finish(Completion(0, ids, [0.0] * len(ids), "length"), params, stop).text
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) + stream.rest(final) == final
        assert stream.rest(final) == ""  # everything was sent by the time the tokens ended
        assert final == (text if not stop else text[: text.index(stop[0])])
        assert sum(1 for d in deltas if d) < len(ids)  # multi-byte characters spanned several tokens
    # a stop string is held back while it may still be forming: the text sent never ends with "c", "ca", "caf"
    params = generator.sampling_params(max_new_tokens=len(ids), stop=["café"])
    stream = generator.text_stream(params, ["café"])
    sent = []
    for t in ids:
        sent.append(sent[-1] + stream.push(t) if sent else stream.push(t))
    assert not any(s.endswith(("c", "ca", "caf")) for s in sent)
    assert sent[-1] == "Prix: 12€ pour un "


def test_client_that_disconnects_mid_stream_spares_the_others(client, server):
    body = {"prompt": PROMPT, "temperature": 0, "ignore_eos": True}
    other = {**body, "max_tokens": 40}
    alone = client.post("/completions", json=other).json()["choices"][0]["text"]
    forwarded = server.scheduler.engine.stats.rows_forwarded

    def leave_early() -> int:
        chunks = 0
        with httpx.Client(base_url=server.url + "/v1", timeout=300) as quitter, \
                quitter.stream("POST", "/completions", json={**body, "max_tokens": 1000, "stream": True}) as r:
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 3:
                    break  # leaving the block closes the connection mid-stream
        return chunks

    with ThreadPoolExecutor(2) as pool:
        left = pool.submit(leave_early)
        time.sleep(0.005)
        stayed = pool.submit(lambda: client.post("/completions", json=other).json()["choices"][0]["text"])
        assert left.result() == 3
        assert stayed.result() == alone
    time.sleep(0.5)  # the server notices at its next write
    # the abandoned request stopped costing compute long before its 1000 tokens
    assert server.scheduler.engine.stats.rows_forwarded - forwarded < 400
    # and the server goes on serving, streamed and not
    with client.stream("POST", "/completions", json={**other, "stream": True}) as response:
        events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == alone


def test_streaming_chat_tool_calls(client):
    body = {"messages": TOOL_QUESTION, "tools": TOOLS, "temperature": 0, "max_tokens": 64, "stream": True}
    with client.stream("POST", "/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant"
    (calls,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/completions", {"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ("/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/completions", {"prompt": [[1, 2, 10**7]]}, 400, "prompt[0]"),
    ("/completions", {"prompt": ""}, 400, "prompt[0]"),
    ("/completions", {}, 400, "prompt"),
    ("/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
    ("/completions", {"prompt": "x", "skip_special_tokens": "no"}, 400, "skip_special_tokens"),
    ("/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ("/completions", {"prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("/completions", {"prompt": "x", "max_tokens": 64, "n": 64, "echo": True}, 400, "max_tokens"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "chat_template_kwargs": {"tools": []}}, 400,
     "chat_template_kwargs"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/chat/completions", {}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "tools": [{"type": "function", "function": {}}]}, 400,
     "tools[0].function.name"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "tools": TOOLS,
                           "tool_choice": {"type": "function", "function": {"name": "multiply"}}}, 400, "tool_choice"),
    ("/chat/completions", {"messages": TOOL_QUESTION, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
])
def test_bad_requests_name_the_field(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_malformed_body(client):
    response = client.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = client.post("/completions", content=b"[1, 2]")
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def server_process(checkpoint):
    """``posttrain serve`` in its own process (one torch thread), for measurements that the test's own client
    threads must not disturb: in-process clients contend with the server's threads for one GIL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "serve", "--model", str(checkpoint[2]), "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_requests_share_batches(client, server, server_process, stream):
    """8 concurrent requests finish in far less than 8 served one after another (~8x one), and each gets what it
    would have got alone (64 tokens each). Plain requests go to the in-process server, whose scheduler shows they
    shared a batch; streamed ones to a server process, so that reading 8 streams in this process does not slow
    the server down.

    The times are the best of 5 rounds, each round one request then 8, so that a slow spell of the shared machine
    falls on both sides. Measured on the 2-core CI machine: 1.7-1.9x one request (plain), 1.9-2.3x (streamed). The
    engine's own step costs ~1.5x as much at batch 8 as at batch 1 on this tiny model (its matmuls are
    compute-bound on a CPU core), and a streamed answer also pays a wake-up, a decode and a write per interval for
    each of the 8, in threads that share the server's GIL with the decode loop. The bounds (2.5x, 3x) leave room
    for a noisy machine and still fail if requests were served one by one."""
    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    local = client
    if stream:
        client = httpx.Client(base_url=server_process, timeout=300)  # the printed address ends in /v1
    client.post("/completions", json=body)  # warm up

    def one(_: int = 0) -> tuple[str, float]:
        start = time.perf_counter()
        if stream:  # the stream is taken in as raw bytes; its events are parsed after the clock stops
            with client.stream("POST", "/completions", json={**body, "stream": True}) as response:
                raw = b"".join(response.iter_raw())
            elapsed = time.perf_counter() - start
            events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and len(events) > 2  # it did come as a stream of events
            return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]), elapsed
        text = client.post("/completions", json=body).json()["choices"][0]["text"]
        return text, time.perf_counter() - start

    def eight() -> tuple[list[str], float, int]:
        batches_before = server.scheduler.stats.batches
        with ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            results = list(pool.map(one, range(8)))
            elapsed = time.perf_counter() - start
        return [text for text, _ in results], elapsed, server.scheduler.stats.batches - batches_before

    singles, eights = [], []
    try:
        for _ in range(5):
            singles.append(one())
            eights.append(eight())
    finally:
        if stream:
            client.close()
    single_text, single = min(singles, key=lambda r: r[1])
    _texts, together, batches = min(eights, key=lambda r: r[1])
    print(f"one request {single:.3f}s, 8 concurrent {together:.3f}s (rounds: {[round(r[1], 3) for r in singles]}, "
          f"{[round(r[1], 3) for r in eights]})")
    assert all(text == single_text for text, _ in singles)
    assert all(round_texts == [single_text] * 8 for round_texts, _, _ in eights)
    if stream:  # the same text as a plain answer from the in-process server
        assert single_text == local.post("/completions", json=body).json()["choices"][0]["text"]
    else:
        assert batches <= 2, batches  # 8 requests sent at once: one batch (two if one came in late)
    bound = 3.0 if stream else 2.5
    assert together < bound * single, f"8 concurrent requests took {together:.2f}s, one took {single:.2f}s"


def test_cli_serves_until_sigterm(checkpoint, tmp_path):
    folder = checkpoint[2]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "serve", "--model", str(folder), "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving 'tiny-tools' at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.rsplit(" at ", 1)[1].strip()
        assert httpx.get(url + "/models", timeout=30).json()["data"][0]["id"] == "tiny-tools"
        out = httpx.post(url + "/chat/completions", timeout=120, json={
            "messages": TOOL_QUESTION, "tools": TOOLS, "temperature": 0, "max_tokens": 64}).json()
        assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_folder_without_tokenizer_is_refused(tmp_path, checkpoint):
    from posttrain.serving.generation import load_checkpoint

    checkpoint[1].save_pretrained(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_checkpoint(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_sampling_params_match_the_engine_contract(checkpoint):
    """Single-token stop strings stop rows inside the engine; EOS is the tokenizer's."""
    tokenizer, model, _ = checkpoint
    generator = TextGenerator.for_model(tokenizer, model.config, None)
    params = generator.sampling_params(max_new_tokens=8, stop=["\n", "no such multi-token stop"])
    assert isinstance(params, SamplingParams)
    assert params.stop_token_ids == tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id in params.stop_ids()


class RecordingEngine:
    """Stands in for the engine to watch how the scheduler groups jobs: token i of a row is prompt[0] + i."""

    name = "recording"
    capabilities = Capabilities()

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.max_new_tokens, params.seed))
        if any(p[0] < 0 for p in prompts):
            raise ValueError("negative token id")
        from posttrain.rollout import Completion

        return [Completion(i, [p[0] + t for t in range(params.max_new_tokens)], [0.0] * params.max_new_tokens,
                           "length") for i, p in enumerate(prompts) for _ in range(params.n)]


def test_scheduler_merges_compatible_jobs_and_isolates_failures():
    from posttrain.rollout.batching import BatchScheduler

    engine = RecordingEngine()
    scheduler = BatchScheduler(engine, gather_s=0.2)
    try:
        greedy = SamplingParams(max_new_tokens=3, temperature=0)
        futures = [
            scheduler.submit([[10]], greedy),
            scheduler.submit([[20], [30]], SamplingParams(max_new_tokens=5, temperature=0)),
            scheduler.submit([[-1]], greedy),  # makes the merged call fail: retried alone, fails alone
            scheduler.submit([[40]], SamplingParams(max_new_tokens=2, temperature=1.0, seed=1)),
            scheduler.submit([[50]], SamplingParams(max_new_tokens=2, temperature=1.0, seed=1)),
        ]
        a, b = futures[0].result(timeout=30), futures[1].result(timeout=30)
        with pytest.raises(ValueError, match="negative"):
            futures[2].result(timeout=30)
        s1, s2 = futures[3].result(timeout=30), futures[4].result(timeout=30)
    finally:
        scheduler.close()
    assert [c.token_ids for c in a] == [[10, 11, 12]]  # cut back to its own limit from the merged call's 5
    assert [c.finish_reason for c in a] == ["length"]
    assert [(c.prompt_index, c.token_ids) for c in b] == [(0, [20, 21, 22, 23, 24]), (1, [30, 31, 32, 33, 34])]
    assert [c.token_ids for c in s1] == [[40, 41]] and [c.token_ids for c in s2] == [[50, 51]]
    assert scheduler.stats.batches == 1  # all five gathered together
    assert engine.calls[0] == (4, 5, None)  # the greedy jobs merged, at the largest limit
    assert sorted(engine.calls[1:]) == sorted([(1, 3, None), (2, 5, None), (1, 3, None), (1, 2, 1), (1, 2, 1)])


def test_merged_requests_get_what_they_get_alone(client):
    """Greedy requests with different limits, sent together, equal the same requests sent one by one."""
    bodies = [{"prompt": PROMPT, "max_tokens": m, "temperature": 0, "ignore_eos": True} for m in (4, 12, 20)]
    alone = [client.post("/completions", json=b).json()["choices"][0] for b in bodies]
    with ThreadPoolExecutor(3) as pool:
        together = [r.json()["choices"][0] for r in pool.map(lambda b: client.post("/completions", json=b), bodies)]
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    assert alone[2]["text"].startswith(alone[0]["text"]) and len(alone[0]["text"]) < len(alone[2]["text"])
