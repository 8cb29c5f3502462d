"""``posttrain serve`` driven by the official ``openai`` client: log-probabilities (raw and processed, echoed prompt
log-probs against transformers' log-softmax on the same weights), every prompt form, penalties and min_tokens,
grammar-constrained ``response_format`` and forced tool calls, special tokens, chat-template options, the API key,
the small routes (``/tokenize``, ``/detokenize``, ``/version``, ``/v1/models/{id}``, ``/metrics``), chunked bodies,
and refusals that name the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from transformers import GraniteMoeHybridForCausalLM

from posttrain.rollout.native import NativeEngine
from posttrain.serving.generation import TextGenerator
from posttrain.serving.server import ModelServer

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test-key"
PROMPT = "Question: Ada has 12 apples and gets 7 more. How many apples does Ada have?\nAnswer:"
INT = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded: an untrained model's digits never end
SCHEMA = {"type": "object", "properties": {"answer": INT, "unit": {"type": "string",
                                                                                    "enum": ["apples", "pears"]}},
          "required": ["answer", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": INT, "b": INT}, "required": ["a", "b"],
    "additionalProperties": False}}},
         {"type": "function", "function": {"name": "negate", "parameters": {
             "type": "object", "properties": {"x": INT}, "required": ["x"],
             "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def checkpoint(save_tiny_checkpoint):
    return save_tiny_checkpoint("tiny", steps=30)


@pytest.fixture(scope="module")
def server(checkpoint):
    tokenizer, model, _ = checkpoint
    with ModelServer(tokenizer, NativeEngine(model), "tiny", model.config, port=0, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' own model on the same saved weights: the independent log-softmax."""
    return GraniteMoeHybridForCausalLM.from_pretrained(checkpoint[2], dtype=torch.float32).eval()


def log_softmax(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echoed_prompt_logprobs_equal_transformers(client, checkpoint, reference):
    """What lm-eval's loglikelihood sends, read back as it reads it: each prompt token's log-prob and top-1."""
    tokenizer = checkpoint[0]
    prompts = [tokenizer(PROMPT)["input_ids"], tokenizer("Question: 3 plus 4?\nAnswer: 7")["input_ids"]]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                    temperature=0, seed=1234)
    assert len(out.choices) == 2
    for ids, choice in zip(prompts, out.choices):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = log_softmax(reference, ids)
        for position in range(1, len(ids)):
            expected = ref[position - 1, ids[position]].item()
            assert abs(lp.token_logprobs[position] - expected) < 1e-4, position
            best = int(ref[position - 1].argmax())
            top = lp.top_logprobs[position]
            assert abs(top[tokenizer.decode([best])] - ref[position - 1, best].item()) < 1e-4
        # the generated token: greedy, with its raw log-prob
        assert abs(lp.token_logprobs[-1] - ref[-1].max().item()) < 1e-4
        assert choice.text.startswith(tokenizer.decode(ids))


@pytest.mark.parametrize("prompt_form", ["string", "strings", "ids", "lists of ids"])
def test_every_prompt_form_gives_the_same_answer(client, checkpoint, prompt_form):
    ids = checkpoint[0](PROMPT, add_special_tokens=False)["input_ids"]
    prompt = {"string": PROMPT, "strings": [PROMPT, PROMPT], "ids": ids, "lists of ids": [ids, ids]}[prompt_form]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert {c.text for c in out.choices} == {alone.choices[0].text}


def test_chat_logprobs_raw_by_default_and_top_logprobs(client, checkpoint, reference):
    tokenizer = checkpoint[0]
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.7, seed=3,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated = []
    for entry in content:
        assert len(entry.top_logprobs) == 3
        ref = log_softmax(reference, ids + generated)[-1]  # raw: no temperature
        token = next(i for i in ref.topk(50).indices.tolist() if tokenizer.decode([i]) == entry.token) \
            if entry.token in {tokenizer.decode([i]) for i in ref.topk(50).indices.tolist()} else None
        assert token is not None, entry.token
        assert abs(entry.logprob - ref[token].item()) < 1e-4
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        generated.append(token)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_logprobs_equal_the_plain_answers(client, chat):
    """Streamed chunks carry the log-probs of the tokens behind their text; together, the plain answer's."""
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    if chat:
        ask = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0.8, "seed": 5,
               "logprobs": True, "top_logprobs": 2}
        plain = client.chat.completions.create(**ask).choices[0].logprobs.content
        chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        streamed = [entry for c in chunks if c.logprobs for entry in c.logprobs.content]
        assert [(e.token, round(e.logprob, 5), [(t.token, round(t.logprob, 5)) for t in e.top_logprobs])
                for e in streamed] == \
               [(e.token, round(e.logprob, 5), [(t.token, round(t.logprob, 5)) for t in e.top_logprobs])
                for e in plain]
    else:
        ask = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.8, "seed": 5, "logprobs": 2}
        plain = client.completions.create(**ask).choices[0].logprobs
        chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True) if c.choices]
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
        assert tokens == plain.tokens and values == pytest.approx(plain.token_logprobs, abs=1e-6)
    assert len(streamed if chat else tokens) == 8


def test_processed_logprobs_mode_reports_the_sampled_distribution(checkpoint, reference):
    tokenizer, model, _ = checkpoint
    with ModelServer(tokenizer, NativeEngine(model), "tiny", model.config, port=0,
                     logprobs_mode="processed_logprobs") as srv:
        out = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 1, "logprobs": 2, "temperature": 0.5, "top_k": 5, "seed": 0}).json()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    raw = log_softmax(reference, ids)[-1]
    processed = torch.log_softmax(raw.topk(5).values / 0.5, dim=-1)  # temperature, then top-5 renormalised
    lp = out["choices"][0]["logprobs"]
    top = sorted(lp["top_logprobs"][0].values(), reverse=True)[:2]
    assert top == pytest.approx(processed[:2].tolist(), abs=1e-4)


def test_penalties_min_tokens_and_logit_bias_reach_the_engine(client, checkpoint):
    """Each field changes the answer as the engine's own sampler does with the same parameters."""
    tokenizer, model, _ = checkpoint
    generator = TextGenerator.for_model(tokenizer, model.config, NativeEngine(model).generate)
    ids = generator.encode_text(PROMPT)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    cases = [({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
             ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
             ({"extra_body": {"repetition_penalty": 3.0}}, {"repetition_penalty": 3.0}),
             ({"logit_bias": {str(ids[-1]): 100}}, {"logit_bias": {ids[-1]: 100.0}})]
    for request, engine_fields in cases:
        text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         **request).choices[0].text
        params = generator.sampling_params(max_new_tokens=12, temperature=0, **engine_fields)
        assert text == generator.complete([ids], params)[0].text, request
        assert text != plain, request  # the field did something here
    # min_tokens: EOS is not sampled before it (EOS strongly favoured by a bias otherwise ends at once)
    eos = tokenizer.eos_token_id
    early = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                      logit_bias={str(eos): 100})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                     logit_bias={str(eos): 100}, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"


def test_response_format_json_schema_and_json_object(client):
    messages = [{"role": "user", "content": "How many apples? Answer in JSON."}]
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, temperature=1.0,
                                             seed=seed, response_format={"type": "json_schema", "json_schema": {
                                                 "name": "answer", "schema": SCHEMA}})
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    # any object: the keys' strings are free, and an untrained model may never close one; those that end, parse
    ended = 0
    for seed in range(4):
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=100, temperature=1.0,
                                             seed=seed, response_format={"type": "json_object"})
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].message.content), dict)
            ended += 1
    assert ended >= 1


def test_tool_choice_required_and_named_return_tool_calls(client):
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                         max_tokens=80, temperature=1.0, seed=1)
    message = out.choices[0].message
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.function.name in ("add", "negate")
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=80,
                                         tool_choice={"type": "function", "function": {"name": "negate"}},
                                         temperature=1.0, seed=2)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].message.content is None and [c.function.name for c in calls] == ["negate"]
    jsonschema.validate(json.loads(calls[0].function.arguments), TOOLS[1]["function"]["parameters"])


def test_special_tokens_skipped_by_default_and_kept_on_request(client, checkpoint):
    tokenizer = checkpoint[0]
    end_of_role = tokenizer.convert_tokens_to_ids("<|end_of_role|>")
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logit_bias": {str(end_of_role): 100}}
    skipped = client.completions.create(model="tiny", **body)
    kept = client.completions.create(model="tiny", **body, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "<|end_of_role|>" * 3
    assert skipped.choices[0].text == "" and skipped.usage.completion_tokens == 3


def test_chat_template_options(client, checkpoint):
    tokenizer = checkpoint[0]
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The sum"}]
    count = httpx.post(client.base_url.join("/tokenize").__str__(), timeout=60, json={
        "messages": messages, "add_generation_prompt": False, "continue_final_message": True}).json()
    expected = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert count["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                         extra_body={"add_generation_prompt": False,
                                                     "continue_final_message": True})
    assert out.usage.prompt_tokens == count["count"]


def test_api_key_and_small_routes(server, client, checkpoint):
    tokenizer = checkpoint[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer(PROMPT)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert len(tokens["token_strs"]) == tokens["count"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == \
        tokenizer.decode(tokens["tokens"])
    assert httpx.get(server.url + "/version").json()["version"]
    metrics = httpx.get(server.url + "/metrics").text
    assert "posttrain_generation_tokens_total" in metrics and "posttrain_num_requests_waiting" in metrics
    assert 'posttrain_http_requests_total{route="/v1/completions",status="200"}' in metrics


def test_chunked_body_and_refusals(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode()

    def chunks():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    for raw, param in ((b'{"prompt": "x", "temperature": NaN}', "temperature"),
                       (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
                       (b'{"prompt": "x", "frobnicate": 1}', "frobnicate")):
        response = httpx.post(server.url + "/v1/completions", content=raw, headers=headers, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, raw


def test_vllm_serve_answers_the_openai_api_beside_its_rollout_endpoints(checkpoint):
    """``posttrain vllm-serve``'s app: the rollout endpoints and the same OpenAI API on one engine."""
    from posttrain.grpo.server import RolloutServer, build_app
    from posttrain.serving.http import HttpServer

    tokenizer, model, _ = checkpoint
    engine = NativeEngine(model)
    app = build_app(RolloutServer(engine, engine.load_named_tensors, "native"), tokenizer, model.config, "tiny")
    http = HttpServer(app).start()
    try:
        client = openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        rollout = httpx.post(http.url + "/generate", timeout=120, json={
            "prompts": [ids], "sampling": {"max_new_tokens": 6, "temperature": 0}}).json()["completions"][0]
        assert tokenizer.decode(rollout["token_ids"]) == text
        assert httpx.get(http.url + "/health").json()["engine"] == "native"
        from posttrain.rollout import SamplingParams
        from posttrain.rollout.remote import RemoteEngine

        penalised = SamplingParams(max_new_tokens=6, temperature=0, presence_penalty=2.0, min_tokens=2)
        remote = RemoteEngine(http.url).generate([ids], penalised)[0]  # the client's optional fields are taken
        assert remote.token_ids == engine.generate([ids], penalised)[0].token_ids
        out = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, logprobs=1, echo=True,
                                        temperature=0)
        assert len(out.choices[0].logprobs.token_logprobs) == len(ids) + 1
    finally:
        http.close()
        app.scheduler.close()


def test_chat_template_kwargs_reach_the_template(checkpoint):
    """A template variable set by the request appears in the rendered prompt (vLLM's chat_template_kwargs)."""
    import copy

    tokenizer, model, _ = checkpoint
    greeting = copy.deepcopy(tokenizer)
    greeting.chat_template = "{% if greeting %}{{ greeting }}{% endif %}" + tokenizer.chat_template
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    with ModelServer(greeting, NativeEngine(model), "tiny", model.config, port=0) as srv:
        def tokens(**extra):
            return httpx.post(srv.url + "/tokenize", json={"messages": messages, **extra}, timeout=60).json()["tokens"]

        plain, greeted = tokens(), tokens(chat_template_kwargs={"greeting": "Hello there. "})
        assert greeted[-len(plain):] == plain and greeting.decode(greeted[:-len(plain)]) == "Hello there. "
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0,
                                             extra_body={"chat_template_kwargs": {"greeting": "Hello there. "}})
        assert out.usage.prompt_tokens == len(greeted)


def test_parallel_tool_calls_false_forces_one_call(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add 2 and 3."}],
                                         tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=80, temperature=1.0, seed=4)
    assert out.choices[0].message.content is None and len(out.choices[0].message.tool_calls) == 1
